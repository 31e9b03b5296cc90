"""Declared architectures are checked against the tensors before anything is built.

`sdlab.config` metadata (whole models, and standalone VAE files written by `sdlab train --task vae`) is
type-checked field by field and compared with the shapes; a bad value is one `CheckpointError` naming the
file and the field (exit 2 from the CLI), raised in well under a second, never a MemoryError after minutes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from bundle_fixtures import tiny_bundle
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.file_format import bundle_metadata
from sdlab.checkpoints.load import load_bundle, plan_checkpoint
from sdlab.checkpoints.save import bundle_state_dict
from sdlab.checkpoints.validate import config_from_json
from sdlab.cli import main
from sdlab.models.unet import UNetConfig


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A tiny SD1 model as sdlab saves it: state dict and metadata (with `sdlab.config`)."""
    bundle = tiny_bundle("sd1", seed=3)
    state = {k: v.contiguous() for k, v in bundle_state_dict(bundle).items()}
    return state, bundle_metadata(bundle)


def _with_config(saved, tmp_path: Path, edit) -> Path:
    state, metadata = saved
    config = json.loads(metadata["sdlab.config"])
    raw = edit(config)
    path = tmp_path / "edited.safetensors"
    save_file(state, str(path), {**metadata, "sdlab.config": raw if isinstance(raw, str) else json.dumps(config)})
    return path


def _set(component: str, field: str, value):
    def edit(config):
        target = config["text_encoders"][0] if component == "text" else config[component]
        target[field] = value
    return edit


