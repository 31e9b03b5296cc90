"""Merging LoRA files (kohya-ss format, what A1111 and ComfyUI read) into a loaded model's weights.

Each entry ``<name>.lora_down.weight`` (r, in[, kh, kw]), ``<name>.lora_up.weight`` (out, r[, 1, 1]) and
``<name>.alpha`` adds ``multiplier * (alpha / r) * up @ down`` to the weight of the layer ``<name>`` names:
``lora_unet_`` + the U-Net module path in the original (LDM / SGM) layout with dots replaced by
underscores (diffusers-style names, which kohya writes for SD1/SD2, are understood too), and
``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` + the Hugging Face text-encoder path. Training writes these
files (`sdlab.train.lora`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from sdlab.checkpoints.diffusers_unet import unet_key_map
from sdlab.models.unet import UNet, UNetConfig

logger = logging.getLogger(__name__)

__all__ = ["UNET_PREFIX", "apply_lora", "kohya_name", "load_lora_file", "merge_lora_", "text_encoder_prefixes"]

UNET_PREFIX = "lora_unet_"


def kohya_name(prefix: str, module_path: str) -> str:
    """``lora_unet_`` + ``input_blocks.1.1.attn1.to_q`` -> ``lora_unet_input_blocks_1_1_attn1_to_q``."""
    return prefix + module_path.replace(".", "_")


def text_encoder_prefixes(count: int) -> list[str]:
    """``lora_te_`` for one text encoder, ``lora_te1_``, ``lora_te2_`` for two (SDXL); the Hugging Face
    ``text_model.`` level is part of the name."""
    if count == 1:
        return ["lora_te_text_model_"]
    return [f"lora_te{i + 1}_text_model_" for i in range(count)]



def load_lora_file(path: str | os.PathLike[str]) -> dict[str, dict[str, Tensor]]:
    """kohya name -> {"down", "up", "alpha"(optional)} from a LoRA ``.safetensors`` file."""
    raw = load_file(str(path))
    groups: dict[str, dict[str, Tensor]] = {}
    for key, tensor in raw.items():
        for suffix, field in ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha")):
            if key.endswith(suffix):
                groups.setdefault(key[: -len(suffix)], {})[field] = tensor
                break
        else:
            logger.warning("%s: ignoring key %s (not a LoRA down/up/alpha tensor)", path, key)
    incomplete = [k for k, g in groups.items() if "down" not in g or "up" not in g]
    if incomplete:
        raise ValueError(f"{path}: LoRA modules without both down and up weights: {incomplete[:5]}")
    return groups


def _unet_layer_table(unet: UNet, cfg: UNetConfig) -> dict[str, nn.Module]:
    """kohya name -> layer for every Linear / Conv2d of the U-Net, under its LDM name and (when the config
    has a diffusers equivalent) its diffusers name."""
    table: dict[str, nn.Module] = {}
    modules = dict(unet.named_modules())
    for path, m in modules.items():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            table[kohya_name(UNET_PREFIX, path)] = m
    try:
        key_map = unet_key_map(cfg)
    except Exception as exc:  # a config diffusers cannot express: only LDM names apply
        logger.debug("no diffusers names for this U-Net: %s", exc)
        return table
    for ldm_key, diffusers_key in key_map.items():
        if ldm_key.endswith(".weight"):
            module = modules.get(ldm_key[: -len(".weight")])
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                table.setdefault(kohya_name(UNET_PREFIX, diffusers_key[: -len(".weight")]), module)
    return table


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
    if delta.shape != weight.shape:
        raise ValueError(f"LoRA delta {tuple(delta.shape)} does not fit weight {tuple(weight.shape)}")
    return delta * scale


@torch.no_grad()
def merge_lora_(layers: Mapping[str, nn.Module], lora: Mapping[str, Mapping[str, Tensor]], multiplier: float) -> list[str]:
    """Add ``multiplier * alpha / r * up @ down`` into each named layer's weight (in place, computed in
    float32). Returns the LoRA names that matched no layer."""
    unmatched = []
    for name, entry in lora.items():
        layer = layers.get(name)
        if layer is None:
            unmatched.append(name)
            continue
        weight = layer.weight
        weight.copy_((weight.to(torch.float32) + _delta(entry, weight, multiplier).to(weight.device)).to(weight.dtype))
    return unmatched


def apply_lora(bundle, path: str | os.PathLike[str], multiplier: float = 1.0) -> int:
    """Merge a kohya-format LoRA file into a `ModelBundle`'s U-Net and text encoders at ``multiplier``
    (A1111's ``<lora:name:weight>``, sdlab's ``--lora FILE:WEIGHT``). Returns the number of layers changed;
    names that match nothing are logged (as A1111 does) and not fatal."""
    lora = load_lora_file(path)
    layers = _unet_layer_table(bundle.unet, bundle.unet_config)
    for prefix, te in zip(text_encoder_prefixes(len(bundle.text_encoders)), bundle.text_encoders):
        for module_path, m in te.model.named_modules():
            if isinstance(m, nn.Linear):
                layers[kohya_name(prefix, module_path)] = m
                if len(bundle.text_encoders) == 1:               # some SD1 files omit the text_model level
                    layers.setdefault(kohya_name("lora_te_", module_path), m)
    unmatched = merge_lora_(layers, lora, multiplier)
    if unmatched:
        logger.warning("%s: %d LoRA module(s) match no layer of this model, e.g. %s", path, len(unmatched), unmatched[:3])
    applied = len(lora) - len(unmatched)
    logger.info("applied LoRA %s at %.3g to %d layers", path, multiplier, applied)
    return applied
