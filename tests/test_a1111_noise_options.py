"""A1111's Extra noise (`img2img_extra_noise`), SGM noise multiplier (`sgm_noise_multiplier`), Conditional mask
weight (`inpainting_mask_weight`) and Beta schedule alpha / beta (`beta_dist_alpha` / `beta_dist_beta`): drawn where
A1111 1.10 draws them, written and read with its labels, taken from its API's options.

The references are A1111 1.10's lines, transcribed below (AUTOMATIC1111/stable-diffusion-webui):
- modules/sd_samplers_common.py `setup_img2img_steps`;
- modules/sd_samplers_kdiffusion.py `KDiffusionSampler.sample_img2img` (xi = x + noise * sigma_sched[0], then
  xi += noise * opts.img2img_extra_noise) and `KDiffusionSampler.sample` (x * sqrt(1 + sigmas[0]^2) with
  opts.sgm_noise_multiplier, else x * sigmas[0]);
- modules/sd_samplers_timesteps.py `CompVisSampler.sample_img2img` (xi = x sqrt(a) + noise sqrt(1 - a), then
  xi += noise * opts.img2img_extra_noise * sqrt(a)) and `CompVisSampler.sample` (x as it is);
- modules/processing.py `StableDiffusionProcessing.inpainting_image_conditioning` (torch.lerp of the picture and
  the masked picture by inpainting_mask_weight) and `txt2img_image_conditioning`;
- modules/sd_schedulers.py `beta_scheduler` (tests/test_a1111_schedules.py), ComfyUI's comfy/samplers.py
  `beta_scheduler` (tests/comfy_reference.py), each with alpha / beta."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

import comfy_reference as C
from bundle_fixtures import init_picture, lower_right_mask, tiny_bundle, write_original
from cli_helpers import pixels, png_with_parameters, run
from sdlab.diffusion.samplers import get_sampler
from sdlab.pipeline import generate as G
from sdlab.pipeline.generate import encode_image, generate, sample_latents
from sdlab.pipeline.images import pil_to_tensor
from sdlab.pipeline.infotext import from_parameters, to_parameters, undrawn_labels
from sdlab.pipeline.plan import make_plan, request_sigmas
from sdlab.pipeline.png_info import format_parameters, parse_parameters
from sdlab.pipeline.request import GenerationRequest, RequestError
from sdlab.server.a1111 import OPTION_DEFAULTS, Img2ImgIn, Txt2ImgIn, _request as a1111_request
from sdlab.server.inputs import BadRequest
from test_a1111_schedule_overrides import DiscreteSchedule
from test_a1111_schedules import beta_scheduler as a1111_beta_scheduler

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SIZE, SEED = 64, 123


@pytest.fixture(scope="module")
def sd1():
    return tiny_bundle("sd1")


@pytest.fixture(scope="module")
def inpainting():
    return tiny_bundle("sd1-inpaint")


@pytest.fixture(scope="module")
def sd1_file(sd1, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    write_original(sd1, path)
    return path


# -- A1111 1.10, transcribed -------------------------------------------------------------------------------------
def setup_img2img_steps(p_steps, denoising_strength, img2img_fix_steps=False, steps=None):
    """modules/sd_samplers_common.py `setup_img2img_steps`."""
    if img2img_fix_steps or steps is not None:
        requested_steps = (steps or p_steps)
        steps = int(requested_steps / min(denoising_strength, 0.999)) if denoising_strength > 0 else 0
        t_enc = requested_steps - 1
    else:
        steps = p_steps
        t_enc = int(min(denoising_strength, 0.999) * steps)
    return steps, t_enc


def kdiffusion_img2img_start(x, noise, sigma_sched, img2img_extra_noise):
    """`KDiffusionSampler.sample_img2img`'s start (SD1's model has no add_noise_to_latent; no extra_noise_callback)."""
    xi = x + noise * sigma_sched[0]
    if img2img_extra_noise > 0:
        xi += noise * img2img_extra_noise
    return xi


def kdiffusion_txt2img_start(x, sigmas, sgm_noise_multiplier):
    """`KDiffusionSampler.sample`'s start."""
    if sgm_noise_multiplier:
        return x * torch.sqrt(1.0 + sigmas[0] ** 2.0)
    return x * sigmas[0]


