"""Run checkpoints: the whole state of a training run in one file, written atomically.

A run checkpoint ``<output_dir>/checkpoints/step-00000100.pt`` holds the trainable weights, the EMA
shadow, the optimiser and LR-schedule states, the step (which is also the data position, see
`sdlab.train.data`), every RNG state and the config. It is written to a temporary file in the same
folder, flushed and fsynced, then renamed over the final name (POSIX ``rename`` is atomic), and the folder
is fsynced. A process killed at any moment (SIGKILL included) leaves either the previous set of complete
checkpoints or that set plus the new one; at worst an orphan ``.*.tmp`` file, which `latest_checkpoint`
ignores and `clean_orphans` deletes. Old checkpoints beyond ``keep`` are deleted only after the new one
is in place.

Loading uses ``torch.load(weights_only=True)``: the file holds only tensors and plain containers.
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdlab.utils.files import atomic_write

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT_VERSION",
    "capture_rng_state",
    "checkpoint_path",
    "clean_orphans",
    "latest_checkpoint",
    "list_checkpoints",
    "load_run_checkpoint",
    "prune_checkpoints",
    "restore_rng_state",
    "save_run_checkpoint",
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


def save_run_checkpoint(state: dict[str, Any], folder: Path, step: int) -> Path:
    """Write ``state`` as ``step-<step>.pt`` in ``folder`` atomically (temp file, fsync, rename)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = checkpoint_path(folder, step)
    atomic_write(target, lambda tmp: torch.save({"format": FORMAT_VERSION, **state}, tmp))
    logger.info("saved run checkpoint %s", target)
    return target


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints."""
    found = list_checkpoints(folder)
    for _, path in found[: max(0, len(found) - max(1, keep))]:
        path.unlink(missing_ok=True)


def load_run_checkpoint(path: Path) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} is not an sdlab run checkpoint (format {FORMAT_VERSION})")
    return state


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
