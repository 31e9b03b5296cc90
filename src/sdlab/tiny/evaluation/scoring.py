"""Score one image against the SceneSpec its prompt states (prompt fidelity, no learned model).

1. Background: median colour of the border ring (`BORDER` of the side) -> nearest background colour.
2. Subject: pixels far from that colour (Delta E*ab > `SUBJECT_DELTA_E`), cleaned by a 3x3 median
   filter. Shapes keep the largest 4-connected component; emoji keep every part (sparkles, steam) but
   specks (components under `SPECK_FRACTION` of the image: a decoder's stray corner pixel on a saturated
   background would otherwise stretch the subject's box to the corner).
3. Size and position: the subject's bounding box side and centre, classified by
   `sdlab.tiny.datasets.layout` (nearest size class on a log scale; nearest row / column centre).
4. Shapes: a soft coverage mask (each pixel's Lab colour projected on the background -> subject line)
   is cropped to a square around the box, resized to `MASK_SIDE`^2 and matched to reference masks of
   every shape drawn at the measured side (nearest neighbour, L2); colour is the median of the fully covered pixels -> nearest
   subject colour.
5. Several copies ("two apples"): the subject pixels' 4-connected components of at least `COPY_FRACTION`
   of the largest are counted; the subject is read from the largest.
6. Emoji: the square crop around the box, resized to `EMOJI_SIDE`^2, is matched against every trained
   emoji rendered at that size and composited over the measured background (nearest neighbour, L2 in
   RGB); the rank of the true emoji gives top-1 and top-5.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from sdlab.tiny.datasets.captions import SHAPES, SceneSpec
from sdlab.tiny.datasets.colours import BACKGROUND_COLOURS, SUBJECT_COLOURS, nearest_colour, rgb_to_lab
from sdlab.tiny.datasets.emoji import emoji_glyph, square_rgba
from sdlab.tiny.datasets.emoji_subset import EMOJI, EMOJI_NAMES
from sdlab.tiny.datasets.layout import classify_position, classify_size
from sdlab.tiny.datasets.shapes import shape_mask

__all__ = [
    "BORDER",
    "EMOJI_SIDE",
    "MASK_SIDE",
    "SUBJECT_DELTA_E",
    "Measurement",
    "classify_emoji",
    "classify_shape",
    "measure_background",
    "score_image",
]

BORDER = 1 / 32  # border ring width, fraction of the image side (2 px at 64)
SUBJECT_DELTA_E = 18.0
MASK_SIDE = 24
EMOJI_SIDE = 16
TOP_K = 5
COPY_FRACTION = 0.4  # a component this large against the largest counts as a copy ("two apples")
SPECK_FRACTION = 4 / 4096  # an emoji part smaller than this (4 pixels at 64 x 64) is noise, not subject


@dataclass(frozen=True)
class Measurement:
    """What scoring read from an image (None where there was no subject to read)."""

    background: str
    background_rgb: tuple[int, int, int]
    subject_found: bool
    size: str | None = None
    position: str | None = None
    side: float | None = None  # larger extent of the subject box, image fraction
    centre: tuple[float, float] | None = None  # image fractions
    shape: str | None = None
    colour: str | None = None
    emoji_ranking: tuple[str, ...] = ()  # best TOP_K emoji names
    count: int | None = None  # copies of the subject, measured when the prompt asks for several


def measure_background(pixels: np.ndarray) -> tuple[str, np.ndarray]:
    """(nearest background name, median border RGB) of an (H, W, 3) uint8 image."""
    height, width = pixels.shape[:2]
    ring = max(1, round(min(height, width) * BORDER))
    border = np.concatenate(
        [
            pixels[:ring].reshape(-1, 3),
            pixels[-ring:].reshape(-1, 3),
            pixels[:, :ring].reshape(-1, 3),
            pixels[:, -ring:].reshape(-1, 3),
        ]
    )
    rgb = np.median(border, axis=0)
    return nearest_colour(rgb, BACKGROUND_COLOURS), rgb


def _far_from(pixels: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose colour differs from `rgb` by more than SUBJECT_DELTA_E."""
    distance = np.linalg.norm(rgb_to_lab(pixels) - rgb_to_lab(rgb), axis=-1)
    mask = Image.fromarray(((distance > SUBJECT_DELTA_E) * 255).astype(np.uint8))
    return np.asarray(mask.filter(ImageFilter.MedianFilter(3))) > 127


