"""Per-layer IP-Adapter scales (InstantStyle) and the Full-face adapter, against diffusers 0.42.

- `expand_layer_scales` gives every cross-attention of full-size SD1.5 / SDXL U-Nets (built by diffusers on the meta
  device from sdlab's configs) the scale diffusers' `set_ip_adapter_scale` gives its IPAdapterAttnProcessor
  (`_maybe_expand_lora_scales`, default 0, then `attn_name.startswith(key)`), exactly;
- pictures: sdlab with `layer_scales` vs StableDiffusionPipeline / StableDiffusionXLPipeline after
  `set_ip_adapter_scale(dict)` on the same random weights, within `MAX_PIXEL_DIFF` / 255; two adapters, each with
  its own dict; the Full-face adapter (IPAdapterFullImageProjection over the penultimate hidden states);
- grammar errors and blocks the model lacks are one RequestError line."""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales
from transformers import CLIPImageProcessor

from ip_adapter_fixtures import SAMPLE_PICTURE, ip_adapter_plus_state, write_ip_adapter
from picture_parity import CFG, MAX_PIXEL_DIFF, PROMPT, SEED, SIZE, STEPS, max_pixel_diff
from PIL import Image
from sdlab.families.sdxl import SDXL_UNET
from sdlab.models.ip_adapter import cross_attentions
from sdlab.models.unet import UNetConfig
from sdlab.pipeline.image_prompt import IPAdapterInput
from sdlab.pipeline.ip_adapter_layers import (PRESETS, LayerScaleError, check_layer_scales, cross_attention_blocks,
                                              expand_layer_scales, layer_scales_text, parse_layer_scales)
from sdlab.pipeline.request import RequestError
from test_ip_adapter import (  # noqa: F401  (cli_files: the tiny SD1 file, adapter and picture)
    EULER, FAST, NEGATIVE, _adapted_pipe, _family, _picture, _reference, cli_files,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _diffusers_scales(cfg: UNetConfig, spec) -> list[float]:
    """diffusers' scale of each attn2 processor (in attn_processors order) after set_ip_adapter_scale(spec)."""
    from sdlab.checkpoints.diffusers_unet import unet_config_to_diffusers

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config_to_diffusers(cfg))
    config = _maybe_expand_lora_scales(unet, [spec], default_scale=0.0)[0]
    scales = []
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            scale = None
            for key, value in config.items():          # set_ip_adapter_scale: the last key that prefixes the name
                if name.startswith(key):
                    scale = value
            scales.append(scale)
    return scales


FULL_SIZE = {"sd15": UNetConfig(), "sdxl": SDXL_UNET}
SPECS = {
    "sdxl": [PRESETS["style"], PRESETS["style+layout"], {"down": 0.5, "mid": [0.3], "up": {"block_1": [1, 0, 2]}},
             {"up": {"block_0": [0.4]}}, {"mid": 1.5},
             {"up": [0.0, 1.0, 0.0]}, {"down": [0.2, 0.9], "up": {"block_1": 0.5}}],   # a list for every block
    "sd15": [{"down": {"block_2": [0.0, 1.0]}, "up": {"block_1": [0.0, 1.0, 0.0]}}, {"up": 0.7, "mid": 0.2},
             {"down": {"block_0": 1, "block_1": [0.5]}, "up": {"block_3": [1, 2, 3]}},
             {"down": [0.0, 1.0]}, {"down": [0.5], "up": [1, 0, 2], "mid": 1}, {"down": {}, "up": 1}],
}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_expansion_is_diffusers_on_full_size_unets(family):
    cfg = FULL_SIZE[family]
    for spec in SPECS[family]:
        ours = expand_layer_scales(spec, cfg, 10.0)
        assert list(ours) == _diffusers_scales(cfg, spec), spec
        assert any(ours) and not all(ours)
    assert len(cross_attention_blocks(cfg)) == (16 if family == "sd15" else 70)


def test_a_list_for_every_block_of_a_half_of_the_wrong_length_is_refused_as_diffusers_does():
    spec = {"down": [0.0, 1.0, 0.0]}                    # SD1.5's down blocks have 2 transformers each
    with pytest.raises(ValueError, match="Expected 2 scales for down.block_0, got 3"):
        _diffusers_scales(UNetConfig(), spec)
    with pytest.raises(LayerScaleError, match=r"layer scales: down \(for each of its blocks\) takes 2 numbers "
                                              r"\(one per transformer\) or 1, got 3"):
        expand_layer_scales(spec, UNetConfig(), 10.0)
    assert layer_scales_text({"down": [0.0, 1.0]}) == "down=0/1"
    assert check_layer_scales("down=0/1", 10.0) == {"down": [0.0, 1.0]}


