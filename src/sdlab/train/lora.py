"""LoRA (Hu et al. 2021): low-rank updates of linear layers, in the file format A1111 and ComfyUI read.

A LoRA module beside a frozen linear layer W (out x in) adds ``scale * up(down(x))`` to its output, with
``down``: in -> r, ``up``: r -> out (initialised to zero, so training starts from the base model) and
``scale = multiplier * alpha / r``. Merging it into the weights gives the same function:
``W' = W + multiplier * (alpha / r) * up @ down``.

File format and names: kohya-ss sd-scripts' (read by A1111, ComfyUI and diffusers' `load_lora_weights`),
see `sdlab.checkpoints.lora`: per module ``<name>.lora_down.weight`` (r, in) (conv: (r, in, 1, 1)),
``<name>.lora_up.weight`` (out, r) (conv: (out, r, 1, 1)) and ``<name>.alpha``, with diffusers module names
for SD1 / SD2 U-Nets, original (SGM) names for SDXL, and ``ss_*`` metadata. The layers are kohya's default
set: in every transformer of the U-Net, ``proj_in`` / ``proj_out`` (1x1 convs in SD1, linear otherwise),
the attention projections and the feed-forward layers; in every CLIP layer, the attention projections and
the MLP. ``convs=True`` adds LCM-LoRA's wider set (Luo et al. 2023, "LCM-LoRA"; diffusers'
train_lcm_distill_lora_sd): every ResBlock conv, shortcut and time-embedding projection and the down- /
up-sampling convs. A k x k conv gets a LoCon branch, kohya's layout for it: ``down`` a k x k conv with the
layer's stride and padding (in -> r), ``up`` a 1x1 conv (r -> out), so ``W' = W + scale * up @ down`` per
kernel tap, which is how A1111, ComfyUI and `sdlab.checkpoints.lycoris` merge it.

Training attaches LoRA through forward hooks, so the base modules and their state-dict keys stay untouched
(the base model can still be saved in the original layout) and a `LoRANetwork` holds every LoRA
parameter in one module. Merging a file into a model for generation: `sdlab.checkpoints.lora`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from sdlab.checkpoints.lora import kohya_metadata, kohya_name, kohya_unet_names, text_encoder_prefixes, write_lora_file
from sdlab.diffusion.denoiser import Prediction
from sdlab.families import FamilySpec
from sdlab.models.unet import UNet

logger = logging.getLogger(__name__)

__all__ = [
    "LoRAModule",
    "LoRANetwork",
    "UNET_CONV_TARGETS",
    "UNET_TARGETS",
    "TEXT_TARGETS",
    "lora_module_names",
    "save_lora_networks",
    "unet_lora_targets",
]

# kohya's default: every linear / 1x1 conv inside the U-Net's transformers (Transformer2DModel in diffusers)
UNET_TARGETS = re.compile(
    r".*\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))$")
# LCM-LoRA's additions: ResBlock convs (conv1, conv2, conv_shortcut), time_emb_proj, Downsample / Upsample convs
UNET_CONV_TARGETS = re.compile(r".*\.(in_layers\.2|out_layers\.3|skip_connection|emb_layers\.1|op|conv)$")
# self-attention projections and the MLP of every CLIP layer
TEXT_TARGETS = re.compile(r"^encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$")


class LoRAModule(nn.Module):
    """The low-rank branch for one linear layer (``in_features -> out_features``) or conv (``conv=True``: a
    ``kernel_size`` conv down, stored (r, in, kh, kw), and a 1x1 conv up, stored (out, r, 1, 1), kohya's shapes)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, conv: bool = False,
                 kernel_size: int | tuple[int, int] = 1, stride: int | tuple[int, int] = 1,
                 padding: int | tuple[int, int] = 0):
        super().__init__()
        self.rank = rank
        self.alpha = float(alpha)
        self.multiplier = 1.0
        if conv:  # a k x k conv's branch (LoCon): the k x k down conv keeps the layer's stride and padding
            self.lora_down = nn.Conv2d(in_features, rank, kernel_size, stride, padding, bias=False)
            self.lora_up = nn.Conv2d(rank, out_features, 1, bias=False)
        else:
            self.lora_down = nn.Linear(in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))  # as nn.Linear (and kohya)
        nn.init.zeros_(self.lora_up.weight)

    @property
    def scale(self) -> float:
        return self.multiplier * self.alpha / self.rank

    def forward(self, x: Tensor) -> Tensor:
        return self.lora_up(self.lora_down(x)) * self.scale  # (..., out) or (B, out, H, W)


@dataclass(frozen=True)
class _Target:
    name: str               # kohya name
    module: nn.Linear | nn.Conv2d


