"""Hint-image preprocessors that need no downloaded weights: canny, scribble, threshold, invert, tile_resample,
tile. The names shared with A1111's ControlNet extension mean what they mean there (its `global_state.py` /
`processor.py`); its preprocessors that run a network (lineart, depth, openpose, ...) are not here, nor those
that do more than make a picture or that sdlab does not reproduce exactly (shuffle's random warp,
blur_gaussian at its preprocessor resolution, tile_colorfix's colour fix while sampling, reference_*). Every
one reads a picture with transparency laid on white by its alpha (`flattened`), as the extension's `HWC3`.

- `canny(image, low, high)`: OpenCV's `cv2.Canny(image, low, high)` (3x3 Sobel, L1 gradient magnitude, the
  colour channel with the largest magnitude at each pixel, non-maximum suppression in four directions,
  hysteresis: pixels above `high` start edges, 8-connected pixels above `low` continue them; a `low` above
  `high` swaps them, as OpenCV does), white edges on black, as the reference ControlNet annotator; `blur` > 0
  first applies the Gaussian blur that classic Canny has and OpenCV leaves to the caller.
- `threshold(image, level, invert)`: white where the darkest channel is above `level`, black elsewhere
  (A1111's `threshold`); inverted, white where it is below: A1111's `scribble` (`simple_scribble`), which
  turns black strokes on white paper into the white-on-black strokes the scribble models read.
- `invert(image)`: 255 minus every channel (A1111's `invert`, "from white bg & black line").
- `tile_resample(image, rate)`: the extension's `tile_resample`: the picture itself at a rate below 1.1 (its
  default, 1), else shrunk to int(H / rate) x int(W / rate) by OpenCV's INTER_AREA (`area_resize`); the hint
  is then fitted to the picture's size as every hint is.
- `tile(image, factor)`: sdlab's own (the extension has no `tile`), the picture downscaled by `factor` (4)
  and scaled back up (a blurred input for the tile ControlNet at the picture's size).
- `inpaint` (the extension's `inpaint_global_harmonious`) and `inpaint_only`: the picture itself; the hint
  then takes -1 where the control's mask is (`INPAINT_MODULES`, `pipeline.control.inpaint_hint`).

A preprocessor runs on the picture at its own size, or, given a `resolution` (A1111's Processor Res), as the
extension runs canny, threshold and scribble (`RESOLUTION_MODULES`; the others take none there either): on the
picture with its short side scaled to `resolution` (OpenCV's INTER_AREA shrinking, INTER_CUBIC enlarging) and
its edges repeated to multiples of 64, the result cut back to the scaled size (`resized_with_pad`, the
extension's `resize_image_with_pad`). Pixel Perfect picks the resolution from the drawing's size
(`pixel_perfect_resolution`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from sdlab.pipeline.images import flattened

# Sector bounds of the gradient direction (OpenCV's tan(22.5 deg) and tan(67.5 deg)), as integer limits on |dy|
# for each |dx| (a Sobel derivative of bytes is at most 4 x 255): for a whole |dy|, |dy| < |dx| tan(22.5) (the
# product in float64) exactly where |dy| < ceil of it, and |dy| > |dx| tan(67.5) where |dy| > floor of it.
_TAN_22 = np.tan(np.pi / 8)
_TAN_67 = np.tan(3 * np.pi / 8)
_SOBEL_MAX = 4 * 255
_BELOW_22 = np.ceil(np.arange(_SOBEL_MAX + 1) * _TAN_22).astype(np.int16)     # (1021,): |dy| < this: horizontal
_ABOVE_67 = np.floor(np.arange(_SOBEL_MAX + 1) * _TAN_67).astype(np.int16)    # (1021,): |dy| > this: vertical


def _sobel(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3x3 Sobel derivatives (dx, dy) of an (H, W, C) int16 array, borders replicated (OpenCV's Canny), each the
    difference across one axis smoothed (1, 2, 1) along the other, in int16 (exact: |d| <= 4 x 255)."""
    p = np.pad(pixels, ((1, 1), (1, 1), (0, 0)), mode="edge")              # (H + 2, W + 2, C)
    across = p[:, 2:] - p[:, :-2]                                           # (H + 2, W, C)
    dx = across[:-2] + 2 * across[1:-1] + across[2:]                        # (H, W, C)
    down = p[2:] - p[:-2]                                                   # (H, W + 2, C)
    dy = down[:, :-2] + 2 * down[:, 1:-1] + down[:, 2:]                     # (H, W, C)
    return dx, dy


