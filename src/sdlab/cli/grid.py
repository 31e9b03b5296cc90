"""`sdlab grid`: an X/Y/Z plot as A1111's script draws it, one labelled PNG.

    sdlab grid "a red apple" --x steps=10,20,30 --y "sampler=Euler,DPM++ 2M" --out grid.png
    sdlab grid "a red apple" --x "cfg=3-9 (+2)" --y seed=1-4 --z "prompt_sr=apple,pear" --out grid.png
    sdlab grid "a cat" --init photo.png --x denoise=0.3,0.5,0.7 --out grid.png --keep-cells cells/
    sdlab grid "a cat" --hr-scale 2 --x "Denoising=0.3,0.5" --y "Hires upscaler=Latent,Lanczos" --out grid.png
    sdlab grid "a cat|red|in the snow|at night" --prompt-matrix --out matrix.png --keep-cells cells/

--prompt-matrix draws A1111's Prompt matrix instead of axes (`sdlab.pipeline.prompt_matrix`): a picture for
every combination of the prompt's `|` parts (of --negative's with --matrix-negative), joined with ", " (or " "
with --matrix-join space), the first part last with --matrix-at-start, all on one seed (seed + n with
--matrix-random-seeds), in A1111's order and legend; the grid carries the first picture's parameters, as A1111's.

Every other option is txt2img's (img2img's with --init), defined once for both (`cli/generate.py`), and sets
every cell unless an axis sets it; a cell is exactly the picture `sdlab txt2img` draws with its settings, or
with --batch / --batch-count its pictures, shown as A1111's batch grid. --from-png and --models-dir, which
redraw one picture, are not the grid's. Without --seed (or a seed axis) one random seed serves every cell,
and one random variation seed (for --subseed-strength or a Var. strength axis), as does each -1 of a Seed or
Var. seed axis; --keep-random-seeds (A1111's Keep -1 for seeds) leaves them random in each cell. A Denoising axis is
img2img's strength with --init, else the hires fix's denoise (A1111's denoising_strength); an hr_denoise axis
is the hires fix's alone, and hires axes are refused with --init. Axes, values and
ranges are checked before the model loads (`sdlab.pipeline.grid`); every cell's request before the first is
drawn. Each cell applies and records the <lora:...> tags of its own prompt (after Prompt S/R), and draws with
the preset one of them names as txt2img would (--preset, or the model's, wins). The grid
carries the parameters of its first cell and A1111's plot fields (Script: X/Y/Z plot, X Type, X Values,
Fixed X Values for a Seed or Var. seed axis, ...);
--keep-cells also writes each cell's pictures with their own. Everything is written at the end, all or
nothing; the folders it goes to (--out's and --keep-cells) are checked before the model loads, and made only
then.

A1111's model axes draw each cell as `sdlab txt2img --model M --vae V --refiner R --refiner-switch S` with the grid's
other options (`CellModel`; its LoRAs found as that run finds them, `_Loras`): a Checkpoint name is a checkpoint file or
diffusers folder (as --model takes it), a VAE None (the checkpoint's own: --no-sidecar-vae), Automatic (its sidecar
<name>.vae.* where there is one: txt2img's default) or a VAE file, a Refiner checkpoint None (no refiner) or a refiner
file, a Refiner switch at the switch; what no axis sets is --model's, --vae's, --refiner's. Every model is checked
before any loads, without reading a weight (a missing or unreadable file, a VAE or refiner that does not fit its
checkpoint, a refiner with the hires fix, a Refiner switch at axis no cell's refiner reads; and the checks a loaded
model makes of its cells, but memory: clip skip, a --lora or LoRA tag made for another model, on its networks built on
the meta device). One checkpoint is held at a time and the cells are drawn in A1111's order (the costliest axis,
Checkpoint name, outermost) with each model's cells kept together, so that each checkpoint loads once (a refiner once
for each checkpoint it refines); another VAE, refiner or switch of the same checkpoint reads only those. Memory is
checked on a model's cells once it is loaded, before they draw.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

from sdlab.cli.errors import UserError, utf8_text, write_error
from sdlab.utils.files import check_output_folder, make_output_folder


def add_grid(subparsers: argparse._SubParsersAction) -> None:
    from sdlab.cli.generate import (
        _add_hires_flags, _add_init_flags, _add_model_flags, _add_run_flags, _add_sampling_flags,
        _add_second_prompt_flags, add_style_flags,
    )

    help_text = "draw an X/Y/Z plot: one labelled grid of pictures over up to three request fields"
    p = subparsers.add_parser("grid", help=help_text, description=f"{help_text}. {OPTIONS_TEXT}")
    p.add_argument("prompt", type=utf8_text("the prompt"), help="the prompt (A1111 syntax)")
    for axis in ("x", "y", "z"):
        p.add_argument(f"--{axis}", type=utf8_text(f"--{axis}"), metavar="FIELD=V1,V2,...",
                       help=f"{axis.upper()} axis: an A1111 axis type (Seed, Var. seed, Steps, CFG Scale, Sampler, "
                            "Schedule type, Denoising, Hires steps, Eta, Sigma Churn, Prompt S/R, Prompt order, "
                            "Checkpoint name, VAE, Refiner checkpoint, ... any case) or a short name (cfg, denoise, "
                            "prompt_sr, model), with values or A1111 ranges (1-5, 1-10 (+2), 10-20 [3]); a Checkpoint "
                            "name, VAE or Refiner checkpoint value is a file (VAE: or None, Automatic)")
    p.add_argument("--out", required=True, help="the grid picture (.png, .jpg, .webp)")
    p.add_argument("--keep-cells", metavar="DIR", help="also write each cell's pictures, with their own parameters, "
                                                       "to DIR")
    p.add_argument("--no-legend", action="store_true", help="draw the cells alone, without axis labels (A1111's Draw "
                                                            "legend off)")
    p.add_argument("--margin", type=int, default=0, metavar="PX",
                   help="white pixels between the pictures (A1111's Grid margins, 0..500; default 0)")
    p.add_argument("--prompt-matrix", action="store_true",
                   help="A1111's Prompt matrix instead of axes: a picture for every combination of the prompt's "
                        "`|`-separated parts after the first")
    p.add_argument("--matrix-negative", action="store_true",
                   help="--prompt-matrix splits --negative instead of the prompt (A1111's Prompt type negative)")
    p.add_argument("--matrix-at-start", action="store_true",
                   help="--prompt-matrix puts the first part after the others (A1111's Set at prompt start)")
    p.add_argument("--matrix-join", choices=("comma", "space"),
                   help="how --prompt-matrix joins the parts: \", \" (comma, the default) or \" \" (A1111's "
                        "Joining char)")
    p.add_argument("--matrix-random-seeds", action="store_true",
                   help="--prompt-matrix's picture n draws seed + n (A1111's Random seeds; default: all one seed)")
    p.add_argument("--keep-random-seeds", action="store_true",
                   help="A1111's Keep -1 for seeds: an unset or -1 seed, and a -1 in a Seed or Var. seed axis, stays "
                        "random in each cell (default: drawn once for the whole grid)")
    p.add_argument("--negative", "--negative-prompt", dest="negative", type=utf8_text("--negative"),
                   help="negative prompt (diffusers' and A1111's negative_prompt)")
    _add_second_prompt_flags(p, from_png=False)
    _add_model_flags(p, from_png=False)
    _add_sampling_flags(p, from_png=False, init=True)
    _add_run_flags(p, from_png=False)
    add_style_flags(p, from_png=False)
    _add_hires_flags(p, from_png=False)
    _add_init_flags(p, "init image: every cell is an img2img of it", "0.75", from_png=False)
    p.set_defaults(run=run_grid, from_png=None)


OPTIONS_TEXT = ("The options after the axes are txt2img's (img2img's with --init) and set every cell unless an axis "
                "sets it; without --seed one random seed serves every cell (--keep-random-seeds: each its own). "
                "--from-png and --models-dir, which "
                "redraw one picture, are not the grid's.")


MAX_MARGIN = 500        # A1111's Grid margins slider


def _prompt_matrix(args: argparse.Namespace):
    """--prompt-matrix as a `PromptMatrix`; errors (axes, batches, kept random seeds) before any work."""
    from sdlab.pipeline.grid import GridError
    from sdlab.pipeline.prompt_matrix import prompt_matrix

    given = [flag for flag, value in (("--x", args.x), ("--y", args.y), ("--z", args.z),
                                      ("--keep-random-seeds", args.keep_random_seeds),
                                      ("--no-legend", args.no_legend)) if value]
    if given:
        raise UserError(f"{', '.join(given)}: not --prompt-matrix's, which draws every combination of the prompt's "
                        "parts on one fixed seed, with its legend (as A1111's)")
    if (args.batch or 1) != 1 or args.batch_count != 1:
        raise UserError("--prompt-matrix draws one picture for each combination: --batch and --batch-count are not "
                        "its")
    if args.matrix_negative and not args.negative:
        raise UserError("--matrix-negative splits --negative: give one with `|`-separated parts")
    options = {"prompt": args.prompt, "negative_prompt": args.negative}
    try:
        return prompt_matrix(options, "negative" if args.matrix_negative else "positive", args.matrix_at_start,
                             args.matrix_join or "comma", args.matrix_random_seeds, args.margin)
    except GridError as err:
        raise UserError(str(err)) from None


def _plot(args: argparse.Namespace):
    """The axes given as a `Plot` (or --prompt-matrix's `PromptMatrix`); errors before any work."""
    from sdlab.pipeline.grid import GridError, Plot, cell_count, parse_axis

    if not 0 <= args.margin <= MAX_MARGIN:
        raise UserError(f"--margin must be 0 to {MAX_MARGIN} pixels, got {args.margin}")
    if args.prompt_matrix:
        return _prompt_matrix(args)
    matrix_flags = [flag for flag, value in (("--matrix-negative", args.matrix_negative), ("--matrix-at-start",
                    args.matrix_at_start), ("--matrix-join", args.matrix_join),
                    ("--matrix-random-seeds", args.matrix_random_seeds)) if value]
    if matrix_flags:
        raise UserError(f"{', '.join(matrix_flags)}: give --prompt-matrix")
    if args.x is None:
        if args.y is not None or args.z is not None:
            raise UserError("give the first axis as --x (then --y, --z)")
        raise UserError("a grid needs at least one axis: --x FIELD=V1,V2,... (e.g. --x steps=10,20)")
    try:
        axes = {letter: parse_axis(getattr(args, letter)) for letter in "xyz" if getattr(args, letter) is not None}
        cell_count(list(axes.values()))
    except GridError as err:
        raise UserError(str(err)) from None
    hires_axes = [axis.field.name for axis in axes.values() if axis.field.name.startswith("hr_")]
    if args.init and hires_axes:
        raise UserError(_no_hires_on_init(hires_axes))
    hires = args.hr_scale is not None or args.hr_size is not None
    if not args.init and not hires and any(axis.field.name == "strength" for axis in axes.values()):
        raise UserError("a Denoising axis needs --init IMAGE (img2img's strength) or the hires fix (--hr-scale / "
                        "--hr-size: its second pass's denoise)")
    return Plot(**axes, legend=not args.no_legend, keep_random_seeds=args.keep_random_seeds, margin=args.margin)


@contextlib.contextmanager
def _quiet_size_warnings(*more: str) -> Iterator[None]:
    """The checks below resolve each cell once more than the draw does: its size warnings (and the loggers named
    `more`'s) are said once, there."""
    loggers = [logging.getLogger(name) for name in ("sdlab.pipeline.images", *more)]
    before = [logger.disabled for logger in loggers]
    for logger in loggers:
        logger.disabled = True
    try:
        yield
    finally:
        for logger, disabled in zip(loggers, before):
            logger.disabled = disabled


def _check_requests(cells, plot, batch_count: int) -> None:
    """Every cell's request through the model-free checks (`request.resolve`, the seeds of its --batch-count
    batches) before anything loads, and a UniPC Order axis where no cell runs A1111's UniPC."""
    from sdlab.pipeline.grid import GridError, check_unipc_order_axis
    from sdlab.pipeline.request import GenerationRequest, RequestError, check_batch_seeds, resolve

    requests = []
    for index, options in cells:
        try:
            with _quiet_size_warnings():
                resolved = resolve(GenerationRequest(**options), default_size=64, default_sampler="Euler",
                                   default_schedule="karras", factor=8)
            check_batch_seeds(resolved, batch_count)
        except RequestError as err:
            raise UserError(f"the grid cell {', '.join(plot.labels(index))}: {err}") from None
        requests.append(resolved)
    try:
        check_unipc_order_axis(plot, requests)
    except GridError as err:
        raise UserError(str(err)) from None


def _output_files(args: argparse.Namespace) -> None:
    """The grid's file type and folders, checked before any work (folders are made only when writing)."""
    from sdlab.pipeline.png_info import IMAGE_SUFFIXES, image_format

    if image_format(args.out) is None:
        raise UserError(f"--out {args.out!r}: sdlab writes {', '.join(IMAGE_SUFFIXES)} files; name one of these")
    if os.path.isdir(args.out):
        raise UserError(f"--out {args.out!r} is a folder; name the grid's file")
    for folder, name in _output_folders(args).items():
        check_output_folder(folder, name)


def _output_folders(args: argparse.Namespace) -> dict[Path, str]:
    """The folders the grid (and `--keep-cells`) writes to, each with how an error names it."""
    folders = {Path(args.out).parent: "the folder of --out"}
    if args.keep_cells:
        folders[Path(args.keep_cells)] = "--keep-cells"
    return folders


def _cells(plot, options: dict, preset_for, mode: str, default_steps: int | None, styles) -> list:
    """Each cell's request options, prompts as typed: the axes over the options given, then the settings of the
    cell's preset (`preset_for(cell prompt)`: --preset's, or the one the model or a LoRA of the cell's own prompt
    names, as txt2img finds it; None: none) under the cell's, as txt2img puts them under its options, so that the
    preset's eta goes with the cell's sampler (TCD's gamma is no other's). The axes start from the steps the cell
    draws without a Steps axis (--steps, else its preset's, else `default_steps`, the model's; None before it
    loads: unset), as A1111's from its steps, which a UniPC Order axis holds its order under. A cell an axis
    cannot apply to (a Prompt S/R whose word is gone) is an error before any work. Each cell's `styles` (--style's,
    then a Styles axis's) are applied to its prompts once the axes have set them, as A1111's `setup_prompts`."""
    from sdlab.cli.generate import _with_model_preset
    from sdlab.pipeline.grid import GridError, styled_cells

    def cells_of(given: dict) -> list:
        return styled_cells(plot.cells(given), styles, "no --styles-file has")

    def from_steps(preset: str | None) -> dict:
        """Every cell's options, the axes applied over the steps a cell of `preset` starts from."""
        steps = _with_model_preset(options, preset, mode).get("steps")
        return dict(cells_of({**options, "steps": default_steps if steps is None else steps}))

    try:
        presets = {index: preset_for(cell["prompt"]) for index, cell in cells_of(options)}  # the axes set prompts
        by_preset = {preset: from_steps(preset) for preset in set(presets.values())}
    except GridError as err:
        raise UserError(str(err)) from None
    return [(index, _with_model_preset(_found_upscaler(by_preset[preset][index]), preset, mode))
            for index, preset in presets.items()]


def _found_upscaler(cell: dict) -> dict:
    """A Hires upscaler axis's value as --hr-upscaler takes it: a name, a file, or a file's stem here."""
    from sdlab.pipeline.hires import find_upscaler

    if cell.get("hr_upscaler") is None:
        return cell
    return {**cell, "hr_upscaler": find_upscaler(cell["hr_upscaler"], [Path(".")])}


class _Loras:
    """The LoRAs as `sdlab txt2img --model M` finds them for a checkpoint M's cells (`flags`: its txt2img flags,
    `CellModel.flags`), in its LoRA folders (`_lora_search_dirs`: --lora-dir, then A1111's models/Lora beside M):
    `find`, its `_lora_finder`; `files`, the --lora files merged at load; and each cell prompt's LoRAs (`prompt`)."""

    def __init__(self, flags: argparse.Namespace) -> None:
        from sdlab.cli.generate import _lora_finder, _parse_lora

        self.flags, self.find = flags, _lora_finder(flags)
        self.files = [_parse_lora(spec, self.find) for spec in flags.lora]
        self._prompts: dict[str, tuple] = {}

    def prompt(self, typed: str) -> tuple:
        """A cell prompt (as typed, after Prompt S/R) -> `_resolve_loras`' (prompt for the pipeline, `LoraRef`s,
        prompt to record): a cell applies and records the `<lora:...>` tags of its own prompt, as A1111 draws and
        records each cell (an S/R may add, remove or swap a tag)."""
        from sdlab.cli.generate import _resolve_loras

        if typed not in self._prompts:
            for_pipeline, _, refs, to_record = _resolve_loras(self.flags, typed, {}, self.find)
            self._prompts[typed] = (for_pipeline, refs, to_record)
        return self._prompts[typed]

    def hires_options(self, options: dict) -> dict:
        """`options` with the hires prompt the second pass draws with the --lora files merged at load
        (`drawn_hires_prompt`), as txt2img's."""
        from sdlab.pipeline.infotext import drawn_hires_prompt

        if not options.get("hr_prompt"):
            return options
        merged = {Path(path).stem: weight for path, weight in self.files}
        return {**options, "hr_prompt": drawn_hires_prompt(options["hr_prompt"], merged)}


def _cell_loras(args: argparse.Namespace, models: dict) -> dict:
    """Each checkpoint (`CellModel.model`) -> its `_Loras`, one for the checkpoints of one set of LoRA folders."""
    from sdlab.cli.generate import _lora_search_dirs

    by_folders: dict[tuple, _Loras] = {}
    by_checkpoint: dict = {}
    for model in models.values():
        if model.model not in by_checkpoint:
            flags = model.flags(args)
            folders = tuple(map(tuple, _lora_search_dirs(flags)))
            if folders not in by_folders:
                by_folders[folders] = _Loras(flags)
            by_checkpoint[model.model] = by_folders[folders]
    return by_checkpoint


def _for_pipeline(cells, loras_of) -> list:
    """`cells` as requests: each prompt as the pipeline takes it (`loras_of(index)`: the cell's `_Loras`; tags of
    `--lora` files left out), without the model a model axis set (`CellModel`); a missing LoRA is an error."""
    from sdlab.pipeline.grid import MODEL_FIELDS

    return [(index, {**{key: value for key, value in cell.items() if key not in MODEL_FIELDS},
                     "prompt": loras_of(index).prompt(cell["prompt"])[0]}) for index, cell in cells]


@dataclass(frozen=True)
class CellModel:
    """What a cell draws with, as txt2img's flags say it: --model (None: the shipped model), --vae, the sidecar VAE
    or not (--no-sidecar-vae), --refiner and --refiner-switch."""

    model: str | None
    vae: str | None
    sidecar_vae: bool
    refiner: str | None
    refiner_switch: float | None

    def flags(self, args: argparse.Namespace) -> argparse.Namespace:
        """`args` with this model's flags: the txt2img run the cell is a picture of."""
        flags = copy.copy(args)
        flags.model, flags.vae, flags.sidecar_vae = self.model, self.vae, self.sidecar_vae
        flags.refiner, flags.refiner_switch = self.refiner, self.refiner_switch
        return flags


def _cell_model(args: argparse.Namespace, cell: dict) -> CellModel:
    """The model a cell draws with: the grid's --model, --vae, --refiner and --refiner-switch, but where its model
    axes set them: a Checkpoint name's file or folder; a VAE None (the checkpoint's own, --no-sidecar-vae), Automatic
    or auto (txt2img's default: the sidecar <name>.vae.* where there is one) or a file (A1111's `find_vae` names, any
    case); a Refiner checkpoint None (none) or a file; a Refiner switch at."""
    vae, sidecar_vae, refiner = args.vae, args.sidecar_vae, args.refiner
    if "vae" in cell:
        named = cell["vae"].lower()
        vae = None if named in ("none", "auto", "automatic") else cell["vae"]
        sidecar_vae = named != "none"
    if "refiner" in cell:
        refiner = None if cell["refiner"].lower() == "none" else _file_of_title(cell["refiner"])
    checkpoint = _file_of_title(cell["checkpoint"]) if "checkpoint" in cell else args.model
    return CellModel(checkpoint, vae, sidecar_vae, refiner, cell.get("refiner_switch", args.refiner_switch))


def _file_of_title(value: str) -> str:
    """A checkpoint axis value as A1111 lists checkpoints, its title 'name.safetensors [6ce0161689]' (the file and
    its short hash): the file, where `value` names none and the value without its ' [hash]' does (A1111's
    `get_closet_checkpoint_match` strips the checksum the same way); any other value as it is."""
    from sdlab.pipeline.png_info import without_checksum

    bare = without_checksum(value)
    return bare if bare != value and not os.path.exists(value) and os.path.exists(bare) else value


def _model_path(model: CellModel) -> str | Path:
    """The checkpoint a cell's model loads (txt2img's without --model: the shipped one)."""
    from sdlab.api import shipped_model_path

    path = model.model or shipped_model_path()
    if path is None:
        raise UserError("no --model given and this sdlab install has no built-in model; pass --model PATH")
    return path


def _check_models(args: argparse.Namespace, plot, cells, models: dict) -> dict:
    """Every model of a grid with model axes checked before any loads, no weight read (`plan_checkpoint`, as a
    load plans it): each checkpoint with its VAE, each refiner with its VAE and against its checkpoint's latent
    space (the check a run makes of both loaded, `plan._check_refiner_fits`); a refiner with the hires fix, which do
    not run together; a Refiner switch at axis that no cell's refiner reads. Returns each `CellModel`'s (checkpoint,
    refiner or None) as `meta_bundle`s, for the checks of `_CellDrawing.check`."""
    from sdlab.checkpoints.errors import CheckpointError
    from sdlab.checkpoints.load import meta_bundle, plan_checkpoint
    from sdlab.pipeline.plan import _check_refiner_fits
    from sdlab.pipeline.request import GenerationRequest, RequestError

    planned: dict[tuple, object] = {}

    def planned_bundle(where: str, path, vae, sidecar_vae: bool, **overrides):
        """The model's `meta_bundle`, from its plan (cached)."""
        key = (str(path), vae, sidecar_vae)
        if key not in planned:
            try:
                planned[key] = meta_bundle(plan_checkpoint(path, vae=vae, sidecar_vae=sidecar_vae, **overrides))
            except CheckpointError as err:
                raise UserError(f"{where}: {err}") from None
        return planned[key]

    bundles = {}
    for index, cell in cells:
        model, where = models[index], f"the grid cell {', '.join(plot.labels(index))}"
        base = planned_bundle(where, _model_path(model), model.vae, model.sidecar_vae, family=args.family,
                              prediction=args.prediction)
        refiner = None if model.refiner is None else planned_bundle(where, model.refiner, model.vae,
                                                                    model.sidecar_vae)
        bundles[model] = base, refiner
        if refiner is None:
            continue
        if GenerationRequest(**cell).hires:
            raise UserError(f"{where}: the hires fix does not run with an SDXL refiner; leave one of them out")
        try:
            _check_refiner_fits(base, refiner)
        except RequestError as err:
            raise UserError(f"{where}: the refiner {model.refiner}: {err}") from None
    if any(axis.field.name == "refiner_switch" for _, axis in plot.axes()) and \
            all(model.refiner is None for model in models.values()):
        raise UserError("a Refiner switch at axis sets where the refiner takes over, and no cell has one: give "
                        "--refiner FILE or a Refiner checkpoint axis")
    return bundles


def _meta_pipeline(bundles: tuple, model: CellModel, args: argparse.Namespace, loras: _Loras):
    """The pipeline `HeldModel` loads for `model`, on its `meta_bundle`s (checkpoint, refiner): the --lora files
    merged at load checked against its layers (shapes only), its preset theirs where the checkpoint names none, as
    `api.load` sets it."""
    from dataclasses import replace

    from sdlab.api import Pipeline
    from sdlab.checkpoints.errors import CheckpointError
    from sdlab.checkpoints.lora import bundle_lora_weights, load_lora_file, lora_preset
    from sdlab.cli.generate import _refiner_handoff

    base, refiner = bundles
    for path, weight in loras.files:
        try:
            bundle_lora_weights(base, path, load_lora_file(path), weight, weight)
        except CheckpointError as err:
            raise UserError(f"the checkpoint {_model_path(model)}: {err}") from None
    if base.preset is None:
        base = replace(base, preset=next(filter(None, (lora_preset(path) for path, _ in loras.files)), None))
    switch, convention = _refiner_handoff(model.flags(args), {})
    return Pipeline(base, refiner, switch, refiner_convention=convention, find_lora=loras.find)


def _loading_order(plot, models: dict) -> list:
    """The cells in A1111's order (`Plot.drawing_order`) with each checkpoint's cells together, and within them
    each refiner's and each VAE's, each where it first comes (a stable sort): a model loads once, also where A1111's
    order alternates two (Checkpoint name and Refiner checkpoint cost the same)."""
    order = plot.drawing_order()

    def rank(of):
        first: dict = {}
        for index in order:
            first.setdefault(of(models[index]), len(first))
        return lambda index: first[of(models[index])]

    ranks = [rank(lambda m: m.model), rank(lambda m: m.refiner), rank(lambda m: (m.vae, m.sidecar_vae))]
    return sorted(order, key=lambda index: tuple(r(index) for r in ranks))


class HeldModel:
    """The one model in memory (as A1111's one checkpoint loaded at a time): the pipeline of a cell's `CellModel`,
    loaded as txt2img loads it with those flags; from the model before it only what changes is read (a checkpoint
    all of it, the previous one let go first; the same checkpoint's VAE, refiner or switch those alone)."""

    def __init__(self, args: argparse.Namespace, loras: dict) -> None:
        self.args, self.loras = args, loras                     # each checkpoint's `_Loras`
        self.model: CellModel | None = None
        self.pipe = None

    def pipeline(self, model: CellModel):
        from sdlab.cli.generate import _free_memory, _load_pipeline

        if self.model is None or model.model != self.model.model:
            self.model = self.pipe = None
            _free_memory()
            loras = self.loras[model.model]
            self.pipe, _ = _load_pipeline(model.flags(self.args), _model_path(model), loras.files, loras.find)
        else:
            self._change(model)
        self.model = model
        return self.pipe

    def _change(self, model: CellModel) -> None:
        """The held checkpoint with `model`'s VAE, refiner and switch (`Pipeline.with_vae`, `load_refiner`)."""
        from sdlab.api import load_refiner
        from sdlab.cli.generate import _free_memory, _refiner_handoff
        from sdlab.utils.compile import compile_module

        before, flags = self.model, model.flags(self.args)
        new_refiner = model.refiner != before.refiner
        if new_refiner and self.pipe.refiner is not None:
            self.pipe = self.pipe.with_refiner(None)
            _free_memory()
        if (model.vae, model.sidecar_vae) != (before.vae, before.sidecar_vae):
            self.pipe = self.pipe.with_vae(model.vae, sidecar_vae=model.sidecar_vae)      # the refiner's too
        refiner = self.pipe.refiner
        if new_refiner and model.refiner is not None:
            refiner = load_refiner(model.refiner, self.pipe.bundle, self.pipe.embeddings, model.sidecar_vae,
                                   model.vae)
            if getattr(flags, "compile", False):
                compile_module(refiner.unet)
        self.pipe = self.pipe.with_refiner(refiner, *_refiner_handoff(flags, {}))


def _no_hires_on_init(names: list[str]) -> str:
    """The refusal of hires flags / axes `names` on a grid with --init: its img2img cells are drawn without a hires
    fix (A1111's is txt2img's; ComfyUI's img2img two-pass is sdlab img2img's, not the grid's)."""
    return (f"{', '.join(names)}: a grid with --init draws img2img cells without a hires fix (ComfyUI's img2img "
            "two-pass: sdlab img2img --hr-convention comfyui)")


def _check_hires(args: argparse.Namespace) -> None:
    """A grid with --init draws img2img cells, which it draws without a hires fix (`_no_hires_on_init`)."""
    from sdlab.cli.generate import _HIRES_FLAGS

    given = ["--" + name.replace("_", "-") for name in _HIRES_FLAGS if getattr(args, name) is not None]
    if args.init and given:
        raise UserError(_no_hires_on_init(given))


def _image_names(number: int, index, count: int) -> list[str]:
    """--keep-cells' file names of the `count` pictures of cell `number` at `index` (x, y, z); a batch adds
    -0, -1, ... as txt2img's --out does."""
    stem = f"{number:03d}-x{index[0]}-y{index[1]}-z{index[2]}"
    return [f"{stem}.png"] if count == 1 else [f"{stem}-{m}.png" for m in range(count)]


def _check_lora_fits(bundle, request, find) -> None:
    """The LoRAs of a resolved `request`'s tags (its hires prompt's too), found by `find`, against `bundle`'s layers
    (`bundle_lora_weights`, shapes only): a RequestError as `Pipeline.run`'s names one that does not fit."""
    from sdlab.checkpoints.errors import CheckpointError
    from sdlab.checkpoints.lora import bundle_lora_weights
    from sdlab.pipeline.prompt_loras import read_lora, resolve_prompt_loras
    from sdlab.pipeline.request import RequestError

    prompts = [request.prompt, *([request.hr_prompt] if request.hires and request.hr_prompt else [])]
    for use in (use for prompt in prompts for use in resolve_prompt_loras(prompt, find)[1]):
        try:
            bundle_lora_weights(bundle, use.path, read_lora(use.path), use.te_weight, use.unet_weight)
        except CheckpointError as err:
            raise RequestError(f"LoRA {use.name or use.path}: {err}") from None


class _CellDrawing:
    """The grid's cells drawn model by model (`draw`): each cell's request set up for the model drawing it (its
    preset and steps) and checked with it before the first of them draws (`check`: the same checks but memory,
    before any model loads), drawn as txt2img draws it, and its pictures' parameters as txt2img records them
    (`results`, `texts`: per cell, each batch's, each picture's)."""

    def __init__(self, args: argparse.Namespace, plot, options: dict, styles, loras: dict) -> None:
        self.args, self.plot, self.options, self.styles = args, plot, options, styles
        self.loras = loras                                      # each checkpoint's `_Loras`
        self.bar = None                                         # the progress bar, once the checks have passed
        self.results: dict = {}
        self.texts: dict = {}

    def _requests(self, pipe, model: CellModel, indices: set) -> tuple[list, list]:
        """The cells at `indices` set up for `pipe`, the pipeline of `model` (their preset and steps): prompts as
        typed, and as requests (`_for_pipeline`) through the model-free checks."""
        args, loras = self.args, self.loras[model.model]

        def preset_for(prompt: str) -> str | None:
            """A cell's preset as txt2img's: --preset's, else the one the model or a LoRA of its prompt names."""
            return args.preset or pipe.preset_for(loras.prompt(prompt)[0])

        typed = [(index, cell) for index, cell in _cells(self.plot, loras.hires_options(self.options), preset_for,
                                                         args.mode, pipe.bundle.family.default_steps, self.styles)
                 if index in indices]                                                         # the model's steps
        cells = _for_pipeline(typed, lambda index: loras)
        _check_requests(cells, self.plot, args.batch_count)
        return typed, cells

    def check(self, pipe, model: CellModel, indices: set) -> None:
        """The checks `draw` makes of the cells at `indices` with the loaded model, on `pipe` (`_meta_pipeline`: no
        weight read), but memory: each request against the checkpoint and its refiner (clip skip: `resolve_for`,
        `_check_model`) and its LoRA tags' fit (`_check_lora_fits`); an error names the cell."""
        from sdlab.pipeline.plan import _check_model, resolve_for
        from sdlab.pipeline.request import GenerationRequest, RequestError

        _, cells = self._requests(pipe, model, indices)
        for index, cell in cells:
            try:
                with _quiet_size_warnings("sdlab.pipeline.plan", "sdlab.checkpoints.lora"):   # said by the draw
                    request = resolve_for(pipe.bundle, GenerationRequest(**cell))
                    if pipe.refiner is not None:
                        _check_model(pipe.refiner, request, None, "the refiner")
                    _check_lora_fits(pipe.bundle, request, self.loras[model.model].find)
            except RequestError as err:
                raise UserError(f"the grid cell {', '.join(self.plot.labels(index))}: {err}") from None

    def draw(self, pipe, model: CellModel, indices: set) -> None:
        """The cells at `indices` drawn with `pipe`, the pipeline of `model`."""
        from sdlab.cli.generate import _identify_model, _refiner_ref
        from sdlab.pipeline.grid import cell_batches
        from sdlab.pipeline.infotext import hires_tag_refs, to_parameters
        from sdlab.pipeline.png_info import embedding_hash, lora_hash, vae_ref
        from sdlab.pipeline.request import GenerationRequest, RequestError

        args, loras = self.args, self.loras[model.model]

        def run(request: GenerationRequest):
            """One batch of a cell, as `sdlab txt2img` draws it."""
            result = pipe.run(request)
            if self.bar is not None:
                self.bar.update(1)
            return result

        typed, cells = self._requests(pipe, model, indices)
        try:
            for _, cell in cells:                                # the model's checks too (clip skip, memory)
                with _quiet_size_warnings():
                    pipe.resolve(GenerationRequest(**cell))
            drawn = {index: cell_batches(run, cell, args.batch_count) for index, cell in cells}
        except RequestError as err:
            raise UserError(str(err)) from None
        name, hash_ = _identify_model(_model_path(model))
        vae, refiner = vae_ref(pipe.bundle.report), _refiner_ref(model.flags(args), pipe)
        for index, cell in typed:
            _, refs, to_record = loras.prompt(cell["prompt"])
            self.texts[index] = [
                to_parameters(result.request, index=i, model_name=name, model_hash=hash_, loras=refs,
                              prompt=to_record, vae=vae, refiner=refiner if result.refined else None,
                              embeddings=[(e.name, embedding_hash(e.path))
                                          for e in pipe.embeddings_used(result.request)],
                              hires_loras=hires_tag_refs(result.request, loras.find, lora_hash),
                              family=pipe.bundle.family)
                for result in drawn[index] for i in range(len(result.images))]
        self.results.update(drawn)


def run_grid(args: argparse.Namespace) -> int:
    from sdlab.cli.generate import _controls, _ip_adapters, _open_image, _options_from_args, styles_of
    from sdlab.pipeline.grid import MODEL_FIELDS, cell_picture, fix_seeds, with_plot_parameters
    from sdlab.pipeline.png_info import encode_image, format_parameters, image_format, write_files_all_or_nothing
    from sdlab.pipeline.request import GenerationRequest

    args.mode = "img2img" if args.init else "txt2img"
    _output_files(args)
    _check_hires(args)
    plot = _plot(args)
    options = _options_from_args(args, {}, with_preset=False)      # the preset goes under each cell's (`_cells`)
    styles = styles_of(args)
    if not plot.keep_random_seeds:
        options = fix_seeds(options)                     # one seed and variation seed for every cell, as A1111
    if args.init:
        options["init_image"] = _open_image(args.init, "init image")
    controls = _controls(args, {}, options.get("control_convention", GenerationRequest.control_convention))
    if controls:
        options["controls"] = controls
    ip_adapters = _ip_adapters(args, {}, options.get("control_convention", GenerationRequest.control_convention))
    if ip_adapters:
        options["ip_adapters"] = ip_adapters
    options["styles"] = tuple(args.style)                # applied in each cell, after its axes (`_cells`)
    typed = _cells(plot, options, lambda prompt: args.preset, args.mode, None, styles)    # each cell's LoRAs
    models = {index: _cell_model(args, cell) for index, cell in typed}
    loras = _cell_loras(args, models)                    # as txt2img --model M finds them, each cell's checkpoint's
    cells = _for_pipeline(typed, lambda index: loras[models[index].model])
    _check_requests(cells, plot, args.batch_count)
    drawing = _CellDrawing(args, plot, options, styles, loras)
    by_model = [(model, set(indices)) for model, indices in groupby(_loading_order(plot, models),
                                                                     key=models.__getitem__)]
    if any(axis.field.name in MODEL_FIELDS for _, axis in plot.axes()):
        bundles = _check_models(args, plot, cells, models)
        for model, indices in by_model:                  # the loaded models' checks, before the first loads
            drawing.check(_meta_pipeline(bundles[model], model, args, loras[model.model]), model, indices)

    if not args.no_progress:
        from tqdm import tqdm

        drawing.bar = tqdm(total=len(cells) * args.batch_count, desc="grid", unit="batch", file=sys.stderr,
                           leave=False)
    held = HeldModel(args, loras)
    try:
        for model, indices in by_model:
            drawing.draw(held.pipeline(model), model, indices)
    finally:
        if drawing.bar is not None:
            drawing.bar.close()
    drawn, texts = drawing.results, drawing.texts
    images = {index: [image for result in results for image in result.images] for index, results in drawn.items()}
    sheet = plot.sheet({index: cell_picture(pictures) for index, pictures in images.items()})

    out = Path(args.out)
    text = format_parameters(with_plot_parameters(texts[(0, 0, 0)][0], plot.parameters()))
    files = [(out, encode_image(sheet, image_format(out), text))]
    if args.keep_cells:
        for n, (index, _) in enumerate(cells):
            for file_name, image, parameters in zip(_image_names(n, index, len(images[index])), images[index],
                                                    texts[index]):
                files.append((Path(args.keep_cells) / file_name,
                              encode_image(image, "PNG", format_parameters(parameters))))
    for folder, name in _output_folders(args).items():
        make_output_folder(folder, name)
    try:
        write_files_all_or_nothing(files, overwrite=True)
    except OSError as err:
        raise write_error(err, f"{out} and the cells in {args.keep_cells}" if args.keep_cells else out) from None
    print(out)
    return 0
