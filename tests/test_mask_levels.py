"""Masks with transparency: an RGBA mask whose alpha is not all 255 counts by its alpha made binary (A1111's
`create_binary_mask`), in both mask paths (`overlay.blur_mask`, `images.prepare_mask`); other masks keep their
grey levels."""

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


def test_grey_levels_blend_and_only_an_alpha_mask_is_made_binary():
    """A1111 `create_binary_mask`: alpha > 128 repaints (128 keeps); a luminance mask keeps its grey levels,
    so a feathered brush (grey 100) blends the decoded picture in by min(2 m, 1) = 0.78 (`mask_for_overlay`)."""
    grey = Image.new("L", (8, 8), 100)
    assert torch.allclose(blur_mask(grey, 0.0, (8, 8)), torch.full((1, 1, 8, 8), 100 / 255))
    alpha = Image.new("RGBA", (3, 1))
    alpha.putdata([(0, 0, 0, 128), (0, 0, 0, 129), (0, 0, 0, 0)])
    assert list(mask_levels(alpha).getdata()) == [0, 255, 0]
