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

__all__ = ["EMOJI_CODEPOINT", "GROUP_LAYOUTS", "render_copies", "render_scene", "render_scene_at"]

EMOJI_CODEPOINT: dict[str, int] = {name: codepoint for codepoint, name in EMOJI}


#: where several copies go: for each count, the position sets one is drawn from (no two copies touch)
GROUP_LAYOUTS: dict[int, tuple[tuple[str, ...], ...]] = {
    2: (("left", "right"), ("top", "bottom"), ("top left", "bottom right"), ("top right", "bottom left")),
    3: (("left", "center", "right"), ("top", "center", "bottom"), ("top left", "center", "bottom right"),
        ("top", "bottom left", "bottom right")),
}


def render_scene_at(spec: SceneSpec, side: float, cx: float, cy: float, image_size: int = 64) -> Image.Image:
    """Render one copy of the subject with an explicit placement: side and centre as image fractions."""
    return render_copies(spec, [(side, cx, cy)], image_size)


def render_copies(spec: SceneSpec, placements: list[tuple[float, float, float]], image_size: int = 64) -> Image.Image:
    """Render the subject at each (side, centre x, centre y) placement (image fractions) on the background."""
    if spec.background is None:
        raise ValueError("a scene to render needs a background colour")
    if spec.kind == "shape":
        if spec.colour is None:
            raise ValueError("a shape to render needs a colour")
        canvas = (image_size, image_size)
        image = Image.new("RGB", canvas, PALETTE[spec.background])
        for side, cx, cy in placements:
            mask = shape_mask(spec.subject, side * image_size, canvas, (cx * image_size, cy * image_size))
            image.paste(Image.new("RGB", canvas, PALETTE[spec.colour]), mask=mask)
        return image
    # emoji: compose at SUPERSAMPLE x, box-filter down (quarter-pixel placement, clean antialiasing)
    big_size = image_size * SUPERSAMPLE
    glyph = emoji_glyph(EMOJI_CODEPOINT[spec.subject])
    big = Image.new("RGBA", (big_size, big_size), PALETTE[spec.background] + (255,))
    for side, cx, cy in placements:
        target = max(1, round(side * big_size))
        scale = target / max(glyph.size)
        sized = glyph.resize(
            (max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))), Image.Resampling.LANCZOS
        )
        left = round(cx * big_size - sized.width / 2)
        top = round(cy * big_size - sized.height / 2)
        big.alpha_composite(sized, (left, top))
    return big.convert("RGB").reduce(SUPERSAMPLE)


def render_scene(spec: SceneSpec, rng: np.random.Generator, image_size: int = 64) -> Image.Image:
    """Render a fully specified scene; size jitter and centre jitter come from `rng`. Several copies
    (count 2 or 3) are small, at one of `GROUP_LAYOUTS`."""
    if spec.count not in GROUP_LAYOUTS:
        if spec.size is None or spec.position is None:
            raise ValueError("a scene to render needs a size and a position")
        return render_scene_at(spec, *sample_placement(spec.size, spec.position, rng), image_size)
    layouts = GROUP_LAYOUTS[spec.count]
    positions = layouts[int(rng.integers(len(layouts)))]
    return render_copies(spec, [sample_placement("small", position, rng) for position in positions], image_size)
