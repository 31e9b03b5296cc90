"""Families are plug-ins: a family defined only here, registered at test time, is detected, loaded, saved and
drawn with, and no other module changes; the packaged families keep their facts (latent formats, kohya names,
conditioners) in their folders."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from bundle_fixtures import randomize_, write_original

import sdlab
from sdlab.checkpoints import create
from sdlab.checkpoints.detect import detect_family
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.io import read_checkpoint, shapes_of
from sdlab.checkpoints.load import load_bundle
from sdlab.checkpoints.lora import kohya_metadata
from sdlab.checkpoints.save import save_bundle
from sdlab.diffusion.denoiser import Prediction
from sdlab.families import (
    FAMILIES,
    ConditionerSpec,
    FamilySpec,
    LatentFormat,
    Signature,
    TextEncoderSpec,
    family_names,
    get_family,
    register,
    registered,
    registered_families,
)
from sdlab.families.base import KohyaNames
from sdlab.families.sd1 import CLIP_L, SD_VAE
from sdlab.families.sd2 import SD2_UNET
from sdlab.pipeline.conditioning import make_cond, sdxl_size_conds

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# --- a toy family: a folder's worth of facts, nothing else ------------------------------------------------

TOY_TEXT = TextEncoderSpec(
    name="toy_clip", config=replace(CLIP_L, projection_dim=768), prefix="toy_text.transformer.", layout="hf",
    hidden_state="penultimate", pad_token_id=49407, diffusers_folder="text_encoder",
)
TOY = FamilySpec(
    name="toy",
    description="a test-only family: one CLIP tower under its own prefix, pooled text + target size vector",
    unet=replace(SD2_UNET, context_dim=768, adm_in_channels=768 + 2 * 256),
    vae=SD_VAE,
    text_encoders=(TOY_TEXT,),
    latent_format=LatentFormat(channels=4, scaling_factor=0.5, rgb_factors=((0.5, 0.0, 0.0),) * 4),
    prediction=Prediction.V,
    default_size=64,
    diffusers_pipeline="ToyPipeline",
    signature=Signature(says="toy_text.transformer.* (the toy tower)", from_diffusers=False),
    kohya=KohyaNames(base_model_version="toy_v1", architecture="toy/lora"),
    conditioner=ConditionerSpec(pooled=True, size_conds=("target_size",)),
    default_sampler="euler",
    default_cfg=3.0,
)
TOY_FOLDER = SimpleNamespace(__name__="toy", FAMILIES=(TOY,), RELEASED="2099")


def _toy_bundle():
    bundle = create.new_bundle(TOY, tiny=True, seed=3)
    for i, module in enumerate((bundle.unet, bundle.vae, *(te.model for te in bundle.text_encoders))):
        randomize_(module, 30 + i)
    return bundle


def test_a_registered_family_is_detected_loaded_and_drawn_with(tmp_path: Path):
    with registered(TOY_FOLDER):
        assert family_names()[-1] == "toy" and get_family("toy") is TOY and TOY in registered_families()
        bundle = _toy_bundle()
        assert bundle.unet_config.adm_in_channels == 64 + 2 * 256        # tiny pooled width + target size
        bare = write_original(bundle, tmp_path / "toy_bare.safetensors")  # no sdlab metadata, with junk keys
        assert detect_family(shapes_of(read_checkpoint(bare)[0])) is TOY
        loaded = load_bundle(bare)
        assert loaded.family is TOY and loaded.prediction is Prediction.V and loaded.scaling_factor == 0.5
        for a, b in zip(bundle.unet.state_dict().values(), loaded.unet.state_dict().values()):
            assert torch.equal(a, b)

        cond, uncond = make_cond(loaded.text_encoders, TOY, "a red circle", width=64, height=48,
                                 adm_width=loaded.unet_config.adm_in_channels)
        assert cond["y"].shape == (1, 64 + 512) and uncond["context"].shape == cond["context"].shape
        assert sdxl_size_conds(TOY, width=64, height=48).tolist() == [[48.0, 64.0]]

        saved = save_bundle(loaded, tmp_path / "toy.safetensors")
        pipe = sdlab.load(saved)
        result = pipe.txt2img("a red circle", steps=2, seed=5)
        assert result.request.sampler.lower() == "euler" and result.request.cfg_scale == 3.0
        image = np.asarray(result.images[0])
        assert image.shape == (64, 64, 3) and image.std() > 0
    assert "toy" not in family_names()
    with pytest.raises(CheckpointError, match="cannot tell the model family"):
        detect_family(shapes_of(read_checkpoint(bare)[0]))


def test_registering_checks_the_folder():
    with pytest.raises(ValueError, match="must export FAMILIES"):
        register(SimpleNamespace(__name__="empty", FAMILIES=(), RELEASED="2099"))
    with pytest.raises(ValueError, match="must export RELEASED"):
        register(SimpleNamespace(__name__="undated", FAMILIES=(TOY,)))
    with pytest.raises(ValueError, match="two model families are called 'sd1'"):
        register(SimpleNamespace(__name__="clash", FAMILIES=(replace(TOY, name="sd1"),), RELEASED="2099"))
    assert family_names() == tuple(f.name for f in FAMILIES)


def test_a_spec_whose_conditioner_and_unet_disagree_is_refused():
    with pytest.raises(ValueError, match="added vector"):
        replace(TOY, conditioner=ConditionerSpec())
    with pytest.raises(ValueError, match="unknown size conditions"):
        ConditionerSpec(size_conds=("colour",))


# --- the packaged families' facts -------------------------------------------------------------------------


def test_family_folders_export_their_families():
    import sdlab.families.sd1 as sd1
    import sdlab.families.sdlab_tiny as tiny
    import sdlab.families.sdxl as sdxl

    assert [f.name for f in sd1.FAMILIES] == ["sd1", "sd1-inpaint", "sd1-edit"]
    assert [f.name for f in sdxl.FAMILIES] == ["sdxl", "sdxl-refiner", "sdxl-inpaint", "sdxl-edit"]
    assert tiny.FAMILIES == (get_family("sdlab-tiny"),)
    for family in FAMILIES:
        assert [c.name for c in family.components] == ["unet", "vae", *(te.name for te in family.text_encoders)]
        assert family.prefixes == {c.name: c.prefix for c in family.components}


def test_latent_formats_carry_comfyui_preview_factors():
    sd1, sd2, xl = (get_family(n).latent_format for n in ("sd1", "sd2", "sdxl"))
    assert sd1 == sd2 and sd1.scaling_factor == 0.18215 and xl.scaling_factor == 0.13025
    assert sd1.rgb_factors[0] == (0.3512, 0.2297, 0.3227) and sd1.rgb_bias == (0.0, 0.0, 0.0)
    assert xl.rgb_factors[3] == (-0.3165, -0.2492, -0.2188) and xl.rgb_bias == (0.1084, -0.0175, -0.0011)
    assert get_family("sdxl-refiner").latent_format is xl
    z = torch.zeros(2, 4, 3, 5)
    rgb = xl.preview_rgb(z)
    assert rgb.shape == (2, 3, 3, 5)
    assert torch.allclose(rgb[0, :, 0, 0], (torch.tensor(xl.rgb_bias) + 1) / 2)
    assert torch.equal(sd1.to_vae(sd1.to_model(torch.ones(1))), torch.ones(1))


def test_sdlab_tiny_preview_follows_its_decoder():
    """The fitted factors map the shipped model's latents to the colours its VAE decodes (pictures it draws
    for prompts the fit did not see), far closer than SD's factors or a flat colour do."""
    pipe = sdlab.load()
    bundle = pipe.bundle
    fmt = bundle.family.latent_format
    assert fmt.rgb_factors is not None and fmt.channels == bundle.unet_config.in_channels
    prompts = ["a medium cat face in the center on a black background",
               "a medium rocket at the bottom on a light yellow background"]
    images = [pipe.txt2img(p, seed=7 + i, steps=12).images[0] for i, p in enumerate(prompts)]
    pixels = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1)
                          for im in images]).permute(0, 3, 1, 2)                     # (2, 3, 64, 64)
    with torch.no_grad():
        z = bundle.vae.encode(pixels).mean * bundle.scaling_factor                  # (2, 4, 16, 16)
        decoded = bundle.vae.decode(z / bundle.scaling_factor).clamp(-1, 1)
    target = (torch.nn.functional.avg_pool2d(decoded, 4) + 1) / 2                   # (2, 3, 16, 16) in [0, 1]

    def rms(picture: torch.Tensor) -> float:
        return float((picture - target).pow(2).mean().sqrt())

    fitted = rms(fmt.preview_rgb(z, bundle.scaling_factor))
    assert fitted < 0.15
    assert fitted < 0.5 * rms(get_family("sd1").latent_format.preview_rgb(z, bundle.scaling_factor))
    assert fitted < 0.5 * rms(target.mean(dim=(0, 2, 3), keepdim=True))          # one flat colour for both


