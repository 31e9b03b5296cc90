"""Work made once per generation (`sdlab.models.generation_memo`): the cross-attention's k and v over the
prompt, a ControlNet's hint features."""

from __future__ import annotations

import pytest
import torch

from controlnet_fixtures import ENCODERS
from sdlab.models import cpu_linear, generation_memo
from sdlab.models.controlnet import ControlNet, ControlNetConfig
from sdlab.models.generation_memo import reusing_generation_work
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
        with reusing_generation_work():
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
    with torch.no_grad(), reusing_generation_work():
        torch.testing.assert_close(attention(x, context), expected)


def test_nothing_is_kept_with_gradients_hooks_or_self_attention(counted):
    attention = _attention()
    x, context = torch.randn(2, 3, 16), torch.randn(2, 5, 12)
    with reusing_generation_work():
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


def _projections(attention, context):
    return generation_memo.reused((attention.to_k, attention.to_v), context,
                                  lambda: (attention.to_k(context), attention.to_v(context)))


def test_the_scope_ends_and_scopes_do_not_share():
    attention = _attention()
    context = torch.randn(2, 5, 12)
    with torch.no_grad():
        with reusing_generation_work():
            k, _ = _projections(attention, context)
            with reusing_generation_work():                   # a nested generation starts empty
                inner, _ = _projections(attention, context)
                assert inner is not k
            assert _projections(attention, context)[0] is k
        assert generation_memo._memo.get() is None


def test_prompt_and_negative_prompt_of_different_lengths_are_both_kept(counted, monkeypatch):
    """cfg runs them as two passes, one after the other, at every step."""
    attention = _attention()
    x, cond, uncond = torch.randn(2, 3, 16), torch.randn(2, 5, 12), torch.randn(2, 10, 12)
    with torch.no_grad(), reusing_generation_work():
        for _ in range(3):
            attention(x, uncond)
            attention(x, cond)
        assert len(counted) == 2                                  # cond's (5 tokens; uncond's 10 are not counted)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)   # while torch.compile traces
        attention(x, cond)
        attention(x, cond)
        assert len(counted) == 6                                  # made every call: no lookup in a graph


def test_a_new_view_of_the_same_memory_is_reused_until_it_changes(counted):
    """The pipeline hands the U-Net a new view of its prompt or hint at each step (`expand`, slices); on a GPU
    the values are not compared, so the same memory viewed the same way must be recognised."""
    attention = _attention()
    x, base = torch.randn(2, 3, 16), torch.randn(1, 5, 12)
    with torch.no_grad(), reusing_generation_work():
        first = attention(x, base.expand(2, -1, -1))
        attention(x, base.expand(2, -1, -1))
        assert len(counted) == 2
        base[0, 0, 0] += 1                                        # changed through the base: the version moves
        changed = attention(x, base.expand(2, -1, -1))
        assert len(counted) == 4 and not torch.allclose(changed, first)
        assert not generation_memo._same_view(base[:, :4], base[:, 1:])   # the same memory, another view
        assert not generation_memo._same_view(base.expand(2, -1, -1), base.expand(2, -1, -1).contiguous())


def _controlnet(hint_bgr=False):
    torch.manual_seed(0)
    model = ControlNet(ControlNetConfig(unet=ENCODERS["sd1"], hint_bgr=hint_bgr)).eval()
    with torch.no_grad():
        for p in model.parameters():                              # the zero convs would hide the hint
            p.normal_(0, 0.2)
    return model


def _counting_hint_block(model, monkeypatch):
    made = []
    real = ControlNet._hint_features
    monkeypatch.setattr(ControlNet, "_hint_features", lambda self, *a: made.append(1) or real(self, *a))
    return made


@pytest.mark.parametrize("hint_bgr", [False, True])
def test_controlnet_hint_features_are_made_once_per_generation(hint_bgr, monkeypatch):
    model = _controlnet(hint_bgr)
    made = _counting_hint_block(model, monkeypatch)
    gen = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 7, ENCODERS["sd1"].context_dim, generator=gen)
    hint = torch.rand(1, 3, 64, 64, generator=gen)
    steps = [torch.tensor([t, t]) for t in (901.0, 500.0, 17.0)]
    with torch.no_grad():
        plain = [model(x, t, context, hint.expand(2, -1, -1, -1)) for t in steps]
        assert len(made) == 3
        with reusing_generation_work():
            kept = [model(x, t, context, hint.expand(2, -1, -1, -1)) for t in steps]   # as the pipeline calls it
            assert len(made) == 4
            other = model(x, steps[0], context, torch.rand(2, 3, 64, 64, generator=gen))   # another hint
            assert len(made) == 5
            hint.mul_(0.5)                                        # changed in place
            changed = model(x, steps[0], context, hint.expand(2, -1, -1, -1))
            assert len(made) == 6
            model.input_hint_block[0].weight.mul_(2)              # a weight changed in place
            model(x, steps[0], context, hint.expand(2, -1, -1, -1))
            assert len(made) == 7
    for (residuals, middle), (kept_residuals, kept_middle) in zip(plain, kept):
        for ours, reference in zip([*kept_residuals, kept_middle], [*residuals, middle]):
            torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    assert not torch.allclose(other[1], plain[0][1]) and not torch.allclose(changed[1], plain[0][1])


def test_controlnet_hint_features_are_not_kept_with_gradients_or_hooks(monkeypatch):
    model = _controlnet()
    made = _counting_hint_block(model, monkeypatch)
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([5.0, 5.0]), torch.randn(2, 7, ENCODERS["sd1"].context_dim)
    hint = torch.rand(2, 3, 64, 64)
    with reusing_generation_work():
        model(x, t, context, hint)
        model(x, t, context, hint)                                # training a ControlNet: gradients
        assert len(made) == 2
        with torch.no_grad():
            model.input_hint_block[2].register_forward_hook(lambda module, args, out: None)
            model(x, t, context, hint)
            model(x, t, context, hint)
            assert len(made) == 4
