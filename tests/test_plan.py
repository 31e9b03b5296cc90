"""Resolve once: `Pipeline.resolve` returns a `GenerationPlan`, and running it never resolves again (no second
sampler lookup, schedule build, memory reading or mask blur); the refiner is checked up front; the progress
callback contract; out-of-memory recognition; the CLI resolves once."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_fixtures import tiny_bundle, write_original
from cli_helpers import run
from PIL import Image

import sdlab.pipeline.plan as plan_module
from sdlab.api import Pipeline
from sdlab.diffusion.discretization import DIFFUSERS_NAMES, DISCRETIZATIONS, discretize, img2img_sigmas
from sdlab.diffusion.model_sampling import DiscreteModelSampling
from sdlab.diffusion.samplers import get_sampler, steps_warning
from sdlab.diffusion.steps import StepInfo
from sdlab.families.base import ScheduleSpec
from sdlab.pipeline.memory import estimate_bytes, is_out_of_memory
from sdlab.pipeline.overlay import blur_mask
from sdlab.pipeline.plan import GenerationPlan, make_plan
from sdlab.pipeline.request import GenerationRequest, RequestError

SIZE = 16
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def bundles():
    return {name: tiny_bundle(name, seed=3 + i) for i, name in enumerate(["sd1", "sdxl", "sdxl-refiner"])}


def _request(**changes) -> GenerationRequest:
    options = dict(prompt="a red cube", negative_prompt="ugly", steps=3, seed=7, width=SIZE, height=SIZE,
                   sampler="Euler a", schedule="karras")
    return GenerationRequest(**{**options, **changes})


def _picture() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))


def _mask() -> Image.Image:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[:, SIZE // 2:] = 255
    return Image.fromarray(mask)


class _Counter:
    """Wrap a function and count its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.fixture()
def counted(monkeypatch):
    """Counters on every lookup a run could repeat: sampler, schedule build, free memory, the init picture
    (resized, its mask blurred)."""
    counters = {
        "get_sampler": _Counter(plan_module.get_sampler),
        "available_bytes": _Counter(plan_module.available_bytes),
        "init_pictures": _Counter(plan_module.init_pictures),
        "build": _Counter(ScheduleSpec.build),
    }
    for name in ("get_sampler", "available_bytes", "init_pictures"):
        monkeypatch.setattr(plan_module, name, counters[name])
    monkeypatch.setattr(ScheduleSpec, "build", lambda self: counters["build"](self))
    return counters


# ---------------------------------------------------------------------------------------------------------
# the plan


