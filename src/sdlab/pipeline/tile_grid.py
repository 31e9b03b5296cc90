"""A1111's tile grid (``modules/images.py`` ``split_grid`` / ``combine_grid``): a picture cut into tiles of one size
that overlap by at least ``overlap`` pixels, drawn one by one (its SD upscale and Poor man's outpainting scripts),
and put back together with linear ramps across the overlaps.

``split_grid``: ``ceil((w - overlap) / (tile_w - overlap))`` columns spread evenly, the column ``c`` at
``int(c * (w - tile_w) / (cols - 1))`` (the last one flush with the right edge), rows the same way; a tile past
the picture (a picture smaller than a tile) takes PIL's black outside it. ``combine_grid`` pastes each row's
tiles left to right, each over the one before through a ramp ``int(i * 255 / overlap)`` (i = 0 .. overlap - 1)
across its first ``overlap`` columns, then the rows top to bottom the same way across their first rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

__all__ = ["Tile", "TileGrid", "TileRow", "combine_grid", "split_grid", "tile_count", "with_images"]


@dataclass
class Tile:
    x: int                  # its left edge in the picture
    width: int
    image: Image.Image


@dataclass
class TileRow:
    y: int                  # its top edge in the picture
    height: int
    tiles: list[Tile] = field(default_factory=list)


@dataclass
class TileGrid:
    rows: list[TileRow]
    tile_w: int
    tile_h: int
    image_w: int
    image_h: int
    overlap: int

    def tiles(self) -> list[tuple[TileRow, Tile]]:
        """Every tile with its row, row by row, left to right."""
        return [(row, tile) for row in self.rows for tile in row.tiles]


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    """The tiles' starts along one side of `length` (module docstring)."""
    count = math.ceil((length - overlap) / (tile - overlap))
    step = (length - tile) / (count - 1) if count > 1 else 0
    starts = [int(i * step) for i in range(count)]
    return [length - tile if start + tile >= length else start for start in starts]


def split_grid(image: Image.Image, tile_w: int, tile_h: int, overlap: int) -> TileGrid:
    """`image` cut into `tile_w` x `tile_h` tiles overlapping by at least `overlap` pixels (A1111's
    ``split_grid``); `overlap` must be below both tile sides."""
    if not 0 <= overlap < min(tile_w, tile_h):
        raise ValueError(f"the tiles' overlap must be 0..{min(tile_w, tile_h) - 1} px, got {overlap}")
    rows = []
    for y in _starts(image.height, tile_h, overlap):
        tiles = [Tile(x, tile_w, image.crop((x, y, x + tile_w, y + tile_h)))
                 for x in _starts(image.width, tile_w, overlap)]
        rows.append(TileRow(y, tile_h, tiles))
    return TileGrid(rows, tile_w, tile_h, image.width, image.height, overlap)


def tile_count(width: int, height: int, tile_w: int, tile_h: int, overlap: int) -> int:
    """How many tiles `split_grid` cuts a `width` x `height` picture into."""
    return len(_starts(width, tile_w, overlap)) * len(_starts(height, tile_h, overlap))


def with_images(grid: TileGrid, images: Sequence[Image.Image | None], which: Sequence[int] | None = None) -> TileGrid:
    """`grid` with its tiles `which` (indexes into `tiles()`, in order; None: all) showing `images` in turn, black
    where an image is None or missing (A1111's ``Image.new`` for a tile not drawn after an interrupt); images past
    them are left out."""
    black = Image.new("RGB", (grid.tile_w, grid.tile_h))
    new = {k: images[i] if i < len(images) and images[i] is not None else black
           for i, k in enumerate(range(len(grid.tiles())) if which is None else which)}
    numbered = iter(range(len(grid.tiles())))
    rows = [TileRow(row.y, row.height, [replace(tile, image=new.get(next(numbered), tile.image)) for tile in row.tiles])
            for row in grid.rows]
    return replace(grid, rows=rows)


def _ramp(overlap: int, length: int, down: bool = False) -> Image.Image:
    """An "L" ramp 0 .. 255 * (overlap - 1) / overlap across `overlap` columns `length` rows high, or with `down`
    across `overlap` rows `length` columns wide (A1111's ``make_mask_image``)."""
    levels = (np.arange(overlap, dtype=np.float32) * 255 / overlap).astype(np.uint8)
    ramp = np.repeat(levels.reshape((1, overlap)), length, axis=0)                   # (length, overlap)
    return Image.fromarray(np.ascontiguousarray(ramp.T if down else ramp), "L")


def combine_grid(grid: TileGrid) -> Image.Image:
    """The picture of `grid`'s tiles (A1111's ``combine_grid``, module docstring)."""
    overlap = grid.overlap
    combined = Image.new("RGB", (grid.image_w, grid.image_h))
    for row in grid.rows:
        line = Image.new("RGB", (grid.image_w, row.height))
        for tile in row.tiles:
            if tile.x == 0:
                line.paste(tile.image, (0, 0))
                continue
            if overlap:
                line.paste(tile.image.crop((0, 0, overlap, row.height)), (tile.x, 0),
                           mask=_ramp(overlap, grid.tile_h))
            line.paste(tile.image.crop((overlap, 0, tile.width, row.height)), (tile.x + overlap, 0))
        if row.y == 0:
            combined.paste(line, (0, 0))
            continue
        if overlap:
            combined.paste(line.crop((0, 0, line.width, overlap)), (0, row.y),
                           mask=_ramp(overlap, grid.image_w, down=True))
        combined.paste(line.crop((0, overlap, line.width, row.height)), (0, row.y + overlap))
    return combined
