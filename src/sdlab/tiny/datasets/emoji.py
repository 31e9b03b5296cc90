"""Emoji subjects: find the Noto Color Emoji font, render glyphs, choose the emoji subset.

Noto Color Emoji (Debian/Ubuntu package `fonts-noto-color-emoji`, SIL Open Font License) is a CBDT
bitmap font: its glyphs are 136x128 PNG strikes drawn at exactly size 109, so we render at 109 with
`embedded_color=True`, crop to the alpha bounding box and resize from there.

The subset (`sdlab.tiny.datasets.emoji_subset.EMOJI`) was produced by `select_emoji_subset` and is stored
as a constant so that the vocabulary a model was trained on does not move with the installed font:
single code points whose Unicode name is a usable caption (at most three words, none of them in
`NAME_EXCLUSIONS`; not the zodiac tiles of `EXCLUDED_CODEPOINTS`), that render in colour,
and that stay distinguishable from every emoji chosen before them at 16x16 pixels (greedy: the
familiar `PRIORITY` emoji first, then code point order; RMS distance of the 16x16 renders on mid
gray >= `DISTINCT_RMS`). With the font of Debian's fonts-noto-color-emoji 2.042 this keeps 259.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "DEBIAN_PACKAGE",
    "DISTINCT_RMS",
    "EMOJI_FONT_FILE",
    "FONT_DIRS",
    "caption_name",
    "emoji_glyph",
    "find_emoji_font",
    "select_emoji_subset",
    "square_rgba",
]

logger = logging.getLogger(__name__)

EMOJI_FONT_FILE = "NotoColorEmoji.ttf"
DEBIAN_PACKAGE = "fonts-noto-color-emoji"
FONT_SIZE = 109  # the only size of the font's bitmap strike
FONT_DIRS: tuple[str, ...] = (
    "/usr/share/fonts",
    "/usr/local/share/fonts",
    "~/.local/share/fonts",
    "~/.fonts",
    "/Library/Fonts",
    "~/Library/Fonts",
    "/System/Library/Fonts",
    "C:/Windows/Fonts",
)
FONT_ENV = "SDLAB_EMOJI_FONT"

#: words that may not appear in a caption name: they belong to the rest of the caption grammar
#: (shape, size, position, background) or are glyph-style words, not what the picture shows
NAME_EXCLUSIONS: frozenset[str] = frozenset(
    {
        "circle",
        "square",
        "triangle",
        "star",
        "hexagon",
        "heart",
        "diamond",
        "cross",
        "pentagon",
        "small",
        "medium",
        "large",
        "big",
        "tiny",
        "little",
        "huge",
        "top",
        "bottom",
        "left",
        "right",
        "center",
        "centre",
        "middle",
        "upper",
        "lower",
        "up",
        "down",
        "background",
        "black",
        "white",
        "light",
        "dark",
        "regional",
        "indicator",
        "modifier",
        "squared",
        "negative",
        "circled",
        "keycap",
        "digit",
        "latin",
        "clock",
        "oclock",
        "thirty",
        "arrow",
        "arrows",
        "sign",
        "symbol",
        "with",
        "and",
    }
)
#: the zodiac signs: white symbols on identical purple tiles, told apart only by a thin glyph
EXCLUDED_CODEPOINTS: frozenset[int] = frozenset(range(0x2648, 0x2654)) | {0x26CE}
MAX_NAME_WORDS = 3
DISTINCT_RMS = 0.20  # 0..1 RGB units, at 16x16 on a mid-gray background
CANDIDATE_RANGES: tuple[tuple[int, int], ...] = ((0x2600, 0x27C0), (0x1F300, 0x1FB00))
#: familiar emoji considered first, so that the distinctness rule keeps them over look-alikes
PRIORITY: tuple[int, ...] = (
    0x1F34E,
    0x1F431,
    0x1F436,
    0x1F600,
    0x1F680,
    0x1F355,
    0x1F3E0,
    0x1F333,
    0x1F697,
    0x1F34C,
    0x1F41F,
    0x1F98B,
    0x1F422,
    0x1F40C,
    0x1F369,
    0x1F381,
    0x1F388,
    0x1F308,
    0x2601,
    0x1F30B,
    0x1F427,
    0x1F438,
    0x1F43C,
    0x1F981,
    0x1F984,
    0x1F98A,
    0x1F3B8,
    0x1F6B2,
    0x2708,
    0x1F36D,
    0x1F352,
    0x1F353,
    0x1F347,
    0x1F34A,
    0x1F349,
    0x1F955,
    0x1F344,
    0x1F33B,
    0x1F339,
    0x1F335,
)


def find_emoji_font() -> Path:
    """Path of NotoColorEmoji.ttf: `$SDLAB_EMOJI_FONT`, else a search of the usual font folders."""
    override = os.environ.get(FONT_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{FONT_ENV}={override} is not a file")
        return path
    for folder in FONT_DIRS:
        root = Path(folder).expanduser()
        if not root.is_dir():
            continue
        direct = root / EMOJI_FONT_FILE
        if direct.is_file():
            return direct
        for found in root.rglob(EMOJI_FONT_FILE):
            return found
    raise FileNotFoundError(
        f"{EMOJI_FONT_FILE} not found in {', '.join(FONT_DIRS)}. Install the Debian/Ubuntu package "
        f"{DEBIAN_PACKAGE} (`apt-get install {DEBIAN_PACKAGE}`) or set {FONT_ENV} to the font file."
    )


@functools.lru_cache(maxsize=1)
def _font() -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(find_emoji_font()), FONT_SIZE)


def _render_glyph(codepoint: int) -> Image.Image:
    canvas = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((80, 80), chr(codepoint), font=_font(), embedded_color=True, anchor="mm")
    return canvas


@functools.lru_cache(maxsize=4096)
def emoji_glyph(codepoint: int) -> Image.Image:
    """RGBA render of one emoji at the font's native size, cropped to its alpha bounding box."""
    canvas = _render_glyph(codepoint)
    box = canvas.getchannel("A").getbbox()
    if box is None:
        raise ValueError(f"U+{codepoint:04X} does not render in {find_emoji_font()}")
    return canvas.crop(box)


