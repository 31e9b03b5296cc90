"""A1111's Downcast alphas_cumprod and Noise Schedule "Zero Terminal SNR" (`schedules.a1111_schedule_override`).

References, transcribed below:
- AUTOMATIC1111/stable-diffusion-webui modules/sd_models.py: rescale_zero_terminal_snr_abar and
  apply_alpha_schedule_override (the model's float32 alphas_cumprod_original, `.half()` with
  use_downcasted_alpha_bar, then rescaled with sd_noise_schedule "Zero Terminal SNR"); ldm's
  DDPM.register_schedule (float64 numpy betas and cumprod, stored as float32);
- crowsonkb/k-diffusion k_diffusion/external.py (the commit A1111 pins): CompVisDenoiser / DiscreteEpsDDPMDenoiser
  (sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5 in alphas_cumprod's dtype), DiscreteSchedule
  (log_sigmas, get_sigmas, sigma_to_t, t_to_sigma) and k_diffusion/sampling.py get_sigmas_karras /
  get_sigmas_exponential, as A1111's KDiffusionSampler.get_sigmas calls them (sigma_min / sigma_max the
  table's ends, `.item()`);
- modules/infotext_versions.py backcompat: texts before v1.7.0-225 were drawn with downcast alphas_cumprod.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from bundle_fixtures import tiny_bundle

from sdlab.diffusion.samplers import get_sampler
from sdlab.families import EDMSpec
from sdlab.diffusion.schedules import (
    A1111_ZERO_SNR_TERMINAL_ALPHAS_CUMPROD, NoiseSchedule, a1111_schedule_override, rescale_zero_terminal_snr_abar,
)
from sdlab.pipeline.generate import generate
from sdlab.pipeline.infotext import from_parameters, to_parameters, undrawn_labels
from sdlab.pipeline.plan import make_plan, request_sigmas, request_sampling
from sdlab.pipeline.request import GenerationRequest, RequestError

REL = 2e-5


def a1111_alphas_cumprod() -> torch.Tensor:
    """ldm DDPM.register_schedule (SD1 / SD2; sgm's LegacyDDPMDiscretization for SDXL is the same): betas
    linear in sqrt space in float64, cumprod in numpy float64, stored as float32."""
    betas = (torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2).numpy()
    return torch.tensor(np.cumprod(1.0 - betas, axis=0), dtype=torch.float32)


def a1111_rescale_zero_terminal_snr_abar(alphas_cumprod):
    """modules/sd_models.py rescale_zero_terminal_snr_abar."""
    alphas_bar_sqrt = alphas_cumprod.sqrt()
    alphas_bar_sqrt_0 = alphas_bar_sqrt[0].clone()
    alphas_bar_sqrt_T = alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= alphas_bar_sqrt_T
    alphas_bar_sqrt *= alphas_bar_sqrt_0 / (alphas_bar_sqrt_0 - alphas_bar_sqrt_T)
    alphas_bar = alphas_bar_sqrt ** 2
    alphas_bar[-1] = 4.8973451890853435e-08
    return alphas_bar


def a1111_override(downcast: bool, ztsnr: bool) -> torch.Tensor:
    """modules/sd_models.py apply_alpha_schedule_override on the model's alphas_cumprod_original."""
    alphas_cumprod = a1111_alphas_cumprod()
    if downcast:
        alphas_cumprod = alphas_cumprod.half()
    if ztsnr:
        alphas_cumprod = a1111_rescale_zero_terminal_snr_abar(alphas_cumprod)
    return alphas_cumprod


class KDiscreteSchedule:
    """k_diffusion/external.py DiscreteSchedule as CompVisDenoiser builds it from alphas_cumprod."""

    def __init__(self, alphas_cumprod):
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.log_sigmas = self.sigmas.log()

    def get_sigmas(self, n):
        t_max = len(self.sigmas) - 1
        t = torch.linspace(t_max, 0, n)
        return torch.cat([self.t_to_sigma(t), torch.zeros(1)])

    def sigma_to_t(self, sigma):
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = self.log_sigmas[low_idx], self.log_sigmas[high_idx]
        w = (low - log_sigma) / (low - high)
        w = w.clamp(0, 1)
        t = (1 - w) * low_idx + w * high_idx
        return t.view(sigma.shape)

    def t_to_sigma(self, t):
        t = t.float()
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]
        return log_sigma.exp()


def k_karras(n, sigma_min, sigma_max, rho=7.0):
    ramp = torch.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho, torch.zeros(1)])


def k_exponential(n, sigma_min, sigma_max):
    return torch.cat([torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp(), torch.zeros(1)])


