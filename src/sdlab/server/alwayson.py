"""A1111 1.10's `alwayson_scripts` (txt2img / img2img): which names its API takes and what their args do there.

A1111 looks each key up among the scripts its txt2img or img2img tab has loaded, by title in any case
(modules/api/api.py `init_script_args` -> `get_script` -> `script_name_to_index`): a title it has not loaded is a
422 "Script '<name>' not found", the title of a selectable script (the X/Y/Z plot, ...) a 422 "Cannot have a
selectable script in the always on scripts params". A stock A1111 1.10 loads these always-on scripts:

- Seed, Sampler and Refiner (modules/processing_scripts): their `setup` copies their args onto the request's
  seed / sampler / refiner fields, but only in the web UI (`ScriptBuiltinUI.setup_for_ui_only`; the API sets
  `p.is_api` before the args), so through the API their args change nothing: the request's `seed`, `subseed`,
  `subseed_strength`, `seed_resize_from_*`, `steps`, `sampler_name`, `scheduler`, `refiner_checkpoint` and
  `refiner_switch_at` draw, whatever the args say;
- Comments, Hypertile and Extra options: no args that a default install reads (comments are stripped from every
  prompt anyway, Hypertile and the extra options follow options);
- Soft Inpainting, img2img only: enabled (its first arg) on a masked picture it blends the inpainting its own
  way, which sdlab does not draw, so that is a 422 rather than another picture.

The ControlNet extension's key, `controlnet` in any case, is read by `controls.a1111_controls`; Forge's built-in
FreeU, `FreeU Integrated (SD 1.x, SD 2.x, SDXL)` or its earlier title `FreeU Integrated` in any case, and the
sd-webui-freeu extension's script, `FreeU` in any case, by `alwayson_freeu`; any other extension's (ADetailer, ...)
is A1111's 422 for a script it has not loaded.

sd-webui-freeu (ljleb/sd-webui-freeu) takes its args as one object, `{"enable", "start_ratio", "stop_ratio",
"transition_smoothness", "version", "stage_infos"}` (its README's API section; `enable` true unless given), or as
its UI's values, `[enable, start_ratio, stop_ratio, transition_smoothness, *stage_infos]` (scripts/freeu.py
`process`; A1111 fills those left out with the UI's: off, 0, 1, 0 and its first preset's stages). The extension's
newest global_state.py puts `version` between transition_smoothness and the stages of its `State`, whose
positional args `process` fills in order: a string at args[4] is read as that version and the stages from args[5];
a number there as the earlier layout's first stage value, the stages from args[4] (the two layouts differ in that
arg's type alone; a client of the newest UI sends its version's label there). `stage_infos` holds up to three
stages, each an object or six numbers in the order backbone_factor, skip_factor,
backbone_offset, backbone_width, skip_cutoff, skip_high_end_factor (a stage left out: 1, 1, 0, 0.5, 0, 1, no
change); `version` "1" (the default) or "2" (also "Version 1" / "Version 2"; any other value is "1", as the
extension's `format_version` reads it). sdlab draws it as the FreeU convention "sd-webui-freeu" (`models.freeu`):
stages 1 and 2 as b1 / s1 and b2 / s2 on the extension's default backbone window. A 422 names each setting it
does not draw: another backbone window (offset, width), a skip cutoff or high-end factor, a third stage that
changes anything, a schedule that leaves a model call out or weighs one partly (a start after the first call, a
stop before the last, a transition smoothness), and the runs whose model calls its step counter does not count
as sdlab's FreeU acts on them: a sampler with more than one model call a step (its counter counts calls against
the steps, so FreeU stops part-way) and the hires fix (its counter runs on into the second pass).
"""

from __future__ import annotations

import math
from typing import Any

from sdlab.models.freeu import FREEU_FACTORS, FREEU_WINDOW
from sdlab.pipeline.request import RequestError, check_freeu, finite_number
from sdlab.server.inputs import BadRequest

