"""ComfyUI's latent upscale (comfy/utils.py ``common_upscale``, ``bislerp``; nodes.py ``LatentUpscale``,
``LatentUpscaleBy``), for its two-pass "hires fix" graphs.

- the methods: "nearest-exact", "bilinear", "area", "bicubic" are ``F.interpolate``'s modes as they are (no
  antialias, align_corners False); "bislerp" interpolates each cell's channel vector spherically, along the width
  and then along the height (`bislerp`);
- crop "center" first cuts the latent to the new size's aspect about its centre (`common_upscale`); "disabled"
  stretches it;
- LatentUpscale's size is in pixels (`latent_upscale_size`: width / height 0 follows the other's aspect, each at
  least 64, then // 8); LatentUpscaleBy's is the latent's times the scale, rounded (`latent_upscale_by_size`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["COMFY_LATENT_UPSCALE_METHODS", "COMFY_CROPS", "bislerp", "centre_crop", "comfyui_hires_size",
           "comfyui_upscale_latent", "latent_upscale_size", "latent_upscale_by_size"]

COMFY_LATENT_UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")
"""LatentUpscale's / LatentUpscaleBy's upscale_method list (nodes.py ``LatentUpscale.upscale_methods``)."""
COMFY_CROPS = ("disabled", "center")
PARALLEL = 1e-5             # |cos| this close to 1: the two vectors are taken as parallel (lerped, or the first kept)


def comfyui_upscale_latent(z: Tensor, width: int, height: int, method: str, crop: str = "disabled") -> Tensor:
    """z (B, C, h, w) at (B, C, height, width) by ComfyUI's ``common_upscale``: cut to the new aspect about the
    centre first for crop "center", then `method` (module docstring)."""
    if method not in COMFY_LATENT_UPSCALE_METHODS:
        raise ValueError(f"unknown upscale_method {method!r}; valid: {', '.join(COMFY_LATENT_UPSCALE_METHODS)}")
    if crop not in COMFY_CROPS:
        raise ValueError(f"unknown crop {crop!r}; valid: {', '.join(COMFY_CROPS)}")
    if crop == "center":
        z = centre_crop(z, width / height)                                          # (B, C, h', w')
    if method == "bislerp":
        return bislerp(z, width, height)
    return F.interpolate(z, size=(height, width), mode=method)                       # (B, C, height, width)


def centre_crop(z: Tensor, aspect: float) -> Tensor:
    """z cut to `aspect` (width / height) about its centre, the margin round(...) / 2 cells on each side, as
    ComfyUI cuts it (the same number of cells off both sides)."""
    old_height, old_width = z.shape[-2:]
    old_aspect = old_width / old_height
    x = y = 0
    if old_aspect > aspect:
        x = round((old_width - old_width * (aspect / old_aspect)) / 2)
    elif old_aspect < aspect:
        y = round((old_height - old_height * (old_aspect / aspect)) / 2)
    return z[:, :, y:old_height - y, x:old_width - x]


def bislerp(z: Tensor, width: int, height: int) -> Tensor:
    """z (B, C, h, w) at (B, C, height, width): bilinear sampling positions (align_corners False), each output cell
    the spherical interpolation of its two neighbours' channel vectors (their norms interpolated linearly), along
    the width, then the height; computed in float32, returned in z's dtype."""
    dtype = z.dtype
    wide = _slerp_along(z.float(), width, dim=-1)                                    # (B, C, h, width)
    return _slerp_along(wide, height, dim=-2).to(dtype)                              # (B, C, height, width)


def _slerp_along(z: Tensor, length: int, dim: int) -> Tensor:
    """z resized to `length` along `dim` (-1 or -2) by spherical interpolation of channel vectors."""
    low, high, ratio = _neighbours(z.shape[dim], length, z.device)                  # (length,) each
    shape = [1, 1, 1, 1]
    shape[dim] = length
    size = list(z.shape)
    size[dim] = length
    first = z.gather(dim, low.reshape(shape).expand(size))                           # (B, C, ., .)
    second = z.gather(dim, high.reshape(shape).expand(size))
    channels = z.shape[1]
    as_rows = lambda t: t.movedim(1, -1).reshape(-1, t.shape[1])                     # noqa: E731  (cells, C')
    ratios = as_rows(ratio.reshape(shape).expand([size[0], 1, size[2], size[3]]))   # (cells, 1)
    rows = _slerp(as_rows(first), as_rows(second), ratios)                           # (cells, C)
    return rows.reshape(size[0], size[2], size[3], channels).movedim(-1, 1)          # (B, C, ., .)


