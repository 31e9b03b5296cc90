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
FreeU, `FreeU Integrated (SD 1.x, SD 2.x, SDXL)` or its earlier title `FreeU Integrated` in any case, by
`alwayson_freeu`; any other extension's (ADetailer, ...) is A1111's 422 for
a script it has not loaded.
"""

from __future__ import annotations

from typing import Any

from sdlab.models.freeu import FREEU_FACTORS, FREEU_WINDOW
from sdlab.pipeline.request import RequestError, check_freeu
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
        if key in FREEU_TITLES:
            alwayson_freeu({name: script})
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
    not enabled. More args, or a scale that is not a number, is a 422."""
    name = next((name for name in scripts if name.lower() == PAG), None)
    if name is None:
        return {}
    args = _script_args(name, scripts[name])
    if len(args) > len(PAG_ARGS):
        raise BadRequest(f"alwayson_scripts.{name} takes {len(PAG_ARGS)} args ({', '.join(PAG_ARGS)}), "
                         f"got {len(args)}", 422)
    enabled, scale = [*args, *PAG_DEFAULTS[len(args):]]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise BadRequest(f"alwayson_scripts.{name}: scale must be a number, got {scale!r}", 422)
    return {"pag_scale": float(scale)} if enabled else {}


def _script_args(name: str, script: Any) -> list[Any]:
    """The `args` of one script's `{"args": [...]}` (none: []); another shape is a 422 naming the script."""
    args = script.get("args", []) if isinstance(script, dict) else None
    if not isinstance(args, list):
        raise BadRequest(f'alwayson_scripts.{name} must be an object {{"args": [...]}}, got {script!r:.80}', 422)
    return args


def alwayson_freeu(scripts: dict[str, Any]) -> dict[str, Any] | None:
    """The FreeU setting (`models.freeu.FreeU`'s fields) of Forge's FreeU Integrated in `alwayson_scripts`, under
    either title: its args [enabled, b1, b2, s1, s2, start, end] (the earlier script's 5, or fewer: those left out
    its UI's defaults), drawn as Forge draws them, ComfyUI's FreeU_V2 on the steps of its window; None where it is
    absent or not enabled. More args, or a value that is not a number or out of range (`check_freeu`), is a 422."""
    name = next((name for name in scripts if name.lower() in FREEU_TITLES), None)
    if name is None:
        return None
    args = _script_args(name, scripts[name])
    if len(args) > len(FREEU_ARGS):
        raise BadRequest(f"alwayson_scripts.{name} takes {len(FREEU_ARGS)} args ({', '.join(FREEU_ARGS)}), "
                         f"got {len(args)}", 422)
    values = dict(zip(FREEU_ARGS, [*args, *FREEU_DEFAULTS[len(args):]]))
    if not values.pop("enabled"):
        return None
    setting = {**values, "version": 2, "convention": "comfyui"}
    try:
        check_freeu(setting)
    except RequestError as err:
        raise BadRequest(f"alwayson_scripts.{name}: {err}", 422) from None
    return setting
