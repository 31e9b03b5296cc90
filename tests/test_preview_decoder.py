"""The tiny preview decoder: its network, the file sdlab-tiny ships, previews going through it, its training."""

from __future__ import annotations

from dataclasses import replace
from importlib import resources
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import sdlab
from sdlab.families.latent_format import LatentFormat
from sdlab.families.sdlab_tiny import SDLAB_TINY
from sdlab.models.preview_decoder import (
    PreviewDecoder,
    PreviewDecoderConfig,
    TinyDecoder,
    read_preview_decoder,
    save_preview_decoder,
)
from sdlab.models.vae import AutoencoderKL
from sdlab.server.previews import LatentPreviewer
from sdlab.tiny import preview_decoder as training
from sdlab.tiny.datasets.build import build_dataset, sample_spec
from sdlab.tiny.datasets.scene import render_scene

pytestmark = pytest.mark.usefixtures("one_thread")

# Mean abs error (of [0, 1]) against the full VAE decoder, measured on 200 held-out rendered scenes and 288
# x0 predictions (recipes/sdlab-tiny/README.md, "Preview decoder"): tiny decoder 0.032 clean / 0.040 x0,
# linear map 0.130 / 0.086 (4.0x / 2.1x the tiny decoder's); on the 8 scenes below the tiny decoder makes 0.049.
TINY_CLEAN_MAE_BOUND = 0.07
LINEAR_OVER_TINY_CLEAN = 2.0
LINEAR_OVER_TINY_X0 = 1.4


@pytest.fixture(scope="module")
def pipe():
    return sdlab.load()


def _scenes(count: int, seed: int) -> torch.Tensor:
    """Pictures of rendered training-style scenes (not in the decoder's training set): (N, 3, 64, 64) in [-1, 1]."""
    pictures = []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        image = render_scene(sample_spec(rng, "mixed", 0.6), rng, 64)
        pictures.append(torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1))
    return torch.stack(pictures).permute(0, 3, 1, 2)


def _full(bundle, z_model: torch.Tensor) -> torch.Tensor:
    return ((bundle.vae.decode(z_model / bundle.scaling_factor).float() + 1) / 2).clamp(0, 1)   # (N, 3, H, W)


def _linear(bundle, z_model: torch.Tensor) -> torch.Tensor:
    rgb = bundle.family.latent_format.preview_rgb(z_model, scaling_factor=bundle.scaling_factor)  # (N, 3, h, w)
    return F.interpolate(rgb, scale_factor=bundle.vae_config.downsample_factor, mode="bilinear").clamp(0, 1)


# ------------------------------------------------------------------------------------------- network


@pytest.mark.parametrize("widths, blocks, upscale", [((32, 16, 16), (2, 0, 0), 4), ((8, 8, 8, 4), (1, 1, 0, 0), 8)])
def test_network_shapes_and_dtypes(widths, blocks, upscale):
    network = TinyDecoder(PreviewDecoderConfig(latent_channels=4, widths=widths, blocks=blocks))
    assert network.config.upscale == upscale
    z = torch.randn(2, 4, 5, 7)
    assert network(z).shape == (2, 3, 5 * upscale, 7 * upscale) and network(z).dtype == torch.float32
    decoder = PreviewDecoder(network, latent_scale=0.5, probe_latents=None, probe_tolerance=None)
    rgb = decoder.decode(torch.randn(1, 4, 3, 3, dtype=torch.float16) * 100)          # any dtype in, float32 out
    assert rgb.dtype == torch.float32 and rgb.shape == (1, 3, 3 * upscale, 3 * upscale)
    assert 0 <= rgb.min() and rgb.max() <= 1
    assert torch.equal(decoder.preview(z, scaling_factor=2.0), decoder.decode(z / 2.0))
    with pytest.raises(ValueError):
        PreviewDecoderConfig(widths=(8, 8), blocks=(1,))


