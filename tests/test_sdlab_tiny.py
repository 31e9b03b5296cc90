"""sdlab-tiny, the shipped model's family, and the recipe steps that join its training stages.

- the family: f=4 VAE, 64 px, v-prediction, DPM++ 2M / Karras, SD1-style text tower; at full size the whole
  bundle fits the 40 MB package budget in fp16;
- a saved bundle loads back as sdlab-tiny with its own stored latent scaling factor;
- `assemble_bundle` takes the VAE and text tower files of `sdlab train --task vae|text` and measures the
  scaling factor on the data (1 / std of the latents);
- `bundle_from_run` puts the EMA (or raw) U-Net of a run checkpoint into the bundle; the CLI exports fp16.
"""

from __future__ import annotations

import copy

import math
from dataclasses import replace

import pytest
import torch

from sdlab.checkpoints.create import new_bundle
from sdlab.checkpoints.load import load_bundle
from sdlab.checkpoints.save import save_bundle
from sdlab.tiny.datasets.build import build_dataset
from sdlab.diffusion.denoiser import Prediction
from sdlab.families import get_family
from sdlab.tiny.image_tower import ImageTower, ImageTowerConfig
from sdlab.models.vae import AutoencoderKL
from sdlab.tiny.assemble import assemble_bundle, bundle_from_run, main, measure_scaling_factor
from sdlab.train.run_checkpoint import save_run_checkpoint
from sdlab.tiny.text_task import TextTask
from sdlab.train.vae_task import VAETask, latent_scaling_factor


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_family_defaults_and_size_budget() -> None:
    family = get_family("sdlab-tiny")
    assert family.vae.downsample_factor == 4 and family.default_size == 64
    assert family.default_size // family.vae.downsample_factor == 16  # 16 x 16 x 4 latents
    assert family.prediction is Prediction.V
    assert (family.default_sampler, family.default_sigma_schedule, family.default_steps) == ("dpmpp_2m", "sgm_uniform", 14)
    (te,) = family.text_encoders
    assert (te.layout, te.hidden_state, te.pad_token_id) == ("hf", "last", 49407)
    assert te.config.vocab_size == 49408 and family.unet.context_dim == te.config.width
    # GroupNorm keeps absolute colour only as differences inside a group: at least 4 channels per group
    unet_widths = [family.unet.model_channels * m for m in family.unet.channel_mult]
    vae_widths = [family.vae.base_channels * m for m in family.vae.channel_mult]
    assert min(unet_widths) // family.unet.norm_groups >= 4 and min(vae_widths) // family.vae.norm_groups >= 4
    bundle = new_bundle("sdlab-tiny", seed=0)
    total = _params(bundle.unet) + _params(bundle.vae) + _params(bundle.text_encoders[0].model)
    assert 2 * total <= 40_000_000  # fp16 bytes


