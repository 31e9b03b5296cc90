"""U-Net parity with diffusers' UNet2DConditionModel through the generated key map, map completeness for the
full-size families (on the meta device), config translation both ways, and low-precision smoke tests.

Reduced test models keep every code path of their family: SD1 (8 heads, 1x1-conv projections, attention at
all but the last level, 9-channel inpaint variant), SD2 (64-wide heads, Linear projections, upcast attention,
four levels), SDXL base / refiner (no attention at the first level, deeper transformers, the vector
conditioning with 256-wide size embeddings).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import get_timestep_embedding

from sdlab.checkpoints.diffusers_unet import (
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_key_map,
    unet_state_dict_from_diffusers,
    unet_state_dict_to_diffusers,
)
from sdlab.models.layers import attention, sdxl_vector, timestep_embedding
from sdlab.models.unet import UNet, UNetConfig

POOLED = 32  # reduced pooled-text width of the SDXL-like test models

SMALL = {
    "sd1": UNetConfig(
        model_channels=32, channel_mult=(1, 2, 2), transformer_depth=(1, 1, 0), num_heads=8, context_dim=48
    ),
    "sd1_inpaint": UNetConfig(
        in_channels=9, model_channels=32, channel_mult=(1, 2), transformer_depth=(1, 0), num_heads=8, context_dim=48
    ),
    "sd2": UNetConfig(
        model_channels=64, channel_mult=(1, 2, 2, 2), transformer_depth=(1, 1, 1, 0), num_heads=None, head_dim=64,
        context_dim=80, use_linear_proj=True, upcast_attention=True,
    ),
    "sdxl": UNetConfig(
        model_channels=64, channel_mult=(1, 2, 2), transformer_depth=(0, 2, 3), transformer_depth_middle=3,
        num_heads=None, head_dim=64, context_dim=96, use_linear_proj=True, adm_in_channels=POOLED + 6 * 256,
    ),
    "sdxl_refiner": UNetConfig(
        model_channels=64, channel_mult=(1, 2, 2, 1), transformer_depth=(0, 2, 2, 0), transformer_depth_middle=2,
        num_heads=None, head_dim=64, context_dim=96, use_linear_proj=True, adm_in_channels=POOLED + 5 * 256,
    ),
    # CrossAttn blocks with 0 transformer layers (norm, proj_in, proj_out, no blocks), as SDXL's "mid" and
    # "small" ControlNets have them: at a level, and in the middle block
    "sdxl_empty_level": UNetConfig(
        model_channels=64, channel_mult=(1, 2, 2), transformer_depth=(0, 0, 2), empty_transformer_levels=(1,),
        transformer_depth_middle=2, num_heads=None, head_dim=64, context_dim=96, use_linear_proj=True,
        adm_in_channels=POOLED + 6 * 256,
    ),
    "sd1_empty_middle": UNetConfig(
        model_channels=32, channel_mult=(1, 2, 2), transformer_depth=(0, 1, 0), empty_transformer_levels=(0,),
        transformer_depth_middle=0, num_heads=8, context_dim=48,
    ),
}

# Full-size families, with the diffusers config.json each one ships (the keys that matter).
SD15 = UNetConfig()
SD15_INPAINT = UNetConfig(in_channels=9)
SD21 = UNetConfig(num_heads=None, head_dim=64, context_dim=1024, use_linear_proj=True, upcast_attention=True)
SDXL = UNetConfig(
    channel_mult=(1, 2, 4), transformer_depth=(0, 2, 10), transformer_depth_middle=10, num_heads=None, head_dim=64,
    context_dim=2048, use_linear_proj=True, adm_in_channels=2816,
)
SDXL_REFINER = UNetConfig(
    model_channels=384, transformer_depth=(0, 4, 4, 0), transformer_depth_middle=4, num_heads=None, head_dim=64,
    context_dim=1280, use_linear_proj=True, adm_in_channels=2560,
)
_SD1_JSON = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
_SDXL_JSON = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}
FULL = {
    "sd15": (SD15, _SD1_JSON),
    "sd15_inpaint": (SD15_INPAINT, _SD1_JSON | {"in_channels": 9}),
    "sd21": (
        SD21,
        _SD1_JSON | {"attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "sample_size": 96,
                     "use_linear_projection": True, "upcast_attention": True, "dual_cross_attention": False,
                     "num_class_embeds": None, "only_cross_attention": False, "class_embed_type": None},
    ),
    "sdxl": (SDXL, _SDXL_JSON),
    "sdxl_refiner": (
        SDXL_REFINER,
        _SDXL_JSON | {
            "attention_head_dim": [6, 12, 24, 24], "block_out_channels": [384, 768, 1536, 1536],
            "cross_attention_dim": 1280, "projection_class_embeddings_input_dim": 2560,
            "transformer_layers_per_block": 4,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        },
    ),
    # the layouts of diffusers/controlnet-canny-sdxl-1.0-mid and -small (as U-Nets): transformer levels of 0
    # layers keep norm / proj_in / proj_out; "small" has no cross-attention at all
    "sdxl_mid_layout": (
        replace(SDXL, transformer_depth=(0, 0, 1), empty_transformer_levels=(1,), transformer_depth_middle=1),
        _SDXL_JSON | {"transformer_layers_per_block": [0, 0, 1]},
    ),
    "sdxl_small_layout": (
        replace(SDXL, transformer_depth=(0, 0, 0), transformer_depth_middle=0),
        _SDXL_JSON | {"transformer_layers_per_block": [0, 0, 0], "down_block_types": ["DownBlock2D"] * 3,
                      "up_block_types": ["UpBlock2D"] * 3},
    ),
}


def _diffusers_unet(cfg: UNetConfig, seed: int, std: float = 0.1) -> UNet2DConditionModel:
    """diffusers reference with EVERY parameter (norms and biases included) drawn from N(0, std)."""
    model = UNet2DConditionModel.from_config(unet_config_to_diffusers(cfg)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def _sdlab_from(reference: UNet2DConditionModel, cfg: UNetConfig) -> UNet:
    """sdlab U-Net holding the reference's tensors under the mapped names (strict load, no copy)."""
    with torch.device("meta"):
        model = UNet(cfg)
    model.load_state_dict(unet_state_dict_from_diffusers(reference.state_dict(), cfg), assign=True)
    return model.eval()


