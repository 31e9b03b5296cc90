"""End-to-end parity: sdlab's generate loop gives diffusers' pictures for the same weights, seed and settings.

Every case writes a reduced-width bundle of random weights as a diffusers folder (`write_diffusers_folder`:
diffusers / transformers save their own modules), then loads that ONE folder twice: with diffusers'
`from_pretrained` and with `sdlab.load`. Both get the same prompt, negative prompt, CFG, size, steps and
seed: diffusers `generator=[Generator("cpu").manual_seed(seed + i) for i in range(B)]`, sdlab `seed`. The
uint8 pictures must agree within 2/255 per pixel (`MAX_PIXEL_DIFF`).

Scheduler <-> sdlab settings (all with SD's config: scaled_linear betas, steps_offset 1, leading spacing):
  EulerDiscreteScheduler                      Euler     "leading"       init_noise "vp" (init_noise_sigma)
  DDIMScheduler(set_alpha_to_one=False)       DDIM      "ddim_leading"  ends at alphas_cumprod[0]
  DPMSolverMultistepScheduler(karras)         DPM++ 2M  "karras"        rounded timesteps (quantize_timesteps),
                                                                        final sigma 0 with a first-order last step
  PNDMScheduler(skip_prk_steps=True)          PLMS      "ddim_leading"  PNDM's list repeats t1 for the
                                                                        improved-Euler start, same sigmas
The DDIM-family schedulers start from x_T = noise in VP scaling: init_noise "vp" everywhere.

Random draws where diffusers' order is not sdlab's (and what is compared instead):
- With ONE init image and a list of generators, diffusers' inpainting pipeline VAE-encodes the image (and
  the masked image) with generator 0 only and repeats that latent for the whole batch, so its image 1 is
  not the single run with seed + 1. sdlab draws per image. The inpainting cases give diffusers the image
  and the mask once per image of the batch, where it draws from generator i for image i, as sdlab does.
- diffusers' 4-channel inpainting also encodes the masked image, a posterior draw it never uses, between
  the initial noise and the step noise; sdlab makes the same draw under diffusers' convention, so an
  ancestral sampler's step noise is diffusers' (`test_inpaint_4_channels_ancestral`).
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from bundle_fixtures import as_released, init_picture, lower_right_mask, tiny_bundle, write_diffusers_folder
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    KDPM2DiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from picture_parity import CFG, MAX_PIXEL_DIFF, PROMPT, SEED, SIZE, STEPS, max_pixel_diff, uint8_pictures
from PIL import Image

import sdlab
from sdlab.diffusion.denoiser import Prediction
from sdlab.pipeline import generate as generate_module
from sdlab.pipeline.generate import generate_with_refiner
from sdlab.pipeline.request import GenerationRequest
from sdlab.pipeline.tiling import encode_tiled

NEGATIVE = "blurry, low quality, watermark"
BATCH = 2


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _folder(tmp_path_factory, name: str, **changes) -> Path:
    """A diffusers folder of the tiny bundle `name`, completed as released folders are (see `_as_released`)."""
    bundle = tiny_bundle(name, seed=11)
    if changes:
        bundle = replace(bundle, **changes)
    return _as_released(write_diffusers_folder(bundle, tmp_path_factory.mktemp(name) / "pipe"))


def _as_released(folder: Path) -> Path:
    return as_released(folder, SIZE // 2)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder = _folder(tmp_path_factory, "sd1")
    return sdlab.load(folder), _quiet(StableDiffusionPipeline.from_pretrained(folder, local_files_only=True))


@pytest.fixture(scope="module")
def sd1_inpaint(tmp_path_factory):
    folder = _folder(tmp_path_factory, "sd1-inpaint")
    return sdlab.load(folder), _quiet(StableDiffusionInpaintPipeline.from_pretrained(folder, local_files_only=True))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = _folder(tmp_path_factory, "sdxl")
    return sdlab.load(folder), _quiet(StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True))


@pytest.fixture(scope="module")
def sdxl_refiner(tmp_path_factory):
    folder = _folder(tmp_path_factory, "sdxl-refiner")
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        folder, local_files_only=True, requires_aesthetics_score=True
    )
    return sdlab.load(folder), _quiet(pipe)


def _generators(batch: int = BATCH) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(SEED + i) for i in range(batch)]


SD_SCHEDULER_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "steps_offset",
                     "timestep_spacing", "prediction_type")


def _schedulers(pipe_config) -> dict[str, tuple[object, dict]]:
    """diffusers scheduler -> the sdlab request options that describe the same sampler and sigmas.

    Built from SD's scheduler settings only: diffusers carries every other key of a config into the next
    `from_config` (a DPM-Solver `use_karras_sigmas=True` would silently reach a later Euler)."""
    config = {key: pipe_config[key] for key in SD_SCHEDULER_KEYS}
    return {
        "euler": (EulerDiscreteScheduler.from_config(config),
                  dict(sampler="Euler", schedule="leading", init_noise="vp")),
        "euler_a": (EulerAncestralDiscreteScheduler.from_config(config),
                    dict(sampler="Euler a", schedule="leading", init_noise="vp")),
        "ddim": (DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=False),
                 dict(sampler="DDIM", schedule="ddim_leading", init_noise="vp")),
        "dpmpp_2m": (DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True),
                     dict(sampler="DPM++ 2M", schedule="karras", init_noise="vp", quantize_timesteps=True)),
        "plms": (PNDMScheduler.from_config(config, skip_prk_steps=True, set_alpha_to_one=False),
                 dict(sampler="PLMS", schedule="ddim_leading", init_noise="vp")),
    }


# ---------------------------------------------------------------------------------------------------------
# txt2img


@pytest.mark.parametrize("scheduler", ["euler", "ddim", "dpmpp_2m", "plms"])
def test_sd1_txt2img(sd1, scheduler):
    ours_pipe, pipe = sd1
    pipe.scheduler, options = _schedulers(pipe.scheduler.config)[scheduler]
    reference = pipe(PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=BATCH, num_inference_steps=STEPS,
                     guidance_scale=CFG, width=SIZE, height=SIZE, generator=_generators(), output_type="np").images
    ours = ours_pipe.txt2img(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE,
                             batch_size=BATCH, **options)
    assert max_pixel_diff(ours.images, reference) <= MAX_PIXEL_DIFF


def test_the_tolerance_sees_a_convention_change(sd1):
    """Starting Euler from sigma_max * noise (A1111) instead of diffusers' init_noise_sigma is a visible change:
    the 2/255 bound is tight enough to catch a wrong convention."""
    ours_pipe, pipe = sd1
    pipe.scheduler, _ = _schedulers(pipe.scheduler.config)["euler"]
    reference = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG, width=SIZE,
                     height=SIZE, generator=_generators(1), output_type="np").images
    ours = ours_pipe.txt2img(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE,
                             sampler="Euler", schedule="leading", init_noise="sigma_max")
    assert max_pixel_diff(ours.images, reference) > 2 * MAX_PIXEL_DIFF


def test_sd2_v_prediction_txt2img(tmp_path_factory):
    folder = _folder(tmp_path_factory, "sd2", prediction=Prediction.V)
    ours_pipe = sdlab.load(folder)
    assert ours_pipe.bundle.prediction is Prediction.V            # read from the folder's scheduler config
    pipe = _quiet(StableDiffusionPipeline.from_pretrained(folder, local_files_only=True))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    reference = pipe(PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=BATCH, num_inference_steps=STEPS,
                     guidance_scale=CFG, width=SIZE, height=SIZE, generator=_generators(), output_type="np").images
    ours = ours_pipe.txt2img(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE,
                             batch_size=BATCH, sampler="Euler", schedule="leading", init_noise="vp")
    assert max_pixel_diff(ours.images, reference) <= MAX_PIXEL_DIFF


SDXL_SIZES = dict(original_size=(48, 40), crops_coords_top_left=(4, 2), target_size=(SIZE, SIZE))


def test_sdxl_txt2img_with_size_conditioning(sdxl):
    ours_pipe, pipe = sdxl
    pipe.scheduler, options = _schedulers(pipe.scheduler.config)["euler"]
    reference = pipe(PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=BATCH, num_inference_steps=STEPS,
                     guidance_scale=CFG, width=SIZE, height=SIZE, generator=_generators(), output_type="np",
                     **SDXL_SIZES).images
    ours = ours_pipe.txt2img(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE,
                             batch_size=BATCH, **SDXL_SIZES, **options)
    assert max_pixel_diff(ours.images, reference) <= MAX_PIXEL_DIFF


NEGATIVE_SIZES = dict(negative_original_size=(40, 48), negative_crops_coords_top_left=(2, 6),
                      negative_target_size=(24, 40))


@pytest.mark.parametrize("negative_sizes", [
    NEGATIVE_SIZES,
    dict(negative_original_size=(40, 48)),          # one negative size alone: diffusers' txt2img ignores it
])
def test_sdxl_txt2img_with_negative_size_conditioning(sdxl, negative_sizes):
    ours_pipe, pipe = sdxl
    pipe.scheduler, options = _schedulers(pipe.scheduler.config)["euler"]
    reference = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG, width=SIZE,
                     height=SIZE, generator=_generators(1), output_type="np", **SDXL_SIZES, **negative_sizes).images
    ours = ours_pipe.txt2img(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE,
                             **SDXL_SIZES, **negative_sizes, **options)
    assert max_pixel_diff(ours.images, reference) <= MAX_PIXEL_DIFF


@pytest.mark.parametrize("clip_skip_convention", ["diffusers", "a1111"])
@torch.no_grad()
def test_sd1_clip_skip_with_a_negative_prompt(sd1, clip_skip_convention):
    """diffusers' `clip_skip` moves the prompt only; A1111's clip skip moves the negative prompt too."""
    ours_pipe, pipe = sd1
    pipe.scheduler, options = _schedulers(pipe.scheduler.config)["euler"]
    # diffusers 0.42's SD1 clip-skip path reads `text_encoder.text_model.final_layer_norm`, which transformers 5
    # moved to the top level; a plain (unregistered) attribute restores the path it expects
    object.__setattr__(pipe.text_encoder, "text_model", SimpleNamespace(final_layer_norm=pipe.text_encoder.final_layer_norm))
    prompt_embeds, _ = pipe.encode_prompt(PROMPT, "cpu", 1, False, clip_skip=1)
    negative_at = {"diffusers": None, "a1111": 1}[clip_skip_convention]
    negative_embeds, _ = pipe.encode_prompt(NEGATIVE, "cpu", 1, False, clip_skip=negative_at)
    reference = pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, num_inference_steps=STEPS,
                     guidance_scale=CFG, width=SIZE, height=SIZE, generator=_generators(1), output_type="np").images
    if clip_skip_convention == "diffusers":       # what the call with clip_skip=1 draws
        called = pipe(PROMPT, negative_prompt=NEGATIVE, clip_skip=1, num_inference_steps=STEPS, guidance_scale=CFG,
                      width=SIZE, height=SIZE, generator=_generators(1), output_type="np").images
        assert np.array_equal(uint8_pictures(called), uint8_pictures(reference))
    ours = ours_pipe.txt2img(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE,
                             clip_skip=2, clip_skip_convention=clip_skip_convention, **options)
    assert max_pixel_diff(ours.images, reference) <= MAX_PIXEL_DIFF


# ---------------------------------------------------------------------------------------------------------
# img2img and inpainting


@pytest.mark.parametrize("scheduler", ["euler", "ddim"])
def test_sd1_img2img(sd1, scheduler):
    ours_pipe, pipe = sd1
    img2img = _quiet(StableDiffusionImg2ImgPipeline(**pipe.components))
    img2img.scheduler, options = _schedulers(pipe.scheduler.config)[scheduler]
    reference = img2img(PROMPT, image=init_picture(SIZE), strength=0.6, negative_prompt=NEGATIVE,
                        num_images_per_prompt=BATCH, num_inference_steps=STEPS, guidance_scale=CFG,
                        generator=_generators(), output_type="np").images
    ours = ours_pipe.img2img(PROMPT, init_picture(SIZE), strength=0.6, negative_prompt=NEGATIVE, steps=STEPS,
                             cfg_scale=CFG, seed=SEED, batch_size=BATCH, **options)
    assert max_pixel_diff(ours.images, reference) <= MAX_PIXEL_DIFF


@pytest.mark.parametrize("size", [SIZE, 2 * SIZE])                     # one tile; 3 x 3 tiles
def test_sd1_img2img_with_a_tiled_vae_encode(sd1, monkeypatch, size):
    """diffusers' `enable_tiling()` blends the encoder's moments (mean and log-variance) across the tiles and
    samples that posterior with each image's generator, as sdlab's tiled encode does. Tiles scaled to the tiny
    VAE (f=2): 32 px with 8 px (25 %) overlap on both sides; both decode untiled. One tile: diffusers' picture.
    3 x 3 tiles: the two blends differ (sdlab ramps over the whole overlap, diffusers blends into the next tile and
    crops), so the pictures differ, by less than diffusers' tiling changes its own."""
    ours_pipe, pipe = sd1
    tiled_vae = copy.deepcopy(pipe.vae)
    tiled_vae.enable_tiling()
    tiled_vae.tile_sample_min_size, tiled_vae.tile_latent_min_size = 32, 16
    tiled_vae.tiled_decode = lambda z, return_dict=True: pipe.vae.decode(z, return_dict=return_dict)   # untiled
    monkeypatch.setattr(generate_module, "encode_tiled", partial(encode_tiled, tile=32, overlap=8))
    scheduler, options = _schedulers(pipe.scheduler.config)["euler"]

    def reference(vae) -> np.ndarray:
        img2img = _quiet(StableDiffusionImg2ImgPipeline(**{**pipe.components, "vae": vae, "scheduler": scheduler}))
        return img2img(PROMPT, image=init_picture(size), strength=0.6, negative_prompt=NEGATIVE,
                       num_images_per_prompt=BATCH, num_inference_steps=STEPS, guidance_scale=CFG,
                       generator=_generators(), output_type="np").images

    ours = ours_pipe.img2img(PROMPT, init_picture(size), strength=0.6, negative_prompt=NEGATIVE, steps=STEPS,
                             cfg_scale=CFG, seed=SEED, batch_size=BATCH, tiled_vae=True, **options).images
    tiled = reference(tiled_vae)
    if size == SIZE:
        assert max_pixel_diff(ours, tiled) <= MAX_PIXEL_DIFF
        return
    tiling_change = np.abs(uint8_pictures(tiled).astype(np.int16) - uint8_pictures(reference(pipe.vae)))  # (B, H, W, 3)
    ours_change = np.abs(uint8_pictures(ours).astype(np.int16) - uint8_pictures(tiled))
    # measured: ours vs diffusers' tiled max 8, mean 0.68; diffusers' tiled vs its untiled max 18, mean 1.39
    assert 0 < ours_change.max() <= tiling_change.max() and ours_change.mean() <= tiling_change.mean()