def timesteps_img2img_start(x, noise, alphas_cumprod_t, img2img_extra_noise):
    """`CompVisSampler.sample_img2img`'s start, in its VP scaling (a = alphas_cumprod[timesteps[t_enc]])."""
    sqrt_alpha_cumprod = torch.sqrt(alphas_cumprod_t)
    sqrt_one_minus_alpha_cumprod = torch.sqrt(1 - alphas_cumprod_t)
    xi = x * sqrt_alpha_cumprod + noise * sqrt_one_minus_alpha_cumprod
    if img2img_extra_noise > 0:
        xi += noise * img2img_extra_noise * sqrt_alpha_cumprod
    return xi


def inpainting_image_conditioning(source_image, latent_image, conditioning_mask, inpainting_mask_weight, encode):
    """`StableDiffusionProcessing.inpainting_image_conditioning` (a tensor mask, or None: all ones); `encode` is
    `get_first_stage_encoding(encode_first_stage(...))`, the posterior's mean as sdlab takes it."""
    if conditioning_mask is None:
        conditioning_mask = source_image.new_ones(1, 1, *source_image.shape[-2:])
    conditioning_mask = conditioning_mask.to(device=source_image.device, dtype=source_image.dtype)
    conditioning_image = torch.lerp(source_image, source_image * (1.0 - conditioning_mask), inpainting_mask_weight)
    conditioning_image = encode(conditioning_image)
    conditioning_mask = torch.nn.functional.interpolate(conditioning_mask, size=latent_image.shape[-2:])
    conditioning_mask = conditioning_mask.expand(conditioning_image.shape[0], -1, -1, -1)
    return torch.cat([conditioning_mask, conditioning_image], dim=1)


# -- helpers ------------------------------------------------------------------------------------------------------
def _request(**fields) -> GenerationRequest:
    base = dict(prompt="a red block", sampler="Euler", schedule="karras", steps=6, seed=SEED, width=SIZE,
                height=SIZE, batch_size=2, cfg_scale=5.0)
    return GenerationRequest(**{**base, **fields})


def _img2img(**fields) -> GenerationRequest:
    return _request(**{"init_image": init_picture(SIZE), "strength": 0.5, "img2img_convention": "a1111", **fields})


def _start_of(bundle, req):
    """(x, sigmas) the plan's sampler starts from."""
    plan = make_plan(bundle, req)
    seen = {}

    def capture(model, x, sigmas, **options):
        seen.update(x=x.clone(), sigmas=sigmas.clone())
        return x

    sample_latents(bundle, replace(plan, sampler=replace(plan.sampler, fn=capture)))
    return seen["x"], seen["sigmas"], plan


def _first_noise(plan):
    """A1111's `ImageRNG.first` with randn_source CPU: each seed's first draw."""
    shape = plan.latent_shape[1:]
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in plan.request.seeds()])


def _init_latent(bundle):
    return encode_image(bundle, pil_to_tensor(init_picture(SIZE)))           # the posterior mean, (1, 4, h, w)


# -- Extra noise --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fix_steps", [False, True])
def test_extra_noise_starts_img2img_where_a1111s_kdiffusion_sample_img2img_does(sd1, fix_steps):
    convention = "a1111_fix_steps" if fix_steps else "a1111"
    req = _img2img(img2img_convention=convention, extra_noise=0.35, noise_multiplier=1.2)
    x, sigmas, plan = _start_of(sd1, req)
    steps, t_enc = setup_img2img_steps(req.steps, req.strength, fix_steps)
    full = request_sigmas(plan.sampling, plan.sampler, replace(plan.request, steps=steps), sigmas.device,
                          img2img=False)
    sigma_sched = full[steps - t_enc - 1:]
    assert torch.equal(sigmas, sigma_sched)
    reference = kdiffusion_img2img_start(_init_latent(sd1), _first_noise(plan) * 1.2, sigma_sched, 0.35)
    assert torch.equal(x, reference)
    plain, _, _ = _start_of(sd1, replace(req, extra_noise=0.0))
    assert not torch.equal(x, plain)


