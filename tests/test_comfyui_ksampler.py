"""ComfyUI's KSampler: the sigmas each of its sampler names runs on, and the samplers that ComfyUI runs its own way.

The reference is ComfyUI's code transcribed in ``comfy_reference.py``; sdlab's sigmas come from the request path
(``plan.request_sigmas``, which applies the sampler row's options and the "comfyui" img2img cut).
"""

from __future__ import annotations

import types

import pytest
import torch

import comfy_reference as C
import sampler_harness as H
from sdlab.diffusion.model_sampling import DiscreteModelSampling
from sdlab.diffusion.samplers import get_sampler
from sdlab.diffusion.schedules import NoiseSchedule
from sdlab.pipeline.plan import request_sigmas

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

KSAMPLER_NAMES = [
    "euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral", "dpmpp_sde",
    "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "ddpm", "lcm", "ddim", "uni_pc", "uni_pc_bh2",
]
SCHEDULERS = ["normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta", "linear_quadratic",
              "kl_optimal"]
STEPS = (1, 2, 3, 7, 10, 20)
DENOISE = (None, 0.9, 0.5, 0.33)


@pytest.fixture(scope="module")
def comfy():
    return C.ModelSamplingDiscrete()


def sdlab_sigmas(sampler: str, schedule: str, steps: int, denoise: float | None = None) -> torch.Tensor:
    """The sigmas a request for `sampler` on `schedule` runs on, ComfyUI's `denoise` as the img2img strength."""
    request = types.SimpleNamespace(schedule=schedule, steps=steps, init_image=None if denoise is None else object(),
                                    strength=denoise, img2img_convention="comfyui")
    return request_sigmas(DiscreteModelSampling(NoiseSchedule.sd(), "eps"), get_sampler(sampler), request)


def assert_same_sigmas(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert ours.shape == reference.shape, (ours, reference)
    torch.testing.assert_close(ours, reference.float(), rtol=2e-6, atol=0)


@pytest.mark.parametrize("sampler", KSAMPLER_NAMES)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_ksampler_sigmas(comfy, sampler, scheduler):
    """Every ComfyUI sampler name on every scheduler: dpm_2, dpm_2_ancestral, uni_pc and uni_pc_bh2 drop the
    penultimate sigma (KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS), before the denoise cut."""
    for steps in STEPS:
        for denoise in DENOISE:
            reference = C.ksampler_sigmas(comfy, sampler, scheduler, steps, denoise)
            if reference.isnan().any():     # ComfyUI's kl_optimal on 1 step: 0 / 0 (sdlab's: sigma_max, then 0)
                continue
            assert_same_sigmas(sdlab_sigmas(sampler, scheduler, steps, denoise), reference)


def test_discarding_samplers_end_on_a_larger_step(comfy):
    """Karras, 3 steps: ComfyUI's dpm_2 runs 14.61 -> 3.17 -> 0.447 -> 0, not 14.61 -> 1.27 -> 0.0292 -> 0."""
    ours = sdlab_sigmas("dpm_2", "karras", 3)
    torch.testing.assert_close(ours, torch.tensor([14.6146, 3.1686, 0.4469, 0.0]), rtol=1e-4, atol=0)


@pytest.fixture(scope="module")
def kd():
    return H.load_k_diffusion_sampling()


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The exact denoiser of data ~ N(0.5, 0.8^2) per element."""
    s2 = sigma.reshape(-1, 1, 1, 1).to(x.dtype) ** 2
    return (0.64 * x + 0.5 * s2) / (0.64 + s2)


@pytest.mark.parametrize("scheduler", ["simple", "sgm_uniform", "ddim_uniform", "karras", "normal"])
def test_ddim_is_euler_on_the_ksampler_sigmas(comfy, kd, scheduler):
    """`sampler_object("ddim")` is `ksampler("euler", ...)`: Euler on the KSampler's sigmas, which end at 0 (A1111's
    DDIM, "DDIM", ends at alphas_cumprod[0])."""
    spec = get_sampler("ddim")
    for steps in (1, 3, 10):
        reference_sigmas = C.ksampler_sigmas(comfy, "ddim", scheduler, steps)
        sigmas = sdlab_sigmas("ddim", scheduler, steps)
        assert_same_sigmas(sigmas, reference_sigmas)
        x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(steps)) * sigmas[0]
        reference = kd.sample_euler(gaussian_denoiser, x.clone(), reference_sigmas, disable=True)
        torch.testing.assert_close(spec.fn(gaussian_denoiser, x.clone(), sigmas), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler, variant", [("uni_pc", "bh1"), ("uni_pc_bh2", "bh2")])
@pytest.mark.parametrize("scheduler", ["karras", "normal", "simple"])
def test_uni_pc_matches_comfyui(comfy, sampler, variant, scheduler):
    """ComfyUI's `sample_unipc` on its KSampler's sigmas: order min(3, steps - 1), and a last sigma of 0 replaced
    by 0.001, where it returns x (not the denoised estimate). The reference runs in float64: in float32 its VP
    noise level at 0.001, sqrt(1 - exp(2 log alpha)), loses a few per cent to cancellation (7e-5 in x)."""
    spec = get_sampler(sampler)
    for steps in (2, 3, 4, 10, 20):
        sigmas = sdlab_sigmas(sampler, scheduler, steps)
        reference_sigmas = C.ksampler_sigmas(comfy, sampler, scheduler, steps)
        assert_same_sigmas(sigmas, reference_sigmas)
        x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(steps)) * sigmas[0]
        reference = C.sample_unipc(gaussian_denoiser, x.double(), reference_sigmas.double(), variant).float()
        torch.testing.assert_close(spec.fn(gaussian_denoiser, x.clone(), sigmas), reference, rtol=1e-5, atol=1e-5)
