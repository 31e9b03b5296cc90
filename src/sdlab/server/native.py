"""The native async API: `POST /api/jobs` returns at once, the job runs in the queue.

    POST   /api/jobs                 {mode, model?, prompt, ...} -> 202 {id, status: "queued", position}
    GET    /api/jobs                 {jobs: [job, ...]} newest first (this run's and earlier runs'); ?limit=N (100,
                                     at most 1000), ?before=ID: the jobs listed after that one (the next page)
    GET    /api/jobs/{id}            job
    DELETE /api/jobs/{id}            cancel (queued: at once; running: at the next step) -> {id, status}
    POST   /api/jobs/{id}/delete     delete a finished job from the history with its pictures, all or nothing
                                     -> {id, deleted: [ids], images: n}; queued / running: 409, unknown: 404
    POST   /api/jobs/{id}/interrupt  A1111's Interrupt of the job running: its batch ends with its pictures as far
                                     as they got, the job stops (cancelled, its pictures kept) -> {id, status, stopped}
    POST   /api/jobs/{id}/skip       A1111's Skip of the job running: its batch ends so, the next goes on -> same
    GET    /api/jobs/{id}/events     Server-Sent Events: queued, started, step {i, n, preview}, done, failed, cancelled
    GET    /api/images/{name}        a picture the server drew (only names it wrote, only from its folder)
    GET    /api/scripts              the selectable scripts a job's script_name takes in each tab, and the X/Y/Z
                                     plot axes sdlab draws (`script_jobs.native_scripts`)
    POST   /api/parameters           {image} -> {info, settings, unread}: a picture's parameters as a job's settings
                                     (its styles taken out of its prompts, its script's fields as script_args)
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Literal, get_type_hints

import anyio
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, create_model, field_validator
from pydantic_core import PydanticKnownError
from PIL import Image

from sdlab.checkpoints.errors import CheckpointError
from sdlab.models.deep_cache import DeepCache
from sdlab.models.freeu import FreeU
from sdlab.pipeline.perturbed_attention import DEFAULT_LAYERS
from sdlab.pipeline.png_info import foreign_metadata, parse_parameters, read_parameters
from sdlab.pipeline.request import (
    DEFAULT_IMAGE_CFG_SCALE, MAX_BATCH_COUNT, NO_IMAGE_GUIDANCE, GenerationRequest, RequestError,
    check_sdxl_conditioning,
)
from sdlab.pipeline.styles import PROMPT_FIELDS, STYLES_ARRAY, infotext_styles, styled_options
from sdlab.server import job_deletion, script_jobs
from sdlab.server.a1111_scripts import selected_script
from sdlab.server.controls import native_controls, native_ip_adapters
from sdlab.server.inputs import (
    BadRequest, JobSpec, LoraChoice, NullsAreDefaults, decode_base64, decode_image, opened_picture, refiner_choice,
    schedule_name, spec_with_preset, unset_preset_fields,
)
from sdlab.server.jobs import FINAL_STATES, Job, JobQueue, final_event, image_url
from sdlab.server.picture_settings import control_units, picture_settings, unread_labels
from sdlab.server.previews import jpeg_data_url
from sdlab.server.service import Service
from sdlab.server.vae_files import AUTOMATIC_VAE
from sdlab.utils.file_hashes import read_per_version

router = APIRouter(prefix="/api")
KEEPALIVE_S = 15.0
IMAGE_NAME = re.compile(r"^[0-9a-f]{32}-[0-9]{1,3}\.png$")


def no_bool(error: str) -> BeforeValidator:
    """A check refusing true and false, which pydantic's lax mode reads as 1 and 0, as pydantic's `error` type
    ("int_type", "float_type"): the field's line then shows what was sent (`app.NUMBER_ERRORS`)."""
    def refuse(value: Any) -> Any:
        if isinstance(value, bool):
            raise PydanticKnownError(error)
        return value
    return BeforeValidator(refuse)


JsonInt = Annotated[int, no_bool("int_type")]
"""An int field of a request: an integer, 20.0 or "20" (pydantic's lax mode), not true, 7.5, "7.5" or NaN."""
JsonFloat = Annotated[float, no_bool("float_type")]
"""A float field of a request: a finite number or its string ("7.5"), not true, NaN or Infinity."""


