"""Where a subject sits and how big it is: the size classes and the 3x3 positions, as image fractions.

A subject is fitted in a square box of side `s` (fraction of the image side): its larger extent equals
`s`. The box centre for a position keeps `MARGIN` between the box and the image edge, so the border ring
that scoring reads for the background colour stays free of the subject:
    left column centre  x = MARGIN + JITTER + s / 2,   centre column x = 1 / 2,
    right column centre x = 1 - MARGIN - JITTER - s / 2,  and the same for rows.
Builders jitter the side by up to `SIZE_JITTER` (relative) and the centre by up to `JITTER`; scoring
classifies a measured side to the nearest class on a log scale and a measured centre to the nearest
column / row centre for the measured side.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "JITTER",
    "MARGIN",
    "POSITIONS",
    "SIZES",
    "SIZE_FRACTIONS",
    "SIZE_JITTER",
    "classify_position",
    "classify_size",
    "position_centre",
    "sample_placement",
]

SIZES: tuple[str, ...] = ("small", "medium", "large")
SIZE_FRACTIONS: dict[str, float] = {"small": 0.30, "medium": 0.45, "large": 0.60}
SIZE_JITTER = 0.06  # relative: side = fraction * (1 + u), |u| <= SIZE_JITTER
MARGIN = 0.05  # image fraction kept free between the subject box and the image edge
JITTER = 0.025  # image fraction: centre offset, |dx|, |dy| <= JITTER

#: row-major 3x3 grid; names are caption phrases ("top left", ...)
POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)


def _axis_offsets(position: str) -> tuple[int, int]:
    """(column, row) of a position in -1, 0, 1."""
    index = POSITIONS.index(position)
    return index % 3 - 1, index // 3 - 1


def _axis_centres(side: float) -> tuple[float, float, float]:
    reach = MARGIN + JITTER + side / 2
    return reach, 0.5, 1 - reach


def position_centre(position: str, side: float) -> tuple[float, float]:
    """Nominal (x, y) centre, image fractions, of a subject box of side `side` at `position`."""
    column, row = _axis_offsets(position)
    centres = _axis_centres(side)
    return centres[column + 1], centres[row + 1]


def sample_placement(size: str, position: str, rng: np.random.Generator) -> tuple[float, float, float]:
    """Draw (side, centre x, centre y) as image fractions for a size class and a position."""
    side = SIZE_FRACTIONS[size] * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))
    cx, cy = position_centre(position, side)
    return side, cx + rng.uniform(-JITTER, JITTER), cy + rng.uniform(-JITTER, JITTER)


def classify_size(side: float) -> str:
    """Size class nearest to a measured side (image fraction), on a log scale."""
    return min(SIZES, key=lambda name: abs(math.log(max(side, 1e-6) / SIZE_FRACTIONS[name])))


def classify_position(cx: float, cy: float, side: float) -> str:
    """Position whose nominal centre (for a box of the measured side) is nearest on each axis."""
    centres = _axis_centres(min(side, 0.9))
    column = min(range(3), key=lambda i: abs(cx - centres[i]))
    row = min(range(3), key=lambda i: abs(cy - centres[i]))
    return POSITIONS[row * 3 + column]
