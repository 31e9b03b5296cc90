"""Inpainting's last step, as A1111 does it: blur the mask, then paste the original back over the result.

A1111 (``processing.py``, ``StableDiffusionProcessingImg2Img.init`` and ``apply_overlay``):

1. the mask (``images.mask_levels``: an RGBA mask with transparency is its alpha channel made binary, alpha
   > 128 is white; any other keeps its grey levels) is blurred with a Gaussian of standard deviation
   ``mask_blur`` pixels, kernel ``2 * int(2.5 * mask_blur + 0.5) + 1`` taps, separately along x and y
   (``cv2.GaussianBlur``; borders reflect without repeating the edge pixel, cv2's default);
2. the blurred mask ``m`` (0..255) is resized to the picture (Lanczos);
3. sampling repaints where ``m >= 128`` (A1111 rounds the latent-sized mask; sdlab thresholds at pixel
   size and shrinks with nearest neighbour, as diffusers does);
4. after decoding, the original is composited over the result with alpha ``1 - w``, where
   ``w = min(2 m, 255) / 255`` (``mask_for_overlay``): ``out = original * (1 - w) + decoded * w``.
   Outside the blurred mask (``w = 0``) every pixel is the original's, exactly; well inside (``w = 1``)
   every pixel is the decoded picture's; the blur's ramp blends the two.

diffusers' inpainting pipelines return the decoded picture without step 4 (``paste_back=False`` in a
`GenerationRequest` gives that; their ``VaeImageProcessor.apply_overlay`` is step 4 without the doubling).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sdlab.pipeline.images import mask_levels

__all__ = ["blur_mask", "gaussian_kernel", "overlay_weight", "paste_back"]


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """cv2's Gaussian kernel for ``sigma`` pixels: ``2 * int(2.5 * sigma + 0.5) + 1`` taps, summing to 1."""
    radius = int(2.5 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    taps = torch.exp(-(offsets**2) / (2 * sigma**2))
    return taps / taps.sum()


def blur_mask(mask_image: Image.Image, sigma: float, size: tuple[int, int]) -> torch.Tensor:
    """A1111's inpainting mask: its levels (``mask_levels``), Gaussian-blurred by ``sigma`` pixels, resized to
    ``size=(W, H)``.

    Returns float32 (1, 1, H, W) in [0, 1], quantised to 1/255 as the uint8 image A1111 keeps; 1 = repaint.
    """
    mask = mask_levels(mask_image)
    if sigma > 0:
        pixels = torch.from_numpy(np.asarray(mask, dtype=np.float64))[None, None]       # (1, 1, h, w)
        kernel = gaussian_kernel(sigma)
        for axis in (-1, -2):                                    # x, then y
            pixels = _convolve(pixels, kernel, axis)
        mask = Image.fromarray(pixels[0, 0].round().clamp(0, 255).to(torch.uint8).numpy())
    if mask.size != tuple(size):
        mask = mask.resize(tuple(size), resample=Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]    # (1, 1, H, W)


def _convolve(pixels: torch.Tensor, kernel: torch.Tensor, axis: int) -> torch.Tensor:
    """1-D convolution of (1, 1, h, w) along ``axis`` with cv2's BORDER_REFLECT_101 padding."""
    radius = len(kernel) // 2
    length = pixels.shape[axis]
    index = torch.arange(-radius, length + radius).abs()                   # reflect at the start...
    index = torch.where(index >= length, 2 * (length - 1) - index, index)  # ...and at the end
    index = index.clamp(0, length - 1)                                     # masks thinner than the kernel
    padded = pixels.index_select(axis, index)
    weight = kernel.view(1, 1, 1, -1) if axis == -1 else kernel.view(1, 1, -1, 1)
    return F.conv2d(padded, weight.to(pixels.dtype))


def overlay_weight(soft_mask: torch.Tensor) -> torch.Tensor:
    """How much of the decoded picture each pixel keeps: ``min(2 m, 1)`` (A1111's ``mask_for_overlay``)."""
    return (2 * soft_mask).clamp(max=1.0)


def paste_back(decoded: list[Image.Image], original: Image.Image, weight: torch.Tensor) -> list[Image.Image]:
    """``original * (1 - w) + decoded * w`` per pixel, rounded; ``weight`` (1, 1, H, W) in [0, 1].

    ``original`` is the init image at the decoded size (RGB). Where w is 0 the original's pixels come back
    unchanged and where it is 1 the decoded ones do."""
    w = weight[0, 0, :, :, None].numpy().astype(np.float64)                        # (H, W, 1)
    base = np.asarray(original.convert("RGB"), dtype=np.float64)                   # (H, W, 3)
    out = []
    for image in decoded:
        drawn = np.asarray(image.convert("RGB"), dtype=np.float64)                 # (H, W, 3)
        mixed = base * (1.0 - w) + drawn * w
        out.append(Image.fromarray(np.rint(mixed).clip(0, 255).astype(np.uint8)))
    return out