def _is_target_layer(m: nn.Module, any_conv: bool = False) -> bool:
    """A linear layer or a 1x1 conv (any ungrouped conv with ``any_conv``)."""
    if isinstance(m, nn.Conv2d):
        return m.groups == 1 and (any_conv or m.kernel_size == (1, 1))
    return isinstance(m, nn.Linear)


def lora_module_names(root: nn.Module, prefix: str, pattern: re.Pattern[str]) -> list[tuple[str, nn.Module]]:
    """(kohya name, layer) for every linear layer or 1x1 conv under ``root`` whose path matches ``pattern``;
    the name is ``prefix`` + the path."""
    return [(kohya_name(prefix, path), m) for path, m in root.named_modules() if _is_target_layer(m) and pattern.fullmatch(path)]


def unet_lora_targets(unet: UNet, convs: bool = False) -> list[tuple[str, nn.Module]]:
    """(kohya name in kohya's convention for this U-Net's family, layer) for every U-Net target layer
    (kohya's default set; with ``convs`` also `UNET_CONV_TARGETS`, LCM-LoRA's set)."""
    layers = {path: m for path, m in unet.named_modules()
              if (_is_target_layer(m) and UNET_TARGETS.fullmatch(path))
              or (convs and _is_target_layer(m, any_conv=True) and UNET_CONV_TARGETS.fullmatch(path))}
    names = kohya_unet_names(unet.cfg, layers)
    return [(names[path], m) for path, m in layers.items()]


class LoRANetwork(nn.Module):
    """All LoRA modules of a model, attached to their layers by forward hooks.

    ``forward(*args, **kwargs)`` runs the ``base`` model (held by reference, not as a submodule, so this
    module's parameters and state dict are the LoRA weights only); wrapping this module in DDP therefore
    syncs exactly the LoRA gradients.
    """

    def __init__(self, targets: Iterable[tuple[str, nn.Module]], rank: int, alpha: float | None = None,
                 base: nn.Module | None = None):
        super().__init__()
        alpha = float(rank if alpha is None else alpha)
        self.rank, self.alpha = rank, alpha
        self.loras = nn.ModuleDict()
        self._targets: list[_Target] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        for name, layer in targets:
            if isinstance(layer, nn.Conv2d):
                lora = LoRAModule(layer.in_channels, layer.out_channels, rank, alpha, True, layer.kernel_size,
                                  layer.stride, layer.padding)
                if layer.weight.is_contiguous(memory_format=torch.channels_last):
                    # the layer runs channels-last (sdlab's U-Net), so do the branch's gradients: weights laid
                    # out alike keep DDP's gradient buckets from copying them (its "grad strides" warning)
                    lora = lora.to(memory_format=torch.channels_last)
            else:
                lora = LoRAModule(layer.in_features, layer.out_features, rank, alpha)
            self.loras[name] = lora.to(device=layer.weight.device, dtype=torch.float32)
            self._targets.append(_Target(name, layer))
        if not self._targets:
            raise ValueError("LoRA: no target layers found")
        object.__setattr__(self, "_base", base)
        self.enabled = True

    @classmethod
    def for_unet(cls, unet: UNet, rank: int, alpha: float | None = None, convs: bool = False) -> LoRANetwork:
        return cls(unet_lora_targets(unet, convs), rank, alpha, base=unet)

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

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The base model's own function while inside (the hooks stay installed and add nothing)."""
        was, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = was

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

    def save(self, path: str | os.PathLike[str], family: FamilySpec, prediction: Prediction | str | None = None, *,
             metadata: Mapping[str, str] | None = None, dtype: torch.dtype | None = None) -> Path:
        """Write this network as a kohya-format LoRA file (see `save_lora_networks`)."""
        return save_lora_networks(path, [self], family, prediction, metadata=metadata, dtype=dtype)


def save_lora_networks(path: str | os.PathLike[str], networks: Sequence[LoRANetwork], family: FamilySpec,
                       prediction: Prediction | str | None = None, *, metadata: Mapping[str, str] | None = None,
                       dtype: torch.dtype | None = None, resolution: int | None = None) -> Path:
    """Write the U-Net and text-encoder LoRA networks of one run as one kohya-format file, with kohya's
    ``ss_*`` metadata for `family` (rank and alpha of the first network) and any extra `metadata`."""
    tensors: dict[str, Tensor] = {}
    for network in networks:
        tensors |= network.lora_state_dict(dtype)
    first = networks[0]
    meta = kohya_metadata(family, prediction or family.prediction, first.rank, first.alpha, title=Path(path).stem,
                          resolution=resolution, comment="trained with sdlab")
    return write_lora_file(path, tensors, {**meta, **(metadata or {})})
