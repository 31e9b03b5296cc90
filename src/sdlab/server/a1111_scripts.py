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
- img2img's `Poor man's outpainting` and `Outpainting mk2` (scripts/poor_mans_outpainting.py,
  scripts/outpainting_mk_2.py): each tile / side inpainted as its own request on the pictures
  `sdlab.pipeline.outpainting_scripts` makes (`Pictures`, with A1111's latent mask), put back together as A1111 does.

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

import asyncio
import csv
import io
import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from sdlab.pipeline.grid import (
    NOTHING, Axis, Field, GridError, Index, Plot, cell_picture, field_named, parse_axis, with_plot_parameters,
)
from sdlab.pipeline.images import open_image
from sdlab.pipeline.loopback import (CURVES, INTERROGATIONS, Pass, kept_pictures, last_strength, loop_fields,
                                    loop_grid, loop_plan)
from sdlab.pipeline.outpainting_scripts import DIRECTIONS, OutpaintError, mk2_passes, poor_mans_tiles
from sdlab.pipeline.png_info import format_parameters, parse_parameters
from sdlab.pipeline.prompt_matrix import DELIMITERS, PROMPT_TYPES, PromptMatrix, prompt_matrix
from sdlab.pipeline.prompts_file import POSITIONS, Line, line_prompts, line_seeds, read_lines
from sdlab.pipeline.request import MAX_BATCH_COUNT, MAX_SIDE, check_freeu, fixed_seed
from sdlab.pipeline.sd_upscale import TileBatch, combined_pictures, tile_plan, upscale_fields, upscales
from sdlab.pipeline.tile_grid import TileGrid, split_grid
from sdlab.pipeline.upscale import UpscaleError
from sdlab.models.freeu import FREEU_FACTORS, FREEU_WINDOW
from sdlab.server.alwayson import (
    ALWAYSON_SCRIPTS, CONTROLNET, FREEU, FREEU_TITLES, PAG, SD_WEBUI_FREEU, alwayson_freeu, alwayson_pag,
    sd_webui_freeu,
)
from sdlab.server.alwayson import _script_args as alwayson_script_args
from sdlab.server.inputs import PLAIN_UPSCALER_NAMES, BadRequest

MODES = ("txt2img", "img2img")
logger = logging.getLogger("sdlab.server")


@dataclass(frozen=True)
class Drawn:
    """One request drawn as the route draws it without a script (A1111's `process_images`): its pictures' files
    and parameters texts, and `info`, A1111's `Processed.js()` fields."""

    pictures: list[Path]
    infotexts: list[str]
    info: dict[str, Any]
    skipped: bool = False   # `/skip` stopped its last batch (A1111's `state.skipped` after its `process_images`)


@dataclass(frozen=True)
class Pictures:
    """A script's request's own pictures (an outpainting canvas, a tile): its init pictures, mask and A1111's
    `p.latent_mask` (`GenerationRequest.latent_mask_image`)."""

    init_images: tuple[Image.Image, ...]
    mask: Image.Image | None = None
    latent_mask: Image.Image | None = None


NOT_DRAWN = Pictures(())
"""What `ScriptPictures` gives for a request the script does not draw (Loopback's passes after a skipped one)."""
ScriptPictures = Callable[[int, list["Drawn | None"]], "Pictures | tuple[Image.Image, ...] | None"]
"""(k, the requests drawn so far) -> request k's own pictures, or its init pictures alone (with the first's mask),
or None: the first's; `NOT_DRAWN`: request k is left undrawn (None)."""
ScriptSeeds = Callable[[int, list["Drawn | None"]], int]
"""(k, the requests drawn so far) -> request k's seed, for a script whose seeds follow what was drawn."""


@dataclass(frozen=True)
class ScriptHost:
    """What a script draws and answers with, given by the route (`a1111.py`)."""

    draw: Callable[..., Awaitable[list[Drawn | None]]]
    """(request bodies, what each is in a refusal, keep_going[, pictures[, seeds]]) -> each drawn as the route
    draws it without a script, None for those not drawn after an interrupt (and with keep_going for one that
    failed, logged). `pictures(k, drawn so far)` (`ScriptPictures`) gives request k's init pictures, or its
    `Pictures`, as it is drawn (None: the first request's), for a script whose pictures are made from the
    request's or drawn ones; each request is checked beforehand with the first's. `seeds(k, drawn so far)`
    (`ScriptSeeds`) gives request k's seed in place of its body's."""
    check: Callable[[list[Any], list[str]], Awaitable[None]]
    """(request bodies, what each is in a refusal) -> checked as `draw` checks them, nothing drawn: for a script
    whose pictures cost work to make (SD upscale's upscale), refused before it"""
    encode: Callable[[Image.Image, str | None], str]   # a picture and its parameters in base64, as the route
    echo: Callable[[Any], dict[str, Any]]              # A1111's `parameters` of a request body
    return_grid: bool       # A1111's `return_grid` option (Show grid in gallery), which its X/Y/Z plot reads
    upscalers: Callable[[], list[str]]                 # the upscalers' names, in `GET upscalers` order
    listed_upscaler: Callable[[str], str]
    """an upscaler's name as Extras looks it up (`upscaler_file`: a listed name or file name, a plain resize in any
    case) -> its name in `upscalers`; another is a 422"""
    upscaled: Callable[[Image.Image, str, float], Awaitable[Image.Image]]
    """(picture, upscaler name, scale) -> the picture through that upscaler as A1111's `Upscaler.upscale`
    (`sdlab.pipeline.upscale.upscale_by`), while no job runs"""
    init_pictures: Callable[[Any], Awaitable[tuple[Image.Image, ...]]]    # a body's init pictures, decoded as
                                                                          # the route decodes them
    max_images: int         # `--max-images`: the pictures of all the requests of one `draw` (more: refused)
    checkpoint_title: Callable[[str], str | None]      # a model named as `sd_model_checkpoint` names one -> its
                                                       # title, None for one not in `GET sd-models`
    vae_names: Callable[[], list[str]]                 # `GET sd-vae`'s names, which `sd_vae` takes
    restore_model: Callable[[], Awaitable[None]]
    """the selected model loaded again with the options' VAE, as before a script that drew with others (A1111's
    X/Y/Z plot `SharedSettingsStackHelper`); a failure is logged"""
    queued: Callable[[], bool]
    """whether a request of `draw` got a job (which may have loaded another model) by now"""
    files: bool = False     # `encode` keeps the pictures as a job's files (a native script job's), as A1111 saves them


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
    modes: tuple[str, ...] = ("txt2img", "img2img")             # the tabs it is in (A1111's `Script.show`)


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
EXTENSION_AXES = (      # after A1111's, as an extension's `axis_options.extend` puts them
    AxisType("[FreeU] Enabled", None, True),            # ljleb/sd-webui-freeu lib_free_u/xyz_grid.py's names
    AxisType("[FreeU] Stage 1 Backbone Scale"), AxisType("[FreeU] Stage 1 Skip Scale"),
    AxisType("[FreeU] Stage 2 Backbone Scale"), AxisType("[FreeU] Stage 2 Skip Scale"),
    AxisType("FreeU start"), AxisType("FreeU end"), AxisType("PAG scale"),          # sdlab's own
)
"""The axes sdlab adds after A1111 1.10's, drawn with Forge's FreeU Integrated and PerturbedAttentionGuidance
Integrated always-on scripts (`alwayson_args`): sd-webui-freeu's names for FreeU's factors (that extension also lists
axes sdlab does not draw, and its versions differ, so these indices are sdlab's: look an axis up by its label in
`GET /api/scripts`), sdlab's own for FreeU's step window and the PAG scale (neither Forge script adds axes)."""


def axis_types(mode: str) -> list[AxisType]:
    """The axes A1111 offers in `mode`, which x_type / y_type / z_type index (`Script.ui`'s
    `current_axis_options`: the axes of both tabs and those of `mode`'s)."""
    return [axis for axis in (*A1111_AXES, *EXTENSION_AXES) if axis.mode in (None, mode)]


BODY_FIELDS = {         # sdlab's request field an axis sets -> the A1111 request field its `apply_field` sets
    "seed": "seed", "subseed": "subseed", "subseed_strength": "subseed_strength", "steps": "steps",
    "styles": "styles",         # the request's names, then a Styles axis's (A1111's `p.styles.extend`)
    "hr_steps": "hr_second_pass_steps", "cfg_scale": "cfg_scale", "image_cfg_scale": "image_cfg_scale",
    "prompt": "prompt",
    "negative_prompt": "negative_prompt", "sampler": "sampler_name", "hr_sampler": "hr_sampler_name",
    "s_min_uncond": "s_min_uncond", "s_churn": "s_churn", "s_tmin": "s_tmin", "s_tmax": "s_tmax",
    "s_noise": "s_noise", "schedule": "scheduler", "eta": "eta", "strength": "denoising_strength",
    "hr_denoise": "denoising_strength", "noise_multiplier": "initial_noise_multiplier", "hr_upscaler": "hr_upscaler",
    "width": "width", "height": "height", "refiner": "refiner_checkpoint", "refiner_switch": "refiner_switch_at",
}
OPTION_FIELDS = {       # ... -> the option its `apply_override` sets in `override_settings` (Clip skip too in 1.10)
    "schedule_sigma_min": "sigma_min", "schedule_sigma_max": "sigma_max", "schedule_rho": "rho",
    "clip_skip": "CLIP_stop_at_last_layers", "extra_noise": "img2img_extra_noise",
    "inpainting_mask_weight": "inpainting_mask_weight", "unipc_order": "uni_pc_order",
    "discard_penultimate_sigma": "always_discard_next_to_last_sigma", "sgm_noise_multiplier": "sgm_noise_multiplier",
    "rng": "randn_source", "checkpoint": "sd_model_checkpoint", "vae": "sd_vae",
    "token_merging_ratio": "token_merging_ratio", "token_merging_ratio_hr": "token_merging_ratio_hr",
}
"""Cond. Image Mask Weight sets A1111's `p.inpainting_mask_weight`, which its option sets too."""
ALWAYSON_AXES = {       # ... -> the always-on script whose args carry it (`alwayson_args`)
    "freeu": FREEU, "pag_scale": PAG,
}


def sdlab_field(axis: AxisType) -> Field | None:
    """The `sdlab.pipeline.grid` field of A1111's axis, None for one sdlab does not draw (Face restore, FP8 mode,
    ...)."""
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


def _a1111_vae(name: str, names: list[str]) -> str:
    """A1111 1.10's `find_vae`: "Automatic" for auto / automatic, "None" for none, else the name of `GET sd-vae`
    equal to `name` in any case, else "Automatic" (logged, as A1111's "No VAE found for ...; using Automatic")."""
    wanted = name.strip().lower()
    if wanted in ("auto", "automatic"):
        return "Automatic"
    if wanted == "none":
        return "None"
    found = next((listed for listed in names if listed.lower() == wanted), None)
    if found is None:
        logger.warning("x/y/z plot: No VAE found for %s; using Automatic", wanted)
    return found or "Automatic"


def _served_axis(axis: Axis, host: ScriptHost) -> Axis:
    """`axis` with the values the server draws, its labels as typed: a Checkpoint name the title of the model it
    names (A1111's `apply_checkpoint`), a Refiner checkpoint too but "None" (no refiner), each a 422 before
    anything is drawn when no listed model has that name (`confirm_checkpoints`, `confirm_checkpoints_or_none`);
    a VAE as A1111's `find_vae` names it (`_a1111_vae`)."""
    if axis.field.name == "vae":
        return replace(axis, values=tuple(_a1111_vae(value, host.vae_names()) for value in axis.values))
    if axis.field.name not in ("checkpoint", "refiner"):
        return axis
    titles = []
    for value in axis.values:
        title = value if axis.field.name == "refiner" and value in ("None", "none") else host.checkpoint_title(value)
        if title is None:
            raise BadRequest(f"x/y/z plot {axis.field.type_name} axis: Unknown checkpoint: {value} (GET sd-models "
                             "lists the models)", 422)
        titles.append(title)
    return replace(axis, values=tuple(titles))


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
    if any(key in ALWAYSON_AXES for key in changed):
        update["alwayson_scripts"] = alwayson_args(body.alwayson_scripts, changed)
    return body.model_copy(update=update)


def alwayson_base(scripts: Mapping[str, Any]) -> dict[str, Any]:
    """The FreeU setting (a `FreeU`, or None) and the PAG scale of a request's `alwayson_scripts`, which the FreeU
    and PAG axes change (`ALWAYSON_AXES`); and where sd-webui-freeu's script is sent disabled, the setting its own
    values hold (`freeu_idle`: its stages and version, or the 422's text where sdlab does not draw them), which its
    [FreeU] Enabled axis draws and its other axes change without turning it on (`grid._idle`)."""
    freeu = alwayson_freeu(dict(scripts))
    base = {"freeu": None if freeu is None else check_freeu(freeu),
            "pag_scale": alwayson_pag(dict(scripts)).get("pag_scale", 0.0)}
    extension = next((name for name in scripts if name.lower() == SD_WEBUI_FREEU), None)
    if freeu is None and extension is not None:
        try:
            idle = sd_webui_freeu(extension, _enabled(alwayson_script_args(extension, scripts[extension])))
            base["freeu_idle"] = check_freeu(idle)
        except BadRequest as err:
            base["freeu_idle"] = err.message
    return base


def _enabled(args: list[Any]) -> list[Any]:
    """sd-webui-freeu's args (its object or its UI's values) with `enable` true."""
    if args and isinstance(args[0], dict):
        return [{**args[0], "enable": True}, *args[1:]]
    return [True, *args[1:]]


def alwayson_args(scripts: Mapping[str, Any], changed: Mapping[str, Any]) -> dict[str, Any]:
    """`scripts` with the FreeU setting and the PAG scale of `changed` as Forge's FreeU Integrated args [enabled,
    b1, b2, s1, s2, start, end] and PerturbedAttentionGuidance Integrated args [enabled, scale], each under the
    title the request named it by (else Forge's); a request that sends sd-webui-freeu's `FreeU` gets the FreeU
    setting as that script's object (`extension_freeu_args`)."""
    out = dict(scripts)
    for key, title in ALWAYSON_AXES.items():
        if key not in changed:
            continue
        titles = FREEU_TITLES if key == "freeu" else (PAG,)
        name = next((name for name in out if name.lower() in titles), title)
        value = changed[key]
        extension = next((name for name in out if name.lower() == SD_WEBUI_FREEU), None)
        if key == "pag_scale":
            out[name] = {"args": [True, value]}
        elif extension is not None:
            out[extension] = extension_freeu_args(value)
        else:
            out[name] = {"args": [False] if value is None else
                         [True, *(getattr(value, field) for field in (*FREEU_FACTORS, *FREEU_WINDOW))]}
    return out


def extension_freeu_args(freeu: Any) -> dict[str, Any]:
    """A cell's FreeU setting (a `FreeU`, or None) as sd-webui-freeu's object: its factors on stages 1 and 2, its
    version, and the step window as its start / stop ratios (which it reads only whole: `alwayson.sd_webui_freeu`)."""
    if freeu is None:
        return {"args": [{"enable": False}]}
    return {"args": [{"enable": True, "version": str(freeu.version), "start_ratio": float(freeu.start),
                      "stop_ratio": float(freeu.end), "stage_infos": [
                          {"backbone_factor": freeu.b1, "skip_factor": freeu.s1},
                          {"backbone_factor": freeu.b2, "skip_factor": freeu.s2}]}]}


def cell_bodies(body: Any, plot: Plot, args: XyzArgs, mode: str) -> list[tuple[Index, Any]]:
    """Each cell's request body, in A1111's order (X fastest, then Y, then Z): the request's seeds drawn once
    unless `no_fixed_seeds` (A1111's `fix_seed`), each cell's axes applied X, then Y, then Z (`Plot.cells`), then
    its seed varied (`_seed_offset`). A cell an axis cannot apply to is a 422 before anything is drawn."""
    if not args.no_fixed_seeds:
        body = body.model_copy(update={"seed": fixed_seed(body.seed), "subseed": fixed_seed(body.subseed)})
    base: dict[str, Any] = {"prompt": body.prompt, "negative_prompt": body.negative_prompt, "seed": body.seed,
                            "steps": body.steps, "styles": tuple(body.styles), **alwayson_base(body.alwayson_scripts)}
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
    """A1111 1.10's X/Y/Z plot: the axes and cells checked, every cell drawn in turn (at batch size 1 with the
    `return_grid` option off) in A1111's order (`Plot.drawing_order`: a Checkpoint name axis outermost, so that the
    model changes least; the server holds one model at a time), the selected model loaded again after a Checkpoint
    name, VAE or Refiner checkpoint axis once the cells are drawn, or once a later cell failed (a full queue, the
    server stopping), as A1111's `SharedSettingsStackHelper` restores on an exception too (a plot refused before
    its first job loads nothing), then answered as its `Script.run` returns (`answer_xyz_plot`)."""
    args = xyz_args(body.script_args)
    plot = xyz_plot(args, mode)
    plot = replace(plot, **{letter: _served_axis(axis, host) for letter, axis in plot.axes()})
    drawn_body = body if host.return_grid else body.model_copy(update={"batch_size": 1})    # A1111: p.batch_size = 1
    cells = dict(cell_bodies(drawn_body, plot, args, mode))
    order = plot.drawing_order()
    labels = [f"x/y/z plot cell {', '.join(plot.labels(index)) or index}" for index in order]
    try:
        drawn = dict(zip(order, await host.draw([cells[index] for index in order], labels, True)))
    finally:
        if host.queued() and any(axis.field.name in RESTORED_FIELDS for _, axis in plot.axes()):
            await host.restore_model()
    return answer_xyz_plot(host, body, plot, args, {index: drawn[index] for index in cells})


RESTORED_FIELDS = ("checkpoint", "vae", "refiner")
"""The axes after which A1111's plot loads the selected model and VAE again (`SharedSettingsStackHelper`)."""


def _blank_cells(pictures: dict[Index, Image.Image | None],
                 size: tuple[int, int] | None = None) -> dict[Index, Image.Image]:
    """Every cell's picture, black where none was drawn (A1111's `Image.new` of the first cell's mode and size;
    of `size`, the request's width x height, where no cell has a picture)."""
    size = next((picture.size for picture in pictures.values() if picture is not None), size)
    return {index: picture or Image.new("RGB", size) for index, picture in pictures.items()}


def answer_xyz_plot(host: ScriptHost, body: Any, plot: Plot, args: XyzArgs,
                    drawn: dict[Index, Drawn | None]) -> dict[str, Any]:
    """A1111's answer: `images` the grid, then with Include Sub Grids each Z value's grid, then with Include Sub
    Images each cell's picture (X fastest); `info` the first cell's, with `infotexts` those of the grid (its first
    cell's text with the plot fields), the sub-grids and every cell (with or without its picture), `all_prompts` /
    `all_seeds` the sub-grids' and each cell's, `index_of_first_image` 1 (A1111's `draw_xyz_grid`, `run`). A cell
    not drawn (after an interrupt, or failed) is black, its text, prompt and seed null; with none drawn every cell
    is, at the request's width x height, and `info` the first failed cell's (A1111's `process_cell` makes a black
    `Image.new` of `Processed(p, [], ...)`'s size for each, and a PIL picture is never false, so its
    `not any(processed_result.images)` does not end the plot)."""
    cells = list(drawn.values())
    first = next((cell for cell in cells if cell is not None and cell.pictures), None)
    first = first or next(cell for cell in cells if cell is not None)
    pictures = _blank_cells({index: _cell_image(cell, body) if cell and cell.pictures else None
                             for index, cell in drawn.items()}, (first.info["width"], first.info["height"]))
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


def _checked(name: str, value: Any, default: Any, choices: tuple[str, ...] = (), least: float | None = None) -> Any:
    """One of `script_args` checked against its default's type (null: the default): a number not below `least`, a
    text one of `choices`, a list (for a tuple default) of some of `choices`; a None default takes it as it is
    (the script reads it itself, or not at all)."""
    if value is None or default is None:
        return default if value is None else value
    if isinstance(default, bool):
        if not isinstance(value, bool) and value not in (0, 1):
            raise BadRequest(f"{name} must be true or false, got {value!r}", 422)
        return bool(value)
    if isinstance(default, tuple):
        if (not isinstance(value, list) or not value or not all(isinstance(item, str) for item in value)
                or not set(value) <= set(choices)):
            raise BadRequest(f"{name} must be a list of some of {', '.join(choices)}, got {value!r}", 422)
        return tuple(value)
    at_least = "" if least is None else f" >= {least:g}"
    if isinstance(default, float):
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or (least is not None and value < least)):
            raise BadRequest(f"{name} must be a number{at_least}, got {value!r}", 422)
        return float(value)
    if isinstance(default, int):
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or value != int(value) or (least is not None and value < least)):
            raise BadRequest(f"{name} must be an integer{at_least}, got {value!r}", 422)
        return int(value)
    if not isinstance(value, str) or (choices and value not in choices):
        wanted = " or ".join(repr(choice) for choice in choices) if choices else "a string"
        raise BadRequest(f"{name} must be {wanted}, got {value!r}", 422)
    return value


def _script_args(title: str, script_args: Any, names: tuple[str, ...], defaults: tuple[Any, ...],
                 choices: Mapping[str, tuple[str, ...]], least: float | None = None) -> dict[str, Any]:
    """`script_args` by A1111's `Script.run` argument `names` (a shorter list takes the UI's `defaults`), each
    checked by `_checked` (its numbers not below `least`)."""
    if not isinstance(script_args, list) or len(script_args) > len(names):
        raise BadRequest(f"{title} script_args must be a list of at most {len(names)} values, A1111 1.10's order: "
                         f"{', '.join(names)}; got {script_args!r}", 422)
    given = dict(zip(names, script_args))
    return {name: _checked(f"{title} {name}", given.get(name), default, choices.get(name, ()), least)
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
`override_settings.sd_model_checkpoint`; `styles` sets the text as A1111's `p.styles`, whose every character its
`apply_styles_to_prompt` takes for a style name (the request's styles are gone); the others (sampler_index,
prompt_for_display, outpath_*, do_not_save_*) change no picture sdlab's API answers with."""


def _line_body(body: Any, line: Line, seed: int, position: str) -> Any:
    """The request of `line`: the request with its tags, its prompts joined with the request's (`line_prompts`)
    and `seed` unless it has its own."""
    if "sampler_name" in line.args and line.args["sampler_name"] is None:
        raise BadRequest(f"prompts from file or textbox line {line.number}: Sampler not found (--sampler_name is "
                         "none of A1111's sampler names or aliases)", 404)
    update = {tag: value for tag, value in line.args.items() if tag in LINE_FIELDS}
    update.update(line_prompts(line.args, body.prompt or "", body.negative_prompt or "", position))
    update["seed"] = line.args.get("seed", seed)
    if "styles" in line.args:
        update["styles"] = list(line.args["styles"])
    if "sd_model" in line.args:
        update["override_settings"] = {**body.override_settings, "sd_model_checkpoint": line.args["sd_model"]}
    return body.model_copy(update=update)


async def run_prompts_from_file(host: ScriptHost, body: Any, mode: str) -> dict[str, Any]:
    """A1111 1.10's Prompts from file or textbox (scripts/prompts_from_file.py): each line of `prompt_txt` drawn
    in turn as its own request (`sdlab.pipeline.prompts_file`; a line that does not read drawn as a prompt, its
    error logged, as A1111), answered as its `Script.run` returns `Processed(p, images, p.seed, "", ...)`: every
    picture, `info` the request's fields (`_request_info`; the model, VAE and extra parameters the first line's)
    with `all_prompts` and `infotexts` of every picture, `prompt` the first of `all_prompts` (`Processed.js()`),
    and A1111's `seed` (the request's after the lines, -1 if unset and not drawn), `all_seeds` [seed], `subseed`
    -1, the request's negative prompt."""
    args = _script_args("prompts from file or textbox", body.script_args, FILE_ARG_NAMES, FILE_DEFAULTS,
                        {"prompt_position": POSITIONS})
    lines = await asyncio.to_thread(read_lines, args["prompt_txt"], most=host.max_images + 1)   # one too many:
                                                                                                # `draw` refuses
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
    all_prompts = [prompt for line_body, cell in zip(bodies, drawn) for prompt in _line_prompts(line_body, cell)]
    info = {**drawn[0].info, **_request_info(body, lines, drawn), "prompt": all_prompts[0], "all_prompts": all_prompts,
            "negative_prompt": negative, "all_negative_prompts": [negative], "seed": last_seed,
            "all_seeds": [last_seed], "subseed": -1, "all_subseeds": [-1],
            "infotexts": [text for cell in drawn if cell is not None for text in cell.infotexts],
            "index_of_first_image": 0}
    images = _answer_pictures(host, [cell for cell in drawn if cell is not None])
    return {"images": images if body.send_images else [], "parameters": host.echo(body), "info": json.dumps(info)}


REQUEST_INFO = ("subseed_strength", "seed_resize_from_w", "seed_resize_from_h", "sampler_name",
                "batch_size", "steps", "cfg_scale", "width", "height", "styles")
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
# Loopback and SD upscale (img2img)


def _with_script_parameters(text: str | None, fields: Mapping[str, Any]) -> str | None:
    """A picture's parameters with the script's `extra_generation_params` `fields` (before `Version`); without
    fields, as they are."""
    if text is None or not fields:
        return text
    return format_parameters(with_plot_parameters(parse_parameters(text), fields))


def _script_info(first: Drawn | None, last: Drawn, fields: Mapping[str, Any], **changed: Any) -> dict[str, Any]:
    """A1111's `Processed(p, images, seed, initial_info).js()` of a script that drew with `p` in turn: the last
    request's fields (`p` as the script left it), `subseed` -1, `extra_generation_params` the script's `fields`
    then those the drawing added, `infotexts` [the first picture's with the script's fields], `changed`."""
    initial = _with_script_parameters(_first_text(first), fields)
    return {**last.info, "subseed": -1, "index_of_first_image": 0, "infotexts": [initial],
            "extra_generation_params": {**fields, **last.info["extra_generation_params"]}, **changed}


def _picture(drawn: Drawn, index: int = 0) -> Image.Image:
    with open_image(drawn.pictures[index]) as image:
        return image.convert("RGB")


LOOPBACK_ARG_NAMES = ("loops", "final_denoising_strength", "denoising_curve", "append_interrogation")
LOOPBACK_DEFAULTS = (4, 0.5, "Linear", "None")


def loopback_plan(body: Any) -> tuple[list[Pass], dict[str, Any]]:
    """The loopback's passes (`sdlab.pipeline.loopback.loop_plan`) and its `extra_generation_params`, from
    `script_args` checked as A1111's `Script.run` takes them; a bad one is a 422."""
    args = _script_args("loopback", body.script_args, LOOPBACK_ARG_NAMES, LOOPBACK_DEFAULTS,
                        {"denoising_curve": CURVES, "append_interrogation": INTERROGATIONS})
    loops, final = args["loops"], args["final_denoising_strength"]
    if not 1 <= loops * body.n_iter <= MAX_BATCH_COUNT or loops < 1:
        raise BadRequest(f"loopback loops must be >= 1 and loops x n_iter at most {MAX_BATCH_COUNT}, got {loops} "
                         f"loops x {body.n_iter}", 422)
    if not 0 <= final <= 1:
        raise BadRequest(f"loopback final_denoising_strength must be 0..1, got {final}", 422)
    if args["append_interrogation"] != "None":
        raise BadRequest(f"loopback append_interrogation {args['append_interrogation']!r}: sdlab has no CLIP or "
                         "DeepBooru interrogator; use 'None'", 422)
    initial = 0.75 if body.denoising_strength is None else body.denoising_strength
    plan = loop_plan(loops, body.n_iter, fixed_seed(body.seed), initial, final, args["denoising_curve"])
    return plan, loop_fields(final, args["denoising_curve"])


async def run_loopback(host: ScriptHost, body: Any, mode: str) -> dict[str, Any]:
    """A1111 1.10's Loopback (scripts/loopback.py, `sdlab.pipeline.loopback`): every pass an img2img request of
    one picture, its init picture the previous pass's picture (the first of each batch the request's), its
    seed, strength and, after the first of its batch, Masked content "original" (`inpainting_fill` 1) as A1111
    sets them (a pass's seed the last drawn pass's + 1: after a skipped pass, the passes its batch leaves undrawn
    take none); answered as its `Script.run` returns (`answer_loopback`)."""
    plan, fields = loopback_plan(body)
    subseed = fixed_seed(body.subseed)
    bodies = [body.model_copy(update={"seed": p.seed, "subseed": subseed, "denoising_strength": p.strength,
                                      "batch_size": 1, "n_iter": 1,
                                      **({} if p.from_request else {"inpainting_fill": 1})}) for p in plan]
    labels = [f"loopback batch {p.batch + 1} loop {p.loop + 1}" for p in plan]

    def pictures(k: int, drawn: list[Drawn | None]) -> Pictures | tuple[Image.Image, ...] | None:
        """The request's picture, the last pass's, or after a skipped pass none: A1111 breaks the batch's loop."""
        if plan[k].from_request:
            return None
        before = drawn[k - 1]
        return NOT_DRAWN if before is None or before.skipped else (_picture(before),)

    def seed(k: int, drawn: list[Drawn | None]) -> int:
        """A1111's `p.seed = processed.seed + 1` after every pass it draws."""
        done = [cell for cell in drawn if cell is not None]
        return done[-1].info["seed"] + 1 if done else plan[k].seed

    drawn = await host.draw(bodies, labels, False, pictures, seed)
    return answer_loopback(host, body, plan, fields, drawn)


def answer_loopback(host: ScriptHost, body: Any, plan: list[Pass], fields: dict[str, Any],
                    drawn: list[Drawn | None]) -> dict[str, Any]:
    """A1111's answer: `images` (with more than one) the kept pictures' grid in a row, then the kept pictures
    (`kept_pictures`: every pass's with one batch, each batch's last with several), each with its parameters and
    the script's fields; `info` the last pass's with the first pass's seed and text (`_script_info`), batch size
    1 and the strength A1111 left set. A pass interrupted is not kept, and ends the script; a pass skipped is not
    kept and ends its batch, but counts for the seed, text and strength (A1111 breaks after setting them)."""
    ran = [cell is not None and bool(cell.pictures) and not cell.info.get("interrupted") for cell in drawn]
    done = [ok and not cell.skipped for ok, cell in zip(ran, drawn)]
    skipped_batches = {p.batch for p, cell in zip(plan, drawn) if cell is not None and cell.skipped}
    kept = kept_pictures(plan, done)
    pictures = [_picture(drawn[i]) for i in kept]
    images = [host.encode(loop_grid(pictures), None)] if len(pictures) > 1 else []
    images += [host.encode(picture, _with_script_parameters(drawn[i].infotexts[0], fields))
               for i, picture in zip(kept, pictures)]
    last = max(i for i, cell in enumerate(drawn) if cell is not None)
    first = next((i for i, ok in enumerate(ran) if ok), None)
    batch_done = sum(ran[i] for i, p in enumerate(plan) if p.batch == plan[last].batch)
    loops = sum(p.batch == 0 for p in plan)
    strength = last_strength(loops, batch_done, plan[0].strength, fields["Final denoising strength"],
                             fields["Denoising curve"])
    info = _script_info(drawn[first] if first is not None else None, drawn[last], fields, batch_size=1,
                        seed=plan[first].seed if first is not None else -1, denoising_strength=strength,
                        interrupted=not all(ok or p.batch in skipped_batches for ok, p in zip(ran, plan)))
    return {"images": images if body.send_images else [], "parameters": host.echo(body), "info": json.dumps(info)}


def loopback_script_args(img2img: bool) -> list[ScriptArg]:
    """A1111 1.10's Loopback controls (`Script.ui`), in its `script_args` order."""
    return [ScriptArg("Loops", 4, 1, 32, 1), ScriptArg("Final denoising strength", 0.5, 0, 1, 0.01),
            ScriptArg("Denoising strength curve", "Linear", choices=list(CURVES)),
            ScriptArg("Append interrogated prompt at each iteration", "None", choices=list(INTERROGATIONS))]


LOOPBACK = SelectableScript("Loopback", loopback_script_args, run_loopback, ("img2img",))


SD_UPSCALE_ARG_NAMES = ("info", "overlap", "upscaler_index", "scale_factor")
SD_UPSCALE_DEFAULTS = (None, 64, None, 2.0)     # `info` is not read, `upscaler_index` by `_upscaler_named`
DEFAULT_SIZE = 512              # A1111's API width / height when unset (SD upscale's tile size)


def _upscaler_named(host: ScriptHost, value: Any) -> str:
    """The upscaler `upscaler_index` picks: A1111's index into its upscaler list (`GET upscalers`' order), or a
    name as Extras takes it (`host.listed_upscaler`; null: the first, A1111's UI default)."""
    names = host.upscalers()
    if value is None:
        return names[0]
    if isinstance(value, str):
        return host.listed_upscaler(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(names):
        raise BadRequest(f"sd upscale upscaler_index must be 0..{len(names) - 1}, an index into GET upscalers "
                         f"({', '.join(f'{i} {name}' for i, name in enumerate(names))}), or a name, got {value!r}", 422)
    return names[value]


def sd_upscale_args(host: ScriptHost, body: Any) -> tuple[int, str, float, tuple[int, int]]:
    """(overlap, upscaler name, scale factor, tile size) from `script_args` in A1111 1.10's order (its `info`, the
    UI's note, is not read); a bad one is a 422. The tiles are the request's width x height (A1111's 512 unset)."""
    args = _script_args("sd upscale", body.script_args, SD_UPSCALE_ARG_NAMES, SD_UPSCALE_DEFAULTS, {})
    overlap, scale = args["overlap"], args["scale_factor"]
    name = _upscaler_named(host, args["upscaler_index"])
    tile = (body.width or DEFAULT_SIZE, body.height or DEFAULT_SIZE)
    if not 0 <= overlap < min(tile):
        raise BadRequest(f"sd upscale overlap must be 0..{min(tile) - 1} px, less than the tile's width and height "
                         f"({tile[0]}x{tile[1]}), got {overlap}", 422)
    if name.lower() != "none" and not scale > 0:
        raise BadRequest(f"sd upscale scale_factor must be above 0, got {scale:g}", 422)
    return overlap, name, scale, tile


async def run_sd_upscale(host: ScriptHost, body: Any, mode: str) -> dict[str, Any]:
    """A1111 1.10's SD upscale (scripts/sd_upscale.py, `sdlab.pipeline.sd_upscale`): the request's init picture
    upscaled, cut into tiles of its width x height, each batch of tiles drawn as one img2img request (a picture
    per tile, its seed as A1111's `tile_batches`), then put together (`combined_pictures`) for every `n_iter`.
    The run (`tile_plan`) and the tiles' requests are checked on the upscaled size before the upscale runs."""
    overlap, name, scale, (tile_w, tile_h) = sd_upscale_args(host, body)
    image = (await host.init_pictures(body))[0]
    try:
        _, batches = tile_plan(image.size, name, scale, (tile_w, tile_h), overlap, body.batch_size, body.n_iter,
                               fixed_seed(body.seed))
    except UpscaleError as err:
        raise BadRequest(f"sd upscale: {err}", 422) from None
    subseed = fixed_seed(body.subseed)
    bodies = [body.model_copy(update={"seed": b.seed, "subseed": subseed, "batch_size": b.batch_size, "n_iter": 1,
                                      "width": tile_w, "height": tile_h}) for b in batches]
    labels = [f"sd upscale upscale {b.upscale + 1} tiles {b.tiles.start + 1}-{b.tiles.stop}" for b in batches]
    await host.check(bodies, labels)
    upscaled = await host.upscaled(image, name, scale) if upscales(name) else image
    grid = split_grid(upscaled, tile_w, tile_h, overlap)
    tiles = [tile.image for _, tile in grid.tiles()]
    drawn = await host.draw(bodies, labels, False, lambda k, _: tuple(tiles[i] for i in batches[k].tiles))
    return answer_sd_upscale(host, body, grid, batches, upscale_fields(overlap, name), drawn)


def answer_sd_upscale(host: ScriptHost, body: Any, grid: TileGrid, batches: list[TileBatch], fields: dict[str, Any],
                      drawn: list[Drawn | None]) -> dict[str, Any]:
    """A1111's answer: `images` every upscale's picture put together from its drawn tiles (black for tiles not
    drawn after an interrupt), without parameters (A1111's new picture has none), as files (`host.files`) with
    the first batch's text, as A1111 saves them (`initial_info`); `info` the last batch's with the request's seed
    and that text (`_script_info`)."""
    pictures = [None if cell is None else [_picture(cell, i) for i in range(len(cell.pictures))] for cell in drawn]
    combined = combined_pictures(grid, batches, pictures)
    last = max(i for i, cell in enumerate(drawn) if cell is not None)
    first = next(cell for cell in drawn if cell is not None)
    info = _script_info(first, drawn[last], fields, seed=batches[0].seed, batch_size=batches[last].batch_size)
    images = [host.encode(picture, info["infotexts"][0] if host.files else None) for picture in combined]
    return {"images": images if body.send_images else [], "parameters": host.echo(body), "info": json.dumps(info)}


def sd_upscale_script_args(img2img: bool, upscalers: Sequence[str] = PLAIN_UPSCALER_NAMES) -> list[ScriptArg]:
    """A1111 1.10's SD upscale controls (`Script.ui`), in its `script_args` order, the upscaler's choices
    `upscalers` (A1111's `shared.sd_upscalers`: the server's, `GET upscalers`' names), the first its value."""
    return [ScriptArg("", None), ScriptArg("Tile overlap", 64, 0, 256, 16),
            ScriptArg("Upscaler", upscalers[0], choices=list(upscalers)),
            ScriptArg("Scale Factor", 2, 0, 4, 1)]


SD_UPSCALE = SelectableScript("SD upscale", sd_upscale_script_args, run_sd_upscale, ("img2img",))


# ------------------------------------------------------------------------------------------------------
# Poor man's outpainting and Outpainting mk2


FILLS = ("fill", "original", "latent noise", "latent nothing")    # A1111's Masked content radio (`type="index"`)
POOR_ARG_NAMES = ("pixels", "mask_blur", "inpainting_fill", "direction")
POOR_DEFAULTS = (128, 4, 0, DIRECTIONS)
MK2_ARG_NAMES = ("info", "pixels", "mask_blur", "direction", "noise_q", "color_variation")
MK2_DEFAULTS = (None, 128, 8, DIRECTIONS, 1.0, 0.05)


def _outpaint_args(title: str, script_args: Any, names: tuple[str, ...], defaults: tuple[Any, ...]) -> dict[str, Any]:
    """An outpainting script's `script_args` (`_script_args`): numbers >= 0, `direction` a list of some of
    `DIRECTIONS`, `pixels` 1..`MAX_SIDE` (mk2's `info`, A1111's HTML note, is not read)."""
    args = _script_args(title, script_args, names, defaults, {"direction": DIRECTIONS}, least=0)
    if not 1 <= args["pixels"] <= MAX_SIDE:
        raise BadRequest(f"{title} pixels must be 1..{MAX_SIDE}, got {args['pixels']}", 422)
    return args


def _outpaint_body(body: Any, blur: tuple[int, int], fill: int, **update: Any) -> Any:
    """A pass's request: `body` inpainting the whole picture with mask blur `blur` (x, y) and Masked content
    `fill`, as the scripts set `p`."""
    return body.model_copy(update={"mask_blur": None, "mask_blur_x": blur[0], "mask_blur_y": blur[1],
                                   "inpainting_fill": fill, "inpaint_full_res": False, **update})


async def run_poor_mans_outpainting(host: ScriptHost, body: Any, mode: str) -> dict[str, Any]:
    """A1111 1.10's Poor man's outpainting (scripts/poor_mans_outpainting.py, `sdlab.pipeline.outpainting_scripts`):
    every tile of the grown canvas that is not inside the picture inpainted as its own request of batch size 1,
    the seeds counting on from the request's (drawn once), then the canvas put back together: A1111's
    `Processed(p, [combined], ...)`, the one picture without parameters, after an interrupt with the tiles not
    drawn black."""
    title = "poor man's outpainting"
    args = _outpaint_args(title, body.script_args, POOR_ARG_NAMES, POOR_DEFAULTS)
    if args["inpainting_fill"] >= len(FILLS):
        raise BadRequest(f"{title} inpainting_fill must be 0..3 ({', '.join(FILLS)}), got {args['inpainting_fill']}",
                         422)
    size = (body.width or DEFAULT_SIZE, body.height or DEFAULT_SIZE)
    if args["pixels"] >= min(size):
        raise BadRequest(f"{title} pixels ({args['pixels']}) must be below the width and height ({size[0]}x{size[1]}): "
                         "the tiles overlap by that much", 422)
    init = (await host.init_pictures(body))[0].convert("RGB")
    try:
        tiles = poor_mans_tiles(init, args["pixels"], args["mask_blur"], args["direction"], size)
    except OutpaintError as err:
        raise BadRequest(f"{title}: {err}", 422) from None
    seed, blur = fixed_seed(body.seed), (args["mask_blur"] * 2,) * 2
    bodies = [_outpaint_body(body, blur, args["inpainting_fill"], seed=seed + k, batch_size=1, n_iter=1,
                             width=size[0], height=size[1]) for k in range(len(tiles.work))]
    labels = [f"{title} tile {k + 1} of {len(bodies)}" for k in range(len(bodies))]
    drawn = await host.draw(bodies, labels, False, lambda k, _: Pictures((tiles.work[k][0].image,), *tiles.work[k][1:]))
    combined = tiles.combined([_picture(cell) if cell is not None else None for cell in drawn])
    images = [host.encode(combined, None)] if body.send_images else []
    done = [cell for cell in drawn if cell is not None]
    info = _script_info(done[0], done[-1], {}, seed=done[0].info["seed"])       # A1111's initial_seed / _info
    return {"images": images, "parameters": host.echo(body), "info": json.dumps(info)}


async def run_outpainting_mk2(host: ScriptHost, body: Any, mode: str) -> dict[str, Any]:
    """A1111 1.10's Outpainting mk2 (scripts/outpainting_mk_2.py, `sdlab.pipeline.outpainting_scripts`): for each
    of the request's `n_iter` batches, one inpainting pass per grown side (`Mk2Pass`) on the pictures the last one
    made, each of the request's batch size and seed; answered as its `Processed(p, images, ...)`: every batch's
    pictures (without parameters), first their grid when there are several; after an interrupt the pictures as
    far as their passes were drawn."""
    title = "outpainting mk2"
    args = _outpaint_args(title, body.script_args, MK2_ARG_NAMES, MK2_DEFAULTS)
    if args["color_variation"] > 1:
        raise BadRequest(f"{title} color_variation must be 0..1, got {args['color_variation']}", 422)
    init = (await host.init_pictures(body))[0].convert("RGB")
    process_size = (body.width or DEFAULT_SIZE, body.height or DEFAULT_SIZE)
    passes = mk2_passes(init.size, args["pixels"], args["mask_blur"], args["direction"], process_size)
    sizes = [init.size]                         # the pictures' size before each pass, and after the last
    for one in passes:
        try:
            one.check(sizes[-1])
        except OutpaintError as err:
            raise BadRequest(f"{title}: {err}; lower pixels or mask_blur, or raise width / height", 422) from None
        sizes.append(one.grown(sizes[-1]))
    bodies = [_outpaint_body(body, tuple(blur * 4 for blur in one.blur), 1, n_iter=1,
                             width=one.drawn_size(sizes[j])[0], height=one.drawn_size(sizes[j])[1])
              for _ in range(body.n_iter) for j, one in enumerate(passes)]
    labels = [f"{title} batch {k // len(passes) + 1} {passes[k % len(passes)].side} side" for k in range(len(bodies))]
    canvases: dict[int, list[Image.Image]] = {}

    def pictures_after(k: int, drawn: list[Drawn | None]) -> list[Image.Image]:
        """The batch's pictures after pass k (its canvases with that pass's pictures pasted in)."""
        j = k % len(passes)
        return passes[j].merged(canvases[k], [_picture(drawn[k], n) for n in range(len(canvases[k]))],
                                sizes[j])

    def pass_pictures(k: int, drawn: list[Drawn | None]) -> Pictures:
        j = k % len(passes)
        before = [init] * body.batch_size if j == 0 else pictures_after(k - 1, drawn)
        canvases[k] = passes[j].canvases(before, args["noise_q"], args["color_variation"])
        inits, mask, latent_mask = passes[j].inputs(canvases[k], sizes[j])
        return Pictures(tuple(inits), mask, latent_mask)

    drawn = await host.draw(bodies, labels, False, pass_pictures)
    finished = [max(k for k in range(i, i + len(passes)) if drawn[k] is not None)
                for i in range(0, len(bodies), len(passes)) if drawn[i] is not None]
    pictures = [picture for k in finished for picture in pictures_after(k, drawn)]
    images = [cell_picture(pictures)] + pictures if len(pictures) > 1 else pictures
    encoded = [host.encode(image, None) for image in images] if body.send_images else []
    done = [cell for cell in drawn if cell is not None]
    info = _script_info(done[0], done[-1], {}, seed=done[0].info["seed"])       # A1111's initial_seed / _info
    return {"images": encoded, "parameters": host.echo(body), "info": json.dumps(info)}


def poor_mans_script_args(img2img: bool) -> list[ScriptArg]:
    """A1111 1.10's Poor man's outpainting controls (`Script.ui`), in its `script_args` order."""
    return [ScriptArg("Pixels to expand", 128, 8, 256, 8), ScriptArg("Mask blur", 4, 0, 64, 1),
            ScriptArg("Masked content", "fill", choices=list(FILLS)),
            ScriptArg("Outpainting direction", list(DIRECTIONS), choices=list(DIRECTIONS))]


def mk2_script_args(img2img: bool) -> list[ScriptArg]:
    """A1111 1.10's Outpainting mk2 controls (`Script.ui`), in its `script_args` order (its HTML note first)."""
    return [ScriptArg(""), ScriptArg("Pixels to expand", 128, 8, 256, 8), ScriptArg("Mask blur", 8, 0, 64, 1),
            ScriptArg("Outpainting direction", list(DIRECTIONS), choices=list(DIRECTIONS)),
            ScriptArg("Fall-off exponent (lower=higher detail)", 1.0, 0.0, 4.0, 0.01),
            ScriptArg("Color variation", 0.05, 0.0, 1.0, 0.01)]


POOR_MANS_OUTPAINTING = SelectableScript("Poor man's outpainting", poor_mans_script_args, run_poor_mans_outpainting,
                                         ("img2img",))
OUTPAINTING_MK2 = SelectableScript("Outpainting mk2", mk2_script_args, run_outpainting_mk2, ("img2img",))


# ------------------------------------------------------------------------------------------------------
# The scripts sdlab runs


RUNNABLE_SCRIPTS: tuple[SelectableScript, ...] = (LOOPBACK, OUTPAINTING_MK2, POOR_MANS_OUTPAINTING, PROMPT_MATRIX,
                                                   PROMPTS_FROM_FILE, SD_UPSCALE, XYZ_PLOT)
"""The selectable scripts sdlab runs, each in its tabs, in the order `GET scripts` lists them (A1111's, by file name)."""
UNLISTED_NAMES = {"Comments": None, "Hypertile": "Hypertile"}
"""A1111's `script.name` of the always-on scripts whose name is not their lower-case title: Comments has no UI
controls (A1111 names only a script with some, `create_script_ui_inner`), Hypertile's class names itself."""


def selected_script(name: str | None, mode: str) -> SelectableScript | None:
    """A1111's `get_selectable_script`: none for an empty or null name, else the script of the `mode` tab titled
    `name` in any case; another name is A1111's 422 `Script '<name>' not found`."""
    if not name:
        return None
    for script in RUNNABLE_SCRIPTS:
        if script.title.lower() == name.lower() and mode in script.modes:
            return script
    raise BadRequest(f"Script '{name}' not found", 422)


def scripts_list() -> dict[str, list[str]]:
    """A1111's `get_scripts_list` of the scripts sdlab runs in each tab: their names (the title in lower case,
    but `UNLISTED_NAMES`), the selectable ones, then the always-on ones `alwayson_scripts` takes, then the
    ControlNet extension's and Forge's FreeU Integrated and PerturbedAttentionGuidance Integrated."""
    return {mode: [script.title.lower() for script in RUNNABLE_SCRIPTS if mode in script.modes]
            + [name for title in ALWAYSON_SCRIPTS[mode] if (name := UNLISTED_NAMES.get(title, title.lower()))]
            + [CONTROLNET, FREEU, PAG] for mode in MODES}


def script_args(script: SelectableScript, img2img: bool,
                upscalers: Sequence[str] = PLAIN_UPSCALER_NAMES) -> list[ScriptArg]:
    """`script`'s `ScriptInfo.args` in txt2img or img2img; SD upscale's upscaler choices the server's `upscalers`
    (the only choices A1111 takes from server state: the others are fixed lists, the X/Y/Z values dropdowns empty
    until an axis is picked)."""
    return sd_upscale_script_args(img2img, upscalers) if script is SD_UPSCALE else script.args(img2img)


def script_info(upscalers: Sequence[str] = PLAIN_UPSCALER_NAMES) -> list[dict[str, Any]]:
    """A1111's `get_script_info` of the selectable scripts sdlab runs: each one's `ScriptInfo` in txt2img, then
    in img2img (`script_args`)."""
    return [{"name": script.title.lower(), "is_alwayson": False, "is_img2img": img2img,
             "args": [vars(arg) for arg in script_args(script, img2img, upscalers)]}
            for img2img in (False, True) for script in RUNNABLE_SCRIPTS if MODES[img2img] in script.modes]
