"""ControlNet units of a request -> the pipeline's `ControlInput`s (model chosen by name from the server's
ControlNet folder, hint image decoded from base64, numbers and preprocessor checked before queueing).

A1111's ControlNet extension sends `alwayson_scripts: {"controlnet": {"args": [unit, ...]}}`, a unit being
`{enabled, model, image | input_image, weight, guidance_start, guidance_end, module, ...}`; the native API
sends `controls: [{model, image, strength, start, end, module, control_mode, resize_mode, processor_res,
pixel_perfect}]`. A1111's units select their steps by the extension's rule (the request's
`control_convention="a1111"`), the native ones by diffusers'; a unit's `control_mode`, `resize_mode`,
`threshold_a` / `threshold_b`, `processor_res` and `pixel_perfect` are A1111's, a native entry's modes are
sdlab's names (`CONTROL_MODES`, `RESIZE_MODES`). Unit fields sdlab does not implement (low_vram, ...) are
ignored.

A unit whose module is one of the extension's IP-Adapter preprocessors (`ip_adapter_units`) is an image prompt:
an `IPAdapterInput` of its model (found as a ControlNet's), its picture, `weight` as the scale, its Guidance
Start / End as the adapter's step window (the extension's rule: `control.in_window`) and the image encoder its
module names (`unit_image_encoder`). Its resize_mode, processor_res, pixel_perfect, thresholds and control_mode
are read by the extension's preprocessors and ControlNets alone: the CLIP preprocessor takes the picture as
sent, and the adapter's weight is its only strength, so they do nothing for such a unit. Under the extension's
FaceID modules (ip-adapter_face_id, _face_id_plus) the unit's `ipadapter_input` is the face embedding their
InsightFace would compute (`a1111_face_embedding`); a native entry gives it as `face_embedding`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from PIL import Image

from sdlab.pipeline.control import (
    CONTROL_MODES, DEFAULT_RESIZE, RESIZE_MODES, ControlInput, a1111_mode, check_control, check_mask_size,
    drawn_on_init,
)
from sdlab.pipeline.image_prompt import IPAdapterInput, check_ip_adapter, prompt_on_init, with_face_embedding
from sdlab.pipeline.images import eight_bit
from sdlab.pipeline.ip_adapter_units import (FACE_ID_MODULES, LISTED_MODULES, is_ip_adapter_module,
                                             unit_image_encoder)
from sdlab.pipeline.preprocess import (
    INPAINT_MODULES, SLIDER_RANGES, a1111_module, processor_resolution,
)
from sdlab.pipeline.request import RESIZE_MODES as JOB_RESIZE_MODES, RequestError
from sdlab.server.config import Limits
from sdlab.server.face_embeddings import native_face_embedding, unit_face_embedding
from sdlab.server.inputs import BadRequest, decode_image
from sdlab.server.model_folders import ModelFolder

CONTROLNET_UNIT_COUNT = 3       # the extension's `control_net_unit_count` default (`GET /controlnet/settings`)


def module_name(module: Any) -> str:
    """A1111's module name (or its UI alias) -> sdlab's preprocessor of the same meaning (`a1111_module`); one
    sdlab has not (lineart, depth, ... run networks) is a `BadRequest` naming it."""
    try:
        return a1111_module(module)
    except ValueError as err:
        raise BadRequest(f"ControlNet module: {err}", 422, "Module not found") from None


def control_mode(value: Any) -> str:
    """A1111's `control_mode` -> sdlab's name (`CONTROL_MODES`): one of A1111's ControlMode values ("Balanced",
    "My prompt is more important", "ControlNet is more important") or its index 0, 1, 2, as the extension's
    `control_mode_from_value` takes it; null is Balanced."""
    return "balanced" if value is None else a1111_choice(value, CONTROL_MODES, "control_mode")


def resize_mode(value: Any) -> str:
    """A1111's `resize_mode` -> sdlab's name (`RESIZE_MODES`), as the extension's `resize_mode_from_value`
    takes it: a ResizeMode value or an older alias (`A1111_RESIZE_ALIASES`), or its index (3, "Just Resize
    (Latent upscale)", and past the last: Just Resize); null is its default, Crop and Resize."""
    if value is None:
        return DEFAULT_RESIZE["a1111"]
    return a1111_choice(value, RESIZE_MODES, "resize_mode", past_last="resize")


def a1111_choice(value: Any, modes: dict[str, str], field: str, past_last: str | None = None) -> str:
    """sdlab's name (a key of `modes`) of the A1111 value a unit gives its `field`: an index into `modes`, or
    a label (`a1111_mode`). An index past the last is `past_last` where the extension takes one; any other
    value is a 422 listing the labels and their indices."""
    names = list(modes)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        if value < len(names):
            return names[value]
        if past_last is not None:
            return past_last
    name = a1111_mode(value, modes)
    if name is not None:
        return name
    valid = ", ".join(f"{label!r} ({index})" for index, label in enumerate(modes.values()))
    raise BadRequest(f"unknown ControlNet {field} {value!r}; valid: {valid}", 422)


def threshold_value(value: Any, module: str, index: int) -> Any:
    """A unit's threshold_a (`index` 0) / threshold_b (1) as the preprocessor `module` takes it: null, or a
    number outside the extension's slider range (`SLIDER_RANGES`), is the preprocessor's default (None), as its
    `bound_check_params` resets it; so is any number for a preprocessor without that slider (the extension
    resets it to its hidden slider's 0.5, which nothing reads); any other value as given (checked with the
    control)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    ranges = SLIDER_RANGES.get(module, ())
    if index >= len(ranges):
        return None
    low, high = ranges[index]
    return value if low <= value <= high else None


KIND_NAMES = {"controlnet": "a ControlNet or T2I-Adapter", "ip-adapter": "an IP-Adapter"}
"""The kinds of the ControlNet folder's files (`model_folders.CONTROL_KINDS`) as an error names them."""


def model_path(model: Any, what: str, folder: ModelFolder, kind: str | None = None, elsewhere: str = "") -> str:
    """The file of the ControlNet folder's model `model` names: `BadRequest` 404 when there is none; with `kind`
    (`CONTROL_KINDS`, a native entry's) a 422 when it is of the other kind (`elsewhere`: where that one goes), so
    the job is refused at submit rather than failing when its model loads (an A1111 unit's `what` names its module,
    and its IP-Adapter module's reader, `a1111_ip_adapter`, checks its model with the extension's words)."""
    if not isinstance(model, str) or not model or model == "None":
        raise BadRequest(f"{what}: model must name a ControlNet of this server", 422)
    found = folder.find(model)
    if found is None:
        known = ", ".join(folder.titles()) or "none (start the server with --controlnet-dir)"
        raise BadRequest(f"{what}: unknown ControlNet model {model!r}; this server has: {known}", 404,
                         "ControlNet model not found")
    if kind is not None and found.kind and found.kind != kind:
        raise BadRequest(f"{what}: {found.title} is {KIND_NAMES[found.kind]}, not {KIND_NAMES[kind]}; "
                         f"{elsewhere}", 422)
    return str(found.path)


def image_field(image: Any, what: str) -> Any:
    """A unit's image field as the extension's `get_input_images_rgba` reads it: `[image, mask]`, `(image, mask)`
    and `[{"image": ..., "mask": ...}]` are the `{image, mask}` object; any other value as it is. More than one
    picture (the extension's batch of a unit) is a 422."""
    if not isinstance(image, (list, tuple)):
        return image
    if len(image) == 1 and isinstance(image[0], dict):
        return image[0]
    if len(image) == 2 and not isinstance(image[0], dict):
        return {"image": image[0], "mask": image[1]}
    raise BadRequest(f"{what}: image must be one picture: base64, {{image, mask}}, [image, mask] or "
                     "[{image, mask}]", 422)


def hint_image(image: Any, what: str, limits: Limits) -> Image.Image:
    """The unit's hint picture: base64, the extension's `{"image": ..., "mask": ...}`, or a decoded picture."""
    if isinstance(image, dict):
        image = image.get("image")
    if image is None or image == "":
        raise BadRequest(f"{what}: needs an image (base64)", 422)
    return image if isinstance(image, Image.Image) else decode_image(image, f"{what} image", limits)


def checked_control(control: ControlInput, index: int, convention: str, folder: ModelFolder) -> ControlInput:
    """`control` (the request's `index`-th) checked by the pipeline's rules for `convention`
    (`check_control`); a value it refuses is a 422 naming it, its model by title (`without_paths`)."""
    try:
        return check_control(control, index, convention)
    except RequestError as err:
        raise BadRequest(folder.without_paths(str(err)), 422) from None


def unit_mask(unit: dict[str, Any], own: Any, image: Image.Image, init: Image.Image | None, what: str,
              limits: Limits) -> Image.Image | None:
    """An inpaint unit's mask, as the extension reads it (`choose_input_image`, then `process`): its `mask` (or
    `mask_image`, or its own image's `{image, mask}` object's) where that is one (`masks_something`); else
    None, the inpainting run's mask (`control._masked_hint`), where the run's mask fits the unit's picture
    (`image`, the unit's own, `own`, or img2img's init image `init`, whose size the run's mask has); else
    all black (nothing masked). A mask of another size than the unit's picture (`image`: its own, or the init
    image it takes) is a 422, a uniform one too, as the extension's `combine_image_and_mask` refuses it."""
    mask = unit.get("mask") or unit.get("mask_image") or (own.get("mask") if isinstance(own, dict) else None)
    if mask:
        mask = mask if isinstance(mask, Image.Image) else decode_image(mask, f"{what} mask", limits)
        try:
            check_mask_size(image.size, mask.size, what)
        except RequestError as err:
            raise BadRequest(str(err), 422) from None
        if masks_something(mask):
            return mask
    return None if init is None or image.size == init.size else Image.new("L", image.size)


def clip_mask(unit: dict[str, Any], own: Any, image: Image.Image, what: str, limits: Limits) -> Image.Image | None:
    """An IP-Adapter unit's mask, as the extension's `get_input_images_rgba` hands it to its CLIP preprocessor
    (the picture's fourth channel, `clip_image.extension_clip_pixels`): its `mask` (or `mask_image`, or its own
    image's `{image, mask}` object's), taken as it is; None without one, or without an image of its own (img2img's
    init picture goes in as RGB). A mask of another size than the unit's picture is a 422, as the extension's
    `combine_image_and_mask` refuses it."""
    mask = unit.get("mask") or unit.get("mask_image") or (own.get("mask") if isinstance(own, dict) else None)
    if not mask or not own:
        return None
    mask = mask if isinstance(mask, Image.Image) else decode_image(mask, f"{what} mask", limits)
    try:
        check_mask_size(image.size, mask.size, what)
    except RequestError as err:
        raise BadRequest(str(err), 422) from None
    return mask


def masks_something(mask: Image.Image) -> bool:
    """Whether the extension takes `mask` for a unit's mask: its first channel is not all 0 or all 255
    (`choose_input_image`'s `have_mask`) and is above 127 somewhere (`image_has_mask`); a uniform one is no
    mask, and the run's serves."""
    first = np.asarray(eight_bit(mask).convert("RGB"))[..., 0]
    return not ((first == 0).all() or (first == 255).all()) and first.max() > 127


IP_ADAPTER_UNITS = (f"the extension draws an IP-Adapter in a unit with one of its IP-Adapter modules "
                    f"({', '.join(LISTED_MODULES)}), whose CLIP image embeddings (or face embeddings) it reads; a "
                    "ControlNet preprocessor's picture is none")
"""Why an A1111 unit with a ControlNet module cannot take an IP-Adapter model (`a1111_unit`)."""


def a1111_unit(unit: dict[str, Any], index: int, folder: ModelFolder, limits: Limits,
               init: Image.Image | None, init_resize: int = 0) -> ControlInput:
    """One enabled unit as a checked `ControlInput`, its steps by A1111's rule (`control_convention`). A unit
    without an image takes img2img's init image fitted by img2img's resize mode `init_resize` (A1111's 0..3; another
    index is Just resize, as the extension's `resize_mode_from_value`) by the pipeline's rule
    (`control.drawn_on_init`), as the extension's `choose_input_image` does, keeping its own `resize_mode` to
    record, as the extension's infotext does; in txt2img the rule's message is the
    422, as at every other door. An IP-Adapter model under a
    ControlNet module is a 422 at submit naming the unit, the model and the module (the extension hands the
    adapter the preprocessor's picture where it reads CLIP image embeddings, and fails as it draws)."""
    what = f"control {index}"
    own = image_field(unit.get("image") or unit.get("input_image") or None, what)
    module, image = module_name(unit.get("module")), hint_image(own, what, limits) if own else None
    control = ControlInput(model_path(unit["model"], f"{what} (module {unit.get('module')!r})", folder, "controlnet",
                                      IP_ADAPTER_UNITS), image,
                           unit.get("weight", 1.0), unit.get("guidance_start", 0.0),
                           unit.get("guidance_end", unit.get("guidance", 1.0)),     # the extension's legacy alias
                           module, control_mode(unit.get("control_mode")),
                           resize_mode(unit.get("resize_mode")),     # recorded; on the init picture img2img's fits
                           threshold_value(unit.get("threshold_a"), module, 0),
                           threshold_value(unit.get("threshold_b"), module, 1), None,
                           processor_resolution(unit.get("processor_res")), unit.get("pixel_perfect") or False)
    job_resize = JOB_RESIZE_MODES[init_resize] if 0 <= init_resize < len(JOB_RESIZE_MODES) else "resize"
    try:
        control = drawn_on_init(control, index, init, job_resize)      # txt2img: the rule's one message
    except RequestError as err:
        raise BadRequest(str(err), 422) from None
    if module in INPAINT_MODULES:
        control = dataclasses.replace(control, mask=unit_mask(unit, own, control.image, init, what, limits))
    return checked_control(control, index, "a1111", folder)


UNREAD_IP_FIELDS = {
    "effective_region_mask": "the region of the picture the adapter acts on",
    "advanced_weighting": "a weight for each attention layer",
    "ipadapter_input": "precomputed image embeddings",
}
"""The extension's unit fields that change an IP-Adapter unit's picture and sdlab does not draw -> what they
hold (sd-webui-controlnet internal_controlnet/external_code.py ControlNetUnit, v1.1.455); each is None when unset."""


def refuse_unread_ip_fields(unit: dict[str, Any], what: str, read: tuple[str, ...] = ()) -> None:
    """A 422 naming the first field of an IP-Adapter `unit` that would change the extension's picture and sdlab does
    not draw (`UNREAD_IP_FIELDS` but those `read` set to anything but their null / empty default; `input_mode`
    other than "simple", the batch / merge modes that draw from `batch_images`), rather than a picture drawn
    without it."""
    for field, holds in UNREAD_IP_FIELDS.items():
        if field not in read and unit.get(field) not in (None, "", [], {}):
            raise BadRequest(f"{what}: {field} ({holds}) is not drawn by sdlab for an IP-Adapter unit; "
                             "leave it out", 422)
    mode = unit.get("input_mode")
    if mode not in (None, "", "simple"):
        raise BadRequest(f"{what}: input_mode {mode!r} (the picture from batch_images) is not drawn by sdlab for "
                         "an IP-Adapter unit; give the unit's image with input_mode \"simple\"", 422)


def a1111_face_embedding(unit: dict[str, Any], module: str, what: str) -> Any:
    """The face embedding of a unit with a FaceID module (`FACE_ID_MODULES`): its `ipadapter_input`
    (`face_embeddings.unit_face_embedding`), which the extension takes as the module's output in place of running
    InsightFace; without one a 422 saying to send it. None for another module (its `ipadapter_input`, precomputed
    CLIP embeddings, is refused with the unit's other unread fields)."""
    if module.lower() not in FACE_ID_MODULES:
        return None
    given = unit.get("ipadapter_input")
    if given in (None, "", []):
        raise BadRequest(f"{what}: the extension computes this module's face embedding with InsightFace, which "
                         "sdlab does not have; send the embedding as the unit's ipadapter_input (base64 of "
                         "torch.save of InsightFace's normed_embedding as a (1, 512) tensor, the module's output"
                         f"{'; the picture as its image' if module.lower() == 'ip-adapter_face_id_plus' else ''})",
                         422)
    return unit_face_embedding(given, what)


def a1111_ip_adapter(unit: dict[str, Any], index: int, folder: ModelFolder, limits: Limits,
                     init: Image.Image | None) -> IPAdapterInput:
    """One enabled unit with an IP-Adapter module as a checked `IPAdapterInput` (module docstring); without an
    image it takes img2img's init image by the pipeline's rule (`control.drawn_on_init`), as the extension's
    `choose_input_image` does; in txt2img the rule's message is the 422. A module sdlab does not
    draw (the InsightFace ones), a model that is no IP-Adapter sdlab draws, or an image encoder that is missing
    or does not fit the adapter is a 422 naming the module."""
    module = str(unit.get("module")).strip()
    what = f"control {index} (module {module!r})"
    face = a1111_face_embedding(unit, module, what)
    refuse_unread_ip_fields(unit, what, () if face is None else ("ipadapter_input",))
    own = image_field(unit.get("image") or unit.get("input_image") or None, what)
    if face is not None and module.lower() == "ip-adapter_face_id":
        own = None              # the extension reads no picture where ipadapter_input is the module's output
    image = hint_image(own, what, limits) if own else None
    path = model_path(unit["model"], what, folder)
    try:                    # before the init picture's rule: a FaceID model's refusal in txt2img as in img2img
        encoder = unit_image_encoder(module, path)
    except RequestError as err:
        raise BadRequest(f"{what}: {folder.without_paths(str(err))}", 422) from None
    try:
        prompt = IPAdapterInput(path, image, unit.get("weight", 1.0), start=unit.get("guidance_start", 0.0),
                                end=unit.get("guidance_end", unit.get("guidance", 1.0)), module=module, unit=index,
                                resize_mode=resize_mode(unit.get("resize_mode")))
        if face is not None:
            prompt = with_face_embedding(prompt, face, what)
        prompt = drawn_on_init(prompt, index, init, "resize", what)
    except RequestError as err:
        raise BadRequest(str(err), 422) from None
    mask = clip_mask(unit, own, prompt.image, what, limits)
    try:
        prompt = dataclasses.replace(prompt, mask=mask, image_encoder=encoder)
        return check_ip_adapter(prompt, index, "a1111")
    except RequestError as err:
        raise BadRequest(f"{what}: {folder.without_paths(str(err))}", 422) from None


def a1111_controls(scripts: Any, folder: ModelFolder, limits: Limits, init: Image.Image | None = None,
                   init_resize: int = 0) -> tuple[ControlInput | IPAdapterInput, ...]:
    """The enabled units among the first `CONTROLNET_UNIT_COUNT` of `alwayson_scripts["controlnet"]["args"]` (the
    key in any case): A1111's `init_script_args` passes a script no more args than it has (the extension one per
    unit), so the others are neither read nor decoded. A unit without an image (webuiapi sends "") takes
    img2img's init image and resize mode (`init_resize`), as the extension does. A unit with an IP-Adapter
    module is an `IPAdapterInput` (`a1111_ip_adapter`), in its place among the others."""
    if not isinstance(scripts, dict):
        return ()
    script = next((v for k, v in scripts.items() if isinstance(k, str) and k.lower() == "controlnet"), None)
    if script is None:
        return ()
    units = script.get("args", []) if isinstance(script, dict) else script    # no args: no units, as A1111
    if not isinstance(units, list):
        raise BadRequest("alwayson_scripts.controlnet.args must be a list of units", 422)
    controls = []
    for unit in units[:CONTROLNET_UNIT_COUNT]:
        if not isinstance(unit, dict):
            raise BadRequest(f"a ControlNet unit must be an object, got {unit!r}", 422)
        if not unit.get("enabled", True) or unit.get("model") in (None, "", "None"):
            continue
        if is_ip_adapter_module(unit.get("module")):
            controls.append(a1111_ip_adapter(unit, len(controls), folder, limits, init))
        else:
            controls.append(a1111_unit(unit, len(controls), folder, limits, init, init_resize))
    return tuple(controls)


def native_threshold(value: Any) -> Any:
    """A native entry's threshold_a / threshold_b / processor_res: a negative number (A1111's -1) is the default
    (None), as with `--control-threshold-a` and an A1111 unit's thresholds; any other value as given (checked
    with the control)."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return None if is_number and value < 0 else value


def takes_init(item: dict[str, Any]) -> bool:
    """Whether a native `controls` or `ip_adapters` entry has no picture of its own, so that it draws on its job's
    init picture."""
    return not item.get("image")


def native_controls(items: list[dict[str, Any]], folder: ModelFolder, limits: Limits,
                    init: Image.Image | None = None, job_resize: str = "resize",
                    convention: str = "diffusers") -> tuple[ControlInput, ...]:
    """The native `controls` entries as checked `ControlInput`s. An entry without an image is drawn on the job's
    init picture `init` with its resize mode `job_resize` by the pipeline's rule (`control.drawn_on_init`, as an
    A1111 unit without one, `a1111_unit`); a txt2img job has none, and such an entry is a 422, as the extension
    refuses it ("no input image is given"). Under the job's `convention` "comfyui" its rules are checked instead of
    diffusers' (ComfyUI's resize modes; a window start == end, which ComfyUI's sigma window takes)."""
    controls = []
    for index, item in enumerate(items):
        what = f"control {index}"
        mask = item.get("mask")
        own = not takes_init(item)
        control = ControlInput(model_path(item.get("model"), what, folder, "controlnet", "give it in ip_adapters"),
                               hint_image(item.get("image"), what, limits) if own else None,
                               item.get("strength", 1.0), item.get("start", 0.0), item.get("end", 1.0),
                               module_name(item.get("module")), item.get("control_mode", "balanced"),
                               item.get("resize_mode"),
                               native_threshold(item.get("threshold_a")),
                               native_threshold(item.get("threshold_b")),
                               decode_image(mask, f"{what} mask", limits) if mask else None,
                               native_threshold(item.get("processor_res")), item.get("pixel_perfect") or False)
        try:
            control = drawn_on_init(control, index, init, job_resize)
        except RequestError as err:
            raise BadRequest(str(err), 422) from None
        controls.append(checked_control(control, index, "comfyui" if convention == "comfyui" else "diffusers",
                                        folder))
    return tuple(controls)


