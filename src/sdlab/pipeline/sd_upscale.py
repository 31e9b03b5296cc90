"""A1111's img2img script SD upscale (scripts/sd_upscale.py of A1111 1.10): a picture upscaled, then redrawn tile by
tile with img2img and put back together.

The request's init picture goes through an upscaler (`sdlab.pipeline.upscale.upscale_by`, A1111's
`Upscaler.upscale`; "None" leaves it as it is), is cut into tiles of the request's width x height overlapping
by `overlap` pixels (`sdlab.pipeline.tile_grid.split_grid`), the tiles are drawn `batch_size` at a time as
img2img batches (one init picture per picture, `tile_batches`), and the drawn tiles are blended back over the
overlaps with linear ramps (`tile_grid.with_images`, `tile_grid.combine_grid`). Every `n_iter` draws all the tiles once
more, from the seed plus its index.

`tile_plan` checks and plans a run before anything is upscaled or drawn, `combined_pictures` puts the drawn tiles
together and `upscale_fields` are the parameters A1111 records; the server's script and `sdlab img2img --sd-upscale`
both run through them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from sdlab.pipeline.request import MAX_BATCH_COUNT
from sdlab.pipeline.tile_grid import TileGrid, combine_grid, tile_count, with_images
from sdlab.pipeline.upscale import UpscaleError, upscaled_size


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


def upscales(name: str) -> bool:
    """Whether the upscaler `name` changes the picture: A1111's "None" (any case) leaves it as it is, whatever the
    scale."""
    return name.strip().lower() != "none"


def tile_plan(size: tuple[int, int], upscaler: str, scale: float, tile: tuple[int, int], overlap: int,
              batch_size: int, upscale_count: int, seed: int) -> tuple[tuple[int, int], list[TileBatch]]:
    """(the upscaled picture's size, its `tile_batches`) of a `size` picture through `upscaler` by `scale`, cut into
    `tile` tiles overlapping by `overlap`, checked before anything runs: an `UpscaleError` for a size past the
    upscaler's limits, a picture that makes no tile, or more than `MAX_BATCH_COUNT` batches."""
    upscaled = upscaled_size(*size, scale) if upscales(upscaler) else size
    count = tile_count(*upscaled, *tile, overlap)
    if not count:
        raise UpscaleError(f"the upscaled picture ({upscaled[0]}x{upscaled[1]}) makes no tile of {tile[0]}x{tile[1]} "
                           f"overlapping by {overlap}")
    batches = tile_batches(count, batch_size, upscale_count, seed)
    if len(batches) > MAX_BATCH_COUNT:
        raise UpscaleError(f"{count} tiles x {upscale_count} make {len(batches)} batches; the limit is "
                           f"{MAX_BATCH_COUNT}")
    return upscaled, batches


def combined_pictures(grid: TileGrid, batches: list[TileBatch],
                      drawn: Sequence[Sequence[Image.Image] | None]) -> list[Image.Image]:
    """Every upscale's picture: the pictures `drawn` by its batches (None: a batch not drawn), in order, over the
    grid's tiles (A1111's `work_results`: a lone tile's batch gives all its pictures, black for the tiles past
    them) and put together (`combine_grid`)."""
    upscale_count = max(b.upscale for b in batches) + 1
    return [combine_grid(with_images(grid, [picture for b, pictures in zip(batches, drawn)
                                            if b.upscale == n and pictures is not None for picture in pictures]))
            for n in range(upscale_count)]


def upscale_fields(overlap: int, upscaler: str) -> dict[str, object]:
    """A1111's `extra_generation_params` of SD upscale, in every tile's parameters and the picture's."""
    return {"SD upscale overlap": overlap, "SD upscale upscaler": upscaler}
