"""X/Y/Z plots as A1111's script draws them: axes over request fields, and the labelled grid picture.

An axis is `FIELD=V1,V2,...` (`parse_axis`). Values are split as CSV (quotes keep commas inside a value)
and numeric fields expand A1111's ranges:

    1-5          -> 1, 2, 3, 4, 5                 (ints: range(start, end + 1, step))
    1-10 (+3)    -> 1, 4, 7, 10                   (a signed step in parentheses)
    10-20 [3]    -> 10, 15, 20                    (a count in brackets: numpy.linspace; ints truncate)
    1-2 (+0.25)  -> 1.0, 1.25, 1.5, 1.75, 2.0     (floats: numpy.arange(start, end + step, step))
    5e-1         -> 0.5                           (a number as Python's float() reads it; anything else
                                                   that is neither a number nor a range is a GridError)

Fields: A1111's axis types (`axis_options`, named as A1111 labels them; any case, and spaces, `_`, `-`, `/`
and `.` ignored), the request field's name, or a short name; labels as A1111's `format_value_add_label`
("Steps: 10", "CFG Scale: 7.0") unless said:

| A1111 axis type (short names)          | request field                        | label            |
|----------------------------------------|--------------------------------------|------------------|
| Nothing                                | none: one cell, no legend, no `X Type` | none           |
| Seed, Var. seed (variation seed)       | seed, subseed (-1: random, drawn once, `Plot`) | Seed: v |
| Var. strength                          | subseed_strength                     |                  |
| Steps, Hires steps                     | steps, hr_steps                      |                  |
| CFG Scale (cfg)                        | cfg_scale                            |                  |
| Image CFG Scale                        | image_cfg_scale (an edit model's)    |                  |
| Prompt S/R (sr, prompt_sr)             | the prompts (SDXL's second ones too) | the value        |
| Prompt order                           | prompt: every order of the values    | the order, ", "-joined |
| Sampler, Hires sampler                 | sampler, hr_sampler                  | Sampler: the value alone |
| Negative Guidance minimum sigma (ngms) | s_min_uncond                         |                  |
| Sigma Churn / min / max / noise        | s_churn, s_tmin, s_tmax, s_noise (A1111 1.6+ ignores them) |  |
| Schedule type (schedule, scheduler)    | schedule (A1111 labels too)          |                  |
| Schedule min sigma / max sigma / rho   | schedule_sigma_min / _max, schedule_rho |               |
| Eta, Clip skip                         | eta, clip_skip                       |                  |
| Denoising (denoise, strength)          | strength (img2img), hr_denoise (txt2img: the hires fix's) |  |
| Denoising as `hr_denoise`              | hr_denoise alone (no img2img's strength) | Denoising: v     |
| Initial noise multiplier, Extra noise  | noise_multiplier, extra_noise        |                  |
| Hires upscaler                         | hr_upscaler                          |                  |
| Cond. Image Mask Weight                | inpainting_mask_weight               |                  |
| Styles                                 | styles: the value's names (split at commas) after the request's | |
| UniPC Order                            | unipc_order (1..steps - 1, as A1111; with UniPC on ddim_uniform only) |  |
| Token merging ratio (high-res)         | token_merging_ratio, token_merging_ratio_hr |           |
| Always discard next-to-last sigma      | discard_penultimate_sigma (True / False) |              |
| SGM noise multiplier                   | sgm_noise_multiplier (True / False)  |                  |
| RNG source                             | rng (CPU, GPU, NV)                   |                  |
| Checkpoint name (model)                | checkpoint: the model the cell draws with | its file name alone |
| VAE                                    | vae: a VAE, None (the model's own) or Automatic (the one near it) |  |
| Refiner checkpoint, Refiner switch at  | refiner (None: none), refiner_switch (in (0, 1)) | Refiner checkpoint: its file name alone |
| Size                                   | width and height (`512x768`, as A1111's `apply_size`) |    |
| Width, Height (sdlab's own)            | width, height                        |                  |
| [FreeU] Enabled (sd-webui-freeu's)     | freeu: the cell's setting (True / 1) or none (False / 0, None) |  |
| [FreeU] Stage 1 / 2 Backbone Scale     | freeu's b1 / b2                      |                  |
| [FreeU] Stage 1 / 2 Skip Scale         | freeu's s1 / s2                      |                  |
| FreeU start, FreeU end (sdlab's own)   | freeu's start / end (Forge's step window, fractions in [0, 1]) |  |
| PAG scale (sdlab's own)                | pag_scale (perturbed-attention guidance; 0 off) |       |

The FreeU axes take the names sd-webui-freeu gives its X/Y/Z axes (lib_free_u/xyz_grid.py: "[FreeU] Stage 1 Backbone
Scale" ..., earlier "[FreeU] Block 1 ..."); they set sdlab's FreeU (`models.freeu`: Forge's / ComfyUI's filter, not that
extension's windowed one) on the cell's setting: the request's, else FreeU's defaults, so a factor axis on a request
without FreeU draws it on. Its step window has sdlab's own names: the extension's Start At Step / Stop At Step count
steps its own way (an integer a step, with a transition smoothness). Forge's built-in FreeU and PAG add no axes.

Checkpoint name, VAE, Refiner checkpoint and Refiner switch at (`MODEL_FIELDS`) are no request fields but what
a cell loads and draws with (the server's: a listed model or VAE; `sdlab grid`'s: a file, as its --model, --vae
and --refiner take one): the server's X/Y/Z plot and `sdlab grid` draw them, each cell with its model, in A1111's
order (`Plot.drawing_order`: the costliest axis, Checkpoint name, outermost, so that its model changes least;
`sdlab grid` keeps each model's cells together, so that each loads once); `draw_plot`, which draws every cell
with one `run`, refuses them.

Prompt S/R (A1111): the first value is searched in the prompt and the negative prompt (and SDXL's prompt_2 /
negative_prompt_2, which A1111 lacks: every prompt text), and each value in turn replaces it there (so the first
cell keeps the prompt as written). Prompt order (A1111's `apply_order`):
one cell per permutation of the values (the typed order first), each putting the values back into the
prompt, where they stand, in its order. Both look in each cell's prompt as the axes before them (X, then Y,
then Z) left it, and a cell where the word is not there is a GridError (`Plot.cells`), as A1111 refuses it.

The picture (`draw_grid`): cells on a white sheet, X labels centred above the columns, Y labels at the left
of the rows (A1111's `draw_grid_annotations`: left band 3/4 of a cell wide, text wrapped to fit), and for a
Z axis one such grid per Z value, side by side in one row under the Z titles (A1111's `image_grid(...,
rows=1)`, the titles in one band as high as the tallest). Cells of different sizes
(a width or height axis) sit at the top left of slots as large as the largest cell.

`Plot(x, y, z)` holds the axes: `cells(options)` gives each cell's request options, `sheet(images)` the
picture, `parameters()` A1111's plot fields for the picture's parameters (Script: X/Y/Z plot, X Type, ...),
and `draw_plot(pipe.run, options, plot)` does both around any callable that draws a request (with a Styles axis,
`styles=` the StyleDatabase its names are in). A cell drawn
as a batch shows its images as A1111's batch grid (`cell_picture`). `draw_cells(pipe.run, plot, cells,
batch_count)`, what `draw_plot` draws with, takes each cell's options as the caller made them and draws each
cell as a batch count (`cell_batches`, with which `sdlab grid` draws each cell with its model's pipeline), giving
every batch's result.
"""

