"""Sampling details where AUTOMATIC1111 (and diffusers) differ from a plain k-diffusion run on the sigmas
given: the SDE samplers' Brownian tree in img2img spans the whole schedule. Each is checked against
k-diffusion's own sampler fed as A1111 feeds it, on the harness's tiny U-Net."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import sampler_harness as H
from sdlab.diffusion.model_sampling import DiscreteModelSampling
from sdlab.diffusion.noise import generators_for
from sdlab.diffusion.samplers import get_sampler
from sdlab.diffusion.schedules import NoiseSchedule
from sdlab.pipeline.generate import _sampler_options
from sdlab.pipeline.plan import GenerationPlan, request_sigmas
from sdlab.pipeline.request import GenerationRequest, resolve

KD = H.load_k_diffusion_sampling()
SAMPLING = DiscreteModelSampling(NoiseSchedule.sd(), "epsilon")


def _request(sampler: str, steps: int, **options) -> GenerationRequest:
    return resolve(GenerationRequest(prompt="x", sampler=sampler, schedule="karras", steps=steps, seed=H.SEEDS[0],
                                     batch_size=len(H.SEEDS), **options),
                   default_size=64, default_sampler="Euler", default_schedule="karras", factor=8)


@pytest.mark.parametrize("name, function", [("DPM++ SDE", "sample_dpmpp_sde"),
                                            ("DPM++ 2M SDE", "sample_dpmpp_2m_sde")])
@pytest.mark.parametrize("convention", ["a1111", "diffusers", "comfyui"])
def test_img2img_brownian_tree_spans_the_whole_schedule_except_in_comfyui(name, function, convention):
    """A1111's `sample_img2img` makes its noise sampler from all of `get_sigmas(p, steps)` (diffusers'
    DPMSolverSDEScheduler from all of `set_timesteps`); ComfyUI's from the sigmas it runs."""
    req = _request(name, 6, init_image=Image.new("RGB", (64, 64)), strength=0.5, img2img_convention=convention)
    spec = get_sampler(name)
    tail = request_sigmas(SAMPLING, spec, req)
    full = request_sigmas(SAMPLING, spec, req, img2img=False)
    assert tail[0] < full[0]
    plan = GenerationPlan(request=req, sampler=spec, sampling=SAMPLING, sigmas=tail, latent_shape=H.LATENT_SHAPE)
    unit, _ = H.noise_for()
    init_latent = torch.full_like(unit, 0.3)
    x = init_latent + unit * tail[0]
    model = H.sdlab_model(H.tiny_unet(), H.context(), "epsilon")
    ours = spec.fn(model, x, tail, **_sampler_options(plan, x, generators_for(req.seeds())))
    span = tail if convention == "comfyui" else full
    tree = KD.BrownianTreeNoiseSampler(init_latent, span[span > 0].min(), span.max(), seed=list(req.seeds()))
    reference = getattr(KD, function)(model, x, tail, noise_sampler=tree, disable=True)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("a1111, comfy", [("DPM2", "dpm_2"), ("DPM2 a", "dpm_2_ancestral"),
                                          ("DPM++ 3M SDE", "dpmpp_3m_sde")])
def test_a1111_drops_the_next_to_last_sigma_where_its_rows_say_so(a1111, comfy):
    """A1111's `get_sigmas`: `discard_next_to_last_sigma` rows build steps + 1 sigmas and drop the next-to-last;
    img2img takes its tail from that list. ComfyUI's samplers of the same names run the plain list."""
    steps = 6
    kd = KD.get_sigmas_karras(steps + 1, SAMPLING.sigma_min, SAMPLING.sigma_max)     # (steps + 2,)
    a1111_sigmas = torch.cat([kd[:-2], kd[-1:]])
    ours = request_sigmas(SAMPLING, get_sampler(a1111), _request(a1111, steps))
    torch.testing.assert_close(ours, a1111_sigmas, rtol=1e-6, atol=0)
    comfy_sigmas = request_sigmas(SAMPLING, get_sampler(comfy), _request(comfy, steps))
    torch.testing.assert_close(comfy_sigmas, KD.get_sigmas_karras(steps, SAMPLING.sigma_min, SAMPLING.sigma_max),
                               rtol=1e-6, atol=0)
    tail = request_sigmas(SAMPLING, get_sampler(a1111), _request(a1111, steps, init_image=Image.new("RGB", (64, 64)),
                                                                  strength=0.5, img2img_convention="a1111"))
    t_enc = int(0.5 * steps)
    torch.testing.assert_close(tail, a1111_sigmas[steps - t_enc - 1:], rtol=1e-6, atol=0)   # sigma_sched
