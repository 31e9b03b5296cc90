"""A picture's parameters as the settings of a native job, read as `sdlab txt2img --from-png` reads them.

The web UI fills its form from a dropped PNG with `POST /api/parameters`: the settings come from the one reader
of parameters, `infotext.from_parameters` (A1111's schedule for its sampler, its RNG and clip skip rule, ENSD,
the conventions of a ComfyUI-spelt sampler, SDXL's sizes, ...) and `infotext.refiner_handoff`, so the job the
form sends draws what `--from-png` draws. Alongside come the labels the reader leaves unread, which the page
names in its notice.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

from sdlab.diffusion.schedule_names import A1111_SCHEDULERS, a1111_name
from sdlab.pipeline.control import recorded_model, recorded_unit
from sdlab.pipeline.image_prompt import (check_recorded_module, is_ip_adapter_unit, layer_settings,
                                        recorded_face_shortcut, recorded_ip_adapters, recorded_layer_scales,
                                        recorded_resize_mode, recorded_weight, recorded_window)
from sdlab.pipeline.infotext import from_parameters, refiner_handoff
from sdlab.pipeline.request import NO_IMAGE_GUIDANCE
from sdlab.server.a1111_scripts import XYZ_ARG_NAMES
from sdlab.server.registry import ModelRegistry

# Labels that describe the picture's files rather than how it was drawn
DESCRIBING = frozenset({"Model hash", "VAE hash", "Version", "Lora hashes", "TI hashes", "Hashes"})
_REFINER_HASH = re.compile(r"\s*\[[0-9a-f]+\]\s*$", re.IGNORECASE)      # `Refiner: name [hash]`
# sdlab's schedule -> the name `/sdapi/v1/schedulers` lists it under, where that is A1111's ("ddim_uniform": "ddim")
_LISTED_SCHEDULES = {target: a1111_name(key) for key, (_, target) in A1111_SCHEDULERS.items() if target is not None}


def picture_settings(p: dict[str, Any], models: ModelRegistry) -> dict[str, Any]:
    """The native job settings of parsed parameters `p` (`png_info.parse_parameters`), as `--from-png` reads them:
    `from_parameters`'s fields, the sampler and schedule set to null where the text leaves them to the model, the
    schedule and the hires schedule as `/sdapi/v1/schedulers` names them, the model as `models` titles the one the text names (by name, else
    by hash; as named when none), the VAE file by its name (`vae`), the refiner by name with its switch and handoff rule. A value that is not one
    raises ValueError."""
    settings = {"sampler": None, "schedule": None, **from_parameters(p)}
    if "image_cfg_scale" in settings and settings["image_cfg_scale"] is None:
        settings["image_cfg_scale"] = NO_IMAGE_GUIDANCE    # drawn without image guidance (a job's null is 1.5)
    for name in ("schedule", "hr_schedule"):
        if name in settings:
            settings[name] = _LISTED_SCHEDULES.get(settings[name], settings[name])
    if p.get("Model") or p.get("Model hash"):
        settings["model"] = _model_title(p, models)
    if p.get("VAE"):                    # the VAE file it was decoded with, by name (A1111's sd_vae infotext)
        settings["vae"] = str(p["VAE"])
    if p.get("Refiner"):
        switch, convention = refiner_handoff(p)
        settings.update(refiner=_REFINER_HASH.sub("", str(p["Refiner"])), refiner_convention=convention)
        if switch is not None:
            settings["refiner_switch"] = switch
    controls, ip_adapters, _ = recorded_units(p)
    if controls:
        settings["controls"] = controls
    if ip_adapters:
        settings["ip_adapters"] = ip_adapters
    return {**settings, **script_settings(p)}


def _numbered(p: dict[str, Any], prefix: str) -> list[str]:
    """The labels `prefix N` of `p` (N a whole number), in N's order."""
    labels = [label for label in p if label.startswith(prefix) and label[len(prefix):].isdigit()]
    return sorted(labels, key=lambda label: int(label[len(prefix):]))


def control_units(p: dict[str, Any]) -> list[int]:
    """The unit number N (its `ControlNet N` line's) of each `controls` entry `recorded_units` reads from `p`, in
    its order: a picture of `ControlNet 1` alone fills the form's unit 1, as A1111's paste keeps the unit."""
    unread = set(recorded_units(p)[2])
    return [int(label.removeprefix("ControlNet ")) for label in _numbered(p, "ControlNet ")
            if label not in unread and not is_ip_adapter_unit(str(p[label]))]