def test_a_block_name_is_diffusers_spelling_exactly():
    """diffusers names block i f"block_{i}" and passes over any other name, so "block_01" acts nowhere there (every
    scale 0); sdlab refuses it rather than read it as block_1."""
    assert set(_diffusers_scales(SDXL_UNET, {"down": {"block_01": 1}})) == {0.0}
    for name in ("block_01", "block_00", "block_+1", "block_\u0661", "block_1\u0661", "block_ 1", "Block_1"):
        with pytest.raises(LayerScaleError, match=f"layer scales: down.{re.escape(name)} is not a block name "
                                                  r"\(block_ and its index without a leading zero"):
            check_layer_scales({"down": {name: 1}}, 10.0)
    with pytest.raises(LayerScaleError, match="down.block_01 is not a block name"):
        check_layer_scales("down.block_01=1", 10.0)
    assert check_layer_scales({"down": {"block_0": 1, "block_10": 1}}, 10.0) == {"down": {"block_0": 1.0,
                                                                                         "block_10": 1.0}}


def test_a_part_given_no_blocks_is_recorded_as_that_part_at_zero_and_reads_back():
    """{"down": {}} names no down block: each takes 0, as {"down": 0} gives them. Its compact text is "down=0" (not
    an empty text that no door reads back); the infotext line's Layers read back to the same scales."""
    from sdlab.pipeline.image_prompt import infotext_lines, layer_settings, recorded_layer_scales

    for spec, text in [({"down": {}}, "down=0"), ({"down": {}, "mid": 1, "up": {}}, "down=0 mid=1 up=0"),
                       ('{"up": {}}', "up=0")]:
        assert layer_scales_text(spec) == text
        assert layer_settings(spec) == {"layer_scales": text}
        line = infotext_lines([IPAdapterInput("models/ip-adapter_x.safetensors", _picture(),
                                              layer_scales=spec)])["IP-Adapter 0"]
        assert line.endswith(f"Weight: 1, Layers: {text}")
        assert recorded_layer_scales(line) == text
        for cfg in FULL_SIZE.values():
            assert expand_layer_scales(text, cfg, 10.0) == expand_layer_scales(spec, cfg, 10.0)
            assert list(expand_layer_scales(text, cfg, 10.0)) == _diffusers_scales(
                cfg, spec if isinstance(spec, dict) else parse_layer_scales(spec))


def test_the_presets_are_the_documented_instantstyle_layers():
    style = expand_layer_scales("style", SDXL_UNET, 10.0)
    blocks = cross_attention_blocks(SDXL_UNET)
    assert {blocks[i] for i, s in enumerate(style) if s} == {"up_blocks.0.attentions.1"}
    layout = expand_layer_scales("style+layout", SDXL_UNET, 10.0)
    assert {blocks[i] for i, s in enumerate(layout) if s} == {"up_blocks.0.attentions.1", "down_blocks.2.attentions.1"}


def test_spellings_round_trip():
    spec = {"down": {"block_2": [0.0, 1.0]}, "mid": 0.5, "up": {"block_0": [0.0, 1.0, 0.0]}}
    text = layer_scales_text(spec)
    assert text == "down.block_2=0/1 mid=0.5 up.block_0=0/1/0"
    assert parse_layer_scales(text) == spec
    assert parse_layer_scales('{"up": {"block_0": [0, 1, 0]}}') == {"up": {"block_0": [0, 1, 0]}}
    assert layer_scales_text(" style+layout") == "style+layout"
    assert check_layer_scales("down=0.25 up.block_1=1", 10) == {"down": 0.25, "up": {"block_1": 1.0}}


