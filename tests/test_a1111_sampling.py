"""Sampling details where AUTOMATIC1111 (and diffusers) differ from a plain k-diffusion run on the sigmas
given: the SDE samplers' Brownian tree in img2img spans the whole schedule, A1111's DPM2 / DPM2 a / 3M SDE
drop the next-to-last sigma, and ENSD reseeds the step noise. Each is checked against k-diffusion's own
sampler (or sigmas) fed as A1111 feeds it, on the harness's tiny U-Net."""

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


@pytest.mark.parametrize("a1111, comfy, comfy_drops", [("DPM2", "dpm_2", True), ("DPM2 a", "dpm_2_ancestral", True),
                                                       ("DPM++ 3M SDE", "dpmpp_3m_sde", False)])
def test_a1111_drops_the_next_to_last_sigma_where_its_rows_say_so(a1111, comfy, comfy_drops):
    """A1111's `get_sigmas`: `discard_next_to_last_sigma` rows build steps + 1 sigmas and drop the next-to-last;
    img2img takes its tail from that list. ComfyUI's KSampler drops it for dpm_2 and dpm_2_ancestral too
    (`DISCARD_PENULTIMATE_SIGMA_SAMPLERS`), not for dpmpp_3m_sde."""
    steps = 6
    kd = KD.get_sigmas_karras(steps + 1, SAMPLING.sigma_min, SAMPLING.sigma_max)     # (steps + 2,)
    a1111_sigmas = torch.cat([kd[:-2], kd[-1:]])
    ours = request_sigmas(SAMPLING, get_sampler(a1111), _request(a1111, steps))
    torch.testing.assert_close(ours, a1111_sigmas, rtol=1e-6, atol=0)
    comfy_sigmas = request_sigmas(SAMPLING, get_sampler(comfy), _request(comfy, steps))
    plain = KD.get_sigmas_karras(steps, SAMPLING.sigma_min, SAMPLING.sigma_max)
    torch.testing.assert_close(comfy_sigmas, a1111_sigmas if comfy_drops else plain, rtol=1e-6, atol=0)
    tail = request_sigmas(SAMPLING, get_sampler(a1111), _request(a1111, steps, init_image=Image.new("RGB", (64, 64)),
                                                                  strength=0.5, img2img_convention="a1111"))
    t_enc = int(0.5 * steps)
    torch.testing.assert_close(tail, a1111_sigmas[steps - t_enc - 1:], rtol=1e-6, atol=0)   # sigma_sched


@pytest.mark.parametrize("ensd", [0, 31337])
def test_ensd_draws_the_step_noise_from_seed_plus_ensd(ensd):
    """A1111 `ImageRNG.first`: once the initial noise is drawn, the generators are reseeded with seed + ENSD
    and every ancestral step draws from them; without ENSD the initial noise's generators go on."""
    req = _request("Euler a", 4, eta_noise_seed_delta=ensd)
    spec = get_sampler("Euler a")
    sigmas = request_sigmas(SAMPLING, spec, req)
    plan = GenerationPlan(request=req, sampler=spec, sampling=SAMPLING, sigmas=sigmas, latent_shape=H.LATENT_SHAPE)
    generators = [torch.Generator().manual_seed(seed) for seed in req.seeds()]
    x = torch.cat([torch.randn((1, *H.LATENT_SHAPE[1:]), generator=g) for g in generators]) * sigmas[0]
    model = H.sdlab_model(H.tiny_unet(), H.context(), "epsilon")
    ours = spec.fn(model, x, sigmas, **_sampler_options(plan, x, generators))

    if ensd:
        step = [torch.Generator().manual_seed(seed + ensd) for seed in req.seeds()]
    else:               # the initial noise's streams go on
        step = [torch.Generator().manual_seed(seed) for seed in req.seeds()]
        for g in step:
            torch.randn((1, *H.LATENT_SHAPE[1:]), generator=g)

    def noise(*_):
        return torch.cat([torch.randn((1, *H.LATENT_SHAPE[1:]), generator=g) for g in step])

    reference = KD.sample_euler_ancestral(model, x, sigmas, noise_sampler=noise, disable=True)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family, kept", [("sd1", 2), ("sd2", 1), ("sdxl", 1)])
def test_a1111_clip_skip_moves_only_sd1s_text_encoder(family, kept):
    """A1111 reads `CLIP_stop_at_last_layers` only for SD1's CLIP ViT-L (`sd_hijack_clip`); its SD2 and SDXL
    encoders ignore it (`sd_hijack_open_clip`; SDXL's CLIP-L only with the non-default `sdxl_clip_l_skip`), yet
    its pictures record it on every model (`create_infotext`: "Clip skip": None if clip_skip <= 1 else clip_skip).
    sdlab's own clip skip (diffusers' `clip_skip`) moves every family."""
    from bundle_fixtures import tiny_bundle
    from sdlab.pipeline.infotext import to_parameters
    from sdlab.pipeline.plan import encoder_clip_skips, resolve_for

    bundle = tiny_bundle(family)
    a1111 = resolve_for(bundle, GenerationRequest(prompt="x", clip_skip=2, clip_skip_convention="a1111"))
    assert encoder_clip_skips(bundle, a1111) == kept
    assert a1111.clip_skip == 2 and to_parameters(a1111)["Clip skip"] == 2
    if family == "sd1":         # (the tiny SD2 / SDXL towers have too few layers for sdlab's own clip skip 2)
        assert resolve_for(bundle, GenerationRequest(prompt="x", clip_skip=2)).clip_skip == 2


def test_a1111_clip_skip_ignores_sd2_read_from_a_diffusers_folder(tmp_path):
    """A diffusers SD2 folder's tower is read at its last layer (it holds 23 of OpenCLIP-H's 24), yet the
    model is SD2, whose A1111 encoder ignores clip skip: the family decides, not the loaded tower's rule."""
    from bundle_fixtures import tiny_bundle, write_diffusers_folder
    from sdlab.checkpoints.load import load_bundle
    from sdlab.pipeline.plan import encoder_clip_skips, resolve_for

    folder = write_diffusers_folder(tiny_bundle("sd2"), tmp_path / "sd2")
    bundle = load_bundle(folder)
    assert bundle.text_encoders[0].spec.hidden_state == "last"
    request = GenerationRequest(prompt="x", clip_skip=2, clip_skip_convention="a1111")
    assert encoder_clip_skips(bundle, resolve_for(bundle, request)) == 1
