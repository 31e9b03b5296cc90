"""CLIP image encoders (IP-Adapter's): Hugging Face `CLIPVisionModelWithProjection` files and folders.

    folder   config.json (transformers' CLIPVisionConfig: hidden_size, num_hidden_layers, num_attention_heads,
             intermediate_size, patch_size, image_size, projection_dim, hidden_act, layer_norm_eps) + model
             .safetensors / pytorch_model.bin: h94/IP-Adapter's `models/image_encoder`, A1111 / ComfyUI's
             `clip_vision` folders once unpacked;
    file     the same tensors alone (`vision_model.*`, `visual_projection.weight`). Sizes are read from the
             tensors; heads and activation, which they cannot show, from the known towers of that width
             (`TOWERS_BY_WIDTH`: ViT-H/14, ViT-bigG/14, OpenAI ViT-L/14).

Pickles (`.bin`) go through the weights-only reader (`checkpoints.io`). Stored `position_ids` are dropped.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from sdlab.checkpoints.diffusers_folder import read_config_json, read_weights, weights_file
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.io import read_checkpoint, shapes_of
from sdlab.checkpoints.runnable import check_builds, load_checked
from sdlab.models.clip_vision import VIT_BIGG_14, VIT_H_14, CLIPVisionConfig, CLIPVisionModel

PREFIX = "vision_model."
PROJECTION = "visual_projection.weight"
VIT_L_14 = CLIPVisionConfig(width=1024, layers=24, heads=16, mlp_width=4096, projection_dim=768,
                            activation="quick_gelu")
TOWERS_BY_WIDTH = {1280: ("ViT-H/14", VIT_H_14), 1664: ("ViT-bigG/14", VIT_BIGG_14), 1024: ("ViT-L/14", VIT_L_14)}
"""Known towers by width: where a lone file's heads and activation come from."""
_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu"}


@dataclass(frozen=True)
class LoadedImageEncoder:
    model: CLIPVisionModel
    config: CLIPVisionConfig
    origin: str

    @property
    def name(self) -> str:
        """The tower's name where its width is a known one ("ViT-H/14"), else its width."""
        known = TOWERS_BY_WIDTH.get(self.config.width)
        return known[0] if known else f"a {self.config.width}-wide CLIP vision tower"


def _sdlab_names(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """HF keys -> sdlab's (`models.clip_vision`): `vision_model.` dropped, `position_ids` left out."""
    return {key.removeprefix(PREFIX): state[key] for key in state if not key.endswith("position_ids")}


def _config_from_json(path: Path, shapes: Mapping[str, torch.Size]) -> CLIPVisionConfig:
    raw = read_config_json(path)
    raw = raw.get("vision_config", raw)             # a whole CLIPModel's config.json holds the tower's inside
    try:
        activation = _ACTIVATIONS[raw.get("hidden_act", "quick_gelu")]
        return CLIPVisionConfig(
            width=int(raw["hidden_size"]), layers=int(raw["num_hidden_layers"]),
            heads=int(raw["num_attention_heads"]), mlp_width=int(raw["intermediate_size"]),
            patch_size=int(raw["patch_size"]), image_size=int(raw.get("image_size", 224)),
            projection_dim=int(raw.get("projection_dim", shapes[PROJECTION][0] if PROJECTION in shapes else 512)),
            activation=activation, layer_norm_eps=float(raw.get("layer_norm_eps", 1e-5)))
    except KeyError as missing:
        raise CheckpointError(f"{path}: not a CLIP vision config (no {missing.args[0]})") from None


def _config_from_shapes(shapes: Mapping[str, torch.Size], path: Path) -> CLIPVisionConfig:
    patch = shapes.get("embeddings.patch_embedding.weight")
    if patch is None or PROJECTION not in shapes:
        raise CheckpointError(f"{path}: not a CLIP image encoder (no embeddings.patch_embedding.weight or "
                              f"{PROJECTION}; expected Hugging Face CLIPVisionModelWithProjection tensors)")
    width = patch[0]
    if width not in TOWERS_BY_WIDTH:
        raise CheckpointError(f"{path}: a {width}-wide CLIP vision tower is none of the known ones "
                              f"({', '.join(f'{name} {w}' for w, (name, _) in TOWERS_BY_WIDTH.items())}); "
                              "put its config.json beside it in a folder")
    layers = sum(1 for key in shapes if key.startswith("encoder.layers.") and key.endswith(".layer_norm1.weight"))
    positions = shapes["embeddings.position_embedding.weight"][0]
    grid = round((positions - 1) ** 0.5)
    known = TOWERS_BY_WIDTH[width][1]
    return replace(known, layers=layers, mlp_width=shapes["encoder.layers.0.mlp.fc1.weight"][0],
                   patch_size=patch[-1], image_size=grid * patch[-1], projection_dim=shapes[PROJECTION][0])


def image_encoder_config(path: str | os.PathLike[str]) -> CLIPVisionConfig:
    """The shape of the image encoder at `path` from its config.json or its tensors' names and shapes alone (no
    weights read); `CheckpointError` where it is not one."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").exists():
        return _config_from_json(path / "config.json", {})
    if path.is_dir():
        return _config_from_shapes(shapes_of(_sdlab_names(read_weights(weights_file(path)))), path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such image encoder")
    return _config_from_shapes(_sdlab_names(read_checkpoint(path, shapes_only=True)[0]), path)


def read_image_encoder(path: str | os.PathLike[str]) -> tuple[CLIPVisionConfig, Mapping[str, Tensor]]:
    """The config and (lazy) tensors of an image encoder folder or file, checked to fit; `CheckpointError` else."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such image encoder (a CLIP vision folder with config.json, or its "
                              ".safetensors file)")
    if path.is_dir():
        tensors = _sdlab_names(read_weights(weights_file(path)))
        shapes = shapes_of(tensors)
        config = _config_from_json(path / "config.json", shapes) if (path / "config.json").exists() \
            else _config_from_shapes(shapes, path)
    else:
        tensors = _sdlab_names(read_checkpoint(path)[0])
        shapes = shapes_of(tensors)
        config = _config_from_shapes(shapes, path)
    check_builds(lambda: CLIPVisionModel(config), shapes, path, "a CLIP image encoder")
    return config, tensors


def load_image_encoder(path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32,
                       device: torch.device | str = "cpu") -> LoadedImageEncoder:
    """Read an image encoder (`read_image_encoder`) and load it as `dtype` on `device`; one-line errors."""
    config, tensors = read_image_encoder(path)
    model = load_checked(lambda: CLIPVisionModel(config), tensors, dtype, device, path, "image encoder")
    return LoadedImageEncoder(model=model, config=config, origin=os.fspath(path))
