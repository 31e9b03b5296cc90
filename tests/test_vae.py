"""AutoencoderKL: parity with diffusers' AutoencoderKL on the same random weights, key tables, loading, dtypes.

The reference is built from ``vae_config_to_diffusers(cfg)``, every parameter is drawn with ``normal_`` (no
zero-initialised layer hides a path), and the same tensors are moved into sdlab through
``vae_state_dict_from_diffusers``.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

from sdlab.checkpoints.diffusers_vae import (
    vae_config_from_diffusers,
    vae_config_to_diffusers,
    vae_key_map,
    vae_scaling_factor_from_diffusers,
    vae_state_dict_from_diffusers,
    vae_state_dict_to_diffusers,
)
from sdlab.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig, normalize_vae_attention_shapes

TOL = 1e-4
SMALL = VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1)
DEEP = VAEConfig(base_channels=32, channel_mult=(1, 2, 2, 4), num_res_blocks=2)
SD_VAE = VAEConfig()
ATTENTION_SUFFIXES = tuple(f"mid.attn_1.{n}.weight" for n in ("q", "k", "v", "proj_out"))


def diffusers_vae(cfg: VAEConfig, **kwargs) -> DiffusersAutoencoderKL:
    config = {k: v for k, v in vae_config_to_diffusers(cfg, **kwargs).items() if not k.startswith("_")}
    return DiffusersAutoencoderKL(**config)


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter from normal_: weights with std 1/sqrt(fan_in), norm scales around 1, biases std 0.1."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        if param.ndim >= 2:
            param.normal_(0.0, param[0].numel() ** -0.5, generator=gen)
        elif "norm" in name and name.endswith("weight"):
            param.normal_(1.0, 0.1, generator=gen)
        else:
            param.normal_(0.0, 0.1, generator=gen)


def reference_pair(cfg: VAEConfig, seed: int = 0) -> tuple[DiffusersAutoencoderKL, AutoencoderKL]:
    reference = diffusers_vae(cfg).eval()
    randomize(reference, seed)
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(vae_state_dict_from_diffusers(reference.state_dict(), cfg))
    return reference, ours


def images(batch: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def assert_parity(cfg: VAEConfig, size: int, batch: int = 2) -> None:
    reference, ours = reference_pair(cfg)
    img = images(batch, size)
    with torch.no_grad():
        ref_dist = reference.encode(img).latent_dist
        our_dist = ours.encode(img)
        ref_sample = ref_dist.sample(generator=torch.Generator().manual_seed(7))
        our_sample = our_dist.sample(generator=torch.Generator().manual_seed(7))
        seeds = [11, 12]
        ref_listed = ref_dist.sample(generator=[torch.Generator().manual_seed(s) for s in seeds[:batch]])
        our_listed = our_dist.sample(generator=[torch.Generator().manual_seed(s) for s in seeds[:batch]])
        ref_img = reference.decode(ref_sample).sample
        our_img = ours.decode(ref_sample)

    f = cfg.downsample_factor
    assert our_dist.mean.shape == (batch, cfg.latent_channels, size // f, size // f)
    assert our_img.shape == img.shape
    errors = {
        "mean": max_err(our_dist.mean, ref_dist.mean),
        "logvar": max_err(our_dist.logvar, ref_dist.logvar),
        "std": max_err(our_dist.std, ref_dist.std),
        "sample": max_err(our_sample, ref_sample),
        "sample_listed": max_err(our_listed, ref_listed),
        "kl": max_err(our_dist.kl(), ref_dist.kl()) / ref_dist.kl().abs().max().item(),  # relative: a sum
        "decode": max_err(our_img, ref_img),
    }
    assert all(e < TOL for e in errors.values()), errors
    # the comparison means something: outputs are far from trivial
    assert ref_img.std() > 0.1 and ref_dist.mean.std() > 0.1


@pytest.mark.parametrize(("cfg", "size"), [(SMALL, 32), (DEEP, 64)], ids=["2-levels-1-block", "4-levels-2-blocks"])
def test_parity_with_diffusers(cfg: VAEConfig, size: int) -> None:
    assert_parity(cfg, size)


def test_any_picture_size_encodes_as_diffusers() -> None:
    """Sides that are not multiples of the factor (A1111's "latent" resize mode encodes a picture at its own
    size): each downsampling rounds down, floor(side / f) latent pixels, the same moments as diffusers'."""
    reference, ours = reference_pair(DEEP)
    img = torch.rand(1, 3, 31, 49, generator=torch.Generator().manual_seed(4)) * 2 - 1     # f = 8
    with torch.no_grad():
        expected, moments = reference.encode(img).latent_dist.parameters, ours.moments(img)
    assert moments.shape == (1, 2 * DEEP.latent_channels, 3, 6)
    assert max_err(moments, expected) < TOL