from __future__ import annotations

import csv
import math
import re
import subprocess
from dataclasses import dataclass, replace
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from itertools import chain, permutations, product
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sdlab.diffusion.noise import RNG_SOURCES
from sdlab.diffusion.samplers import get_sampler
from sdlab.diffusion.schedule_names import schedule_from_a1111
from sdlab.models.freeu import FREEU_FACTORS, MAX_FREEU_FACTOR, FreeU
from sdlab.pipeline.request import (
    MAX_CFG, GenerationRequest, GenerationResult, RequestError, check_freeu, fixed_seed, next_batch, runs_a1111_unipc,
)
from sdlab.pipeline.styles import StyleDatabase, styled_options
from sdlab.utils.numbers import finite_float

MAX_CELLS = 256

_INT_RANGE = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\(([+-]\d+)\s*\))?\s*")
_INT_COUNT = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\[(\d+)\s*\])?\s*")
# A1111's number `\d+(?:.\d*)?` with the dot escaped and an exponent: "5e-1" is 0.5, not the range "5e" to "1"
_NUMBER = r"\d+(?:\.\d*)?(?:[eE][+-]?\d+)?"
_FLOAT_RANGE = re.compile(rf"\s*([+-]?\s*{_NUMBER})\s*-\s*([+-]?\s*{_NUMBER})(?:\s*\(([+-]{_NUMBER})\s*\))?\s*")
_FLOAT_COUNT = re.compile(rf"\s*([+-]?\s*{_NUMBER})\s*-\s*([+-]?\s*{_NUMBER})(?:\s*\[({_NUMBER})\s*\])?\s*")


class GridError(ValueError):
    """An axis that cannot be plotted (unknown field, bad value or range, too many cells)."""


def _set_field(name: str) -> Callable[[dict[str, Any], Any, tuple[Any, ...]], dict[str, Any]]:
    """A1111's `apply_field`: the value into request field `name`."""
    return lambda options, value, values: {**options, name: value}


_PROMPT_TEXTS = ("prompt", "negative_prompt", "prompt_2", "negative_prompt_2")
"""The texts Prompt S/R replaces in: A1111's prompt and negative prompt, and SDXL's second prompts (A1111 has none)."""


def _replace_in_prompts(options: dict[str, Any], value: str, values: tuple[str, ...]) -> dict[str, Any]:
    """A1111's `apply_prompt` (Prompt S/R): the first value replaced by `value` in every prompt text; a GridError
    where no prompt text of the cell (after the axes before this one) holds it, as A1111 refuses the cell."""
    texts = {name: options[name] for name in _PROMPT_TEXTS if options.get(name)}
    if not any(values[0] in text for text in texts.values()):
        raise GridError(f"Prompt S/R did not find {values[0]!r} in the prompt, the negative prompt or a second prompt")
    return {**options, **{name: text.replace(values[0], value) for name, text in texts.items()}}


def _reorder_prompt(options: dict[str, Any], order: tuple[str, ...], values: Any) -> dict[str, Any]:
    """A1111's `apply_order` (Prompt order): the tokens, where they first occur in the prompt, put back in
    `order` (the prompt's text between them kept in place); a GridError where the cell's prompt (after the axes
    before this one) lacks one, which A1111 would splice in at the wrong place."""
    prompt = options.get("prompt", "")
    if missing := [token for token in order if token not in prompt]:
        raise GridError(f"Prompt order did not find {', '.join(map(repr, missing))} in the prompt")
    parts = []
    for token in sorted(order, key=prompt.find):
        at = prompt.find(token)
        parts.append(prompt[:at])
        prompt = prompt[at + len(token):]
    return {**options, "prompt": "".join(part + token for part, token in zip(parts, order)) + prompt}


def _denoise(options: dict[str, Any], value: float, values: tuple[float, ...]) -> dict[str, Any]:
    """A1111's Denoising axis sets `denoising_strength`: img2img's strength, and in txt2img the hires fix's."""
    txt2img = options.get("init_image") is None and not options.get("init_images")
    return {**options, "hr_denoise" if txt2img else "strength": value}


def _add_styles(options: dict[str, Any], value: str, values: tuple[str, ...]) -> dict[str, Any]:
    """A1111's `apply_styles`: the value's style names (split at commas, not stripped) after the cell's `styles`,
    which `styles.styled_options` applies to the prompts when the cell is drawn."""
    return {**options, "styles": (*options.get("styles", ()), *value.split(","))}


def _unipc_order(options: dict[str, Any], value: int, values: tuple[int, ...]) -> dict[str, Any]:
    """A1111's `apply_uni_pc_order`: the order, at most the cell's steps (as the axes before it left them) less
    one, and at least 1. Unset steps (the model's) leave it as typed: `sdlab grid` sets them first."""
    steps = options.get("steps")
    return {**options, "unipc_order": value if steps is None else max(1, min(value, steps - 1))}


_SIZE = re.compile(r"\s*(\d+)\s*[xX]\s*(\d+)\s*")


def _set_size(options: dict[str, Any], value: str, values: tuple[str, ...]) -> dict[str, Any]:
    """A1111's `apply_size`: "WIDTHxHEIGHT" into the width and the height."""
    width, height = map(int, _SIZE.fullmatch(value).groups())
    return {**options, "width": width, "height": height}


