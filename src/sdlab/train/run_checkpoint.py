"""Run checkpoints: the whole state of a training run in one file, written atomically.

A run checkpoint ``<output_dir>/checkpoints/step-00000100.pt`` holds the trainable weights, the EMA
shadow, the optimiser and LR-schedule states, the step (which is also the data position, see
`sdlab.train.data`), every RNG state and the config. It is written to a temporary file in the same
folder, flushed and fsynced, then renamed over the final name (POSIX ``rename`` is atomic), and the folder
is fsynced. A process killed at any moment (SIGKILL included) leaves either the previous set of complete
checkpoints or that set plus the new one; at worst an orphan ``.*.tmp`` file, which `latest_checkpoint`
ignores and `clean_orphans` deletes. Old checkpoints beyond ``keep`` are deleted only after the new one
is in place.

Each checkpoint has a ``step-00000100.pt.sha256`` beside it (``sha256sum -c`` reads it). Loading verifies
it, then that the file unpickles and every float tensor is finite; ``--resume latest`` takes the newest
checkpoint that passes and says which ones it passed over (a truncated, zeroed or bit-flipped file). A
checkpoint without its ``.sha256`` (older runs, or a kill between the two renames) is checked by loading.

A full disk is reported as such (`TrainError`), checked before writing from the state's size and
recognised afterwards from ENOSPC or torch's ``unexpected pos`` short-write message.

Loading uses ``torch.load(weights_only=True)``: the file holds only tensors and plain containers.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import random
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdlab.train.errors import TrainError
from sdlab.utils.files import atomic_write

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT_VERSION",
    "DamagedCheckpoint",
    "DiskFull",
    "ResumePoint",
    "checksum_path",
    "disk_full_as_error",
    "find_resume_point",
    "capture_rng_state",
    "checkpoint_path",
    "clean_orphans",
    "latest_checkpoint",
    "list_checkpoints",
    "load_run_checkpoint",
    "prune_checkpoints",
    "restore_rng_state",
    "save_run_checkpoint",
    "stored_config",
]

FORMAT_VERSION = 1
_NAME = re.compile(r"^step-(\d+)\.pt$")


def checkpoint_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"step-{step:08d}.pt"


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``folder`` as (step, path), oldest first (temporary files excluded)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(folder: Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def clean_orphans(folder: Path) -> int:
    """Delete temporary files left by a writer that was killed; returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    orphans = [p for p in folder.iterdir() if p.name.startswith(".step-") and p.name.endswith(".tmp")]
    for p in orphans:
        p.unlink(missing_ok=True)
    if orphans:
        logger.warning("removed %d incomplete checkpoint file(s) in %s", len(orphans), folder)
    return len(orphans)


def checksum_path(path: Path) -> Path:
    """The ``.sha256`` file beside a run checkpoint."""
    return Path(path).with_name(Path(path).name + ".sha256")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside nested dicts / lists / tuples."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def _human(nbytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


def _free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


# how writers word a short write: the OS, safetensors (Rust), torch's zip writer (large / small files)
_FULL_DISK_WORDS = ("No space left", "os error 28", "Disk quota exceeded", "unexpected pos", "file write failed",
                    "iostream error")


def _is_full_disk(exc: BaseException, folder: Path, needed: int) -> bool:
    """ENOSPC / EDQUOT, a writer's words for a short write, or less room left than the file needs."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if any(words in str(exc) for words in _FULL_DISK_WORDS):
        return True
    try:
        return _free_bytes(folder) < needed
    except OSError:
        return False


class DiskFull(TrainError):
    """A run's file did not fit on the disk (nothing of it was written)."""


@contextlib.contextmanager
def disk_full_as_error(folder: Path, what: str, needed: int = 0) -> Iterator[None]:
    """Turn a failed write that ran out of disk into a `DiskFull` error saying so (other errors pass)."""
    try:
        yield
    except Exception as exc:
        if not _is_full_disk(exc, folder, needed):
            raise
        raise DiskFull(f"cannot write {what}: the disk is full ({_human(_free_bytes(folder))} free in {folder}); "
                       f"free some space (or lower --keep-checkpoints) and resume; earlier checkpoints are "
                       f"intact") from None


def save_run_checkpoint(state: dict[str, Any], folder: Path, step: int) -> Path:
    """Write ``state`` as ``step-<step>.pt`` in ``folder`` atomically (temp file, fsync, rename), then its
    ``.sha256``. A `TrainError` when the disk has no room for it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = checkpoint_path(folder, step)
    payload = {"format": FORMAT_VERSION, **state}
    needed = sum(t.numel() * t.element_size() for t in _tensors(payload))
    if _free_bytes(folder) < needed:
        raise DiskFull(f"cannot write run checkpoint {target}: the disk is full (it needs at least {_human(needed)}, "
                       f"{_human(_free_bytes(folder))} free in {folder}); free some space (or lower "
                       f"--keep-checkpoints) and resume; earlier checkpoints are intact")
    digest: list[str] = []

    def write(tmp: Path) -> None:
        torch.save(payload, tmp)
        digest.append(file_sha256(tmp))

    with disk_full_as_error(folder, f"run checkpoint {target}", needed):
        checksum_path(target).unlink(missing_ok=True)  # a stale one must never vouch for the new file
        atomic_write(target, write)
        atomic_write(checksum_path(target), lambda tmp: tmp.write_text(f"{digest[0]}  {target.name}\n"))
    logger.info("saved run checkpoint %s", target)
    return target


def prune_checkpoints(folder: Path, keep: int, written: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints up to step ``written``, the one just written
    (with their ``.sha256``); later ones (passed over as damaged by ``--resume latest``) are left alone."""
    found = [(step, path) for step, path in list_checkpoints(folder) if step <= written]
    for _, path in found[: max(0, len(found) - max(1, keep))]:
        path.unlink(missing_ok=True)
        checksum_path(path).unlink(missing_ok=True)


