"""AUTOMATIC1111's `/sdapi/v1` routes, same paths, field names and response shapes (docs/server.md lists
the fields that are accepted but ignored).

txt2img / img2img run through the same queue as the native API and answer when the job is done:
`{images: [base64 picture with the parameters text], parameters: <the request>, info: <JSON string>}`, the
pictures a PNG with its text chunk unless the option `samples_format` asks for JPEG / WebP (the text in their
EXIF), as A1111's `encode_pil_to_base64`; the /progress preview and Extras follow the option too.
Errors use A1111's body `{error, detail, body, errors}`: an unknown sampler is 404 "Sampler not found" (A1111
up to 1.8 answered so; 1.9+ draws its first sampler, DPM++ 2M), an unknown scheduler 404 "Scheduler not found"
(A1111 itself falls back to "Automatic"); sdlab refuses both rather than draw another picture silently. The
scheduler "Automatic" or none is A1111's choice for the sampler (Karras for DPM++ 2M, uniform for Euler, ...:
`samplers.a1111_schedule`), and DDIM / DDIM CFG++ / PLMS / UniPC step on A1111's fixed timesteps whatever the
scheduler.
Unset width / height / CFG / steps take the loaded model's defaults rather than A1111's 512 / 7 / 20 (img2img's
sizes too, not the init picture's: `size_convention="a1111"`); on a model that names a few-step preset the unset
sampler, scheduler, steps, CFG and eta are the preset's.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import html
import io
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from fastapi import APIRouter, Request
from PIL import Image
from pydantic import ConfigDict, Field, PrivateAttr, ValidationError, ValidatorFunctionWrapHandler, model_validator

from sdlab.checkpoints.embeddings import Embedding
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.upscaler import read_upscaler
from sdlab.diffusion.samplers import (A1111_SAMPLERS_MAP, SAMPLER_TABLE, SAMPLERS, a1111_schedule, comfyui_spelling,
                                     get_sampler)
from sdlab.diffusion.discretization import steps_run
from sdlab.diffusion.schedule_names import a1111_label
from sdlab.families import FamilySpec
from sdlab.pipeline.image_prompt import IPAdapterInput
from sdlab.pipeline.images import open_image
from sdlab.pipeline.infotext import (
    a1111_backcompat, drawn_by_sdlab, eta_label, hires_parameters, img2img_parameters, old_hires_sizes, refiner_label,
    uses_inpainting_conditioning,
)
from sdlab.pipeline.plan import a1111_model_calls
from sdlab.pipeline.prompt_syntax import PromptError, parse_weighted
from sdlab.pipeline.styles import (
    INFOTEXT_STYLES, PROMPT_FIELDS, STYLES_ARRAY, StyleDatabase, infotext_styles, styled_options,
)
from sdlab.pipeline.png_info import (
    ParametersError, encode_image, other_text_items, parse_parameters, quote, read_parameters, version_label,
    without_checksum,
)
from sdlab.pipeline.request import (
    A1111_UNIPC_VARIANTS, EMPHASIS_MODES, MASKED_CONTENT, MAX_AESTHETIC, MAX_BATCH_COUNT, MAX_BETA, MAX_CHURN,
    MAX_ETA, MAX_NOISE_MULTIPLIER, MAX_SEED, MAX_SIZE_CONDITION, MAX_UNIPC_ORDER, RESIZE_MODES, RNG_SOURCES,
    GenerationRequest, RequestError, finite_number, fixed_seed, rng_source,
)
from sdlab.pipeline.upscale import (
    A1111_REALESRGAN_STEMS, DEFAULT_OVERLAP, DEFAULT_TILE, LATENT_UPSCALE_MODES, MIN_TILE, UpscaleError,
    centred_on_canvas, tile_overlap_limit, tile_too_small, upscale_by,
)
from sdlab.server.alwayson import alwayson_freeu, alwayson_pag, check_alwayson_scripts
from sdlab.server.a1111_scripts import (
    NOT_DRAWN, Drawn, Pictures, ScriptHost, ScriptPictures, ScriptSeeds, script_info, scripts_list,
    selected_script,
)
from sdlab.server.config import Limits
from sdlab.server.controls import a1111_controls
from sdlab.server.inputs import (
    EXTRAS_UPSCALER, EXTRAS_UPSCALER_2, PLAIN_UPSCALER_NAMES, BadRequest, JobSpec, NullsAreDefaults, check_texts,
    decode_base64, decode_image, image_from_bytes, load_failure, load_upscaler_file, refiner_choice, sampler_and_schedule,
    opened_picture, scheduler_rows, unset_preset_fields, upscaler_file, SCRIPT_UPSCALER,
)
from sdlab.server.jobs import Job, Unavailable, image_seeds
from sdlab.server.model_shapes import planned_bundle
from sdlab.server.model_folders import ModelFile
from sdlab.server.native import service_of
from sdlab.server.previews import preview_image
from sdlab.server.registry import Checkpoint
from sdlab.server.service import Service
from sdlab.server.store import INTERRUPTED_ERROR
from sdlab.server.vae_files import AUTOMATIC_VAE, VaeChoice
from sdlab.utils.file_hashes import read_per_version

router = APIRouter(prefix="/sdapi/v1")
logger = logging.getLogger("sdlab.server")
DEFAULT_SAMPLER = "Euler"       # A1111's `sampler_index` default
A1111_FIRST_SAMPLER = "DPM++ 2M"    # A1111 1.10's `samplers[0]`: an infotext's sampler where it names none
OPTION_DEFAULTS: dict[str, Any] = {
    "CLIP_stop_at_last_layers": 1, "eta_noise_seed_delta": 0, "tiling": False,   # applied to every later generation
    "sdxl_clip_l_skip": False,                          # Clip skip SDXL: clip skip moves SDXL's CLIP-L (`_request`)
    "token_merging_ratio": 0.0, "token_merging_ratio_img2img": 0.0, "token_merging_ratio_hr": 0.0,  # `_token_merging`
    "samples_format": "png", "jpeg_quality": 80,        # the base64 pictures' format (`_base64_picture`)
    "img2img_fix_steps": False, "initial_noise_multiplier": 1.0,     # img2img's step rule and noise (`_request`)
    "randn_source": "CPU",              # the noise's random source (`_request`); A1111's default is "GPU"
    "sdxl_crop_top": 0, "sdxl_crop_left": 0,                        # SDXL's conditioning (`_sdxl_options`)
    "sdxl_refiner_high_aesthetic_score": 6.0, "sdxl_refiner_low_aesthetic_score": 2.5,
    "s_churn": 0.0, "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0,                # k-diffusion's (`_sigma_options`)
    "eta_ddim": 0.0, "eta_ancestral": 1.0,              # DDIM's eta, the ancestral and SDE samplers' (`_eta`)
    "uni_pc_variant": "bh1", "uni_pc_order": 3, "uni_pc_lower_order_final": True,   # its UniPC's (`_unipc_settings`)
    "uni_pc_skip_type": "time_uniform",
    "sigma_min": 0.0, "sigma_max": 0.0, "rho": 0.0, "always_discard_next_to_last_sigma": False,  # `_schedule_settings`
    "use_old_karras_scheduler_sigmas": False,                                           # `_schedule_settings`
    "beta_dist_alpha": 0.6, "beta_dist_beta": 0.6, "sgm_noise_multiplier": False,      # `_schedule_settings`,
    "img2img_extra_noise": 0.0, "inpainting_mask_weight": 1.0,                         # `_noise_settings`
    "emphasis": "Original", "use_old_scheduling": False,                                # `_prompt_settings`
    "infotext_styles": "Apply if any",          # the styles found in a parameters text (`a1111_parameters`)
    "use_downcasted_alpha_bar": False, "sd_noise_schedule": "Default",
    "s_min_uncond": 0.0, "s_min_uncond_all": False, "skip_early_cond": 0.0,           # `_guidance_settings`
    "pad_cond_uncond": False, "pad_cond_uncond_v0": False,
    "sd_vae": "Automatic", "sd_vae_overrides_per_model_preferences": True,             # `_vae_choice`
    "show_progress_every_n_steps": 10, "live_previews_enable": True,                    # `progress`
    "ESRGAN_tile": DEFAULT_TILE, "ESRGAN_tile_overlap": DEFAULT_OVERLAP,   # `_upscaled_by`, the hires fix (`_request`)
                                                                           # (A1111's overlap: 8)
}
"""A1111's defaults of the options `GET options` always lists; what `POST options` sets replaces them."""
FIXED_OPTIONS = ("sd_model_checkpoint", "sd_checkpoint_hash")
"""Options `GET options` reads from the server (the model new jobs get), never stored."""
SAMPLES_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
"""A1111's `samples_format` values (any case) -> the format its `encode_pil_to_base64` writes."""
REFINER_SWITCH = 0.8            # A1111's UI default of `refiner_switch_at` (its API has none: refiner from the start)


_A1111_PROCESSING = {                  # StableDiffusionProcessing's __init__ arguments the API takes, A1111 1.10
    "prompt": "", "negative_prompt": "", "styles": None, "seed": -1, "subseed": -1, "subseed_strength": 0,
    "seed_resize_from_h": -1, "seed_resize_from_w": -1, "sampler_name": None, "scheduler": None, "batch_size": 1,
    "n_iter": 1, "steps": 50, "cfg_scale": 7.0, "width": 512, "height": 512, "restore_faces": None, "tiling": None,
    "do_not_save_samples": False, "do_not_save_grid": False, "eta": None, "denoising_strength": None,
    "s_min_uncond": None, "s_churn": None, "s_tmax": None, "s_tmin": None, "s_noise": None,
    "override_settings": None, "override_settings_restore_afterwards": True, "refiner_checkpoint": None,
    "refiner_switch_at": None, "disable_extra_networks": False, "firstpass_image": None, "comments": None,
}
_A1111_API_FIELDS = {                  # the fields modules/api/models.py adds to both request models
    "sampler_index": "Euler", "script_name": None, "script_args": [], "send_images": True, "save_images": False,
    "alwayson_scripts": {}, "force_task_id": None, "infotext": None,
}
A1111_TXT2IMG_FIELDS = {
    **_A1111_PROCESSING, "enable_hr": False, "denoising_strength": 0.75, "firstphase_width": 0,
    "firstphase_height": 0, "hr_scale": 2.0, "hr_upscaler": None, "hr_second_pass_steps": 0, "hr_resize_x": 0,
    "hr_resize_y": 0, "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_scheduler": None, "hr_prompt": "",
    "hr_negative_prompt": "", **_A1111_API_FIELDS,
}
"""A1111's `StableDiffusionTxt2ImgProcessingAPI`: every field and its default."""
A1111_IMG2IMG_FIELDS = {
    **_A1111_PROCESSING, "init_images": None, "resize_mode": 0, "denoising_strength": 0.75, "image_cfg_scale": None,
    "mask": None, "mask_blur_x": 4, "mask_blur_y": 4, "mask_blur": None, "mask_round": True, "inpainting_fill": 0,
    "inpaint_full_res": True, "inpaint_full_res_padding": 0, "inpainting_mask_invert": 0,
    "initial_noise_multiplier": None, "latent_mask": None, **_A1111_API_FIELDS, "include_init_images": False,
}
"""A1111's `StableDiffusionImg2ImgProcessingAPI`: every field and its default."""


