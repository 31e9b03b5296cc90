"""Hint preprocessors: canny (OpenCV's algorithm in numpy; compared with cv2 itself when it is installed),
A1111's scribble, threshold, invert and tile_resample (OpenCV's INTER_AREA in numpy; compared with cv2 when
it is installed), tile."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from sdlab.pipeline.preprocess import PREPROCESSORS, canny, preprocess, threshold, tile, tile_resample


def _shapes(size: int = 96) -> Image.Image:
    image = Image.new("RGB", (size, size), "black")
    draw = ImageDraw.Draw(image)
    draw.rectangle([20, 20, 50, 50], fill="white")
    draw.ellipse([55, 10, 90, 80], fill=(200, 30, 60))
    return image


def _edges(image: Image.Image) -> np.ndarray:
    return np.asarray(image)[..., 0] > 0


def test_canny_traces_a_square_one_pixel_outside_the_step():
    image = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(image).rectangle([20, 20, 40, 40], fill="white")
    edges = _edges(canny(image))
    assert canny(image).mode == "RGB"
    # OpenCV keeps the first of two equal maxima across a step: the dark side of each top / left border
    assert edges[19, 25:36].all() and not edges[20, 25:36].any()
    assert edges[25:36, 19].all() and not edges[25:36, 20].any()
    assert not edges[25:36, 25:36].any()                       # nothing inside the flat square
    assert edges[:, :10].sum() == 0                            # nor in the flat background


def test_canny_thresholds_and_hysteresis():
    # a bright step (magnitude 4 * 200 = 800) continued by a faint one (4 * 40 = 160) on the same line
    pixels = np.zeros((40, 80, 3), dtype=np.uint8)
    pixels[20:, :40] = 200
    pixels[20:, 40:] = 40
    image = Image.fromarray(pixels)
    edges = _edges(canny(image, low=100, high=500))
    assert edges[19, 5:35].all() and edges[19, 45:75].all()   # the faint half joins through the strong half
    assert not _edges(canny(image, low=200, high=500))[19, 45:75].any()   # below low: dropped
    alone = np.zeros((40, 80, 3), dtype=np.uint8)
    alone[20:, :] = 40
    assert not _edges(canny(Image.fromarray(alone), low=100, high=500)).any()   # weak and not connected
    assert _edges(canny(Image.fromarray(alone), low=100, high=150)).any()
    assert _edges(canny(image, low=500, high=100)).tolist() == edges.tolist()    # swapped, as cv2.Canny
    with pytest.raises(ValueError):
        canny(image, low=-1, high=100)


def test_canny_blur_removes_noise_edges():
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(100, 140, (64, 64, 3), dtype=np.uint8))
    assert _edges(canny(noise, 50, 100)).sum() > 100
    assert _edges(canny(noise, 50, 100, blur=2.0)).sum() == 0


def test_canny_matches_opencv():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(1)
    noisy = Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8))
    for image in (_shapes(), noisy, noisy.filter(ImageFilter.GaussianBlur(2))):
        for low, high in ((100, 200), (20, 60)):
            expected = cv2.Canny(np.asarray(image), low, high) > 0
            mismatch = (_edges(canny(image, low, high)) != expected).mean()
            assert mismatch <= 0.001   # 0 with OpenCV 5.1; the tan(22.5) rounding could flip a rare pixel


SAMPLE_PHOTO = Path(__file__).resolve().parents[1] / "docs" / "samples.png"


@pytest.mark.parametrize("low, high", [(100, 200), (20, 60), (5, 250)])
def test_canny_matches_opencv_on_large_pictures(low, high):
    """A 1536 x 1024 photo and 1024 x 1024 blurred noise (low thresholds: weak parts of a million pixels, which
    the flood fill of one pixel at a time took seconds over): every pixel as cv2.Canny's."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(5)
    photo = Image.open(SAMPLE_PHOTO).convert("RGB").resize((1536, 1024), Image.Resampling.BICUBIC)
    noise = Image.fromarray(rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(1.5))
    for image in (photo, noise):
        expected = cv2.Canny(np.asarray(image), low, high) > 0
        assert np.array_equal(_edges(canny(image, low, high)), expected)   # 0 pixels apart with OpenCV 5.1


