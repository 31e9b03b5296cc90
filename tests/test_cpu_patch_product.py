"""sdlab's AMX patch product (`kernels/cpu_patch_product.cpp`, taken by `patch_conv`) against an fp64
convolution and oneDNN's bf16 one, and where `patch_conv` takes it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sdlab.models import cpu_kernels, cpu_linear, patch_conv
from sdlab.models.patch_conv import TILE_PIXELS, Conv2d

pytestmark = pytest.mark.skipif(not torch.cpu._is_avx512_bf16_supported(), reason="the CPU has no AVX512-BF16")


@pytest.fixture()
def tiles(kernel):
    """The kernels, where they run on the AMX tiles here."""
    if not kernel.uses_amx():
        pytest.skip("the kernels run without AMX here")
    return kernel


def _case(batch, c_in, h, w, c_out, k, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, c_in, h, w, generator=g) + 0.5).bfloat16().contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(c_out, c_in, k, k, generator=g) / (c_in * k * k) ** 0.5).bfloat16()
    b = (torch.randn(c_out, generator=g) * 0.5).bfloat16() if bias else None
    return x, weight.contiguous(memory_format=torch.channels_last), b


def _recording(kernels, name, note):
    """`kernels` with each call of `name` noted first (`note(*args)` appended to the returned list)."""
    calls = []

    class Recording:
        def __getattr__(self, attr):
            return getattr(kernels, attr)

    def call(*args):
        calls.append(note(*args))
        return getattr(kernels, name)(*args)

    proxy = Recording()
    setattr(proxy, name, call)
    return proxy, calls


@pytest.mark.parametrize(("batch", "c_in", "h", "w", "c_out", "k", "stride", "bias"), [
    (2, 1280, 8, 8, 1280, 3, 1, True),     # SD1.5's lowest level with guidance
    (2, 256, 16, 16, 128, 3, 1, True),     # 512 pixels: sixteen 32-pixel blocks
    (1, 64, 3, 5, 64, 3, 1, False),        # 15 pixels: one block, mostly padding; no bias
    (3, 96, 7, 9, 64, 3, 2, True),         # stride 2 on odd sizes: 60 pixels
    (2, 320, 11, 6, 96, 1, 1, True),       # 1x1
    (1, 32, 32, 32, 64, 3, 1, True),       # K = 288 (one pass shorter than KC), 1024 pixels: two products
    (2, 64, 20, 21, 64, 3, 1, True),       # 840 pixels: products of 512 and 328 (padded to 352)
    (2, 512, 10, 10, 64, 3, 1, True),      # K = 4608: 18 passes over KC
])
def test_the_tile_product_is_the_convolution_up_to_bf16_rounding(tiles, batch, c_in, h, w, c_out, k, stride, bias):
    x, weight, b = _case(batch, c_in, h, w, c_out, k, seed=c_in + k, bias=bias)
    exact = F.conv2d(x.double(), weight.double(), None if b is None else b.double(), stride=stride, padding=k // 2)
    flat = weight.permute(0, 2, 3, 1).reshape(c_out, -1)
    ours = tiles.patch_product_bf16(x, flat, b, k, stride, k // 2).permute(0, 3, 1, 2)
    theirs = F.conv2d(x, weight, b, stride=stride, padding=k // 2)
    assert ours.shape == exact.shape and ours.dtype == torch.bfloat16
    ours_err, their_err = (ours.double() - exact).abs(), (theirs.double() - exact).abs()
    # one rounding of fp32 sums to bf16 (oneDNN rounds the same sums, then adds the bias in bf16)
    assert ours_err.mean() <= 1.05 * their_err.mean() + 1e-4
    assert ours_err.max() <= 1.05 * their_err.max() + 1e-3


def test_nan_in_the_zero_padding_never_reaches_the_output(tiles):
    """Pixels past the output and taps in the padding are zeros in the patches, never uninitialised memory."""
    x, weight, b = _case(1, 64, 5, 3, 64, 3, seed=7)
    flat = weight.permute(0, 2, 3, 1).reshape(64, -1)
    for _ in range(3):   # allocations reused from earlier calls may hold anything
        torch.full((1 << 20,), float("nan"), dtype=torch.bfloat16)
        out = tiles.patch_product_bf16(x, flat, b, 3, 1, 1)
        assert torch.isfinite(out).all()


def test_bad_arguments_are_refused(tiles):
    x, weight, _ = _case(1, 64, 4, 4, 64, 3, seed=8)
    flat = weight.permute(0, 2, 3, 1).reshape(64, -1)
    with pytest.raises(RuntimeError, match="multiples of 32"):
        tiles.patch_product_bf16(x, flat[:48], None, 3, 1, 1)                 # 48 output channels
    with pytest.raises(RuntimeError, match="channels-last"):
        tiles.patch_product_bf16(x.contiguous(), flat, None, 3, 1, 1)
    with pytest.raises(RuntimeError, match="weight"):
        tiles.patch_product_bf16(x, flat.float(), None, 3, 1, 1)


def test_conv2d_takes_the_tiles_for_bf16_inference_on_few_pixels(tiles, monkeypatch):
    recording, calls = _recording(tiles, "patch_product_bf16", lambda x, *args: tuple(x.shape))
    monkeypatch.setattr(cpu_kernels, "_state", {"module": recording})
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    conv = Conv2d(128, 64, 3, padding=1).bfloat16().to(memory_format=torch.channels_last)
    down = Conv2d(128, 64, 3, padding=1, stride=2).bfloat16().to(memory_format=torch.channels_last)
    x = torch.randn(2, 128, 16, 16).bfloat16().contiguous(memory_format=torch.channels_last)   # 512 pixels
    with torch.inference_mode():
        out = conv(x)
        down(x)
    assert calls == [(2, 128, 16, 16), (2, 128, 16, 16)]
    torch.testing.assert_close(out.float(), F.conv2d(x.float(), conv.weight.float(), conv.bias.float(), padding=1),
                               atol=0.05, rtol=0.02)

    calls.clear()
    big = torch.randn(1, 128, 40, 40).bfloat16().contiguous(memory_format=torch.channels_last)  # 1600 > TILE_PIXELS
    assert 40 * 40 > TILE_PIXELS
    narrow = Conv2d(128, 32, 3, padding=1).bfloat16().to(memory_format=torch.channels_last)     # one block, two threads
    odd = Conv2d(128, 48, 1).bfloat16().to(memory_format=torch.channels_last)                   # 48 channels
    fp32 = Conv2d(128, 64, 3, padding=1).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        conv(big)
        narrow(x)
        odd(x)
        fp32(x.float())
        conv(x.contiguous())                                                                     # not channels-last
    conv(x.requires_grad_(True)).float().sum().backward()                                        # a gradient is wanted
    assert calls == [] and x.grad is not None and conv.weight.grad is not None

    # not built yet: a small product builds them and takes the tiles, as it would after a larger one (the same
    # numbers whatever ran before)
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setattr(cpu_kernels, "_build", lambda: recording)
    with torch.inference_mode():
        small = torch.randn(1, 128, 4, 4).bfloat16().contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(conv(small), patch_conv.Conv2d._conv_forward(conv, small, conv.weight, conv.bias),
                                   atol=0.05, rtol=0.02)
    assert calls == [(1, 128, 4, 4)]


@pytest.mark.parametrize("shared_embedding", [False, True])   # True: the embedding rides in conv1's bias
def test_a_resblock_on_the_tiles_is_as_close_to_fp64_as_on_onednn(tiles, monkeypatch, shared_embedding):
    from sdlab.models.unet import ResBlock

    torch.manual_seed(0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    block = ResBlock(256, 128, emb_dim=64, groups=32).eval()
    x = torch.randn(2, 256, 8, 8).contiguous(memory_format=torch.channels_last)
    emb = F.silu(torch.randn(1 if shared_embedding else 2, 64)).expand(2, 64)
    recording, calls = _recording(tiles, "patch_product_bf16", lambda *args: args[2] is not None)

    with torch.inference_mode():
        exact = block.double()(x.double(), emb.double())
        block = block.bfloat16().to(memory_format=torch.channels_last)
        monkeypatch.setattr(cpu_kernels, "_state", {"module": recording})
        ours = block(x.bfloat16(), emb.bfloat16())
        monkeypatch.setattr(cpu_kernels, "_state", {"module": None})               # as where it cannot be built
        theirs = block(x.bfloat16(), emb.bfloat16())
    assert calls == [True, True, True]                                             # conv1, conv2, the 1x1 skip
    ours_err, theirs_err = (ours.double() - exact).abs(), (theirs.double() - exact).abs()
    assert ours_err.max() <= 1.25 * theirs_err.max() and ours_err.mean() <= 1.05 * theirs_err.mean()


def _geglu_case(rows, channels, inner, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, channels, generator=g) * 2).bfloat16()
    weight = (torch.randn(2 * inner, channels, generator=g) / channels**0.5).bfloat16()
    b = (torch.randn(2 * inner, generator=g) * 0.5).bfloat16() if bias else None
    return x, weight, b


def _geglu_fp64(x, weight, b):
    a, gate = F.linear(x.double(), weight.double(), None if b is None else b.double()).chunk(2, dim=-1)
    return a * F.gelu(gate)


@pytest.mark.parametrize(("rows", "channels", "inner", "bias"), [
    (512, 1280, 1280, True),    # SD1.5's 16 x 16 level with guidance (inner 5120 there)
    (128, 320, 640, True),
    (77, 64, 48, True),         # rows past a 32-row block; 3 blocks of 16 channels
    (840, 96, 32, False),       # products of 512 and 328 rows; no bias
    (16, 32, 16, True),         # one block, mostly padding
])
def test_the_tile_geglu_is_as_close_to_fp64_as_onednns_fused_products(tiles, rows, channels, inner, bias):
    x, weight, b = _geglu_case(rows, channels, inner, seed=rows + inner, bias=bias)
    exact = _geglu_fp64(x, weight, b)
    ours = tiles.geglu_bf16(x, weight, b)
    theirs = cpu_linear.onednn_geglu(x, weight, b)
    assert ours.shape == (rows, inner) and ours.dtype == torch.bfloat16
    ours_err, their_err = (ours.double() - exact).abs(), (theirs.double() - exact).abs()
    # one rounding of a * gelu(gate) from fp32 sums; oneDNN rounds the GELU to bf16 before the product
    assert ours_err.mean() <= 1.05 * their_err.mean() + 1e-5
    assert ours_err.max() <= 1.05 * their_err.max() + 1e-3


def test_the_tile_geglu_keeps_gelu_exact_far_out_and_refuses_bad_arguments(tiles):
    """Gates far below zero (where e^(-z^2) would be denormal) and far above: gelu ~ 0 and gelu = gate."""
    channels, inner = 32, 16
    x = torch.zeros(32, channels).bfloat16()
    x[:, 0] = torch.linspace(-60, 60, 32).bfloat16()
    weight = torch.zeros(2 * inner, channels).bfloat16()
    weight[:, 0] = 1.0                                   # a = gate = x[:, 0] in every channel
    out = tiles.geglu_bf16(x, weight, None).double()
    exact = _geglu_fp64(x, weight, None)
    torch.testing.assert_close(out, exact, rtol=8e-3, atol=1e-6)
    assert out[x[:, 0] < -10].abs().max() < 1e-20 and torch.isfinite(out).all()
    inf = torch.tensor([[float("inf")] + [0.0] * 31]).bfloat16()
    assert tiles.geglu_bf16(inf, weight, None)[0, 0] == float("inf")            # inf * gelu(inf), not NaN
    with pytest.raises(RuntimeError, match="multiple"):
        tiles.geglu_bf16(x[:, :16].contiguous(), weight[:, :16].contiguous(), None)     # 16 channels
    with pytest.raises(RuntimeError, match="contiguous"):
        tiles.geglu_bf16(x.t(), weight, None)
    with pytest.raises(RuntimeError, match="bias"):
        tiles.geglu_bf16(x, weight, torch.zeros(inner).bfloat16())


def test_geglu_takes_the_tiles_for_bf16_inference_on_few_tokens(tiles, monkeypatch):
    from sdlab.models.unet import FeedForward

    recording, calls = _recording(tiles, "geglu_bf16", lambda x, *args: tuple(x.shape))
    torch.manual_seed(0)
    monkeypatch.setattr(cpu_kernels, "_state", {"module": recording})
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    ff = FeedForward(64).eval()                                      # GEGLU 64 -> 2 x 256
    x = torch.randn(2, 100, 64)
    with torch.inference_mode():
        exact = ff.double()(x.double())
        ff = ff.bfloat16()
        ours = ff(x.bfloat16())
        assert calls == [(200, 64)]
        calls.clear()
        ff(torch.randn(2, TILE_PIXELS, 64).bfloat16())                # more tokens than TILE_PIXELS, C < GEGLU_DEEP
        assert calls == []
        deep = FeedForward(cpu_linear.GEGLU_DEEP).eval().bfloat16()
        deep(torch.randn(2, TILE_PIXELS, cpu_linear.GEGLU_DEEP).bfloat16())  # as many tokens, C = GEGLU_DEEP
        assert calls == [(2 * TILE_PIXELS, cpu_linear.GEGLU_DEEP)]
        calls.clear()
        ff(x.bfloat16().transpose(0, 1).contiguous().transpose(0, 1))  # not contiguous
        ff.float()(x)                                                 # fp32
        huge = torch.empty((2**31 // 64, 64), dtype=torch.bfloat16, device="meta")   # shape only
        assert not cpu_linear._geglu_on_tiles(huge, ff.net[0].proj.bfloat16())      # 32-bit offsets
        ff.float()
        narrow = cpu_linear.geglu(x[..., :32].bfloat16().contiguous(), torch.nn.Linear(32, 2 * 16).bfloat16())  # no block for thread 2
        assert narrow.shape == (2, 100, 16)
    ff.bfloat16()
    ff(x.bfloat16().requires_grad_(True)).float().sum().backward()   # a gradient is wanted
    assert calls == []
    monkeypatch.setattr(cpu_kernels, "_state", {"module": None})     # as where it cannot be built
    with torch.inference_mode():
        theirs = ff(x.bfloat16())
    ours_err, theirs_err = (ours.double() - exact).abs(), (theirs.double() - exact).abs()
    assert ours_err.max() <= 1.25 * theirs_err.max() and ours_err.mean() <= 1.05 * theirs_err.mean()


@pytest.mark.parametrize(("rows", "c_in", "c_out", "bias", "residual"), [
    (512, 1280, 1280, True, True),     # SD1.5's 16 x 16 level with guidance: an attention output + residual
    (154, 768, 640, False, False),     # keys over two 77-token prompts: rows past a 32-row block
    (128, 5120, 1280, True, True),     # the feed-forward's output at 8 x 8: passes over K
    (840, 96, 64, True, False),        # products of 512 and 328 rows
    (7, 32, 64, True, True),           # one block, mostly padding
])
def test_the_tile_linear_is_as_close_to_fp64_as_onednns_fused_product(tiles, rows, c_in, c_out, bias, residual):
    g = torch.Generator().manual_seed(rows + c_in)
    x = torch.randn(rows, c_in, generator=g).bfloat16()
    weight = (torch.randn(c_out, c_in, generator=g) / c_in**0.5).bfloat16()
    b = (torch.randn(c_out, generator=g) * 0.5).bfloat16() if bias else None
    other = (torch.randn(rows, c_out, generator=g) * 2).bfloat16() if residual else None
    exact = F.linear(x.double(), weight.double(), None if b is None else b.double())
    exact = exact if other is None else exact + other.double()
    ours = tiles.linear_bf16(x, weight, b, other)
    theirs = F.linear(x, weight, b) if other is None else torch.ops.mkldnn._linear_pointwise.binary(x, other, weight, b, "add")
    assert ours.shape == (rows, c_out) and ours.dtype == torch.bfloat16
    ours_err, their_err = (ours.double() - exact).abs(), (theirs.double() - exact).abs()
    # one rounding of fp32 sums + bias + residual, as oneDNN's product with its add post-op
    assert ours_err.mean() <= 1.05 * their_err.mean() + 1e-5
    assert ours_err.max() <= 1.05 * their_err.max() + 1e-3
    if other is not None:   # the residual is really added (not dropped, not added twice)
        assert (ours.double() - exact).abs().mean() < 0.1 * other.double().abs().mean()


def test_the_tile_linear_refuses_bad_arguments(tiles):
    x, weight = torch.randn(16, 64).bfloat16(), torch.randn(64, 64).bfloat16()
    with pytest.raises(RuntimeError, match="multiples of 32"):
        tiles.linear_bf16(x, weight[:48].contiguous(), None, None)
    with pytest.raises(RuntimeError, match="contiguous"):
        tiles.linear_bf16(x.t(), weight, None, None)
    with pytest.raises(RuntimeError, match="other"):
        tiles.linear_bf16(x, weight, None, torch.zeros(16, 32).bfloat16())
    with pytest.raises(RuntimeError, match="bias"):
        tiles.linear_bf16(x, weight, torch.zeros(64), None)


def test_attention_and_projections_take_the_tiles_on_few_tokens(tiles, monkeypatch):
    from sdlab.models.unet import SpatialTransformer

    recording, calls = _recording(tiles, "linear_bf16", lambda x, w, b, other: (tuple(x.shape), other is not None))
    torch.manual_seed(0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    stage = SpatialTransformer(64, heads=2, depth=1, context_dim=96, linear_proj=False, upcast=False, groups=32).eval()
    x = torch.randn(2, 64, 6, 5).contiguous(memory_format=torch.channels_last)
    context = torch.randn(2, 7, 96)
    with torch.inference_mode():
        exact = stage.double()(x.double(), context.double())
        stage = stage.bfloat16().to(memory_format=torch.channels_last)
        monkeypatch.setattr(cpu_kernels, "_state", {"module": recording})
        ours = stage(x.bfloat16(), context.bfloat16())
        assert sorted(calls) == sorted([((60, 64), False)] * 5           # proj_in, two q, the self-attention's k, v
                                       + [((60, 64), True)] * 3            # both outputs and proj_out + residual
                                       + [((60, 256), True)]               # the feed-forward's output + residual
                                       + [((14, 96), False)] * 2)          # k, v over the prompt
        calls.clear()
        monkeypatch.setattr(cpu_linear, "PRODUCT_DEEPEST", 128)          # the feed-forward's output is too deep
        stage(x.bfloat16(), context.bfloat16())
        assert ((60, 256), True) not in calls and len(calls) == 10
        calls.clear()
        tokens = torch.randn(2, 60, 64).bfloat16()
        weight, bias = stage.proj_out.weight.flatten(1), stage.proj_out.bias
        strided_bias = torch.zeros(128).bfloat16()[::2]
        for args in ((tokens, weight, strided_bias), (tokens.float(), weight.float(), None),     # fall back, no raise
                     (tokens, weight, bias, tokens[:, :, :32].contiguous())):                      # wrong residual
            assert not cpu_linear._product_on_tiles(*args, *(() if len(args) == 4 else (None,)))
        cpu_linear.product(tokens, weight, strided_bias)
        cpu_linear.product(tokens.float(), weight.float(), None)
        stage.float()(x, context)                                        # fp32
        monkeypatch.setattr(cpu_kernels, "_state", {"module": None})     # as where it cannot be built
        theirs = stage.bfloat16()(x.bfloat16(), context.bfloat16())
    assert calls == []
    ours_err, theirs_err = (ours.double() - exact).abs(), (theirs.double() - exact).abs()
    assert ours_err.max() <= 1.25 * theirs_err.max() and ours_err.mean() <= 1.05 * theirs_err.mean()