def _inputs(cfg: UNetConfig, height: int, width: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, height, width, generator=gen)
    t = torch.tensor([3.0, 731.5])
    context = torch.randn(2, 7, cfg.context_dim, generator=gen)
    added, y = {}, None
    if cfg.adm_in_channels is not None:
        pooled = torch.randn(2, POOLED, generator=gen)
        n_sizes = (cfg.adm_in_channels - POOLED) // 256
        size_conds = torch.tensor(
            [[1024.0, 768.0, 0.0, 16.0, 1024.0, 1024.0], [512.0, 512.0, 32.0, 0.0, 768.0, 1344.0]]
        )
        size_conds = size_conds[:, :n_sizes]
        if n_sizes == 5:  # refiner: the last one is the aesthetic score
            size_conds[:, 4] = torch.tensor([6.0, 2.5])
        added = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": size_conds}}
        y = sdxl_vector(pooled, size_conds)
    return x, t, context, y, added


@pytest.mark.parametrize("name", sorted(SMALL))
def test_matches_diffusers_fp32(name):
    cfg = SMALL[name]
    reference = _diffusers_unet(cfg, seed=0)
    model = _sdlab_from(reference, cfg)
    x, t, context, y, added = _inputs(cfg, 16, 16)
    with torch.no_grad():
        expected = reference(x, t, context, **added).sample
        actual = model(x, t, context, y)
    assert expected.abs().max() > 0.1  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


def test_matches_diffusers_on_latents_not_divisible_by_the_level_count():
    """18x14 latents: the stride-2 convs round up, so upsampling must go to the skip's size (as diffusers).
    Also the ordinary loading path: a built model, `load_state_dict` copying into its channels-last convs."""
    cfg = SMALL["sd1"]
    reference = _diffusers_unet(cfg, seed=2)
    model = UNet(cfg).eval()
    model.load_state_dict(unet_state_dict_from_diffusers(reference.state_dict(), cfg))
    assert model.input_blocks[1][0].in_layers[2].weight.is_contiguous(memory_format=torch.channels_last)
    x, t, context, y, added = _inputs(cfg, 18, 14)
    with torch.no_grad():
        expected = reference(x, t, context).sample
        actual = model(x, t, context)
    assert actual.shape == (2, 4, 18, 14)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


