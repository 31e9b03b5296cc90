"""Training schedules equal diffusers' (betas, alphas_cumprod, zero-SNR rescale) and the sigma <-> t
map equals k-diffusion's ``DiscreteSchedule`` (loaded by file path: ``import k_diffusion`` needs
torchvision)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

import sampler_harness as H

from sdlab.diffusion.schedules import (
    ZERO_SNR_TERMINAL_ALPHAS_CUMPROD,
    NoiseSchedule,
    make_betas,
    rescale_zero_terminal_snr,
)

BETA_KINDS = [("scaled_linear", 0.00085, 0.012), ("linear", 0.0001, 0.02), ("squaredcos_cap_v2", 0.0001, 0.02)]


@pytest.fixture(scope="module")
def external():
    return H.load_k_diffusion_external()


# -- betas / alphas_cumprod -------------------------------------------------------------------
@pytest.mark.parametrize("kind,start,end", BETA_KINDS)
def test_betas_and_alphas_cumprod_equal_diffusers(kind, start, end):
    ref = EulerDiscreteScheduler(beta_schedule=kind, beta_start=start, beta_end=end)
    betas32 = make_betas(kind, 1000, start, end, dtype=torch.float32)
    assert torch.equal(betas32, ref.betas)  # float32 arithmetic reproduces diffusers bit for bit
    assert torch.equal(NoiseSchedule.from_betas(betas32).alphas_cumprod, ref.alphas_cumprod)
    betas64 = make_betas(kind, 1000, start, end)
    assert betas64.dtype == torch.float64
    torch.testing.assert_close(betas64.float(), ref.betas, rtol=1e-6, atol=0)
    torch.testing.assert_close(NoiseSchedule.from_betas(betas64).alphas_cumprod.float(), ref.alphas_cumprod, rtol=2e-6, atol=1e-10)


def test_cosine_alias_and_unknown_kind():
    assert torch.equal(make_betas("cosine"), make_betas("squaredcos_cap_v2"))
    assert float(make_betas("cosine").max()) == pytest.approx(0.999)
    with pytest.raises(ValueError, match="scaled_linear"):
        make_betas("quadratic")
    with pytest.raises(ValueError, match="at least one"):
        make_betas("linear", 0)


@pytest.mark.parametrize("cls", [EulerDiscreteScheduler, DDIMScheduler])
def test_zero_terminal_snr_equals_diffusers(cls):
    ref = cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)
    betas = rescale_zero_terminal_snr(make_betas("scaled_linear", dtype=torch.float32))
    assert torch.equal(betas, ref.betas)
    assert betas[-1] == 1.0
    schedule = NoiseSchedule.from_betas(betas)
    if cls is EulerDiscreteScheduler:  # Euler replaces the terminal 0 by 2**-24, as we do
        assert torch.equal(schedule.alphas_cumprod, ref.alphas_cumprod)
    else:  # DDIM keeps the exact 0 (it never divides by it)
        assert ref.alphas_cumprod[-1] == 0
        assert torch.equal(schedule.alphas_cumprod[:-1], ref.alphas_cumprod[:-1])
    assert schedule.alphas_cumprod[-1] == ZERO_SNR_TERMINAL_ALPHAS_CUMPROD
    assert schedule.sigma_max == pytest.approx(4096.0, rel=1e-6)
    assert schedule.sigma_min == pytest.approx(NoiseSchedule.sd(dtype=torch.float32).sigma_min, rel=1e-5)
    # the first sqrt(alphas_cumprod) is preserved (Lin et al. 2023, Algorithm 1)
    plain = make_betas("scaled_linear", dtype=torch.float32)
    assert NoiseSchedule.from_betas(plain).alphas_cumprod[0] == pytest.approx(float(schedule.alphas_cumprod[0]), rel=1e-6)
    assert torch.equal(NoiseSchedule.sd(zero_terminal_snr=True, dtype=torch.float32).alphas_cumprod, schedule.alphas_cumprod)


# -- NoiseSchedule ----------------------------------------------------------------------------
def test_sd_sigma_range_and_fields():
    schedule = NoiseSchedule.sd()
    assert schedule.num_timesteps == 1000
    assert schedule.sigma_min == pytest.approx(0.0292, abs=1e-4)
    assert schedule.sigma_max == pytest.approx(14.6146, abs=1e-4)
    assert schedule.sigmas.dtype == torch.float64
    assert bool((schedule.sigmas[1:] > schedule.sigmas[:-1]).all())
    torch.testing.assert_close(schedule.log_sigmas, schedule.sigmas.log())
    assert schedule.sigmas[0].item() == schedule.sigma_min and schedule.sigmas[-1].item() == schedule.sigma_max
    with pytest.raises(dataclasses.FrozenInstanceError):
        schedule.alphas_cumprod = torch.ones(3)


def test_invalid_alphas_cumprod_rejected():
    with pytest.raises(ValueError, match="non-increasing"):
        NoiseSchedule(torch.tensor([0.5, 0.9], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        NoiseSchedule(torch.tensor([1.0, 0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        NoiseSchedule(torch.tensor([0.5, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="1-D"):
        NoiseSchedule(torch.ones(2, 2) * 0.5)


def test_t_sigma_round_trip():
    schedule = NoiseSchedule.sd()
    t = torch.cat([torch.arange(1000, dtype=torch.float64), torch.rand(500, dtype=torch.float64) * 999])
    err = (schedule.sigma_to_t(schedule.t_to_sigma(t)) - t).abs().max().item()
    assert err < 1e-9, err
    # at the training nodes t_to_sigma is the table itself
    torch.testing.assert_close(schedule.t_to_sigma(torch.arange(1000)), schedule.sigmas, rtol=1e-14, atol=0)
    # out-of-range sigmas clamp to the ends; sigma = 0 maps to t = 0
    out = schedule.sigma_to_t(torch.tensor([0.0, 1e-4, 100.0, 4096.0]))
    assert out.tolist() == [0.0, 0.0, 999.0, 999.0]
    assert schedule.sigma_to_t(torch.tensor(1.0)).shape == ()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sigma_to_t_equals_k_diffusion(dtype, external):
    schedule = NoiseSchedule.sd(dtype=dtype)
    reference = external.DiscreteSchedule(schedule.sigmas.clone(), quantize=False)
    g = torch.Generator().manual_seed(0)
    # log-uniform over and beyond the range, plus the exact training sigmas
    sigmas = torch.cat([
        torch.exp(torch.empty(2000, dtype=dtype).uniform_(-4.5, 3.5, generator=g)),
        schedule.sigmas[torch.randint(0, 1000, (200,), generator=g)],
    ])
    ours = schedule.sigma_to_t(sigmas)
    assert ours.dtype == dtype
    expected = reference.sigma_to_t(sigmas)
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    assert (ours - expected).abs().max().item() <= tol
    assert torch.equal(schedule.sigma_to_t(sigmas, quantize=True), reference.sigma_to_t(sigmas, quantize=True).to(dtype))
    t = torch.rand(1000, generator=g, dtype=torch.float64) * 999
    torch.testing.assert_close(schedule.t_to_sigma(t.to(dtype)), reference.t_to_sigma(t.to(dtype)).to(dtype), rtol=1e-6, atol=0)


def test_sigma_to_t_float64_is_tighter_than_float32_reference(external):
    """The float32 k-diffusion map (what A1111 runs) deviates from the float64 one by < 2e-4 timesteps."""
    schedule = NoiseSchedule.sd()
    reference = external.DiscreteSchedule(schedule.sigmas.float(), quantize=False)
    sigmas = torch.exp(torch.linspace(-3.5, 2.68, 3000, dtype=torch.float64))
    err = (schedule.sigma_to_t(sigmas) - reference.sigma_to_t(sigmas.float()).double()).abs().max().item()
    assert err < 2e-3, err