class JsonNumbers(BaseModel):
    """A request model whose numbers are JSON numbers of their kind (every native request model, FreeU's and
    DeepCache's settings too), read in pydantic's lax mode: an int field (`JsonInt`) takes an integer, 20.0 (which
    many clients send for 20) or "20", not true or 7.5; a float field (`JsonFloat`) a finite number or its string,
    not true, NaN or Infinity (which Python's JSON reader takes); a seed past 2^53 comes as its digits from the web
    UI (app.js `seedField`: JavaScript holds no larger integer exactly). Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


JSON_NUMBER_TYPES = {int: JsonInt, float: JsonFloat}
"""A dataclass's number hint as a request model's field type (FreeU's and DeepCache's settings)."""


class LoraIn(JsonNumbers):
    name: str
    weight: JsonFloat = 1.0


FreeUIn = create_model(
    "FreeUIn", __base__=JsonNumbers,
    __doc__="FreeU's setting (`models.freeu.FreeU`): backbone factors b1, b2, skip factors s1, s2, version 1 or 2, "
            "the \"comfyui\" or \"diffusers\" rule for its stages, the step window start..end; its fields, types and "
            "defaults are the dataclass's.",
    **{f.name: (JSON_NUMBER_TYPES.get(hint, hint), f.default)
       for f, hint in zip(fields(FreeU), get_type_hints(FreeU).values())})


DeepCacheIn = create_model(
    "DeepCacheIn", __base__=JsonNumbers,
    __doc__="DeepCache's setting (`models.deep_cache.DeepCache`): a whole U-Net call every `interval` steps, the "
            "shallow `branch` between; its fields, types and defaults are the dataclass's.",
    **{f.name: (JSON_NUMBER_TYPES.get(hint, hint), f.default)
       for f, hint in zip(fields(DeepCache), get_type_hints(DeepCache).values())})


class ControlIn(JsonNumbers):
    """One ControlNet: a model of the server's ControlNet folder by name, its hint image (base64)."""

    model_config = ConfigDict(protected_namespaces=())
    model: str
    image: str | None = None                # None: an img2img / inpaint job's init picture (each request's, in
    strength: JsonFloat = 1.0               # a script), as an A1111 unit without one
    start: JsonFloat = 0.0
    end: JsonFloat = 1.0
    module: str = "none"                    # a preprocessor: none, canny, scribble, threshold, invert, tile
    control_mode: str = "balanced"          # sdlab's names of A1111's control modes: balanced, prompt, control
    resize_mode: str | None = None          # resize (the default), crop, fill: A1111's resize modes
    threshold_a: JsonFloat | None = None    # the preprocessor's A1111 Threshold A / B (canny's low / high, ...);
    threshold_b: JsonFloat | None = None    # None or -1: its default
    mask: str | None = None                 # an inpaint / inpaint_only entry's own mask (base64, white = masked)
    processor_res: JsonInt | None = None    # A1111's Processor Res of canny / threshold / scribble (None or -1: the
    pixel_perfect: bool = False             # picture's own size); A1111's Pixel Perfect: the resolution from the size


class IPAdapterIn(JsonNumbers):
    """One image prompt: an IP-Adapter of the server's ControlNet folder by name (A1111's extension keeps them
    there), its picture (base64; none: an img2img / inpaint job's init picture, each script request's own, as a
    control's) and scale, the fractions of the steps it acts from and to (the request's `control_convention` picks
    them, as a control's); its image encoder is the image_encoder folder beside it or one up."""

    model_config = ConfigDict(protected_namespaces=())
    model: str
    image: str | None = None
    scale: JsonFloat = 1.0
    start: JsonFloat = 0.0
    end: JsonFloat = 1.0
    # per-layer scales multiplying `scale` (InstantStyle): diffusers' set_ip_adapter_scale dict, a preset
    # "style" / "style+layout" or the compact text ("down.block_2=0/1 up.block_0=0/1/0"); null: every layer
    layer_scales: str | dict[str, Any] | None = None
    # the ControlNet extension's IP-Adapter module of the A1111 unit it redraws ("ip-adapter_clip_g", ...): the
    # image encoder that module names (`ip_adapter_units.unit_image_encoder`), recorded as its "ControlNet N" line
    module: str | None = None
    # how an inpaint "Only masked" job fits the picture before cutting it to the drawn region: resize, crop, fill
    # (A1111's resize modes; null: crop, the ControlNet extension's default unit's)
    resize_mode: str | None = None
    # an IP-Adapter FaceID's InsightFace face embedding (normed_embedding, which sdlab does not compute): 512
    # numbers, a list of them per face, or base64 of a .npy file (`face_embeddings`); a FaceID adapter reads it
    # alone (no image), a FaceID Plus adapter with its image; face_shortcut: a FaceID Plus's shortcut scale
    # (null: 1 for a "plusv2" file, none for another)
    face_embedding: str | list[Any] | None = None
    face_shortcut: JsonFloat | None = None


