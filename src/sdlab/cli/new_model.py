"""`sdlab new-model OUT`: a freshly initialised checkpoint of a family, full size or reduced width.

Training from scratch starts from such a file (`sdlab train --model OUT ...`); the reduced-width variant
is also the quickest way to see the whole tool chain work without downloading weights. The weights are
written in fp16 unless ``--dtype`` says otherwise, as released checkpoints are shared (half the size of fp32;
every command loads a file in its own dtype), and made as they are written, one layer at a time
(`sdlab.checkpoints.create.write_new_model`): a full-size SDXL never needs its 14 GB of fp32 weights in memory.
"""

from __future__ import annotations

import argparse

from sdlab.families import family_names


def add_new_model(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "new-model",
        help="write a freshly initialised checkpoint (random weights) of a model family",
        description="Write a checkpoint with seeded random weights in the original single-file layout.",
    )
    p.add_argument("out", help="output .safetensors file")
    p.add_argument("--family", choices=family_names(), default="sd1", help="model family (default sd1)")
    p.add_argument("--tiny", action="store_true",
                   help="reduced width (a few MB) instead of the released size; its native size is 64 px "
                        "(recorded in the file), not the family's 512 / 768 / 1024")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights, 0 to 2**64 - 1 (default 0)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16",
                   help="dtype of the weights written (default fp16, as released checkpoints; fp32: PyTorch's "
                        "initial values unrounded)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it exists (without it an existing file is refused: random weights written "
                        "over a trained checkpoint by a mistyped name would be lost work)")
    p.set_defaults(run=run_new_model)


def run_new_model(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sdlab.checkpoints.create import write_new_model
    from sdlab.cli.errors import UserError, write_error
    from sdlab.pipeline.request import MAX_SEED
    from sdlab.utils.dtypes import dtype_from_name
    from sdlab.utils.files import make_output_folder

    if not args.out.endswith(".safetensors"):
        raise UserError(f"the output must be a .safetensors file, got {args.out!r}")
    if not 0 <= args.seed <= MAX_SEED:
        raise UserError(f"--seed must be an integer in 0..{MAX_SEED}, got {args.seed}")
    if Path(args.out).exists() and not args.overwrite:
        raise UserError(f"{args.out} exists; pass --overwrite to replace it with random weights")
    make_output_folder(Path(args.out).parent, "the output file's folder")   # before the weights are made
    try:
        write_new_model(args.out, args.family, tiny=args.tiny, seed=args.seed, dtype=dtype_from_name(args.dtype))
    except OSError as err:                   # a full disk: no file named by the write itself
        raise write_error(err, args.out) from None
    print(args.out)
    return 0
