"""The sd-webui-controlnet extension's own routes, `/controlnet/*` beside A1111's `/sdapi/v1` (docs/server.md):
its model, module and control-type lists, settings, version and detect (a picture through a preprocessor), and
the extension's guess of the model family a ControlNet's name and the loaded checkpoint are for.

The units a request sends in `alwayson_scripts` are read by `controls.py`; the preprocessors' order and tags
are `control_types.py`'s.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from pydantic import ConfigDict, Field

from sdlab.checkpoints.errors import CheckpointError
from sdlab.pipeline.preprocess import (
    INPAINT_MODULES, RESOLUTION_SLIDER, THRESHOLD_SLIDERS, preprocess, processor_resolution,
)
from sdlab.server.a1111 import _base64_picture, _options
from sdlab.server.control_types import CONTROL_TYPES, sorted_preprocessors, type_preprocessors, type_words
from sdlab.server.controls import CONTROLNET_UNIT_COUNT, module_name, threshold_value
from sdlab.server.inputs import BadRequest, NullsAreDefaults, decode_image
from sdlab.server.native import service_of
from sdlab.server.registry import Checkpoint
from sdlab.server.service import Service
from sdlab.utils.file_hashes import read_per_version

router = APIRouter(prefix="/controlnet")


def _module_sliders(module: str) -> list[dict[str, Any] | None]:
    """The extension's `preprocessor_sliders_config` of `module` (`module_detail`): the resolution slider (None for
    tile_resample, which has none), then its threshold sliders (`preprocess.THRESHOLD_SLIDERS`); a preprocessor
    without thresholds has no entry there and lists no slider."""
    if module not in THRESHOLD_SLIDERS:
        return []
    return [None if module == "tile_resample" else RESOLUTION_SLIDER, *THRESHOLD_SLIDERS[module]]


def model_name_family(name: str) -> str | None:
    """The family a ControlNet's name says it is for, as the extension guesses it
    (`StableDiffusionVersion.detect_from_model_name`): "sd1" for sd14 / sd15 / sd16, "sd2" for sd21 or 2.1 (as
    written: the extension does not lower-case these two), "sdxl" for xl; None (any family) for a name with
    none of them."""
    if any(f"sd{v}" in name.lower() for v in ("14", "15", "16")):
        return "sd1"
    if "sd21" in name or "2.1" in name:
        return "sd2"
    if "xl" in name.lower():
        return "sdxl"
    return None


def families_compatible(family: str | None, other: str | None) -> bool:
    """The extension's `StableDiffusionVersion.is_compatible_with`: apart only where one of the two is SDXL and
    the other a known family that is not (SD1 and SD2 pass each other; None passes every one)."""
    return family is None or other is None or (family == "sdxl") == (other == "sdxl")


def checkpoint_family(checkpoint: Checkpoint) -> str | None:
    """The family of `checkpoint` as the extension's `get_sd_version` tells the loaded model's (A1111's
    is_sd1 / is_sd2 / is_sdxl): "sd1", "sd2" or "sdxl" from its names and shapes (`plan_checkpoint`, no weight
    read, kept while the file keeps its version); None (the extension's UNKNOWN) for another family (sdlab-tiny)
    or a file sdlab cannot plan."""
    try:
        name = read_per_version(checkpoint.path, _planned_family)
    except CheckpointError:
        return None
    return next((family for family in ("sdxl", "sd2", "sd1") if name.startswith(family)), None)


def _planned_family(path: Path) -> str:
    from sdlab.checkpoints.load import plan_checkpoint

    return plan_checkpoint(path).report.family.name


def _control_type(name: str, models: list[str], family: str | None = None) -> dict[str, Any]:
    """The extension's `select_control_type` of control type `name` over sdlab's preprocessors and `models`
    ("None" first) for a model of `family` (None: any): the type's preprocessors and default one
    (`control_types.type_preprocessors`: those tagged with it); the models whose names hold its words
    (`type_words`) and whose family (`model_name_family`) passes `family` (`families_compatible`), "None" always
    ("None" alone where none does), and its default model (one with "11" in its name first, else the first; "None"
    where none is listed). "All" lists every model, default "None"."""
    modules, default = type_preprocessors(name)
    if name.lower() == "all":
        return {"module_list": modules, "model_list": models, "default_option": default, "default_model": "None"}
    words = type_words(name)
    filtered = [x for x in models if x.lower() == "none"
                or (any(word in x.lower() for word in words) and families_compatible(family, model_name_family(x)))]
    model = "None" if len(filtered) == 1 else next((x for x in filtered if "11" in x.split("[")[0]), filtered[1])
    return {"module_list": modules, "model_list": filtered, "default_option": default, "default_model": model}


@router.get("/model_list")
def controlnet_models(request: Request, update: bool = True) -> dict[str, Any]:
    """`{"model_list": ["name [hash8]", ...]}` of the `--controlnet-dir` files, rescanned first unless
    `update=false` (the extension's default: `get_models(update=True)`)."""
    folder = service_of(request).controlnets
    if update:
        folder.refresh()
    return {"model_list": folder.titles()}


@router.get("/module_list")
def controlnet_modules(alias_names: bool = False) -> dict[str, Any]:
    """sdlab's preprocessors and IP-Adapter modules as the extension's route lists its own
    (`external_code.get_modules` / `get_modules_detail`): in its order (`control_types.sorted_preprocessors`, the
    "All" type's), by the extension's names, or by the labels its UI shows with `alias_names`; and each one's
    `module_detail` under the same name: its sliders (`_module_sliders`; the IP-Adapter modules have none) and
    whether it needs no model (none of sdlab's). A unit's module may still give either name (`a1111_module`,
    `ip_adapter_units.MODULE_ENCODERS`)."""
    listed = sorted_preprocessors()
    names = [p.label if alias_names else p.name for p in listed]
    return {"module_list": names,
            "module_detail": {name: {"model_free": False, "sliders": _module_sliders(p.name)}
                              for name, p in zip(names, listed)}}


@router.get("/control_types")
def controlnet_control_types(request: Request, model: str | None = None) -> dict[str, Any]:
    """Each control type's preprocessors, models and defaults (`_control_type`). Without `model`, as the
    extension's route, which asks `select_control_type` for no family (every model passes the family test);
    with `model` (sdlab's: a checkpoint's title, empty for the server's selected model; the web UI's Control Type
    radios), the models narrowed to that model's family, as the extension's Control Type radio narrows them to
    the loaded model's (`select_control_type(type, get_sd_version())`). An unknown model is a 404."""
    service = service_of(request)
    family = None if model is None else checkpoint_family(service.checkpoint(model or None))
    models = ["None", *service.controlnets.titles()]
    return {"control_types": {name: _control_type(name, models, family) for name in CONTROL_TYPES}}


@router.get("/settings")
def controlnet_settings() -> dict[str, Any]:
    return {"control_net_unit_count": CONTROLNET_UNIT_COUNT}


@router.get("/version")
def controlnet_version() -> dict[str, Any]:
    return {"version": 2}


class DetectIn(NullsAreDefaults):
    """The extension's `/controlnet/detect` body; `low_vram` is accepted and ignored. `controlnet_processor_res`
    is a unit's processor_res (`processor_resolution`): unset or null, 512, as the extension's -1."""

    model_config = ConfigDict(extra="allow")

    controlnet_module: str = "none"
    controlnet_input_images: list[str] = Field(default_factory=list)
    controlnet_processor_res: float | None = None
    controlnet_threshold_a: float = -1
    controlnet_threshold_b: float = -1
    controlnet_masks: list[str] = Field(default_factory=list)


@router.post("/detect")
async def controlnet_detect(body: DetectIn, request: Request) -> dict[str, Any]:
    """The extension's detect: each picture through the preprocessor, `{info: "Success", images: [base64]}`
    (pictures in the samples_format option, as A1111's `encode_pil_to_base64`). An unknown module is a 422
    "Module not available", no picture a 422 "No image selected", as the extension answers; the inpaint
    preprocessors (which the extension runs on a masked picture) are a 422 "Module not supported"."""
    try:
        module = module_name(body.controlnet_module)
    except BadRequest as err:
        raise BadRequest(err.message, 422, "Module not available") from None
    if module in INPAINT_MODULES:
        raise BadRequest(f"sdlab's /controlnet/detect does not run {body.controlnet_module!r}", 422,
                         "Module not supported")
    if not body.controlnet_input_images:
        raise BadRequest("controlnet_input_images holds no picture", 422, "No image selected")
    service = service_of(request)
    images = [await asyncio.to_thread(_detected, service, body, module, image, f"controlnet_input_images[{i}]")
              for i, image in enumerate(body.controlnet_input_images)]
    return {"info": "Success", "images": images}


def _detected(service: Service, body: DetectIn, module: str, data: str, what: str) -> str:
    """One picture of `/controlnet/detect` through `module`, thresholds and processor resolution outside their
    sliders' range the preprocessor's defaults as in a unit (`threshold_value`, `processor_resolution`: the
    extension's `bound_check_params`), in base64."""
    image = decode_image(data, what, service.config.limits)
    thresholds = [threshold_value(value, module, index)
                  for index, value in enumerate((body.controlnet_threshold_a, body.controlnet_threshold_b))]
    try:
        hint = preprocess(image, module, *thresholds, processor_resolution(body.controlnet_processor_res))
    except ValueError as err:
        raise BadRequest(f"{what}: {err}", 422) from None
    return _base64_picture(hint, None, _options(service))
