"""Checkpoints in the layouts users' files have, beyond the ones sdlab writes.

- A pickle whose one entry holds the state dict under another name than `state_dict` (`{"module": ...}`,
  `{"model": ...}`, as training scripts save them): unwrapped as ComfyUI's `load_torch_file` does (current
  comfyanonymous/ComfyUI comfy/utils.py: no `state_dict` entry and exactly one entry that is a dict -> that
  dict), and loads the same weights as the plain file.
- A full EMA copy of the U-Net (CompVis' `model_ema.<key without dots>`, other weights): left out, the
  U-Net's own weights drawn, as A1111 (`v1-inference.yaml`: `use_ema: False`, so `load_state_dict(strict=False)`
  leaves the EMA keys unused) and ComfyUI (no `model_ema.` prefix in its tables) draw them.
- A diffusers folder as `StableDiffusionPipeline.save_pretrained` writes a released SD1.5 folder: a safety
  checker and a feature extractor saved beside the model, the PNDM scheduler config; and the same folder with
  those two subfolders deleted (model_index.json still naming them). sdlab draws diffusers' picture (the same
  pipeline with `safety_checker=None`), within `MAX_PIXEL_DIFF` out of 255, and loads the same weights from both.
- torch's legacy (non-zip) pickle with Lightning's entries (SD2, SDXL) and ComfyUI's fp8 (float8_e4m3fn)
  checkpoints: the same weights (fp8: its values upcast exactly).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from bundle_fixtures import junk_keys, tiny_bundle, write_diffusers_folder
from picture_parity import CFG, MAX_PIXEL_DIFF, PROMPT, SEED, SIZE, STEPS, max_pixel_diff
from safetensors.torch import save_file

import sdlab
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.io import read_checkpoint
from sdlab.checkpoints.load import load_bundle
from sdlab.checkpoints.save import bundle_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def sd1():
    bundle = tiny_bundle("sd1", seed=5)
    state = {k: v.contiguous() for k, v in (bundle_state_dict(bundle) | junk_keys(bundle.family)).items()}
    return bundle, state


def _assert_same_weights(expected, loaded) -> None:
    pairs = [(expected.unet, loaded.unet), (expected.vae, loaded.vae),
             *((a.model, b.model) for a, b in zip(expected.text_encoders, loaded.text_encoders))]
    for a, b in pairs:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("wrapper", ["module", "model"])
def test_a_state_dict_in_a_files_one_entry_is_unwrapped_as_comfyui_does(sd1, tmp_path, wrapper):
    bundle, state = sd1
    path = tmp_path / f"wrapped-{wrapper}.ckpt"
    torch.save({wrapper: state}, path)
    _assert_same_weights(bundle, load_bundle(path))
    result = subprocess.run([sys.executable, "-m", "sdlab", "inspect", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "sd1 (detected)" in result.stdout


def test_only_a_single_entry_holding_a_dict_is_unwrapped(tmp_path):
    """Two entries are not a wrapper (ComfyUI keeps the whole dict), nor is one entry that is a tensor."""
    two = tmp_path / "two.ckpt"
    torch.save({"module": {"a": torch.zeros(2)}, "optimizer": {"b": torch.zeros(2)}}, two)
    with pytest.raises(CheckpointError, match="no tensors at the top level"):
        read_checkpoint(two)
    one_tensor = tmp_path / "one.ckpt"
    torch.save({"emb_params": torch.ones(1, 4)}, one_tensor)
    assert list(read_checkpoint(one_tensor)[0]) == ["emb_params"]
    # nested readers (embeddings, ControlNets, ...) keep reading every level with its full name
    embedding = tmp_path / "ti.pt"
    torch.save({"string_to_param": {"*": torch.ones(1, 4)}}, embedding)
    assert list(read_checkpoint(embedding, nested=True)[0]) == ["string_to_param.*"]


def test_a_full_ema_copy_is_left_out_and_the_unets_own_weights_drawn(sd1, tmp_path):
    bundle, state = sd1
    ema = {"model_ema." + k[len("model."):].replace(".", ""): v + 1.0
           for k, v in state.items() if k.startswith("model.diffusion_model.")}
    assert len(ema) == sum(1 for _ in bundle.unet.state_dict())
    path = tmp_path / "with-ema.safetensors"
    save_file({**state, **ema}, str(path))
    loaded = load_bundle(path)
    _assert_same_weights(bundle, loaded)
    assert set(ema) <= set(loaded.report.ignored)


@pytest.fixture(scope="module")
def released_sd1_folder(tmp_path_factory):
    """A tiny SD1 folder saved by `StableDiffusionPipeline.save_pretrained` with a (tiny) safety checker, a
    feature extractor and SD1.5's PNDM scheduler config, as released SD1.5 folders are."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessorPil

    root = tmp_path_factory.mktemp("released")
    plain = StableDiffusionPipeline.from_pretrained(write_diffusers_folder(tiny_bundle("sd1", seed=3), root / "plain"),
                                                    local_files_only=True)
    tower = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    checker = StableDiffusionSafetyChecker(CLIPConfig(text_config=tower, vision_config=dict(
        tower, image_size=32, patch_size=8), projection_dim=16))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
    released = StableDiffusionPipeline(
        vae=plain.vae, text_encoder=plain.text_encoder, tokenizer=plain.tokenizer, unet=plain.unet, scheduler=scheduler,
        safety_checker=checker, feature_extractor=CLIPImageProcessorPil(crop_size=32, size=32),
        requires_safety_checker=True)
    folder = root / "released"
    released.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]
    assert index["feature_extractor"][0] == "transformers" and (folder / "safety_checker").is_dir()
    return folder


