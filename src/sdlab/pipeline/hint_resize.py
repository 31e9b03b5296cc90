"""A control map fitted to the picture as A1111's ControlNet extension fits it (`detectmap_proc`'s
`high_quality_resize`, "considering binary, seg, and one-pixel edges"), without OpenCV:

- a map of 3..199 colours (a segmentation map) is resized by nearest neighbour (OpenCV's INTER_NEAREST);
  any other by OpenCV's INTER_AREA when it has fewer pixels after (`preprocess.area_resize`), else its
  INTER_CUBIC (`preprocess.cubic_resize`);
- a binary map (2 colours, one below 16, one above 240: canny, threshold, scribble) is then made binary again:
  the channels' mean, and Otsu's threshold (`otsu_binary`); a map of one-pixel edges (more than half of its
  white pixels lost by an opening) is first thinned across its edges (`nake_nms`) and after the threshold
  thinned to one pixel (`lvmin_thin`, Lvmin Zhang's hit-or-miss thinning, pruned when the map grew).

Where one side grows and the other shrinks under INTER_AREA (a stretch to another aspect ratio), OpenCV
interpolates linearly on both sides with its area coefficients, as it does where both grow; `area_resize`
follows it there too.
"""

from __future__ import annotations

import numpy as np

from sdlab.pipeline.preprocess import area_resize, cubic_resize


def _offsets(kernel: np.ndarray, value: int = 1) -> list[tuple[int, int]]:
    """The (dy, dx) of a 3 x 3 kernel's entries equal to `value`, its centre the anchor (OpenCV's)."""
    return [(int(y) - 1, int(x) - 1) for y, x in zip(*np.nonzero(kernel == value))]


def _morphology(x: np.ndarray, offsets: list[tuple[int, int]], erode: bool) -> np.ndarray:
    """OpenCV's erode (min) or dilate (max) of a uint8 (H, W[, C]) array over `offsets`; pixels past the border
    count for nothing (its default border value)."""
    pad = [(1, 1), (1, 1)] + [(0, 0)] * (x.ndim - 2)
    padded = np.pad(x, pad, constant_values=255 if erode else 0)
    height, width = x.shape[:2]
    shifted = [padded[1 + dy:1 + dy + height, 1 + dx:1 + dx + width] for dy, dx in offsets]
    return (np.minimum if erode else np.maximum).reduce(shifted)


def _square(x: np.ndarray, erode: bool) -> np.ndarray:
    return _morphology(x, _offsets(np.ones((3, 3))), erode)


def one_pixel_edges(x: np.ndarray) -> bool:
    """Whether a binary map is of one-pixel edges: an opening (3 x 3 erode, then dilate) lowers more pixel
    values than half the number of values above 127."""
    opened = _square(_square(x, erode=True), erode=False)
    return int((opened < x).sum()) * 2 > int((x > 127).sum())


NMS_LINES = [np.array(k) for k in ([[0, 0, 0], [1, 1, 1], [0, 0, 0]], [[0, 1, 0], [0, 1, 0], [0, 1, 0]],
                                   [[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, 0, 1], [0, 1, 0], [1, 0, 0]])]


def nake_nms(x: np.ndarray) -> np.ndarray:
    """The extension's `nake_nms`: a (H, W) uint8 map kept where it is the largest along any of the four lines
    through a pixel (horizontal, vertical, both diagonals), 0 elsewhere."""
    kept = np.zeros_like(x)
    for line in NMS_LINES:
        np.putmask(kept, _morphology(x, _offsets(line), erode=False) == x, x)
    return kept


def otsu_level(x: np.ndarray) -> int:
    """OpenCV's Otsu threshold (`getThreshVal_Otsu_8u`) of a uint8 array: the level of the largest
    between-class variance, its running sums in float64 in its order (bins of a class below FLT_EPSILON or
    above 1 - FLT_EPSILON skipped; the first largest wins)."""
    counts = np.bincount(x.ravel(), minlength=256)
    scale = 1.0 / x.size
    mu = float(sum(i * float(counts[i]) for i in range(256))) * scale
    mu1 = q1 = best_sigma = 0.0
    best, epsilon = 0, float(np.finfo(np.float32).eps)
    for i in range(256):
        p_i = float(counts[i]) * scale
        mu1 *= q1
        q1 += p_i
        q2 = 1.0 - q1
        if min(q1, q2) < epsilon or max(q1, q2) > 1.0 - epsilon:
            continue
        mu1 = (mu1 + i * p_i) / q1
        mu2 = (mu - q1 * mu1) / q2
        sigma = q1 * q2 * (mu1 - mu2) * (mu1 - mu2)
        if sigma > best_sigma:
            best_sigma, best = sigma, i
    return best


