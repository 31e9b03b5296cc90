"""Loading and saving whole bundles: reduced-width models of every family, written as released files are.

- original single files (no sdlab metadata, real-file junk keys) load back with inferred configs equal to the
  ones they were built from, and every tensor bit-identical;
- save -> load is bit-identical (configs from metadata);
- the same weights as a diffusers folder (saved by diffusers / transformers themselves) give the same outputs;
- diffusers' own `from_single_file` reads what sdlab writes;
- dtype conversion, SD2 prediction type sources, standalone VAE override.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from bundle_fixtures import (
    TINY_VAE, randomize_, tiny_bundle, tiny_unet_config, write_diffusers_folder, write_original,
)
from sdlab.checkpoints import create
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.io import write_safetensors_atomic
from sdlab.checkpoints.load import load_bundle
from sdlab.checkpoints.save import bundle_state_dict, prediction_markers, save_bundle
from sdlab.diffusion.denoiser import Prediction
from sdlab.families import get_family
from sdlab.families.loaded import ModelBundle
from sdlab.models.layers import sdxl_vector
from sdlab.models.vae import AutoencoderKL

FAMILIES = ["sd1", "sd2", "sdxl", "sdxl-refiner", "sd1-inpaint"]


def _modules(bundle: ModelBundle) -> dict[str, torch.nn.Module]:
    return {"unet": bundle.unet, "vae": bundle.vae, **{te.spec.name: te.model for te in bundle.text_encoders}}


def assert_same_weights(a: ModelBundle, b: ModelBundle) -> None:
    for name, module in _modules(a).items():
        sa, sb = module.state_dict(), _modules(b)[name].state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), f"{name}.{key}"


def assert_same_configs(a: ModelBundle, b: ModelBundle) -> None:
    assert a.family is b.family
    assert a.unet_config == b.unet_config
    assert a.vae_config == b.vae_config
    assert a.text_configs == b.text_configs


@pytest.fixture(scope="module")
def bundles() -> dict[str, ModelBundle]:
    return {name: tiny_bundle(name, seed=i) for i, name in enumerate(FAMILIES)}


@pytest.fixture(scope="module")
def originals(bundles, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("originals")
    return {name: write_original(b, folder / f"{name}.safetensors") for name, b in bundles.items()}


# --- original single files -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_original_file_loads_with_inferred_configs(bundles, originals, name):
    built = bundles[name]
    with safe_open(str(originals[name]), "pt") as f:
        assert "sdlab.config" not in (f.metadata() or {})          # nothing to read the configs from
    loaded = load_bundle(originals[name])
    assert_same_configs(built, loaded)
    assert_same_weights(built, loaded)
    report = loaded.report
    assert report.family_source == "detected" and report.prediction_source == f"default of {name}"
    assert loaded.prediction is Prediction.EPS and loaded.scaling_factor == built.family.latent_scaling_factor
    assert "model_ema.decay" in report.ignored and "alphas_cumprod" in report.ignored
    text_ignored = [k for c in report.components for k in c.ignored]
    assert any(k.endswith(("position_ids", "logit_scale")) for k in text_ignored)
    assert [te.tokenizer.pad_token_id for te in loaded.text_encoders] == [te.pad_token_id for te in built.family.text_encoders]
    assert not loaded.unet.training


def test_sd1_file_without_text_model_level_and_as_ckpt(bundles, tmp_path):
    built = bundles["sd1"]
    state = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
             for k, v in bundle_state_dict(built).items()}
    state["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(77)[None]
    torch.save({"state_dict": state, "global_step": 470000}, tmp_path / "old.ckpt")
    loaded = load_bundle(tmp_path / "old.ckpt")
    assert_same_configs(built, loaded)
    assert_same_weights(built, loaded)


def test_forward_outputs_match_the_built_models(bundles, originals):
    built, loaded = bundles["sdxl"], load_bundle(originals["sdxl"])
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([900.0])
    ctx, y = torch.randn(1, 77, built.unet_config.context_dim, generator=g), torch.randn(1, 1664, generator=g)
    with torch.no_grad():
        assert torch.equal(built.unet(x, t, ctx, y), loaded.unet(x, t, ctx, y))
        ids = built.text_encoders[1].tokenizer(["a photograph of an astronaut riding a horse"])
        assert torch.equal(built.text_encoders[1].model(ids).pooled, loaded.text_encoders[1].model(ids).pooled)


def test_sd2_saved_in_sgm_layout_draws_the_usual_layouts_picture(bundles, originals, tmp_path):
    """SD2 as Stability's generative-models code saves it keeps OpenCLIP-H under `conditioner.embedders.0.model.`,
    the SDXL refiner's prefix, and ComfyUI loads it as SD2 (supported_models.SD20.process_clip_state_dict:
    `replace_prefix["conditioner.embedders.0.model."] = "clip_h."  #SD2 in sgm format`, as for
    `cond_stage_model.model.`). The U-Net without the refiner's label_emb tells them apart; the picture is the
    usual layout's, and the model saves back in the usual layout."""
    import sdlab

    state = dict(bundle_state_dict(bundles["sd2"]))
    sgm = {("conditioner.embedders.0.model." + k.removeprefix("cond_stage_model.model.")
            if k.startswith("cond_stage_model.model.") else k): v for k, v in state.items()}
    path = write_safetensors_atomic(tmp_path / "sd2-sgm.safetensors", sgm)
    draw = dict(prompt="a red apple", negative_prompt="blurry", steps=3, seed=1, width=32, height=32)
    usual, ours = sdlab.load(originals["sd2"]), sdlab.load(path)
    assert ours.bundle.family is get_family("sd2") and ours.bundle.report.family_source == "detected"
    assert (np.asarray(ours.txt2img(**draw).images[0]) == np.asarray(usual.txt2img(**draw).images[0])).all()
    assert set(bundle_state_dict(ours.bundle)) == set(state)
    assert load_bundle(originals["sdxl-refiner"]).family is get_family("sdxl-refiner")


