"""`sdlab upscale` (being built)."""

from __future__ import annotations

import argparse


def add_upscale(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("upscale", help="(being built)")
    p.set_defaults(run=run_upscale)


def run_upscale(args: argparse.Namespace) -> int:
    from sdlab.cli.errors import UserError

    raise UserError("sdlab upscale is not built yet")
