"""The sampler registry: names users type, the errors they get, and what each entry tells the loop."""

from __future__ import annotations

import pytest
import torch

from sdlab.diffusion.discretization import get_discretization
from sdlab.diffusion.noise import generators_for, per_image_noise
from sdlab.diffusion.samplers import (
    A1111_TIMESTEP_SCHEDULE, SAMPLER_TABLE, SAMPLERS, UnknownSamplerError, get_sampler, runs_a1111_timesteps,
    sampler_names, steps_warning,
)
from sdlab.diffusion.schedules import NoiseSchedule
from sdlab.diffusion.steps import ancestral_step

A1111_NAMES = [
    "Euler", "Euler a", "Heun", "DPM2", "DPM2 a", "LMS", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ SDE",
    "DPM++ 2S a", "DPM++ 3M SDE", "UniPC", "DDIM", "PLMS", "DDPM", "LCM",
]
COMFY_NAMES = [
    "euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2m", "dpmpp_2m_sde",
    "dpmpp_sde", "dpmpp_2s_ancestral", "dpmpp_3m_sde", "ddim", "plms", "ddpm", "lcm", "uni_pc",
]


SAME_WORD = {"ddim", "lcm", "plms"}
"""Words A1111 and ComfyUI both use, for two samplers: the exact spelling picks, any other case is A1111's."""


@pytest.mark.parametrize("name", A1111_NAMES + COMFY_NAMES)
def test_every_known_name_resolves_in_any_case(name: str) -> None:
    spec = get_sampler(name)
    assert get_sampler(f"  {name} ") is spec
    if name.casefold() in SAME_WORD:
        return
    assert get_sampler(name.upper()) is spec
    assert get_sampler(f"  {name.lower()} ") is spec


def test_a1111_and_comfyui_ddim_are_two_samplers() -> None:
    """A1111's DDIM ends at alphas_cumprod[0]; ComfyUI's `ddim` is `ksampler("euler")` on sigmas ending at 0."""
    a1111, comfy = get_sampler("DDIM"), get_sampler("ddim")
    assert a1111.name == "DDIM" and a1111.final_sigma == "first_alpha" and a1111.fn.__name__ == "sample_ddim"
    assert comfy.name == "ddim" and comfy.final_sigma == "zero" and comfy.fn is get_sampler("euler").fn
    assert get_sampler("Ddim") is a1111 and get_sampler(" ddim ") is comfy


def test_only_a1111s_spelling_of_plms_runs_its_timesteps() -> None:
    """"PLMS" (any case but "plms") is A1111's, on its timesteps on ddim_uniform; "plms", written as ComfyUI writes
    its names, runs under ComfyUI's conventions on that schedule's sigmas."""
    a1111, comfy = get_sampler("PLMS"), get_sampler("plms")
    assert runs_a1111_timesteps(a1111, A1111_TIMESTEP_SCHEDULE) and get_sampler("Plms") is a1111
    assert not runs_a1111_timesteps(comfy, A1111_TIMESTEP_SCHEDULE) and comfy.name == "plms"
    assert comfy.fn is a1111.fn


def test_aliases_point_at_the_same_sampler() -> None:
    assert get_sampler("euler_ancestral") is get_sampler("Euler a")
    assert get_sampler("dpmpp_2m") is get_sampler("DPM++ 2M")
    assert get_sampler("DPM++ SDE").noise == "brownian"
    assert get_sampler("Euler").noise == "none"
    assert get_sampler("LCM").wants_sigma_to_t and not get_sampler("lcm").wants_sigma_to_t   # ComfyUI's: unscaled


