"""sdlab's GroupNorm (+ SiLU) and LayerNorm kernels (`sdlab.models.cpu_norm`) against an fp64 reference and PyTorch's
bf16 ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdlab.models import cpu_kernels, cpu_norm

pytestmark = pytest.mark.skipif(not torch.cpu._is_avx512_bf16_supported(), reason="the CPU has no AVX512-BF16")


def _input(shape, seed, offset=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale + offset
    return x.bfloat16().contiguous(memory_format=torch.channels_last)


def _norm(channels, groups, seed, affine=True, eps=1e-5):
    norm = nn.GroupNorm(groups, channels, eps=eps, affine=affine)
    if affine:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(channels, generator=g) * 0.5 + 1)
            norm.bias.copy_(torch.randn(channels, generator=g) * 0.3)
    return norm.bfloat16()


@pytest.mark.parametrize(("shape", "groups", "offset", "scale"), [
    ((2, 320, 32, 32), 32, 0.0, 1.0),     # SD1.5's first level, fewer pixels
    ((2, 1280, 8, 8), 32, 0.5, 3.0),      # the lowest level: one task per image
    ((1, 24, 7, 5), 8, 0.0, 1.0),         # channels not a whole number of vectors, odd pixel counts
    ((2, 64, 20, 30), 32, 100.0, 0.5),    # a mean far above the spread: the shifted sums keep the variance
    ((1, 48, 33, 17), 1, -3.0, 2.0),      # one group over everything
])
@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_kernel_is_as_close_to_fp64_as_pytorchs_bf16_ops(kernel, shape, groups, offset, scale, silu, affine):
    x = _input(shape, seed=shape[1] + shape[2], offset=offset, scale=scale)
    norm = _norm(shape[1], groups, seed=7, affine=affine, eps=1e-6 if offset else 1e-5)
    w = norm.weight.double() if affine else None
    b = norm.bias.double() if affine else None
    exact = F.group_norm(x.double(), groups, w, b, norm.eps)
    theirs = norm(x)
    if silu:
        exact, theirs = F.silu(exact), F.silu(theirs)
    with torch.inference_mode():
        ours = cpu_norm.group_norm(norm, x, silu=silu)
    assert ours.dtype == torch.bfloat16 and ours.shape == x.shape
    assert ours.is_contiguous(memory_format=torch.channels_last)
    ours_err, theirs_err = (ours.double() - exact).abs(), (theirs.double() - exact).abs()
    # both round to bf16 (PyTorch twice with SiLU): at most PyTorch's error, with a little room
    assert ours_err.max() <= 1.25 * theirs_err.max() + 1e-3
    assert ours_err.mean() <= 1.05 * theirs_err.mean() + 1e-6


@pytest.mark.parametrize("silu", [True, False])
def test_overwrite_writes_the_same_result_into_the_input(kernel, silu):
    x = _input((2, 320, 24, 40), seed=3, offset=0.5)
    norm = _norm(320, 32, seed=4)
    with torch.inference_mode():
        fresh = cpu_norm.group_norm(norm, x, silu=silu)
        kept = x.clone()
        written = cpu_norm.group_norm(norm, kept, silu=silu, overwrite=True)
        assert written.data_ptr() == kept.data_ptr() and torch.equal(written, fresh)
        assert not torch.equal(x, fresh)                                     # the plain call left x alone
        small = cpu_norm.group_norm(norm.float(), x.float(), silu=silu, overwrite=True)   # PyTorch's ops: a copy
        assert torch.equal(small, F.silu(norm.float()(x.float())) if silu else norm.float()(x.float()))


def test_an_outlying_first_pixel_does_not_cost_the_variance_its_precision(kernel):
    """The sums are taken about each task's first pixel; one far from the rest must not leave a large
    difference of large sums (a 512 x 512 map, pixel 0 at 1000, the rest about 0)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, 32, 512, 512, generator=g) * 0.1
    x[:, :, 0, 0] = 1000.0
    x = x.bfloat16().contiguous(memory_format=torch.channels_last)
    norm = _norm(32, 32, seed=12)
    exact = F.group_norm(x.double(), 32, norm.weight.double(), norm.bias.double(), norm.eps)
    with torch.inference_mode():
        ours = cpu_norm.group_norm(norm, x)
    theirs = norm(x)
    ours_err, theirs_err = (ours.double() - exact).abs(), (theirs.double() - exact).abs()
    assert ours_err.max() <= 1.25 * theirs_err.max() + 1e-3 and ours_err.mean() <= 1.05 * theirs_err.mean() + 1e-6


