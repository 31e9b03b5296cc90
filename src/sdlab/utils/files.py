"""Writing a file atomically (a reader sees the old file or the complete new one, never half of one), and
checking an output folder before any work.

The content goes to a temporary file ``.<name>.<8 hex>.tmp`` in the target's folder (same file system, so
the final ``os.replace`` is an atomic rename on POSIX and Windows). With ``fsync`` the temporary file is
flushed to disk before the rename and the folder after it, so a crash or a SIGKILL at any moment leaves
either the previous file or the new one, at worst plus an orphan ``.*.tmp``. On any error the temporary
file is removed and the target is left as it was. The temporary file is created like ``open()`` creates
files (mode 0o666 minus the umask) and fails if the folder does not exist.

A command checks where its output goes before the work that makes it (`make_output_folder`): the folder is
made and a file created and deleted in it, so that a file in its path, a read-only file system or a missing
permission is one `OutputFolderError` naming the folder at once, not an error after minutes of drawing.
Two policies, by what a command leaves when it fails:

- made early (`make_output_folder` before the work): `txt2img` / `img2img` / `inpaint`, `evaluate`,
  `new-model`, `serve` and `train`, whose folder is where their work lives from the start;
- checked early, made only when writing (`check_output_folder` before the work, which removes the folders
  it made, then `make_output_folder` when the file is written): `grid` and `upscale`, so that a run that
  fails leaves no empty folder behind.

A folder used by one process at a time (a server's output folder, a training run's) holds a lock file
(`hold_lock_file`): locked with ``flock``, or on Windows with msvcrt's lock of a byte past what the holder
wrote in it, which the system lets go when the process ends however it ends.
"""

from __future__ import annotations

import errno
import os
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

try:
    import fcntl
    msvcrt = None
except ImportError:         # Windows: msvcrt's byte-range lock instead of flock
    fcntl = None
    import msvcrt

__all__ = ["LockHeld", "NO_LOCKS", "OutputFolderError", "atomic_write", "check_output_folder", "fsync_dir",
           "hold_lock_file", "make_output_folder", "release_lock_file"]

WINDOWS_LOCK_BYTE = 64      # the byte msvcrt locks: past what the holder wrote, which Windows lets others read
NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}    # a file system without file locks


class OutputFolderError(Exception):
    """Files cannot be written in an output folder; the message names it (by its option) and says why."""


class LockHeld(Exception):
    """Another process holds a lock file; `holder` is what it wrote in it (its process id)."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object], *, fsync: bool = True) -> Path:
    """Write ``path`` through ``write(temporary_path)``, then rename the temporary file over ``path``.

    ``write`` receives the path of an empty file it may overwrite (``torch.save(obj, p)``,
    ``image.save(p, format="PNG")``, ``p.write_bytes(data)``, ...). ``fsync=False`` skips the two
    flushes to disk (the rename stays atomic; a power cut may then leave an empty file).
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # 0o666 minus umask, like open()
    try:
        write(temporary)
        if fsync:
            with open(temporary, "rb+") as file:
                os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)
    return path


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename in it) to disk; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def make_output_folder(folder: str | os.PathLike[str], name: str = "the output folder") -> Path:
    """Make `folder` (with its parents) when missing and create and delete a file in it; `name` is how the
    error names it (``"--output-dir"``). Returns the folder."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".sdlab-check-"):
            pass
    except FileExistsError:   # mkdir(exist_ok=True) raises it only for the folder itself
        raise OutputFolderError(f"{name} {folder} exists and is not a folder") from None
    except OSError as err:
        raise OutputFolderError(f"cannot write to {name} {folder}: {err.strerror or err}") from None
    return folder


def check_output_folder(folder: str | os.PathLike[str], name: str = "the output folder") -> None:
    """`make_output_folder`, then remove the folders it made: the check alone, for a command that makes its
    folders only when it writes."""
    absolute = Path(folder).absolute()
    missing = [f for f in (absolute, *absolute.parents) if not os.path.lexists(f)]   # deepest first
    try:
        make_output_folder(folder, name)
    finally:
        for made in missing:
            try:
                made.rmdir()
            except OSError:   # not made here after all, or no longer empty
                break


def hold_lock_file(path: Path, holder: str) -> tuple[IO[str], str | None]:
    """(the lock file at `path`, open with `holder` written in it; None when it is locked, else why not: the
    file system has no file locks, `NO_LOCKS`, and the file is held unlocked). Locked for this process without
    waiting (`_lock`); a file another process removed as this one locked it (`release_lock_file`) is locked
    again on the new one. `LockHeld` when another process holds it; an `OSError` when it cannot be opened or
    locked otherwise."""
    while True:
        lock = open(path, "a+")
        try:
            unlocked = _lock(lock)
            if unlocked or _still_at(lock, path):
                break
        except BaseException:
            lock.close()
            raise
        lock.close()
    lock.truncate(0)
    lock.write(holder)
    lock.flush()
    return lock, unlocked


def release_lock_file(lock: IO[str], path: Path) -> None:
    """Remove the lock file and let go of its lock: removed first, so that a process that locks it meanwhile
    sees it gone (`hold_lock_file`); on Windows, which removes no open file, closed first, and left where
    another process has opened it meanwhile."""
    if fcntl is None:
        lock.close()
        try:
            path.unlink(missing_ok=True)
        except PermissionError:         # open in the process that locks it now
            pass
        return
    path.unlink(missing_ok=True)
    lock.close()


def _lock(lock: IO[str]) -> str | None:
    """Lock the open lock file without waiting: an exclusive `flock`, or on Windows msvcrt's lock of byte
    `WINDOWS_LOCK_BYTE` (Windows locks are mandatory: what the holder wrote before it stays readable). None
    when locked, the system's reason on a file system without file locks; `LockHeld` when another process
    holds it."""
    try:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            lock.seek(WINDOWS_LOCK_BYTE)
            msvcrt.locking(lock.fileno(), msvcrt.LK_NBLCK, 1)
    except OSError as err:
        if err.errno in NO_LOCKS:
            return err.strerror or str(err)
        if not isinstance(err, BlockingIOError if fcntl is not None else PermissionError):   # msvcrt: EACCES
            raise
        lock.seek(0)
        raise LockHeld(lock.read().strip()) from None
    return None


def _still_at(lock: IO[str], path: Path) -> bool:
    """Whether the open file is still the one at `path` (not removed, nor replaced by a new one)."""
    try:
        return os.path.samestat(os.fstat(lock.fileno()), os.stat(path))
    except FileNotFoundError:
        return False