class Txt2ImgIn(NullsAreDefaults):
    """The fields sdlab uses; any other A1111 field is accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    _sent_nulls: frozenset[str] = PrivateAttr(default=frozenset())   # the fields sent as null (`_echo`)
    _infotext_labels: dict[str, str] = PrivateAttr(default_factory=dict)  # filled by `_with_infotext`: their labels

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    eta: float | None = None
    s_noise: float | None = None           # None: the option's (`_sigma_options`)
    s_churn: float | None = None
    s_tmin: float | None = None
    s_tmax: float | None = None
    s_min_uncond: float | None = None       # A1111's NGMS; None: the option's (`_guidance_settings`)
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_w: int = -1            # A1111's "Seed resize from"; 0 or less on either side: off
    seed_resize_from_h: int = -1
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_sampler_name: str | None = None      # the second pass's own sampler, scheduler and prompts; None / "": the
    hr_scheduler: str | None = None         # first pass's ("Use same sampler" / "Use same scheduler" too)
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    hr_cfg: float | None = None             # Forge's: the second pass's CFG scale (hr_cfg_scale); unset: the first's
    tiling: bool | None = None              # None: the `tiling` option (A1111's opts.tiling), False by default
    refiner_checkpoint: str | None = None   # a model of `sd-models` that finishes the schedule; "None": none
    refiner_switch_at: float | None = None  # the fraction drawn before it (A1111's `apply_refiner`); unset: 0.8
    denoising_strength: float | None = 0.75   # A1111's API default (StableDiffusionProcessing*); its UI's is 0.7
    send_images: bool = True
    styles: list[str] = Field(default_factory=list)     # prompt styles by name (`--styles-file`, `_styled`)
    override_settings: dict[str, Any] = Field(default_factory=dict)
    override_settings_restore_afterwards: bool = True     # False: the overrides stay, as `POST options` sets them
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)     # controlnet, A1111's own (`alwayson`)
    script_name: str | None = None          # a selectable script (`a1111_scripts`); none: the request alone
    script_args: list[Any] = Field(default_factory=list)   # its `Script.run` args; unset: [] (its defaults)
    disable_extra_networks: bool = False    # True: the prompts' <kind:...> tags drawn as no text, none applied, but
                                            # recorded (A1111's infotext and info keep them)
    infotext: str | None = None             # a parameters text: the fields left unset read from it (`_with_infotext`)

    @model_validator(mode="wrap")
    @classmethod
    def _note_nulls(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Txt2ImgIn:
        """The body, knowing which fields were sent as null (they take their defaults, but A1111 echoes null)."""
        body = handler(data)
        if isinstance(data, dict):
            body._sent_nulls = frozenset(key for key, value in data.items() if value is None)
        return body


class Img2ImgIn(Txt2ImgIn):
    init_images: list[str] = Field(default_factory=list)
    resize_mode: int = 0                    # `RESIZE_LABELS`
    mask: str | None = None
    mask_blur: int | float | None = None    # set: both sigmas (A1111's setter); None: mask_blur_x / mask_blur_y
    mask_blur_x: int | float = 4            # A1111's are ints (its "Mask blur" label too); sdlab takes fractions
    mask_blur_y: int | float = 4
    inpainting_mask_invert: int = 0         # 1: Mask mode "Inpaint not masked"
    mask_round: bool = True                 # false: the mask's levels kept where A1111 rounds them
    latent_mask: str | None = None          # with a mask a 422 (`_picture_options`); without one ignored, as A1111
    initial_noise_multiplier: float | None = None   # None: A1111's option's default, 1
    image_cfg_scale: float | None = None    # an edit (InstructPix2Pix) model's Image CFG scale; None: none (as 1)
    inpainting_fill: int = 0                # Masked content, `MASKED_CONTENT`: 0 fill (A1111's API default)
    inpaint_full_res: bool = True           # Inpaint area: true "Only masked" (A1111's API default), false whole
    inpaint_full_res_padding: int = 0
    include_init_images: bool = False


RESIZE_LABELS = ("Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)")
"""A1111's img2img resize modes 0..3 (sdlab's `RESIZE_MODES`)."""


def _choice(value: int, names: tuple[str, ...], labels: tuple[str, ...], field: str) -> str:
    """sdlab's name (of `names`) of A1111's index `value` of `field`; another value is a 422 naming them."""
    if 0 <= value < len(names):
        return names[value]
    valid = ", ".join(f"{index} ({label})" for index, label in enumerate(labels))
    raise BadRequest(f"{field} must be {valid}; got {value}", 422)


def _picture_options(body: Img2ImgIn, masked: bool, noise_option: float) -> dict[str, Any]:
    """The request fields of A1111's resize mode, noise multiplier (unset: the option's, `noise_option`) and,
    with a mask, its Masked content and Inpaint area."""
    resize_mode = _choice(body.resize_mode, RESIZE_MODES, RESIZE_LABELS, "resize_mode")
    noise = noise_option if body.initial_noise_multiplier is None else body.initial_noise_multiplier
    if not masked:
        return {"resize_mode": resize_mode, "noise_multiplier": noise}
    if body.inpaint_full_res_padding < 0:
        raise BadRequest(f"inpaint_full_res_padding must be >= 0, got {body.inpaint_full_res_padding}", 422)
    if body.latent_mask is not None:        # A1111's API leaves it a base64 string, which its `init` fails on
        raise BadRequest("latent_mask is not drawn: A1111's API does not decode it and fails on it with a mask; "
                         "send the mask as mask", 422)
    blur_x, blur_y = (body.mask_blur_x, body.mask_blur_y) if body.mask_blur is None else (body.mask_blur,) * 2
    return {"resize_mode": resize_mode, "noise_multiplier": noise, "inpaint_only_masked": body.inpaint_full_res,
            "inpaint_fill": _choice(body.inpainting_fill, MASKED_CONTENT, MASKED_CONTENT, "inpainting_fill"),
            "inpaint_padding": body.inpaint_full_res_padding, "mask_blur": blur_x, "mask_blur_y": blur_y,
            "invert_mask": bool(body.inpainting_mask_invert), "mask_round": body.mask_round}


def _batch_size(body: Txt2ImgIn, inits: tuple[Image.Image, ...]) -> int:
    """A1111's batch size of `body` with the init pictures `inits`: one per picture when there are several
    (`StableDiffusionProcessingImg2Img.init`; more than `batch_size` of them: `_check_init_count`)."""
    return len(inits) if len(inits) > 1 else body.batch_size


def _check_init_count(body: Img2ImgIn, limits: Limits) -> None:
    """A1111's 422 for more init pictures than `batch_size` (`StableDiffusionProcessingImg2Img.init`), and
    `--max-batch`'s refusal of the batch they make, from their count alone: each may decode to 4 x
    `--max-pixels`, so none is decoded for a request that is refused."""
    count = len(body.init_images)
    if count > body.batch_size:
        raise BadRequest(f"bad number of images passed: {count}; expecting {body.batch_size} or less", 422)
    if count > limits.max_batch:
        raise BadRequest(f"at most {limits.max_batch} images per batch on this server (--max-batch), got {count}")


def _hires_pass(body: Txt2ImgIn, sampler: str) -> dict[str, Any]:
    """The hires pass's own sampler, schedule and prompts of `body` as A1111 draws them (`sample_hr_pass`:
    `hr_sampler_name or sampler_name`; `hr_scheduler`, unset the request's `scheduler`, "Automatic" the hires
    sampler's own: `KDiffusionSampler.get_sigmas`), and Forge's `hr_cfg`: the second pass's CFG scale as sent (Forge's
    `sample_hr_pass` draws with it, at 1 without the negative: the same picture), unset A1111's first pass's."""
    named = body.hr_sampler_name not in (None, "", "Use same sampler")
    scheduled = body.hr_scheduler not in (None, "", "Use same scheduler")
    hr_sampler, hr_schedule = sampler_and_schedule(body.hr_sampler_name if named else sampler,
                                                   body.hr_scheduler if scheduled else body.scheduler)
    return {"hr_sampler": hr_sampler if named else None,
            "hr_schedule": a1111_schedule(hr_sampler, hr_schedule) if named or scheduled else None,
            "hr_prompt": body.hr_prompt, "hr_negative_prompt": body.hr_negative_prompt, "hr_cfg_scale": body.hr_cfg}


def _styled(body: Txt2ImgIn, styles: StyleDatabase | None) -> Txt2ImgIn:
    """`body` with its `styles` applied to its prompts, the hires ones too, as A1111's `setup_prompts` does before
    anything reads them; a name no styles file has is an empty style (A1111's `no_style`), logged."""
    if not body.styles:
        return body
    styles = styles or StyleDatabase()
    if unknown := styles.unknown(body.styles):
        logger.warning("styles %s: no styles file of this server has them; drawn without them, as A1111 draws",
                       ", ".join(map(repr, unknown)))
    texts = {key: getattr(body, key) for key in PROMPT_FIELDS if hasattr(body, key)}
    return body.model_copy(update=styled_options(texts, styles, body.styles))


def _request(body: Txt2ImgIn, controls: tuple = (), inits: tuple[Image.Image, ...] = (),
             mask: Image.Image | None = None, options: dict[str, Any] | None = None,
             styles: StyleDatabase | None = None) -> GenerationRequest:
    """The generation `body` asks for, with A1111's settings: the server's `options` (`POST options`) under
    the request's `override_settings` (A1111 sets those for the one request). Several init pictures `inits`
    draw one picture each, in every iteration (A1111's `init_images`); the `n_iter` iterations are the job's
    batch count (`_drawn_job`). The overrides are checked as `POST options` checks options, whether or not they
    stay afterwards. The request's `styles` (of `styles`) are applied to its prompts first (`_styled`). `controls`
    are the request's ControlNet units (`a1111_controls`): its ControlNets and its IP-Adapters."""
    body = _styled(body, styles)
    _check_options(body.override_settings, "override_settings.")
    settings = {**OPTION_DEFAULTS, **(options or {}), **body.override_settings}
    _check_tile_pair(settings, "override_settings.")
    if body.batch_size < 1 or not 1 <= body.n_iter <= MAX_BATCH_COUNT:
        raise BadRequest(f"batch_size must be >= 1 and n_iter 1..{MAX_BATCH_COUNT}, got {body.batch_size} and "
                         f"{body.n_iter}", 422)
    sampler, schedule = sampler_and_schedule(body.sampler_name or body.sampler_index or DEFAULT_SAMPLER, body.scheduler)
    if schedule is not None:                        # A1111's timestep samplers ignore it; unset: `_drawn_job`
        schedule = a1111_schedule(sampler, schedule)
    extra: dict[str, Any] = {}
    if body.subseed_strength:
        extra.update(subseed=None if body.subseed == -1 else body.subseed, subseed_strength=body.subseed_strength)
    if body.enable_hr and not inits:             # A1111's hires fix: a second pass at a larger size
        extra.update(hr_scale=body.hr_scale, hr_width=body.hr_resize_x or None, hr_height=body.hr_resize_y or None,
                     hr_upscaler=body.hr_upscaler or None, hr_steps=body.hr_second_pass_steps or None,
                     hr_denoise=body.denoising_strength, hr_upscaler_tile=settings["ESRGAN_tile"],
                     hr_upscaler_tile_overlap=settings["ESRGAN_tile_overlap"], **_hires_pass(body, sampler))
        extra.update(_hires_eta(body, settings, sampler, extra["hr_sampler"]))
    if inits:
        strength = 0.75 if body.denoising_strength is None else body.denoising_strength
        # A1111 reads initial_noise_multiplier as it makes the processing object, before the overrides apply
        noise = {**OPTION_DEFAULTS, **(options or {})}["initial_noise_multiplier"]
        steps_rule = _img2img_steps_rule(settings, sampler)
        extra.update(init_image=inits[0], init_images=inits if len(inits) > 1 else (), strength=strength,
                     img2img_convention=steps_rule, size_convention="a1111", image_cfg_scale=body.image_cfg_scale,
                     **_picture_options(body, mask is not None, noise))
        if mask is not None:
            extra.update(mask_image=mask)
    request = GenerationRequest(
        prompt=body.prompt, negative_prompt=body.negative_prompt, steps=body.steps, sampler=sampler,
        schedule=schedule, cfg_scale=body.cfg_scale, seed=body.seed, width=body.width, height=body.height,
        batch_size=_batch_size(body, inits), control_convention="a1111", **_prompt_settings(settings),
        clip_skip=settings["CLIP_stop_at_last_layers"], clip_skip_convention="a1111", eta=_eta(body, settings, sampler),
        sdxl_clip_l_skip=settings["sdxl_clip_l_skip"],
        **_sigma_options(body, settings, sampler), **_schedule_settings(settings), **_noise_settings(settings),
        controls=tuple(c for c in controls if not isinstance(c, IPAdapterInput)),
        ip_adapters=tuple(c for c in controls if isinstance(c, IPAdapterInput)), **alwayson_pag(body.alwayson_scripts),
        **_ensd(settings), rng=settings["randn_source"],
        seed_resize_from_w=body.seed_resize_from_w, seed_resize_from_h=body.seed_resize_from_h,
        tiling=settings["tiling"] if body.tiling is None else body.tiling, **_sdxl_options(settings), **extra,
        **_token_merging(settings, body.override_settings, img2img=bool(inits), hires=body.enable_hr),
        **_guidance_settings(body, settings), **_unipc_settings(settings),
    )
    return dataclasses.replace(request, freeu=_alwayson_freeu(body, request, bool(inits)))


def _alwayson_freeu(body: Txt2ImgIn, request: GenerationRequest, img2img: bool) -> dict[str, Any] | None:
    """The FreeU of the request's `alwayson_scripts` (`alwayson_freeu`), checked against the run sd-webui-freeu's
    step counter counts: A1111's sampling steps (txt2img the steps, img2img t_enc + 1: `steps_run`'s) and the model
    calls of the pass (`plan.a1111_model_calls`) on the schedule A1111 runs its sampler on; steps left to the model
    (None), or a strength or steps the request's own checks refuse, leave the run unknown, and those checks name
    them."""
    run = dataclasses.replace(request, schedule=a1111_schedule(request.sampler, request.schedule))
    if run.steps is None:
        return alwayson_freeu(body.alwayson_scripts, hires=body.enable_hr and not img2img)
    try:
        steps = steps_run(run.steps, run.strength, run.img2img_convention)[1] if img2img else run.steps
        calls = a1111_model_calls(get_sampler(run.sampler), run, img2img)
    except (ValueError, OverflowError, RequestError):      # OverflowError: steps past a float's range (10**400)
        steps = calls = None
    return alwayson_freeu(body.alwayson_scripts, steps, calls, hires=body.enable_hr and not img2img)


def _token_merging(settings: dict[str, Any], overrides: dict[str, Any], img2img: bool,
                   hires: bool) -> dict[str, float]:
    """A1111's token merging ratios (`get_token_merging_ratio`, its API setting no processing field): txt2img's
    `token_merging_ratio` and, with the hires fix, the hires pass's `token_merging_ratio_hr` (0: the first pass's,
    the request's rule; without the hires fix A1111 never reads that setting, so it is not sent);
    img2img's `token_merging_ratio` where the request overrides it, else `token_merging_ratio_img2img`, else
    `token_merging_ratio` (A1111's StableDiffusionProcessingImg2Img: an override of the txt2img option wins)."""
    if not img2img:
        ratios = {"token_merging_ratio": float(settings["token_merging_ratio"])}
        if hires:
            ratios["token_merging_ratio_hr"] = float(settings["token_merging_ratio_hr"])
        return ratios
    ratio = ("token_merging_ratio" in overrides and settings["token_merging_ratio"]) or \
        settings["token_merging_ratio_img2img"] or settings["token_merging_ratio"]
    return {"token_merging_ratio": float(ratio)}


A1111_SIGMA_OPTIONS = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0}
"""k-diffusion's churn and s_noise, each with the value A1111's `Sampler` holds as its default."""
A1111_SAMPLER_EXTRA_PARAMS = {
    **dict.fromkeys(("Euler", "Heun", "DPM2"), tuple(A1111_SIGMA_OPTIONS)),
    **dict.fromkeys(("DPM fast", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun",
                     "DPM++ 3M SDE"), ("s_noise",)),
}
"""A1111 1.10's `sampler_extra_params` by its samplers' names: the options each sampler's function is given."""


def _sigma_options(body: Txt2ImgIn, settings: dict[str, Any], sampler: str) -> dict[str, float | None]:
    """The churn and s_noise A1111 draws `sampler` with (`Sampler.initialize`): only those of its
    `sampler_extra_params` (any its function takes, for a sampler A1111 does not have), each the option's value
    where that is not the default, else the request's field (None: the option's; `s_tmax` 0 is inf)."""
    taken = A1111_SAMPLER_EXTRA_PARAMS.get(sampler, () if sampler in SAMPLERS else tuple(A1111_SIGMA_OPTIONS))
    chosen = {}
    for name in taken:
        default, field = A1111_SIGMA_OPTIONS[name], getattr(body, name)
        option = settings.get(name, default)
        value = option if _or_inf(name, option) != default or field is None else field
        value = float(_or_inf(name, value))
        chosen[name] = None if name == "s_tmax" and value == math.inf else value     # the request's s_tmax None: inf
    return chosen


A1111_NOISE_SCHEDULES = {"Default": False, "Zero Terminal SNR": True}
"""A1111's `sd_noise_schedule` choices -> the request's `zero_terminal_snr`."""


def _prompt_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """A1111's `emphasis` and `use_old_scheduling` (how the prompt is read and its edits scheduled) and its
    `use_downcasted_alpha_bar` and `sd_noise_schedule` (the alphas_cumprod it samples on,
    `apply_alpha_schedule_override`) options as request fields; A1111 reads them as it draws."""
    return dict(emphasis=settings["emphasis"], old_prompt_editing=settings["use_old_scheduling"],
                downcast_alphas_cumprod=settings["use_downcasted_alpha_bar"],
                zero_terminal_snr=A1111_NOISE_SCHEDULES[settings["sd_noise_schedule"]])


def _schedule_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """A1111's `sigma_min`, `sigma_max`, `rho`, `always_discard_next_to_last_sigma` and
    `use_old_karras_scheduler_sigmas` options as request fields (`KDiffusionSampler.get_sigmas` reads them from the
    options only; 0 = the model's / the schedule's). The old Karras ends, 0.1 and 10, stand where `sigma_min` /
    `sigma_max` leave them, which only the model's ends tell (an option equal to its own end is left out):
    `plan.a1111_schedule_ends` resolves them."""
    return dict(schedule_sigma_min=settings.get("sigma_min", 0.0),
                schedule_sigma_max=settings.get("sigma_max", 0.0),
                old_karras_sigmas=settings.get("use_old_karras_scheduler_sigmas", False),
                schedule_rho=settings.get("rho", 0.0),
                discard_penultimate_sigma=settings.get("always_discard_next_to_last_sigma", False),
                beta_alpha=settings["beta_dist_alpha"], beta_beta=settings["beta_dist_beta"])


