"""Render one SceneSpec to an RGB image: background, then the subject at a sampled size and position."""

from __future__ import annotations

import numpy as np
from PIL import Image

from sdlab.tiny.datasets.captions import SceneSpec
from sdlab.tiny.datasets.colours import PALETTE
from sdlab.tiny.datasets.emoji import emoji_glyph
from sdlab.tiny.datasets.emoji_subset import EMOJI
from sdlab.tiny.datasets.layout import sample_placement
from sdlab.tiny.datasets.shapes import SUPERSAMPLE, shape_mask

__all__ = ["EMOJI_CODEPOINT", "render_scene", "render_scene_at"]

EMOJI_CODEPOINT: dict[str, int] = {name: codepoint for codepoint, name in EMOJI}


def render_scene_at(spec: SceneSpec, side: float, cx: float, cy: float, image_size: int = 64) -> Image.Image:
    """Render with an explicit placement: side and centre as image fractions."""
    if spec.background is None:
        raise ValueError("a scene to render needs a background colour")
    if spec.kind == "shape":
        if spec.colour is None:
            raise ValueError("a shape to render needs a colour")
        canvas = (image_size, image_size)
        mask = shape_mask(spec.subject, side * image_size, canvas, (cx * image_size, cy * image_size))
        image = Image.new("RGB", canvas, PALETTE[spec.background])
        image.paste(Image.new("RGB", canvas, PALETTE[spec.colour]), mask=mask)
        return image
    # emoji: compose at SUPERSAMPLE x, box-filter down (quarter-pixel placement, clean antialiasing)
    big_size = image_size * SUPERSAMPLE
    glyph = emoji_glyph(EMOJI_CODEPOINT[spec.subject])
    target = max(1, round(side * big_size))
    scale = target / max(glyph.size)
    glyph = glyph.resize(
        (max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))), Image.Resampling.LANCZOS
    )
    big = Image.new("RGBA", (big_size, big_size), PALETTE[spec.background] + (255,))
    left = round(cx * big_size - glyph.width / 2)
    top = round(cy * big_size - glyph.height / 2)
    big.alpha_composite(glyph, (left, top))
    return big.convert("RGB").reduce(SUPERSAMPLE)


def render_scene(spec: SceneSpec, rng: np.random.Generator, image_size: int = 64) -> Image.Image:
    """Render a fully specified scene; size jitter and centre jitter come from `rng`."""
    if spec.size is None or spec.position is None:
        raise ValueError("a scene to render needs a size and a position")
    side, cx, cy = sample_placement(spec.size, spec.position, rng)
    return render_scene_at(spec, side, cx, cy, image_size)
