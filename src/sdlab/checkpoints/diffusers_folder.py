"""Diffusers pipeline folders: `model_index.json` + one subfolder per component.

    model_index.json                    `_class_name` (StableDiffusionPipeline, StableDiffusionXLPipeline, ...)
    unet/config.json + weights          UNet2DConditionModel: converted with `diffusers_unet`
    vae/config.json + weights           AutoencoderKL: converted with `diffusers_vae`; `scaling_factor`
    text_encoder[_2]/config.json + ...  transformers CLIPTextModel(WithProjection): HF layout, the same names
                                        as sdlab's CLIPTextModel after removing `text_model.`
    scheduler/scheduler_config.json     `prediction_type` ("epsilon" / "v_prediction")
    tokenizer[_2]/                      not read: every SD family uses CLIP's BPE, shipped with sdlab

Weights per component, first found wins: `diffusion_pytorch_model.safetensors` / `model.safetensors`, their
`.fp16` variants, sharded `*.safetensors.index.json`, then the `.bin` pickles (weights-only). Configs come
from config.json files; shapes are still checked against them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from sdlab.checkpoints.components import HF_TEXT_TOLERATED, ComponentSource, SubStateDict, hf_text_to_sdlab
from sdlab.checkpoints.detect import detect_diffusers_family
from sdlab.checkpoints.diffusers_unet import unet_config_from_diffusers, unet_state_dict_from_diffusers
from sdlab.checkpoints.diffusers_vae import (
    vae_config_from_diffusers,
    vae_scaling_factor_from_diffusers,
    vae_state_dict_from_diffusers,
)
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.infer import infer_text_config
from sdlab.checkpoints.io import LazyMapping, read_checkpoint, shapes_of
from sdlab.families import FamilySpec, TextEncoderSpec
from sdlab.models.vae import VAEConfig

ConfigT = TypeVar("ConfigT")

MODEL_INDEX = "model_index.json"
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
_VARIANTS = ("", ".fp16")


@dataclass(frozen=True)
class DiffusersFolder:
    """The components of a diffusers folder, checked for presence and ready to plan."""

    path: Path
    family: FamilySpec
    family_source: str
    unet: ComponentSource
    vae: ComponentSource
    text_encoders: tuple[tuple[TextEncoderSpec, ComponentSource], ...]
    prediction_type: str | None             # scheduler_config.json `prediction_type`, if any
    scaling_factor: float | None            # vae/config.json `scaling_factor`, if any
    total_keys: int
    ignored: tuple[str, ...]


class ShardedStateDict(LazyMapping):
    """Several checkpoint files seen as one state dict (diffusers / transformers `*.index.json` shards)."""

    def __init__(self, parts: list[Mapping[str, Tensor]]):
        self._owner: dict[str, Mapping[str, Tensor]] = {}
        for part in parts:
            for key in part:
                self._owner[key] = part

    def __getitem__(self, key: str) -> Tensor:
        return self._owner[key][key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._owner)

    def __len__(self) -> int:
        return len(self._owner)

    def shape(self, key: str) -> torch.Size:
        part = self._owner[key]
        return part.shape(key) if isinstance(part, LazyMapping) else part[key].shape

    def dtype(self, key: str) -> torch.dtype:
        part = self._owner[key]
        return part.dtype(key) if isinstance(part, LazyMapping) else part[key].dtype


def is_diffusers_folder(path: str | Path) -> bool:
    return Path(path, MODEL_INDEX).is_file()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def component_weights(folder: Path) -> Mapping[str, Tensor]:
    """The weights of one component folder (see module docstring for the search order)."""
    for variant in _VARIANTS:
        for stem in _WEIGHT_STEMS:
            single = folder / f"{stem}{variant}.safetensors"
            if single.is_file():
                return read_checkpoint(single)[0]
            index = folder / f"{stem}{variant}.safetensors.index.json"
            if index.is_file():
                weight_map = _read_json(index).get("weight_map", {})
                shards = sorted(set(weight_map.values()))
                return ShardedStateDict([read_checkpoint(folder / shard)[0] for shard in shards])
    for variant in _VARIANTS:
        for stem in _WEIGHT_STEMS:
            pickle = folder / f"{stem}{variant}.bin"
            if pickle.is_file():
                return read_checkpoint(pickle)[0]
    raise CheckpointError(
        f"{folder}: no weights found (looked for diffusion_pytorch_model / model / pytorch_model "
        ".safetensors, .fp16.safetensors, .safetensors.index.json, .bin)"
    )


def _config_from_json(path: Path, convert: Callable[[dict[str, Any]], ConfigT]) -> ConfigT:
    """``convert`` applied to the JSON file ``path``; its ValueError becomes a CheckpointError naming the file."""
    config_json = _read_json(path)
    try:
        return convert(config_json)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def _unet_source(folder: Path) -> ComponentSource:
    config = _config_from_json(folder / "config.json", unet_config_from_diffusers)
    state = component_weights(folder)
    return ComponentSource(
        name="unet", kind="unet", origin=str(folder), state=state,
        to_sdlab=lambda s: unet_state_dict_from_diffusers(s, config), config=config,
    )


def vae_source_from_folder(folder: Path) -> ComponentSource:
    """A diffusers `AutoencoderKL` folder (`config.json` + weights)."""
    config = _config_from_json(folder / "config.json", vae_config_from_diffusers)
    return _vae_source(str(folder), component_weights(folder), config)


def _vae_source(origin: str, state: Mapping[str, Tensor], config: VAEConfig) -> ComponentSource:
    return ComponentSource(
        name="vae", kind="vae", origin=origin, state=state,
        to_sdlab=lambda s: vae_state_dict_from_diffusers(s, config), config=config,
    )


_DOWN_RESNET = re.compile(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.conv1\.weight")


def vae_source_from_diffusers_state(path: Path, state: Mapping[str, Tensor]) -> ComponentSource:
    """A diffusers-layout VAE in a single file: config from a `config.json` beside it, else from shapes."""
    beside = path.parent / "config.json"
    if beside.is_file():
        try:
            return _vae_source(str(path), state, vae_config_from_diffusers(_read_json(beside)))
        except ValueError as exc:
            raise CheckpointError(f"{beside}: {exc}") from None
    shapes = shapes_of(state)
    blocks: dict[int, set[int]] = {}
    for key in shapes:
        if m := _DOWN_RESNET.fullmatch(key):
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if "encoder.conv_in.weight" not in shapes or not blocks:
        raise CheckpointError(f"{path}: diffusers-style VAE keys but no encoder.conv_in / down_blocks resnets")
    base = int(shapes["encoder.conv_in.weight"][0])
    config = VAEConfig(
        in_channels=int(shapes["encoder.conv_in.weight"][1]),
        out_channels=int(shapes["decoder.conv_out.weight"][0]),
        latent_channels=int(shapes["post_quant_conv.weight"][0]),
        base_channels=base,
        channel_mult=tuple(
            int(shapes[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"][0]) // base for i in range(len(blocks))
        ),
        num_res_blocks=len(blocks[0]),
    )
    return _vae_source(str(path), state, config)


def _text_source(spec: TextEncoderSpec, folder: Path) -> ComponentSource:
    config_json = _read_json(folder / "config.json")
    state = component_weights(folder)
    tolerated = sorted(k for k in state if k.removeprefix("text_model.") in HF_TEXT_TOLERATED)
    sub = SubStateDict(state, {k: k for k in state if k not in tolerated})
    conventions = replace(
        spec.config,
        activation=config_json.get("hidden_act", spec.config.activation),
        layer_norm_eps=float(config_json.get("layer_norm_eps", spec.config.layer_norm_eps)),
    )
    config = infer_text_config(hf_text_to_sdlab(shapes_of(sub)), conventions)
    heads = config_json.get("num_attention_heads")
    if heads:
        config = replace(config, heads=int(heads))
    return ComponentSource(
        name=spec.name, kind="text", origin=str(folder), state=sub, to_sdlab=hf_text_to_sdlab,
        config=config, ignored=tuple(tolerated),
    )


def read_diffusers_folder(path: Path, *, family: str | None = None) -> DiffusersFolder:
    """Detect the family of a diffusers folder and open each component (weights are read lazily)."""
    model_index = _read_json(path / MODEL_INDEX)
    unet_json = _read_json(path / "unet" / "config.json")
    first_text = path / "text_encoder" / "config.json"
    text_json = _read_json(first_text) if first_text.is_file() else None
    spec = detect_diffusers_family(model_index, unet_json, text_json, override=family)
    unet = _unet_source(path / "unet")
    vae = vae_source_from_folder(path / "vae")
    scaling = vae_scaling_factor_from_diffusers(_read_json(path / "vae" / "config.json"))
    text = []
    for te in spec.text_encoders:
        folder = path / te.diffusers_folder
        if not folder.is_dir():
            raise CheckpointError(f"{path}: {spec.name} folder has no {te.diffusers_folder}/ for {te.name}")
        if te.hidden_state == "penultimate_norm":
            # diffusers' SD2 folders hold OpenCLIP-H without its last layer (23 of 24) and use the final-norm
            # output of what is left, which is SD2's penultimate-layer conditioning. diffusers reads the
            # final-norm output whatever the folder's layer count, so "last" is what it draws with even for a
            # folder that keeps all 24 layers.
            te = replace(te, hidden_state="last")
        text.append((te, _text_source(te, folder)))
    scheduler = path / "scheduler" / "scheduler_config.json"
    prediction_type = _read_json(scheduler).get("prediction_type") if scheduler.is_file() else None
    total = sum(len(c.state) + len(c.ignored) for c in [unet, vae, *(src for _, src in text)])
    return DiffusersFolder(
        path=path,
        family=spec,
        family_source="argument" if family is not None else f"{MODEL_INDEX} + component configs",
        unet=unet,
        vae=vae,
        text_encoders=tuple(text),
        prediction_type=prediction_type,
        scaling_factor=scaling if "scaling_factor" in _read_json(path / "vae" / "config.json") else None,
        total_keys=total,
        ignored=(),
    )