@pytest.mark.parametrize("spec, message", [
    ({"middle": 1}, "unknown part 'middle'"),
    ({"up": {"blok_0": 1}}, "up.blok_0 is not a block name"),
    ({"up": {"block_01": 1}}, "up.block_01 is not a block name"),
    ({"down": []}, "down is an empty list"),
    ({"mid": [1, 2]}, "mid takes 1 number, got 2"),
    ({"up": {"block_0": [1, "x"]}}, r"up.block_0 must be a number in \[0, 10\]"),
    ({"down": -1}, "down must be a number"),
    ({}, "must name one or more of down, mid, up"),
    ("sytle", "'sytle' is not part=NUMBERS"),
    ("{not json", "are not JSON"),
    ("up=1 up=2", "up is given twice"),
])
def test_grammar_errors_are_one_line(spec, message):
    with pytest.raises(LayerScaleError, match=message):
        check_layer_scales(spec, 10.0)


def test_blocks_the_model_lacks_are_named():
    with pytest.raises(LayerScaleError, match="up.block_0, which has no transformer in this model; its up blocks "
                                              "with transformers: block_1, block_2, block_3"):
        expand_layer_scales("style", UNetConfig(), 10.0)
    with pytest.raises(LayerScaleError, match=r"up.block_0 takes 3 numbers \(one per transformer\) or 1, got 2"):
        expand_layer_scales({"up": {"block_0": [0, 1]}}, SDXL_UNET, 10.0)


# --- pictures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return _family(tmp_path_factory, "sd1", StableDiffusionPipeline, 11)


OPTIONS = dict(steps=STEPS, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE, **EULER)
SD1_LAYERS = {"down": {"block_1": 1.0}, "mid": 0.5, "up": {"block_0": [0.0, 1.5]}}   # the tiny SD1: 1 block per level


def test_sd1_layer_scales_match_diffusers(sd1):
    ours, base, encoder, models, state = sd1
    path = write_ip_adapter(models / "layers.safetensors", state)
    reference = _reference(base, StableDiffusionPipeline, encoder, models, path.name, SD1_LAYERS, batch=1)
    whole = ours.txt2img(PROMPT, NEGATIVE, ip_adapters=[IPAdapterInput(path, _picture(), 1.0)], **OPTIONS)
    result = ours.txt2img(PROMPT, NEGATIVE, **OPTIONS,
                          ip_adapters=[IPAdapterInput(path, _picture(), layer_scales=SD1_LAYERS)])
    assert max_pixel_diff(whole.images, reference) > 5 * MAX_PIXEL_DIFF      # the layers change the picture
    assert max_pixel_diff(result.images, reference) <= MAX_PIXEL_DIFF
    text = ours.txt2img(PROMPT, NEGATIVE, **OPTIONS, ip_adapters=[
        IPAdapterInput(path, _picture(), 0.5, layer_scales=layer_scales_text({"down": {"block_1": 2.0}, "mid": 1.0,
                                                                                "up": {"block_0": [0.0, 3.0]}}))])
    assert max_pixel_diff(text.images, result.images) <= 1                  # scale x layers, the compact text


def test_sd1_a_list_for_every_block_of_a_half_matches_diffusers(sd1):
    ours, base, encoder, models, state = sd1
    path = write_ip_adapter(models / "half_lists.safetensors", state)
    layers = {"up": [0.0, 1.5], "mid": 0.5}                    # each up block of the tiny SD1 takes [0, 1.5]
    reference = _reference(base, StableDiffusionPipeline, encoder, models, path.name, layers, batch=1)
    whole = ours.txt2img(PROMPT, NEGATIVE, ip_adapters=[IPAdapterInput(path, _picture(), 1.0)], **OPTIONS)
    result = ours.txt2img(PROMPT, NEGATIVE, **OPTIONS, ip_adapters=[IPAdapterInput(path, _picture(),
                                                                                   layer_scales=layers)])
    text = ours.txt2img(PROMPT, NEGATIVE, **OPTIONS, ip_adapters=[IPAdapterInput(path, _picture(),
                                                                                 layer_scales="up=0/1.5 mid=0.5")])
    assert max_pixel_diff(whole.images, reference) > 5 * MAX_PIXEL_DIFF
    assert max_pixel_diff(result.images, reference) <= MAX_PIXEL_DIFF
    assert max_pixel_diff(text.images, result.images) == 0


