"""A diffusers spacing name gives each sampler what its own diffusers scheduler gives (issue 12, items 2-3).

For every sampler that diffusers implements, at 10 steps, for ``leading`` / ``trailing`` / ``linspace`` and
for eps and v prediction: sdlab builds its sigmas the way the generate loop does (``discretize`` with the
sampler's ``SamplerSpec.spacing``) and its initial noise scale by the request default
(``default_init_noise``), and the final latents must equal those of the diffusers pipeline loop over the
scheduler configured with that ``timestep_spacing`` (same tiny U-Net, same seeds; ``sampler_harness``).

Documented exceptions:
- ``DPMSolverSinglestepScheduler`` (DPM++ 2S) has no spacing option; its fixed grid is the ``dpm_solver``
  family's ``linspace``, compared here; the other names give DPMSolverMultistep's spacing.
- diffusers' DDIM / PNDM step from t to ``t - T // steps``, which is not the next listed timestep for
  ``linspace`` (999 -> 899, then the model is asked at 888), nor for ``trailing`` when the steps do not
  divide T (6 steps: 999 -> 833, then the model is asked at 832): they evaluate the model at one noise level
  and treat the sample as another. sdlab steps between listed timesteps, so these are compared on the
  timesteps only (DDPMScheduler steps to the next listed timestep: compared on every spacing).
- LCMScheduler has no spacing option: every spacing name gives its distillation grid.
- DPMSolverMultistep's SDE variants draw Gaussian step noise where sdlab (as A1111 / ComfyUI) feeds DPM++ 2M
  SDE from a Brownian tree; they are compared with Gaussian step noise (the spacing is what is tested).
"""

from __future__ import annotations

import pytest
import torch

import sampler_harness as H
from bundle_fixtures import tiny_bundle
from sdlab.diffusion.brownian import BrownianTreeNoise
from sdlab.diffusion.discretization import default_init_noise, discretize, initial_noise_sigma
from sdlab.diffusion.samplers import get_sampler
from sdlab.diffusion.sampling_ldm import to_ddpm_latent
from sdlab.families.sd1 import SD1
from sdlab.families.sdlab_tiny import SDLAB_TINY
from sdlab.pipeline.generate import resolve_for
from sdlab.pipeline.infotext import from_parameters, to_parameters
from sdlab.pipeline.png_info import format_parameters, parse_parameters
from sdlab.pipeline.request import GenerationRequest, resolve

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

STEPS = 10
TOL = 1e-5
SPACINGS = ("leading", "trailing", "linspace")
PREDICTIONS = ("epsilon", "v_prediction")
SCHEDULE = H.sd_schedule()

