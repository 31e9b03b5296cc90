"""A1111's selectable scripts on `/sdapi/v1`: `script_name` + `script_args` on POST txt2img / img2img.

A1111 (modules/api/api.py `get_selectable_script`) runs the script whose title matches `script_name` in any case
(`script_name_to_index`), with `script_args` as the positional arguments of its `Script.run(p, *args)`; an
empty or null name is none, another name a 422 `Script '<name>' not found`. sdlab runs:

- `X/Y/Z plot` (`XYZ_PLOT`, A1111 1.10's scripts/xyz_grid.py): every cell is the request with the cell's axis
  values set as A1111's `AxisOption.apply` sets them, drawn exactly as that single request would be; the grid,
  its labels and values come from `sdlab.pipeline.grid`.
- `Prompt Matrix` (`PROMPT_MATRIX`, scripts/prompt_matrix.py) and `Prompts from file or textbox`
  (`PROMPTS_FROM_FILE`, scripts/prompts_from_file.py): every combination of the prompt's `|` parts, every line
  of `prompt_txt`, drawn exactly as its single request would be (`sdlab.pipeline.prompt_matrix`,
  `sdlab.pipeline.prompts_file`).

Every script draws its requests with one `host.draw`, as A1111 runs a script as one task: each request is checked as
the route checks it before any is drawn (a refusal names the cell or line), `/progress` counts over all of them
(A1111's `state.job_count`, `job_no`, `job` "k out of N"), and after `/interrupt` no later request is drawn (A1111's
`state.interrupted`; its X/Y/Z plot draws blank cells, its other scripts only the pictures drawn so far).

To add a script: write `async def run(host, body, mode) -> dict` that draws with `host.draw` and answers A1111's
`{images, parameters, info}`, describe its `script_args` as `ScriptArg`s, and add a `SelectableScript` to
`RUNNABLE_SCRIPTS`: `selected_script`, `GET scripts` and `GET script-info` follow. `GET scripts` lists the
always-on scripts `alwayson_scripts` takes (`sdlab.server.alwayson`) after them.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from sdlab.pipeline.grid import (
    NOTHING, Axis, Field, GridError, Index, Plot, cell_picture, field_named, parse_axis, with_plot_parameters,
)
from sdlab.pipeline.images import open_image
from sdlab.pipeline.png_info import format_parameters, parse_parameters
from sdlab.pipeline.prompt_matrix import DELIMITERS, PROMPT_TYPES, PromptMatrix, prompt_matrix
from sdlab.pipeline.prompts_file import POSITIONS, Line, line_prompts, line_seeds, read_lines
from sdlab.pipeline.request import fixed_seed
from sdlab.server.alwayson import ALWAYSON_SCRIPTS, CONTROLNET
from sdlab.server.inputs import BadRequest

MODES = ("txt2img", "img2img")
logger = logging.getLogger("sdlab.server")


@dataclass(frozen=True)
class Drawn:
    """One request drawn as the route draws it without a script (A1111's `process_images`): its pictures' files
    and parameters texts, and `info`, A1111's `Processed.js()` fields."""

    pictures: list[Path]
    infotexts: list[str]
    info: dict[str, Any]


@dataclass(frozen=True)
class ScriptHost:
    """What a script draws and answers with, given by the route (`a1111.py`)."""

    draw: Callable[[list[Any], list[str], bool], Awaitable[list[Drawn | None]]]
    """(request bodies, what each is in a refusal, keep_going) -> each drawn as the route draws it without a
    script, None for those not drawn after an interrupt (and with keep_going for one that failed, logged)"""
    encode: Callable[[Image.Image, str], str]          # a picture and its parameters in base64, as the route
    echo: Callable[[Any], dict[str, Any]]              # A1111's `parameters` of a request body


@dataclass(frozen=True)
class ScriptArg:
    """A1111's `ScriptArg` (modules/api/models.py): one of a script's UI controls, as `GET script-info` lists it."""

    label: str
    value: Any = None
    minimum: Any = None
    maximum: Any = None
    step: Any = None
    choices: list[str] | None = None


@dataclass(frozen=True)
class SelectableScript:
    title: str                                                  # A1111's `Script.title()`
    args: Callable[[bool], list[ScriptArg]]                     # its controls in txt2img (False) / img2img (True)
    run: Callable[[ScriptHost, Any, str], Awaitable[dict[str, Any]]]    # (host, body, mode) -> the answer


# ------------------------------------------------------------------------------------------------------
# X/Y/Z plot


@dataclass(frozen=True)
class AxisType:
    """One of A1111 1.10's `axis_options`: its label, the tab it is offered on (None: both, `AxisOption`; else
    `AxisOptionTxt2Img` / `AxisOptionImg2Img`) and whether it has `choices` (its values then come from the
    `*_values_dropdown` argument unless `csv_mode`)."""

    label: str
    mode: str | None = None
    choices: bool = False


A1111_AXES = (          # AUTOMATIC1111/stable-diffusion-webui v1.10.1 scripts/xyz_grid.py `axis_options`, in order
    AxisType("Nothing"), AxisType("Seed"), AxisType("Var. seed"), AxisType("Var. strength"), AxisType("Steps"),
    AxisType("Hires steps", "txt2img"), AxisType("CFG Scale"), AxisType("Image CFG Scale", "img2img"),
    AxisType("Prompt S/R"), AxisType("Prompt order"), AxisType("Sampler", "txt2img", True),
    AxisType("Hires sampler", "txt2img", True), AxisType("Sampler", "img2img", True),
    AxisType("Checkpoint name", None, True), AxisType("Negative Guidance minimum sigma"), AxisType("Sigma Churn"),
    AxisType("Sigma min"), AxisType("Sigma max"), AxisType("Sigma noise"), AxisType("Schedule type", None, True),
    AxisType("Schedule min sigma"), AxisType("Schedule max sigma"), AxisType("Schedule rho"),
    AxisType("Beta schedule alpha"), AxisType("Beta schedule beta"), AxisType("Eta"), AxisType("Clip skip"),
    AxisType("Denoising"), AxisType("Initial noise multiplier"), AxisType("Extra noise"),
    AxisType("Hires upscaler", "txt2img", True), AxisType("Cond. Image Mask Weight", "img2img"),
    AxisType("VAE", None, True), AxisType("Styles", None, True), AxisType("UniPC Order"), AxisType("Face restore"),
    AxisType("Token merging ratio"), AxisType("Token merging ratio high-res"),
    AxisType("Always discard next-to-last sigma", None, True), AxisType("SGM noise multiplier", None, True),
    AxisType("Refiner checkpoint", None, True), AxisType("Refiner switch at"), AxisType("RNG source", None, True),
    AxisType("FP8 mode", None, True), AxisType("Size"),
)


def axis_types(mode: str) -> list[AxisType]:
    """The axes A1111 offers in `mode`, which x_type / y_type / z_type index (`Script.ui`'s
    `current_axis_options`: the axes of both tabs and those of `mode`'s)."""
    return [axis for axis in A1111_AXES if axis.mode in (None, mode)]


BODY_FIELDS = {         # sdlab's request field an axis sets -> the A1111 request field its `apply_field` sets
    "seed": "seed", "subseed": "subseed", "subseed_strength": "subseed_strength", "steps": "steps",
    "hr_steps": "hr_second_pass_steps", "cfg_scale": "cfg_scale", "prompt": "prompt",
    "negative_prompt": "negative_prompt", "sampler": "sampler_name", "hr_sampler": "hr_sampler_name",
    "s_min_uncond": "s_min_uncond", "s_churn": "s_churn", "s_tmin": "s_tmin", "s_tmax": "s_tmax",
    "s_noise": "s_noise", "schedule": "scheduler", "eta": "eta", "strength": "denoising_strength",
    "hr_denoise": "denoising_strength", "noise_multiplier": "initial_noise_multiplier", "hr_upscaler": "hr_upscaler",
}
OPTION_FIELDS = {       # ... -> the option its `apply_override` sets in `override_settings` (Clip skip too in 1.10)
    "schedule_sigma_min": "sigma_min", "schedule_sigma_max": "sigma_max", "schedule_rho": "rho",
    "clip_skip": "CLIP_stop_at_last_layers", "extra_noise": "img2img_extra_noise",
    "inpainting_mask_weight": "inpainting_mask_weight", "unipc_order": "uni_pc_order",
    "discard_penultimate_sigma": "always_discard_next_to_last_sigma", "sgm_noise_multiplier": "sgm_noise_multiplier",
    "rng": "randn_source",
}
"""Cond. Image Mask Weight sets A1111's `p.inpainting_mask_weight`, which its option sets too."""


def sdlab_field(axis: AxisType) -> Field | None:
    """The `sdlab.pipeline.grid` field of A1111's axis, None for one sdlab does not draw (Checkpoint name, VAE,
    Styles, Size, ...)."""
    try:
        return field_named(axis.label)
    except GridError:
        return None


@dataclass(frozen=True)
class XyzArgs:
    """A1111 1.10's `Script.run` arguments after `p`, in order; a shorter `script_args` takes the UI's defaults
    for the rest."""

    x_type: int = 1
    x_values: str = ""
    x_values_dropdown: list = field(default_factory=list)
    y_type: int = 0
    y_values: str = ""
    y_values_dropdown: list = field(default_factory=list)
    z_type: int = 0
    z_values: str = ""
    z_values_dropdown: list = field(default_factory=list)
    draw_legend: bool = True
    include_lone_images: bool = False
    include_sub_grids: bool = False
    no_fixed_seeds: bool = False
    vary_seeds_x: bool = False
    vary_seeds_y: bool = False
    vary_seeds_z: bool = False
    margin_size: int = 0
    csv_mode: bool = False


XYZ_ARG_NAMES = tuple(XyzArgs.__dataclass_fields__)
MAX_MARGIN = 500        # the Grid margins slider's maximum


def _arg(name: str, value: Any) -> Any:
    """`script_args`' `name` checked for its type (null: the default, as A1111's `x_type or 0`)."""
    default = getattr(XyzArgs(), name)
    if value is None:
        return 0 if name.endswith("_type") else default
    if name.endswith("_type") or name == "margin_size":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise BadRequest(f"x/y/z plot {name} must be an integer, got {value!r}", 422)
        return int(value)
    if isinstance(default, bool):
        if not isinstance(value, bool) and value not in (0, 1):
            raise BadRequest(f"x/y/z plot {name} must be true or false, got {value!r}", 422)
        return bool(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise BadRequest(f"x/y/z plot {name} must be a string of values, got {value!r}", 422)
        return value
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise BadRequest(f"x/y/z plot {name} must be a list of strings, got {value!r}", 422)
    return value


def xyz_args(script_args: Any) -> XyzArgs:
    """`script_args` as A1111 1.10's X/Y/Z plot reads them (`XYZ_ARG_NAMES`' order)."""
    if not isinstance(script_args, list) or len(script_args) > len(XYZ_ARG_NAMES):
        raise BadRequest(f"x/y/z plot script_args must be a list of at most {len(XYZ_ARG_NAMES)} values, A1111 "
                         f"1.10's order: {', '.join(XYZ_ARG_NAMES)}; got {script_args!r}", 422)
    args = XyzArgs(**{name: _arg(name, value) for name, value in zip(XYZ_ARG_NAMES, script_args)})
    if not 0 <= args.margin_size <= MAX_MARGIN:
        raise BadRequest(f"x/y/z plot margin_size must be 0..{MAX_MARGIN} px, got {args.margin_size}", 422)
    return args


def _csv_line(values: list[str]) -> str:
    """A1111's `list_to_csv_string`: the dropdown's values as one CSV line (its `X Values`)."""
    with io.StringIO() as out:
        csv.writer(out).writerow(values)
        return out.getvalue().strip()


def plot_axis(letter: str, args: XyzArgs, mode: str) -> Axis:
    """The `letter` axis of `args` in `mode`: A1111's axis at its type index, its values from the text, or for
    an axis with choices from the dropdown list unless `csv_mode`; 422 for an index out of A1111's list, an axis
    sdlab does not draw, or values it cannot plot."""
    index = getattr(args, f"{letter}_type")
    offered = axis_types(mode)
    if not 0 <= index < len(offered):
        raise BadRequest(f"x/y/z plot {letter}_type must be 0..{len(offered) - 1} (A1111 1.10's {mode} axes), "
                         f"got {index}", 422)
    axis = offered[index]
    grid_field = sdlab_field(axis)
    if grid_field is None:
        drawn = ", ".join(f"{i} {a.label}" for i, a in enumerate(offered) if sdlab_field(a) is not None)
        raise BadRequest(f"x/y/z plot {letter}_type {index} is A1111's {axis.label!r} axis, which sdlab does not "
                         f"draw; {mode} axes sdlab draws: {drawn}", 422)
    if grid_field is NOTHING:
        return parse_axis("nothing")
    from_dropdown = axis.choices and not args.csv_mode
    text = _csv_line(getattr(args, f"{letter}_values_dropdown")) if from_dropdown else getattr(args, f"{letter}_values")
    try:
        return parse_axis(f"{grid_field.name}={text}")
    except GridError as err:
        where = f"{letter}_values_dropdown (csv_mode false)" if from_dropdown else f"{letter}_values"
        raise BadRequest(f"x/y/z plot {axis.label} axis, {where}: {err}", 422) from None


def xyz_plot(args: XyzArgs, mode: str) -> Plot:
    """The plot `args` ask for in `mode`, its -1 seeds drawn unless `no_fixed_seeds` (A1111's Keep -1 for seeds)."""
    axes = [plot_axis(letter, args, mode) for letter in "xyz"]
    try:
        return Plot(*axes, legend=args.draw_legend, keep_random_seeds=args.no_fixed_seeds, margin=args.margin_size)
    except GridError as err:
        raise BadRequest(f"x/y/z plot: {err}", 422) from None


def _seed_offset(index: Index, shape: Index, args: XyzArgs) -> int:
    """A1111's Vary seeds for X / Y / Z: the cell's seed is the request's plus this."""
    (ix, iy, iz), (nx, ny, _) = index, shape
    x_dim, y_dim = nx if args.vary_seeds_x else 1, ny if args.vary_seeds_y else 1
    return ix * args.vary_seeds_x + iy * x_dim * args.vary_seeds_y + iz * x_dim * y_dim * args.vary_seeds_z


def _cell_body(body: Any, base: Mapping[str, Any], cell: Mapping[str, Any]) -> Any:
    """`body` with what the axes changed in `base` (sdlab's request fields, `cell`) set where A1111's axes set
    it: request fields (`BODY_FIELDS`), and options in `override_settings` (`OPTION_FIELDS`)."""
    changed = {key: value for key, value in cell.items() if key not in base or base[key] != value}
    update = {BODY_FIELDS[key]: value for key, value in changed.items() if key in BODY_FIELDS}
    options = {OPTION_FIELDS[key]: value for key, value in changed.items() if key in OPTION_FIELDS}
    if options:
        update["override_settings"] = {**body.override_settings, **options}
    return body.model_copy(update=update)


def cell_bodies(body: Any, plot: Plot, args: XyzArgs, mode: str) -> list[tuple[Index, Any]]:
    """Each cell's request body, in A1111's order (X fastest, then Y, then Z): the request's seeds drawn once
    unless `no_fixed_seeds` (A1111's `fix_seed`), each cell's axes applied X, then Y, then Z (`Plot.cells`), then
    its seed varied (`_seed_offset`). A cell an axis cannot apply to is a 422 before anything is drawn."""
    if not args.no_fixed_seeds:
        body = body.model_copy(update={"seed": fixed_seed(body.seed), "subseed": fixed_seed(body.subseed)})
    base: dict[str, Any] = {"prompt": body.prompt, "negative_prompt": body.negative_prompt, "seed": body.seed,
                            "steps": body.steps}
    if mode == "img2img":
        base["init_image"] = True       # only what the Denoising axis reads: img2img's strength, not the hires fix's
    try:
        cells = plot.cells(base)
    except GridError as err:
        raise BadRequest(f"x/y/z plot: {err}", 422) from None
    shape = plot.shape()
    return [(index, _cell_body(body, base, {**cell, "seed": cell["seed"] + _seed_offset(index, shape, args)}))
            for index, cell in cells]


def _cell_image(drawn: Drawn, body: Any) -> Image.Image:
    """The picture a cell shows: A1111's `processed.images[0]`, its first picture, or with `save_images` (its
    batch grid is then made) the batch grid of its pictures."""
    extra = body.model_extra or {}
    pictures = drawn.pictures if extra.get("save_images") else drawn.pictures[:1]
    images = []
    for path in pictures:
        with open_image(path) as image:
            images.append(image.convert("RGB"))
    return cell_picture(images)


def _grid_text(drawn: Drawn | None, fields: Mapping[str, str]) -> str | None:
    """A grid's parameters: its first cell's first picture's with the plot `fields` (A1111's `create_infotext` of
    that cell with the script's `extra_generation_params`)."""
    text = _first_text(drawn)
    return format_parameters(with_plot_parameters(parse_parameters(text), fields)) if text is not None else None


async def run_xyz_plot(host: ScriptHost, body: Any, mode: str) -> dict[str, Any]:
    """A1111 1.10's X/Y/Z plot: the axes and cells checked, every cell drawn in turn, then answered as its
    `Script.run` returns (`answer_xyz_plot`)."""
    args = xyz_args(body.script_args)
    plot = xyz_plot(args, mode)
    cells = cell_bodies(body, plot, args, mode)
    labels = [f"x/y/z plot cell {', '.join(plot.labels(index)) or index}" for index, _ in cells]
    drawn = await host.draw([cell for _, cell in cells], labels, True)
    return answer_xyz_plot(host, body, plot, args, {index: cell for (index, _), cell in zip(cells, drawn)})


def _blank_cells(pictures: dict[Index, Image.Image | None]) -> dict[Index, Image.Image]:
    """Every cell's picture, black where none was drawn (A1111's `Image.new` of the first cell's mode and size)."""
    size = next(picture.size for picture in pictures.values() if picture is not None)
    return {index: picture or Image.new("RGB", size) for index, picture in pictures.items()}


def answer_xyz_plot(host: ScriptHost, body: Any, plot: Plot, args: XyzArgs,
                    drawn: dict[Index, Drawn | None]) -> dict[str, Any]:
    """A1111's answer: `images` the grid, then with Include Sub Grids each Z value's grid, then with Include Sub
    Images each cell's picture (X fastest); `info` the first cell's, with `infotexts` those of the grid (its first
    cell's text with the plot fields), the sub-grids and every cell (with or without its picture), `all_prompts` /
    `all_seeds` the sub-grids' and each cell's, `index_of_first_image` 1 (A1111's `draw_xyz_grid`, `run`). A cell
    not drawn (after an interrupt, or failed) is black, its text, prompt and seed null; none drawn, A1111's
    `Processed(p, [])`: no picture."""
    cells = list(drawn.values())
    first = next((cell for cell in cells if cell is not None and cell.pictures), None)
    if first is None:
        info = {**next(cell for cell in cells if cell is not None).info, "infotexts": [], "index_of_first_image": 0}
        return {"images": [], "parameters": host.echo(body), "info": json.dumps(info)}
    pictures = _blank_cells({index: _cell_image(cell, body) if cell and cell.pictures else None
                             for index, cell in drawn.items()})
    grid_texts = [_grid_text(drawn[(0, 0, 0)], plot.parameters())]
    images = [host.encode(plot.sheet(pictures), grid_texts[0])]
    subs = [drawn[(0, 0, k)] for k in range(plot.shape()[2])] if args.include_sub_grids else []
    if subs:
        sub_texts = [_grid_text(sub, plot.parameters("xy")) for sub in subs]
        images += [host.encode(grid, text) for grid, text in zip(plot.grids(pictures), sub_texts)]
        grid_texts += sub_texts
    if args.include_lone_images:
        images += [host.encode(pictures[index], _first_text(cell)) for index, cell in drawn.items()]
    info = {**first.info, "infotexts": grid_texts + [_first_text(cell) for cell in cells],
            "all_prompts": [_drawn_value(cell, "prompt") for cell in subs + cells],
            "all_seeds": [_drawn_value(cell, "seed") for cell in subs + cells], "index_of_first_image": 1}
    return {"images": images if body.send_images else [], "parameters": host.echo(body), "info": json.dumps(info)}


def _first_text(cell: Drawn | None) -> str | None:
    """A cell's first picture's parameters, None for a cell without a picture (A1111's list entry)."""
    return cell.infotexts[0] if cell is not None and cell.infotexts else None


def _drawn_value(cell: Drawn | None, key: str) -> Any:
    """A cell's `info[key]`, None for a cell without a picture (A1111's list entry)."""
    return cell.info[key] if cell is not None and cell.pictures else None


def xyz_script_args(img2img: bool) -> list[ScriptArg]:
    """A1111 1.10's X/Y/Z plot controls (`Script.ui`) as its `ScriptInfo.args`: each dropdown's value is its
    label, the axis types' choices the axes of the tab."""
    labels = [axis.label for axis in axis_types("img2img" if img2img else "txt2img")]
    controls = []
    for letter, default in (("X", labels[1]), ("Y", labels[0]), ("Z", labels[0])):
        controls += [ScriptArg(f"{letter} type", default, choices=labels), ScriptArg(f"{letter} values", ""),
                     ScriptArg(f"{letter} values", [], choices=[])]
    checkboxes = ("Draw legend", "Include Sub Images", "Include Sub Grids", "Keep -1 for seeds", "Vary seeds for X",
                  "Vary seeds for Y", "Vary seeds for Z")
    controls += [ScriptArg(label, label == "Draw legend") for label in checkboxes]
    controls += [ScriptArg("Grid margins (px)", 0, 0, MAX_MARGIN, 2),
                 ScriptArg("Use text inputs instead of dropdowns", False)]
    return controls


XYZ_PLOT = SelectableScript("X/Y/Z plot", xyz_script_args, run_xyz_plot)


# ------------------------------------------------------------------------------------------------------
# Prompt matrix and Prompts from file or textbox


def _answer_pictures(host: ScriptHost, drawn: list[Drawn]) -> list[str]:
    """Every picture of `drawn` in order, in base64 with its parameters."""
    images = []
    for cell in drawn:
        for path, text in zip(cell.pictures, cell.infotexts):
            with open_image(path) as image:
                images.append(host.encode(image.convert("RGB"), text))
    return images


def _checked(name: str, value: Any, default: Any, choices: tuple[str, ...] = ()) -> Any:
    """One of `script_args` checked against its default's type (null: the default); a text one of `choices`."""
    if value is None:
        return default
    if isinstance(default, bool):
        if not isinstance(value, bool) and value not in (0, 1):
            raise BadRequest(f"{name} must be true or false, got {value!r}", 422)
        return bool(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise BadRequest(f"{name} must be an integer, got {value!r}", 422)
        return int(value)
    if not isinstance(value, str) or (choices and value not in choices):
        wanted = " or ".join(repr(choice) for choice in choices) if choices else "a string"
        raise BadRequest(f"{name} must be {wanted}, got {value!r}", 422)
    return value


def _script_args(title: str, script_args: Any, names: tuple[str, ...], defaults: tuple[Any, ...],
                 choices: Mapping[str, tuple[str, ...]]) -> dict[str, Any]:
    """`script_args` by A1111's `Script.run` argument `names` (a shorter list takes the UI's `defaults`)."""
    if not isinstance(script_args, list) or len(script_args) > len(names):
        raise BadRequest(f"{title} script_args must be a list of at most {len(names)} values, A1111 1.10's order: "
                         f"{', '.join(names)}; got {script_args!r}", 422)
    given = dict(zip(names, script_args))
    return {name: _checked(f"{title} {name}", given.get(name), default, choices.get(name, ()))
            for name, default in zip(names, defaults)}


MATRIX_ARG_NAMES = ("put_at_start", "different_seeds", "prompt_type", "variations_delimiter", "margin_size")
MATRIX_DEFAULTS = (False, False, "positive", "comma", 0)


async def run_prompt_matrix(host: ScriptHost, body: Any, mode: str) -> dict[str, Any]:
    """A1111 1.10's Prompt matrix (scripts/prompt_matrix.py): the request's seeds fixed, every combination of the
    prompt's (or negative prompt's) `|` parts drawn as its own request (`sdlab.pipeline.prompt_matrix`), then
    answered as its `Script.run` returns: the grid, then every picture."""
    args = _script_args("prompt matrix", body.script_args, MATRIX_ARG_NAMES, MATRIX_DEFAULTS,
                        {"prompt_type": PROMPT_TYPES, "variations_delimiter": tuple(DELIMITERS)})
    if not 0 <= args["margin_size"] <= MAX_MARGIN:
        raise BadRequest(f"prompt matrix margin_size must be 0..{MAX_MARGIN} px, got {args['margin_size']}", 422)
    texts = {"prompt": body.prompt or "", "negative_prompt": body.negative_prompt or ""}
    try:
        matrix = prompt_matrix(texts, args["prompt_type"], args["put_at_start"], args["variations_delimiter"],
                               args["different_seeds"], args["margin_size"])
    except GridError as err:
        raise BadRequest(f"prompt matrix: {err}", 422) from None
    cells = matrix.cells({**texts, "seed": body.seed, "subseed": body.subseed})
    bodies = [body.model_copy(update={**{key: cell[key] for key in (*texts, "seed", "subseed")}, "batch_size": 1,
                                      "n_iter": 1}) for _, cell in cells]
    labels = [f"prompt matrix picture {matrix.labels(index)[0]!r}" for index, _ in cells]
    drawn = await host.draw(bodies, labels, False)
    return answer_prompt_matrix(host, body, matrix, {index: (cell, drawn_cell) for (index, _), cell, drawn_cell
                                                     in zip(cells, bodies, drawn)})


MATRIX_LISTS = ("prompt", "negative_prompt", "seed", "subseed")


def answer_prompt_matrix(host: ScriptHost, body: Any, matrix: PromptMatrix,
                         drawn: dict[Index, tuple[Any, Drawn | None]]) -> dict[str, Any]:
    """A1111's answer: `images` the grid (with the first picture's parameters) and then each picture, `info` the
    first picture's with `all_prompts`, `all_negative_prompts`, `all_seeds`, `all_subseeds` of every
    combination, `infotexts` the grid's and each picture's, `batch_size` the request's, `index_of_first_image` 1
    (as its `process_images` of the prompt list, with the grid inserted first). After an interrupt the grid
    shows the combinations not drawn black and `images` / `infotexts` hold the pictures drawn."""
    cells = [cell for _, cell in drawn.values() if cell is not None and cell.pictures]
    if not cells:
        return {"images": [], "parameters": host.echo(body), "info": json.dumps(drawn[(0, 0, 0)][1].info)}
    pictures = {}
    for index, (_, cell) in drawn.items():
        pictures[index] = None
        if cell is not None and cell.pictures:
            with open_image(cell.pictures[0]) as image:
                pictures[index] = image.convert("RGB")
    first = cells[0].infotexts[0]
    images = [host.encode(matrix.sheet(_blank_cells(pictures)), first)] + _answer_pictures(host, cells)
    info = {**cells[0].info, "infotexts": [first] + [cell.infotexts[0] for cell in cells],
            **{f"all_{key}s": [cell.info[key] if cell is not None else getattr(cell_body, key)
                               for cell_body, cell in drawn.values()] for key in MATRIX_LISTS},
            "batch_size": body.batch_size, "index_of_first_image": 1}
    return {"images": images if body.send_images else [], "parameters": host.echo(body), "info": json.dumps(info)}


def prompt_matrix_script_args(img2img: bool) -> list[ScriptArg]:
    """A1111 1.10's Prompt matrix controls (`Script.ui`), in its `script_args` order."""
    return [ScriptArg("Set at prompt start", False), ScriptArg("Random seeds", False),
            ScriptArg("Prompt type", "positive", choices=list(PROMPT_TYPES)),
            ScriptArg("Joining char", "comma", choices=list(DELIMITERS)),
            ScriptArg("Grid margins", 0, 0, MAX_MARGIN, 2)]


PROMPT_MATRIX = SelectableScript("Prompt Matrix", prompt_matrix_script_args, run_prompt_matrix)


FILE_ARG_NAMES = ("checkbox_iterate", "checkbox_iterate_batch", "prompt_position", "prompt_txt")
FILE_DEFAULTS = (False, False, "start", "")
LINE_FIELDS = ("prompt", "negative_prompt", "seed", "subseed", "subseed_strength", "seed_resize_from_h",
               "seed_resize_from_w", "sampler_name", "batch_size", "n_iter", "steps", "cfg_scale", "width", "height",
               "restore_faces", "tiling")
"""The line tags a request field takes as they are (A1111's `setattr(copy_p, tag, value)`); `sd_model` sets
`override_settings.sd_model_checkpoint`; the others (sampler_index, styles as a text, prompt_for_display,
outpath_*, do_not_save_*) change no picture sdlab's API answers with."""


def _line_body(body: Any, line: Line, seed: int, position: str) -> Any:
    """The request of `line`: the request with its tags, its prompts joined with the request's (`line_prompts`)
    and `seed` unless it has its own."""
    if "sampler_name" in line.args and line.args["sampler_name"] is None:
        raise BadRequest(f"prompts from file or textbox line {line.number}: Sampler not found (--sampler_name is "
                         "none of A1111's sampler names or aliases)", 404)
    update = {tag: value for tag, value in line.args.items() if tag in LINE_FIELDS}
    update.update(line_prompts(line.args, body.prompt or "", body.negative_prompt or "", position))
    update["seed"] = line.args.get("seed", seed)
    if "sd_model" in line.args:
        update["override_settings"] = {**body.override_settings, "sd_model_checkpoint": line.args["sd_model"]}
    return body.model_copy(update=update)


async def run_prompts_from_file(host: ScriptHost, body: Any, mode: str) -> dict[str, Any]:
    """A1111 1.10's Prompts from file or textbox (scripts/prompts_from_file.py): each line of `prompt_txt` drawn
    in turn as its own request (`sdlab.pipeline.prompts_file`; a line that does not read drawn as a prompt, its
    error logged, as A1111), answered as its `Script.run` returns `Processed(p, images, p.seed, "", ...)`: every
    picture, `info` the request's fields (`_request_info`; the model, VAE and extra parameters the first line's)
    with `all_prompts` and `infotexts` of every picture and A1111's `seed` (the request's after the lines, -1 if
    unset and not drawn), `all_seeds` [seed], `subseed` -1, the request's negative prompt."""
    args = _script_args("prompts from file or textbox", body.script_args, FILE_ARG_NAMES, FILE_DEFAULTS,
                        {"prompt_position": POSITIONS})
    lines = read_lines(args["prompt_txt"])
    if not lines:
        raise BadRequest("prompts from file or textbox prompt_txt has no line to draw", 422)
    for line in lines:
        if line.error is not None:
            logger.warning("Error parsing line %s as commandline: %s", line.text, line.error)
    seeds, last_seed = line_seeds(body.seed, len(lines), args["checkbox_iterate"], args["checkbox_iterate_batch"],
                                  body.batch_size, body.n_iter)
    bodies = [_line_body(body, line, seed, args["prompt_position"]) for line, seed in zip(lines, seeds)]
    labels = [f"prompts from file or textbox line {line.number}" for line in lines]
    drawn = await host.draw(bodies, labels, False)
    negative = body.negative_prompt or ""
    info = {**drawn[0].info, **_request_info(body, lines, drawn),
            "all_prompts": [prompt for line_body, cell in zip(bodies, drawn) for prompt in _line_prompts(line_body, cell)],
            "negative_prompt": negative, "all_negative_prompts": [negative], "seed": last_seed,
            "all_seeds": [last_seed], "subseed": -1, "all_subseeds": [-1],
            "infotexts": [text for cell in drawn if cell is not None for text in cell.infotexts],
            "index_of_first_image": 0}
    images = _answer_pictures(host, [cell for cell in drawn if cell is not None])
    return {"images": images if body.send_images else [], "parameters": host.echo(body), "info": json.dumps(info)}


REQUEST_INFO = ("prompt", "subseed_strength", "seed_resize_from_w", "seed_resize_from_h", "sampler_name",
                "batch_size", "steps", "cfg_scale", "width", "height")
"""A1111's `Processed` fields a line's tags can change in its copy of the request (`LINE_FIELDS`)."""


def _request_info(body: Any, lines: list[Line], drawn: list[Drawn | None]) -> dict[str, Any]:
    """A1111's `Processed(p, ...)` fields of the request `p` itself, not of a line's copy: those the request sets
    as it sets them, those it leaves to the model as a line that leaves them too drew them (else the first)."""
    info = {}
    for key in REQUEST_INFO:
        value = (body.sampler_name or body.sampler_index) if key == "sampler_name" else getattr(body, key)
        if value is None:
            unset = [cell for line, cell in zip(lines, drawn) if cell is not None and key not in line.args]
            value = (unset or drawn)[0].info[key]
        info[key] = value
    return info


def _line_prompts(line_body: Any, drawn: Drawn | None) -> list[str]:
    """A line's `all_prompts`: those drawn, or for a line not drawn (after an interrupt) its prompt for every
    picture, as A1111's `process_images` lists them when `state.interrupted` stops it before its first batch."""
    if drawn is not None:
        return drawn.info["all_prompts"]
    return [line_body.prompt] * line_body.batch_size * line_body.n_iter


def prompts_from_file_script_args(img2img: bool) -> list[ScriptArg]:
    """A1111 1.10's Prompts from file or textbox controls (`Script.ui`), in its `script_args` order."""
    return [ScriptArg("Iterate seed every line", False), ScriptArg("Use same random seed for all lines", False),
            ScriptArg("Insert prompts at the", "start", choices=list(POSITIONS)),
            ScriptArg("List of prompt inputs", "")]


PROMPTS_FROM_FILE = SelectableScript("Prompts from file or textbox", prompts_from_file_script_args,
                                     run_prompts_from_file)


# ------------------------------------------------------------------------------------------------------
# The scripts sdlab runs


RUNNABLE_SCRIPTS: tuple[SelectableScript, ...] = (PROMPT_MATRIX, PROMPTS_FROM_FILE, XYZ_PLOT)
"""The selectable scripts sdlab runs, in both tabs, in the order `GET scripts` lists them (A1111's, by file name)."""
UNLISTED_NAMES = {"Comments": None, "Hypertile": "Hypertile"}
"""A1111's `script.name` of the always-on scripts whose name is not their lower-case title: Comments has no UI
controls (A1111 names only a script with some, `create_script_ui_inner`), Hypertile's class names itself."""


def selected_script(name: str | None) -> SelectableScript | None:
    """A1111's `get_selectable_script`: none for an empty or null name, else the script titled `name` in any
    case; another name is A1111's 422 `Script '<name>' not found`."""
    if not name:
        return None
    for script in RUNNABLE_SCRIPTS:
        if script.title.lower() == name.lower():
            return script
    raise BadRequest(f"Script '{name}' not found", 422)


def scripts_list() -> dict[str, list[str]]:
    """A1111's `get_scripts_list` of the scripts sdlab runs in each tab: their names (the title in lower case,
    but `UNLISTED_NAMES`), the selectable ones, then the always-on ones `alwayson_scripts` takes, then the
    ControlNet extension's."""
    return {mode: [script.title.lower() for script in RUNNABLE_SCRIPTS]
            + [name for title in ALWAYSON_SCRIPTS[mode] if (name := UNLISTED_NAMES.get(title, title.lower()))]
            + [CONTROLNET] for mode in MODES}


def script_info() -> list[dict[str, Any]]:
    """A1111's `get_script_info` of the selectable scripts sdlab runs: each one's `ScriptInfo` in txt2img, then
    in img2img."""
    return [{"name": script.title.lower(), "is_alwayson": False, "is_img2img": img2img,
             "args": [vars(arg) for arg in script.args(img2img)]}
            for img2img in (False, True) for script in RUNNABLE_SCRIPTS]
