"""Detection by structure, not widths: a reduced SD1 single file with a 128-wide context is SD1, not sdlab-tiny.

The model is the shape of the tiny SD1 test pipelines the ecosystem uses (U-Net 32-64-128-128 over 4 levels,
32-group norms, 8 heads, 1x1-conv projections; f=8 VAE; a 128-wide CLIP text tower). It is built by
diffusers / transformers from their configs, saved as a diffusers folder, loaded by sdlab and written back
as an original single file by the project's own writer WITHOUT sdlab metadata (as released files are). That
file must be detected as sd1 (its 9-channel variant as sd1-inpaint), its sizes inferred from the tensors,
and it must draw diffusers' picture from the folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_fixtures import randomize_, write_original, write_tokenizer_files

import sdlab
from sdlab.checkpoints.detect import detect_family
from sdlab.checkpoints.io import read_checkpoint, shapes_of
from sdlab.checkpoints.load import load_bundle, plan_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SIZE = 64               # pixels: 8 x 8 latents through the f=8 VAE, 1 x 1 at the U-Net's bottom level
STEPS = 4
SEED = 7
PROMPT = "a photograph of an astronaut riding a horse"
MAX_PIXEL_DIFF = 3      # out of 255


def _write_reduced_sd1_folder(folder: Path, in_channels: int = 4) -> Path:
    """A diffusers StableDiffusion(Inpaint)Pipeline folder of the ecosystem's tiny-SD1 shape, random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=SIZE // 8, in_channels=in_channels, out_channels=4, block_out_channels=(32, 64, 128, 128),
        layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=128,
        attention_head_dim=8, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64, 128, 128), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=1, norm_num_groups=32,
        sample_size=SIZE,
    )
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
        hidden_act="quick_gelu", max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    ))
    for i, module in enumerate((unet, vae, text)):
        randomize_(module, 100 + i)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    write_tokenizer_files(folder / "tokenizer")
    pipeline = "StableDiffusionPipeline" if in_channels == 4 else "StableDiffusionInpaintPipeline"
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": pipeline, "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False,
    }))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "beta_end": 0.012, "num_train_timesteps": 1000, "steps_offset": 1, "timestep_spacing": "leading",
        "prediction_type": "epsilon",
    }))
    return folder


def _single_file_of(folder: Path, path: Path) -> Path:
    """The folder's weights in the original single-file layout, with no sdlab metadata."""
    return write_original(load_bundle(folder), path, junk=False)


@pytest.fixture(scope="module")
def reduced_sd1(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("reduced-sd1")
    folder = _write_reduced_sd1_folder(root / "pipe")
    return folder, _single_file_of(folder, root / "reduced-sd1.safetensors")


def test_reduced_sd1_single_file_is_sd1_with_inferred_sizes(reduced_sd1):
    _, path = reduced_sd1
    state, metadata = read_checkpoint(path)
    assert "sdlab.family" not in metadata and "sdlab.config" not in metadata
    assert detect_family(shapes_of(state)).name == "sd1"
    report = plan_checkpoint(path).report
    assert (report.family.name, report.family_source) == ("sd1", "detected")
    unet, vae, text = (c.config for c in report.components)
    assert (unet.model_channels, unet.channel_mult, unet.num_res_blocks, unet.context_dim) == (32, (1, 2, 4, 4), 2, 128)
    assert (unet.num_heads, unet.norm_groups, unet.use_linear_proj) == (8, 32, False)
    assert (vae.base_channels, vae.channel_mult, vae.norm_groups, vae.downsample_factor) == (32, (1, 2, 4, 4), 32, 8)
    assert (text.width, text.layers, text.heads) == (128, 2, 2)


def test_reduced_sd1_single_file_draws_diffusers_picture(reduced_sd1):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    folder, path = reduced_sd1
    reference_pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    reference_pipe.scheduler = EulerDiscreteScheduler.from_config(reference_pipe.scheduler.config)
    reference_pipe.set_progress_bar_config(disable=True)
    reference = reference_pipe(
        PROMPT, num_inference_steps=STEPS, guidance_scale=5.0, width=SIZE, height=SIZE,
        generator=[torch.Generator("cpu").manual_seed(SEED)], output_type="np",
    ).images
    ours = sdlab.load(path).txt2img(PROMPT, steps=STEPS, cfg_scale=5.0, seed=SEED, width=SIZE, height=SIZE,
                                    sampler="Euler", schedule="leading", init_noise="vp")
    a = np.asarray(ours.images[0]).astype(np.int16)
    b = (reference[0] * 255).round().astype(np.int16)
    assert b.std() > 20, "the reference picture is nearly flat: the comparison would prove little"
    assert int(np.abs(a - b).max()) <= MAX_PIXEL_DIFF


def test_reduced_sd1_inpainting_file_is_sd1_inpaint(tmp_path):
    folder = _write_reduced_sd1_folder(tmp_path / "pipe", in_channels=9)
    path = _single_file_of(folder, tmp_path / "reduced-sd1-inpainting.safetensors")
    bundle = load_bundle(path)
    assert bundle.family.name == "sd1-inpaint" and bundle.unet_config.in_channels == 9
    assert bundle.unet_config.context_dim == 128 and bundle.vae_config.downsample_factor == 8


def test_sdlab_tiny_structure_without_metadata_is_still_sdlab_tiny(tmp_path):
    """sdlab's own model saved without metadata keeps its own structure (Linear projections, f=4 VAE)."""
    from sdlab.checkpoints.create import new_bundle

    path = write_original(new_bundle("sdlab-tiny", seed=0), tmp_path / "tiny.safetensors", junk=False)
    assert detect_family(shapes_of(read_checkpoint(path)[0])).name == "sdlab-tiny"
    assert plan_checkpoint(path).report.family.name == "sdlab-tiny"


def test_text_towers_narrower_than_one_head_get_one_head():
    from sdlab.checkpoints.infer import infer_text_config
    from sdlab.families import get_family
    from sdlab.models.clip import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in CLIPTextModel(CLIPTextConfig(width=32, heads=1, mlp_width=37, layers=2)).state_dict().items()}
    config = infer_text_config(shapes, get_family("sd1").text_encoders[0].config)
    assert (config.width, config.heads, config.mlp_width, config.layers) == (32, 1, 37, 2)
