"""TCD (Trajectory Consistency Distillation) in sigma space against diffusers' ``TCDScheduler``.

Same harness as tests/test_sampling_ldm.py: a fixed random tiny diffusers U-Net behind sdlab's ``Denoiser``,
the diffusers loop and the sdlab sampler start from the same unit noise, step over the same timesteps (as
sigmas, ending at alphas_cumprod[0] as TCDScheduler does) and draw step noise from the same per-image
generators. The final VP latents must agree to 1e-5, for eta (gamma) 0, 0.3 (the model card's value)
and 1, eps and v prediction, at 1, 2 and 4 steps.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import TCDScheduler
from sampler_harness import context, noise_for, run_diffusers, sd_schedule, sd_scheduler_config, sdlab_model, tiny_unet

from sdlab.diffusion.discretization import diffusers_spacing_sigmas
from sdlab.diffusion.samplers import get_sampler
from sdlab.diffusion.sampling_ldm import sample_ddim, sample_tcd, to_ddpm_latent

SEEDS = (0, 1)
SCHEDULE = sd_schedule()
TOLERANCE = 1e-5
MAPS = dict(sigma_to_t=SCHEDULE.sigma_to_t, t_to_sigma=SCHEDULE.t_to_sigma)


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(0)


@pytest.fixture(scope="module")
def ctx():
    return context(2)


def _sigmas_at(timesteps) -> torch.Tensor:
    """sigma[t] for each timestep, then sigma_min (alphas_cumprod[0], TCD's end)."""
    return torch.cat([SCHEDULE.sigmas[torch.as_tensor(timesteps).long()], SCHEDULE.sigmas[:1]])


def _run_sdlab(unet, ctx, prediction: str, sigmas: torch.Tensor, **options) -> torch.Tensor:
    unit, noise = noise_for(SEEDS)
    x = unit * math.sqrt(1.0 + float(sigmas[0]) ** 2)  # VP x_T = unit noise
    model = sdlab_model(unet, ctx, "eps" if prediction == "epsilon" else "v")
    return to_ddpm_latent(sample_tcd(model, x, sigmas, noise=noise, **options), sigmas[-1])


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_tcd_matches_diffusers(unet, ctx, prediction, steps, eta):
    scheduler = TCDScheduler(**sd_scheduler_config(prediction))
    ref, scheduler, _ = run_diffusers(scheduler, unet, ctx, steps, SEEDS, eta=eta)
    sigmas = _sigmas_at(scheduler.timesteps)
    ours = _run_sdlab(unet, ctx, prediction, sigmas, eta=eta, **MAPS)
    assert torch.isfinite(ref).all()
    err = (ours - ref).abs().max().item()
    assert err <= TOLERANCE, f"max |sdlab - diffusers| = {err:.3e}"


@pytest.mark.parametrize("steps", [1, 4, 8])
def test_tcd_grid_and_end_are_the_table_rows(steps):
    """The TCD row's spacing ("lcm") and final sigma give TCDScheduler's timesteps and its alphas_cumprod[0] end."""
    spec = get_sampler("tcd")
    assert spec.name == "TCD" and spec.fn is sample_tcd and spec.stochastic
    scheduler = TCDScheduler(**sd_scheduler_config())
    scheduler.set_timesteps(steps)
    ours = diffusers_spacing_sigmas(SCHEDULE, steps, spacing="trailing", scheduler=spec.spacing, final=spec.final_sigma)
    torch.testing.assert_close(ours.to(torch.float32), _sigmas_at(scheduler.timesteps), rtol=1e-6, atol=0)


def test_eta_zero_is_ddim_and_draws_nothing(unet, ctx):
    """gamma = 0 steps straight to the next timestep: deterministic DDIM on the same sigmas."""
    model = sdlab_model(unet, ctx, "eps")
    sigmas = _sigmas_at([999, 759, 499, 259])
    x = noise_for(SEEDS)[0] * float(sigmas[0])
    ours = sample_tcd(model, x, sigmas, eta=0.0, **MAPS)  # no noise source: none is needed
    torch.testing.assert_close(ours, sample_ddim(model, x, sigmas), rtol=0, atol=1e-5)


def test_tcd_checks_its_inputs():
    model = lambda x, sigma: torch.zeros_like(x)  # noqa: E731
    x, sigmas = torch.ones(1, 1, 2, 2), _sigmas_at([999, 499])
    with pytest.raises(ValueError, match="noise"):
        sample_tcd(model, x, sigmas, eta=0.3, **MAPS)
    with pytest.raises(ValueError, match="eta"):
        sample_tcd(model, x, sigmas, eta=1.5, **MAPS)
    with pytest.raises(ValueError, match="t_to_sigma"):
        sample_tcd(model, x, sigmas, eta=0.3, sigma_to_t=SCHEDULE.sigma_to_t)


def test_tcd_on_a_karras_grid_stays_finite_and_ends_at_zero():
    """Off the training timesteps (karras, final sigma 0) each s is the floor of a fractional timestep."""
    from sdlab.diffusion.discretization import karras_sigmas
    from sdlab.diffusion.noise import generators_for, per_image_noise

    sigmas = karras_sigmas(SCHEDULE, 6)
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * float(sigmas[0])
    model = lambda x, sigma: x / (1.0 + sigma.reshape(-1, 1, 1, 1) ** 2)  # noqa: E731  data ~ N(0, 1)
    out = sample_tcd(model, x, sigmas, noise=per_image_noise(generators_for([1, 2]), x), eta=0.3, **MAPS)
    assert torch.isfinite(out).all() and out.std() < 2.0


def test_a_list_cut_short_ends_at_its_last_sigma(unet, ctx):
    """The base model's part of a refiner run: its last step re-noises to the handoff sigma, so running the
    cut list and then the rest equals running the whole list (same noise stream)."""
    model = sdlab_model(unet, ctx, "eps")
    sigmas = _sigmas_at([999, 759, 499, 259])
    unit, noise = noise_for(SEEDS)
    whole = sample_tcd(model, unit * float(sigmas[0]), sigmas, noise=noise, eta=0.5, **MAPS)
    unit, noise = noise_for(SEEDS)
    first = sample_tcd(model, unit * float(sigmas[0]), sigmas[:3], noise=noise, eta=0.5, **MAPS)
    rest = sample_tcd(model, first, sigmas[2:], noise=noise, eta=0.5, **MAPS)
    torch.testing.assert_close(rest, whole, rtol=0, atol=1e-5)