def test_extra_noise_of_a1111s_timestep_samplers_is_the_same_noise_in_ve_scaling(sd1):
    """DDIM's VP start, x sqrt(a) + noise (sqrt(1 - a) + extra sqrt(a)), is sdlab's VE x + noise (sigma + extra)
    divided by sqrt(1 + sigma^2) (a = 1 / (1 + sigma^2))."""
    req = _img2img(sampler="DDIM", schedule=None, extra_noise=0.35)
    x, sigmas, plan = _start_of(sd1, req)
    alpha = 1.0 / (1.0 + sigmas[0].double() ** 2)
    vp = timesteps_img2img_start(_init_latent(sd1).double(), _first_noise(plan).double(), alpha, 0.35)
    torch.testing.assert_close(x.double() * alpha.sqrt(), vp, rtol=1e-6, atol=1e-6)


def test_extra_noise_reaches_the_hires_pass_and_not_a_plain_txt2img(sd1):
    plain = generate(sd1, _request(extra_noise=0.4)).images
    assert np.array_equal(np.asarray(plain[0]), np.asarray(generate(sd1, _request()).images[0]))
    from sdlab.pipeline.hires import generate_hires
    hires = dict(hr_scale=1.5, hr_upscaler="Latent", hr_denoise=0.6)
    with_noise = generate_hires(sd1, make_plan(sd1, _request(extra_noise=0.4, **hires))).images[0]
    without = generate_hires(sd1, make_plan(sd1, _request(**hires))).images[0]
    assert np.abs(np.asarray(with_noise, dtype=int) - np.asarray(without, dtype=int)).max() > 0


# -- SGM noise multiplier -----------------------------------------------------------------------------------------
def test_sgm_noise_multiplier_starts_txt2img_where_a1111s_kdiffusion_sample_does(sd1):
    x, sigmas, plan = _start_of(sd1, _request(sgm_noise_multiplier=True))
    reference = kdiffusion_txt2img_start(_first_noise(plan), sigmas.float(), True)
    torch.testing.assert_close(x, reference, rtol=2e-7, atol=0)          # float64 vs float32 sqrt: <= 1 ulp
    plain, _, _ = _start_of(sd1, _request())
    assert torch.equal(plain, kdiffusion_txt2img_start(_first_noise(plan), sigmas, False))
    assert plan.request.init_noise == "vp"


@pytest.mark.parametrize("fields", [dict(sampler="DDIM", schedule=None), dict(init_image=init_picture(SIZE),
                                                                              strength=0.5, img2img_convention="a1111")])
def test_sgm_noise_multiplier_leaves_a1111s_timestep_samplers_and_img2img_alone(sd1, fields):
    with_flag, _, plan = _start_of(sd1, _request(sgm_noise_multiplier=True, **fields))
    without, _, _ = _start_of(sd1, _request(**fields))
    assert torch.equal(with_flag, without)
    assert "SGM noise multiplier" not in {k: v for k, v in to_parameters(plan.request).items() if v is not None}


def test_sgm_noise_multiplier_and_another_initial_noise_are_refused(sd1):
    with pytest.raises(RequestError, match="SGM noise multiplier"):
        make_plan(sd1, _request(sgm_noise_multiplier=True, init_noise="comfyui"))


# -- Conditional mask weight --------------------------------------------------------------------------------------
def _conditioning(bundle, req, monkeypatch):
    """The 5 channels the inpainting U-Net was given."""
    seen = []
    real = G.inpaint_channels

    def recording(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]
    monkeypatch.setattr(G, "inpaint_channels", recording)
    plan = make_plan(bundle, replace(req, steps=2))
    sample_latents(bundle, plan)
    return seen[0], plan


@pytest.mark.parametrize("weight", [0.0, 0.35, 1.0])
@pytest.mark.parametrize("masked", [True, False])
def test_conditional_mask_weight_conditions_as_a1111s_inpainting_image_conditioning(inpainting, monkeypatch,
                                                                                   weight, masked):
    mask = lower_right_mask(SIZE) if masked else None
    req = _img2img(mask_image=mask, inpainting_mask_weight=weight, batch_size=1)
    ours, plan = _conditioning(inpainting, req, monkeypatch)
    source = pil_to_tensor(init_picture(SIZE))                                             # (1, 3, H, W), [-1, 1]
    if mask is None and weight == 1.0:   # A1111's lerp is source * 0, +-0: a constant picture, whose encoding
        source = torch.zeros_like(source).contiguous()   # varies with the memory layout (GroupNorm of 0 variance)
    a1111_mask = None if mask is None else torch.from_numpy(
        np.round(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0))[None, None]
    reference = inpainting_image_conditioning(source, torch.empty(plan.latent_shape), a1111_mask, weight,
                                              lambda image: encode_image(inpainting, image))
    assert torch.equal(ours, reference)                              # the latent mask, the masked picture's latent


