"""LoRA (Hu et al. 2021): low-rank updates of linear layers, in the file format A1111 and ComfyUI read.

A LoRA module beside a frozen linear layer W (out x in) adds ``scale * up(down(x))`` to its output, with
``down``: in -> r, ``up``: r -> out (initialised to zero, so training starts from the base model) and
``scale = multiplier * alpha / r``. Merging it into the weights gives the same function:
``W' = W + multiplier * (alpha / r) * up @ down``.

File format (kohya-ss sd-scripts, read by A1111's built-in Lora extension and ComfyUI), one entry per module::

    <name>.lora_down.weight   (r, in)       conv: (r, in, kh, kw)
    <name>.lora_up.weight     (out, r)      conv: (out, r, 1, 1)
    <name>.alpha              ()            float

where ``<name>`` is ``lora_unet_`` + the module path in the original (LDM / SGM) layout with dots replaced
by underscores, e.g. ``lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q``; both A1111 and ComfyUI
map these names onto the U-Net of every family (kohya itself writes them for SDXL). Text encoders use the
Hugging Face module path: ``lora_te_text_model_encoder_layers_0_self_attn_q_proj`` (one encoder) or
``lora_te1_`` / ``lora_te2_`` (SDXL's CLIP-L / bigG). When applying a file, the diffusers-style U-Net
names that kohya writes for SD1/SD2 (``lora_unet_down_blocks_0_attentions_0_...``) are understood too.

Training attaches LoRA through forward hooks, so the base modules and their state-dict keys stay untouched
(the base model can still be saved in the original layout) and a `LoRANetwork` holds every LoRA
parameter in one module.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from sdlab.checkpoints.diffusers_unet import unet_key_map
from sdlab.checkpoints.io import write_safetensors_atomic
from sdlab.models.unet import UNet, UNetConfig

logger = logging.getLogger(__name__)

__all__ = [
    "LoRAModule",
    "LoRANetwork",
    "UNET_TARGETS",
    "TEXT_TARGETS",
    "apply_lora",
    "kohya_name",
    "load_lora_file",
    "lora_module_names",
    "merge_lora_",
    "text_encoder_prefixes",
]

UNET_PREFIX = "lora_unet_"
# attention projections and the feed-forward layers of every transformer block in the U-Net
UNET_TARGETS = re.compile(r".*transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))$")
# self-attention projections and the MLP of every CLIP layer
TEXT_TARGETS = re.compile(r"^encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$")


def kohya_name(prefix: str, module_path: str) -> str:
    """``lora_unet_`` + ``input_blocks.1.1.attn1.to_q`` -> ``lora_unet_input_blocks_1_1_attn1_to_q``."""
    return prefix + module_path.replace(".", "_")


def text_encoder_prefixes(count: int) -> list[str]:
    """``lora_te_`` for one text encoder, ``lora_te1_``, ``lora_te2_`` for two (SDXL); the Hugging Face
    ``text_model.`` level is part of the name."""
    if count == 1:
        return ["lora_te_text_model_"]
    return [f"lora_te{i + 1}_text_model_" for i in range(count)]


class LoRAModule(nn.Module):
    """The low-rank branch for one linear layer (``in_features -> out_features``)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float):
        super().__init__()
        self.rank = rank
        self.alpha = float(alpha)
        self.multiplier = 1.0
        self.lora_down = nn.Linear(in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))  # as nn.Linear (and kohya)
        nn.init.zeros_(self.lora_up.weight)

    @property
    def scale(self) -> float:
        return self.multiplier * self.alpha / self.rank

    def forward(self, x: Tensor) -> Tensor:
        return self.lora_up(self.lora_down(x)) * self.scale  # (..., out)

    def delta_weight(self) -> Tensor:
        return (self.lora_up.weight @ self.lora_down.weight) * self.scale  # (out, in)


@dataclass(frozen=True)
class _Target:
    name: str               # kohya name
    module: nn.Linear


def lora_module_names(root: nn.Module, prefix: str, pattern: re.Pattern[str]) -> list[tuple[str, nn.Linear]]:
    """(kohya name, linear layer) for every ``nn.Linear`` under ``root`` whose path matches ``pattern``."""
    return [
        (kohya_name(prefix, path), m)
        for path, m in root.named_modules()
        if isinstance(m, nn.Linear) and pattern.fullmatch(path)
    ]


class LoRANetwork(nn.Module):
    """All LoRA modules of a model, attached to their layers by forward hooks.

    ``forward(*args, **kwargs)`` runs the ``base`` model (held by reference, not as a submodule, so this
    module's parameters and state dict are the LoRA weights only); wrapping this module in DDP therefore
    syncs exactly the LoRA gradients.
    """

    def __init__(self, targets: Iterable[tuple[str, nn.Linear]], rank: int, alpha: float | None = None,
                 base: nn.Module | None = None):
        super().__init__()
        alpha = float(rank if alpha is None else alpha)
        self.rank, self.alpha = rank, alpha
        self.loras = nn.ModuleDict()
        self._targets: list[_Target] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        for name, layer in targets:
            self.loras[name] = LoRAModule(layer.in_features, layer.out_features, rank, alpha).to(
                device=layer.weight.device, dtype=torch.float32)
            self._targets.append(_Target(name, layer))
        if not self._targets:
            raise ValueError("LoRA: no target layers found")
        object.__setattr__(self, "_base", base)
        self.enabled = True

    @classmethod
    def for_unet(cls, unet: UNet, rank: int, alpha: float | None = None) -> LoRANetwork:
        return cls(lora_module_names(unet, UNET_PREFIX, UNET_TARGETS), rank, alpha, base=unet)

    @classmethod
    def for_text_encoders(cls, encoders: list[nn.Module], rank: int, alpha: float | None = None) -> LoRANetwork:
        targets = []
        for prefix, encoder in zip(text_encoder_prefixes(len(encoders)), encoders):
            targets += lora_module_names(encoder, prefix, TEXT_TARGETS)
        return cls(targets, rank, alpha)

    def attach(self) -> LoRANetwork:
        """Install the forward hooks (idempotent)."""
        if self._hooks:
            return self
        for target in self._targets:
            lora = self.loras[target.name]

            def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor, lora: LoRAModule = lora) -> Tensor:
                if not self.enabled:
                    return output
                return output + lora(inputs[0].to(lora.lora_down.weight.dtype)).to(output.dtype)

            self._hooks.append(target.module.register_forward_hook(hook))
        return self

    def detach_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def forward(self, *args, **kwargs):
        if self._base is None:
            raise RuntimeError("this LoRANetwork has no base model to run")
        return self._base(*args, **kwargs)

    def lora_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """The kohya-format tensors (see module docstring)."""
        out: dict[str, Tensor] = {}
        for name, lora in self.loras.items():
            down, up = lora.lora_down.weight.detach(), lora.lora_up.weight.detach()
            if dtype is not None:
                down, up = down.to(dtype), up.to(dtype)
            out[f"{name}.lora_down.weight"] = down.cpu().contiguous()
            out[f"{name}.lora_up.weight"] = up.cpu().contiguous()
            out[f"{name}.alpha"] = torch.tensor(lora.alpha, dtype=dtype or torch.float32)
        return out

    def save(self, path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None,
             dtype: torch.dtype | None = None) -> Path:
        meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(self.rank),
                "ss_network_alpha": repr(self.alpha), **(metadata or {})}
        return write_safetensors_atomic(path, self.lora_state_dict(dtype), meta)


# ----------------------------------------------------------------------------------------------------------
# Applying a file


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