def otsu_binary(x: np.ndarray) -> np.ndarray:
    """`cv2.threshold(x, 0, 255, THRESH_BINARY + THRESH_OTSU)[1]`: 255 above Otsu's level, else 0."""
    return np.where(x > otsu_level(x), 255, 0).astype(np.uint8)


def _rotations(kernels: list[list[list[int]]]) -> list[np.ndarray]:
    """The kernels turned by 0, 90, 180 and 270 degrees (`np.rot90`), in the extension's order."""
    return [np.rot90(np.array(k), r) for r in range(4) for k in kernels]


THINNING = _rotations([[[-1, -1, -1], [0, 1, 0], [1, 1, 1]], [[0, -1, -1], [1, 1, -1], [0, 1, 0]]])
PRUNING = _rotations([[[-1, -1, -1], [-1, 1, -1], [0, 0, -1]], [[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]]])
"""lvmin_thin's hit-or-miss kernels (1: white, -1: black, 0: either)."""


def _hit_or_miss(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Where OpenCV's MORPH_HITMISS of a 0 / 255 map matches `kernel` (past the border matches either)."""
    white = _morphology(x, _offsets(kernel, 1), erode=True)
    black = _morphology(255 - x, _offsets(kernel, -1), erode=True)
    return (white & black) > 127


def _thin_once(x: np.ndarray, kernels: list[np.ndarray]) -> bool:
    """Each kernel's matches set to 0 in `x`, one kernel after the other; whether any matched."""
    changed = False
    for kernel in kernels:
        hits = _hit_or_miss(x, kernel)
        x[hits] = 0
        changed |= bool(hits.any())
    return changed


def lvmin_thin(x: np.ndarray, prunings: bool = True) -> np.ndarray:
    """The extension's `lvmin_thin` of a 0 / 255 (H, W) map: up to 32 rounds of the thinning kernels until one
    changes nothing, then one of the pruning kernels."""
    x = x.copy()
    for _ in range(32):
        if not _thin_once(x, THINNING):
            break
    if prunings:
        _thin_once(x, PRUNING)
    return x


def nearest_resize(x: np.ndarray, width: int, height: int) -> np.ndarray:
    """OpenCV's INTER_NEAREST: target pixel d takes source pixel min(floor(d * (1 / (target / source))),
    source - 1), in doubles as its `resizeNN` computes it (d * source / target rounds differently for some sizes)."""
    rows = np.minimum(np.floor(np.arange(height) * (1.0 / (height / x.shape[0]))).astype(int), x.shape[0] - 1)
    cols = np.minimum(np.floor(np.arange(width) * (1.0 / (width / x.shape[1]))).astype(int), x.shape[1] - 1)
    return x[rows][:, cols]


def _smooth_resize(x: np.ndarray, width: int, height: int, smaller: bool) -> np.ndarray:
    """INTER_AREA for a map with fewer pixels after (a side that grows too: OpenCV's linear area mode, see the
    module docstring), else INTER_CUBIC."""
    return area_resize(x, width, height) if smaller else cubic_resize(x, width, height)


def colour_count(x: np.ndarray) -> int:
    """How many colours a uint8 (H, W, 3) map has (the extension's `len(get_unique_axis0(...))`): each pixel
    packed into one 24-bit number and marked in a table of every colour (16 MB), not sorted."""
    packed = (x[..., 0].astype(np.uint32) << 16) | (x[..., 1].astype(np.uint32) << 8) | x[..., 2]
    seen = np.zeros(1 << 24, dtype=bool)
    seen[packed.ravel()] = True
    return int(np.count_nonzero(seen))


def high_quality_resize(x: np.ndarray, width: int, height: int) -> np.ndarray:
    """A uint8 (H, W, 3) control map at width x height as the extension's `high_quality_resize` makes it (see
    the module docstring); the map itself at its own size."""
    if x.shape[:2] == (height, width):
        return x
    area, new_area = x.shape[0] * x.shape[1], width * height
    colours = colour_count(x)
    binary = colours == 2 and x.min() < 16 and x.max() > 240
    thin = binary and one_pixel_edges(x)
    if 2 < colours < 200:
        y = nearest_resize(x, width, height)
    else:
        y = _smooth_resize(x, width, height, new_area < area)
    if not binary:
        return y
    y = np.mean(y.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
    if thin:
        y = lvmin_thin(otsu_binary(nake_nms(y)), prunings=new_area > area)
    else:
        y = otsu_binary(y)
    return np.stack([y] * 3, axis=2)