# --- prediction type -------------------------------------------------------------------------------------


def test_sd2_prediction_sources(bundles, tmp_path, caplog):
    path = write_original(bundles["sd2"], tmp_path / "v2-1_768.safetensors")
    with caplog.at_level(logging.INFO, logger="sdlab.checkpoints.load"):
        plain = load_bundle(path)
    assert plain.prediction is Prediction.EPS and plain.default_size == 512
    assert any("assuming eps" in r.getMessage() and "prediction='v'" in r.getMessage() for r in caplog.records)

    (tmp_path / "v2-1_768.yaml").write_text(
        "model:\n  base_learning_rate: 1.0e-4\n  params:\n    parameterization: \"v\"\n    linear_start: 0.00085\n"
    )
    sidecar = load_bundle(path)
    assert sidecar.prediction is Prediction.V and sidecar.default_size == 768
    assert sidecar.report.prediction_source == "sidecar v2-1_768.yaml (parameterization)"
    assert load_bundle(path, prediction="eps").prediction is Prediction.EPS   # the argument wins

    for key, value in (("sdlab.prediction", "v"), ("modelspec.prediction_type", "v_prediction")):
        meta_path = write_original(bundles["sd2"], tmp_path / f"meta-{key}.safetensors", metadata={key: value})
        loaded = load_bundle(meta_path)
        assert loaded.prediction is Prediction.V and loaded.report.prediction_source == f"metadata {key}"
    with pytest.raises(CheckpointError, match="unknown prediction type 'banana'"):
        load_bundle(path, prediction="banana")


