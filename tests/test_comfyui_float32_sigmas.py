"""ComfyUI's float32 arithmetic: the `normal` / `sgm_uniform` sigmas and the ControlNet window, bit for bit.

The reference is ComfyUI's code (comfyanonymous/ComfyUI), transcribed in ``comfy_reference.py``:
``comfy/model_sampling.py`` ``ModelSamplingDiscrete`` at 5b40e7a5 (float32 ``sigmas`` / ``log_sigmas`` tables made
from float64, ``timestep`` = nearest log sigma, ``sigma`` = float32 log-sigma interpolation, ``percent_to_sigma``),
``comfy/samplers.py`` ``normal_scheduler`` (``sgm_uniform`` is ``normal_scheduler(sgm=True)``) and
``KSampler.set_steps`` (the denoise cut, ``ksampler_sigmas``); below, ``comfy/controlnet.py`` ``ControlNet.get_control``
at a0b45478: no control where ``t[0] > timestep_range[0] or t[0] < timestep_range[1]``, the range
``(percent_to_sigma(start_percent), percent_to_sigma(end_percent))`` (``ControlBase.pre_run``), t the float32 sigma.

SD1 (eps), SD2 (v) and SDXL (eps) all take ComfyUI's default ModelSamplingDiscrete (scaled_linear 0.00085..0.012);
a zero-terminal-SNR v model its ``zsnr`` sigmas. sdlab's sigmas come from the request path (`plan.request_sigmas`)
of each model type's own model sampling, under ComfyUI's conventions (a sampler spelt as ComfyUI spells it:
init_noise "comfyui").
"""

from __future__ import annotations

import functools
import types

import pytest
import torch

import comfy_reference as C
from sdlab.diffusion.model_sampling import DiscreteModelSampling
from sdlab.diffusion.prediction import Prediction
from sdlab.diffusion.samplers import get_sampler
from sdlab.diffusion.schedules import A1111_ZERO_SNR_TERMINAL_ALPHAS_CUMPROD
from sdlab.families import get_family
from sdlab.families.base import ScheduleSpec
from sdlab.pipeline.control import PreparedControl, comfyui_sigma_window
from sdlab.pipeline.hires import second_pass_request
from sdlab.pipeline.infotext import from_parameters, to_parameters
from sdlab.pipeline.plan import comfyui_timestep_sigma, request_sigmas
from sdlab.pipeline.png_info import format_parameters, parse_parameters
from sdlab.pipeline.request import GenerationRequest, resolve

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ZSNR = ScheduleSpec(zero_terminal_snr=True, terminal=A1111_ZERO_SNR_TERMINAL_ALPHAS_CUMPROD)
MODEL_TYPES = {  # name: (sdlab family, prediction, schedule the model declares, ComfyUI's zsnr)
    "sd1-eps": ("sd1", Prediction.EPS, None, False),
    "sd2-v": ("sd2", Prediction.V, None, False),
    "sdxl-eps": ("sdxl", Prediction.EPS, None, False),
    "sdxl-v-zsnr": ("sdxl", Prediction.V, ZSNR, True),
}
STEPS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15, 17, 20, 23, 25, 28, 30, 33, 40, 50, 64, 75, 100)
DENOISE = (None, 0.95, 0.9, 0.8, 0.75, 0.66, 0.5, 0.4, 0.33, 0.25, 0.2)


@functools.cache
def comfyui_sampling(zsnr: bool) -> C.ModelSamplingDiscrete:
    return C.ModelSamplingDiscrete(zsnr=zsnr)


@functools.cache
def comfyui_sigmas(zsnr: bool, sampler: str, schedule: str, steps: int, denoise: float | None) -> torch.Tensor:
    """ComfyUI's KSampler sigmas (`comfy_reference.ksampler_sigmas`), made once for the model types sharing a table."""
    return C.ksampler_sigmas(comfyui_sampling(zsnr), sampler, schedule, steps, denoise)