class JobIn(NullsAreDefaults, JsonNumbers):
    """A generation: `GenerationRequest`'s fields, the mode, and optionally the model by name."""

    model_config = ConfigDict(protected_namespaces=())

    mode: Literal["txt2img", "img2img", "inpaint"] = "txt2img"
    model: str | None = None
    prompt: str = ""
    negative_prompt: str = ""
    prompt_2: str = ""                      # SDXL's second text encoder's prompt and negative (diffusers' names;
    negative_prompt_2: str = ""             # "": the prompt's / the negative's)
    styles: list[str] = Field(default_factory=list)   # A1111's prompt styles by name (`--styles-file`), applied to
                                                      # the prompts and the hires ones in order (`_styled_texts`)
    steps: JsonInt | None = None            # None: the model's preset, else its family's default
    sampler: str | None = None
    schedule: str | None = None
    cfg_scale: JsonFloat | None = None
    guidance_rescale: JsonFloat = 0.0       # diffusers' guidance_rescale (CFG rescale), 0..1
    s_min_uncond: JsonFloat = 0.0           # A1111's NGMS, NGMS all steps, Skip Early CFG, Pad conds and Pad conds
    s_min_uncond_all: bool = False          # v0 (`GUIDANCE_OPTIONS`, docs/samplers.md)
    skip_early_cond: JsonFloat = 0.0
    pad_cond_uncond: bool = False
    pad_cond_uncond_v0: bool = False
    pag_scale: JsonFloat = 0.0              # perturbed-attention guidance (diffusers' pag_scale, pag_adaptive_scale,
    pag_adaptive_scale: JsonFloat = 0.0     # pag_applied_layers; `sdlab txt2img --pag-scale`); 0: off
    pag_layers: tuple[str, ...] = DEFAULT_LAYERS
    seed: JsonInt = -1
    width: JsonInt | None = None
    height: JsonInt | None = None
    batch_size: JsonInt = 1
    batch_count: JsonInt = 1                # batches of batch_size drawn one after another, the seeds continuing
                                            # (A1111's Batch count, its API's n_iter)
    strength: JsonFloat | None = None       # img2img 0.75, inpaint 1.0
    init_image: str | None = None           # base64 or data URL
    resize_mode: str = "resize"             # init image to width x height: resize, crop, fill, latent (A1111's)
    mask_image: str | None = None           # white = repaint
    invert_mask: bool = False               # repaint the black part instead (A1111's Mask mode "Inpaint not masked")
    mask_round: bool = True                 # false: the mask's levels kept where A1111 rounds them (its mask_round)
    mask_blur: JsonFloat = 0.0
    inpaint_fill: str = "original"          # masked content: fill, original, latent noise, latent nothing, grey
    mask_grow: JsonInt = 0                  # ComfyUI's VAEEncodeForInpaint grow_mask_by (a ComfyUI-spelt sampler)
    inpaint_only_masked: bool = False       # draw only the mask's region (A1111's Inpaint area "Only masked") ...
    inpaint_padding: JsonInt = 32           # ... reaching this many pixels past the mask
    clip_skip: JsonInt = 1
    clip_skip_convention: str = "diffusers"  # "a1111": A1111's rule, SD1's encoder alone moves back (its pictures')
    sdxl_clip_l_skip: bool = False          # A1111's Clip skip SDXL: under its rule SDXL's CLIP-L moves back too
    emphasis: str = "Original"              # A1111's emphasis mode: "Original", "No norm", "Ignore", "None"; or
                                            # "ComfyUI" (ComfyUI's weights)
    old_prompt_editing: bool = False        # A1111's Old prompt editing timelines
    downcast_alphas_cumprod: bool = False   # A1111's Downcast alphas_cumprod
    zero_terminal_snr: bool = False         # A1111's Noise Schedule "Zero Terminal SNR"
    eta: JsonFloat | None = None
    s_churn: JsonFloat = 0.0                # k-diffusion's churn (A1111's Sigma churn / tmin / tmax: Euler, Heun,
    s_tmin: JsonFloat = 0.0                 # DPM2) and noise scale (its Sigma noise), as A1111 passes them
    s_tmax: JsonFloat | None = None         # (docs/samplers.md); s_tmax None or 0: no upper end
    s_noise: JsonFloat = 1.0
    unipc_variant: str = "bh1"              # A1111's UniPC variant, order and lower order final (its uni_pc_*
    unipc_order: JsonInt = 3                # options, which its UniPC pictures record)
    unipc_lower_order_final: bool = True
    schedule_sigma_min: JsonFloat = 0.0     # A1111's Schedule min / max sigma and rho: the schedule's ends and rho,
    schedule_sigma_max: JsonFloat = 0.0     # 0 = the model's / the schedule's
    schedule_rho: JsonFloat = 0.0
    discard_penultimate_sigma: bool = False  # A1111's Discard penultimate sigma
    old_karras_sigmas: bool = False         # A1111's use_old_karras_scheduler_sigmas: ends 0.1 / 10 where unset
    beta_alpha: JsonFloat = 0.6             # the beta schedules' Beta(alpha, beta) (A1111's Beta schedule alpha / beta)
    beta_beta: JsonFloat = 0.6
    sgm_noise_multiplier: bool = False      # A1111's SGM noise multiplier: txt2img's start noise sqrt(1 + sigma^2)
    extra_noise: JsonFloat = 0.0            # A1111's Extra noise: img2img's and the hires pass's start noise again
    inpainting_mask_weight: JsonFloat = 1.0  # A1111's Conditional mask weight (9-channel inpainting models)
    image_cfg_scale: JsonFloat | Literal["none"] | None = None  # an edit (InstructPix2Pix) model's image guidance
                                            # (A1111's Image CFG scale); unset / null: 1.5 in img2img / inpaint
                                            # (diffusers' and A1111's UI's); "none": none (`NO_IMAGE_GUIDANCE`)
    # the drawing conventions a job records, so that its record draws it again (a ComfyUI-spelt sampler's are
    # recorded under A1111's name: `GenerationRequest`'s module docstring)
    eta_noise_seed_delta: JsonInt | None = None  # A1111's ENSD: step noise from seed + this; unset: the request's
                                            # (1 for a ComfyUI spelling that draws step noise, else 0)
    init_noise: str | None = None           # the start noise's scale: sigma_max, vp, diffusers_leading, comfyui
    batch_noise: str = "per_image"          # a batch's noise: a generator per image's seed, or "comfyui": one
                                            # generator of the seed for the batch, as ComfyUI's KSampler
    img2img_convention: str = "diffusers"   # strength -> steps: diffusers, a1111, a1111_fix_steps, comfyui, lcm
    control_convention: str = "diffusers"   # the steps a control's start / end select: diffusers' or "a1111"'s
    zero_empty_negative: bool | None = None  # an empty negative: zeros or "" encoded (False); unset: the model's
                                            # rule (False for a ComfyUI spelling)
    subseed: JsonInt | None = None          # variation seed (A1111); used when subseed_strength > 0
    subseed_strength: JsonFloat = 0.0
    rng: str = "CPU"                        # the noise's random source: CPU, GPU or NV (A1111's RNG)
    seed_resize_from_w: JsonInt = 0         # A1111's Seed resize from (pixels; 0: off)
    seed_resize_from_h: JsonInt = 0
    hr_scale: JsonFloat | None = None       # hires fix (txt2img): a second pass at this multiple ...
    hr_width: JsonInt | None = None         # ... or at this size
    hr_height: JsonInt | None = None
    hr_upscaler: str | None = None
    hr_steps: JsonInt | None = None
    hr_denoise: JsonFloat | None = None
    hr_sampler: str | None = None           # the second pass's own sampler, schedule and prompts (A1111's Hires
    hr_schedule: str | None = None          # sampler, schedule type, prompt, negative prompt); unset: the first's
    hr_eta: JsonFloat | None = None         # the second pass's eta; unset: eta
    hr_seed: JsonInt | None = None          # the second pass's seed and CFG scale; unset: the first's
    hr_cfg_scale: JsonFloat | None = None
    hr_convention: str = "a1111"            # "comfyui": ComfyUI's two-pass graph (hr_upscaler one of its latent
    hr_crop: str = "disabled"               # methods, hr_crop LatentUpscale's "disabled" / "center")
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    disable_extra_networks: bool = False    # A1111's: the prompts' <kind:...> tags drawn as no text, none applied,
                                            # recorded as sent (a job of the A1111 API drawn so records it)
    tiling: bool = False                    # a seamless picture, whose edges wrap around (A1111's Tiling)
    token_merging_ratio: JsonFloat = 0.0    # A1111's Token merging ratio (tomesd): the fraction of the full-resolution
                                            # tokens merged before each self-attention, 0 <= r < 1; 0: none
    token_merging_ratio_hr: JsonFloat = 0.0  # the hires pass's; 0: token_merging_ratio's
    freeu: FreeUIn | None = None            # FreeU on the model's U-Net (not a refiner's); null: off
    deep_cache: DeepCacheIn | None = None   # DeepCache on the model's U-Net (not a refiner's); null: off
    refiner: str | None = None              # an SDXL refiner (a model's title or name) that finishes the schedule
    refiner_switch: JsonFloat = 0.8         # ... after this fraction of it drawn by `model`
    refiner_convention: str = "diffusers"   # ... at the step diffusers' denoising_end picks, "a1111"'s, "a1111_steps"'s
    # SDXL's micro-conditioning (diffusers' pipeline arguments): sizes [height, width], crop corners [top, left]
    original_size: tuple[JsonInt, JsonInt] | None = None   # None: the picture's size
    crops_coords_top_left: tuple[JsonInt, JsonInt] = (0, 0)
    target_size: tuple[JsonInt, JsonInt] | None = None     # None: the picture's size
    aesthetic_score: JsonFloat = 6.0                        # the refiner's
    negative_original_size: tuple[JsonInt, JsonInt] | None = None   # None: the positive's
    negative_crops_coords_top_left: tuple[JsonInt, JsonInt] = (0, 0)
    negative_target_size: tuple[JsonInt, JsonInt] | None = None     # None: the positive's
    negative_aesthetic_score: JsonFloat = 2.5
    preset: str | None = None               # few-step settings (pipeline/presets.py); the fields given win
    loras: list[LoraIn] = Field(default_factory=list)
    vae: str | None = None                  # a VAE file by its name in GET /sdapi/v1/sd-vae, "None" (the model's
                                            # own), null / "Automatic" (the VAE found near it, else its own)
    controls: list[ControlIn] = Field(default_factory=list)
    ip_adapters: list[IPAdapterIn] = Field(default_factory=list)
    script_name: str | None = None          # one of A1111's selectable scripts (`GET /api/scripts`), drawn as its
    script_args: list[Any] = Field(default_factory=list)   # API draws it (`script_jobs`); its args in its order

    @field_validator("token_merging_ratio", "token_merging_ratio_hr", mode="before")
    @classmethod
    def _ratio_is_no_bool(cls, value: Any, info: ValidationInfo) -> Any:
        """true is no ratio, as the A1111 API's options refuse it: named with its range."""
        if isinstance(value, bool):
            raise ValueError(f"{info.field_name} must be a number in [0, 1), got {str(value).lower()}")
        return value

    @field_validator("resize_mode", "inpaint_fill", mode="before")
    @classmethod
    def _word_in_any_case(cls, value: Any) -> Any:
        """A mode's word in any case and spacing ("Crop", " LATENT NOISE"), as rng, samplers and the CLI's
        choices are read."""
        return " ".join(value.lower().split()) if isinstance(value, str) else value

    @field_validator("image_cfg_scale", mode="before")
    @classmethod
    def _none_in_any_case(cls, value: Any) -> Any:
        """"none" in any case and spacing ("None", " NONE"), as the CLI's --image-cfg-scale reads it."""
        if isinstance(value, str) and value.strip().lower() == NO_IMAGE_GUIDANCE:
            return NO_IMAGE_GUIDANCE
        return value


