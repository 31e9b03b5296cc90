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
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator
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
                            "Schedule type, Denoising, Hires steps, Eta, Sigma Churn, Prompt S/R, Prompt order, ... "
                            "any case) or a short name (cfg, denoise, prompt_sr), with values or A1111 ranges "
                            "(1-5, 1-10 (+2), 10-20 [3])")
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
    p.add_argument("--negative", type=utf8_text("--negative"), help="negative prompt")
    _add_second_prompt_flags(p, from_png=False)
    _add_model_flags(p, from_png=False)
    _add_sampling_flags(p, from_png=False)
    _add_run_flags(p, from_png=False)
    add_style_flags(p, from_png=False)
    _add_hires_flags(p)
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
    from sdlab.pipeline.grid import MODEL_FIELDS, GridError, Plot, cell_count, parse_axis

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
    if model_axes := [axis.field.type_name for axis in axes.values() if axis.field.name in MODEL_FIELDS]:
        raise UserError(f"{', '.join(model_axes)}: sdlab grid draws every cell with the one --model (--vae, "
                        "--refiner, --refiner-switch); the server's X/Y/Z plot (sdlab serve) draws these axes")
    hires_axes = [axis.field.name for axis in axes.values() if axis.field.name.startswith("hr_")]
    if args.init and hires_axes:
        raise UserError(f"{', '.join(hires_axes)}: the hires fix is txt2img's; a grid with --init draws img2img cells")
    hires = args.hr_scale is not None or args.hr_size is not None
    if not args.init and not hires and any(axis.field.name == "strength" for axis in axes.values()):
        raise UserError("a Denoising axis needs --init IMAGE (img2img's strength) or the hires fix (--hr-scale / "
                        "--hr-size: its second pass's denoise)")
    return Plot(**axes, legend=not args.no_legend, keep_random_seeds=args.keep_random_seeds, margin=args.margin)


@contextlib.contextmanager
def _quiet_size_warnings() -> Iterator[None]:
    """The checks below resolve each cell once more than the draw does: its size warnings are said once, there."""
    images_logger = logging.getLogger("sdlab.pipeline.images")
    before, images_logger.disabled = images_logger.disabled, True
    try:
        yield
    finally:
        images_logger.disabled = before


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


def _cell_loras(args: argparse.Namespace, cells, finder) -> dict[str, tuple]:
    """Each cell prompt (as typed, after Prompt S/R) -> `_resolve_loras`' (prompt for the pipeline, `LoraRef`s,
    prompt to record): a cell applies and records the `<lora:...>` tags of its own prompt, as A1111 draws and
    records each cell (an S/R may add, remove or swap a tag); errors (a missing LoRA) before any work."""
    from sdlab.cli.generate import _resolve_loras

    resolved = {}
    for _, cell in cells:
        if cell["prompt"] not in resolved:
            for_pipeline, _, refs, to_record = _resolve_loras(args, cell["prompt"], {}, finder)
            resolved[cell["prompt"]] = (for_pipeline, refs, to_record)
    return resolved


def _for_pipeline(cells, loras: dict[str, tuple]):
    """`cells` with each prompt as the pipeline takes it (tags of `--lora` files left out)."""
    return [(index, {**cell, "prompt": loras[cell["prompt"]][0]}) for index, cell in cells]


# the hires flags (`generate._add_hires_flags`), by their argparse names
_HIRES_FLAGS = ("hr_scale", "hr_size", "hr_upscaler", "hr_steps", "hr_denoise", "hr_sampler", "hr_eta", "hr_schedule",
                "hr_prompt", "hr_negative_prompt")


def _check_hires(args: argparse.Namespace) -> None:
    """The hires fix is txt2img's: a grid with --init draws img2img cells, which have none."""
    given = ["--" + name.replace("_", "-") for name in _HIRES_FLAGS if getattr(args, name) is not None]
    if args.init and given:
        raise UserError(f"{', '.join(given)}: the hires fix is txt2img's; a grid with --init draws img2img cells")


def _image_names(number: int, index, count: int) -> list[str]:
    """--keep-cells' file names of the `count` pictures of cell `number` at `index` (x, y, z); a batch adds
    -0, -1, ... as txt2img's --out does."""
    stem = f"{number:03d}-x{index[0]}-y{index[1]}-z{index[2]}"
    return [f"{stem}.png"] if count == 1 else [f"{stem}-{m}.png" for m in range(count)]