@pytest.fixture(scope="module", params=list(MODEL_TYPES))
def model(request):
    """(sdlab's model sampling, ComfyUI's zsnr flag) of one model type."""
    family, prediction, schedule, zsnr = MODEL_TYPES[request.param]
    sampling = get_family(family).model_sampling(prediction, schedule)
    assert isinstance(sampling, DiscreteModelSampling)
    return sampling, zsnr


def comfyui_request(schedule: str, steps: int, denoise: float | None) -> types.SimpleNamespace:
    """A resolved request of a ComfyUI-spelt sampler (init_noise "comfyui"), ComfyUI's denoise as the strength."""
    return types.SimpleNamespace(schedule=schedule, steps=steps, init_image=None if denoise is None else object(),
                                 strength=denoise, img2img_convention="comfyui", init_noise="comfyui",
                                 discard_penultimate_sigma=False, schedule_sigma_min=0.0, schedule_sigma_max=0.0,
                                 schedule_rho=0.0, beta_alpha=0.6, beta_beta=0.6, old_karras_sigmas=False)


def test_the_tables_are_comfyuis(model):
    """ComfyUI's float32 sigma and log-sigma tables (each rounded from float64) for every model type."""
    sampling, zsnr = model
    comfy = comfyui_sampling(zsnr)
    assert torch.equal(sampling.schedule.sigmas.float(), comfy.sigmas)
    assert torch.equal(sampling.schedule.log_sigmas.float(), comfy.log_sigmas)


@pytest.mark.parametrize("sampler", ["euler", "dpm_2"])
@pytest.mark.parametrize("schedule", ["normal", "sgm_uniform"])
def test_normal_and_sgm_uniform_are_comfyuis_bit_for_bit(model, schedule, sampler):
    """Every sigma equal to ComfyUI's KSampler's, over 26 step counts x 11 denoise values (dpm_2: with the
    penultimate sigma dropped, from steps + 1); sdlab's float64 arithmetic missed the last bit of about half."""
    sampling, zsnr = model
    spec = get_sampler(sampler)
    for steps in STEPS:
        for denoise in DENOISE:
            reference = comfyui_sigmas(zsnr, sampler, schedule, steps, denoise)
            ours = request_sigmas(sampling, spec, comfyui_request(schedule, steps, denoise))
            assert ours.dtype == torch.float32 and torch.equal(ours, reference), (steps, denoise, ours - reference)


def test_other_conventions_keep_sdlabs_arithmetic(model):
    """An A1111-spelt request (init_noise "sigma_max") keeps its float64 arithmetic: sigmas that differ from
    ComfyUI's in the last bit (so the two paths are apart), within float32 rounding of them."""
    sampling, zsnr = model
    request = types.SimpleNamespace(**{**vars(comfyui_request("normal", 20, None)), "init_noise": "sigma_max",
                                       "img2img_convention": "a1111"})
    ours = request_sigmas(sampling, get_sampler("Euler"), request)
    reference = comfyui_sigmas(zsnr, "euler", "normal", 20, None)
    assert not torch.equal(ours, reference)
    torch.testing.assert_close(ours, reference, rtol=2e-6, atol=0)


@pytest.mark.parametrize("sampler, schedule", [("euler", "normal"), ("dpmpp_2m", "sgm_uniform")])
def test_a_comfyui_spelt_request_and_its_parameters_read_back_draw_comfyuis_sigmas(sampler, schedule):
    """A request naming a sampler as ComfyUI spells it resolves to ComfyUI's arithmetic, and the picture's parameters
    (`Initial noise: comfyui` beside the sampler's A1111 name), read back (`--from-png`, png-info, Reuse), keep it."""
    def sigmas_of(request: GenerationRequest) -> tuple[GenerationRequest, torch.Tensor]:
        resolved = resolve(request, default_size=64, default_sampler="Euler", default_schedule="karras", factor=8)
        return resolved, request_sigmas(get_family("sd1").model_sampling(Prediction.EPS), get_sampler(resolved.sampler),
                                        resolved)

    resolved, ours = sigmas_of(GenerationRequest("x", sampler=sampler, schedule=schedule, steps=13, seed=1))
    reference = comfyui_sigmas(False, sampler, schedule, 13, None)
    assert torch.equal(ours, reference)
    text = format_parameters(to_parameters(resolved))
    assert "Initial noise: comfyui" in text
    fields = from_parameters(parse_parameters(text))
    assert fields["init_noise"] == "comfyui"
    assert torch.equal(sigmas_of(GenerationRequest(**fields))[1], reference)
    a1111 = sigmas_of(GenerationRequest("x", sampler=get_sampler(sampler).a1111, schedule=schedule, steps=13, seed=1))
    assert not torch.equal(a1111[1], reference)                             # A1111's name: sdlab's float64 sigmas


