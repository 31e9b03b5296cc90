"""`sdlab grid`: an X/Y/Z plot as A1111's script draws it, one labelled PNG.

    sdlab grid "a red apple" --x steps=10,20,30 --y "sampler=Euler,DPM++ 2M" --out grid.png
    sdlab grid "a red apple" --x "cfg=3-9 (+2)" --y seed=1-4 --z "prompt_sr=apple,pear" --out grid.png
    sdlab grid "a cat" --init photo.png --x denoise=0.3,0.5,0.7 --out grid.png --keep-cells cells/

Every other option is txt2img's (img2img's with --init); a cell is exactly the picture `sdlab txt2img` draws
with its settings. Without --seed (or a seed axis) one random seed serves every cell. Axes, values and
ranges are checked before the model loads (`sdlab.pipeline.grid`); every cell's request before the first
is drawn. Each cell applies and records the <lora:...> tags of its own prompt (after Prompt S/R). The grid
carries the parameters of its first cell and A1111's plot fields (Script: X/Y/Z plot, X Type, X Values,
Fixed X Values for a seed axis, ...); --keep-cells also writes each cell with its own. Everything is written
at the end, all or nothing; the folders it goes to (--out's and --keep-cells) are checked before the model
loads, and made only then.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from sdlab.cli.errors import UserError, utf8_text, write_error
from sdlab.utils.dtypes import DTYPE_CHOICES
from sdlab.utils.files import check_output_folder, make_output_folder


def add_grid(subparsers: argparse._SubParsersAction) -> None:
    help_text = "draw an X/Y/Z plot: one labelled grid of pictures over up to three request fields"
    p = subparsers.add_parser("grid", help=help_text, description=help_text)
    p.add_argument("prompt", type=utf8_text("the prompt"), help="the prompt (A1111 syntax)")
    for axis in ("x", "y", "z"):
        p.add_argument(f"--{axis}", type=utf8_text(f"--{axis}"), metavar="FIELD=V1,V2,...",
                       help=f"{axis.upper()} axis: sampler, schedule, steps, cfg, seed, width, height, clip_skip, "
                            "denoise or prompt_sr, with values or A1111 ranges (1-5, 1-10 (+2), 10-20 [3])")
    p.add_argument("--out", required=True, help="the grid picture (.png, .jpg, .webp)")
    p.add_argument("--keep-cells", metavar="DIR", help="also write each cell, with its own parameters, to DIR")
    p.add_argument("--negative", type=utf8_text("--negative"), help="negative prompt")
    p.add_argument("--model", help="checkpoint file or diffusers folder (default: the model shipped with sdlab)")
    p.add_argument("--vae", help="standalone VAE file that replaces the checkpoint's VAE")
    p.add_argument("--family", help="override family detection (sd1, sd2, sdxl, ...)")
    p.add_argument("--prediction", choices=("eps", "v", "x0"), help="override the prediction type")
    p.add_argument("--sampler", help="sampler of every cell unless an axis sets it")
    p.add_argument("--schedule", help="noise schedule: karras, exponential, normal, simple, ...")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's, as sdlab txt2img)")
    p.add_argument("--cfg", "--cfg-scale", type=float, dest="cfg",
                   help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--seed", type=int, help="seed of every cell unless an axis sets it (default: one random seed)")
    p.add_argument("--width", type=int, help="width in pixels (default: the family's)")
    p.add_argument("--height", type=int, help="height in pixels (default: the family's)")
    p.add_argument("--clip-skip", type=int,
                   help="clip skip: 1 = the usual layer, 2 = one layer back, for the prompt only (diffusers' clip_skip=1)")
    p.add_argument("--eta", type=float, help="noise amount of ancestral / DDIM samplers")
    p.add_argument("--eta-noise-seed-delta", "--ensd", type=int, dest="ensd",
                   help="A1111's ENSD: ancestral step noise from seed + N (e.g. 31337)")
    p.add_argument("--preset", metavar="NAME",
                   help="few-step settings of a distilled model or LoRA (turbo, lcm, lightning, hyper, tcd, "
                        "lcm-model) under every cell; options and axes win (default: the one the model names)")
    p.add_argument("--init", help="init image: every cell is an img2img of it")
    p.add_argument("--strength", type=float, help="img2img strength in (0, 1] (with --init)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE:WEIGHT", help="merge a LoRA file; repeatable")
    p.add_argument("--lora-dir", action="append", default=[], metavar="DIR",
                   help="where the prompt's <lora:NAME:WEIGHT> tags find NAME.safetensors; repeatable")
    p.add_argument("--embeddings-dir", action="append", default=[], metavar="DIR",
                   help="textual-inversion embeddings whose file names are words of the prompt; repeatable")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps (default cpu)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="weight dtype; auto (default): bf16 for large models on a CPU with native bf16 or on CUDA, "
                        "fp32 for small ones")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_grid, from_png=None, batch=None, mask_blur=None, refiner=None, refiner_switch=0.8)


def _plot(args: argparse.Namespace):
    """The axes given as a `Plot`; errors before any work."""
    from sdlab.pipeline.grid import GridError, Plot, cell_count, parse_axis

    if args.x is None:
        if args.y is not None or args.z is not None:
            raise UserError("give the first axis as --x (then --y, --z)")
        raise UserError("a grid needs at least one axis: --x FIELD=V1,V2,... (e.g. --x steps=10,20)")
    try:
        axes = {letter: parse_axis(getattr(args, letter)) for letter in "xyz" if getattr(args, letter) is not None}
        cell_count(list(axes.values()))
    except GridError as err:
        raise UserError(str(err)) from None
    if not args.init and any(axis.field.name == "strength" for axis in axes.values()):
        raise UserError("a denoise (strength) axis needs --init IMAGE: txt2img has no strength")
    return Plot(**axes)


@contextlib.contextmanager
def _quiet_size_warnings() -> Iterator[None]:
    """The checks below resolve each cell once more than the draw does: its size warnings are said once, there."""
    images_logger = logging.getLogger("sdlab.pipeline.images")
    before, images_logger.disabled = images_logger.disabled, True
    try:
        yield
    finally:
        images_logger.disabled = before


def _check_requests(cells, plot) -> None:
    """Every cell's request through the model-free checks (`request.resolve`) before anything loads."""
    from sdlab.pipeline.request import GenerationRequest, RequestError, resolve

    for index, options in cells:
        try:
            with _quiet_size_warnings():
                resolve(GenerationRequest(**options), default_size=64, default_sampler="Euler",
                        default_schedule="karras", factor=8)
        except RequestError as err:
            raise UserError(f"the grid cell {', '.join(plot.labels(index))}: {err}") from None


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