def _noise_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """A1111's `sgm_noise_multiplier` (txt2img's start noise, `KDiffusionSampler.sample`), `img2img_extra_noise`
    (img2img's and the hires pass's, `sample_img2img`) and `inpainting_mask_weight` (an inpainting model's masked
    picture, `inpainting_image_conditioning`) options as request fields; A1111 reads them as it draws, so a
    request's `override_settings` count."""
    return dict(sgm_noise_multiplier=settings["sgm_noise_multiplier"], extra_noise=settings["img2img_extra_noise"],
                inpainting_mask_weight=settings["inpainting_mask_weight"])


GUIDANCE_OPTIONS = ("s_min_uncond_all", "skip_early_cond", "pad_cond_uncond", "pad_cond_uncond_v0")
"""A1111's guidance options that are request fields of the same name (`_guidance_settings`)."""


def _guidance_settings(body: Txt2ImgIn, settings: dict[str, Any]) -> dict[str, Any]:
    """A1111's guidance options as request fields: NGMS the request's `s_min_uncond`, else the `s_min_uncond` option
    (`fill_fields_from_opts`, after the overrides apply), off (0) where it is not above 0 (A1111 takes any number
    and switches NGMS on with `s_min_uncond > 0`); `GUIDANCE_OPTIONS` the options (`CFGDenoiser.forward`)."""
    ngms = settings["s_min_uncond"] if body.s_min_uncond is None else body.s_min_uncond
    return dict(s_min_uncond=ngms if ngms > 0 else 0.0, **{name: settings[name] for name in GUIDANCE_OPTIONS})


def _or_inf(name: str, value: float) -> float:
    """A1111's `s_tmax` 0 means inf (`processing`, `Sampler.initialize`); other values are as they are."""
    return (value or math.inf) if name == "s_tmax" else value


def _sdxl_options(settings: dict[str, Any]) -> dict[str, Any]:
    """A1111's SDXL options as request fields, as its `sd_models_xl.get_learned_conditioning` conditions every
    SDXL pass (base, refiner, hires) with them: the crop corner (`sdxl_crop_top`, `sdxl_crop_left`) of the
    prompt and the negative, and the aesthetic scores a refiner takes, the high one the prompt's and the low
    one the negative's."""
    corner = (settings["sdxl_crop_top"], settings["sdxl_crop_left"])
    return dict(crops_coords_top_left=corner, negative_crops_coords_top_left=corner,
                aesthetic_score=settings["sdxl_refiner_high_aesthetic_score"],
                negative_aesthetic_score=settings["sdxl_refiner_low_aesthetic_score"])


def _img2img_steps_rule(settings: dict[str, Any], sampler: str) -> str:
    """img2img's step rule under A1111's options `settings`: `img2img_fix_steps` on, A1111's fixed steps; off
    (its default), A1111's `setup_img2img_steps`, or ComfyUI's denoise for a sampler spelt as ComfyUI spells it,
    as on every route (`request.img2img_convention_asked`)."""
    if settings["img2img_fix_steps"]:
        return "a1111_fix_steps"
    return "comfyui" if comfyui_spelling(sampler) else "a1111"


def _eta(body: Txt2ImgIn, settings: dict[str, Any], sampler: str) -> float | None:
    """The eta A1111 draws `sampler` with (`Sampler.initialize`: `p.eta`, else the option of the label the sampler
    writes its eta under, `ETA_OPTIONS`): the request's, else the option, left unset at its default (the sampler's
    own: DDIM's 0, the ancestral and SDE samplers' 1)."""
    option = ETA_OPTIONS.get(eta_label(sampler)[0])
    if body.eta is not None or option is None or settings[option] == OPTION_DEFAULTS[option]:
        return body.eta
    return settings[option]


def _hires_eta(body: Txt2ImgIn, settings: dict[str, Any], sampler: str, hr_sampler: str | None) -> dict[str, Any]:
    """The eta A1111 draws a hires sampler of its own with (`_eta`, as the second pass initializes it) as `hr_eta`
    where it is not the first pass's: a hires DDIM's `eta_ddim` behind an ancestral sampler, a hires ancestral
    sampler's `eta_ancestral` (or its default) behind a DDIM."""
    second = _eta(body, settings, hr_sampler) if hr_sampler else None
    if hr_sampler is None or second == _eta(body, settings, sampler):
        return {}
    return {"hr_eta": get_sampler(hr_sampler).default_eta if second is None else second}


def _unipc_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """A1111's `uni_pc_variant`, `uni_pc_order` and `uni_pc_lower_order_final` options as request fields (its
    `unipc` reads them as it draws; `uni_pc_skip_type` sdlab takes only at its default, `_check_options`)."""
    return dict(unipc_variant=settings["uni_pc_variant"], unipc_order=settings["uni_pc_order"],
                unipc_lower_order_final=settings["uni_pc_lower_order_final"])


def _ensd(settings: dict[str, Any]) -> dict[str, int]:
    """The `eta_noise_seed_delta` option as a request field, left unset at 0 (A1111's default) so that the
    request's rule holds, as on every route: 1 for a ComfyUI-spelt sampler that draws step noise, else 0."""
    ensd = settings["eta_noise_seed_delta"]
    return {"eta_noise_seed_delta": ensd} if ensd else {}


def _given(body: Txt2ImgIn) -> set[str]:
    """The `GenerationRequest` fields the client set (pydantic's `model_fields_set`, A1111's names mapped):
    the others take the model's preset when its file names one, then the defaults."""
    names = {"sampler_name": "sampler", "sampler_index": "sampler", "scheduler": "schedule", "steps": "steps",
             "cfg_scale": "cfg_scale", "eta": "eta"}
    given = {names[key] for key in body.model_fields_set & names.keys() if getattr(body, key) not in (None, "")}
    return given | ({"schedule"} if "sampler" in given else set())   # "DPM++ 2M Karras" names it; unset = None


def _job_spec(service: Service, body: Txt2ImgIn, request: GenerationRequest) -> tuple[JobSpec, str | None]:
    """The job of `request` (drawn from `body`) and the model it names (None: the selected one); its
    `disable_extra_networks` draws the prompts without their tags, recorded with them (`JobSpec.extra_networks`)."""
    overrides = _drawable_overrides(service, body.override_settings)
    switch_at = REFINER_SWITCH if body.refiner_switch_at is None else body.refiner_switch_at
    spec = JobSpec(request, batch_count=body.n_iter, model_preset_fills=unset_preset_fields(_given(body), request),
                   unset_schedule=a1111_schedule(request.sampler, None),
                   **_vae_fields(_vae_choice(service, {**service.options, **overrides})),
                   refiner=refiner_choice(body.refiner_checkpoint, switch_at, "a1111", "refiner_switch_at"),
                   extra_networks=not body.disable_extra_networks)
    return spec, overrides.get("sd_model_checkpoint")


def _a1111_refusal(err: BadRequest, where: str = "") -> BadRequest:
    """`err` in A1111's field names, its message after `where`."""
    detail = _a1111_named(err.detail) if err.detail == err.message else err.detail
    return BadRequest(where + _a1111_named(err.message), err.status, where + detail if where else detail)


async def _drawn_job(service: Service, body: Txt2ImgIn, mode: str, request: GenerationRequest,
                     run: ScriptRun | None = None) -> Job:
    """The job of `request` (drawn from `body`, for the script `run` if any) once it is done; failed or
    interrupted, A1111's error."""
    spec, model = _job_spec(service, body, request)
    if run is not None and run.job_of is not None:
        spec, model = run.job_of(body, spec, model)
    kept = {} if body.override_settings_restore_afterwards else _drawable_overrides(service, body.override_settings)
    selected = await asyncio.to_thread(_selected_model, service, kept) if kept else None     # checked: `_request`
    if kept:
        _check_kept_options(service, kept, "override_settings: ")
    try:
        job, _ = await asyncio.to_thread(service.submit, spec, mode, model,
                                         on_queued=None if run is None else run.follow)
    except BadRequest as err:
        raise _a1111_refusal(err) from None
    if run is not None:
        run.queued += 1
        if run.on_job is not None:
            run.on_job(run, job)
    if kept:                            # A1111's `process_images` restores them only when asked to
        _set_options(service, kept, selected)
    await _until_finished(job)
    if job.status == "interrupted":
        raise Unavailable(job.error)
    if job.status == "failed":
        raise BadRequest(_a1111_named(job.error or "failed"), 500 if job.server_fault else 400)
    return job


async def _generate(service: Service, body: Txt2ImgIn, mode: str, request: GenerationRequest) -> dict[str, Any]:
    """A1111's answer to `request` drawn from `body`."""
    return _answer(service, body, request, await _named_job(service, body, mode, request))


async def _named_job(service: Service, body: Txt2ImgIn, mode: str, request: GenerationRequest,
                     run: ScriptRun | None = None) -> Job:
    """`_drawn_job`, a refusal naming a field the `infotext` filled by its label (`_named_by_infotext`)."""
    with _named_by_infotext(body):
        return await _drawn_job(service, body, mode, request, run)


def _answer(service: Service, body: Txt2ImgIn, request: GenerationRequest, job: Job) -> dict[str, Any]:
    """A1111's `{images, parameters, info}` of a done job."""
    images = []
    if body.send_images:
        options = _options(service)         # as A1111 encodes: after the request's overrides are restored
        images = [_stored_picture(service.images_dir / name, text, options)
                  for name, text in zip(job.images, job.infotexts)]
    return {"images": images, "parameters": _echo(body), "info": json.dumps(_job_info(service, body, request, job))}


def _job_info(service: Service, body: Txt2ImgIn, request: GenerationRequest, job: Job) -> dict[str, Any]:
    """A1111's `info` of a done job (`_info`), with the extra generation parameters it drew with."""
    checkpoint = service.registry.find(job.model)
    name = checkpoint.name_for_extra if checkpoint is not None else job.model
    extra = {**_drawn_parameters(job, request), **_refiner_parameters(service, job)}
    extra.update({label: value for label, value in _written_extra_parameters(job).items() if label not in extra})
    inpainting = uses_inpainting_conditioning(_model_family(service, job.model), _drawn_request(job, request))
    return _info(job, body, name, extra, batch_size=request.batch_size, inpainting=inpainting)


ScriptJobOf = Callable[[Txt2ImgIn, JobSpec, "str | None"], "tuple[JobSpec, str | None]"]
"""(a script's request body, its job and model as the route makes them) -> the job and model it draws."""


@dataclasses.dataclass
class ScriptRun:
    """A selectable script's requests drawn as A1111 runs a script, one task: `job_counts` each request's A1111
    jobs (`_a1111_jobs`; `/progress` counts over them all, A1111's `state.job_count`), `drawn` the requests done,
    `job` the one drawing, `interrupted` set by `/interrupt` (A1111's `state.interrupted`: no later request
    is drawn)."""

    job_counts: list[int]
    drawn: int = 0
    job: Job | None = None
    interrupted: bool = False
    queued: int = 0                         # the requests that got a job
    on_job: Callable[[ScriptRun, Job], None] | None = None     # told of each request's job as it is queued
    job_of: ScriptJobOf | None = None       # each request's job in place of the route's (`_script_host`)

    def follow(self, job: Job) -> None:
        """`job` is this run's drawing request (as it is queued, before it can run: `JobQueue.submit`)."""
        self.job = job

    def progress(self, job_no: int) -> tuple[int, int, str]:
        """A1111's (job_count, job_no, job) with the drawing request at its own `job_no`."""
        done = sum(self.job_counts[:self.drawn]) + job_no
        return sum(self.job_counts), done, f"{self.drawn + 1} out of {len(self.job_counts)}"


def _script_host(service: Service, prepare: Callable[[Service, Any], Any],
                 on_job: Callable[[ScriptRun, Job], None] | None = None,
                 job_of: ScriptJobOf | None = None) -> ScriptHost:
    """What a selectable script draws with: its requests as `prepare` (`_txt2img_request`, `_img2img_request`)
    makes the first one, the others with its pictures and ControlNet units (a script changes neither), each
    checked as the route checks it before any is drawn, then drawn in turn on this server as one `ScriptRun`
    (`on_job` told of each request's job, `job_of` making each request's job from the route's), a request the
    script gives its own pictures with those."""
    async def checked(bodies: list[Txt2ImgIn],
                      labels: list[str]) -> tuple[str, list[tuple[JobSpec, GenerationRequest]]]:
        mode, first = await prepare(service, bodies[0])
        requests = [await _checked_request(service, body, mode, first, label, job_of)
                    for body, label in zip(bodies, labels)]
        _check_script_pictures([spec for spec, _ in requests], service.config.limits)
        return mode, requests

    async def check(bodies: list[Txt2ImgIn], labels: list[str]) -> None:
        await checked(bodies, labels)

    runs: list[ScriptRun] = []

    async def drawn(bodies: list[Txt2ImgIn], labels: list[str], keep_going: bool,
                    pictures: ScriptPictures | None = None, seeds: ScriptSeeds | None = None) -> list[Drawn | None]:
        mode, requests = await checked(bodies, labels)
        run = ScriptRun([_a1111_job_count(spec) for spec, _ in requests], on_job=on_job, job_of=job_of)
        runs.append(run)
        service.script_runs.append(run)
        try:
            return await _script_drawn(service, run, bodies, mode, [request for _, request in requests], keep_going,
                                       pictures, seeds)
        finally:
            service.script_runs.remove(run)

    async def init_pictures(body: Txt2ImgIn) -> tuple[Image.Image, ...]:
        _, first = await prepare(service, body)
        return first.init_pictures()

    async def upscaled(image: Image.Image, name: str, scale: float) -> Image.Image:
        return await asyncio.to_thread(_script_upscaled, service, image, name, scale)

    def listed_upscaler(name: str) -> str:
        return _listed_upscaler(name, upscaler_file(name, service.upscalers, SCRIPT_UPSCALER))

    def checkpoint_title(name: str) -> str | None:
        found = _closest_checkpoint(service, name)
        return None if found is None else found.title

    async def restore_model() -> None:
        try:
            await asyncio.to_thread(service.host.between_jobs, lambda: _load_selected(service))
        except Exception as err:        # the plot is drawn: its answer stands, the next job loads the model
            logger.error("the selected model was not loaded again after the script: %s", err)

    return ScriptHost(drawn, check, lambda image, text: _base64_picture(image, text, _options(service)), _echo,
                      return_grid=bool(_options(service).get("return_grid", True)),
                      upscalers=lambda: upscaler_names(service),
                      listed_upscaler=listed_upscaler, upscaled=upscaled, init_pictures=init_pictures,
                      max_images=service.config.limits.max_images, checkpoint_title=checkpoint_title,
                      vae_names=service.registry.vaes.names, restore_model=restore_model,
                      queued=lambda: any(run.queued for run in runs))


def _check_script_pictures(specs: list[JobSpec], limits: Limits) -> None:
    """`--max-images` over every picture a script's requests draw (each its batch size x n_iter), as over a
    request's batches: the script is one request (A1111 has no such limit)."""
    total = sum(spec.request.batch_size * spec.batch_count for spec in specs)
    if total > limits.max_images:
        raise BadRequest(f"at most {limits.max_images} images per request on this server (--max-images), got "
                         f"{total} from the script's {len(specs)} requests")


