"""`prompt_word`: how a prompt reads a word, and the spelling that reads as the word itself.

The spelling is checked against the stages a prompt goes through when it is drawn (comments and extra-network
tags, AND parts, prompt editing, emphasis and escapes), for the words the embedding task was reported about and
for those it once refused outright.
"""

from __future__ import annotations

import pytest

from sdlab.pipeline.prompt_loras import without_extra_networks
from sdlab.pipeline.prompt_schedule import composable_parts, prompt_schedule
from sdlab.pipeline.prompt_syntax import parse_weighted
from sdlab.pipeline.prompt_word import prompt_spelling, reading

REACHABLE = ["(mystyle)", "[mystyle]", "a\\b", "EasyNegative (1)", "style:1", "style:1.5", "x:-1", "1:2", "BREAK",
             "AND", "my-AND-word", "my-BREAK-word", "<lora:mystyle:1>", "<lyco:y>", "<hypernet:z:1>", "<x:y>",
             "[a|b]", "[a:b:0.5]", "(tok", "\\", "(", "mystyle", "<cat-toy>", "a:b", "tok)", "x]y", "name:0.5x"]


def read(prompt: str) -> list[tuple[str, float]]:
    """The emphasis runs each stage hands on, with the AND weight; one text expected at every step."""
    (part, weight), = composable_parts(without_extra_networks(prompt))
    (_, edited), = prompt_schedule(part, 20)
    return [(text, run * weight) for text, run in parse_weighted(edited)]


@pytest.mark.parametrize("word", REACHABLE)
def test_the_spelling_reads_back_as_the_word(word):
    spelling = prompt_spelling(word)
    assert read(spelling) == [(word, 1.0)]
    assert read(f"a {spelling} photo") == [(f"a {word} photo", 1.0)]
    if "AND" not in word:                   # inside emphasis too (an AND part's weight is not emphasis)
        assert read(f"a ({spelling}:1.5) photo") == [("a ", 1.0), (word, 1.5), (" photo", 1.0)]


def test_the_reported_escapes():
    assert parse_weighted(r"EasyNegative \(1\)") == [("EasyNegative (1)", 1.0)]
    assert prompt_spelling("EasyNegative (1)") == r"EasyNegative \(1\)"
    assert prompt_spelling("(mystyle)") == r"\(mystyle\)" and prompt_spelling("a\\b") == r"a\\b"
    assert composable_parts("style:1 cat") == [("style:1 cat", 1.0)]   # a weight only at the end of a part
    assert prompt_spelling("style:1") == r"style:\1"                    # reads as itself at the end too


@pytest.mark.parametrize("word", ["my#style", "#", "", " "])
def test_a_comment_or_a_blank_word_has_no_spelling(word):
    assert prompt_spelling(word) is None


@pytest.mark.parametrize("word, says", [
    ("x:-1", "the part 'x' at composable (AND) weight -1"),
    ("<x:y>", "an extra-network tag (<kind:name>), which is taken out of the prompt, leaving ''"),
    ("AND", "AND splits it into the parts '', ''"),
    ("[a|b]", "prompt editing or alternation, which reads 'a' and 'b' at different steps"),
    ("[mystyle]", "'mystyle' at emphasis weight 0.909"),
    ("BREAK", "'' at emphasis weight 1, a BREAK (a new 75-token chunk), '' at emphasis weight 1"),
    ("my#style", "'#' starts a comment that hides the rest of the line, leaving 'my'"),
    ("mystyle", None),
])
def test_reading_says_what_the_parser_does(word, says):
    assert reading(word) == says
