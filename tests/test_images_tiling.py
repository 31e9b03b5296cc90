"""Image conversion (bit-exact against diffusers' VaeImageProcessor), masks, outpainting canvases, tiled VAE."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from sdlab.models.vae import AutoencoderKL, VAEConfig
from sdlab.pipeline.images import (
    latent_mask,
    masked_image,
    pad_for_outpaint,
    pil_to_tensor,
    prepare_mask,
    snap_size,
    tensor_to_pil,
)
from sdlab.pipeline.tiling import DEFAULT_TILE_THRESHOLD_PIXELS, decode_tiled, encode_tiled, should_tile


def _rgb(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _mask(width, height):
    """RGB mask: white disc on black, with grey anti-aliased values around it."""
    yy, xx = np.mgrid[:height, :width]
    r = np.hypot(xx - width / 2, yy - height / 3)
    value = np.clip((width / 4 - r) * 40, 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([value, value, value // 2], axis=-1))


# --- PIL <-> tensor ----------------------------------------------------------------------------------

def test_pil_to_tensor_matches_diffusers_preprocess_exactly():
    images = [_rgb(24, 16, 0), _rgb(24, 16, 1)]
    ours = pil_to_tensor(images)
    assert ours.shape == (2, 3, 16, 24) and ours.dtype == torch.float32
    ref = VaeImageProcessor(vae_scale_factor=8).preprocess(images)
    assert torch.equal(ours, ref)


def test_pil_to_tensor_resizes_like_diffusers_and_converts_to_rgb():
    image = _rgb(37, 29)
    ours = pil_to_tensor(image, size=(32, 24))
    ref = VaeImageProcessor(vae_scale_factor=8).preprocess(image, height=24, width=32)
    assert torch.equal(ours, ref)
    rgba = image.convert("RGBA")
    assert torch.equal(pil_to_tensor(rgba), pil_to_tensor(image))
    with pytest.raises(ValueError):
        pil_to_tensor([_rgb(8, 8), _rgb(16, 8)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tensor_to_pil_matches_diffusers_postprocess_exactly(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(2, 3, 16, 24, generator=g) * 2.4 - 1.2)          # some values outside [-1, 1]
    # values whose pixel value is exactly k + 0.5: the rounding rule decides them
    x[0, 0, 0, :6] = torch.tensor([0.5, 1.5, 2.5, 126.5, 127.5, 254.5]) / 255 * 2 - 1
    x = x.to(dtype)
    ours = tensor_to_pil(x)
    ref = VaeImageProcessor(vae_scale_factor=8).postprocess(x, output_type="pil")
    assert len(ours) == 2
    for a, b in zip(ours, ref):
        assert a.mode == b.mode == "RGB"
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_pil_tensor_round_trip_is_exact_and_grayscale_comes_out_as_L():
    image = _rgb(16, 8)
    (back,) = tensor_to_pil(pil_to_tensor(image))
    assert np.array_equal(np.asarray(back), np.asarray(image))
    (gray,) = tensor_to_pil(torch.zeros(1, 1, 8, 8))
    assert gray.mode == "L" and np.asarray(gray).max() == 128             # 127.5 rounds to even 128


def test_snap_size_rounds_down_and_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="sdlab.pipeline.images"):
        assert snap_size(512, 768) == (512, 768)
        assert not caplog.records
        assert snap_size(513, 770) == (512, 768)
        assert "513x770" in caplog.text
    assert snap_size(100, 100, multiple=64) == (64, 64)
    with pytest.raises(ValueError):
        snap_size(7, 512)


# --- masks -------------------------------------------------------------------------------------------

def _diffusers_mask_processor():
    return VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)


def test_prepare_mask_matches_diffusers_inpaint_mask_processing():
    mask_image = _mask(50, 38)                                          # RGB, needs a resize to 48x32
    ours = prepare_mask(mask_image, size=(48, 32))
    ref = _diffusers_mask_processor().preprocess(mask_image, height=32, width=48)
    assert ours.shape == (1, 1, 32, 48)
    assert torch.equal(ours, ref)
    assert set(ours.unique().tolist()) == {0.0, 1.0}


def test_prepare_mask_blur_matches_diffusers_blur_then_preprocess():
    mask_image = _mask(48, 32)
    processor = _diffusers_mask_processor()
    ref = processor.preprocess(processor.blur(mask_image, blur_factor=3), height=32, width=48)
    assert torch.equal(prepare_mask(mask_image, (48, 32), blur_radius=3), ref)


def test_prepare_mask_soft_keeps_grey_levels():
    soft = prepare_mask(_mask(48, 32), (48, 32), blur_radius=2, binarize=False)
    assert soft.min() == 0 and soft.max() <= 1
    assert ((soft > 0.05) & (soft < 0.95)).any()


def test_latent_mask_and_masked_image_match_diffusers_inpaint():
    mask = prepare_mask(_mask(48, 32), (48, 32))                        # (1, 1, 32, 48)
    latent = latent_mask(mask)
    assert latent.shape == (1, 1, 4, 6)
    assert torch.equal(latent, F.interpolate(mask, size=(32 // 8, 48 // 8)))   # prepare_mask_latents
    image = pil_to_tensor(_rgb(48, 32))
    out = masked_image(image, mask)
    assert torch.equal(out, image * (mask < 0.5))
    assert (out[:, :, mask[0, 0] >= 0.5] == 0).all()
    assert torch.equal(out[:, :, mask[0, 0] < 0.5], image[:, :, mask[0, 0] < 0.5])


# --- outpainting -------------------------------------------------------------------------------------

def test_pad_for_outpaint_edge():
    image = _rgb(8, 6)
    padded, mask = pad_for_outpaint(image, left=2, right=3, top=1, bottom=4, fill="edge")
    assert padded.size == (13, 11) and mask.size == (13, 11) and mask.mode == "L"
    p, m, src = np.asarray(padded), np.asarray(mask), np.asarray(image)
    assert np.array_equal(p[1:7, 2:10], src)
    assert np.array_equal(p[0, 2:10], src[0]) and np.array_equal(p[10, 2:10], src[-1])
    assert np.array_equal(p[1:7, 0], src[:, 0]) and np.array_equal(p[1:7, 12], src[:, -1])
    assert (m[1:7, 2:10] == 0).all()
    assert m.sum() == 255 * (13 * 11 - 8 * 6)


def test_pad_for_outpaint_colour_noise_and_overlap():
    image = _rgb(8, 8)
    padded, _ = pad_for_outpaint(image, right=4, fill=(10, 20, 30))
    assert (np.asarray(padded)[:, 8:] == [10, 20, 30]).all()
    padded, _ = pad_for_outpaint(image, right=4, fill="#ff0000")
    assert (np.asarray(padded)[:, 8:] == [255, 0, 0]).all()
    a, _ = pad_for_outpaint(image, top=4, fill="noise", seed=3)
    b, _ = pad_for_outpaint(image, top=4, fill="noise", seed=3)
    c, _ = pad_for_outpaint(image, top=4, fill="noise", seed=4)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and not np.array_equal(np.asarray(a), np.asarray(c))
    assert np.array_equal(np.asarray(a)[4:], np.asarray(image))
    _, mask = pad_for_outpaint(image, left=4, fill="edge", mask_overlap=2)
    m = np.asarray(mask)
    assert (m[:, :6] == 255).all() and (m[:, 6:] == 0).all()           # 4 new columns + 2 into the picture
    with pytest.raises(ValueError):
        pad_for_outpaint(image, left=-1)


# --- tiling ------------------------------------------------------------------------------------------

def test_should_tile_threshold():
    assert DEFAULT_TILE_THRESHOLD_PIXELS == 1024 * 1024
    assert not should_tile(1024, 1024)
    assert should_tile(1024, 1032)
    assert should_tile(64, 64, threshold=64 * 63)


def _pointwise_decoder(weight):
    """1x1 'decoder': per-pixel channel mix, nearest-upsampled x8, then tanh. Sees nothing but its pixel."""
    def decode(z):
        return torch.tanh(F.interpolate(torch.einsum("oc,bchw->bohw", weight, z), scale_factor=8))
    return decode


@pytest.mark.parametrize("shape", [(1, 4, 24, 40), (2, 4, 37, 23), (1, 4, 16, 70)])
def test_decode_tiled_with_a_pointwise_decoder_is_exact(shape):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 4, generator=g)
    z = torch.randn(*shape, generator=g)
    decode = _pointwise_decoder(weight)
    full = decode(z)
    tiled = decode_tiled(decode, z, tile=16, overlap=4)
    assert tiled.shape == full.shape
    torch.testing.assert_close(tiled, full, rtol=0, atol=1e-6)


def test_decode_tiled_with_a_convolutional_decoder_is_close_and_seamless():
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(4, 3, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.2)
        conv.bias.zero_()

    @torch.no_grad()
    def decode(z):
        return conv(F.interpolate(z, scale_factor=8))                    # (B, 3, 8h, 8w)

    # a smooth latent, like real ones: tile borders only see zero padding instead of their neighbours
    z = F.interpolate(torch.randn(1, 4, 6, 8, generator=g), size=(48, 64), mode="bilinear", align_corners=False)
    full = decode(z)
    tiled = decode_tiled(decode, z, tile=16, overlap=4)
    error = (tiled - full).abs()
    # only the one-pixel ring at each tile border differs; the ramp (32 px) fades it
    assert error.max() < 0.05, error.max()
    assert error.mean() < 2e-3, error.mean()
    # no ramp at all (overlap 0) leaves the full seam error: blending must do better than that
    hard = (decode_tiled(decode, z, tile=16, overlap=0) - full).abs()
    assert error.max() < hard.max()


def test_tile_larger_than_input_is_one_call():
    calls = []

    def decode(z):
        calls.append(tuple(z.shape))
        return F.interpolate(z[:, :3], scale_factor=8)

    z = torch.randn(1, 4, 20, 30)
    assert torch.equal(decode_tiled(decode, z, tile=64, overlap=16), decode(z))
    assert calls[0] == (1, 4, 20, 30)


def test_tiles_cover_odd_sizes_with_full_size_tiles():
    seen = []

    def decode(z):
        seen.append(tuple(z.shape[-2:]))
        return F.interpolate(z, scale_factor=8)

    z = torch.randn(1, 4, 37, 23)
    out = decode_tiled(decode, z, tile=16, overlap=4)
    assert out.shape == (1, 4, 296, 184)
    assert set(seen) == {(16, 16)}
    assert len(seen) == 3 * 2                                             # rows start 0, 12, 21; columns 0, 7
    torch.testing.assert_close(out, F.interpolate(z, scale_factor=8), rtol=0, atol=1e-6)


def test_encode_tiled_with_a_pooling_encoder_is_exact_and_checks_multiples():
    def encode(x):
        return F.avg_pool2d(x, 8)                                         # pointwise at latent resolution

    x = torch.randn(2, 3, 200, 136)
    full = encode(x)
    torch.testing.assert_close(encode_tiled(encode, x, tile=64, overlap=16), full, rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        encode_tiled(encode, x, tile=60, overlap=16)
    with pytest.raises(ValueError):
        encode_tiled(encode, torch.randn(1, 3, 100, 64), tile=64, overlap=16)
    with pytest.raises(ValueError):
        decode_tiled(lambda z: z, torch.randn(1, 4, 80, 80), tile=16, overlap=16)


def _small_vae_and_image():
    torch.manual_seed(0)
    cfg = VAEConfig(base_channels=32, channel_mult=(1, 2))                   # factor 2
    vae = AutoencoderKL(cfg).eval()
    g = torch.Generator().manual_seed(1)
    image = F.interpolate(torch.rand(1, 3, 6, 8, generator=g) * 2 - 1, size=(48, 64), mode="bilinear")
    return cfg, vae, image


def test_tiled_vae_blending_is_right_on_the_real_architecture_without_groupnorm():
    # GroupNorm is the one operation whose result depends on the whole input; without it the only
    # differences left come from the receptive field (and the mid-block attention) reaching past a tile.
    _, vae, image = _small_vae_and_image()
    for module in list(vae.modules()):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.GroupNorm):
                setattr(module, name, torch.nn.Identity())
    with torch.no_grad():
        latent = vae.encode(image).mode()
        decoded = vae.decode(latent)
        decoded_tiled = decode_tiled(vae.decode, latent, tile=16, overlap=8, factor=2)
    # measured: max |diff| 4.8e-3 for outputs up to 0.117 (4.1 %). (1.1 % while the SiLU after an Identity
    # norm ran in place on the block's input, so the shortcuts carried silu(x) instead of x.)
    assert (decoded_tiled - decoded).abs().max() < 0.06 * decoded.abs().max()


def test_tiled_vae_is_no_worse_than_diffusers_tiling_for_the_same_weights():
    """Real small VAE with random weights: tiled vs untiled, against diffusers' tiled VAE at the same tiles."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    from sdlab.checkpoints.diffusers_vae import vae_config_to_diffusers, vae_state_dict_to_diffusers

    cfg, vae, image = _small_vae_and_image()
    config = {k: v for k, v in vae_config_to_diffusers(cfg).items() if not k.startswith("_")}
    config["sample_size"] = 32                        # diffusers tiles: 32 px / 16 latent, 25 % overlap
    reference = DiffusersAutoencoderKL(**config).eval()
    reference.load_state_dict(vae_state_dict_to_diffusers(vae.state_dict(), cfg))
    reference.enable_tiling()

    with torch.no_grad():
        latent = vae.encode(image).mode()                                       # (1, 4, 24, 32)
        decoded = vae.decode(latent)                                            # (1, 3, 48, 64)
        ours_latent = encode_tiled(lambda x: vae.encode(x).mode(), image, tile=32, overlap=8, factor=2)
        ours_decoded = decode_tiled(vae.decode, latent, tile=16, overlap=4, factor=2)
        ref_latent = reference.encode(image).latent_dist.mode()
        ref_decoded = reference.decode(latent).sample

    # GroupNorm statistics and attention are per tile, so no tiling is exact for a VAE; with random
    # weights the tiles' statistics differ a lot. Measured (values: latent std 0.26, image std 0.34):
    #   encode  ours max 0.60 mean 0.077    diffusers max 0.70 mean 0.093
    #   decode  ours max 1.86 mean 0.146    diffusers max 2.32 mean 0.199
    for ours, ref, full in ((ours_latent, ref_latent, latent), (ours_decoded, ref_decoded, decoded)):
        assert ours.shape == full.shape
        ours_err, ref_err = (ours - full).abs(), (ref - full).abs()
        assert ref_err.max() > 0                                                # diffusers really tiled
        assert ours_err.mean() <= ref_err.mean(), (ours_err.mean(), ref_err.mean())
        assert ours_err.max() <= ref_err.max(), (ours_err.max(), ref_err.max())


