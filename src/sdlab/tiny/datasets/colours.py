"""Named colours for captions and scoring, and nearest-named-colour in CIELAB.

Two palettes share one table: `SUBJECT_COLOURS` (what a shape is painted with) and
`BACKGROUND_COLOURS` (what a scene is drawn on: every subject colour plus light tints and dark shades).
Each palette's members are far apart in CIELAB
(Delta E*ab >= 25 within a palette, see tests) so that a generated image's colour maps back to a
name without ambiguity. Distances are CIE76 Delta E*ab (Euclidean distance in L*a*b*, D65 white),
which is enough at these separations.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "BACKGROUND_COLOURS",
    "COLOUR_SYNONYMS",
    "MIN_CONTRAST",
    "PALETTE",
    "SUBJECT_COLOURS",
    "contrasting",
    "delta_e",
    "nearest_colour",
    "rgb_to_lab",
]

#: name -> sRGB (0..255). Names are lower case, as they appear in captions.
PALETTE: dict[str, tuple[int, int, int]] = {
    # subject colours: saturated and clearly named
    "red": (220, 30, 35),
    "orange": (250, 135, 20),
    "yellow": (250, 220, 30),
    "green": (40, 170, 60),
    "blue": (35, 75, 225),
    "purple": (135, 50, 185),
    "pink": (245, 110, 185),
    "brown": (125, 75, 35),
    "black": (15, 15, 15),
    "white": (248, 248, 248),
    "gray": (128, 128, 128),
    # tints and shades (backgrounds only)
    "light blue": (165, 210, 245),
    "light green": (180, 235, 175),
    "light yellow": (252, 243, 170),
    "light pink": (252, 195, 218),
    "dark blue": (20, 30, 95),
    "dark green": (20, 75, 40),
}

SUBJECT_COLOURS: tuple[str, ...] = (
    "red",
    "orange",
    "yellow",
    "green",
    "blue",
    "purple",
    "pink",
    "brown",
    "black",
    "white",
    "gray",
)
#: every named colour is also a background: the subject colours, then the light tints and dark shades
BACKGROUND_COLOURS: tuple[str, ...] = SUBJECT_COLOURS + (
    "light blue",
    "light green",
    "light yellow",
    "light pink",
    "dark blue",
    "dark green",
)

#: spellings a prompt may use -> palette name (the parser applies these before matching)
COLOUR_SYNONYMS: dict[str, str] = {
    "grey": "gray",
    "violet": "purple",
    "navy": "dark blue",
    "navy blue": "dark blue",
    "sky blue": "light blue",
    "pale blue": "light blue",
    "pale green": "light green",
    "pale yellow": "light yellow",
    "pale pink": "light pink",
    "forest green": "dark green",
}

#: Delta E*ab a shape's colour keeps from its background so that it can be seen (and scored)
MIN_CONTRAST = 30.0


def contrasting(colour: str, background: str) -> bool:
    """Whether a shape of ``colour`` is visible on ``background`` (Delta E*ab >= MIN_CONTRAST)."""
    return float(delta_e(PALETTE[colour], PALETTE[background])) >= MIN_CONTRAST

# sRGB D65 -> XYZ (IEC 61966-2-1) and the D65 reference white for L*a*b*
_SRGB_TO_XYZ = np.array(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
)
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])


def rgb_to_lab(rgb: np.ndarray | tuple[int, int, int]) -> np.ndarray:
    """sRGB in 0..255 (any leading shape, last axis 3) -> CIE L*a*b* (D65), same shape, float64."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)  # inverse sRGB gamma
    xyz = linear @ _SRGB_TO_XYZ.T / _WHITE_D65
    eps, kappa = 216 / 24389, 24389 / 27
    f = np.where(xyz > eps, np.cbrt(xyz), (kappa * xyz + 16) / 116)
    lab = np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)
    return lab


def delta_e(rgb_a: np.ndarray | tuple[int, int, int], rgb_b: np.ndarray | tuple[int, int, int]) -> np.ndarray:
    """CIE76 colour difference Delta E*ab between sRGB colours (broadcasting over leading axes)."""
    return np.linalg.norm(rgb_to_lab(rgb_a) - rgb_to_lab(rgb_b), axis=-1)


def nearest_colour(rgb: np.ndarray | tuple[int, int, int], candidates: tuple[str, ...] = tuple(PALETTE)) -> str:
    """Name of the palette colour (among `candidates`) nearest to `rgb` in CIELAB."""
    lab = rgb_to_lab(rgb)
    table = rgb_to_lab(np.array([PALETTE[name] for name in candidates]))
    return candidates[int(np.argmin(np.linalg.norm(table - lab, axis=-1)))]
