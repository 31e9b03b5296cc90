"""Discretizations equal the reference implementations.

- diffusers (EulerDiscreteScheduler, DDIMScheduler, DPMSolverMultistepScheduler) built from the SD1.5,
  SD2.1 and SDXL scheduler configs hard-coded below (no hub).
- k-diffusion's ``get_sigmas_karras`` / ``get_sigmas_exponential`` / ``DiscreteSchedule`` (loaded by
  file path, since ``import k_diffusion`` needs torchvision).
- ComfyUI ``comfy/samplers.py`` and A1111 ``modules/sd_schedulers.py`` (not installable): their
  ``simple``, ``ddim_uniform`` and ``sgm_uniform`` formulas are transcribed below, on top of
  k-diffusion's DiscreteSchedule, which is what A1111 calls.

diffusers computes alphas_cumprod in float32, so its schedulers are compared with
``NoiseSchedule.sd(dtype=torch.float32)``; the others with the float64 default.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

import sampler_harness as H

from sdlab.diffusion.discretization import (
    DISCRETIZATIONS,
    ddim_timesteps,
    euler_timesteps,
    get_discretization,
    img2img_sigmas,
    initial_noise_sigma,
    partial_sigmas,
    steps_run,
)
from sdlab.diffusion.schedules import NoiseSchedule

REL = 1e-6

# scheduler_config.json of the published pipelines (keys that matter for timesteps/sigmas).
SD15 = dict(  # runwayml/stable-diffusion-v1-5 (PNDMScheduler)
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, set_alpha_to_one=False, clip_sample=False,
)
SD21 = dict(SD15, prediction_type="v_prediction")  # stabilityai/stable-diffusion-2-1 (DDIMScheduler)
SDXL = dict(SD15, timestep_spacing="leading", interpolation_type="linear")  # SDXL base (EulerDiscreteScheduler)
CONFIGS = {"sd15": SD15, "sd21": SD21, "sdxl": SDXL}
STEPS = (1, 2, 10, 20, 50, 1000)
SPACINGS = ("leading", "trailing", "linspace")


def _config(name: str, **overrides) -> dict:
    cfg = dict(CONFIGS[name])
    cfg.update(overrides)
    return cfg


def _build(cls, cfg: dict):
    """The scheduler from a pipeline config, keeping the keys its constructor takes (as from_config does)."""
    keys = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in cfg.items() if k in keys})


def _euler(cfg: dict) -> EulerDiscreteScheduler:
    return _build(EulerDiscreteScheduler, cfg)


def _ddim(cfg: dict) -> DDIMScheduler:
    return _build(DDIMScheduler, cfg)


def _assert_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = REL) -> float:
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = ((actual - expected).abs() / expected.abs().clamp_min(1e-30)).max().item() if actual.numel() else 0.0
    zero = expected == 0
    assert torch.equal(actual[zero], expected[zero])
    assert err <= rel, f"max relative error {err:.3e} > {rel:.0e}"
    return err


@pytest.fixture(scope="module")
def sched32() -> NoiseSchedule:
    return NoiseSchedule.sd(dtype=torch.float32)


@pytest.fixture(scope="module")
def sched64() -> NoiseSchedule:
    return NoiseSchedule.sd()


# -- diffusers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", STEPS)
def test_euler_spacings_match_diffusers(config, spacing, steps, sched32):
    ref = _euler(_config(config, timestep_spacing=spacing))
    ref.set_timesteps(steps)
    assert torch.equal(euler_timesteps(steps, spacing, steps_offset=1).float(), ref.timesteps)
    ours = get_discretization(spacing)(sched32, steps)
    _assert_rel(ours, ref.sigmas)
    assert ours.shape == (steps + 1,) and ours[-1] == 0


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", STEPS)
def test_ddim_spacings_match_diffusers(config, spacing, steps, sched32):
    ref = _ddim(_config(config, timestep_spacing=spacing))
    ref.set_timesteps(steps)
    ours_t = ddim_timesteps(steps, spacing, steps_offset=1)
    assert torch.equal(ours_t, ref.timesteps)
    # DDIMScheduler.step reads alphas_cumprod[t] and ends at final_alpha_cumprod (ac[0] for SD's
    # set_alpha_to_one=False). t = 1000 (leading, 1000 steps) is out of its table: clamp it.
    ac = torch.cat([ref.alphas_cumprod[ref.timesteps.clamp(max=999)], ref.final_alpha_cumprod.reshape(1)])
    expected = ((1 - ac) / ac) ** 0.5
    _assert_rel(get_discretization(f"ddim_{spacing}")(sched32, steps, final="first_alpha"), expected)


def test_ddim_linspace_rounds_where_euler_does_not():
    assert euler_timesteps(4, "linspace").tolist() == [999.0, 666.0, 333.0, 0.0]
    assert euler_timesteps(7, "linspace")[1].item() != round(euler_timesteps(7, "linspace")[1].item())
    assert ddim_timesteps(7, "linspace").tolist() == [999, 832, 666, 500, 333, 166, 0]


def test_trailing_never_emits_diffusers_extra_timestep(sched32):
    """diffusers' np.arange(T, 0, -T/61) overshoots and appends timestep -1; sdlab keeps 61 steps."""
    ref = _euler(_config("sdxl", timestep_spacing="trailing"))
    ref.set_timesteps(61)
    assert ref.timesteps.shape[0] == 62 and ref.timesteps[-1] == -1
    ours = euler_timesteps(61, "trailing")
    assert ours.shape[0] == 61
    assert torch.equal(ours.float(), ref.timesteps[:61])


