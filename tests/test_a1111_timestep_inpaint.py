"""Masked img2img with A1111 1.10's timestep samplers (DDIM, DDIM CFG++, PLMS, UniPC on `ddim_uniform`).

The reference is AUTOMATIC1111/stable-diffusion-webui 1.10, transcribed below around the samplers of
test_a1111_timestep_samplers / test_a1111_ddim_cfgpp:
- modules/sd_samplers_timesteps.py `CFGDenoiserTimesteps.__init__` sets ``self.mask_before_denoising = True``, and
  `CompVisSampler.sample_img2img` sets ``self.model_wrap_cfg.init_latent = x`` (the clean init latent);
- modules/sd_samplers_cfg_denoiser.py `CFGDenoiser.forward`: with ``mask_before_denoising`` the input is
  ``apply_blend(x)`` = ``x * self.nmask + self.init_latent * self.mask`` and the output is not blended (the blend
  after is ``if not self.mask_before_denoising``);
- modules/processing.py `StableDiffusionProcessingImg2Img.sample`: ``samples * self.nmask + self.init_latent *
  self.mask`` after sampling (`mask` 1 where the picture is kept, `nmask` 1 where it is drawn).
"""

from __future__ import annotations

import math

import pytest
import torch

from bundle_fixtures import init_picture, lower_right_mask, tiny_bundle
from sampler_harness import noise_for, sd_schedule
from test_a1111_ddim_cfgpp import COND, UNCOND, CFGDenoiserTimesteps, ddim_cfgpp, toy_eps
from test_a1111_timestep_samplers import (
    A1111, _cfg_eps, get_timesteps, img2img_start, setup_img2img_steps, unipc,
)
from sdlab.diffusion.denoiser import Denoiser
from sdlab.diffusion.guidance import cfg, masked_input
from sdlab.diffusion.model_sampling import DiscreteModelSampling
from sdlab.diffusion.noise import generators_for
from sdlab.diffusion.samplers import a1111_run, get_sampler
from sdlab.diffusion.sampling_ldm import to_ddpm_latent
from sdlab.pipeline.conditioning import encode_prompt
from sdlab.pipeline.generate import _start, sample_latents
from sdlab.pipeline.plan import make_plan, request_sigmas
from sdlab.pipeline.request import GenerationRequest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TOLERANCE = 1e-5
SCHEDULE = sd_schedule()


def _close(ours, reference) -> bool:
    """Within 1e-5 of the latents' scale (float32's rounding)."""
    return (ours - reference).abs().max().item() <= TOLERANCE * reference.abs().max().item()


# ---------------------------------------------------------------- A1111 1.10, transcribed

def mask_before_denoising(model, init_latent, mask, nmask):
    """`CFGDenoiser.forward`'s blend before (``mask_before_denoising``) around the eps `model`: the output unblended."""
    def forward(x, sigma, *args, **kwargs):
        x = x * nmask + init_latent * mask                                              # apply_blend(x)
        return model(x, sigma, *args, **kwargs)
    return forward