def test_one_row_per_sampler_and_one_name_per_row() -> None:
    # no name in two rows ("Euler" and "euler" fold together within one row) but A1111's and ComfyUI's DDIM, LCM, PLMS
    names = [name for spec in SAMPLER_TABLE for name in {n.casefold() for n in (spec.a1111, spec.comfy) if n}]
    assert sorted(name for name in set(names) if names.count(name) > 1) == sorted(SAME_WORD)
    rows_of: dict[int, list] = {}
    for spec in SAMPLER_TABLE:
        rows_of.setdefault(id(spec.fn), []).append(spec)
    for rows in rows_of.values():   # a function in two rows only where they run it on other sigmas or options
        assert len({(row.discard_penultimate, row.final_sigma, row.spacing, row.wants_sigma_to_t,
                     runs_a1111_timesteps(row, A1111_TIMESTEP_SCHEDULE)) for row in rows}) == len(rows)
    assert [spec.name for spec in SAMPLER_TABLE if spec.a1111] == list(SAMPLERS)
    assert all(get_sampler(spec.name) is spec for spec in SAMPLER_TABLE)


def test_ancestral_step_in_float64_is_the_closed_form_ddim_split() -> None:
    """DDIM's eta split (Song et al. 2020, eq. 16, in VE sigmas) is the k-diffusion ancestral step."""
    cases = ((14.6, 7.0, 1.0), (1.0, 0.03, 0.5), (3.0, 2.9, 2.0), (2.0, 0.0, 1.0), (2.0, 1.0, 0.0))
    for sigma, sigma_next, eta in cases:
        up = min(sigma_next, eta * sigma_next * (sigma**2 - sigma_next**2) ** 0.5 / sigma)
        down = (sigma_next**2 - up**2) ** 0.5
        f64 = lambda value: torch.tensor(value, dtype=torch.float64)  # noqa: E731
        got = ancestral_step(f64(sigma), f64(sigma_next), eta)
        assert got == pytest.approx((down, up), rel=1e-12, abs=1e-15)


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(UnknownSamplerError) as err:
        get_sampler("Eulr")
    message = str(err.value)
    assert "Eulr" in message
    for name in ("Euler a", "DPM++ 2M", "dpmpp_2m", "UniPC"):
        assert name in message
    assert set(sampler_names()) >= set(A1111_NAMES)
    assert isinstance(err.value, ValueError)  # request validation turns it into a RequestError


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_runs_with_the_noise_its_spec_asks_for(name: str) -> None:
    """Drive each registered sampler as the generate loop does, on the exact Gaussian denoiser."""
    from sdlab.diffusion.brownian import BrownianTreeNoise

    spec = SAMPLERS[name]
    schedule = NoiseSchedule.sd()
    sigmas = get_discretization("karras")(schedule, 6, final=spec.final_sigma)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    model = lambda x, sigma: x * (1.0 / (1.0 + sigma.reshape(-1, 1, 1, 1) ** 2))  # data ~ N(0, 1)
    options = {}
    if spec.noise == "gaussian":
        options["noise"] = per_image_noise(generators_for([1, 2]), x)
    elif spec.noise == "brownian":
        options["noise"] = BrownianTreeNoise.for_sigmas(x, sigmas, [1, 2])
    if spec.wants_sigma_to_t:
        options["sigma_to_t"] = schedule.sigma_to_t
    if spec.wants_t_to_sigma:
        options["t_to_sigma"] = schedule.t_to_sigma
    steps: list[int] = []
    out = spec.fn(model, x, sigmas, callback=lambda info: steps.append(info.i), **options)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert steps[0] == 0 and len(steps) >= 6


@pytest.mark.parametrize(
    "name, steps, schedule, warns",
    [("LMS", 20, "normal", True), ("LMS", 20, "karras", False), ("LMS", 30, "simple", False),
     ("PLMS", 20, "karras", True), ("DPM++ 3M SDE", 29, "exponential", True), ("DPM++ 2M", 5, "normal", False)],
)
def test_samplers_that_need_more_steps_say_so(name: str, steps: int, schedule: str, warns: bool) -> None:
    assert (steps_warning(get_sampler(name), steps, schedule) is not None) is warns


