"""ComfyUI's prompt weights (emphasis mode "ComfyUI", the ComfyUI API's graphs): its parser and its weighting.

Reference, transcribed from comfyanonymous/ComfyUI comfy/sd1_clip.py (01312a5): ``parse_parentheses``,
``token_weights``, ``escape_important`` / ``unescape_important`` (below, as written there), and
``SDClipModel.encode_token_weights``: with any weight other than 1 the empty prompt's tokens (``gen_empty_tokens``:
start, end, then pad) are encoded with the prompt's, and ``z[j] = (z[j] - z_empty[j]) * weight + z_empty[j]`` at
each token j whose weight is not 1 (no mean restored). SDTokenizer.tokenize_with_weights tokenizes each weighted
segment word by word (split on spaces), start token, the tokens, end token, padded with the end token (SD1).
On the shipped tiny model (its text encoder, SD1's rule) sdlab's encoding equals that at 1e-6.
"""

from __future__ import annotations

import pytest
import torch

import sdlab
from sdlab.pipeline.comfy_prompt import comfy_weighted_runs
from sdlab.pipeline.conditioning import encode_prompts


# -- comfy/sd1_clip.py, transcribed ---------------------------------------------------------------------------
def parse_parentheses(string):
    result = []
    current_item = ""
    nesting_level = 0
    for char in string:
        if char == "(":
            if nesting_level == 0:
                if current_item:
                    result.append(current_item)
                    current_item = "("
                else:
                    current_item = "("
            else:
                current_item += char
            nesting_level += 1
        elif char == ")":
            nesting_level -= 1
            if nesting_level == 0:
                result.append(current_item + ")")
                current_item = ""
            else:
                current_item += char
        else:
            current_item += char
    if current_item:
        result.append(current_item)
    return result


def token_weights(string, current_weight):
    a = parse_parentheses(string)
    out = []
    for x in a:
        weight = current_weight
        if len(x) >= 2 and x[-1] == ')' and x[0] == '(':
            x = x[1:-1]
            xx = x.rfind(":")
            weight *= 1.1
            if xx > 0:
                try:
                    weight = float(x[xx + 1:])
                    x = x[:xx]
                except ValueError:     # ComfyUI: a bare except
                    pass
            out += token_weights(x, weight)
        else:
            out += [(x, current_weight)]
    return out


def escape_important(text):
    text = text.replace("\\)", "\0\1")
    text = text.replace("\\(", "\0\2")
    return text


def unescape_important(text):
    text = text.replace("\0\1", ")")
    text = text.replace("\0\2", "(")
    return text


PROMPTS = [
    "a (red:1.5) apple, ((shiny)) \\(fruit\\) on a [wooden] table BREAK dusk",
    "(a (b:0.5) c)", "x) (y", "(unclosed", "(e:x)", "((deep:0.7) (er)):1.3", "(:2)", "plain words",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_runs_are_comfyuis_token_weights(prompt):
    expected = [(unescape_important(text), weight) for text, weight in token_weights(escape_important(prompt), 1.0)]
    assert comfy_weighted_runs(prompt) == expected


@pytest.fixture(scope="module")
def tiny():
    return sdlab.load()


def _comfy_tokens(tokenizer, prompt):
    """SDTokenizer.tokenize_with_weights for a prompt under 75 tokens: (ids (77,), weights (77,))."""
    ids, weights = [tokenizer.bos_token_id], [1.0]
    for segment, weight in token_weights(escape_important(prompt), 1.0):
        for word in unescape_important(segment).replace("\n", " ").split(" "):
            if word:
                for token in tokenizer.encode(word):
                    ids.append(token)
                    weights.append(weight)
    ids.append(tokenizer.eos_token_id)
    weights.append(1.0)
    pad = 77 - len(ids)
    return torch.tensor([ids + [tokenizer.eos_token_id] * pad]), torch.tensor([weights + [1.0] * pad])


@pytest.mark.parametrize("prompt", [PROMPTS[0], "(a (b:0.5) c)", "a photo of a ((cat:1.4)) and a (dog)"])
def test_the_encoding_is_comfyuis(tiny, prompt):
    encoder = tiny.bundle.text_encoders[0]
    ids, weights = _comfy_tokens(encoder.tokenizer, prompt)
    empty = torch.tensor([[encoder.tokenizer.bos_token_id] + [encoder.tokenizer.eos_token_id] * 76])
    with torch.no_grad():
        z = encoder.model(ids).last_hidden_state                                   # (1, 77, D): SD1's rule
        z_empty = encoder.model(empty).last_hidden_state[0]                        # (77, D)
    reference = z.clone()
    for j in range(77):
        if weights[0, j] != 1.0:
            reference[0, j] = (z[0, j] - z_empty[j]) * weights[0, j] + z_empty[j]
    ours = encode_prompts(tiny.bundle.text_encoders, [prompt], emphasis="ComfyUI")[0].context
    assert (weights != 1.0).any() and not torch.allclose(reference, z, atol=1e-3)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    a1111 = encode_prompts(tiny.bundle.text_encoders, [prompt], emphasis="Original")[0].context[:, :77]
    assert (a1111 - reference).abs().max() > 1e-3                # A1111's rule (the mean restored) is another
