"""sdlab's generate loop on its own: seeds, every family and mode, every sampler, request checking, refiner.

Pictures against diffusers' pipelines are in tests/test_pipeline_parity.py; this file checks what only sdlab
promises. Every run is tiny (reduced-width random models, 16 x 16 pixels, 2-3 steps).
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from bundle_fixtures import tiny_bundle
from diffusers import EulerDiscreteScheduler
from PIL import Image

from sdlab.api import Pipeline
from sdlab.diffusion.discretization import get_discretization
from sdlab.diffusion.noise import generators_for
from sdlab.diffusion.samplers import sampler_names
from sdlab.families import get_family
from sdlab.pipeline.generate import (
    SamplingStopped,
    decode_latents,
    encode_image,
    generate,
    generate_with_refiner,
    handoff_index,
    resolve_for,
    sample_latents,
)
from sdlab.pipeline.images import latent_mask, pil_to_tensor, prepare_mask, tensor_to_pil
from sdlab.pipeline.request import (
    MAX_PROMPT_CHARS,
    GenerationRequest,
    RequestError,
    resolve,
)

SIZE = 16
PROMPT = "a red cube on a blue sphere"
FAMILIES = ["sd1", "sd2", "sdxl", "sd1-inpaint", "sdxl-refiner"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def bundles():
    return {name: tiny_bundle(name, seed=5 + 10 * i) for i, name in enumerate(FAMILIES)}


def _picture() -> Image.Image:
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / (SIZE - 1)
    return Image.fromarray((np.stack([x, y, 1 - x * y], axis=-1) * 255).round().astype(np.uint8))


def _mask() -> Image.Image:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[:, SIZE // 2:] = 255                                    # repaint the right half
    return Image.fromarray(mask)


def _request(**changes) -> GenerationRequest:
    options = dict(prompt=PROMPT, negative_prompt="ugly", steps=2, seed=3, width=SIZE, height=SIZE,
                   sampler="Euler", schedule="karras")
    return GenerationRequest(**{**options, **changes})


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image) for image in images]).astype(np.int16)      # (B, H, W, 3)


# ---------------------------------------------------------------------------------------------------------
# seeds


@pytest.mark.parametrize(("family", "mode"), [
    ("sd1", "txt2img"), ("sd1", "img2img"), ("sd1", "inpaint"), ("sd1-inpaint", "inpaint"),
])
def test_image_i_of_a_batch_is_the_single_run_with_seed_plus_i(bundles, family, mode):
    """With a stochastic sampler every draw (VAE posterior, start noise, masked-image latent, step noise)
    comes from image i's own generator, so a batch is the single runs side by side."""
    pictures = {"img2img": dict(init_image=_picture(), strength=0.7),
                "inpaint": dict(init_image=_picture(), mask_image=_mask(), strength=1.0)}.get(mode, {})
    request = _request(sampler="Euler a", steps=3, **pictures)
    batch = generate(bundles[family], _request(sampler="Euler a", steps=3, batch_size=3, seed=40, **pictures))
    assert batch.seeds == [40, 41, 42]
    singles = [generate(bundles[family], replace(request, seed=40 + i)).images[0] for i in range(3)]
    assert np.abs(_pixels(batch.images) - _pixels(singles)).max() <= 1
    assert np.abs(_pixels(batch.images[:1]) - _pixels(batch.images[1:2])).max() > 10    # the seeds do differ


@pytest.mark.parametrize("convention", ["diffusers", "comfyui", "a1111"])
def test_img2img_start_noise_is_the_conventions_draw(bundles, monkeypatch, convention):
    """diffusers' prepare_latents samples the posterior first, so the noise is each seed's second draw;
    A1111's img2img takes it as the first (`sample`: x = self.rng.next()), and so does ComfyUI's (prepare_noise;
    both sample the posterior from their global random state)."""
    from sdlab.pipeline import generate as generate_module

    starts = []
    real = generate_module._start
    monkeypatch.setattr(generate_module, "_start", lambda *a, **k: starts.append(real(*a, **k)) or starts[-1])
    generate(bundles["sd1"], _request(init_image=_picture(), strength=0.7, batch_size=2, seed=40,
                                      img2img_convention=convention))
    shape = starts[0].noise.shape[1:]                                 # (4, h, w)
    nth = 0 if convention in ("a1111", "comfyui") else 1
    generators = [torch.Generator().manual_seed(seed) for seed in (40, 41)]
    noise = torch.stack([[torch.randn(shape, generator=g) for _ in range(2)][nth] for g in generators])
    assert torch.equal(starts[0].noise.cpu(), noise)