@pytest.mark.parametrize("height, width", [(1, 1), (1, 37), (37, 1), (2, 3), (5, 300), (299, 4)])
def test_canny_matches_opencv_on_thin_pictures(height, width):
    """Pictures of one or a few rows or columns (runs that fill a row, end it and open the next, bands of one row)
    and thresholds at and past the largest magnitude (2040): every pixel as cv2.Canny's."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(height * 1000 + width)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = 255                                   # a flat part: runs along whole rows too
    for low, high in ((0, 0), (20, 60), (100, 200), (2039, 2039.5), (2040, 5000)):
        expected = cv2.Canny(pixels, low, high) > 0
        assert np.array_equal(_edges(canny(Image.fromarray(pixels), low, high)), expected), (low, high)


def _spiral(size: int) -> np.ndarray:
    """A one-pixel path winding out from the centre of a size x size square: one part, 8-connected or not."""
    path = np.zeros((size, size), dtype=bool)
    y, x, dy, dx, step = size // 2, size // 2, 0, 1, 1
    while 0 <= y < size and 0 <= x < size:
        for _ in range(2):
            for _ in range(step):
                if 0 <= y < size and 0 <= x < size:
                    path[y, x] = True
                y, x = y + dy, x + dx
            dy, dx = dx, -dy
        step += 2
    return path


def test_hysteresis_keeps_the_weak_parts_that_hold_a_strong_pixel():
    """canny's hysteresis against scipy's 8-connected labels: the parts of the weak mask holding a strong pixel,
    on a spiral seeded at either end (one path of 30013 pixels), a diagonal (pixels joined by corners only)
    beside another and random masks around the 8-connected percolation density, strong pixels on the borders too."""
    ndimage = pytest.importorskip("scipy.ndimage")
    from sdlab.pipeline.preprocess import _hysteresis

    def reference(strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
        labels, _ = ndimage.label(weak, structure=np.ones((3, 3)))
        held = np.unique(labels[strong])
        return np.isin(labels, held[held > 0])

    rng = np.random.default_rng(6)
    cases = []
    spiral = _spiral(245)
    for y, x in ((122, 122), tuple(np.argwhere(spiral)[-1])):
        strong = np.zeros_like(spiral)
        strong[y, x] = True
        cases.append((strong, spiral))
    staircase = np.eye(60, dtype=bool) | np.eye(60, k=3, dtype=bool)       # two diagonals, apart
    seed = np.zeros_like(staircase)
    seed[59, 59] = True
    cases.append((seed, staircase))
    for density in (0.3, 0.4, 0.45, 0.6):
        weak = rng.random((300, 400)) < density
        strong = weak & (rng.random(weak.shape) < 0.002)
        strong[0], strong[-1], strong[:, 0], strong[:, -1] = weak[0], weak[-1], weak[:, 0], weak[:, -1]
        cases.append((strong, weak))
    cases.append((np.zeros((5, 7), dtype=bool), np.zeros((5, 7), dtype=bool)))
    for strong, weak in cases:
        edges = _hysteresis(strong, weak)
        assert np.array_equal(edges, reference(strong, weak))
    assert _hysteresis(*cases[0]).sum() == spiral.sum() and _hysteresis(*cases[2]).sum() == 60


@pytest.mark.parametrize("band_pixels", [1, 700])
def test_canny_in_bands_is_the_same(monkeypatch, band_pixels):
    """Bands of one row and of rows that do not divide the height: the edges of the picture in one piece."""
    import sdlab.pipeline.preprocess as module

    rng = np.random.default_rng(2)
    noisy = Image.fromarray(rng.integers(0, 256, (37, 80, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(1))
    whole = [canny(image, 20, 60) for image in (_shapes(), noisy)]
    monkeypatch.setattr(module, "CANNY_BAND_PIXELS", band_pixels)
    for image, expected in zip((_shapes(), noisy), whole):
        assert np.array_equal(np.asarray(canny(image, 20, 60)), np.asarray(expected))


def test_canny_memory_is_near_its_picture():
    """A 4096 x 512 picture: canny holds the picture, its booleans and output and one band's int16 gradients
    (it took ~170 bytes a pixel, 340 MB, in one piece with float64 gradients)."""
    import tracemalloc

    image = Image.new("RGB", (4096, 512), "black")
    ImageDraw.Draw(image).line([0, 0, 4095, 511], fill="white", width=3)
    tracemalloc.start()
    try:
        edges = canny(image)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert _edges(edges).any()
    assert peak < 4096 * 512 * 12 + (40 << 20)


def test_scribble_threshold_and_invert_are_a1111s():
    """sd-webui-controlnet's processor.py: simple_scribble `result[np.min(img, axis=2) < 127] = 255` (black
    strokes on white -> white on black), threshold `result[np.min(img, axis=2) > thr_a] = 255` (thr_a 127),
    invert `255 - HWC3(img)`."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    pixels[0, :3] = [[127, 200, 200], [128, 128, 255], [0, 0, 0]]
    image = Image.fromarray(pixels)
    darkest = pixels.min(axis=2)
    for module, white in (("scribble", darkest < 127), ("threshold", darkest > 127)):
        expected = np.zeros_like(pixels)
        expected[white] = 255
        assert np.array_equal(np.asarray(preprocess(image, module)), expected)
    assert np.array_equal(np.asarray(preprocess(image, "invert")), 255 - pixels)
    assert np.array_equal(np.asarray(preprocess(image.convert("L"), "invert")),
                          np.repeat(255 - np.asarray(image.convert("L"))[..., None], 3, axis=2))
    assert np.asarray(threshold(image, 50))[..., 0].tolist() == np.where(darkest > 50, 255, 0).tolist()
    drawing = Image.new("RGB", (32, 32), "white")
    ImageDraw.Draw(drawing).ellipse([6, 6, 26, 26], outline="black", width=2)
    hint = np.asarray(preprocess(drawing, "scribble"))
    assert hint[0, 0].tolist() == [0, 0, 0] and hint[6, 16].tolist() == [255, 255, 255]


