"""`sdlab.pipeline.tile_grid` against A1111 1.10's `split_grid` / `combine_grid`, transcribed below."""

from __future__ import annotations

import math
from collections import namedtuple

import numpy as np
import pytest
from PIL import Image

from sdlab.pipeline.tile_grid import TileGrid, TileRow, Tile, combine_grid, split_grid

# AUTOMATIC1111/stable-diffusion-webui v1.10.1 modules/images.py `Grid`, `split_grid`, `combine_grid`, verbatim
Grid = namedtuple("Grid", ["tiles", "tile_w", "tile_h", "image_w", "image_h", "overlap"])


def a1111_split_grid(image, tile_w=512, tile_h=512, overlap=64):
    w = image.width
    h = image.height
    non_overlap_width = tile_w - overlap
    non_overlap_height = tile_h - overlap
    cols = math.ceil((w - overlap) / non_overlap_width)
    rows = math.ceil((h - overlap) / non_overlap_height)
    dx = (w - tile_w) / (cols - 1) if cols > 1 else 0
    dy = (h - tile_h) / (rows - 1) if rows > 1 else 0
    grid = Grid([], tile_w, tile_h, w, h, overlap)
    for row in range(rows):
        row_images = []
        y = int(row * dy)
        if y + tile_h >= h:
            y = h - tile_h
        for col in range(cols):
            x = int(col * dx)
            if x + tile_w >= w:
                x = w - tile_w
            tile = image.crop((x, y, x + tile_w, y + tile_h))
            row_images.append([x, tile_w, tile])
        grid.tiles.append([y, tile_h, row_images])
    return grid


def a1111_combine_grid(grid):
    def make_mask_image(r):
        r = r * 255 / grid.overlap
        r = r.astype(np.uint8)
        return Image.fromarray(r, 'L')

    mask_w = make_mask_image(np.arange(grid.overlap, dtype=np.float32).reshape((1, grid.overlap)).repeat(grid.tile_h, axis=0))
    mask_h = make_mask_image(np.arange(grid.overlap, dtype=np.float32).reshape((grid.overlap, 1)).repeat(grid.image_w, axis=1))
    combined_image = Image.new("RGB", (grid.image_w, grid.image_h))
    for y, h, row in grid.tiles:
        combined_row = Image.new("RGB", (grid.image_w, h))
        for x, w, tile in row:
            if x == 0:
                combined_row.paste(tile, (0, 0))
                continue
            combined_row.paste(tile.crop((0, 0, grid.overlap, h)), (x, 0), mask=mask_w)
            combined_row.paste(tile.crop((grid.overlap, 0, w, h)), (x + grid.overlap, 0))
        if y == 0:
            combined_image.paste(combined_row, (0, 0))
            continue
        combined_image.paste(combined_row.crop((0, 0, combined_row.width, grid.overlap)), (0, y), mask=mask_h)
        combined_image.paste(combined_row.crop((0, grid.overlap, combined_row.width, h)), (0, y + grid.overlap))
    return combined_image


def _picture(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


CASES = [((256, 256), (128, 128), 64), ((320, 192), (128, 96), 32), ((300, 210), (128, 128), 17),
         ((128, 128), (128, 128), 8), ((96, 80), (128, 128), 16)]


@pytest.mark.parametrize(("size", "tile", "overlap"), CASES)
def test_split_grid_cuts_the_tiles_a1111_cuts(size, tile, overlap):
    image = _picture(*size, seed=1)
    ours, theirs = split_grid(image, *tile, overlap), a1111_split_grid(image, *tile, overlap)
    assert [(row.y, row.height) for row in ours.rows] == [(y, h) for y, h, _ in theirs.tiles]
    for row, (_, _, their_row) in zip(ours.rows, theirs.tiles):
        assert [(t.x, t.width) for t in row.tiles] == [(x, w) for x, w, _ in their_row]
        for t, (_, _, picture) in zip(row.tiles, their_row):
            assert np.array_equal(np.asarray(t.image), np.asarray(picture))


@pytest.mark.parametrize(("size", "tile", "overlap"), CASES)
def test_combine_grid_blends_drawn_tiles_as_a1111(size, tile, overlap):
    """Each tile replaced by another picture (as if drawn), then put back: pixel-equal to A1111's."""
    image = _picture(*size, seed=2)
    ours, theirs = split_grid(image, *tile, overlap), a1111_split_grid(image, *tile, overlap)
    k = 0
    for row, (_, _, their_row) in zip(ours.rows, theirs.tiles):
        for t, their_tile in zip(row.tiles, their_row):
            t.image = their_tile[2] = _picture(*tile, seed=10 + k)
            k += 1
    assert np.array_equal(np.asarray(combine_grid(ours)), np.asarray(a1111_combine_grid(theirs)))


def test_an_overlap_not_below_the_tile_is_refused():
    with pytest.raises(ValueError, match="overlap"):
        split_grid(_picture(256, 256, 0), 128, 128, 128)


def test_tiles_lists_them_row_by_row():
    grid = split_grid(_picture(256, 192, 0), 128, 128, 64)
    assert [(row.y, tile.x) for row, tile in grid.tiles()] == [(0, 0), (0, 64), (0, 128), (64, 0), (64, 64), (64, 128)]
    assert isinstance(grid, TileGrid) and isinstance(grid.rows[0], TileRow) and isinstance(grid.rows[0].tiles[0], Tile)