def _script_upscaled(service: Service, image: Image.Image, name: str, scale: float) -> Image.Image:
    """`image` through the upscaler `name` by `scale` for a script (A1111's `Upscaler.upscale`, `_upscaled_by`):
    what cannot be done is a 422, a result past 4 x `--max-pixels` a 413."""
    found = upscaler_file(name, service.upscalers, EXTRAS_UPSCALER)
    try:
        return _upscaled_by(service, image, name, found, scale)
    except UpscaleError as err:
        raise BadRequest(str(err), 422) from None


async def _checked_request(service: Service, body: Txt2ImgIn, mode: str, first: GenerationRequest,
                           label: str, job_of: ScriptJobOf | None = None) -> tuple[JobSpec, GenerationRequest]:
    """A script's request `body` (`label` names it in a refusal) with the pictures and units of `first`,
    checked as `service.submit` checks a job, and its job (`job_of`'s, if given)."""
    inits = first.init_images or ((first.init_image,) if first.init_image is not None else ())
    try:
        with _named_by_infotext(body):
            request = _request(body, (*first.controls, *first.ip_adapters), inits, first.mask_image, service.options,
                               service.styles)
            spec, model = _job_spec(service, body, request)
            if job_of is not None:
                spec, model = job_of(body, spec, model)
            await asyncio.to_thread(service.check, spec, mode, model)
    except BadRequest as err:
        raise _a1111_refusal(err, f"{label}: ") from None
    return spec, request


def _pictured_request(service: Service, body: Txt2ImgIn, request: GenerationRequest,
                      pictures: Pictures | tuple[Image.Image, ...]) -> GenerationRequest:
    """A script's request `body` (checked as `request`) on its own `pictures`: init pictures, mask and latent mask
    (`Pictures`), or init pictures alone (the mask and latent mask `request`'s). A ControlNet unit without an
    image takes the first of them, as the extension reads `p.init_images[0]` at each `process_images`."""
    own = pictures if isinstance(pictures, Pictures) else Pictures(tuple(pictures), request.mask_image,
                                                                    request.latent_mask_image)
    with _named_by_infotext(body):
        controls = _controls(service, body, own.init_images[0]) if request.controls or request.ip_adapters else ()
        drawn = _request(body, controls, own.init_images, own.mask, service.options, service.styles)
    return dataclasses.replace(drawn, latent_mask_image=own.latent_mask)


async def _script_drawn(service: Service, run: ScriptRun, bodies: list[Txt2ImgIn], mode: str,
                        requests: list[GenerationRequest], keep_going: bool, pictures: ScriptPictures | None = None,
                        seeds: ScriptSeeds | None = None) -> list[Drawn | None]:
    """Each request drawn in turn (on the pictures `pictures(k, drawn so far)` gives request k, if any, at the
    seed `seeds(k, drawn so far)` gives it, if any), None
    after `run` is interrupted (an interrupted job too interrupts it), for one `pictures` leaves undrawn
    (`NOT_DRAWN`) and, when `keep_going`, for one that fails before its job runs (logged, as A1111's X/Y/Z plot
    draws a blank cell); a job that fails, when `keep_going`, is drawn without pictures (A1111's `Processed(p, [])`
    of the cell); none drawn and something failed, the first failure."""
    drawn: list[Drawn | None] = []
    failures = []
    for k, (body, request) in enumerate(zip(bodies, requests)):
        job = run.job = None
        if not run.interrupted or not drawn:        # the first is drawn whatever came before it
            try:
                own = pictures(k, drawn) if pictures is not None else None
                if seeds is not None:
                    body = body.model_copy(update={"seed": seeds(k, drawn)})
                    request = dataclasses.replace(request, seed=body.seed)
                if own is not None and own is not NOT_DRAWN:
                    request = _pictured_request(service, body, request, own)
                job = None if own is NOT_DRAWN else await _named_job(
                    service, body, "inpaint" if request.mask_image is not None else mode, request, run)
            except BadRequest as err:
                if not keep_going:
                    raise
                logger.error("a script's request failed, left blank: %s", err.message)
                failures.append(err)
                job = run.job if run.job is not None and run.job.status == "failed" else None
        run.drawn += 1
        run.interrupted = run.interrupted or (job is not None and job.status == "cancelled")
        if job is not None and job.status == "failed":        # A1111's `Processed(p, [])`: no picture
            drawn.append(Drawn([], [], _job_info(service, body, request, job)))
            continue
        drawn.append(None if job is None else Drawn([service.images_dir / name for name in job.images],
                                                    list(job.infotexts), _job_info(service, body, request, job),
                                                    job.skip.is_set()))
    if failures and not any(drawn):
        raise failures[0]
    return drawn


def _drawable_overrides(service: Service, overrides: dict[str, Any]) -> dict[str, Any]:
    """`overrides` without an `sd_model_checkpoint` that names no model of the list: A1111's `process_images`
    drops it and draws with the selected model (logged here)."""
    name = overrides.get("sd_model_checkpoint")
    if not isinstance(name, str) or not name or service.registry.find(name) is not None:
        return overrides
    logger.warning("override_settings.sd_model_checkpoint %r names no model of this server: drawn with the "
                   "selected model, as A1111 draws", name)
    return {key: value for key, value in overrides.items() if key != "sd_model_checkpoint"}


def _echo(body: Txt2ImgIn) -> dict[str, Any]:
    """A1111's `parameters`, `vars(request)` of its request model: what the client sent (null included) over
    the model's defaults (`A1111_TXT2IMG_FIELDS`, `A1111_IMG2IMG_FIELDS`), fields the model lacks left out;
    ControlNet units without their images (`_without_images`), and img2img's init_images and mask only with
    include_init_images, as A1111 answers."""
    fields = A1111_IMG2IMG_FIELDS if isinstance(body, Img2ImgIn) else A1111_TXT2IMG_FIELDS
    sent = {**body.model_dump(include=body.model_fields_set), **dict.fromkeys(body._sent_nulls)}
    echo = {key: sent.get(key, default) for key, default in fields.items()}
    if echo["alwayson_scripts"]:
        echo["alwayson_scripts"] = _without_images(echo["alwayson_scripts"])
    if isinstance(body, Img2ImgIn) and not body.include_init_images:
        echo["init_images"], echo["mask"] = None, None
    return echo


_A1111_FIELDS = {"hr_steps": "hr_second_pass_steps", "hr_denoise": "denoising_strength", "hr_width": "hr_resize_x",
                 "hr_height": "hr_resize_y", "strength": "denoising_strength", "CFG scale": "cfg_scale",
                 "noise multiplier": "initial_noise_multiplier", "mask blur y": "mask_blur_y", "mask blur": "mask_blur",
                 "batch_count": "n_iter"}
"""sdlab's names of the request fields its checks name -> the A1111 fields they come from."""
_SDLAB_FIELD = re.compile(r"\b(hr_steps|hr_denoise|hr_width|hr_height|batch_count)\b"
                          r"|^(strength|CFG scale|noise multiplier|mask blur y|mask blur)\b")
"""The names in an error message: the hires fields' and batch_count anywhere, the others' (words of other senses
too) where the message starts with the field it is about."""


_A1111_STEP_RULES = {" under the a1111_fix_steps convention": " with the option img2img_fix_steps",
                     " under the a1111 convention": ""}
"""sdlab's img2img conventions in an error message -> the A1111 option that chose them (`_request`): none for
A1111's default rule."""


def _a1111_named(message: str) -> str:
    """An error message of sdlab's request checks with the fields named as the A1111 client sent them, and the
    img2img step rule as the option that sets it (`_A1111_STEP_RULES`)."""
    for convention, option in _A1111_STEP_RULES.items():
        message = message.replace(convention, option)
    return _SDLAB_FIELD.sub(lambda m: _A1111_FIELDS[m.group(0)], message)


def _stored_picture(path: os.PathLike, parameters: str, options: dict[str, Any]) -> str:
    """A picture the worker wrote (a PNG with its `parameters` text) in base64, in the options' samples_format
    (`_base64_picture`; a PNG as it was written)."""
    if SAMPLES_FORMATS[options["samples_format"].lower()] == "PNG":
        with open(path, "rb") as file:
            return _b64(file.read())
    with open_image(path) as image:
        return _base64_picture(image, parameters, options)


def _base64_picture(image: Image.Image, parameters: str | None, options: dict[str, Any],
                    texts: dict[str, str] | None = None) -> str:
    """`image` in base64 as A1111's `encode_pil_to_base64` writes it under the options: a PNG with its
    `parameters` text chunk (and one per item of `texts`), or for samples_format jpg / jpeg / webp a JPEG / WebP
    at `jpeg_quality` with the parameters in its EXIF UserComment. A text too long for a JPEG's EXIF block
    (A1111 fails there) is left out, with a logged warning: the picture was drawn, and its PNG in `images/` keeps
    the text."""
    fmt = SAMPLES_FORMATS[options["samples_format"].lower()]
    try:
        return _b64(encode_image(image, fmt, parameters, quality=options["jpeg_quality"], texts=texts))
    except ParametersError:
        logger.warning("the parameters text (%d characters) does not fit a JPEG's 64 KiB EXIF block: the JPEG "
                       "answered goes without it (the PNG in images/ keeps it; samples_format png or webp keeps "
                       "it too)", len(parameters or ""))
        return _b64(encode_image(image, fmt, None, quality=options["jpeg_quality"], texts=texts))


def _drawn_request(job: Job, request: GenerationRequest) -> GenerationRequest:
    """`request`'s pictures with the settings the job drew with (its resolved request, `Job.settings`)."""
    images = {"init_image", "init_images", "mask_image", "controls", "ip_adapters"}
    names = {f.name for f in dataclasses.fields(GenerationRequest)} - images
    return dataclasses.replace(request, **{k: v for k, v in job.settings.items() if k in names})


def _drawn_parameters(job: Job, request: GenerationRequest) -> dict[str, Any]:
    """A1111's `extra_generation_params` of the hires fix and of an img2img job (Denoising strength, Hires
    upscale, Mask blur, Inpaint area, ...: `infotext.hires_parameters` and `img2img_parameters`, as its
    infotext writes them) of the request the job drew (`_drawn_request`)."""
    drawn = _drawn_request(job, request)
    labels = {**hires_parameters(drawn), **img2img_parameters(drawn)}
    return {label: value for label, value in labels.items() if value is not None}


def _model_family(service: Service, title: str) -> FamilySpec | None:
    """The family of the checkpoint `title`: the loaded model's, else its file's as planned from its header
    (`model_shapes.planned_bundle`); None where the file is gone or unreadable."""
    checkpoint = service.registry.find(title)
    if checkpoint is None:
        return None
    bundle = service.host.loaded_bundle(checkpoint) or planned_bundle(checkpoint.path)
    return None if bundle is None else bundle.family


A1111_FIXED_LABELS = frozenset({
    "Prompt", "Negative prompt", "Steps", "Sampler", "CFG scale", "Image CFG scale", "Seed", "Face restoration",
    "Size", "Model hash", "Model", "FP8 weight", "Cache FP16 weight for LoRA", "VAE hash", "VAE", "Variation seed",
    "Variation seed strength", "Seed resize from", "Conditional mask weight", "Clip skip", "ENSD",
    "Token merging ratio", "Token merging ratio hr", "Init image hash", "RNG", "Tiling", "Version", "User",
})
"""The labels of A1111 1.10's `create_infotext` that are fields of its own, not of `p.extra_generation_params`."""
SDLAB_LABELS = frozenset({
    "Clip skip rule", "Empty negative", "Initial noise", "Batch noise", "Img2img steps", "Timestep rounding",
    "Control steps", "Refiner steps", "Hires eta", "Mask blur x", "Mask blur y", "Mask round",
    "SDXL original size", "SDXL target size", "SDXL negative original size", "SDXL negative target size",
    "SDXL crop top", "SDXL crop left", "SDXL negative crop top", "SDXL negative crop left",
    "SDXL aesthetic score", "SDXL negative aesthetic score", "Clip skip SDXL", "Prompt 2", "Negative prompt 2",
    "CFG rescale", "Image guidance",
})
"""The labels sdlab writes of settings A1111 has no label for (its own conventions, SDXL's conditioning and second
prompts, A1111's Clip skip SDXL option, diffusers' guidance rescale, an edit model's no image guidance)."""
NOT_EXTRA_LABELS = A1111_FIXED_LABELS | SDLAB_LABELS
"""The labels `_written_extra_parameters` leaves out."""


A1111_TEXT_LABELS = frozenset({"Schedule type", "Hires upscaler", "Hires checkpoint", "Hires sampler",
                               "Hires schedule type", "Hires prompt", "Hires negative prompt", "Refiner"})
"""The extra labels whose A1111 value is free text (a prompt, a name), which may read as a number."""
_INT = re.compile(r"[-+]?\d+")
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _written_extra_parameters(job: Job) -> dict[str, Any]:
    """A1111's `extra_generation_params` as the job's first picture records them: every label of its text but
    A1111's own fields and sdlab's labels (`Lora hashes`, `ControlNet 0`, `Eta DDIM`, ...: what A1111's
    processing, samplers and extensions add to them), each value typed as A1111's (`_a1111_value`)."""
    return {label: _a1111_value(label, value) for label, value in _first_parameters(job).items()
            if label not in NOT_EXTRA_LABELS}


def _first_parameters(job: Job) -> dict[str, Any]:
    """The parameters the job's first picture records (none without pictures)."""
    return parse_parameters(job.infotexts[0]) if job.infotexts else {}


def _a1111_value(label: str, text: Any) -> Any:
    """A label's value as A1111's processing sets it in `extra_generation_params` (the Python value, which its
    text writes with `str`): a text that reads as an integer, a decimal number or True / False is that number or
    bool (`Sigma churn` 0.5, `NGMS` 2, `Pad conds` true), but for the labels of free text (`A1111_TEXT_LABELS`)."""
    if not isinstance(text, str) or label in A1111_TEXT_LABELS:
        return text
    if text in ("True", "False"):
        return text == "True"
    if _INT.fullmatch(text):
        return int(text)
    return float(text) if _FLOAT.fullmatch(text) else text


def _refiner_parameters(service: Service, job: Job) -> dict[str, Any]:
    """A1111's `extra_generation_params` of a job's refiner (`apply_refiner`): `Refiner` (name [hash]) and
    `Refiner switch at`; none without one or where it never took over (its pictures record none)."""
    settings = job.settings
    refiner = service.registry.find(settings["refiner"]) if settings.get("refiner") else None
    if refiner is None or "Refiner" not in _first_parameters(job):
        return {}
    return {"Refiner": refiner_label(refiner.infotext_name, refiner.hash),
            "Refiner switch at": settings["refiner_switch"]}


async def _until_finished(job: Job) -> None:
    """Wait for the job's final event; cancelled (uvicorn gives up waiting as the server stops) a 503."""
    queue = job.subscribe(asyncio.get_running_loop(), steps=False)
    try:
        while (await queue.get())[0] not in ("done", "failed", "cancelled"):
            pass
    except asyncio.CancelledError:
        raise Unavailable(INTERRUPTED_ERROR) from None
    finally:
        job.unsubscribe(queue)