@pytest.mark.parametrize("family, pictures", [
    ("sd1", dict(init_image=_picture(), strength=0.7)),
    ("sd1", dict(init_image=_picture(), mask_image=_mask(), strength=0.7)),
    ("sd1-inpaint", dict(init_image=_picture(), mask_image=_mask(), strength=0.7)),
])
def test_a1111_step_noise_follows_the_start_noise_in_each_seeds_generator(bundles, monkeypatch, family, pictures):
    """A1111's `ImageRNG` gives each seed's start noise, then its ancestral step noise: the VAE posteriors
    (init image, masked image) draw nothing from the seeds' generators in between."""
    from sdlab.pipeline import generate as generate_module

    step_noise = []
    real = generate_module._run_sampler

    def run(plan, model, x, sigmas, options, progress):
        source = options["noise"]
        return real(plan, model, x, sigmas, {**options, "noise": lambda *a: step_noise.append(source(*a))
                                             or step_noise[-1]}, progress)

    monkeypatch.setattr(generate_module, "_run_sampler", run)
    generate(bundles[family], _request(sampler="Euler a", batch_size=2, seed=40, img2img_convention="a1111",
                                       **pictures))
    shape = step_noise[0].shape[1:]                                       # (4, h, w)
    generators = [torch.Generator().manual_seed(seed) for seed in (40, 41)]
    draws = torch.stack([torch.stack([torch.randn(shape, generator=g) for _ in range(2)]) for g in generators])
    assert torch.equal(step_noise[0].cpu(), draws[:, 1])                  # (2, 4, h, w): each seed's second draw


def test_same_seed_same_picture_and_random_seed_is_recorded(bundles):
    first = generate(bundles["sd1"], _request(sampler="Euler a"))
    again = generate(bundles["sd1"], _request(sampler="Euler a"))
    assert np.array_equal(_pixels(first.images), _pixels(again.images))
    drawn = generate(bundles["sd1"], _request(seed=-1))
    assert drawn.request.seed >= 0 and drawn.seeds == [drawn.request.seed]
    replay = generate(bundles["sd1"], drawn.request)
    assert np.array_equal(_pixels(drawn.images), _pixels(replay.images))


def test_negative_seeds_other_than_minus_one_are_seeds():
    """A1111 draws a random seed for -1 only (`get_fixed_seed`); -5 goes to `torch.manual_seed`, which reads it
    as 2**64 - 5, and a batch counts up from it."""
    assert _resolve(_request(seed=-5, batch_size=2)).seeds() == [-5, -4]
    with_variation = _resolve(_request(seed=3, subseed=-7, subseed_strength=0.5))
    assert with_variation.subseeds() == [-7]
    noise = [torch.randn(3, generator=g) for g in generators_for([-5, 2**64 - 5])]
    assert torch.equal(noise[0], noise[1])


# ---------------------------------------------------------------------------------------------------------
# every family, every mode


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
def test_every_family_runs_every_mode(bundles, family, mode):
    pipe = Pipeline(bundles[family])
    width, height = SIZE + 8, SIZE                   # not square
    if mode == "txt2img":
        result = pipe.txt2img(PROMPT, "ugly", steps=2, seed=1, width=width, height=height, batch_size=2)
    elif mode == "img2img":
        result = pipe.img2img(PROMPT, _picture().resize((width, height)), strength=0.75, steps=2, seed=1, batch_size=2)
    else:
        result = pipe.inpaint(PROMPT, _picture().resize((width, height)), _mask().resize((width, height)), steps=2,
                              seed=1, batch_size=2)
    assert [image.size for image in result.images] == [(width, height)] * 2
    assert result.request.mode == mode
    assert result.request.sampler == "DPM++ 2M" and result.request.schedule == "karras"   # the family defaults
    assert np.abs(_pixels(result.images[:1]) - _pixels(result.images[1:])).max() > 0


