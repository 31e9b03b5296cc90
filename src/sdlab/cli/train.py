"""`sdlab train`: the subcommand's arguments (the settings of `sdlab.train.config`); the training code is
imported only when it runs, so other subcommands start without it."""

from __future__ import annotations

import argparse

from sdlab.train.config import TRAIN_EPILOG, add_config_arguments

__all__ = ["add_train"]


def add_train(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="train or fine-tune (U-Net, LoRA, VAE, text encoder) with resumable checkpoints",
        description="Train a model. Settings come from --config (TOML/JSON) and the options below; with "
                    "--resume, from the run checkpoint first.",
        epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser)
    parser.set_defaults(run=run_train)
    return parser


def run_train(args: argparse.Namespace) -> int:
    from sdlab.train.cli import run_train as run

    return run(args)
