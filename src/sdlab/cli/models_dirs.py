"""Finding a file by name in the `--models-dir` folders (repeatable): the first folder given that holds the name
wins, as a shell's PATH and ComfyUI's extra model paths (`folder_paths.get_full_path`: the first folder that has
the file) are searched; another file of that name in a later one is warned of, naming both, once. A copy of the
same bytes (one models folder mirrored in another) is no other file."""

from __future__ import annotations

import filecmp
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

logger = logging.getLogger("sdlab")


def first_in_models_dirs(models_dirs: Sequence[str | os.PathLike[str]], find: Callable[[Path], Path | str | None],
                         what: str) -> Path | None:
    """`find(folder)` of the first of `models_dirs` where it finds a file (None where none does); `what` ("the
    LoRA 'detail'") names it in the warning about a different file of the name in a later folder."""
    hits = [Path(hit) for folder in models_dirs if (hit := find(Path(folder))) is not None]
    if not hits:
        return None
    others = list(dict.fromkeys(hit for hit in hits[1:] if not _same_file(hits[0], hit)))
    if others:
        logger.warning("%s is in more than one --models-dir: using %s (the first --models-dir given wins), not %s",
                       what, hits[0], ", ".join(str(other) for other in others))
    return hits[0]


def _same_file(a: Path, b: Path) -> bool:
    """The same file, or files of the same bytes (a folder, a diffusers model: the same folder only)."""
    try:
        if os.path.samefile(a, b):
            return True
        return a.is_file() and b.is_file() and filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def find_upscaler_in(name: str, folders: Sequence[str | os.PathLike[str]],
                     models_dirs: Sequence[str | os.PathLike[str]]) -> str:
    """`sdlab.pipeline.hires.find_upscaler` over `folders`, then over each --models-dir's ESRGAN / RealESRGAN
    folders (`first_in_models_dirs`); `name` unchanged where none holds it (resolving the request then says so)."""
    from sdlab.pipeline.hires import find_upscaler, models_upscaler_folders

    found = find_upscaler(name, list(folders))
    if found != name:
        return found

    def in_models_dir(folder: Path) -> str | None:
        hit = find_upscaler(name, models_upscaler_folders([folder]))
        return hit if hit != name else None

    return str(first_in_models_dirs(models_dirs, in_models_dir, f"the upscaler {name!r}") or name)