def test_two_adapters_each_with_its_own_layers_match_diffusers(sd1):
    ours, base, encoder, models, state = sd1
    widths = [attn.to_q.weight.shape[0] for attn in cross_attentions(ours.bundle.unet)]
    first = write_ip_adapter(models / "layers_a.safetensors", state)
    second = write_ip_adapter(models / "layers_b.bin", ip_adapter_plus_state(
        widths, ours.bundle.unet_config.context_dim, encoder.config.hidden_size, seed=31))
    other = Image.open(SAMPLE_PICTURE).convert("RGB").crop((100, 40, 300, 200))
    layers = [{"up": {"block_0": [0.0, 1.0]}}, {"down": {"block_1": [0.8]}, "up": {"block_1": 0.6}}]
    pipe = _adapted_pipe(StableDiffusionPipeline(**{**base.components, "image_encoder": encoder,
                                                   "feature_extractor": CLIPImageProcessor()}),
                         models, [first.name, second.name], layers)
    reference = pipe(PROMPT, negative_prompt=NEGATIVE, ip_adapter_image=[_picture(), other],
                     num_inference_steps=STEPS, guidance_scale=CFG, width=SIZE, height=SIZE,
                     generator=torch.Generator().manual_seed(SEED), output_type="np").images
    swapped = ours.txt2img(PROMPT, NEGATIVE, **OPTIONS, ip_adapters=[
        IPAdapterInput(first, _picture(), layer_scales=layers[1]),
        IPAdapterInput(second, other, layer_scales=layers[0])])
    both = ours.txt2img(PROMPT, NEGATIVE, **OPTIONS, ip_adapters=[
        IPAdapterInput(first, _picture(), layer_scales=layers[0]),
        IPAdapterInput(second, other, layer_scales=layers[1])])
    assert max_pixel_diff(swapped.images, reference) > 5 * MAX_PIXEL_DIFF
    assert max_pixel_diff(both.images, reference) <= MAX_PIXEL_DIFF


def test_sdxl_layer_scales_match_diffusers(tmp_path_factory):
    ours, base, encoder, models, state = _family(tmp_path_factory, "sdxl", StableDiffusionXLPipeline, 21)
    path = write_ip_adapter(models / "layers_sdxl.safetensors", state)
    layers = {"up": {"block_0": [0.0, 1.0]}, "mid": 0.4}                         # the tiny SDXL's style layer + mid
    reference = _reference(base, StableDiffusionXLPipeline, encoder, models, path.name, layers, batch=1)
    whole = ours.txt2img(PROMPT, NEGATIVE, ip_adapters=[IPAdapterInput(path, _picture(), 1.0)], **OPTIONS)
    result = ours.txt2img(PROMPT, NEGATIVE, ip_adapters=[IPAdapterInput(path, _picture(), layer_scales=layers)],
                          **OPTIONS)
    assert max_pixel_diff(whole.images, reference) > 5 * MAX_PIXEL_DIFF
    assert max_pixel_diff(result.images, reference) <= MAX_PIXEL_DIFF
    with pytest.raises(RequestError, match="IP-Adapter 0: layer scales: up.block_0 takes 2 numbers"):
        ours.txt2img(PROMPT, ip_adapters=[IPAdapterInput(path, _picture(), layer_scales="style")], steps=1,
                     width=SIZE, height=SIZE)


def test_bad_layer_scales_are_one_line(sd1):
    ours, _, _, models, state = sd1
    path = write_ip_adapter(models / "bad_layers.safetensors", state)
    for layers, message in [({"up": {"block_2": 1}}, "IP-Adapter 0: layer scales name up.block_2, which has no "
                                                     "transformer in this model; its up blocks with transformers: "
                                                     "block_0, block_1"),
                            ("style", "up.block_0 takes 2 numbers"),
                            ({"down": {"block_1": [1, 0]}}, "down.block_1 takes 1 numbers"),
                            ({"up": 11}, r"IP-Adapter 0: layer scales: up must be a number in \[0, 10\]")]:
        with pytest.raises(RequestError, match=message):
            ours.txt2img(PROMPT, ip_adapters=[IPAdapterInput(path, _picture(), layer_scales=layers)], steps=1,
                         width=SIZE, height=SIZE)


# --- the Full-face adapter ----------------------------------------------------------------------------------