SDXL_CONDITIONING = ("original_size", "crops_coords_top_left", "target_size", "aesthetic_score",
                     "negative_original_size", "negative_crops_coords_top_left", "negative_target_size",
                     "negative_aesthetic_score")


def sdxl_conditioning(body: JobIn) -> dict[str, Any]:
    """The job's SDXL conditioning fields, as `GenerationRequest` names them."""
    return {name: getattr(body, name) for name in SDXL_CONDITIONING}


PROMPT_OPTIONS = ("emphasis", "old_prompt_editing", "downcast_alphas_cumprod", "zero_terminal_snr")
"""The job's A1111 Emphasis, Old prompt editing timelines, Downcast alphas_cumprod and Noise Schedule."""
SIGMA_OPTIONS = ("s_churn", "s_tmin", "s_tmax", "s_noise", "schedule_sigma_min", "schedule_sigma_max", "schedule_rho",
                 "discard_penultimate_sigma", "old_karras_sigmas")
"""The job's churn, noise scale and schedule overrides, named as `GenerationRequest` names them."""
UNIPC_OPTIONS = ("unipc_variant", "unipc_order", "unipc_lower_order_final")
"""The job's A1111 UniPC options."""
NOISE_OPTIONS = ("beta_alpha", "beta_beta", "sgm_noise_multiplier", "extra_noise", "inpainting_mask_weight")
"""The job's A1111 Beta schedule, SGM noise multiplier, Extra noise and Conditional mask weight."""
GUIDANCE_OPTIONS = ("guidance_rescale", "s_min_uncond", "s_min_uncond_all", "skip_early_cond", "pad_cond_uncond",
                    "pad_cond_uncond_v0", "pag_scale", "pag_adaptive_scale", "pag_layers")