def test_4_channel_inpainting_keeps_the_known_latent(bundles):
    """With an ordinary model the known region ends as the init image's latent (posterior sample of each
    image's generator); the repainted region is new."""
    bundle = bundles["sd1"]
    req = resolve_for(bundle, _request(init_image=_picture(), mask_image=_mask(), strength=1.0, batch_size=2))
    latents = sample_latents(bundle, req)                                                   # (2, 4, 8, 8)
    known = encode_image(bundle, pil_to_tensor(_picture()), generators_for(req.seeds()))  # (2, 4, 8, 8)
    keep = latent_mask(prepare_mask(_mask(), (SIZE, SIZE)), bundle.vae_config.downsample_factor) < 0.5
    keep = keep.expand_as(latents)
    assert torch.allclose(latents[keep], known[keep], atol=1e-5)
    assert (latents[~keep] - known[~keep]).abs().max() > 0.1


def test_inpainting_model_at_strength_1_ignores_the_picture_under_the_mask(bundles):
    """A 9-channel model at strength 1 starts from pure noise (diffusers): the init picture enters only through
    the masked-image channels, so the picture under the mask does not change the result."""
    other = Image.fromarray(np.asarray(_picture())[:, :, ::-1].copy())
    left_kept = np.asarray(_picture()).copy()
    left_kept[:, SIZE // 2:] = np.asarray(other)[:, SIZE // 2:]                 # differs only under the mask
    bundle = bundles["sd1-inpaint"]
    a = generate(bundle, _request(init_image=_picture(), mask_image=_mask(), strength=1.0))
    b = generate(bundle, _request(init_image=Image.fromarray(left_kept), mask_image=_mask(), strength=1.0))
    assert np.array_equal(_pixels(a.images), _pixels(b.images))


# ---------------------------------------------------------------------------------------------------------
# every sampler


@pytest.mark.parametrize("name", sampler_names())
def test_every_registered_sampler_runs(bundles, name):
    steps = []
    result = generate(bundles["sd1"], _request(sampler=name, schedule="normal", steps=2),
                      progress=lambda info: steps.append(info.i))
    assert steps == [0, 1]
    assert result.images[0].size == (SIZE, SIZE)
    assert _pixels(result.images).std() > 1


# ---------------------------------------------------------------------------------------------------------
# request checking


def _resolve(request: GenerationRequest, factor: int = 8) -> GenerationRequest:
    return resolve(request, default_size=512, default_sampler="DPM++ 2M", default_schedule="karras", factor=factor)


def test_sizes_snap_down_to_multiples_of_8_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        resolved = _resolve(GenerationRequest(PROMPT, width=517, height=300))
    assert (resolved.width, resolved.height) == (512, 296)
    assert "not a multiple of 8" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert _resolve(GenerationRequest(PROMPT, width=640, height=384)).width == 640
    assert caplog.text == ""
    assert (_resolve(GenerationRequest(PROMPT)).width, _resolve(GenerationRequest(PROMPT)).height) == (512, 512)
    init = _picture().resize((100, 60))
    from_image = _resolve(GenerationRequest(PROMPT, init_image=init))
    assert (from_image.width, from_image.height) == (96, 56)
    # a VAE with a factor above 8 needs multiples of its factor; one below 8 still gets the 8-pixel grid
    assert _resolve(GenerationRequest(PROMPT, width=40, height=48), factor=16).width == 32
    assert _resolve(GenerationRequest(PROMPT, width=20, height=16), factor=2).width == 16


def test_long_prompts_up_to_the_limit_are_accepted_in_chunks(bundles):
    words = ["red", "green", "blue", "cube", "sphere", "cone"]
    prompt = " ".join(words[i % len(words)] for i in range(2000))[:10_000]                  # 10,000 characters
    assert len(prompt) == 10_000 and MAX_PROMPT_CHARS >= 10_000
    result = generate(bundles["sd1"], _request(prompt=prompt, negative_prompt=prompt[:3000]))
    assert result.images[0].size == (SIZE, SIZE)
    with pytest.raises(RequestError, match=f"prompt is {MAX_PROMPT_CHARS + 1} characters long; the limit is"):
        _resolve(GenerationRequest("a" * (MAX_PROMPT_CHARS + 1)))
    with pytest.raises(RequestError, match="negative prompt is"):
        _resolve(GenerationRequest(PROMPT, negative_prompt="a" * (MAX_PROMPT_CHARS + 1)))


@pytest.mark.parametrize("name, schedule", [("SGM Uniform", "sgm_uniform"), ("DDIM", "ddim_uniform"),
                                            ("Karras", "karras"), (" exponential ", "exponential"),
                                            ("Automatic", "karras"), ("trailing", "trailing")])
def test_a1111_schedule_keys_and_labels_are_schedules_everywhere(name, schedule):
    """The label sdlab writes in its pictures' `Schedule type` works as `--schedule` too; "Automatic" = unset."""
    assert _resolve(GenerationRequest(prompt="x", schedule=name)).schedule == schedule


BAD_REQUESTS = [
    (dict(width=4), r"width must be an integer in 8\.\.8192, got 4"),
    (dict(height=10_000), r"height must be an integer in 8\.\.8192, got 10000"),
    (dict(width=512.0), "width must be an integer"),
    (dict(steps=0), r"steps must be an integer in 1\.\.1000, got 0"),
    (dict(steps=2.5), "steps must be an integer in"),
    (dict(steps=True), "steps must be an integer in"),
    (dict(batch_size=0), r"batch size must be an integer in 1\.\.64, got 0"),
    (dict(batch_size=65), "batch size must be an integer"),
    (dict(cfg_scale=math.nan), "CFG scale must be a finite number, got nan"),
    (dict(cfg_scale=math.inf), "CFG scale must be a finite number, got inf"),
    (dict(cfg_scale="7"), "CFG scale must be a finite number"),
    (dict(guidance_rescale=1.5), r"guidance rescale must lie in \[0, 1\]"),
    (dict(sampler="euler_b"), r"unknown sampler 'euler_b'; valid names: Euler, Euler a, .*dpmpp_2m"),
    (dict(schedule="karas"), r"unknown schedule 'karas'; valid names: .*karras.*sgm_uniform"),
    (dict(init_noise="big"), "unknown initial-noise convention 'big'; valid: sigma_max, vp"),
    (dict(img2img_convention="forge", init_image=_picture()), "unknown img2img convention 'forge'; valid: diffusers"),
    (dict(init_image=_picture(), strength=0.0), r"strength must lie in \(0, 1\] under the diffusers convention, got 0.0"),
    (dict(init_image=_picture(), strength=1.5), r"strength must lie in \(0, 1\] under the diffusers convention, got 1.5"),
    (dict(init_image=_picture(), strength=-0.1, img2img_convention="a1111"), r"strength must lie in \[0, inf\)"),
    (dict(init_image=_picture(), strength=math.nan), "strength must be a finite number"),
    (dict(init_image=_picture(), strength=0.1, steps=5), "runs no step .*raise the strength or the steps"),
    (dict(mask_image=_mask()), "a mask needs an init image"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(seed=2**64 - 1, batch_size=2), r"seed 18446744073709551615 \+ 1 is outside the seeds"),
    (dict(seed=-(2**63) - 1), "is outside the seeds -9223372036854775808..18446744073709551615"),
    (dict(clip_skip=0), "clip skip must be an integer >= 1"),
    (dict(eta=-1.0), r"eta must lie in \[0, 10\], got -1.0"),
    (dict(mask_blur=-2.0), r"mask blur must lie in \[0, 256\]"),
    (dict(original_size=(1024,)), "original_size must be two integers"),
    (dict(crops_coords_top_left=(-1, 0)), "crops_coords_top_left must be two integers in 0"),
    (dict(crops_coords_top_left=(0, 10**400)), r"crops_coords_top_left must be two integers in 0\.\.2\*\*127"),
    (dict(original_size=(2**128, 64)), r"original_size must be two integers in 1\.\.2\*\*127"),   # float32's inf
    (dict(prompt=None), "the prompt must be text, got NoneType"),
    (dict(init_image=3), "the init image must be a PIL image or a file path, got int"),
    (dict(init_image=_picture(), mask_image=b"not a picture"), "the mask must be a PIL image or a file path, got bytes"),
]


@pytest.mark.parametrize(("changes", "message"), BAD_REQUESTS, ids=[m[:30] for _, m in BAD_REQUESTS])
def test_bad_requests_say_what_is_wrong(changes, message):
    request = GenerationRequest(**{"prompt": PROMPT, **changes})
    with pytest.raises(RequestError, match=message):
        _resolve(request)


def test_bad_requests_fail_before_any_model_runs(bundles):
    calls = []
    handle = bundles["sd1"].unet.register_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(RequestError):
            Pipeline(bundles["sd1"]).txt2img(PROMPT, steps=0)
        with pytest.raises(TypeError, match="unknown generation option"):
            Pipeline(bundles["sd1"]).txt2img(PROMPT, sampler_name="Euler")
    finally:
        handle.remove()
    assert calls == []


# ---------------------------------------------------------------------------------------------------------
# SDXL refiner handoff


@pytest.mark.parametrize("schedule", ["leading", "diffusers_karras"])
@pytest.mark.parametrize("steps", [5, 20, 50])
@pytest.mark.parametrize("switch_at", [0.5, 0.8, 0.9])
def test_handoff_index_is_diffusers_denoising_end(schedule, steps, switch_at):
    """The number of base steps equals StableDiffusionXLPipeline's `denoising_end` count on the same scheduler."""
    reference = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       steps_offset=1, timestep_spacing="leading",
                                       use_karras_sigmas=schedule == "diffusers_karras")
    reference.set_timesteps(steps)
    cutoff = round(1000 - switch_at * 1000)
    expected = len([t for t in reference.timesteps if t >= cutoff])
    noise_schedule = get_family("sdxl").schedule.build()
    sigmas = get_discretization(schedule)(noise_schedule, steps)
    assert handoff_index(sigmas, noise_schedule, switch_at) == expected


