"""The caption grammar shared by the dataset builders and the evaluation: SceneSpec <-> text.

A scene is one subject (an emoji or a coloured shape) of a size class at one of nine positions on a
plain background. The canonical caption reads

    "a small red apple in the top left on a light blue background"        (emoji: name, no colour)
    "a large blue star at the bottom right on a white background"         (shape: colour + shape)

`caption(spec, template)` writes it (templates 1 and 2 are paraphrases for training variety) and
`parse_caption(text)` reads it back. The parser is deliberately tolerant so that evaluation can score
prompts that are not in the repo: "a large blue star, bottom right, white background", "big grey
circle in the upper-left corner", "a cat face on dark green background". Fields a prompt does not state
are None and are not scored. The emoji names contain no word of the rest of the grammar (see
`sdlab.tiny.datasets.emoji.NAME_EXCLUSIONS`), which is what makes the parse unambiguous.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sdlab.tiny.datasets.colours import BACKGROUND_COLOURS, COLOUR_SYNONYMS, PALETTE, SUBJECT_COLOURS, contrasting
from sdlab.tiny.datasets.emoji_subset import EMOJI_NAMES
from sdlab.tiny.datasets.layout import POSITIONS, SIZES
from sdlab.tiny.datasets.vocabulary import EMOJI_ALIASES, NUMBER_WORDS, emoji_words, plural

__all__ = ["CAPTION_TEMPLATES", "COUNTS", "SHAPES", "SUBJECT_KINDS", "SceneSpec", "caption", "parse_caption",
           "phrasing_family", "read_prompt"]

SUBJECT_KINDS: tuple[str, ...] = ("emoji", "shape")
COUNTS: tuple[int, ...] = (1, 2, 3)
_COUNT_WORDS = {2: "two", 3: "three"}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "heart", "diamond", "cross")
CAPTION_TEMPLATES = 3


@dataclass(frozen=True)
class SceneSpec:
    """What a caption states. `colour` is for shapes only (an emoji's colour is its name's business).

    size, position and background may be None when a prompt leaves them out; built scenes set all.
    count: how many copies ("two apples"); None when a prompt says a plural without a number. Several
    copies are small and have no single position.
    """

    kind: str
    subject: str
    colour: str | None = None
    size: str | None = None
    position: str | None = None
    background: str | None = None
    count: int | None = 1

    def __post_init__(self) -> None:
        if self.kind not in SUBJECT_KINDS:
            raise ValueError(f"kind must be one of {SUBJECT_KINDS}, got {self.kind!r}")
        if self.kind == "shape":
            if self.subject not in SHAPES:
                raise ValueError(f"unknown shape {self.subject!r}; known: {', '.join(SHAPES)}")
            if self.colour is not None and self.colour not in SUBJECT_COLOURS:
                raise ValueError(f"unknown shape colour {self.colour!r}; known: {', '.join(SUBJECT_COLOURS)}")
            if self.colour is not None and self.background is not None and not contrasting(self.colour, self.background):
                raise ValueError(f"a {self.colour} shape cannot be seen on a {self.background} background")
        else:
            if self.subject not in EMOJI_NAMES:
                raise ValueError(f"{self.subject!r} is not one of the {len(EMOJI_NAMES)} trained emoji")
            if self.colour is not None:
                raise ValueError("an emoji subject has no separate colour")
        if self.size is not None and self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; known: {', '.join(SIZES)}")
        if self.position is not None and self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}; known: {', '.join(POSITIONS)}")
        if self.background is not None and self.background not in BACKGROUND_COLOURS:
            raise ValueError(f"unknown background colour {self.background!r}; known: {', '.join(BACKGROUND_COLOURS)}")
        if self.count is not None and self.count not in COUNTS:
            raise ValueError(f"count must be one of {COUNTS} (or unstated), got {self.count!r}")
        if self.count != 1 and (self.position is not None or self.size not in (None, "small")):
            raise ValueError("several copies are drawn small, with no single position")

    @property
    def subject_phrase(self) -> str:
        """'red apple' for an emoji, 'blue star' (or 'star' without a colour) for a shape; plural for several."""
        noun = self.subject if self.count == 1 else plural(self.subject)
        return noun if self.colour is None else f"{self.colour} {noun}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _position_phrase(position: str) -> str:
    if position == "center":
        return "in the center"
    if position in ("top", "bottom"):
        return f"at the {position}"
    if position in ("left", "right"):
        return f"on the {position}"
    return f"in the {position}"


def caption(spec: SceneSpec, template: int = 0) -> str:
    """Caption text of a scene. Template 0 is canonical; 1 and 2 are paraphrases the parser also reads:

    0: "a small red apple in the top left on a light blue background"
    1: "a small red apple, top left, light blue background"
    2: "a light blue background with a small red apple in the top left"
    """
    noun = spec.subject_phrase if spec.size is None else f"{spec.size} {spec.subject_phrase}"
    noun = f"{_article(noun)} {noun}" if spec.count == 1 else f"{_COUNT_WORDS.get(spec.count, 'some')} {noun}"
    if template == 0:
        parts = [noun]
        if spec.position is not None:
            parts.append(_position_phrase(spec.position))
        if spec.background is not None:
            parts.append(f"on {_article(spec.background)} {spec.background} background")
        return " ".join(parts)
    if template == 1:
        parts = [noun]
        if spec.position is not None:
            parts.append(spec.position)
        if spec.background is not None:
            parts.append(f"{spec.background} background")
        return ", ".join(parts)
    if template == 2:
        tail = noun if spec.position is None else f"{noun} {_position_phrase(spec.position)}"
        if spec.background is None:
            return tail
        return f"{_article(spec.background)} {spec.background} background with {tail}"
    raise ValueError(f"template must be in 0..{CAPTION_TEMPLATES - 1}, got {template}")


# ---- parsing -------------------------------------------------------------------------------------

_SIZE_WORDS: dict[str, str] = {
    "small": "small",
    "tiny": "small",
    "little": "small",
    "medium": "medium",
    "mid": "medium",
    "midsize": "medium",
    "middle sized": "medium",
    "large": "large",
    "big": "large",
    "huge": "large",
}
_POSITION_WORDS: dict[str, str] = {
    "top": "top",
    "upper": "top",
    "bottom": "bottom",
    "lower": "bottom",
    "left": "left",
    "right": "right",
    "center": "center",
    "middle": "center",
    "centered": "center",
}
_FILLER = {
    "a", "an", "the", "of", "in", "on", "at", "to", "with", "that", "is", "which", "and", "emoji", "shape",
    "picture", "image", "icon", "drawing", "sized", "size", "colored", "coloured", "corner", "side", "edge",
    "some", "one", "single", "plain", "solid", "simple",
}
#: nouns a background colour is said with: "a blue background", "blue backdrop", "a pink wall"
_BACKGROUND_NOUNS = ("background", "backdrop", "backround", "bg", "wall", "backgrounds")
_EMOJI_WORDS = emoji_words()  # singular and plural names and aliases -> caption name
_EMOJI_PLURALS = {plural(w) for w in (*EMOJI_NAMES, *EMOJI_ALIASES)} - set(EMOJI_NAMES) - set(EMOJI_ALIASES)


def _alternation(words) -> str:
    return "|".join(re.escape(word) for word in sorted(words, key=len, reverse=True))


def _normalise(text: str) -> str:
    text = text.lower().replace("'", "")
    text = re.sub(r"\b2\b", " two ", re.sub(r"\b3\b", " three ", text))
    text = re.sub(r"[^a-z]+", " ", text)  # hyphens, commas, full stops, digits -> spaces
    text = f" {text} "
    text = text.replace(" centre ", " center ").replace(" colour ", " color ")
    text = text.replace(" medium sized ", " medium ").replace(" mid sized ", " medium ")
    text = text.replace(" in front of ", " on ")
    for synonym, name in sorted(COLOUR_SYNONYMS.items(), key=lambda item: -len(item[0])):
        text = text.replace(f" {synonym} ", f" {name} ")
    return re.sub(r"\s+", " ", text)


_PREPOSITION = r"(?:on |with |against |over |behind it |)"
_BACKGROUND_RE = re.compile(
    rf" {_PREPOSITION}(?:a |an |the )?(?:plain |solid |simple )?({_alternation(PALETTE)})"
    rf" (?:color |colored )?(?:{_alternation(_BACKGROUND_NOUNS)}) "
)
_BARE_BACKGROUND_RE = re.compile(rf" (?:on|against|over) (?:a |an |the )?(?:plain |solid )?({_alternation(PALETTE)}) ")
_SIZE_RE = re.compile(rf" ({_alternation(_SIZE_WORDS)}) ")
_POSITION_RE = re.compile(
    rf"(?: (?:in|at|on|to|towards) the| (?:in|at|on))?((?: (?:{_alternation(_POSITION_WORDS)}))+)"
    r"(?: (?:corner|side|edge))?(?: of the (?:image|picture|frame))?(?= )"
)
_EMOJI_RE = re.compile(rf" ({_alternation(_EMOJI_WORDS)}) ")
_SHAPE_RE = re.compile(rf" ({_alternation(SHAPES)})(s?) ")
_COLOUR_RE = re.compile(rf" ({_alternation(SUBJECT_COLOURS)}) ")
_COUNT_RE = re.compile(rf" ({_alternation(NUMBER_WORDS)}) ")


def _cut(text: str, match: re.Match[str]) -> str:
    return f"{text[: match.start()]} {text[match.end() :]}"


def _position_from_words(words: list[str]) -> str:
    canonical = [_POSITION_WORDS[word] for word in words]
    vertical = [w for w in canonical if w in ("top", "bottom")]
    horizontal = [w for w in canonical if w in ("left", "right")]
    if len(set(vertical)) > 1 or len(set(horizontal)) > 1:
        raise ValueError(f"contradictory position words: {' '.join(words)}")
    if vertical and horizontal:
        return f"{vertical[0]} {horizontal[0]}"
    if vertical or horizontal:
        return (vertical or horizontal)[0]
    return "center"


def read_prompt(text: str) -> tuple[SceneSpec, list[str]]:
    """Read a caption or a free prompt into a SceneSpec and the words it did not understand (ignored).

    Raises ValueError when there is no subject, or a stated field cannot be read. Order: background phrase
    ("<colour> background / backdrop / wall", "with a ... background", "in front of a ... wall"), then the
    subject (the longest emoji name, alias or plural found, else a shape word with an optional colour
    before or after it), how many ("two", "three", "a pair of", "2"), a bare "on <colour>" background,
    a size word, then position words (top/upper, bottom/lower, left, right, center/middle).
    """
    rest = _normalise(text)
    background = None
    match = _BACKGROUND_RE.search(rest)
    if match:
        background = match.group(1)
        rest = _cut(rest, match)

    count: int | None = 1
    match = _EMOJI_RE.search(rest)
    if match:
        word = match.group(1)
        kind, subject, colour = "emoji", _EMOJI_WORDS[word], None
        if word in _EMOJI_PLURALS:
            count = None
        rest = _cut(rest, match)
    else:
        match = _SHAPE_RE.search(rest)
        if not match:
            raise ValueError(f"no known emoji name or shape in {text!r}")
        kind, subject = "shape", match.group(1)
        if match.group(2):
            count = None
        before, rest = rest[: match.start() + 1], _cut(rest, match)
        colours = _COLOUR_RE.findall(before)
        if not colours:
            after = _BARE_BACKGROUND_RE.sub(" ", rest)  # "a star on blue": blue is the background
            colours = _COLOUR_RE.findall(after)
        colour = colours[-1] if colours else None
        if colour is not None:
            rest = rest.replace(f" {colour} ", " ", 1)
    match = _COUNT_RE.search(rest)
    if match:
        count = NUMBER_WORDS[match.group(1)]
        rest = _cut(rest, match)

    if background is None:
        match = _BARE_BACKGROUND_RE.search(rest)
        if match:
            background = match.group(1)
            rest = _cut(rest, match)
    if background is not None and background not in BACKGROUND_COLOURS:
        raise ValueError(f"background {background!r} is not one of {', '.join(BACKGROUND_COLOURS)}")

    size = None
    match = _SIZE_RE.search(rest)
    if match:
        size = _SIZE_WORDS[match.group(1)]
        rest = _cut(rest, match)

    position = None
    words: list[str] = []
    for match in _POSITION_RE.finditer(rest):
        words += match.group(1).split()
    if words:
        position = _position_from_words(words)
        rest = _POSITION_RE.sub(" ", rest)

    unknown = [word for word in rest.split() if word not in _FILLER]
    if count != 1:  # several copies: drawn small, with no single place
        unknown += [w for w in ((size if size != "small" else None), position) if w is not None]
        size = "small" if size == "small" else None
        position = None
    return SceneSpec(kind, subject, colour, size, position, background, count), unknown


def parse_caption(text: str) -> SceneSpec:
    """Read a caption back into a SceneSpec; raises ValueError on any word it cannot read (see
    `read_prompt`, which ignores such words instead)."""
    spec, unknown = read_prompt(text)
    if unknown:
        raise ValueError(f"cannot read {' '.join(unknown)!r} in {text!r}")
    if " background " in _normalise(text) and spec.background is None:
        raise ValueError(f"cannot read the background colour in {text!r}")
    return spec


def phrasing_family(text: str) -> str:
    """"template" when a prompt is word for word one of the caption templates of what it states, else "free"."""
    spec, _ = read_prompt(text)
    said = " ".join(text.lower().split())
    return "template" if any(caption(spec, t) == said for t in range(CAPTION_TEMPLATES)) else "free"