"""The job's guidance options: diffusers' guidance_rescale, A1111's NGMS, NGMS all steps, Skip Early CFG, Pad conds,
Pad conds v0, diffusers' perturbed-attention guidance (PAG)."""


def _image_cfg_scale(body: JobIn) -> float | None:
    """The job's image guidance scale: as sent, "none" (`NO_IMAGE_GUIDANCE`) None, no image guidance (the picture in
    both passes, which image scale 1 draws too; recorded as `Image guidance: none`), else 1.5 for a job with an init
    picture (an edit model reads it): unset and null are that default, as every null of the native API."""
    if body.image_cfg_scale == NO_IMAGE_GUIDANCE:
        return None
    if body.image_cfg_scale is not None or body.mode == "txt2img":
        return body.image_cfg_scale
    return DEFAULT_IMAGE_CFG_SCALE


def _ensd(body: JobIn) -> dict[str, int]:
    """The job's ENSD as `GenerationRequest` takes it: none when unset, which the request's rule fills in."""
    return {} if body.eta_noise_seed_delta is None else {"eta_noise_seed_delta": body.eta_noise_seed_delta}


def _vae_fields(service: Service, name: str | None) -> dict[str, Any]:
    """`JobSpec`'s VAE fields of the job's `vae`: null, "Automatic" or "auto" draw a single-file model with the
    VAE A1111's Automatic finds near it (`VaeFiles.near`: the first listed file whose name starts with the model's
    stem, else the sidecar beside it), if any, "None" with its own, a name of the server's VAE list
    (`GET /sdapi/v1/sd-vae`) with that file (or a VAE-folder file by its path there, `VaeFiles.find`); another name
    is a 404 naming the list, as an unknown LoRA's."""
    if name is None or name in AUTOMATIC_VAE:
        return {}
    if name == "None":
        return {"sidecar_vae": False}
    found = service.registry.vaes.find(name)
    if found is None:
        known = ", ".join(service.registry.vaes.names()) or "none"
        raise BadRequest(f"unknown VAE {name!r}; this server has: {known}", 404, "VAE not found")
    return {"sidecar_vae": False, "vae": name}           # the name `find` takes: a path for a file named twice


def _styled_texts(service: Service, body: JobIn) -> dict[str, str]:
    """The job's prompts (`styles.PROMPT_FIELDS`) with its `styles` applied, as A1111's `setup_prompts`; a name
    no styles file of the server has is a 404 naming those it has. The styles as the files are now, read once: a
    file edited meanwhile changes the next request, never half of this one."""
    styles = service.styles
    if unknown := styles.unknown(body.styles):
        known = ", ".join(map(repr, styles.styles)) or "none (sdlab serve --styles-file)"
        raise BadRequest(f"unknown style {', '.join(map(repr, unknown))}; this server has: {known}", 404,
                         "Style not found")
    return styled_options({key: getattr(body, key) for key in PROMPT_FIELDS}, styles, body.styles)