def test_generate_warns_about_too_few_steps_only_with_guidance(caplog) -> None:
    """LMS / PLMS / DPM++ 3M SDE below their minimum used to give a broken picture silently (issue 12, 17)."""
    from bundle_fixtures import tiny_bundle

    from sdlab.pipeline.generate import generate
    from sdlab.pipeline.request import GenerationRequest

    bundle = tiny_bundle("sdlab-tiny")
    for cfg, expected in ((5.0, True), (1.0, False)):
        caplog.clear()
        request = GenerationRequest("a red apple", sampler="LMS", schedule="normal", steps=2, cfg_scale=cfg, seed=1)
        with caplog.at_level("WARNING"):
            generate(bundle, request)
        assert ("LMS needs about 30 steps" in caplog.text) is expected


@pytest.mark.parametrize("name", ["Heun", "DPM2", "dpm_2", "DPM2 a", "dpm_2_ancestral", "DPM++ 2S a", "DPM++ SDE",
                                  "DPM++ 2S", "Euler", "Euler a", "LMS", "DPM++ 2M", "DPM++ 2M SDE", "Restart", "deis"])
def test_calls_per_step_is_what_the_sampler_makes(name):
    """`calls_per_step` (A1111 schedules prompt edits over every model call) counted on a schedule whose
    steps all end above 0 (where Heun and DPM2 take their second call)."""
    spec = get_sampler(name)
    sigmas = torch.tensor([10.0, 5.0, 2.0, 1.0])
    calls = []
    model = lambda x, sigma, **_: calls.append(1) or x * 0.5                            # noqa: E731
    noise = (lambda sigma, sigma_next: torch.zeros(1, 1, 2, 2)) if spec.stochastic else None  # noqa: E731
    spec.fn(model, torch.ones(1, 1, 2, 2), sigmas, **({"noise": noise} if noise else {}))
    assert len(calls) == spec.calls_per_step * 3


@pytest.mark.parametrize("alias, name", [("dpmpp_sde_gpu", "DPM++ SDE"), ("dpmpp_2m_sde_gpu", "DPM++ 2M SDE"),
                                         ("dpmpp_2m_sde_heun_gpu", "DPM++ 2M SDE Heun"),
                                         ("dpmpp_3m_sde_gpu", "dpmpp_3m_sde")])
def test_comfyui_gpu_names_are_the_plain_samplers(alias, name) -> None:
    """ComfyUI's `_gpu` samplers differ only in the device of their Brownian tree; sdlab draws its tree as for the
    plain names. The A1111 API's sampler list (and so the web UI's) carries them as aliases."""
    from sdlab.server.a1111 import samplers

    assert get_sampler(alias) is get_sampler(name) and get_sampler(alias.upper()) is get_sampler(name)
    assert alias in sampler_names()
    assert alias in {row["name"]: row["aliases"] for row in samplers()}[name]
    assert get_sampler("dpmpp_3m_sde_gpu").discard_penultimate is False    # ComfyUI's 3M SDE, not A1111's


@pytest.mark.parametrize("name", [None, 5, ["Euler"], b"Euler"])
def test_anything_but_a_string_is_an_unknown_sampler(name):
    from sdlab.diffusion.samplers import UnknownSamplerError
    from sdlab.pipeline.infotext import eta_label

    with pytest.raises(UnknownSamplerError, match="named by a string.*valid names: Euler, "):
        get_sampler(name)
    assert eta_label(name) == ("Eta", None)