def test_the_requests_tiled_vae_choice_holds_for_the_encode_too(monkeypatch):
    """A tiled encode samples its posterior with each generator as an untiled one does: a picture of one tile
    gives the untiled sample exactly, and the mean without generators; the request reaches the init image's
    encode."""
    from bundle_fixtures import init_picture, tiny_bundle
    from sdlab.diffusion.noise import generators_for
    from sdlab.pipeline import generate as generate_module
    from sdlab.pipeline.generate import encode_image, generate
    from sdlab.pipeline.request import GenerationRequest

    bundle = tiny_bundle("sd1")
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    mean = bundle.vae.encode(pixels).mean * bundle.scaling_factor                      # (1, 4, 16, 16)
    torch.testing.assert_close(encode_image(bundle, pixels, tiled=True), mean, rtol=0, atol=0)
    sampled = encode_image(bundle, pixels, generators_for([1]), tiled=False)
    assert not torch.allclose(sampled, mean)
    assert torch.equal(sampled, encode_image(bundle, pixels, generators_for([1]), tiled=True))
    assert torch.equal(sampled, encode_image(bundle, pixels, generators_for([1])))

    asked = []
    monkeypatch.setattr(generate_module, "encode_image",
                        lambda *args, tiled=None: asked.append(tiled) or encode_image(*args, tiled=tiled))
    for tiled in (True, False):
        generate(bundle, GenerationRequest("x", steps=2, seed=1, width=32, height=32, init_image=init_picture(32),
                                           strength=0.5, tiled_vae=tiled, sampler="Euler"))
    assert asked == [True, False]