def cell_freeu(options: Mapping[str, Any]) -> FreeU:
    """The cell's FreeU setting as the axes before this one left it: the request's (a `FreeU`, or the native API's
    mapping of its fields), else the one it holds while FreeU is off (`freeu_idle`), else FreeU's defaults."""
    freeu = options.get("freeu")
    if freeu is None:
        freeu = options.get("freeu_idle")
    if isinstance(freeu, str):
        raise GridError(freeu)
    return FreeU() if freeu is None else check_freeu(freeu)


def _idle(options: Mapping[str, Any]) -> bool:
    """Whether the cell's FreeU is off but its request holds a setting for it (`freeu_idle`: sd-webui-freeu's
    script sent disabled with its own values, as its UI sends it), which the FreeU axes change without turning
    FreeU on, as that extension's X/Y/Z axes change its state and leave its `enable`."""
    return options.get("freeu") is None and "freeu_idle" in options


def _set_freeu(name: str) -> Callable[[dict[str, Any], Any, tuple[Any, ...]], dict[str, Any]]:
    """sd-webui-freeu's `apply_global_state`: the value into the cell's FreeU field `name` (FreeU on, unless it is
    off with a setting of its own: `_idle`); a setting it makes wrong with the request's own (an end before its
    start) is a GridError, which `Plot.cells` says of the cell."""
    def apply(options: dict[str, Any], value: Any, values: tuple[Any, ...]) -> dict[str, Any]:
        try:
            setting = check_freeu(replace(cell_freeu(options), **{name: value}))
        except RequestError as err:
            raise GridError(str(err)) from None
        return {**options, "freeu_idle" if _idle(options) else "freeu": setting}

    return apply


def _freeu_enabled(options: dict[str, Any], value: bool, values: tuple[bool, ...]) -> dict[str, Any]:
    """sd-webui-freeu's [FreeU] Enabled: True draws the cell's FreeU setting (the one it holds while off too),
    False and None none, keeping the setting where the request holds one while off (`_idle`)."""
    if value:
        return {**options, "freeu": cell_freeu(options)}
    kept = {"freeu_idle": options.get("freeu") or options["freeu_idle"]} if "freeu_idle" in options else {}
    return {**options, "freeu": None, **kept}


MODEL_FIELDS = ("checkpoint", "vae", "refiner", "refiner_switch")
"""The axes' fields that are no request field but what a cell draws with: its model, VAE file
("None": the checkpoint's own, "Automatic": the one found near it), SDXL refiner ("None": none) and switch."""


@dataclass(frozen=True)
class Field:
    name: str                        # the request field it sets; `set` may set others (Prompt S/R: both prompts,
                                     # Denoising: "strength" or, in txt2img, "hr_denoise")
    kind: type                       # int, float, bool, str or tuple (Prompt order: permutations of the values)
    label: str | None                # "Steps" -> "Steps: 10"; None: the value alone
    title: str | None = None         # A1111's axis name (`X Type`) when it is not `label`
    set: Callable[[dict[str, Any], Any, tuple[Any, ...]], dict[str, Any]] | None = None  # None: `_set_field(name)`
    cost: float = 0.0                # A1111's `AxisOption.cost`: the costliest axis is drawn outermost (`drawing_order`)

    @property
    def type_name(self) -> str:
        """The axis as A1111 names it in the grid's `X Type` (its AxisOption label)."""
        return self.title or self.label or self.name


NOTHING = Field("nothing", str, None, "Nothing", lambda options, value, values: options)
FIELDS: tuple[Field, ...] = (         # A1111's axis_options (scripts/xyz_grid.py) that map onto request fields
    NOTHING,
    Field("seed", int, "Seed"),
    Field("subseed", int, "Var. seed"),
    Field("subseed_strength", float, "Var. strength"),
    Field("steps", int, "Steps"),
    Field("hr_steps", int, "Hires steps"),
    Field("cfg_scale", float, "CFG Scale"),
    Field("image_cfg_scale", float, "Image CFG Scale"),
    Field("prompt", str, None, "Prompt S/R", _replace_in_prompts),
    Field("prompt_order", tuple, None, "Prompt order", _reorder_prompt),
    Field("sampler", str, None, "Sampler"),
    Field("hr_sampler", str, "Hires sampler"),
    Field("s_min_uncond", float, "Negative Guidance minimum sigma"),
    Field("s_churn", float, "Sigma Churn"),
    Field("s_tmin", float, "Sigma min"),
    Field("s_tmax", float, "Sigma max"),
    Field("s_noise", float, "Sigma noise"),
    Field("schedule", str, "Schedule type"),
    Field("schedule_sigma_min", float, "Schedule min sigma"),
    Field("schedule_sigma_max", float, "Schedule max sigma"),
    Field("schedule_rho", float, "Schedule rho"),
    Field("eta", float, "Eta"),
    Field("clip_skip", int, "Clip skip"),
    Field("strength", float, "Denoising", None, _denoise),
    Field("noise_multiplier", float, "Initial noise multiplier"),
    Field("extra_noise", float, "Extra noise"),
    Field("hr_upscaler", str, "Hires upscaler"),
    Field("inpainting_mask_weight", float, "Cond. Image Mask Weight"),
    Field("styles", str, "Styles", None, _add_styles),
    Field("unipc_order", int, "UniPC Order", None, _unipc_order, cost=0.5),
    Field("token_merging_ratio", float, "Token merging ratio"),
    Field("token_merging_ratio_hr", float, "Token merging ratio high-res"),
    Field("discard_penultimate_sigma", bool, "Always discard next-to-last sigma"),
    Field("sgm_noise_multiplier", bool, "SGM noise multiplier"),
    Field("rng", str, "RNG source"),
    Field("checkpoint", str, None, "Checkpoint name", cost=1.0),
    Field("vae", str, "VAE", cost=0.7),
    Field("refiner", str, None, "Refiner checkpoint", cost=1.0),
    Field("refiner_switch", float, "Refiner switch at"),
    Field("size", str, "Size", None, _set_size),
    Field("width", int, "Width"),                # sdlab's own: A1111's is Size
    Field("height", int, "Height"),
    Field("freeu_enabled", bool, "[FreeU] Enabled", None, _freeu_enabled),        # sd-webui-freeu's names
    Field("freeu_b1", float, "[FreeU] Stage 1 Backbone Scale", None, _set_freeu("b1")),
    Field("freeu_b2", float, "[FreeU] Stage 2 Backbone Scale", None, _set_freeu("b2")),
    Field("freeu_s1", float, "[FreeU] Stage 1 Skip Scale", None, _set_freeu("s1")),
    Field("freeu_s2", float, "[FreeU] Stage 2 Skip Scale", None, _set_freeu("s2")),
    Field("freeu_start", float, "FreeU start", None, _set_freeu("start")),         # sdlab's own
    Field("freeu_end", float, "FreeU end", None, _set_freeu("end")),
    Field("pag_scale", float, "PAG scale"),
)
HIRES_DENOISE = Field("hr_denoise", float, "Denoising")   # `hr_denoise`: A1111's Denoising as the hires fix's alone
_ALIASES = {
    "scheduler": "schedule", "cfg": "cfg_scale", "denoise": "strength", "denoisingstrength": "strength",
    "sr": "prompt", "promptsr": "prompt", "samplername": "sampler",
    "hrsamplername": "hr_sampler", "variationseed": "subseed", "variationstrength": "subseed_strength",
    "ngms": "s_min_uncond", "randnsource": "rng", "model": "checkpoint", "sdmodelcheckpoint": "checkpoint",
    "sdvae": "vae",
    **{f"[FreeU] Block {stage} {part} Scale": f"freeu_{letter}{stage}"                # sd-webui-freeu's names
       for stage in (1, 2) for part, letter in (("Backbone", "b"), ("Skip", "s"))},   # before its Stage ones
    "freeu": "freeu_enabled", "pag": "pag_scale",
}


