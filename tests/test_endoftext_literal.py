"""A literal ``<|endoftext|>`` in a prompt (`chunk_input_ids`).

sdlab's tokenizer reads it as the end token 49407, as openai/CLIP and Hugging Face's CLIPTokenizer do. The
padding must start after the end token sdlab appends to the chunk's real tokens, not after the first 49407:
A1111's SD1 (HF tokenizer, `process_tokens` rewrites nothing when the pad is the end token) and diffusers
keep the words after it, `[49406, 49407, 320, 736, 2368, 49407, ...]` for "<|endoftext|> a red cat".
"""

from __future__ import annotations

import pytest

from sdlab.models.tokenizer import default_tokenizer
from sdlab.pipeline.conditioning import chunk_input_ids, prompt_chunks

BEGIN, END = 49406, 49407
A_RED_CAT = [320, 736, 2368]


@pytest.mark.parametrize("pad", [END, 0])
def test_text_after_a_literal_end_token_is_kept(pad):
    row = chunk_input_ids(prompt_chunks("<|endoftext|> a red cat", default_tokenizer()), pad)[0].tolist()
    assert row == [BEGIN, END, *A_RED_CAT, END] + [pad] * 71


@pytest.mark.parametrize("pad", [END, 0])
def test_plain_prompts_are_padded_after_their_end_token(pad):
    tokenizer = default_tokenizer(pad)
    for prompt in ["a red cat", ""]:
        assert chunk_input_ids(prompt_chunks(prompt, tokenizer), pad).tolist() == tokenizer(prompt).tolist()
    row = chunk_input_ids(prompt_chunks("a red cat <|endoftext|>", tokenizer), pad)[0].tolist()
    assert row == [BEGIN, *A_RED_CAT, END, END] + [pad] * 71
