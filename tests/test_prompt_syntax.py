"""A1111 prompt syntax: emphasis parsing, BREAK, 75-token chunking with comma backtrack, emphasis math."""

from __future__ import annotations

import re

import pytest
import torch

from sdlab.models.tokenizer import default_tokenizer
from sdlab.pipeline.prompt_syntax import (
    BREAK_MARKER,
    CLIP_COMMA_ID,
    CLIP_END_ID,
    Chunk,
    apply_emphasis,
    chunk_tokens,
    parse_weighted,
)

# The documented examples of A1111's modules/prompt_parser.py::parse_prompt_attention (its docstring).
A1111_DOCUMENTED = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]


@pytest.mark.parametrize("prompt, expected", A1111_DOCUMENTED)
def test_a1111_documented_examples_exactly(prompt, expected):
    assert parse_weighted(prompt) == expected


def test_nested_round_and_square_brackets():
    assert parse_weighted("((word))") == [("word", 1.1 * 1.1)]
    assert parse_weighted("[[word]]") == [("word", (1 / 1.1) * (1 / 1.1))]
    assert parse_weighted("([word])") == [("word", (1 / 1.1) * 1.1)]
    assert parse_weighted("(word:1.3)") == [("word", 1.3)]
    assert parse_weighted("(word : 1.3 )") == [("word ", 1.3)]       # spaces around the number are allowed
    assert parse_weighted("(a:-0.5)") == [("a", -0.5)]


def test_explicit_weight_inside_double_brackets():
    # ((a:1.5)) = 1.5 from the inner bracket, then x1.1 from the outer one
    assert parse_weighted("((a:1.5))") == [("a", 1.5 * 1.1)]
    assert parse_weighted("x ((a:1.5) b) y") == [("x ", 1.0), ("a", 1.5 * 1.1), (" b", 1.1), (" y", 1.0)]


def test_escapes():
    assert parse_weighted("\\(a\\) \\[b\\] c\\\\d") == [("(a) [b] c\\d", 1.0)]
    assert parse_weighted("(\\(x\\))") == [("(x)", 1.1)]
    assert parse_weighted("a\\b") == [("ab", 1.0)]                   # a lone backslash is dropped


def test_unbalanced_brackets_the_a1111_way():
    assert parse_weighted("a) b") == [("a) b", 1.0)]                  # a stray closer is text
    assert parse_weighted("a] b") == [("a] b", 1.0)]
    assert parse_weighted("[unbalanced") == [("unbalanced", 1 / 1.1)]
    assert parse_weighted("(a:1.3") == [("a:1.3", 1.1)]               # weight without ")" is text
    assert parse_weighted("a:1.3) b") == [("a:1.3) b", 1.0)]          # ":1.3)" with no "(" is text
    assert parse_weighted("((a)") == [("a", 1.1 * 1.1)]
    assert parse_weighted("(a]") == [("a]", 1.1)]                     # "]" does not close "("


def test_colon_outside_weight_is_text():
    assert parse_weighted("ratio 16:9, (style: anime)") == [("ratio 16:9, ", 1.0), ("style: anime", 1.1)]


def test_empty_and_break():
    assert parse_weighted("") == [("", 1.0)]
    assert parse_weighted("a BREAK b") == [("a", 1.0), BREAK_MARKER, ("b", 1.0)]
    assert parse_weighted("a\nBREAK\nb") == [("a", 1.0), BREAK_MARKER, ("b", 1.0)]
    assert parse_weighted("a break b") == [("a break b", 1.0)]        # only the uppercase word
    assert parse_weighted("BREAKFAST") == [("BREAKFAST", 1.0)]        # only the whole word
    assert parse_weighted("(a) BREAK (b)") == [("a", 1.1), ("", 1.0), BREAK_MARKER, ("", 1.0), ("b", 1.1)]


def test_break_inside_brackets_keeps_the_a1111_quirk():
    # A1111 multiplies the marker too, so it stops being a marker.
    assert parse_weighted("(a BREAK b)") == [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]


def test_adjacent_equal_weights_merge():
    assert parse_weighted("(a)(b) c [d][e]") == [("ab", 1.1), (" c ", 1.0), ("de", 1 / 1.1)]


# --- chunking ---------------------------------------------------------------------------------------

def _word_encoder(text: str) -> list[int]:
    """Fake tokenizer: a comma is CLIP's comma id, every word ``wN`` is the id N."""
    return [CLIP_COMMA_ID if t == "," else int(t[1:]) for t in re.findall(r"w\d+|,", text)]


def _words(start: int, stop: int) -> str:
    return " ".join(f"w{i}" for i in range(start, stop))


def test_empty_prompt_gives_one_padded_chunk():
    (chunk,) = chunk_tokens(parse_weighted(""), _word_encoder)
    assert chunk == Chunk(ids=(CLIP_END_ID,) * 75, weights=(1.0,) * 75, length=0)


def test_weights_are_stored_per_token():
    (chunk,) = chunk_tokens(parse_weighted("(w1 w2) w3 [w4] (w5:1.5)"), _word_encoder)
    assert chunk.length == 5
    assert chunk.ids[:6] == (1, 2, 3, 4, 5, CLIP_END_ID)
    assert chunk.weights[:6] == (1.1, 1.1, 1.0, 1 / 1.1, 1.5, 1.0)
    assert len(chunk.ids) == len(chunk.weights) == 75


def test_exactly_75_tokens_is_one_chunk_and_76_is_two():
    assert [c.length for c in chunk_tokens([(_words(1, 76), 1.0)], _word_encoder)] == [75]
    chunks = chunk_tokens([(_words(1, 77), 1.0)], _word_encoder)
    assert [c.length for c in chunks] == [75, 1]
    assert chunks[1].ids[0] == 76


