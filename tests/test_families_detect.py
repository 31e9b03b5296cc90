"""Family specs and detection from key names and shapes only (meta tensors / torch.Size, no weights)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from bundle_fixtures import full_size_shapes, junk_keys
from sdlab.checkpoints.detect import detect_diffusers_family, detect_family
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.infer import infer_text_config, infer_unet_config, infer_vae_config
from sdlab.checkpoints.openclip import openclip_to_sdlab
from sdlab.diffusion.denoiser import Prediction
from sdlab.families import FAMILIES, family_names, get_family

ALL = [f.name for f in FAMILIES]


@pytest.fixture(scope="module")
def full_shapes() -> dict[str, dict[str, torch.Size]]:
    return {name: full_size_shapes(name) for name in ALL}


# --- family constants ------------------------------------------------------------------------------------


def test_registry_is_ordered_unique_and_complete():
    assert family_names() == ("sd1", "sd1-inpaint", "sd1-edit", "sd2", "sd2-inpaint", "sdxl", "sdxl-refiner", "sdxl-inpaint",
                              "sdxl-edit", "sdlab-tiny")
    assert len(set(family_names())) == len(FAMILIES)
    assert get_family("SDXL ") is get_family("sdxl")
    with pytest.raises(ValueError, match="unknown model family 'sd3'"):
        get_family("sd3")


@pytest.mark.parametrize("name", ALL)
def test_family_specs_are_self_consistent(name: str):
    f = get_family(name)
    # the U-Net attends to the concatenated text hidden states
    assert f.unet.context_dim == sum(te.config.width for te in f.text_encoders)
    assert all(te.config.heads * 64 == te.config.width for te in f.text_encoders)
    assert f.unet.in_channels == (9 if name.endswith("inpaint") else 8 if name.endswith("edit") else 4)
    if f.is_sdxl:  # pooled bigG projection + 256-wide size/crop(/aesthetic) embeddings
        extra = 5 if name == "sdxl-refiner" else 6
        assert f.unet.adm_in_channels == f.text_encoders[-1].config.projection_dim + extra * 256
        assert f.latent_scaling_factor == 0.13025 and f.default_size == 1024
    elif name == "sdlab-tiny":  # sdlab's own model: measured scaling (stored per file), v-prediction, 64 px
        assert f.prediction is Prediction.V and f.default_size == 64 and f.vae.downsample_factor == 4
    else:
        assert f.latent_scaling_factor == 0.18215
    assert f.prediction is (Prediction.V if name == "sdlab-tiny" else Prediction.EPS)
    assert (f.schedule.kind, f.schedule.beta_start, f.schedule.beta_end, f.schedule.num_timesteps) == (
        "scaled_linear", 0.00085, 0.012, 1000)


def test_family_conventions():
    sd1, sd2, xl = get_family("sd1"), get_family("sd2"), get_family("sdxl")
    assert (sd1.unet.num_heads, sd1.unet.head_dim, sd1.unet.use_linear_proj) == (8, None, False)
    assert (sd2.unet.num_heads, sd2.unet.head_dim, sd2.unet.use_linear_proj, sd2.unet.upcast_attention) == (None, 64, True, True)
    assert [(te.name, te.layout, te.hidden_state, te.pad_token_id, te.config.activation) for te in xl.text_encoders] == [
        ("clip_l", "hf", "penultimate", 49407, "quick_gelu"), ("openclip_bigg", "openclip", "penultimate", 0, "gelu")]
    assert sd1.text_encoders[0].hidden_state == "last" and sd2.text_encoders[0].hidden_state == "penultimate_norm"
    assert sd2.size_for(Prediction.V) == 768 and sd2.size_for(Prediction.EPS) == 512
    assert get_family("sdxl-refiner").prefixes["openclip_bigg"] == "conditioner.embedders.0.model."


def test_full_size_parameter_counts(full_shapes):
    """Counts of the released networks (diffusers model cards / torch summaries of the originals)."""
    def count(shapes, prefix):
        return sum(s.numel() for k, s in shapes.items() if k.startswith(prefix))
    assert count(full_shapes["sd1"], "model.diffusion_model.") == 859_520_964
    assert count(full_shapes["sd2"], "model.diffusion_model.") == 865_910_724
    assert count(full_shapes["sdxl"], "model.diffusion_model.") == 2_567_463_684
    assert count(full_shapes["sd1"], "first_stage_model.") == 83_653_863
    # CLIP-L text (HF CLIPTextModel) without position_ids; bigG incl. its 1280x1280 projection
    assert count(full_shapes["sd1"], "cond_stage_model.transformer.text_model.") - 77 == 123_060_480
    assert count(full_shapes["sdxl"], "conditioner.embedders.1.model.") - 1 == 694_659_840


# --- detection -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_detects_every_full_size_family(full_shapes, name):
    shapes = full_shapes[name]
    assert detect_family(shapes) is get_family(name)
    # the same from meta tensors, and without the real-file junk
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    assert detect_family(meta) is get_family(name)
    clean = {k: s for k, s in shapes.items() if k not in junk_keys(get_family(name))}
    assert detect_family(clean) is get_family(name)


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl", "sdxl-refiner", "sd1-inpaint", "sdxl-inpaint"])
def test_unet_only_files_are_detected_from_shapes(full_shapes, name):
    unet_only = {k: s for k, s in full_shapes[name].items() if k.startswith("model.diffusion_model.")}
    assert detect_family(unet_only) is get_family(name)


def test_sd1_files_without_text_model_level(full_shapes):
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): s
           for k, s in full_shapes["sd1"].items()}
    assert detect_family(old).name == "sd1"


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl", "sdxl-refiner"])
def test_full_size_configs_are_inferred_from_shapes(full_shapes, name):
    family = get_family(name)
    shapes = full_shapes[name]
    unet = {k.removeprefix("model.diffusion_model."): s for k, s in shapes.items() if k.startswith("model.diffusion_model.")}
    vae = {k.removeprefix("first_stage_model."): s for k, s in shapes.items() if k.startswith("first_stage_model.")}
    assert infer_unet_config(unet, family.unet) == family.unet
    assert infer_vae_config(vae, family.vae) == family.vae
    for te in family.text_encoders:
        local = {k[len(te.prefix):]: torch.empty(s, device="meta") for k, s in shapes.items() if k.startswith(te.prefix)}
        if te.layout == "openclip":
            local = openclip_to_sdlab(local)
        else:
            local = {k.removeprefix("text_model."): v for k, v in local.items() if not k.endswith("position_ids")}
        assert infer_text_config(local, te.config) == te.config


def test_override_and_its_channel_check(full_shapes):
    assert detect_family(full_shapes["sd2"], override="sd2").name == "sd2"
    assert detect_family(full_shapes["sd1"], override="sd2").name == "sd2"   # the user knows best
    with pytest.raises(CheckpointError, match="expects a 9-channel U-Net input, the file has 4"):
        detect_family(full_shapes["sd1"], override="sd1-inpaint")
    with pytest.raises(CheckpointError, match="unknown model family 'sd9'"):
        detect_family(full_shapes["sd1"], override="sd9")


def test_unknown_file_says_what_it_found():
    shapes = {"encoder.conv_in.weight": torch.Size([128, 3, 3, 3]), "decoder.conv_out.weight": torch.Size([3, 128, 3, 3]),
              "lora_unet_down.alpha": torch.Size([])}
    with pytest.raises(CheckpointError) as err:
        detect_family(shapes)
    message = str(err.value)
    assert "no key starting with model.diffusion_model." in message
    assert "top-level prefixes: encoder. (1 keys), decoder. (1 keys), lora_unet_down. (1 keys)" in message
    assert "\n" not in message


def test_unrecognised_unet_lists_the_evidence():
    shapes = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.Size([64, 4, 3, 3]),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.Size([64, 512]),
    }
    with pytest.raises(CheckpointError, match=r"cannot tell the model family: 2 keys; U-Net input channels 4; "
                                              r"cross-attention context 512; text keys under no known prefix"):
        detect_family(shapes)


def test_inconsistent_files_are_refused(full_shapes):
    shapes = dict(full_shapes["sd1"])
    shapes["model.diffusion_model.label_emb.0.0.weight"] = torch.Size([1280, 2816])
    with pytest.raises(CheckpointError, match=r"label_emb of width 2816 \(an added-vector input, .*\), which sd1 "
                                              r"models do not have"):
        detect_family(shapes)
    no_label = {k: s for k, s in full_shapes["sdxl"].items() if "label_emb" not in k}
    with pytest.raises(CheckpointError, match="has no label_emb"):
        detect_family(no_label)
    six = dict(full_shapes["sd1"])
    six["model.diffusion_model.input_blocks.0.0.weight"] = torch.Size([320, 6, 3, 3])
    with pytest.raises(CheckpointError, match=r"a U-Net with 6 input channels, which no family sdlab draws with takes "
                                              r"\(4: text-to-image, 9: inpainting, 8: InstructPix2Pix on SD1 / SDXL\)"):
        detect_family(six)
    refiner_inpaint = dict(full_shapes["sdxl-refiner"])
    refiner_inpaint["model.diffusion_model.input_blocks.0.0.weight"] = torch.Size([384, 9, 3, 3])
    with pytest.raises(CheckpointError, match="sdlab knows no sdxl-refiner-inpaint"):
        detect_family(refiner_inpaint)


def test_text_keys_decide_before_unet_structure(full_shapes):
    """An SD1 text tower on an SD2-shaped U-Net (Linear projections) is SD1: the text keys decide first."""
    mixed = {k: s for k, s in full_shapes["sd2"].items() if not k.startswith("cond_stage_model.")}
    mixed |= {k: s for k, s in full_shapes["sd1"].items() if k.startswith("cond_stage_model.")}
    assert detect_family(mixed).name == "sd1"


# --- diffusers folders -----------------------------------------------------------------------------------

_SD_UNET = {"in_channels": 4, "cross_attention_dim": 768}
_XL_UNET = {"in_channels": 4, "cross_attention_dim": 2048, "addition_embed_type": "text_time"}


@pytest.mark.parametrize(
    ("index", "unet", "text", "expected"),
    [
        ({"_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"]},
         _SD_UNET, {"hidden_act": "quick_gelu"}, "sd1"),
        ({"_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"]},
         {**_SD_UNET, "cross_attention_dim": 1024}, {"hidden_act": "gelu"}, "sd2"),
        ({"_class_name": "StableDiffusionInpaintPipeline", "text_encoder": ["transformers", "CLIPTextModel"]},
         {**_SD_UNET, "in_channels": 9}, {"hidden_act": "quick_gelu"}, "sd1-inpaint"),
        ({"_class_name": "StableDiffusionXLPipeline", "text_encoder": ["transformers", "CLIPTextModel"]},
         _XL_UNET, {"hidden_act": "quick_gelu"}, "sdxl"),
        ({"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None]},
         {**_XL_UNET, "cross_attention_dim": 1280}, None, "sdxl-refiner"),
        ({"_class_name": "StableDiffusionXLInpaintPipeline", "text_encoder": ["transformers", "CLIPTextModel"]},
         {**_XL_UNET, "in_channels": 9}, {"hidden_act": "quick_gelu"}, "sdxl-inpaint"),
    ],
)
def test_detects_diffusers_folders(index, unet, text, expected):
    assert detect_diffusers_family(index, unet, text).name == expected


def test_diffusers_folder_override_and_unknown():
    index = {"_class_name": "StableDiffusionPipeline"}
    assert detect_diffusers_family(index, _SD_UNET, {"hidden_act": "quick_gelu"}, override="sd2").name == "sd2"
    with pytest.raises(CheckpointError, match="unsupported diffusers folder"):
        detect_diffusers_family({"_class_name": "KandinskyPipeline"}, {"addition_embed_type": "image"}, None)


# --- kinds sdlab recognises but does not draw with --------------------------------------------------------


def _a1111_config(sd) -> str:
    """A1111 modules/sd_models_config.guess_model_config_from_state_dict, transcribed (SDXL's configs by name)."""
    sd2_cond_proj_weight = sd.get("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", None)
    diffusion_model_input = sd.get("model.diffusion_model.input_blocks.0.0.weight", None)
    sd2_variations_weight = sd.get("embedder.model.ln_final.weight", None)
    if sd.get("conditioner.embedders.1.model.ln_final.weight", None) is not None:
        return "sdxl"
    if sd.get("conditioner.embedders.0.model.ln_final.weight", None) is not None:
        return "sdxl-refiner"
    elif sd.get("depth_model.model.pretrained.act_postprocess3.0.project.0.bias", None) is not None:
        return "v2-midas-inference.yaml"
    elif sd2_variations_weight is not None and sd2_variations_weight.shape[0] == 768:
        return "v2-1-stable-unclip-l-inference.yaml"
    elif sd2_variations_weight is not None and sd2_variations_weight.shape[0] == 1024:
        return "v2-1-stable-unclip-h-inference.yaml"
    if sd2_cond_proj_weight is not None and sd2_cond_proj_weight.shape[1] == 1024:
        if diffusion_model_input.shape[1] == 9:
            return "v2-inpainting-inference.yaml"
        else:
            return "v2-inference.yaml"
    if diffusion_model_input is not None:
        if diffusion_model_input.shape[1] == 9:
            return "v1-inpainting-inference.yaml"
        if diffusion_model_input.shape[1] == 8:
            return "instruct-pix2pix.yaml"
    return "v1-inference.yaml"


_P = "model.diffusion_model."


def _other_sd2_kind(full_shapes, kind: str, with_parts: bool = True) -> dict[str, torch.Size]:
    """A full-size SD2 file made into `kind` as far as detection looks (names and shapes)."""
    shapes = dict(full_shapes["sd2"])
    if kind == "depth":                               # latent + depth map in; MiDaS under depth_model.
        shapes[_P + "input_blocks.0.0.weight"] = torch.Size([320, 5, 3, 3])
        parts = {"depth_model.model.pretrained.act_postprocess3.0.project.0.bias": torch.Size([768])}
    elif kind.startswith("unclip"):                   # image embedding (+ noise level) into label_emb
        image, adm = (1024, 2048) if kind == "unclip-h" else (768, 1536)
        shapes |= {_P + "label_emb.0.0.weight": torch.Size([1280, adm]), _P + "label_emb.0.0.bias": torch.Size([1280]),
                   _P + "label_emb.0.2.weight": torch.Size([1280, 1280]), _P + "label_emb.0.2.bias": torch.Size([1280])}
        parts = {"embedder.model.ln_final.weight": torch.Size([image]),
                 "embedder.model.visual.conv1.weight": torch.Size([1280, 3, 14, 14]),
                 "noise_augmentor.betas": torch.Size([1000])}
    else:                                             # x4 upscaler: latent + low-resolution picture in
        shapes[_P + "input_blocks.0.0.weight"] = torch.Size([320, 7, 3, 3])
        shapes[_P + "label_emb.weight"] = torch.Size([1000, 1280])
        parts = {"low_scale_model.betas": torch.Size([350])}
    return shapes | parts if with_parts else shapes


@pytest.mark.parametrize("kind, name", [
    ("depth", "SD2 depth-to-image (depth2img)"), ("unclip-h", "SD 2.1 unCLIP"), ("unclip-l", "SD 2.1 unCLIP"),
    ("x4", "SD x4 upscaler"),
])
def test_other_sd2_kinds_are_refused_by_name(full_shapes, kind, name):
    """Files A1111 or ComfyUI draw with (depth2img, unCLIP L/H, ComfyUI's SD_X4Upscaler: a 7-channel U-Net) that
    sdlab does not: one line naming the kind, also under --family, never a word about SDXL."""
    shapes = _other_sd2_kind(full_shapes, kind)
    expected = {"depth": "v2-midas-inference.yaml", "unclip-h": "v2-1-stable-unclip-h-inference.yaml",
                "unclip-l": "v2-1-stable-unclip-l-inference.yaml", "x4": "v2-inference.yaml"}[kind]
    assert _a1111_config({k: torch.empty(s, device="meta") for k, s in shapes.items()}) == expected
    for override in (None, "sd2"):
        with pytest.raises(CheckpointError) as err:
            detect_family(shapes, override=override)
        message = str(err.value)
        assert message.startswith(f"this is an {name}") and "sdlab does not draw with this kind of model" in message
        assert "SDXL" not in message and "\n" not in message
    if kind in ("depth", "x4"):                       # the U-Net alone says it by its input channels and structure
        unet = {k: s for k, s in _other_sd2_kind(full_shapes, kind, with_parts=False).items() if k.startswith(_P)}
        with pytest.raises(CheckpointError, match=rf"this is an {re.escape(name)} model \([57] U-Net input channels "
                                                  r"on sd2's U-Net structure"):
            detect_family(unet)


def _with_input_channels(full_shapes, base: str, channels: int, class_embedding: bool) -> dict[str, torch.Size]:
    shapes = dict(full_shapes[base])
    width = shapes[_P + "input_blocks.0.0.weight"][0]
    shapes[_P + "input_blocks.0.0.weight"] = torch.Size([width, channels, 3, 3])
    if class_embedding:                               # the x4 upscaler's num_classes embedding (its noise level)
        shapes[_P + "label_emb.weight"] = torch.Size([1000, width * 4])
    return shapes


@pytest.mark.parametrize("base, channels, class_embedding, kind", [
    ("sd2", 5, False, "SD2 depth-to-image (depth2img)"),
    ("sd2", 7, True, "SD x4 upscaler"),
    ("sd1", 5, False, None),                          # depth2img is an SD2 model
    ("sd1", 7, False, None),                          # the x4 upscaler is SD2's, with a class embedding
    ("sd2", 7, False, None),
    ("sdxl", 5, False, None),
])
def test_undrawable_input_channels_name_a_kind_only_where_the_structure_is_its(full_shapes, base, channels,
                                                                               class_embedding, kind):
    """A U-Net whose input channels no family takes is named as a kind only where the rest of its structure is
    that kind's (whole file, U-Net alone, under --family); otherwise one line says what it takes, naming none."""
    shapes = _with_input_channels(full_shapes, base, channels, class_embedding)
    if base in ("sd1", "sd2"):
        a1111 = _a1111_config({k: torch.empty(s, device="meta") for k, s in shapes.items()})
        assert a1111 != "instruct-pix2pix.yaml"
    unet = {k: s for k, s in shapes.items() if k.startswith(_P)}
    for candidate, override in ((shapes, None), (shapes, base), (unet, None)):
        with pytest.raises(CheckpointError) as err:
            detect_family(candidate, override=override)
        message = str(err.value)
        if kind is not None:
            assert message.startswith(f"this is an {kind}") and f" on {base}'s U-Net structure" in message
        else:
            assert message.startswith(f"a U-Net with {channels} input channels, which no family sdlab draws with "
                                      "takes"), message
        assert "\n" not in message


@pytest.fixture(scope="module")
def other_sd2_pipelines(tmp_path_factory) -> dict[str, Path]:
    """Tiny depth2img, unCLIP (img2img) and x4-upscaler pipelines saved by diffusers itself."""
    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionDepth2ImgPipeline,
                           StableDiffusionUpscalePipeline, StableUnCLIPImg2ImgPipeline, UNet2DConditionModel)
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection,
                              DPTConfig, DPTForDepthEstimation)

    def unet(**changes):
        return UNet2DConditionModel(**{
            "block_out_channels": (32, 64), "layers_per_block": 1, "sample_size": 16, "cross_attention_dim": 32,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"), "attention_head_dim": (2, 4),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "use_linear_projection": True, **changes})

    def common(scaling_factor: float = 0.18215, **unet_changes):
        text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                            num_hidden_layers=2, vocab_size=1000, hidden_act="gelu"))
        vae = AutoencoderKL(block_out_channels=(32, 64), latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, scaling_factor=scaling_factor)
        return {"vae": vae, "text_encoder": text, "tokenizer": None, "unet": unet(**unet_changes),
                "scheduler": DDIMScheduler()}

    dpt = DPTForDepthEstimation(DPTConfig(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=4,
                                          num_attention_heads=4, intermediate_size=37, fusion_hidden_size=16,
                                          backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[16, 16, 16, 16]))
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        intermediate_size=37, patch_size=16))
    pipelines = {
        "depth2img": StableDiffusionDepth2ImgPipeline(**common(in_channels=5), depth_estimator=dpt, feature_extractor=None),
        "unclip": StableUnCLIPImg2ImgPipeline(
            **common(class_embed_type="projection", projection_class_embeddings_input_dim=64), feature_extractor=None,
            image_encoder=image_encoder, image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=32),
            image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2")),
        "upscaler": StableDiffusionUpscalePipeline(**common(0.08333, in_channels=7, num_class_embeds=1000),
                                                   low_res_scheduler=DDPMScheduler(), max_noise_level=350),
    }
    root = tmp_path_factory.mktemp("other-sd2-pipelines")
    for name, pipe in pipelines.items():
        pipe.save_pretrained(root / name)
    return {name: root / name for name in pipelines}