def square_rgba(glyph: Image.Image) -> Image.Image:
    """Pad an RGBA image with transparency to a square of side max(width, height), centred."""
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return square


def caption_name(codepoint: int) -> str:
    """Caption name: the Unicode name, lower case, hyphens and apostrophes as spaces / dropped."""
    name = unicodedata.name(chr(codepoint)).lower()
    return re.sub(r"\s+", " ", name.replace("-", " ").replace("'", "")).strip()


def _name_is_usable(codepoint: int) -> bool:
    try:
        name = caption_name(codepoint)
    except ValueError:
        return False
    words = name.split()
    return (
        codepoint not in EXCLUDED_CODEPOINTS
        and unicodedata.category(chr(codepoint)) == "So"
        and len(words) <= MAX_NAME_WORDS
        and not NAME_EXCLUSIONS.intersection(words)
        and all(re.fullmatch(r"[a-z]+", word) for word in words)
    )


def _small_render(codepoint: int, side: int = 16) -> np.ndarray:
    """(side, side, 3) float in 0..1: the glyph squared, resized, on mid gray."""
    small = square_rgba(emoji_glyph(codepoint)).resize((side, side), Image.Resampling.BOX)
    rgba = np.asarray(small, dtype=np.float64) / 255.0
    alpha = rgba[..., 3:]
    return rgba[..., :3] * alpha + 0.5 * (1 - alpha)


def select_emoji_subset(distinct_rms: float = DISTINCT_RMS) -> list[tuple[int, str]]:
    """Re-run the documented selection over the installed font: [(code point, caption name)].

    Candidates are the single code points in `CANDIDATE_RANGES` with a usable name that render in
    colour (not the empty .notdef glyph); each is kept when its 16x16 render differs from every
    emoji kept so far by an RMS of at least `distinct_rms`, and its caption name is new.
    """
    kept: list[tuple[int, str]] = []
    renders: list[np.ndarray] = []
    names: set[str] = set()
    candidates = list(PRIORITY) + [
        codepoint for start, stop in CANDIDATE_RANGES for codepoint in range(start, stop) if codepoint not in PRIORITY
    ]
    for codepoint in candidates:
        if not _name_is_usable(codepoint):
            continue
        name = caption_name(codepoint)
        if name in names or _render_glyph(codepoint).getchannel("A").getbbox() is None:
            continue
        render = _small_render(codepoint)
        if renders:
            rms = np.sqrt(((np.stack(renders) - render) ** 2).mean(axis=(1, 2, 3)))
            if rms.min() < distinct_rms:
                continue
        kept.append((codepoint, name))
        renders.append(render)
        names.add(name)
    logger.info("selected %d emoji", len(kept))
    return sorted(kept)
