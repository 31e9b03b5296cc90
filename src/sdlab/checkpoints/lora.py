"""LoRA files in kohya-ss sd-scripts' format (what A1111, ComfyUI and diffusers' `load_lora_weights` read):
reading them, merging them into a loaded model, and the names and metadata that writing them needs.

Each module ``<name>`` has ``<name>.lora_down.weight`` (r, in[, kh, kw]), ``<name>.lora_up.weight``
(out, r[, 1, 1]) and ``<name>.alpha`` (a scalar); merging adds ``multiplier * (alpha / r) * up @ down`` to
the weight of the layer ``<name>`` names. Names are a prefix plus a module path with dots replaced by
underscores, in kohya's convention for each family:

- U-Net of SD1 / SD2 (kohya trains diffusers' U-Net): ``lora_unet_`` + the diffusers path, e.g.
  ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``;
- U-Net of SDXL (kohya trains Stability's SGM U-Net): ``lora_unet_`` + the original path, e.g.
  ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``;
- text encoders: ``lora_te_`` (one encoder) or ``lora_te1_`` / ``lora_te2_`` (SDXL's CLIP-L / bigG) + the
  Hugging Face path, e.g. ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``.

Reading accepts both U-Net conventions for every family (files converted by other tools mix them).
Training writes these files with `sdlab.train.lora`; `kohya_metadata` gives the ``ss_*`` metadata kohya
writes, and `write_lora_file` adds kohya's ``sshs_*`` hashes.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor, nn

from sdlab.checkpoints.diffusers_unet import unet_key_map
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.io import read_checkpoint, write_safetensors_atomic
from sdlab.diffusion.denoiser import Prediction
from sdlab.families import FamilySpec
from sdlab.models.unet import UNetConfig

logger = logging.getLogger(__name__)

__all__ = [
    "UNET_PREFIX",
    "apply_lora",
    "kohya_metadata",
    "kohya_name",
    "kohya_unet_names",
    "load_lora_file",
    "merge_lora_",
    "text_encoder_prefixes",
    "write_lora_file",
]

UNET_PREFIX = "lora_unet_"
_SUFFIXES = ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha"))


def kohya_name(prefix: str, module_path: str) -> str:
    """``lora_unet_`` + ``input_blocks.1.1.attn1.to_q`` -> ``lora_unet_input_blocks_1_1_attn1_to_q``."""
    return prefix + module_path.replace(".", "_")


def text_encoder_prefixes(count: int) -> list[str]:
    """``lora_te_`` for one text encoder, ``lora_te1_``, ``lora_te2_`` for two (SDXL); the Hugging Face
    ``text_model.`` level is part of the name."""
    if count == 1:
        return ["lora_te_text_model_"]
    return [f"lora_te{i + 1}_text_model_" for i in range(count)]


# --- names ---------------------------------------------------------------------------------------------


def _diffusers_module_paths(cfg: UNetConfig) -> dict[str, str]:
    """sdlab (LDM) module path -> diffusers module path, for every module with a weight; empty when the
    config has no diffusers equivalent."""
    try:
        key_map = unet_key_map(cfg)
    except ValueError as exc:
        logger.debug("no diffusers names for this U-Net: %s", exc)
        return {}
    return {ldm[: -len(".weight")]: hf[: -len(".weight")] for ldm, hf in key_map.items() if ldm.endswith(".weight")}


def kohya_unet_names(cfg: UNetConfig, paths: Iterable[str]) -> dict[str, str]:
    """sdlab U-Net module path -> the name kohya-ss writes for it: the SGM (= sdlab) path for SDXL-layout
    U-Nets (those with added conditioning), the diffusers path for SD1 / SD2 layouts (the sdlab path when a
    config has no diffusers form)."""
    diffusers_paths = {} if cfg.adm_in_channels is not None else _diffusers_module_paths(cfg)
    return {path: kohya_name(UNET_PREFIX, diffusers_paths.get(path, path)) for path in paths}


def _unet_layer_table(unet: nn.Module, cfg: UNetConfig) -> dict[str, nn.Module]:
    """kohya name -> layer for every Linear / Conv2d of the U-Net, under its SGM name and (when the config
    has a diffusers equivalent) its diffusers name: files in either convention apply to any family."""
    modules = dict(unet.named_modules())
    layers = {path: m for path, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d))}
    table = {kohya_name(UNET_PREFIX, path): m for path, m in layers.items()}
    for path, hf_path in _diffusers_module_paths(cfg).items():
        if path in layers:
            table.setdefault(kohya_name(UNET_PREFIX, hf_path), layers[path])
    return table


def _text_layer_table(text_encoders) -> dict[str, nn.Module]:
    """kohya name -> Linear layer of each text encoder (``lora_te_`` / ``lora_te1_`` / ``lora_te2_``)."""
    table: dict[str, nn.Module] = {}
    single = len(text_encoders) == 1
    for prefix, te in zip(text_encoder_prefixes(len(text_encoders)), text_encoders):
        for module_path, m in te.model.named_modules():
            if isinstance(m, nn.Linear):
                table[kohya_name(prefix, module_path)] = m
                if single:                               # some SD1 files omit the text_model level
                    table.setdefault(kohya_name("lora_te_", module_path), m)
    return table


# --- metadata and writing ------------------------------------------------------------------------------


def kohya_metadata(family: FamilySpec, prediction: Prediction | str, rank: int, alpha: float, *,
                   title: str = "", resolution: int | None = None, comment: str = "") -> dict[str, str]:
    """The metadata kohya-ss writes into a LoRA file (``ss_*`` and the SAI model spec), as strings; the
    family's names for it are its ``FamilySpec.kohya``."""
    prediction = Prediction.parse(prediction)
    size = resolution or family.size_for(prediction)
    names = family.kohya
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": str(float(alpha)),
        "ss_v2": str(names.v2),
        "ss_base_model_version": names.version(prediction),
        "ss_v_parameterization": str(prediction is Prediction.V),
        "ss_training_comment": comment,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": names.architecture_for(prediction),
        "modelspec.implementation": names.implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{size}x{size}",
        "modelspec.prediction_type": "v" if prediction is Prediction.V else "epsilon",
    }