def _neighbours(old: int, new: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """For `new` cells sampled from `old` by bilinear interpolation (align_corners False, ends clamped): each
    cell's lower neighbour, upper neighbour (the last cell its own) and the fraction of the way to the upper,
    taken from F.interpolate of the index ramps as ComfyUI takes them."""
    ramp = torch.arange(old, dtype=torch.float32, device=device).reshape(1, 1, 1, -1)   # (1, 1, 1, old)
    position = F.interpolate(ramp, size=(1, new), mode="bilinear").reshape(-1)        # (new,)
    upper_ramp = ramp + 1
    upper_ramp[..., -1] -= 1
    upper = F.interpolate(upper_ramp, size=(1, new), mode="bilinear").reshape(-1)     # (new,)
    return position.to(torch.int64), upper.to(torch.int64), position - position.floor()


def _slerp(first: Tensor, second: Tensor, ratio: Tensor) -> Tensor:
    """Rows (N, C) of `first` and `second` interpolated by `ratio` (N, 1): along the great circle between their
    directions, at the linearly interpolated norm; a zero row's direction is zero, nearly equal directions keep
    `first`, nearly opposite ones are interpolated linearly."""
    first_norm = first.norm(dim=-1, keepdim=True)                                    # (N, 1)
    second_norm = second.norm(dim=-1, keepdim=True)
    first_unit = first / first_norm
    second_unit = second / second_norm
    first_unit[(first_norm == 0).expand_as(first_unit)] = 0.0
    second_unit[(second_norm == 0).expand_as(second_unit)] = 0.0
    cosine = (first_unit * second_unit).sum(1)                                       # (N,)
    angle = torch.acos(cosine)
    sine = torch.sin(angle)
    weight = ratio.squeeze(1)
    out = ((torch.sin((1.0 - weight) * angle) / sine).unsqueeze(1) * first_unit
           + (torch.sin(weight * angle) / sine).unsqueeze(1) * second_unit)          # (N, C)
    out *= (first_norm * (1.0 - ratio) + second_norm * ratio).expand_as(out)
    out[cosine > 1 - PARALLEL] = first[cosine > 1 - PARALLEL]
    opposite = cosine < PARALLEL - 1
    out[opposite] = (first * (1.0 - ratio) + second * ratio)[opposite]
    return out


def latent_upscale_size(latent_height: int, latent_width: int, width: int, height: int,
                        factor: int = 8) -> tuple[int, int] | None:
    """LatentUpscale's latent size (w, h) for its `width` x `height` pixels, of a latent of `latent_height` x
    `latent_width` cells: None for 0 x 0 (the latent as it is); a side of 0 follows the other's aspect; each side at
    least 64 pixels; // 8 (ComfyUI's VAE factor; `factor` for a VAE of another)."""
    if width == 0 and height == 0:
        return None
    if width == 0:
        height = max(64, height)
        width = max(64, round(latent_width * height / latent_height))
    elif height == 0:
        width = max(64, width)
        height = max(64, round(latent_height * width / latent_width))
    else:
        width, height = max(64, width), max(64, height)
    return width // factor, height // factor


def latent_upscale_by_size(latent_height: int, latent_width: int, scale_by: float) -> tuple[int, int]:
    """LatentUpscaleBy's latent size (w, h): the latent's sides times `scale_by`, rounded."""
    return round(latent_width * scale_by), round(latent_height * scale_by)


def comfyui_hires_size(latent_height: int, latent_width: int, scale: float | None, width: int,
                       height: int, factor: int = 8) -> tuple[int, int]:
    """The latent size (w, h) of a ComfyUI hires graph's upscale of a latent of `latent_height` x `latent_width`
    cells: LatentUpscale's at `width` x `height` pixels (of a VAE of `factor`) where either is set, else
    LatentUpscaleBy's at `scale`."""
    if width or height:
        return latent_upscale_size(latent_height, latent_width, width, height, factor)
    return latent_upscale_by_size(latent_height, latent_width, scale)