@pytest.mark.parametrize(("strength", "tiled_vae"), [(1.0, False), (0.6, False), (0.6, True)])
def test_sd1_inpaint_9_channels(sd1_inpaint, strength, tiled_vae):
    """`tiled_vae`: sdlab encodes the image and the masked image in tiles; a picture of one tile gives the
    untiled posterior samples, as diffusers' `enable_tiling()` does."""
    ours_pipe, pipe = sd1_inpaint
    assert ours_pipe.bundle.unet_config.in_channels == 9
    pipe.scheduler, options = _schedulers(pipe.scheduler.config)["euler"]
    image, mask = init_picture(SIZE), lower_right_mask(SIZE)
    reference = pipe([PROMPT] * BATCH, image=[image] * BATCH, mask_image=[mask] * BATCH,
                     strength=strength, negative_prompt=[NEGATIVE] * BATCH, num_inference_steps=STEPS, guidance_scale=CFG, width=SIZE,
                     height=SIZE, generator=_generators(), output_type="np").images
    ours = ours_pipe.inpaint(PROMPT, image, mask, NEGATIVE, strength=strength, steps=STEPS,
                             cfg_scale=CFG, seed=SEED, batch_size=BATCH, paste_back=False, tiled_vae=tiled_vae,
                             **options)
    assert max_pixel_diff(ours.images, reference) <= MAX_PIXEL_DIFF


