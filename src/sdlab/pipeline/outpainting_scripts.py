"""A1111 1.10's img2img outpainting scripts: what each inpainting pass draws on, and the picture they make.

Both grow the init picture by ``pixels`` on the chosen sides (``outpaint_sides``: the canvas rounded up to a
multiple of 64, the extra shared between opposite sides) and inpaint the new area with the request's prompt and
settings; each pass is one ordinary inpainting request on its own pictures, with A1111's ``p.latent_mask`` (the area
Masked content and the latent blend repaint) apart from its blurred mask.

- Poor man's outpainting (scripts/poor_mans_outpainting.py, ``poor_mans_tiles``): the picture pasted on a black
  canvas, the mask white but for the picture inset by ``2 * mask_blur`` on the grown sides (the latent mask by
  ``mask_blur // 2``), the canvas cut into the request's width x height tiles overlapping by ``pixels``
  (``tile_grid.split_grid``); every tile not inside the picture is inpainted (mask blur ``2 * mask_blur``, its
  Masked content, the whole picture) with the seed after the last one's, and the tiles are put back
  (``tile_grid.combine_grid``).
- Outpainting mk2 (scripts/outpainting_mk_2.py, ``Mk2Pass``): one pass per side, left, right, up, down, each on
  the pictures the last made: the picture pasted on a black canvas grown on that side, its new area filled with
  noise shaped like the picture's spectrum and matched to its colours (``matched_noise``, the g-diffuser-bot
  function A1111 ships), then the band at that side, at most the request's width (height) wide, inpainted (Masked
  content "original", mask blur ``4 * mask_blur`` along the grown axis) and pasted back.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from sdlab.pipeline.tile_grid import Tile, TileGrid, combine_grid, split_grid, with_images

__all__ = ["DIRECTIONS", "Mk2Pass", "OutpaintError", "OutpaintTiles", "Sides", "match_histograms", "matched_noise", "mk2_passes",
           "outpaint_sides", "poor_mans_tiles"]

DIRECTIONS = ("left", "right", "up", "down")
Box = tuple[int, int, int, int]


class OutpaintError(ValueError):
    """Arguments whose mask rectangle would be inverted (Pillow's ``rectangle`` refuses it), found before drawing."""


def _check_box(box: Box, what: str) -> Box:
    """`box` (x0, y0, x1, y1), or an `OutpaintError` saying `what` when it is inverted."""
    if box[2] < box[0] or box[3] < box[1]:
        raise OutpaintError(what)
    return box


@dataclass(frozen=True)
class Sides:
    """The pixels a canvas grows by on each side."""

    left: int = 0
    right: int = 0
    up: int = 0
    down: int = 0


def outpaint_sides(size: tuple[int, int], pixels: int, directions: Iterable[str]) -> tuple[Sides, tuple[int, int]]:
    """The sides a `size` (w, h) picture grows by `pixels` in `directions`, and the canvas (w, h): each axis
    rounded up to a multiple of 64, the extra split between its two sides as A1111 splits it."""
    left, right, up, down = (pixels if side in directions else 0 for side in DIRECTIONS)
    width, height = size
    target_w = math.ceil((width + left + right) / 64) * 64
    target_h = math.ceil((height + up + down) / 64) * 64
    if left > 0:
        left = left * (target_w - width) // (left + right)
    if right > 0:
        right = target_w - width - left
    if up > 0:
        up = up * (target_h - height) // (up + down)
    if down > 0:
        down = target_h - height - up
    return Sides(left, right, up, down), (target_w, target_h)


# ------------------------------------------------------------------------------------------------------
# Poor man's outpainting


def _inset_box(size: tuple[int, int], sides: Sides, inset: int) -> Box:
    """The picture inside `sides` of a `size` canvas, inset by `inset` on the grown sides."""
    return (sides.left + (inset if sides.left > 0 else 0), sides.up + (inset if sides.up > 0 else 0),
            size[0] - sides.right - (inset if sides.right > 0 else 0),
            size[1] - sides.down - (inset if sides.down > 0 else 0))


def _inset_mask(size: tuple[int, int], sides: Sides, inset: int) -> Image.Image:
    """An "L" mask of `size`, white but for the picture inside `sides`, inset by `inset` on the grown sides."""
    mask = Image.new("L", size, "white")
    ImageDraw.Draw(mask).rectangle(_inset_box(size, sides, inset), fill="black")
    return mask


@dataclass(frozen=True)
class OutpaintTiles:
    """Poor man's outpainting's canvas cut into tiles: the tiles to inpaint (`work`, row by row) with their mask
    and latent mask, and the grid the drawn tiles go back into (`combined`)."""

    grid: TileGrid
    work: list[tuple[Tile, Image.Image, Image.Image]]

    def combined(self, drawn: Sequence[Image.Image | None]) -> Image.Image:
        """The canvas with the `work` tiles replaced by `drawn` (in order; None or missing, one not drawn after an
        interrupt: black, as A1111's ``Image.new``), put back together (``combine_grid``)."""
        work = {id(tile) for tile, _, _ in self.work}
        which = [k for k, (_, tile) in enumerate(self.grid.tiles()) if id(tile) in work]
        return combine_grid(with_images(self.grid, drawn, which))


def poor_mans_tiles(init: Image.Image, pixels: int, mask_blur: int, directions: Iterable[str],
                    tile_size: tuple[int, int]) -> OutpaintTiles:
    """A1111's Poor man's outpainting of `init` (module docstring): its canvas, mask (inset ``2 * mask_blur``)
    and latent mask (inset ``mask_blur // 2``) cut into `tile_size` (w, h) tiles overlapping by `pixels`, and
    the tiles that are not inside the picture. A mask inset past the picture is an `OutpaintError`."""
    sides, size = outpaint_sides(init.size, pixels, set(directions))
    _check_box(_inset_box(size, sides, mask_blur * 2), f"mask_blur {mask_blur} insets the {init.width}x{init.height} "
               f"picture by 2 x {mask_blur} px on each grown side, more than it has")
    canvas = Image.new("RGB", size)
    canvas.paste(init, (sides.left, sides.up))
    grids = [split_grid(image, *tile_size, overlap=pixels)
             for image in (canvas, _inset_mask(size, sides, mask_blur * 2), _inset_mask(size, sides, mask_blur // 2))]
    work = []
    for (row, tile), (_, mask), (_, latent) in zip(*(grid.tiles() for grid in grids)):
        inside = (tile.x >= sides.left and tile.x + tile.width <= size[0] - sides.right and row.y >= sides.up
                  and row.y + row.height <= size[1] - sides.down)
        if not inside:
            work.append((tile, mask.image, latent.image))
    return OutpaintTiles(grids[0], work)


# ------------------------------------------------------------------------------------------------------
# Outpainting mk2


def _fft2(data: np.ndarray) -> np.ndarray:
    """Each channel's 2-D FFT, ortho-normalised and centred as g-diffuser-bot's ``_fft2``."""
    out = np.zeros(data.shape, dtype=np.complex128)
    for c in range(data.shape[2]):
        out[:, :, c] = np.fft.ifftshift(np.fft.fft2(np.fft.fftshift(data[:, :, c]), norm="ortho"))
    return out


def _ifft2(data: np.ndarray) -> np.ndarray:
    """`_fft2`'s inverse, as g-diffuser-bot's ``_ifft2``."""
    out = np.zeros(data.shape, dtype=np.complex128)
    for c in range(data.shape[2]):
        out[:, :, c] = np.fft.ifftshift(np.fft.ifft2(np.fft.fftshift(data[:, :, c]), norm="ortho"))
    return out


def _falloff_window(rows: int, cols: int, std: float = 3.14) -> np.ndarray:
    """(rows, cols) ``1 / ((x^2 + 1) (y^2 + 1)) ^ (std / 3.14)`` over [-1, 1) scaled to the aspect (the
    ``mode=1`` window of ``_get_gaussian_window``, which names rows width)."""
    scale_x, scale_y = rows / min(rows, cols), cols / min(rows, cols)
    x = (np.arange(rows) / rows * 2.0 - 1.0) * scale_x
    window = np.zeros((rows, cols))
    for y in range(cols):
        fy = (y / cols * 2.0 - 1.0) * scale_y
        window[:, y] = (1 / ((x ** 2 + 1.0) * (fy ** 2 + 1.0))) ** (std / 3.14)
    return window


def match_histograms(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each channel (last axis) of float `image` mapped so that its cumulative histogram matches `reference`'s
    (scikit-image's ``exposure.match_histograms`` with a channel axis, which A1111 calls)."""
    matched = np.empty(image.shape, dtype=image.dtype)
    for c in range(image.shape[-1]):
        source, template = image[..., c], reference[..., c]
        _, lookup, counts = np.unique(source.reshape(-1), return_inverse=True, return_counts=True)
        values, template_counts = np.unique(template.reshape(-1), return_counts=True)
        quantiles = np.interp(np.cumsum(counts) / source.size, np.cumsum(template_counts) / template.size, values)
        matched[..., c] = quantiles[lookup].reshape(source.shape)
    return matched


def matched_noise(image: np.ndarray, mask_rgb: np.ndarray, noise_q: float = 1.0,
                  color_variation: float = 0.05) -> np.ndarray:
    """A1111's ``get_matched_noise`` (from g-diffuser-bot): `image` (H, W, 3) in [0, 1] with its `mask_rgb`
    (H, W, 3, 1 = new) area filled with noise. Uniform noise of a fixed generator (numpy's ``default_rng(0)``),
    greyed by 1 - `color_variation`, low-passed by `_falloff_window` in the Fourier domain, then given the
    spectrum magnitude (to the power `noise_q`) and phase of the kept picture (the new area its mean colour),
    normalised to [0, 1] and histogram-matched per channel to the kept pixels; the kept area stays the picture's."""
    rows, cols, channels = image.shape
    mask_grey = np.sum(mask_rgb, axis=2) / 3.0
    new_area, kept_area = mask_grey > 1e-6, mask_grey < 1e-3
    windowed = image * (1.0 - np.repeat(mask_grey[:, :, None], 3, axis=2))
    windowed /= np.max(windowed)
    windowed += np.average(image) * mask_rgb
    src_fft = _fft2(windowed)
    src_dist = np.absolute(src_fft)
    src_phase = src_fft / src_dist

    noise_rgb = np.random.default_rng(0).random((rows, cols, channels))
    noise_grey = np.sum(noise_rgb, axis=2) / 3.0
    noise_rgb *= color_variation
    for c in range(channels):
        noise_rgb[:, :, c] += (1.0 - color_variation) * noise_grey
    noise_fft = _fft2(noise_rgb)
    window = _falloff_window(rows, cols)
    for c in range(channels):
        noise_fft[:, :, c] *= window
    noise_rgb = np.real(_ifft2(noise_fft))
    shaped_fft = _fft2(noise_rgb)
    shaped_fft[:, :, :] = np.absolute(shaped_fft) ** 2 * (src_dist ** noise_q) * src_phase

    shaped = np.real(_ifft2(shaped_fft))
    shaped -= np.min(shaped)
    shaped /= np.max(shaped)
    shaped[new_area, :] = match_histograms(shaped[new_area, :], image[kept_area, :])
    return np.clip(image * (1.0 - mask_rgb) + shaped * mask_rgb, 0.0, 1.0)


def _ceil64(length: int) -> int:
    return math.ceil(length / 64) * 64


@dataclass(frozen=True)
class Mk2Pass:
    """One side's pass of Outpainting mk2: the pictures grow by `pixels` on `side`, the inpainting draws at most
    `process_size` (the request's width, height) along the grown axis; blur the mask blur argument per axis."""

    side: str
    pixels: int
    process_size: tuple[int, int]
    blur: tuple[int, int]                           # (x, y): the script's mask blur on each axis it grows, else 0

    @property
    def horizontal(self) -> bool:
        return self.side in ("left", "right")

    def grown(self, size: tuple[int, int]) -> tuple[int, int]:
        """The size a `size` picture grows to (A1111's res_w, res_h)."""
        return (size[0] + self.pixels, size[1]) if self.horizontal else (size[0], size[1] + self.pixels)

    def drawn_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The size the pass inpaints a `size` picture at (A1111's p.width, p.height): the grown axis at most
        the request's, the other the canvas's (rounded up to 64)."""
        grown = self.grown(size)
        if self.horizontal:
            return min(self.process_size[0], grown[0]), _ceil64(grown[1])
        return _ceil64(grown[0]), min(self.process_size[1], grown[1])

    def _mask_box(self, canvas: tuple[int, int], grown: tuple[int, int], inset: int) -> Box:
        """The old picture in a `canvas`-sized picture grown to `grown`, inset on the grown side by `pixels` +
        `inset` times the axis' blur (A1111's rectangle; the far sides at `grown`)."""
        blur_x, blur_y = (blur * inset for blur in self.blur)
        return (self.pixels + blur_x if self.side == "left" else 0, self.pixels + blur_y if self.side == "up" else 0,
                canvas[0] - self.pixels - blur_x if self.side == "right" else grown[0],
                canvas[1] - self.pixels - blur_y if self.side == "down" else grown[1])

    def _canvas_mask(self, canvas: tuple[int, int], grown: tuple[int, int], inset: int) -> Image.Image:
        """The RGB mask of a `canvas`-sized picture grown to `grown`: white but for `_mask_box`."""
        mask = Image.new("RGB", canvas, "white")
        ImageDraw.Draw(mask).rectangle(self._mask_box(canvas, grown, inset), fill="black")
        return mask

    def check(self, size: tuple[int, int]) -> None:
        """An `OutpaintError` when the pass on `size` pictures would inset its mask (by `pixels` + the blur on
        its canvas, + twice the blur on the band it draws: the latent mask) past the canvas or band."""
        drawn, grown = self.drawn_size(size), self.grown(size)
        for canvas, inset in (((_ceil64(grown[0]), _ceil64(grown[1])), 1), (drawn, 2)):
            _check_box(self._mask_box(canvas, grown, inset),
                       f"the {self.side} pass draws {drawn[0]}x{drawn[1]} of a {grown[0]}x{grown[1]} picture: its "
                       f"mask, {self.pixels} px + {inset} x mask_blur from that side, leaves nothing of it")

    def _crop(self, size: tuple[int, int], drawn: tuple[int, int]) -> tuple[int, int, int, int]:
        """The band of a `size` canvas that is drawn at `drawn`: at the grown side."""
        left = 0 if self.side == "left" else size[0] - drawn[0]
        top = 0 if self.side == "up" else size[1] - drawn[1]
        return left, top, left + drawn[0], top + drawn[1]

    def canvases(self, pictures: Sequence[Image.Image], noise_q: float,
                 color_variation: float) -> list[Image.Image]:
        """Each picture pasted on its black canvas (its grown size rounded up to 64) and its new area filled
        with `matched_noise` (A1111's ``output_images`` before the pass)."""
        out = []
        for picture in pictures:
            grown = self.grown(picture.size)
            canvas = Image.new("RGB", (_ceil64(grown[0]), _ceil64(grown[1])))
            canvas.paste(picture, (self.pixels if self.side == "left" else 0, self.pixels if self.side == "up" else 0))
            mask = self._canvas_mask(canvas.size, grown, 1)
            noised = matched_noise((np.asarray(canvas) / 255.0).astype(np.float64),
                                   (np.asarray(mask) / 255.0).astype(np.float64), noise_q, color_variation)
            out.append(Image.fromarray(np.clip(noised * 255.0, 0.0, 255.0).astype(np.uint8), mode="RGB"))
        return out

    def inputs(self, canvases: Sequence[Image.Image], size: tuple[int, int]
               ) -> tuple[list[Image.Image], Image.Image, Image.Image]:
        """The inpainting's init pictures (each canvas's band), mask and latent mask (RGB) for pictures of
        `size`: the band of the canvas mask, and a mask of the band's size inset by twice the blur."""
        drawn, grown = self.drawn_size(size), self.grown(size)
        box = self._crop(canvases[0].size, drawn)
        mask = self._canvas_mask(canvases[0].size, grown, 1).crop(box)
        return [canvas.crop(box) for canvas in canvases], mask, self._canvas_mask(drawn, grown, 2)

    def merged(self, canvases: Sequence[Image.Image], drawn: Sequence[Image.Image],
               size: tuple[int, int]) -> list[Image.Image]:
        """The pass's pictures: each `drawn` picture pasted into its canvas's band, cropped to the grown size."""
        grown, out = self.grown(size), []
        for canvas, picture in zip(canvases, drawn):
            canvas = canvas.copy()
            canvas.paste(picture, self._crop(canvas.size, picture.size)[:2])
            out.append(canvas.crop((0, 0, *grown)))
        return out


def mk2_passes(init_size: tuple[int, int], pixels: int, mask_blur: int, directions: Iterable[str],
               process_size: tuple[int, int]) -> list[Mk2Pass]:
    """Outpainting mk2's passes for a `init_size` picture: left, right, up, down, those `directions` grow (by the
    pixels `outpaint_sides` gives each), the mask blur on each axis that grows."""
    directions = set(directions)
    sides, _ = outpaint_sides(init_size, pixels, directions)
    blur = (mask_blur if {"left", "right"} & directions else 0, mask_blur if {"up", "down"} & directions else 0)
    return [Mk2Pass(side, getattr(sides, side), process_size, blur) for side in DIRECTIONS if getattr(sides, side) > 0]