def a1111_get_sigmas(schedule: str, steps: int, k: KDiscreteSchedule) -> torch.Tensor:
    """A1111's KDiffusionSampler.get_sigmas for Automatic (the model's get_sigmas), Karras and Exponential."""
    if schedule == "uniform":
        return k.get_sigmas(steps)
    sigma_min, sigma_max = k.sigmas[0].item(), k.sigmas[-1].item()
    return (k_karras if schedule == "karras" else k_exponential)(steps, sigma_min, sigma_max)


OPTIONS = [(True, False), (False, True)]


@pytest.mark.parametrize("downcast, ztsnr", OPTIONS, ids=["downcast", "zero-terminal-snr"])
def test_the_schedule_is_a1111s_alphas_cumprod_and_tables(downcast, ztsnr):
    ours = a1111_schedule_override(NoiseSchedule.sd(), downcast=downcast, zero_terminal_snr=ztsnr)
    expected = a1111_override(downcast, ztsnr)
    assert torch.equal(ours.alphas_cumprod, expected.double())
    k = KDiscreteSchedule(expected)
    assert torch.equal(ours.sigmas, k.sigmas.double()) and torch.equal(ours.log_sigmas, k.log_sigmas.double())


def test_zero_terminal_snr_ends_at_a1111s_tiny_alphas_cumprod():
    """A1111 sets the last alphas_cumprod to 4.8973451890853435e-08 (float32: 4.897345e-08), not 0: sigma_max
    ~4519 (sdlab's own zero-SNR rescale of betas agrees to float32 everywhere else)."""
    ours = a1111_schedule_override(NoiseSchedule.sd(), zero_terminal_snr=True)
    assert float(ours.alphas_cumprod[-1]) == float(torch.tensor(A1111_ZERO_SNR_TERMINAL_ALPHAS_CUMPROD,
                                                                dtype=torch.float32))
    assert ours.sigma_max == pytest.approx(4518.8, rel=1e-4)
    betas_route = NoiseSchedule.make(zero_terminal_snr=True, terminal=A1111_ZERO_SNR_TERMINAL_ALPHAS_CUMPROD)
    assert torch.allclose(ours.alphas_cumprod[:-1], betas_route.alphas_cumprod[:-1], rtol=1e-5, atol=1e-9)
    assert torch.equal(rescale_zero_terminal_snr_abar(a1111_alphas_cumprod()),
                       a1111_rescale_zero_terminal_snr_abar(a1111_alphas_cumprod()))


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("downcast, ztsnr", OPTIONS, ids=["downcast", "zero-terminal-snr"])
@pytest.mark.parametrize("schedule", ["uniform", "karras", "exponential"])
@pytest.mark.parametrize("steps", [1, 4, 20])
def test_the_sigmas_and_timesteps_are_a1111s(family, downcast, ztsnr, schedule, steps, bundles):
    """The sigmas a request visits and the timesteps the U-Net is given at them, against A1111's get_sigmas and
    k-diffusion's sigma_to_t on its tables (SD2's v-prediction and SDXL sample on the same alphas_cumprod),
    within 2e-5 relative (sdlab interpolates in float64, k-diffusion in float32)."""
    bundle = bundles[family]
    req = GenerationRequest("x", steps=steps, seed=1, sampler="Euler", schedule=schedule, width=64, height=64,
                            downcast_alphas_cumprod=downcast, zero_terminal_snr=ztsnr)
    plan = make_plan(bundle, req)
    k = KDiscreteSchedule(a1111_override(downcast, ztsnr))
    expected = a1111_get_sigmas(schedule, steps, k)
    assert torch.allclose(plan.sigmas.double().cpu(), expected.double(), rtol=REL, atol=0)
    sigmas = expected[:-1]
    assert torch.allclose(plan.sampling.sigma_to_t(sigmas.double()), k.sigma_to_t(sigmas).double(), rtol=0,
                          atol=2e-3)
    plain = make_plan(bundle, GenerationRequest("x", steps=steps, seed=1, sampler="Euler", schedule=schedule,
                                                width=64, height=64))
    assert not torch.equal(plan.sigmas, plain.sigmas) or steps == 1 and schedule == "uniform" and downcast


@pytest.fixture(scope="module")
def bundles():
    return {name: tiny_bundle(name) for name in ("sd1", "sd2", "sdxl")}