CONTROLNET = "controlnet"
FREEU = "freeu integrated (sd 1.x, sd 2.x, sdxl)"
FREEU_TITLES = (FREEU, "freeu integrated")
FREEU_ARGS = ("enabled", *FREEU_FACTORS, *FREEU_WINDOW)
FREEU_DEFAULTS = (False, 1.01, 1.02, 0.99, 0.95, 0.0, 1.0)
"""Forge's FreeU Integrated script (extensions-builtin/sd_forge_freeu/scripts/forge_freeu.py): its titles (today's,
and the one before Forge PR #1689, Sept 2024, which had no step window and took the first 5 args), its args in
order, and the UI's values that A1111's API fills the ones a request leaves out with."""
_BOTH_TABS = ("Refiner", "Seed", "Sampler", "Comments", "Hypertile", "Extra options")
ALWAYSON_SCRIPTS = {"txt2img": _BOTH_TABS, "img2img": (*_BOTH_TABS, "Soft Inpainting")}
"""A1111 1.10's always-on scripts of each tab (`Script.title()`; `show` is `AlwaysVisible` there)."""
_ANY_TAB = ("Prompt matrix", "Prompts from file or textbox", "X/Y/Z plot")
SELECTABLE_SCRIPTS = {"txt2img": _ANY_TAB, "img2img": (
    "img2img alternative test", "Loopback", "Outpainting mk2", "Poor man's outpainting", *_ANY_TAB, "SD upscale")}
"""A1111 1.10's selectable scripts of each tab (scripts/*.py; Custom code only with --allow-code)."""
SELECTABLE_ERROR = "Cannot have a selectable script in the always on scripts params"
SD_WEBUI_FREEU = "freeu"
SD_WEBUI_FREEU_STATE = ("enable", "start_ratio", "stop_ratio", "transition_smoothness", "version", "stage_infos")
SD_WEBUI_FREEU_STAGE = ("backbone_factor", "skip_factor", "backbone_offset", "backbone_width", "skip_cutoff",
                        "skip_high_end_factor")
SD_WEBUI_FREEU_NEUTRAL = (1.0, 1.0, 0.0, 0.5, 0.0, 1.0)
SD_WEBUI_FREEU_UI = (False, 0.0, 1.0, 0.0, 1.2, 0.9, 0.0, 0.5, 0.0, 1.0, 1.4, 0.2, 0.0, 0.5, 0.0, 1.0,
                     *SD_WEBUI_FREEU_NEUTRAL)
SD_WEBUI_FREEU_VERSIONS = {"Version 1": "1", "Version 2": "2"}
"""sd-webui-freeu's script (ljleb/sd-webui-freeu scripts/freeu.py, lib_free_u/global_state.py): its title, its
`State`'s fields, a stage's `StageInfo` fields and their defaults (no change), its UI's values in its args' order
(off, start 0, stop 1, smoothness 0, the stages of its first preset, "SD1.4 Recommendations": 1.2 / 0.9, 1.4 / 0.2
and a neutral third), and its version labels."""
PAG = "perturbedattentionguidance integrated"
PAG_ARGS = ("enabled", "scale")
PAG_DEFAULTS = (False, 3.0)
"""Forge's PerturbedAttentionGuidance Integrated script (extensions-builtin/sd_forge_perturbed_attention/scripts/
forge_perturbed_attention.py): its args in order, and its UI's values for the ones a request leaves out."""


def check_alwayson_scripts(scripts: dict[str, Any], tab: str, masked: bool = False) -> None:
    """Refuse `alwayson_scripts` as A1111 1.10 does for the `tab` ("txt2img" / "img2img"), in the keys' order: a
    name it has not loaded, a selectable script's, a value that is not `{"args": [...]}`; and Soft Inpainting
    enabled on a `masked` img2img, which sdlab does not draw. The names it takes change nothing else here."""
    titles = {title.lower(): title for title in ALWAYSON_SCRIPTS[tab]}
    selectable = {title.lower() for title in SELECTABLE_SCRIPTS[tab]}
    for name, script in scripts.items():
        key = name.lower()
        if key == CONTROLNET:
            continue
        if key in FREEU_TITLES or key == SD_WEBUI_FREEU:
            alwayson_freeu(scripts)
            continue
        if key in selectable:
            raise BadRequest(f"alwayson_scripts: {SELECTABLE_ERROR} ('{name}' is run by script_name)", 422,
                             SELECTABLE_ERROR)
        if key == PAG:
            alwayson_pag({name: script})
            continue
        if key not in titles:
            raise BadRequest(f"Script '{name}' not found: alwayson_scripts takes A1111's own always-on scripts "
                             f"({', '.join(ALWAYSON_SCRIPTS[tab])}) and controlnet", 422, f"Script '{name}' not found")
        args = _script_args(name, script)
        if titles[key] == "Soft Inpainting" and masked and args and args[0]:
            raise BadRequest(f"alwayson_scripts.{name}: Soft Inpainting is not drawn by sdlab; leave it out or "
                             "send its first arg false for A1111's ordinary inpainting", 422)