@pytest.mark.parametrize("schedule", ["normal", "sgm_uniform"])
@pytest.mark.parametrize("ends", [dict(schedule_sigma_min=0.1, schedule_sigma_max=10.0),
                                  dict(schedule_sigma_max=10.0), dict(schedule_sigma_min=0.1),
                                  dict(old_karras_sigmas=True)])
def test_set_schedule_ends_keep_sdlabs_arithmetic(schedule, ends):
    """ComfyUI has no min / max sigma setting: a ComfyUI-spelt request with A1111's Schedule min / max sigma (or the
    old Karras ends 0.1 / 10) draws the sigmas A1111's name draws (float64, from the ends' fractional timesteps:
    10.0 ... 0.1 at 5 steps), not the ends moved to their nearest training timestep (10.0273 ... 0.0983)."""
    sampling = get_family("sd1").model_sampling(Prediction.EPS)

    def sigmas_of(sampler: str) -> torch.Tensor:
        request = resolve(GenerationRequest("x", sampler=sampler, schedule=schedule, steps=5, seed=1, **ends),
                          default_size=64, default_sampler="Euler", default_schedule="karras", factor=8)
        return request_sigmas(sampling, get_sampler(request.sampler), request)

    ours = sigmas_of("euler")
    assert torch.equal(ours, sigmas_of("Euler"))
    top = ends.get("schedule_sigma_max", 10.0 if ends.get("old_karras_sigmas") else sampling.sigma_max)
    assert float(ours[0]) == pytest.approx(top, rel=1e-6)
    if schedule == "normal":
        bottom = ends.get("schedule_sigma_min", 0.1 if ends.get("old_karras_sigmas") else sampling.sigma_min)
        assert float(ours[-2]) == pytest.approx(bottom, rel=1e-6)


HIRES_PASSES = [  # (first sampler, hires sampler, first schedule, hires schedule)
    ("Euler", "euler", "normal", None), ("Euler", None, "normal", None), ("Euler a", "dpm_2", "karras", "normal"),
    ("euler", "Euler", "normal", "sgm_uniform"), ("DPM++ 2M", "dpmpp_2m", "sgm_uniform", None),
]


@pytest.mark.parametrize("first, second, schedule, hr_schedule", HIRES_PASSES)
def test_a_comfyui_hires_second_pass_draws_comfyuis_sigmas(first, second, schedule, hr_schedule):
    """hr_convention comfyui: the second pass is ComfyUI's second KSampler, its sigmas ComfyUI's (the last steps + 1
    of int(steps / denoise)) bit for bit whatever the first pass's sampler is spelt as (an `Euler` first pass's
    second one followed its first's float64 arithmetic, 11 of 60 such schedules a last bit off); under A1111's hires
    the second pass keeps the first's arithmetic."""
    sampling = get_family("sd1").model_sampling(Prediction.EPS)
    comfy = comfyui_sampling(False)
    for hr_steps, hr_denoise in [(None, 0.5), (7, 0.55), (1, 0.3), (13, 0.7), (10, 1.0)]:
        request = resolve(GenerationRequest("x", seed=1, sampler=first, schedule=schedule, steps=10, width=64,
                                            height=64, hr_scale=1.5, hr_convention="comfyui",
                                            hr_upscaler="nearest-exact", hr_sampler=second, hr_schedule=hr_schedule,
                                            hr_steps=hr_steps, hr_denoise=hr_denoise),
                          default_size=64, default_sampler="Euler", default_schedule="karras", factor=8)
        second_pass = second_pass_request(request, 8)
        assert second_pass.init_noise == "comfyui"
        ours = request_sigmas(sampling, get_sampler(second_pass.sampler), second_pass, img2img=True)
        reference = C.ksampler_sigmas(comfy, get_sampler(second or first).comfy, hr_schedule or schedule,
                                      hr_steps or 10, hr_denoise)
        assert torch.equal(ours, reference), (hr_steps, hr_denoise, ours - reference)
    a1111 = resolve(GenerationRequest("x", seed=1, sampler="Euler", schedule="normal", steps=10, width=64, height=64,
                                      hr_scale=1.5, hr_upscaler="Latent", hr_sampler="euler", hr_denoise=0.5),
                    default_size=64, default_sampler="Euler", default_schedule="karras", factor=8)
    assert second_pass_request(a1111, 8).init_noise == "sigma_max"         # A1111's hires: the first pass's