# --- save / load -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl", "sdxl-refiner"])
def test_save_load_round_trip_is_bit_identical(bundles, originals, tmp_path, name):
    first = load_bundle(originals[name], prediction="v" if name == "sd2" else None)
    path = save_bundle(first, tmp_path / "saved.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["saved.safetensors"]
    second = load_bundle(path)
    assert_same_configs(first, second)
    assert_same_weights(first, second)
    assert second.prediction is first.prediction and second.scaling_factor == first.scaling_factor
    assert second.report.family_source == "metadata sdlab.family"
    assert set(second.report.ignored) == set(prediction_markers(first))     # ComfyUI's v_pred on the SD2-v file
    assert all(c.ignored == () for c in second.report.components)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        keys = set(f.keys())
    assert json.loads(metadata["sdlab.config"])["unet"]["model_channels"] == first.unet_config.model_channels
    for te in first.family.text_encoders:  # the release layout: HF text_model.* or OpenCLIP resblocks
        marker = "text_model.encoder.layers.0.self_attn.q_proj.weight" if te.layout == "hf" else "transformer.resblocks.0.attn.in_proj_weight"
        assert te.prefix + marker in keys
    # the file is also readable without sdlab's metadata: plain inference gives the same bundle
    state = bundle_state_dict(second)
    write_safetensors_atomic(tmp_path / "bare.safetensors", state)
    assert_same_configs(first, load_bundle(tmp_path / "bare.safetensors"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_load_in_half_precision(bundles, originals, dtype):
    loaded = load_bundle(originals["sd2"], dtype=dtype)
    for name, module in _modules(loaded).items():
        reference = _modules(bundles["sd2"])[name].state_dict()
        for key, value in module.state_dict().items():
            assert value.dtype == dtype and torch.equal(value, reference[key].to(dtype)), f"{name}.{key}"
    assert loaded.dtype == dtype and loaded.device == torch.device("cpu")


def test_half_precision_file_loads_in_float32(bundles, tmp_path):
    path = save_bundle(bundles["sd1"], tmp_path / "half.safetensors", dtype=torch.float16)
    loaded = load_bundle(path)
    assert loaded.dtype == torch.float32
    assert loaded.report.components[0].dtypes == ("float16",)
    ref = bundles["sd1"].unet.state_dict()
    assert all(torch.equal(v, ref[k].half().float()) for k, v in loaded.unet.state_dict().items())


# --- diffusers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_diffusers_folder_matches_single_file(bundles, originals, tmp_path, name):
    built = bundles[name]
    folder = write_diffusers_folder(built, tmp_path / "pipeline")
    from_folder = load_bundle(folder)
    from_file = load_bundle(originals[name])
    assert_same_configs(from_file, from_folder)
    assert from_folder.report.family_source.startswith("model_index.json")
    assert from_folder.report.prediction_source == "scheduler/scheduler_config.json prediction_type"
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([250.0])
    ctx = torch.randn(1, 77, built.unet_config.context_dim, generator=g)
    y = torch.randn(1, built.unet_config.adm_in_channels, generator=g) if built.family.is_sdxl else None
    img = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        unet_diff = (from_file.unet(x, t, ctx, y) - from_folder.unet(x, t, ctx, y)).abs().max()
        vae_diff = (from_file.vae.decode(x) - from_folder.vae.decode(x)).abs().max()
        enc_diff = (from_file.vae.encode(img).mean - from_folder.vae.encode(img).mean).abs().max()
        ids = built.text_encoders[0].tokenizer(["a red cube on a blue sphere"])
        text_diff = max((a.model(ids).last_hidden_state - b.model(ids).last_hidden_state).abs().max()
                        for a, b in zip(from_file.text_encoders, from_folder.text_encoders))
    assert unet_diff <= 1e-6 and vae_diff <= 1e-6 and enc_diff <= 1e-6 and text_diff <= 1e-6
    assert_same_weights(from_file, from_folder)
    hidden = [te.spec.hidden_state for te in from_folder.text_encoders]
    assert hidden == {"sd1": ["last"], "sdxl": ["penultimate", "penultimate"]}[name]


@pytest.mark.parametrize("layers, down", [
    ([0, 2], ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]),   # a level of 0 transformer layers ("mid")
    ([0, 0], ["DownBlock2D", "DownBlock2D"]),                     # a middle block of 0 layers ("small")
])
def test_unets_with_transformers_of_no_layers_load_from_folders_and_files(tmp_path, layers, down):
    """diffusers keeps a CrossAttn block's norm / proj_in / proj_out when it has 0 transformer layers (SDXL's
    "small" and "mid" ControlNet layouts): such a U-Net loads from a diffusers folder and from an original
    single file (detected by its structure) and gives diffusers' output."""
    from diffusers import UNet2DConditionModel

    empty = (0,) if down[0] == "CrossAttnDownBlock2D" else ()
    cfg = replace(tiny_unet_config(get_family("sdxl")), transformer_depth=(0, layers[1] if empty else 0),
                  transformer_depth_middle=layers[-1], empty_transformer_levels=empty)
    built = create.new_bundle("sdxl", tiny=True, unet=cfg, seed=3)
    randomize_(built.unet, 3)
    folder = write_diffusers_folder(built, tmp_path / "pipeline")
    written = json.loads((folder / "unet" / "config.json").read_text())
    assert written["down_block_types"] == down and written["transformer_layers_per_block"][-1] == layers[-1]
    reference = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    assert len(reference.mid_block.attentions[0].transformer_blocks) == layers[-1]
    if empty:
        assert len(reference.down_blocks[0].attentions[0].transformer_blocks) == 0
    from_folder = load_bundle(folder, dtype=torch.float32)
    from_file = load_bundle(write_original(from_folder, tmp_path / "model.safetensors"), dtype=torch.float32)
    assert from_file.family.name == "sdxl" and from_folder.unet_config == cfg
    # a U-Net that reads no text context ("small") shows no context width: the family's stands in
    assert from_file.unet_config == (cfg if empty else replace(cfg, context_dim=get_family("sdxl").unet.context_dim))
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([250.0, 700.0])
    ctx = torch.randn(2, 77, cfg.context_dim, generator=g)
    pooled = torch.randn(2, cfg.adm_in_channels - 6 * 256, generator=g)
    sizes = torch.tensor([[64.0, 64, 0, 0, 64, 64], [96.0, 64, 8, 0, 64, 64]])
    with torch.no_grad():
        expected = reference(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": sizes}).sample
        for loaded in (from_folder, from_file):
            actual = loaded.unet(x, t, ctx, sdxl_vector(pooled, sizes))
            torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_sd2_diffusers_folder_fp16_variant_and_v_prediction(bundles, originals, tmp_path):
    built = bundles["sd2"]
    folder = write_diffusers_folder(built, tmp_path / "pipe")
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    unet_file.rename(folder / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    scheduler = folder / "scheduler" / "scheduler_config.json"
    scheduler.write_text(scheduler.read_text().replace('"epsilon"', '"v_prediction"'))
    assert_same_weights(load_bundle(originals["sd2"]), load_bundle(folder))
    # diffusers' SD2 text encoder is already cut after the penultimate layer and used with its final norm
    assert [te.spec.hidden_state for te in load_bundle(folder).text_encoders] == ["last"]
    loaded = load_bundle(folder, dtype=torch.bfloat16)
    assert loaded.prediction is Prediction.V and loaded.dtype == torch.bfloat16
    # saved from a diffusers folder, the truncated SD2 tower keeps its "last" hidden state through the file
    saved = load_bundle(save_bundle(loaded, tmp_path / "from_folder.safetensors"), dtype=torch.bfloat16)
    assert [te.spec.hidden_state for te in saved.text_encoders] == ["last"]
    assert_same_weights(loaded, saved)


def test_diffusers_from_single_file_reads_sdlab_files(bundles, tmp_path, monkeypatch):
    """diffusers' own single-file loader, offline, with a local config folder (`config=`) for the reduced
    model: no hub access is needed because every component config is in that folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from diffusers import StableDiffusionPipeline

    built = bundles["sd1"]
    path = save_bundle(built, tmp_path / "sdlab-sd1.safetensors")
    config = write_diffusers_folder(built, tmp_path / "config", weights=False)
    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=str(config), local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    g = torch.Generator().manual_seed(2)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999.0, 1.0]), torch.randn(2, 77, 64, generator=g)
    ids = built.text_encoders[0].tokenizer(["a photograph of an astronaut riding a horse", ""])
    with torch.no_grad():
        unet_diff = (built.unet(x, t, ctx) - pipe.unet(x, t, encoder_hidden_states=ctx).sample).abs().max()
        vae_diff = (built.vae.decode(x) - pipe.vae.decode(x).sample).abs().max()
        text_diff = (built.text_encoders[0].model(ids).last_hidden_state - pipe.text_encoder(ids).last_hidden_state).abs().max()
    assert unet_diff < 1e-4 and vae_diff < 1e-4 and text_diff < 1e-4
    assert pipe.tokenizer("a photograph of an astronaut riding a horse").input_ids == [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]


# --- standalone VAE --------------------------------------------------------------------------------------


def test_standalone_vae_override(bundles, originals, tmp_path):
    other = randomize_(AutoencoderKL(TINY_VAE), seed=99)
    reference = other.state_dict()
    bare = write_safetensors_atomic(tmp_path / "vae-bare.safetensors", {**reference, "model_ema.decay": torch.tensor(1.0)})
    torch.save({"state_dict": {"first_stage_model." + k: v for k, v in reference.items()}}, tmp_path / "vae-prefixed.ckpt")
    folder = write_diffusers_folder(bundles["sd1"], tmp_path / "pipe")
    from diffusers import AutoencoderKL as DiffusersVAE

    from sdlab.checkpoints.diffusers_vae import vae_state_dict_to_diffusers

    dvae = DiffusersVAE.from_pretrained(folder / "vae")
    dvae.load_state_dict(vae_state_dict_to_diffusers(reference, TINY_VAE))
    dvae.save_pretrained(tmp_path / "vae-diffusers")
    single_diffusers = tmp_path / "diffusers-vae-file" / "vae.safetensors"
    write_safetensors_atomic(single_diffusers, vae_state_dict_to_diffusers(reference, TINY_VAE))

    for source in (bare, tmp_path / "vae-prefixed.ckpt", tmp_path / "vae-diffusers", single_diffusers):
        loaded = load_bundle(originals["sd1"], vae=source)
        assert loaded.vae_config == TINY_VAE
        assert all(torch.equal(v, reference[k]) for k, v in loaded.vae.state_dict().items()), source
        assert any(k.startswith("first_stage_model.") for k in loaded.report.ignored)    # the file's own VAE
        assert torch.equal(loaded.unet.out[2].weight, bundles["sd1"].unet.out[2].weight)

    # a U-Net + text file without a VAE needs the override, and says so
    no_vae = write_original(bundles["sd1"], tmp_path / "no-vae.safetensors", drop=("first_stage_model.",))
    with pytest.raises(CheckpointError, match="has no VAE .* pass a VAE file"):
        load_bundle(no_vae)
    assert load_bundle(no_vae, vae=bare).vae_config == TINY_VAE

    write_safetensors_atomic(tmp_path / "not-vae.safetensors", {"lora_down.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="not a VAE file: key lora_down.weight"):
        load_bundle(originals["sd1"], vae=tmp_path / "not-vae.safetensors")


# --- full size (opt-in) ----------------------------------------------------------------------------------

_MEASURE_LOAD = """
import resource, sys, json, torch
from sdlab.checkpoints.load import load_bundle
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
bundle = load_bundle(sys.argv[1], dtype=torch.float16)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_kib": before, "after_kib": after, "family": bundle.family.name,
                  "unet_default": bundle.unet_config == bundle.family.unet, "vae_default": bundle.vae_config == bundle.family.vae,
                  "text_default": bundle.text_configs == tuple(te.config for te in bundle.family.text_encoders)}))
"""


@pytest.mark.slow
def test_full_size_sd15_loads_with_one_copy_of_the_weights(tmp_path):
    """A full-size SD1.5 file (random fp16 weights + real-file junk keys) loads with the released configs, and the
    process's peak RSS grows by one copy of the weights (measured: 2.11 GiB for a 2.13 GB file)."""
    import subprocess
    import sys

    from bundle_fixtures import full_size_shapes

    g = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in full_size_shapes("sd1").items():
        state[key] = (torch.randn(shape, generator=g) * 0.02).half() if len(shape) else torch.tensor(1.0)
    path = write_safetensors_atomic(tmp_path / "sd15-random.safetensors", state)
    weight_bytes = sum(t.numel() * t.element_size() for t in state.values())
    del state
    out = subprocess.run([sys.executable, "-c", _MEASURE_LOAD, str(path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["family"] == "sd1" and result["unet_default"] and result["vae_default"] and result["text_default"]
    grown = (result["after_kib"] - result["before_kib"]) * 1024
    assert grown < 1.25 * weight_bytes, (grown, weight_bytes)


@pytest.mark.parametrize("key", ["output_blocks.11.1.transformer_blocks.0.norm1.bias",
                                 "up_blocks.3.attentions.2.transformer_blocks.0.norm1.bias"])
def test_sd2_prediction_read_from_the_weights_as_comfyui_reads_it(key):
    """ComfyUI `SD20.model_type`: the last output block's first transformer norm1.bias, std > 0.09 => v (768-v
    releases), else eps (512 base); stated types (metadata, marker keys) win, and SD1 never looks."""
    from sdlab.checkpoints.load import resolve_prediction
    from sdlab.diffusion.prediction import Prediction
    from sdlab.families import get_family

    wide, narrow = torch.randn(1024) * 0.2, torch.randn(1024) * 0.02
    sd2 = get_family("sd2")
    assert resolve_prediction(sd2, argument=None, metadata={}, path=None, unet_state={key: wide})[0] is Prediction.V
    assert resolve_prediction(sd2, argument=None, metadata={}, path=None, unet_state={key: narrow})[0] is Prediction.EPS
    stated = resolve_prediction(sd2, argument=None, metadata={"modelspec.prediction_type": "epsilon"}, path=None,
                                unet_state={key: wide})
    assert stated[0] is Prediction.EPS
    assert resolve_prediction(get_family("sd1"), argument=None, metadata={}, path=None,
                              unet_state={key: wide})[0] is Prediction.EPS


_V2_INFERENCE_YAML = """model:
  base_learning_rate: 1.0e-4
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    image_size: 64
    channels: 4
    scale_factor: 0.18215
"""


def _sgm_yaml(scaling: str) -> str:
    return ("model:\n  target: sgm.models.diffusion.DiffusionEngine\n  params:\n    scale_factor: 0.13025\n"
            "    denoiser_config:\n      target: sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser\n"
            f"      params:\n        scaling_config:\n          target: sgm.modules.diffusionmodules.denoiser_scaling.{scaling}\n")


def _a1111_parameterization(config: dict) -> str:
    """A1111 takes the `<name>.yaml` beside a file as its config before any guess (sd_models_config.
    find_checkpoint_config), so nothing else counts: LDM's `DDPM.__init__(..., parameterization="eps")`, or for an
    SGM config sd_models_xl.extend_sdxl's `"v" if isinstance(model.denoiser.scaling, VScaling) else "eps"`."""
    params = config["model"]["params"]
    if "denoiser_config" in params:
        target = params["denoiser_config"]["params"]["scaling_config"]["target"]
        return "v" if target.rsplit(".", 1)[-1] == "VScaling" else "eps"
    return params.get("parameterization", "eps")


@pytest.mark.parametrize("family, sidecar, marker", [
    ("sd2", _V2_INFERENCE_YAML, False),                  # the 512 base config: eps, whatever the weights say
    ("sd2", _V2_INFERENCE_YAML, True),                   # the config beats a v_pred key, as in A1111
    ("sd2", _V2_INFERENCE_YAML.replace("params:\n", "params:\n    parameterization: \"v\"\n"), False),
    ("sdxl", _sgm_yaml("VScaling"), False),               # A1111's sd_xl_v.yaml
    ("sdxl", _sgm_yaml("EpsScaling"), True),
], ids=["v2-inference", "v2-inference+v_pred", "v2-inference-v", "sd_xl_v", "sd_xl_base+v_pred"])
def test_a_sidecar_config_says_the_prediction_as_a1111_reads_it(family, sidecar, marker, tmp_path):
    import yaml

    from sdlab.checkpoints.load import resolve_prediction

    key = "output_blocks.11.1.transformer_blocks.0.norm1.bias"
    wide = {key: torch.randn(1024, generator=torch.Generator().manual_seed(0)) * 0.2}   # v by ComfyUI's rule
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    (tmp_path / "model.yaml").write_text(sidecar)
    keys = {"v_pred": ()} if marker else {}
    spec = get_family(family)
    prediction, source = resolve_prediction(spec, argument=None, metadata={}, path=path, keys=keys, unet_state=wide)
    assert prediction.value == _a1111_parameterization(yaml.safe_load(sidecar)) and source.startswith("sidecar model.yaml")
    assert resolve_prediction(spec, argument=None, metadata={"modelspec.prediction_type": "v"}, path=path, keys=keys,
                              unet_state=wide)[0] is Prediction.V               # metadata still comes first


def test_a_sidecar_that_is_no_model_config_is_passed_over(tmp_path):
    from sdlab.checkpoints.load import resolve_prediction

    key = "output_blocks.11.1.transformer_blocks.0.norm1.bias"
    wide = {key: torch.randn(1024, generator=torch.Generator().manual_seed(0)) * 0.2}
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    (tmp_path / "model.yaml").write_text("notes: trained for 10 epochs\n")
    prediction, source = resolve_prediction(get_family("sd2"), argument=None, metadata={}, path=path, unet_state=wide)
    assert prediction is Prediction.V and source.startswith("weights")
