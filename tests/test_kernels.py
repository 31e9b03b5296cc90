"""The CPU hot path uses the fast kernels: every attention goes to a fused `scaled_dot_product_attention`
backend (never a materialised softmax of q k^T), and the U-Net's convolutions see channels-last weights and
activations, also after loading a file. Measured choices (fused GroupNorm+SiLU does not pay, channels-last
does) are in the README's benchmark section."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from bundle_fixtures import tiny_bundle, write_original
from torch import nn
from torch.profiler import ProfilerActivity, profile

import sdlab.api
from sdlab.models.unet import UNet

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

FUSED_ATTENTION = "aten::_scaled_dot_product_"  # flash / efficient / cudnn backends; the math one is not fused
UNFUSED = ("aten::softmax", "aten::_softmax", "aten::_scaled_dot_product_attention_math", "aten::baddbmm")


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle("sd1", seed=7)


def aten_ops(fn) -> set[str]:
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {event.key for event in prof.key_averages()}


def assert_fused_attention_only(ops: set[str]) -> None:
    assert any(op.startswith(FUSED_ATTENTION) and "math" not in op for op in ops), sorted(ops)
    assert not ops.intersection(UNFUSED), sorted(ops.intersection(UNFUSED))


def unet_inputs(unet: UNet, side: int = 8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.cfg.in_channels, side, side, generator=g)
    context = torch.randn(2, 77, unet.cfg.context_dim, generator=g)
    return x, torch.tensor([500.0, 500.0]), context


def test_unet_attention_is_fused(bundle) -> None:
    unet = bundle.unet
    assert_fused_attention_only(aten_ops(lambda: unet(*unet_inputs(unet))))


def test_vae_attention_is_fused(bundle) -> None:
    vae = bundle.vae
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    assert_fused_attention_only(aten_ops(lambda: vae.decode(vae.encode(image).mode())))


def test_text_encoder_attention_is_fused(bundle) -> None:
    encoder = bundle.text_encoders[0]
    ids = torch.randint(0, encoder.config.vocab_size, (2, 77))
    assert_fused_attention_only(aten_ops(lambda: encoder.model(ids)))


def conv_layouts(model: nn.Module, run) -> list[tuple[str, bool, bool]]:
    """(conv name, input channels-last, weight channels-last) for every conv of `model` that `run()` runs;
    convs whose input has at most 4 channels (an image or a latent coming in) are left out."""
    seen = []

    def record(name):
        def hook(module: nn.Conv2d, args):
            if module.in_channels > 4:
                seen.append((name, args[0].is_contiguous(memory_format=torch.channels_last),
                             module.weight.is_contiguous(memory_format=torch.channels_last)))
        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.inference_mode():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_unet_convolutions_run_channels_last(bundle) -> None:
    seen = conv_layouts(bundle.unet, lambda: bundle.unet(*unet_inputs(bundle.unet)))
    assert len(seen) > 10
    assert all(inp and weight for _, inp, weight in seen), [s for s in seen if not all(s[1:])]


def test_loaded_unet_is_channels_last(bundle, tmp_path: Path) -> None:
    path = write_original(bundle, tmp_path / "tiny.safetensors", junk=False)
    unet = sdlab.api.load(path, dtype=torch.float32).bundle.unet
    weights = [m.weight for m in unet.modules() if isinstance(m, nn.Conv2d)]
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    seen = conv_layouts(unet, lambda: unet(*unet_inputs(unet)))
    assert all(inp and weight for _, inp, weight in seen), [s for s in seen if not all(s[1:])]


def test_nchw_unet_matches_channels_last(bundle) -> None:
    """The `memory_format` switch (kept for measurements) changes only the layout, not the numbers beyond
    float reordering."""
    channels_last = bundle.unet
    nchw = UNet(channels_last.cfg).eval()
    nchw.load_state_dict(channels_last.state_dict())
    nchw.memory_format = torch.contiguous_format
    nchw.to(memory_format=torch.contiguous_format)
    inputs = unet_inputs(channels_last)
    with torch.inference_mode():
        torch.testing.assert_close(nchw(*inputs), channels_last(*inputs), atol=1e-5, rtol=1e-5)


def test_loaded_vae_runs_channels_last_with_the_numbers_of_nchw(bundle, tmp_path: Path) -> None:
    """Loading puts the VAE channels-last too (its decode is 10-25 % faster so); the attention block hands
    the layout on, and the pictures match an NCHW copy up to float reordering."""
    path = write_original(bundle, tmp_path / "tiny.safetensors", junk=False)
    vae = sdlab.api.load(path, dtype=torch.float32).bundle.vae
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    seen = conv_layouts(vae, lambda: vae.decode(vae.encode(image).mode()))
    assert len(seen) > 10 and any("mid" in name for name, _, _ in seen)
    assert all(inp and weight for _, inp, weight in seen), [s for s in seen if not all(s[1:])]
    nchw = copy.deepcopy(vae).to(memory_format=torch.contiguous_format)
    with torch.inference_mode():
        z = vae.encode(image).mode()
        torch.testing.assert_close(z, nchw.encode(image).mode(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(vae.decode(z), nchw.decode(z), atol=1e-5, rtol=1e-5)


def test_cpu_geglu_splits_the_projection_with_the_numbers_of_one_product() -> None:
    """On the CPU the GEGLU input runs as two products over the weight's row halves (contiguous halves, no
    double-width output); the result is the single product's, and a hooked projection (a LoRA in training)
    still runs through its module."""
    from sdlab.models.unet import GEGLU

    torch.manual_seed(0)
    geglu = GEGLU(32, 64)
    x = torch.randn(2, 16, 32)
    a, gate = geglu.proj(x).chunk(2, dim=-1)
    torch.testing.assert_close(geglu(x), a * torch.nn.functional.gelu(gate), rtol=1e-5, atol=1e-6)
    seen = []
    geglu.proj.register_forward_hook(lambda module, inputs, output: seen.append(output.shape) or output * 2)
    a2, gate2 = (geglu.proj.weight @ x[..., None]).squeeze(-1).add(geglu.proj.bias).mul(2).chunk(2, dim=-1)
    torch.testing.assert_close(geglu(x), a2 * torch.nn.functional.gelu(gate2), rtol=1e-5, atol=1e-5)
    assert seen == [(2, 16, 128)]
