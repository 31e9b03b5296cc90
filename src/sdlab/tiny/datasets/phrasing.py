"""Free phrasing: captions written the many ways people write prompts, for training variety.

The templates of `captions.caption` are three fixed sentence shapes; a text tower trained only on them
learns the shapes, not the words. `free_caption(spec, rng)` writes the same scene with the wording
drawn at random: everyday names ("an apple", "a cat"), number words ("two apples", "a pair of stars"),
size and position synonyms ("tiny", "in the upper left corner", "top-left"), background phrasings
("with a blue background", "blue backdrop", "on blue", "in front of a pink wall"), the background first
or last, fragments or sentences, and now and then words the model is not meant to draw ("cute",
"high quality") so that it learns to ignore them. With `synonym_prob` a colour is now and then written as
another word the parser reads for it (`colours.COLOUR_SYNONYMS`: "grey", "violet", "navy", "sky blue"), so
the text tower learns those words too. `captions.read_prompt` reads every such caption back to the scene it
states (tests hold it to that).
"""

from __future__ import annotations

import numpy as np

from sdlab.tiny.datasets.captions import SceneSpec
from sdlab.tiny.datasets.colours import COLOUR_SYNONYMS
from sdlab.tiny.datasets.vocabulary import EMOJI_ALIASES, plural

__all__ = ["ALIAS_PROB", "DISTRACTOR_WORDS", "free_caption"]

#: words of ordinary prompts that name nothing in the scene (none of them is a word of the grammar)
DISTRACTOR_WORDS: tuple[str, ...] = (
    "cute", "simple", "high quality", "detailed", "cartoon", "illustration", "photo", "beautiful", "nice",
    "minimal", "digital art", "clipart", "flat", "vector art", "hd", "masterpiece", "best quality", "colorful",
    "sharp", "clean", "pretty", "cool", "funny", "happy", "lovely", "realistic", "sticker", "logo", "art",
    "style", "painting", "sketch", "render", "artwork", "wallpaper", "please", "draw", "show me", "make",
    "trending", "award winning", "professional", "studio lighting", "4k", "8k",
    "highly detailed", "vibrant", "soft", "bright", "bold", "glossy", "shiny", "kawaii", "adorable",
)

#: how often a free caption calls an emoji that has everyday names by one of them (data v2 to v7)
ALIAS_PROB = 0.6

#: caption name -> its everyday words, in EMOJI_ALIASES order
_ALIASES_OF: dict[str, list[str]] = {
    name: [alias for alias, of in EMOJI_ALIASES.items() if of == name] for name in dict.fromkeys(EMOJI_ALIASES.values())
}

#: palette name -> the other words a prompt may use for it
_SPELLINGS_OF: dict[str, list[str]] = {
    name: [word for word, of in COLOUR_SYNONYMS.items() if of == name] for name in dict.fromkeys(COLOUR_SYNONYMS.values())
}

_SIZE_WORDS = {"small": ("small", "tiny", "little"), "medium": ("medium", "medium sized", "mid sized"),
               "large": ("large", "big", "huge")}
_COUNT_WORDS = {2: ("two", "2", "a pair of"), 3: ("three", "3")}
_PREFIXES = ("", "", "", "a picture of ", "an image of ", "a drawing of ", "an icon of ", "an emoji of ")


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _subject(spec: SceneSpec, rng: np.random.Generator, colour: str | None, alias_prob: float = ALIAS_PROB) -> str:
    """'an apple', 'the red apple', 'two cats', 'a small blue star', 'a star in blue', 'red stars'; the
    colour written as ``colour``; an emoji with everyday names is called by one of them with ``alias_prob``."""
    name = spec.subject
    if spec.kind == "emoji" and name in _ALIASES_OF and rng.random() < alias_prob:
        name = _pick(rng, _ALIASES_OF[name])
    if spec.count != 1:
        name = plural(name)
    colour_after = colour is not None and rng.random() < 0.2
    noun = name if colour is None or colour_after else f"{colour} {name}"
    if spec.size is not None:
        noun = f"{_pick(rng, _SIZE_WORDS[spec.size])} {noun}"
    if spec.count is None:
        phrase = noun if rng.random() < 0.5 else f"some {noun}"
    elif spec.count > 1:
        phrase = f"{_pick(rng, _COUNT_WORDS[spec.count])} {noun}"
    else:
        article = _pick(rng, ("a", "a", "a", "the", "one", ""))
        article = _article(noun) if article == "a" else article
        phrase = f"{article} {noun}".strip()
        if rng.random() < 0.15:
            phrase = _pick(rng, _PREFIXES[3:]) + phrase
    if colour_after:
        phrase += _pick(rng, (f" in {colour}", f" colored {colour}"))
    return phrase


