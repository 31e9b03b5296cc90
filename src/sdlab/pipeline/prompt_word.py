"""How a prompt reads one word, and how to write a word so that a prompt reads it as itself.

A prompt goes through A1111's stages before its words are tokenized and embeddings looked up: comments
(``strip_comments``), extra-network tags (``without_extra_networks``), ``AND`` parts with their trailing
``:weight`` (``composable_parts``), prompt editing and alternation (``prompt_schedule``), then emphasis, escapes
and ``BREAK`` (``parse_weighted``). ``reading(prompt)`` says what the first stage that changes the prompt does
with it, in the terms of that stage's own output; ``prompt_spelling(word)`` gives a way to write ``word`` that
every stage hands on as the word itself (None when there is none: a ``#`` always starts a comment).

A backslash is the parser's escape: ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are the characters, and a
backslash before any other character is dropped (``parse_weighted``) after the earlier stages have read it as
text, so it also breaks up ``AND``, ``BREAK``, ``<kind:name>`` and a trailing ``:number``.
"""

from __future__ import annotations

import re

from sdlab.pipeline.prompt_loras import without_extra_networks
from sdlab.pipeline.prompt_schedule import composable_parts, prompt_schedule
from sdlab.pipeline.prompt_syntax import PromptError, is_break, parse_weighted, strip_comments

_SCHEDULE_STEPS = 20                       # a prompt-editing schedule is read over this many steps
_ESCAPED = re.compile(r"([\\()\[\]])")      # the characters parse_weighted reads back from "\" + the character
_SYNTAX_WORD = re.compile(r"\b(AND|BREAK)\b")
_TAG_START = re.compile(r"(<)")              # an extra-network tag's "<"
_WEIGHT_START = re.compile(r"(:)")           # a trailing weight's ":"


def reading(prompt: str) -> str | None:
    """None when every stage hands ``prompt`` on unchanged as one run of weight 1; else what the first stage
    that changes it does, e.g. ``"AND splits it into the parts 'x', 'y'"``."""
    text = strip_comments(prompt)
    if text != prompt:
        return f"'#' starts a comment that hides the rest of the line, leaving {text.strip()!r}"
    text = without_extra_networks(prompt)
    if text != prompt:
        return f"an extra-network tag (<kind:name>), which is taken out of the prompt, leaving {text!r}"
    parts = composable_parts(text)
    if len(parts) > 1:
        return f"AND splits it into the parts {', '.join(repr(part) for part, _ in parts)}"
    (part, weight), = parts
    if (part, weight) != (prompt, 1.0):
        return f"the part {part!r} at composable (AND) weight {weight:g}"
    schedule = prompt_schedule(part, _SCHEDULE_STEPS)
    if len(schedule) > 1:
        texts = dict.fromkeys(text for _, text in schedule)
        return f"prompt editing or alternation, which reads {' and '.join(map(repr, texts))} at different steps"
    (_, edited), = schedule
    if edited != prompt:
        return f"prompt editing, leaving {edited!r}"
    try:
        runs = parse_weighted(edited)
    except PromptError as exc:
        return f"an error ({exc})"
    if runs == [(prompt, 1.0)]:
        return None
    return ", ".join("a BREAK (a new 75-token chunk)" if is_break(run)
                     else f"{run[0]!r} at emphasis weight {run[1]:.3g}" for run in runs)


def _reads_as_itself(spelling: str, word: str) -> bool:
    """Whether ``spelling`` reads as ``word`` alone and with text on either side of it."""
    def same(prompt: str, meant: str) -> bool:
        text = without_extra_networks(prompt)
        parts = composable_parts(text)
        if text != prompt or len(parts) != 1 or parts[0][1] != 1.0:
            return False
        schedule = prompt_schedule(parts[0][0], _SCHEDULE_STEPS)
        try:
            return len(schedule) == 1 and parse_weighted(schedule[0][1]) == [(meant, 1.0)]
        except PromptError:
            return False
    return all(same(form.format(spelling), form.format(word)) for form in ("{}", "a {}", "{} b", "a {} b"))


def prompt_spelling(word: str) -> str | None:
    """How to write ``word`` in a prompt so that it reads as ``word`` (the inverse of the parser's escaping), also
    inside emphasis: with ``\\`` before each bracket and backslash (the word itself when it holds none: a lone
    ``)`` reads as itself only outside brackets), else also a ``\\`` inside each whole-word ``AND`` / ``BREAK``,
    then also after each ``<``, then also after each ``:``, else a ``\\`` before every character.
    None when no spelling reaches it (a ``#``, which always starts a comment, or a blank word)."""
    if not word.strip():
        return None
    escaped = _ESCAPED.sub(r"\\\1", word)
    words = _SYNTAX_WORD.sub(lambda m: m.group(1)[0] + "\\" + m.group(1)[1:], escaped)
    tags = _TAG_START.sub(r"\1\\", words)
    weights = _WEIGHT_START.sub(r"\1\\", tags)
    every = "".join("\\" + c for c in word)
    for spelling in (escaped, words, tags, weights, every):
        if _reads_as_itself(spelling, word):
            return spelling
    return None
