"""The `sdlab` command line: argparse subcommands, each a small `add_*` (arguments) + `run_*` (action) pair.

    sdlab inspect PATH [--family F] [--prediction P] [--vae FILE] [--json]

Errors the user can fix (a bad file, a missing path) print one line, `sdlab: error: ...`, on stderr and exit
with status 2; anything else exits 1, also without a traceback unless `--debug` or `SDLAB_DEBUG=1`.
Nothing runs at import time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence

from sdlab.checkpoints.errors import CheckpointError
from sdlab.families import family_names

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1


class UserError(Exception):
    """An error caused by the input (bad arguments, unreadable files): printed as one line, exit status 2."""


# ----------------------------------------------------------------------------------------------------------
# inspect


def add_inspect(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="describe a checkpoint: family, prediction type, configs, parameter counts, dtypes, keys",
        description="Read a checkpoint's names, shapes and metadata (no weights) and describe what sdlab sees.",
    )
    p.add_argument("path", help="a .safetensors / .ckpt file or a diffusers folder")
    p.add_argument("--family", choices=family_names(), help="skip detection and treat the file as this family")
    p.add_argument("--prediction", choices=("eps", "v", "x0"), help="override the prediction type")
    p.add_argument("--vae", help="a standalone VAE file or diffusers VAE folder to use instead of the file's own")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    p.set_defaults(run=run_inspect)


def _format_inspect(report: dict) -> str:
    lines = [
        f"file            {report['source']}",
        f"family          {report['family']} ({report['family_source']}): {report['description']}",
        f"prediction      {report['prediction']} ({report['prediction_source']})",
        f"latent scaling  {report['scaling_factor']}",
        f"default size    {report['default_size']} px",
        f"keys            {report['total_keys']} in the file; {report['total_parameters']:,} parameters in all",
        "components:",
    ]
    for c in report["components"]:
        lines.append(
            f"  {c['name']:<14} {c['parameters']:>14,} parameters  {c['keys']:>5} tensors  {'/'.join(c['dtypes'])}"
        )
        config = ", ".join(f"{k}={v}" for k, v in c["config"].items())
        lines.append(f"  {'':<14} {config}")
        if c["ignored_keys"]:
            lines.append(f"  {'':<14} ignored: {', '.join(c['ignored_keys'])}")
    ignored = report["ignored_keys"]
    if ignored:
        ema = [k for k in ignored if k.startswith("model_ema.")]
        others = [k for k in ignored if not k.startswith("model_ema.")]
        shown = others + ([f"model_ema.* ({len(ema)} keys)"] if ema else [])
        lines.append(f"ignored keys    {len(ignored)}: {', '.join(shown)}")
    else:
        lines.append("ignored keys    none")
    lines.append("missing keys    none (every network's keys and shapes match)")
    return "\n".join(lines)


def run_inspect(args: argparse.Namespace) -> int:
    from sdlab.checkpoints.load import plan_checkpoint

    plan = plan_checkpoint(args.path, family=args.family, prediction=args.prediction, vae=args.vae)
    report = plan.report.to_json()
    report["total_parameters"] = sum(c["parameters"] for c in report["components"])
    print(json.dumps(report, indent=2) if args.json else _format_inspect(report))
    return 0


# ----------------------------------------------------------------------------------------------------------
# Entry point

SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (add_inspect,)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdlab", description="Stable Diffusion from scratch in PyTorch.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (also SDLAB_DEBUG=1)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def _error(message: str) -> None:
    print(f"sdlab: error: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 internal error, 2 user error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("SDLAB_DEBUG", "") not in ("", "0")
    level = logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.run(args)
    except (CheckpointError, UserError, FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        if debug:
            raise
        _error(str(exc) or type(exc).__name__)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # `sdlab inspect x | head`: the reader left; stay quiet at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_INTERNAL_ERROR
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as exc:  # a bug: one line unless debugging
        if debug:
            raise
        _error(f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)")
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
