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
import difflib
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn

from sdlab.checkpoints.errors import CheckpointError
from sdlab.cli.errors import Terminated, UserError, is_disk_full, path_error, takes_free_text
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
    reads them; one that begins several options (`--neg`: --negative, --negative-prompt-2, ...) is ambiguous.

    A word that starts with one minus and names no option (`-blurry`) is a value, the prompt's or an option's, as
    argparse reads one holding a space (`"-blurry face"`); `-steps`, where --steps is an option, is refused (did you
    mean --steps?), as is a one-letter short option (`-s 3`: sdlab's commands have none, `_short_option`), and
    `-v` / `--debug` after the command are refused as `sdlab`'s own options. A free-text option
    (`cli.errors.utf8_text`: --negative, --style, --prompt-2, ...) takes the word after it as its text even where that
    starts with two minuses, as getopt gives an option its argument (POSIX), unless the word names an option
    (`--negative --seed 3`: refused, the negative has no text) or looks like a short one (`--negative -s 3`: sdlab's
    commands have none) or a mistyped one (`--negative --tilling`, `--negative -steps 5`); each refusal says that
    `--negative=--seed` gives that text (`_refused_text`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"-\.?\d")
        self.foreign_options: dict[str, list[str]] = {}   # option -> the other subcommands that have it
        self.main_options: frozenset[str] = frozenset()   # `sdlab`'s own (-v, --debug), given before the command

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} ({self.prog} --help lists the options)")

    def parse_known_args(self, args=None, namespace=None):
        if args is not None:
            args = self._free_text_joined(list(args))
        return super().parse_known_args(args, namespace)

    def _free_text_joined(self, words: list[str]) -> list[str]:
        """`words` with each free-text option and the word after it that starts with a minus but names no option
        made one (`--negative --blurry` -> `--negative=--blurry`), as argparse reads an option's value after '='."""
        joined: list[str] = []
        index = 0
        while index < len(words):
            word = words[index]
            if word == "--":
                return joined + words[index:]
            action = self._option_string_actions.get(word)
            following = words[index + 1] if index + 1 < len(words) else ""
            text_like = (action is not None and takes_free_text(action) and following.startswith("-")
                         and following != "--")
            refusal = self._refused_text(word, following) if text_like else None
            if refusal is not None:
                raise UserError(f"{refusal} ({self.prog} --help lists the options)")
            if text_like and not self._names_option(following):
                joined.append(f"{word}={following}")
                index += 2
            else:
                joined.append(word)
                index += 1
        return joined

    def _refused_text(self, option: str, word: str) -> str | None:
        """Why the free-text `option` cannot take `word`, which starts with a minus, as its text: `word` names one of
        this command's options (`--negative --seed 3`: the negative has no text), looks like a short option
        (`--negative -s 3`: sdlab's commands have none) or like a mistyped one (`--negative --tilling`); each says
        `option=word` gives that text. None where `word` is the text (`-blurry`, `--lowres`, `-1`) or names another
        command's option or `sdlab`'s own (refused as such by argparse)."""
        name = word.split("=", 1)[0]
        own = name in self._option_string_actions or (
            name.startswith("--") and name not in self.foreign_options
            and any(known.startswith(name) for known in self._option_string_actions))
        if own:
            return (f"{option} has no text: the word after it, {word}, is an option of {self.prog}; give the text "
                    f"after {option}, or write {option}={word} if that is the text")
        if self._names_option(word):
            return None
        if self._short_option(name):
            return (f"{option} {word}: {self.prog} has no {name} option (its options have long names), and {option} "
                    f"would take {word} as its text; give the option's long name, or write {option}={word} for that text")
        meant = self._mistyped_option(word)
        if meant is not None:
            return (f"{option} {word}: {word} looks like a mistyped {meant}; give the option, "
                    f"or write {option}={word} for that text")
        return None

    def _short_option(self, name: str) -> bool:
        """Whether `name` (naming no option) is a one-letter short option (`-s`), which a command refuses: sdlab's
        commands have none. `sdlab`'s own parser (no `main_options`: it reads every word first) refuses none."""
        return bool(self.main_options) and re.fullmatch(r"-[A-Za-z]", name) is not None

    def _names_option(self, word: str) -> bool:
        """Whether `word` names an option: this command's (or begins one of its long ones), another command's,
        or `sdlab`'s own."""
        name = word.split("=", 1)[0]
        if name in self._option_string_actions or name in self.foreign_options or self._is_main_option(name):
            return True
        return name.startswith("--") and any(option.startswith(name) for option in self._option_string_actions)

    def _mistyped_option(self, word: str) -> str | None:
        """The option of this command that `word`, naming none, seems a mistyping of: the one with two minuses
        where `word` has one (`-steps`: --steps), else the long option nearest in spelling (`--stpes`: --steps,
        `--tilling`: --tiling; difflib's ratio of at least 0.8, which `--blurry`, `--lowres`, `--bad-hands` are
        far from); None for a word that looks like no option."""
        name = word.split("=", 1)[0]
        if not name.startswith("--"):
            return "-" + name if "-" + name in self._option_string_actions else None
        longs = [option for option in self._option_string_actions if option.startswith("--")]
        nearest = difflib.get_close_matches(name, longs, n=1, cutoff=0.8)
        return nearest[0] if nearest else None

    def _is_main_option(self, name: str) -> bool:
        """`name` is an option of `sdlab` itself: --debug, -v, or -v repeated (-vv)."""
        repeated = len(name) > 2 and name[1] != "-" and set(name[1:]) == {name[1]}
        return name in self.main_options or (repeated and name[:2] in self.main_options)

    def _parse_optional(self, arg_string: str):
        parsed = super()._parse_optional(arg_string)
        if not _names_no_option(parsed):
            return parsed
        name = arg_string.split("=", 1)[0]
        if self._is_main_option(name):
            command = self.prog.split()[-1]
            raise UserError(f"{name} is an option of sdlab, not of {self.prog}: give it before the command "
                            f"(sdlab {name} {command} ...)")
        if arg_string.startswith("--"):
            return parsed
        if self._short_option(name):
            raise UserError(f"{self.prog} has no {name} option (its options have long names; "
                            f"{self.prog} --help lists them)")
        meant = self._mistyped_option(name)
        if meant is not None:
            raise UserError(f"{self.prog} has no {name} option; did you mean {meant}? "
                            f"({self.prog} --help lists the options)")
        return None     # `-blurry`: a value, as argparse reads "-blurry face"

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


