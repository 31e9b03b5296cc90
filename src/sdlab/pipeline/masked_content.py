"""A1111's "Masked content": what the masked area of an inpainting init image starts as.

- "fill": the picture with its masked area painted over by blurs of the kept area (`fill`, A1111's
  ``masking.fill``), before it is encoded;
- "original": the picture as it is;
- "latent noise": filled as "fill", then the masked area of the init latent replaced by each image's seed's
  first draw, a unit Gaussian (`masked_latent`; A1111's ``create_random_tensors(shape, seeds)`` in
  ``StableDiffusionProcessingImg2Img.init``: fresh generators of the batch's seeds and the run's random
  source, apart from the run's generators; A1111 runs ``init`` once per job, so under its img2img convention
  every batch of a batch count draws the first batch's seeds: ``request.latent_noise_seed``);
- "latent nothing": filled as "fill", then the masked area of the init latent set to zero.

Where the init latent starts the run (A1111's img2img convention at any strength, diffusers' below 1)
this is what the masked area is drawn from; the kept area is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageFilter, ImageOps
from torch import Tensor

from sdlab.diffusion.noise import initial_noise

__all__ = ["FILL_LAYERS", "fill", "masked_latent"]

FILL_LAYERS = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))
"""(Gaussian blur radius, times composited) of `fill`'s layers, in the order they are laid on."""


def fill(picture: Image.Image, mask: Image.Image) -> Image.Image:
    """The RGB `picture` with the white area of `mask` ("L" or RGB, same size) painted with the colours around it.

    The kept part (alpha 255 - mask, premultiplied) is blurred with PIL's Gaussian at each of `FILL_LAYERS`'
    radii, widest first, and each blur is alpha-composited over the ones before it, the sharper ones several
    times: a masked pixel takes the colour of the kept pixels near it at the finest blur that reaches it, a
    kept pixel its own colour (the last layer is unblurred)."""
    kept = Image.new("RGBa", picture.size)
    kept.paste(picture.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    filled = Image.new("RGBA", picture.size)
    for radius, times in FILL_LAYERS:
        layer = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(times):
            filled.alpha_composite(layer)
    return filled.convert("RGB")


def masked_latent(latent: Tensor, repaint: Tensor, content: str, seeds: Sequence[int], rng: str = "CPU") -> Tensor:
    """The init latent (B, C, h, w) with its repainted area (`repaint` (1, 1, h, w), 1 = repaint) as "latent
    noise" (image i: the first draw of a generator of the random source `rng` seeded with ``seeds[i]``) or
    "latent nothing" (zero) asks; any other content leaves it as it is."""
    if content == "latent noise":
        noise = initial_noise(tuple(latent.shape), seeds, latent.dtype, latent.device, rng=rng)  # (B, C, h, w)
        return latent * (1 - repaint) + noise * repaint
    if content == "latent nothing":
        return latent * (1 - repaint)
    return latent
