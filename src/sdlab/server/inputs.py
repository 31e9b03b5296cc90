"""Request fields -> `GenerationRequest`: images from base64, the server's limits, A1111's names.

Everything a client can get wrong is a `BadRequest` (HTTP 4xx) naming the field; nothing here touches
the model, so bad requests are refused before they are queued.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, model_validator

from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.upscaler import Upscaler, load_upscaler
from sdlab.diffusion.discretization import DISCRETIZATIONS, steps_run
from sdlab.diffusion.samplers import comfyui_spelling, get_sampler
from sdlab.diffusion.prediction import Prediction
from sdlab.families.loaded import ModelBundle
from sdlab.families.sdxl import SDXL
from sdlab.models.unet import UNetConfig
from sdlab.diffusion.schedule_names import (
    A1111_SCHEDULERS, a1111_name, schedule_from_a1111, schedule_key, split_a1111_sampler,
)
from sdlab.pipeline.image_prompt import check_image_prompt_layers, check_image_prompts_fit
from sdlab.pipeline.images import ImageTooLargeError, open_image, upright_8bit
from sdlab.pipeline.infotext import LoraRef
from sdlab.pipeline.png_info import ParametersError
from sdlab.pipeline.presets import PRESETS, get_preset
from sdlab.pipeline.comfy_image_upscale import PictureStep
from sdlab.pipeline.comfy_prompt import area_rows
from sdlab.pipeline.control import control_input
from sdlab.pipeline.hires import hires_steps, pass_sizes
from sdlab.pipeline.plan import (
    check_clip_skip, check_deep_cache_unet, check_pag_layers, check_passes_fit, check_prompt_chunks,
    check_refiner_convention, check_second_prompts, clip_skip_as_drawn, prompt_parts, refiner_split,
)
from sdlab.pipeline.control_work import active_steps, controlnet_config, controlnet_share
from sdlab.pipeline.memory import EDIT_IMAGE_ROW, PAG_ROW, unet_row_names, unet_rows
from sdlab.pipeline.prompt_schedule import composable_parts
from sdlab.pipeline.prompt_syntax import strip_comments
from sdlab.pipeline.request import (
    NO_IMAGE_GUIDANCE, SIZE_MULTIPLE, GenerationRequest, RequestError, check_batch_seeds, check_refiner_switch,
    requested_size, resolve,
)
from sdlab.pipeline.upscale import (
    LATENT_UPSCALE_MODES, PLAIN_UPSCALERS, UpscaleError, canonical_latent_name, missing_upscaler,
)
from sdlab.server.config import Limits
from sdlab.server.model_folders import ModelFile, ModelFolder
from sdlab.utils.text import not_utf8


class BadRequest(Exception):
    """A request the server refuses: `status` (4xx), `detail` (A1111's short text), `message` (the why), `refused`
    (what it refuses where a caller tells refusals apart: the `RequestError.refused` it came from, else None)."""

    def __init__(self, message: str, status: int = 400, detail: str | None = None,
                 refused: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail or message
        self.message = message
        self.refused = refused


@dataclass(frozen=True)
class LoraChoice:
    name: str
    weight: float


@dataclass(frozen=True)
class RefinerChoice:
    """An SDXL refiner a job names: a checkpoint of the server's list, the fraction of the schedule the base
    model runs first and the rule that picks the handoff step from it (`plan.handoff_index`)."""
    name: str
    switch_at: float = 0.8
    convention: str = "diffusers"


@dataclass(frozen=True)
class JobSpec:
    """One generation as the worker runs it: the request (seed fixed), the model and the LoRAs by name."""

    request: GenerationRequest
    batch_count: int = 1                     # batches of request.batch_size drawn one after another (A1111's
                                             # n_iter), the seeds continuing (`request.next_batch`)
    model: str | None = None                 # a registry name; None = the server's current model
    loras: tuple[LoraChoice, ...] = ()
    refiner: RefinerChoice | None = None     # finishes the schedule (its name: the checkpoint's title once queued)
    prompt_to_record: str | None = None      # the prompt as written, LoRA tags included
    extra_networks: bool = True              # False: A1111's disable_extra_networks: the prompts' <kind:...> tags
                                             # drawn as no text, none looked up or applied, recorded as sent
    hr_prompt_to_record: str = ""            # the hires prompt as written where it is drawn without its tags
                                             # (`extra_networks` False; "": the prompt's)
    tag_loras: tuple[LoraRef, ...] = ()      # the LoRAs its tags merge, as the parameters name them
    hires_tag_loras: tuple[LoraRef, ...] = ()   # the LoRAs the hires prompt's tags merge in the second pass
    extra: dict[str, Any] = field(default_factory=dict)   # route-specific data (A1111's echo)
    model_preset_fills: frozenset[str] = frozenset()      # the fields the model's preset fills (if it names
                                                          # one): unset by the client and by an explicit preset
    unset_schedule: str | None = None        # a schedule still unset after the model's preset: A1111's
                                             # "Automatic" for the sampler on its routes; None: the family's
    sidecar_vae: bool = True                 # a single-file model's A1111 sidecar VAE drawn, if it has one
                                             # (A1111's sd_vae "Automatic"); False: its own VAE ("None")
    vae: str | None = None                   # else this file of the server's VAE list (A1111's sd_vae by name);
                                             # None: the checkpoint's own (`vae_files.VaeChoice`)
    styles: tuple[str, ...] = ()             # the prompt styles applied to the request's prompts, by name, and
    typed_prompts: dict[str, str] = field(default_factory=dict)   # those prompts as sent (`recorded`)
    script_job: str | None = None            # the native script job this is a request of (its row tagged so)
    first_pass: Callable[[list[Image.Image], list[str]], None] | None = None
    """Where set, called with the hires fix's first-pass pictures and their parameters texts once that pass ends (the
    ComfyUI API's outputs of a two-pass graph's first KSampler, which it writes itself)."""
    picture_upscaler: ModelFile | None = None
    """Where set, the `--upscalers-dir` model of the `picture_steps` step `ThroughModel` (ComfyUI's
    ImageUpscaleWithModel, `pipeline.comfy_image_upscale`): the ComfyUI API's UpscaleModelLoader."""
    picture_steps: tuple[PictureStep, ...] = ()
    """What every picture passes through, in order, before it is written (the ComfyUI API's ImageUpscaleWithModel,
    ImageScale, ImageScaleBy; `comfy_image_upscale.comfy_pictures`); (): the pictures as drawn."""
    picture_upscaler_failed: Callable[[int | None], None] | None = None
    """Where set, called with the index of the `picture_steps` step whose work failed (None: reading
    `picture_upscaler`), before the job fails with that error: the ComfyUI API names that node, not the KSampler."""

    def shown(self, request: GenerationRequest) -> GenerationRequest:
        """`request`, drawn for this job, with the prompts its pictures and record show: those drawn, or where
        they were drawn without their extra-network tags (`extra_networks` False) the prompts as written, as
        A1111's infotext and `Processed` keep `all_prompts` and `hr_prompt` with the tags its `parse_prompts`
        takes out of the prompts drawn."""
        if self.extra_networks:
            return request
        return replace(request, prompt=self.prompt_to_record, hr_prompt=self.hr_prompt_to_record)

    def recorded(self, parameters: dict[str, Any]) -> dict[str, Any]:
        """The request's `parameters` as the job's record keeps them: an img2img's image scale None as the native
        API's "none" (its null is 1.5); with styles, the prompts as sent and the styles, which draw the job again
        (the drawn prompts are its pictures' parameters)."""
        if self.request.init_image is not None and parameters.get("image_cfg_scale", 0.0) is None:
            parameters = {**parameters, "image_cfg_scale": NO_IMAGE_GUIDANCE}
        if not self.styles:
            return parameters
        typed = {key: text for key, text in self.typed_prompts.items() if key in parameters}
        return {**parameters, **typed, "styles": list(self.styles)}


