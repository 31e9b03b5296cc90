"""ControlNet parity with diffusers on random reduced-width weights: the network read from every layout
(diffusers folder, single diffusers-named file, original `control_model.*` safetensors, original .pth), the
U-Net taking residuals (diffusers' down/mid additional residuals), and the loader's refusals."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from controlnet_fixtures import ENCODERS, POOLED, diffusers_controlnet, write_layout
from sdlab.checkpoints.controlnet import load_controlnet, legacy_hash
from sdlab.checkpoints.diffusers_unet import unet_config_to_diffusers, unet_state_dict_from_diffusers
from sdlab.checkpoints.errors import CheckpointError
from sdlab.models.controlnet import ControlNet, ControlNetConfig
from sdlab.models.layers import sdxl_vector
from sdlab.models.unet import UNet


def _inputs(name: str, batch: int = 2, latent: int = 8, factor: int = 8, seed: int = 1):
    cfg = ENCODERS[name]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, latent, latent, generator=gen)
    t = torch.tensor([3.0, 731.5])[:batch]
    context = torch.randn(batch, 7, cfg.context_dim, generator=gen)
    hint = torch.rand(batch, 3, latent * factor, latent * factor, generator=gen)
    added, y = {}, None
    if cfg.adm_in_channels is not None:
        pooled = torch.randn(batch, POOLED, generator=gen)
        sizes = torch.tensor([[1024.0, 768.0, 0.0, 16.0, 1024.0, 1024.0], [512.0, 512.0, 32.0, 0.0, 768.0, 1344.0]])
        added = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": sizes[:batch]}}
        y = sdxl_vector(pooled, sizes[:batch])
    return x, t, context, hint, y, added


@pytest.mark.parametrize("layout", ["folder", "diffusers-file", "original", "original-pth"])
@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_residuals_match_diffusers(name, layout, tmp_path):
    reference = diffusers_controlnet(ENCODERS[name], seed=0)
    path = write_layout(reference, layout, tmp_path)
    loaded = load_controlnet(path)
    assert loaded.layout == ("diffusers" if layout in ("folder", "diffusers-file") else "original")
    assert loaded.config.unet.context_dim == ENCODERS[name].context_dim
    assert loaded.config.unet.adm_in_channels == ENCODERS[name].adm_in_channels
    inputs = _inputs(name)
    down, mid = _reference_residuals(reference, *inputs)
    residuals, middle = _residuals(loaded.model, *inputs)
    assert len(residuals) == len(down) == len(loaded.model.input_blocks)
    assert mid.abs().max() > 0.1
    for ours, theirs in zip([*residuals, middle], [*down, mid]):   # fp32: within 1e-5 of the output's scale
        assert (ours - theirs).abs().max() <= 1e-5 * max(1.0, float(theirs.abs().max()))
    if layout != "original":
        return
    # fp64 (once per family): the same tensors in the same places, so the two agree to rounding
    down, mid = _reference_residuals(reference.double(), *(None if v is None else _double(v) for v in inputs))
    residuals, middle = _residuals(loaded.model.double(), *(None if v is None else _double(v) for v in inputs))
    for ours, theirs in zip([*residuals, middle], [*down, mid]):
        torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=0)


def _double(value):
    if isinstance(value, dict):
        return {k: _double(v) for k, v in value.items()}
    return value.double()


@torch.no_grad()
def _reference_residuals(reference, x, t, context, hint, y, added):
    return reference(x, t, context, hint, conditioning_scale=1.0, return_dict=False, **added)


@torch.no_grad()
def _residuals(model, x, t, context, hint, y, added):
    return model(x, t, context, hint, y)


# SDXL's "mid" and "small" ControlNets: transformer levels of 0 layers, which diffusers builds with their norm,
# proj_in and proj_out (and "small" has no cross-attention at all, so no tensor shows its text width)
_NO_LAYERS = {
    "mid": (["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], [0, 0, 1]),
    "small": (["DownBlock2D"] * 3, [0, 0, 0]),
    "empty": (["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], [0, 0, 0]),
}


@pytest.mark.parametrize("layout", ["folder", "diffusers-file", "original"])
@pytest.mark.parametrize("name", sorted(_NO_LAYERS))
def test_controlnets_with_transformers_of_no_layers_match_diffusers(name, layout, tmp_path):
    down, layers = _NO_LAYERS[name]
    reference = diffusers_controlnet(ENCODERS["sdxl"], seed=0, down_block_types=down,
                                     transformer_layers_per_block=layers)
    assert len(reference.mid_block.attentions[0].transformer_blocks) == layers[-1]
    path = write_layout(reference, layout, tmp_path)
    loaded = load_controlnet(path, like=ENCODERS["sdxl"])
    assert (loaded.config.unet.transformer_depth_middle, loaded.config.unet.cross_attends) == (layers[-1], name == "mid")
    load_controlnet(path).check_compatible(ENCODERS["sdxl"])
    with pytest.raises(CheckpointError, match="this ControlNet is for SDXL models"):
        load_controlnet(path).check_compatible(ENCODERS["sd1"])
    inputs = _inputs("sdxl")
    down_residuals, mid = _reference_residuals(reference, *inputs)
    residuals, middle = _residuals(loaded.model, *inputs)
    assert mid.abs().max() > 0.1
    for ours, theirs in zip([*residuals, middle], [*down_residuals, mid]):
        assert (ours - theirs).abs().max() <= 1e-5 * max(1.0, float(theirs.abs().max()))


def test_sd1_layout_has_12_skip_residuals_and_sdxl_9():
    """Full-size shapes, on the meta device: SD1 13 residuals (12 + middle), SDXL 10 (9 + middle)."""
    from sdlab.families import get_family

    with torch.device("meta"):
        sd1 = ControlNet(ControlNetConfig(unet=get_family("sd1").unet))
        sdxl = ControlNet(ControlNetConfig(unet=get_family("sdxl").unet))
    assert len(sd1.zero_convs) == 12 and len(sdxl.zero_convs) == 9
    assert "input_hint_block.14.weight" in sd1.state_dict() and "middle_block_out.0.weight" in sdxl.state_dict()


def test_new_controlnet_is_a_no_op():
    """Zero-initialised hint output and zero convs: a fresh ControlNet adds nothing (the training start)."""
    cfg = ControlNetConfig(unet=ENCODERS["sd1"])
    model = ControlNet(cfg).eval()
    x, t, context, hint, _, _ = _inputs("sd1")
    with torch.no_grad():
        residuals, middle = model(x, t, context, hint)
    assert all(float(r.abs().max()) == 0.0 for r in residuals) and float(middle.abs().max()) == 0.0


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_unet_with_residuals_matches_diffusers(name):
    cfg = ENCODERS[name]
    reference = UNet2DConditionModel.from_config(unet_config_to_diffusers(cfg)).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    with torch.device("meta"):
        unet = UNet(cfg)
    unet.load_state_dict(unet_state_dict_from_diffusers(reference.state_dict(), cfg), assign=True)
    control = diffusers_controlnet(cfg, seed=4)
    x, t, context, hint, y, added = _inputs(name)
    with torch.no_grad():
        down, mid = control(x, t, context, hint, conditioning_scale=0.7, return_dict=False, **added)
        expected = reference(
            x, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid, **added
        ).sample
        plain = unet(x, t, context, y)
        actual = unet(x, t, context, y, control=(list(down), mid))
    assert (expected - plain).abs().max() > 0.05      # the residuals change the output
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


def test_wrong_family_is_refused(tmp_path):
    path = write_layout(diffusers_controlnet(ENCODERS["sd1"], seed=0), "diffusers-file", tmp_path)
    with pytest.raises(CheckpointError, match="for SD1-like models .* the model is SDXL"):
        load_controlnet(path, like=ENCODERS["sdxl"])
    loaded = load_controlnet(path)
    with pytest.raises(CheckpointError, match="this ControlNet is for"):
        loaded.check_compatible(ENCODERS["sd2"])
    loaded.check_compatible(ENCODERS["sd1"])


def test_not_a_controlnet(tmp_path):
    sd = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, sd)
    with pytest.raises(CheckpointError, match="a Stable Diffusion checkpoint .* not a ControlNet"):
        load_controlnet(sd)
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 4)}, lora)
    with pytest.raises(CheckpointError, match="a LoRA"):
        load_controlnet(lora)
    with pytest.raises(CheckpointError, match="no such file"):
        load_controlnet(tmp_path / "missing.safetensors")
    others = {   # key names of each kind's released files
        "t2iadapter_canny_sd15v2.pth": ({"conv_in.weight": (320, 192, 3, 3), "body.0.block1.weight": (320, 320, 3, 3)},
                                        "a T2I-Adapter, not a ControlNet; a control .* loads it as one"),
        "t2iadapter_color_sd14v1.pth": ({"body.0.in_conv.weight": (320, 192, 1, 1)}, "a T2I-Adapter"),
        "t2iadapter_style_sd14v1.pth": ({"style_embedding": (1, 8, 1024), "ln_post.weight": (1024,)},
                                        "a T2I StyleAdapter, not a ControlNet; sdlab does not load StyleAdapters"),
        "t2i_diffusers.safetensors": ({"adapter.conv_in.weight": (320, 64, 3, 3),
                                       "adapter.body.0.resnets.0.block1.weight": (320, 320, 3, 3)}, "a T2I-Adapter"),
        "t2i_diffusers_light.safetensors": ({"adapter.body.0.in_conv.weight": (320, 192, 1, 1),
                                             "adapter.body.0.resnets.0.block1.weight": (320, 320, 3, 3),
                                             "adapter.body.0.out_conv.weight": (320, 320, 1, 1)}, "a T2I-Adapter"),
        "t2iadapter_sketch_sd14v1.pth": ({"body.0.block1.weight": (320, 320, 3, 3), "body.0.block2.weight": (320, 320, 3, 3),
                                          "body.3.in_conv.weight": (640, 320, 3, 3), "body.3.down_opt.op.weight": (320, 320, 3, 3),
                                          "conv_in.weight": (320, 64, 3, 3)}, "a T2I-Adapter"),
        "kohya_controllllite_xl_canny.safetensors": (
            {"lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.down.0.weight": (32, 640)},
            "a ControlNet-LLLite .* sdlab does not load ControlNet-LLLites"),
        "ip-adapter_sd15.safetensors": ({"image_proj.proj.weight": (3072, 1024), "ip_adapter.1.to_k_ip.weight": (320, 768)},
                                        "an IP-Adapter, .* an image prompt \\(--ip-adapter"),
    }
    for name, (shapes, message) in others.items():
        state = {key: torch.zeros(shape) for key, shape in shapes.items()}
        if name.endswith(".safetensors"):
            save_file(state, tmp_path / name)
        else:
            torch.save(state, tmp_path / name)
        with pytest.raises(CheckpointError, match=message):
            load_controlnet(tmp_path / name)
    upscalers = {   # Real-ESRGAN's key names (new arch: body.N.rdbK; compact SRVGG: body.N) and ESRGAN's old arch
        "RealESRGAN_x4plus.safetensors": {"conv_first.weight": (64, 3, 3, 3), "body.0.rdb1.conv1.weight": (32, 64, 3, 3),
                                          "body.0.rdb3.conv5.bias": (64,), "conv_body.weight": (64, 64, 3, 3),
                                          "conv_up1.weight": (64, 64, 3, 3), "conv_hr.weight": (64, 64, 3, 3),
                                          "conv_last.weight": (3, 64, 3, 3)},
        "realesr-general-x4v3.safetensors": {"body.0.weight": (64, 3, 3, 3), "body.0.bias": (64,), "body.1.weight": (64,),
                                             "body.34.weight": (48, 64, 3, 3), "body.34.bias": (48,)},
        "4x_foolhardy_Remacri.safetensors": {"model.0.weight": (64, 3, 3, 3),
                                             "model.1.sub.0.RDB1.conv1.0.weight": (32, 64, 3, 3),
                                             "model.1.sub.23.weight": (64, 64, 3, 3), "model.10.weight": (3, 64, 3, 3)},
    }
    for name, shapes in upscalers.items():
        save_file({key: torch.zeros(shape) for key, shape in shapes.items()}, tmp_path / name)
        with pytest.raises(CheckpointError, match=r"not a ControlNet: no input_hint_block\.0\.weight"):
            load_controlnet(tmp_path / name)
    torch.save({"image_proj": {"proj.weight": torch.zeros(4, 4)}, "ip_adapter": {"1.to_k_ip.weight": torch.zeros(4, 4)}},
               tmp_path / "ip-adapter_sd15.bin")      # h94's .bin: two nested dicts
    with pytest.raises(CheckpointError, match="an IP-Adapter, not a ControlNet"):
        load_controlnet(tmp_path / "ip-adapter_sd15.bin")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        load_controlnet(broken)


def test_truncated_controlnet_names_what_is_missing(tmp_path):
    path = write_layout(diffusers_controlnet(ENCODERS["sd1"], seed=0), "original", tmp_path)
    from safetensors.torch import load_file

    state = load_file(path)
    del state["control_model.zero_convs.3.0.weight"]
    save_file(state, tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match="missing 1 keys: .*zero_convs.3.0.weight"):
        load_controlnet(tmp_path / "cut.safetensors")


@pytest.mark.parametrize("name, sidecar, pooled", [
    ("control_v11e_sd15_shuffle.safetensors", None, True),            # lllyasviel's name (ComfyUI's rule)
    ("shuffle_model_shuffle_fp16.safetensors", None, True),
    ("control_v11p_sd15_canny.safetensors", None, False),
    ("my_controlnet.safetensors", "model:\n  params:\n    global_average_pooling: True\n", True),   # A1111's rule
    ("control_v11e_sd15_shuffle.safetensors", "model:\n  params:\n    global_average_pooling: false\n", False),
])
def test_single_file_shuffle_controlnet_pools_like_its_diffusers_folder(name, sidecar, pooled, tmp_path):
    reference = diffusers_controlnet(ENCODERS["sd1"], seed=0)
    reference.register_to_config(global_pool_conditions=True)
    path = write_layout(reference, "original", tmp_path).rename(tmp_path / name)
    if sidecar is not None:
        path.with_suffix(".yaml").write_text(sidecar)
    loaded = load_controlnet(path)
    assert loaded.config.global_pool is pooled
    if pooled:
        inputs = _inputs("sd1")
        with torch.no_grad():
            down, mid = reference(*inputs[:4], conditioning_scale=1.0, return_dict=False)
            residuals, middle = _residuals(loaded.model, *inputs)
        assert tuple(middle.shape[-2:]) == (1, 1)
        for ours, theirs in zip([*residuals, middle], [*down, mid]):
            assert (ours - theirs).abs().max() <= 1e-5 * max(1.0, float(theirs.abs().max()))


def test_bad_shuffle_sidecar_is_one_error(tmp_path):
    path = write_layout(diffusers_controlnet(ENCODERS["sd1"], seed=0), "original", tmp_path)
    path.with_suffix(".yaml").write_text("model:\n  params:\n    global_average_pooling: maybe\n")
    with pytest.raises(CheckpointError, match="global_average_pooling must be true or false"):
        load_controlnet(path)


def test_legacy_hash_is_a1111s(tmp_path):
    import hashlib

    data = bytes(range(256)) * 5000                                  # 1.28 MB
    (tmp_path / "f.safetensors").write_bytes(data)
    assert legacy_hash(tmp_path / "f.safetensors") == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_equal_halves_run_once_until_the_text_context(name, tmp_path):
    """A guided step (one latent and one hint twice, one timestep, two prompts): the hint block and the layers
    before the first cross-attention run once, and the residuals still match diffusers'. A hint that differs
    between the halves runs both."""
    reference = diffusers_controlnet(ENCODERS[name], seed=0)
    model = load_controlnet(write_layout(reference, "folder", tmp_path)).model
    x, _, context, hint, y, added = _inputs(name)
    x, hint, t = torch.cat([x[:1], x[:1]]), torch.cat([hint[:1], hint[:1]]), torch.tensor([417.0, 417.0])
    if y is not None:
        y = torch.cat([y[:1], y[:1]])
        added = {"added_cond_kwargs": {k: torch.cat([v[:1], v[:1]]) for k, v in added["added_cond_kwargs"].items()}}
    seen, forward = [], model.input_hint_block.forward
    model.input_hint_block.forward = lambda h: seen.append(len(h)) or forward(h)
    down, mid = _reference_residuals(reference, x, t, context, hint, y, added)
    residuals, middle = _residuals(model, x, t, context, hint, y, added)
    for ours, theirs in zip([*residuals, middle], [*down, mid]):
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max() <= 1e-5 * max(1.0, float(theirs.abs().max()))
    other = torch.cat([hint[:1], hint[:1].flip(-1)])
    _residuals(model, x, t, context, other, y, added)
    assert seen == [1, 2]