def _components(mask: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """4-connected components of a bool mask (flood fill; images here are small): (labels, sizes), where
    label i + 1 has sizes[i] pixels."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    height, width = mask.shape
    sizes: list[int] = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        label = len(sizes) + 1
        labels[y0, x0] = label
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    stack.append((ny, nx))
        sizes.append(size)
    return labels, sizes


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a bool mask (the mask itself when it is empty)."""
    labels, sizes = _components(mask)
    return labels == 1 + int(np.argmax(sizes)) if sizes else mask


def _without_specks(mask: np.ndarray) -> np.ndarray:
    """A bool mask without its components under `SPECK_FRACTION` of the image (the mask when that is all)."""
    labels, sizes = _components(mask)
    kept = [label + 1 for label, size in enumerate(sizes) if size >= SPECK_FRACTION * mask.size]
    return np.isin(labels, kept) if kept else mask


def count_copies(mask: np.ndarray) -> int:
    """Copies of a subject in a subject mask: components of at least `COPY_FRACTION` of the largest."""
    _, sizes = _components(mask)
    return sum(size >= COPY_FRACTION * max(sizes) for size in sizes) if sizes else 0


def _box(mask: np.ndarray) -> tuple[float, float, float]:
    """(centre x, centre y, side) in pixels of the bounding box of a non-empty mask."""
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    return (x0 + x1) / 2, (y0 + y1) / 2, float(max(x1 - x0, y1 - y0))


def _square_crop(array: np.ndarray, cx: float, cy: float, side: float, fill: np.ndarray) -> np.ndarray:
    """Crop a square of `side` pixels centred at (cx, cy), padding outside the image with `fill`."""
    half = side / 2
    x0, y0 = round(cx - half), round(cy - half)
    size = max(1, round(side))
    pad = size
    padded = np.empty((array.shape[0] + 2 * pad, array.shape[1] + 2 * pad) + array.shape[2:], dtype=np.float32)
    padded[...] = fill
    padded[pad:-pad, pad:-pad] = array
    return padded[y0 + pad : y0 + pad + size, x0 + pad : x0 + pad + size]


def _resize_float(array: np.ndarray, side: int) -> np.ndarray:
    """Area-resample a float (h, w) or (h, w, C) array to (side, side[, C])."""
    if array.ndim == 2:
        return np.asarray(Image.fromarray(array.astype(np.float32), "F").resize((side, side), Image.Resampling.BOX))
    return np.stack([_resize_float(array[..., c], side) for c in range(array.shape[2])], axis=-1)


@functools.lru_cache(maxsize=256)
def _shape_references(side: float) -> np.ndarray:
    """(len(SHAPES), MASK_SIDE, MASK_SIDE) coverage masks in 0..1 of every shape drawn at `side` pixels.

    Drawing the references at the measured side (not at high resolution) gives them the same loss of
    detail as the image: at 19 px a hexagon is nearly a circle, and its reference says so too.
    """
    canvas = int(np.ceil(side)) + 6
    references = []
    for shape in SHAPES:
        mask = shape_mask(shape, side, (canvas, canvas), (canvas / 2, canvas / 2))
        coverage = np.asarray(mask, dtype=np.float32) / 255
        references.append(_resize_float(_square_crop(coverage, canvas / 2, canvas / 2, side, np.float32(0)), MASK_SIDE))
    return np.stack(references)


def classify_shape(coverage: np.ndarray, cx: float, cy: float, side: float) -> str:
    """Nearest reference shape to the square crop of a (H, W) coverage mask in 0..1."""
    crop = _resize_float(_square_crop(coverage, cx, cy, side, np.float32(0)), MASK_SIDE)
    distances = ((_shape_references(round(side, 1)) - crop) ** 2).sum(axis=(1, 2))
    return SHAPES[int(np.argmin(distances))]


@functools.lru_cache(maxsize=1)
def _emoji_references() -> tuple[np.ndarray, np.ndarray]:
    """Premultiplied colour (N, S, S, 3) and alpha (N, S, S, 1), 0..1, of every trained emoji."""
    colours, alphas = [], []
    for codepoint, _ in EMOJI:
        small = (
            square_rgba(emoji_glyph(codepoint)).convert("RGBa").resize((EMOJI_SIDE, EMOJI_SIDE), Image.Resampling.BOX)
        )
        array = np.asarray(small, dtype=np.float32) / 255
        colours.append(array[..., :3])
        alphas.append(array[..., 3:])
    return np.stack(colours), np.stack(alphas)


def classify_emoji(pixels: np.ndarray, background_rgb: np.ndarray, cx: float, cy: float, side: float) -> list[str]:
    """All trained emoji names, nearest first, for the square crop of an (H, W, 3) uint8 image."""
    fill = np.asarray(background_rgb, dtype=np.float32) / 255
    crop = _square_crop(pixels.astype(np.float32) / 255, cx, cy, side, fill)
    feature = _resize_float(crop, EMOJI_SIDE)  # (S, S, 3)
    colours, alphas = _emoji_references()
    references = colours + (1 - alphas) * fill  # composited over the measured background
    distances = ((references - feature) ** 2).sum(axis=(1, 2, 3))
    return [EMOJI_NAMES[i] for i in np.argsort(distances, kind="stable")]


def _measure(pixels: np.ndarray, kind: str, several: bool = False) -> tuple[Measurement, list[str]]:
    height, width = pixels.shape[:2]
    background, background_rgb = measure_background(pixels)
    base: dict[str, object] = {"background": background, "background_rgb": tuple(round(v) for v in background_rgb)}
    mask = _far_from(pixels, background_rgb)
    if several:  # several copies: count them, read the subject from the largest
        base["count"] = count_copies(mask)
    if kind == "shape" or several:
        mask = _largest_component(mask)
    else:
        mask = _without_specks(mask)
    if not mask.any():
        return Measurement(subject_found=False, **base), []
    cx, cy, side = _box(mask)
    extra: dict[str, object] = {}
    ranking: list[str] = []
    if kind == "shape":
        lab = rgb_to_lab(pixels)  # (H, W, 3)
        bg_lab = rgb_to_lab(background_rgb)
        distance = np.linalg.norm(lab - bg_lab, axis=-1)
        core = mask & (distance >= np.percentile(distance[mask], 50))
        subject_lab = np.median(lab[core], axis=0)
        direction = subject_lab - bg_lab
        coverage = np.clip(((lab - bg_lab) @ direction) / max(float(direction @ direction), 1e-6), 0, 1)
        coverage = np.where(_largest_component(coverage > 0.5) | (coverage <= 0.5), coverage, 0).astype(np.float32)
        solid = coverage > 0.5
        if solid.any():
            cx, cy, side = _box(solid)
        full = coverage > 0.85
        colour_pixels = pixels[full] if full.sum() >= 3 else pixels[mask]
        extra["colour"] = nearest_colour(np.median(colour_pixels, axis=0), SUBJECT_COLOURS)
        extra["shape"] = classify_shape(coverage, cx, cy, side)
    else:
        ranking = classify_emoji(pixels, background_rgb, cx, cy, side)
        extra["emoji_ranking"] = tuple(ranking[:TOP_K])
    scale = float(max(height, width))
    measurement = Measurement(
        subject_found=True,
        size=classify_size(side / scale),
        position=classify_position(cx / width, cy / height, side / scale),
        side=side / scale,
        centre=(cx / width, cy / height),
        **base,
        **extra,
    )
    return measurement, ranking


def score_image(image: Image.Image, spec: SceneSpec) -> dict[str, object]:
    """Measure an image and compare with what `spec` states.

    Returns {"measured": Measurement as a dict, "correct": {attribute: bool}} with attributes
    background, size, position, count (for several copies), and for shapes shape, colour, for emoji top1, top5,
    plus "emoji_rank"
    (0-based rank of the stated emoji) for emoji. Attributes the spec leaves out are not scored.
    """
    pixels = np.asarray(image.convert("RGB"))
    measurement, ranking = _measure(pixels, spec.kind, several=spec.count != 1)
    correct: dict[str, bool] = {}
    if spec.count not in (None, 1):
        correct["count"] = measurement.count == spec.count
    if spec.background is not None:
        correct["background"] = measurement.background == spec.background
    for attribute in ("size", "position"):
        if getattr(spec, attribute) is not None:
            correct[attribute] = getattr(measurement, attribute) == getattr(spec, attribute)
    result: dict[str, object] = {}
    if spec.kind == "shape":
        correct["shape"] = measurement.shape == spec.subject
        if spec.colour is not None:
            correct["colour"] = measurement.colour == spec.colour
    else:
        rank = ranking.index(spec.subject) if ranking else len(EMOJI_NAMES)
        correct["top1"] = rank < 1
        correct["top5"] = rank < TOP_K
        result["emoji_rank"] = rank
    measured = dict(measurement.__dict__)
    measured["emoji_ranking"] = list(measurement.emoji_ranking)
    return {"measured": measured, "correct": correct, **result}