_SDE = dict(algorithm_type="sde-dpmsolver++", solver_order=2)
_VP_DDIM = dict(clip_sample=False, set_alpha_to_one=False)
# (sdlab sampler, diffusers scheduler, config, the spacings diffusers steps through as listed)
CASES = [
    ("Euler", "EulerDiscreteScheduler", {}, SPACINGS),
    ("Euler a", "EulerAncestralDiscreteScheduler", {}, SPACINGS),
    ("Heun", "HeunDiscreteScheduler", {}, SPACINGS),
    ("DPM2", "KDPM2DiscreteScheduler", {}, SPACINGS),
    ("DPM2 a", "KDPM2AncestralDiscreteScheduler", {}, SPACINGS),
    ("LMS", "LMSDiscreteScheduler", {}, SPACINGS),
    ("DPM++ SDE", "DPMSolverSDEScheduler", dict(noise_sampler_seed=list(H.SEEDS)), SPACINGS),
    ("DPM++ 2M", "DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2), SPACINGS),
    ("DPM++ 2M SDE", "DPMSolverMultistepScheduler", _SDE, SPACINGS),
    ("DPM++ 2M SDE Heun", "DPMSolverMultistepScheduler", dict(_SDE, solver_type="heun"), SPACINGS),
    ("DPM++ 2S", "DPMSolverSinglestepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2), ("linspace",)),
    ("UniPC", "UniPCMultistepScheduler", {}, SPACINGS),
    ("DDIM", "DDIMScheduler", _VP_DDIM, ("leading", "trailing")),
    ("PLMS", "PNDMScheduler", dict(_VP_DDIM, skip_prk_steps=True), ("leading", "trailing")),
    ("DDPM", "DDPMScheduler", dict(clip_sample=False, variance_type="fixed_small"), SPACINGS),
    ("LCM", "LCMScheduler", dict(original_inference_steps=50), SPACINGS),
]
GAUSSIAN_IN_DIFFUSERS = {"DPM++ 2M SDE", "DPM++ 2M SDE Heun"}
PARAMS = [
    pytest.param(name, cls, config, spacing, prediction, id=f"{name}-{spacing}-{prediction[0]}")
    for name, cls, config, spacings in CASES
    for spacing in spacings
    for prediction in PREDICTIONS
]


@pytest.fixture(scope="module")
def unet():
    return H.tiny_unet()


@pytest.fixture(scope="module")
def ctx():
    return H.context()


def _diffusers(cls_name: str, config: dict, spacing: str, prediction: str, unet, ctx) -> torch.Tensor:
    import diffusers

    network = unet
    if cls_name == "PNDMScheduler" and prediction == "v_prediction":
        network, prediction = H.VToEps(unet, SCHEDULE.alphas_cumprod), "epsilon"
    scheduler = H.make_scheduler(getattr(diffusers, cls_name), prediction, timestep_spacing=spacing, **config)
    latents, _, _ = H.run_diffusers(scheduler, network, ctx, STEPS)
    return latents


def _sdlab(name: str, spacing: str, prediction: str, unet, ctx, steps: int = STEPS) -> torch.Tensor:
    """The generate loop's choices for ``schedule=spacing`` with the default ``init_noise``."""
    spec = get_sampler(name)
    sigmas = discretize(spacing, SCHEDULE, steps, scheduler=spec.spacing, final=spec.final_sigma)  # (steps + 1,)
    unit, gaussian = H.noise_for(H.SEEDS)
    x = unit * initial_noise_sigma(sigmas, default_init_noise(spacing, spec.spacing))  # (B, 4, 8, 8)
    noise = gaussian if spec.noise == "gaussian" or name in GAUSSIAN_IN_DIFFUSERS else None
    if spec.noise == "brownian" and name not in GAUSSIAN_IN_DIFFUSERS:
        noise = BrownianTreeNoise.for_sigmas(x, sigmas, H.SEEDS)
    options = {"sigma_to_t": SCHEDULE.sigma_to_t} if spec.wants_sigma_to_t else {}
    out = spec.fn(H.sdlab_model(unet, ctx, prediction), x, sigmas, noise=noise, **options)
    return to_ddpm_latent(out, sigmas[-1])


@pytest.mark.parametrize("name, cls_name, config, spacing, prediction", PARAMS)
def test_named_spacing_matches_the_samplers_diffusers_scheduler(unet, ctx, name, cls_name, config, spacing, prediction):
    expected = _diffusers(cls_name, config, spacing, prediction, unet, ctx)
    actual = _sdlab(name, spacing, prediction, unet, ctx)
    assert torch.isfinite(expected).all()
    err = (actual - expected).abs().max().item()
    assert err <= TOL, f"{name} with {spacing}: max |sdlab - diffusers| = {err:.3e}"


@pytest.mark.parametrize("name, cls_name", [("DDIM", "DDIMScheduler"), ("PLMS", "PNDMScheduler")])
@pytest.mark.parametrize("spacing, steps", [("linspace", STEPS), ("trailing", 6), ("trailing", 7)])
def test_ddim_family_off_the_list_visits_diffusers_timesteps(unet, ctx, name, cls_name, spacing, steps):
    """Where diffusers steps to ``t - T // steps``, off its own list (module docstring), sdlab visits the same
    timesteps, stepping between them: the pictures differ (measured at 6 / 7 steps ``trailing``: max 2e-3 /
    5e-3 of the latents, 2-5/255 of the SD1 pictures)."""
    import diffusers

    scheduler = H.make_scheduler(getattr(diffusers, cls_name), timestep_spacing=spacing, skip_prk_steps=True,
                                 **_VP_DDIM)
    scheduler.set_timesteps(steps)
    timesteps = torch.unique_consecutive(scheduler.timesteps)
    assert (timesteps[:-1] - timesteps[1:] != 1000 // steps).any()                 # off the list somewhere
    spec = get_sampler(name)
    sigmas = discretize(spacing, SCHEDULE, steps, scheduler=spec.spacing, final=spec.final_sigma)
    torch.testing.assert_close(sigmas[:-1], SCHEDULE.sigmas[timesteps], rtol=0, atol=0)
    expected, _, _ = H.run_diffusers(scheduler, unet, ctx, steps)
    actual = _sdlab(name, spacing, "epsilon", unet, ctx, steps)
    assert (actual - expected).abs().max().item() > 100 * TOL


@pytest.mark.parametrize("spacing", SPACINGS)
def test_dpm_solver_spacing_differs_from_eulers(spacing):
    """The case behind the 125/255 report: DPM++ 2M's leading grid has steps + 1 points (t = 901, 811, ...)."""
    euler = discretize(spacing, SCHEDULE, STEPS, scheduler=get_sampler("Euler").spacing)
    dpm = discretize(spacing, SCHEDULE, STEPS, scheduler=get_sampler("DPM++ 2M").spacing)
    assert (spacing == "trailing") == torch.equal(euler, dpm)


# -- the request default: which initial noise a schedule name brings ------------------------------------


def _resolved(**fields) -> GenerationRequest:
    request = GenerationRequest(prompt="a red apple", seed=1, **fields)
    return resolve(request, default_size=64, default_sampler="DPM++ 2M", default_schedule="karras", factor=8)


@pytest.mark.parametrize(
    "sampler, schedule, expected",
    [
        ("Euler", "leading", "vp"),                 # EulerDiscreteScheduler.init_noise_sigma, leading
        ("Euler", "trailing", "sigma_max"),
        ("Euler", "linspace", "sigma_max"),
        ("Heun", "leading", "vp"),
        ("DPM++ 2M", "trailing", "vp"),             # DPMSolverMultistep starts from unit VP noise
        ("DDIM", "linspace", "vp"),
        ("UniPC", "leading", "vp"),
        ("Euler", "ddim_trailing", "vp"),           # DDIMScheduler's timesteps, its convention
        ("Euler", "diffusers_karras", "vp"),        # Euler(use_karras_sigmas=True), leading spacing
        ("Euler", "karras", "sigma_max"),           # A1111 / ComfyUI names keep theirs
        ("DDIM", "normal", "sigma_max"),
        ("DPM++ 2M", "exponential", "sigma_max"),
    ],
)
def test_init_noise_follows_the_schedule_convention(sampler, schedule, expected):
    assert _resolved(sampler=sampler, schedule=schedule).init_noise == expected


def test_an_explicit_init_noise_wins():
    assert _resolved(sampler="Euler", schedule="leading", init_noise="sigma_max").init_noise == "sigma_max"
    assert _resolved(sampler="Euler", schedule="karras", init_noise="vp").init_noise == "vp"


@pytest.mark.parametrize("schedule, init_noise", [("leading", "sigma_max"), ("leading", "vp"), ("karras", "vp")])
def test_png_parameters_keep_the_initial_noise(schedule, init_noise):
    """A PNG's parameters give back the convention used, also where it is not the schedule's default."""
    req = _resolved(sampler="Euler", schedule=schedule, init_noise=init_noise)
    fields = from_parameters(parse_parameters(format_parameters(to_parameters(req))))
    assert _resolved(**{k: v for k, v in fields.items() if k not in ("prompt", "seed")}).init_noise == init_noise


def test_cfg_defaults_to_the_familys():
    assert SDLAB_TINY.default_cfg == 5.0 and SD1.default_cfg == 7.0
    assert _resolved().cfg_scale == 7.0
    assert _resolved(cfg_scale=3).cfg_scale == 3.0
    for name in ("sdlab-tiny", "sd1"):
        bundle = tiny_bundle(name)
        req = resolve_for(bundle, GenerationRequest(prompt="x", seed=1, width=64, height=64))
        assert req.cfg_scale == bundle.family.default_cfg == {"sdlab-tiny": 5.0, "sd1": 7.0}[name]
