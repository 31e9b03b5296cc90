"""A1111's DPM fast / DPM adaptive solve between the model's own sigmas in txt2img, between the schedule's in img2img.

A1111 1.10's `KDiffusionSampler.sample` (modules/sd_samplers_kdiffusion.py), transcribed: `x = x * sigmas[0]` from
`get_sigmas`, then for a function that takes `sigma_min`, `n = steps`, `sigma_min = model_wrap.sigmas[0].item()`,
`sigma_max = model_wrap.sigmas[-1].item()`: the schedule type, its ends and Discard penultimate sigma move only the
start noise's scale. Its `sample_img2img` passes `sigma_min = sigma_sched[-2]`, `sigma_max = sigma_sched[0]`,
`n = len(sigma_sched) - 1`: the tail's own ends. ComfyUI's `dpm_fast` / `dpm_adaptive` take the list's ends
everywhere. The reference is k-diffusion's installed `sample_dpm_fast` / `sample_dpm_adaptive` in the row's place
(seeded noise, guidance and all of sdlab's pipeline around it)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import sampler_harness as H
from bundle_fixtures import init_picture, tiny_bundle
from sdlab.diffusion import samplers
from sdlab.diffusion.samplers import get_sampler
from sdlab.pipeline import generate as G
from sdlab.pipeline.generate import generate
from sdlab.pipeline.plan import make_plan
from sdlab.pipeline.request import GenerationRequest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

KD = H.load_k_diffusion_sampling()
SIZE = 16
STEPS = 6
FUNCTIONS = {"DPM fast": "sample_dpm_fast", "DPM adaptive": "sample_dpm_adaptive"}


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle("sd1", seed=5)


def model_wrap_sigmas(bundle) -> torch.Tensor:
    """k-diffusion's `CompVisDenoiser(model).sigmas`: ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5 of the model's
    float32 alphas_cumprod, ascending."""
    alphas_cumprod = bundle.model_sampling.schedule.alphas_cumprod.float()
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def a1111_txt2img(name: str, bundle, steps: int):
    """The call A1111's `sample` makes, as a row's function (x comes scaled by `get_sigmas`' first sigma)."""
    ends = model_wrap_sigmas(bundle)
    ranged = {"sigma_min": ends[0].item(), "sigma_max": ends[-1].item()}
    if name == "DPM fast":
        ranged["n"] = steps
    return lambda model, x, sigmas, noise, callback=None: getattr(KD, FUNCTIONS[name])(
        model, x, **ranged, disable=True, eta=1.0, noise_sampler=noise)


def a1111_img2img(name: str):
    """The call A1111's `sample_img2img` makes, on the tail `sigma_sched` the row's function is given."""
    def call(model, x, sigma_sched, noise, callback=None):
        ranged = {"sigma_min": float(sigma_sched[-2]), "sigma_max": float(sigma_sched[0])}   # A1111's 0-dim tensors
        if name == "DPM fast":
            ranged["n"] = len(sigma_sched) - 1
        return getattr(KD, FUNCTIONS[name])(model, x, **ranged, disable=True, eta=1.0, noise_sampler=noise)
    return call


def _picture(bundle, request) -> np.ndarray:
    return np.asarray(generate(bundle, request).images[0]).astype(int)


def _with_reference(monkeypatch, name: str, function) -> None:
    monkeypatch.setitem(samplers._BY_SPELLING, name, dataclasses.replace(get_sampler(name), fn=function))


SCHEDULES = [
    dict(schedule="uniform", discard_penultimate_sigma=True),
    dict(schedule="karras", schedule_sigma_max=9.0),
    dict(schedule="sgm_uniform"),
    dict(schedule="exponential", schedule_sigma_min=0.1, discard_penultimate_sigma=True),
    dict(schedule="ddim_uniform"),      # A1111's DDIM: 8 sigmas for 6 steps (1000 % 6 != 0), A1111's n is still 6
]


@pytest.mark.parametrize("options", SCHEDULES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_txt2img_solves_between_the_models_sigmas_as_a1111(bundle, monkeypatch, name, options):
    """Uniform with Discard penultimate sigma (the list's last positive sigma is not the model's), Karras noised to 9,
    SGM Uniform (ends above the model's sigma_min), Exponential with both, DDIM (longer than steps + 1: DPM fast
    made one call more, `plan.solver_calls`): each picture is A1111's."""
    request = GenerationRequest("a red cube", negative_prompt="blurry", steps=STEPS, seed=11, width=SIZE, height=SIZE,
                                sampler=name, cfg_scale=5.0, **options)
    ours = _picture(bundle, request)
    _with_reference(monkeypatch, name, a1111_txt2img(name, bundle, STEPS))
    reference = _picture(bundle, request)
    assert np.abs(ours - reference).max() <= 1                 # 0 here; 1 allows a float32 rounding's flip


@pytest.mark.parametrize("schedule", ["karras", "KL Optimal"])
@pytest.mark.parametrize("convention", ["a1111", "a1111_fix_steps"])
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_img2img_solves_between_the_tails_ends_as_a1111(bundle, monkeypatch, name, convention, schedule):
    """KL Optimal's list ends at sigma_min, not 0: A1111's sigma_sched[-2] is the next-to-last sigma there (it was
    the last, 26-43% of the latents off in DPM fast / adaptive, before sdlab took the next-to-last)."""
    request = GenerationRequest("a red cube", steps=STEPS, seed=11, width=SIZE, height=SIZE, sampler=name,
                                cfg_scale=5.0, schedule=schedule, discard_penultimate_sigma=True,
                                init_image=init_picture(SIZE), strength=0.6, img2img_convention=convention)
    ours = _picture(bundle, request)
    _with_reference(monkeypatch, name, a1111_img2img(name))
    assert np.abs(ours - _picture(bundle, request)).max() <= 1


def test_only_a1111s_txt2img_rows_take_the_models_range(bundle):
    """A1111's rows in txt2img: the model's float32 ends; a hires pass (from a latent), img2img and ComfyUI's
    spelling: the list's."""
    ends = model_wrap_sigmas(bundle)
    request = GenerationRequest("x", steps=STEPS, width=SIZE, height=SIZE, schedule="karras",
                                discard_penultimate_sigma=True)
    for name in FUNCTIONS:
        plan = make_plan(bundle, dataclasses.replace(request, sampler=name))
        assert plan.solver_span == (ends[-1].item(), ends[0].item())
        assert make_plan(bundle, dataclasses.replace(request, sampler=name), from_latent=True).solver_span is None
        img2img = dataclasses.replace(request, sampler=name, init_image=init_picture(SIZE), strength=0.5)
        assert make_plan(bundle, img2img).solver_span is None
    for name in ("dpm_fast", "dpm_adaptive", "Euler"):
        assert make_plan(bundle, dataclasses.replace(request, sampler=name)).solver_span is None


def test_a_refiner_split_keeps_the_models_ends_outside_the_handoff(monkeypatch):
    """diffusers' handoff runs two solves: the base from the model's sigma_max down to the handoff sigma, the refiner
    from there down to the model's sigma_min (A1111's own handoff swaps the model inside one solve)."""
    base, refiner = tiny_bundle("sdxl", seed=25), tiny_bundle("sdxl-refiner", seed=45)
    spec = get_sampler("DPM fast")
    runs: list[tuple[list[float], dict]] = []

    def recording(model, x, sigmas, noise, callback=None, sigma_max=None, sigma_min=None):
        ends = {name: end for name, end in (("sigma_max", sigma_max), ("sigma_min", sigma_min)) if end is not None}
        runs.append((sigmas.tolist(), ends))
        return spec.fn(model, x, sigmas, noise=noise, callback=callback, **ends)

    _with_reference(monkeypatch, "DPM fast", recording)
    request = GenerationRequest("a cube", sampler="DPM fast", steps=STEPS, seed=7, width=32, height=32,
                                schedule="sgm_uniform")
    G.generate_with_refiner(base, refiner, request, switch_at=0.5)
    top, bottom = model_wrap_sigmas(base)[-1].item(), model_wrap_sigmas(base)[0].item()
    (base_sigmas, base_ends), (refiner_sigmas, refiner_ends) = runs
    assert base_ends == {"sigma_max": top} and refiner_ends == {"sigma_min": bottom}
    assert base_sigmas[-1] == refiner_sigmas[0] > 0
