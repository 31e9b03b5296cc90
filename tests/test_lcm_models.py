"""Full LCM-distilled checkpoints: U-Nets with a guidance embedding (diffusers' `time_cond_proj_dim`).

One reduced-width SD1 diffusers folder whose U-Net is built by diffusers' `UNet2DConditionModel` with
`time_cond_proj_dim=32` and seeded random weights (the text encoder and VAE are the tiny SD1 bundle's, as in
tests/test_pipeline_parity.py). The proof:

  (a) sdlab's U-Net gives diffusers' output for the same `timestep_cond` (max |diff| <= 1e-5);
  (b) sdlab's picture is `LatentConsistencyModelPipeline`'s (LCMScheduler, guidance 8.5 -> w = 7.5 embedded,
      no unconditional pass) at 1, 2 and 4 steps within 2/255; at 4 steps sdlab gets no option at all: the
      model's own preset (`lcm-model`: LCM sampler, 4 steps, CFG 8.5) draws it;
  (c) the same weights in the original single-file layout (`time_embed.cond_proj.weight`, or the diffusers
      name some converters leave, `time_embedding.cond_proj.weight`) load to the same U-Net output.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from picture_parity import (
    MAX_PIXEL_DIFF,
    PROMPT,
    SEED,
    SIZE,
    max_pixel_diff,
)
from test_pipeline_parity import (
    BATCH,
    SD_SCHEDULER_KEYS,
    _as_released,
    _generators,
    _quiet,
)

import sdlab
from bundle_fixtures import init_picture, lower_right_mask, randomize_, tiny_bundle, write_diffusers_folder, write_original
from sdlab.diffusion.discretization import lcm_timesteps
from sdlab.pipeline.plan import resolve_for
from sdlab.pipeline.request import GenerationRequest, RequestError
from sdlab.checkpoints.diffusers_unet import (
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_key_map,
)
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.load import load_bundle
from sdlab.models.unet import UNet, UNetConfig, guidance_scale_embedding
from sdlab.pipeline.presets import apply_preset, get_preset

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

COND_DIM = 32
GUIDANCE = 8.5          # diffusers' LatentConsistencyModelPipeline default: w = 7.5


def _lcm_folder(tmp_path_factory, family: str):
    """The tiny `family` folder with its U-Net replaced by a diffusers LCM U-Net (guidance embedding, random
    weights)."""
    path = _as_released(write_diffusers_folder(tiny_bundle(family, seed=11), tmp_path_factory.mktemp("lcm") / "pipe"))
    config = json.loads((path / "unet" / "config.json").read_text())
    unet = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": COND_DIM})
    randomize_(unet, seed=5)
    with torch.no_grad():  # a strong guidance projection, so that a wrong embedding changes the picture
        unet.time_embedding.cond_proj.weight.mul_(20.0)
    unet.save_pretrained(path / "unet")
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _lcm_folder(tmp_path_factory, "sd1")


@pytest.fixture(scope="module")
def pipes(folder):
    pipe = _quiet(LatentConsistencyModelPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                                 feature_extractor=None))
    config = {key: pipe.scheduler.config[key] for key in SD_SCHEDULER_KEYS}
    pipe.scheduler = LCMScheduler.from_config(config)
    return sdlab.load(folder), pipe


def _unet_inputs(context_dim: int = 32):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([999.0, 259.0])
    context = torch.randn(2, 77, context_dim, generator=g)
    w = torch.tensor([7.5, 2.0])
    return x, t, context, guidance_scale_embedding(w, COND_DIM)


# --- the embedding and the U-Net ------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [256, 32, 31])
def test_guidance_embedding_is_diffusers(dim):
    w = torch.tensor([0.0, 1.0, 7.5, 13.25])
    expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
    assert torch.equal(guidance_scale_embedding(w, dim), expected)


def test_unet_without_the_option_has_no_extra_parameter():
    cfg = UNetConfig(model_channels=32, channel_mult=(1, 2), transformer_depth=(1, 1), num_heads=2, context_dim=32,
                     norm_groups=8)
    plain, lcm = UNet(cfg), UNet(replace(cfg, time_cond_proj_dim=COND_DIM))
    assert set(lcm.state_dict()) - set(plain.state_dict()) == {"time_embed.cond_proj.weight"}
    assert lcm.time_embed.cond_proj.weight.shape == (32, COND_DIM)
    x, t, context, emb = _unet_inputs()
    with pytest.raises(ValueError, match="no guidance embedding"):
        plain(x, t, context, guidance_emb=emb)


def test_diffusers_config_round_trips_with_the_guidance_embedding():
    cfg = unet_config_from_diffusers(unet_config_to_diffusers(UNetConfig(time_cond_proj_dim=256)))
    assert cfg.time_cond_proj_dim == 256
    assert unet_key_map(cfg)["time_embed.cond_proj.weight"] == "time_embedding.cond_proj.weight"
    assert "time_embed.cond_proj.weight" not in unet_key_map(UNetConfig())


def test_unet_output_is_diffusers(folder, pipes):
    ours = pipes[0].bundle.unet
    assert pipes[0].bundle.unet_config.time_cond_proj_dim == COND_DIM
    reference = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    x, t, context, emb = _unet_inputs(pipes[0].bundle.unet_config.context_dim)
    with torch.inference_mode():
        expected = reference(x, t, context, timestep_cond=emb).sample
        got = ours(x, t, context, guidance_emb=emb)
        unguided = ours(x, t, context)
    assert (got - expected).abs().max() <= 1e-5
    assert (unguided - expected).abs().max() > 1e-2  # the embedding matters at this tolerance


# --- loading -----------------------------------------------------------------------------------------------------


def test_model_draws_with_its_own_preset(pipes):
    bundle = pipes[0].bundle
    assert bundle.family.name == "sd1"
    assert bundle.preset == "lcm-model"
    preset = get_preset(bundle.preset)
    assert (preset.sampler, preset.steps, preset.cfg_scale) == ("LCM", 4, GUIDANCE)
    assert apply_preset(bundle.preset, {"cfg_scale": 3.0})["cfg_scale"] == 3.0  # what the user gives wins


@pytest.mark.parametrize("key", ["time_embed.cond_proj.weight", "time_embedding.cond_proj.weight"])
def test_single_file_layout_loads_the_same_unet(pipes, tmp_path, key):
    bundle = pipes[0].bundle
    path = write_original(bundle, tmp_path / "lcm.safetensors")
    if key != "time_embed.cond_proj.weight":  # as diffusers' convert_diffusers_to_original script leaves it
        state = load_file(path)
        state["model.diffusion_model." + key] = state.pop("model.diffusion_model.time_embed.cond_proj.weight")
        save_file(state, path)
    loaded = load_bundle(path)
    assert loaded.family.name == "sd1"
    assert loaded.unet_config == bundle.unet_config
    assert loaded.preset == "lcm-model"
    x, t, context, emb = _unet_inputs(bundle.unet_config.context_dim)
    with torch.inference_mode():
        assert torch.equal(loaded.unet(x, t, context, guidance_emb=emb), bundle.unet(x, t, context, guidance_emb=emb))


def test_saved_by_sdlab_and_loaded_again(pipes, tmp_path):
    from sdlab.checkpoints.save import save_bundle

    bundle = pipes[0].bundle
    again = load_bundle(save_bundle(bundle, tmp_path / "lcm.safetensors"))
    assert again.unet_config == bundle.unet_config and again.preset == "lcm-model"
    assert torch.equal(again.unet.time_embed.cond_proj.weight, bundle.unet.time_embed.cond_proj.weight)


def test_single_file_with_both_names_is_refused(pipes, tmp_path):
    path = write_original(pipes[0].bundle, tmp_path / "lcm.safetensors")
    state = load_file(path)
    state["model.diffusion_model.time_embedding.cond_proj.weight"] = state["model.diffusion_model.time_embed.cond_proj.weight"].clone()
    save_file(state, path)
    with pytest.raises(CheckpointError, match="twice"):
        load_bundle(path)


def test_config_declaring_an_embedding_the_weights_lack_is_refused(folder, tmp_path):
    import shutil

    copy = shutil.copytree(folder, tmp_path / "pipe")
    config = json.loads((copy / "unet" / "config.json").read_text())
    (copy / "unet" / "config.json").write_text(json.dumps({**config, "time_cond_proj_dim": 2 * COND_DIM}))
    with pytest.raises(CheckpointError, match="time_cond_proj_dim"):
        load_bundle(copy)


# --- the whole picture -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_picture_is_the_lcm_pipeline(pipes, steps):
    ours_pipe, pipe = pipes
    reference = pipe(PROMPT, num_images_per_prompt=BATCH, num_inference_steps=steps, guidance_scale=GUIDANCE,
                     width=SIZE, height=SIZE, generator=_generators(), output_type="np").images
    options = dict(seed=SEED, width=SIZE, height=SIZE, batch_size=BATCH)
    if steps != 4:
        options["steps"] = steps
    ours = ours_pipe.txt2img(PROMPT, **options)          # the model's preset: LCM, 4 steps, CFG 8.5
    assert ours.request.sampler == "LCM" and ours.request.cfg_scale == GUIDANCE
    assert max_pixel_diff(ours.images, reference) <= MAX_PIXEL_DIFF
    if steps == 2:                                       # the CFG scale reaches the network: w = cfg - 1
        other = ours_pipe.txt2img(PROMPT, cfg_scale=2.0, **options)
        assert max_pixel_diff(other.images, reference) > MAX_PIXEL_DIFF


@pytest.mark.parametrize("steps, strength", [(4, 0.3), (4, 0.5), (2, 0.8), (4, 1.0)])
def test_img2img_is_the_lcm_img2img_pipeline(folder, pipes, steps, strength):
    """diffusers draws an LCM model's img2img with LatentConsistencyModelImg2ImgPipeline (AutoPipelineForImage2Image's
    choice), whose LCMScheduler takes the strength itself: all `steps` run on the grid of its lowest int(50 strength)
    distillation timesteps (strength 0.5 at 4 steps: 499, 379, 259, 139), not int(steps strength) of the full grid."""
    from diffusers import LatentConsistencyModelImg2ImgPipeline

    ours_pipe, txt2img = pipes
    pipe = _quiet(LatentConsistencyModelImg2ImgPipeline(**txt2img.components))
    picture = init_picture(SIZE)
    reference = pipe(PROMPT, image=picture, strength=strength, num_images_per_prompt=BATCH, num_inference_steps=steps,
                     guidance_scale=GUIDANCE, generator=_generators(), output_type="np").images
    ours = ours_pipe.img2img(PROMPT, picture, strength=strength, steps=steps, seed=SEED, batch_size=BATCH)
    assert ours.request.img2img_convention == "lcm"
    assert max_pixel_diff(ours.images, reference) <= MAX_PIXEL_DIFF


def test_lcm_img2img_grid_is_lcmschedulers():
    for steps, strength in ((4, 0.5), (4, 0.3), (1, 0.02), (8, 0.77), (50, 1.0), (3, 0.13)):
        scheduler = LCMScheduler()
        scheduler.set_timesteps(steps, strength=strength)
        assert lcm_timesteps(steps, strength=strength).tolist() == scheduler.timesteps.tolist(), (steps, strength)
    with pytest.raises(ValueError, match="keeps 2 of LCM's 50 distillation timesteps, fewer than the 4 steps"):
        lcm_timesteps(4, strength=0.05)                 # diffusers refuses it too (skipping_step < 1)


def test_img2img_conventions_of_an_lcm_model(pipes):
    ours_pipe, _ = pipes
    picture = init_picture(SIZE)
    with pytest.raises(RequestError, match="keeps 2 of LCM's 50 distillation timesteps, fewer than the 4 steps"):
        ours_pipe.img2img(PROMPT, picture, strength=0.05, seed=SEED)
    asked = ours_pipe.img2img(PROMPT, picture, strength=0.5, steps=2, seed=SEED, img2img_convention="a1111")
    assert asked.request.img2img_convention == "a1111"                                  # a convention named wins
    other = ours_pipe.img2img(PROMPT, picture, strength=0.5, steps=2, seed=SEED, sampler="Euler a")
    assert other.request.img2img_convention == "diffusers"                              # not LCMScheduler's grid
    masked = ours_pipe.inpaint(PROMPT, picture, lower_right_mask(SIZE), strength=0.5, steps=2, seed=SEED)
    assert masked.request.img2img_convention == "diffusers"                             # no LCM inpainting pipeline
    with pytest.raises(RequestError, match="does not inpaint"):
        ours_pipe.inpaint(PROMPT, picture, lower_right_mask(SIZE), strength=0.5, steps=2, img2img_convention="lcm")
    lora_route = GenerationRequest(PROMPT, init_image=picture, strength=0.5, **get_preset("lcm").options("img2img"))
    assert resolve_for(tiny_bundle("sd1"), lora_route).img2img_convention == "diffusers"   # no guidance embedding:
                                                                    # StableDiffusionImg2ImgPipeline + LCMScheduler


def test_cli_draws_with_the_lcm_model_preset_and_the_given_cfg_wins(folder, tmp_path, capsys):
    from cli_helpers import run
    from sdlab.pipeline.png_info import read_parameters

    common = ["txt2img", "a fox", "--model", str(folder), "--seed", "1", "--width", "32", "--height", "32",
              "--no-progress"]
    code, _, err = run([*common, "--out", str(tmp_path / "a.png")], capsys)
    assert code == 0, err
    parameters = read_parameters(tmp_path / "a.png")
    assert "Sampler: LCM" in parameters and "Steps: 4" in parameters and "CFG scale: 8.5" in parameters, parameters
    code, _, err = run([*common, "--cfg", "3", "--steps", "2", "--out", str(tmp_path / "b.png")], capsys)
    assert code == 0, err
    parameters = read_parameters(tmp_path / "b.png")
    assert "Sampler: LCM" in parameters and "Steps: 2" in parameters and "CFG scale: 3" in parameters, parameters
    assert "no guidance" not in err
    # the LCM-LoRA preset's CFG 1 embeds w = 0 in such a model: drawn as asked, with a warning that says so
    code, _, err = run([*common, "--preset", "lcm", "--out", str(tmp_path / "c.png")], capsys)
    assert code == 0, err
    assert "no guidance" in err and "--preset lcm-model" in err, err


def test_sdxl_lcm_picture_is_diffusers(tmp_path_factory):
    """lcm-sdxl is drawn by diffusers' StableDiffusionXLPipeline, which embeds guidance_scale - 1 for such a U-Net
    and then runs no unconditional pass."""
    folder = _lcm_folder(tmp_path_factory, "sdxl")
    pipe = _quiet(StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True))
    config = {key: pipe.scheduler.config[key] for key in SD_SCHEDULER_KEYS}
    pipe.scheduler = LCMScheduler.from_config(config)
    reference = pipe(PROMPT, num_images_per_prompt=BATCH, num_inference_steps=2, guidance_scale=GUIDANCE,
                     width=SIZE, height=SIZE, generator=_generators(), output_type="np").images
    ours_pipe = sdlab.load(folder)
    assert ours_pipe.bundle.family.name == "sdxl" and ours_pipe.bundle.preset == "lcm-model"
    ours = ours_pipe.txt2img(PROMPT, steps=2, seed=SEED, width=SIZE, height=SIZE, batch_size=BATCH)
    assert max_pixel_diff(ours.images, reference) <= MAX_PIXEL_DIFF