def test_gradients_match_diffusers():
    """Training path: the in-place residual adds must leave autograd intact."""
    cfg = SMALL["sd1_inpaint"]
    reference = _diffusers_unet(cfg, seed=6)
    model = _sdlab_from(_diffusers_unet(cfg, seed=6), cfg)  # separate tensors, so the two grads do not mix
    x, t, context, _, _ = _inputs(cfg, 8, 8)
    grads = []
    for run in (lambda x, c: reference(x, t, c).sample, lambda x, c: model(x, t, c)):
        xg, cg = x.clone().requires_grad_(), context.clone().requires_grad_()
        run(xg, cg).square().mean().backward()
        grads.append((xg.grad, cg.grad))
    assert grads[0][0].abs().max() > 0
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[1][1], grads[0][1], atol=1e-5, rtol=1e-4)
    weight = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    torch.testing.assert_close(
        model.get_parameter(weight).grad,
        reference.get_parameter(unet_key_map(cfg)[weight]).grad,
        atol=1e-5,
        rtol=1e-4,
    )


def test_scalar_timestep_broadcasts_over_the_batch():
    cfg = SMALL["sd1_inpaint"]
    model = _sdlab_from(_diffusers_unet(cfg, seed=3), cfg)
    x, _, context, _, _ = _inputs(cfg, 8, 8)
    with torch.no_grad():
        batched = model(x, torch.tensor([250.0, 250.0]), context)
        torch.testing.assert_close(model(x, torch.tensor(250.0), context), batched)


def test_sdxl_model_requires_the_vector_conditioning():
    cfg = SMALL["sdxl"]
    x, t, context, _, _ = _inputs(cfg, 8, 8)
    with pytest.raises(ValueError, match="vector conditioning"):
        UNet(cfg)(x, t, context)


@pytest.mark.parametrize(
    ("name", "dtype"), [("sd1", torch.bfloat16), ("sdxl", torch.bfloat16), ("sd2", torch.float16)]
)
def test_low_precision_runs_close_to_fp32(name, dtype):
    """Whole-network smoke test: finite, right dtype, max |diff| <= 2% of max |fp32 output| (measured: 0.5% bf16)."""
    cfg = SMALL[name]
    model = _sdlab_from(_diffusers_unet(cfg, seed=4, std=0.05), cfg)
    x, t, context, y, _ = _inputs(cfg, 8, 8)
    with torch.no_grad():
        expected = model(x, t, context, y)
        actual = model.to(dtype)(x, t, context, y)
    assert actual.dtype == dtype
    assert torch.isfinite(actual).all()
    assert (actual.float() - expected).abs().max() <= 0.02 * expected.abs().max()


def test_attention_matches_the_softmax_formula_and_upcast_runs_in_fp32():
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 33, 128, generator=gen) * 3 for _ in range(3))
    heads = lambda x: x.view(2, 33, 2, 64).transpose(1, 2)  # noqa: E731  (B, H, N, d)
    weights = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / 8, dim=-1)  # 1 / sqrt(64)
    manual = (weights @ heads(v)).transpose(1, 2).reshape(2, 33, 128)
    torch.testing.assert_close(attention(q, k, v, heads=2), manual, atol=1e-5, rtol=1e-5)
    q16, k16, v16 = q.half(), k.half(), v.half()
    upcast = attention(q16, k16, v16, heads=2, upcast=True)
    assert upcast.dtype == torch.float16
    assert torch.equal(upcast, attention(q16.float(), k16.float(), v16.float(), heads=2).half())


@pytest.mark.parametrize("dim", [320, 256, 7])
def test_timestep_embedding_matches_ldm_convention(dim):
    t = torch.tensor([0.0, 1.0, 999.0, 0.5, 1024.0])
    expected = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_embedding(t, dim), expected, atol=0, rtol=0)
    assert torch.equal(timestep_embedding(torch.zeros(1), 4), torch.tensor([[1.0, 1.0, 0.0, 0.0]]))


def test_sdxl_vector_layout():
    pooled = torch.randn(3, 1280)
    size_conds = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]).repeat(3, 1)
    y = sdxl_vector(pooled, size_conds)
    assert y.shape == (3, 2816)
    assert torch.equal(y[:, :1280], pooled)
    assert torch.equal(y[:, 1280 + 256 : 1280 + 512], timestep_embedding(size_conds[:, 1], 256))


# --- key map and config translation -------------------------------------------------------------------------


