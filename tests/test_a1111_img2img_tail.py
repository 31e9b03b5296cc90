"""A1111's img2img tail: `KDiffusionSampler.sample_img2img` samples on `sigmas[steps - t_enc - 1:]`, counted from
the start of `get_sigmas(p, steps)`. Its "DDIM" schedule is longer than steps + 1 where 1000 / steps is no whole
number (`ddim_scheduler` walks the training sigmas by `1000 // steps`), so the tail holds more steps than the last
t_enc + 1; ComfyUI's KSampler takes the last `steps + 1` of its `ddim_uniform` list.

The reference is A1111 1.10's lines (AUTOMATIC1111/stable-diffusion-webui modules/sd_schedulers.py `ddim_scheduler`,
modules/sd_samplers_common.py `setup_img2img_steps`, modules/sd_samplers_kdiffusion.py `sample_img2img`),
transcribed below on k-diffusion's `DiscreteSchedule` of the model's float32 sigmas, and k-diffusion's
`sample_euler` run from A1111's start on the harness's tiny U-Net."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import sampler_harness as H
from sdlab.diffusion.model_sampling import DiscreteModelSampling
from sdlab.diffusion.samplers import get_sampler
from sdlab.diffusion.schedules import NoiseSchedule
from sdlab.pipeline.plan import request_sigmas
from sdlab.pipeline.request import GenerationRequest, resolve

KD = H.load_k_diffusion_sampling()
EXT = H.load_k_diffusion_external()
SAMPLING = DiscreteModelSampling(NoiseSchedule.sd(), "epsilon")
AC = NoiseSchedule.sd().alphas_cumprod.float()
MODEL_WRAP = EXT.DiscreteSchedule(((1 - AC) / AC) ** 0.5, quantize=False)       # CompVisDenoiser's table


def ddim_scheduler(n, sigma_min, sigma_max, inner_model, device):      # modules/sd_schedulers.py
    sigs = []
    ss = max(len(inner_model.sigmas) // n, 1)
    x = 1
    while x < len(inner_model.sigmas):
        sigs += [float(inner_model.sigmas[x])]
        x += ss
    sigs = sigs[::-1]
    sigs += [0.0]
    return torch.FloatTensor(sigs).to(device)


def setup_img2img_steps(steps, denoising_strength, fix_steps):          # modules/sd_samplers_common.py
    if fix_steps:
        requested_steps = steps
        steps = int(requested_steps / min(denoising_strength, 0.999)) if denoising_strength > 0 else 0
        t_enc = requested_steps - 1
    else:
        t_enc = int(min(denoising_strength, 0.999) * steps)
    return steps, t_enc


def a1111_tail(steps, strength, fix_steps, discard=False):
    """`sample_img2img`'s sigma_sched (get_sigmas: one step more and the next-to-last dropped for a discarding row)."""
    steps, t_enc = setup_img2img_steps(steps, strength, fix_steps)
    sigmas = ddim_scheduler(steps + discard, 0, 0, MODEL_WRAP, "cpu")
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas[steps - t_enc - 1:]


def _request(sampler, steps, strength, convention):
    return resolve(GenerationRequest(prompt="x", sampler=sampler, schedule="DDIM", steps=steps, seed=1,
                                     init_image=Image.new("RGB", (64, 64)), strength=strength,
                                     img2img_convention=convention),
                   default_size=64, default_sampler="Euler", default_schedule="karras", factor=8)


@pytest.mark.parametrize("sampler", ["Euler", "DPM2 a"])
@pytest.mark.parametrize("convention", ["a1111", "a1111_fix_steps"])
@pytest.mark.parametrize("steps", [6, 7, 9, 10, 12, 20])
@pytest.mark.parametrize("strength", [0.3, 0.5, 0.75, 1.0])
def test_a1111_img2img_takes_its_tail_from_the_start_of_the_ddim_schedule(sampler, convention, steps, strength):
    spec = get_sampler(sampler)
    ours = request_sigmas(SAMPLING, spec, _request(sampler, steps, strength, convention))
    reference = a1111_tail(steps, strength, convention == "a1111_fix_steps", spec.discard_penultimate)
    assert ours.shape == reference.shape
    torch.testing.assert_close(ours, reference, rtol=2e-6, atol=0)


@pytest.mark.parametrize("steps, strength", [(6, 0.3), (7, 0.75)])
def test_comfyui_takes_the_last_steps_of_its_ddim_uniform(steps, strength):
    """ComfyUI's KSampler with denoise: `calculate_sigmas(int(steps / denoise))[-(steps + 1):]`."""
    ours = request_sigmas(SAMPLING, get_sampler("Euler"), _request("Euler", steps, strength, "comfyui"))
    full = ddim_scheduler(int(steps / strength), 0, 0, MODEL_WRAP, "cpu")
    torch.testing.assert_close(ours, full[-(steps + 1):], rtol=2e-6, atol=0)


@torch.no_grad()
def test_the_latents_are_a1111s_on_the_longer_tail():
    """6 steps at strength 0.3: A1111 runs 3 steps (sigma 0.93 -> 0), the last t_enc + 1 would be 2 (0.49 -> 0)."""
    req = _request("Euler", 6, 0.3, "a1111")
    sigmas = request_sigmas(SAMPLING, get_sampler("Euler"), req)
    reference = a1111_tail(6, 0.3, False)
    assert len(reference) == 4
    model = H.sdlab_model(H.tiny_unet(), H.context(), "epsilon")
    unit, _ = H.noise_for()
    init_latent = torch.full_like(unit, 0.3)
    ours = KD.sample_euler(model, init_latent + unit * sigmas[0], sigmas, disable=True)
    a1111 = KD.sample_euler(model, init_latent + unit * reference[0], reference, disable=True)
    torch.testing.assert_close(ours, a1111, atol=1e-5, rtol=1e-5)