def test_saved_bundle_loads_as_sdlab_tiny_with_its_scaling_factor(tmp_path) -> None:
    bundle = new_bundle("sdlab-tiny", tiny=True, seed=1)
    bundle = replace(bundle, scaling_factor=0.6125)
    path = save_bundle(bundle, tmp_path / "m.safetensors", dtype=torch.float16)
    loaded = load_bundle(path)
    assert loaded.family.name == "sdlab-tiny"
    assert loaded.scaling_factor == pytest.approx(0.6125)
    assert loaded.prediction is Prediction.V and loaded.default_size == 64
    for name, value in bundle.unet.state_dict().items():
        torch.testing.assert_close(loaded.unet.state_dict()[name], value.half().float())


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A tiny base bundle, a trained-looking VAE file and text tower file (other seeds), and 8 images."""
    root = tmp_path_factory.mktemp("parts")
    base = new_bundle("sdlab-tiny", tiny=True, seed=0)
    save_bundle(base, root / "base.safetensors")
    torch.manual_seed(5)
    vae = AutoencoderKL(base.vae_config)
    VAETask(vae, scaling_factor=1.0).save_weights(root / "vae.safetensors", ema=False)
    text_cfg = base.text_encoders[0].config
    torch.manual_seed(6)
    text = type(base.text_encoders[0].model)(text_cfg)
    image = ImageTower(ImageTowerConfig(embed_dim=text_cfg.projection_dim))
    TextTask(text, image, tokenizer=base.text_encoders[0].tokenizer).save_weights(root / "text.safetensors", ema=False)
    build_dataset(root / "data", 8, seed=0, kind="shapes", image_size=64)
    return root, vae, text


def test_assemble_takes_the_trained_parts_and_measures_the_scaling_factor(parts) -> None:
    root, vae, text = parts
    bundle = assemble_bundle(root / "base.safetensors", vae=root / "vae.safetensors", text=root / "text.safetensors",
                             data_dir=root / "data", images=8)
    for name, value in vae.state_dict().items():
        torch.testing.assert_close(bundle.vae.state_dict()[name], value)
    for name, value in text.state_dict().items():
        torch.testing.assert_close(bundle.text_encoders[0].model.state_dict()[name], value)
    assert math.isfinite(bundle.scaling_factor) and bundle.scaling_factor != 1.0
    assert measure_scaling_factor(bundle, root / "data", images=8) == pytest.approx(bundle.scaling_factor)
    # the same number as the VAE task's own estimate on the same pixels with the same draw
    from sdlab.train.data import generator_for, load_training_image, scan_dataset

    pixels = torch.stack([load_training_image(s.path, 64, center_crop=True, random_flip=False,
                                              generator=torch.Generator()).pixels for s in scan_dataset(root / "data").samples])
    direct = latent_scaling_factor(bundle.vae.eval(), pixels, generator_for(0, "scaling"))
    assert bundle.scaling_factor == pytest.approx(direct, rel=1e-6)
    with pytest.raises(ValueError, match="data_dir"):
        assemble_bundle(root / "base.safetensors", vae=root / "vae.safetensors")


def test_export_takes_the_ema_unet_of_a_run_checkpoint(parts, tmp_path) -> None:
    root, _, _ = parts
    base = load_bundle(root / "base.safetensors")
    raw = {k: v + 0.25 for k, v in base.unet.state_dict().items()}
    shadow = {f"unet.{k}": v - 0.5 for k, v in base.unet.named_parameters()}
    run = tmp_path / "run"
    save_run_checkpoint({"step": 7, "task": "unet", "modules": {"unet": raw},
                         "ema": {"decay": 0.999, "num_updates": 7, "shadow": shadow}}, run / "checkpoints", 7)

    bundle, step = bundle_from_run(root / "base.safetensors", run)
    assert step == 7
    for name, value in base.unet.named_parameters():
        torch.testing.assert_close(bundle.unet.state_dict()[name], value.detach() - 0.5)
    bundle, _ = bundle_from_run(root / "base.safetensors", run, ema=False)
    for name, value in raw.items():
        torch.testing.assert_close(bundle.unet.state_dict()[name], value)

    out = tmp_path / "shipped.safetensors"
    assert main(["export", str(root / "base.safetensors"), str(run), str(out)]) == 0
    shipped = load_bundle(out)
    assert shipped.family.name == "sdlab-tiny"
    for name, value in base.unet.named_parameters():
        torch.testing.assert_close(shipped.unet.state_dict()[name], (value.detach() - 0.5).half().float())

    save_run_checkpoint({"step": 8, "task": "unet", "modules": {"unet": raw}, "ema": None}, run / "checkpoints", 8)
    with pytest.raises(ValueError, match="no EMA"):
        bundle_from_run(root / "base.safetensors", run)


def test_export_takes_trained_text_towers_and_an_lcd_target_network(parts, tmp_path) -> None:
    root, _, _ = parts
    base = load_bundle(root / "base.safetensors")
    text = base.text_encoders[0].model
    unet_raw = {k: v + 0.25 for k, v in base.unet.state_dict().items()}
    text_raw = {k: v + 0.125 for k, v in text.state_dict().items()}
    shadow = {f"text_encoder0.{k}": v - 0.5 for k, v in text.named_parameters()}
    shadow |= {f"unet.{k}": v - 0.5 for k, v in base.unet.named_parameters()}
    target = {k: v * 0 + 3.0 for k, v in base.unet.state_dict().items()}
    run = tmp_path / "run"
    save_run_checkpoint({"step": 5, "task": "lcd", "modules": {"unet": unet_raw, "text_encoder0": text_raw},
                         "ema": {"decay": 0.9, "num_updates": 5, "shadow": shadow},
                         "task_state": {"target": target}}, run / "checkpoints", 5)
    bundle, _ = bundle_from_run(root / "base.safetensors", run)
    for name, value in text.named_parameters():
        torch.testing.assert_close(bundle.text_encoders[0].model.state_dict()[name], value.detach() - 0.5)
    bundle, _ = bundle_from_run(root / "base.safetensors", run, target=True, preset="lcm")
    assert bundle.preset == "lcm"
    assert all(torch.equal(v, target[k]) for k, v in bundle.unet.state_dict().items())
    out = tmp_path / "distilled.safetensors"
    assert main(["export", str(root / "base.safetensors"), str(run), str(out), "--target", "--preset", "lcm"]) == 0
    assert load_bundle(out).preset == "lcm"


def test_a_decoder_only_vae_keeps_the_scaling_factor(parts, tmp_path) -> None:
    root, _, _ = parts
    base = load_bundle(root / "base.safetensors")
    vae = copy.deepcopy(base.vae)
    with torch.no_grad():
        for p in vae.decoder.parameters():
            p.add_(0.01)
    VAETask(vae, scaling_factor=1.0).save_weights(tmp_path / "decoder.safetensors", ema=False)
    bundle = assemble_bundle(root / "base.safetensors", vae=tmp_path / "decoder.safetensors")  # no data needed
    assert bundle.scaling_factor == base.scaling_factor
    for name, value in vae.state_dict().items():
        torch.testing.assert_close(bundle.vae.state_dict()[name], value)
