"""Diffusers T2I-Adapters with random weights, and writers for every file layout sdlab reads."""

from __future__ import annotations

import tempfile

import torch
from diffusers import T2IAdapter as DiffusersT2IAdapter
from safetensors.torch import save_file

from sdlab.checkpoints.t2i_adapter import load_t2i_adapter


def diffusers_adapter(adapter_type: str, channels, downscale: int, seed: int = 5, std: float = 0.1,
                      in_channels: int = 3, blocks: int = 2) -> DiffusersT2IAdapter:
    """A diffusers T2IAdapter of `adapter_type` with every parameter drawn from N(0, std)."""
    model = DiffusersT2IAdapter(in_channels=in_channels, channels=list(channels), num_res_blocks=blocks,
                                downscale_factor=downscale, adapter_type=adapter_type).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def write_adapter(model: DiffusersT2IAdapter, layout: str, folder, name: str = "adapter"):
    """`model` saved as `layout`: "folder" (save_pretrained), "diffusers-file" (its names in one safetensors),
    "original" (TencentARC's names, safetensors) or "original-pth" (TencentARC's names in a torch pickle)."""
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "folder":
        model.save_pretrained(folder / name)
        return folder / name
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if layout == "diffusers-file":
        save_file(state, folder / f"{name}.safetensors")
        return folder / f"{name}.safetensors"
    with tempfile.TemporaryDirectory() as scratch:    # the original names through sdlab's diffusers reader
        model.save_pretrained(scratch)
        original = {k: v.contiguous() for k, v in load_t2i_adapter(scratch).model.state_dict().items()}
    if layout == "original":
        save_file(original, folder / f"{name}.safetensors")
        return folder / f"{name}.safetensors"
    torch.save(original, folder / f"{name}.pth")
    return folder / f"{name}.pth"
