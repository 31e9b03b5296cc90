"""sdlab's bf16 CPU attention kernel (`sdlab.models.cpu_attention`) against PyTorch's attention and an fp64
reference, and where `layers.attention` sends each case."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from sdlab.models import cpu_attention, cpu_kernels
from sdlab.models.layers import attention

pytestmark = pytest.mark.skipif(not torch.cpu._is_avx512_bf16_supported(), reason="the CPU has no AVX512-BF16")


@pytest.fixture
def chosen(monkeypatch):
    """The kernel chosen wherever it runs (on an AMX CPU the default is PyTorch's kernel)."""
    monkeypatch.setenv("SDLAB_CPU_ATTENTION", "1")


def _qkv(shape_q, keys, seed, spread=1.0):
    """bf16 (B, N, C) q and (B, M, C) k, v as the U-Net's projections give them; q is a view of rows
    wider than C (as a fused projection's chunk would be)."""
    g = torch.Generator().manual_seed(seed)
    b, h, n, d = shape_q
    q = (torch.randn(b, n, 2 * h * d, generator=g) * spread)[..., : h * d]
    k, v = (torch.randn(b, keys, h * d, generator=g) for _ in range(2))
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


PRODUCTS = [pytest.param(False, id="avx512-bf16"), pytest.param(True, id="amx-tiles")]


def _kernel_attention(kernel, q, k, v, heads, amx):
    """The kernel called directly, on the AMX tiles (where built and granted) or with AVX512-BF16 products."""
    if amx and not kernel.uses_amx():
        pytest.skip("this build or CPU has no AMX tiles")
    return kernel.flash_attention_bf16(q, k, v, heads, cpu_attention.exp2_scale(q.shape[-1] // heads), amx)


def _heads(x, h):
    return x.unflatten(-1, (h, -1)).transpose(1, 2)   # (B, N, C) -> (B, H, N, d)


def _merged(x):
    return x.transpose(1, 2).flatten(2)               # (B, H, N, d) -> (B, N, C)


@pytest.mark.parametrize(("shape_q", "keys", "spread"), [
    ((1, 8, 1024, 40), 1024, 1.0),     # SD1.5's widest level (heads of 40 channels)
    ((1, 4, 1024, 64), 1024, 1.0),     # SD2 / SDXL heads
    ((1, 2, 1024, 80), 1024, 1.0),
    ((1, 2, 1024, 160), 1024, 1.0),
    ((2, 3, 100, 24), 1088, 1.0),      # queries not a whole tile, keys not a power of two, a narrow head
    ((1, 2, 1024, 40), 1024, 6.0),     # peaked softmax: the running maximum moves between blocks
    ((1, 2, 200, 8), 300, 3.0),        # one 16-lane vector per head (acc on one tile)
    ((2, 8, 300, 40), 77, 1.0),        # cross-attention on a prompt: keys end inside the second block
    ((1, 4, 130, 64), 1089, 6.0),      # a last block with one key; padding keys must not lift the maximum
    ((1, 2, 70, 80), 63, 1.0),         # fewer keys than a block
    ((1, 1, 33, 160), 1, 1.0),         # one key: out = v
])
@pytest.mark.parametrize("amx", PRODUCTS)
def test_kernel_is_as_close_to_fp64_as_pytorchs_bf16_attention(kernel, shape_q, keys, spread, amx):
    h = shape_q[1]
    q, k, v = _qkv(shape_q, keys, seed=keys + shape_q[-1], spread=spread)
    exact = _merged(F.scaled_dot_product_attention(*(_heads(x.double(), h) for x in (q, k, v))))
    ours = _kernel_attention(kernel, q, k, v, h, amx)
    theirs = _merged(F.scaled_dot_product_attention(*(_heads(x, h) for x in (q, k, v))))
    assert ours.dtype == torch.bfloat16 and ours.shape == theirs.shape == q.shape
    ours_err, theirs_err = (ours.double() - exact).abs(), (theirs.double() - exact).abs()
    # bf16 output rounding dominates both: the same bound as PyTorch's kernel, with a little room
    assert ours_err.max() <= 1.5 * theirs_err.max() + 1e-4
    assert ours_err.mean() <= 1.1 * theirs_err.mean() + 1e-6


def test_padding_keys_take_no_weight_even_where_every_real_score_is_very_negative(kernel):
    """With q . k far below 0 for every key, a padding key's score (0 before masking) would be the maximum
    and take all the weight."""
    q, k, v = _qkv((1, 2, 64, 40), 70, seed=9)
    q, k = q.abs() * 8, -k.abs() * 8                                  # every q . k strongly negative
    exact = _merged(F.scaled_dot_product_attention(*(_heads(x.double(), 2) for x in (q, k, v))))
    for amx in (False, True):
        if amx and not kernel.uses_amx():
            continue
        ours = _kernel_attention(kernel, q, k, v, 2, amx)
        assert (ours.double() - exact).abs().max() < 0.05


def test_layers_attention_sends_long_bf16_self_attention_to_the_kernel(kernel, chosen, monkeypatch):
    calls = []
    real = cpu_attention.attention
    monkeypatch.setattr(cpu_attention, "attention", lambda q, k, v, heads: calls.append((q.shape, heads)) or real(q, k, v, heads))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1024, 80, generator=g).bfloat16()              # (B, N, C): 2 heads of 40
    context = torch.randn(1, 77, 80, generator=g).bfloat16()
    out = attention(x, x, x, heads=2)
    assert calls == [((1, 1024, 80), 2)] and out.shape == x.shape
    reference = _merged(F.scaled_dot_product_attention(*(_heads(t, 2) for t in (x, x, x))))
    assert (out.float() - reference.float()).abs().max() < 0.02
    calls.clear()
    attention(x, context, context, heads=2)                           # cross-attention: 77 keys (any key count)
    assert calls == [((1, 1024, 80), 2)]
    calls.clear()
    attention(x.expand(2, -1, -1), context, context, heads=2)         # a context of batch 1 broadcast: PyTorch's
    attention(x.float(), x.float(), x.float(), heads=2)               # fp32
    attention(x[:, :512], x[:, :512], x[:, :512], heads=2)            # short: below MIN_TOKENS
    attention(x, x, x, heads=2, upcast=True)                          # upcast runs fp32
    attention(x, x, x, heads=5)                                       # heads of 16 go to the kernel too
    assert calls == [((1, 1024, 80), 5)]
    calls.clear()
    attention(x[..., :78], x[..., :78], x[..., :78], heads=2)         # odd head width (39)
    wanting = x.detach().clone().requires_grad_()
    attention(wanting, wanting, wanting, heads=2).float().sum().backward()   # training: autograd needs PyTorch's
    assert calls == [] and wanting.grad is not None
    monkeypatch.setenv("SDLAB_CPU_ATTENTION", "0")
    attention(x, x, x, heads=2)
    assert calls == []


def test_a_built_kernel_is_imported_without_building(kernel, monkeypatch):
    """Once built, a new process imports the library from sdlab's cache folder directly: no
    `cpp_extension.load` (whose import and ninja check cost ~85 ms a process)."""
    import torch.utils.cpp_extension as cpp_extension

    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: pytest.fail("a built kernel must not be built again"))
    module = cpu_kernels.extension()
    assert module is not None and module.__name__ == cpu_kernels.name()
    assert module.__file__.startswith(str(cpu_kernels.build_folder()))


def test_built_extension_imports_a_build_and_never_builds(kernel, monkeypatch, tmp_path):
    """`built_extension` (what the allocator's scopes ask for): a build there is imported and counts as loaded;
    with none, None, nothing built, and `extension()` may still build later."""
    import torch.utils.cpp_extension as cpp_extension

    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: pytest.fail("built_extension must not build"))
    monkeypatch.setattr(cpu_kernels, "_state", {})
    module = cpu_kernels.built_extension()
    assert module is not None and module.__name__ == cpu_kernels.name() and cpu_kernels.loaded()
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert cpu_kernels.built_extension() is None and cpu_kernels.built_extension() is None
    assert not cpu_kernels.loaded() and "module" not in cpu_kernels._state