def test_conditional_mask_weight_changes_the_inpainting_models_picture_only(inpainting, sd1):
    req = _img2img(mask_image=lower_right_mask(SIZE), batch_size=1)
    for bundle, changes in ((inpainting, True), (sd1, False)):
        full = np.asarray(generate(bundle, req).images[0], dtype=int)
        half = np.asarray(generate(bundle, replace(req, inpainting_mask_weight=0.5)).images[0], dtype=int)
        assert (np.abs(full - half).max() > 0) == changes


def test_txt2img_with_an_inpainting_model_is_mid_grey_at_any_weight(inpainting, monkeypatch):
    """`txt2img_image_conditioning`: a 0.5 grey picture (0 in [-1, 1]), all masked; no weight."""
    one, _ = _conditioning(inpainting, _request(batch_size=1), monkeypatch)
    half, _ = _conditioning(inpainting, _request(batch_size=1, inpainting_mask_weight=0.5), monkeypatch)
    assert torch.equal(one, half)


@pytest.mark.parametrize("upscaler", ["Latent", "Nearest"])
def test_the_hires_pass_conditions_an_inpainting_model_on_the_upscaled_pictures(inpainting, sd1, monkeypatch,
                                                                              upscaler):
    """A1111's `sample_hr_pass` below weight 1: `img2img_image_conditioning` of the upscaled pictures, all masked (a
    latent upscale's latent decoded; a pixel upscaler's pictures in [0, 1], handed over as they are), where
    txt2img's mid-grey is its value at weight 1; the label is written where it acted."""
    from sdlab.pipeline.generate import decode_latents
    from sdlab.pipeline.hires import generate_hires
    from sdlab.pipeline.upscale import resize_image, upscale_latent

    size = SIZE // 2
    req = _request(width=size, height=size, steps=2, batch_size=1, hr_scale=2, hr_upscaler=upscaler,
                   hr_denoise=0.6, inpainting_mask_weight=0.35)
    plan, side = make_plan(inpainting, req), 2 * size // inpainting.vae_config.downsample_factor
    if upscaler == "Latent":
        up = upscale_latent(sample_latents(inpainting, plan), side, side, upscaler)
        source = decode_latents(inpainting, up)                                            # (1, 3, 2s, 2s)
    else:
        pictures = [resize_image(p, upscaler, (2 * size, 2 * size)) for p in generate(inpainting, plan).images]
        source = torch.from_numpy(np.array(pictures[0]).astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    reference = inpainting_image_conditioning(source, torch.empty(1, 4, side, side), None, 0.35,
                                              lambda image: encode_image(inpainting, image))
    seen = []
    real = G.inpaint_channels
    monkeypatch.setattr(G, "inpaint_channels", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    drawn = generate_hires(inpainting, plan)
    assert len(seen) == 2 and torch.equal(seen[1], reference)                  # the first pass's is txt2img's
    assert _written(drawn.request, inpainting)["Conditional mask weight"] == 0.35
    for bundle, weight, label in ((inpainting, 1.0, 1.0), (sd1, 0.35, None)):      # A1111: SD1's 9 channels, at 1 too
        unweighted = generate_hires(bundle, make_plan(bundle, replace(req, inpainting_mask_weight=weight)))
        assert _written(unweighted.request, bundle).get("Conditional mask weight") == label


# -- Beta schedule alpha / beta -----------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 5, 12])
@pytest.mark.parametrize("alpha, beta", [(0.6, 0.6), (0.3, 0.8), (1.0, 0.45)])
def test_beta_schedules_take_alpha_and_beta(steps, alpha, beta, sd1):
    sampling = make_plan(sd1, _request()).sampling
    spec = get_sampler("Euler")
    for schedule, reference in (
            ("a1111_beta", a1111_beta_scheduler(steps, float(DiscreteSchedule().sigmas[0]),
                                                float(DiscreteSchedule().sigmas[-1]), "cpu", alpha, beta)),
            ("beta", C.beta_scheduler(C.ModelSamplingDiscrete(), steps, alpha, beta))):
        req = make_plan(sd1, _request(schedule=schedule, steps=steps, beta_alpha=alpha, beta_beta=beta)).request
        ours = request_sigmas(sampling, spec, req)
        torch.testing.assert_close(ours.float(), reference.float(), rtol=2e-5, atol=0)


# -- infotext ------------------------------------------------------------------------------------------------------
def _written(req: GenerationRequest, bundle=None) -> dict:
    family = None if bundle is None else bundle.family
    return {k: v for k, v in to_parameters(req, family=family).items() if v is not None}


def test_the_labels_are_written_where_they_drew_and_read_back(sd1, inpainting):
    cases = [
        (inpainting, _img2img(extra_noise=0.25, inpainting_mask_weight=0.4),
         {"Extra noise": 0.25, "Conditional mask weight": 0.4}),
        (sd1, _request(extra_noise=0.25, hr_scale=1.5, hr_denoise=0.6), {"Extra noise": 0.25}),
        (sd1, _request(sgm_noise_multiplier=True), {"SGM noise multiplier": True}),
        (sd1, _request(schedule="Beta", beta_alpha=0.3), {"Beta schedule alpha": 0.3, "Beta schedule beta": 0.6}),
    ]
    for bundle, req, labels in cases:
        resolved = make_plan(bundle, req).request
        written = _written(resolved, bundle)
        assert {k: written.get(k) for k in labels} == labels
        assert "Initial noise" not in written
        read = from_parameters(parse_parameters(format_parameters(written)))
        again = make_plan(bundle, replace(GenerationRequest(**read), init_image=req.init_image)).request
        for name in ("extra_noise", "inpainting_mask_weight", "sgm_noise_multiplier", "beta_alpha", "beta_beta",
                     "init_noise"):
            assert getattr(again, name) == getattr(resolved, name), name
    for req in (_request(extra_noise=0.25, inpainting_mask_weight=0.4), _request(beta_alpha=0.3),
                _img2img(inpainting_mask_weight=0.4)):          # txt2img: no img2img; karras: no Beta; 4 channels
        written = _written(make_plan(sd1, req).request, sd1)
        assert not {"Extra noise", "Conditional mask weight", "Beta schedule alpha"} & set(written)


@pytest.mark.parametrize("model, fields, labels", [
    ("sd1", dict(inpainting_mask_weight=0.4), {}),                              # a 4-channel model never reads it
    ("inpainting", dict(inpainting_mask_weight=0.4), {"Conditional mask weight": 0.4}),
    ("sd1", dict(extra_noise=0.25), {"Extra noise": 0.25}),
    ("sd1", dict(extra_noise=0.25, mask_image=lower_right_mask(SIZE), strength=1.0, img2img_convention="diffusers"),
     {}),                                                                       # diffusers' inpainting at 1: pure noise
])
def test_the_labels_are_written_where_the_drawing_used_them(sd1, inpainting, model, fields, labels):
    """A1111 writes Conditional mask weight only with inpainting conditioning; Extra noise is written where it was
    added: where an option changed nothing, the picture is the one without it and carries no label."""
    bundle = {"sd1": sd1, "inpainting": inpainting}[model]
    req = _img2img(batch_size=1, **fields)
    result = generate(bundle, req)
    written = _written(result.request, bundle)
    assert {k: written[k] for k in ("Conditional mask weight", "Extra noise") if k in written} == labels
    plain = generate(bundle, replace(req, inpainting_mask_weight=1.0, extra_noise=0.0)).images[0]
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(plain)) is not bool(labels)


def test_a1111s_texts_with_the_labels_are_drawn_not_named_undrawn():
    text = ("a cat\nSteps: 20, Sampler: Euler, Schedule type: Beta, CFG scale: 7, Seed: 1, Size: 512x512, "
            "Denoising strength: 0.5, Conditional mask weight: 0.6, Extra noise: 0.2, SGM noise multiplier: True, "
            "Beta schedule alpha: 0.5, Beta schedule beta: 0.7, Version: v1.10.1")
    p = parse_parameters(text)
    assert undrawn_labels(p) == []
    fields = from_parameters(p)
    assert {k: fields[k] for k in ("inpainting_mask_weight", "extra_noise", "sgm_noise_multiplier", "beta_alpha",
                                   "beta_beta", "schedule")} == {
        "inpainting_mask_weight": 0.6, "extra_noise": 0.2, "sgm_noise_multiplier": True, "beta_alpha": 0.5,
        "beta_beta": 0.7, "schedule": "a1111_beta"}


@pytest.mark.parametrize("field, value", [("extra_noise", -0.1), ("extra_noise", math.inf),
                                          ("inpainting_mask_weight", 1.5), ("beta_alpha", 0.0), ("beta_beta", -1.0),
                                          ("sgm_noise_multiplier", 1)])
def test_bad_values_are_request_errors(sd1, field, value):
    with pytest.raises(RequestError, match=field.split("_")[0]):
        make_plan(sd1, _img2img(**{field: value}))


# -- A1111 API ----------------------------------------------------------------------------------------------------
A1111_OPTIONS = {"img2img_extra_noise": 0.0, "inpainting_mask_weight": 1.0, "sgm_noise_multiplier": False,
                 "beta_dist_alpha": 0.6, "beta_dist_beta": 0.6}    # modules/shared_options.py OptionInfo defaults


def test_the_api_lists_a1111s_defaults_and_takes_options_and_overrides():
    assert {k: OPTION_DEFAULTS[k] for k in A1111_OPTIONS} == A1111_OPTIONS
    options = {"img2img_extra_noise": 0.2, "beta_dist_alpha": 0.4}
    overrides = {"inpainting_mask_weight": 0.3, "sgm_noise_multiplier": True, "beta_dist_beta": 0.9}
    req = _request_of(Txt2ImgIn(prompt="x", override_settings=overrides), options)
    assert (req.extra_noise, req.inpainting_mask_weight, req.sgm_noise_multiplier, req.beta_alpha,
            req.beta_beta) == (0.2, 0.3, True, 0.4, 0.9)
    plain = _request_of(Img2ImgIn(prompt="x"), {})
    assert (plain.extra_noise, plain.inpainting_mask_weight, plain.sgm_noise_multiplier, plain.beta_alpha,
            plain.beta_beta) == (0.0, 1.0, False, 0.6, 0.6)


def _request_of(body, options):
    return a1111_request(body, options=options)


@pytest.mark.parametrize("key, value", [("img2img_extra_noise", -1), ("inpainting_mask_weight", 2),
                                        ("sgm_noise_multiplier", "yes"), ("beta_dist_alpha", 0),
                                        ("beta_dist_beta", True)])
def test_the_api_refuses_bad_options(key, value):
    with pytest.raises(BadRequest, match=key):
        _request_of(Txt2ImgIn(prompt="x", override_settings={key: value}), {})


# -- CLI ----------------------------------------------------------------------------------------------------------
def test_the_cli_flags_draw_what_the_parameters_redraw(tmp_path, capsys, sd1_file):
    init = tmp_path / "init.png"
    init_picture(SIZE).save(init)
    out, again = tmp_path / "out.png", tmp_path / "again.png"
    code, _, err = run(["img2img", "a red block", "--model", str(sd1_file), "--init", str(init), "--steps", "4",
                        "--seed", "5", "--strength", "0.6", "--extra-noise", "0.3", "--mask-weight", "0.5",
                        "--schedule", "beta", "--beta-alpha", "0.4", "--beta-beta", "0.8", "--out", str(out)],
                       capsys)
    assert code == 0, err
    from sdlab.pipeline.png_info import read_parameters
    p = parse_parameters(read_parameters(out))
    assert (p["Extra noise"], p["Beta schedule alpha"], p["Beta schedule beta"]) == ("0.3", "0.4", "0.8")
    assert "Conditional mask weight" not in p                     # a 4-channel model does not read it
    code, _, err = run(["img2img", "--from-png", str(out), "--model", str(sd1_file), "--init", str(init),
                        "--out", str(again)], capsys)
    assert code == 0, err
    assert np.array_equal(pixels(out), pixels(again))
