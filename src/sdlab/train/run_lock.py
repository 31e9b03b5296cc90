"""One run at a time in a run folder: the lock file ``sdlab-train.lock`` in ``--output-dir``.

The run that holds the file's `flock` (with its process id and host written in it) owns the folder; a second
run started there meanwhile is refused, naming it, before it checks or touches the folder's files. The system
lets go of the lock when the process ends however it ends (a SIGKILL, a crash), so a dead run never blocks a
later one; the file itself is removed at the end of the run. The lock is the server's (`utils.files.
hold_lock_file`: flock, msvcrt's on Windows); where the file system has no file locks (some network mounts)
runs are not told apart, with a warning.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import IO

from sdlab.train.errors import TrainError
from sdlab.utils.files import LockHeld, OutputFolderError, hold_lock_file, make_output_folder, release_lock_file

logger = logging.getLogger(__name__)

__all__ = ["LOCK_NAME", "RunLock"]

LOCK_NAME = "sdlab-train.lock"


class RunLock:
    """``folder``'s lock, held from `acquire` to `release`; the folders `acquire` made for it are removed again
    at `release` when nothing else was written in them (a run refused at its set-up leaves none)."""

    def __init__(self, folder: str | os.PathLike[str], named: str):
        self.folder = Path(folder)
        self.named = named      # how errors name the folder: "--output-dir runs/x"
        self._file: IO[str] | None = None
        self._made: list[Path] = []

    @property
    def path(self) -> Path:
        return self.folder / LOCK_NAME

    def acquire(self) -> None:
        """Hold the lock; a `TrainError` naming the other run's process when another run holds it."""
        absolute = self.folder.absolute()
        self._made = [f for f in (absolute, *absolute.parents) if not os.path.lexists(f)]   # deepest first
        try:
            make_output_folder(self.folder, "--output-dir")
            self._file = self._locked_file()
        except OutputFolderError as err:
            self._remove_made()
            raise TrainError(str(err)) from None
        except BaseException:
            self._remove_made()
            raise

    def release(self) -> None:
        """Remove the lock file and let go of its lock."""
        if self._file is None:
            return
        release_lock_file(self._file, self.path)
        self._file = None
        self._remove_made()

    def _locked_file(self) -> IO[str]:
        """The lock file, locked, with this process's id and host in it; a `TrainError` naming the process that
        holds it."""
        try:
            lock, unlocked = hold_lock_file(self.path, f"{os.getpid()} {socket.gethostname()}\n")
        except LockHeld as held:
            pid, _, host = held.holder.partition(" ")
            holder = f" (process {pid}{f' on {host}' if host and host != socket.gethostname() else ''})" if pid else ""
            raise TrainError(f"{self.named} is in use by another run{holder}, which holds {self.path}: wait for it "
                             f"to end, or choose another --output-dir") from None
        except OSError as err:
            raise TrainError(f"cannot lock {self.path}: {err.strerror or err}") from None
        if unlocked:
            logger.warning("the file system of %s has no file locks (%s): another run started there is not "
                           "detected", self.named, unlocked)
        return lock

    def _remove_made(self) -> None:
        for made in self._made:
            try:
                made.rmdir()
            except OSError:     # not empty: the run wrote there
                break
        self._made = []