def _meta_state_dicts(cfg: UNetConfig, diffusers_json: dict):
    with torch.device("meta"):
        ours = UNet(cfg).state_dict()
        theirs = UNet2DConditionModel.from_config(diffusers_json).state_dict()
    return ours, theirs


@pytest.mark.parametrize("name", sorted(FULL))
def test_full_size_key_map_is_complete_both_ways(name):
    cfg, shipped_json = FULL[name]
    assert unet_config_from_diffusers(shipped_json) == cfg
    ours, theirs = _meta_state_dicts(cfg, shipped_json)
    key_map = unet_key_map(cfg)
    assert set(key_map) == set(ours)
    assert set(key_map.values()) == set(theirs)
    assert len(set(key_map.values())) == len(key_map)  # one-to-one
    mismatched = [k for k, d in key_map.items() if ours[k].shape != theirs[d].shape]
    assert not mismatched
    # The state-dict helpers accept exactly these key sets.
    assert set(unet_state_dict_to_diffusers(ours, cfg)) == set(theirs)
    assert set(unet_state_dict_from_diffusers(theirs, cfg)) == set(ours)


def test_full_size_parameter_counts():
    counts = {name: sum(p.numel() for p in _meta_state_dicts(cfg, js)[0].values()) for name, (cfg, js) in FULL.items()}
    assert counts["sd15"] == 859_520_964
    assert counts["sd15_inpaint"] == 859_520_964 + 5 * 320 * 9  # five extra input channels of conv_in
    assert counts["sdxl"] == 2_567_463_684


@pytest.mark.parametrize("name", sorted(FULL))
def test_config_to_diffusers_builds_the_shipped_architecture(name):
    cfg, shipped_json = FULL[name]
    ours_json = unet_config_to_diffusers(cfg)
    assert unet_config_from_diffusers(ours_json) == cfg
    with torch.device("meta"):
        shipped = UNet2DConditionModel.from_config(shipped_json).state_dict()
        rebuilt = UNet2DConditionModel.from_config(ours_json).state_dict()
    assert {k: v.shape for k, v in shipped.items()} == {k: v.shape for k, v in rebuilt.items()}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_config_round_trips(name):
    assert unet_config_from_diffusers(unet_config_to_diffusers(SMALL[name])) == SMALL[name]


def test_state_dict_conversion_is_strict():
    cfg = SMALL["sd1_inpaint"]
    sd = UNet(cfg).state_dict()
    converted = unet_state_dict_to_diffusers(sd, cfg)
    assert unet_state_dict_from_diffusers(converted, cfg).keys() == sd.keys()
    assert all(converted[d] is sd[k] for k, d in unet_key_map(cfg).items())  # renamed, never copied
    with pytest.raises(KeyError, match="1 missing"):
        unet_state_dict_to_diffusers({k: v for k, v in sd.items() if k != "out.2.bias"}, cfg)
    with pytest.raises(KeyError, match="1 unexpected"):
        unet_state_dict_from_diffusers(converted | {"conv_in.extra": torch.zeros(1)}, cfg)


@pytest.mark.parametrize(
    "change",
    [{"time_embedding_type": "fourier"}, {"class_embed_type": "timestep"}, {"addition_embed_type": "text"},
     {"down_block_types": ["CrossAttnDownBlock2D"] * 4}, {"resnet_time_scale_shift": "scale_shift"}],
)
def test_unsupported_diffusers_options_are_refused(change):
    with pytest.raises(ValueError):
        unet_config_from_diffusers(_SD1_JSON | change)


def test_lcm_guidance_embedding_is_supported():
    """LCM-distilled U-Nets (time_cond_proj_dim) load; tests/test_lcm_models.py checks them against diffusers."""
    assert unet_config_from_diffusers(_SD1_JSON | {"time_cond_proj_dim": 256}).time_cond_proj_dim == 256


def test_middle_depth_that_diffusers_cannot_express_is_refused():
    cfg = UNetConfig(transformer_depth=(1, 1, 1, 2), transformer_depth_middle=1)
    with pytest.raises(ValueError, match="middle depth"):
        unet_key_map(cfg)


