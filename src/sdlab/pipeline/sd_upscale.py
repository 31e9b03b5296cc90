"""A1111's img2img script SD upscale (scripts/sd_upscale.py of A1111 1.10): a picture upscaled, then redrawn tile by
tile with img2img and put back together.

The request's init picture goes through an upscaler (`sdlab.pipeline.upscale.upscale_by`, A1111's
`Upscaler.upscale`; "None" leaves it as it is), is cut into tiles of the request's width x height overlapping
by `overlap` pixels (`sdlab.pipeline.tile_grid.split_grid`), the tiles are drawn `batch_size` at a time as
img2img batches (one init picture per picture, `tile_batches`), and the drawn tiles are blended back over the
overlaps with linear ramps (`tile_grid.with_images`, `tile_grid.combine_grid`). Every `n_iter` draws all the tiles once
more, from the seed plus its index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TileBatch:
    """One img2img batch of SD upscale: its upscale (of `n_iter`), the tiles it draws (indexes into `tiles()`),
    its seed (its pictures': seed + 0, 1, ...) and batch size (A1111 draws a lone tile `batch_size` times)."""

    upscale: int
    tiles: range
    seed: int
    batch_size: int


def tile_batches(tile_count: int, batch_size: int, upscale_count: int, seed: int) -> list[TileBatch]:
    """Every batch in A1111's order: for each of the `upscale_count` upscales (start seed `seed` + its index) the
    tiles `batch_size` at a time, each batch's seed one more than the batch before (A1111's `p.seed =
    processed.seed + 1`, so neighbouring batches share seeds); a batch of several tiles is that many pictures
    (A1111's img2img `self.batch_size = len(imgs)`), one of a single tile `batch_size` pictures of it."""
    batches = []
    for upscale in range(upscale_count):
        for i in range(math.ceil(tile_count / batch_size)):
            tiles = range(i * batch_size, min((i + 1) * batch_size, tile_count))
            batches.append(TileBatch(upscale, tiles, seed + upscale + i, len(tiles) if len(tiles) > 1 else batch_size))
    return batches