def _a1111_base_steps(sigmas, noise_schedule, switch_at) -> int:
    """The steps A1111's `apply_refiner` (sd_samplers_common.py) leaves to the base, checked at each step's
    call: k-diffusion's float32 training sigmas, the nearest to the call's sigma, and the refiner once
    (999 - t) / 1000 is not below `switch_at`."""
    alphas_cumprod = noise_schedule.alphas_cumprod.float()
    model_sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    for step, sigma in enumerate(sigmas[:-1].float()):
        timestep = torch.argmin(torch.abs(model_sigmas - sigma))
        if not (999 - timestep) / 1000 < switch_at:
            return step
    return len(sigmas) - 1


@pytest.mark.parametrize("schedule", ["normal", "karras", "exponential"])
@pytest.mark.parametrize("steps", [8, 11, 21, 25, 26, 40])
@pytest.mark.parametrize("switch_at", [0.5, 0.7, 0.8, 0.9])
def test_handoff_index_a1111_is_apply_refiner(schedule, steps, switch_at):
    noise_schedule = get_family("sdxl").schedule.build()
    sigmas = get_discretization(schedule)(noise_schedule, steps)
    assert handoff_index(sigmas, noise_schedule, switch_at, "a1111") == _a1111_base_steps(sigmas, noise_schedule,
                                                                                            switch_at)