def _without_images(scripts: dict[str, Any]) -> dict[str, Any]:
    """The scripts' echo with the ControlNet units' images left out (they can be megabytes each)."""
    out = dict(scripts)
    for key, script in scripts.items():
        if key.lower() == "controlnet" and isinstance(script, dict) and isinstance(script.get("args"), list):
            units = [{k: (None if k in ("image", "input_image", "mask") else v) for k, v in unit.items()}
                     if isinstance(unit, dict) else unit for unit in script["args"]]
            out[key] = {**script, "args": units}
    return out


def _info(job: Job, body: Txt2ImgIn, model_name: str, extra: dict[str, Any] | None = None,
          batch_size: int | None = None, inpainting: bool = False) -> dict[str, Any]:
    """A1111's `Processed.js()` fields; `extra`: more of its `extra_generation_params`; `batch_size`: the
    pictures per iteration (None: the body's); `inpainting`: its `is_using_inpainting_conditioning`
    (`infotext.uses_inpainting_conditioning`). `sd_vae_name` / `sd_vae_hash` name a VAE file drawn with (A1111's
    `get_loaded_vae_name` / `_hash`: its name and sha256[:10], the pictures' `VAE` / `VAE hash`), else null."""
    s, extra = job.settings, extra or {}
    count = max(1, s.get("batch_size") or 1) * s.get("batch_count", 1)
    # A1111 (processing.py): all_seeds = seed + i (seed for every picture with a variation seed), all_subseeds
    # = subseed + i, listed for every picture of every iteration even when some were interrupted or skipped;
    # the subseed is the one the job drew with, or without a variation seed the one asked for, drawn at random
    # for -1 (`get_fixed_seed`)
    seeds, subseeds = image_seeds(s, count)
    seeds = job.seeds if len(job.seeds) == count else seeds
    subseed = fixed_seed(body.subseed)
    subseeds = subseeds or [subseed + i for i in range(count)]
    prompts = [s.get("prompt", "")] * count
    written = _first_parameters(job)        # the VAE drawn, as its pictures say
    # A1111 (processing.py Processed): p.denoising_strength, txt2img's too: without the hires fix the request's
    # (0.75 unset, null sent), which the pictures do not record
    strength = (s.get("strength") if job.mode != "txt2img"
                else extra.get("Denoising strength", _echo(body)["denoising_strength"]))
    return {
        "prompt": s.get("prompt", ""), "all_prompts": prompts,
        "negative_prompt": s.get("negative_prompt", ""), "all_negative_prompts": [s.get("negative_prompt", "")] * len(prompts),
        "seed": seeds[0], "all_seeds": seeds, "subseed": subseeds[0], "all_subseeds": subseeds,
        "subseed_strength": s.get("subseed_strength") or 0,
        "width": s.get("width"), "height": s.get("height"), "sampler_name": s.get("sampler"),
        "cfg_scale": s.get("cfg_scale"), "steps": s.get("steps"), "batch_size": batch_size or body.batch_size,
        "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": model_name, "sd_model_hash": _hash_of_title(job.model),
        "sd_vae_name": written.get("VAE"), "sd_vae_hash": written.get("VAE hash"),
        "seed_resize_from_w": s.get("seed_resize_from_w") or -1,
        "seed_resize_from_h": s.get("seed_resize_from_h") or -1,
        "denoising_strength": strength,
        "extra_generation_params": {"Schedule type": a1111_label(s.get("schedule")), **extra},
        "index_of_first_image": 0, "infotexts": job.infotexts, "styles": body.styles, "job_timestamp": _stamp(job.created),
        "clip_skip": s.get("clip_skip", 1), "is_using_inpainting_conditioning": inpainting, "version": version_label(),
        "interrupted": job.status == "cancelled",
    }


def _hash_of_title(title: str) -> str | None:
    return title.rsplit(" [", 1)[1].rstrip("]") if title.endswith("]") and " [" in title else None


def _stamp(t: float) -> str:
    return time.strftime("%Y%m%d%H%M%S", time.localtime(t))


def _infotext_sampler(params: dict[str, Any]) -> tuple[str, str]:
    """A1111's `get_sampler_from_infotext` / `get_scheduler_from_infotext`: the text's sampler, split from an old
    combined name's scheduler, and its scheduler's label, "Automatic" where it is the sampler's own."""
    label = params.get("Schedule type") or "Automatic"
    sampler, schedule = sampler_and_schedule(params.get("Sampler") or A1111_FIRST_SAMPLER,
                                             None if label == "Automatic" else label)
    if schedule is None or schedule == a1111_schedule(sampler, None):
        return sampler, "Automatic"
    return sampler, a1111_label(schedule)


def _infotext_hires_sampler(params: dict[str, Any]) -> tuple[str, str]:
    """A1111's `get_hr_sampler_and_scheduler`: the hires pass's sampler and scheduler as `_infotext_sampler` reads
    them, each "Use same ..." where it is the text's first-pass one."""
    hr_sampler, hr_schedule = params.get("Hires sampler"), params.get("Hires schedule type")
    sampler, scheduler = _infotext_sampler({
        "Sampler": params.get("Sampler") if hr_sampler in (None, "Use same sampler") else hr_sampler,
        "Schedule type": params.get("Schedule type") if hr_schedule in (None, "Use same scheduler") else hr_schedule})
    return (sampler if sampler != params.get("Sampler") else "Use same sampler",
            scheduler if scheduler != params.get("Schedule type") else "Use same scheduler")


@dataclasses.dataclass(frozen=True)
class _PasteField:
    """A1111's `PasteField` of an API field: the infotext label it reads, by `read` where that is not the label's
    value alone."""
    label: str
    read: Callable[[dict[str, Any]], Any] | None = None

    def __call__(self, params: dict[str, Any]) -> Any:
        return params.get(self.label) if self.read is None else self.read(params)


_label = _PasteField


_SCRIPT_PASTE_FIELDS: dict[str, _PasteField] = {   # A1111 1.10's Sampler, Seed and Refiner scripts'
    "steps": _label("Steps"), "sampler_name": _label("Sampler", lambda p: _infotext_sampler(p)[0]),
    "scheduler": _label("Schedule type", lambda p: _infotext_sampler(p)[1]), "seed": _label("Seed"),
    "subseed": _label("Variation seed"),
    "subseed_strength": _label("Variation seed strength"),
    "seed_resize_from_h": _label("Seed resize from-1"),         # crossed, as A1111's Seed script pairs them
    "seed_resize_from_w": _label("Seed resize from-2"),
    "refiner_checkpoint": _label("Refiner"),        # the model it names, A1111's `lookup_checkpoint` (`_with_infotext`)
    "refiner_switch_at": _label("Refiner switch at"),
}
INFOTEXT_FIELDS: dict[str, dict[str, _PasteField]] = {
    "txt2img": {
        "prompt": _label("Prompt"), "negative_prompt": _label("Negative prompt"), "cfg_scale": _label("CFG scale"),
        "width": _label("Size-1"), "height": _label("Size-2"), "batch_size": _label("Batch size"),
        "styles": _label(STYLES_ARRAY, lambda p: p[STYLES_ARRAY] if isinstance(p.get(STYLES_ARRAY), list) else None),
        "denoising_strength": _label("Denoising strength"),
        "enable_hr": _label("Hires upscale", lambda p: "Denoising strength" in p and any(
            label in p for label in ("Hires upscale", "Hires upscaler", "Hires resize-1"))),
        "hr_scale": _label("Hires upscale"), "hr_upscaler": _label("Hires upscaler"),
        "hr_second_pass_steps": _label("Hires steps"), "hr_resize_x": _label("Hires resize-1"),
        "hr_resize_y": _label("Hires resize-2"), "hr_checkpoint_name": _label("Hires checkpoint"),
        "hr_sampler_name": _label("Hires sampler", lambda p: _infotext_hires_sampler(p)[0]),
        "hr_scheduler": _label("Hires schedule type", lambda p: _infotext_hires_sampler(p)[1]),
        "hr_prompt": _label("Hires prompt"), "hr_negative_prompt": _label("Hires negative prompt"),
        **_SCRIPT_PASTE_FIELDS},
    "img2img": _SCRIPT_PASTE_FIELDS,        # its tab's own fields name no API field in A1111 1.10 (ui.py)
}
"""A1111 1.10's paste fields that name an API field (`paste_fields[tab]`, `api=`), by that field: what
`apply_infotext` reads from the parsed text for it."""
A1111_OPTION_LABELS = {
    "CLIP_stop_at_last_layers": "Clip skip", "eta_noise_seed_delta": "ENSD", "randn_source": "RNG", "tiling": "Tiling",
    "s_churn": "Sigma churn", "s_tmin": "Sigma tmin", "s_tmax": "Sigma tmax", "s_noise": "Sigma noise",
    "eta_ddim": "Eta DDIM", "eta_ancestral": "Eta", "uni_pc_variant": "UniPC variant",
    "uni_pc_skip_type": "UniPC skip type", "uni_pc_order": "UniPC order",
    "uni_pc_lower_order_final": "UniPC lower order final",
    "sigma_min": "Schedule min sigma", "sigma_max": "Schedule max sigma", "rho": "Schedule rho",
    "always_discard_next_to_last_sigma": "Discard penultimate sigma", "beta_dist_alpha": "Beta schedule alpha",
    "beta_dist_beta": "Beta schedule beta", "sgm_noise_multiplier": "SGM noise multiplier",
    "img2img_extra_noise": "Extra noise", "inpainting_mask_weight": "Conditional mask weight",
    "initial_noise_multiplier": "Noise multiplier", "emphasis": "Emphasis",
    "use_old_scheduling": "Old prompt editing timelines", "use_downcasted_alpha_bar": "Downcast alphas_cumprod",
    "sd_noise_schedule": "Noise Schedule", "s_min_uncond": "NGMS", "s_min_uncond_all": "NGMS all steps",
    "skip_early_cond": "Skip Early CFG", "pad_cond_uncond": "Pad conds", "pad_cond_uncond_v0": "Pad conds v0",
    "sd_vae": "VAE", "token_merging_ratio": "Token merging ratio", "token_merging_ratio_hr": "Token merging ratio hr",
}
"""The infotext labels (`OptionInfo(infotext=...)`, A1111 1.10) of the options this route draws with; A1111's
`Model hash` (skipped under its default `disable_weights_auto_swap`) is left out."""
ETA_OPTIONS = {A1111_OPTION_LABELS[option]: option for option in ("eta_ddim", "eta_ancestral")}
"""A1111's eta options by the label its samplers write them under (`Sampler.eta_infotext_field` /
`eta_option_field`): `Eta DDIM` its timestep samplers' (DDIM), `Eta` k-diffusion's (the ancestral and SDE ones)."""
SAMPLER_OPTION_BOUNDS = {
    "s_churn": MAX_CHURN, "s_tmin": math.inf, "s_tmax": math.inf, "s_noise": MAX_ETA,          # `_sigma_options`
    "sigma_min": math.inf, "sigma_max": math.inf, "rho": math.inf,                             # `_schedule_settings`
    **dict.fromkeys(ETA_OPTIONS.values(), MAX_ETA),                                            # `_eta`
}
"""The most each sampler option (a number >= 0) may be: the bound a job's request has (`request.resolve`), wider than
A1111's sliders (shared_options.py: s_churn 0..100, s_noise 0..1.1, eta_ddim and eta_ancestral 0..1), so POST
options refuses what every later job would."""


def _option_value(option: str, value: Any) -> Any:
    """A1111's `opts.cast_value`: `value` as the type of the option's default ("False" is false)."""
    kind = type(OPTION_DEFAULTS[option])
    return value != "False" and bool(value) if kind is bool else kind(value)