def test_tile_blurs_at_the_same_size():
    image = _shapes()
    blurred = tile(image, 4)
    assert blurred.size == image.size
    a, b = np.asarray(image, dtype=float), np.asarray(blurred, dtype=float)
    assert 1.0 < np.abs(a - b).mean() < 40.0
    assert np.abs(np.diff(b, axis=1)).max() < np.abs(np.diff(a, axis=1)).max()   # no hard step survives
    assert np.asarray(tile(image, 1)).tolist() == np.asarray(image).tolist()


def test_unknown_preprocessor():
    assert "canny" in PREPROCESSORS and "none" in PREPROCESSORS
    for name in ("depth", "lineart", "shuffle", "blur_gaussian"):   # A1111's that sdlab does not reproduce
        with pytest.raises(ValueError, match=f"sdlab has no preprocessor '{name}'; it has none, canny, scribble"):
            preprocess(_shapes(), name)


def _extensions_tile_resample(img: np.ndarray, resize, thr_a: float = 1.0) -> np.ndarray:
    """sd-webui-controlnet's `tile_resample` (scripts/processor.py), its lines as written there (`HWC3` of an
    RGB picture is the picture); `resize(img, (W, H))` is its `cv2.resize(..., interpolation=cv2.INTER_AREA)`."""
    if thr_a < 1.1:
        return img
    H, W, C = img.shape
    H = int(float(H) / float(thr_a))
    W = int(float(W) / float(thr_a))
    img = resize(img, (W, H))
    return img


def test_tile_resample_is_the_extensions():
    """Its default rate (1) gives the picture itself; from 1.1 on it shrinks by the rate with OpenCV's INTER_AREA:
    whole factors average blocks (2 x 2 rounding halves up), others weigh the covered parts of pixels."""
    image = _shapes()
    for rate in (None, 1.0, 1.09):
        assert np.array_equal(np.asarray(preprocess(image, "tile_resample", rate)), np.asarray(image))
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)
    pixels[0, :2] = [[1, 1, 1], [2, 2, 2]]            # a 2 x 2 block summing to 6 (+2 >> 2: 2)
    pixels[1, :2] = [[1, 1, 1], [2, 2, 2]]
    blocks = (pixels.astype(int).reshape(5, 2, 7, 2, 3).sum(axis=(1, 3)) + 2) >> 2
    halved = preprocess(Image.fromarray(pixels), "tile_resample", 2.0)
    assert halved.size == (7, 5) and np.array_equal(np.asarray(halved), blocks) and blocks[0, 0, 0] == 2
    row = np.array([[[0] * 3, [90] * 3, [180] * 3]], dtype=np.uint8)   # 3 -> 2 pixels: cells of 1.5 pixels
    assert np.asarray(tile_resample(Image.fromarray(row).resize((3, 2), Image.NEAREST), 1.5))[0, :, 0].tolist() \
        == [30, 150]                                   # (0 + 90 / 2) / 1.5, (90 / 2 + 180) / 1.5
    assert tile_resample(image, 8).size == (12, 12)
    with pytest.raises(ValueError, match="a rate of 200 leaves no pixel of a 96x96 picture"):
        tile_resample(image, 200)


def test_tile_resample_matches_the_extension_with_opencv():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(4)
    area = lambda img, size: cv2.resize(img, size, interpolation=cv2.INTER_AREA)   # noqa: E731
    for shape in ((64, 80, 3), (37, 53, 3), (100, 100, 3)):
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        for rate in (1.0, 1.1, 1.5, 2.0, 2.37, 3.0, 4.0, 5.5, 8.0):
            expected = _extensions_tile_resample(pixels, area, rate)
            assert np.array_equal(np.asarray(preprocess(Image.fromarray(pixels), "tile_resample", rate)), expected)
