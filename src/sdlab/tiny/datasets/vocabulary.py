"""The words people use for what the captions name: emoji aliases, plurals and number words.

An emoji's caption name is its Unicode name ("red apple", "cat face", "slice of pizza"); a person types
"an apple", "a cat", "two pizzas". `EMOJI_ALIASES` maps such everyday words to the caption name: the
"<animal> face" emoji answer to the animal's name (when no emoji has that name itself), and a short
table gives the common word for others. `plural` forms the plural a prompt writes ("apples",
"cherries", "slices of pizza"); `NUMBER_WORDS` reads how many.
"""

from __future__ import annotations

from sdlab.tiny.datasets.emoji_subset import EMOJI_NAMES

__all__ = ["EMOJI_ALIASES", "NUMBER_WORDS", "emoji_words", "plural"]

#: everyday word -> caption name, for emoji whose Unicode name is not what people type
_COMMON_WORDS: dict[str, str] = {
    "apple": "red apple",
    "pizza": "slice of pizza",
    "tree": "deciduous tree",
    "pine tree": "evergreen tree",
    "car": "automobile",
    "moon": "crescent moon",
    "smiley": "grinning face",
    "smiley face": "grinning face",
    "plane": "airplane",
    "present": "wrapped present",
    "gift": "wrapped present",
    "train": "steam locomotive",
    "football": "soccer ball",
    "coffee": "hot beverage",
    "fries": "french fries",
    "computer": "personal computer",
    "laptop": "personal computer",
    "phone": "mobile phone",
    "alien": "extraterrestrial alien",
    "truck": "delivery truck",
    "boat": "rowboat",
    "santa": "father christmas",
    "salad": "green salad",
    "cheese": "cheese wedge",
    "earth": "earth globe americas",
    "globe": "earth globe americas",
    "wave": "water wave",
    "bee": "honeybee",
    "corn": "ear of maize",
    "gift envelope": "red gift envelope",
    "die": "game die",
    "dice": "game die",
    "chick": "hatching chick",
    "beer": "beer mug",
    "bowl": "steaming bowl",
    "noodles": "steaming bowl",
    "smiling face": "grinning face",
    "happy face": "grinning face",
    "kitten": "cat face",
    "kitty": "cat face",
    "puppy": "dog face",
    "crying face": "loudly crying face",
    "cab": "taxi",
    "spaceship": "rocket",
    "tea": "hot beverage",
    "island": "desert island",
}


def _face_aliases() -> dict[str, str]:
    """"cat face" -> "cat", for every one-word "<x> face" emoji whose <x> is not a caption name itself."""
    aliases = {}
    for name in EMOJI_NAMES:
        words = name.split()
        if len(words) == 2 and words[1] == "face" and words[0] not in EMOJI_NAMES:
            aliases[words[0]] = name
    return aliases


#: everyday word -> emoji caption name (no alias is itself a caption name)
EMOJI_ALIASES: dict[str, str] = {
    alias: name
    for alias, name in (_face_aliases() | _COMMON_WORDS).items()
    if alias not in EMOJI_NAMES and name in EMOJI_NAMES
}

#: how a prompt says how many -> the count
NUMBER_WORDS: dict[str, int] = {"two": 2, "2": 2, "pair of": 2, "a pair of": 2, "three": 3, "3": 3}

_SAME_IN_PLURAL = {"fish", "sheep", "sushi", "cherries", "sparkles", "eyes", "books", "french fries", "fries",
                   "shorts", "pancakes", "noodles", "dice", "spaghetti", "bread", "cooking", "foggy"}


def _plural_word(word: str) -> str:
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es" if not word.endswith("s") else word
    if word.endswith("y") and word[-2:-1] not in ("a", "e", "i", "o", "u"):
        return word[:-1] + "ies"
    if word.endswith("f") and not word.endswith("ff"):
        return word[:-1] + "ves"
    return word + "s"


def plural(noun: str) -> str:
    """The plural a prompt writes: "apples", "cat faces", "slices of pizza", "cherries", "fish"."""
    if noun in _SAME_IN_PLURAL:
        return noun
    words = noun.split()
    if " of " in noun:  # "slice of pizza" -> "slices of pizza"
        head = words.index("of") - 1
        words[head] = _plural_word(words[head])
        return " ".join(words)
    words[-1] = _plural_word(words[-1])
    return " ".join(words)


def emoji_words() -> dict[str, str]:
    """Every word or phrase that names an emoji, singular and plural -> caption name."""
    table: dict[str, str] = {}
    for word, name in [(n, n) for n in EMOJI_NAMES] + list(EMOJI_ALIASES.items()):
        table.setdefault(word, name)
        table.setdefault(plural(word), name)
    return table