def service_of(request: Request) -> Service:
    return request.app.state.service


def job_json(record: dict[str, Any], live: Job | None = None, position: int | None = None) -> dict[str, Any]:
    if live is not None:
        record = live.record()
    out = {key: record[key] for key in ("id", "status", "mode", "model", "request", "infotexts", "error",
                                        "created", "started", "finished", "step", "steps")}
    out["images"] = [image_url(name) for name in record["images"]]
    if position is not None:
        out["position"] = position
    return out


@router.post("/jobs", status_code=202)
def create_job(body: JobIn, request: Request) -> dict[str, Any]:
    service = service_of(request)
    limits = service.config.limits
    init = mask = None
    if body.init_image is not None and body.mode == "txt2img":     # else dropped unread: a picture of the prompt
        raise BadRequest("init_image is given but mode is 'txt2img', which reads none: send mode 'img2img' (or "
                         "'inpaint' with mask_image)", 422)
    if body.mask_image is not None and body.mode != "inpaint":
        raise BadRequest(f"mask_image is given but mode is {body.mode!r}, which reads none: send mode 'inpaint'", 422)
    if body.mode != "txt2img":
        if body.init_image is None:
            raise BadRequest(f"{body.mode} needs init_image (a base64 PNG or data URL)", 422)
        init = decode_image(body.init_image, "init_image", limits)
    if body.mode == "inpaint":
        if body.mask_image is None:
            raise BadRequest("inpaint needs mask_image (white = repaint)", 422)
        mask = decode_image(body.mask_image, "mask_image", limits)
    spec = job_spec(service, body, init, mask)
    try:                                                # over the model's preset (the worker applies that one)
        preset = spec_with_preset(spec, body.preset, body.mode) if body.preset else spec
    except RequestError as err:
        raise BadRequest(str(err), 422) from None
    script = selected_script(body.script_name, "txt2img" if body.mode == "txt2img" else "img2img")
    if script is not None:                              # each request takes the preset (`ScriptJob.job_of`)
        return anyio.from_thread.run(script_jobs.start, service, body, spec, script)
    job, position = service.submit(preset, body.mode, body.model)
    return {"id": job.id, "status": job.status, "position": position}


def job_spec(service: Service, body: JobIn, init: Image.Image | None, mask: Image.Image | None) -> JobSpec:
    """The job `body` asks for, its init picture and mask decoded (`init`, `mask`; None for none), before its
    preset and script: what `POST /api/jobs` queues, and the OpenAI images routes (`openai_images`) with it."""
    limits = service.config.limits
    if not 1 <= body.batch_count <= MAX_BATCH_COUNT:
        raise BadRequest(f"batch_count must be 1..{MAX_BATCH_COUNT}, got {body.batch_count}", 422)
    strength = body.strength if body.strength is not None else (1.0 if body.mode == "inpaint" else 0.75)
    try:
        schedule = schedule_name(body.schedule)         # sdlab's names and A1111's ("SGM Uniform", "automatic")
    except BadRequest as err:
        raise BadRequest(err.message) from None
    texts = _styled_texts(service, body)
    generation = GenerationRequest(
        prompt=texts["prompt"], negative_prompt=texts["negative_prompt"], prompt_2=body.prompt_2,
        negative_prompt_2=body.negative_prompt_2, sampler=body.sampler,
        schedule=schedule, cfg_scale=body.cfg_scale, seed=body.seed, width=body.width, height=body.height,
        batch_size=body.batch_size, clip_skip=body.clip_skip, clip_skip_convention=body.clip_skip_convention,
        sdxl_clip_l_skip=body.sdxl_clip_l_skip,
        eta=body.eta, init_noise=body.init_noise, batch_noise=body.batch_noise,
        img2img_convention=body.img2img_convention, zero_empty_negative=body.zero_empty_negative,
        control_convention=body.control_convention,
        init_image=init, mask_image=mask,
        strength=strength, resize_mode=body.resize_mode, mask_blur=body.mask_blur, invert_mask=body.invert_mask,
        mask_round=body.mask_round,
        inpaint_fill=body.inpaint_fill, mask_grow=body.mask_grow,
        inpaint_only_masked=body.inpaint_only_masked, inpaint_padding=body.inpaint_padding,
        image_cfg_scale=_image_cfg_scale(body),
        subseed=body.subseed if body.subseed_strength else None,
        subseed_strength=body.subseed_strength, rng=body.rng, seed_resize_from_w=body.seed_resize_from_w,
        seed_resize_from_h=body.seed_resize_from_h, hr_scale=body.hr_scale, hr_width=body.hr_width,
        hr_height=body.hr_height, hr_upscaler=body.hr_upscaler, hr_steps=body.hr_steps, hr_denoise=body.hr_denoise,
        hr_sampler=body.hr_sampler, hr_schedule=body.hr_schedule, hr_eta=body.hr_eta, hr_prompt=texts["hr_prompt"],
        hr_seed=body.hr_seed, hr_cfg_scale=body.hr_cfg_scale, hr_convention=body.hr_convention, hr_crop=body.hr_crop,
        hr_negative_prompt=texts["hr_negative_prompt"],
        controls=native_controls([c.model_dump() for c in body.controls], service.controlnets, limits, init,
                                 body.resize_mode, body.control_convention),
        ip_adapters=native_ip_adapters([a.model_dump() for a in body.ip_adapters], service.controlnets, limits,
                                       body.control_convention, init),
        steps=body.steps, tiling=body.tiling, token_merging_ratio=body.token_merging_ratio,
        token_merging_ratio_hr=body.token_merging_ratio_hr, freeu=None if body.freeu is None else body.freeu.model_dump(),
        deep_cache=None if body.deep_cache is None else body.deep_cache.model_dump(),
        **sdxl_conditioning(body), **_ensd(body),
        **{name: getattr(body, name) for name in PROMPT_OPTIONS},
        **{name: getattr(body, name) for name in (*SIGMA_OPTIONS, *NOISE_OPTIONS)},
        **{name: getattr(body, name) for name in (*GUIDANCE_OPTIONS, *UNIPC_OPTIONS)},
    )
    try:
        check_sdxl_conditioning(generation)
    except RequestError as err:
        raise BadRequest(str(err), 422) from None
    unset = unset_preset_fields({key for key in body.model_fields_set if getattr(body, key) is not None}, generation)
    spec = JobSpec(generation, loras=tuple(LoraChoice(l.name, l.weight) for l in body.loras),
                   batch_count=body.batch_count, model_preset_fills=unset, **_vae_fields(service, body.vae),
                   extra_networks=not body.disable_extra_networks,
                   styles=tuple(body.styles), typed_prompts={key: getattr(body, key) for key in PROMPT_FIELDS},
                   refiner=refiner_choice(body.refiner, body.refiner_switch, body.refiner_convention, "refiner_switch"))
    return spec