def test_file_round_trip_in_fp16(tmp_path):
    network = TinyDecoder(PreviewDecoderConfig(widths=(8, 8, 8), blocks=(1, 0, 0))).eval()
    probe = torch.randn(2, 4, 4, 4)
    save_preview_decoder(tmp_path / "d.safetensors", PreviewDecoder(network, 0.25, probe, 0.05), {"note": "x"})
    loaded = read_preview_decoder(tmp_path / "d.safetensors")
    assert loaded.network.config == network.config and loaded.latent_scale == 0.25 and loaded.probe_tolerance == 0.05
    assert torch.allclose(loaded.probe_latents, probe.half().float())
    z = torch.randn(1, 4, 4, 4)
    assert torch.allclose(loaded.network(z), network.half().float()(z), atol=1e-5)
    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an sdlab preview decoder"):
        read_preview_decoder(tmp_path / "other.safetensors")


# ------------------------------------------------------------------------------------- shipped file


def test_the_shipped_decoder_is_small_cached_and_agrees_with_the_shipped_vae(pipe):
    decoder = SDLAB_TINY.latent_format.preview_decoder()
    assert decoder is SDLAB_TINY.latent_format.preview_decoder()                 # loaded once
    path = SDLAB_TINY.latent_format.preview_decoder_file
    assert resources.files("sdlab.models").joinpath("data", path).stat().st_size < 1 << 20
    assert sum(p.numel() for p in decoder.network.parameters()) < 100_000
    vae = pipe.bundle.vae
    assert decoder.agrees_with(vae.decode)
    other = AutoencoderKL(pipe.bundle.vae_config).eval()                          # another VAE of the same shape
    assert not decoder.agrees_with(other.decode)


@torch.no_grad()
def test_the_shipped_decoder_is_closer_to_the_vae_than_the_linear_map(pipe):
    bundle = pipe.bundle
    decoder = bundle.family.latent_format.preview_decoder()
    z = bundle.vae.encode(_scenes(8, seed=4242)).mean * bundle.scaling_factor                # (8, 4, 16, 16)
    full = _full(bundle, z)
    tiny = (decoder.preview(z, bundle.scaling_factor) - full).abs().mean().item()
    linear = (_linear(bundle, z) - full).abs().mean().item()
    assert tiny < TINY_CLEAN_MAE_BOUND, (tiny, linear)
    assert linear > LINEAR_OVER_TINY_CLEAN * tiny, (tiny, linear)
    # the x0 predictions a preview shows while the model draws
    found = []
    for seed, prompt in enumerate(("a red apple on a blue background", "two yellow stars on black")):
        pipe.txt2img(prompt, seed=seed, steps=6, progress=lambda info: found.append(info.denoised))
    z = torch.cat(found)                                                                     # (12, 4, 16, 16)
    full = _full(bundle, z)
    tiny = (decoder.preview(z, bundle.scaling_factor) - full).abs().mean().item()
    linear = (_linear(bundle, z) - full).abs().mean().item()
    assert linear > LINEAR_OVER_TINY_X0 * tiny, (tiny, linear)


# ------------------------------------------------------------------------------------------ previews


def test_server_previews_use_the_decoder_for_sdlab_tiny(pipe):
    bundle = pipe.bundle
    previewer = LatentPreviewer.for_bundle(bundle)
    z = torch.randn(4, 16, 16)
    rgb = previewer.rgb(z)
    assert rgb.shape == (64, 64, 3) and rgb.dtype == torch.uint8                      # full size, not 16 x 16
    expected = bundle.family.latent_format.preview_decoder().preview(z[None], bundle.scaling_factor)[0]
    assert torch.equal(rgb, (expected.permute(1, 2, 0) * 255).round().to(torch.uint8))


def test_previews_fall_back_to_the_linear_map(pipe):
    bundle = pipe.bundle
    z = torch.randn(4, 16, 16)
    linear = bundle.family.latent_format.preview_rgb(z[None], scaling_factor=bundle.scaling_factor)[0]
    expected = (linear.permute(1, 2, 0) * 255).round().to(torch.uint8)                 # (16, 16, 3)
    # a model file of the family with another VAE: the decoder's probe disagrees
    other_vae = replace(bundle, vae=AutoencoderKL(bundle.vae_config).eval())
    assert torch.equal(LatentPreviewer.for_bundle(other_vae).rgb(z), expected)
    # a family without a decoder file
    plain = replace(bundle.family.latent_format, preview_decoder_file=None)
    assert plain.preview_decoder() is None
    family = SimpleNamespace(latent_format=plain)
    assert torch.equal(LatentPreviewer.for_bundle(replace(bundle, family=family)).rgb(z), expected)
    # a decoder file that cannot be read
    broken = replace(bundle.family.latent_format, preview_decoder_file="/nonexistent/preview.safetensors")
    assert torch.equal(LatentPreviewer.for_bundle(replace(bundle, family=SimpleNamespace(latent_format=broken))).rgb(z),
                       expected)