def _cell_loras(args: argparse.Namespace, cells) -> dict[str, tuple]:
    """Each cell prompt (as typed, after Prompt S/R) -> `_resolve_loras`' (prompt for the pipeline, `LoraRef`s,
    prompt to record): a cell applies and records the `<lora:...>` tags of its own prompt, as A1111 draws and
    records each cell (an S/R may add, remove or swap a tag); errors (a missing LoRA) before any work."""
    from sdlab.cli.generate import _resolve_loras

    resolved = {}
    for _, cell in cells:
        if cell["prompt"] not in resolved:
            for_pipeline, _, refs, to_record = _resolve_loras(args, cell["prompt"], {})
            resolved[cell["prompt"]] = (for_pipeline, refs, to_record)
    return resolved


def _for_pipeline(cells, loras: dict[str, tuple]):
    """`cells` with each prompt as the pipeline takes it (tags of `--lora` files left out)."""
    return [(index, {**cell, "prompt": loras[cell["prompt"]][0]}) for index, cell in cells]


def _grid_parameters(first: dict, plot) -> dict:
    """The grid picture's parameters: its first cell's with A1111's plot fields (Script, X Type, X Values, ...)
    before `Version`, where A1111's extra generation parameters go."""
    parameters = {key: value for key, value in first.items() if key != "Version"}
    return {**parameters, **plot.parameters(), "Version": first.get("Version")}