def test_a_kernel_that_cannot_be_built_falls_back_to_pytorch(chosen, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setattr(cpu_kernels, "SOURCES", ("missing.cpp",))

    def failing_load(**kwargs):
        raise RuntimeError("Error building extension 'sdlab_cpu_kernels'")

    import torch.utils.cpp_extension as cpp_extension
    monkeypatch.setattr(cpp_extension, "load", failing_load)
    q, k, v = _qkv((1, 2, 1024, 40), 1024, seed=3)
    assert cpu_attention.suits(q, k, v, 2)
    out = attention(q, k, v, heads=2)
    assert torch.equal(out, _merged(F.scaled_dot_product_attention(*(_heads(x, 2) for x in (q, k, v)))))
    assert cpu_kernels._state == {"module": None}                    # tried once, not on every call


@pytest.mark.parametrize(("amx_cpu", "amx_build", "setting", "used"), [
    (False, False, None, True),                        # by default: wherever it beats PyTorch's kernel,
    (True, True, None, True),                          # which on an AMX CPU takes a build that uses the tiles
    (True, False, None, False),
    (True, False, "1", True), (False, False, "0", False), (True, True, "0", False),
])
@pytest.mark.parametrize("keys", [1024, 77])
def test_the_kernel_is_chosen_where_it_wins_unless_the_setting_says_otherwise(kernel, monkeypatch, amx_cpu, amx_build,
                                                                              setting, used, keys):
    build = types.SimpleNamespace(uses_amx=lambda: amx_build, flash_attention_bf16=kernel.flash_attention_bf16)
    monkeypatch.setattr(cpu_kernels, "_state", {"module": build})
    monkeypatch.setattr(cpu_attention, "_cpu_has_amx", lambda: amx_cpu)
    if setting is None:
        monkeypatch.delenv("SDLAB_CPU_ATTENTION", raising=False)
    else:
        monkeypatch.setenv("SDLAB_CPU_ATTENTION", setting)
    q, k, v = _qkv((1, 2, 1024, 40), keys, seed=4)
    chosen = cpu_attention.suits(q, k, v, 2) and cpu_attention.attention(q, k, v, 2) is not None   # as layers.attention asks
    # pair dot products were measured to win on long self-attention only: short key counts go to PyTorch there
    assert chosen is (used and (keys >= cpu_attention.MIN_TOKENS or amx_cpu or setting == "1"))


@pytest.mark.parametrize("amx", PRODUCTS)
def test_every_head_width_python_sends_is_compiled_into_the_kernel(kernel, chosen, amx):
    """`HEAD_WIDTHS` restates the C++ switch: each width it admits runs (and matches PyTorch), and the next
    even width above it is refused by both."""
    g = torch.Generator().manual_seed(5)
    for d in sorted(cpu_attention.HEAD_WIDTHS):
        q, k, v = (torch.randn(1, 1024, d, generator=g).bfloat16() for _ in range(3))
        assert cpu_attention.suits(q, k, v, 1)
        ours = _kernel_attention(kernel, q, k, v, 1, amx)
        theirs = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        assert (ours.float() - theirs.float()).abs().max() < 0.02, d
    too_wide = torch.randn(1, 1024, max(cpu_attention.HEAD_WIDTHS) + 2).bfloat16()
    assert not cpu_attention.suits(too_wide, too_wide, too_wide, 1)
    with pytest.raises(RuntimeError, match="unsupported head width"):
        kernel.flash_attention_bf16(too_wide, too_wide, too_wide, 1, 1.0, amx)
