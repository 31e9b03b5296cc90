"""End-to-end parity on diffusers folders whose configs are diffusers' own, not sdlab's tiny family configs.

tests/test_pipeline_parity.py writes its folders from sdlab bundles, so every config there is one sdlab wrote.
Here diffusers / transformers build each component from a config written the way released folders and
third-party trainers write them, with seeded random weights, and `save_pretrained` it; the ONE folder is then
drawn by diffusers' pipeline and by `sdlab.load`, with the same prompt, negative prompt, CFG, size, steps and
per-image generators (seed + i), on EulerDiscreteScheduler "leading" (sdlab: Euler, leading, VP start). The
uint8 pictures must agree within `MAX_PIXEL_DIFF` (2/255; measured 1/255 for each case).

- `sd2_like`: v-prediction, `upcast_attention`, `use_linear_projection`, `attention_head_dim` as a per-level list
  of head COUNTS giving 16-wide heads (not the family's 64), a ResNet-only last level, a 4-level VAE (factor 8)
  with `scaling_factor` 0.13025 and 2 ResNets a level. Drawn at 72 x 88 px: 9 x 11 latents, odd at every level
  of the U-Net. Then written by sdlab's `save_bundle` (original single-file layout, float16) and read back by
  sdlab and by diffusers' `from_single_file(config=folder)`: the same picture as the folder, each within 2/255.
- `sdxl_inpaint`: a 9-channel SDXL inpainting folder (StableDiffusionXLInpaintPipeline) with
  `transformer_layers_per_block` [1, 2, 3] (middle depth 3), non-square 64 x 80, batch 2, strength 1 and 0.6.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from bundle_fixtures import init_picture, lower_right_mask, randomize_, write_tokenizer_files
from picture_parity import MAX_PIXEL_DIFF, PROMPT, SEED, max_pixel_diff

import sdlab
from sdlab.checkpoints.save import save_bundle
from sdlab.diffusion.denoiser import Prediction

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

NEGATIVE = "blurry, low quality"
STEPS, CFG, BATCH = 4, 6.0, 2
EULER = dict(sampler="Euler", schedule="leading", init_noise="vp")

VAE_F8 = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
              up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[32, 32, 64, 64], layers_per_block=2,
              latent_channels=4, norm_num_groups=32, scaling_factor=0.13025)


def _scheduler(prediction: str) -> dict:
    return {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "beta_end": 0.012, "num_train_timesteps": 1000, "steps_offset": 1, "timestep_spacing": "leading",
            "prediction_type": prediction}


def _text_config(width: int, heads: int, act: str, pad: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=width, num_hidden_layers=3, num_attention_heads=heads,
                          intermediate_size=4 * width, hidden_act=act, max_position_embeddings=77,
                          projection_dim=width, bos_token_id=49406, eos_token_id=49407, pad_token_id=pad)


def _unet_config(in_channels: int, widths: list[int], layers: int, attends: list[bool], heads: list[int],
                 context: int, **extra) -> dict:
    """A UNet2DConditionModel config with linear projections: level i `widths[i]` wide, of `layers` blocks, with
    cross-attention (`heads[i]` heads: diffusers' `attention_head_dim` counts) where `attends[i]`, mirrored on the
    way up; `extra`: more of its fields."""
    return dict(in_channels=in_channels, out_channels=4, block_out_channels=widths, layers_per_block=layers,
                down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends],
                up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)],
                attention_head_dim=heads, cross_attention_dim=context, use_linear_projection=True, **extra)


def _write_folder(folder: Path, class_name: str, unet: dict, texts: dict, prediction: str, index: dict) -> Path:
    """A diffusers pipeline folder: each component built by diffusers / transformers from its config, seeded
    random weights, saved by its own `save_pretrained`. `texts`: subfolder -> (model class, config, pad token)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    randomize_(UNet2DConditionModel(**unet, sample_size=16), 5).save_pretrained(folder / "unet")
    randomize_(AutoencoderKL(**VAE_F8), 6).save_pretrained(folder / "vae")
    model_index = {"_class_name": class_name, "_diffusers_version": "0.42.1",
                   "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                   "scheduler": ["diffusers", "EulerDiscreteScheduler"], **index}
    for i, (sub, (cls, config, pad_token)) in enumerate(texts.items()):
        randomize_(cls(config), 7 + i).save_pretrained(folder / sub)
        tokenizer = sub.replace("text_encoder", "tokenizer")
        write_tokenizer_files(folder / tokenizer, pad_token)
        model_index |= {sub: ["transformers", cls.__name__], tokenizer: ["transformers", "CLIPTokenizer"]}
    (folder / "model_index.json").write_text(json.dumps(model_index))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(_scheduler(prediction)))
    return folder


def _generators() -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(SEED + i) for i in range(BATCH)]