def full_face_state(cross_widths: list[int], context_dim: int, hidden_dim: int, seed: int = 5,
                    std: float = 0.1) -> dict[str, dict[str, torch.Tensor]]:
    """h94's ip-adapter-full-face_sd15 layout with random weights: image_proj.proj.0 (E, E), proj.2 (C, E), proj.3
    the LayerNorm (MLPProjModel: Linear, GELU, Linear, LayerNorm); ip_adapter.{2k+1}.to_k_ip / to_v_ip."""
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    proj = {"proj.0.weight": draw(hidden_dim, hidden_dim), "proj.0.bias": draw(hidden_dim),
            "proj.2.weight": draw(context_dim, hidden_dim), "proj.2.bias": draw(context_dim),
            "proj.3.weight": 1 + draw(context_dim), "proj.3.bias": draw(context_dim)}
    layers = {}
    for k, width in enumerate(cross_widths):
        layers[f"{2 * k + 1}.to_k_ip.weight"] = draw(width, context_dim)
        layers[f"{2 * k + 1}.to_v_ip.weight"] = draw(width, context_dim)
    return {"image_proj": proj, "ip_adapter": layers}


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_full_face_adapter_matches_diffusers(sd1, suffix):
    ours, base, encoder, models, _ = sd1
    widths = [attn.to_q.weight.shape[0] for attn in cross_attentions(ours.bundle.unet)]
    state = full_face_state(widths, ours.bundle.unet_config.context_dim, encoder.config.hidden_size)
    path = write_ip_adapter(models / f"ip-adapter-full-face_tiny{suffix}", state)
    reference = _reference(base, StableDiffusionPipeline, encoder, models, path.name, 0.8, batch=2)
    options = dict(OPTIONS, batch_size=2)
    plain = ours.txt2img(PROMPT, NEGATIVE, **options)
    result = ours.txt2img(PROMPT, NEGATIVE, ip_adapters=[IPAdapterInput(path, _picture(), 0.8)], **options)
    assert max_pixel_diff(plain.images, reference) > 5 * MAX_PIXEL_DIFF
    assert max_pixel_diff(result.images, reference) <= MAX_PIXEL_DIFF


def face_id_state(cross_widths: list[int], context_dim: int, width: int = 512, tokens: int = 4, seed: int = 7,
                  std: float = 0.05) -> dict[str, dict[str, torch.Tensor]]:
    """h94's FaceID layout (ip-adapter-faceid-portrait_sd15; ip-adapter-faceid_sd15 adds a U-Net LoRA:
    test_ip_adapter_faceid_lora) with random weights: image_proj.proj.0 (2E, E), proj.2 (T x C, 2E), norm (C);
    ip_adapter.{2k+1}.to_k_ip / to_v_ip."""
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    proj = {"proj.0.weight": draw(2 * width, width), "proj.0.bias": draw(2 * width),
            "proj.2.weight": draw(tokens * context_dim, 2 * width) * 4, "proj.2.bias": draw(tokens * context_dim),
            "norm.weight": 1 + draw(context_dim), "norm.bias": draw(context_dim)}
    layers = {}
    for k, attn_width in enumerate(cross_widths):
        layers[f"{2 * k + 1}.to_k_ip.weight"] = draw(attn_width, context_dim) * 4
        layers[f"{2 * k + 1}.to_v_ip.weight"] = draw(attn_width, context_dim) * 4
    return {"image_proj": proj, "ip_adapter": layers}