def _position(position: str, rng: np.random.Generator) -> str:
    words = position.split()
    if position == "center":
        return _pick(rng, ("in the center", "in the middle", "centered", "in the centre", "center"))
    if len(words) == 2:
        vertical = _pick(rng, (words[0], {"top": "upper", "bottom": "lower"}[words[0]]))
        corner = f"{vertical} {words[1]}" if rng.random() < 0.75 else f"{vertical}-{words[1]}"
        return _pick(rng, (f"in the {corner}", f"in the {corner} corner", f"at the {corner}", corner,
                           f"in the {corner} of the image"))
    side = words[0]
    if side in ("top", "bottom"):
        return _pick(rng, (f"at the {side}", f"at the {side} edge", side, f"on the {side}"))
    return _pick(rng, (f"on the {side}", f"on the {side} side", f"to the {side}", side, f"at the {side}"))


def _background(colour: str, rng: np.random.Generator) -> tuple[str, bool]:
    """(phrase, whether it may open the caption)."""
    noun = _pick(rng, ("background", "background", "background", "backdrop", "wall"))
    plain = _pick(rng, ("", "", "", "plain ", "solid "))
    options = (
        (f"on {_article(plain + colour)} {plain}{colour} {noun}", True),
        (f"with {_article(plain + colour)} {plain}{colour} {noun}", True),
        (f"against {_article(plain + colour)} {plain}{colour} {noun}", False),
        (f"in front of {_article(plain + colour)} {plain}{colour} {noun}", False),
        (f"{colour} {noun}", True),
        (f"on {colour}", False),
    )
    return _pick(rng, options)


def free_caption(spec: SceneSpec, rng: np.random.Generator, distractor_prob: float = 0.15,
                 synonym_prob: float = 0.0, alias_prob: float = ALIAS_PROB) -> str:
    """A caption of what ``spec`` states (fields set to None are left unsaid), worded at random; each colour
    that has other spellings is written as one of them with ``synonym_prob`` (no draw at all when 0, so the
    captions of a given seed stay what they were), an emoji by an everyday name ("a frog") with ``alias_prob``
    where it has one."""
    colour = _spelling(spec.colour, rng, synonym_prob)
    background = _spelling(spec.background, rng, synonym_prob)
    subject = _subject(spec, rng, colour, alias_prob)
    parts = [subject]
    if spec.position is not None:
        parts.append(_position(spec.position, rng))
    comma = rng.random() < 0.3
    if background is not None:
        phrase, may_open = _background(background, rng)
        if may_open and rng.random() < 0.25:
            return _finish(f"{phrase}, {' '.join(parts)}" if comma else f"{phrase} {' '.join(parts)}",
                           rng, distractor_prob)
        parts.append(phrase)
    return _finish((", " if comma else " ").join(parts), rng, distractor_prob)


def _spelling(colour: str | None, rng: np.random.Generator, prob: float) -> str | None:
    """``colour`` as written: with ``prob`` one of its other spellings, if it has any (no draw when 0)."""
    if prob and colour in _SPELLINGS_OF and rng.random() < prob:
        return _pick(rng, _SPELLINGS_OF[colour])
    return colour


def _finish(text: str, rng: np.random.Generator, distractor_prob: float) -> str:
    if rng.random() < distractor_prob:
        words = _pick(rng, DISTRACTOR_WORDS)
        text = f"{words} {text}" if rng.random() < 0.5 else f"{text}, {words}"
    return text