def test_a_decoder_preview_costs_a_small_fraction_of_a_vae_decode(pipe):
    """Counted in floating-point operations (torch's FlopCounterMode), not timed: tests never assert on wall
    time (recipes/sdlab-tiny/README.md gives the measured milliseconds)."""
    from torch.utils.flop_counter import FlopCounterMode

    bundle = pipe.bundle
    decoder = bundle.family.latent_format.preview_decoder()
    z = torch.randn(1, 4, 16, 16)
    counts = []
    for run in (lambda: decoder.preview(z, bundle.scaling_factor), lambda: bundle.vae.decode(z)):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            run()
        counts.append(counter.get_total_flops())
    tiny, full = counts
    assert 0 < tiny < 0.2 * full, (tiny, full)


def test_latent_format_without_decoder_keeps_working():
    fmt = LatentFormat(channels=4, scaling_factor=1.0)
    assert fmt.preview_decoder() is None


# ------------------------------------------------------------------------------------------ training


def test_training_loss_falls_on_a_small_set(tmp_path):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(64, 4, 4, 4, generator=generator)                           # (N, C, h, w)
    mix = torch.randn(3, 4, generator=generator)
    targets = torch.sigmoid(torch.einsum("nchw,rc->nrhw", F.interpolate(latents, scale_factor=4), mix))
    save_file({"latents": latents, "targets": targets.half().contiguous(), "kinds": torch.zeros(64, dtype=torch.int64)},
              str(tmp_path / "set.safetensors"), metadata={"latent_scale": "1.0"})
    config = PreviewDecoderConfig(widths=(8, 8, 8), blocks=(1, 0, 0))
    losses = training.train(tmp_path / "set.safetensors", tmp_path / "run.safetensors", steps=60, batch_size=8,
                            lr=3e-3, config=config, log_every=20)
    assert len(losses) == 3 and losses[-1] < 0.7 * losses[0], losses
    trained = read_preview_decoder(tmp_path / "run.safetensors")
    assert trained.network.config == config and trained.latent_scale == 1.0
    again = training.train(tmp_path / "set.safetensors", tmp_path / "run2.safetensors", steps=60, batch_size=8,
                           lr=3e-3, config=config, log_every=20)
    assert again == losses                                                            # deterministic from the seed


def test_prepare_train_export_on_a_few_rendered_images(tmp_path, pipe):
    build_dataset(tmp_path / "images", count=3, seed=5, emoji_fraction=0.6)
    counts = training.prepare(tmp_path / "images", tmp_path / "set.safetensors", x0_prompts=1, x0_steps=2,
                              x0_batch=1, noisy=2)
    assert counts == {"clean": 3, "x0": 2, "noisy": 2}
    latents, targets, kinds, scale = training.read_set(tmp_path / "set.safetensors")
    bundle = pipe.bundle
    assert scale == bundle.scaling_factor and latents.shape == (7, 4, 16, 16) and targets.shape == (7, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(targets, _full(bundle, latents * scale), atol=2e-3)    # the VAE's own pictures
    config = PreviewDecoderConfig(widths=(8, 8, 8), blocks=(0, 0, 0))
    training.train(tmp_path / "set.safetensors", tmp_path / "run.safetensors", steps=3, batch_size=2, config=config)
    error = training.export(tmp_path / "run.safetensors", tmp_path / "set.safetensors", tmp_path / "out.safetensors")
    shipped = read_preview_decoder(tmp_path / "out.safetensors")
    assert shipped.probe_latents.shape == (2, 4, 16, 16) and shipped.probe_tolerance == pytest.approx(1.5 * error + 0.01)
    assert shipped.agrees_with(bundle.vae.decode)
