"""Family specs and detection from key names and shapes only (meta tensors / torch.Size, no weights)."""

from __future__ import annotations

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
    assert family_names() == ("sd1", "sd1-inpaint", "sd2", "sd2-inpaint", "sdxl", "sdxl-refiner", "sdxl-inpaint", "sdlab-tiny")
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
    assert f.unet.in_channels == (9 if name.endswith("inpaint") else 4)
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
    with pytest.raises(CheckpointError, match="label_emb of width 2816, which only SDXL models have"):
        detect_family(shapes)
    no_label = {k: s for k, s in full_shapes["sdxl"].items() if "label_emb" not in k}
    with pytest.raises(CheckpointError, match="has no label_emb"):
        detect_family(no_label)
    eight = dict(full_shapes["sd1"])
    eight["model.diffusion_model.input_blocks.0.0.weight"] = torch.Size([320, 8, 3, 3])
    with pytest.raises(CheckpointError, match="8 input channels; expected 4 .* or 9"):
        detect_family(eight)
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
