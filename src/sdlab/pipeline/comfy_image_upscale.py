"""ComfyUI's ImageUpscaleWithModel: a picture through an upscaler network in overlapping tiles, blended as
ComfyUI's `comfy.utils.tiled_scale` blends them (comfy_extras/nodes_upscale_model.py: tiles of 512 px overlapping
by 32, the tile halved while the device runs out of memory, down to 128; the result clamped to [0, 1]).

Blending (`tiled_scale`): tiles start every `tile - overlap` px along each side, the last ones moved back so that
they end at the picture's edge at most `overlap` px before it (a short tile there); each tile's output is weighted
by a mask ramping up over `round(overlap * scale)` px from every side of the tile, (t + 1) / feather at the t-th
pixel (on both ends of a side, the picture's edges too, so those weights divide out), skipped on a side the ramp
does not fit in; the sums are divided by the summed masks. A picture that fits in one tile is one call.

ComfyUI's ImageScale / ImageScaleBy (nodes.py; comfy/utils.py `common_upscale`, `lanczos`): `PictureScale`, a
picture resized in float by `F.interpolate`'s mode of the method's name ("nearest-exact", "bilinear", "area",
"bicubic": no antialias, not clamped), or "lanczos" through 8 bits (255 * x clipped and truncated, Pillow's LANCZOS,
back / 255); crop "center" first cuts it to the new aspect about its centre (`comfy_latent_upscale.centre_crop`).

The pictures enter as ComfyUI's VAEDecode gives them, the VAE's float decode in [0, 1] unrounded
(`GenerationResult.pixels`), pass through the graph's steps (`comfy_pictures`: the network, the scales, in the
graph's order) and leave as ComfyUI's SaveImage writes them: 255 * x clipped and truncated to 8 bits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from sdlab.checkpoints.upscaler import Upscaler
from sdlab.pipeline.comfy_latent_upscale import COMFY_CROPS, centre_crop

TILE = 512              # ImageUpscaleWithModel's first tile side, in input pixels
OVERLAP = 32            # its overlap, in input pixels
SMALLEST_TILE = 128     # it gives up below this tile side
COMFY_IMAGE_UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
"""ImageScale's / ImageScaleBy's upscale_method list (nodes.py ``ImageScale.upscale_methods``)."""


@dataclass(frozen=True)
class PictureScale:
    """ComfyUI's ImageScale (`width`, `height`: 0 follows the other's aspect, both 0 the picture as it is; `crop`)
    or ImageScaleBy (`scale_by`, not None: each side times it, rounded; crop disabled) by `method`."""

    method: str
    width: int = 0
    height: int = 0
    crop: str = "disabled"
    scale_by: float | None = None

    def size(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) this scale makes of a `width` x `height` picture."""
        if self.scale_by is not None:
            return round(width * self.scale_by), round(height * self.scale_by)
        if self.width == 0 and self.height == 0:
            return width, height
        if self.width == 0:
            return max(1, round(width * self.height / height)), self.height
        if self.height == 0:
            return self.width, max(1, round(height * self.width / width))
        return self.width, self.height


@dataclass(frozen=True)
class ThroughModel:
    """A step of the pictures through the job's upscaler network (ImageUpscaleWithModel)."""


PictureStep = PictureScale | ThroughModel


def steps_size(width: int, height: int, steps: Sequence[PictureStep], scale: int = 1) -> list[tuple[int, int]]:
    """The (width, height) after each of `steps` of a `width` x `height` picture (`scale`: the network's)."""
    sizes = []
    for step in steps:
        width, height = (width * scale, height * scale) if isinstance(step, ThroughModel) else step.size(width, height)
        sizes.append((width, height))
    return sizes


def scale_pictures(x: Tensor, step: PictureScale) -> Tensor:
    """x (B, C, H, W) float by ComfyUI's ImageScale / ImageScaleBy (`common_upscale`) -> (B, C, h, w)."""
    if step.method not in COMFY_IMAGE_UPSCALE_METHODS:
        raise ValueError(f"unknown upscale_method {step.method!r}; valid: {', '.join(COMFY_IMAGE_UPSCALE_METHODS)}")
    if step.crop not in COMFY_CROPS:
        raise ValueError(f"unknown crop {step.crop!r}; valid: {', '.join(COMFY_CROPS)}")
    if step.scale_by is None and step.width == step.height == 0:
        return x                                                               # ImageScale 0 x 0: as it is
    width, height = step.size(x.shape[-1], x.shape[-2])
    if step.crop == "center":
        x = centre_crop(x, width / height)                                    # (B, C, H', W')
    if step.method == "lanczos":
        return _lanczos(x, width, height)
    return F.interpolate(x, size=(height, width), mode=step.method)           # (B, C, height, width)


def _lanczos(x: Tensor, width: int, height: int) -> Tensor:
    """ComfyUI's `lanczos`: each picture as 8 bits (255 * x clipped, truncated), Pillow's LANCZOS, back / 255."""
    out = []
    for picture in x.float().cpu():                                            # (C, H, W)
        eight = np.clip(255.0 * picture.permute(1, 2, 0).numpy(), 0, 255).astype(np.uint8)
        resized = Image.fromarray(eight).resize((width, height), resample=Image.Resampling.LANCZOS)
        out.append(torch.from_numpy(np.asarray(resized).astype(np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(out).to(x.device, x.dtype)                             # (B, C, height, width)


def saved_pictures(x: Tensor) -> list[Image.Image]:
    """ComfyUI's SaveImage of x (B, 3, H, W): np.clip(255 * x, 0, 255) truncated to 8 bits."""
    pixels = (255.0 * x.float().cpu()).permute(0, 2, 3, 1).numpy()            # (B, H, W, 3)
    return [Image.fromarray(np.clip(p, 0, 255).astype(np.uint8)) for p in pixels]


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


def upscale_with_model(upscaler: Upscaler, pixels: Tensor) -> Tensor:
    """ComfyUI's ImageUpscaleWithModel of `pixels` ((B, 3, H, W) float in [0, 1], ComfyUI's IMAGE moved to
    channels first): (B, 3, sH, sW) float32 on the CPU, clamped to [0, 1]."""
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
    return y.clamp(0, 1)


def comfy_pictures(pixels: Tensor, steps: Sequence[PictureStep], upscaler: Upscaler | None = None,
                   failed: Callable[[int], None] | None = None) -> list[Image.Image]:
    """`pixels` ((B, 3, H, W) float, VAEDecode's IMAGE) through `steps` in order (`ThroughModel`: `upscaler`'s
    ImageUpscaleWithModel), as SaveImage writes them; `failed` is told the index of a step that raises."""
    for index, step in enumerate(steps):
        try:
            if isinstance(step, ThroughModel):
                if upscaler is None:
                    raise ValueError("an ImageUpscaleWithModel step without an upscale model")
                pixels = upscale_with_model(upscaler, pixels)
            else:
                pixels = scale_pictures(pixels.float().cpu(), step)
        except Exception:
            if failed is not None:
                failed(index)
            raise
    return saved_pictures(pixels)