def run_grid(args: argparse.Namespace) -> int:
    from sdlab.cli.generate import (
        _identify_model, _load_pipeline, _open_image, _options_from_args, _resolve_loras, _standalone_vae,
        _with_model_preset,
    )
    from sdlab.pipeline.grid import GridError, check_prompt_sr, draw_plot
    from sdlab.pipeline.infotext import to_parameters
    from sdlab.pipeline.png_info import embedding_hash, encode_image, format_parameters, image_format, write_files_all_or_nothing
    from sdlab.pipeline.request import GenerationRequest, RequestError, fixed_seed

    args.mode = "img2img" if args.init else "txt2img"
    _output_files(args)
    plot = _plot(args)
    options = _options_from_args(args, {})
    _, loras, _, _ = _resolve_loras(args, options["prompt"], {})        # the --lora files, merged at load
    try:
        check_prompt_sr([axis for _, axis in plot.axes()], options["prompt"], options.get("negative_prompt", ""))
    except GridError as err:
        raise UserError(str(err)) from None
    options["seed"] = fixed_seed(options.get("seed"))     # one seed for every cell, as A1111 fixes it
    if args.init:
        options["init_image"] = _open_image(args.init, "init image")
    typed = plot.cells(options)                          # prompts as typed: each cell's LoRAs come from its own
    cell_loras = _cell_loras(args, typed)
    cells = _for_pipeline(typed, cell_loras)
    _check_requests(cells, plot)

    pipe, model = _load_pipeline(args, None, loras)
    preset = pipe.preset_for(options["prompt"])
    if preset and not args.preset:                       # a file that names a preset (LCM-LoRA, Turbo), as txt2img
        options = _with_model_preset(options, preset, args.mode)
        typed = plot.cells(options)
        cells = _for_pipeline(typed, cell_loras)
        _check_requests(cells, plot)
    name, hash_ = _identify_model(model)
    vae = _standalone_vae(args)
    try:
        for _, cell in cells:                                # the model's checks too (clip skip, memory)
            with _quiet_size_warnings():
                pipe.resolve(GenerationRequest(**cell))
    except RequestError as err:
        raise UserError(str(err)) from None
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(cells), desc="grid", unit="cell", file=sys.stderr, leave=False)

    def run_cell(request: GenerationRequest):
        result = pipe.run(replace(request, prompt=cell_loras[request.prompt][0]))
        if bar is not None:
            bar.update(1)
        return result

    try:
        sheet, results = draw_plot(run_cell, options, plot)
    except RequestError as err:
        raise UserError(str(err)) from None
    finally:
        if bar is not None:
            bar.close()
    parameters = {}
    for index, cell in typed:
        _, refs, to_record = cell_loras[cell["prompt"]]
        result = results[index]
        parameters[index] = to_parameters(
            result.request, model_name=name, model_hash=hash_, loras=refs, prompt=to_record, vae=vae,
            embeddings=[(e.name, embedding_hash(e.path)) for e in pipe.embeddings_used(result.request)])
    texts = {index: format_parameters(p) for index, p in parameters.items()}

    out = Path(args.out)
    text = format_parameters(_grid_parameters(parameters[(0, 0, 0)], plot))
    files = [(out, encode_image(sheet, image_format(out), text))]
    if args.keep_cells:
        for n, (index, _) in enumerate(cells):
            i, j, k = index
            files.append((Path(args.keep_cells) / f"{n:03d}-x{i}-y{j}-z{k}.png",
                          encode_image(results[index].images[0], "PNG", texts[index])))
    for folder, name in _output_folders(args).items():
        make_output_folder(folder, name)
    try:
        write_files_all_or_nothing(files, overwrite=True)
    except OSError as err:
        raise write_error(err, f"{out} and the cells in {args.keep_cells}" if args.keep_cells else out) from None
    print(out)
    return 0
