"""Inpainting's last step, as A1111 does it: blur the mask, then paste the original back over the result.

A1111 (``processing.py``, ``StableDiffusionProcessingImg2Img.init`` and ``apply_overlay``):

1. the mask (``images.mask_levels``: an RGBA mask with transparency is its alpha channel made binary, alpha
   > 128 is white; any other keeps its grey levels) is blurred with a Gaussian of standard deviation
   ``mask_blur`` pixels (A1111's ``mask_blur_x``; ``mask_blur_y`` along y), kernel
   ``2 * int(2.5 * sigma + 0.5) + 1`` taps, along x, then along y, each pass a ``cv2.GaussianBlur`` of the
   8-bit mask with OpenCV's bit-exact integer arithmetic (`gaussian_taps`, `blur_axis`; borders reflect
   without repeating the edge pixel, cv2's default); an inverted mask (Mask mode "Inpaint not masked") is
   inverted before;
2. the blurred mask ``m`` (0..255) is resized to the picture by the img2img resize mode (Lanczos for the
   default "Just resize"; ``pipeline/init_picture.py``);
3. sampling repaints the latent cells where the mask resized to the latent size (bicubic, PIL's default) and
   rounded is 1 (A1111's ``latmask``, under its img2img convention: ``images.a1111_latent_mask``); under
   diffusers' convention where ``m >= 128`` at pixel size, shrunk with nearest neighbour, as diffusers does;
4. after decoding, the original is composited over the result with alpha ``1 - w``, where
   ``w = min(2 m, 255) / 255`` (``mask_for_overlay``): ``out = original * (1 - w) + decoded * w`` in PIL's
   integer arithmetic (a premultiplied "RGBa" overlay, ``alpha_composite``; `paste_back`).
   Outside the blurred mask (``w = 0``) every pixel is the original's, exactly; well inside (``w = 1``)
   every pixel is the decoded picture's; the blur's ramp blends the two.

Inpaint area "Only masked" (``Overlay.region``): the picture drawn for the region is first resized into
it by "Crop and resize" (``uncrop``), and the weight is the blurred mask itself at the picture's size
(A1111's ``mask_for_overlay`` there is not doubled), so the ramp blends over the whole blur.

diffusers' inpainting pipelines return the decoded picture without step 4 (``paste_back=False`` in a
`GenerationRequest` gives that; their ``VaeImageProcessor.apply_overlay`` is step 4 without the doubling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from sdlab.pipeline.images import mask_levels
from sdlab.pipeline.upscale import IMG2IMG_UPSCALER, resize_image

__all__ = ["Overlay", "apply_overlay", "axis_blurred", "blur_axis", "blur_mask", "blurred_mask", "gaussian_taps",
           "mask_tensor", "overlay_weight", "paste_back"]


def gaussian_taps(sigma: float) -> np.ndarray:
    """OpenCV's bit-exact Gaussian kernel of 8-bit pictures for ``sigma`` pixels and A1111's kernel size
    ``2 * int(2.5 * sigma + 0.5) + 1``: int64 taps in 1/256ths that sum to 256.

    As ``getGaussianKernelBitExact`` and ``getGaussianKernelFixedPoint_ED``: the outer half's
    ``exp(-x^2 / (2 sigma^2))``, normalised in float64 by 1 / (2 x their running sum + 1), is rounded to 1/256
    (ties to even) from the outside in, each tap's rounding error carried into the next; the centre takes what
    is left of 256."""
    size = 2 * int(2.5 * sigma + 0.5) + 1
    scale = -0.125 / (sigma * sigma)                               # its x runs over twice the offsets
    outer = [math.exp(float(x * x) * scale) for x in range(1 - size, 0, 2)]   # left half, outermost first
    total = 0.0
    for value in outer:                                            # in order, as OpenCV adds (not sum()'s)
        total += value
    norm = 1.0 / (total * 2.0 + 1.0)
    taps, carried = [], 0.0
    for value in outer:
        exact = value * norm * 256.0 + carried
        taps.append(round(exact))
        carried = exact - taps[-1]
    return np.array([*taps, 256 - 2 * sum(taps), *taps[::-1]], dtype=np.int64)


def blur_axis(pixels: np.ndarray, taps: np.ndarray, axis: int) -> np.ndarray:
    """A uint8 picture (H, W) convolved along ``axis`` with ``taps`` (`gaussian_taps`) as ``cv2.GaussianBlur``
    does 8-bit pictures: integer sums in 1/256ths, rounded half up to uint8 once; borders BORDER_REFLECT_101."""
    lines = np.moveaxis(pixels, axis, 0).astype(np.int32)                  # the blurred axis first
    length, radius = lines.shape[0], len(taps) // 2
    padded = lines[_reflect_101(np.arange(-radius, length + radius), length)]
    total = sum(int(tap) * padded[offset:offset + length] for offset, tap in enumerate(taps))
    return np.moveaxis(((total + 128) >> 8).astype(np.uint8), 0, axis)


def _reflect_101(index: np.ndarray, length: int) -> np.ndarray:
    """cv2's BORDER_REFLECT_101 (``borderInterpolate``): indices mirrored about the end pixels, which are not
    repeated, as many times as it takes (a mask thinner than the kernel); a 1-pixel side repeats its pixel."""
    if length == 1:
        return np.zeros_like(index)
    period = 2 * (length - 1)
    index = np.abs(index) % period
    return np.where(index >= length, period - index, index)


def blurred_mask(mask_image: Image.Image, sigma: float, sigma_y: float | None = None,
                 invert: bool = False, round_alpha: bool = True) -> Image.Image:
    """A1111's inpainting mask at its own size: its levels (``mask_levels``, a transparent mask's alpha binary
    unless `round_alpha` is off: A1111's ``mask_round``), inverted when `invert` asks
    (Mask mode "Inpaint not masked"), Gaussian-blurred by ``sigma`` pixels along x, then ``sigma_y`` along y
    (None: ``sigma``; a sigma of 0 leaves its axis as it is), each pass rounded to uint8 as A1111's two
    ``cv2.GaussianBlur`` calls round; a uint8 "L" image, white = repaint."""
    mask = mask_levels(mask_image, round_alpha)
    return axis_blurred(ImageOps.invert(mask) if invert else mask, sigma, sigma_y)


def axis_blurred(mask: Image.Image, sigma: float, sigma_y: float | None = None) -> Image.Image:
    """A uint8 "L" mask Gaussian-blurred as A1111 blurs its inpainting mask: by ``sigma`` pixels along x, then
    ``sigma_y`` along y (None: ``sigma``; a sigma of 0 leaves its axis as it is), each pass one
    ``cv2.GaussianBlur`` rounded to uint8 (`gaussian_taps`, `blur_axis`)."""
    pixels = np.asarray(mask, dtype=np.uint8)
    for axis, axis_sigma in ((1, sigma), (0, sigma if sigma_y is None else sigma_y)):     # x, then y
        if axis_sigma > 0:
            pixels = blur_axis(pixels, gaussian_taps(axis_sigma), axis)
    return Image.fromarray(pixels)


def mask_tensor(mask: Image.Image) -> torch.Tensor:
    """A uint8 mask picture as float32 (1, 1, H, W) in [0, 1], 1 = repaint."""
    return torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)[None, None]


def blur_mask(mask_image: Image.Image, sigma: float, size: tuple[int, int]) -> torch.Tensor:
    """A1111's inpainting mask (``blurred_mask``) resized to ``size=(W, H)`` (Lanczos: A1111's "Just resize").

    Returns float32 (1, 1, H, W) in [0, 1], quantised to 1/255 as the uint8 image A1111 keeps; 1 = repaint.
    """
    mask = blurred_mask(mask_image, sigma)
    if mask.size != tuple(size):
        mask = mask.resize(tuple(size), resample=Image.Resampling.LANCZOS)
    return mask_tensor(mask)                                                            # (1, 1, H, W)


def overlay_weight(soft_mask: torch.Tensor) -> torch.Tensor:
    """How much of the decoded picture each pixel keeps: ``min(2 m, 1)`` (A1111's ``mask_for_overlay``)."""
    return (2 * soft_mask).clamp(max=1.0)


def paste_back(decoded: list[Image.Image], original: Image.Image, weight: torch.Tensor) -> list[Image.Image]:
    """The original composited over each decoded picture where ``weight`` (1, 1, H, W) in [0, 1] keeps it, with
    PIL's integer arithmetic, as A1111's ``apply_overlay`` and diffusers' ``VaeImageProcessor.apply_overlay`` do:
    the original pasted premultiplied ("RGBa") under the alpha ``255 - round(255 w)``, converted to RGBA (which
    un-premultiplies it) and ``alpha_composite``-d over the decoded picture, ``out ~ original * (1 - w) + decoded
    * w``. ``original`` is the init image at the decoded size; where w is 0 its pixels come back unchanged and
    where it is 1 the decoded ones do."""
    alpha = 255 - np.rint(weight[0, 0].numpy().astype(np.float64) * 255).astype(np.uint8)      # (H, W)
    overlay = Image.new("RGBa", original.size)
    overlay.paste(original.convert("RGBA").convert("RGBa"), mask=Image.fromarray(alpha))
    overlay = overlay.convert("RGBA")
    out = []
    for image in decoded:
        pasted = image.convert("RGBA")
        pasted.alpha_composite(overlay)
        out.append(pasted.convert("RGB"))
    return out


@dataclass(frozen=True)
class Overlay:
    """What inpainting pastes its pictures onto (A1111's overlay image and ``paste_to``).

    ``original`` is the init picture at the output size (RGB), ``weight`` (1, 1, H, W) how much of the drawn
    picture each output pixel keeps, ``region`` (x1, y1, x2, y2) where the drawn picture goes for Inpaint area
    "Only masked" (None: it is the whole output)."""

    original: Image.Image
    weight: torch.Tensor
    region: tuple[int, int, int, int] | None = None


def apply_overlay(decoded: list[Image.Image], overlay: Overlay) -> list[Image.Image]:
    """The decoded pictures put back in their region (``uncrop``), then the original pasted over them
    (``paste_back``): A1111's ``apply_overlay``."""
    return paste_back([uncrop(image, overlay) for image in decoded], overlay.original, overlay.weight)


def uncrop(image: Image.Image, overlay: Overlay) -> Image.Image:
    """A picture drawn for "Only masked" in its place in the output (A1111's ``uncrop``): resized to its
    region by "Crop and resize" (``upscale.resize_image``) over the original. A1111 lays it on a transparent
    canvas instead; the pixels that differ are those outside the region, where the overlay keeps only the
    original. Without a region, ``image`` itself."""
    if overlay.region is None:
        return image
    x1, y1, x2, y2 = overlay.region
    canvas = overlay.original.copy()
    canvas.paste(resize_image(image.convert("RGB"), IMG2IMG_UPSCALER, (x2 - x1, y2 - y1), mode="crop"), (x1, y1))
    return canvas