def _key(name: str) -> str:
    return re.sub(r"[\s_\-/.]+", "", name.lower())


_BY_KEY = {**{_key(f.type_name): f for f in FIELDS}, **{_key(f.name): f for f in FIELDS},
           **{_key(alias): next(f for f in FIELDS if f.name == name) for alias, name in _ALIASES.items()},
           _key(HIRES_DENOISE.name): HIRES_DENOISE}


@dataclass(frozen=True)
class Axis:
    field: Field
    values: tuple[Any, ...]
    labels: tuple[str, ...]
    text: str = ""                   # the values as typed (A1111's `X Values`)

    def apply(self, options: dict[str, Any], index: int) -> dict[str, Any]:
        """`options` (GenerationRequest keyword arguments) with this axis at its `index`-th value."""
        apply = self.field.set or _set_field(self.field.name)
        return apply(options, self.values[index], self.values)


def field_named(name: str) -> Field:
    """The field of an axis named as A1111 labels it (`Var. seed`, `Sigma Churn`), as the request field
    (`subseed`, `s_churn`) or by a short name (`cfg`, `denoise`, `prompt_sr`); any case, and spaces, `_`, `-`,
    `/` and `.` ignored."""
    if (field := _BY_KEY.get(_key(name))) is None:
        raise GridError(f"unknown grid field {name.strip()!r}; valid: "
                        + ", ".join(f.type_name for f in FIELDS))
    return field


def split_values(text: str) -> list[str]:
    """A1111's value list: CSV (quotes keep commas), each value stripped."""
    return [v.strip() for v in chain.from_iterable(csv.reader([text], skipinitialspace=True))]


def _too_many(count: float, text: str) -> None:
    if count > MAX_CELLS:
        raise GridError(f"the range {text.strip()!r} makes {count:.0f} values; a grid holds at most {MAX_CELLS} cells")


def _int_values(text: str) -> list[int]:
    if m := _INT_RANGE.fullmatch(text):
        start, end = int(m[1].replace(" ", "")), int(m[2].replace(" ", "")) + 1
        step = int(m[3]) if m[3] is not None else 1
        if step == 0:
            raise GridError(f"the range {text.strip()!r} has a step of 0")
        _too_many(len(range(start, end, step)), text)
        return list(range(start, end, step))
    if m := _INT_COUNT.fullmatch(text):
        count = int(m[3]) if m[3] is not None else 1
        _too_many(count, text)
        return [int(x) for x in np.linspace(int(m[1].replace(" ", "")), int(m[2].replace(" ", "")), count).tolist()]
    try:
        return [int(text)]
    except ValueError:
        raise GridError(f"{text!r} is not an integer or a range (1-5, 1-10 (+2), 10-20 [3])") from None


def _finite(text: str, *numbers: float) -> None:
    """A GridError for a range whose start, end or step overflows a float (1e400)."""
    if not all(math.isfinite(number) for number in numbers):
        raise GridError(f"the range {text.strip()!r} has a number that is not finite")


def _float_values(text: str) -> list[float]:
    if m := _FLOAT_RANGE.fullmatch(text):
        start, end = float(m[1].replace(" ", "")), float(m[2].replace(" ", ""))
        step = float(m[3]) if m[3] is not None else 1.0
        _finite(text, start, end, step)
        if step == 0:
            raise GridError(f"the range {text.strip()!r} has a step of 0")
        _too_many(max(0.0, (end + step - start) / step), text)
        return np.arange(start, end + step, step).tolist()
    if m := _FLOAT_COUNT.fullmatch(text):
        start, end = float(m[1].replace(" ", "")), float(m[2].replace(" ", ""))
        count = float(m[3]) if m[3] is not None else 1.0
        _finite(text, start, end, count)
        _too_many(int(count), text)
        return np.linspace(start, end, int(count)).tolist()
    return [finite_float(text, GridError, f"{text!r} is not a number or a range (1-5, 1-2 (+0.25), 5-9 [3])",
                         f"{text!r} is not a finite number")]


