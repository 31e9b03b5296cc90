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
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["OutputFolderError", "atomic_write", "check_output_folder", "fsync_dir", "make_output_folder"]


class OutputFolderError(Exception):
    """Files cannot be written in an output folder; the message names it (by its option) and says why."""


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
