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
parameter in one module. Merging a file into a model for generation: `sdlab.checkpoints.lora`.
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
from torch import Tensor, nn

from sdlab.checkpoints.io import write_safetensors_atomic
from sdlab.checkpoints.lora import UNET_PREFIX, kohya_name, text_encoder_prefixes
from sdlab.models.unet import UNet

logger = logging.getLogger(__name__)

__all__ = [
    "LoRAModule",
    "LoRANetwork",
    "UNET_TARGETS",
    "TEXT_TARGETS",
    "lora_module_names",
]

# attention projections and the feed-forward layers of every transformer block in the U-Net
UNET_TARGETS = re.compile(r".*transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))$")
# self-attention projections and the MLP of every CLIP layer
TEXT_TARGETS = re.compile(r"^encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$")


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