def test_a1111s_handoff_rounds_the_timestep_to_the_nearest(bundles):
    """Uniform ("normal") 21 steps, switch 0.8: step 16 starts at t = 199.8, below diffusers' cut-off of 200
    (the refiner's), which A1111 rounds to 200, a completed ratio of 0.799 (the base's)."""
    noise_schedule = get_family("sdxl").schedule.build()
    sigmas = get_discretization("normal")(noise_schedule, 21)
    assert handoff_index(sigmas, noise_schedule, 0.8) == 16
    assert handoff_index(sigmas, noise_schedule, 0.8, "a1111") == 17
    with pytest.raises(RequestError, match="unknown refiner switch convention 'comfyui'"):
        Pipeline(bundles["sd1"], refiner_convention="comfyui")


@pytest.mark.parametrize("sampler", ["Euler", "Euler a"])
def test_refining_with_the_base_itself_is_one_plain_run(bundles, sampler):
    """Handing off to the same model on the same sigmas, with the generators continuing, changes nothing for
    one-step samplers (multistep samplers restart their history at the handoff, as diffusers does)."""
    request = _request(sampler=sampler, steps=4, batch_size=2, width=SIZE + 8)
    plain = generate(bundles["sdxl"], request)
    handed = generate_with_refiner(bundles["sdxl"], bundles["sdxl"], request, switch_at=0.6)
    assert np.abs(_pixels(plain.images) - _pixels(handed.images)).max() <= 1