def _gradients(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dx, dy, L1 magnitude) of an (H, W, C) int16 image, taking each pixel's strongest channel (the first
    of equal ones), all (H, W) int16."""
    dx, dy = _sobel(pixels)
    magnitude = np.abs(dx) + np.abs(dy)                                     # (H, W, C), at most 2040
    best_dx, best_dy, best = dx[..., 0], dy[..., 0], magnitude[..., 0]
    for c in range(1, pixels.shape[-1]):
        stronger = magnitude[..., c] > best                                 # (H, W): strictly, so the first wins
        best_dx = np.where(stronger, dx[..., c], best_dx)
        best_dy = np.where(stronger, dy[..., c], best_dy)
        best = np.where(stronger, magnitude[..., c], best)
    return best_dx, best_dy, best


def _non_maximum(dx: np.ndarray, dy: np.ndarray, magnitude: np.ndarray) -> np.ndarray:
    """Where the magnitude is a local maximum across the edge (OpenCV's comparisons: strict on one side)."""
    m = np.pad(magnitude, 1)                                                # zero border
    centre = m[1:-1, 1:-1]
    ax, ay = np.abs(dx), np.abs(dy)
    horizontal = ay < _BELOW_22[ax]
    vertical = ay > _ABOVE_67[ax]
    diagonal = ~(horizontal | vertical)
    # the edge normal runs down-right (image rows grow downwards) where dx dy >= 0; a diagonal pixel with a
    # magnitude has both nonzero (dy = 0 is horizontal, dx = 0 vertical), so the signs' XOR tells it
    same_sign = (dx ^ dy) >= 0
    keep = horizontal & (centre > m[1:-1, :-2]) & (centre >= m[1:-1, 2:])
    keep |= vertical & (centre > m[:-2, 1:-1]) & (centre >= m[2:, 1:-1])
    down_right = (centre > m[:-2, :-2]) & (centre > m[2:, 2:])
    down_left = (centre > m[:-2, 2:]) & (centre > m[2:, :-2])
    keep |= diagonal & np.where(same_sign, down_right, down_left)
    return keep


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The runs of `mask` (H, W) along its rows, in raster order: each run's row, first column and last column
    (int32 where twice the mask's pixels fit it: flat indices, and the pairs of touching runs, fewer than that)."""
    dtype = np.int32 if mask.size < 2**30 else np.int64
    begins = mask.copy()
    begins[:, 1:] &= ~mask[:, :-1]                                          # on, with the pixel before off
    row, begin = (a.astype(dtype) for a in np.nonzero(begins))
    del begins
    ends = mask.copy()
    ends[:, :-1] &= ~mask[:, 1:]                                            # on, with the pixel after off
    return row, begin, np.nonzero(ends)[1].astype(dtype)


def _touching_runs(row: np.ndarray, begin: np.ndarray, end: np.ndarray,
                   width: int) -> tuple[np.ndarray, np.ndarray]:
    """Every two runs (numbers into a mask's `_runs`, rows `width` wide) 8-connected to each other, the second on
    the row below the first: run b (columns s..t of row r + 1) touches the runs of row r that end at column s - 1
    or later and begin at column t + 1 or earlier, a range of consecutive numbers."""
    above = (row - 1) * width                                               # the row above's first flat index
    first, last = row * width + begin, row * width + end                    # flat indices, increasing
    # the first ending at column s - 1 or later; past the last beginning at column t + 1 or before
    low = np.searchsorted(last, above + np.maximum(begin - 1, 0)).astype(row.dtype)
    high = np.searchsorted(first, above + np.minimum(end + 1, width - 1), side="right").astype(row.dtype)
    del above, first, last
    count = np.maximum(high - low, 0)                                       # (runs,): runs touched above
    del high
    below = np.repeat(np.arange(row.size, dtype=row.dtype), count)
    offsets = np.arange(below.size, dtype=row.dtype) - np.repeat(np.cumsum(count, dtype=row.dtype) - count, count)
    return np.repeat(low, count) + offsets, below


def _roots(count: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """For each of `count` nodes joined by the edges first[i] - second[i], the smallest node of its part.
    Union-find in whole arrays: each round every part's root takes the smallest root of the parts it touches
    (never a larger one, so no cycles), then roots are followed to the end; the rounds stop when no two joined
    nodes have different roots."""
    root = np.arange(count, dtype=first.dtype)
    while first.size:
        a, b = root[first], root[second]
        apart = a != b
        first, second, a, b = first[apart], second[apart], a[apart], b[apart]
        np.minimum.at(root, np.maximum(a, b), np.minimum(a, b))
        while not np.array_equal(further := root[root], root):
            root = further
    return root


def _hysteresis(strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """Pixels of `weak` 8-connected (through `weak`) to a pixel of `strong` (a subset of `weak`), as OpenCV's
    edge stack flood-fills them: the parts of `weak` that hold a strong pixel, found over its runs along the rows
    (`_runs`: a run is connected within itself; runs on consecutive rows join where they touch, `_touching_runs`)
    rather than over its pixels."""
    row, begin, end = _runs(weak)
    root = _roots(row.size, *_touching_runs(row, begin, end, weak.shape[1]))
    first, last = row * weak.shape[1] + begin, row * weak.shape[1] + end   # (runs,) flat indices
    del row, begin, end
    holds_strong = np.zeros(first.size, dtype=bool)
    holds_strong[root[np.searchsorted(first, np.flatnonzero(strong), side="right") - 1]] = True
    kept = holds_strong[root]                                               # (runs,)
    marks = np.zeros(weak.size + 1, dtype=np.int8)                          # +1 where a kept run begins, -1 past it
    marks[first[kept]] = 1
    marks[last[kept] + 1] -= 1          # 0 where a run ending a row is followed by one opening the next
    return np.cumsum(marks[:-1], dtype=np.int8).view(bool).reshape(weak.shape)


CANNY_BAND_PIXELS = 1 << 18
"""About how many pixels `canny` takes its gradients of at a time: some 60 bytes each (int16 per channel), so a
band stays near 16 MB whatever the picture's size."""


def _edge_pixels(pixels: np.ndarray, top: int, bottom: int, low: float, high: float) -> tuple[np.ndarray, ...]:
    """Rows top..bottom - 1 of canny's edge candidates (non-maximum suppressed, above `low`) and of those above
    `high`, from the uint8 picture's rows two past them each way (the 3x3 Sobel of the 3x3 comparison)."""
    start, stop = max(0, top - 2), min(pixels.shape[0], bottom + 2)
    dx, dy, magnitude = _gradients(pixels[start:stop].astype(np.int16))    # exact for rows start + 1 on
    keep = slice(top - start, bottom - start)
    candidate = _non_maximum(dx, dy, magnitude)[keep] & (magnitude[keep] > _magnitude_limit(low))
    return candidate, candidate & (magnitude[keep] > _magnitude_limit(high))


def _magnitude_limit(threshold: float) -> int:
    """The whole number a pixel's magnitude must pass to be above `threshold` (OpenCV floors it), at most the
    largest magnitude (2 x 4 x 255, which none passes), so the comparison stays in int16."""
    limit = np.floor(threshold)
    return int(limit) if limit < 2 * _SOBEL_MAX else 2 * _SOBEL_MAX


def canny(image: Image.Image, low: float = 100, high: float = 200, blur: float = 0.0) -> Image.Image:
    """Canny edges of `image` as an RGB picture (white edges on black); see the module docstring. The gradients
    run in bands of rows (`CANNY_BAND_PIXELS`), so the whole picture is held only as bytes and booleans."""
    if min(low, high) < 0:
        raise ValueError(f"canny thresholds must be >= 0, got {low} and {high}")
    low, high = sorted((low, high))
    if blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    pixels = np.asarray(image.convert("RGB"))                               # (H, W, 3) uint8
    candidate = np.empty(pixels.shape[:2], dtype=bool)
    strong = np.empty(pixels.shape[:2], dtype=bool)
    band = max(1, CANNY_BAND_PIXELS // pixels.shape[1])
    for top in range(0, pixels.shape[0], band):
        rows = slice(top, top + band)
        candidate[rows], strong[rows] = _edge_pixels(pixels, top, min(top + band, pixels.shape[0]), low, high)
    edges = _hysteresis(strong, candidate)
    del candidate, strong
    out = edges.view(np.uint8) * np.uint8(255)                              # (H, W)
    return Image.fromarray(out).convert("RGB")


def threshold(image: Image.Image, level: float = 127, invert: bool = False) -> Image.Image:
    """White where the darkest channel of `image` is above `level` (0..255), black elsewhere; `invert`: white
    where it is below (see the module docstring)."""
    darkest = np.asarray(image.convert("RGB")).min(axis=2)                  # (H, W)
    white = darkest < level if invert else darkest > level
    return Image.fromarray(np.where(white, 255, 0).astype(np.uint8)).convert("RGB")


def invert(image: Image.Image) -> Image.Image:
    """`image` with every channel inverted (255 - value), as RGB."""
    return ImageOps.invert(image.convert("RGB"))


def tile(image: Image.Image, factor: float = 4.0) -> Image.Image:
    """`image` scaled down by `factor` (area average) and back up (bicubic): the tile model's blurry input."""
    if factor < 1:
        raise ValueError(f"tile factor must be >= 1, got {factor}")
    image = image.convert("RGB")
    small = image.resize((max(1, round(image.width / factor)), max(1, round(image.height / factor))),
                         resample=Image.Resampling.BOX)
    return small.resize(image.size, resample=Image.Resampling.BICUBIC)


def _area_terms(source: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV's `computeResizeAreaTab` along one axis: every (target index, source index, weight) term, in its
    order. Target pixel d covers source [d s, (d + 1) s), s = 1 / (target / source) as OpenCV computes it (in
    float64); a source pixel counts by the part of it covered, over the cell's width: a partly covered first
    pixel, the whole ones, a partly covered last one, each of a target's terms on the next source pixel."""
    scale = 1.0 / (target / source)
    start = np.arange(target) * scale                                       # (target,) float64
    end = start + scale
    cell = np.minimum(scale, source - start)
    last = np.minimum(np.floor(end), source - 1)
    first = np.minimum(np.ceil(start), last)
    has_first, has_last = first - start > 1e-3, end - last > 1e-3
    counts = has_first + (last - first).astype(np.int64) + has_last
    d_index = np.repeat(np.arange(target), counts)
    place = np.arange(len(d_index)) - np.repeat(np.cumsum(counts) - counts, counts)   # each term's rank in its target
    s_index = (first - has_first).astype(np.int64)[d_index] + place
    weight = (1.0 / cell)[d_index]
    opening = has_first[d_index] & (place == 0)
    weight[opening] = ((first - start) / cell)[d_index[opening]]
    closing = has_last[d_index] & (place == counts[d_index] - 1)
    weight[closing] = (np.minimum(np.minimum(end - last, 1.0), cell) / cell)[d_index[closing]]
    return d_index, s_index, weight.astype(np.float32)


def _term_ranks(d_index: np.ndarray, s_index: np.ndarray, weight: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    """Area terms (sorted by target) grouped by their rank among their target's: for each rank, the targets,
    sources and weights of the terms of that rank."""
    rank = np.arange(len(d_index)) - np.searchsorted(d_index, d_index)
    picks = [np.flatnonzero(rank == j) for j in range(rank.max() + 1)]
    return [(d_index[pick], s_index[pick], weight[pick]) for pick in picks]


def _weighted_sums(x: np.ndarray, axis: int, ranks: list[tuple[np.ndarray, ...]], target: int) -> np.ndarray:
    """The 2-D array x shrunk along `axis` (0 or 1) to `target` by area terms grouped by `_term_ranks`: each
    target a float32 sum of its source values times their weights, one term after the other from 0 in their
    order, as OpenCV's `ResizeArea_Invoker` adds them."""
    shape = (target, x.shape[1]) if axis == 0 else (x.shape[0], target)
    out = np.zeros(shape, dtype=np.float32)
    for targets, sources, weights in ranks:
        product = np.take(x, sources, axis=axis) * (weights[:, None] if axis == 0 else weights)   # float32
        if len(targets) == target:                                          # every target: all in order
            out += product
        elif axis == 0:
            out[targets] += product
        else:
            out[:, targets] += product
    return out


AREA_BAND_VALUES = 1 << 21
"""About how many source values `area_resize` shrinks at a time (bytes of the uint8 picture): its float32 sums
of a band take some 8 bytes per source value at most, so a band stays near 20 MB whatever the picture's size."""


def _area_shrink(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """`cv2.resize(..., interpolation=cv2.INTER_AREA)` of a uint8 (H, W, C) picture where neither side grows and
    a factor is not whole: each source row's columns weighed by `_area_terms` in float32, then the rows, in
    bands of output rows (`AREA_BAND_VALUES`), rounded half to even."""
    rows, cols, channels = pixels.shape
    d_index, s_index, weight = _area_terms(cols, width)
    columns = [(i[:, None] * channels + np.arange(channels)).ravel() for i in (d_index, s_index)]
    order = np.argsort(columns[0], kind="stable")                          # each channel a column of its own
    across = _term_ranks(columns[0][order], columns[1][order], np.repeat(weight, channels)[order])
    y_target, y_source, y_weight = _area_terms(rows, height)
    out = np.empty((height, width * channels), dtype=np.uint8)
    band = max(1, AREA_BAND_VALUES // (cols * channels) * height // rows)
    for top in range(0, height, band):
        bottom = min(top + band, height)
        lo, hi = np.searchsorted(y_target, [top, bottom])
        first, last = y_source[lo:hi].min(), y_source[lo:hi].max() + 1
        sums = _weighted_sums(pixels[first:last].reshape(last - first, -1), 1, across, width * channels)
        down = _term_ranks(y_target[lo:hi] - top, y_source[lo:hi] - first, y_weight[lo:hi])
        out[top:bottom] = np.clip(np.rint(_weighted_sums(sums, 0, down, bottom - top)), 0, 255)
    return out.reshape(height, width, channels)


def _area_blocks(pixels: np.ndarray, fold_x: int, fold_y: int) -> np.ndarray:
    """`cv2.resize(..., interpolation=cv2.INTER_AREA)` of a uint8 (H, W, C) picture by whole factors: each
    fold_y x fold_x block's integer sum, 2 x 2 as (sum + 2) >> 2, others as float32(sum) / area rounded half to
    even; in bands of output rows (`AREA_BAND_VALUES`). OpenCV sums a block in int32, which overflows where a
    block holds more than 2 ** 31 / 255 (8.42 M) pixels' worth of white (a 3000 x 3000 white picture to 1 x 1 is
    0 there); sdlab sums in int64 and does not copy the overflow (it gives 255)."""
    rows, cols, channels = pixels.shape
    height, width = rows // fold_y, cols // fold_x
    out = np.empty((height, width, channels), dtype=np.uint8)
    band = max(1, AREA_BAND_VALUES // (cols * channels * fold_y))
    for top in range(0, height, band):
        count = min(band, height - top)
        block = pixels[top * fold_y:(top + count) * fold_y].reshape(count * fold_y, width, fold_x * channels)
        across = block[:, :, :channels].astype(np.int32)                    # (count * fold_y, width, C)
        for k in range(1, fold_x):
            across += block[:, :, k * channels:(k + 1) * channels]
        sums = across.reshape(count, fold_y, width, channels).sum(axis=1, dtype=np.int64)
        if (fold_x, fold_y) == (2, 2):
            out[top:top + count] = (sums + 2) >> 2
        else:
            mean = sums.astype(np.float32) * np.float32(1.0 / (fold_x * fold_y))
            out[top:top + count] = np.clip(np.rint(mean), 0, 255)
    return out


def _area_linear_taps(source: int, target: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's INTER_AREA taps along one axis of a resize that enlarges either axis (its generic linear
    resize with area coefficients): for target pixel d, s = floor(d / k) and f = (d + 1) - (s + 1) k (k =
    target / source) taken modulo 1 where positive, else 0; the 2 source indices s, s + 1 (borders repeated)
    and their weights 1 - f, f times 2048, rounded half to even (its fixed-point coefficients)."""
    inv_scale = target / source
    start = np.floor(np.arange(target) * (1.0 / inv_scale)).astype(np.int64)
    f = ((np.arange(target) + 1) - (start + 1) * inv_scale).astype(np.float32)
    f = np.where(f <= 0, np.float32(0), f - np.floor(f)).astype(np.float32)
    weights = np.stack([np.float32(1) - f, f], axis=-1)                       # (target, 2) float32
    index = np.clip(start[:, None] + np.arange(2), 0, source - 1)
    return index, np.rint(weights * np.float32(2048)).astype(np.int64)


def _area_enlarge(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """`cv2.resize(..., interpolation=cv2.INTER_AREA)` of a uint8 (H, W, C) picture where either side grows
    (`_area_linear_taps`): columns in integers (a column past the last source one takes that one's value
    times 2048), then rows as OpenCV's vector code (`VResizeLinearVec_32s8u`) computes them: each sum shifted
    right by 4, times its weight keeping the high 16 bits, the two added, (+ 2) >> 2. In bands of output rows
    reading only their own source rows; every term fits int32, a band's some 32 bytes per output value (its two
    source rows' column sums and products), so a band holds a quarter of `AREA_BAND_VALUES` output values."""
    channels = pixels.shape[2]
    cols, col_weights = _area_linear_taps(pixels.shape[1], width)
    rows, row_weights = _area_linear_taps(pixels.shape[0], height)
    last = cols[:, 0] + 1 >= pixels.shape[1]                                 # OpenCV's `xmax` on
    col_weights[last] = (2048, 0)
    col_weights, row_weights = col_weights.astype(np.int32), row_weights.astype(np.int32)
    out = np.empty((height, width, channels), dtype=np.uint8)
    band = max(1, AREA_BAND_VALUES // (4 * width * channels))
    for top in range(0, height, band):
        bottom = min(top + band, height)
        used, taps = np.unique(rows[top:bottom], return_inverse=True)       # the band's source rows, only
        source = pixels[used]                                               # (rows read, W, C) uint8
        across = (source[:, cols[:, 0]] * col_weights[None, :, 0, None]
                  + source[:, cols[:, 1]] * col_weights[None, :, 1, None])   # (rows read, width, C), < 2 ** 20
        across >>= 4
        taps = taps.reshape(bottom - top, 2)
        weights = row_weights[top:bottom, :, None, None]                    # (band, 2, 1, 1), <= 2048
        high = ((across[taps[:, 0]] * weights[:, 0]) >> 16) + ((across[taps[:, 1]] * weights[:, 1]) >> 16)
        out[top:bottom] = np.clip((high + 2) >> 2, 0, 255)
    return out


def area_resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """`cv2.resize(pixels, (width, height), interpolation=cv2.INTER_AREA)` of a uint8 (H, W[, C]) picture, bit
    for bit. Shrinking (neither side grows): whole factors average their blocks (`_area_blocks`), others weigh
    the covered parts in float32 (`_area_shrink`); either side growing: OpenCV's linear resize with area
    weights (`_area_enlarge`)."""
    rows, cols = pixels.shape[:2]
    image = pixels.reshape(rows, cols, -1)                                  # (H, W, C)
    scale_x, scale_y = 1.0 / (width / cols), 1.0 / (height / rows)
    fold_x, fold_y = round(scale_x), round(scale_y)
    if scale_x < 1 or scale_y < 1:
        out = _area_enlarge(image, width, height)
    elif abs(scale_x - fold_x) < np.finfo(float).eps and abs(scale_y - fold_y) < np.finfo(float).eps:
        out = _area_blocks(image, fold_x, fold_y)
    else:
        out = _area_shrink(image, width, height)
    return out.reshape(height, width, *pixels.shape[2:])


def tile_resample(image: Image.Image, rate: float = 1.0) -> Image.Image:
    """The extension's `tile_resample` (see the module docstring): `image` as RGB, shrunk by `rate` from 1.1 on."""
    image = image.convert("RGB")
    if rate < 1.1:
        return image
    width, height = int(image.width / rate), int(image.height / rate)
    if min(width, height) < 1:
        raise ValueError(f"tile_resample: a rate of {rate:g} leaves no pixel of a {image.width}x{image.height} picture")
    return Image.fromarray(area_resize(np.asarray(image), width, height))


def _cubic_taps(source: int, target: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's INTER_CUBIC taps along one axis: for each target pixel the 4 source indices (borders repeated)
    and their weights, `interpolateCubic` (A = -0.75) in float32 at the target centre's source position
    (d + 0.5) / (target / source) - 0.5, times 2048 and rounded (its fixed-point coefficients)."""
    position = ((np.arange(target) + 0.5) * (1.0 / (target / source)) - 0.5).astype(np.float32)
    start = np.floor(position)
    x = position - start                                                    # float32 in [0, 1)
    a, one = np.float32(-0.75), np.float32(1)
    w0 = ((a * (x + one) - 5 * a) * (x + one) + 8 * a) * (x + one) - 4 * a
    w1 = ((a + 2) * x - (a + 3)) * x * x + one
    w2 = ((a + 2) * (one - x) - (a + 3)) * (one - x) * (one - x) + one
    weights = np.stack([w0, w1, w2, one - w0 - w1 - w2], axis=-1)          # (target, 4)
    index = np.clip(start.astype(np.int64)[:, None] + np.arange(-1, 3), 0, source - 1)
    return index, np.rint(weights * np.float32(2048)).astype(np.int64)


CUBIC_BAND_VALUES = 1 << 18
"""About how many values `cubic_resize` computes at a time: its integer taps of a band take some 50 bytes per
value, so a band stays near 13 MB whatever the picture's size."""


def cubic_resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """`cv2.resize(pixels, (width, height), interpolation=cv2.INTER_CUBIC)` of a uint8 (H, W, C) picture, as
    OpenCV's own code computes it (its Intel IPP build rounds about 3% of the values 1 the other way): rows
    first in integers (weights of 2048), then columns: in float32 (weights / 2048 ** 2, summed from the last
    tap, rounded half to even) in runs of 8 values of a row (its SSE vector code), the row's last values past
    them in integers ((sum + 2 ** 21) >> 22). Both passes run in bands of rows (`CUBIC_BAND_VALUES`); the rows
    pass keeps its sums as int32 (4 bytes per value of H x width)."""
    cols, col_weights = _cubic_taps(pixels.shape[1], width)
    rows, row_weights = _cubic_taps(pixels.shape[0], height)
    channels = pixels.shape[2]
    band = max(1, CUBIC_BAND_VALUES // (width * channels))
    across = np.empty((pixels.shape[0], width * channels), dtype=np.int32)     # |sum| < 255 * 2048 * 2
    for top in range(0, pixels.shape[0], band):
        source = pixels[top:top + band].astype(np.int64)
        across[top:top + band] = sum(source[:, cols[:, k]] * col_weights[None, :, k, None]
                                     for k in range(4)).reshape(len(source), -1)
    out = np.empty((height, width * channels), dtype=np.uint8)
    for top in range(0, height, band):
        out[top:top + band] = _cubic_columns(across, rows[top:top + band], row_weights[top:top + band])
    return out.reshape(height, width, channels)


def _cubic_columns(across: np.ndarray, rows: np.ndarray, row_weights: np.ndarray) -> np.ndarray:
    """The output rows of `cubic_resize` from its rows pass `across` (H, width * C), the rows' source rows and
    weights `rows` / `row_weights` (n, 4)."""
    taps = across[rows].astype(np.int64)                                    # (n, 4, width * C)
    beta = (row_weights.astype(np.float32) * np.float32(1 / 2048**2))[:, :, None]             # (n, 4, 1)
    floats = taps.astype(np.float32)
    total = floats[:, 3] * beta[:, 3]
    for k in (2, 1, 0):
        total = floats[:, k] * beta[:, k] + total
    vector = total.shape[1] // 8 * 8
    total[:, vector:] = ((taps[:, :, vector:] * row_weights[:, :, None]).sum(axis=1) + (1 << 21)) >> 22
    return np.clip(np.rint(total), 0, 255).astype(np.uint8)


MAX_MAP_PIXELS = 4 * 2048 * 2048
"""The most pixels a picture scaled to its processor resolution may have, padded (`resized_with_pad`): a 4:1
picture at the slider's top, 2048 (the extension has no bound; a narrow strip's short side scaled to 512 would
make a map of hundreds of megapixels)."""


def resized_with_pad(pixels: np.ndarray, resolution: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The extension's `resize_image_with_pad`: a uint8 (H, W, 3) picture with its short side scaled to
    `resolution` (OpenCV's INTER_CUBIC enlarging, INTER_AREA otherwise; sides rounded), its last row and column
    repeated to multiples of 64; and the scaled (height, width), which the preprocessor's result is cut back to.
    A padded map past `MAX_MAP_PIXELS` is a ValueError naming both sizes."""
    height, width = pixels.shape[:2]
    k = float(resolution) / float(min(height, width))
    new_h, new_w = int(np.round(height * k)), int(np.round(width * k))
    if (new_h + -new_h % 64) * (new_w + -new_w % 64) > MAX_MAP_PIXELS:
        raise ValueError(f"processor resolution {resolution} scales the {width}x{height} picture to {new_w}x{new_h}, "
                         f"past the {MAX_MAP_PIXELS} pixels a preprocessor map may have (give a smaller one)")
    scaled = (cubic_resize if k > 1 else area_resize)(pixels, new_w, new_h)
    pad = [[0, -new_h % 64], [0, -new_w % 64], [0, 0]]
    return np.pad(scaled, pad, mode="edge"), (new_h, new_w)


def pixel_perfect_resolution(image_size: tuple[int, int], width: int, height: int, resize_mode: str) -> int:
    """The extension's Pixel Perfect resolution (`pixel_perfect_resolution`) of a picture of `image_size`
    (width, height) drawn at width x height: its short side times the scale that fits it inside the drawing
    under "fill" (Resize and Fill), else the scale that covers it, rounded."""
    raw_w, raw_h = image_size
    k0, k1 = float(height) / float(raw_h), float(width) / float(raw_w)
    scale = min(k0, k1) if resize_mode == "fill" else max(k0, k1)
    return int(np.round(scale * float(min(raw_h, raw_w))))


def processor_resolution(value: Any) -> Any:
    """An A1111 unit's (or `/controlnet/detect`'s) processor_res as the preprocessor takes it: unset (null), or a
    number outside the extension's slider (`RESOLUTION_SLIDER`, -1 too), is its default 512, as its unit's -1
    default and `bound_check_params` make it; a whole number within it as an int; any other value as given
    (checked with the control)."""
    if value is None:
        return RESOLUTION_SLIDER["value"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if not RESOLUTION_SLIDER["min"] <= value <= RESOLUTION_SLIDER["max"]:
        return RESOLUTION_SLIDER["value"]
    return int(value) if value == int(value) else value


PREPROCESSORS: dict[str, Callable[..., Image.Image]] = {            # (image, *PARAMETERS values)
    "none": lambda image: image,
    "canny": canny,
    "scribble": lambda image: threshold(image, invert=True),
    "threshold": threshold,
    "invert": invert,
    "tile_resample": tile_resample,
    "tile": tile,
    "inpaint": lambda image: image,
    "inpaint_only": lambda image: image,
}
INPAINT_MODULES = ("inpaint", "inpaint_only")
"""The preprocessors whose hint is masked: -1 where the control's mask is white (the v1.1 inpaint ControlNet)."""
RESOLUTION_MODULES = ("canny", "threshold", "scribble")
"""The preprocessors the extension runs at its processor resolution (`resized_with_pad`); its invert,
tile_resample, none and inpaint take none (sdlab's tile neither)."""
RESOLUTION_SLIDER = {"name": "Preprocessor Resolution", "value": 512, "min": 64, "max": 2048}
"""The extension's Processor Res slider of the `RESOLUTION_MODULES` (`preprocessor_sliders_config`)."""


THRESHOLD_SLIDERS: dict[str, tuple[dict[str, Any], ...]] = {
    "canny": ({"name": "Canny Low Threshold", "value": 100, "min": 1, "max": 255},
              {"name": "Canny High Threshold", "value": 200, "min": 1, "max": 255}),
    "threshold": ({"name": "Binarization Threshold", "min": 0, "max": 255, "value": 127},),
    "tile_resample": ({"name": "Down Sampling Rate", "value": 1.0, "min": 1.0, "max": 8.0, "step": 0.01},),
}
"""The preprocessors that take A1111's `threshold_a` (and `threshold_b`), with the sd-webui-controlnet extension's
sliders of them (`preprocessor_sliders_config`): canny's low and high threshold, threshold's level, tile_resample's
down-sampling rate, each with its default and range."""
PARAMETERS: dict[str, tuple[float, ...]] = {
    module: tuple(float(slider["value"]) for slider in sliders) for module, sliders in THRESHOLD_SLIDERS.items()}
"""The defaults of the `THRESHOLD_SLIDERS`."""
SLIDER_RANGES: dict[str, tuple[tuple[float, float], ...]] = {
    module: tuple((float(slider["min"]), float(slider["max"])) for slider in sliders)
    for module, sliders in THRESHOLD_SLIDERS.items()}
"""The ranges (minimum, maximum) of the `THRESHOLD_SLIDERS`: an A1111 unit's or `/controlnet/detect`'s value outside
them is the default (the extension's `ControlNetUnit.bound_check_params`, `server.controls.threshold_value`)."""


def unknown_preprocessor(module: object) -> str:
    """The message for a preprocessor sdlab has not, with the ones it has."""
    return f"sdlab has no preprocessor {module!r}; it has {', '.join(PREPROCESSORS)}"


A1111_MODULE_ALIASES = {"invert (from white bg & black line)": "invert", "inpaint_global_harmonious": "inpaint"}
"""The extension's UI names (`preprocessor_aliases`) of the preprocessors sdlab has."""


def a1111_module(module: object) -> str:
    """A1111's module name (or its UI alias, any case) -> sdlab's preprocessor of the same meaning ("None", null
    or "" -> "none"); one sdlab has not (lineart, depth, ... run networks) is a ValueError naming it."""
    name = module.strip().lower() if isinstance(module, str) else None
    if module is None or name == "":
        return "none"
    name = A1111_MODULE_ALIASES.get(name, name)
    if name in PREPROCESSORS:
        return name
    raise ValueError(unknown_preprocessor(module))


def preprocess(image: Image.Image, module: str, threshold_a: float | None = None,
               threshold_b: float | None = None, resolution: int | None = None) -> Image.Image:
    """`image` through the preprocessor called `module` (a key of `PREPROCESSORS`), with A1111's `threshold_a` /
    `threshold_b` where it takes them (`PARAMETERS`; None: the default; others ignore them, as A1111's do), at
    the processor `resolution` where it takes one (`RESOLUTION_MODULES`, `resized_with_pad`; None: at the
    picture's own size)."""
    if module not in PREPROCESSORS:
        raise ValueError(unknown_preprocessor(module))
    given = (threshold_a, threshold_b)
    values = [default if value is None else value for default, value in zip(PARAMETERS.get(module, ()), given)]
    image = flattened(image)
    if resolution is None or module not in RESOLUTION_MODULES:
        return PREPROCESSORS[module](image, *values)
    padded, (height, width) = resized_with_pad(np.asarray(image.convert("RGB")), resolution)
    return PREPROCESSORS[module](Image.fromarray(padded), *values).crop((0, 0, width, height))
