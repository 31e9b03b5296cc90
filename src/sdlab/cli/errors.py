"""Errors the command line reports as one line."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from sdlab.utils.text import not_utf8


class UserError(Exception):
    """An error caused by the input (bad arguments, unreadable files): printed as one line, exit status 2."""


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like KeyboardInterrupt (cleaning up on the way), exit status 143."""


def is_disk_full(err: OSError) -> bool:
    return err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def write_error(err: OSError, target: str | os.PathLike[str], detail: str = "") -> UserError:
    """The one-line error for outputs that could not be written (and of which nothing was written)."""
    if is_disk_full(err):
        return UserError(f"the disk is full: cannot write {target}; nothing was written{detail}")
    return UserError(f"cannot write {target}: {err.strerror or err}; nothing was written")


def path_error(err: OSError) -> str:
    """The one-line error for a file operation the system refused: the path(s), then why."""
    paths = " -> ".join(str(path) for path in (err.filename, err.filename2) if path is not None)
    return f"{paths}: {err.strerror or err}"


def utf8_text(what: str) -> Callable[[str], str]:
    """The argparse type of text sdlab writes into its files as UTF-8 (a prompt), named `what` in errors: an
    argument holding a byte that is not UTF-8 (`sdlab.utils.text.not_utf8`) is a `UserError` while the
    arguments are parsed, before any model loads. An option of this type takes the word after it as its text
    even where that starts with a minus (`--negative -blurry`; `sdlab.cli.CommandParser`)."""
    def text(value: str) -> str:
        problem = not_utf8(value, what)
        if problem is not None:
            raise UserError(problem)
        return value

    text.free_text = True   # type: ignore[attr-defined]
    return text


def takes_free_text(action) -> bool:
    """Whether the argparse action's value is free text (its type a `utf8_text`)."""
    return getattr(action.type, "free_text", False)