def test_long_prompt_spans_chunks_with_weights_following_tokens():
    prompt = f"{_words(1, 60)} ({_words(60, 100)}) {_words(100, 170)}"
    chunks = chunk_tokens(parse_weighted(prompt), _word_encoder)
    assert [c.length for c in chunks] == [75, 75, 19]
    ids = [i for c in chunks for i in c.ids[: c.length]]
    weights = [w for c in chunks for w in c.weights[: c.length]]
    assert ids == list(range(1, 170))
    assert weights == [1.0] * 59 + [1.1] * 40 + [1.0] * 70


def test_break_forces_a_new_chunk():
    chunks = chunk_tokens(parse_weighted("w1 w2 BREAK w3"), _word_encoder)
    assert [(c.ids[: c.length], c.length) for c in chunks] == [((1, 2), 2), ((3,), 1)]
    assert len(chunk_tokens(parse_weighted("BREAK"), _word_encoder)) == 1
    assert [c.length for c in chunk_tokens(parse_weighted("w1 BREAK BREAK w2"), _word_encoder)] == [1, 0, 1]


def test_comma_backtrack_moves_the_words_after_the_last_comma():
    # 70 words, a comma at index 70, then 10 words: the chunk is full after 4 of them, the comma is
    # 5 tokens back (<= 20), so those 4 words move to the second chunk.
    prompt = f"{_words(1, 71)} , {_words(71, 81)}"
    first, second = chunk_tokens([(prompt, 1.0)], _word_encoder)
    assert first.length == 71
    assert first.ids[70] == CLIP_COMMA_ID
    assert first.ids[71:] == (CLIP_END_ID,) * 4
    assert second.ids[: second.length] == tuple(range(71, 81))


def test_comma_backtrack_moves_weights_with_tokens():
    first, second = chunk_tokens(parse_weighted(f"{_words(1, 71)} , ({_words(71, 81)})"), _word_encoder)
    assert first.weights[:71] == (1.0,) * 71 and first.weights[71:] == (1.0,) * 4
    assert second.weights[:10] == (1.1,) * 10


def test_no_backtrack_when_the_comma_is_too_far_or_disabled():
    prompt = f"{_words(1, 51)} , {_words(51, 81)}"                  # comma at index 50: 25 tokens back
    assert [c.length for c in chunk_tokens([(prompt, 1.0)], _word_encoder)] == [75, 6]
    near = f"{_words(1, 71)} , {_words(71, 81)}"
    assert [c.length for c in chunk_tokens([(near, 1.0)], _word_encoder, comma_padding_backtrack=0)] == [75, 6]
    assert [c.length for c in chunk_tokens([(near, 1.0)], _word_encoder, comma_id=None)] == [75, 6]


def test_comma_that_overflows_starts_the_next_chunk():
    chunks = chunk_tokens([(f"{_words(1, 76)} , w99", 1.0)], _word_encoder)
    assert [c.length for c in chunks] == [75, 2]
    assert chunks[1].ids[:2] == (CLIP_COMMA_ID, 99)


def test_chunking_with_the_clip_tokenizer_and_open_clip_padding():
    tok = default_tokenizer()
    assert tok.encode(",") == [CLIP_COMMA_ID]
    (chunk,) = chunk_tokens(parse_weighted("a (red:1.2) cat, sitting"), tok.encode, pad_id=0)
    assert chunk.ids[: chunk.length] == tuple(tok.encode("a red cat, sitting"))
    assert chunk.weights[: chunk.length] == (1.0, 1.2, 1.0, 1.0, 1.0)
    assert chunk.ids[chunk.length:] == (0,) * (75 - chunk.length)


# --- emphasis -------------------------------------------------------------------------------------

def test_apply_emphasis_keeps_the_batchs_mean_and_scales_tokens():
    """One mean over the batch, as A1111's EmphasisOriginal takes it (`z.mean()`); `counts` weigh each row
    as that many copies of it in the batch."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 77, 32, generator=g) + 0.3                    # (B, 77, D)
    weights = torch.ones(2, 77)
    weights[0, 3:6] = 1.5
    weights[1, 10] = 0.5
    out = apply_emphasis(hidden, weights)
    assert out.shape == hidden.shape
    torch.testing.assert_close(out.mean(), hidden.mean(), rtol=0, atol=1e-6)
    scale = hidden.mean() / (hidden * weights[..., None]).mean()
    torch.testing.assert_close(out, hidden * weights[..., None] * scale)
    repeated = apply_emphasis(hidden[[0, 0, 0, 1]], weights[[0, 0, 0, 1]])                 # row 0 three times
    torch.testing.assert_close(apply_emphasis(hidden, weights, torch.tensor([3, 1])), repeated[2:])


def test_apply_emphasis_matches_a1111_original_for_one_prompt_and_is_identity_at_weight_one():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 77, 16, generator=g)
    w = 1 + 0.3 * torch.rand(1, 77, generator=g)
    expected = z * w[..., None]
    expected = expected * (z.mean() / expected.mean())                   # A1111 EmphasisOriginal
    torch.testing.assert_close(apply_emphasis(z, w), expected)
    torch.testing.assert_close(apply_emphasis(z, torch.ones(1, 77)), z)


def test_apply_emphasis_keeps_dtype_and_rejects_mismatched_weights():
    z = torch.randn(1, 77, 8).to(torch.bfloat16)
    assert apply_emphasis(z, torch.ones(1, 77)).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        apply_emphasis(z, torch.ones(1, 76))


def test_malformed_weight_is_an_error():
    with pytest.raises(ValueError, match="1.2.3"):
        parse_weighted("(a:1.2.3)")
