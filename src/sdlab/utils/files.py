"""Writing a file atomically: a reader sees the old file or the complete new one, never half of one.

The content goes to a temporary file ``.<name>.<8 hex>.tmp`` in the target's folder (same file system, so
the final ``os.replace`` is an atomic rename on POSIX and Windows). With ``fsync`` the temporary file is
flushed to disk before the rename and the folder after it, so a crash or a SIGKILL at any moment leaves
either the previous file or the new one, at worst plus an orphan ``.*.tmp``. On any error the temporary
file is removed and the target is left as it was. The temporary file is created like ``open()`` creates
files (mode 0o666 minus the umask) and fails if the folder does not exist.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "fsync_dir"]


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