def alwayson_pag(scripts: dict[str, Any]) -> dict[str, float]:
    """The perturbed-attention guidance fields of Forge's PerturbedAttentionGuidance Integrated in `alwayson_scripts`:
    its args [enabled, scale] (left out: its UI's defaults) as `pag_scale`, on its layers (the middle block's
    self-attentions: diffusers' "mid", the request's default) without an adaptive scale; none where it is absent or
    not enabled. More args, or a scale that is not a finite number (`_number`), is a 422."""
    name = next((name for name in scripts if name.lower() == PAG), None)
    if name is None:
        return {}
    args = _script_args(name, scripts[name])
    if len(args) > len(PAG_ARGS):
        raise BadRequest(f"alwayson_scripts.{name} takes {len(PAG_ARGS)} args ({', '.join(PAG_ARGS)}), "
                         f"got {len(args)}", 422)
    enabled, scale = [*args, *PAG_DEFAULTS[len(args):]]
    return {"pag_scale": float(_number(f"alwayson_scripts.{name}", "scale", scale))} if enabled else {}


def _script_args(name: str, script: Any) -> list[Any]:
    """The `args` of one script's `{"args": [...]}` (none: []); another shape is a 422 naming the script."""
    args = script.get("args", []) if isinstance(script, dict) else None
    if not isinstance(args, list):
        raise BadRequest(f'alwayson_scripts.{name} must be an object {{"args": [...]}}, got {script!r:.80}', 422)
    return args


def alwayson_freeu(scripts: dict[str, Any], steps: int | None = None, calls: float | None = None,
                   hires: bool = False) -> dict[str, Any] | None:
    """The FreeU setting (`models.freeu.FreeU`'s fields) of `alwayson_scripts`: Forge's FreeU Integrated under
    either title, its args [enabled, b1, b2, s1, s2, start, end] (the earlier script's 5, or fewer: those left out
    its UI's defaults), drawn as Forge draws them, ComfyUI's FreeU_V2 on the steps of its window; or sd-webui-freeu's
    `FreeU` (`sd_webui_freeu`, module docstring), checked against the run where it is given (A1111's `steps`, the
    `calls` the pass makes, `plan.a1111_model_calls`, None: one a step; the hires fix on or not). None where
    neither is there or enabled. Both, more args, or a value that is not a finite number, out of range
    (`check_freeu`) or not drawn, is a 422."""
    forge = next((name for name in scripts if name.lower() in FREEU_TITLES), None)
    extension = next((name for name in scripts if name.lower() == SD_WEBUI_FREEU), None)
    if forge is not None and extension is not None:
        raise BadRequest(f"alwayson_scripts: {forge!r} (Forge's FreeU) and {extension!r} (sd-webui-freeu's) are two "
                         "FreeU scripts; send one", 422)
    if extension is not None:
        return sd_webui_freeu(extension, _script_args(extension, scripts[extension]), steps, calls, hires)
    if forge is None:
        return None
    args = _script_args(forge, scripts[forge])
    if len(args) > len(FREEU_ARGS):
        raise BadRequest(f"alwayson_scripts.{forge} takes {len(FREEU_ARGS)} args ({', '.join(FREEU_ARGS)}), "
                         f"got {len(args)}", 422)
    values = dict(zip(FREEU_ARGS, [*args, *FREEU_DEFAULTS[len(args):]]))
    if not values.pop("enabled"):
        return None
    return _checked_freeu(forge, {**values, "version": 2, "convention": "comfyui"})


def _checked_freeu(name: str, setting: dict[str, Any]) -> dict[str, Any]:
    try:
        check_freeu(setting)
    except RequestError as err:
        raise BadRequest(f"alwayson_scripts.{name}: {err}", 422) from None
    return setting


def sd_webui_freeu(name: str, args: list[Any], steps: int | None = None, calls: float | None = None,
                   hires: bool = False) -> dict[str, Any] | None:
    """sd-webui-freeu's args (module docstring) as the FreeU setting sdlab draws for them, None where it is off; a
    422 naming the first setting that is not drawn."""
    state = _extension_state(name, args)
    if not state["enable"]:
        return None
    stages = _extension_stages(name, state["stage_infos"])
    what = f"alwayson_scripts.{name}"
    for index, stage in enumerate(stages):
        _check_extension_stage(what, index + 1, stage)
    _check_extension_schedule(what, state, steps, calls, hires)
    version = state["version"]
    try:
        version = version if version in SD_WEBUI_FREEU_VERSIONS.values() else SD_WEBUI_FREEU_VERSIONS.get(version, "1")
    except TypeError:                               # a list or object: the extension's `format_version` fails too
        raise BadRequest(f"{what}: version must be \"1\" or \"2\", got {version!r}", 422) from None
    (b1, s1), (b2, s2) = ((stage["backbone_factor"], stage["skip_factor"]) for stage in stages[:2])
    return _checked_freeu(name, {"b1": b1, "b2": b2, "s1": s1, "s2": s2, "version": int(version),
                                 "convention": "sd-webui-freeu"})


