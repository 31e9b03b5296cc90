"""`sdlab merge`: merge checkpoints as A1111's Checkpoint Merger tab does (`sdlab.checkpoints.merge`).

    sdlab merge A.safetensors B.safetensors --multiplier 0.3 --out merged.safetensors          # A*(1-M) + B*M
    sdlab merge inpaint.safetensors custom.safetensors base.safetensors --method add-difference \\
        --multiplier 1 --out models/                                   # A + (B-C)*M, named as A1111 names it
    sdlab merge A.ckpt --method none --fp16 --vae vae-ft-mse.safetensors --out A-fp16.safetensors

The output's folder is checked first (made only when writing); every input is opened and every tensor shape
checked before anything is written; the output (and the config `.yaml` copied beside it) is written under a
temporary name and renamed, so a failed merge leaves nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sdlab.cli.errors import UserError
from sdlab.utils.numbers import finite_float

# command-line spelling -> A1111's name (A1111's own names are taken too)
METHOD_NAMES = {"none": "No interpolation", "weighted-sum": "Weighted sum", "add-difference": "Add difference"}
CONFIG_NAMES = {"abc": 0, "b": 1, "c": 2, "none": 3}          # A1111's "A, B or C", "B", "C", "Don't"


def _method(value: str) -> str:
    spelled = value.strip().lower().replace(" ", "-").replace("_", "-")
    spelled = {"no-interpolation": "none"}.get(spelled, spelled)
    if spelled not in METHOD_NAMES:
        raise UserError(f"--method {value!r}: choose weighted-sum, add-difference or none")
    return METHOD_NAMES[spelled]


def _multiplier(value: str) -> float:
    return finite_float(value, UserError, f"--multiplier {value!r} is not a number",
                        f"--multiplier must be a finite number, got {value}")


def _metadata_json(value: str) -> dict:
    try:
        data = json.loads(value)
    except ValueError as exc:
        raise UserError(f"--metadata-json is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError("--metadata-json must be a JSON object ({\"key\": \"value\", ...})")
    return data


def add_merge(subparsers: argparse._SubParsersAction) -> None:
    help_text = "merge checkpoints as A1111's Checkpoint Merger: weighted sum, add difference, bake in a VAE, fp16"
    p = subparsers.add_parser("merge", help=help_text, description=help_text + ". Models: A (primary), B (secondary), "
                              "C (tertiary), each a .safetensors / .ckpt file or a diffusers folder.")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="A, then B for weighted-sum and add-difference, then C for add-difference")
    p.add_argument("--out", required=True,
                   help="output .safetensors or .ckpt file, or a folder (an existing one, or one ending in '/', made "
                        "when writing) to write A1111's name for the merge in (e.g. '0.7(A) + 0.3(B).safetensors'); "
                        "an existing file is replaced")
    p.add_argument("--method", type=_method, default="Weighted sum",
                   help="weighted-sum: A*(1-M) + B*M (default); add-difference: A + (B-C)*M; none: A alone "
                        "(format conversion, fp16, VAE baking, discarding)")
    p.add_argument("--multiplier", "-M", type=_multiplier, default=0.3, help="M (default 0.3; 0 gives A)")
    p.add_argument("--fp16", action="store_true", help="save the fp32 tensors it merges as fp16 (A1111's Save as float16)")
    p.add_argument("--format", choices=("safetensors", "ckpt"),
                   help="checkpoint format when --out is a folder (default safetensors); a file's suffix says it")
    p.add_argument("--vae", help="bake in this VAE: a VAE file or diffusers VAE folder replaces A's VAE weights")
    p.add_argument("--config-from", choices=tuple(CONFIG_NAMES), default="abc",
                   help="copy the config <name>.yaml beside the first of A, B, C that has one (abc, default), B's, "
                        "C's, or none")
    p.add_argument("--discard", default="", metavar="REGEX",
                   help="drop the weights whose names this regular expression finds (e.g. '^model_ema')")
    p.add_argument("--no-metadata", dest="save_metadata", action="store_false",
                   help="write no metadata (A1111's Save metadata off)")
    p.add_argument("--no-recipe", dest="add_recipe", action="store_false",
                   help="leave out sd_merge_recipe / sd_merge_models (they need each input's sha256)")
    p.add_argument("--no-copy-metadata", dest="copy_metadata", action="store_false",
                   help="do not copy the inputs' metadata fields")
    p.add_argument("--metadata-json", type=_metadata_json, default={}, metavar="JSON",
                   help="a JSON object of metadata fields to add")
    p.set_defaults(run=run_merge)


def _output(args: argparse.Namespace) -> str:
    """The checkpoint format, the output file or folder checked before any model is read."""
    from sdlab.checkpoints.merge import is_folder_output
    from sdlab.utils.files import check_output_folder

    out = Path(args.out)
    if is_folder_output(args.out):
        check_output_folder(out, "--out")
        return args.format or "safetensors"
    suffix = out.suffix.lower().lstrip(".")
    if suffix not in ("safetensors", "ckpt"):
        raise UserError(f"--out {args.out!r}: name a .safetensors or .ckpt file, or a folder (an existing one, or "
                        f"ending in '/')")
    if args.format is not None and args.format != suffix:
        raise UserError(f"--format {args.format} does not match --out {args.out!r}")
    check_output_folder(out.parent, "the folder of --out")
    return suffix


def run_merge(args: argparse.Namespace) -> int:
    from sdlab.checkpoints.merge import MergeOptions, is_folder_output, merge_checkpoints
    from sdlab.cli.errors import write_error

    checkpoint_format = _output(args)
    options = MergeOptions(
        method=args.method, multiplier=args.multiplier, save_as_half=args.fp16,
        vae=Path(args.vae) if args.vae else None, discard=args.discard, config_source=CONFIG_NAMES[args.config_from],
        save_metadata=args.save_metadata, add_recipe=args.add_recipe, copy_metadata=args.copy_metadata,
        metadata_json=args.metadata_json, custom_name="" if is_folder_output(args.out) else Path(args.out).stem,
    )
    try:
        result = merge_checkpoints(args.models, args.out, options, checkpoint_format=checkpoint_format)
    except OSError as err:
        if err.filename is not None:
            raise
        raise write_error(err, args.out) from None
    print(result.path)
    return 0
