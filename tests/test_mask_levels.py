"""Masks with transparency: an RGBA mask whose alpha is not all 255 counts by its alpha (A1111's
`create_binary_mask`), in both mask paths (`overlay.blur_mask`, `images.prepare_mask`)."""

from __future__ import annotations

import torch
from PIL import Image

from sdlab.pipeline.images import mask_levels, prepare_mask
from sdlab.pipeline.overlay import blur_mask


def _masks() -> tuple[Image.Image, Image.Image]:
    grey = Image.new("L", (32, 32), 0)
    grey.paste(255, (8, 8, 24, 24))
    rgba = Image.new("RGBA", (32, 32), (255, 255, 255, 0))            # white everywhere, opaque only inside
    rgba.paste((255, 255, 255, 255), (8, 8, 24, 24))
    return grey, rgba


def test_an_rgba_mask_with_transparency_is_its_alpha():
    grey, rgba = _masks()
    assert mask_levels(rgba).tobytes() == grey.tobytes()
    for sigma in (0.0, 2.0):
        assert torch.equal(blur_mask(rgba, sigma, (64, 64)), blur_mask(grey, sigma, (64, 64)))
    for blur in (0, 3):
        assert torch.equal(prepare_mask(rgba, (16, 16), blur), prepare_mask(grey, (16, 16), blur))


def test_an_opaque_rgba_mask_and_other_modes_are_their_grey_levels():
    grey, _ = _masks()
    opaque = grey.convert("RGBA")                                      # alpha 255 everywhere: the colours count
    assert mask_levels(opaque).mode == "L" and mask_levels(opaque).tobytes() == grey.tobytes()
    assert mask_levels(grey) is grey
    assert torch.equal(blur_mask(grey.convert("RGB"), 1.0, (32, 32)), blur_mask(grey, 1.0, (32, 32)))