BAD_CONFIGS = {
    "unet blocks 1e5": (_set("unet", "num_res_blocks", 100_000), r"UNetConfig\.num_res_blocks: declares 100000 but the weights have 1"),
    "vae blocks 1e5": (_set("vae", "num_res_blocks", 100_000), r"VAEConfig\.num_res_blocks: declares 100000"),
    "text layers 1e6": (_set("text", "layers", 1_000_000), r"CLIPTextConfig\.layers: declares 1000000 but the weights have 2"),
    "unet levels": (_set("unet", "channel_mult", [1, 2, 2, 2, 2]), r"UNetConfig: transformer_depth needs one entry per channel_mult level"),
    "zero heads": (_set("unet", "num_heads", 0), r"UNetConfig\.num_heads: 0 is out of range"),
    "heads not dividing": (_set("unet", "num_heads", 3), r"UNetConfig\.num_heads=3 does not divide"),
    "zero groups": (_set("unet", "norm_groups", 0), r"UNetConfig\.norm_groups: 0 is out of range"),
    "groups not dividing": (_set("vae", "norm_groups", 7), r"VAEConfig\.norm_groups=7 does not divide"),
    "zero text heads": (_set("text", "heads", 0), r"CLIPTextConfig\.heads: 0 is out of range"),
    "negative width": (_set("unet", "model_channels", -32), r"UNetConfig\.model_channels: -32 is out of range"),
    "string width": (_set("unet", "model_channels", "32"), r"UNetConfig\.model_channels: expected an integer, got '32'"),
    "negative mult": (_set("vae", "channel_mult", [1, -2]), r"VAEConfig\.channel_mult: -2 is out of range"),
    "mult not a list": (_set("vae", "channel_mult", "12"), r"VAEConfig\.channel_mult: expected a non-empty list"),
    "bool as int": (_set("unet", "context_dim", True), r"UNetConfig\.context_dim: expected an integer"),
    "string flag": (_set("unet", "use_linear_proj", "no"), r"UNetConfig\.use_linear_proj: expected true or false"),
    "both head fields": (_set("unet", "head_dim", 4), r"UNetConfig: set exactly one of num_heads and head_dim"),
    "unknown activation": (_set("text", "activation", "relu"), r"CLIPTextConfig\.activation: 'relu' is not one of"),
    "negative eps": (_set("text", "layer_norm_eps", -1.0), r"CLIPTextConfig\.layer_norm_eps: expected a positive"),
    "unknown field": (_set("unet", "dropout", 0.1), r"UNetConfig: unknown fields \['dropout'\]"),
    "no text encoders": (lambda c: c.update(text_encoders=[]), r"text_encoders: sd1 has 1 text encoder\(s\), the metadata lists 0"),
    "text encoders not a list": (lambda c: c.update(text_encoders=5), r"text_encoders: .* lists 5"),
    "no unet": (lambda c: c.pop("unet"), r"no unet entry"),
    "unet not an object": (lambda c: c.update(unet=[1, 2]), r"UNetConfig: expected a JSON object"),
    "not json": (lambda c: "{not json", r"sdlab\.config is not JSON"),
    "a list": (lambda c: "[1, 2]", r"sdlab\.config: expected a JSON object, got list"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_sdlab_config_is_one_clear_error_before_building(saved, tmp_path, case):
    edit, pattern = BAD_CONFIGS[case]
    path = _with_config(saved, tmp_path, edit)
    start = time.process_time()                       # CPU time: a bound on the work, not on the machine's load
    with pytest.raises(CheckpointError, match=pattern) as err:
        plan_checkpoint(path)
    assert time.process_time() - start < 5
    assert str(err.value).startswith(str(path)) and "metadata sdlab.config" in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_reports_bad_metadata_as_exit_2(saved, tmp_path, capsys):
    path = _with_config(saved, tmp_path, _set("unet", "num_res_blocks", 100_000))
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sdlab: error: ") and "UNetConfig.num_res_blocks" in err[0]
    assert str(path) in err[0]


def test_good_sdlab_config_still_loads_as_stored(saved, tmp_path):
    path = _with_config(saved, tmp_path, lambda c: None)
    report = plan_checkpoint(path).report
    assert report.family_source == "metadata sdlab.family"
    assert report.components[0].config == tiny_bundle("sd1").unet_config


# The UNetConfig fields sdlab knew before empty_transformer_levels (87800ea `models/unet.py`), whose
# `validate.config_from_json` refused any other: "UNetConfig: unknown fields [...]".
UNET_FIELDS_BEFORE_EMPTY_LEVELS = {"in_channels", "out_channels", "model_channels", "channel_mult", "num_res_blocks",
                                   "transformer_depth", "transformer_depth_middle", "num_heads", "head_dim",
                                   "context_dim", "use_linear_proj", "adm_in_channels", "upcast_attention",
                                   "norm_groups", "time_cond_proj_dim"}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_model_without_empty_transformer_levels_is_saved_as_older_sdlab_reads_it(saved, family):
    """`empty_transformer_levels` is written only where a U-Net has such levels, so a file without them holds
    only fields older sdlab versions know, and reads back the same."""
    metadata = saved[1] if family == "sd1" else bundle_metadata(tiny_bundle(family))
    unet = json.loads(metadata["sdlab.config"])["unet"]
    assert set(unet) <= UNET_FIELDS_BEFORE_EMPTY_LEVELS
    assert config_from_json(UNetConfig, unet) == tiny_bundle(family).unet_config


def _without_cross_attention(family: str, tmp_path: Path) -> tuple[Path, UNetConfig]:
    """A tiny model whose U-Net has transformers without blocks at every level and in the middle (SDXL's
    "small" ControlNet layout): no tensor shows the text width its config declares."""
    from dataclasses import replace

    from sdlab.checkpoints.create import new_bundle, tiny_unet_config
    from sdlab.checkpoints.save import save_bundle
    from sdlab.families import get_family

    base = tiny_unet_config(get_family(family))
    levels = len(base.transformer_depth)
    cfg = replace(base, transformer_depth=(0,) * levels, empty_transformer_levels=tuple(range(1, levels)),
                  transformer_depth_middle=0)
    return save_bundle(new_bundle(family, tiny=True, unet=cfg), tmp_path / f"{family}.safetensors"), cfg


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_unet_without_cross_attention_that_sdlab_saved_loads_back(tmp_path, family):
    """Without attn2.to_k the tensors cannot show the text width, so the declared one stands (before: "UNetConfig.
    context_dim: declares 192 but the weights have 2048", the family's default standing in for the tensors);
    the levels without blocks are written, as older sdlab could not read them anyway."""
    path, cfg = _without_cross_attention(family, tmp_path)
    report = plan_checkpoint(path).report
    assert report.components[0].config == cfg
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["sdlab.config"])["unet"]["empty_transformer_levels"] == [1]


# --- standalone VAE files written by `sdlab train --task vae` (item 6) ------------------------------------


def _trained_vae_file(path: Path, seed: int = 5) -> Path:
    from sdlab.train.vae_task import VAETask

    vae = tiny_bundle("sd1", seed=seed).vae
    VAETask(vae, scaling_factor=0.18215).save_weights(path, ema=False)
    return path


def test_vae_saved_by_train_task_loads_with_vae_option(saved, tmp_path):
    state, metadata = saved
    base = tmp_path / "base.safetensors"
    save_file(state, str(base), metadata)
    vae_file = _trained_vae_file(tmp_path / "final.safetensors")
    bundle = load_bundle(base, vae=vae_file)
    expected = load_file(str(vae_file))
    loaded = bundle.vae.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    assert plan_checkpoint(base, vae=vae_file).vae.origin == str(vae_file)


def test_bad_vae_file_error_names_the_vae_file(saved, tmp_path):
    state, metadata = saved
    base = tmp_path / "base.safetensors"
    save_file(state, str(base), metadata)
    vae_file = _trained_vae_file(tmp_path / "vae.safetensors")
    vae_state = load_file(str(vae_file))
    bad = tmp_path / "bad-vae.safetensors"
    config = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "base_channels": 32,
              "channel_mult": [1, 2], "num_res_blocks": 100_000, "norm_groups": 32}
    save_file(vae_state, str(bad), {"sdlab.component": "vae", "sdlab.config": json.dumps(config)})
    with pytest.raises(CheckpointError) as err:
        plan_checkpoint(base, vae=bad)
    message = str(err.value)
    assert message.startswith(str(bad)) and str(base) not in message
    assert "VAEConfig.num_res_blocks: declares 100000 but the weights have 1" in message