class MaskedCFGDenoiserTimesteps(CFGDenoiserTimesteps):
    """test_a1111_ddim_cfgpp's `CFGDenoiserTimesteps` with the blend before: `last_noise_uncond` the unblended eps_u
    of the blended input."""

    def __init__(self, init_latent, mask, nmask, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_latent, self.mask, self.nmask = init_latent, mask, nmask

    def __call__(self, x, sigma, cond_scale):
        return super().__call__(x * self.nmask + self.init_latent * self.mask, sigma, cond_scale)


def sample_img2img(sampler, model, init_latent, noise, steps, strength, alphas_cumprod, mask, nmask):
    """`CompVisSampler.sample_img2img` with a mask, then `StableDiffusionProcessingImg2Img.sample`'s paste."""
    steps, t_enc = setup_img2img_steps(steps, strength, False)
    timesteps = get_timesteps(steps)
    xi = img2img_start(init_latent, noise, alphas_cumprod, timesteps[t_enc])
    if sampler == "DDIM CFG++":
        samples = ddim_cfgpp(model, xi, timesteps[:t_enc], {"cond_scale": 6.0})
    else:
        blended = mask_before_denoising(model, init_latent, mask, nmask)
        sched = timesteps[:t_enc]
        samples = (unipc(blended, xi, sched, alphas_cumprod, True) if sampler == "UniPC"
                   else A1111[sampler](blended, xi, sched, alphas_cumprod))
    return samples * nmask + init_latent * mask


# ---------------------------------------------------------------- the wrapper on a toy model

def _toy_masks():
    nmask = torch.zeros(1, 1, 8, 8)
    nmask[..., 2:7, 3:8] = 1.0
    return 1 - nmask, nmask


@pytest.mark.parametrize("sampler, steps, strength", [
    ("DDIM", 10, 0.6), ("DDIM", 20, 1.0), ("PLMS", 9, 0.75), ("UniPC", 10, 0.7), ("DDIM CFG++", 12, 0.6),
])
@torch.no_grad()
def test_masked_input_steps_as_a1111s_blend_before_denoising_on_a_toy_model(sampler, steps, strength):
    """`masked_input` around sdlab's guided toy model, on A1111's img2img timesteps, gives A1111's samples (before
    its final paste) within 1e-5: the known region reads the clean latent, the eps is not blended."""
    unit, init = noise_for((0,), (1, 4, 8, 8))[0], noise_for((5,), (1, 4, 8, 8))[0]
    mask, nmask = _toy_masks()
    spec = a1111_run(get_sampler(sampler))
    req = GenerationRequest(prompt="x", sampler=sampler, schedule="ddim_uniform", steps=steps, strength=strength,
                            img2img_convention="a1111")
    sampling = DiscreteModelSampling(SCHEDULE, "eps")
    sigmas = request_sigmas(sampling, spec, req, img2img=True)
    guided = cfg(Denoiser(toy_eps, sampling), {"context": COND[:1]}, {"context": UNCOND[:1]},
                 6.0 * spec.cfg_scale_factor)
    a1111_steps, t_enc = setup_img2img_steps(steps, strength, False)
    xi = img2img_start(init, unit, SCHEDULE.alphas_cumprod, get_timesteps(a1111_steps)[t_enc])
    x = xi * math.sqrt(1 + float(sigmas[0]) ** 2)
    ours = to_ddpm_latent(spec.fn(masked_input(guided, init, nmask), x, sigmas), sigmas[-1])

    if sampler == "DDIM CFG++":
        model = MaskedCFGDenoiserTimesteps(init, mask, nmask, [(lambda z, t: toy_eps(z, t, context=COND[:1]), 1.0)],
                                           lambda z, t: toy_eps(z, t, context=UNCOND[:1]), SCHEDULE.alphas_cumprod)
    else:
        def model(z, t):
            eps_c, eps_u = toy_eps(z, t, context=COND[:1]), toy_eps(z, t, context=UNCOND[:1])
            return eps_u + (eps_c - eps_u) * 6.0
    reference = sample_img2img(sampler, model, init, unit, steps, strength, SCHEDULE.alphas_cumprod, mask, nmask)
    assert _close(ours * nmask + init * mask, reference)
    assert (ours - reference).abs().max() > 1e-3          # before A1111's paste the kept region is not the init's


# ---------------------------------------------------------------- the pipeline on the tiny SD1

@pytest.fixture(scope="module")
def sd1():
    return tiny_bundle("sd1", seed=0)


def _a1111_cfgpp_model(bundle, init_latent, mask, nmask):
    def eps(text):
        ctx = encode_prompt(bundle.text_encoders, text).context
        return lambda x, t: bundle.unet(x, t.float(), context=ctx.expand(x.shape[0], -1, -1))

    return MaskedCFGDenoiserTimesteps(init_latent, mask, nmask, [(eps("a red cube"), 1.0)], eps("blurry"),
                                      bundle.model_sampling.schedule.alphas_cumprod.float())


@pytest.mark.parametrize("sampler, strength", [("DDIM", 0.75), ("PLMS", 0.6), ("UniPC", 0.8), ("DDIM CFG++", 0.7)])
@torch.no_grad()
def test_inpainting_draws_a1111s_with_its_timestep_samplers(sd1, sampler, strength):
    """sample_latents of an A1111-convention inpainting: the latents within 1e-5 of A1111's."""
    req = GenerationRequest(prompt="a red cube", negative_prompt="blurry", sampler=sampler, schedule="ddim_uniform",
                            steps=10, cfg_scale=6.0, seed=3, width=32, height=32, init_image=init_picture(32),
                            mask_image=lower_right_mask(32), strength=strength, img2img_convention="a1111")
    plan = make_plan(sd1, req)
    start = _start(sd1, plan, generators_for(plan.request.seeds(), plan.request.rng, sd1.device))
    nmask = start.latent_mask
    mask = 1 - nmask
    alphas_cumprod = plan.sampling.schedule.alphas_cumprod.float()
    model = (_a1111_cfgpp_model(sd1, start.image_latent, mask, nmask) if sampler == "DDIM CFG++"
             else _cfg_eps(sd1, req.prompt, req.negative_prompt, 6.0))
    reference = sample_img2img(sampler, model, start.image_latent, start.noise, 10, strength, alphas_cumprod, mask,
                               nmask)
    assert _close(sample_latents(sd1, plan), reference)
