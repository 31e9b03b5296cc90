"""`sdlab grid` (being built)."""

from __future__ import annotations

import argparse


def add_grid(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("grid", help="(being built)")
    p.set_defaults(run=run_grid)


def run_grid(args: argparse.Namespace) -> int:
    from sdlab.cli.errors import UserError

    raise UserError("sdlab grid is not built yet")
