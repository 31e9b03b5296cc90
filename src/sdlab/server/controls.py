"""ControlNet units of a request -> the pipeline's `ControlInput`s (model chosen by name from the server's
ControlNet folder, hint image decoded from base64, numbers and preprocessor checked before queueing).

A1111's ControlNet extension sends `alwayson_scripts: {"controlnet": {"args": [unit, ...]}}`, a unit being
`{enabled, model, image | input_image, weight, guidance_start, guidance_end, module, ...}`; the native API
sends `controls: [{model, image, strength, start, end, module}]`. Unit fields sdlab does not implement
(resize_mode, control_mode, pixel_perfect, processor_res, threshold_a/b, low_vram, ...) are ignored.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from sdlab.pipeline.control import ControlInput, check_control
from sdlab.pipeline.preprocess import PREPROCESSORS
from sdlab.pipeline.request import RequestError
from sdlab.server.config import Limits
from sdlab.server.inputs import BadRequest, decode_image
from sdlab.server.model_folders import ModelFolder


def module_name(module: Any) -> str:
    """A1111's module name -> sdlab's preprocessor ("None" / null -> "none"); unknown ones are `BadRequest`."""
    if module is None or (isinstance(module, str) and module.strip().lower() in ("", "none")):
        return "none"
    if isinstance(module, str) and module.strip().lower() in PREPROCESSORS:
        return module.strip().lower()
    raise BadRequest(f"unknown ControlNet module {module!r}; this server has: {', '.join(PREPROCESSORS)}", 422,
                     "Module not found")


def control(model: Any, image: Any, strength: Any, start: Any, end: Any, module: Any, index: int,
            folder: ModelFolder, limits: Limits) -> ControlInput:
    """One checked `ControlInput`; `BadRequest` names what is wrong (404 for an unknown model)."""
    what = f"control {index}"
    if not isinstance(model, str) or not model or model == "None":
        raise BadRequest(f"{what}: model must name a ControlNet of this server", 422)
    found = folder.find(model)
    if found is None:
        known = ", ".join(folder.titles()) or "none (start the server with --controlnet-dir)"
        raise BadRequest(f"{what}: unknown ControlNet model {model!r}; this server has: {known}", 404,
                         "ControlNet model not found")
    if isinstance(image, dict):                 # the extension's {"image": ..., "mask": ...}
        image = image.get("image")
    if image is None or image == "":
        raise BadRequest(f"{what}: needs an image (base64)", 422)
    picture = image if isinstance(image, Image.Image) else decode_image(image, f"{what} image", limits)
    try:
        return check_control(ControlInput(str(found.path), picture, strength, start, end, module_name(module)), index)
    except RequestError as err:
        raise BadRequest(str(err), 422) from None


def a1111_controls(scripts: Any, folder: ModelFolder, limits: Limits,
                   init: Image.Image | None = None) -> tuple[ControlInput, ...]:
    """The enabled units of `alwayson_scripts["controlnet"]["args"]` (the key in any case). A unit without
    an image (webuiapi sends "") takes img2img's init image, as the extension does."""
    if not isinstance(scripts, dict):
        return ()
    script = next((v for k, v in scripts.items() if isinstance(k, str) and k.lower() == "controlnet"), None)
    if script is None:
        return ()
    units = script.get("args") if isinstance(script, dict) else script
    if not isinstance(units, list):
        raise BadRequest("alwayson_scripts.controlnet.args must be a list of units", 422)
    controls = []
    for unit in units:
        if not isinstance(unit, dict):
            raise BadRequest(f"a ControlNet unit must be an object, got {unit!r}", 422)
        if not unit.get("enabled", True) or unit.get("model") in (None, "", "None"):
            continue
        image = unit.get("image") or unit.get("input_image") or init
        controls.append(control(unit["model"], image, unit.get("weight", 1.0), unit.get("guidance_start", 0.0),
                                unit.get("guidance_end", 1.0), unit.get("module"), len(controls), folder, limits))
    return tuple(controls)


def native_controls(items: list[dict[str, Any]], folder: ModelFolder, limits: Limits) -> tuple[ControlInput, ...]:
    return tuple(control(item.get("model"), item.get("image"), item.get("strength", 1.0), item.get("start", 0.0),
                         item.get("end", 1.0), item.get("module"), index, folder, limits)
                 for index, item in enumerate(items))
