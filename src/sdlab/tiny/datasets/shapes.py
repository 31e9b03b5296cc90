"""Procedural shapes: outlines in a unit box, masks drawn at 4x and box-filtered down (antialiasing),
and the (shape, colour) pairs held out of training to measure generalisation.

Every shape is upright and fills a square box edge to edge along its larger extent, so "size" means the
same thing for all of them (see `sdlab.tiny.datasets.layout`).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from sdlab.tiny.datasets.captions import SHAPES

__all__ = ["HELD_OUT_SHAPE_COLOURS", "SUPERSAMPLE", "is_held_out", "shape_mask", "shape_outline"]

SUPERSAMPLE = 4

#: (shape, colour) pairs never drawn in a training set. Each shape and each colour is held out at most
#: once, so every shape and every colour is still seen in training, just never together in these pairs.
HELD_OUT_SHAPE_COLOURS: frozenset[tuple[str, str]] = frozenset(
    {
        ("circle", "purple"),
        ("square", "orange"),
        ("triangle", "pink"),
        ("star", "green"),
        ("hexagon", "red"),
        ("heart", "blue"),
        ("diamond", "yellow"),
        ("cross", "brown"),
    }
)


def is_held_out(shape: str, colour: str | None) -> bool:
    """True when (shape, colour) is one of the pairs no training set contains."""
    return (shape, colour) in HELD_OUT_SHAPE_COLOURS


def _regular_polygon(corners: int, start_angle: float) -> list[tuple[float, float]]:
    return [
        (math.cos(start_angle + 2 * math.pi * k / corners), math.sin(start_angle + 2 * math.pi * k / corners))
        for k in range(corners)
    ]


def _star(points: int = 5, inner: float = 0.5) -> list[tuple[float, float]]:
    outline = []
    for k in range(2 * points):
        radius = 1.0 if k % 2 == 0 else inner
        angle = -math.pi / 2 + math.pi * k / points
        outline.append((radius * math.cos(angle), radius * math.sin(angle)))
    return outline


def _heart(samples: int = 96) -> list[tuple[float, float]]:
    """The classic parametric heart x = 16 sin^3 t, y = 13 cos t - 5 cos 2t - 2 cos 3t - cos 4t."""
    outline = []
    for k in range(samples):
        t = 2 * math.pi * k / samples
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        outline.append((x, -y))  # image y grows downwards
    return outline


def _cross(arm: float = 0.36) -> list[tuple[float, float]]:
    a = arm / 2
    return [
        (-a, -0.5),
        (a, -0.5),
        (a, -a),
        (0.5, -a),
        (0.5, a),
        (a, a),
        (a, 0.5),
        (-a, 0.5),
        (-a, a),
        (-0.5, a),
        (-0.5, -a),
        (-a, -a),
    ]


def shape_outline(shape: str) -> list[tuple[float, float]] | None:
    """Polygon of a shape in the unit box [-0.5, 0.5]^2, larger extent exactly 1; None for the circle."""
    if shape == "circle":
        return None
    outline = {
        "square": [(-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)],
        "triangle": _regular_polygon(3, -math.pi / 2),
        "star": _star(),
        "hexagon": _regular_polygon(6, -math.pi / 2),  # pointy top: flat sides left and right
        "heart": _heart(),
        "diamond": [(0.0, -1.0), (0.75, 0.0), (0.0, 1.0), (-0.75, 0.0)],  # a rhombus, taller than wide
        "cross": _cross(),
    }.get(shape)
    if outline is None:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    points = np.array(outline)
    low, high = points.min(axis=0), points.max(axis=0)
    centre, extent = (low + high) / 2, (high - low).max()
    return [tuple(p) for p in (points - centre) / extent]


def shape_mask(shape: str, side: float, canvas: tuple[int, int], centre: tuple[float, float]) -> Image.Image:
    """'L' coverage mask (0..255) of a shape with larger extent `side` pixels centred at `centre`.

    Drawn at `SUPERSAMPLE` x resolution and box-filtered down, so edges carry fractional coverage.
    """
    scale = SUPERSAMPLE
    big = Image.new("L", (canvas[0] * scale, canvas[1] * scale), 0)
    draw = ImageDraw.Draw(big)
    cx, cy, half = centre[0] * scale, centre[1] * scale, side * scale / 2
    outline = shape_outline(shape)
    if outline is None:
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=255)
    else:
        draw.polygon([(cx + x * 2 * half, cy + y * 2 * half) for x, y in outline], fill=255)
    return big.reduce(scale)