@pytest.mark.parametrize("sampler", ["DPM++ 2M", "Heun", "Euler a"])
def test_a1111s_refiner_swaps_the_model_inside_one_sampler_run(bundles, sampler):
    """A1111's `apply_refiner` swaps the model inside the running sampler: refined by the base itself, a
    multistep or second-order sampler draws the plain run's picture (its history runs on), and progress counts
    each step once; diffusers' rule restarts a multistep sampler at the handoff."""
    from sdlab.pipeline.plan import make_plan

    base = bundles["sdxl"]
    request = _request(sampler=sampler, steps=6, batch_size=2, width=SIZE + 8)
    plain = _pixels(generate(base, request).images)
    steps = []
    plan = make_plan(base, request, refiner=base, switch_at=0.6, refiner_convention="a1111")
    assert 0 < plan.refiner_split < 6
    swapped = generate_with_refiner(base, base, plan, progress=lambda info: steps.append(info.i))
    assert np.abs(plain - _pixels(swapped.images)).max() <= 1 and steps == list(range(6))
    if sampler == "DPM++ 2M":
        restarted = generate_with_refiner(base, base, make_plan(base, request, refiner=base, switch_at=0.6))
        assert np.abs(plain - _pixels(restarted.images)).max() > 1


def test_refiner_handoff_runs_and_checks_its_inputs(bundles):
    steps = []
    result = generate_with_refiner(bundles["sdxl"], bundles["sdxl-refiner"], _request(steps=5, batch_size=2),
                                   switch_at=0.5, progress=lambda info: steps.append(info.i))
    assert steps == [0, 1, 2, 3, 4]
    assert [image.size for image in result.images] == [(SIZE, SIZE)] * 2
    plain = generate(bundles["sdxl"], _request(steps=5, batch_size=2))
    assert np.abs(_pixels(plain.images) - _pixels(result.images)).max() > 10     # the refiner did the last steps
    for bad in (0.0, 1.0, 1.2):
        with pytest.raises(RequestError, match="switch_at must lie strictly between 0 and 1"):
            generate_with_refiner(bundles["sdxl"], bundles["sdxl-refiner"], _request(), switch_at=bad)
    with pytest.raises(RequestError, match="same latent space"):
        generate_with_refiner(bundles["sd1"], bundles["sdxl-refiner"], _request())


def _overflowing_fp16_vae_bundle():
    """A tiny SD1 bundle whose VAE overflows float16 (as the released SDXL VAE does) but not float32: the
    first convs of encoder and decoder scaled until their largest weight is 30000 (still a float16 number),
    so their outputs pass float16's 65504; the GroupNorm after them brings float32 values back to scale."""
    bundle = tiny_bundle("sd1", seed=5)
    with torch.no_grad():
        for conv in (bundle.vae.encoder.conv_in, bundle.vae.decoder.conv_in):
            conv.weight.mul_(30000 / conv.weight.abs().max())
    return bundle


