"""The cross-attention's k and v over the prompt, made once per generation (`sdlab.models.prompt_memo`)."""

from __future__ import annotations

import pytest
import torch

from sdlab.models import cpu_linear, prompt_memo
from sdlab.models.prompt_memo import reusing_prompt_projections
from sdlab.models.unet import CrossAttention


@pytest.fixture()
def counted(monkeypatch):
    """The cross-attention's projections over its context, counted (q over x is not: its input is 3 x 8)."""
    calls = []
    real = cpu_linear.linear

    def linear(x, layer):
        if x.shape[1] == 5:
            calls.append(layer)
        return real(x, layer)

    monkeypatch.setattr(cpu_linear, "linear", linear)
    return calls


def _attention():
    torch.manual_seed(0)
    return CrossAttention(16, 12, heads=2, upcast=False).eval()


def test_k_and_v_are_made_once_while_the_prompt_and_weights_stay(counted):
    attention = _attention()
    x, context = torch.randn(2, 3, 16), torch.randn(2, 5, 12)
    with torch.no_grad():
        plain = attention(x, context)
        assert len(counted) == 2
        with reusing_prompt_projections():
            first = attention(x, context)
            again = attention(x, context)
            copy = attention(x, context.clone())                  # an equal prompt in a new tensor (CPU)
            assert len(counted) == 4                              # made once in the scope
            context.mul_(2)                                       # the same tensor, changed in place
            changed = attention(x, context)
            assert len(counted) == 6
            other = attention(x, torch.randn(2, 5, 12))           # another prompt
            assert len(counted) == 8
            attention.to_k.weight.add_(1)                         # a weight changed in place (a LoRA merged)
            attention(x, torch.randn(2, 5, 12))
            attention.to_v.weight.data = attention.to_v.weight.data.clone()   # swapped for a copy: new address
            attention(x, context)
            assert len(counted) == 12
        attention(x, context)                                     # outside the scope: made every call
        attention(x, context)
        assert len(counted) == 16
        expected = attention(x, context)
    torch.testing.assert_close(first, plain)
    torch.testing.assert_close(again, plain)
    torch.testing.assert_close(copy, plain)
    assert not torch.allclose(changed, plain) and not torch.allclose(other, plain)
    with torch.no_grad(), reusing_prompt_projections():
        torch.testing.assert_close(attention(x, context), expected)


def test_nothing_is_kept_with_gradients_hooks_or_self_attention(counted):
    attention = _attention()
    x, context = torch.randn(2, 3, 16), torch.randn(2, 5, 12)
    with reusing_prompt_projections():
        attention(x, context)
        attention(x, context)                                     # gradients wanted: made again
        assert len(counted) == 4
        with torch.no_grad():
            handle = attention.to_k.register_forward_hook(lambda module, args, out: None)   # a LoRA in training
            attention(x, context)
            attention(x, context)
            assert len(counted) == 8
            handle.remove()
            itself = CrossAttention(16, 16, heads=2, upcast=False)
            itself(torch.randn(2, 5, 16))                         # self-attention over 5 tokens: over x
            itself(torch.randn(2, 5, 16))
            assert len(counted) == 14                             # q, k, v each time: nothing kept


def test_the_scope_ends_and_scopes_do_not_share():
    attention = _attention()
    context = torch.randn(2, 5, 12)
    with torch.no_grad():
        with reusing_prompt_projections():
            k, _ = prompt_memo.projections(attention.to_k, attention.to_v, context)
            with reusing_prompt_projections():                   # a nested generation starts empty
                inner, _ = prompt_memo.projections(attention.to_k, attention.to_v, context)
                assert inner is not k
            assert prompt_memo.projections(attention.to_k, attention.to_v, context)[0] is k
        assert prompt_memo._memo.get() is None


def test_prompt_and_negative_prompt_of_different_lengths_are_both_kept(counted, monkeypatch):
    """cfg runs them as two passes, one after the other, at every step."""
    attention = _attention()
    x, cond, uncond = torch.randn(2, 3, 16), torch.randn(2, 5, 12), torch.randn(2, 10, 12)
    with torch.no_grad(), reusing_prompt_projections():
        for _ in range(3):
            attention(x, uncond)
            attention(x, cond)
        assert len(counted) == 2                                  # cond's (5 tokens; uncond's 10 are not counted)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)   # while torch.compile traces
        attention(x, cond)
        attention(x, cond)
        assert len(counted) == 6                                  # made every call: no lookup in a graph