def native_ip_adapters(items: list[dict[str, Any]], folder: ModelFolder, limits: Limits,
                       convention: str = "diffusers", init: Image.Image | None = None) -> tuple:
    """The native `ip_adapters` entries as `IPAdapterInput`s: each model a file of the server's ControlNet folder
    by name (404 otherwise), its picture base64 (none: the job's init picture `init` by the pipeline's rule,
    `control.drawn_on_init`, as a control's; in txt2img a 422), its step window `start` / `end` by the request's
    `control_convention`; one the pipeline refuses (`check_ip_adapter`: its scale or window, no image encoder
    beside it) is a 422 naming it. An entry with an A1111 unit's `module` draws with the image encoder the module
    names (`unit_image_encoder`, as the unit did) and is recorded as that unit's line, which holds no layer scales
    and no face shortcut (either given with it: a 422). An IP-Adapter FaceID's `face_embedding` (`face_embeddings.native_face_embedding`) goes
    where its adapter reads it (`with_face_embedding`: a FaceID's image, a FaceID Plus's face embedding beside its
    picture); its shape and values are checked with the entry (`check_ip_adapter`)."""
    prompts = []
    for index, item in enumerate(items):
        what = f"IP-Adapter {index}"
        path = model_path(item.get("model"), what, folder, "ip-adapter", "give it in controls")
        module = item.get("module")
        face = item.get("face_embedding")
        face = None if face is None else native_face_embedding(face, what)
        prompt = IPAdapterInput(path, None if takes_init(item) else hint_image(item.get("image"), what, limits),
                                item.get("scale", 1.0), layer_scales=item.get("layer_scales"),
                                start=item.get("start", 0.0), end=item.get("end", 1.0), module=module,
                                resize_mode=item.get("resize_mode"), face_shortcut=item.get("face_shortcut"))
        try:
            if face is not None:
                prompt = with_face_embedding(prompt, face, what)
            prompt = prompt_on_init(prompt, index, init)
            if module is not None:
                if prompt.layer_scales is not None:
                    raise RequestError(f"{what}: layer_scales and module: an A1111 unit's line records no layer "
                                       "scales; give one of them")
                if prompt.face_shortcut is not None:
                    raise RequestError(f"{what}: face_shortcut and module: an A1111 unit's line records no face "
                                       "shortcut (the extension's FaceID Plus v2 adds its shortcut at 1, by the "
                                       "file's name); give one of them")
                prompt = dataclasses.replace(prompt, image_encoder=unit_image_encoder(module, path))
            prompts.append(check_ip_adapter(prompt, index, convention))
        except RequestError as err:
            raise BadRequest(folder.without_paths(str(err)), 422) from None
    return tuple(prompts)