def _kohya_hashes(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """kohya's ``sshs_model_hash`` (sha256 of the tensor data) and ``sshs_legacy_hash`` (8 hex digits of the
    sha256 of 64 KiB at 1 MiB into the file written with only the ``ss_*`` metadata)."""
    blob = safetensors.torch.save(dict(tensors), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(blob[:8], "little")
    return {"sshs_model_hash": hashlib.sha256(blob[8 + header:]).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]}


def write_lora_file(path: str | os.PathLike[str], tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> Path:
    """Write a kohya-format LoRA atomically, with kohya's ``sshs_*`` hashes added to `metadata`."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return write_safetensors_atomic(path, tensors, {**metadata, **_kohya_hashes(tensors, metadata)})


# --- reading -------------------------------------------------------------------------------------------


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, field in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], field
    return None


def load_lora_file(path: str | os.PathLike[str]) -> dict[str, dict[str, Tensor]]:
    """kohya name -> {"down", "up", "alpha" (optional)} from a LoRA file; a file that is not a LoRA (a full
    checkpoint, an empty or unreadable file) is a `CheckpointError` naming it."""
    state, _ = read_checkpoint(path)
    groups: dict[str, dict[str, str]] = {}
    others = []
    for key in state:
        split = _split_key(key)
        if split is None:
            others.append(key)
        else:
            groups.setdefault(split[0], {})[split[1]] = key
    if not any("down" in g or "up" in g for g in groups.values()):
        raise CheckpointError(
            f"{path}: not a LoRA file: no '<name>.lora_down.weight' / '<name>.lora_up.weight' keys among its "
            f"{len(state)} tensors (e.g. {', '.join(list(state)[:2])}); a full model is passed with --model")
    incomplete = [name for name, g in groups.items() if "down" not in g or "up" not in g]
    if incomplete:
        raise CheckpointError(f"{path}: LoRA modules without both lora_down and lora_up weights: {', '.join(incomplete[:3])}")
    if others:
        logger.warning("%s: ignoring %d tensors that are not LoRA down/up/alpha weights, e.g. %s",
                       path, len(others), ", ".join(others[:3]))
    lora = {name: {field: state[key] for field, key in g.items()} for name, g in groups.items()}
    for name, entry in lora.items():
        if any(not t.is_floating_point() for t in entry.values()):
            raise CheckpointError(f"{path}: LoRA module {name} has non-floating-point weights")
        if not all(bool(torch.isfinite(t).all()) for t in entry.values()):
            raise CheckpointError(f"{path}: LoRA module {name} has NaN or infinite weights")
    return lora


def _delta_shape(entry: Mapping[str, Tensor], weight: Tensor) -> tuple[int, ...]:
    down, up = entry["down"], entry["up"]
    if weight.ndim == 2:
        return (up.shape[0], down[0].numel())
    if down.ndim == 4 and down.shape[-2:] != (1, 1):     # kxk down conv followed by a 1x1 up conv
        return (up.shape[0], *down.shape[1:])
    return (up.shape[0], down[0].numel(), 1, 1)


def _delta(entry: Mapping[str, Tensor], weight: Tensor, multiplier: float) -> Tensor:
    down, up = entry["down"].to(torch.float32), entry["up"].to(torch.float32)
    rank = down.shape[0]
    alpha = float(entry["alpha"]) if "alpha" in entry else float(rank)
    scale = multiplier * alpha / rank
    if weight.ndim == 2:
        delta = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)  # (out, in)
    elif down.shape[-2:] == (1, 1):                       # 1x1 conv, or a 3x3 conv with a 1x1 "down" of rank r
        delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape[0], weight.shape[1], 1, 1)
    else:                                                 # kxk down conv followed by a 1x1 up conv
        delta = torch.einsum("or,rikl->oikl", up.flatten(1), down)
    return delta * scale


def _check_fits(lora: Mapping[str, Mapping[str, Tensor]], layers: Mapping[str, nn.Module]) -> None:
    for name, entry in lora.items():
        layer = layers.get(name)
        if layer is None:
            continue
        down, up = entry["down"], entry["up"]
        shape = _delta_shape(entry, layer.weight)
        if up.ndim < 2 or up[0].numel() != down.shape[0] or shape != tuple(layer.weight.shape):
            raise ValueError(f"LoRA module {name}: down {tuple(down.shape)} / up {tuple(up.shape)} do not fit the "
                             f"layer's weight {tuple(layer.weight.shape)}")


@torch.no_grad()
def merge_lora_(layers: Mapping[str, nn.Module], lora: Mapping[str, Mapping[str, Tensor]], multiplier: float) -> list[str]:
    """Add ``multiplier * alpha / r * up @ down`` into each named layer's weight (in place, computed in
    float32), after checking that every matched module fits (nothing changes otherwise). Returns the LoRA
    names that matched no layer."""
    _check_fits(lora, layers)
    unmatched = []
    for name, entry in lora.items():
        layer = layers.get(name)
        if layer is None:
            unmatched.append(name)
            continue
        weight = layer.weight
        weight.copy_((weight.to(torch.float32) + _delta(entry, weight, multiplier).to(weight.device)).to(weight.dtype))
    return unmatched


def apply_lora(bundle, path: str | os.PathLike[str], multiplier: float = 1.0,
               lora: Mapping[str, Mapping[str, Tensor]] | None = None) -> int:
    """Merge a kohya-format LoRA file into a `ModelBundle`'s U-Net and text encoders at ``multiplier``
    (A1111's ``<lora:name:weight>``, sdlab's ``--lora FILE:WEIGHT``). Returns the number of layers changed.
    Some names matching nothing is a warning (as in A1111); none matching, or a module whose shape does not
    fit its layer, is a `CheckpointError` naming the file. ``lora`` is the file's content when already read
    by `load_lora_file` (so a bad file is found before a model is loaded)."""
    lora = load_lora_file(path) if lora is None else lora
    layers = _unet_layer_table(bundle.unet, bundle.unet_config) | _text_layer_table(bundle.text_encoders)
    matched = [name for name in lora if name in layers]
    if not matched:
        raise CheckpointError(
            f"{path}: none of its {len(lora)} LoRA modules matches a layer of this {bundle.family.name} model "
            f"(e.g. {', '.join(list(lora)[:2])}): a LoRA for another model family?")
    try:
        unmatched = merge_lora_(layers, lora, multiplier)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}: a LoRA for another model?") from exc
    if unmatched:
        logger.warning("%s: %d LoRA module(s) match no layer of this model, e.g. %s", path, len(unmatched), unmatched[:3])
    logger.info("applied LoRA %s at %.3g to %d layers", path, multiplier, len(matched))
    return len(matched)