# --- full size (opt in) -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_size_sd15_matches_diffusers():
    """SD 1.5 shapes, 64x64 latent, diffusers' default init with norms and biases perturbed. The two models share
    the weight tensors (assign=True), so this needs ~3.5 GB. Tolerance: max |diff| <= 1e-4 * max |reference|."""
    torch.manual_seed(0)
    reference = UNet2DConditionModel.from_config(unet_config_to_diffusers(SD15)).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.05)
    with torch.device("meta"):
        model = UNet(SD15)
    model.load_state_dict(unet_state_dict_from_diffusers(reference.state_dict(), SD15), assign=True)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 64, 64, generator=gen)
    t = torch.tensor([999.0, 20.0])
    context = torch.randn(2, 77, 768, generator=gen)
    with torch.inference_mode():
        expected = reference(x, t, context).sample
        actual = model.eval()(x, t, context)
    assert (actual - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_resblock_adds_a_batch_wide_time_embedding_through_the_convolution_bias(monkeypatch):
    """Inference on the CPU with one timestep for the batch: the embedding goes into conv1's bias (no pass
    over the output), the same numbers as adding it; per-row embeddings and training add it as before."""
    from sdlab.models.unet import ResBlock

    torch.manual_seed(11)
    block = ResBlock(8, 16, emb_dim=12, groups=4).eval()
    x = torch.randn(2, 8, 5, 6)
    shared, per_row = torch.randn(1, 12).expand(2, 12), torch.randn(2, 12)
    conv1 = block.in_layers[2]
    biases = []
    real = conv1.forward_with_bias
    monkeypatch.setattr(conv1, "forward_with_bias", lambda h, bias: biases.append(bias) or real(h, bias))
    with torch.no_grad():
        fast = block(x, shared)
        assert len(biases) == 1                            # through the bias
        separate = block(x, per_row)
        assert len(biases) == 2                            # conv1's own bias, then the add
    added = block(x, shared)                               # grad enabled: the add
    torch.testing.assert_close(fast, added, rtol=1e-5, atol=1e-5)
    emb = block.emb_layers[1](per_row)
    h = block.in_layers[2](F.silu(block.in_layers[0](x))) + emb[:, :, None, None]
    expected = block.out_layers[3](F.silu(block.out_layers[0](h))) + block.skip_connection(x)
    torch.testing.assert_close(separate, expected, rtol=1e-5, atol=1e-5)


def test_time_embedding_projections_are_made_once_per_call_through_their_modules():
    """`BlockEmbeddings` projects the embedding for every ResBlock when the call starts; each projection runs
    once, through its module (a hook sees it), and ResBlocks it does not know project their own."""
    from sdlab.models.unet import BlockEmbeddings, ResBlock

    cfg = SMALL[sorted(SMALL)[0]]
    model = _sdlab_from(_diffusers_unet(cfg, seed=0), cfg)
    x, t, context, y, _ = _inputs(cfg, 16, 16)
    blocks = [m for m in model.modules() if isinstance(m, ResBlock)]
    seen = []
    handles = [block.emb_layers[1].register_forward_hook(lambda module, args, out: seen.append(module))
               for block in blocks]
    with torch.no_grad():
        model(x, t, context, y)
    assert sorted(map(id, seen)) == sorted(id(b.emb_layers[1]) for b in blocks)   # each exactly once
    for handle in handles:
        handle.remove()
    silu = torch.randn(2, cfg.time_embed_dim)
    with torch.no_grad():
        shared = BlockEmbeddings(torch.randn(1, cfg.time_embed_dim).expand(2, -1), model)
        assert shared.shared and not BlockEmbeddings(silu, model).shared
        block = blocks[0]
        conv1 = block.in_layers[2]
        biased = []
        real = conv1.forward_with_bias
        conv1.forward_with_bias = lambda h, bias: biased.append(bias) or real(h, bias)
        h = torch.randn(2, block.in_layers[0].num_channels, 8, 8)
        block(h, shared)
        assert len(biased) == 1                                   # one embedding for the batch: in conv1's bias
        hook = block.emb_layers[1].register_forward_hook(lambda module, args, out: out * torch.tensor([[1.0], [2.0]]))
        per_image = BlockEmbeddings(shared.silu, model)           # the hook tells the rows apart
        block(h, per_image)
        assert len(biased) == 2 and biased[-1] is conv1.bias      # conv1's own bias, then the per-row add
        hook.remove()
    stranger = ResBlock(4, 4, cfg.time_embed_dim, 2)
    with torch.no_grad():
        torch.testing.assert_close(BlockEmbeddings(silu, model).of(stranger), stranger.emb_layers[1](silu))


def _guided_inputs(cfg: UNetConfig, height: int, width: int):
    """A guided step's batch: one latent twice, one timestep, two prompts (and, for SDXL, one vector twice)."""
    x, _, context, y, added = _inputs(cfg, height, width)
    if y is not None:
        y = torch.cat([y[:1], y[:1]])
        added = {"added_cond_kwargs": {k: torch.cat([v[:1], v[:1]]) for k, v in added["added_cond_kwargs"].items()}}
    return torch.cat([x[:1], x[:1]]), torch.tensor([417.0, 417.0]), context, y, added


def _batch_sizes_seen(module: torch.nn.Module) -> list[int]:
    """Records the batch size of every call of `module` (through its forward attribute, not a hook)."""
    seen, forward = [], module.forward
    module.forward = lambda x, *args, **kwargs: seen.append(len(x)) or forward(x, *args, **kwargs)
    return seen


@pytest.mark.parametrize("name", sorted(SMALL))
def test_equal_halves_run_once_until_the_text_context(name):
    """A guided step's two halves (one latent, one timestep, two prompts) run the layers before the first
    cross-attention once; the output still matches diffusers', which runs them for both."""
    cfg = SMALL[name]
    reference = _diffusers_unet(cfg, seed=0)
    model = _sdlab_from(reference, cfg)
    x, t, context, y, added = _guided_inputs(cfg, 16, 16)
    seen = _batch_sizes_seen(model.input_blocks[0][0])
    last_seen = _batch_sizes_seen(model.output_blocks[-1][0])
    with torch.no_grad():
        expected = reference(x, t, context, **added).sample
        actual = model(x, t, context, y)
    assert seen == [1] and last_seen == [2]
    assert (expected[0] - expected[1]).abs().max() > 0.01   # the prompts do tell the halves apart
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


def test_equal_halves_run_in_full_where_they_must():
    """Both halves run where they differ (latent or timestep), with gradients, or where a hook watches an
    opening layer (it sees the whole batch); the outputs are the same either way."""
    cfg = SMALL["sd1"]
    model = _sdlab_from(_diffusers_unet(cfg, seed=0), cfg)
    x, t, context, _, _ = _guided_inputs(cfg, 16, 16)
    seen = _batch_sizes_seen(model.input_blocks[0][0])
    with torch.no_grad():
        shared = model(x, t, context)
        model(torch.cat([x[:1], x[:1] + 1e-3]), t, context)
        model(x, torch.tensor([417.0, 418.0]), context)
    model(x, t, context)
    assert seen == [1, 2, 2, 2]
    hooked = []
    handle = model.input_blocks[1][1].transformer_blocks[0].attn1.to_q.register_forward_hook(
        lambda module, args, out: hooked.append(len(out)))
    with torch.no_grad():
        full = model(x, t, context)
    handle.remove()
    assert seen[-1] == 2 and hooked == [2]
    torch.testing.assert_close(shared, full, atol=1e-5, rtol=0)


def test_equal_halves_leave_broadcast_prompts_and_transformer_free_openings_alone():
    """A context of one row for a batch of two still broadcasts (nothing shared: the batch's size comes from
    x); a U-Net without transformers in its input blocks shares nothing (hooks on its middle block would
    otherwise see half a batch); a hook registered for every module turns sharing off too."""
    cfg = SMALL["sd1"]
    model = _sdlab_from(_diffusers_unet(cfg, seed=0), cfg)
    x, t, context, _, _ = _guided_inputs(cfg, 16, 16)
    seen = _batch_sizes_seen(model.input_blocks[0][0])
    with torch.no_grad():
        broadcast = model(x, t, context[:1])
        repeated = model(x, t, torch.cat([context[:1], context[:1]]))
    assert seen == [2, 1] and broadcast.shape == repeated.shape
    torch.testing.assert_close(broadcast, repeated, atol=1e-5, rtol=0)
    global_seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: global_seen.append(len(out)) if module is model.input_blocks[0][0] else None)
    try:
        with torch.no_grad():
            model(x, t, context)
    finally:
        handle.remove()
    assert global_seen == [2]

    plain = UNetConfig(model_channels=32, channel_mult=(1, 2), transformer_depth=(0, 0), num_heads=8, context_dim=48)
    model = _sdlab_from(_diffusers_unet(plain, seed=0), plain)
    seen = _batch_sizes_seen(model.input_blocks[0][0])
    with torch.no_grad():
        model(*_guided_inputs(plain, 16, 16)[:3])
    assert seen == [2]