def test_a_folder_saved_with_its_safety_checker_draws_diffusers_picture(released_sd1_folder):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(released_sd1_folder, safety_checker=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    config = pipe.scheduler.config
    pipe.scheduler = EulerDiscreteScheduler.from_config({key: config[key] for key in (
        "num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "steps_offset", "timestep_spacing",
        "prediction_type")})
    reference = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=CFG, width=SIZE, height=SIZE,
                     generator=torch.Generator().manual_seed(SEED), output_type="np").images
    ours = sdlab.load(released_sd1_folder, dtype="fp32").txt2img(
        PROMPT, steps=STEPS, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE, sampler="Euler", schedule="leading",
        init_noise="vp")
    assert max_pixel_diff(ours.images, reference) <= MAX_PIXEL_DIFF


def test_a_folder_whose_safety_checker_was_deleted_loads_the_same_weights(released_sd1_folder, tmp_path):
    trimmed = shutil.copytree(released_sd1_folder, tmp_path / "trimmed")
    shutil.rmtree(trimmed / "safety_checker")
    shutil.rmtree(trimmed / "feature_extractor")
    _assert_same_weights(load_bundle(released_sd1_folder), load_bundle(trimmed))
    result = subprocess.run([sys.executable, "-m", "sdlab", "inspect", str(trimmed)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_a_legacy_pickle_with_lightning_entries_loads_the_same_weights(family, tmp_path):
    """torch's pre-1.6 (non-zip) format, the weights under `state_dict` beside `global_step` / `epoch`, as
    CompVis-era training wrote them; SD2's OpenCLIP tower and SDXL's two towers converted as from a .safetensors."""
    bundle = tiny_bundle(family, seed=6)
    state = {k: v.contiguous() for k, v in (bundle_state_dict(bundle) | junk_keys(bundle.family)).items()}
    path = tmp_path / f"{family}-legacy.ckpt"
    torch.save({"state_dict": state, "global_step": 470000, "epoch": 6}, path, _use_new_zipfile_serialization=False)
    with open(path, "rb") as f:
        assert not f.read(4).startswith(b"PK")                     # really the legacy format
    loaded = load_bundle(path)
    assert loaded.family is bundle.family
    _assert_same_weights(bundle, loaded)


def test_an_fp8_checkpoint_loads_its_weights_upcast(sd1, tmp_path):
    """ComfyUI's fp8 checkpoints: the U-Net's matrices stored as float8_e4m3fn, the rest fp16. ComfyUI computes
    with those values upcast (every fp8 value is exact in fp16 / bf16 / fp32); sdlab loads them so."""
    bundle, state = sd1
    stored = {k: (v.to(torch.float8_e4m3fn) if k.startswith("model.diffusion_model.") and v.ndim > 1 else v.half())
              for k, v in state.items() if v.is_floating_point()}
    path = tmp_path / "fp8.safetensors"
    save_file(stored, str(path))
    unet = load_bundle(path, dtype=torch.float32).unet.state_dict()
    for key, value in unet.items():
        assert torch.equal(value, stored["model.diffusion_model." + key].float()), key
    result = subprocess.run([sys.executable, "-m", "sdlab", "txt2img", "x", "--model", str(path), "--steps", "2",
                             "--width", "32", "--height", "32", "--out", str(tmp_path / "fp8.png")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "fp8.png").is_file()
