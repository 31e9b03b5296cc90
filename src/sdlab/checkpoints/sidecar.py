"""The CompVis / lllyasviel config `.yaml` that may sit beside a single-file checkpoint (`<name>.yaml`).

A1111 reads these to learn what the tensors cannot show: `model.params.parameterization` ("v" for SD2's
768-px models), `model.params.global_average_pooling` (the shuffle ControlNet). Parsed with YAML's safe
loader (no tags, no objects), at most `MAX_BYTES`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdlab.checkpoints.errors import CheckpointError

MAX_BYTES = 1 << 20   # CompVis configs are ~2 KB


def sidecar_of(path: Path) -> Path | None:
    """`<name>.yaml` (or `.yml`) beside the checkpoint file `path`, None when there is none."""
    if not path.is_file():
        return None
    return next((s for s in (path.with_suffix(".yaml"), path.with_suffix(".yml")) if s.is_file()), None)


def model_params(sidecar: Path) -> dict[str, Any]:
    """`model.params` of a config `.yaml` ({} when it has none); one-line `CheckpointError` when it is too
    large or not YAML."""
    import yaml

    with open(sidecar, "rb") as f:
        raw = f.read(MAX_BYTES + 1)
    if len(raw) > MAX_BYTES:
        raise CheckpointError(f"{sidecar}: larger than {MAX_BYTES >> 20} MiB; not a model config")
    try:
        config = yaml.safe_load(raw)
    except (yaml.YAMLError, RecursionError) as exc:
        raise CheckpointError(f"{sidecar}: not valid YAML ({' '.join(str(exc).split())})") from None
    model = config.get("model") if isinstance(config, dict) else None
    params = model.get("params") if isinstance(model, dict) else None
    return params if isinstance(params, dict) else {}


__all__ = ["MAX_BYTES", "model_params", "sidecar_of"]