def test_downcast_moves_the_sigmas_by_float16s_rounding(bundles):
    """float16 rounds alphas_cumprod[0] = 0.99915 to 0.99902: A1111's downcast sigma_min is 0.0313, not 0.0292
    (7 % higher, so Karras' low end moves most); sigma_max moves by float16's rounding alone."""
    plain = request_sigmas(bundles["sd1"].model_sampling, get_sampler("Euler"),
                           _resolved(GenerationRequest("x", steps=20, schedule="karras")))
    downcast = request_sigmas(request_sampling(bundles["sd1"].model_sampling,
                                               GenerationRequest("x", downcast_alphas_cumprod=True)),
                              get_sampler("Euler"), _resolved(GenerationRequest("x", steps=20, schedule="karras")))
    assert 0 < abs(float(downcast[0] / plain[0]) - 1) < 1e-3
    assert float(downcast[-2]) == pytest.approx(0.0313, abs=1e-4)
    assert float(plain[-2]) == pytest.approx(0.0292, abs=1e-4)


def _resolved(req: GenerationRequest) -> GenerationRequest:
    from sdlab.pipeline.request import resolve
    return resolve(req, default_size=64, default_sampler="Euler", default_schedule="karras", factor=8)


def test_the_options_are_written_as_a1111_writes_them_and_read_back(bundles):
    bundle = bundles["sd1"]
    base = dict(prompt="a red cube", steps=3, seed=2, width=64, height=64, sampler="Euler", schedule="karras")
    plain = np.asarray(generate(bundle, GenerationRequest(**base)).images[0], dtype=np.int16)
    for option, label, value in (("downcast_alphas_cumprod", "Downcast alphas_cumprod", True),
                                 ("zero_terminal_snr", "Noise Schedule", "Zero Terminal SNR")):
        result = generate(bundle, GenerationRequest(**base, **{option: True}))
        text = {k: v for k, v in to_parameters(result.request).items() if v is not None}
        assert text[label] == value and from_parameters(text)[option] is True
        again = generate(bundle, GenerationRequest(**from_parameters(text)))
        drawn = np.asarray(result.images[0], dtype=np.int16)
        assert np.array_equal(np.asarray(again.images[0], dtype=np.int16), drawn)
        assert np.abs(drawn - plain).max() > 0
    assert to_parameters(_resolved(GenerationRequest(**base)))["Noise Schedule"] is None
    assert from_parameters({"Noise Schedule": "Default"})["zero_terminal_snr"] is False
    with pytest.raises(ValueError, match="Noise Schedule"):
        from_parameters({"Noise Schedule": "Cosine"})


@pytest.mark.parametrize("option", ["downcast_alphas_cumprod", "zero_terminal_snr"])
def test_an_edm_model_leaves_them_out_with_a_warning_and_no_label(bundles, option, caplog):
    """A1111 applies them only to a model with alphas_cumprod (`apply_alpha_schedule_override`): on an EDM model they
    change nothing, so the plan drops them, says so, and the picture carries no label of them."""
    edm = dataclasses.replace(bundles["sd1"], noise_model=EDMSpec(0.002, 80.0, 0.5))
    base = dict(prompt="a red cube", steps=3, seed=2, width=64, height=64, sampler="Euler", schedule="karras")
    with caplog.at_level("WARNING", logger="sdlab.pipeline.plan"):
        result = generate(edm, GenerationRequest(**base, **{option: True}))
    assert "DDPM schedule" in caplog.text
    written = to_parameters(result.request)
    assert written["Downcast alphas_cumprod"] is None and written["Noise Schedule"] is None
    plain = generate(edm, GenerationRequest(**base))
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(plain.images[0]))


def test_texts_before_v1_7_0_225_draw_with_downcast_alphas_cumprod():
    """infotext_versions.backcompat: A1111 before v1.7.0-225 always sampled on float16 alphas_cumprod."""
    text = {"Prompt": "a cat", "Steps": "20", "Sampler": "Euler", "Version": "v1.7.0-224-gabcdef0"}
    assert from_parameters(text)["downcast_alphas_cumprod"] is True
    assert "downcast_alphas_cumprod" not in from_parameters({**text, "Version": "v1.7.0-225-gabcdef0"})
    assert "downcast_alphas_cumprod" not in from_parameters({**text, "Version": "sdlab 0.1"})
    assert undrawn_labels(text) == []


def test_both_at_once_is_one_error():
    """Zero terminal SNR on float16 alphas_cumprod: A1111's sigmas overflow to inf (its picture is NaN)."""
    k = KDiscreteSchedule(a1111_override(True, True))
    assert math.isinf(k.sigmas[-1].item())
    with pytest.raises(RequestError, match="cannot be used together"):
        _resolved(GenerationRequest("x", downcast_alphas_cumprod=True, zero_terminal_snr=True))