@pytest.mark.slow
def test_full_size_parity_with_diffusers() -> None:
    assert_parity(SD_VAE, 128, batch=1)


def test_gradients_match_diffusers() -> None:
    """In-place ops must not break autograd: same loss, same parameter gradients as the reference."""
    reference, ours = reference_pair(SMALL)
    img = images(1, 32)
    noise = torch.Generator().manual_seed(3)
    ref_recon = reference(img, sample_posterior=True, generator=noise).sample
    noise = torch.Generator().manual_seed(3)
    our_recon, _ = ours(img, sample_posterior=True, generator=noise)
    ref_recon.square().mean().backward()
    our_recon.square().mean().backward()
    ref_grads = vae_state_dict_from_diffusers({n: p.grad for n, p in reference.named_parameters()}, SMALL)
    for name, param in ours.named_parameters():
        expected = ref_grads[name]
        assert max_err(param.grad, expected) <= 1e-4 * expected.abs().max().item() + 1e-7, name


def test_key_map_is_complete_both_ways_for_full_size_config() -> None:
    with torch.device("meta"):
        reference = diffusers_vae(SD_VAE)
        ours = AutoencoderKL(SD_VAE)
    ref_state, our_state = reference.state_dict(), ours.state_dict()
    key_map = vae_key_map(SD_VAE)
    assert set(key_map) == set(our_state)
    assert set(key_map.values()) == set(ref_state)
    assert len(set(key_map.values())) == len(key_map) == 248  # one to one; 248 = first_stage_model.* in SD files
    for ldm_key, diffusers_key in key_map.items():
        ours_shape, ref_shape = our_state[ldm_key].shape, ref_state[diffusers_key].shape
        if ldm_key.endswith(ATTENTION_SUFFIXES):
            assert ours_shape == (*ref_shape, 1, 1), ldm_key
        else:
            assert ours_shape == ref_shape, ldm_key
    assert sum(p.numel() for p in ours.parameters()) == 83_653_863  # the SD VAE
    # the decoder's level order is reversed between the two layouts
    assert key_map["decoder.up.3.block.0.conv1.weight"] == "decoder.up_blocks.0.resnets.0.conv1.weight"
    assert key_map["decoder.up.1.upsample.conv.weight"] == "decoder.up_blocks.2.upsamplers.0.conv.weight"
    assert "decoder.up.0.upsample.conv.weight" not in key_map


def test_state_dict_converters_round_trip_and_accept_legacy_names() -> None:
    ours = AutoencoderKL(SMALL)
    randomize(ours, 5)
    state = ours.state_dict()
    as_diffusers = vae_state_dict_to_diffusers(state, SMALL)
    reference = diffusers_vae(SMALL)
    reference.load_state_dict(as_diffusers)  # strict: names and shapes fit diffusers
    back = vae_state_dict_from_diffusers(as_diffusers, SMALL)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)

    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in as_diffusers.items():
        for new, old in legacy_names.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        legacy[key] = value
    assert any(".query." in k for k in legacy)
    from_legacy = vae_state_dict_from_diffusers(legacy, SMALL)
    assert all(torch.equal(from_legacy[k], state[k]) for k in state)

    with pytest.raises(KeyError, match="missing"):
        vae_state_dict_from_diffusers({k: v for k, v in as_diffusers.items() if "conv_in" not in k}, SMALL)
    with pytest.raises(KeyError, match="unexpected"):
        vae_state_dict_to_diffusers(state, DEEP)