def test_a_tiled_encode_samples_the_blended_posterior_with_each_generator(monkeypatch):
    """As diffusers' tiled encode: the encoder's mean and log-variance are blended across the tiles, and each
    image's generator draws its sample from that posterior (one latent-sized draw, as an untiled encode)."""
    from functools import partial

    from bundle_fixtures import tiny_bundle
    from sdlab.diffusion.noise import generators_for
    from sdlab.pipeline import generate as generate_module
    from sdlab.pipeline.generate import encode_image

    bundle = tiny_bundle("sd1")
    vae, factor = bundle.vae, bundle.vae_config.downsample_factor
    tiles = dict(tile=32, overlap=8, factor=factor)                       # 3 x 2 tiles of the tiny VAE (f=2)
    monkeypatch.setattr(generate_module, "encode_tiled", partial(encode_tiled, **tiles))
    pixels = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        mean = encode_tiled(lambda x: vae.encode(x).mean, pixels, **tiles)             # (1, 4, 32, 24)
        std = encode_tiled(lambda x: vae.encode(x).logvar, pixels, **tiles).mul(0.5).exp()
    seeds = [5, 6]
    generators = generators_for(seeds)
    sampled = encode_image(bundle, pixels, generators, tiled=True)                     # (2, 4, 32, 24)
    noise = torch.cat([torch.randn(mean.shape, generator=g) for g in generators_for(seeds)])
    torch.testing.assert_close(sampled, (mean + std * noise) * bundle.scaling_factor)
    after_untiled = generators_for(seeds)
    encode_image(bundle, pixels, after_untiled, tiled=False)
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(generators, after_untiled))
    torch.testing.assert_close(encode_image(bundle, pixels, tiled=True), mean * bundle.scaling_factor)
