"""Tiled VAE decode and encode: large pictures in bounded memory.

The input is cut into overlapping tiles, each tile goes through the network on its own, and the outputs
are blended with linear ramps across the overlaps into one preallocated output. Only one tile's
activations exist at a time, so peak memory is set by the tile size, not by the picture.

Blending: along each axis a tile's weight rises linearly over the part it shares with the previous tile
and falls over the part it shares with the next one (weight 1 elsewhere, including at the picture's
border). The accumulated output is divided by the accumulated weight, so the weights at every output
pixel sum to exactly 1: a network that acts on each pixel alone gives the untiled result (up to float
rounding), and for a real VAE the seams fade over ``overlap * factor`` pixels instead of showing as lines.
Tiles start every ``tile - overlap`` and the last one is moved back to end at the border, so every tile
has the full size; an input no larger than one tile is a single call, identical to the untiled one.

Tiled results differ slightly from untiled ones for a real VAE, whose GroupNorm statistics and mid-block
attention span the whole input: each tile normalizes with its own statistics. The differences are small
in smooth areas and hidden by the blending; ``should_tile`` keeps tiling off for sizes where the whole
picture fits comfortably.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

logger = logging.getLogger(__name__)

# Above this many output pixels (1024 x 1024), tile by default. The SD VAE decoder's last up-block holds
# several 128-channel full-resolution activations (0.5 GB each in fp32 at 1024 x 1024) and the mid-block
# attention a (h*w)^2 score matrix at the latent size (1 GiB at 128 x 128 in fp32 without fused attention),
# which is past what a CPU machine or a small GPU should be asked for by default.
DEFAULT_TILE_THRESHOLD_PIXELS = 1024 * 1024


def should_tile(height: int, width: int, threshold: int = DEFAULT_TILE_THRESHOLD_PIXELS) -> bool:
    """True when a picture of ``height x width`` output pixels is larger than ``threshold`` pixels."""
    return height * width > threshold


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``length``; the last tile ends at ``length``."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def _ramp(size: int, rise: int, fall: int, device: torch.device) -> torch.Tensor:
    """Weights (size,): linear up over the first ``rise`` entries, down over the last ``fall``, else 1."""
    weight = torch.ones(size, device=device)
    if rise > 0:
        weight[:rise] = (torch.arange(rise, device=device) + 0.5) / rise
    if fall > 0:
        down = (torch.arange(fall, 0, -1, device=device) - 0.5) / fall
        weight[size - fall:] = torch.minimum(weight[size - fall:], down)
    return weight


def _axis_weights(starts: list[int], tile: int, length: int, scale: float, device: torch.device):
    """For each tile along one axis: (output start, output size, blend weights (output size,))."""
    tile = min(tile, length)
    size = round(tile * scale)
    out = []
    for i, start in enumerate(starts):
        begin = round(start * scale)
        rise = round((starts[i - 1] + tile) * scale) - begin if i > 0 else 0               # shared with previous
        fall = begin + size - round(starts[i + 1] * scale) if i + 1 < len(starts) else 0   # shared with next
        out.append((begin, size, _ramp(size, rise, fall, device)))
    return out


def _run_tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    overlap: int,
    scale: float,
) -> torch.Tensor:
    """Apply ``fn`` (which scales the spatial size by ``scale``) to overlapping tiles of x (B, C, H, W)."""
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap} must be in [0, tile={tile})")
    height, width = x.shape[-2:]
    if height <= tile and width <= tile:
        return fn(x)
    rows = _tile_starts(height, tile, overlap)
    cols = _tile_starts(width, tile, overlap)
    row_weights = _axis_weights(rows, tile, height, scale, x.device)
    col_weights = _axis_weights(cols, tile, width, scale, x.device)
    out_h, out_w = round(height * scale), round(width * scale)
    logger.debug("tiling %dx%d: %d x %d tiles of %d, overlap %d", height, width, len(rows), len(cols), tile, overlap)

    output = weight_sum = None                               # allocated once the first tile shows C_out
    for r, (top, th, wy) in zip(rows, row_weights):
        for c, (left, tw, wx) in zip(cols, col_weights):
            y = fn(x[..., r:r + tile, c:c + tile])           # (B, C_out, th, tw)
            if y.shape[-2:] != (th, tw):
                raise ValueError(f"tile function gave {tuple(y.shape[-2:])}, expected {(th, tw)} (scale {scale})")
            if output is None:
                output = torch.zeros(*y.shape[:2], out_h, out_w, device=y.device)   # (B, C_out, H', W') float32
                weight_sum = torch.zeros(out_h, out_w, device=y.device)            # (H', W')
                result_dtype = y.dtype
            w = (wy[:, None] * wx[None, :]).to(y.device)     # (th, tw)
            output[..., top:top + th, left:left + tw] += y.float() * w
            weight_sum[top:top + th, left:left + tw] += w
            del y
    return (output / weight_sum).to(result_dtype)           # (B, C_out, out_h, out_w)


def decode_tiled(
    decode: Callable[[torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    tile: int = 64,
    overlap: int = 16,
    factor: int = 8,
) -> torch.Tensor:
    """``decode`` (latent (B, c, h, w) -> image (B, C, h*factor, w*factor)) applied tile by tile.

    ``tile`` and ``overlap`` are in latent pixels (64 and 16 = 512 and 128 image pixels for f=8).
    """
    return _run_tiled(decode, z, tile, overlap, float(factor))


def encode_tiled(
    encode: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int = 512,
    overlap: int = 128,
    factor: int = 8,
) -> torch.Tensor:
    """``encode`` (image (B, C, H, W) -> latent-sized maps (B, c, H/factor, W/factor)) applied tile by tile.

    ``tile`` and ``overlap`` are in image pixels and must be multiples of ``factor``; so must the image.
    Pass the deterministic part of the encoder (the posterior's moments, sampled once the tiles are blended):
    noise sampled per tile would not blend.
    """
    for name, value in (("tile", tile), ("overlap", overlap), ("height", x.shape[-2]), ("width", x.shape[-1])):
        if value % factor:
            raise ValueError(f"{name} {value} is not a multiple of the VAE factor {factor}")
    return _run_tiled(encode, x, tile, overlap, 1.0 / factor)