NO_REFINER = ("", "None", "none")      # A1111's names of no refiner (`process_images_inner`)


def refiner_choice(name: object, switch_at: object, convention: str, switch_field: str) -> RefinerChoice | None:
    """The refiner a request names (None for none: null or `NO_REFINER`), its switch fraction checked (a 422
    naming the route's `switch_field` outside (0, 1)); the name is looked up when the job is queued."""
    if name is None or name in NO_REFINER:
        return None
    if not isinstance(name, str):
        raise BadRequest(f"the refiner must be a model name, got {name!r}", 422)
    if isinstance(switch_at, bool) or not isinstance(switch_at, (int, float)):
        raise BadRequest(f"{switch_field} must be a number, got {switch_at!r}", 422)
    try:
        return RefinerChoice(name, check_refiner_switch(switch_at, switch_field), check_refiner_convention(convention))
    except RequestError as err:
        raise BadRequest(str(err), 422) from None


PRESET_FIELDS = frozenset(key for preset in PRESETS.values() for mode in ("txt2img", "img2img")
                          for key in preset.options(mode))
"""The request fields a few-step preset sets (sampler, schedule, steps, cfg_scale, eta)."""


def unset_preset_fields(given: Collection[str], request: GenerationRequest) -> frozenset[str]:
    """The preset fields the client left to the server: not among the `given` request fields, or None."""
    return frozenset(key for key in PRESET_FIELDS if key not in given or getattr(request, key) is None)


def with_preset(request: GenerationRequest, name: str, mode: str, fields: Collection[str]) -> GenerationRequest:
    """`request` with `fields` (those the client left unset) taken from the preset `name` in `mode`; one
    rule for every route: the fields given win, then the request's preset, then the model's, then the
    defaults; a sampler given other than the preset's runs without its eta. An unknown name is a `RequestError`."""
    options = get_preset(name).options(mode, None if "sampler" in fields else request.sampler)
    return replace(request, **{key: value for key, value in options.items() if key in fields})


def spec_with_preset(spec: JobSpec, name: str, mode: str) -> JobSpec:
    """`spec` with the request's preset `name` (`with_preset`) over the fields it leaves to the model's preset,
    which then fills none (the request's preset wins over the model's)."""
    return replace(spec, request=with_preset(spec.request, name, mode, spec.model_preset_fills),
                   model_preset_fills=frozenset())