def test_the_kernel_is_called_for_inference_on_large_bf16_channels_last_maps(kernel, monkeypatch):
    calls = []
    real = kernel.group_norm_bf16

    class Recording:
        def group_norm_bf16(self, *args):
            calls.append(args[0].shape)
            return real(*args)

    monkeypatch.setattr(cpu_kernels, "_state", {"module": Recording()})
    norm = _norm(64, 32, seed=1)
    x = _input((1, 64, 32, 32), seed=2)
    with torch.inference_mode():
        cpu_norm.group_norm(norm, x, silu=True)
    assert calls == [x.shape]

    calls.clear()
    with torch.inference_mode():
        fp32 = cpu_norm.group_norm(norm.float(), x.float(), silu=True)           # fp32: PyTorch
        nchw = cpu_norm.group_norm(norm.bfloat16(), x.contiguous(), silu=True)    # not channels-last: PyTorch
    assert calls == []
    assert torch.equal(fp32, F.silu(norm.float()(x.float())))
    assert torch.equal(nchw, F.silu(norm.bfloat16()(x.contiguous())))


def test_training_and_hooks_take_pytorchs_ops_and_an_unbuilt_small_map_builds_the_kernels(kernel, monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_kernels, "_state", {"module": type("K", (), {
        "group_norm_bf16": staticmethod(lambda *a: calls.append(a) or kernel.group_norm_bf16(*a))})()})
    norm = _norm(32, 8, seed=3)
    x = _input((1, 32, 32, 32), seed=4).requires_grad_(True)
    out = cpu_norm.group_norm(norm, x, silu=True)                                # a gradient is wanted
    out.float().sum().backward()
    assert calls == [] and x.grad is not None and norm.weight.grad is not None

    hooked = _norm(32, 8, seed=3)
    hooked.register_forward_hook(lambda module, args, output: output * 2)
    with torch.inference_mode():
        y = cpu_norm.group_norm(hooked, x.detach(), silu=False)                 # hooks run through the module
    assert calls == [] and torch.equal(y, norm(x.detach()) * 2)

    seen = []
    watched = _norm(32, 8, seed=3)
    watched.register_forward_hook(lambda module, args, output: seen.append(output))
    with torch.inference_mode():
        y = cpu_norm.group_norm(watched, x.detach(), silu=True)
    assert torch.equal(seen[0], norm(x.detach())) and torch.equal(y, F.silu(seen[0]))   # the hook's copy kept

    # not built yet: a small map builds them and takes the kernel, as it would after a larger map (the same
    # numbers whatever ran before)
    monkeypatch.setattr(cpu_kernels, "_state", {})
    built = type("K", (), {"group_norm_bf16": staticmethod(lambda *a: calls.append(a[0].shape)
                                                           or kernel.group_norm_bf16(*a))})()
    monkeypatch.setattr(cpu_kernels, "_build", lambda: built)
    small = _input((1, 32, 4, 4), seed=5)
    with torch.inference_mode():
        cpu_norm.group_norm(norm, small, silu=True)
    assert calls == [small.shape] and cpu_kernels.loaded()


def test_a_resblock_on_the_kernel_is_as_close_to_fp64_as_on_pytorchs_ops(kernel, monkeypatch):
    from sdlab.models.unet import ResBlock

    torch.manual_seed(0)
    block = ResBlock(64, 96, emb_dim=32, groups=32).eval()
    x = torch.randn(2, 64, 32, 32).contiguous(memory_format=torch.channels_last)
    emb = F.silu(torch.randn(2, 32))
    with torch.inference_mode():
        exact = block.double()(x.double(), emb.double())
        block = block.bfloat16().to(memory_format=torch.channels_last)
        calls = []
        monkeypatch.setattr(cpu_kernels, "_state", {"module": type("K", (), {
            "group_norm_bf16": staticmethod(lambda *a: calls.append(a[-2:]) or kernel.group_norm_bf16(*a))})()})
        ours = block(x.bfloat16(), emb.bfloat16())
        monkeypatch.setattr(cpu_kernels, "_state", {"module": None})             # as where it cannot be built
        theirs = block(x.bfloat16(), emb.bfloat16())
    # both norms with their SiLU; the second writes over conv1's output
    assert calls == [(True, False), (True, True)]
    ours_err, theirs_err = (ours.double() - exact).abs(), (theirs.double() - exact).abs()
    assert ours_err.max() <= 1.25 * theirs_err.max() and ours_err.mean() <= 1.05 * theirs_err.mean()


