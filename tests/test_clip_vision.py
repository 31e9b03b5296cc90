"""sdlab's CLIP image encoder and CLIP picture preprocessing against transformers on the same random weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

from ip_adapter_fixtures import SAMPLE_PICTURE, write_image_encoder
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.image_encoder import load_image_encoder
from sdlab.models.clip_vision import VIT_BIGG_14, VIT_H_14, CLIPVisionModel
from sdlab.pipeline.clip_image import clip_pixels


def _pictures() -> dict[str, Image.Image]:
    photo = Image.open(SAMPLE_PICTURE)
    return {"wide": photo.convert("RGB").crop((0, 0, 301, 157)), "tall": photo.convert("RGB").crop((40, 10, 190, 333)),
            "rgba": photo.convert("RGBA").crop((5, 5, 230, 230)), "small": photo.convert("RGB").resize((97, 61)),
            "grey": photo.convert("L").crop((0, 0, 255, 256))}


@pytest.mark.parametrize("name", ["wide", "tall", "rgba", "small", "grey"])
def test_pixels_are_clip_image_processors(name):
    picture = _pictures()[name]
    # transformers' Pillow backend: what CLIPImageProcessor() is without torchvision (absent here: it falls back to
    # CLIPImageProcessorPil); torchvision's backend resizes with its own bicubic and is not what sdlab matches
    expected = CLIPImageProcessorPil()(picture, return_tensors="pt").pixel_values[0]   # (3, 224, 224)
    ours = clip_pixels(picture)
    assert ours.shape == expected.shape == (3, 224, 224)
    assert torch.equal(ours, expected)          # Pillow's bicubic on both sides: the same bytes, the same float ops


def test_encoder_matches_transformers(tmp_path):
    reference = write_image_encoder(tmp_path / "image_encoder", seed=3)
    encoder = load_image_encoder(tmp_path / "image_encoder")
    assert encoder.config.width == 128 and encoder.config.heads == 2 and encoder.config.layers == 2
    pixels = torch.stack([clip_pixels(p) for p in list(_pictures().values())[:2]])    # (2, 3, 224, 224)
    with torch.no_grad():
        expected = reference(pixel_values=pixels, output_hidden_states=True)
        ours = encoder.model(pixels)
    assert len(ours.hidden_states) == len(expected.hidden_states) == 3
    for mine, theirs in zip(ours.hidden_states, expected.hidden_states):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.image_embeds, expected.image_embeds, rtol=0, atol=1e-5)


def test_quick_gelu_tower_and_lone_file_errors(tmp_path):
    reference = write_image_encoder(tmp_path / "enc", seed=4, act="quick_gelu")
    encoder = load_image_encoder(tmp_path / "enc")
    pixels = clip_pixels(Image.open(SAMPLE_PICTURE)).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(encoder.model(pixels).image_embeds, reference(pixel_values=pixels).image_embeds,
                                   rtol=0, atol=1e-5)
    lone = tmp_path / "lone.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(lone))
    with pytest.raises(CheckpointError, match="128-wide CLIP vision tower is none of the known ones"):
        load_image_encoder(lone)
    with pytest.raises(CheckpointError, match="no such image encoder"):
        load_image_encoder(tmp_path / "nothere")
    junk = tmp_path / "junk.safetensors"
    save_file({"a": torch.zeros(2)}, str(junk))
    with pytest.raises(CheckpointError, match="not a CLIP image encoder"):
        load_image_encoder(junk)


@pytest.mark.parametrize("cfg, hf", [
    (VIT_H_14, dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                    projection_dim=1024)),
    (VIT_BIGG_14, dict(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48, num_attention_heads=16,
                       projection_dim=1280)),
], ids=["ViT-H/14", "ViT-bigG/14"])
def test_known_towers_have_the_released_shapes(cfg, hf):
    """The constants against the config.json of h94/IP-Adapter's models/image_encoder and
    sdxl_models/image_encoder (values transcribed), built by transformers on the meta device."""
    with torch.device("meta"):
        ours = {k: v.shape for k, v in CLIPVisionModel(cfg).state_dict().items()}
        reference = CLIPVisionModelWithProjection(CLIPVisionConfig(patch_size=14, image_size=224, hidden_act="gelu", **hf))
    theirs = {k.removeprefix("vision_model."): v.shape for k, v in reference.state_dict().items()
              if not k.endswith("position_ids")}
    assert ours == theirs
    assert cfg.heads == hf["num_attention_heads"] and cfg.activation == "gelu"


def test_a_lone_file_of_a_known_width_loads_as_that_tower(tmp_path):
    """A 1280-wide file without config.json: ViT-H/14's heads (16, 80 wide) and GELU, the rest from the shapes."""
    torch.manual_seed(7)
    reference = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=1280, intermediate_size=2560, num_hidden_layers=1, num_attention_heads=16, patch_size=14,
        image_size=224, projection_dim=1024, hidden_act="gelu")).eval()
    lone = tmp_path / "clip_h.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(lone))
    encoder = load_image_encoder(lone)
    assert (encoder.config.heads, encoder.config.layers, encoder.config.mlp_width) == (16, 1, 2560)
    assert encoder.name == "ViT-H/14"
    pixels = clip_pixels(Image.open(SAMPLE_PICTURE)).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(encoder.model(pixels).image_embeds, reference(pixel_values=pixels).image_embeds,
                                   rtol=0, atol=1e-5)
