"""ComfyUI's ImageUpscaleWithModel: a picture through an upscaler network in overlapping tiles, blended as
ComfyUI's `comfy.utils.tiled_scale` blends them (comfy_extras/nodes_upscale_model.py: tiles of 512 px overlapping
by 32, the tile halved while the device runs out of memory, down to 128; the result clamped to [0, 1]).

Blending (`tiled_scale`): tiles start every `tile - overlap` px along each side, the last ones moved back so that
they end at the picture's edge at most `overlap` px before it (a short tile there); each tile's output is weighted
by a mask ramping up over `round(overlap * scale)` px from every side of the tile, (t + 1) / feather at the t-th
pixel (on both ends of a side, the picture's edges too, so those weights divide out), skipped on a side the ramp
does not fit in; the sums are divided by the summed masks. A picture that fits in one tile is one call.

The pictures enter as ComfyUI's VAEDecode gives them, the VAE's float decode in [0, 1] unrounded
(`GenerationResult.pixels`), and leave as ComfyUI's SaveImage writes them: 255 * x truncated to 8 bits.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sdlab.checkpoints.upscaler import Upscaler

TILE = 512              # ImageUpscaleWithModel's first tile side, in input pixels
OVERLAP = 32            # its overlap, in input pixels
SMALLEST_TILE = 128     # it gives up below this tile side


def _feathered(shape: torch.Size, feather: int) -> Tensor:
    """ComfyUI's tile weights of a (1, C, h, w) output: on each side the t-th pixel from either end times
    (t + 1) / feather, a side shorter than or equal to the feather left at 1."""
    mask = torch.ones(shape)
    for dim in (2, 3):
        length = shape[dim]
        if feather >= length:
            continue
        ramp = torch.ones(length)
        steps = torch.arange(1, feather + 1, dtype=torch.float32) / feather
        ramp[:feather] *= steps
        ramp[length - feather:] *= steps.flip(0)
        mask *= ramp.view(-1, 1) if dim == 2 else ramp.view(1, -1)
    return mask


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    """The tiles' first pixels along a side of `length` px (ComfyUI's positions, clamped to length - overlap)."""
    if length <= tile:
        return [0]
    return [max(0, min(length - overlap, p)) for p in range(0, length - overlap, tile - overlap)]


@torch.inference_mode()
def tiled_scale(x: Tensor, net: Callable[[Tensor], Tensor], scale: int, tile: int = TILE,
                overlap: int = OVERLAP) -> Tensor:
    """net over `x` in tiles blended as ComfyUI's tiled_scale. x: (B, C, H, W) -> (B, C', H * scale, W * scale),
    on the CPU in float32."""
    outputs = []
    for picture in x.split(1):                                                   # (1, C, H, W)
        height, width = picture.shape[-2:]
        if height <= tile and width <= tile:
            outputs.append(net(picture).float().cpu())
            continue
        total = weights = None
        for top in _starts(height, tile, overlap):
            for left in _starts(width, tile, overlap):
                part = net(picture[..., top:top + tile, left:left + tile]).float().cpu()   # (1, C', sh, sw)
                if total is None:
                    total = torch.zeros(1, part.shape[1], height * scale, width * scale)
                    weights = torch.zeros_like(total)
                mask = _feathered(part.shape, round(overlap * scale))
                rows = slice(top * scale, top * scale + part.shape[2])
                cols = slice(left * scale, left * scale + part.shape[3])
                total[..., rows, cols] += part * mask
                weights[..., rows, cols] += mask
        outputs.append(total / weights)
    return torch.cat(outputs)


def upscale_with_model(upscaler: Upscaler, pixels: Tensor) -> list[Image.Image]:
    """ComfyUI's ImageUpscaleWithModel of `pixels` ((B, 3, H, W) float in [0, 1], ComfyUI's IMAGE moved to
    channels first), as its SaveImage writes the result."""
    param = next(upscaler.net.parameters())
    x = pixels.to(param.device, param.dtype)                                    # (B, 3, H, W)
    tile = TILE
    while True:
        try:
            y = tiled_scale(x, upscaler.net, upscaler.scale, tile, OVERLAP)      # (B, 3, sH, sW)
            break
        except torch.OutOfMemoryError:
            tile //= 2
            if tile < SMALLEST_TILE:
                raise
    pixels = (255.0 * y.clamp(0, 1)).permute(0, 2, 3, 1).numpy()               # (B, sH, sW, 3)
    return [Image.fromarray(np.clip(p, 0, 255).astype(np.uint8)) for p in pixels]
