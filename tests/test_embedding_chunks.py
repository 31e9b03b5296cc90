"""A textual-inversion embedding's vectors stay in one 75-token chunk (`chunk_tokens` with `encode_units`).

Reference: a small port of A1111's `FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line`
(modules/sd_hijack_clip.py) with `EmbeddingDatabase.find_embedding_at_position` (longest name first at a
token): when `len(chunk) + embedding.vectors > 75` the chunk closes and the embedding starts the next one.
sdlab's own `parse_weighted` gives the (text, weight) runs (checked against A1111's parser elsewhere); the
chunk ids and weights must equal the reference's exactly.
"""

from __future__ import annotations

import random

import pytest

from sdlab.models.tokenizer import default_tokenizer
from sdlab.pipeline.conditioning import prompt_chunks
from sdlab.pipeline.prompt_syntax import is_break, parse_weighted

VOCAB = 49408
COMMA, END = 267, 49407
EMBEDDINGS = {"mystyle": 4, "bad-hands-5": 6, "easy_negative": 2, "emb1": 1}   # name -> vectors


@pytest.fixture(scope="module")
def tokenizer():
    words, next_id = {}, VOCAB
    for name, n in EMBEDDINGS.items():
        words[name] = tuple(range(next_id, next_id + n))
        next_id += n
    return default_tokenizer().with_added_words(words)


def a1111_chunks(prompt: str, tokenizer) -> list[tuple[tuple[int, ...], tuple[float, ...]]]:
    """A1111's `tokenize_line` over the base vocabulary, embeddings found by their names' tokens."""
    base = default_tokenizer()
    by_first: dict[int, list] = {}
    for name, ids in tokenizer.added_words.items():
        tokens = base.encode(name)
        by_first.setdefault(tokens[0], []).append((tokens, list(ids)))
    for candidates in by_first.values():
        candidates.sort(key=lambda pair: -len(pair[0]))
    chunks, tokens_, multipliers, last_comma = [], [], [], -1

    def next_chunk():
        nonlocal tokens_, multipliers, last_comma
        n = 75 - len(tokens_)
        chunks.append((tuple(tokens_ + [END] * n), tuple(multipliers + [1.0] * n)))
        tokens_, multipliers, last_comma = [], [], -1

    for text, weight in parse_weighted(prompt):
        if is_break((text, weight)):
            next_chunk()
            continue
        tokens = base.encode(text)
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == COMMA:
                last_comma = len(tokens_)
            elif len(tokens_) == 75 and last_comma != -1 and len(tokens_) - last_comma <= 20:
                cut = last_comma + 1
                moved_t, moved_m = tokens_[cut:], multipliers[cut:]
                tokens_, multipliers = tokens_[:cut], multipliers[:cut]
                next_chunk()
                tokens_, multipliers = moved_t, moved_m
            if len(tokens_) == 75:
                next_chunk()
            found = next(((t, ids) for t, ids in by_first.get(token, []) if tokens[position : position + len(t)] == t), None)
            if found is None:
                tokens_.append(token)
                multipliers.append(weight)
                position += 1
                continue
            name_tokens, ids = found
            if len(tokens_) + len(ids) > 75:
                next_chunk()
            tokens_ += ids
            multipliers += [weight] * len(ids)
            position += len(name_tokens)
    if tokens_ or not chunks:
        next_chunk()
    return chunks


def _sdlab(prompt: str, tokenizer):
    return [(c.ids, c.weights) for c in prompt_chunks(prompt, tokenizer)]


def test_embedding_that_would_cross_the_boundary_moves_whole(tokenizer):
    """The audit's case: 73 one-token words, then a 4-vector embedding."""
    chunks = prompt_chunks(" ".join(["cat"] * 73) + " mystyle", tokenizer)
    mystyle = tokenizer.added_words["mystyle"]
    assert [c.length for c in chunks] == [73, 4]
    assert chunks[0].ids[73:] == (END, END) and chunks[1].ids[:4] == mystyle
    assert _sdlab(" ".join(["cat"] * 73) + " mystyle", tokenizer) == a1111_chunks(" ".join(["cat"] * 73) + " mystyle", tokenizer)


def test_comfyui_syntax_moves_whole_too(tokenizer):
    chunks = prompt_chunks(" ".join(["cat"] * 72) + " embedding:bad-hands-5.pt", tokenizer)
    assert [c.length for c in chunks] == [72, 6]
    assert chunks[1].ids[:6] == tokenizer.added_words["bad-hands-5"]


def test_an_embedding_that_fits_stays(tokenizer):
    chunks = prompt_chunks(" ".join(["cat"] * 71) + " mystyle dog", tokenizer)
    assert [c.length for c in chunks] == [75, 1]


def test_random_prompts_chunk_as_a1111(tokenizer):
    """Emphasis, BREAK, commas (the 20-token backtrack), escapes and embeddings near the chunk boundary."""
    rng = random.Random(2)
    words = ["cat", "dog", "a", "beautiful", "landscape", "masterpiece", "1girl", "very long hair", "red",
             "mystyle", "bad-hands-5", "easy_negative", "emb1", "mystyles"]
    syntax = [",", ", ", "(", ")", "[", "]", ":1.3)", " BREAK ", "\\(", "((", "))", " : 0.8 )"]
    for _ in range(300):
        parts = [rng.choice(words) if rng.random() < 0.7 else rng.choice(syntax) for _ in range(rng.randint(1, 140))]
        prompt = " ".join(parts) if rng.random() < 0.5 else "".join(parts)
        assert _sdlab(prompt, tokenizer) == a1111_chunks(prompt, tokenizer), prompt


def test_encode_units_groups_embeddings(tokenizer):
    units = tokenizer.encode_units("a mystyle cat, embedding:emb1")
    assert tokenizer.added_words["mystyle"] in units and tokenizer.added_words["emb1"] in units
    assert [t for unit in units for t in unit] == tokenizer.encode("a mystyle cat, embedding:emb1")
    assert all(len(u) == 1 for u in default_tokenizer().encode_units("a mystyle cat"))