def _extension_state(name: str, args: list[Any]) -> dict[str, Any]:
    """sd-webui-freeu's `State` fields from its args: the one object, or the UI's values (A1111's UI values for
    those left out); another first arg, more args than its UI has, or a field it has not is a 422."""
    what = f"alwayson_scripts.{name}"
    if args and isinstance(args[0], dict):
        unknown = [key for key in args[0] if key not in SD_WEBUI_FREEU_STATE]
        if unknown:
            raise BadRequest(f"{what}: unknown field {unknown[0]!r}; sd-webui-freeu takes "
                             f"{', '.join(SD_WEBUI_FREEU_STATE)}", 422)
        return {"enable": True, "start_ratio": 0.0, "stop_ratio": 1.0, "transition_smoothness": 0.0, "version": "1",
                "stage_infos": [], **args[0]}
    versioned = len(args) > 4 and isinstance(args[4], str)          # the layout with `version` at args[4]
    ui = (*SD_WEBUI_FREEU_UI[:4], "1", *SD_WEBUI_FREEU_UI[4:]) if versioned else SD_WEBUI_FREEU_UI
    if len(args) > len(ui):
        raise BadRequest(f"{what} takes its object or at most {len(ui)} args (enable, start_ratio, stop_ratio, "
                         f"transition_smoothness, {'version, ' if versioned else ''}then 6 for each of 3 stages), "
                         f"got {len(args)}", 422)
    values = [*args, *ui[len(args):]]
    if not isinstance(values[0], bool):
        raise BadRequest(f"{what}: its first arg must be true / false or its settings' object, got {values[0]!r}",
                         422)
    schedule = [_number(what, field, value) for field, value in zip(SD_WEBUI_FREEU_STATE[1:4], values[1:4])]
    return {"enable": values[0], **dict(zip(SD_WEBUI_FREEU_STATE[1:4], map(float, schedule))),
            "version": values[4] if versioned else "1", "stage_infos": values[5:] if versioned else values[4:]}