def _bool_value(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise GridError(f"{text!r} is not True or False")
    return text.lower() == "true"


def _extension_bool(text: str) -> bool | None:
    """sd-webui-freeu's `str_to_bool` (lib_free_u/xyz_grid.py), its [FreeU] Enabled axis's type: true / 1 and
    false / 0 in any case, "None" (that case alone) and "" None, which its FreeU reads as off (`if not enable`)."""
    if text in ("None", ""):
        return None
    if text.lower() not in ("true", "1", "false", "0"):
        raise GridError(f"{text!r} is not True, False, 1, 0 or None")
    return text.lower() in ("true", "1")


def _orders(raw: list[str], text: str) -> list[tuple[str, ...]]:
    """A1111's Prompt order values: every permutation of the tokens (`str_permutations`), the typed order first."""
    _too_many(math.factorial(len(raw)), text)
    return list(permutations(raw))


def parse_values(field: Field, text: str) -> list[Any]:
    """The values of an axis: CSV, with A1111's ranges expanded for numeric fields (module docstring)."""
    raw = split_values(text)
    if field.kind is str:
        values: list[Any] = raw if field.name == "prompt" else [v for v in raw if v]
    elif field.kind is tuple:
        values = _orders([v for v in raw if v], text) if any(raw) else []
    elif field.name == "freeu_enabled":                # each value, "" too, as the extension reads it
        values = [_extension_bool(v) for v in raw]
    elif field.kind is bool:
        values = [_bool_value(v) for v in raw if v]
    else:
        expand: Callable[[str], list[Any]] = _int_values if field.kind is int else _float_values
        values = []
        for item in raw:
            if item:
                values += expand(item)
                _too_many(len(values), text)
    if not values:
        raise GridError(f"no values in {text!r}")
    return values


def _check_value(field: Field, value: Any) -> None:
    if field.name in ("sampler", "hr_sampler"):
        get_sampler(value)                            # UnknownSamplerError (a ValueError) lists the names
    elif field.name == "schedule":
        try:                                          # A1111's labels ("SGM Uniform", "Automatic") as txt2img
            schedule_from_a1111(value)
        except ValueError as err:
            raise GridError(str(err).replace("scheduler", "schedule", 1)) from None
    elif field.name == "rng" and value.upper() not in RNG_SOURCES:
        raise GridError(f"unknown RNG source {value!r}; valid: {', '.join(RNG_SOURCES)}")
    elif field.name in ("steps", "width", "height", "clip_skip", "unipc_order") and value < 1:
        raise GridError(f"{field.label} must be at least 1, got {value}")
    elif field.name in ("strength", "hr_denoise") and not 0.0 < value <= 1.0:
        raise GridError(f"the denoising strength must lie in (0, 1], got {value:g}")
    elif field.name == "subseed_strength" and not 0.0 <= value <= 1.0:
        raise GridError(f"Var. strength must lie in [0, 1], got {value:g}")
    elif field.name == "refiner_switch" and not 0.0 < value < 1.0:
        raise GridError(f"Refiner switch at must lie in (0, 1), got {value:g}")
    elif field.name in (f"freeu_{name}" for name in FREEU_FACTORS) and not abs(value) <= MAX_FREEU_FACTOR:
        raise GridError(f"{field.label} must lie in [-{MAX_FREEU_FACTOR:g}, {MAX_FREEU_FACTOR:g}], got {value:g}")
    elif field.name in ("freeu_start", "freeu_end") and not 0.0 <= value <= 1.0:
        raise GridError(f"{field.label} must lie in [0, 1] (a fraction of the steps), got {value:g}")
    elif field.name == "pag_scale" and not 0.0 <= value <= MAX_CFG:
        raise GridError(f"PAG scale must lie in [0, {MAX_CFG:g}], got {value:g}")
    elif field.name == "size" and (not _SIZE.fullmatch(value) or 0 in map(int, _SIZE.fullmatch(value).groups())):
        raise GridError(f"{value!r} is not a size WIDTHxHEIGHT of at least 1x1 (512x768)")


def _label(field: Field, value: Any) -> str:
    """A1111's `format_value_add_label` / `format_value`: a float rounded to 8 places, as Python writes it (7.0);
    a Prompt order joined with ", " (`format_value_join_list`); a checkpoint its file name alone
    (`format_remove_path`), a VAE file too (A1111's VAE values are `sd_vae.vae_dict`'s file names); Nothing none
    (`format_nothing`)."""
    if field is NOTHING:
        return ""
    text = str(round(value, 8)) if isinstance(value, float) else ", ".join(value) if isinstance(value, tuple) \
        else str(value)
    if field.name in ("checkpoint", "refiner", "vae"):
        text = text.rstrip("/").rsplit("/", 1)[-1]          # a diffusers folder's name too
    return text if field.label is None else f"{field.label}: {text}"


def parse_axis(spec: str) -> Axis:
    """`FIELD=V1,V2,...` as an `Axis` (`Nothing` alone too); a Seed or Var. seed of -1 stays -1 until a `Plot`
    fixes it (`fix_axis_seeds`)."""
    name, equals, text = spec.partition("=")
    if not equals and _key(name) != "nothing":
        raise GridError(f"an axis is FIELD=V1,V2,... (e.g. steps=10,20 or cfg=3-9 (+2)), got {spec!r}")
    field = field_named(name)
    if field is NOTHING:                              # A1111's process_axis: one value, whatever was typed
        return Axis(field, ("",), ("",), text.strip())
    values = parse_values(field, text)
    try:
        for value in values:
            _check_value(field, value)
    except ValueError as err:
        raise GridError(str(err)) from None
    return Axis(field, tuple(values), tuple(_label(field, v) for v in values), text.strip())


def check_unipc_order_axis(plot: Plot, requests: Iterable[GenerationRequest]) -> None:
    """A GridError for a UniPC Order axis where no cell (`requests`, one per cell) runs A1111's UniPC, the only
    sampler its order acts on (`request.runs_a1111_unipc`: UniPC on ddim_uniform; on another schedule "UniPC" is
    diffusers' UniPCMultistepScheduler): every cell would be the same picture."""
    if any(axis.field.name == "unipc_order" for _, axis in plot.axes()) and not any(map(runs_a1111_unipc, requests)):
        raise GridError("a UniPC Order axis acts on A1111's UniPC only, the sampler UniPC on the schedule "
                        "ddim_uniform (as A1111 runs it), which no cell runs: set both (--sampler UniPC "
                        "--schedule ddim_uniform)")


def cell_count(axes: list[Axis]) -> int:
    count = math.prod(len(a.values) for a in axes)
    if count > MAX_CELLS:
        raise GridError(f"the axes make {count} cells ({' x '.join(str(len(a.values)) for a in axes)}); "
                        f"a grid holds at most {MAX_CELLS}")
    return count


Index = tuple[int, int, int]                      # (x, y, z) position of a cell


def fix_axis_seeds(axis: Axis) -> Axis:
    """A Seed or Var. seed axis with each -1 drawn now, by `fix_seeds`' rule (A1111's `fix_axis_seeds`); any other
    axis as it is."""
    if axis.field.name not in ("seed", "subseed"):
        return axis
    values = tuple(fixed_seed(value) for value in axis.values)
    return replace(axis, values=values, labels=tuple(_label(axis.field, value) for value in values))


@dataclass(frozen=True)
class Plot:
    """The axes of one X/Y/Z plot; Y and Z are optional. `legend=False` draws the cells alone, without labels
    (A1111's Draw legend off). A -1 in a Seed or Var. seed axis is drawn once, when the Plot is made, and
    recorded (`Fixed X Values`), unless `keep_random_seeds` (A1111's "Keep -1 for seeds"): then it stays -1,
    each cell drawing its own, as does an unset or -1 seed of the options (`draw_plot`). `margin` px of white
    part the cells of a legended grid (A1111's Grid margins, which it draws with the legend only)."""

    x: Axis
    y: Axis | None = None
    z: Axis | None = None
    legend: bool = True
    keep_random_seeds: bool = False
    margin: int = 0

    def __post_init__(self) -> None:
        if not self.keep_random_seeds:
            for letter, axis in self.axes():
                object.__setattr__(self, letter, fix_axis_seeds(axis))

    def axes(self) -> list[tuple[str, Axis]]:
        return [(letter, axis) for letter, axis in zip("xyz", (self.x, self.y, self.z)) if axis is not None]

    def shape(self) -> Index:
        return tuple(len(a.values) if a is not None else 1 for a in (self.x, self.y, self.z))  # type: ignore[return-value]

    def cells(self, options: dict[str, Any]) -> list[tuple[Index, dict[str, Any]]]:
        """((x, y, z), request options) of every cell, in drawing order (Z, then Y, then X); at most MAX_CELLS.
        Each cell applies X, then Y, then Z, as A1111's; an axis that cannot apply to a cell (a Prompt S/R whose
        word an axis before it replaced) is a GridError naming the cell."""
        cell_count([axis for _, axis in self.axes()])
        nx, ny, nz = self.shape()
        cells = []
        for k in range(nz):
            for j in range(ny):
                for i in range(nx):
                    cell = dict(options)
                    try:
                        for axis, index in ((self.x, i), (self.y, j), (self.z, k)):
                            cell = axis.apply(cell, index) if axis is not None else cell
                    except GridError as err:
                        raise GridError(f"the grid cell {', '.join(self.labels((i, j, k)))}: {err}") from None
                    cells.append(((i, j, k), cell))
        return cells

    def drawing_order(self) -> list[Index]:
        """The cells in the order A1111 draws them (`Script.run`'s `first_axes_processed` / `second_axes_processed`,
        `draw_xyz_grid`): the axis of the highest `cost` (Checkpoint name, Refiner checkpoint, then VAE) outermost
        and the next inside it, so that the model changes as rarely as it can; Z, Y, X (X fastest) where no axis
        costs more than both others."""
        cost = {letter: axis.field.cost for letter, axis in self.axes()}
        x, y, z = (cost.get(letter, 0.0) for letter in "xyz")
        first, second = "z", "y"
        if x > y and x > z:
            first, second = "x", "y" if y > z else "z"
        elif y > x and y > z:
            first, second = "y", "x" if x > z else "z"
        elif z > x and z > y:
            second = "x" if x > y else "y"
        third = next(letter for letter in "xyz" if letter not in (first, second))
        sizes = dict(zip("xyz", self.shape()))
        order = []
        for at in product(*(range(sizes[letter]) for letter in (first, second, third))):
            where = dict(zip((first, second, third), at))
            order.append((where["x"], where["y"], where["z"]))
        return order

    def labels(self, index: Index) -> list[str]:
        """The labels of the cell at `index`, X first (for messages; Nothing has none)."""
        return [label for letter, axis in self.axes() if (label := axis.labels[index["xyz".index(letter)]])]

    def parameters(self, letters: str = "xyz") -> dict[str, str]:
        """A1111's plot fields of the grid picture's parameters (xyz_grid.py `cell`): `Script`, then for each
        axis but Nothing `X Type`, `X Values` (as typed) and, for a Seed or Var. seed axis, `Fixed X Values` (the
        seeds drawn, -1 fixed; none with `keep_random_seeds`, as A1111). `letters="xy"`: a Z sub-grid's, which
        A1111 writes without the Z fields."""
        fields = {"Script": "X/Y/Z plot"}
        for letter, axis in self.axes():
            if axis.field is NOTHING or letter not in letters:
                continue
            fields[f"{letter.upper()} Type"] = axis.field.type_name
            fields[f"{letter.upper()} Values"] = axis.text
            if axis.field.name in ("seed", "subseed") and not self.keep_random_seeds:
                fields[f"Fixed {letter.upper()} Values"] = ", ".join(str(v) for v in axis.values)
        return fields

    def grids(self, images: Mapping[Index, Image.Image]) -> list[Image.Image]:
        """The labelled X/Y grid of `images` (one per cell) at each Z value (A1111's sub-grids)."""
        nx, ny, nz = self.shape()
        x_labels = list(self.x.labels) if self.legend else [""]
        y_labels = list(self.y.labels) if self.y is not None and self.legend else [""]
        margin = self.margin if self.legend else 0
        return [draw_grid([[images[(i, j, k)] for i in range(nx)] for j in range(ny)], x_labels, y_labels, margin)
                for k in range(nz)]

    def sheet(self, images: Mapping[Index, Image.Image]) -> Image.Image:
        """The labelled picture of `images` (one per cell): the sub-grids (`grids`) in a row under the Z titles."""
        nz = self.shape()[2]
        grids = self.grids(images)
        if self.z is None or self.z.field is NOTHING:
            return grids[0]
        first = images[(0, 0, 0)]
        titles = list(self.z.labels) if self.legend else [""] * nz
        return row_grids(grids, titles, font_size(first.width, first.height))[0]


def with_plot_parameters(parameters: Mapping[str, Any], fields: Mapping[str, str]) -> dict[str, Any]:
    """A grid picture's parameters: its first cell's `parameters` with the plot `fields` (`Plot.parameters`)
    before `Version`, where A1111's extra generation parameters go."""
    kept = {key: value for key, value in parameters.items() if key != "Version"}
    return {**kept, **fields, "Version": parameters.get("Version")}


def fix_seeds(options: Mapping[str, Any]) -> dict[str, Any]:
    """`options` with one seed and one variation seed for every cell: an unset or -1 one drawn once now, as
    A1111's plot fixes them (`processing.fix_seed`) before its first cell (`sdlab grid`, `draw_plot`)."""
    return {**options, "seed": fixed_seed(options.get("seed")), "subseed": fixed_seed(options.get("subseed"))}


def typed_axis(axis: Axis) -> Axis:
    """A Seed or Var. seed axis as typed (its -1 kept, from its `text`), before a `Plot` fixed it; any other as
    it is."""
    if axis.field.name not in ("seed", "subseed") or not axis.text:
        return axis
    return parse_axis(f"{axis.field.name}={axis.text}")


def styled_cells(cells: list[tuple[Index, dict[str, Any]]], styles: StyleDatabase | None,
                 missing: str = "`styles` lacks") -> list[tuple[Index, dict[str, Any]]]:
    """`cells` with each one's `styles` (the options' own, then a Styles axis's names) applied to its prompts once
    the axes have set them, as A1111's `setup_prompts` (`styles.styled_options`). A name `styles` lacks is a
    GridError saying it `missing`; styles named with no `styles` given, one saying to give them."""
    names = [name for _, cell in cells for name in cell.get("styles", ())]
    named = "the cells' styles (the options', then a Styles axis's)"
    if names and styles is None:
        raise GridError(f"{named} name the prompt styles {', '.join(map(repr, dict.fromkeys(names)))}: "
                        "give the styles to draw them with (styles=StyleDatabase.load(['styles.csv']))")
    styles = styles or StyleDatabase()
    if unknown := styles.unknown(names):
        raise GridError(f"{named} name {unknown[0]!r}, which {missing}; styles: "
                        f"{', '.join(map(repr, styles.styles)) or 'none'}")
    return [(index, styled_options(cell, styles)) for index, cell in cells]


def draw_plot(run: Callable[[GenerationRequest], GenerationResult], options: dict[str, Any],
              plot: Plot, *, keep_random_seeds: bool = False,
              styles: StyleDatabase | None = None) -> tuple[Image.Image, dict[Index, GenerationResult]]:
    """Draw every cell with `run` (e.g. `Pipeline.run`) from `options` (GenerationRequest keyword arguments, and
    `styles`: prompt style names) and lay them out: (the sheet, each cell's result). A Styles axis's names, after
    the options' `styles`, are styles of `styles` (`styled_cells`). An unset or -1 seed (and variation seed) is
    drawn once for the whole grid (`fix_seeds`), unless the plot keeps random seeds (`Plot.keep_random_seeds`,
    A1111's "Keep -1 for seeds", or `keep_random_seeds=True` here, which draws the plot as made with it): then each
    cell draws its own. A cell of several images (a `batch_size`) shows them as `cell_picture` lays them out;
    `draw_cells` draws cells of several batches. A prompt matrix (`prompt_matrix`) always fixes its seeds, as
    A1111's: `keep_random_seeds=True` is a GridError there."""
    if keep_random_seeds and not isinstance(plot, Plot):
        raise GridError("keep_random_seeds: a prompt matrix draws every picture on one fixed seed (as A1111's)")
    if keep_random_seeds and not plot.keep_random_seeds:
        plot = Plot(*(axis and typed_axis(axis) for axis in (plot.x, plot.y, plot.z)), plot.legend, True)
    cells = styled_cells(plot.cells(options if plot.keep_random_seeds else fix_seeds(options)), styles)
    if any(key in MODEL_FIELDS for _, cell in cells for key in cell):
        raise GridError("draw_plot draws every cell with one `run`: a Checkpoint name, VAE or Refiner axis is "
                        "the server's X/Y/Z plot's, which loads each cell's model")
    check_unipc_order_axis(plot, (GenerationRequest(**cell) for _, cell in cells))
    sheet, results = draw_cells(run, plot, cells)
    return sheet, {index: batches[0] for index, batches in results.items()}


def draw_cells(run: Callable[[GenerationRequest], GenerationResult], plot: Plot, cells: list[tuple[Index, dict]],
               batch_count: int = 1) -> tuple[Image.Image, dict[Index, list[GenerationResult]]]:
    """Draw `cells` (each (x, y, z) and its GenerationRequest keyword arguments: `plot.cells(options)`, or cells
    made from them, as `sdlab grid` makes them) with `run`, each as `batch_count` batches whose seeds continue
    (`next_batch`, as `sdlab txt2img --batch-count`), and lay them out, a cell's pictures as `cell_picture`
    does: (the sheet, each cell's results, one per batch, whose requests give each picture's parameters)."""
    results = {index: cell_batches(run, cell, batch_count) for index, cell in cells}
    pictures = {index: cell_picture([image for result in batches for image in result.images])
                for index, batches in results.items()}
    return plot.sheet(pictures), results


def cell_batches(run: Callable[[GenerationRequest], GenerationResult], cell: dict[str, Any],
                 batch_count: int = 1) -> list[GenerationResult]:
    """One cell (GenerationRequest keyword arguments) drawn with `run` as `batch_count` batches whose seeds
    continue (`next_batch`, as `sdlab txt2img --batch-count`)."""
    first = run(GenerationRequest(**cell))
    return [first, *(run(next_batch(first.request, k)) for k in range(1, batch_count))]


def cell_picture(images: list[Image.Image]) -> Image.Image:
    """A cell's picture: its image, or its images in one grid, as A1111's plot shows a cell drawn as a batch
    (the batch grid `process_images` returns first, `images.image_grid` at its default settings:
    round(sqrt(n)) rows, the columns they need, on white, each image centred in a slot of the largest's size)."""
    if len(images) == 1:
        return images[0]
    return image_grid(images, min(round(math.sqrt(len(images))), len(images)))


def image_grid(images: list[Image.Image], rows: int) -> Image.Image:
    """A1111 1.10's `images.image_grid(images, rows=rows)`: the images in `rows` rows of the columns they need,
    left to right, on white, each centred in a slot of the largest's size."""
    columns = math.ceil(len(images) / rows)
    width, height = max(image.width for image in images), max(image.height for image in images)
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        left, top = (width - image.width) // 2, (height - image.height) // 2
        grid.paste(image.convert("RGB"), ((i % columns) * width + left, (i // columns) * height + top))
    return grid


# ------------------------------------------------------------------------------------------------------
# The picture


@lru_cache(maxsize=8)
def grid_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at `size` px; else DejaVu Sans (fc-match); else PIL's fixed bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (AttributeError, ImportError, OSError, TypeError):
        pass
    try:
        path = subprocess.run(["fc-match", "-f", "%{file}", "DejaVu Sans"], capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()
        return ImageFont.truetype(path, size)
    except (OSError, subprocess.SubprocessError, ValueError):
        return ImageFont.load_default()


def font_size(cell_width: int, cell_height: int) -> int:
    """A1111's (width + height) / 25, but at least 12 px so that 64 px cells stay readable."""
    return max(12, (cell_width + cell_height) // 25)


def _text_size(font: Any, text: str) -> tuple[int, int]:
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
    return right - left, bottom - top


@dataclass(frozen=True)
class Annotation:
    """One part of a grid label (A1111's `GridAnnotation`): black, or grey and struck through where not `active`
    (a prompt matrix's part that the column or row leaves out). A label is a text or a tuple of these, each part
    wrapped on its own lines."""

    text: str
    active: bool = True


Label = str | tuple[Annotation, ...]
INACTIVE = (153, 153, 153)          # A1111's `color_inactive`


def _annotations(label: Label) -> tuple[Annotation, ...]:
    return (Annotation(label),) if isinstance(label, str) else label


def _label_lines(label: Label, font: Any, width: int) -> list[Annotation]:
    """`label`'s lines no wider than `width` px, each part wrapped on its own (A1111's `draw_grid_annotations`)."""
    return [Annotation(line, part.active) for part in _annotations(label) for line in _wrap(part.text, font, width)]


def _wrap(text: str, font: Any, width: int) -> list[str]:
    """`text` in lines no wider than `width` px, breaking at spaces (a longer word keeps its own line)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and _text_size(font, candidate)[0] > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


@dataclass(frozen=True)
class GridLayout:
    """Where things sit on the sheet of one (X, Y) grid: cell (i, j) at (left + i * (cell_w + margin), top + j *
    (cell_h + margin)), `margin` px of white between cells (A1111's `draw_grid_annotations` margin)."""

    left: int
    top: int
    cell_width: int
    cell_height: int
    columns: int
    rows: int
    margin: int = 0

    @property
    def size(self) -> tuple[int, int]:
        return (self.left + self.columns * self.cell_width + (self.columns - 1) * self.margin,
                self.top + self.rows * self.cell_height + (self.rows - 1) * self.margin)

    def cell_at(self, i: int, j: int) -> tuple[int, int]:
        """The top left corner of cell (i, j)."""
        return self.left + i * (self.cell_width + self.margin), self.top + j * (self.cell_height + self.margin)


def grid_layout(cell_size: tuple[int, int], columns: int, rows: int, x_labels: list[Label], y_labels: list[Label],
                margin: int = 0) -> GridLayout:
    width, height = cell_size
    font = grid_font(font_size(width, height))
    spacing = font_size(width, height) // 2
    left = 0
    if any(y_labels):
        widest_word = max(_text_size(font, w)[0] for label in y_labels for part in _annotations(label)
                          for w in part.text.split(" "))
        left = max(width * 3 // 4, min(widest_word + 2 * spacing, 2 * width))
    top = 0
    if any(x_labels):
        heights = [_lines_height([line.text for line in _label_lines(label, font, width)], font, spacing)
                   for label in x_labels]
        top = max(heights) + 2 * spacing
    return GridLayout(left, top, width, height, columns, rows, margin)


def _lines_height(lines: list[str], font: Any, spacing: int) -> int:
    return sum(_text_size(font, line or " ")[1] + spacing for line in lines) - spacing


def _draw_centered(draw: ImageDraw.ImageDraw, lines: list[Annotation], cx: float, cy: float, font: Any,
                   spacing: int) -> None:
    y = cy - _lines_height([line.text for line in lines], font, spacing) / 2
    for line in lines:                  # as A1111's `draw_texts`: centred ("mm") in the line's box, h high
        w, h = _text_size(font, line.text or " ")
        draw.text((cx, y + h / 2), line.text, font=font, fill=(0, 0, 0) if line.active else INACTIVE, anchor="mm")
        if not line.active:         # A1111 strikes an inactive part through its middle with a 4 px line
            draw.line((cx - w // 2, y + h // 2, cx + w // 2, y + h // 2), fill=INACTIVE, width=4)
        y += h + spacing


def draw_grid(cells: list[list[Image.Image]], x_labels: list[Label], y_labels: list[Label],
              margin: int = 0) -> Image.Image:
    """`cells[row][column]` on one sheet with X labels above the columns and Y labels left of the rows, `margin`
    px of white between the cells."""
    rows, columns = len(cells), len(cells[0])
    cell_size = (max(c.width for r in cells for c in r), max(c.height for r in cells for c in r))
    layout = grid_layout(cell_size, columns, rows, x_labels, y_labels, margin)
    sheet = Image.new("RGB", layout.size, "white")
    for j, row in enumerate(cells):
        for i, cell in enumerate(row):
            sheet.paste(cell.convert("RGB"), layout.cell_at(i, j))
    draw = ImageDraw.Draw(sheet)
    size = font_size(*cell_size)
    font, spacing = grid_font(size), size // 2
    for i, label in enumerate(x_labels if any(x_labels) else []):
        cx = layout.cell_at(i, 0)[0] + layout.cell_width / 2
        _draw_centered(draw, _label_lines(label, font, layout.cell_width), cx, layout.top / 2, font, spacing)
    for j, label in enumerate(y_labels if any(y_labels) else []):
        cy = layout.cell_at(0, j)[1] + layout.cell_height / 2
        _draw_centered(draw, _label_lines(label, font, layout.left - spacing), layout.left / 2, cy, font, spacing)
    return sheet


def title_height(grid_width: int, title: str, size: int) -> int:
    font = grid_font(size)
    return _lines_height(_wrap(title, font, grid_width), font, size // 2) + size


def row_grids(grids: list[Image.Image], titles: list[str], size: int) -> tuple[Image.Image, list[int]]:
    """Sub-grids (one per Z value) side by side in one row under their centred titles, as A1111's
    `image_grid(..., rows=1)` and `draw_grid_annotations` (one band of the tallest title); also each sub-grid's left.
    Sub-grids of different sizes sit at the top left of slots as large as the largest."""
    width, height = max(g.width for g in grids), max(g.height for g in grids)
    band = max(title_height(width, t, size) for t in titles) if any(titles) else 0
    sheet = Image.new("RGB", (width * len(grids), band + height), "white")
    draw = ImageDraw.Draw(sheet)
    font = grid_font(size)
    lefts = []
    for k, (grid, title) in enumerate(zip(grids, titles)):
        _draw_centered(draw, _label_lines(title, font, width), (k + 0.5) * width, band / 2, font, size // 2)
        lefts.append(k * width)
        sheet.paste(grid, (k * width, band))
    return sheet, lefts