# -- the ControlNet window ---------------------------------------------------------------------------------------
def comfyui_skips(sigmas: torch.Tensor, timestep_range: tuple[float, float]) -> tuple[list[bool], list[bool]]:
    """comfy/controlnet.py ``ControlNet.get_control``'s two tests at each of the float32 `sigmas` t[0]: ``t[0] >
    timestep_range[0]`` and ``t[0] < timestep_range[1]``; the control runs where neither holds."""
    return (sigmas > timestep_range[0]).tolist(), (sigmas < timestep_range[1]).tolist()


def window_percents(steps: int) -> list[float]:
    """The percents whose edges fall on a step's sigma (k / (N - 1) of `normal`, k / N of `sgm_uniform`) and a
    tenths grid."""
    return sorted({k / (steps - 1) for k in range(steps)} | {k / steps for k in range(steps + 1)}
                  | {k / 10 for k in range(11)})


@pytest.mark.parametrize("schedule", ["normal", "sgm_uniform", "karras", "simple"])
def test_the_controlnet_window_decides_as_comfyuis(model, schedule):
    """Each model call of a ComfyUI-spelt run at 2..25 steps takes a control from START to END (every pair of
    `window_percents`, START <= END) exactly where ComfyUI's get_control does: the window's edges are ComfyUI's
    percent_to_sigma bit for bit, and so are the steps' sigmas they fall on."""
    sampling, zsnr = model
    comfy = comfyui_sampling(zsnr)
    sigma_of = comfyui_timestep_sigma(sampling)
    on_a_step = 0
    for steps in range(2, 26):
        reference_sigmas = comfyui_sigmas(zsnr, "euler", schedule, steps, None)[:-1]     # (N,) float32
        sigmas = request_sigmas(sampling, get_sampler("euler"), comfyui_request(schedule, steps, None))[:-1]
        percents = window_percents(steps)
        edges = {p: comfy.percent_to_sigma(p) for p in percents}
        skips = {p: comfyui_skips(reference_sigmas, (edges[p], edges[p])) for p in percents}   # (above, below)
        on_a_step += sum(edge in reference_sigmas.tolist() for edge in edges.values())
        ours_at = {p: comfyui_sigma_window(p, p, sigma_of)[0] for p in percents}     # each edge is one percent's
        assert ours_at == edges, steps
        for start in percents:
            for end in (p for p in percents if p >= start):
                window = (ours_at[start], ours_at[end])
                control = PreparedControl(None, None, 1.0, start, end, convention="comfyui", sigma_window=window)
                ours = [control.acts((i, steps), sigma) for i, sigma in enumerate(sigmas.tolist())]
                theirs = [not (above or below) for above, below in zip(skips[start][0], skips[end][1])]
                assert ours == theirs, (steps, start, end)
    if schedule in ("normal", "sgm_uniform"):
        assert on_a_step > 200          # the grid holds the edges that fall on a step's own sigma
