"""The `sdlab` command line: argparse subcommands, each a small `add_*` (arguments) + `run_*` (action) pair.

    sdlab txt2img PROMPT [--model PATH] [--steps N] [--seed S] ...    (cli/generate.py)
    sdlab img2img PROMPT --init IMAGE [--strength S] ...
    sdlab inpaint PROMPT --init IMAGE --mask MASK | --outpaint L,R,T,B ...
    sdlab inspect PATH [--family F] [--prediction P] [--vae FILE] [--json]   (cli/inspect.py)
    sdlab new-model OUT [--family F] [--tiny] [--dtype D] [--overwrite]     (cli/new_model.py)
    sdlab train --task unet|vae|text --data DIR ...                        (cli/train.py, sdlab/train/)
    sdlab eval PROMPTS [--model PATH] [--seeds N] [--cfg C] --out DIR       (cli/evaluate.py)
    sdlab serve [--host H] [--port P] [--models-dir DIR] ...               (cli/serve.py, sdlab/server/)
    sdlab upscale IMAGE --model F [--scale S] --out OUT                    (cli/upscale.py)
    sdlab grid PROMPT --x FIELD=V1,V2 [--y ...] [--z ...] --out GRID.png  (cli/grid.py)
    sdlab merge A [B [C]] [--method M] [--multiplier M] --out OUT          (cli/merge.py)

Errors the user can fix (a bad file, a missing path, an output folder that cannot be written, a full disk:
every error the system gives about a path) print one line, `sdlab: error: ...`, on stderr and exit with
status 2; anything else exits 1, also without a traceback unless `--debug` or `SDLAB_DEBUG=1`. Ctrl-C
exits 130 and SIGTERM 143 (128 + the signal number, as a shell reports a killed process), after removing
any half-written file; the `sdlab` process (`sdlab.command`) does the same for a Ctrl-C while torch and
this package are imported. `sdlab train` installs its own SIGINT / SIGTERM handler while it runs (finish
the step, write a checkpoint). Importing does no work beyond importing torch.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn

from sdlab.checkpoints.errors import CheckpointError
from sdlab.cli.errors import Terminated, UserError, is_disk_full, path_error
from sdlab.cli.evaluate import add_evaluate
from sdlab.cli.generate import add_generate
from sdlab.cli.grid import add_grid
from sdlab.cli.inspect import add_inspect
from sdlab.cli.merge import add_merge
from sdlab.cli.new_model import add_new_model
from sdlab.cli.serve import add_serve
from sdlab.cli.train import add_train
from sdlab.cli.upscale import add_upscale
from sdlab.utils.interrupt import report_interrupted
from sdlab.utils import allocator
from sdlab.utils.files import OutputFolderError

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
EXIT_TERMINATED = 128 + signal.SIGTERM      # 143


# ----------------------------------------------------------------------------------------------------------
# Entry point

SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    add_generate, add_inspect, add_new_model, add_train, add_evaluate, add_serve, add_upscale, add_grid, add_merge,
)


def package_version() -> str:
    """The installed package's version (its metadata), else the source tree's `sdlab.__version__`."""
    from importlib import metadata

    try:
        return metadata.version("sdlab")
    except metadata.PackageNotFoundError:
        from sdlab import __version__

        return __version__


class CommandParser(argparse.ArgumentParser):
    """argparse with sdlab's error line: a bad option value or choice is a `UserError` (`sdlab: error: ...`,
    exit 2, naming the command whose --help lists the options), not argparse's usage block; and a value that
    starts with a minus and a digit (`--outpaint -8,0,0,0`) is read as a value, as Python 3.13's argparse
    reads it, not as an unknown option. Subcommands' parsers are made of the same class.

    An option of another subcommand that this one lacks (`foreign_options`, filled by `build_parser`) is
    refused by name, not read as the abbreviation of a longer option it begins: `sdlab img2img --mask M` is
    not `--mask-weight M`, `sdlab eval --seed 7` not `--seeds 7`, `sdlab img2img --tile 512` not
    `--tile-overlap 512`; the refusal names the options of this subcommand it begins (`sdlab train --out D`:
    did you mean --output-dir?). Other abbreviations (`--hr-den` for `--hr-denoise`) are read as argparse
    reads them; one that begins several options (`--neg`: --negative, --negative-prompt-2, ...) is ambiguous."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"-\.?\d")
        self.foreign_options: dict[str, list[str]] = {}   # option -> the other subcommands that have it

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} ({self.prog} --help lists the options)")

    def _get_option_tuples(self, option_string: str) -> list:
        option = option_string.split("=", 1)[0]
        owners = self.foreign_options.get(option)
        if owners:
            where = ", ".join(f"sdlab {name}" for name in owners)
            begun = sorted(own for own in self._option_string_actions if own.startswith(option) and own != option)
            meant = f"did you mean {' or '.join(begun)}? " if begun else ""
            raise UserError(f"{self.prog} has no {option} option (an option of {where}); "
                            f"{meant}{self.prog} --help lists the options")
        return super()._get_option_tuples(option_string)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="sdlab", description="Stable Diffusion from scratch in PyTorch.")
    parser.add_argument("--version", action="version", version=f"sdlab {package_version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (also SDLAB_DEBUG=1)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    _refuse_other_commands_options(subparsers.choices)
    return parser


def _refuse_other_commands_options(commands: dict[str, argparse.ArgumentParser]) -> None:
    """Give each subcommand's parser the long options only other subcommands have (`CommandParser`)."""
    options = {name: {o for o in command._option_string_actions if o.startswith("--")}
               for name, command in commands.items()}
    for name, command in commands.items():
        foreign: dict[str, list[str]] = {}
        for other, other_options in options.items():
            for option in other_options - options[name]:
                foreign.setdefault(option, []).append(other)
        command.foreign_options = foreign


def _error(message: str) -> None:
    print(f"sdlab: error: {' '.join(str(message).split())}", file=sys.stderr)


def _user_error_message(exc: Exception) -> str:
    """The line of a user error: a file operation the system refused names its path(s) as any other does
    (`path_error`), the rest their own message."""
    if isinstance(exc, OSError) and exc.filename is not None:
        return path_error(exc)
    return str(exc) or type(exc).__name__


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While the command runs, SIGTERM raises `Terminated` (so `finally` blocks remove temporary files)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 internal error, 2 user error, 130 / 143 signal)."""
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            raise UserError(f"unrecognized arguments: {' '.join(unknown)} (sdlab {args.command} --help lists the options)")
    except UserError as exc:   # argparse's own errors (`CommandParser`) and an argument's check (`cli.errors.utf8_text`)
        _error(str(exc))
        return EXIT_USER_ERROR
    allocator.tune()  # this process is sdlab's own: let glibc reuse activation-sized blocks
    debug = args.debug or os.environ.get("SDLAB_DEBUG", "") not in ("", "0")
    level = logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    try:
        with _sigterm_raises():
            return args.run(args)
    except (CheckpointError, UserError, OutputFolderError, FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        if debug:
            raise
        _error(_user_error_message(exc))
        return EXIT_USER_ERROR
    except BrokenPipeError:  # `sdlab inspect x | head`: the reader left; stay quiet at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_INTERNAL_ERROR
    except KeyboardInterrupt:
        return report_interrupted()
    except Terminated:
        _error("terminated")
        return EXIT_TERMINATED
    except Exception as exc:  # a bug: one line unless debugging
        if debug:
            raise
        if isinstance(exc, OSError) and is_disk_full(exc):
            _error(f"the disk is full: {exc.strerror} ({exc.filename or 'while writing'})")
            return EXIT_USER_ERROR
        if isinstance(exc, OSError) and exc.filename is not None:   # a path in the way, read-only, ...
            _error(path_error(exc))
            return EXIT_USER_ERROR
        _error(f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)")
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