def test_kohya_names_come_from_the_family():
    sd1, sd2, xl = get_family("sd1"), get_family("sd2"), get_family("sdxl-refiner")
    assert {k: kohya_metadata(sd2, "v", 4, 4.0)[k] for k in ("ss_v2", "ss_base_model_version", "modelspec.architecture")} == {
        "ss_v2": "True", "ss_base_model_version": "sd_v2_v", "modelspec.architecture": "stable-diffusion-v2-768-v/lora"}
    assert kohya_metadata(sd2, "eps", 4, 4.0)["modelspec.architecture"] == "stable-diffusion-v2-512/lora"
    assert kohya_metadata(get_family("sd2-inpaint"), "eps", 4, 4.0)["ss_base_model_version"] == "sd_v2"
    assert kohya_metadata(sd1, "v", 4, 4.0)["ss_base_model_version"] == "sd_v1_v"
    meta = kohya_metadata(xl, "v", 4, 4.0)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert kohya_metadata(get_family("sdlab-tiny"), "v", 4, 4.0)["ss_base_model_version"] == "sd_v1_v"
    assert kohya_metadata(sd1, "eps", 4, 4.0)["modelspec.prediction_type"] == "epsilon"
    assert "modelspec.prediction_type" not in kohya_metadata(sd1, "x0", 4, 4.0)     # the model spec has no x0


