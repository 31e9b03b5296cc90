"""Nearest 2x upsampling + 3x3 convolution as one transposed convolution (`sdlab.models.upsampled_conv`,
bf16 CPU inference on a CPU with native bf16): the same function as interpolate + conv (the transposed
convolution itself in fp32 within 1e-5 of the output's scale; bf16 within 1.6 x the plain path's error
against fp64 where the CPU computes bf16 natively), the plain path where it must run (gradients, hooks,
fp32 / fp64, a CPU that emulates bf16), and the kernel remade when the weight changes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdlab.models import upsampled_conv as up
from sdlab.models.vae import Decoder, VAEConfig
from sdlab.utils import dtypes


@pytest.fixture
def native_bf16(monkeypatch):
    """The path's logic checked on any CPU: this one counts as computing bf16 natively."""
    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: True)


def _plain(x, conv):
    return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _conv(c_in, c_out, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias)


@pytest.mark.parametrize("shape, c_out, bias", [((1, 8, 5, 7), 12, True), ((2, 16, 6, 6), 16, False),
                                                 ((1, 32, 1, 1), 8, True)])
def test_the_transposed_kernel_equals_interpolate_then_conv(shape, c_out, bias):
    conv = _conv(shape[1], c_out, bias)
    x = torch.randn(shape)
    with torch.no_grad():
        expected = _plain(x.double(), conv.double()).float()
        conv.float()
        assert not up._transposes(x, conv)                       # fp32 keeps the plain path
        out = F.conv_transpose2d(x, up.transposed_weight(conv), conv.bias, stride=2, padding=1)
    assert out.shape == expected.shape
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.skipif(not dtypes.cpu_has_native_bf16(), reason="the path runs only where bf16 is native; emulated "
                    "bf16 rounds the summed weights differently (1.9-2.35 x the plain path's error)")
def test_bf16_error_is_close_to_the_plain_paths():
    conv = _conv(64, 64)
    x = torch.randn(1, 64, 16, 16)
    with torch.no_grad():
        reference = _plain(x.double(), conv.double())
        conv.bfloat16()
        xb = x.bfloat16().contiguous(memory_format=torch.channels_last)
        plain = (_plain(xb, conv).double() - reference).abs().max()
        ours = (up.upsampled_conv(xb, conv).double() - reference).abs().max()
    assert up._transposes(xb, conv)
    assert ours <= 1.6 * plain, (float(ours), float(plain))


def test_a_cpu_without_native_bf16_keeps_the_plain_path(monkeypatch):
    """Emulated bf16 (AVX2 without AVX-512): oneDNN's transposed convolution is ~15 x slower there."""
    conv = _conv(8, 8).bfloat16()
    x = torch.randn(1, 8, 4, 4).bfloat16()
    calls = []
    monkeypatch.setattr(up, "transposed_weight", lambda conv: calls.append(conv))
    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: False)
    with torch.no_grad():
        assert not up._transposes(x, conv)
        assert torch.equal(up.upsampled_conv(x, conv), _plain(x, conv))
    assert calls == []
    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: True)
    with torch.no_grad():
        assert up._transposes(x, conv)


def test_the_plain_path_runs_with_gradients_hooks_or_fp64():
    conv = _conv(8, 8)
    x = torch.randn(1, 8, 4, 4, requires_grad=True)
    assert not up._transposes(x, conv)                          # gradients wanted
    up.upsampled_conv(x, conv).sum().backward()
    assert x.grad is not None
    seen = []
    conv.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.no_grad():
        up.upsampled_conv(x, conv)
    assert seen == [torch.Size([1, 8, 8, 8])]                   # the hook ran: the module's own call
    with torch.no_grad():
        assert not up._transposes(x.double(), _conv(8, 8).double())


def _close(ours, plain):
    assert (ours.float() - plain.float()).abs().max() <= 0.02 * plain.float().abs().max()


def test_the_kernel_follows_the_weight(native_bf16):
    conv = _conv(8, 8).bfloat16()
    x = torch.randn(1, 8, 4, 4).bfloat16()
    with torch.no_grad():
        first = up.transposed_weight(conv)
        assert up.transposed_weight(conv) is first               # kept
        conv.weight.mul_(2)                                      # changed in place (a LoRA merged)
        _close(up.upsampled_conv(x, conv), _plain(x, conv))
        conv.weight = nn.Parameter(conv.weight.detach() * 3)     # another tensor (maybe at the freed address)
        _close(up.upsampled_conv(x, conv), _plain(x, conv))
    with torch.inference_mode():
        made = _conv(8, 8).bfloat16()                            # weights made in inference mode: no version
        made.weight.mul_(2)
        _close(up.upsampled_conv(x, made), _plain(x, made))
        made.weight.mul_(2)                                      # unseen by a cache: none is kept
        _close(up.upsampled_conv(x, made), _plain(x, made))


def test_vae_decoder_takes_it_and_matches_the_plain_path(monkeypatch, native_bf16):
    torch.manual_seed(0)
    decoder = Decoder(VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8)).eval()
    decoder.bfloat16()
    z = torch.randn(1, 4, 8, 8).bfloat16()
    calls = []
    real = up.transposed_weight
    monkeypatch.setattr(up, "transposed_weight", lambda conv: calls.append(conv) or real(conv))
    with torch.no_grad():
        ours = decoder(z)
        assert len(calls) == 1                                   # one upsampling level
        monkeypatch.setattr(up, "_transposes", lambda x, conv: False)
        plain = decoder(z)
    _close(ours, plain)