class DamagedCheckpoint(TrainError):
    """A run checkpoint that fails its checksum, cannot be unpickled or holds non-finite numbers."""


def load_run_checkpoint(path: Path) -> dict[str, Any]:
    """Load a run checkpoint after checking that it is whole (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"run checkpoint {path} does not exist")
    sidecar = checksum_path(path)
    if sidecar.is_file():
        expected = (sidecar.read_text(encoding="utf-8", errors="replace").split() or [""])[0].lower()
        if file_sha256(path) != expected:
            raise DamagedCheckpoint(f"run checkpoint {path} is damaged: its SHA-256 differs from {sidecar.name}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated / zeroed / garbled zip or pickle: torch raises many types
        raise DamagedCheckpoint(f"run checkpoint {path} is damaged: it cannot be read "
                                f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise DamagedCheckpoint(f"{path} is not an sdlab run checkpoint (format {FORMAT_VERSION})")
    for tensor in _tensors(state):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise DamagedCheckpoint(f"run checkpoint {path} is damaged: it holds non-finite numbers")
    return state


def stored_config(path: Path) -> dict[str, Any]:
    """The settings a run checkpoint stores, read without loading its tensors (memory-mapped) or checking its
    checksum; empty when it cannot be read."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # damaged: torch raises many types
        return {}
    config = state.get("config") if isinstance(state, dict) else None
    return config if isinstance(config, dict) else {}


_RESUME_KEYS = ("step", "config", "global_batch", "modules", "optimizer", "scheduler", "rng")


@dataclass
class ResumePoint:
    """A verified run checkpoint to continue from. ``take_state`` hands the (large) state over once."""

    path: Path
    step: int
    config: dict[str, Any]
    global_batch: int
    state: dict[str, Any] | None

    def take_state(self) -> dict[str, Any]:
        state, self.state = self.state, None
        if state is None:
            state = load_run_checkpoint(self.path)
        return state


def _resume_point(path: Path) -> ResumePoint:
    state = load_run_checkpoint(path)
    missing = [k for k in _RESUME_KEYS if k not in state]
    if missing:
        raise DamagedCheckpoint(f"run checkpoint {path} lacks {', '.join(missing)}")
    return ResumePoint(path, int(state["step"]), dict(state["config"]), int(state["global_batch"]), state)


def _checkpoints_in(folder: Path) -> str:
    """The run checkpoints a folder given to ``--resume`` holds, by step: the folder's own (a run's checkpoints
    folder) or its ``checkpoints`` folder's (a run's output folder); "" when neither holds any."""
    for held in (folder, folder / "checkpoints"):
        found = list_checkpoints(held)
        if found:
            steps = ", ".join(str(step) for step, _ in found[-8:])
            return f"; {held} holds those of step {'..., ' if len(found) > 8 else ''}{steps}"
    return ""


def _checkpoints_beside(path: Path) -> str:
    """The run checkpoints in the folder of a missing ``path``, by step, and that a run deletes all but its newest
    ``--keep-checkpoints`` (the usual reason a step's checkpoint is gone); "" when the folder holds none."""
    found = list_checkpoints(path.parent)
    if not found:
        return ""
    steps = ", ".join(str(step) for step, _ in found[-8:])
    return (f"; {path.parent} holds those of step {'..., ' if len(found) > 8 else ''}{steps}: a run keeps its newest "
            f"--keep-checkpoints (2 by default) and deletes the older ones")


def find_resume_point(folder: Path, resume: str) -> ResumePoint | None:
    """What ``--resume`` names: ``"latest"`` = the newest checkpoint in ``folder`` that verifies (a warning
    for each newer one passed over; None when there is none at all), or a checkpoint path (verified)."""
    if resume != "latest":
        if Path(resume).is_dir():
            raise TrainError(f"--resume {resume}: a folder, not a run checkpoint (name one of its steps' files, or "
                             f"use --resume latest){_checkpoints_in(Path(resume))}")
        if not Path(resume).is_file():
            raise TrainError(f"--resume {resume}: no such run checkpoint (or use --resume latest)"
                             f"{_checkpoints_beside(Path(resume))}")
        return _resume_point(Path(resume))
    damaged: list[str] = []
    for _, path in reversed(list_checkpoints(folder)):
        try:
            point = _resume_point(path)
        except DamagedCheckpoint as exc:
            logger.warning("%s; trying the one before it", exc)
            damaged.append(path.name)
            continue
        if damaged:
            logger.warning("resuming from %s, the newest valid run checkpoint (passed over: %s)", path.name,
                           ", ".join(damaged))
        return point
    if damaged:
        raise TrainError(f"--resume latest: every run checkpoint in {folder} is damaged ({', '.join(damaged)})")
    return None


def capture_rng_state() -> dict[str, Any]:
    """Global RNG states (python, numpy, torch CPU and CUDA). The loop itself draws from derived
    generators; these are saved so that anything else drawing from the global RNGs resumes too."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {"kind": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
