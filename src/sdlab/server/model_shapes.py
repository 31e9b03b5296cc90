"""A checkpoint's U-Net (and its whole bundle) as its names and shapes describe it, for the checks a job gets as it
is posted while its model is not loaded.

`plan_checkpoint` reads a safetensors file's header (a folder's configs, a pickle's records without their data) and
no weight; the U-Net its plan builds on the meta device has every layer's shape and no tensor. The server checks a
job against it as against the loaded model's (DeepCache's branch, an IP-Adapter's cross-attention widths), so a job
that cannot run on its model is refused at submit whether that model is loaded or not. Kept per file version.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from sdlab.checkpoints.errors import CheckpointError
from sdlab.families.loaded import ModelBundle
from sdlab.utils.file_hashes import read_per_version


def planned_unet(path: Path) -> nn.Module | None:
    """The U-Net of the checkpoint at `path` on the meta device, or None where planning it fails (the worker's load
    then names the problem, as before)."""
    return read_per_version(path, _planned_unet)


def _planned_unet(path: Path) -> nn.Module | None:
    from sdlab.checkpoints.load import plan_checkpoint

    try:
        return plan_checkpoint(path).unet.build_meta()
    except (CheckpointError, OSError, ValueError):
        return None


def planned_bundle(path: Path) -> ModelBundle | None:
    """The checkpoint at `path` as a `ModelBundle` on the meta device (`load.meta_bundle`: its text encoders' depths,
    its family's rules), or None where planning it fails (the worker's load then names the problem)."""
    return read_per_version(path, _planned_bundle)


def _planned_bundle(path: Path) -> ModelBundle | None:
    from sdlab.checkpoints.load import meta_bundle, plan_checkpoint

    try:
        return meta_bundle(plan_checkpoint(path))
    except (CheckpointError, OSError, ValueError):
        return None
