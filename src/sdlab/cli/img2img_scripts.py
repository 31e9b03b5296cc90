"""`sdlab img2img --loopback N` and `--sd-upscale SCALE`: A1111's img2img scripts Loopback and SD upscale;
`sdlab inpaint --loopback N`: Loopback with the mask.

    sdlab img2img "a castle" --init photo.png --loopback 4 --final-strength 0.3 --strength-curve aggressive
    sdlab img2img "a castle" --init photo.png --sd-upscale 2 --upscaler "R-ESRGAN 4x+" --width 512 --height 512
    sdlab inpaint "a castle" --init photo.png --mask sky.png --loopback 3

Both run the plans the server's scripts run (`sdlab.pipeline.loopback`, `sdlab.pipeline.sd_upscale`); every pass
or tile batch is the single img2img `sdlab img2img` draws with its settings.

Loopback (A1111's scripts/loopback.py): each pass draws one picture from the last pass's (the first from --init),
its seed one more than the pass before, its strength moving from --strength to --final-strength along
--strength-curve; --batch-count N runs N such chains, each from --init again, the seeds counting on. Inpainting, every
pass repaints the mask, the passes after a chain's first with Masked content "original" (A1111's
`p.inpainting_fill = 1`). Every pass's picture is written with its parameters and A1111's `Final denoising strength` / `Denoising curve`, then (with
more than one picture kept: every pass's, or with a batch count each chain's last) their grid in a row, without
parameters, as A1111 saves them.

SD upscale (A1111's scripts/sd_upscale.py): --init through --upscaler by SCALE (each side rounded down to a
multiple of 8, as `sdlab upscale`), cut into --width x --height tiles overlapping by --tile-overlap, the tiles
drawn --batch at a time at A1111's seeds and put back together; with --batch-count N the tiles are drawn N times,
each from the seed + n. Each upscale's picture is written with the first tile batch's parameters and A1111's
`SD upscale overlap` / `SD upscale upscaler`, as A1111 saves it.

SD upscale does not run with a mask: A1111's cuts the picture alone into tiles (each tile would be inpainted under
the whole mask, shrunk to the tile), so `sdlab inpaint --sd-upscale` is refused.

A --from-png picture's script settings, the `extra_generation_params` A1111's scripts write (`Final denoising
strength` / `Denoising curve`, `SD upscale overlap` / `SD upscale upscaler`), are the unset flags of the script the
run draws (`take_recorded_script_settings`); the loops and the scale are not recorded and are given on the line. A
picture a script drew, redrawn without that script, is warned about.

Every flag, and every pass's or tile batch's request, is checked before anything is drawn (and before the
upscale runs); the pictures are written at the end, all or nothing, through `sdlab img2img`'s output rules.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sdlab.cli.errors import UserError

CURVE_FLAGS = ("aggressive", "linear", "lazy")          # A1111's CURVES, lower case (`_curve`)
DEFAULT_FINAL_STRENGTH = 0.5                            # A1111's Loopback UI defaults
DEFAULT_CURVE = "linear"
DEFAULT_TILE_OVERLAP = 64                               # A1111's SD upscale UI default, for its 512 px tiles
DEFAULT_UPSCALER = "Lanczos"
PLAIN_UPSCALERS = {"none": "None", "lanczos": "Lanczos", "nearest": "Nearest"}   # the flag -> A1111's spelling
LOOPBACK_FLAGS = (("--final-strength", "final_strength"), ("--strength-curve", "strength_curve"))
SD_UPSCALE_FLAGS = (("--upscaler", "upscaler"), ("--tile-overlap", "tile_overlap"))


@dataclass(frozen=True)
class RecordedScript:
    """An img2img script whose `extra_generation_params` a picture records: the flag (its dest) that draws it in
    `modes`, what the picture does not record (given with the flag) and its fields: (label, flag's dest)."""

    title: str
    flag: str
    dest: str
    modes: tuple[str, ...]
    unrecorded: str
    fields: tuple[tuple[str, str], ...]


SD_UPSCALE_MODES = ("img2img",)     # the commands SD upscale draws in (inpaint refuses it: `check_script_flags`)

RECORDED_SCRIPTS = (       # A1111's scripts/loopback.py, scripts/sd_upscale.py (its outpainting scripts write none)
    RecordedScript("Loopback", "--loopback N", "loopback", ("img2img", "inpaint"), "the number of loops",
                   (("Final denoising strength", "final_strength"), ("Denoising curve", "strength_curve"))),
    RecordedScript("SD upscale", "--sd-upscale SCALE", "sd_upscale", SD_UPSCALE_MODES, "the scale factor",
                   (("SD upscale overlap", "tile_overlap"), ("SD upscale upscaler", "upscaler"))),
)

Parameters = Callable[[Any, int], dict[str, Any]]
"""(a `GenerationResult`, picture index) -> its labelled parameters (`infotext.to_parameters` of the run)."""


def add_img2img_script_flags(p: argparse.ArgumentParser, mode: str) -> None:
    """The script flags of `mode`'s command; in inpaint SD upscale's are left out of --help (inpaint refuses them,
    saying why: `check_script_flags`)."""
    def sd_upscale_help(text: str) -> str:
        return text if mode in SD_UPSCALE_MODES else argparse.SUPPRESS

    p.add_argument("--loopback", type=int, metavar="N",
                   help="A1111's Loopback: N passes, each drawing from the last pass's picture (seed + 1 each); "
                        "writes every pass's picture and their grid")
    p.add_argument("--final-strength", type=float, metavar="F",
                   help=f"--loopback: the last pass's strength, 0..1 (default {DEFAULT_FINAL_STRENGTH:g})")
    p.add_argument("--strength-curve", type=str.lower, choices=CURVE_FLAGS,
                   help=f"--loopback: how the strength moves from --strength to --final-strength (default "
                        f"{DEFAULT_CURVE}; aggressive: sin, lazy: 1 - cos)")
    p.add_argument("--sd-upscale", type=float, metavar="SCALE",
                   help=sd_upscale_help("A1111's SD upscale: --init upscaled by SCALE, redrawn in --width x --height "
                                        "tiles (default: the model's size) and put back together"))
    p.add_argument("--upscaler", metavar="NAME|FILE",
                   help=sd_upscale_help(f"--sd-upscale: {DEFAULT_UPSCALER} (default), Nearest, None (no upscale, "
                                        "A1111's) or an upscaler file (ESRGAN / Real-ESRGAN), by path or by name "
                                        "(A1111's 'R-ESRGAN 4x+' or a stem) in the current folder or a --models-dir's "
                                        "ESRGAN / RealESRGAN folder"))
    p.add_argument("--tile-overlap", type=int, metavar="PX",
                   help=sd_upscale_help(f"--sd-upscale: pixels neighbouring tiles share (default "
                                        f"{DEFAULT_TILE_OVERLAP}, A1111's, or an eighth of tiles smaller than 512 px)"))


def script_chosen(args: argparse.Namespace) -> bool:
    return getattr(args, "loopback", None) is not None or getattr(args, "sd_upscale", None) is not None


def check_script_flags(args: argparse.Namespace) -> None:
    """The script flags, checked before any file is read: each script's settings only with it, one script, and
    their values (the tile overlap against the tiles once their size is known: `_tile_size`)."""
    loopback, sd_upscale = getattr(args, "loopback", None), getattr(args, "sd_upscale", None)
    for script, value, flags in (("--loopback N", loopback, LOOPBACK_FLAGS),
                                 ("--sd-upscale SCALE", sd_upscale, SD_UPSCALE_FLAGS)):
        stray = [flag for flag, name in flags if getattr(args, name, None) is not None]
        if stray and value is None:
            raise UserError(f"{', '.join(stray)}: only with {script}, whose drawing {'they set' if len(stray) > 1 else 'it sets'}")
    if loopback is None and sd_upscale is None:
        return
    if loopback is not None and sd_upscale is not None:
        raise UserError("give either --loopback or --sd-upscale, not both (A1111 runs one script at a time)")
    if sd_upscale is not None and args.mode == "inpaint":
        raise UserError("--sd-upscale does not inpaint: A1111's SD upscale cuts the picture alone into tiles (each "
                        "tile would be inpainted under the whole mask, shrunk); run sdlab img2img --sd-upscale")
    if getattr(args, "prompts_file", None):
        raise UserError("--loopback and --sd-upscale do not run with --prompts-file")
    if loopback is not None:
        _check_loopback(args)
    else:
        _check_sd_upscale(args)


def _check_loopback(args: argparse.Namespace) -> None:
    from sdlab.pipeline.request import MAX_BATCH_COUNT

    if not 1 <= args.loopback or args.loopback * args.batch_count > MAX_BATCH_COUNT:
        raise UserError(f"--loopback must be 1 or more passes, and passes x --batch-count at most {MAX_BATCH_COUNT}, "
                        f"got {args.loopback} x {args.batch_count}")
    final = _final_strength(args)
    if not (math.isfinite(final) and 0 <= final <= 1):
        name, hint = _source(args, "final_strength", "--final-strength")
        raise UserError(f"{name} must be 0..1, got {final:g}{hint}")
    if args.batch is not None and args.batch != 1:
        raise UserError(f"--loopback draws one picture per pass (A1111 sets batch size 1); leave out --batch "
                        f"{args.batch}")


def _check_sd_upscale(args: argparse.Namespace) -> None:
    if not (math.isfinite(args.sd_upscale) and args.sd_upscale > 0):
        raise UserError(f"--sd-upscale must be a scale above 0, got {args.sd_upscale:g}")
    if _tile_overlap(args) < 0:
        name, hint = _source(args, "tile_overlap", "--tile-overlap")
        raise UserError(f"{name} must be 0 or more pixels, got {args.tile_overlap}{hint}")
    _upscaler(args)


def take_recorded_script_settings(args: argparse.Namespace, recorded: dict[str, Any]) -> None:
    """The --from-png picture's script fields (`RECORDED_SCRIPTS`, as `loopback.loop_fields` and
    `sd_upscale.upscale_fields` write them) as the unset flags of the script `args` draws, then checked as the
    flags are; a picture drawn by a script this run does not draw is a warning naming its fields."""
    for script in RECORDED_SCRIPTS:
        found = [(label, dest) for label, dest in script.fields if label in recorded]
        if found and getattr(args, script.dest, None) is None:
            _warn_script_not_drawn(args, script, [f"{label}: {recorded[label]}" for label, _ in found])
        elif found:
            for label, dest in found:
                if getattr(args, dest) is None:
                    setattr(args, dest, _recorded_flag(label, dest, recorded[label]))
                    args.recorded_fields = {**getattr(args, "recorded_fields", {}), dest: label}
    check_script_flags(args)


def _source(args: argparse.Namespace, dest: str, flag: str) -> tuple[str, str]:
    """(what an error names the value of `flag` by, what it adds): the flag, or the --from-png picture's field the
    value was read from (`take_recorded_script_settings`) and the flag that overrides it."""
    label = getattr(args, "recorded_fields", {}).get(dest)
    if label is None:
        return flag, ""
    return f"the --from-png picture's {label!r}", f" (give {flag} to override it)"


def _recorded_flag(label: str, dest: str, value: Any) -> Any:
    """A script field's recorded `value` as its flag reads it; one that does not read is a UserError naming it."""
    text = str(value).strip()
    try:
        if dest == "final_strength":
            return float(text)
        if dest == "tile_overlap":
            return int(text)
    except ValueError:
        raise UserError(f"the --from-png picture's {label!r} value {text!r} is not a number") from None
    if dest == "strength_curve":
        if text.lower() not in CURVE_FLAGS:
            raise UserError(f"the --from-png picture's {label!r} value {text!r} is none of A1111's curves "
                            f"{', '.join(flag.capitalize() for flag in CURVE_FLAGS)}")
        return text.lower()
    return text


def _warn_script_not_drawn(args: argparse.Namespace, script: RecordedScript, fields: list[str]) -> None:
    import logging

    advice = (f"pass {script.flag} to redraw it ({script.unrecorded} is not recorded; the rest is taken from the "
              "picture)" if args.mode in script.modes else f"sdlab {args.mode} does not run it, so the redraw differs")
    logging.getLogger("sdlab").warning("the picture was drawn by A1111's %s script (%s); this run draws one %s "
                                       "request: %s", script.title, ", ".join(fields), args.mode, advice)


def _final_strength(args: argparse.Namespace) -> float:
    return DEFAULT_FINAL_STRENGTH if args.final_strength is None else args.final_strength


def _curve(args: argparse.Namespace) -> str:
    """--strength-curve as A1111 names it (`loopback.CURVES`: Aggressive, Linear, Lazy)."""
    return (args.strength_curve or DEFAULT_CURVE).capitalize()


def _tile_overlap(args: argparse.Namespace, tile: tuple[int, int] = (512, 512)) -> int:
    """--tile-overlap, else A1111's 64 px, or an eighth of smaller `tile`s' short side (8 px of sdlab-tiny's 64)."""
    return min(DEFAULT_TILE_OVERLAP, min(tile) // 8) if args.tile_overlap is None else args.tile_overlap


def run_script(args: argparse.Namespace, pipe, request, plan, target: tuple[Path, str | None],
               parameters: Parameters) -> int:
    """Draw the script `args` names from `request` (`script_request`'s; its `plan`: the seeds fixed, every default
    filled in) and write its pictures to `target` (`generate._output_target`). A --control or --ip-adapter without an
    image draws on each request's own init picture (a Loopback pass's, an SD upscale tile batch's first), as the
    server's scripts: the passes take `request`'s controls and IP-Adapters as given, which each pass's resolve draws
    on its picture."""
    from sdlab.pipeline.request import RequestError

    try:
        draw = _loopback(args, pipe, request, plan, parameters) if args.loopback is not None else \
            _sd_upscale(args, pipe, request, plan, parameters)
    except RequestError as err:
        raise UserError(str(err)) from None
    return _write(args, target, plan.request.prompt, draw)


def _write(args: argparse.Namespace, target: tuple[Path, str | None], prompt: str, draw) -> int:
    """Name the pictures `draw` makes (its seeds, its grid) before it runs, then draw and write them."""
    from sdlab.cli.generate import _output_paths, _save_images

    seeds, grid, drawing = draw
    paths = _output_paths(args.out, target, prompt, seeds, grid)
    images, texts = drawing()
    for path in _save_images(target[1] is None, paths, images, texts, prompt, seeds, grid):
        print(path)
    return 0


def _resolved(pipe, requests: list) -> list:
    """Every request resolved (checked) before the first is drawn."""
    return [pipe.resolve(request) for request in requests]


def _loopback(args: argparse.Namespace, pipe, request, plan, parameters: Parameters):
    """(the passes' seeds, whether a grid follows, the drawing): A1111's Loopback (`loopback.loop_plan`) from the
    resolved `plan` (`request`: as given, its controls and IP-Adapters), each pass one picture drawn from the
    last's; checked on a stand-in picture before any draws."""
    from PIL import Image

    from sdlab.cli.generate import progress_bar
    from sdlab.pipeline.grid import with_plot_parameters
    from sdlab.pipeline.loopback import kept_pictures, loop_fields, loop_grid, loop_plan
    from sdlab.pipeline.png_info import format_parameters

    base = replace(plan.request, batch_size=1, controls=request.controls,     # each pass's own init picture
                   ip_adapters=request.ip_adapters)
    passes = loop_plan(args.loopback, args.batch_count, base.seed, base.strength, _final_strength(args),
                       _curve(args))
    fields = loop_fields(_final_strength(args), _curve(args))

    def pass_request(k: int, init: Image.Image):
        """Pass k's request; with a mask, after its chain's first pass, Masked content "original" (A1111's)."""
        fill = {} if passes[k].from_request or base.mask_image is None else {"inpaint_fill": "original"}
        return replace(base, seed=passes[k].seed, strength=passes[k].strength, init_image=init, init_images=(),
                       **fill)

    stand_in = Image.new("RGB", (base.width, base.height))       # the size every pass after the first draws from
    checked = _resolved(pipe, [pass_request(k, base.init_image if p.from_request else stand_in)
                               for k, p in enumerate(passes)])
    kept = kept_pictures(passes, [True] * len(passes))

    def drawing() -> tuple[list, list]:
        pictures, texts = [], []
        with progress_bar(args, sum(p.steps_run for p in checked)) as progress:
            for k, p in enumerate(passes):
                drawn = checked[k] if p.from_request else pipe.resolve(pass_request(k, pictures[-1]))
                result = pipe.run(drawn, progress=progress)
                pictures.append(result.images[0])
                texts.append(format_parameters(with_plot_parameters(parameters(result, 0), fields)))
        grid = [loop_grid([pictures[i] for i in kept])] if len(kept) > 1 else []
        return pictures + grid, texts + [None] * len(grid)

    return [p.seed for p in passes], len(kept) > 1, drawing


def _sd_upscale(args: argparse.Namespace, pipe, request, plan, parameters: Parameters):
    """(the upscales' seeds, no grid, the drawing): A1111's SD upscale (`sd_upscale.tile_plan`) of the init picture
    with `plan`'s settings; every tile batch checked on stand-in tiles before the upscale runs."""
    from PIL import Image

    from sdlab.cli.generate import progress_bar
    from sdlab.pipeline.grid import with_plot_parameters
    from sdlab.pipeline.png_info import format_parameters
    from sdlab.pipeline.sd_upscale import combined_pictures, tile_plan, upscale_fields
    from sdlab.pipeline.tile_grid import split_grid
    from sdlab.pipeline.upscale import UpscaleError

    name, upscaler_file = _upscaler(args)
    tile = (request.width, request.height)                      # `script_request`'s
    overlap, scale, image = _tile_overlap(args, tile), args.sd_upscale, request.init_image
    try:
        _, batches = tile_plan(image.size, name, scale, tile, overlap, plan.request.batch_size, args.batch_count,
                               plan.request.seed)
    except UpscaleError as err:
        raise UserError(f"--sd-upscale: {err}") from None

    def batch_request(batch, tiles: tuple):
        return replace(plan.request, seed=batch.seed, batch_size=batch.batch_size, width=tile[0], height=tile[1],
                       init_image=tiles[0], init_images=tiles, controls=request.controls,
                       ip_adapters=request.ip_adapters)

    stand_in = Image.new("RGB", tile)
    _resolved(pipe, [batch_request(b, (stand_in,) * len(b.tiles)) for b in batches])
    fields = upscale_fields(overlap, name)
    upscaler = _upscaler_of(name, upscaler_file, pipe)

    def drawing() -> tuple[list, list]:
        upscaled = _upscaled(image, upscaler, scale)
        grid = split_grid(upscaled, *tile, overlap)
        tiles = [t.image for _, t in grid.tiles()]
        plans = _resolved(pipe, [batch_request(b, tuple(tiles[i] for i in b.tiles)) for b in batches])
        drawn, first = [], None
        with progress_bar(args, sum(p.steps_run for p in plans)) as progress:
            for batch_plan in plans:
                result = pipe.run(batch_plan, progress=progress)
                drawn.append(result.images)
                first = first or format_parameters(with_plot_parameters(parameters(result, 0), fields))
        pictures = combined_pictures(grid, batches, drawn)
        return pictures, [first] * len(pictures)        # A1111 saves each with the first batch's info

    return [plan.request.seed + n for n in range(args.batch_count)], False, drawing


def script_request(args: argparse.Namespace, request, pipe):
    """`request` as the script draws it, before it is resolved: for SD upscale at the tiles' width x height, the
    request's (--width / --height, or a --from-png picture's), else the model's size (not the init picture's);
    --tile-overlap must be below both."""
    if getattr(args, "sd_upscale", None) is None:
        return request
    size = pipe.bundle.default_size
    tile = (request.width or size, request.height or size)
    if _tile_overlap(args, tile) >= min(tile):
        name, hint = _source(args, "tile_overlap", "--tile-overlap")
        raise UserError(f"{name} must be below the tiles' width and height ({tile[0]}x{tile[1]}, --width x "
                        f"--height), got {_tile_overlap(args, tile)}{hint}")
    return replace(request, width=tile[0], height=tile[1])


def _upscaler(args: argparse.Namespace) -> tuple[str, str | None]:
    """(the upscaler's name as A1111 records it, its file or None for a plain resize): --upscaler as a plain
    resize's name (any case), an existing file, or a name found as the hires fix's --hr-upscaler finds one
    (`hires.find_upscaler`) in the current folder, then each --models-dir's ESRGAN and RealESRGAN folders (the
    first --models-dir that has it: `models_dirs.find_upscaler_in`)."""
    from sdlab.cli.models_dirs import find_upscaler_in
    from sdlab.pipeline.hires import upscaler_name
    from sdlab.pipeline.upscale import missing_upscaler

    given = args.upscaler or DEFAULT_UPSCALER
    if given.strip().lower() in PLAIN_UPSCALERS and not os.path.isfile(given):
        return PLAIN_UPSCALERS[given.strip().lower()], None
    found = find_upscaler_in(given, [Path(".")], args.models_dir)
    if not os.path.isfile(found):
        where = "in the current folder or a --models-dir's ESRGAN / RealESRGAN folder"
        name, hint = _source(args, "upscaler", "--upscaler")
        named = f"{name}: " if hint else ""
        raise UserError(named + (missing_upscaler(given, where) or
                                 f"--upscaler {given!r} is no file, nor an upscaler file of that name {where}, nor "
                                 f"{', '.join(PLAIN_UPSCALERS.values())}") + hint)
    return upscaler_name(found), found


def _upscaler_of(name: str, upscaler_file: str | None, pipe):
    """What `upscale_by` takes: the plain resize's name, or the file's network (in float32 on the model's device,
    as the server loads it)."""
    from sdlab.checkpoints.upscaler import load_upscaler

    return name if upscaler_file is None else load_upscaler(upscaler_file, device=pipe.bundle.device)


def _upscaled(image, upscaler, scale: float):
    """`image` through `upscaler` (A1111's `Upscaler.upscale`: `upscale.upscale_by`, in the tiles the server
    draws with by default; a network sees RGB); "None" leaves it as it is."""
    from sdlab.pipeline.sd_upscale import upscales
    from sdlab.pipeline.upscale import upscale_by

    if isinstance(upscaler, str):
        return upscale_by(image, upscaler, scale) if upscales(upscaler) else image
    return upscale_by(image.convert("RGB"), upscaler, scale)