def _names_no_option(parsed) -> bool:
    """Whether argparse's `_parse_optional` read a word as an option it has not got (its tuple, or from Python 3.12
    its list of tuples, holding no action)."""
    if parsed is None:
        return False
    first = parsed[0] if isinstance(parsed, list) else parsed
    return first[0] is None


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="sdlab", description="Stable Diffusion from scratch in PyTorch.")
    parser.add_argument("--version", action="version", version=f"sdlab {package_version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (also SDLAB_DEBUG=1)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    _refuse_other_commands_options(subparsers.choices)
    for command in subparsers.choices.values():
        command.main_options = frozenset(parser._option_string_actions)
        _read_choices_in_any_case(command)
    return parser


def _read_choices_in_any_case(command: argparse.ArgumentParser) -> None:
    """An option whose choices are lower-case words (--dtype fp16, --family sdxl, --resize-mode crop) reads its
    value in any case, as --sampler, --schedule, --device and txt2img's --family do: its value is lower-cased
    before the choice is checked (--dtype FP16 is fp16; --dtype fp17 is still refused, naming the choices)."""
    for action in command._actions:
        choices = action.choices
        if (action.type is None and choices and not isinstance(choices, dict)
                and all(isinstance(choice, str) and choice == choice.lower() for choice in choices)):
            action.type = str.lower


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


def _unrecognized(parser: argparse.ArgumentParser, command: str, unknown: list[str]) -> str:
    """The refusal of the words `command` did not read, naming the option the first mistyped one seems to mean
    (`--stpes 3`: did you mean --steps?; `CommandParser._mistyped_option`)."""
    command_parser = parser._subparsers._group_actions[0].choices[command]
    meant = next((f"; did you mean {option}?" for word in unknown if word.startswith("-")
                  and (option := command_parser._mistyped_option(word)) is not None), "")
    return f"unrecognized arguments: {' '.join(unknown)}{meant} (sdlab {command} --help lists the options)"


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
            raise UserError(_unrecognized(parser, args.command, unknown))
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