def test_a_bug_in_the_sampler_lookup_is_not_taken_for_an_unknown_sampler(monkeypatch):
    """`runs_a1111_unipc` is False for a sampler sdlab does not know, a name or not; any other error propagates."""
    from dataclasses import replace

    from sdlab.pipeline import request
    from sdlab.pipeline.request import GenerationRequest, runs_a1111_unipc

    unipc = GenerationRequest("x", sampler="UniPC", schedule="ddim_uniform")
    assert runs_a1111_unipc(unipc)
    assert not runs_a1111_unipc(replace(unipc, sampler=5)) and not runs_a1111_unipc(replace(unipc, sampler="Nope"))

    def broken(name):
        raise AttributeError("a bug")

    monkeypatch.setattr(request, "get_sampler", broken)
    with pytest.raises(AttributeError, match="a bug"):
        runs_a1111_unipc(unipc)


@pytest.mark.parametrize("bug", [AttributeError("a bug"), ValueError("a bug")])
@pytest.mark.parametrize("module, function", [
    ("infotext", "_schedule_overrides"), ("infotext", "_sgm_noise_multiplied"), ("infotext", "_sampler_init_noise"),
    ("infotext", "_ensd"), ("infotext", "_old_rule_differs"), ("infotext", "eta_label"), ("infotext", "_taken"),
    ("request", "runs_a1111_unipc"), ("samplers", "a1111_schedule"),
])
def test_every_sampler_lookup_takes_only_an_unknown_sampler_for_one(monkeypatch, bug, module, function):
    """Each lookup reads `UnknownSamplerError` (a ValueError) as "a sampler sdlab does not know"; any other error,
    a ValueError of a bug included, propagates instead of silently dropping the labels it decides."""
    import importlib

    from sdlab.pipeline.request import GenerationRequest

    target = importlib.import_module(f"sdlab.{'diffusion' if module == 'samplers' else 'pipeline'}.{module}")
    req = GenerationRequest("x", sampler="Euler", schedule="karras", steps=4, seed=1, sgm_noise_multiplier=True)
    args = {"_old_rule_differs": (req, ["x"]), "eta_label": ("Euler",), "a1111_schedule": ("Euler", "karras"),
            "_taken": (req, "s_churn", 1.0)}
    call = getattr(target, function)
    call(*args.get(function, (req,)))                                    # the real lookup answers

    def broken(name):
        raise bug

    monkeypatch.setattr(target, "get_sampler", broken)
    with pytest.raises(type(bug), match="a bug"):
        call(*args.get(function, (req,)))


def test_schedule_labels_of_a_request_without_schedule_or_with_unknown_names():
    """`_schedule_overrides` writes no schedule label where there is no schedule, or a sampler or schedule sdlab
    does not know (the request's check names those); with both known it writes what the schedule took."""
    from dataclasses import replace

    from sdlab.pipeline.infotext import _schedule_overrides
    from sdlab.pipeline.request import GenerationRequest

    req = GenerationRequest("x", sampler="DPM2", schedule="karras", schedule_rho=5.0)
    assert _schedule_overrides(req)["Schedule rho"] == 5.0
    for other in (replace(req, schedule=None), replace(req, sampler="Nope"), replace(req, schedule="nope")):
        assert _schedule_overrides(other) == {}


def test_every_row_copies_and_pickles_once_its_parameters_are_read() -> None:
    """`parameters` was cached as the signature's mappingproxy: copy.deepcopy and pickle of a row that had read it
    raised "cannot pickle 'mappingproxy' object"."""
    import copy
    import dataclasses
    import functools
    import pickle

    def fields(row):                # a partial (DPM++ 2M SDE Heun) equals only itself: its function and options
        fn = row.fn
        plain = (fn.func, fn.args, fn.keywords) if isinstance(fn, functools.partial) else fn
        return dataclasses.replace(row, fn=None), plain

    for row in SAMPLER_TABLE:
        assert row.default_eta is None or row.default_eta >= 0          # reads (and caches) `parameters`
        for copied in (copy.deepcopy(row), pickle.loads(pickle.dumps(row)), copy.copy(row)):
            assert fields(copied) == fields(row) and copied.parameters == row.parameters, row.name
            assert copied.draws_step_noise() == row.draws_step_noise(), row.name