def run_grid(args: argparse.Namespace) -> int:
    from sdlab.cli.generate import (
        _controls, _identify_model, _load_pipeline, _lora_finder, _open_image, _options_from_args, _refiner_ref,
        _resolve_loras, styles_of,
    )
    from sdlab.pipeline.grid import draw_cells, fix_seeds, with_plot_parameters
    from sdlab.pipeline.infotext import drawn_hires_prompt, hires_tag_refs, to_parameters
    from sdlab.pipeline.png_info import (
        embedding_hash,
        encode_image,
        format_parameters,
        image_format,
        lora_hash,
        vae_ref,
        write_files_all_or_nothing,
    )
    from sdlab.pipeline.request import GenerationRequest, RequestError

    args.mode = "img2img" if args.init else "txt2img"
    _output_files(args)
    _check_hires(args)
    plot = _plot(args)
    options = _options_from_args(args, {}, with_preset=False)      # the preset goes under each cell's (`_cells`)
    styles = styles_of(args)
    finder = _lora_finder(args)                          # the run's: --lora names, every cell's tags, the draws
    _, loras, _, _ = _resolve_loras(args, options["prompt"], {}, finder)    # the --lora files, merged at load
    if options.get("hr_prompt"):
        options["hr_prompt"] = drawn_hires_prompt(options["hr_prompt"], {Path(path).stem: w for path, w in loras})
    if not plot.keep_random_seeds:
        options = fix_seeds(options)                     # one seed and variation seed for every cell, as A1111
    if args.init:
        options["init_image"] = _open_image(args.init, "init image")
    controls = _controls(args, {}, options.get("control_convention", GenerationRequest.control_convention))
    if controls:
        options["controls"] = controls
    options["styles"] = tuple(args.style)                # applied in each cell, after its axes (`_cells`)
    typed = _cells(plot, options, lambda prompt: args.preset, args.mode, None, styles)    # each cell's LoRAs
    cell_loras = _cell_loras(args, typed, finder)
    cells = _for_pipeline(typed, cell_loras)
    _check_requests(cells, plot, args.batch_count)

    pipe, model = _load_pipeline(args, None, loras, finder)

    def preset_for(prompt: str) -> str | None:
        """A cell's preset as txt2img's: --preset's, else the one the model or a LoRA of its prompt names."""
        return args.preset or pipe.preset_for(cell_loras[prompt][0])

    typed = _cells(plot, options, preset_for, args.mode, pipe.bundle.family.default_steps, styles)   # its steps
    cells = _for_pipeline(typed, cell_loras)
    _check_requests(cells, plot, args.batch_count)
    name, hash_ = _identify_model(model)
    vae = vae_ref(pipe.bundle.report)
    refiner = _refiner_ref(args, pipe)
    try:
        for _, cell in cells:                                # the model's checks too (clip skip, memory)
            with _quiet_size_warnings():
                pipe.resolve(GenerationRequest(**cell))
    except RequestError as err:
        raise UserError(str(err)) from None
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(cells) * args.batch_count, desc="grid", unit="batch", file=sys.stderr, leave=False)

    def draw(request: GenerationRequest):
        """One batch of a cell, as `sdlab txt2img` draws it."""
        result = pipe.run(request)
        if bar is not None:
            bar.update(1)
        return result

    try:
        sheet, drawn = draw_cells(draw, plot, cells, args.batch_count)
    except RequestError as err:
        raise UserError(str(err)) from None
    finally:
        if bar is not None:
            bar.close()
    images = {index: [image for result in results for image in result.images] for index, results in drawn.items()}
    texts = {}
    for index, cell in typed:
        _, refs, to_record = cell_loras[cell["prompt"]]
        texts[index] = [
            to_parameters(result.request, index=i, model_name=name, model_hash=hash_, loras=refs, prompt=to_record,
                          vae=vae, refiner=refiner if result.refined else None,
                          embeddings=[(e.name, embedding_hash(e.path)) for e in pipe.embeddings_used(result.request)],
                          hires_loras=hires_tag_refs(result.request, finder, lora_hash))
            for result in drawn[index] for i in range(len(result.images))]

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