@pytest.mark.parametrize("name, kind", [
    ("depth2img", "SD2 depth-to-image (depth2img)"), ("unclip", "SD 2.1 unCLIP"), ("upscaler", "SD x4 upscaler"),
])
def test_other_sd2_pipeline_folders_are_refused_by_name(other_sd2_pipelines, name, kind, tmp_path):
    """The folder's pipeline class names the kind; without it (renamed), the components only it has do."""
    from sdlab.checkpoints.load import plan_checkpoint

    folder = other_sd2_pipelines[name]
    with pytest.raises(CheckpointError, match=rf"this is an {re.escape(kind)}.*\(model_index.json _class_name "
                                              r"'Stable.*Pipeline'\); sdlab does not draw with this kind of model$"):
        plan_checkpoint(folder)
    renamed = shutil.copytree(folder, tmp_path / name)
    index = json.loads((renamed / "model_index.json").read_text())
    (renamed / "model_index.json").write_text(json.dumps(index | {"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(CheckpointError, match=rf"this is an {re.escape(kind)}.*\(model_index.json component '"):
        plan_checkpoint(renamed)


@pytest.mark.parametrize("base, channels, kind", [
    ("sd1", 8, "sd1-edit"),                           # A1111 config_instruct_pix2pix, ComfyUI SD15_instructpix2pix
    ("sdxl", 8, "sdxl-edit"),                         # ComfyUI SDXL_instructpix2pix
    ("sd2", 8, None),                                 # A1111 reads it as SD2, ComfyUI has no SD2 InstructPix2Pix
    ("sdxl-refiner", 8, None),
])
def test_an_8_channel_unet_is_an_edit_model_on_sd1_and_sdxl_only(full_shapes, base, channels, kind):
    """An 8-channel U-Net on SD1's or SDXL's structure is its InstructPix2Pix edit variant (whole file, U-Net alone,
    under --family); on SD2's or the refiner's, one line says that sdlab knows no such edit model."""
    shapes = _with_input_channels(full_shapes, base, channels, False)
    if base == "sd1":
        assert _a1111_config({k: torch.empty(s, device="meta") for k, s in shapes.items()}) == "instruct-pix2pix.yaml"
    unet = {k: s for k, s in shapes.items() if k.startswith(_P)}
    for candidate, override in ((shapes, None), (shapes, kind), (unet, None)):
        if kind is not None:
            assert detect_family(candidate, override=override).name == kind
            continue
        with pytest.raises(CheckpointError, match=rf"found an 8-channel \(InstructPix2Pix edit\) U-Net in a {base} "
                                                  rf"checkpoint; .*knows no {base}-edit$"):
            detect_family(candidate)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_instruct_pix2pix_folders_are_the_edit_family(family, tmp_path):
    """diffusers' (SDXL) InstructPix2Pix pipeline, an 8-channel U-Net: the edit variant of its base, by its pipeline
    class and, renamed, by its U-Net's input channels."""
    from bundle_fixtures import tiny_bundle, write_diffusers_folder
    from sdlab.checkpoints.load import plan_checkpoint

    from diffusers import UNet2DConditionModel

    folder = write_diffusers_folder(tiny_bundle(family, seed=1), tmp_path / "pipe")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    UNet2DConditionModel.from_config({**unet.config, "in_channels": 8}).save_pretrained(folder / "unet")
    index = json.loads((folder / "model_index.json").read_text())
    pipeline = {"sd1": "StableDiffusionInstructPix2PixPipeline", "sdxl": "StableDiffusionXLInstructPix2PixPipeline"}
    (folder / "model_index.json").write_text(json.dumps(index | {"_class_name": pipeline[family]}))
    assert plan_checkpoint(folder).report.family.name == f"{family}-edit"
    (folder / "model_index.json").write_text(json.dumps(index))
    assert plan_checkpoint(folder).report.family.name == f"{family}-edit"