@pytest.mark.parametrize("steps", STEPS)
def test_final_sigma_min_matches_diffusers(steps, sched32):
    ref = _euler(_config("sdxl", final_sigmas_type="sigma_min"))
    ref.set_timesteps(steps)
    _assert_rel(get_discretization("leading")(sched32, steps, final="first_alpha"), ref.sigmas)


@pytest.mark.parametrize("variant", ["karras", "exponential"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", STEPS)
def test_euler_karras_exponential_match_diffusers(variant, spacing, steps, sched32):
    ref = _euler(_config("sdxl", timestep_spacing=spacing, **{f"use_{variant}_sigmas": True}))
    ref.set_timesteps(steps)
    _assert_rel(get_discretization(f"diffusers_{variant}")(sched32, steps, spacing=spacing), ref.sigmas)


@pytest.mark.parametrize("variant", ["karras", "exponential"])
@pytest.mark.parametrize("steps", STEPS)
def test_dpmsolver_karras_exponential_use_full_range(variant, steps, sched32):
    ref = _build(DPMSolverMultistepScheduler, _config("sd15", **{f"use_{variant}_sigmas": True}))
    ref.set_timesteps(steps)   # sdlab's karras ramp is k-diffusion's float32 one, diffusers' float64: 2e-6 apart
    _assert_rel(get_discretization(variant)(sched32, steps), ref.sigmas, rel=2e-6 if variant == "karras" else REL)


def test_zero_snr_trailing_matches_diffusers():
    ref = _euler(_config("sd21", timestep_spacing="trailing", rescale_betas_zero_snr=True))
    ref.set_timesteps(10)
    ours = get_discretization("trailing")(NoiseSchedule.sd(zero_terminal_snr=True, dtype=torch.float32), 10)
    _assert_rel(ours, ref.sigmas)
    assert ours[0].item() == pytest.approx(4096.0, rel=1e-4)


# -- k-diffusion / A1111 / ComfyUI ----------------------------------------------------------
@pytest.fixture(scope="module")
def kdiff():
    return H.load_k_diffusion_sampling(), H.load_k_diffusion_external()


@pytest.fixture(scope="module")
def kd_schedule(kdiff, sched64):
    _, external = kdiff
    # What A1111 and ComfyUI hold: float32 sigmas of the float64 CompVis schedule.
    return external.DiscreteSchedule(sched64.sigmas.float(), quantize=False)


@pytest.mark.parametrize("steps", STEPS)
def test_karras_exponential_match_k_diffusion(steps, kdiff, kd_schedule, sched64):
    sampling, _ = kdiff
    lo, hi = float(kd_schedule.sigma_min), float(kd_schedule.sigma_max)
    # k-diffusion evaluates the ramp in float32; raised to the power rho = 7 its rounding reaches
    # ~1.1e-6 at 1000 steps. (Against diffusers' float64 ramp the 1e-6 bound holds: see above.)
    _assert_rel(get_discretization("karras")(sched64, steps), sampling.get_sigmas_karras(steps, lo, hi), rel=2e-6)
    _assert_rel(get_discretization("exponential")(sched64, steps), sampling.get_sigmas_exponential(steps, lo, hi))
    custom = get_discretization("karras")(sched64, steps, sigma_min=0.1, sigma_max=10.0, rho=5.0)
    _assert_rel(custom, sampling.get_sigmas_karras(steps, 0.1, 10.0, rho=5.0), rel=2e-6)


@pytest.mark.parametrize("steps", STEPS)
def test_normal_and_uniform_match_k_diffusion_get_sigmas(steps, kd_schedule, sched64):
    expected = kd_schedule.get_sigmas(steps)
    _assert_rel(get_discretization("normal")(sched64, steps), expected)
    _assert_rel(get_discretization("Uniform")(sched64, steps), expected)


@pytest.mark.parametrize("steps", STEPS)
def test_sgm_uniform_matches_a1111(steps, kd_schedule, sched64):
    # A1111 modules/sd_schedulers.py sgm_uniform (ComfyUI normal_scheduler(sgm=True) is the same for SD):
    #   start = sigma_to_t(sigma_max); end = sigma_to_t(sigma_min)
    #   sigs = [t_to_sigma(ts) for ts in torch.linspace(start, end, n + 1)[:-1]] + [0.0]
    start = kd_schedule.sigma_to_t(kd_schedule.sigma_max)
    end = kd_schedule.sigma_to_t(kd_schedule.sigma_min)
    sigs = [kd_schedule.t_to_sigma(ts) for ts in torch.linspace(start, end, steps + 1)[:-1]] + [0.0]
    _assert_rel(get_discretization("sgm_uniform")(sched64, steps), torch.tensor([float(s) for s in sigs]))


@pytest.mark.parametrize("steps", STEPS + (3, 7, 30))
def test_simple_matches_comfyui(steps, kd_schedule, sched64):
    # ComfyUI comfy/samplers.py simple_scheduler:
    #   ss = len(s.sigmas) / steps; sigs = [float(s.sigmas[-(1 + int(x * ss))]) for x in range(steps)] + [0.0]
    ss = len(kd_schedule.sigmas) / steps
    sigs = [float(kd_schedule.sigmas[-(1 + int(x * ss))]) for x in range(steps)] + [0.0]
    _assert_rel(get_discretization("simple")(sched64, steps), torch.tensor(sigs))


@pytest.mark.parametrize("steps", STEPS + (3, 7, 30))
def test_ddim_uniform_matches_comfyui(steps, kd_schedule, sched64):
    # ComfyUI comfy/samplers.py ddim_scheduler (sigmas[1] is not ~0 for SD, so it starts from [0.0]):
    #   ss = max(len(s.sigmas) // steps, 1); x = 1
    #   while x < len(s.sigmas): sigs += [float(s.sigmas[x])]; x += ss
    #   sigs = sigs[::-1]
    sigs, x = [0.0], 1
    ss = max(len(kd_schedule.sigmas) // steps, 1)
    while x < len(kd_schedule.sigmas):
        sigs.append(float(kd_schedule.sigmas[x]))
        x += ss
    _assert_rel(get_discretization("ddim_uniform")(sched64, steps), torch.tensor(sigs[::-1]))


# -- registry, validation, img2img, initial noise ---------------------------------------------
RAMPS = {"karras", "exponential", "normal", "uniform", "polyexponential", "kl_optimal", "a1111_beta",
         "align_your_steps", "align_your_steps_sdxl"}
"""Schedules whose own levels run down to sigma_min (or just below it)."""


@pytest.mark.parametrize("name", sorted(DISCRETIZATIONS))
def test_every_discretization_is_descending_and_ends_at_final(name, sched64):
    for steps in (1, 5, 20):
        sigmas = get_discretization(name)(sched64, steps)
        assert sigmas.dtype == torch.float32
        if name not in ("ddim_uniform", "beta"):        # these two leave out repeated levels, as ComfyUI's
            assert sigmas.shape == (steps + 1,)
        assert bool((sigmas[1:] < sigmas[:-1]).all())
        if name == "a1111_kl_optimal":                 # A1111's "KL Optimal" ends at sigma_min itself
            assert sigmas[-1].item() == pytest.approx(sched64.sigma_min, rel=1e-6)
            continue
        assert sigmas[-1] == 0 and bool((sigmas[:-1] > 0).all())
        ending = get_discretization(name)(sched64, steps, final="first_alpha")
        if name in RAMPS:
            assert bool((ending[1:] < ending[:-1]).all())           # every requested step has a length
        if name in RAMPS and sigmas[-2].item() <= sched64.sigma_min * (1 + 1e-6):
            assert ending[-1] == 0 and torch.equal(ending[:-1], sigmas[:-1])   # then 0, not sigma_min twice
        else:                                             # diffusers' spacings keep theirs, as diffusers does
            assert ending[-1].item() == pytest.approx(sched64.sigma_min, rel=1e-6)


def test_lookup_errors():
    assert get_discretization("  KARRAS ") is DISCRETIZATIONS["karras"]
    with pytest.raises(ValueError, match="valid names: .*karras"):
        get_discretization("karas")
    sched = NoiseSchedule.sd()
    for steps in (0, -3, 2.5):
        with pytest.raises(ValueError, match="steps must be a positive integer"):
            get_discretization("karras")(sched, steps)
    with pytest.raises(ValueError, match="final sigma"):
        get_discretization("normal")(sched, 4, final="one")
    with pytest.raises(ValueError, match="timestep spacing"):
        euler_timesteps(4, "uniform")


@pytest.mark.parametrize("steps", (1, 10, 20, 50))
@pytest.mark.parametrize("strength", (0.05, 0.29, 0.3, 0.5, 0.75, 0.99, 1.0))
def test_img2img_cut_matches_diffusers_get_timesteps(steps, strength, sched32):
    # StableDiffusionImg2ImgPipeline.get_timesteps
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    ref = _euler(_config("sd15", timestep_spacing="leading"))
    ref.set_timesteps(steps)
    expected = ref.sigmas[t_start * ref.order :]
    if init_timestep == 0:
        with pytest.raises(ValueError, match="runs no step"):
            partial_sigmas(get_discretization("leading")(sched32, steps), strength)
        return
    ours = partial_sigmas(get_discretization("leading")(sched32, steps), strength)
    _assert_rel(ours, expected)
    _assert_rel(img2img_sigmas("leading", sched32, steps, strength), expected)


def test_img2img_conventions():
    # diffusers: int(50 * 0.29) == 14 (0.29 * 50 = 14.499...), A1111: t_enc + 1, ComfyUI: stretched schedule.
    assert steps_run(50, 0.29, "diffusers") == (50, 14)
    assert steps_run(20, 0.75, "a1111") == (20, 16)
    assert steps_run(20, 1.0, "a1111") == (20, 20)
    assert steps_run(20, 0.75, "comfyui") == (26, 20)
    sched = NoiseSchedule.sd()
    full = get_discretization("karras")(sched, 26)
    assert torch.equal(img2img_sigmas("karras", sched, 20, 0.75, "comfyui"), full[-21:])
    a1111 = partial_sigmas(get_discretization("karras")(sched, 20), 0.75, "a1111")
    assert a1111.shape == (17,)
    for bad in (0.0, -0.1, 1.01, math.nan):
        with pytest.raises(ValueError, match="strength"):
            steps_run(20, bad)
    # A1111 takes denoising strength 0: t_enc = 0, one step from the lowest sigma (sigmas[steps - 1:])
    assert steps_run(20, 0.0, "a1111") == (20, 1)
    assert torch.equal(partial_sigmas(full[-21:], 0.0, "a1111"), full[-2:])
    for bad in (-0.1, math.nan):
        with pytest.raises(ValueError, match=r"strength must lie in \[0, inf\)"):
            steps_run(20, bad, "a1111")
    # A1111 takes any strength above 1 (float noise as 1.0000001 too): its steps read min(strength, 0.999)
    for convention in ("a1111", "a1111_fix_steps"):
        assert steps_run(20, 1.0000001, convention) == steps_run(20, 1.5, convention) == steps_run(20, 1.0, convention)
    with pytest.raises(ValueError, match=r"strength must lie in \(0, 1\]"):
        steps_run(20, 1.0000001, "comfyui")
    for convention in ("diffusers", "comfyui"):
        with pytest.raises(ValueError, match="strength"):
            steps_run(20, 0.0, convention)
    with pytest.raises(ValueError, match="img2img_sigmas"):
        partial_sigmas(full, 0.5, "comfyui")


def a1111_setup_img2img_steps(steps, denoising_strength, img2img_fix_steps):
    """A1111 1.10 sd_samplers_common.setup_img2img_steps with p.steps = steps and no steps passed."""
    if img2img_fix_steps:
        requested_steps = steps
        steps = int(requested_steps / min(denoising_strength, 0.999)) if denoising_strength > 0 else 0
        t_enc = requested_steps - 1
    else:
        steps = steps
        t_enc = int(min(denoising_strength, 0.999) * steps)
    return steps, t_enc


@pytest.mark.parametrize("steps", [1, 7, 20, 50])
@pytest.mark.parametrize("strength", [0.05, 0.3, 0.75, 0.9995, 1.0])
@pytest.mark.parametrize("fix_steps", [False, True])
def test_a1111_conventions_are_setup_img2img_steps(steps, strength, fix_steps):
    """A1111's KDiffusionSampler.sample_img2img runs sigma_sched = get_sigmas(p, steps)[steps - t_enc - 1:] with
    (steps, t_enc) from setup_img2img_steps: option img2img_fix_steps is the a1111_fix_steps convention."""
    convention = "a1111_fix_steps" if fix_steps else "a1111"
    total, t_enc = a1111_setup_img2img_steps(steps, strength, fix_steps)
    assert steps_run(steps, strength, convention) == (total, t_enc + 1)
    sched = NoiseSchedule.sd()
    expected = get_discretization("karras")(sched, total)[total - t_enc - 1:]
    assert torch.equal(img2img_sigmas("karras", sched, steps, strength, convention), expected)
    if fix_steps:
        with pytest.raises(ValueError, match="img2img_sigmas"):
            partial_sigmas(expected, strength, convention)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_initial_noise_sigma_matches_diffusers(spacing, sched32):
    ref = _euler(_config("sdxl", timestep_spacing=spacing))
    ref.set_timesteps(30)
    sigmas = get_discretization(spacing)(sched32, 30)
    convention = "diffusers_leading" if spacing == "leading" else "sigma_max"
    assert initial_noise_sigma(sigmas, convention) == pytest.approx(float(ref.init_noise_sigma), rel=REL)
    assert initial_noise_sigma(sigmas) == pytest.approx(float(sigmas[0]))
    assert initial_noise_sigma(sigmas, "vp") == pytest.approx(math.sqrt(float(sigmas[0]) ** 2 + 1))
    with pytest.raises(ValueError, match="initial-noise convention"):
        initial_noise_sigma(sigmas, "edm")
