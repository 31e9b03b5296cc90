"""`sdlab serve` (being built)."""

from __future__ import annotations

import argparse


def add_serve(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="(being built)")
    p.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from sdlab.cli.errors import UserError

    raise UserError("sdlab serve is not built yet")
