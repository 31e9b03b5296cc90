"""Asymmetric U-Nets (Segmind's SSD-1B and Vega): blocks of one level with transformers of different depths, and a
middle block without transformer.

diffusers builds them from `transformer_layers_per_block` given per layer (down blocks), its
`reverse_transformer_layers_per_block` (up blocks, per layer) and `mid_block_type="UNetMidBlock2D"` (one ResNet, no
attention). The tiny SDXL folder's U-Net is replaced by diffusers' `UNet2DConditionModel` of two such configs with
seeded random weights (3 levels, 2 layers per block):

  ssd    SSD-1B's shape: per-level down depths, up blocks per layer (the deepest level's last block the deepest),
         and the ResNet-only middle block
  mixed  down depths per layer, an empty transformer (0 blocks) in a down and an up block, a transformer middle

The proof: (a) sdlab's U-Net output equals diffusers' for the same inputs (1e-5) loaded from the folder; (b) the
same weights in the original single-file layout, whose key names show every block's depth, load to the same
config and output; (c) sdlab's diffusers config writer gives the config back, and diffusers builds the same
parameter names from it; (d) the SSD-1B-shaped folder draws `StableDiffusionXLPipeline`'s picture.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from picture_parity import (
    MAX_PIXEL_DIFF,
    PROMPT,
    SEED,
    SIZE,
    max_pixel_diff,
)
from test_pipeline_parity import (
    NEGATIVE,
    _as_released,
    _generators,
    _quiet,
    _schedulers,
)

import sdlab
from bundle_fixtures import randomize_, tiny_bundle, write_diffusers_folder, write_original
from sdlab.checkpoints.diffusers_unet import unet_config_from_diffusers, unet_config_to_diffusers, unet_key_map
from sdlab.models.layers import timestep_embedding

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

LEVELS = dict(block_out_channels=[64, 128, 128], layers_per_block=2, attention_head_dim=[1, 2, 2],
              down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
              up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"])
CONFIGS = {
    "ssd": dict(LEVELS, transformer_layers_per_block=[1, 2, 2],
                reverse_transformer_layers_per_block=[[2, 2, 3], [2, 1, 1], [1, 1, 1]], mid_block_type="UNetMidBlock2D"),
    "mixed": dict(LEVELS, transformer_layers_per_block=[1, [1, 2], [2, 0]],
                  reverse_transformer_layers_per_block=[[3, 2, 1], [0, 1, 2], 1]),
}


_FOLDERS: dict[str, Path] = {}  # one written folder per config and process: the tests only read them


def _folder(tmp_path_factory, name: str) -> Path:
    if name not in _FOLDERS:
        bundle = tiny_bundle("sdxl", seed=11)
        path = _as_released(write_diffusers_folder(bundle, tmp_path_factory.mktemp(name) / "pipe"))
        config = json.loads((path / "unet" / "config.json").read_text())
        unet = UNet2DConditionModel.from_config({**config, **CONFIGS[name]})
        randomize_(unet, seed=7)
        unet.save_pretrained(path / "unet")
        _FOLDERS[name] = path
    return _FOLDERS[name]


@pytest.fixture(scope="module", params=list(CONFIGS))
def folder(request, tmp_path_factory):
    return request.param, _folder(tmp_path_factory, request.param)


def _inputs(reference: UNet2DConditionModel):
    """(x, t, context, text_embeds, time_ids) for a batch of 2, and sdlab's vector y of the last two."""
    g = torch.Generator().manual_seed(3)
    config = reference.config
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999.0, 259.0])
    context = torch.randn(2, 77, config.cross_attention_dim, generator=g)
    text_embeds, time_ids = torch.randn(2, pooled, generator=g), torch.tensor([[48.0, 40, 4, 2, 32, 32]] * 2)
    sizes = timestep_embedding(time_ids.flatten(), config.addition_time_embed_dim).reshape(2, -1)
    return (x, t, context, text_embeds, time_ids), torch.cat([text_embeds, sizes], dim=1)


def _same_unet(unet, reference: UNet2DConditionModel) -> float:
    (x, t, context, text_embeds, time_ids), y = _inputs(reference)
    with torch.inference_mode():
        expected = reference(x, t, context, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
        return float((unet(x, t, context, y) - expected).abs().max())


def test_unet_output_is_diffusers(folder):
    name, path = folder
    ours = sdlab.load(path).bundle
    config = ours.unet_config
    assert config.input_depths or config.output_depths
    assert config.middle_transformer == (name != "ssd")
    assert _same_unet(ours.unet, UNet2DConditionModel.from_pretrained(path / "unet").eval()) <= 1e-5


def test_single_file_layout_loads_the_same_unet(folder, tmp_path):
    _, path = folder
    bundle = sdlab.load(path).bundle
    single = sdlab.load(write_original(bundle, tmp_path / "model.safetensors")).bundle
    assert single.unet_config == bundle.unet_config
    assert _same_unet(single.unet, UNet2DConditionModel.from_pretrained(path / "unet").eval()) <= 1e-5


def test_diffusers_config_round_trips(folder):
    name, _ = folder
    config = unet_config_from_diffusers(CONFIGS[name])
    written = unet_config_to_diffusers(config)
    assert unet_config_from_diffusers(written) == config
    names = set(UNet2DConditionModel.from_config(written).state_dict())
    assert names == set(unet_key_map(config).values())


def test_ssd1b_shaped_model_draws_diffusers_picture(tmp_path_factory):
    path = _folder(tmp_path_factory, "ssd")
    pipe = _quiet(StableDiffusionXLPipeline.from_pretrained(path, local_files_only=True))
    pipe.scheduler, options = _schedulers(pipe.scheduler.config)["euler"]
    reference = pipe(PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=2, num_inference_steps=3,
                     guidance_scale=5.0, width=SIZE, height=SIZE, generator=_generators(2), output_type="np").images
    ours = sdlab.load(path).txt2img(PROMPT, NEGATIVE, steps=3, cfg_scale=5.0, seed=SEED, width=SIZE, height=SIZE,
                                    batch_size=2, **options)
    assert max_pixel_diff(ours.images, reference) <= MAX_PIXEL_DIFF
