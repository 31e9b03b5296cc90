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
    "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece",
]
SCHEDULERS = ["normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta", "linear_quadratic",
              "kl_optimal"]
BIT_EXACT = {"normal", "sgm_uniform", "karras", "simple", "ddim_uniform", "beta"}   # ComfyUI's float32 sigmas
STEPS = (1, 2, 3, 7, 10, 20)
DENOISE = (None, 0.9, 0.5, 0.33)


@pytest.fixture(scope="module")
def comfy():
    return C.ModelSamplingDiscrete()


def sdlab_sigmas(sampler: str, schedule: str, steps: int, denoise: float | None = None) -> torch.Tensor:
    """The sigmas a request for `sampler` on `schedule` runs on, ComfyUI's `denoise` as the img2img strength."""
    request = types.SimpleNamespace(schedule=schedule, steps=steps, init_image=None if denoise is None else object(),
                                    strength=denoise, img2img_convention="comfyui", init_noise="comfyui",
                                    discard_penultimate_sigma=False,
                                    schedule_sigma_min=0.0, schedule_sigma_max=0.0, schedule_rho=0.0,
                                    beta_alpha=0.6, beta_beta=0.6, old_karras_sigmas=False)
    return request_sigmas(DiscreteModelSampling(NoiseSchedule.sd(), "eps"), get_sampler(sampler), request)


def assert_same_sigmas(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert ours.shape == reference.shape, (ours, reference)
    torch.testing.assert_close(ours, reference.float(), rtol=2e-6, atol=0)


@pytest.mark.parametrize("sampler", KSAMPLER_NAMES)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_ksampler_sigmas(comfy, sampler, scheduler):
    """Every ComfyUI sampler name on every scheduler: dpm_2, dpm_2_ancestral, uni_pc and uni_pc_bh2 drop the
    penultimate sigma (KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS), before the denoise cut. Bit for bit on the
    `BIT_EXACT` schedulers (normal and sgm_uniform in ComfyUI's float32 arithmetic: comfy_sigmas); exponential,
    linear_quadratic and kl_optimal within float32 rounding (sdlab computes their ramps in float64, then rounds)."""
    for steps in STEPS:
        for denoise in DENOISE:
            reference = C.ksampler_sigmas(comfy, sampler, scheduler, steps, denoise)
            if reference.isnan().any():     # ComfyUI's kl_optimal on 1 step: 0 / 0 (sdlab's: sigma_max, then 0)
                continue
            ours = sdlab_sigmas(sampler, scheduler, steps, denoise)
            assert_same_sigmas(ours, reference)
            assert scheduler not in BIT_EXACT or torch.equal(ours, reference), (steps, denoise)


def test_discarding_samplers_end_on_a_larger_step(comfy):
    """Karras, 3 steps: ComfyUI's dpm_2 runs 14.61 -> 3.17 -> 0.447 -> 0, not 14.61 -> 1.27 -> 0.0292 -> 0."""
    ours = sdlab_sigmas("dpm_2", "karras", 3)
    torch.testing.assert_close(ours, torch.tensor([14.6146, 3.1686, 0.4469, 0.0]), rtol=1e-4, atol=0)


@pytest.fixture(scope="module")
def kd():
    return H.load_k_diffusion_sampling()


def mixture_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The exact denoiser (posterior mean) of data 0.5 N(-1, 0.3^2) + 0.5 N(1, 0.3^2) per element: nonlinear in x,
    so no sampler's weights can cancel out."""
    s2 = sigma.reshape(-1, 1, 1, 1).to(x.dtype) ** 2
    means = torch.tensor([-1.0, 1.0], dtype=x.dtype).reshape(2, 1, 1, 1, 1)
    weights = torch.softmax(-((x - means) ** 2) / (2 * (0.09 + s2)), dim=0)           # (2, B, C, h, w)
    return (weights * (means * s2 + x * 0.09) / (0.09 + s2)).sum(0)


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
        reference = kd.sample_euler(mixture_denoiser, x.clone(), reference_sigmas, disable=True)
        torch.testing.assert_close(spec.fn(mixture_denoiser, x.clone(), sigmas), reference, rtol=1e-5, atol=1e-5)


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
        reference = C.sample_unipc(mixture_denoiser, x.double(), reference_sigmas.double(), variant).float()
        torch.testing.assert_close(spec.fn(mixture_denoiser, x.clone(), sigmas), reference, rtol=1e-5, atol=1e-5)


def noise_source(seed: int, like: torch.Tensor):
    """Unit Gaussian noise drawn from its own generator, one draw per call (both runs get one alike)."""
    generator = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(like.shape, generator=generator, dtype=like.dtype)


COMFY_OWN = [  # (name, ComfyUI's function, its options, whether it draws noise)
    ("ipndm", C.sample_ipndm, {}, False),
    ("ipndm_v", C.sample_ipndm_v, {}, False),
    ("heunpp2", C.sample_heunpp2, {}, False),
    ("res_multistep", C.res_multistep, {"eta": 0.0}, False),
    ("res_multistep_ancestral", C.res_multistep, {"eta": 1.0}, True),
    ("gradient_estimation", C.sample_gradient_estimation, {}, False),
]


@pytest.mark.parametrize("name, reference_fn, options, noisy", COMFY_OWN, ids=[case[0] for case in COMFY_OWN])
@pytest.mark.parametrize("scheduler", ["karras", "normal", "simple"])
def test_comfyuis_own_samplers(comfy, name, reference_fn, options, noisy, scheduler):
    """ComfyUI's samplers beyond k-diffusion's (comfy/k_diffusion/sampling.py), both on its KSampler sigmas (the
    mixture's steep posterior near sigma 0 would turn the 1e-6 of two sigma lists into 3e-5)."""
    spec = get_sampler(name)
    for steps in (1, 2, 3, 4, 5, 10, 20):
        reference_sigmas = C.ksampler_sigmas(comfy, name, scheduler, steps)
        assert_same_sigmas(sdlab_sigmas(name, scheduler, steps), reference_sigmas)
        x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(steps)) * reference_sigmas[0]
        ours = spec.fn(mixture_denoiser, x.clone(), reference_sigmas, **({"noise": noise_source(7, x)} if noisy else {}))
        extra = {"noise_sampler": noise_source(7, x)} if "eta" in options else {}
        reference = reference_fn(mixture_denoiser, x.clone(), reference_sigmas, **options, **extra)
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=2e-5, msg=f"{steps} steps")


@pytest.mark.parametrize("name, eta", [("dpm_fast", 0.0), ("DPM fast", 1.0)])
def test_dpm_fast_matches_k_diffusion(kd, name, eta):
    """k-diffusion's sample_dpm_fast as ComfyUI calls it (sigma_min = the last positive sigma, sigma_max =
    sigmas[0], n = the steps) and A1111 (its eta default 1, the model's sigma_min / sigma_max: the ends of its
    Karras list from 2 steps on; a 1-step list has no second end, where k-diffusion refuses eta)."""
    spec = get_sampler(name)
    for steps in (1, 2, 3, 4, 7, 10, 20)[1 if eta else 0:]:
        sigmas = sdlab_sigmas(name, "karras", steps)
        x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(steps)) * sigmas[0]
        ours = spec.fn(mixture_denoiser, x.clone(), sigmas, noise=noise_source(7, x))
        reference = kd.sample_dpm_fast(mixture_denoiser, x.clone(), float(sigmas[-2]), float(sigmas[0]), steps,
                                       disable=True, eta=eta, noise_sampler=noise_source(7, x))
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=2e-5, msg=f"{steps} steps")
