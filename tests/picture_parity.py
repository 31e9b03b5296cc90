"""What the end-to-end picture tests against diffusers' pipelines share: the prompt, seed, size, steps and CFG
both sides draw with, and the uint8 per-pixel comparison that must stay within `MAX_PIXEL_DIFF`."""

from __future__ import annotations

import numpy as np

MAX_PIXEL_DIFF = 2                      # out of 255
PROMPT = "a photograph of an astronaut riding a horse"
SEED = 1234
SIZE = 32                               # pixels; the tiny VAE has factor 2, so 16 x 16 latents
STEPS = 5
CFG = 7.0


def uint8_pictures(images) -> np.ndarray:
    """diffusers' `output_type="np"` floats or sdlab's PIL images -> uint8 (B, H, W, 3)."""
    if isinstance(images, np.ndarray):
        return (images * 255).round().astype(np.uint8)
    return np.stack([np.asarray(image) for image in images])


def max_pixel_diff(ours, reference) -> int:
    """The largest per-pixel difference of two picture batches, out of 255."""
    a, b = uint8_pictures(ours), uint8_pictures(reference)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert b.std() > 20, "the reference picture is nearly flat: the comparison would prove little"
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