@router.get("/jobs")
def list_jobs(request: Request, limit: int = Query(100, ge=1, le=1000), before: str | None = None) -> dict[str, Any]:
    """The newest `limit` jobs; with `before` (a job's id), the `limit` listed after it: the next page."""
    service = service_of(request)
    try:
        rows = service.store.jobs(limit, without="script_job", before=before)   # a script's requests: its job's
    except KeyError:
        raise BadRequest(f"no job {before!r} (before)", 404, "Not Found") from None
    return {"jobs": [job_json(r, script_jobs.live_job(service, r["id"])) for r in rows]}


@router.get("/scripts")
def scripts(request: Request) -> dict[str, Any]:
    return script_jobs.native_scripts(service_of(request))


@router.get("/control-models")
def control_models(request: Request) -> dict[str, list[str]]:
    """The ControlNet folder's models by the job field that may name each, rescanned first: `controls` its
    ControlNets and T2I-Adapters, `ip_adapters` its IP-Adapters (told apart by their tensors:
    `model_folders.control_file_kind`). A1111's `/controlnet/model_list` lists them together, as the extension,
    whose units draw either by their module."""
    folder = service_of(request).controlnets
    folder.refresh()
    return {"controls": folder.titles("controlnet"), "ip_adapters": folder.titles("ip-adapter")}


@router.get("/model-size")
def model_size(request: Request, model: str = "") -> dict[str, Any]:
    """The size a job of `model` (a title; none: the server's selected model) draws at where it sets no width or
    height: the model's default side (its file's `modelspec.resolution`, a folder's sample_size, else its
    family's), from its names and shapes alone, no weight read (`plan_checkpoint`); the web UI's Pixel perfect
    Preview reads it. One sdlab cannot draw is a 422 naming it by its title."""
    checkpoint = service_of(request).checkpoint(model or None)
    try:
        side = read_per_version(checkpoint.path, _default_side)
    except CheckpointError as err:
        raise BadRequest(checkpoint.without_paths(str(err)), 422) from None
    return {"model": checkpoint.title, "width": side, "height": side}


def _default_side(path: Path) -> int:
    from sdlab.checkpoints.load import plan_checkpoint

    return plan_checkpoint(path).report.to_json()["default_size"]


def _find(service: Service, job_id: str) -> tuple[dict[str, Any], Job | None]:
    live = script_jobs.live_job(service, job_id)
    record = live.record() if live is not None else service.store.job(job_id)
    if record is None:
        raise BadRequest(f"no job {job_id!r}", 404, "Not Found")
    return record, live


@router.get("/jobs/{job_id}")
def get_job(job_id: str, request: Request) -> dict[str, Any]:
    service = service_of(request)
    record, live = _find(service, job_id)
    return job_json(record, live, service.queue.position(live) if live is not None else None)


@router.delete("/jobs/{job_id}")
def cancel_job(job_id: str, request: Request) -> dict[str, Any]:
    service = service_of(request)
    record, live = _find(service, job_id)
    running = service.script_jobs.get(job_id)
    if running is not None:
        return {"id": job_id, "status": running.cancel()}
    status = service.queue.cancel(live) if live is not None else record["status"]
    return {"id": job_id, "status": status}


@router.post("/jobs/{job_id}/delete")
def delete_job(job_id: str, request: Request) -> dict[str, Any]:
    """Delete a finished job from the history with its pictures, all or nothing (`job_deletion.delete_job`): a
    queued or running one is a 409."""
    service = service_of(request)
    return job_deletion.delete_job(service.store, service.images_dir, job_id, script_jobs.live_job(service, job_id))


