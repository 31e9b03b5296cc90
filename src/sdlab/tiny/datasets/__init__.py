"""Datasets sdlab trains its shipped model on: emoji and procedural shapes with structured captions.

Imports only the standard library, numpy and Pillow. The command-line builder (``python -m
sdlab.tiny.datasets.build``) is imported from its own module.
"""

from sdlab.tiny.datasets.captions import SHAPES, SceneSpec, caption, parse_caption
from sdlab.tiny.datasets.colours import BACKGROUND_COLOURS, PALETTE, SUBJECT_COLOURS, nearest_colour
from sdlab.tiny.datasets.emoji import find_emoji_font
from sdlab.tiny.datasets.emoji_subset import EMOJI, EMOJI_NAMES
from sdlab.tiny.datasets.layout import POSITIONS, SIZES
from sdlab.tiny.datasets.scene import render_scene, render_scene_at
from sdlab.tiny.datasets.shapes import HELD_OUT_SHAPE_COLOURS, is_held_out

__all__ = [
    "BACKGROUND_COLOURS",
    "EMOJI",
    "EMOJI_NAMES",
    "HELD_OUT_SHAPE_COLOURS",
    "PALETTE",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "SUBJECT_COLOURS",
    "SceneSpec",
    "caption",
    "find_emoji_font",
    "is_held_out",
    "nearest_colour",
    "parse_caption",
    "render_scene",
    "render_scene_at",
]