def test_resolve_returns_the_plan_of_a_request(bundles):
    bundle = bundles["sd1"]
    plan = Pipeline(bundle).resolve(_request(schedule=None, sampler=None, width=None, height=None))
    req = plan.request
    assert isinstance(plan, GenerationPlan) and req.sampler == get_sampler(bundle.family.default_sampler).name
    assert req.width == req.height == bundle.default_size and req.schedule == bundle.family.default_sigma_schedule
    assert plan.sampler is get_sampler(req.sampler)
    assert isinstance(plan.sampling, DiscreteModelSampling) and plan.sampling.prediction is bundle.prediction
    expected = discretize(req.schedule, bundle.family.schedule.build(), req.steps, final=plan.sampler.final_sigma,
                          scheduler=plan.sampler.spacing)
    assert torch.equal(plan.sigmas, expected.to(bundle.device)) and plan.steps_run == req.steps
    factor = bundle.vae_config.downsample_factor
    assert plan.latent_shape == (1, bundle.unet_config.out_channels, req.height // factor, req.width // factor)
    assert plan.mask is None and plan.refiner_split is None and plan.refiner_sampling is None


def test_img2img_plan_holds_the_tail_and_inpaint_the_blurred_mask(bundles):
    bundle = bundles["sd1"]
    plan = make_plan(bundle, _request(init_image=_picture(), strength=0.5, steps=6))
    tail = img2img_sigmas("karras", bundle.family.schedule.build(), 6, 0.5, "diffusers", final="zero", scheduler="euler")
    assert torch.equal(plan.sigmas, tail) and plan.steps_run == 3
    plan = make_plan(bundle, _request(init_image=_picture(), mask_image=_mask(), mask_blur=2.0, strength=1.0))
    assert torch.equal(plan.mask, blur_mask(_mask(), 2.0, (SIZE, SIZE)))


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
def test_running_a_plan_resolves_nothing_again(bundles, counted, mode):
    """One schedule build, one memory reading and one init picture per run, all in the plan; the sampler is looked
    up by name while resolving (the plan, and the prompt schedule's calls a step for the chunk check), not again."""
    extra = {"img2img": dict(init_image=_picture(), strength=0.6),
             "inpaint": dict(init_image=_picture(), mask_image=_mask(), mask_blur=1.5)}.get(mode, {})
    pipe = Pipeline(bundles["sd1"])
    plan = pipe.resolve(_request(**extra))
    made = {name: counter.calls for name, counter in counted.items()}
    assert made == {"get_sampler": made["get_sampler"], "available_bytes": 1, "init_pictures": 1, "build": 1}
    result = pipe.run(plan)
    assert {name: counter.calls for name, counter in counted.items()} == made      # nothing resolved again
    assert result.request == plan.request           # a copy: the labels the drawing acted on (all off here)

    pipe.run(_request(**extra))                                                      # a request: resolved once
    assert {name: counter.calls for name, counter in counted.items()} == {name: 2 * n for name, n in made.items()}


def test_a_plan_draws_what_its_request_draws(bundles):
    pipe = Pipeline(bundles["sd1"])
    request = _request(init_image=_picture(), mask_image=_mask(), mask_blur=1.0, strength=0.8, batch_size=2)
    by_plan = pipe.run(pipe.resolve(request))
    by_request = pipe.run(request)
    assert by_plan.request == by_request.request and by_plan.seeds == by_request.seeds == [7, 8]
    for a, b in zip(by_plan.images, by_request.images):
        assert np.array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------------------------------------
# refiner


def test_refiner_plan_checks_both_models_with_one_memory_reading(bundles, counted):
    pipe = Pipeline(bundles["sdxl"], bundles["sdxl-refiner"], refiner_switch=0.5)
    plan = pipe.resolve(_request(steps=6))
    assert plan.refiner_split is not None and 0 < plan.refiner_split < 6
    assert isinstance(plan.refiner_sampling, DiscreteModelSampling)
    assert counted["available_bytes"].calls == 1 and counted["build"].calls == 2      # base + refiner, once each
    looked_up = counted["get_sampler"].calls
    pipe.run(plan)
    assert counted["available_bytes"].calls == 1 and counted["build"].calls == 2
    assert counted["get_sampler"].calls == looked_up                                 # not looked up again


def test_refiner_memory_is_checked_up_front(bundles, monkeypatch):
    base, refiner = bundles["sdxl"], bundles["sdxl-refiner"]
    wide = replace(refiner.unet_config, model_channels=refiner.unet_config.model_channels * 64)
    hungry = replace(refiner, unet_config=wide)                            # an estimate far above the base's
    resolved = make_plan(base, _request()).request
    free = (estimate_bytes(base, resolved) + estimate_bytes(hungry, resolved)) // 2
    monkeypatch.setattr(plan_module, "available_bytes", lambda device: free)
    make_plan(base, _request())                                            # the base alone fits
    with pytest.raises(RequestError, match="needs about"):
        Pipeline(base, hungry).resolve(_request())


def test_refiner_clip_skip_is_checked_up_front(bundles, monkeypatch):
    base, refiner = bundles["sdxl"], bundles["sdxl-refiner"]
    real = plan_module.hidden_state_layers
    refiner_encoders = {id(encoder) for encoder in refiner.text_encoders}

    def fewer_layers_in_the_refiner(encoder, clip_skip):
        if id(encoder) in refiner_encoders:
            raise ValueError("the refiner's text encoder has too few layers")
        return real(encoder, clip_skip)

    monkeypatch.setattr(plan_module, "hidden_state_layers", fewer_layers_in_the_refiner)
    make_plan(base, _request())
    with pytest.raises(RequestError, match="too large for the refiner"):
        Pipeline(base, refiner).resolve(_request())


def test_a_plan_without_refiner_is_refused_by_a_refiner_pipeline(bundles):
    plan = make_plan(bundles["sdxl"], _request())
    with pytest.raises(ValueError, match="without a refiner"):
        Pipeline(bundles["sdxl"], bundles["sdxl-refiner"]).run(plan)


# ---------------------------------------------------------------------------------------------------------
# progress, out of memory


def test_progress_is_called_per_step_and_its_exception_propagates(bundles):
    pipe = Pipeline(bundles["sd1"])
    seen: list[StepInfo] = []
    plan = pipe.resolve(_request(steps=3))
    pipe.run(plan, progress=seen.append)
    assert [info.i for info in seen] == [0, 1, 2] and all(info.denoised.shape == plan.latent_shape for info in seen)

    class Cancelled(Exception):
        pass

    def cancel(info: StepInfo) -> None:
        if info.i == 1:
            raise Cancelled

    with pytest.raises(Cancelled):
        pipe.run(_request(steps=3), progress=cancel)


@pytest.mark.parametrize(("error", "oom"), [
    (MemoryError(), True),
    (torch.OutOfMemoryError("CUDA out of memory"), True),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"), True),
    (RuntimeError("shape mismatch"), False),
    (ValueError("can't allocate memory"), False),
])
def test_out_of_memory_is_recognised(error, oom):
    assert is_out_of_memory(error) is oom


def test_out_of_memory_while_drawing_is_a_request_error(bundles, monkeypatch):
    import sdlab.api as api

    pipe = Pipeline(bundles["sd1"])

    def allocator_failure(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 bytes")

    monkeypatch.setattr(api, "generate", allocator_failure)
    with pytest.raises(RequestError, match=f"out of memory on cpu drawing {SIZE}x{SIZE} x 1"):
        pipe.run(_request())
    monkeypatch.setattr(api, "generate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        pipe.run(_request())


# ---------------------------------------------------------------------------------------------------------
# small review findings


def test_steps_warning_takes_the_schedule_name_in_any_case():
    lms = get_sampler("LMS")
    assert steps_warning(lms, 20, "karras") is None
    assert steps_warning(lms, 20, "Karras") is None and steps_warning(lms, 20, " KARRAS ") is None
    assert steps_warning(lms, 20, "normal") is not None


def test_diffusers_names_are_registered_discretizations():
    assert set(DIFFUSERS_NAMES) < set(DISCRETIZATIONS)
    assert {"leading", "trailing", "linspace", "ddim_leading", "diffusers_karras"} <= set(DIFFUSERS_NAMES)
    assert not {"karras", "normal", "simple", "exponential"} & set(DIFFUSERS_NAMES)


# ---------------------------------------------------------------------------------------------------------
# the CLI


def test_cli_resolves_once_and_records_the_plans_request(tmp_path: Path, capsys, monkeypatch):
    from sdlab.pipeline.png_info import parse_parameters, read_parameters

    model = tmp_path / "tiny-sd1.safetensors"
    write_original(tiny_bundle("sd1"), model, junk=False)
    plans = []
    real = plan_module.make_plan

    def recording(*args, **kwargs):
        plans.append(real(*args, **kwargs))
        return plans[-1]

    import sdlab.api as api

    monkeypatch.setattr(api, "make_plan", recording)
    out = tmp_path / "cube.png"
    code, _, _ = run(["img2img", "a cube", "--init", str(_save(_picture(), tmp_path / "init.png")), "--strength", "0.5",
                      "--model", str(model), "--out", str(out), "--steps", "4", "--seed", "9", "--no-progress"], capsys)
    assert code == 0 and len(plans) == 1
    recorded = parse_parameters(read_parameters(out))
    req = plans[0].request
    assert recorded["Steps"] == req.steps == 4 and recorded["Sampler"] == req.sampler
    assert recorded["Seed"] == req.seed == 9 and recorded["Size"] == f"{req.width}x{req.height}"
    assert recorded["Denoising strength"] == req.strength == 0.5


def _save(image: Image.Image, path: Path) -> Path:
    image.save(path)
    return path


# ---------------------------------------------------------------------------------------------------------
# a flow-matching family runs through the same plan and loop


class _RecordingUNet(torch.nn.Module):
    """The bundle's U-Net, recording the time input of every call."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.times: list[torch.Tensor] = []

    def forward(self, x, t, *args, **kwargs):
        self.times.append(t.clone())
        return self.inner(x, t, *args, **kwargs)


def test_a_flow_matching_family_runs_through_the_plan_and_loop_unchanged(bundles):
    from sdlab.diffusion.model_sampling import FlowMatchingModelSampling

    base = bundles["sd1"]
    family = replace(base.family, sampling=lambda spec, prediction: FlowMatchingModelSampling(shift=3.0))
    unet = _RecordingUNet(base.unet)
    flow = replace(base, family=family, unet=unet)
    pipe = Pipeline(flow)
    plan = pipe.resolve(_request(sampler="Euler", schedule="simple", steps=4))
    assert isinstance(plan.sampling, FlowMatchingModelSampling)
    expected = discretize("simple", plan.sampling.schedule, 4)
    assert torch.equal(plan.sigmas, expected) and float(plan.sigmas[0]) == 1.0          # ComfyUI's flow "simple"
    torch.testing.assert_close(plan.sigmas[1:4].double(), 3 * torch.tensor([0.75, 0.5, 0.25], dtype=torch.float64)
                               / (1 + 2 * torch.tensor([0.75, 0.5, 0.25], dtype=torch.float64)), atol=2e-3, rtol=0)
    result = pipe.run(plan)
    assert np.isfinite(np.asarray(result.images[0], dtype=np.float32)).all()
    steps_t = torch.stack([t[0] for t in unet.times])                                   # one call per Euler step
    torch.testing.assert_close(steps_t, plan.sigmas[:-1].float() * 1000)               # t = s * 1000, no table lookup
