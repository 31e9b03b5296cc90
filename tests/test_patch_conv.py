"""`Conv2d`: a convolution over few pixels as one matrix product gives nn.Conv2d's numbers (values and
gradients), and is chosen only where the weight is large against the output."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdlab.models import patch_conv
from sdlab.models.patch_conv import WEIGHT_PER_PIXEL, Conv2d, patch_product_conv


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape", [(2, 5, 7, 5), (1, 6, 8, 8)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_patch_product_is_the_convolution(kernel, stride, shape, channels_last):
    g = torch.Generator().manual_seed(kernel * 10 + stride)
    b, c, h, w = shape
    x = torch.randn(b, c, h, w, generator=g)
    weight = torch.randn(4, c, kernel, kernel, generator=g)
    bias = torch.randn(4, generator=g)
    if channels_last:
        x, weight = x.contiguous(memory_format=torch.channels_last), weight.contiguous(memory_format=torch.channels_last)
    ours = patch_product_conv(x, weight, bias, stride, kernel // 2)
    theirs = F.conv2d(x, weight, bias, stride=stride, padding=kernel // 2)
    assert ours.shape == theirs.shape
    assert ours.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_bf16_patch_product_is_the_convolution_up_to_rounding():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 64, 4, 4, generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(32, 64, 3, 3, generator=g) * 0.05).bfloat16().contiguous(memory_format=torch.channels_last)
    exact = F.conv2d(x.double(), weight.double(), padding=1)
    ours = patch_product_conv(x, weight, None, 1, 1).double()
    theirs = F.conv2d(x, weight, padding=1).double()
    assert (ours - exact).abs().max() <= 1.5 * (theirs - exact).abs().max() + 1e-2


def test_the_product_is_chosen_only_where_the_weight_outweighs_the_pixels(monkeypatch):
    calls = []
    monkeypatch.setattr(patch_conv, "patch_product_conv", lambda *a: calls.append(a[0].shape) or patch_product_conv(*a))
    c = 96
    conv = Conv2d(c, c, 3, padding=1)                            # 82,944 weights: enough for 4 output pixels, not 8
    assert WEIGHT_PER_PIXEL * 8 > conv.weight.numel() >= WEIGHT_PER_PIXEL * 4
    small, large = torch.randn(1, c, 2, 2), torch.randn(1, c, 8, 8)   # 4 and 64 output pixels
    with torch.no_grad():
        torch.testing.assert_close(conv(small), nn.Conv2d.forward(conv, small), rtol=1e-5, atol=1e-5)
        conv(large)
        conv(torch.randn(2, c, 2, 2))                            # 8 output pixels: the batch counts too
        Conv2d(c, c, 3, padding=1, stride=2)(torch.randn(1, c, 4, 4))   # stride 2: 4 output pixels
        Conv2d(c, c, 3, padding=2, dilation=2)(small)            # not a plain square convolution
        Conv2d(c, c, 3, padding=0)(torch.randn(1, c, 4, 4))
    assert calls == [(1, c, 2, 2), (1, c, 4, 4)]


def test_gradients_match_nn_conv2d():
    torch.manual_seed(0)
    conv = Conv2d(64, 64, 3, padding=1)
    reference = nn.Conv2d(64, 64, 3, padding=1)
    reference.load_state_dict(conv.state_dict())
    x = torch.randn(1, 64, 2, 2, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    conv(x).square().sum().backward()
    reference(x_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(conv.weight.grad, reference.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(conv.bias.grad, reference.bias.grad, rtol=1e-4, atol=1e-4)


def _conv_and_skip(seed, c_in=32, c_out=48, size=32):
    """A bf16 channels-last 3x3 convolution over 2 x size x size pixels (more than the tile kernel's, so
    oneDNN's convolution runs) and a skip tensor of its output's shape."""
    torch.manual_seed(seed)
    conv = Conv2d(c_in, c_out, 3, padding=1).bfloat16().to(memory_format=torch.channels_last).requires_grad_(False)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(2, c_in, size, size, generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
    skip = torch.randn(2, c_out, size, size, generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
    return conv, x, skip


@pytest.mark.skipif(not patch_conv.cpu_kernels.onednn_fuses(),
                    reason="no oneDNN bf16 fused convolutions here (oneDNN needs AVX-512 or AMX for bf16)")
def test_forward_add_adds_inside_the_convolution_and_is_as_close_to_fp64():
    conv, x, skip = _conv_and_skip(seed=11)
    with torch.no_grad():
        assert conv._adds_inside(x, skip)
        ours = conv.forward_add(x, skip)
        plain = conv(x) + skip
    exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1) + skip.double()
    ours_err, plain_err = (ours.double() - exact).abs(), (plain.double() - exact).abs()
    assert ours.shape == plain.shape and ours.is_contiguous(memory_format=torch.channels_last)
    assert ours_err.max() <= plain_err.max() + 1e-6 and ours_err.mean() <= plain_err.mean()
    assert not torch.equal(ours, plain)   # one rounding instead of two: the fused convolution ran


def test_forward_add_is_plain_where_it_must_be():
    conv, x, skip = _conv_and_skip(seed=12)
    with torch.no_grad():
        assert not conv._adds_inside(x.float(), skip.float())                   # not bf16
        assert not conv._adds_inside(x, skip[:, :, :-1].contiguous(memory_format=torch.channels_last))  # shape
        assert not conv._adds_inside(x.contiguous(), skip)                       # not channels-last
        seen = []
        handle = conv.register_forward_hook(lambda module, args, out: seen.append(out.shape))
        out = conv.forward_add(x, skip)                                           # a hook: the module's own call
        handle.remove()
        assert seen == [out.shape]
        torch.testing.assert_close(out, conv(x) + skip, rtol=0, atol=0)
    conv.requires_grad_(True)                                                     # training: gradients flow
    conv.forward_add(x, skip).float().sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_forward_add_into_other_writes_the_same_sum_over_it():
    """`into_other`: the fused sum (or, in fp32, the plain one) written into `other`, the numbers those of a new
    tensor; with gradients wanted, a new tensor and `other` left alone."""
    conv, x, skip = _conv_and_skip(seed=13)
    for dtype in (torch.bfloat16, torch.float32):
        c, xs, other = conv.to(dtype), x.to(dtype), skip.to(dtype)
        with torch.no_grad():
            fresh = c.forward_add(xs, other)
            given = other.clone()
            written = c.forward_add(xs, given, into_other=True)
        assert written.data_ptr() == given.data_ptr() and torch.equal(written, fresh)
    conv.float().requires_grad_(True)
    other = skip.float()
    kept = other.clone()
    out = conv.forward_add(x.float(), other, into_other=True)
    assert out.data_ptr() != other.data_ptr() and torch.equal(other, kept)
    out.sum().backward()
    assert conv.weight.grad is not None