@pytest.fixture(scope="module")
def sd2_like(tmp_path_factory) -> Path:
    from transformers import CLIPTextModel

    unet = _unet_config(4, [32, 64, 64], 1, [True, True, False], [2, 4, 4], 64, upcast_attention=True)
    return _write_folder(tmp_path_factory.mktemp("sd2-like"), "StableDiffusionPipeline", unet,
                         {"text_encoder": (CLIPTextModel, _text_config(64, 4, "gelu", 0), "!")}, "v_prediction",
                         {"safety_checker": [None, None], "feature_extractor": [None, None],
                          "requires_safety_checker": False})


SD2_SIZE = dict(width=72, height=88)


def _sd2_reference(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=BATCH, num_inference_steps=STEPS,
                guidance_scale=CFG, generator=_generators(), output_type="np", **SD2_SIZE).images


def test_sd2_like_folder_and_its_single_file(sd2_like, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from diffusers import StableDiffusionPipeline

    ours = sdlab.load(sd2_like)
    bundle = ours.bundle
    assert (bundle.prediction, bundle.scaling_factor) == (Prediction.V, 0.13025)
    assert (bundle.unet_config.head_dim, bundle.unet_config.upcast_attention) == (16, True)
    reference = _sd2_reference(StableDiffusionPipeline.from_pretrained(sd2_like, local_files_only=True))
    drawn = ours.txt2img(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=SEED, batch_size=BATCH, **SD2_SIZE,
                         **EULER).images
    assert max_pixel_diff(drawn, reference) <= MAX_PIXEL_DIFF

    path = save_bundle(bundle, tmp_path / "sd2-like.safetensors", dtype=torch.float16)
    again = sdlab.load(path).txt2img(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=SEED, batch_size=BATCH,
                                     **SD2_SIZE, **EULER).images
    assert max_pixel_diff(again, drawn) <= MAX_PIXEL_DIFF
    single = StableDiffusionPipeline.from_single_file(str(path), config=str(sd2_like), local_files_only=True,
                                                      safety_checker=None, requires_safety_checker=False)
    assert max_pixel_diff(_sd2_reference(single), reference) <= MAX_PIXEL_DIFF


@pytest.fixture(scope="module")
def sdxl_inpaint(tmp_path_factory) -> Path:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = _unet_config(9, [64, 128, 128], 2, [False, True, True], [1, 2, 2], 128,
                        transformer_layers_per_block=[1, 2, 3], addition_embed_type="text_time",
                        addition_time_embed_dim=256, projection_class_embeddings_input_dim=6 * 256 + 64)
    texts = {"text_encoder": (CLIPTextModel, _text_config(64, 1, "quick_gelu", 49407), "<|endoftext|>"),
             "text_encoder_2": (CLIPTextModelWithProjection, _text_config(64, 1, "gelu", 0), "!")}
    return _write_folder(tmp_path_factory.mktemp("sdxl-inpaint"), "StableDiffusionXLInpaintPipeline", unet, texts,
                         "epsilon", {"force_zeros_for_empty_prompt": True})


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_sdxl_9_channel_inpainting_folder(sdxl_inpaint, strength):
    """diffusers gets the image and mask once per image of the batch (it encodes one init image with generator 0
    only; see tests/test_pipeline_parity.py); sdlab keeps diffusers' unmasked pixels (paste_back=False)."""
    from diffusers import StableDiffusionXLInpaintPipeline

    ours = sdlab.load(sdxl_inpaint)
    assert (ours.bundle.family.name, ours.bundle.unet_config.transformer_depth_middle) == ("sdxl-inpaint", 3)
    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(sdxl_inpaint, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    width, height = 64, 80
    image, mask = init_picture(64).resize((width, height)), lower_right_mask(64).resize((width, height))
    reference = pipe([PROMPT] * BATCH, image=[image] * BATCH, mask_image=[mask] * BATCH, strength=strength,
                     negative_prompt=[NEGATIVE] * BATCH, num_inference_steps=STEPS, guidance_scale=CFG, width=width,
                     height=height, generator=_generators(), output_type="np").images
    drawn = ours.inpaint(PROMPT, image, mask, NEGATIVE, strength=strength, paste_back=False, steps=STEPS,
                         cfg_scale=CFG, seed=SEED, batch_size=BATCH, **EULER).images
    assert max_pixel_diff(drawn, reference) <= MAX_PIXEL_DIFF