@pytest.mark.parametrize("faces", [1, 2])
def test_face_id_adapter_with_given_face_embeddings_matches_diffusers(sd1, faces, tmp_path):
    """diffusers' ip_adapter_image_embeds: [zeros, faces] stacked (2, N, 512) for the FaceID adapter; sdlab's
    image is the (N, 512) embedding, a tensor or a .npy file."""
    import numpy as np

    ours, base, _, models, _ = sd1
    widths = [attn.to_q.weight.shape[0] for attn in cross_attentions(ours.bundle.unet)]
    path = write_ip_adapter(models / "ip-adapter-faceid-portrait_tiny.bin",
                            face_id_state(widths, ours.bundle.unet_config.context_dim))
    embeds = torch.nn.functional.normalize(torch.randn(faces, 512, generator=torch.Generator().manual_seed(faces)),
                                           dim=-1)                                  # as InsightFace's normed_embedding
    pipe = StableDiffusionPipeline(**base.components)
    pipe.scheduler = EulerDiscreteScheduler.from_config(base.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(models), subfolder="", weight_name=path.name, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(0.9)
    stacked = torch.cat([torch.zeros_like(embeds), embeds]).unsqueeze(1) if faces == 1 else \
        torch.stack([torch.zeros_like(embeds), embeds])                             # (2, N, 512)
    reference = pipe(PROMPT, negative_prompt=NEGATIVE, ip_adapter_image_embeds=[stacked], num_inference_steps=STEPS,
                     guidance_scale=CFG, width=SIZE, height=SIZE, generator=torch.Generator().manual_seed(SEED),
                     output_type="np").images
    plain = ours.txt2img(PROMPT, NEGATIVE, **OPTIONS)
    npy = tmp_path / "face.npy"
    np.save(npy, embeds.numpy())
    for image in (embeds, npy):
        result = ours.txt2img(PROMPT, NEGATIVE, ip_adapters=[IPAdapterInput(path, image, 0.9)], **OPTIONS)
        assert max_pixel_diff(result.images, reference) <= MAX_PIXEL_DIFF
    assert max_pixel_diff(plain.images, reference) > 5 * MAX_PIXEL_DIFF


def test_face_id_refusals_and_a_wrong_encoder_are_one_line(sd1, tmp_path):
    ours, _, _, models, _ = sd1
    widths = [attn.to_q.weight.shape[0] for attn in cross_attentions(ours.bundle.unet)]
    context = ours.bundle.unet_config.context_dim
    face_id = write_ip_adapter(models / "faceid_refusals.bin", face_id_state(widths, context))
    plus = dict(face_id_state(widths, context), image_proj={
        **face_id_state(widths, context)["image_proj"], "perceiver_resampler.proj_in.weight": torch.zeros(8, 8)})
    wide = write_ip_adapter(models / "full-face-wide.safetensors", full_face_state(widths, context, 1280))
    base = write_ip_adapter(models / "base_for_face.safetensors", _family_state(ours))
    cases = [
        (IPAdapterInput(face_id, _picture()), "an IP-Adapter FaceID reads an InsightFace face embedding, which sdlab "
         "does not compute from a picture; give the embedding \\(512 numbers per face"),
        (IPAdapterInput(face_id, torch.zeros(3, 500)), r"the face embedding has shape \(3, 500\)"),
        (IPAdapterInput(face_id, torch.full((512,), float("nan"))), "holds NaN or infinite values"),
        (IPAdapterInput(face_id, tmp_path / "none.npy"), "the face embedding .*none.npy' does not exist"),
        (IPAdapterInput(base, torch.zeros(512)), "a face embedding is for an IP-Adapter FaceID"),
        (IPAdapterInput(write_ip_adapter(models / "faceid_plus.bin", plus), torch.zeros(512)),
         r"faceid_plus.bin: an IP-Adapter FaceID Plus without the resampler sdlab knows \(perceiver_resampler.proj_in, "
         r"layers.N.0.to_q / to_kv / to_out, layers.N.1, proj_out, norm_out\)$"),
        (IPAdapterInput(wide, _picture()), r"Full-face reads 1280-wide image encoder hidden states \(ViT-H/14\); "
         "the image encoder .* is 128 wide"),
    ]
    for prompt, message in cases:
        with pytest.raises(RequestError, match=message):
            ours.txt2img(PROMPT, ip_adapters=[prompt], steps=1, width=SIZE, height=SIZE)


def _family_state(ours):
    from ip_adapter_fixtures import ip_adapter_state

    widths = [attn.to_q.weight.shape[0] for attn in cross_attentions(ours.bundle.unet)]
    return ip_adapter_state(widths, ours.bundle.unet_config.context_dim, 32)


# --- CLI and infotext -----------------------------------------------------------------------------------------

CLI_LAYERS = "mid=0.5 up.block_0=0/1"


def test_cli_layer_scales_draw_the_api_picture_record_them_and_redraw_from_png(cli_files, tmp_path, capsys):
    import numpy as np
    from cli_helpers import pixels, run
    from sdlab.pipeline.png_info import parse_parameters, read_parameters

    import sdlab

    base = ["txt2img", "a red apple", "--model", str(cli_files["model"]), *FAST]
    adapter = ["--ip-adapter", str(cli_files["adapter"]), "--ip-adapter-image", str(cli_files["picture"])]
    whole, drawn, as_json, again = (tmp_path / f"{name}.png" for name in ("whole", "drawn", "json", "again"))
    assert run([*base, *adapter, "--out", str(whole)], capsys)[0] == 0
    code, _, stderr = run([*base, *adapter, "--ip-adapter-scale", CLI_LAYERS, "--out", str(drawn)], capsys)
    assert code == 0, stderr
    assert np.abs(pixels(whole) - pixels(drawn)).max() > 10
    api = sdlab.load(cli_files["model"]).txt2img(
        "a red apple", steps=3, width=32, height=32, seed=3, ip_adapters=[
            IPAdapterInput(cli_files["adapter"], Image.open(cli_files["picture"]),
                           layer_scales={"mid": 0.5, "up": {"block_0": [0, 1]}})])
    assert np.abs(pixels(drawn) - np.asarray(api.images[0], dtype=np.int16)).max() == 0
    line = parse_parameters(read_parameters(drawn))["IP-Adapter 0"]
    assert line.endswith(f"], Weight: 1, Layers: {CLI_LAYERS}")
    code, _, stderr = run([*base, *adapter, "--ip-adapter-scale", '{"up": {"block_0": [0, 1]}, "mid": [0.5]}',
                           "--out", str(as_json)], capsys)
    assert code == 0, stderr
    assert np.abs(pixels(drawn) - pixels(as_json)).max() == 0
    code, _, stderr = run(["txt2img", "--model", str(cli_files["model"]), "--no-progress", "--from-png", str(drawn),
                           *adapter, "--out", str(again)], capsys)
    assert code == 0, stderr
    assert np.abs(pixels(drawn) - pixels(again)).max() == 0                  # Weight and Layers read back
    code, _, stderr = run(["txt2img", "--model", str(cli_files["model"]), "--no-progress", "--from-png", str(drawn),
                           *adapter, "--ip-adapter-scale", "1", "--out", str(tmp_path / "over.png")], capsys)
    assert code == 0, stderr
    assert np.abs(pixels(whole) - pixels(tmp_path / "over.png")).max() == 0  # a given scale replaces both


def test_cli_a_part_given_no_blocks_is_recorded_so_from_png_redraws_it(cli_files, tmp_path, capsys):
    import numpy as np
    from cli_helpers import pixels, run
    from sdlab.pipeline.png_info import parse_parameters, read_parameters

    base = ["txt2img", "a red apple", "--model", str(cli_files["model"]), *FAST]
    adapter = ["--ip-adapter", str(cli_files["adapter"]), "--ip-adapter-image", str(cli_files["picture"])]
    drawn, zero, again = (tmp_path / f"{name}.png" for name in ("drawn", "zero", "again"))
    code, _, stderr = run([*base, *adapter, "--ip-adapter-scale", '{"down": {}}', "--out", str(drawn)],
                          capsys)
    assert code == 0, stderr
    assert parse_parameters(read_parameters(drawn))["IP-Adapter 0"].endswith("Weight: 1, Layers: down=0")
    assert run([*base, *adapter, "--ip-adapter-scale", "down=0", "--out", str(zero)], capsys)[0] == 0
    code, _, stderr = run(["txt2img", "--model", str(cli_files["model"]), "--no-progress", "--from-png", str(drawn),
                           *adapter, "--out", str(again)], capsys)
    assert code == 0, stderr
    assert np.abs(pixels(drawn) - pixels(zero)).max() == 0 and np.abs(pixels(drawn) - pixels(again)).max() == 0


def test_cli_bad_layer_scales_are_one_line_and_no_file(cli_files, tmp_path, capsys):
    from cli_helpers import run

    base = ["txt2img", "a red apple", "--model", str(cli_files["model"]), *FAST, "--ip-adapter",
            str(cli_files["adapter"]), "--ip-adapter-image", str(cli_files["picture"])]
    for scale, message in [("stlye", "'stlye' is not part=NUMBERS"), ('{"middle": 1}', "unknown part 'middle'"),
                           ("up.block_0=0/1/0", "up.block_0 takes 2 numbers"),
                           ("style", "up.block_0 takes 2 numbers"),
                           ("down.block_4=1", "down.block_4, which has no transformer"),
                           ("down.block_01=1", "down.block_01 is not a block name"),
                           ("up=0/1/0", "up (for each of its blocks) takes 2 numbers")]:
        out = tmp_path / "bad.png"
        code, _, stderr = run([*base, "--ip-adapter-scale", scale, "--out", str(out)], capsys)
        assert code != 0 and message in stderr, stderr
        assert "Traceback" not in stderr and len([ln for ln in stderr.splitlines() if "error" in ln]) == 1, stderr
        assert not out.exists()