def _layer_norm(channels, seed, affine=True, dtype=torch.bfloat16):
    norm = nn.LayerNorm(channels, elementwise_affine=affine)
    if affine:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(channels, generator=g) * 0.5 + 1)
            norm.bias.copy_(torch.randn(channels, generator=g) * 0.3)
    return norm.to(dtype)


@pytest.mark.parametrize(("shape", "offset", "scale"), [
    ((2, 600, 320), 0.0, 1.0),      # SD1.5's first level's width
    ((3, 77, 768), 0.5, 3.0),       # a prompt's tokens
    ((1, 5, 40), 0.0, 1.0),         # rows not a whole number of vectors
    ((2, 300, 64), 100.0, 0.5),     # a mean far above the spread
])
@pytest.mark.parametrize("params", ["bf16", "fp16", "fp32", "none"])
def test_layer_norm_is_as_close_to_fp64_as_pytorchs(kernel, shape, offset, scale, params):
    dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(params, torch.bfloat16)
    norm = _layer_norm(shape[-1], seed=shape[-1], affine=params != "none", dtype=dtype)
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * scale + offset).bfloat16()
    affine = (norm.weight.double(), norm.bias.double()) if params != "none" else (None, None)
    exact = F.layer_norm(x.double(), (shape[-1],), *affine, norm.eps)
    with torch.inference_mode():
        ours = kernel.layer_norm_bf16(x, norm.weight, norm.bias, norm.eps)
        # PyTorch's bf16 LayerNorm; with fp16 / fp32 weights its fp32 one, rounded once
        theirs = norm(x) if dtype == torch.bfloat16 else norm.float()(x.float()).bfloat16()
    ours_err, theirs_err = (ours.double() - exact).abs(), (theirs.double() - exact).abs()
    assert ours.shape == x.shape and ours.dtype == torch.bfloat16
    assert ours_err.max() <= 1.05 * theirs_err.max() + 1e-6 and ours_err.mean() <= 1.05 * theirs_err.mean()


def test_layer_norm_takes_the_kernel_only_where_it_may(kernel, monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_kernels, "_state", {"module": type("K", (), {
        "layer_norm_bf16": staticmethod(lambda *a: calls.append(a[0].shape) or kernel.layer_norm_bf16(*a))})()})
    norm = _layer_norm(64, seed=2)
    x = torch.randn(2, 600, 64).bfloat16()
    with torch.inference_mode():
        y = cpu_norm.layer_norm(norm, x)
        assert calls == [x.shape] and torch.allclose(y.float(), norm(x).float(), atol=0.05)
        cpu_norm.layer_norm(norm, x.transpose(0, 1))                              # not contiguous rows
        cpu_norm.layer_norm(_layer_norm(64, seed=2, dtype=torch.float32), x.float())   # not bf16
        square = torch.randn(2, 64, 64).bfloat16()
        cpu_norm.layer_norm(_layer_norm((64, 64), seed=2), square)                # over more than the last axis
        hooked = _layer_norm(64, seed=2)
        hooked.register_forward_hook(lambda module, args, output: output * 2)
        assert torch.equal(cpu_norm.layer_norm(hooked, x), norm(x) * 2)           # hooks run through the module
    assert calls == [x.shape]
    trained = _layer_norm(64, seed=2)
    cpu_norm.layer_norm(trained, x).float().sum().backward()                     # a gradient is wanted
    assert calls == [x.shape] and trained.weight.grad is not None

    calls.clear()                                     # not built yet: few tokens build them and take the kernel
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setattr(cpu_kernels, "_build", lambda: type("K", (), {
        "layer_norm_bf16": staticmethod(lambda *a: calls.append(a[0].shape) or kernel.layer_norm_bf16(*a))})())
    few = torch.randn(1, 7, 64).bfloat16()
    with torch.inference_mode():
        cpu_norm.layer_norm(norm, few)
    assert calls == [few.shape]
