"""`sdlab txt2img | img2img | inpaint --prompts-file FILE`: A1111's Prompts from file or textbox script, one run per
line of FILE (`-`: standard input), each drawn and written as that command draws and writes it with the line's
settings over the ones given (`sdlab.pipeline.prompts_file`).

    sdlab txt2img --prompts-file prompts.txt --seed 7 --iterate-seed --out outputs/
    sdlab txt2img "masterpiece" --prompts-file prompts.txt --insert-prompts end --negative "blurry"

The PROMPT given (if any) joins each line's prompt, after it (--insert-prompts start, the default) or before it
(end), and --negative each line's negative prompt. --iterate-seed (A1111's Iterate seed every line) starts each line
--batch x --batch-count seeds after the one before, --same-random-seed (Use same random seed for all lines) draws
one random seed for every line; otherwise each line without a seed draws its own. A line's tags set the command's
options: --prompt, --negative_prompt, --seed, --subseed, --subseed_strength, --seed_resize_from_w / _h,
--sampler_name (an A1111 name or alias), --steps, --cfg_scale, --width, --height, --batch_size (--batch), --n_iter
(--batch-count), --tiling, --sd_model (a checkpoint file or diffusers folder: --model), --outpath_samples (the
folder the line's pictures go to), --do_not_save_samples true (drawn, not written), --styles TEXT (A1111 sets the
text as the line's styles, each of its characters a style name: the line draws with the one-character styles of
--styles-file it names instead of --style's); --sampler_index, --prompt_for_display, --outpath_grids and
--do_not_save_grid change nothing here (as in A1111, where the first is ignored since 1.6 and the rest name files or
text sdlab's CLI does not write), and --restore_faces true is refused (sdlab has no face restoration). Every line is
read and checked before the model loads (img2img's and inpaint's with their pictures): a line A1111 would draw as a
prompt because it does not read (`unknown commandline option: --step`, `Unknown checkpoint: notes.txt`) is an error
here naming its line, as is any error of a line's run. A model loaded stays for the lines after it that draw it and
is let go before a line's other model loads: one model held at a time, as A1111's default (Maximum number of
checkpoints loaded: 1).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path
from typing import Any

from sdlab.cli.errors import UserError

NUMBER_KINDS = {int: "a whole number", float: "a number"}     # a tag's kind -> what its value must be
UNUSED_TAGS = ("sampler_index", "prompt_for_display", "outpath_grids", "do_not_save_grid")
FLAGS = {                           # A1111's tag -> the command's option (argparse name)
    "seed": "seed", "subseed": "subseed", "subseed_strength": "subseed_strength", "sampler_name": "sampler",
    "steps": "steps", "cfg_scale": "cfg", "width": "width", "height": "height", "batch_size": "batch",
    "n_iter": "batch_count", "tiling": "tiling", "sd_model": "model",
}


def add_prompts_file_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts-file", metavar="FILE",
                   help="A1111's Prompts from file or textbox: a run for each line of FILE (- reads standard "
                        "input), a prompt or A1111's options (--prompt \"...\" --steps 20 --seed 7 ...); --out is "
                        "then a folder")
    p.add_argument("--insert-prompts", choices=("start", "end"),
                   help="--prompts-file: each line's prompt goes before (start, the default) or after (end) the "
                        "PROMPT given (A1111's Insert prompts at the)")
    p.add_argument("--iterate-seed", action="store_true",
                   help="--prompts-file: each line starts --batch x --batch-count seeds after the one before "
                        "(A1111's Iterate seed every line)")
    p.add_argument("--same-random-seed", action="store_true",
                   help="--prompts-file: one random seed for every line without --seed (A1111's Use same random "
                        "seed for all lines)")


def check_without_prompts_file(args: argparse.Namespace) -> None:
    """--insert-prompts, --iterate-seed and --same-random-seed set how --prompts-file's lines draw: refused in a
    run without one, as the grid refuses its settings of another mode."""
    given = [flag for flag, value in (("--insert-prompts", args.insert_prompts), ("--iterate-seed", args.iterate_seed),
                                      ("--same-random-seed", args.same_random_seed)) if value]
    if given:
        raise UserError(f"{', '.join(given)}: give --prompts-file (they set how its lines draw)")


def _read_text(name: str) -> str:
    """The file's text as A1111's `load_prompt_file` reads an upload (UTF-8, undecodable bytes dropped), a byte
    order mark at its start left out (an editor's marker of UTF-8, never a prompt's)."""
    try:
        data = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
    except OSError as err:
        raise UserError(f"--prompts-file {name}: {err.strerror or err}") from None
    return data.decode("utf-8-sig", errors="ignore")


def _checkpoint(name: str) -> str | None:
    """`--sd_model NAME` as A1111's `get_closet_checkpoint_match` finds it: a checkpoint file sdlab loads (by its
    suffix) or a diffusers folder, else None (A1111's "Unknown checkpoint")."""
    from sdlab.checkpoints.diffusers_folder import MODEL_INDEX
    from sdlab.checkpoints.io import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES

    path = Path(name)
    if path.is_dir():
        return name if (path / MODEL_INDEX).is_file() else None
    return name if path.is_file() and path.suffix.lower() in (*SAFETENSORS_SUFFIXES, *PICKLE_SUFFIXES) else None


def _line_namespace(args: argparse.Namespace, line, seed: int, where: str, styles) -> argparse.Namespace:
    """The command's options for `line`: its tags over the options given, its prompts joined with them; a
    `--styles` text the characters of it that name one of `styles` (A1111's `p.styles` = the text, which its
    `apply_styles_to_prompt` iterates), in place of --style."""
    from sdlab.pipeline.prompts_file import line_prompts

    tags = line.args
    if tags.get("restore_faces"):
        raise UserError(f"{where}: --restore_faces true: sdlab has no face restoration")
    if "sampler_name" in tags and tags["sampler_name"] is None:
        raise UserError(f"{where}: --sampler_name is none of A1111's sampler names or aliases")
    ns = copy.copy(args)
    ns.prompts_file, ns.seed = None, seed
    ns.insert_prompts, ns.iterate_seed, ns.same_random_seed = None, False, False     # the file's, not the line's
    prompts = line_prompts(tags, args.prompt or "", args.negative or "", args.insert_prompts or "start")
    ns.prompt, ns.negative = prompts["prompt"], prompts["negative_prompt"] or None
    for tag, value in tags.items():
        if tag in FLAGS:
            setattr(ns, FLAGS[tag], value)
    if "seed_resize_from_w" in tags or "seed_resize_from_h" in tags:
        width, height = (args.seed_resize_from or "0x0").lower().split("x")
        ns.seed_resize_from = f"{tags.get('seed_resize_from_w', width)}x{tags.get('seed_resize_from_h', height)}"
    if "outpath_samples" in tags:                 # always a folder, as A1111's (a name with an extension too)
        ns.out = os.path.join(tags["outpath_samples"], "")
    ns.write = not tags.get("do_not_save_samples", False)
    if "styles" in tags:
        ns.style = [name for name in tags["styles"] if name in styles.styles]
    return ns


def _check_request(ns: argparse.Namespace) -> None:
    """A line's request (with img2img's and inpaint's pictures) through the model-free checks (`request.resolve`),
    as `sdlab grid` checks its cells."""
    from sdlab.cli.generate import _add_input_pictures, _options_from_args
    from sdlab.pipeline.request import GenerationRequest, RequestError, check_batch_seeds, resolve

    options = _options_from_args(ns)
    _add_input_pictures(ns, options)
    try:
        request = resolve(GenerationRequest(**options), default_size=64, default_sampler="Euler",
                          default_schedule="karras", factor=8)
        check_batch_seeds(request, ns.batch_count)
    except RequestError as err:
        raise UserError(str(err)) from None


def _line_error(line) -> str:
    """A line's error as the command line words it: a value that is not its tag's number names the tag, the value
    and what it wants (`--steps: invalid int value: 'abc', expected a whole number`), not Python's int() message;
    an unknown tag the tag meant (`--cfg-scale`, the command's spelling: did you mean --cfg_scale?); the other
    errors A1111's text."""
    from sdlab.pipeline.prompts_file import PROMPT_TAGS

    if line.unknown_tag is not None and (meant := _tag_meant(line.unknown_tag)) is not None:
        return f"{line.error}; did you mean --{meant}?"
    if line.bad_value is None:
        return line.error
    tag, text = line.bad_value
    kind = PROMPT_TAGS[tag]
    return f"--{tag}: invalid {kind.__name__} value: {text!r}, expected {NUMBER_KINDS[kind]}"


def _tag_meant(unknown: str) -> str | None:
    """The A1111 tag an unknown one likely means: the command's option of the same setting (--cfg-scale, --cfg,
    --negative, --batch-count: cfg_scale, cfg_scale, negative_prompt, n_iter), else the closest tag's name."""
    import difflib

    from sdlab.pipeline.prompts_file import PROMPT_TAGS

    name = unknown.replace("-", "_").lower()
    by_option = {dest: tag for tag, dest in FLAGS.items()} | {"negative": "negative_prompt", "style": "styles",
                                                               "out": "outpath_samples"}
    if name in PROMPT_TAGS or name in by_option:
        return by_option.get(name, name)
    close = difflib.get_close_matches(name, PROMPT_TAGS, n=1)
    return close[0] if close else None


def line_namespaces(args: argparse.Namespace) -> list[tuple[str, argparse.Namespace]]:
    """Every line's options (after how errors name the line), checked before any work (a line that does not read
    is an error naming it)."""
    from sdlab.cli.generate import _output_target, styles_of
    from sdlab.pipeline.prompts_file import read_lines, line_seeds

    if args.from_png:
        raise UserError("--prompts-file and --from-png: give one (each line is a run of its own)")
    if _output_target(args.out)[1] is not None:
        raise UserError(f"--out {args.out!r}: --prompts-file writes the pictures of every line, into a folder; "
                        "name one (without an extension, or ending in '/')")
    lines = read_lines(_read_text(args.prompts_file), _checkpoint)
    if not lines:
        raise UserError(f"--prompts-file {args.prompts_file}: no line to draw")
    seeds, _ = line_seeds(args.seed, len(lines), args.iterate_seed, args.same_random_seed, args.batch or 1,
                          args.batch_count)
    styles = styles_of(args)
    namespaces = []
    for line, seed in zip(lines, seeds):
        where = f"--prompts-file {args.prompts_file} line {line.number}"
        if line.error is not None:
            raise UserError(f"{where}: {_line_error(line)} (A1111 would draw the whole line as a prompt)")
        ns = _line_namespace(args, line, seed, where, styles)
        try:
            _output_target(ns.out)
            _check_request(ns)
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
        namespaces.append((where, ns))
    return namespaces


def run_prompts_file(args: argparse.Namespace) -> int:
    """Each line drawn in turn as `sdlab <mode>` draws it, one model load for the lines that share it; an error
    names its line."""
    from sdlab.checkpoints.errors import CheckpointError
    from sdlab.cli.generate import run_generate

    pipelines: dict[Any, Any] = {}
    for where, ns in line_namespaces(args):
        try:
            run_generate(ns, pipelines)
        except (UserError, CheckpointError) as err:       # a model that does not load, a file not written
            raise UserError(f"{where}: {err}") from None
    return 0