def _soft_mask(size: int):
    """`lower_right_mask` with a grey ramp across the rows above it: its resampling shows in the picture."""
    mask = np.asarray(lower_right_mask(size)).copy()                                # (size, size) uint8
    mask[size // 4: size // 2] = np.linspace(0, 255, size).round().astype(np.uint8)
    return Image.fromarray(mask)


@pytest.mark.parametrize(("mask_side", "draw_size"), [(64, None), (20, None), (64, (48, 40)), (20, (24, 16))])
def test_sd1_inpaint_with_a_mask_of_another_size(sd1_inpaint, mask_side, draw_size):
    """A mask of another size than the picture is resized as diffusers' mask processor resizes it: straight to
    the drawing size, with Lanczos (measured: max 1; the mask first fitted to the picture: max 34 and 36 at the other drawing sizes)."""
    ours_pipe, pipe = sd1_inpaint
    pipe.scheduler, options = _schedulers(pipe.scheduler.config)["euler"]
    image, mask = init_picture(SIZE), _soft_mask(mask_side)
    width, height = draw_size or image.size
    reference = pipe(PROMPT, image=image, mask_image=mask, strength=0.75, negative_prompt=NEGATIVE,
                     num_inference_steps=STEPS, guidance_scale=CFG, width=width, height=height,
                     generator=_generators(1), output_type="np").images
    ours = ours_pipe.inpaint(PROMPT, image, mask, NEGATIVE, strength=0.75, steps=STEPS, cfg_scale=CFG, seed=SEED,
                             width=width, height=height, paste_back=False, **options)
    assert max_pixel_diff(ours.images, reference) <= MAX_PIXEL_DIFF


@pytest.mark.parametrize("scheduler", ["euler", "ddim"])   # DDIM ends at sigma_min: the kept region is reset
@pytest.mark.parametrize("strength", [0.6, 1.0])            # 1.0: pure noise, first blended after the first step
def test_sd1_inpaint_4_channels(sd1, scheduler, strength):
    ours_pipe, pipe = sd1
    inpaint = _quiet(StableDiffusionInpaintPipeline(**pipe.components))
    inpaint.scheduler, options = _schedulers(pipe.scheduler.config)[scheduler]
    image, mask = init_picture(SIZE), lower_right_mask(SIZE)
    reference = inpaint([PROMPT] * BATCH, image=[image] * BATCH, mask_image=[mask] * BATCH,
                        strength=strength, negative_prompt=[NEGATIVE] * BATCH, num_inference_steps=STEPS, guidance_scale=CFG, width=SIZE,
                        height=SIZE, generator=_generators(), output_type="np").images
    ours = ours_pipe.inpaint(PROMPT, image, mask, NEGATIVE, strength=strength, steps=STEPS, cfg_scale=CFG,
                             seed=SEED, batch_size=BATCH, paste_back=False, **options)
    assert max_pixel_diff(ours.images, reference) <= MAX_PIXEL_DIFF


@pytest.mark.parametrize(("family", "strength"), [("sd1", 1.0), ("sd1", 0.6), ("sdxl", 1.0)])
def test_inpaint_4_channels_ancestral(request, family, strength):
    """diffusers encodes the masked image for a 4-channel U-Net too, drawing its posterior between the initial
    noise and the step noise: Euler a's step noise is diffusers' only with that draw made."""
    ours_pipe, pipe = request.getfixturevalue(family)
    inpaint_class = StableDiffusionXLInpaintPipeline if family == "sdxl" else StableDiffusionInpaintPipeline
    inpaint = _quiet(inpaint_class(**pipe.components))
    inpaint.scheduler, options = _schedulers(pipe.scheduler.config)["euler_a"]
    image, mask = init_picture(SIZE), lower_right_mask(SIZE)
    reference = inpaint([PROMPT] * BATCH, image=[image] * BATCH, mask_image=[mask] * BATCH, strength=strength,
                        negative_prompt=[NEGATIVE] * BATCH, num_inference_steps=STEPS, guidance_scale=CFG,
                        width=SIZE, height=SIZE, generator=_generators(), output_type="np").images
    ours = ours_pipe.inpaint(PROMPT, image, mask, NEGATIVE, strength=strength, steps=STEPS, cfg_scale=CFG,
                             seed=SEED, batch_size=BATCH, paste_back=False, **options)
    assert max_pixel_diff(ours.images, reference) <= MAX_PIXEL_DIFF


def _noised_at_the_samples_sigma(scheduler: KDPM2DiscreteScheduler) -> KDPM2DiscreteScheduler:
    """`scheduler` whose `add_noise` after a first-order half step noises to the interpolated sigma, where the
    sample and the next U-Net call are, instead of the next full sigma (`sigmas[step_index]`)."""
    full_sigma = scheduler.add_noise

    def add_noise(original, noise, timesteps):
        if scheduler.step_index is not None and not scheduler.state_in_first_order:
            return original + noise * scheduler.sigmas_interpol[scheduler.step_index].to(original)
        return full_sigma(original, noise, timesteps)

    scheduler.add_noise = add_noise
    return scheduler


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_sd1_inpaint_4_channels_dpm2_blends_at_the_calls_sigma(sd1, strength):
    """docs/samplers.md's known difference (4): in 4-channel inpainting diffusers' KDPM2 noises the kept region to the
    next full sigma before its midpoint call; sdlab noises it to the call's sigma, and is diffusers' picture once
    diffusers does so too (measured: max 1; as diffusers is, max 65 and 71)."""
    ours_pipe, pipe = sd1
    inpaint = _quiet(StableDiffusionInpaintPipeline(**pipe.components))
    config = {key: pipe.scheduler.config[key] for key in SD_SCHEDULER_KEYS}
    image, mask = init_picture(SIZE), lower_right_mask(SIZE)
    ours = ours_pipe.inpaint(PROMPT, image, mask, NEGATIVE, strength=strength, steps=STEPS, cfg_scale=CFG, seed=SEED,
                             paste_back=False, sampler="DPM2", schedule="leading")
    pictures = []
    for scheduler in (KDPM2DiscreteScheduler.from_config(config),
                      _noised_at_the_samples_sigma(KDPM2DiscreteScheduler.from_config(config))):
        inpaint.scheduler = scheduler
        pictures.append(inpaint(PROMPT, image=image, mask_image=mask, strength=strength, negative_prompt=NEGATIVE,
                                num_inference_steps=STEPS, guidance_scale=CFG, generator=_generators(1),
                                output_type="np").images)
    as_is, at_the_calls_sigma = pictures
    assert max_pixel_diff(ours.images, at_the_calls_sigma) <= MAX_PIXEL_DIFF
    assert max_pixel_diff(ours.images, as_is) > 10 * MAX_PIXEL_DIFF


@pytest.mark.parametrize("sizes", [
    dict(crops_coords_top_left=(4, 2)),             # the negative's crop corner stays (0, 0)
    dict(**SDXL_SIZES, **NEGATIVE_SIZES),
])
def test_sdxl_refiner_img2img_negative_size_conditioning(sdxl_refiner, sizes):
    ours_pipe, pipe = sdxl_refiner
    pipe.scheduler, options = _schedulers(pipe.scheduler.config)["euler"]
    reference = pipe(PROMPT, image=init_picture(SIZE), strength=0.6, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                     guidance_scale=CFG, generator=_generators(1), output_type="np", **sizes).images
    ours = ours_pipe.img2img(PROMPT, init_picture(SIZE), strength=0.6, negative_prompt=NEGATIVE, steps=STEPS,
                             cfg_scale=CFG, seed=SEED, **sizes, **options)
    assert max_pixel_diff(ours.images, reference) <= MAX_PIXEL_DIFF


def test_sdxl_img2img_negative_size_conditioning(sdxl):
    """The base's img2img takes the negative sizes with the positive's crop corner."""
    ours_pipe, pipe = sdxl
    img2img = _quiet(StableDiffusionXLImg2ImgPipeline(**pipe.components))
    img2img.scheduler, options = _schedulers(pipe.scheduler.config)["euler"]
    reference = img2img(PROMPT, image=init_picture(SIZE), strength=0.6, negative_prompt=NEGATIVE,
                        num_inference_steps=STEPS, guidance_scale=CFG, generator=_generators(1), output_type="np",
                        **SDXL_SIZES, **NEGATIVE_SIZES).images
    ours = ours_pipe.img2img(PROMPT, init_picture(SIZE), strength=0.6, negative_prompt=NEGATIVE, steps=STEPS,
                             cfg_scale=CFG, seed=SEED, **SDXL_SIZES, **NEGATIVE_SIZES, **options)
    assert max_pixel_diff(ours.images, reference) <= MAX_PIXEL_DIFF


def test_refiner_folder_that_does_not_zero_an_empty_negative(tmp_path_factory):
    """The released refiner folder's model_index.json says force_zeros_for_empty_prompt: false, so diffusers
    encodes an empty negative prompt as "" there instead of a zero conditioning."""
    folder = _folder(tmp_path_factory, "sdxl-refiner")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    ours_pipe = sdlab.load(folder)
    assert ours_pipe.bundle.zero_empty_negative is False
    pipe = _quiet(StableDiffusionXLImg2ImgPipeline.from_pretrained(folder, local_files_only=True,
                                                                   requires_aesthetics_score=True))
    pipe.scheduler, options = _schedulers(pipe.scheduler.config)["euler"]
    reference = pipe(PROMPT, image=init_picture(SIZE), strength=0.6, num_inference_steps=STEPS, guidance_scale=CFG,
                     generator=_generators(1), output_type="np").images
    ours = ours_pipe.img2img(PROMPT, init_picture(SIZE), strength=0.6, steps=STEPS, cfg_scale=CFG, seed=SEED,
                             **options)
    assert max_pixel_diff(ours.images, reference) <= MAX_PIXEL_DIFF


# ---------------------------------------------------------------------------------------------------------
# SDXL base -> refiner handoff


@pytest.mark.parametrize("switch_at", [0.8, 0.5])
def test_sdxl_refiner_handoff(sdxl, sdxl_refiner, switch_at):
    (ours_base, base), (ours_refiner, refiner) = sdxl, sdxl_refiner
    steps = 6
    base.scheduler, options = _schedulers(base.scheduler.config)["euler"]
    refiner.scheduler, _ = _schedulers(refiner.scheduler.config)["euler"]
    generators = _generators()
    latents = base(PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=BATCH, num_inference_steps=steps,
                   guidance_scale=CFG, width=SIZE, height=SIZE, generator=generators, denoising_end=switch_at,
                   output_type="latent").images
    reference = refiner(PROMPT, image=latents, negative_prompt=NEGATIVE, num_images_per_prompt=BATCH,
                        num_inference_steps=steps, guidance_scale=CFG, generator=generators,
                        denoising_start=switch_at, output_type="np").images
    request = GenerationRequest(PROMPT, NEGATIVE, steps=steps, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE,
                                batch_size=BATCH, **options)
    seen = []
    ours = generate_with_refiner(ours_base.bundle, ours_refiner.bundle, request, switch_at=switch_at,
                                 progress=lambda info: seen.append(info.i))
    assert seen == list(range(steps))
    assert max_pixel_diff(ours.images, reference) <= MAX_PIXEL_DIFF


@pytest.mark.parametrize("scheduler", ["euler", "euler_a"])
@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_sdxl_inpainting_refiner_handoff(sdxl, sdxl_refiner, scheduler, strength):
    """diffusers' inpainting ensemble: StableDiffusionXLInpaintPipeline on the base with denoising_end, its latent
    to the refiner's with denoising_start. The latent handed over has the clean init latent in its kept region (the
    base's last blend), which the refiner's first call reads unblended; the refiner blends with a noise it draws
    (from each image's generator) before its first step. Strength 0.6 differed by 53 / 255 before."""
    (ours_base, base), (ours_refiner, refiner) = sdxl, sdxl_refiner
    steps, switch_at = 6, 0.8
    base_inpaint = _quiet(StableDiffusionXLInpaintPipeline(**base.components))
    refiner_inpaint = _quiet(StableDiffusionXLInpaintPipeline(**refiner.components, requires_aesthetics_score=True))
    base_inpaint.scheduler, options = _schedulers(base.scheduler.config)[scheduler]
    refiner_inpaint.scheduler, _ = _schedulers(refiner.scheduler.config)[scheduler]
    image, mask, generators = init_picture(SIZE), lower_right_mask(SIZE), _generators()
    latents = base_inpaint([PROMPT] * BATCH, image=[image] * BATCH, mask_image=[mask] * BATCH, strength=strength,
                           negative_prompt=[NEGATIVE] * BATCH, num_inference_steps=steps, guidance_scale=CFG,
                           width=SIZE, height=SIZE, generator=generators, denoising_end=switch_at,
                           output_type="latent").images
    reference = refiner_inpaint([PROMPT] * BATCH, image=latents, mask_image=[mask] * BATCH,
                                negative_prompt=[NEGATIVE] * BATCH, num_inference_steps=steps, guidance_scale=CFG,
                                width=SIZE, height=SIZE, generator=generators, denoising_start=switch_at,
                                output_type="np").images
    request = GenerationRequest(PROMPT, NEGATIVE, steps=steps, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE,
                                batch_size=BATCH, init_image=image, mask_image=mask, strength=strength,
                                paste_back=False, **options)
    ours = generate_with_refiner(ours_base.bundle, ours_refiner.bundle, request, switch_at=switch_at)
    assert max_pixel_diff(ours.images, reference) <= MAX_PIXEL_DIFF


def test_sdxl_inpainting_base_then_refiner_at_full_strength(tmp_path_factory, sdxl_refiner):
    """A 9-channel inpainting base starts from noise at strength 1; the 4-channel refiner still blends the
    init image's latent into the kept region, so that latent is drawn for it (it was None: a TypeError)."""
    base = sdlab.load(_folder(tmp_path_factory, "sdxl-inpaint"))
    assert base.bundle.unet_config.in_channels == 9
    request = GenerationRequest(PROMPT, NEGATIVE, steps=4, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE,
                                init_image=init_picture(SIZE), mask_image=lower_right_mask(SIZE), strength=1.0,
                                paste_back=False)
    first, again = (generate_with_refiner(base.bundle, sdxl_refiner[0].bundle, request, switch_at=0.5)
                    for _ in range(2))
    assert [image.size for image in first.images] == [(SIZE, SIZE)]
    assert np.array_equal(uint8_pictures(first.images), uint8_pictures(again.images))


# ---------------------------------------------------------------------------------------------------------
# full size (opt in: --run-slow; about 9 GB of RAM and a few minutes on 2 cores)


@pytest.mark.slow
def test_full_size_sd15_txt2img(tmp_path):
    """The released SD1.5 architecture with random weights (PyTorch's default init), Euler, 256 px."""
    from sdlab.checkpoints.create import new_bundle

    bundle = new_bundle("sd1", seed=3)
    folder = _as_released(write_diffusers_folder(bundle, tmp_path / "sd15"))
    del bundle
    pipe = _quiet(StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None))
    pipe.scheduler, options = _schedulers(pipe.scheduler.config)["euler"]
    size, steps = 256, 4
    reference = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=CFG, width=size,
                     height=size, generator=_generators(1), output_type="np").images
    del pipe
    ours = sdlab.load(folder).txt2img(PROMPT, NEGATIVE, steps=steps, cfg_scale=CFG, seed=SEED, width=size,
                                      height=size, **options)
    a, b = uint8_pictures(ours.images), uint8_pictures(reference)
    assert a.shape == b.shape and b.std() > 1, "the reference picture is flat"
    assert int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) <= MAX_PIXEL_DIFF