def recorded_units(p: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """The `ControlNet N` and `IP-Adapter N` lines of parsed parameters `p` as the native job's `controls` and
    `ip_adapters` entries without their pictures (which the text does not hold): a control's settings as
    `--from-png` reads them (`control.recorded_unit`) and `model` the line's "NAME [hash]"; an image prompt's
    `model` and `scale` (its Weight, else 1), from its `IP-Adapter N` line or the IP-Adapter unit the ControlNet
    extension and Forge write as a `ControlNet N` line (`image_prompt.recorded_ip_adapters`; then with the unit's
    `module` too, which names the image encoder it drew with; and a FaceID Plus's `face_shortcut`, its Face
    shortcut; the face embedding, as the picture, is not in the text). A line sdlab cannot
    draw (a preprocessor or mode it has not, a number that is not one, no model) is left out, and its label is
    the third list's."""
    controls, ip_adapters, unreadable = [], [], []
    for label in _numbered(p, "ControlNet "):
        line = str(p[label])
        if is_ip_adapter_unit(line):
            continue
        try:
            model = recorded_model(line)
            if model is None:
                raise ValueError("no model")
            controls.append({"model": model, **recorded_unit(line)})
        except ValueError:
            unreadable.append(label)
    for label, line in recorded_ip_adapters(p):
        try:
            module = check_recorded_module(line)
            model, weight, resize = recorded_model(line), recorded_weight(line), recorded_resize_mode(line)
            shortcut = recorded_face_shortcut(line)
            if model is None:
                raise ValueError("no model")
            ip_adapters.append({"model": model, "scale": 1.0 if weight is None else weight, **recorded_window(line),
                                **layer_settings(recorded_layer_scales(line)),
                                **({} if module is None else {"module": module}),
                                **({} if resize is None else {"resize_mode": resize}),
                                **({} if shortcut is None else {"face_shortcut": shortcut})})
        except ValueError:
            unreadable.append(label)
    return controls, ip_adapters, unreadable


def script_settings(p: dict[str, Any]) -> dict[str, Any]:
    """The selectable script whose fields parsed parameters `p` hold, as a job's `script_name` and `script_args`
    (A1111's order; null where the text does not record the argument: the form's own), or nothing. The X/Y/Z plot
    of a `Script` label (A1111's `infotext_fields`: each axis's `X Type` by its label, as the tab's list names it, and
    `X Values` as typed; an axis the text does not name is Nothing, which A1111 writes no fields for; csv_mode on:
    the values are the text), Loopback by its Final denoising strength and Denoising curve, SD upscale by its
    overlap and upscaler; another `Script` title is named alone. Prompt matrix and the outpainting scripts write
    no fields: their pictures name no script."""
    if "Script" in p:
        title = str(p["Script"])
        if title != "X/Y/Z plot":
            return {"script_name": title, "script_args": []}
        axes = [[str(p.get(f"{letter} Type", "Nothing")), str(p.get(f"{letter} Values", "")), []] for letter in "XYZ"]
        return {"script_name": title,
                "script_args": [arg for axis in axes for arg in axis] + [None] * (len(XYZ_ARG_NAMES) - 10) + [True]}
    if "Final denoising strength" in p and "Denoising curve" in p:
        return {"script_name": "Loopback",
                "script_args": [None, float(p["Final denoising strength"]), str(p["Denoising curve"]), None]}
    if "SD upscale overlap" in p and "SD upscale upscaler" in p:
        return {"script_name": "SD upscale",
                "script_args": [None, int(p["SD upscale overlap"]), str(p["SD upscale upscaler"]), None]}
    return {}


def _model_title(p: dict[str, Any], models: ModelRegistry) -> str:
    """The title of the checkpoint `p` names (`Model`, else `Model hash`), or its name when `models` lacks it."""
    for named in (p.get("Model"), p.get("Model hash")):
        found = models.find(str(named)) if named else None
        if found is not None:
            return found.title
    return str(p.get("Model") or p.get("Model hash"))


def unread_labels(p: dict[str, Any], models: ModelRegistry) -> list[str]:
    """`Label: value` of each label of `p` that `picture_settings` does not read, but the prompts and the labels
    `DESCRIBING` the files. A label is read when its value is: each try puts a `_Probe` in place of every value not
    known to be read, and the probes the reader touches are known to be read for the next try, until a try touches
    none (a value can be read only once others are: `Refiner switch at` once `Refiner` is)."""
    read = {"Prompt", "Negative prompt", *DESCRIBING}
    while True:
        touched: set[str] = set()
        probed = {label: value if label in read else _Probe(label, touched) for label, value in p.items()}
        with contextlib.suppress(Exception):    # a probe read stops the try: it raises _Read (or the reader's error)
            picture_settings(probed, models)
        if touched <= read:                     # the units' lines sdlab cannot draw are read and left out
            read -= set(recorded_units(p)[2])
            return [f"{label}: {value}" for label, value in p.items() if label not in read]
        read |= touched


class _Read(Exception):
    """A `_Probe` was read."""


class _Probe:
    """The value of `label`, unknown: whatever reads it (str, int, float, bool, comparison, a method) adds `label`
    to `touched` and raises `_Read`."""

    def __init__(self, label: str, touched: set[str]) -> None:
        object.__setattr__(self, "_label", label)
        object.__setattr__(self, "_touched", touched)

    def _read(self, *args: Any, **kwargs: Any) -> Any:
        self._touched.add(self._label)
        raise _Read(self._label)

    def __getattr__(self, name: str) -> Any:
        return self._read()


for _name in ("__str__", "__repr__", "__format__", "__bytes__", "__int__", "__float__", "__index__", "__bool__",
              "__round__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__hash__", "__len__",
              "__iter__", "__contains__", "__getitem__", "__add__", "__radd__", "__mul__", "__rmul__", "__mod__"):
    setattr(_Probe, _name, _Probe._read)
del _name