def test_linear_shaped_attention_weights_load() -> None:
    """Some converted files store q/k/v/proj_out as Linear (C, C); both loading routes accept them."""
    source = AutoencoderKL(SMALL)
    randomize(source, 9)
    conv_state = {f"first_stage_model.{k}": v for k, v in source.state_dict().items()}
    linear_state = {k: v.flatten(1) if k.endswith(ATTENTION_SUFFIXES) else v for k, v in conv_state.items()}
    assert sum(v.ndim == 2 for v in linear_state.values()) == 8

    normalized = normalize_vae_attention_shapes(linear_state)
    assert linear_state["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 2  # input left alone
    assert all(normalized[k].shape == conv_state[k].shape for k in conv_state)

    prefix = len("first_stage_model.")
    via_function, via_load = AutoencoderKL(SMALL), AutoencoderKL(SMALL)
    via_function.load_state_dict({k[prefix:]: v for k, v in normalized.items()})
    via_load.load_state_dict({k[prefix:]: v for k, v in linear_state.items()})  # AttnBlock reshapes on load
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = source.decode(z)
        assert torch.equal(via_function.decode(z), expected)
        assert torch.equal(via_load.decode(z), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_smoke(dtype: torch.dtype) -> None:
    _, ours = reference_pair(SMALL)
    img = images(1, 32)
    with torch.no_grad():
        full = ours.decode(ours.encode(img).mean)
        ours.to(dtype)
        dist = ours.encode(img)  # fp32 input is cast to the model dtype
        recon = ours.decode(dist.sample(torch.Generator().manual_seed(0)))
    assert dist.mean.dtype == recon.dtype == dtype
    assert recon.shape == img.shape and torch.isfinite(recon).all()
    assert max_err(ours.decode(dist.mean), full) < 0.1 * full.abs().max().item()


def test_sampling_follows_diffusers_seeding_rules() -> None:
    """A list of generators seeds each image on its own: image i's noise does not depend on the batch."""
    moments = torch.randn(3, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    batch = DiagonalGaussian(moments).sample([torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    alone = DiagonalGaussian(moments[1:2]).sample([torch.Generator().manual_seed(2)])
    assert torch.equal(batch[1:2], alone)
    single = DiagonalGaussian(moments).sample(torch.Generator().manual_seed(4))
    dist = DiagonalGaussian(moments)
    expected = dist.mean + dist.std * torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(single, expected, atol=1e-6)
    assert torch.equal(dist.mode(), moments[:, :4])
    with pytest.raises(ValueError, match="generators"):
        dist.sample([torch.Generator(), torch.Generator()])


def test_kl_between_posteriors_matches_diffusers() -> None:
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    gen = torch.Generator().manual_seed(0)
    first, second = torch.randn(2, 8, 3, 3, generator=gen), torch.randn(2, 8, 3, 3, generator=gen)
    ours = DiagonalGaussian(first).kl(DiagonalGaussian(second))
    reference = DiagonalGaussianDistribution(first).kl(DiagonalGaussianDistribution(second))
    assert ours.shape == (2,)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_logvar_is_clamped() -> None:
    moments = torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 2, 2, 2), -100.0), torch.full((1, 2, 2, 2), 100.0)], 1)
    logvar = DiagonalGaussian(moments).logvar
    assert logvar[:, :2].eq(-30.0).all() and logvar[:, 2:].eq(20.0).all()


def test_config_round_trip_and_scaling_factor() -> None:
    for cfg in (SMALL, DEEP, SD_VAE):
        assert vae_config_from_diffusers(vae_config_to_diffusers(cfg)) == cfg
    sdxl_config = vae_config_to_diffusers(SD_VAE, scaling_factor=0.13025, sample_size=1024)
    assert vae_scaling_factor_from_diffusers(sdxl_config) == 0.13025
    assert vae_scaling_factor_from_diffusers({"block_out_channels": [128]}) == 0.18215
    # the SD 1.5 vae/config.json as diffusers writes it
    sd15 = {
        "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
        "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    }
    assert vae_config_from_diffusers(sd15) == SD_VAE
    with pytest.raises(ValueError, match="use_quant_conv"):
        vae_config_from_diffusers({**sd15, "use_quant_conv": False})
    with pytest.raises(ValueError, match="multiples"):
        vae_config_from_diffusers({**sd15, "block_out_channels": [128, 192, 512, 512]})


def test_reconstruction_rejects_image_size_not_multiple_of_factor() -> None:
    with pytest.raises(ValueError, match="multiple"):
        AutoencoderKL(SMALL)(torch.zeros(1, 3, 31, 32))


@pytest.mark.skipif(not torch.cpu._is_avx512_bf16_supported(), reason="the CPU has no AVX512-BF16")
def test_bf16_channels_last_decode_adds_the_shortcut_inside_the_convolution() -> None:
    """bf16 inference, channels-last (as loaded VAEs run): each ResnetBlock's second norm writes over conv1's
    output and the shortcut is added inside conv2, rounding once; the decode is at least as close to fp64 as
    with the add after the convolution."""
    from sdlab.models import cpu_norm, patch_conv
    from sdlab.models.vae import ResnetBlock

    _, ours = reference_pair(DEEP)
    # 40 x 40 latents: every level above `patch_conv.TILE_PIXELS` pixels, so oneDNN runs each convolution
    z = torch.randn(1, DEEP.latent_channels, 40, 40, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        exact = ours.double().decode(z.double())
        ours.to(torch.bfloat16).to(memory_format=torch.channels_last)
        fused = []
        real = patch_conv.Conv2d._adds_inside
        patch_conv.Conv2d._adds_inside = lambda self, x, other: fused.append(real(self, x, other)) or fused[-1]
        try:
            ours_out = ours.decode(z)
        finally:
            patch_conv.Conv2d._adds_inside = real

        def add_after(block, x, consume=False):
            h = block.conv1(cpu_norm.group_norm(block.norm1, x, silu=True))
            h = block.conv2(cpu_norm.group_norm(block.norm2, h, silu=True))
            return h.add_(x if block.nin_shortcut is None else block.nin_shortcut(x))

        forward = ResnetBlock.forward
        ResnetBlock.forward = add_after
        try:
            before = ours.decode(z)
        finally:
            ResnetBlock.forward = forward
    blocks = sum(isinstance(m, ResnetBlock) for m in ours.decoder.modules())
    assert fused == [True] * blocks
    ours_err, before_err = (ours_out.double() - exact).abs(), (before.double() - exact).abs()
    assert ours_err.mean() <= 1.05 * before_err.mean() and ours_err.max() <= 1.25 * before_err.max()


@pytest.mark.skipif(not torch.cpu._is_avx512_bf16_supported(), reason="the CPU has no AVX512-BF16")
def test_blocks_write_over_their_own_activations_only_where_nothing_else_holds_them() -> None:
    """In bf16 inference the encoder's and decoder's blocks write results over activations they own (fewer
    fresh allocations); with a hook anywhere in them, or with gradients, nothing is written over, and the
    numbers are the same either way."""
    _, ours = reference_pair(DEEP)
    ours.to(torch.bfloat16).to(memory_format=torch.channels_last)
    img = images(1, 320).bfloat16().contiguous(memory_format=torch.channels_last)
    z = torch.randn(1, DEEP.latent_channels, 40, 40, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        consumed = ours.decode(z), ours.encode(img).mean
        held = []   # each ResnetBlock's input and output as the hook saw them, with copies to compare later

        def keep(module, args, out):
            held.append((args[0], args[0].clone(), out, out.clone()))

        handles = [m.register_forward_hook(keep) for m in ours.modules() if type(m).__name__ == "ResnetBlock"]
        watched = ours.decode(z), ours.encode(img).mean
        for handle in handles:
            handle.remove()
    assert torch.equal(consumed[0], watched[0]) and torch.equal(consumed[1], watched[1])
    assert held and all(torch.equal(a, a0) and torch.equal(o, o0) for a, a0, o, o0 in held)
    with torch.no_grad():   # grad mode without requires_grad: inference, written over again
        assert torch.equal(ours.decode(z), consumed[0])


@pytest.mark.skipif(not torch.cpu._is_avx512_bf16_supported(), reason="the CPU has no AVX512-BF16")
def test_training_some_layers_gets_the_gradients_of_the_plain_forward() -> None:
    """Gradients on: nothing is written over, even where the activations need no gradient themselves (only the
    1x1 shortcuts train here, and each saves its input for its weight's gradient)."""
    _, ours = reference_pair(DEEP)
    ours = ours.to(torch.bfloat16).to(memory_format=torch.channels_last).requires_grad_(False)
    shortcuts = [p for n, p in ours.named_parameters() if "nin_shortcut.weight" in n]
    for p in shortcuts:
        p.requires_grad_(True)
    img = images(1, 160).bfloat16()

    def gradients(hooked: bool) -> list[torch.Tensor]:
        handles = [m.register_forward_hook(lambda *args: None) for m in (ours.encoder.conv_out, ours.decoder.conv_out)
                   ] if hooked else []
        for p in shortcuts:
            p.grad = None
        out, posterior = ours(img, sample_posterior=False)
        (out.float().pow(2).mean() + posterior.mean.float().pow(2).mean()).backward()
        for handle in handles:
            handle.remove()
        return [p.grad.clone() for p in shortcuts]

    for a, b in zip(gradients(False), gradients(True)):   # a hook anywhere turns writing over off
        assert torch.equal(a, b)


def test_compiling_the_vae_traces_one_graph() -> None:
    """The VAE's convolutions decide their path without leaving a compiled graph (bf16, channels-last)."""
    import torch._dynamo

    vae = AutoencoderKL(SMALL).eval().to(torch.bfloat16).to(memory_format=torch.channels_last)
    with torch.no_grad():
        explained = torch._dynamo.explain(vae.decode)(torch.randn(1, SMALL.latent_channels, 8, 8).bfloat16())
    assert explained.graph_break_count == 0