def test_conditioners_say_what_make_cond_builds():
    xl, refiner = get_family("sdxl"), get_family("sdxl-refiner")
    assert sdxl_size_conds(xl, width=1024, height=768, crops_coords_top_left=(3, 4)).tolist() == [
        [768.0, 1024.0, 3.0, 4.0, 768.0, 1024.0]]
    assert sdxl_size_conds(refiner, width=1024, height=768, aesthetic_score=6.5).tolist() == [
        [768.0, 1024.0, 0.0, 0.0, 6.5]]
    assert sdxl_size_conds(get_family("sd1"), width=512, height=512).shape == (1, 0)
    for family in FAMILIES:
        adm = family.unet.adm_in_channels
        if family.conditioner.added_vector:
            assert adm == family.text_encoders[-1].config.projection_dim + 256 * family.conditioner.num_size_numbers
        else:
            assert adm is None
    assert [f.name for f in FAMILIES if f.is_refiner] == ["sdxl-refiner"]
    assert [f.name for f in FAMILIES if f.prediction_is_ambiguous] == ["sd2"]


def test_model_sampling_comes_from_the_family():
    from sdlab.diffusion.model_sampling import DiscreteModelSampling, FlowMatchingModelSampling

    sd2 = get_family("sd2")
    sampling = sd2.model_sampling(Prediction.V)
    assert isinstance(sampling, DiscreteModelSampling) and sampling.prediction is Prediction.V
    assert torch.equal(sampling.schedule.alphas_cumprod, sd2.schedule.build().alphas_cumprod)
    bundle = create.new_bundle("sd1", tiny=True)
    assert isinstance(bundle.model_sampling, DiscreteModelSampling) and bundle.model_sampling.prediction is Prediction.EPS
    flow = replace(TOY, name="toy-flow", sampling=lambda family, prediction: FlowMatchingModelSampling(shift=3.0))
    assert isinstance(flow.model_sampling(Prediction.V), FlowMatchingModelSampling)


@pytest.mark.parametrize(("name", "changes"), [
    ("sd1", {"model_channels": 32, "context_dim": 128, "num_heads": 4}),
    ("sd2", {"model_channels": 64, "context_dim": 128}),
    ("sdxl", {"model_channels": 64, "context_dim": 256, "adm_in_channels": 128 + 6 * 256,
              "transformer_depth": (0, 1, 1), "transformer_depth_middle": 1}),
    ("sdxl-refiner", {"model_channels": 64, "context_dim": 128, "adm_in_channels": 128 + 5 * 256,
                      "transformer_depth": (0, 1, 1, 0), "transformer_depth_middle": 1}),
])
def test_reduced_unet_only_files_are_told_by_structure(name: str, changes: dict):
    """A file holding only a reduced-width U-Net is its family by levels, projection kind and added vector."""
    from sdlab.models.unet import UNet

    family = get_family(name)
    with torch.device("meta"):
        unet = UNet(replace(family.unet, **changes))
    shapes = {family.unet_prefix + k: v.shape for k, v in unet.state_dict().items()}
    assert detect_family(shapes) is family
    inpaint = dict(shapes)
    conv_in = family.unet_prefix + "input_blocks.0.0.weight"
    inpaint[conv_in] = torch.Size([shapes[conv_in][0], 9, 3, 3])
    if name != "sdxl-refiner":
        assert detect_family(inpaint) is get_family(f"{name}-inpaint")


def test_a_signature_naming_an_unknown_fact_is_a_clear_error(tmp_path: Path):
    typo = replace(TOY, name="toy-typo", signature=Signature(says="toy", requires=(("linear_projection", True),)))
    with registered(SimpleNamespace(__name__="typo", FAMILIES=(typo,), RELEASED="2099")):
        shapes = {k: v.shape for k, v in _toy_bundle().unet.state_dict().items()}
        shapes = {TOY.unet_prefix + k: s for k, s in shapes.items()} | {"toy_text.transformer.x": torch.Size([1])}
        with pytest.raises(ValueError, match="requires 'linear_projection', which detection does not gather"):
            detect_family(shapes)
