"""Reduced-width diffusers ControlNets with random weights, and writers for every file layout sdlab reads.

Each config keeps its family's code paths: SD1 (8 heads, 1x1-conv projections), SD2 (64-wide heads, Linear
projections), SDXL (no attention at the first level, deeper transformers, the 256-wide size embeddings).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import ControlNetModel
from safetensors.torch import save_file

from sdlab.checkpoints.diffusers_unet import unet_config_to_diffusers
from sdlab.models.unet import UNetConfig

POOLED = 32

ENCODERS = {
    "sd1": UNetConfig(model_channels=32, channel_mult=(1, 2, 2), transformer_depth=(1, 1, 0), num_heads=8, context_dim=48),
    "sd2": UNetConfig(
        model_channels=64, channel_mult=(1, 2), transformer_depth=(1, 1), num_heads=None, head_dim=64,
        context_dim=80, use_linear_proj=True,
    ),
    "sdxl": UNetConfig(
        model_channels=64, channel_mult=(1, 2, 2), transformer_depth=(0, 2, 3), transformer_depth_middle=3,
        num_heads=None, head_dim=64, context_dim=96, use_linear_proj=True, adm_in_channels=POOLED + 6 * 256,
    ),
}

_CONTROLNET_KEYS = (
    "in_channels", "down_block_types", "block_out_channels", "layers_per_block", "transformer_layers_per_block",
    "attention_head_dim", "cross_attention_dim", "use_linear_projection", "upcast_attention", "norm_num_groups",
    "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
)


def controlnet_config(cfg: UNetConfig, hint_widths: tuple[int, ...] = (16, 32, 96, 256)) -> dict[str, Any]:
    """diffusers ControlNetModel kwargs for the encoder of `cfg`."""
    unet = unet_config_to_diffusers(cfg)
    config = {k: unet[k] for k in _CONTROLNET_KEYS if k in unet}
    config["conditioning_embedding_out_channels"] = list(hint_widths)
    return config


def diffusers_controlnet(cfg: UNetConfig, seed: int, *, hint_widths=(16, 32, 96, 256), std: float = 0.1,
                         pooled: bool = False, **config: Any) -> ControlNetModel:
    """A diffusers ControlNetModel with every parameter (zero convs included) drawn from N(0, std); `pooled`:
    the shuffle model's `global_pool_conditions`; `config`: ControlNetModel arguments that replace those of
    `cfg`."""
    model = ControlNetModel(**controlnet_config(cfg, hint_widths) | config, global_pool_conditions=pooled).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def write_layout(model: ControlNetModel, layout: str, folder: Path) -> Path:
    """`model` saved as `layout`: "folder" (save_pretrained), "diffusers-file" (one safetensors of diffusers
    names), "original" (control_model.* safetensors), "original-pth" (a torch pickle without the prefix)."""
    if layout == "folder":
        model.save_pretrained(folder / "cn")
        return folder / "cn"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if layout == "diffusers-file":
        save_file(state, folder / "cn.safetensors")
        return folder / "cn.safetensors"
    from sdlab.checkpoints.controlnet import load_controlnet   # original names through the diffusers reader

    save_file(state, folder / "tmp.safetensors")
    original = {k: v.contiguous() for k, v in load_controlnet(folder / "tmp.safetensors").model.state_dict().items()}
    (folder / "tmp.safetensors").unlink()
    if layout == "original":
        save_file({f"control_model.{k}": v for k, v in original.items()}, folder / "control_cn.safetensors")
        return folder / "control_cn.safetensors"
    torch.save({"state_dict": original}, folder / "control_cn.pth")
    return folder / "control_cn.pth"
