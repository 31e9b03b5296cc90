"""Files that may sit beside a single-file checkpoint and say more about it, as A1111 reads them.

The CompVis / lllyasviel config `<name>.yaml`: A1111 reads these to learn what the tensors cannot show:
`model.params.parameterization` ("v" for SD2's 768-px models), `model.params.global_average_pooling` (the
shuffle ControlNet). Parsed with YAML's safe loader (no tags, no objects), at most `MAX_BYTES`.

The VAE `<name>.vae.ckpt` / `.vae.pt` / `.vae.safetensors` (`vae_beside`): with its default `sd_vae`
"Automatic", A1111 draws the model with it (`sd_vae.resolve_vae_near_checkpoint`) and never lists it as a
checkpoint (`sd_models.list_models`' `ext_blacklist`).
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


#: A1111's sidecar VAE names, in the order it finds them (its VAE list globs `*.vae.ckpt`, `.vae.pt`, then
#: `.vae.safetensors` under the models folder)
VAE_SUFFIXES = (".vae.ckpt", ".vae.pt", ".vae.safetensors")


def vae_beside(path: Path) -> Path | None:
    """`<name>.vae.ckpt` / `.vae.pt` / `.vae.safetensors` beside the checkpoint file `path` (its name without
    its suffix), the first found; None when there is none or `path` is a folder."""
    if not path.is_file():
        return None
    return next((v for v in (path.with_name(path.stem + s) for s in VAE_SUFFIXES) if v.is_file()), None)


def is_sidecar_vae(path: Path) -> bool:
    """Whether `path` is named as a sidecar VAE (A1111 lists no such file as a checkpoint)."""
    return path.name.lower().endswith(VAE_SUFFIXES)


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


__all__ = ["MAX_BYTES", "VAE_SUFFIXES", "is_sidecar_vae", "model_params", "sidecar_of", "vae_beside"]
