"""SDXL-architecture models on another noise model: Playground v2.5 (continuous EDM, EDM's F-prediction,
sigma_data 0.5, per-channel latent statistics) and CosXL (EDM v-prediction), from diffusers folders and single
files, against diffusers' pipelines with the folder's own scheduler and ComfyUI's formulas; and a `--vae`
override's own scaling factor. Pictures agree within 2/255 (`MAX_PIXEL_DIFF`, the README's bound; 1/255
measured)."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_fixtures import as_released, init_picture, tiny_bundle, write_diffusers_folder
from diffusers import (
    AutoencoderKL,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from picture_parity import CFG, MAX_PIXEL_DIFF, PROMPT, SEED, SIZE, STEPS, max_pixel_diff, uint8_pictures
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sdlab
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.load import plan_checkpoint
from sdlab.checkpoints.save import save_bundle
from sdlab.diffusion.denoiser import Denoiser
from sdlab.diffusion.model_sampling import ContinuousEDMModelSampling
from sdlab.diffusion.prediction import Prediction
from sdlab.families import EDMSpec
from sdlab.families.latent_format import LatentStats

NEGATIVE = "blurry"

# playgroundai/playground-v2.5-1024px-aesthetic: scheduler/scheduler_config.json and vae/config.json's statistics
PLAYGROUND_SCHEDULER = {
    "_class_name": "EDMDPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++", "dynamic_thresholding_ratio": 0.995,
    "euler_at_final": False, "final_sigmas_type": "zero", "lower_order_final": True, "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "rho": 7.0, "sample_max_value": 1.0, "sigma_data": 0.5, "sigma_max": 80.0,
    "sigma_min": 0.002, "solver_order": 2, "solver_type": "midpoint", "thresholding": False,
}
PLAYGROUND_VAE = {"latents_mean": [-1.6574, 1.886, -1.383, 2.5155], "latents_std": [8.4927, 5.9022, 6.5498, 5.2299],
                  "scaling_factor": 0.5}
# CosXL as diffusers draws it: Euler, continuous timesteps, EDM v-prediction on sigma 0.002..120
COSXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "prediction_type": "v_prediction", "timestep_type": "continuous",
    "sigma_min": 0.002, "sigma_max": 120.0, "use_karras_sigmas": True, "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "timestep_spacing": "leading",
    "steps_offset": 1,
}

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _folder(tmp_path_factory, name: str, scheduler: dict | None, vae: dict | None = None, family: str = "sdxl") -> Path:
    """A tiny folder of `family` with `scheduler` as its whole scheduler config (None: as written) and `vae`'s
    entries added to its VAE config."""
    folder = as_released(write_diffusers_folder(tiny_bundle(family, seed=11), tmp_path_factory.mktemp(name) / "pipe"),
                         SIZE // 2)
    if scheduler is not None:
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
        _edit_json(folder / "model_index.json", scheduler=["diffusers", scheduler["_class_name"]])
    if vae:
        _edit_json(folder / "vae" / "config.json", **vae)
    return folder


@pytest.fixture(scope="module")
def playground(tmp_path_factory):
    return _folder(tmp_path_factory, "playground", PLAYGROUND_SCHEDULER, PLAYGROUND_VAE)


@pytest.fixture(scope="module")
def cosxl(tmp_path_factory):
    return _folder(tmp_path_factory, "cosxl", COSXL_SCHEDULER)


def _pipe(cls, folder: Path):
    pipe = cls.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reference(pipe, **kw):
    return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG, width=SIZE,
                height=SIZE, generator=[torch.Generator("cpu").manual_seed(SEED)], output_type="np", **kw).images


def _ours(model, **kw):
    return model.txt2img(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE,
                         init_noise="vp", **kw).images


# ----------------------------------------------------------------------------------------------------------
# The model sampling against ComfyUI's and diffusers' formulas


def _comfy_denoised(kind: str, sigma: torch.Tensor, out: torch.Tensor, x: torch.Tensor, sigma_data: float):
    """ComfyUI comfy/model_sampling.py `EDM.calculate_denoised` / `V_PREDICTION.calculate_denoised` (and
    `EPS.calculate_input` for the net input), transcribed."""
    sigma = sigma.view(sigma.shape[:1] + (1,) * (out.ndim - 1))
    if kind == "edm":
        return x * sigma_data**2 / (sigma**2 + sigma_data**2) + out * sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
    return x * sigma_data**2 / (sigma**2 + sigma_data**2) - out * sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5


def _net(x_in, t):
    return torch.tanh(x_in) * 0.7 + t.view(-1, 1, 1, 1) * 0.3


@pytest.mark.parametrize(("prediction", "kind", "sigma_data"), [("eps", "edm", 0.5), ("v", "v", 1.0), ("v", "v", 0.5)])
def test_edm_denoiser_matches_comfyui_and_diffusers(prediction, kind, sigma_data):
    """x0 of the EDM model sampling = ComfyUI's classes, and diffusers' EDMEulerScheduler preconditioning
    (c_in, c_noise = ln(sigma) / 4, c_skip / c_out) on the same net, within float32 rounding."""
    sampling = ContinuousEDMModelSampling(prediction, 0.002, 80.0, sigma_data)
    x = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 20
    sigma = torch.tensor([63.0, 0.05], dtype=torch.float64)
    got = Denoiser(_net, sampling)(x, sigma)

    s = sigma.view(-1, 1, 1, 1)
    comfy = _comfy_denoised(kind, sigma, _net(x / (s**2 + sigma_data**2) ** 0.5, 0.25 * sigma.log()), x, sigma_data)
    torch.testing.assert_close(got, comfy.to(got.dtype), rtol=1e-5, atol=1e-5)

    scheduler = EDMEulerScheduler(sigma_data=sigma_data, prediction_type="epsilon" if kind == "edm" else "v_prediction")
    per_image = []
    for i in range(2):
        x_in = scheduler.precondition_inputs(x[i:i + 1], sigma[i])
        out = _net(x_in, scheduler.precondition_noise(sigma[i:i + 1]))
        per_image.append(scheduler.precondition_outputs(x[i:i + 1], out, sigma[i]))
    torch.testing.assert_close(got, torch.cat(per_image).to(got.dtype), rtol=1e-5, atol=1e-5)


def test_edm_schedule_is_comfyuis_sigma_table():
    """`schedule` holds ComfyUI's ModelSamplingContinuousEDM table (1000 log-spaced sigmas), so karras spans
    exactly [sigma_min, sigma_max]; the time input is ln(sigma) / 4 both ways."""
    sampling = ContinuousEDMModelSampling("eps", 0.002, 80.0, 0.5)
    table = torch.linspace(math.log(0.002), math.log(80.0), 1000).exp()          # ComfyUI's float32 table
    torch.testing.assert_close(sampling.schedule.sigmas.float(), table, rtol=1e-5, atol=0)
    assert sampling.schedule.sigma_min == pytest.approx(0.002, rel=1e-9)
    assert sampling.schedule.sigma_max == pytest.approx(80.0, rel=1e-9)
    sigma = torch.tensor([0.01, 3.0, 80.0])
    torch.testing.assert_close(sampling.sigma_to_t(sigma, quantize=True), 0.25 * sigma.log())
    torch.testing.assert_close(sampling.t_to_sigma(sampling.sigma_to_t(sigma)), sigma)


def test_edm_training_target_reconstructs_x0():
    """The training target is the net output whose denoised value is x0 exactly."""
    sampling = ContinuousEDMModelSampling("eps", 0.002, 80.0, 0.5)
    x0, noise = torch.randn(3, 4, 4, 4, dtype=torch.float64), torch.randn(3, 4, 4, 4, dtype=torch.float64)
    t = sampling.sample_timesteps([torch.Generator().manual_seed(i) for i in range(3)]).double()
    target = sampling.training_target(x0, noise, t)
    sigma = sampling.t_to_sigma(t).view(-1, 1, 1, 1)
    c_skip, c_out, _ = sampling.scalings(sigma)
    torch.testing.assert_close(c_skip * (x0 + sigma * noise) + c_out * target, x0)


# ----------------------------------------------------------------------------------------------------------
# diffusers folders


def test_playground_folder_txt2img_equals_diffusers(playground):
    """EDM-DPM-Solver++ 2M (the folder's scheduler) = sdlab's default DPM++ 2M Karras on the EDM sigma range;
    decoded through the VAE's latents_mean / latents_std as diffusers' SDXL pipeline does."""
    model = sdlab.load(playground, dtype="fp32")
    assert model.bundle.noise_model == EDMSpec(0.002, 80.0, 0.5)
    assert model.bundle.latent_stats.mean == tuple(PLAYGROUND_VAE["latents_mean"])
    pipe = _pipe(StableDiffusionXLPipeline, playground)
    assert isinstance(pipe.scheduler, EDMDPMSolverMultistepScheduler)
    assert max_pixel_diff(_ours(model), _reference(pipe)) <= MAX_PIXEL_DIFF
    pipe.scheduler = EDMEulerScheduler.from_config(pipe.scheduler.config)
    assert max_pixel_diff(_ours(model, sampler="Euler", schedule="karras"), _reference(pipe)) <= MAX_PIXEL_DIFF


def test_playground_folder_img2img_equals_diffusers(playground):
    """img2img encodes with (z - mean) * scaling / std (diffusers' SDXL img2img `prepare_latents`)."""
    model = sdlab.load(playground, dtype="fp32")
    pipe = _pipe(StableDiffusionXLImg2ImgPipeline, playground)
    pipe.scheduler = EDMEulerScheduler.from_config(pipe.scheduler.config)
    reference = pipe(PROMPT, image=init_picture(SIZE), strength=0.6, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                     guidance_scale=CFG, generator=[torch.Generator("cpu").manual_seed(SEED)], output_type="np").images
    ours = model.img2img(PROMPT, init_picture(SIZE), strength=0.6, negative_prompt=NEGATIVE, steps=STEPS,
                         cfg_scale=CFG, seed=SEED, sampler="Euler", schedule="karras").images
    assert max_pixel_diff(ours, reference) <= MAX_PIXEL_DIFF


def test_the_latent_statistics_change_the_picture(playground, tmp_path):
    """Without them (diffusers then decodes latents / scaling alone) the picture is far off: the check sees them."""
    plain = tmp_path / "plain"
    import shutil
    shutil.copytree(playground, plain)
    _edit_json(plain / "vae" / "config.json", latents_mean=None, latents_std=None)
    reference = _reference(_pipe(StableDiffusionXLPipeline, playground))
    assert max_pixel_diff(_ours(sdlab.load(plain, dtype="fp32")), reference) > 20


def test_cosxl_folder_txt2img_equals_diffusers(cosxl):
    """Euler with continuous timesteps and v-prediction is EDM v-prediction (sigma_data 1) on 0.002..120."""
    model = sdlab.load(cosxl, dtype="fp32")
    assert model.bundle.prediction is Prediction.V
    assert model.bundle.noise_model == EDMSpec(0.002, 120.0, 1.0)
    reference = _reference(_pipe(StableDiffusionXLPipeline, cosxl))
    assert max_pixel_diff(_ours(model, sampler="Euler", schedule="karras"), reference) <= MAX_PIXEL_DIFF


def test_inspect_reports_the_noise_model(playground):
    report = plan_checkpoint(playground).report.to_json()
    assert report["noise_model"] == "continuous EDM, sigma 0.002..80, sigma_data 0.5"
    assert report["latent_stats"]["std"] == PLAYGROUND_VAE["latents_std"]


@pytest.mark.parametrize("scheduler", [
    {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0},
    {"_class_name": "SomeNewScheduler", "use_dynamic_shifting": True},
])
def test_flow_matching_folder_is_refused_in_one_line(tmp_path_factory, scheduler):
    folder = _folder(tmp_path_factory, "flow", scheduler, family="sd1")
    with pytest.raises(CheckpointError, match="flow-matching") as err:
        sdlab.load(folder)
    assert "\n" not in str(err.value) and "scheduler_config.json" in str(err.value)


def test_unknown_class_with_edm_settings_warns(tmp_path_factory, caplog):
    folder = _folder(tmp_path_factory, "unknown", {"_class_name": "MyEDMLikeScheduler", "sigma_data": 0.5}, family="sd1")
    with caplog.at_level(logging.WARNING, logger="sdlab"):
        assert sdlab.load(folder).bundle.noise_model is None
    assert any("MyEDMLikeScheduler" in r.getMessage() and "sigma_data" in r.getMessage() for r in caplog.records)


def test_sd1_folder_ignores_latent_statistics_as_diffusers_does(tmp_path_factory):
    folder = _folder(tmp_path_factory, "sd1stats", {"_class_name": "EulerDiscreteScheduler"}, PLAYGROUND_VAE,
                     family="sd1")
    assert sdlab.load(folder).bundle.latent_stats is None


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_vae_statistics_follow_one_family_rule_however_the_vae_arrives(tmp_path_factory, family):
    """diffusers' SD pipeline never reads vae.config.latents_mean / latents_std, its SDXL pipelines always do:
    a VAE folder declaring them counts the same as the model's own vae/ and as a --vae override."""
    stats = {"latents_mean": [0.1, 0.2, 0.3, 0.4], "latents_std": [2.0] * 4}
    with_stats = _folder(tmp_path_factory, f"{family}-stats", None, stats, family=family)
    plain = _folder(tmp_path_factory, f"{family}-plain", None, family=family)
    expected = LatentStats((0.1, 0.2, 0.3, 0.4), (2.0,) * 4) if family == "sdxl" else None
    assert sdlab.load(with_stats).bundle.latent_stats == expected
    overridden = sdlab.load(plain, vae=with_stats / "vae", dtype="fp32")
    assert overridden.bundle.latent_stats == expected
    if family == "sd1":             # the same VAE weights: the override changes nothing, as in diffusers
        assert np.array_equal(uint8_pictures(_ours(overridden)), uint8_pictures(_ours(sdlab.load(plain, dtype="fp32"))))


# ----------------------------------------------------------------------------------------------------------
# single files


@pytest.mark.parametrize("name", ["playground", "cosxl"])
def test_single_file_equals_the_folder_and_carries_comfyuis_keys(name, request, tmp_path):
    """A saved single file draws the folder's picture; ComfyUI's keys alone (sdlab's metadata stripped, as in
    the released Playground / CosXL files) give the same noise model and statistics."""
    folder = request.getfixturevalue(name)
    model = sdlab.load(folder, dtype="fp32")
    path = tmp_path / f"{name}.safetensors"
    save_bundle(model.bundle, path)
    again = sdlab.load(path, dtype="fp32")
    options = {} if name == "playground" else {"sampler": "Euler", "schedule": "karras"}
    assert np.array_equal(uint8_pictures(_ours(again, **options)), uint8_pictures(_ours(model, **options)))

    tensors = load_file(path)
    if name == "playground":
        assert tensors["edm_mean"].flatten().tolist() == pytest.approx(PLAYGROUND_VAE["latents_mean"])
        assert "v_pred" not in tensors
    else:
        assert float(tensors["edm_vpred.sigma_max"]) == 120.0
        assert float(tensors["edm_vpred.sigma_min"]) == pytest.approx(0.002)
        assert "v_pred" not in tensors
    with safe_open(path, "pt") as file:
        metadata = file.metadata()
    comfy_only = tmp_path / f"{name}-comfy.safetensors"
    kept = {k: v for k, v in metadata.items() if k not in ("sdlab.noise_model", "sdlab.latent_stats",
                                                            "sdlab.scaling_factor", "sdlab.prediction",
                                                            "modelspec.prediction_type", "modelspec.predict_key")}
    save_file(tensors, comfy_only, kept)
    from_keys = sdlab.load(comfy_only, dtype="fp32").bundle
    assert from_keys.noise_model == model.bundle.noise_model
    assert from_keys.latent_stats == model.bundle.latent_stats
    assert from_keys.scaling_factor == model.bundle.scaling_factor     # Playground's 0.5, as ComfyUI scales it
    assert from_keys.prediction is model.bundle.prediction


def test_playground_marker_keys_without_values_take_comfyuis_numbers(playground, tmp_path):
    """Empty `edm_mean` / `edm_std` markers: ComfyUI's SDXL_Playground_2_5 statistics (it never reads the values)."""
    model = sdlab.load(playground, dtype="fp32")
    path = tmp_path / "pg.safetensors"
    save_bundle(model.bundle, path)
    tensors = load_file(path) | {"edm_mean": torch.tensor([]), "edm_std": torch.tensor([])}
    save_file(tensors, tmp_path / "markers.safetensors", {"sdlab.family": "sdxl"})
    bundle = sdlab.load(tmp_path / "markers.safetensors", dtype="fp32").bundle
    assert bundle.latent_stats.std == (8.4927, 5.9022, 6.5498, 5.2299)
    assert bundle.noise_model == EDMSpec(0.002, 80.0, 0.5)
    assert bundle.scaling_factor == 0.5                     # SDXL_Playground_2_5.scale_factor


def _comfy_reading(tensors) -> tuple | None:
    """ComfyUI comfy/supported_models.py `SDXL.model_type` with the latent format it picks
    (`latent_formats.SDXL_Playground_2_5` / `SDXL`) and `ModelSamplingContinuousEDM`'s sigma_data default 1,
    transcribed: (prediction, EDMSpec, latent statistics, scaling factor) the EDM keys give, or None without."""
    if "edm_mean" in tensors and "edm_std" in tensors:
        return ("eps", EDMSpec(0.002, 80.0, 0.5),
                ((-1.6574, 1.886, -1.383, 2.5155), (8.4927, 5.9022, 6.5498, 5.2299)), 0.5)
    if "edm_vpred.sigma_max" in tensors:
        sigma_min = float(tensors["edm_vpred.sigma_min"].item()) if "edm_vpred.sigma_min" in tensors else 0.002
        return "v", EDMSpec(sigma_min, float(tensors["edm_vpred.sigma_max"].item()), 1.0), None, 0.13025
    return None


_PG = dict(noise_model=EDMSpec(0.002, 80.0, 0.5), scaling_factor=0.5,
           latent_stats=LatentStats(tuple(PLAYGROUND_VAE["latents_mean"]), tuple(PLAYGROUND_VAE["latents_std"])))
_COSXL = dict(prediction=Prediction.V, noise_model=EDMSpec(0.002, 120.0, 1.0))


@pytest.mark.parametrize(("family", "model", "keys"), [
    ("sdxl", _PG, True),                                                       # Playground v2.5
    ("sdxl", _COSXL, True),                                                    # CosXL
    ("sdxl", {**_COSXL, "noise_model": EDMSpec(0.002, 80.0, 0.5)}, False),     # EDM v, sigma_data 0.5
    ("sdxl", {**_COSXL, "latent_stats": _PG["latent_stats"]}, False),          # EDM v with statistics
    ("sdxl", {**_PG, "noise_model": EDMSpec(0.002, 120.0, 0.5)}, False),       # another sigma range
    ("sdxl", {**_PG, "latent_stats": LatentStats((0.1,) * 4, (2.0,) * 4)}, False),  # other statistics
    ("sdxl", {**_PG, "scaling_factor": 0.13025}, False),                       # another scaling
    ("sdxl", {**_PG, "latent_stats": None}, False),                            # EDM eps without statistics
    ("sd1", _PG, False),                                                       # ComfyUI reads them on SDXL only
], ids=["playground", "cosxl", "v-sigma-data-0.5", "v-stats", "sigma-range", "stats", "scaling", "no-stats", "sd1"])
def test_comfyuis_edm_keys_are_saved_only_where_comfyui_reads_the_same_model(family, model, keys, tmp_path, caplog):
    """ComfyUI takes Playground v2.5's noise model, statistics and scaling from `edm_mean` / `edm_std` whatever
    they hold, and sigma_data 1 from `edm_vpred.*`: a saved file carries those keys only where that reading is
    the saved model; otherwise it warns, and sdlab still reads the model from its metadata."""
    bundle = replace(tiny_bundle(family, seed=3), **model)
    with caplog.at_level(logging.WARNING, logger="sdlab"):
        path = save_bundle(bundle, tmp_path / "edm.safetensors")
    tensors = load_file(path)
    comfy = _comfy_reading(tensors)
    if keys:
        stats = (bundle.latent_stats.mean, bundle.latent_stats.std) if bundle.latent_stats else None
        assert comfy[0] == bundle.prediction.value and comfy[2:] == (stats, bundle.scaling_factor)
        assert comfy[1].sigma_data == bundle.noise_model.sigma_data
        assert comfy[1].sigma_max == bundle.noise_model.sigma_max
        assert comfy[1].sigma_min == pytest.approx(bundle.noise_model.sigma_min)
    else:
        assert comfy is None and "v_pred" not in tensors
        assert any("ComfyUI would read another model" in r.getMessage() for r in caplog.records)
    again = sdlab.load(path).bundle
    assert (again.prediction, again.noise_model, again.latent_stats, again.scaling_factor) == \
        (bundle.prediction, bundle.noise_model, bundle.latent_stats, bundle.scaling_factor)


# ----------------------------------------------------------------------------------------------------------
# a --vae override


def test_vae_override_uses_its_own_scaling_factor_as_diffusers_does(tmp_path_factory):
    """A VAE folder declaring scaling_factor 0.3 replaces the model's 0.18215, as `pipe.vae = AutoencoderKL(...)`
    does in diffusers; the same weights file given alone (config.json beside it) too."""
    folder = _folder(tmp_path_factory, "sd1vae", None, family="sd1")
    vae_folder = tmp_path_factory.mktemp("vae") / "vae"
    AutoencoderKL.from_pretrained(folder / "vae").save_pretrained(vae_folder)
    _edit_json(vae_folder / "config.json", scaling_factor=0.3)
    pipe = _pipe(StableDiffusionPipeline, folder)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading", steps_offset=1)
    pipe.vae = AutoencoderKL.from_pretrained(vae_folder)
    reference = _reference(pipe)
    for vae in (vae_folder, vae_folder / "diffusion_pytorch_model.safetensors"):
        model = sdlab.load(folder, vae=vae, dtype="fp32")
        assert model.bundle.scaling_factor == 0.3
        assert max_pixel_diff(_ours(model, sampler="Euler", schedule="leading"), reference) <= MAX_PIXEL_DIFF
    plain = sdlab.load(folder, dtype="fp32")
    assert max_pixel_diff(_ours(plain, sampler="Euler", schedule="leading"), reference) > 20


def test_vae_override_without_a_config_keeps_the_models_latents(playground, tmp_path):
    """An A1111-style VAE file (LDM keys, no config) declares nothing: the model's scaling and statistics stay,
    so the model's own VAE weights given that way draw the model's picture."""
    model = sdlab.load(playground, dtype="fp32")
    vae_file = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in model.bundle.vae.state_dict().items()}, vae_file)
    overridden = sdlab.load(playground, vae=vae_file, dtype="fp32")
    bundle = overridden.bundle
    assert bundle.scaling_factor == 0.5 and bundle.latent_stats == model.bundle.latent_stats
    assert np.array_equal(uint8_pictures(_ours(overridden)), uint8_pictures(_ours(model)))


def test_previews_undo_the_latent_statistics(playground):
    """A live preview maps Playground's normalised latents back to VAE latents before the SDXL RGB factors, which
    were fitted on plain SDXL latents (0.13025 * z_vae)."""
    from sdlab.server.previews import LatentPreviewer

    bundle = sdlab.load(playground, dtype="fp32").bundle
    z = torch.randn(4, 6, 6, generator=torch.Generator().manual_seed(3))
    z_vae = torch.tensor(PLAYGROUND_VAE["latents_std"]).view(4, 1, 1) * z / 0.5 + \
        torch.tensor(PLAYGROUND_VAE["latents_mean"]).view(4, 1, 1)
    expected = bundle.family.latent_format.preview_rgb(z_vae[None] * 0.13025, scaling_factor=0.13025)[0]
    assert torch.equal(LatentPreviewer.for_bundle(bundle).rgb(z),
                       (expected.permute(1, 2, 0) * 255).round().to(torch.uint8))