def test_a_float16_vae_that_overflows_reruns_in_float32(caplog):
    from sdlab.pipeline.generate import decode_latents

    bundle = _overflowing_fp16_vae_bundle()
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))    # (1, 4, h, w)
    pixels = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        expected_pixels = decode_latents(bundle, latents)                               # float32 throughout
        expected_latents = encode_image(bundle, pixels, generators_for([7]))
        bundle.vae.to(torch.float16)
        assert not torch.isfinite(bundle.vae.decode((latents / bundle.scaling_factor).half())).all()
        with caplog.at_level(logging.WARNING, logger="sdlab.pipeline.generate"):
            decoded = decode_latents(bundle, latents)
    assert bundle.vae.dtype == torch.float32 and "overflowed float16" in caplog.text
    assert torch.isfinite(decoded).all() and (decoded - expected_pixels).abs().max() < 5e-3

    bundle.vae.to(torch.float16)
    with torch.no_grad():
        encoded = encode_image(bundle, pixels, generators_for([7]))   # the retry draws what the first try drew
    assert bundle.vae.dtype == torch.float32
    assert torch.isfinite(encoded).all() and (encoded - expected_latents).abs().max() < 5e-3 * expected_latents.abs().max()


# ---------------------------------------------------------------------------------------------------------
# a run stopped from its progress callback (A1111's interrupt and skip)


def _stopping_after(step: int, seen: list):
    """A progress callback that keeps each step's x0 estimate and raises `SamplingStopped` after step `step`."""
    def progress(info) -> None:
        seen.append(info.denoised.clone())
        if info.i == step:
            raise SamplingStopped
    return progress


def test_a_stopped_run_ends_with_the_pictures_of_its_latest_x0_estimate(bundles):
    """A1111's interrupt and skip end its sampler with the latest x0 estimate (`launch_sampling`: `except
    InterruptedException: return self.last_latent`), decoded as the last step's latent would be: the run's
    `result` is the decoded `StepInfo.denoised` of the step it stopped after."""
    bundle, seen = bundles["sd1"], []
    with pytest.raises(SamplingStopped) as stopped:
        generate(bundle, _request(steps=6, batch_size=2), progress=_stopping_after(2, seen))
    result = stopped.value.result
    assert len(seen) == 3 and result.request.steps == 6 and result.seeds == [3, 4]
    assert _pixels(result.images).tolist() == _pixels(tensor_to_pil(decode_latents(bundle, seen[-1]))).tolist()
    assert np.abs(_pixels(result.images) - _pixels(generate(bundle, _request(steps=6, batch_size=2)).images)).max() > 0