def unreadable_json_reason(err: BaseException | None) -> str | None:
    """Why Python's JSON reader stopped on a body without a JSONDecodeError, or None: bytes that are not UTF-8
    (JSON's encoding, RFC 8259; a UnicodeDecodeError) or arrays and objects nested past its depth (a
    RecursionError)."""
    if isinstance(err, UnicodeDecodeError):
        return f"it is not UTF-8 text (the byte 0x{err.object[err.start]:02X} at byte {err.start + 1})"
    if isinstance(err, RecursionError):
        return "its arrays and objects nest deeper than the server reads"
    return None


def read_json(raw: bytes | str) -> Any:
    """A request body read as JSON; a ValueError saying why it is none (`unreadable_json_reason`, or the
    JSONDecodeError), never a RecursionError, for the routes that read their body themselves."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as err:
        reason = unreadable_json_reason(err)
        raise (ValueError(reason) if reason else err) from None


class NullsAreDefaults(BaseModel):
    """A request body whose known fields that are null are left out, so they take their defaults: A1111 makes
    every request field optional (null = the default) and both APIs say null counts as unset. Unknown
    fields stay, for the models that refuse them. Its text, every string at any depth, is UTF-8 (`check_texts`)."""

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_unset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {key: value for key, value in data.items() if value is not None or key not in cls.model_fields}

    @model_validator(mode="before")
    @classmethod
    def _text_is_utf8(cls, data: Any) -> Any:
        check_texts(data)
        return data


def check_texts(data: Any, where: str = "") -> None:
    """A 422 `BadRequest` naming the first string of a JSON body `data` (keys and values, at any depth;
    `where`: the path to `data`) that is not UTF-8 text (`not_utf8`). JSON can escape a lone surrogate
    (``"caf\\udce9"``, a Latin-1 byte as Python's `surrogateescape` reads it), which no picture's text,
    job record or JSON answer can hold; refused here, it never reaches a job."""
    if isinstance(data, str):
        _check_text(data, where or "the request body")
    elif isinstance(data, dict):
        for key, value in data.items():
            _check_text(key, f"a field name in {where or 'the request body'}")
            check_texts(value, f"{where}.{key}" if where else key)
    elif isinstance(data, list):
        for index, item in enumerate(data):
            check_texts(item, f"{where}[{index}]")


def _check_text(text: str, where: str) -> None:
    problem = not_utf8(text, where)
    if problem is not None:
        raise BadRequest(problem, 422)


_DATA_URL = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,", re.ASCII)
_WHITESPACE = re.compile(r"[ \t\r\n\f\v]+")


def scheduler_rows() -> list[dict[str, Any]]:
    """`/sdapi/v1/schedulers`: A1111's rows sdlab implements, each aliased by sdlab's name of its schedule where
    that is another (the name a job's request records: "ddim_uniform" for "ddim"), then sdlab's other
    discretizations."""
    rows = [{"name": a1111_name(key), "label": label, "aliases": _recorded_name(key),
             "default_rho": {"karras": 7.0, "polyexponential": 1.0}.get(key, -1), "need_inner_model": False}
            for key, (label, _) in A1111_SCHEDULERS.items()]
    known = {target for _, target in A1111_SCHEDULERS.values()} | {row["name"] for row in rows}
    rows += [{"name": name, "label": name, "aliases": None, "default_rho": -1, "need_inner_model": False}
             for name in sorted(DISCRETIZATIONS) if name not in known]
    return rows


def _recorded_name(key: str) -> list[str] | None:
    """[sdlab's name of A1111's scheduler `key`] where `/sdapi/v1/schedulers` names it otherwise, else None."""
    target = A1111_SCHEDULERS[key][1]
    return [target] if target not in (None, a1111_name(key)) else None


def schedule_name(name: str | None) -> str | None:
    """An A1111 scheduler name or label, or an sdlab discretization name -> sdlab's name (None: default)."""
    if name is None or name == "":
        return None
    if not isinstance(name, str):
        raise BadRequest(f"scheduler must be a name, got {name!r}", 422)
    try:
        return schedule_from_a1111(name)
    except ValueError as err:
        raise BadRequest(str(err), 404, "Scheduler not found") from None


def sampler_and_schedule(name: str | None, scheduler: str | None) -> tuple[str | None, str | None]:
    """(sampler, schedule); an old combined name ("DPM++ 2M Karras", "Euler a SGM Uniform": any A1111
    scheduler, `split_a1111_sampler`) gives its schedule unless `scheduler` is set ("automatic" included),
    as A1111's API keeps the request's scheduler. A1111's keys mean A1111's schedules here: "beta" and
    "kl_optimal" are its Beta and KL Optimal (`a1111_name`), not ComfyUI's that sdlab's own names are. The
    sampler keeps a ComfyUI spelling (`sampler_as_asked`), which brings ComfyUI's conventions here too."""
    if isinstance(scheduler, str) and schedule_key(scheduler) in A1111_SCHEDULERS:
        scheduler = a1111_name(schedule_key(scheduler))
    schedule = schedule_name(scheduler)
    if name is None or name == "":
        return None, schedule
    if not isinstance(name, str):
        raise BadRequest(f"sampler must be a name, got {name!r}", 422)
    try:
        return sampler_as_asked(name), schedule
    except ValueError as err:
        split = split_a1111_sampler(name)
        try:
            base = sampler_as_asked(split[0]) if split is not None else None
        except ValueError:
            base = None
        if base is None:
            raise BadRequest(str(err), 404, "Sampler not found") from None
        return base, schedule if scheduler not in (None, "") else schedule_name(split[1])


def sampler_as_asked(name: str) -> str:
    """A sampler's name as a request keeps it: a ComfyUI spelling as written (`samplers.comfyui_spelling`: its
    conventions follow from it in `request.resolve`, as on every route), any other name as sdlab names the
    sampler; an unknown one is `UnknownSamplerError`."""
    spec = get_sampler(name)
    return name.strip() if comfyui_spelling(name) else spec.name


def decode_base64(data: Any, what: str) -> bytes:
    """The bytes of a base64 string or `data:image/...;base64,` URL, or `BadRequest`. Line breaks and other
    whitespace are skipped, as A1111's `b64decode` skips them (MIME-wrapped base64: Python's `encodebytes`,
    `base64 FILE`, `openssl base64`); any other character that is not base64 is refused, and an http(s) URL,
    which A1111 fetches, is refused by name (A1111's "Requests not allowed")."""
    if not isinstance(data, str):
        raise BadRequest(f"{what} must be a base64 string or a data URL, got {type(data).__name__}", 422)
    if data.lstrip()[:8].lower().startswith(("http://", "https://")):      # A1111 fetches these; sdlab never does
        raise BadRequest(f"{what} is an http(s) URL: this server does not fetch pictures; send the picture itself, "
                         "base64 or a data:image/...;base64, URL", 400, "Requests not allowed")
    try:
        return base64.b64decode(_WHITESPACE.sub("", _DATA_URL.sub("", data.strip(), count=1)), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{what} is not valid base64", 400, "Invalid encoded image") from None


def decode_image(data: Any, what: str, limits: Limits) -> Image.Image:
    """A base64 string or `data:image/...;base64,` URL -> a loaded PIL image, or `BadRequest`."""
    return image_from_bytes(decode_base64(data, what), what, limits)


def image_from_bytes(raw: bytes, what: str, limits: Limits) -> Image.Image:
    """An image file's bytes (`decode_base64`) -> a loaded PIL image made `upright_8bit` (turned by its EXIF
    orientation, as A1111's `decode_base64_to_image` and sdlab's own picture files), or `BadRequest`
    (`opened_picture`)."""
    with opened_picture(raw, what, limits) as image:
        image.load()
        return upright_8bit(image)


@contextmanager
def opened_picture(raw: bytes, what: str, limits: Limits) -> Iterator[Image.Image]:
    """The picture a client sent (`what`, its file's bytes) opened, not decoded, once its header passed
    `check_picture_size`; what reads it within reads it from `raw`. A header past 4 x `--max-pixels`, or past
    Pillow's decompression-bomb limit, is a 413; a parameters text past sdlab's limit (`read_parameters`) a 422;
    what Pillow cannot read a 400 (an empty string, a file of no format Pillow knows: named so, not by Pillow's
    message, which names the in-memory stream by its address)."""
    if not raw:
        raise BadRequest(f"{what} is empty: no picture was sent", 400, "Invalid encoded image")
    try:
        with open_image(io.BytesIO(raw)) as image:
            check_picture_size(image, what, limits)
            yield image
    except BadRequest:
        raise
    except ImageTooLargeError as err:
        raise BadRequest(f"{what} is past this server's limit of {4 * limits.max_pixels} pixels: {err}", 413) from None
    except ParametersError as err:
        raise BadRequest(f"{what}: {err}", 422) from None
    except UnidentifiedImageError:
        raise BadRequest(f"{what} is not a readable image: not a picture file Pillow knows (PNG, JPEG, WebP, ...)",
                         400, "Invalid encoded image") from None
    except Exception as err:            # Pillow raises many types on corrupt data, all "not an image"
        raise BadRequest(f"{what} is not a readable image: {err}", 400, "Invalid encoded image") from None


def check_picture_size(image: Image.Image, what: str, limits: Limits) -> None:
    """A 413 when an opened, not yet decoded picture (its size read from its header) is past the largest a
    client may send: 4 x `--max-pixels`."""
    if image.width * image.height > 4 * limits.max_pixels:
        raise BadRequest(f"{what} is {image.width}x{image.height}; the limit is {4 * limits.max_pixels} pixels", 413)


PLAIN_UPSCALER_NAMES = ("None", "Lanczos", "Nearest")          # A1111's spelling of PLAIN_UPSCALERS
UPSCALER_PLACES = "in the server's --upscalers-dir (an R-ESRGAN file: or in the RealESRGAN folder of its --models-dir)"


@dataclass(frozen=True)
class UpscalerUse:
    """Where a client names an upscaler: what errors call it, whether A1111's latent modes are names it may take
    besides the plain resizes and the `--upscalers-dir` models, and the answer to a name that is none of them."""
    what: str
    latent_modes: bool
    unknown_status: int = 400
    unknown_reason: str | None = None


HIRES_UPSCALER = UpscalerUse("hires upscaler", latent_modes=True)
EXTRAS_UPSCALER = UpscalerUse("upscaler", latent_modes=False, unknown_status=404, unknown_reason="Upscaler not found")
EXTRAS_UPSCALER_2 = UpscalerUse("upscaler_2", latent_modes=False, unknown_status=422)   # A1111 fails its assert
PICTURE_UPSCALER = UpscalerUse("upscale model", latent_modes=False)     # ComfyUI's UpscaleModelLoader
SCRIPT_UPSCALER = UpscalerUse("sd upscale upscaler", latent_modes=False, unknown_status=422)   # `upscaler_index`


def upscaler_file(name: object, upscalers: ModelFolder | None, use: UpscalerUse = HIRES_UPSCALER) -> ModelFile | None:
    """The `--upscalers-dir` model an upscaler name picks (by the name `/sdapi/v1/upscalers` lists, or its file
    name); None for a plain resize (or, where `use` takes them, a latent mode). Names are looked up in the
    folder only (the pipeline would open any file a path names): any other name, a path among them, is a
    `BadRequest` listing what this server offers, and so is a listed file that is gone."""
    if name is None or (isinstance(name, str) and _is_named_upscaler(name, use.latent_modes)):
        return None
    found = upscalers.find(name) if isinstance(name, str) and upscalers is not None else None
    if found is None:
        missing = missing_upscaler(name, UPSCALER_PLACES) if isinstance(name, str) else None
        if missing:
            raise BadRequest(missing, use.unknown_status, use.unknown_reason)
        models = upscalers.titles() if upscalers is not None else []
        valid = ", ".join([*(LATENT_UPSCALE_MODES if use.latent_modes else ()), *PLAIN_UPSCALER_NAMES, *models])
        raise BadRequest(f"unknown {use.what} {name!r}; this server offers: {valid}", use.unknown_status,
                         use.unknown_reason)
    if not found.path.is_file():
        raise BadRequest(f"the {use.what} {found.title!r} is no longer in the upscalers folder")
    return found


def hires_upscaler_name(request: GenerationRequest) -> str | None:
    """The hires upscaler name of `request` that may name an `--upscalers-dir` model: None under ComfyUI's two-pass
    graph (hr_convention comfyui), whose hr_upscaler is one of its latent methods (the request's check)."""
    return None if request.hr_convention == "comfyui" else request.hr_upscaler


def _is_named_upscaler(name: str, latent_modes: bool) -> bool:
    """Whether `name` is a plain resize or (`latent_modes`) a latent mode, in any spelling the pipeline takes."""
    if name.strip().lower() in PLAIN_UPSCALERS:
        return True
    try:
        canonical_latent_name(name)
        return latent_modes
    except UpscaleError:
        return False


def load_upscaler_file(upscaler: ModelFile, use: UpscalerUse, device: str | torch.device,
                       dtype: torch.dtype | None = None) -> Upscaler:
    """The network of the `--upscalers-dir` model `upscaler` (`upscaler_file`); a file that cannot be loaded
    (broken, or gone since) is a `BadRequest` naming it as clients know it, without the server's path."""
    try:
        return load_upscaler(upscaler.path, device=device, dtype=dtype)
    except CheckpointError as err:
        what = f"the {use.what} {upscaler.title!r}"
        raise BadRequest(load_failure(err, what, upscaler.title, [(upscaler.path, upscaler.title)])) from None


def without_paths(text: str, names: list[tuple[Path, str]]) -> str:
    """`text` with each file's absolute path replaced by the name clients know it by, so an error about a
    client's choice does not show where the server keeps its files."""
    for path, name in names:
        text = text.replace(str(path), name)
    return text


def load_failure(err: CheckpointError, what: str, title: str, names: list[tuple[Path, str]]) -> str:
    """Why `what` (a client's choice, `title` its name) cannot be loaded: `err` with the files named as clients
    know them (`without_paths`) and without its leading `title: `."""
    reason = without_paths(str(err), names).removeprefix(f"{title}: ")
    return f"{what} cannot be loaded: {reason}"


def with_upscaler_file(request: GenerationRequest, upscaler: ModelFile | None) -> GenerationRequest:
    """`request` as the pipeline reads it: the hires upscaler model `upscaler` (`upscaler_file`) by its file."""
    return request if upscaler is None else replace(request, hr_upscaler=str(upscaler.path))


def check_request(request: GenerationRequest, limits: Limits, model: ModelBundle | None = None,
                  upscaler: ModelFile | None = None, batch_count: int = 1,
                  unet: torch.nn.Module | None = None, memory: bool = False, let_go: int = 0,
                  refiner: RefinerChoice | None = None, planned: ModelBundle | None = None) -> GenerationRequest:
    """`request` checked against the server's limits and sdlab's own rules (the model's defaults are filled
    in when it runs); `BadRequest` names the first problem by sdlab's field names (the A1111 routes rename
    them, `a1111._a1111_named`). `--max-steps` and `--max-pixels` hold for either pass. `model`, the model it runs
    on where known (loaded): its default side stands for an unset width / height and its VAE factor snaps the
    sizes, so the hires pass is checked at the size it will draw. `upscaler`: the model the hires upscaler
    names (`upscaler_file`), None for a latent mode or a plain resize. `batch_count`: the batches drawn one after
    another (A1111's n_iter), whose pictures count against `--max-images` and whose seeds are all checked now
    (`check_batch_seeds`). `unet`: where `model` is not loaded, its U-Net built on the meta device from the
    checkpoint's names and shapes (`model_shapes.planned_unet`), against which DeepCache's branch and the image
    prompts' adapters are checked as against the loaded one's (a 422 either way) and the ControlNets' share of the
    work is counted (`check_work`). `memory`: check the loaded `model`'s memory estimate of each pass against the
    memory free on its device now (`plan.check_passes_fit`, a 422), where no job holds the device (its memory would
    read as not free), counting as free the `let_go` bytes held now that the job lets go before it runs
    (`WorkerHost.refiner_let_go`). `refiner`: the SDXL refiner the job hands over to, whose steps run no ControlNet
    (`base_steps`). `planned`: where `model` is not loaded, the checkpoint built on the meta device from its header
    (`model_shapes.planned_bundle`), whose text encoders' depths the clip skip and whose count the second prompts
    (`prompt_2`, `negative_prompt_2`) are checked against as the loaded one's (a 422 either way)."""
    if request.steps is not None and (not isinstance(request.steps, int) or request.steps > limits.max_steps):
        raise BadRequest(f"steps must be an integer <= {limits.max_steps} (this server's limit), got {request.steps!r}")
    hr_steps = getattr(request, "hr_steps", None)
    if hr_steps is not None and (not isinstance(hr_steps, int) or hr_steps > limits.max_steps):
        raise BadRequest(f"hr_steps must be an integer <= {limits.max_steps} (this server's limit), "
                         f"got {hr_steps!r}")
    if not isinstance(request.batch_size, int) or request.batch_size > limits.max_batch:
        raise BadRequest(f"at most {limits.max_batch} images per batch on this server (--max-batch), got "
                         f"{request.batch_size!r}")
    if request.batch_size * batch_count > limits.max_images:
        raise BadRequest(f"at most {limits.max_images} images per request on this server (--max-images), got "
                         f"batch_size {request.batch_size} x batch_count {batch_count}")
    default_size = None if model is None else model.default_size
    factor = SIZE_MULTIPLE if model is None else model.vae_config.downsample_factor
    width, height = requested_size(request, default_size)      # default_size None: not known yet
    size_known = isinstance(width, int) and isinstance(height, int)
    if size_known:
        check_pixels(f"{width}x{height}", width, height, limits, _size_advice(request))
    try:
        resolved = resolve(with_upscaler_file(request, upscaler), default_size=default_size or 64,
                           default_sampler="Euler", default_schedule="normal", factor=factor,
                           guidance_embedding=model is not None and model.unet_config.time_cond_proj_dim is not None)
        check_batch_seeds(resolved, batch_count)
    except (RequestError, ValueError) as err:
        raise BadRequest(str(err), refused=getattr(err, "refused", None)) from None
    if (model or planned) is not None:      # its text encoders: the clip skip as the plan draws it leaves one
        try:                                # layer at least, a second prompt needs a second encoder
            checked = model or planned
            check_clip_skip(checked, clip_skip_as_drawn(checked.family, resolved))
            check_second_prompts(checked, replace(resolved, prompt_2=strip_comments(resolved.prompt_2),    # as drawn
                                                  negative_prompt_2=strip_comments(resolved.negative_prompt_2)))
        except RequestError as err:
            raise BadRequest(str(err), 422) from None
    if resolved.hires and size_known:       # unknown: the worker checks it once the model is loaded
        for hr_width, hr_height in pass_sizes(resolved, factor):       # upscaled, then cropped
            check_pixels(f"the hires pass at {hr_width}x{hr_height}", hr_width, hr_height, limits)
    if size_known:
        check_work(resolved, limits, factor, model, batch_count,
                   model.unet_config if model is not None else getattr(unet, "cfg", None), refiner)
    if model is not None:               # its tokenizers count the prompt's chunks, its U-Net has the PAG layers
        try:                            # and the blocks the image prompts' layer scales name
            check_prompt_chunks(model, resolved)
            check_pag_layers(model, resolved)
            check_image_prompt_layers(model, request.ip_adapters)
        except (RequestError, ValueError) as err:
            raise BadRequest(str(err)) from None
    unet = model.unet if model is not None else unet
    if unet is not None:                # loaded or read from the checkpoint's shapes: DeepCache's branch, the
        try:                            # adapters' context and cross-attention widths
            check_deep_cache_unet(unet, resolved)
            if request.ip_adapters:
                check_image_prompts_fit(unet, request.ip_adapters)
        except (RequestError, ValueError) as err:
            raise BadRequest(str(err), 422) from None
    if memory and model is not None and size_known:     # the estimate against the memory free now, as the plan
        try:                                            # checks it when the job starts
            check_passes_fit(model, resolved, let_go)
        except RequestError as err:
            raise BadRequest(str(err), 422) from None
    return request


HIRES_PASSES = 2            # a hires request's passes, each up to --max-steps at --max-pixels


def max_work(limits: Limits, pictures: int) -> int:
    """The U-Net work (`unet_work`) of `pictures` pictures of the largest request `limits` allow with a one-part
    prompt: hires, `max_pixels`, `max_steps` in each pass, each step the prompt and the negative."""
    return HIRES_PASSES * 2 * limits.max_steps * pictures * limits.max_pixels


def unet_work(request: GenerationRequest, factor: int, model: ModelBundle | None,
              unet_config: UNetConfig | None = None, refiner: RefinerChoice | None = None) -> float:
    """The U-Net work of a resolved request of known size, for a VAE of `factor`: over its passes, the
    rows of a step (`_step_rows`: each part of the pass's prompt, `prompt_parts`, the negative, PAG's and an edit
    model's extra rows) x steps run (an img2img's at its strength, `steps_run`) x batch size x pixels, and beside
    them each ControlNet's forwards over the same rows on the steps its window takes (before an SDXL `refiner`'s
    handoff: `base_steps`), each at its share of a U-Net row (`_controlnet_steps`; `unet_config`: the U-Net's,
    where known)."""
    return sum(_pass_work(request, model, unet_config, factor, refiner, *each)[0] for each in _passes(request, factor))


def _pass_work(request: GenerationRequest, model: ModelBundle | None, unet_config: UNetConfig | None, factor: int,
               refiner: RefinerChoice | None, prompt: str, steps: int,
               size: tuple[int, int]) -> tuple[float, int, list[tuple[int, float, int]]]:
    """One pass's U-Net work (`unet_work`), the rows of its steps and its ControlNets (`_controlnet_steps`)."""
    rows = _step_rows(request, prompt, model)
    until = base_steps(request, model, refiner) if request.controls else None
    found = _controlnet_steps(request, unet_config, steps, size, factor, until)
    work = rows * request.batch_size * size[0] * size[1] * (steps + sum(share * active for _, share, active in found))
    return work, rows, found


def base_steps(request: GenerationRequest, model: ModelBundle | None, refiner: RefinerChoice | None) -> int | None:
    """The steps of a resolved request the base draws before `refiner` takes over (`plan.refiner_split`, on the
    loaded `model`'s schedule, else SDXL's own: a refiner runs on SDXL bases only); None without a refiner (the
    hires fix does not run with one)."""
    if refiner is None:
        return None
    sampling, offset = (SDXL.model_sampling(Prediction.EPS), 1) if model is None else (model.model_sampling,
                                                                                        model.steps_offset)
    try:
        return refiner_split(sampling, request, refiner.switch_at, refiner.convention, steps_offset=offset)
    except (RequestError, ValueError) as err:
        raise BadRequest(str(err), 422) from None


def _passes(request: GenerationRequest, factor: int) -> list[tuple[str, int, tuple[int, int]]]:
    """Each pass of a resolved request of known size: its prompt, the sampler steps it runs (an img2img's at its
    strength, `steps_run`) and its size (width, height) in pixels."""
    steps = request.steps if request.init_image is None else steps_run(request.steps, request.strength,
                                                                        request.img2img_convention)[1]
    passes = [(request.prompt, steps, (request.width, request.height))]
    if request.hires:
        _, size = pass_sizes(request, factor)
        passes.append((request.hr_prompt or request.prompt, hires_steps(request), size))
    return passes


def _controlnet_steps(request: GenerationRequest, unet_config: UNetConfig | None, steps: int, size: tuple[int, int],
                      factor: int, until: int | None = None) -> list[tuple[int, float, int]]:
    """Each ControlNet of the request (index among its controls) that runs in a pass of `steps` steps at `size`
    pixels: its share of a U-Net row's work at that size (`control_work.controlnet_share`, against `unet_config`,
    or where the U-Net is not known the one the ControlNet's encoder was copied from, its decoder levels as deep as
    the encoder's: a ControlNet file has no decoder to read) and the steps its window
    takes (`control_work.active_steps`) among the first `until` (the base's, before a refiner) or all; T2I-Adapters,
    which run once before sampling, are not listed."""
    latent = (size[1] // factor, size[0] // factor)          # (h, w)
    found = []
    for index, control in enumerate(map(control_input, request.controls)):
        config = controlnet_config(control)
        active = active_steps(control, steps, request.control_convention, until)
        if config is not None and active:
            unet = unet_config or replace(config.unet, output_depths=())   # the decoder of the encoder's levels
            found.append((index, controlnet_share(unet, config, *latent), active))
    return found


def _step_rows(request: GenerationRequest, prompt: str, model: ModelBundle | None) -> int:
    """The U-Net rows a step runs for one picture: the rows the memory estimate counts for a one-part prompt
    (`memory.unet_rows`: the prompt, the negative where guidance runs it, PAG's perturbed row, an edit model's
    image row) and one more for each further part of `prompt`; area prompts (ComfyUI's area composition) count
    their passes in place of the prompt's row, each at its area's share of the picture (`comfy_prompt.area_rows`)."""
    if request.area_prompts:
        return unet_rows(model, request) - 1 + _area_rows(request, model)
    return unet_rows(model, request) + _part_count(prompt, model) - 1


def _area_rows(request: GenerationRequest, model: ModelBundle | None) -> float:
    factor = 8 if model is None else model.vae_config.downsample_factor
    return area_rows(tuple(request.area_prompts), request.width, request.height, factor,
                     negative="the negative" in unet_row_names(model, request))


def _part_count(prompt: str, model: ModelBundle | None) -> int:
    """The parts of `prompt` drawn apart on `model` (not known yet: A1111's AND parts)."""
    return len(prompt_parts(model, prompt) if model is not None else composable_parts(prompt))


def check_work(request: GenerationRequest, limits: Limits, factor: int, model: ModelBundle | None,
               batch_count: int = 1, unet_config: UNetConfig | None = None,
               refiner: RefinerChoice | None = None) -> None:
    """A 422 for a resolved request whose U-Net work (`unet_work`, ControlNets included) is past `max_work`, a
    batch's past that of `max_batch` pictures, all `batch_count` batches' past that of `max_images`: AND parts have
    no limit of their own (A1111 has none), but each is a U-Net call at every step, so many parts cost what more
    steps, pictures or pixels would; so does a ControlNet, a U-Net encoder run beside each row."""
    batch = unet_work(request, factor, model, unet_config, refiner)
    for what, work, pictures, flag in (("batch", batch, limits.max_batch, "--max-batch"),
                                       ("request", batch * batch_count, limits.max_images, "--max-images")):
        if work > max_work(limits, pictures):
            rows, counted = _rows_counted(request, model)
            controlnets = _controlnets_counted(request, model, unet_config, factor, refiner,
                                               batch_count if what == "request" else 1)
            window = "; a ControlNet runs on the steps of its start / end window only" if controlnets else ""
            raise BadRequest(f"the {what}'s U-Net work ({rows:g} U-Net rows a step: {', '.join(counted)}; x steps x "
                             f"pictures x pixels, each pass{controlnets}) is "
                             f"{_times(work / max_work(limits, pictures))} times "
                             f"this server's limit, the work of its largest {what} with a one-part prompt "
                             f"(--max-steps, {flag}, --max-pixels, hires): use fewer AND parts, steps, pictures or "
                             f"pixels{_row_advice(counted)}{window}", 422)


def _controlnets_counted(request: GenerationRequest, model: ModelBundle | None, unet_config: UNetConfig | None,
                         factor: int, refiner: RefinerChoice | None, batches: int) -> str:
    """The ControlNets' part of the work as the refusal names it, '' without any: each one's share of a U-Net row
    and the steps it runs in each pass (`_controlnet_steps`), then each pass's term, rows x (steps + share x
    ControlNet steps) x pictures x pixels, so that the terms add up to the work the ratio is of."""
    passes = _passes(request, factor)
    said, terms = [], []
    for name, (prompt, steps, size) in zip(("first pass", "hires pass"), passes):
        where, label = (f" in the {name}", f"{name} ") if len(passes) > 1 else ("", "")
        _, rows, found = _pass_work(request, model, unet_config, factor, refiner, prompt, steps, size)
        said += [f"ControlNet {index + 1} on {active} of {steps} steps at {share:.2f} of a U-Net row{where}"
                 for index, share, active in found]
        controls = "".join(f" + {share:.2f} x {active}" for _, share, active in found)
        terms.append(f"{label}{rows} x ({steps}{controls}) x {request.batch_size * batches} x {size[0] * size[1]} px")
    handoff = "" if refiner is None else " (before the refiner takes over)"
    return (f"; plus the same rows through {', '.join(said)}{handoff}: {' + '.join(terms)}"
            if said else "")


def _rows_counted(request: GenerationRequest, model: ModelBundle | None) -> tuple[int, list[str]]:
    """The rows a step of the request's larger pass runs (`_step_rows`) and what each is (`memory.unet_row_names`,
    the prompt counted as its AND parts where it has more than one)."""
    parts = max(_part_count(text, model) for text in (request.prompt, request.hr_prompt or request.prompt))
    names = list(unet_row_names(model, request))
    if parts > 1:
        names[0] = f"{parts} prompt parts"
    if request.area_prompts:
        rows = _area_rows(request, model)
        names[0] = f"{len(request.area_prompts)} area prompts and the negative on their areas ({rows:.2f} rows)"
        return len(names) - 1 + rows, names
    return len(names) + parts - 1, names


def _row_advice(counted: Sequence[str]) -> str:
    """How to drop the rows beyond the prompt and the negative that `counted` holds."""
    advice = {PAG_ROW: "a PAG scale of 0 drops PAG's extra row",
              EDIT_IMAGE_ROW: "an image CFG scale of 1 drops the edit model's image pass"}
    said = [advice[name] for name in counted if name in advice]
    return "; " + "; ".join(said) if said else ""


def _times(ratio: float) -> str:
    """`ratio` (above 1) rounded up to one decimal: a request just past the limit reads 1.1, never 1."""
    return f"{math.ceil(ratio * 10) / 10:.1f}"


def check_pixels(what: str, width: int, height: int, limits: Limits, advice: str = "") -> None:
    """A 413 when a picture of width x height (named `what`) is past `--max-pixels`; `advice` ends the line."""
    if width * height > limits.max_pixels:
        raise BadRequest(f"{what} is {width * height} pixels; this server draws at most {limits.max_pixels} "
                         f"(--max-pixels){advice}", 413)


def _size_advice(request: GenerationRequest) -> str:
    """Where a side left unset is the init image's (`requested_size`), what to do about a size past the limit: a
    photo sent to img2img without a width and height is drawn at its own size."""
    if requested_size(request, None) == (request.width, request.height):     # no side taken from the image
        return ""
    return ": the initial image's own size (width / height unset); give the width and height to draw at"