@router.post("/jobs/{job_id}/interrupt")
def interrupt_job(job_id: str, request: Request) -> dict[str, Any]:
    """A1111's Interrupt of this job (`JobQueue.interrupt`, a script's `ScriptJob.interrupt`)."""
    return _stop_running(job_id, request, JobQueue.interrupt, script_jobs.ScriptJob.interrupt)


@router.post("/jobs/{job_id}/skip")
def skip_job(job_id: str, request: Request) -> dict[str, Any]:
    """A1111's Skip of the batch this job is drawing (`JobQueue.skip`, a script's `ScriptJob.skip`)."""
    return _stop_running(job_id, request, JobQueue.skip, script_jobs.ScriptJob.skip)


def _stop_running(job_id: str, request: Request, stop: Callable[[JobQueue, Job], bool],
                  stop_script: Callable[[script_jobs.ScriptJob], bool]) -> dict[str, Any]:
    """`stop` the job if it is the one running (a script's job: `stop_script`); `stopped` says whether it was."""
    service = service_of(request)
    record, live = _find(service, job_id)
    running = service.script_jobs.get(job_id)
    if running is not None:
        return {"id": job_id, "status": record["status"], "stopped": stop_script(running)}
    stopped = live is not None and stop(service.queue, live)
    return {"id": job_id, "status": record["status"], "stopped": stopped}


@router.get("/jobs/{job_id}/events")
async def job_events(job_id: str, request: Request) -> StreamingResponse:
    service = service_of(request)
    record, live = await asyncio.to_thread(_find, service, job_id)     # a history read: off the event loop

    async def stream():
        if live is None:                                # a job of an earlier run: its last event
            name, data = final_event(record) if record["status"] in FINAL_STATES else ("failed", {"error": "lost"})
            yield _sse(name, data)
            return
        queue = live.subscribe(asyncio.get_running_loop())
        try:
            while True:
                try:
                    name, data = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except asyncio.TimeoutError:            # a comment line keeps proxies from closing a long wait
                    yield ": keepalive\n\n"
                    continue
                if name == "step":
                    preview = live.preview
                    data = {**data, "preview": jpeg_data_url(preview) if preview is not None else None}
                yield _sse(name, data)
                if name in ("done", "failed", "cancelled"):
                    return
        finally:
            live.unsubscribe(queue)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


@router.get("/images/{name}")
def get_image(name: str, request: Request) -> Response:
    service = service_of(request)
    response = opened_file(service.images_dir / name, "image/png") if IMAGE_NAME.match(name) else None
    return response or JSONResponse({"detail": "Not Found"}, status_code=404)


FILE_CHUNK = 1 << 16


def opened_file(path: Path, media_type: str, headers: dict[str, str] | None = None) -> StreamingResponse | None:
    """The file at `path` sent from a handle opened now (None where there is no such file), so a delete after this
    call (POST /api/jobs/ID/delete) leaves the answer whole: the open handle keeps the file's bytes."""
    try:
        handle = path.open("rb")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    size = os.fstat(handle.fileno()).st_size

    def chunks():
        with handle:
            while chunk := handle.read(FILE_CHUNK):
                yield chunk

    return StreamingResponse(chunks(), media_type=media_type,
                             headers={"Content-Length": str(size), **(headers or {})})


class PictureIn(NullsAreDefaults, JsonNumbers):
    image: str                              # a PNG, JPEG or WebP: base64 or a data URL


@router.post("/parameters")
def picture_parameters(body: PictureIn, request: Request) -> dict[str, Any]:
    """A picture's parameters as the settings of a job that draws it again, read as `sdlab txt2img --from-png`
    reads them (`picture_settings`), with its parameters text (`info`) and the labels they leave `unread`. The
    texts of the server's styles its prompts hold are taken out of them and the styles named (`styles`; left out
    where none is found under A1111's default "Apply if any") as `/sdapi/v1/png-info` does under the option
    `infotext_styles` (`styles.infotext_styles`). A picture without parameters, with another program's metadata
    or with a value that is not one is a 422."""
    raw = decode_base64(body.image, "image")
    with opened_picture(raw, "image", service_of(request).config.limits):   # reading its text decodes it
        text = read_parameters(io.BytesIO(raw))
        foreign = foreign_metadata(io.BytesIO(raw), text)
    if foreign:
        raise BadRequest(f"the picture holds {foreign}, not the A1111 parameters text sdlab reads", 422)
    if not text:
        raise BadRequest("the picture carries no generation parameters", 422)
    service = service_of(request)
    parameters = infotext_styles(parse_parameters(text), service.styles,
                                 service.options.get("infotext_styles", "Apply if any"))    # A1111's default
    styles = parameters.pop(STYLES_ARRAY, None)      # none: no style found, under "Apply if any"
    try:
        settings = picture_settings(parameters, service.registry)
    except ValueError as err:
        raise BadRequest(str(err), 422) from None
    if styles is not None:
        settings["styles"] = styles
    return {"info": text, "settings": settings, "unread": unread_labels(parameters, service.registry),
            "control_units": control_units(parameters)}