def test_a_stopped_inpainting_is_pasted_back_and_a_stopped_hires_fix_keeps_the_pass_it_reached(bundles):
    """Inpainting: the kept half is the original's, as at the end of a run. The hires fix: stopped in its first pass
    the first pass's pictures at its size, as A1111's interrupt skips `sample_hr_pass`; in its second pass, the
    second pass's at the final size."""
    inpaint = _request(steps=6, init_image=_picture(), mask_image=_mask(), strength=1.0)
    with pytest.raises(SamplingStopped) as stopped:
        generate(bundles["sd1"], inpaint, progress=_stopping_after(1, []))
    whole = generate(bundles["sd1"], inpaint).images
    kept = np.s_[:, :, : SIZE // 2 - 2]
    assert (_pixels(stopped.value.result.images)[kept] == _pixels(whole)[kept]).all()
    pipe = Pipeline(bundles["sd1"])
    for step, size in ((1, SIZE), (7, 2 * SIZE)):                     # 6 first-pass steps, then the second pass's
        with pytest.raises(SamplingStopped) as stopped:
            pipe.run(_request(steps=6, hr_scale=2, hr_upscaler="Latent"), progress=_stopping_after(step, []))
        assert stopped.value.result.images[0].size == (size, size) and stopped.value.result.request.hires


def _stop_at(calls: list, stopping: dict[int, bool]):
    """A `stop` check that counts its calls and raises a `SamplingStopped` (skipped: the value) at the ones named."""
    def stop() -> None:
        calls.append(len(calls))
        if len(calls) - 1 in stopping:
            raise SamplingStopped(skipped=stopping[len(calls) - 1])
    return stop


@pytest.mark.parametrize("upscaler", ["Latent", "Nearest"])
def test_a_hires_fix_stopped_between_its_passes_ends_as_a1111s(bundles, upscaler):
    """A1111's `sample_hr_pass` returns the first pass's samples on an interrupt before the upscaler; later, or on a
    skip (in the first pass too: no check for one before the upscaler), its second pass stops at its first model
    call and returns its init latent: the upscaled pictures at the final size, no second-pass step run."""
    from sdlab.pipeline.generate import sample_latents
    from sdlab.pipeline.upscale import resize_image, upscale_latent

    bundle = bundles["sd1"]
    pipe = Pipeline(bundle)
    request = _request(steps=3, hr_scale=2, hr_upscaler=upscaler)
    first_plan = pipe.resolve(request)                  # its first pass's
    first = generate(bundle, first_plan)
    if upscaler == "Latent":
        side = 2 * SIZE // bundle.vae_config.downsample_factor
        upscaled = upscale_latent(sample_latents(bundle, first_plan), side, side, upscaler)
    else:
        pictures = pil_to_tensor([resize_image(picture, upscaler, (2 * SIZE, 2 * SIZE)) for picture in first.images])
        upscaled = encode_image(bundle, pictures)
    upscaled = _pixels(tensor_to_pil(decode_latents(bundle, upscaled)))
    cases = {"interrupt before the upscaler": ({0: False}, None, _pixels(first.images)),
             "interrupt after it": ({1: False}, None, upscaled),
             "skip before it": ({0: True, 1: True}, None, upscaled),
             "skip in the first pass": ({}, 1, upscaled)}
    for name, (stopping, skip_at, expected) in cases.items():
        seen, calls = [], []

        def progress(info) -> None:
            seen.append(info.i)
            if info.i == skip_at:
                raise SamplingStopped(skipped=True)

        with pytest.raises(SamplingStopped) as stopped:
            pipe.run(request, progress=progress, stop=_stop_at(calls, stopping))
        result = stopped.value.result
        assert max(seen) < 3 and result.request.hires, name                      # no second-pass step
        if skip_at is None:
            assert np.abs(_pixels(result.images) - expected).max() == 0, name
        else:            # the first pass stopped after step 1: its x0 estimate upscaled, at the final size
            assert result.images[0].size == (2 * SIZE, 2 * SIZE) and seen == [0, 1], name


@pytest.mark.parametrize("convention", ["diffusers", "a1111"])
def test_a_stopped_refined_run_is_decoded_and_labelled_by_the_model_drawing_at_the_stop(bundles, convention):
    """Stopped in the base's part, the x0 estimate is decoded by the base's VAE and the run is not refined (A1111
    has not swapped the model yet); stopped once the refiner has drawn, by the refiner's VAE, and the run is refined
    (A1111's swap has written its Refiner label), so its parameters redraw the finished picture."""
    from sdlab.pipeline.plan import make_plan

    base, refiner = bundles["sdxl"], bundles["sdxl-refiner"]
    plan = make_plan(base, _request(steps=6), refiner=refiner, switch_at=0.5, refiner_convention=convention)
    assert plan.refiner_split == 3
    for step, drawing in ((1, base), (4, refiner)):
        seen = []
        with pytest.raises(SamplingStopped) as stopped:
            generate_with_refiner(base, refiner, plan, progress=_stopping_after(step, seen))
        assert len(seen) == step + 1 and stopped.value.result.refined == (drawing is refiner)
        decoded = tensor_to_pil(decode_latents(drawing, seen[-1]))
        assert _pixels(stopped.value.result.images).tolist() == _pixels(decoded).tolist()


def test_mask_round_off_is_recorded_only_where_it_kept_a_soft_level(bundles):
    """mask_round off (A1111's option, sdlab's `Mask round: False`) changes nothing for a mask with no level between 0
    and 1, pixel or latent (a hard mask, no blur, diffusers' nearest latent mask): the result records it on, so no
    label; a blurred mask keeps soft levels, draws otherwise, and records it off."""
    inpaint = dict(steps=3, init_image=_picture(), mask_image=_mask(), strength=0.8, img2img_convention="diffusers")
    for blur, changed in ((0, False), (4, True)):
        rounded = generate(bundles["sd1"], _request(**inpaint, mask_blur=blur))
        soft = generate(bundles["sd1"], _request(**inpaint, mask_blur=blur, mask_round=False))
        assert (np.abs(_pixels(soft.images) - _pixels(rounded.images)).max() > 0) == changed
        assert soft.request.mask_round is not changed and rounded.request.mask_round