def _number(what: str, field: str, value: Any) -> float | int:
    """`value` as given (an int stays one: the extension reads an int ratio as a step), or a 422 unless it is a
    finite number (`finite_number`: NaN, infinities and ints past a float's range too)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{what}: {field} must be a number, got {value!r}", 422)
    try:
        finite_number(field, value)
    except RequestError as err:
        raise BadRequest(f"{what}: {err}", 422) from None
    return value


def _extension_stages(name: str, infos: Any) -> list[dict[str, float]]:
    """The three stages of sd-webui-freeu's `stage_infos` (its `group_stage_infos`): objects, or runs of up to six
    numbers; the stages left out no change. A field it has not or a value that is not a number is a 422."""
    what = f"alwayson_scripts.{name}: stage_infos"
    if not isinstance(infos, list):
        raise BadRequest(f"{what} must be a list, got {infos!r:.80}", 422)
    stages, i = [], 0
    while i < len(infos) and len(stages) < 3:
        if isinstance(infos[i], dict):
            unknown = [key for key in infos[i] if key not in SD_WEBUI_FREEU_STAGE]
            if unknown:
                raise BadRequest(f"{what}[{len(stages)}]: unknown field {unknown[0]!r}; a stage takes "
                                 f"{', '.join(SD_WEBUI_FREEU_STAGE)}", 422)
            given, i = infos[i], i + 1
        else:
            given = dict(zip(SD_WEBUI_FREEU_STAGE, infos[i:i + len(SD_WEBUI_FREEU_STAGE)]))
            i += len(SD_WEBUI_FREEU_STAGE)
        stages.append({field: _number(f"{what}[{len(stages)}]", field, given.get(field, default))
                       for field, default in zip(SD_WEBUI_FREEU_STAGE, SD_WEBUI_FREEU_NEUTRAL)})
    return stages + [dict(zip(SD_WEBUI_FREEU_STAGE, SD_WEBUI_FREEU_NEUTRAL))] * (3 - len(stages))


def _check_extension_stage(what: str, number: int, stage: dict[str, float]) -> None:
    """A 422 naming a setting of sd-webui-freeu's stage `number` (1..3) that changes its picture and sdlab does not
    draw: a backbone window other than its default (offset 0, width 0.5) under a backbone factor, a skip cutoff
    under a skip factor, a high-end factor, a third stage that changes anything."""
    def refuse(setting: str) -> None:
        raise BadRequest(f"{what}: stage {number}'s {setting} is not drawn by sdlab (it draws sd-webui-freeu's "
                         "backbone and skip factors of stages 1 and 2, on its default window: backbone_offset 0, "
                         "backbone_width 0.5, skip_cutoff 0, skip_high_end_factor 1)", 422)
    if number == 3 and (stage["backbone_factor"], stage["skip_factor"], stage["skip_high_end_factor"]) != (1, 1, 1):
        refuse("factors (a third stage, at the 320-channel blocks)")
    if stage["backbone_factor"] != 1 and (stage["backbone_offset"], stage["backbone_width"]) != (0, 0.5):
        refuse(f"backbone window (backbone_offset {stage['backbone_offset']:g}, "
               f"backbone_width {stage['backbone_width']:g})")
    if stage["skip_high_end_factor"] != 1:
        refuse(f"skip_high_end_factor {stage['skip_high_end_factor']:g}")
    if stage["skip_factor"] != 1 and stage["skip_cutoff"] != 0:
        refuse(f"skip_cutoff {stage['skip_cutoff']:g}")


def _check_extension_schedule(what: str, state: dict[str, Any], steps: int | None, calls: float | None,
                              hires: bool) -> None:
    """A 422 where sd-webui-freeu's schedule leaves a model call of the run out or weighs one partly. Its counter
    counts the pass's model calls from 0 (`calls`, `plan.a1111_model_calls`; None: one a step) and it acts while
    the count is at least its start step and below its stop step (its `to_denoising_step`: int(ratio x steps) for a
    float, an int that step itself), weighed by the transition smoothness between those; `steps` is A1111's
    `state.sampling_steps` (None: not known yet, so only what holds on any run is checked)."""
    start, stop = (_number(what, field, state[field]) for field in ("start_ratio", "stop_ratio"))
    smoothness = _number(what, "transition_smoothness", state["transition_smoothness"])
    if smoothness != 0:
        raise BadRequest(f"{what}: transition_smoothness {smoothness!r} weighs the factors by the step; sdlab draws "
                         "sd-webui-freeu's schedule without it (0)", 422)
    if steps is None:
        return
    calls = steps if calls is None else calls
    start_call, stop_call = _denoising_step(start, steps), _denoising_step(stop, steps)
    if start_call > 0:
        raise BadRequest(f"{what}: start_ratio {start!r} leaves the first model calls out (it starts at call "
                         f"{start_call:.0f} of {steps} steps); sdlab draws sd-webui-freeu's schedule from the first "
                         "(int(start_ratio x steps) 0)", 422)
    if stop_call < calls and stop_call >= steps:          # FreeU stops before the run's last model call
        made = ("its sampler picks its number of model calls" if math.isinf(calls) else
                f"this run makes more model calls than that ({calls:.0f}, counting every step's)")
        raise BadRequest(f"{what}: sd-webui-freeu counts each model call against the {steps} steps, and {made}, so "
                         f"its FreeU stops part-way (after call {stop_call:.0f}), which sdlab does not "
                         "draw; use a sampler of one call a step (Euler, DPM++ 2M, ...; DDIM, PLMS and UniPC on "
                         "steps that divide 1000)", 422)
    if stop_call < calls:
        raise BadRequest(f"{what}: stop_ratio {stop!r} leaves the last model calls out (an int is a step, a float "
                         "a fraction of the steps); sdlab draws sd-webui-freeu's schedule to the end (stop_ratio "
                         "1.0)", 422)
    if hires:
        raise BadRequest(f"{what}: with the hires fix sd-webui-freeu's step counter runs on into the second pass, "
                         "which its stop_ratio then leaves out in part or whole, and sdlab draws FreeU on both "
                         "passes; draw without the hires fix or with Forge's FreeU Integrated", 422)


def _denoising_step(ratio: float | int, steps: int) -> float:
    """sd-webui-freeu's `to_denoising_step`: int(ratio x steps) for a float (an infinite product as it is), an int
    as it is (a step)."""
    if not isinstance(ratio, float):
        return ratio
    product = ratio * steps
    return float(math.floor(product)) if math.isfinite(product) else product