def _infotext_overrides(params: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """A1111's `get_override_settings`: the options whose label the text has, where it differs from the option."""
    current = {**OPTION_DEFAULTS, **options}
    found = {option: _option_value(option, params[label])
             for option, label in A1111_OPTION_LABELS.items() if params.get(label) is not None}
    return {option: value for option, value in found.items() if value != current[option]}


def _with_infotext(body: Txt2ImgIn, service: Service, tab: str) -> Txt2ImgIn:
    """`body` with A1111 1.10's `apply_infotext`: the fields of `INFOTEXT_FIELDS[tab]` the client left unset,
    and the override settings it did not send, read from its `infotext` (parsed as `/png-info` parses,
    `a1111_parameters`); the Refiner's model is the server's model it names (`_closest_checkpoint`, left unset where
    none is); a value that is not of its field's type is a 422, an unknown sampler or scheduler a 404, each
    saying it came from the infotext. The filled fields keep their labels (`_named_by_infotext`)."""
    if not body.infotext:
        return body
    params = a1111_parameters(body.infotext, service.styles, _options(service)["infotext_styles"])
    sent = body.model_fields_set | body._sent_nulls
    try:
        fields = {api: value for api, read in INFOTEXT_FIELDS[tab].items()
                  if api not in sent and (value := read(params)) is not None}
        if (refiner := _closest_checkpoint(service, fields.pop("refiner_checkpoint", None))) is not None:
            fields["refiner_checkpoint"] = refiner.title
        found = _infotext_overrides(params, service.options)
    except (TypeError, ValueError) as err:
        raise BadRequest(f"infotext: {err}", 422) from None
    except BadRequest as err:
        raise BadRequest(f"infotext: {err.message}", err.status, err.detail) from None
    data = {**body.model_dump(include=body.model_fields_set), **fields,
            "override_settings": {**found, **body.override_settings}}
    try:
        filled = type(body).model_validate(data)
    except ValidationError as err:
        raise BadRequest(f"infotext: {err.errors()[0]['loc'][0]} {err.errors()[0]['msg']}", 422) from None
    filled._sent_nulls = body._sent_nulls
    filled._infotext_labels = {
        **{api: re.sub(r"-[12]$", "", INFOTEXT_FIELDS[tab][api].label) for api in fields},
        **{f"override_settings.{option}": A1111_OPTION_LABELS[option] for option in found
           if option not in body.override_settings}}
    return filled


@contextlib.contextmanager
def _named_by_infotext(body: Txt2ImgIn) -> Iterator[None]:
    """A refusal that names a field or override the `infotext` filled (`_with_infotext`), its message prefixed with
    the label it was read from (`infotext Size: width must be ...`)."""
    try:
        yield
    except BadRequest as err:
        label = next((label for key, label in body._infotext_labels.items()
                      if re.search(rf"(?<![\w.]){re.escape(key)}\b", err.message)), None)
        if label is None:
            raise
        detail = None if err.detail == err.message else err.detail
        raise BadRequest(f"infotext {label}: {err.message}", err.status, detail) from None


def _closest_checkpoint(service: Service, text: object) -> Checkpoint | None:
    """A1111's `get_closet_checkpoint_match`: the model `text` names (`Registry.find`), else the one with the
    shortest title holding `text`, else holding it without its ` [hash]`; None where none does, or for no text."""
    if not text:
        return None
    name = str(text)
    found = service.registry.find(name)
    for wanted in (name, without_checksum(name)):
        if found is None:
            found = min((c for c in service.registry.checkpoints if wanted in c.title), key=lambda c: len(c.title),
                        default=None)
    return found


@router.post("/txt2img")
async def txt2img(body: Txt2ImgIn, request: Request) -> dict[str, Any]:
    service = service_of(request)
    script = selected_script(body.script_name, "txt2img")     # A1111's `get_selectable_script`
    body = _with_infotext(body, service, "txt2img")
    check_alwayson_scripts(body.alwayson_scripts, "txt2img")
    if script is not None:
        return await script.run(_script_host(service, _txt2img_request), body, "txt2img")
    return await _generate(service, body, *await _txt2img_request(service, body))


async def _txt2img_request(service: Service, body: Txt2ImgIn) -> tuple[str, GenerationRequest]:
    """The job mode and the request `body` asks for."""
    with _named_by_infotext(body):
        controls = await asyncio.to_thread(_controls, service, body)
        return "txt2img", _request(body, controls, options=service.options, styles=service.styles)


def _controls(service: Service, body: Txt2ImgIn, init: Image.Image | None = None) -> tuple:
    return a1111_controls(body.alwayson_scripts, service.controlnets, service.config.limits, init,
                          getattr(body, "resize_mode", 0))


NO_INIT_IMAGES = "img2img needs init_images (a list of base64 images, one per picture or one for all)"


@router.post("/img2img")
async def img2img(body: Img2ImgIn, request: Request) -> dict[str, Any]:
    service = service_of(request)
    script = selected_script(body.script_name, "img2img")
    body = _with_infotext(body, service, "img2img")
    if script is not None:
        return await script.run(_script_host(service, _img2img_request), body, "img2img")
    return await _generate(service, body, *await _img2img_request(service, body))


async def _img2img_request(service: Service, body: Img2ImgIn) -> tuple[str, GenerationRequest]:
    """The job mode (inpaint with a mask) and the request `body` asks for, its pictures decoded."""
    if not body.init_images:
        raise BadRequest(NO_INIT_IMAGES, 422)
    limits = service.config.limits
    _check_init_count(body, limits)                 # before any picture is decoded
    inits = tuple([await asyncio.to_thread(decode_image, image, f"init_images[{i}]", limits)
                   for i, image in enumerate(body.init_images)])
    mask = await asyncio.to_thread(decode_image, body.mask, "mask", limits) if body.mask else None
    check_alwayson_scripts(body.alwayson_scripts, "img2img", masked=mask is not None)
    with _named_by_infotext(body):
        controls = await asyncio.to_thread(_controls, service, body, inits[0])
        return "inpaint" if mask is not None else "img2img", _request(body, controls, inits, mask, service.options,
                                                                  service.styles)


@router.get("/progress")
def progress(request: Request, skip_current_image: bool = False) -> dict[str, Any]:
    """A1111's `progressapi` of the running job (`_a1111_jobs`); idle, `job_count` is the jobs queued."""
    service = service_of(request)
    queued, running = service.queue.counts()
    job = service.queue.current
    run = _script_run(service, job)
    state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": queued + running,
             "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    if job is None and run is None:
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
    passes = job.passes if job else ()  # first: once set, `steps` is too (`Job.count_steps` sets them in turn)
    step, steps = (job.step, job.steps) if job else (0, 0)     # read once: the worker counts on while this answers
    job_count, job_no, sampling_step, sampling_steps = _a1111_jobs(job.spec, passes, step) if job else (1, 0, 0, 0)
    label = f"task({job.id})" if job else ""
    if run is not None:                 # a script: A1111 counts over all its requests' jobs
        job_count, job_no, label = run.progress(job_no)
    done = 0.01 + job_no / job_count        # A1111's progressapi: over the whole job
    if sampling_steps:
        done += sampling_step / sampling_steps / job_count
    if job is None:
        return {"progress": done, "eta_relative": 0.0, "current_image": None, "textinfo": None,
                "state": {**state, "job": label, "job_count": job_count, "job_no": job_no,
                          "interrupted": run.interrupted}}
    elapsed = time.time() - (job.started or time.time())
    state.update(job=label, interrupted=job.cancel.is_set(), skipped=job.skip.is_set(),
                 job_timestamp=_stamp(job.created), job_count=job_count, job_no=job_no, sampling_step=sampling_step,
                 sampling_steps=sampling_steps)
    options = _options(service)
    preview = job.a1111_preview((job_no, sampling_step), options["show_progress_every_n_steps"],
                                options["live_previews_enable"])
    image = None
    if preview is not None and not skip_current_image:
        image = _base64_picture(preview_image(preview), None, options)
    return {"progress": min(1.0, done), "eta_relative": max(0.0, elapsed / done - elapsed),
            "state": state, "current_image": image, "textinfo": f"step {step}/{steps}"}


def _script_run(service: Service, job: Job | None) -> ScriptRun | None:
    """The script drawing `job`, or with no job running the first script between two of its requests."""
    runs = [run for run in service.script_runs if job is None or run.job is job]
    return runs[0] if runs else None


def _a1111_job_count(spec: JobSpec) -> int:
    """A1111's `state.job_count` of a job: each batch of its n_iter, doubled for the hires fix."""
    return spec.batch_count * (2 if spec.request.hires else 1)


def _a1111_jobs(spec: JobSpec, passes: tuple[int, ...], step: int) -> tuple[int, int, int, int]:
    """A1111's (job_count, job_no, sampling_step, sampling_steps) of a job at its `step`-th sampler step: each
    batch of its n_iter is one of A1111's jobs, each pass of the hires fix one of its own (A1111 doubles
    job_count for it), and the steps are those of the pass running, of the steps each pass of a batch runs
    (`Job.passes`, none until the worker has resolved the job)."""
    count = _a1111_job_count(spec)
    if not passes or step <= 0:
        return count, 0, 0, passes[0] if passes else 0
    per_batch = sum(passes)
    batch = min((step - 1) // per_batch, spec.batch_count - 1)
    within, part = min(step - batch * per_batch, per_batch), 0
    while within > passes[part] and part < len(passes) - 1:
        within -= passes[part]
        part += 1
    return count, batch * len(passes) + part, within, passes[part]


@router.post("/interrupt")
def interrupt(request: Request) -> dict[str, Any]:
    """A1111's interrupt: the running job stops, and so does the script it is drawn for (`ScriptRun`)."""
    service = service_of(request)
    run = _script_run(service, service.queue.current)
    if run is not None:
        run.interrupted = True
    service.queue.interrupt()
    return {}                           # A1111's `interruptapi` answer (its `skip` answers null)


@router.post("/skip")
def skip(request: Request) -> None:
    """A1111's skip: the running job's current batch (an iteration of its n_iter) stops, the next goes on."""
    service_of(request).queue.skip()


def _options(service: Service) -> dict[str, Any]:
    selected = service.host.selected
    return {**OPTION_DEFAULTS, **service.options, "sd_model_checkpoint": selected.title,
            "sd_checkpoint_hash": selected.sha256}


def _check_options(body: dict[str, Any], where: str = "") -> None:
    """The options a generation uses are refused when they are not values it can use (A1111 would fail
    every later generation instead); every option's text is UTF-8, as GET echoes it (`check_texts`). Errors
    name each option as sent: `where` and its key (`override_settings.` in a generation request)."""
    check_texts(body, where.rstrip("."))
    for key, choices in (("emphasis", EMPHASIS_MODES), ("sd_noise_schedule", tuple(A1111_NOISE_SCHEDULES)),
                         ("infotext_styles", INFOTEXT_STYLES)):
        if key in body and body[key] not in choices:
            raise BadRequest(f"{where}{key} must be one of {', '.join(map(repr, choices))}, got {body[key]!r}", 422)
    for key in ("use_old_scheduling", "use_downcasted_alpha_bar", "sdxl_clip_l_skip", "live_previews_enable"):
        if not isinstance(body.get(key, False), bool):
            raise BadRequest(f"{where}{key} must be true or false, got {body[key]!r}", 422)
    for key, least in (("CLIP_stop_at_last_layers", 1), ("show_progress_every_n_steps", -1)):
        value = body.get(key, least)
        if not isinstance(value, int) or not _finite(value) or value < least:
            raise BadRequest(f"{where}{key} must be an integer >= {least}, got {value!r:.80}", 422)
    for key in ("sdxl_crop_top", "sdxl_crop_left"):         # the request's crops_coords_top_left (`_pair`)
        value = body.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SIZE_CONDITION:
            raise BadRequest(f"{where}{key} must be an integer in 0..2**127, got {value!r:.80}", 422)
    ensd = body.get("eta_noise_seed_delta", 0)
    if not isinstance(ensd, int) or isinstance(ensd, bool) or not 0 <= ensd <= MAX_SEED:
        raise BadRequest(f"{where}eta_noise_seed_delta must be an integer in 0..{MAX_SEED}, got {ensd!r}", 422)
    _check_tile_options(body, where)
    for key in ("sdxl_refiner_high_aesthetic_score", "sdxl_refiner_low_aesthetic_score"):
        score = body.get(key, 0.0)
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not abs(score) <= MAX_AESTHETIC:
            raise BadRequest(f"{where}{key} must be a number in -{MAX_AESTHETIC:g}..{MAX_AESTHETIC:g}, got {score!r}",
                             422)
    for key, high in SAMPLER_OPTION_BOUNDS.items():
        value = body.get(key, 0.0)
        if not _finite(value) or not 0 <= value <= high:
            bounds = f"in 0..{high:g}" if high < math.inf else ">= 0"
            raise BadRequest(f"{where}{key} must be a number {bounds}, got {value!r:.80}", 422)
    for key, choices in (("uni_pc_variant", A1111_UNIPC_VARIANTS), ("uni_pc_skip_type", ("time_uniform",))):
        if body.get(key, choices[0]) not in choices:       # A1111's vary_coeff, time_quadratic, logSNR: not drawn
            raise BadRequest(f"{where}{key} must be one of {', '.join(map(repr, choices))} (sdlab draws no other), "
                             f"got {body[key]!r}", 422)
    order = body.get("uni_pc_order", 3)
    if not isinstance(order, int) or isinstance(order, bool) or not 1 <= order <= MAX_UNIPC_ORDER:
        raise BadRequest(f"{where}uni_pc_order must be an integer in 1..{MAX_UNIPC_ORDER}, got {order!r}", 422)
    for key in ("always_discard_next_to_last_sigma", "sgm_noise_multiplier", "uni_pc_lower_order_final",
                "use_old_karras_scheduler_sigmas"):
        if not isinstance(body.get(key, False), bool):
            raise BadRequest(f"{where}{key} must be true or false, got {body[key]!r}", 422)
    for key, low, high in (("img2img_extra_noise", 0.0, MAX_NOISE_MULTIPLIER), ("inpainting_mask_weight", 0.0, 1.0),
                           ("beta_dist_alpha", 1e-6, MAX_BETA), ("beta_dist_beta", 1e-6, MAX_BETA)):
        value = body.get(key, high)                 # `_noise_settings`, `_schedule_settings`
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise BadRequest(f"{where}{key} must be a number in {low:g}..{high:g}, got {value!r}", 422)
    _check_guidance_options(body, where)
    if not isinstance(body.get("tiling", False), bool):
        raise BadRequest(f"{where}tiling must be true or false, got {body['tiling']!r}", 422)
    for key in ("token_merging_ratio", "token_merging_ratio_img2img", "token_merging_ratio_hr"):
        value = body.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise BadRequest(f"{where}{key} must be a number in [0, 1) (the fraction of tokens merged), got {value!r}",
                             422)
    samples_format = body.get("samples_format", "png")
    if not isinstance(samples_format, str) or samples_format.lower() not in SAMPLES_FORMATS:
        raise BadRequest(f"{where}samples_format must be {', '.join(SAMPLES_FORMATS)} (any case), "
                         f"got {samples_format!r}", 422)
    source = body.get("randn_source", "CPU")
    try:
        rng_source(source)
    except RequestError:
        raise BadRequest(f"{where}randn_source must be {', '.join(RNG_SOURCES)} (any case), got {source!r}",
                         422) from None
    if not isinstance(body.get("img2img_fix_steps", False), bool):
        raise BadRequest(f"{where}img2img_fix_steps must be true or false, got {body['img2img_fix_steps']!r}", 422)
    noise = body.get("initial_noise_multiplier", 1.0)
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise <= MAX_NOISE_MULTIPLIER:
        raise BadRequest(f"{where}initial_noise_multiplier must be a number in 0..{MAX_NOISE_MULTIPLIER:g}, "
                         f"got {noise!r}", 422)
    quality = body.get("jpeg_quality", 80)
    if not isinstance(quality, int) or isinstance(quality, bool) or not 1 <= quality <= 100:
        raise BadRequest(f"{where}jpeg_quality must be an integer in 1..100, got {quality!r}", 422)
    if "sd_vae" in body:
        _check_vae(body["sd_vae"], f"{where}sd_vae")
    if not isinstance(body.get("sd_vae_overrides_per_model_preferences", True), bool):
        raise BadRequest(f"{where}sd_vae_overrides_per_model_preferences must be true or false, "
                         f"got {body['sd_vae_overrides_per_model_preferences']!r}", 422)


MAX_TILE = 512                  # A1111's slider of ESRGAN_tile (0: no tiles, else MIN_TILE..512)
MAX_TILE_OVERLAP = 48           # A1111's slider of ESRGAN_tile_overlap (0..48)


def _check_tile_options(body: dict[str, Any], where: str) -> None:
    """The upscalers' tiles within A1111's sliders (`shared_options`): `ESRGAN_tile` 0 (no tiles) or 16..512,
    `ESRGAN_tile_overlap` 0..48. A1111's API takes any integer, which its UI never sends; a tile of a few pixels
    makes every upscale one network call per few pixels (hours at 2048², the device held)."""
    tile = body.get("ESRGAN_tile", 0)
    if not isinstance(tile, int) or isinstance(tile, bool) or tile < 0 or tile_too_small(tile) or tile > MAX_TILE:
        raise BadRequest(f"{where}ESRGAN_tile must be 0 (no tiles) or an integer in {MIN_TILE}..{MAX_TILE}, "
                         f"got {tile!r}", 422)
    overlap = body.get("ESRGAN_tile_overlap", 0)
    if not isinstance(overlap, int) or isinstance(overlap, bool) or not 0 <= overlap <= MAX_TILE_OVERLAP:
        raise BadRequest(f"{where}ESRGAN_tile_overlap must be an integer in 0..{MAX_TILE_OVERLAP}, got {overlap!r}",
                         422)


def _check_tile_pair(settings: dict[str, Any], where: str) -> None:
    """The tiles of `settings` (checked one by one, `_check_tile_options`) overlap by at most half of
    `ESRGAN_tile` (`tile_overlap_limit`). A1111's tiles step by tile - overlap: at 16 / 15 one pixel a network
    call (the work of tile 1), at an overlap not below the tile no tile at all (its upscale fails)."""
    tile, overlap = settings["ESRGAN_tile"], settings["ESRGAN_tile_overlap"]
    limit = tile_overlap_limit(tile, overlap)
    if limit is not None:
        raise BadRequest(f"{where}ESRGAN_tile_overlap must be at most half of ESRGAN_tile: {overlap} with a tile of "
                         f"{tile} (at most {limit})", 422)


def _finite(value: Any) -> bool:
    """Whether an option's `value` is a number a job can draw with (`request.finite_number`): not a bool, NaN, an
    infinity or an integer past a float's range (JSON's 10**400, which the request's float() cannot take)."""
    try:
        finite_number("", value)
    except RequestError:
        return False
    return True


def _check_guidance_options(body: dict[str, Any], where: str) -> None:
    """`_guidance_settings`' options: NGMS a number (off where not above 0, as A1111's), Skip Early CFG one in
    0..1, the others true or false."""
    for key, bounds in (("s_min_uncond", ""), ("skip_early_cond", " in 0..1")):
        value = body.get(key, 0.0)
        if not _finite(value) or bounds and not 0 <= value <= 1:
            raise BadRequest(f"{where}{key} must be a number{bounds}, got {value!r:.80}", 422)
    for key in ("s_min_uncond_all", "pad_cond_uncond", "pad_cond_uncond_v0"):
        if not isinstance(body.get(key, False), bool):
            raise BadRequest(f"{where}{key} must be true or false, got {body[key]!r}", 422)


def _check_vae(name: Any, key: str) -> None:
    """`sd_vae` is a name or null (`_vae_choice` says what each draws)."""
    if name is not None and not isinstance(name, str):
        raise BadRequest(f"{key} must be a VAE name, got {name!r}", 422)


def _vae_choice(service: Service, settings: dict[str, Any]) -> VaeChoice:
    """The VAE A1111's options `settings` draw a model with, as A1111 1.10's `resolve_vae`: under
    `sd_vae_overrides_per_model_preferences` (on by default) an `sd_vae` other than `AUTOMATIC_VAE` is the file
    of `GET sd-vae` it names, or the checkpoint's own VAE for "None" or a name of no file (null, "" too: logged,
    as A1111's "Couldn't find VAE named ...; using None instead"); "Automatic", or any `sd_vae` with that option
    off, draws the VAE found near the checkpoint first (`VaeFiles.near`), then the named file."""
    settings = {**OPTION_DEFAULTS, **settings}
    name = settings["sd_vae"]
    by_name = name not in (*AUTOMATIC_VAE, "None")
    listed = service.registry.vaes.find(name) if by_name else None
    if by_name and listed is None:
        logger.warning("sd_vae %r names no VAE of this server's list (GET /sdapi/v1/sd-vae): drawn with the "
                       "checkpoint's own VAE, as A1111 draws it (Couldn't find VAE named %s; using None instead)",
                       name, name)
    sidecar = name in AUTOMATIC_VAE or not settings["sd_vae_overrides_per_model_preferences"]
    return VaeChoice(sidecar, None if listed is None else listed.name)


def _vae_fields(choice: VaeChoice) -> dict[str, Any]:
    """`JobSpec`'s fields of the VAE `choice`."""
    return {"sidecar_vae": choice.sidecar, "vae": choice.name}


@router.get("/options")
def get_options(request: Request) -> dict[str, Any]:
    return _options(service_of(request))


@router.post("/options")
def set_options(body: dict[str, Any], request: Request) -> None:
    """`sd_model_checkpoint` switches the model new jobs use (loaded by the worker before its next job);
    `CLIP_stop_at_last_layers`, `sdxl_clip_l_skip`, `eta_noise_seed_delta`, `randn_source`, `tiling` and the SDXL crop and refiner
    scores (`_sdxl_options`) apply to later generations (under a request's `override_settings` and, for `tiling`,
    its own field), `img2img_fix_steps` and
    `initial_noise_multiplier` to later img2img requests (`_request`), `samples_format` and `jpeg_quality` to
    the base64 pictures answered from now on; other options are remembered and echoed by GET but change nothing
    (docs/server.md). Nothing is set when one value is refused."""
    service = service_of(request)
    _check_options(body)
    _check_tile_pair({**OPTION_DEFAULTS, **service.options, **body}, "")
    selected = _selected_model(service, body)
    _check_kept_options(service, body)
    _set_options(service, body, selected)


def _selected_model(service: Service, body: dict[str, Any]) -> Checkpoint | None:
    """The model the options `body` select (the one selected now where they set only `sd_vae`), a readable file
    with the VAE they draw it with, if they name one or a VAE."""
    if "sd_model_checkpoint" not in body and "sd_vae" not in body:
        return None
    checkpoint = service.checkpoint(body.get("sd_model_checkpoint"))
    _check_readable(checkpoint, _vae_choice(service, {**service.options, **body}), service)
    checkpoint.calculate_hash()                 # A1111 loads it here, hashing it
    return checkpoint


MAX_OPTIONS_BYTES = 1 << 20
"""The options a server keeps, as JSON (A1111 keeps only its own options' names, a fixed set; sdlab keeps any)."""


def _check_kept_options(service: Service, body: dict[str, Any], where: str = "") -> None:
    """A 422 when the options `body` sets would make the options kept past `MAX_OPTIONS_BYTES` (those
    `_set_options` stores: the model it selects is not one of them)."""
    size = len(json.dumps({**service.options, **_stored_options(body)}))
    if size > MAX_OPTIONS_BYTES:
        raise BadRequest(f"{where}the options set would hold {size} bytes of JSON; this server keeps at most "
                         f"{MAX_OPTIONS_BYTES}", 422)


def _set_options(service: Service, body: dict[str, Any], selected: Checkpoint | None) -> None:
    """Set the options `_check_options` passed: the model new jobs use (`selected`) and the others."""
    if selected is not None:
        service.host.selected = selected
    service.options.update(_stored_options(body))


def _stored_options(body: dict[str, Any]) -> dict[str, Any]:
    """The options of `body` the server stores (`FIXED_OPTIONS` are read from it, never stored)."""
    return {k: v for k, v in body.items() if k not in FIXED_OPTIONS}


def _check_readable(checkpoint: Checkpoint, vae: VaeChoice, service: Service) -> None:
    """A model sdlab cannot draw with the VAE `vae` picks (`Checkpoint.check_loadable`: unreadable, a LoRA or a
    VAE, a Flux model, a VAE file of another family, ...) is refused here, as A1111 refuses a model it cannot load
    in `POST options` (A1111 loads it there; sdlab plans it from its names and shapes, reading no weight; a file
    that fails later, in the worker, fails its job with a 400)."""
    vae_file, sidecar_vae = service.host.vae_for(checkpoint.path, vae)
    try:
        checkpoint.check_loadable(sidecar_vae, vae_file)
    except CheckpointError as err:
        reason = str(err).removeprefix(f"{checkpoint.title}: ")
        raise BadRequest(f"the model {checkpoint.title!r} cannot be loaded: {reason}", 400,
                         "Model cannot be loaded") from None


@router.get("/sd-models")
def sd_models(request: Request) -> list[dict[str, Any]]:
    return [c.as_a1111() for c in service_of(request).registry.checkpoints]


@router.get("/samplers")
def samplers() -> list[dict[str, Any]]:
    return [{"name": spec.name, "aliases": list(spec.aliases), "options": {}} for spec in SAMPLER_TABLE]


@router.get("/schedulers")
def schedulers() -> list[dict[str, Any]]:
    return scheduler_rows()


@router.get("/loras")
def loras(request: Request) -> list[dict[str, Any]]:
    return [lora.as_a1111() for lora in service_of(request).registry.loras]


@router.post("/refresh-checkpoints")
def refresh_checkpoints(request: Request) -> None:
    service_of(request).registry.refresh()


@router.post("/refresh-loras")
def refresh_loras(request: Request) -> None:
    service_of(request).registry.refresh()


@router.get("/sd-vae")
def sd_vae(request: Request) -> list[dict[str, Any]]:
    """A1111's VAE list, `{model_name, filename}` rows: the names `sd_vae` takes (`vae_files`)."""
    return [f.as_a1111() for f in service_of(request).registry.vaes.files]


@router.get("/upscalers")
def upscalers(request: Request) -> list[dict[str, Any]]:
    """The plain resizes (A1111's default scale, 4), then the `--upscalers-dir` model files by stem with their
    network's scale: the names the hires fix's `hr_upscaler` (beside the latent modes) and
    `/extra-single-image`'s `upscaler_1` take; each file's scale is read once per version of the file."""
    return [{"name": name, "model_name": f.title if f else None, "model_path": str(f.path) if f else None,
             "model_url": None, "scale": read_per_version(f.path, _upscaler_scale) if f else 4}
            for name, f in _listed_upscalers(service_of(request))]


def _listed_upscalers(service: Service) -> list[tuple[str, ModelFile | None]]:
    """The upscalers' names in `GET upscalers` order, each with its `--upscalers-dir` file: the plain resizes
    (None), then the files."""
    return [*((name, None) for name in PLAIN_UPSCALER_NAMES), *((f.title, f) for f in service.upscalers.files)]


def upscaler_names(service: Service) -> list[str]:
    """The upscalers' names in `GET upscalers` order (`_listed_upscalers`): SD upscale's choices, which its
    `upscaler_index` indexes."""
    return [name for name, _ in _listed_upscalers(service)]


def _upscaler_scale(path: Path) -> int | None:
    """The scale of the network an upscaler file describes (`read_upscaler`: from its names and shapes), None
    for a file that is not one it can read."""
    try:
        return read_upscaler(path).config.scale
    except (CheckpointError, OSError):
        return None


class ExtrasIn(NullsAreDefaults):
    """A1111's Extras fields (`ExtrasBaseRequest`, its 0..1 ranges a 422); sdlab has no face restorer, so a GFPGAN
    or CodeFormer visibility above 0 is a 422 naming it; `upscale_first` and `show_extras_results` are accepted
    and ignored (docs/server.md)."""

    model_config = ConfigDict(extra="allow")

    resize_mode: Literal[0, 1] = 0          # 0: by upscaling_resize, 1: to upscaling_resize_w x _h
    upscaling_resize: float = 2             # unset: the int 2 (A1111's default, which its pydantic v1 keeps)
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = Field(0.0, ge=0, le=1, allow_inf_nan=False)
    gfpgan_visibility: float = Field(0.0, ge=0, le=1, allow_inf_nan=False)
    codeformer_visibility: float = Field(0.0, ge=0, le=1, allow_inf_nan=False)
    codeformer_weight: float = Field(0.0, ge=0, le=1, allow_inf_nan=False)

    @model_validator(mode="after")
    def _no_face_restoration(self) -> ExtrasIn:
        for key, restorer in (("gfpgan_visibility", "GFPGAN"), ("codeformer_visibility", "CodeFormer")):
            if getattr(self, key) > 0:
                raise BadRequest(f"{key} is {getattr(self, key):g}: sdlab has no face restorer ({restorer}); "
                                 "send 0 (no face restoration)", 422)
        return self


class ExtraSingleIn(ExtrasIn):
    image: str


class FileData(NullsAreDefaults):
    data: str
    name: str = ""


class ExtraBatchIn(ExtrasIn):
    imageList: list[FileData]               # noqa: N815 (A1111's field name)


def _upscale(service: Service, body: ExtrasIn, data: str, what: str) -> tuple[str, str]:
    """The picture `data` (base64, the field `what`) through Extras (while no job runs) in base64
    (`_base64_picture`: a PNG unless samples_format says otherwise), and A1111's html_info of it.

    As A1111's `run_postprocessing`: the picture in RGB whatever its mode, upscaled (`_postprocessed`), keeping
    its parameters and its other text items, with the infotext of what was done (`Postprocess upscale by:
    2.0, Postprocess upscaler: Lanczos`) as its `postprocessing` text and, in `<p>...</p>`, as the html_info."""
    raw = decode_base64(data, what)
    source = image_from_bytes(raw, what, service.config.limits)
    try:
        parameters = read_parameters(io.BytesIO(raw))
    except Exception:                   # no readable parameters chunk: the picture still upscales
        parameters = None
    info: dict[str, Any] = {}
    result = _postprocessed(service, body, source.convert("RGB"), info)
    infotext = ", ".join(f"{key}: {quote(str(value))}" for key, value in info.items())
    texts = {**other_text_items(source), "postprocessing": infotext}
    return _base64_picture(result, parameters, _options(service), texts), f"<p>{html.escape(infotext)}</p>"


def _postprocessed(service: Service, body: ExtrasIn, image: Image.Image, info: dict[str, Any]) -> Image.Image:
    """A1111's Extras upscale (`ScriptPostprocessingUpscale.process`), what it did written into `info`: "None"
    leaves the picture as it is; else `upscaler_1` by `upscaling_resize` or, in resize_mode 1, by
    max(w / W, h / H) (`upscale_by`: the size rounded down to multiples of 8, the aspect ratio kept), then with
    `upscaling_crop` pasted centred on a black w x h canvas; `upscaler_2` (not "None") with a visibility above
    0 upscales it alike and is blended in at that visibility."""
    name = (body.upscaler_1 or "None").strip()
    found = upscaler_file(name, service.upscalers, EXTRAS_UPSCALER)
    if name.lower() == "none":
        return image
    second = (body.upscaler_2 or "None").strip()
    found_second = upscaler_file(second, service.upscalers, EXTRAS_UPSCALER_2)
    info.update(_upscale_info(body))
    upscaled = _upscaled(service, body, image, name, found)
    info["Postprocess upscaler"] = _listed_upscaler(name, found)
    if second.lower() != "none" and body.extras_upscaler_2_visibility > 0:
        blended = _upscaled(service, body, image, second, found_second)
        upscaled = Image.blend(upscaled, blended, body.extras_upscaler_2_visibility)
        info["Postprocess upscaler 2"] = _listed_upscaler(second, found_second)
    return upscaled


def _upscale_info(body: ExtrasIn) -> dict[str, Any]:
    """The infotext items of A1111's `ScriptPostprocessingUpscale.upscale` for the size asked."""
    if body.resize_mode == 0:
        return {"Postprocess upscale by": body.upscaling_resize}
    size = f"{body.upscaling_resize_w}x{body.upscaling_resize_h}"
    return {"Postprocess upscale to": size, **({"Postprocess crop to": size} if body.upscaling_crop else {})}


def _listed_upscaler(name: str, found: ModelFile | None) -> str:
    """The name `/sdapi/v1/upscalers` lists for the upscaler a request named `name` (`found`: its file)."""
    if found is not None:
        return found.title
    return next(listed for listed in PLAIN_UPSCALER_NAMES if listed.lower() == name.lower())


def _b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode("ascii")


def _upscaled(service: Service, body: ExtrasIn, image: Image.Image, name: str,
              found: ModelFile | None) -> Image.Image:
    """`image` through the plain resize `name` or the upscaler file `found` (A1111's
    `ScriptPostprocessingUpscale.upscale`)."""
    limit = 4 * service.config.limits.max_pixels
    if body.resize_mode == 1:
        w, h = body.upscaling_resize_w, body.upscaling_resize_h
        if w < 1 or h < 1:
            raise BadRequest("resize_mode 1 needs upscaling_resize_w and upscaling_resize_h >= 1", 422)
        _check_upscale_size(w, h, limit)
        scale = max(w / image.width, h / image.height)
    else:
        scale = body.upscaling_resize
    try:
        result = _upscaled_by(service, image, name, found, scale)
    except UpscaleError as err:
        raise BadRequest(str(err), 400) from None
    if body.resize_mode == 1 and body.upscaling_crop:      # A1111's Extras crop: an RGB canvas
        return centred_on_canvas(result.convert("RGB"), (body.upscaling_resize_w, body.upscaling_resize_h))
    return result


def _upscaled_by(service: Service, image: Image.Image, name: str, found: ModelFile | None, scale: float) -> Image.Image:
    """`image` through the plain resize `name` or the upscaler file `found` by `scale` (`upscale_by`, in tiles of
    the options' `ESRGAN_tile` overlapping by `ESRGAN_tile_overlap`, as A1111's upscalers), while no job runs; a
    result past 4 x `--max-pixels` is a 413."""
    if math.isfinite(scale) and scale > 0:              # as floats first: 64 x 1e308 does not fit an int
        _check_upscale_size(image.width * scale, image.height * scale, 4 * service.config.limits.max_pixels)
    options = _options(service)
    with service.host.busy:                             # never beside a generation
        upscaler = load_upscaler_file(found, EXTRAS_UPSCALER, service.config.device) if found is not None else name
        return upscale_by(image.convert("RGB") if found is not None else image, upscaler, scale,
                          tile=options["ESRGAN_tile"], overlap=options["ESRGAN_tile_overlap"])


def _check_upscale_size(width: float, height: float, limit: int) -> None:
    if width * height > limit:
        raise BadRequest(f"upscaling to {width:.6g}x{height:.6g} is past this server's limit of {limit} pixels", 413)


@router.post("/extra-single-image")
async def extra_single_image(body: ExtraSingleIn, request: Request) -> dict[str, Any]:
    image, info = await asyncio.to_thread(_upscale, service_of(request), body, body.image, "image")
    return {"html_info": info, "image": image}


@router.post("/extra-batch-images")
async def extra_batch_images(body: ExtraBatchIn, request: Request) -> dict[str, Any]:
    """Each picture of `imageList` as `extra-single-image` upscales it, in order; the html_info is the last
    picture's, as A1111's. More pictures than `--max-images` is a 400 before any is decoded (A1111 has no limit)."""
    service = service_of(request)
    limit = service.config.limits.max_images
    if len(body.imageList) > limit:
        raise BadRequest(f"at most {limit} images per request on this server (--max-images), got "
                         f"{len(body.imageList)} in imageList")
    done = [await asyncio.to_thread(_upscale, service, body, item.data, f"imageList[{i}].data")
            for i, item in enumerate(body.imageList)]
    return {"html_info": done[-1][1] if done else "<p></p>", "images": [image for image, _ in done]}


@router.get("/latent-upscale-modes")
def latent_upscale_modes() -> list[dict[str, Any]]:
    return [{"name": name} for name in LATENT_UPSCALE_MODES]


@router.get("/embeddings")
def embeddings(request: Request) -> dict[str, Any]:
    """The loaded model's textual-inversion embeddings, as the next job draws with them (the folder as it is
    now: `ModelHost.listed_embeddings`), as A1111's `get_embeddings` lists them: `loaded` (sorted by name, any
    case) and `skipped` (made for another model)."""
    found = service_of(request).host.listed_embeddings()
    loaded = sorted(found.loaded, key=lambda e: e.name.lower())
    return {"loaded": {e.name: _embedding_item(e) for e in loaded},
            "skipped": {e.name: _embedding_item(e) for e in found.skipped}}


def _embedding_item(embedding: Embedding) -> dict[str, Any]:
    """A1111's item: `shape` is the vectors' width, both towers' summed for SDXL (clip_g + clip_l)."""
    return {"step": embedding.step, "sd_checkpoint": embedding.sd_checkpoint,
            "sd_checkpoint_name": embedding.sd_checkpoint_name, "shape": sum(embedding.widths()),
            "vectors": embedding.num_vectors}


@router.get("/scripts")
def scripts() -> dict[str, Any]:
    """A1111's names of the scripts sdlab runs (`a1111_scripts.scripts_list`)."""
    return scripts_list()


@router.get("/script-info")
def scripts_info(request: Request) -> list[dict[str, Any]]:
    """A1111's `ScriptInfo` of the selectable scripts sdlab runs: their `script_args` (`a1111_scripts`), SD
    upscale's upscalers this server's."""
    return script_info(upscaler_names(service_of(request)))


@router.get("/prompt-styles")
def prompt_styles(request: Request) -> list[dict[str, str]]:
    """A1111's `[{name, prompt, negative_prompt}]` of the styles of `--styles-file`, in their files' order."""
    return service_of(request).styles.listed()


@router.get("/face-restorers")
@router.get("/hypernetworks")
@router.get("/extensions")
def nothing_listed() -> list[dict[str, Any]]:
    """A1111's lists of what sdlab has none of: face restorers, hypernetworks, extensions."""
    return []


@router.get("/realesrgan-models")
def realesrgan_models(request: Request) -> list[dict[str, Any]]:
    """A1111's `{name, path, scale}` rows of its R-ESRGAN upscalers: those whose files this server found (in
    `--upscalers-dir` or RealESRGAN/ of `--models-dir`), by A1111's names, with their files and networks' scales
    (A1111 lists all six with their download addresses; sdlab downloads nothing)."""
    return [{"name": f.title, "path": str(f.path), "scale": read_per_version(f.path, _upscaler_scale)}
            for f in service_of(request).upscalers.files if f.path.stem in A1111_REALESRGAN_STEMS]


@router.get("/cmd-flags")
def cmd_flags(request: Request) -> dict[str, Any]:
    """`sdlab serve`'s options, as A1111 lists its command-line flags (the credentials left out)."""
    config = service_of(request).config
    folders = {"model": config.model, "models_dir": config.models_dir, "embeddings_dir": config.embeddings_dir,
               "controlnet_dir": config.controlnet_dir, "upscalers_dir": config.upscalers_dir,
               "realesrgan_dir": config.realesrgan_dir, "vae_dir": config.vae_dir, "output_dir": config.output_dir}
    limits = config.limits
    return {**{name: None if path is None else str(path) for name, path in folders.items()},
            "device": config.device, "max_queue": config.max_queue, "max_body_mb": limits.max_body_bytes >> 20,
            "max_pixels": limits.max_pixels, "max_steps": limits.max_steps, "max_batch": limits.max_batch,
            "max_images": limits.max_images, "styles_file": list(config.styles_files)}


@router.get("/memory")
def memory(request: Request) -> dict[str, Any]:
    """A1111's `get_memory`: `{ram, cuda}` in bytes."""
    return {"ram": _ram(), "cuda": _cuda(service_of(request).config.device)}


def _ram() -> dict[str, Any]:
    """A1111's `ram`: this process's resident memory (`used`), the machine's (`total`) and their difference
    (`free`), read from /proc and sysconf; `{error}` where the system has neither."""
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = page * os.sysconf("SC_PHYS_PAGES")
        with open("/proc/self/statm") as statm:
            used = int(statm.read().split()[1]) * page
    except (OSError, ValueError, IndexError) as err:
        return {"error": str(err)}
    return {"free": total - used, "used": used, "total": total}


def _cuda(device: str) -> dict[str, Any]:
    """A1111's `cuda`: the card's free / used / total memory and PyTorch's allocator counters, for a server
    that draws on CUDA; `{"error": "unavailable"}` on the CPU or MPS."""
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return {"error": "unavailable"}
    free, total = torch.cuda.mem_get_info(device)
    stats = torch.cuda.memory_stats(device)

    def pair(name: str) -> dict[str, int]:
        return {"current": stats.get(f"{name}.all.current", 0), "peak": stats.get(f"{name}.all.peak", 0)}

    return {"system": {"free": free, "used": total - free, "total": total}, "active": pair("active_bytes"),
            "allocated": pair("allocated_bytes"), "reserved": pair("reserved_bytes"),
            "inactive": pair("inactive_split_bytes"),
            "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)}}


@router.post("/interrogate")
def interrogate() -> None:
    raise BadRequest("sdlab has no interrogator (A1111's CLIP / DeepDanbooru caption of a picture); "
                     "POST /sdapi/v1/interrogate is not served", 501, "sdlab has no interrogator")


@router.post("/refresh-vae")
def refresh_vae(request: Request) -> None:
    """Rescan the VAE files (`GET sd-vae`)."""
    service_of(request).registry.vaes.refresh()


@router.post("/refresh-embeddings")
async def refresh_embeddings(request: Request) -> None:
    """Read every file of `--embeddings-dir` again and install them in the loaded model (while no job runs), as
    A1111's forced reload; nothing without a loaded model. Jobs install a changed folder's files themselves."""
    host = service_of(request).host
    await asyncio.to_thread(host.between_jobs, host.refresh_embeddings)


@router.post("/unload-checkpoint")
async def unload_checkpoint(request: Request) -> dict[str, Any]:
    """The model is let go (while no job runs); the next job loads it again."""
    host = service_of(request).host
    await asyncio.to_thread(host.between_jobs, host.unload)
    return {}


@router.post("/reload-checkpoint")
async def reload_checkpoint(request: Request) -> dict[str, Any]:
    """The selected model is loaded now (while no job runs), if it is not loaded already."""
    service = service_of(request)
    await asyncio.to_thread(service.host.between_jobs, lambda: _load_selected(service))
    return {}


def _load_selected(service: Service) -> None:
    """`host.pipeline` of the selected model; a file that cannot be loaded is a 400 naming it by its title."""
    selected = service.host.selected
    try:
        service.host.pipeline(selected, vae=_vae_choice(service, service.options))
    except CheckpointError as err:
        raise BadRequest(load_failure(CheckpointError(selected.without_paths(str(err))),
                                      f"the model {selected.title!r}", selected.title, [])) from None


class PngInfoIn(NullsAreDefaults):

    image: str


@router.post("/png-info")
def png_info(body: PngInfoIn, request: Request) -> dict[str, Any]:
    """{info: the parameters text (a NovelAI picture's as A1111 writes it, `_novelai_text`), items: the image's
    other text chunks, parameters: the text parsed, A1111's defaults alone for a picture without one}."""
    raw = decode_base64(body.image, "image")
    with opened_picture(raw, "image", service_of(request).config.limits) as image:   # reading its text decodes it
        items = other_text_items(image)
        size = image.size
        text = read_parameters(io.BytesIO(raw)) or ""
    if items.get("Software") == "NovelAI":
        text = _novelai_text(items, size) or text
    service = service_of(request)
    found = service.options.get("infotext_styles", OPTION_DEFAULTS["infotext_styles"])    # options alone: no model
    return {"info": text, "items": items, "parameters": a1111_parameters(text, service.styles, found)}


def _novelai_text(items: dict[str, str], size: tuple[int, int]) -> str | None:
    """A NovelAI picture's parameters (its `Description` chunk and `Comment` JSON) as A1111's
    `images.read_info_from_image` writes them; None where they do not read so (A1111 keeps the picture's own)."""
    try:
        info = json.loads(items["Comment"])
        sampler = A1111_SAMPLERS_MAP.get(info["sampler"], "Euler a")
        return (f"{items['Description']}\nNegative prompt: {info['uc']}\nSteps: {info['steps']}, "
                f"Sampler: {sampler}, CFG scale: {info['scale']}, Seed: {info['seed']}, Size: {size[0]}x{size[1]}, "
                "Clip skip: 2, ENSD: 31337")
    except (KeyError, TypeError, ValueError):
        return None


_SIZE_VALUE = re.compile(r"^(\d+)x(\d+)$")
_A1111_DEFAULTS = {                     # what A1111 1.10's parser fills in for labels a text leaves out
    "Clip skip": "1", "Hires resize-1": 0, "Hires resize-2": 0, "Hires sampler": "Use same sampler",
    "Hires schedule type": "Use same scheduler", "Hires checkpoint": "Use same checkpoint", "Hires prompt": "",
    "Hires negative prompt": "", "Mask mode": "Inpaint masked", "Masked content": "original",
    "Inpaint area": "Whole picture", "Masked area padding": 32, "RNG": "GPU", "Schedule type": "Automatic",
    "Schedule max sigma": 0, "Schedule min sigma": 0, "Schedule rho": 0, "VAE Encoder": "Full",
    "VAE Decoder": "Full", "FP8 weight": "Disable",
}


def a1111_parameters(text: str, styles: StyleDatabase | None = None, infer_styles: str = "Ignore") -> dict[str, Any]:
    """A parameters text parsed with A1111's keys (`parse_generation_parameters` in `infotext_utils.py`):
    every `WxH` value becomes `<label>-1` / `<label>-2` (`Size-1`, `Size-2`, no `Size`), the texts of the `styles`
    the prompts hold taken out of them and the styles named (`Styles array`) as the option `infotext_styles`
    (`infer_styles`) says (`styles.infotext_styles`), the labels
    missing from the text get A1111's defaults (`"Clip skip": "1"`, ...: `_a1111_defaults`), an old hires fix
    becomes A1111's (`_restore_old_hires_fix`) and the text's A1111 version sets what it implies
    (`infotext.a1111_backcompat`). Values keep sdlab's types."""
    parsed: dict[str, Any] = {}
    for key, value in parse_parameters(text).items():
        m = _SIZE_VALUE.match(value) if isinstance(value, str) and key not in ("Prompt", "Negative prompt") else None
        if m is not None:
            parsed[f"{key}-1"], parsed[f"{key}-2"] = m.group(1), m.group(2)
        else:
            parsed[key] = value
    parsed = infotext_styles(parsed, styles or StyleDatabase(), infer_styles)
    res = {**parsed, **{key: value for key, value in _a1111_defaults(parsed).items() if key not in parsed}}
    _restore_old_hires_fix(res)
    return {**res, **a1111_backcompat(res)}


def _restore_old_hires_fix(res: dict[str, Any]) -> None:
    """A1111's `restore_old_hires_fix_params` (`infotext.old_hires_sizes`): a text of the hires fix before January
    2023 (`First pass size`) gets the first pass's size as Size and its Size as Hires resize."""
    if "First pass size-1" not in res or "First pass size-2" not in res:
        return
    sizes = old_hires_sizes((int(res["First pass size-1"]), int(res["First pass size-2"])),
                            (int(res.get("Size-1", 512)), int(res.get("Size-2", 512))))
    if sizes is not None:
        (res["Size-1"], res["Size-2"]), (res["Hires resize-1"], res["Hires resize-2"]) = sizes


def _a1111_defaults(parsed: dict[str, Any]) -> dict[str, Any]:
    """A1111's defaults of the labels a text leaves out, in its order: `_A1111_DEFAULTS` (`RNG` "CPU" for a text
    sdlab wrote, the source it drew with), `Cache FP16 weight for LoRA` with an FP8 weight other than
    "Disable", `Emphasis` "Original" when a prompt weighs a word other than 1, and `Refiner switch by sampling
    steps`."""
    defaults: dict[str, Any] = dict(_A1111_DEFAULTS)
    if drawn_by_sdlab(parsed):          # sdlab's texts without the label were drawn by its default source
        defaults["RNG"] = "CPU"
    if parsed.get("FP8 weight", "Disable") != "Disable":
        defaults["Cache FP16 weight for LoRA"] = False
    if _uses_emphasis(str(parsed.get("Prompt", ""))) or _uses_emphasis(str(parsed.get("Negative prompt", ""))):
        defaults["Emphasis"] = "Original"
    defaults["Refiner switch by sampling steps"] = False
    return defaults


def _uses_emphasis(prompt: str) -> bool:
    """Whether A1111's prompt parser gives a piece of `prompt` a weight other than 1 (BREAK aside)."""
    try:
        return any(weight != 1.0 and text != "BREAK" for text, weight in parse_weighted(prompt))
    except PromptError:                 # a weight past sdlab's bound: one other than 1
        return True
