"""A diffusers folder's training schedule (`scheduler/scheduler_config.json`) is the model's.

diffusers builds its scheduler's noise levels from the folder's `num_train_timesteps`, `beta_schedule`,
`beta_start`, `beta_end` and `rescale_betas_zero_snr` (zero terminal SNR, last alphas_cumprod 2**-24), so
those define the model. sdlab must sample on the same levels: checked against diffusers' own scheduler built
from the same config, and for a zero-SNR v-prediction folder against diffusers' pipeline picture. What it
cannot build (`trained_betas`, an unknown `beta_schedule`) it refuses; the sampler settings (`timestep_spacing`,
`steps_offset`) stay the request's, and the load report lists them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_fixtures import as_released, tiny_bundle, write_diffusers_folder
from diffusers import EulerDiscreteScheduler

import sdlab
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.load import plan_checkpoint
from sdlab.checkpoints.save import save_bundle
from sdlab.diffusion.denoiser import Prediction

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SIZE = 32                               # pixels; the tiny VAE has factor 2


def _released(folder: Path) -> Path:
    return as_released(folder, SIZE // 2)


def _set_scheduler(folder: Path, **changes) -> dict:
    """Change the folder's scheduler config, and the scheduler class `model_index.json` names with it."""
    path = folder / "scheduler" / "scheduler_config.json"
    config = {k: v for k, v in {**json.loads(path.read_text()), **changes}.items() if v is not None}
    path.write_text(json.dumps(config))
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", config["_class_name"]]}))
    return config


@pytest.fixture(scope="module")
def sd2v_folder(tmp_path_factory) -> Path:
    """A tiny SD2 v-prediction folder, as released (`_released`)."""
    from dataclasses import replace

    bundle = replace(tiny_bundle("sd2", seed=11), prediction=Prediction.V)
    return _released(write_diffusers_folder(bundle, tmp_path_factory.mktemp("sd2v") / "pipe"))


@pytest.fixture
def folder(sd2v_folder, tmp_path) -> Path:
    """A fresh copy of the SD2 folder whose scheduler config a test may change."""
    import shutil

    return Path(shutil.copytree(sd2v_folder, tmp_path / "pipe"))


SCHEDULES = {
    "zero_snr": dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", steps_offset=0),
    "linear_betas": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    "other_betas": dict(beta_start=0.001, beta_end=0.015),
    "500_steps": dict(num_train_timesteps=500),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
    "500_steps_zero_snr": dict(num_train_timesteps=500, rescale_betas_zero_snr=True),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_folder_schedule_is_diffusers_schedule(folder, name):
    config = _set_scheduler(folder, **SCHEDULES[name])
    reference = EulerDiscreteScheduler.from_config(config)
    plan = plan_checkpoint(folder)
    assert plan.report.schedule is not None, "a non-default schedule must become the model's"
    assert plan.report.schedule_source == "scheduler/scheduler_config.json"
    sampling = plan.report.family.model_sampling(plan.report.prediction, plan.report.schedule)
    ours = sampling.schedule.alphas_cumprod
    theirs = reference.alphas_cumprod.to(torch.float64)       # float32 in diffusers, float64 in sdlab
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=1e-9)
    # sigma_max, where a zero-SNR run starts: finite, diffusers' 2**-24 terminal (sqrt(2**24 - 1) ~= 4096)
    assert sampling.sigma_max == pytest.approx(float(reference.sigmas[0]), rel=1e-4)
    assert plan.report.to_json()["schedule_source"] == "scheduler/scheduler_config.json"


def test_sd_schedule_folder_keeps_the_family_schedule(folder):
    """Released SD folders write SD's schedule out in full: no model-specific schedule, nothing logged."""
    plan = plan_checkpoint(folder)
    assert plan.report.schedule is None
    assert plan.report.sampler == {"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "leading",
                                   "steps_offset": 1}


@pytest.mark.parametrize("changes, message", [
    (dict(trained_betas=[0.001] * 1000), "trained_betas"),
    (dict(beta_schedule="sigmoid"), "beta_schedule 'sigmoid'"),
    (dict(rescale_betas_zero_snr="yes"), "rescale_betas_zero_snr"),
    (dict(beta_start=-1.0), "beta_start"),
    (dict(num_train_timesteps=1), "num_train_timesteps"),
])
def test_folder_schedule_sdlab_cannot_build_is_refused(folder, changes, message):
    _set_scheduler(folder, **changes)
    with pytest.raises(CheckpointError, match=message):
        plan_checkpoint(folder)


def test_zero_snr_folder_warns_about_trailing_spacing(folder, caplog):
    _set_scheduler(folder, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    with caplog.at_level(logging.INFO, logger="sdlab"):
        plan = plan_checkpoint(folder)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("trailing" in w and "Euler" in w for w in warnings), warnings
    assert plan.report.sampler["timestep_spacing"] == "trailing"
    assert "zero terminal SNR" in plan.report.to_json()["schedule"]


def test_scheduler_classes_are_diffusers_own():
    """`SCHEDULER_CLASSES` against diffusers' classes: each default spacing (or none), which ones apply
    rescale_betas_zero_snr, and an sdlab sampler for each."""
    import inspect

    import diffusers

    from sdlab.checkpoints.diffusers_scheduler import SCHEDULER_CLASSES
    from sdlab.diffusion.samplers import get_sampler

    for class_name, known in SCHEDULER_CLASSES.items():
        parameters = inspect.signature(getattr(diffusers, class_name).__init__).parameters
        spacing = parameters.get("timestep_spacing")
        assert (spacing is not None) == known.spaced, class_name
        assert spacing is None or spacing.default == known.spacing, class_name
        assert ("rescale_betas_zero_snr" in parameters) == known.zero_snr, class_name
        assert get_sampler(known.sampler).name == known.sampler


ADVICE_CASES = {
    "ddim_zero_snr": dict(_class_name="DDIMScheduler", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                          clip_sample=False, set_alpha_to_one=False),
    "ddim_alpha_one": dict(_class_name="DDIMScheduler", timestep_spacing="trailing", clip_sample=False),
    "ddim_clip_sample_default": dict(_class_name="DDIMScheduler", timestep_spacing="trailing"),
    "euler_a_turbo": dict(_class_name="EulerAncestralDiscreteScheduler", timestep_spacing="trailing"),
    "dpm_zero_snr_default_spacing": dict(_class_name="DPMSolverMultistepScheduler", rescale_betas_zero_snr=True),
    "unipc_trailing": dict(_class_name="UniPCMultistepScheduler", timestep_spacing="trailing"),
    # each other setting the class has, where an sdlab setting draws it
    "dpm_karras_zero_snr": dict(_class_name="DPMSolverMultistepScheduler", use_karras_sigmas=True,
                                rescale_betas_zero_snr=True, timestep_spacing="trailing"),
    "dpm_heun_trailing": dict(_class_name="DPMSolverMultistepScheduler", solver_type="heun",
                              timestep_spacing="trailing"),
    "unipc_karras_trailing": dict(_class_name="UniPCMultistepScheduler", use_karras_sigmas=True,
                                  timestep_spacing="trailing"),
    "euler_karras_leading_zero_snr": dict(_class_name="EulerDiscreteScheduler", use_karras_sigmas=True,
                                          rescale_betas_zero_snr=True, timestep_spacing="leading"),
    "euler_exponential_linspace_zero_snr": dict(_class_name="EulerDiscreteScheduler", use_exponential_sigmas=True,
                                                rescale_betas_zero_snr=True, timestep_spacing="linspace"),
    "tcd_trailing": dict(_class_name="TCDScheduler", timestep_spacing="trailing"),
}


def _asked(advice: str) -> dict:
    """The request settings an advice names: "ask for sampler 'Euler', schedule 'trailing', eta 0.0 to ..."."""
    import ast
    import re

    asked = re.search(r"ask for (.*) to get its picture", advice).group(1)
    return {name: ast.literal_eval(value) for name, value in (part.split(" ", 1) for part in asked.split(", "))}


@pytest.mark.parametrize("name", list(ADVICE_CASES))
def test_folder_advice_names_the_settings_that_draw_its_picture(folder, caplog, name):
    """The loader's advice for a trailing or zero-SNR folder names the request settings of the folder's own
    scheduler class (its default spacing when the config gives none; its Karras / exponential sigmas, solver
    type, the pipelines' eta 0 for TCD); drawn with them, sdlab's picture is diffusers' pipeline's with that
    scheduler within 2/255 (DPM-Solver with Karras sigmas on zero SNR: 58/255 off with the spacing alone, TCD at
    its own eta 0.3: 98/255)."""
    import diffusers

    config = _set_scheduler(folder, **ADVICE_CASES[name])
    with caplog.at_level(logging.INFO, logger="sdlab"):
        ours = sdlab.load(folder)
    advice = [r.getMessage() for r in caplog.records if "diffusers draws this folder" in r.getMessage()]
    assert len(advice) == 1, advice
    asked = _asked(advice[0])
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert type(pipe.scheduler).__name__ == config["_class_name"]
    pipe.set_progress_bar_config(disable=True)
    prompt, seed, steps = "a photograph of an astronaut riding a horse", 1234, 4
    ref = pipe(prompt, num_inference_steps=steps, guidance_scale=7.0, width=SIZE, height=SIZE,
               generator=[torch.Generator("cpu").manual_seed(seed)], output_type="np").images
    out = ours.txt2img(prompt, steps=steps, cfg_scale=7.0, seed=seed, width=SIZE, height=SIZE, **asked)
    a = np.stack([np.asarray(i) for i in out.images]).astype(np.int16)
    b = (ref * 255).round().astype(np.int16)
    assert np.abs(a - b).max() <= 2, asked


UNMATCHED_CASES = {   # (changes, the setting the advice names): t2/t3 of the audit measured the spacing's advice
    "sde_dpmsolver": (dict(_class_name="DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++",
                           use_karras_sigmas=True, timestep_spacing="trailing"), "algorithm_type 'sde-dpmsolver++'"),
    "dpm_order_3": (dict(_class_name="DPMSolverMultistepScheduler", solver_order=3, timestep_spacing="trailing"),
                    "solver_order 3"),
    "unipc_order_3": (dict(_class_name="UniPCMultistepScheduler", solver_order=3, timestep_spacing="trailing"),
                      "solver_order 3"),
    "ddim_thresholding": (dict(_class_name="DDIMScheduler", thresholding=True, timestep_spacing="trailing"),
                          "thresholding True"),
    "euler_karras_trailing": (dict(_class_name="EulerDiscreteScheduler", use_karras_sigmas=True,
                                   timestep_spacing="trailing"), "use_karras_sigmas on trailing spacing"),
    "dpm_final_sigma_min": (dict(_class_name="DPMSolverMultistepScheduler", final_sigmas_type="sigma_min",
                                 timestep_spacing="trailing"), "final_sigmas_type 'sigma_min'"),
    "pndm_prk_steps": (dict(_class_name="PNDMScheduler", timestep_spacing="trailing"), "skip_prk_steps False"),
    "pndm_v": (dict(_class_name="PNDMScheduler", timestep_spacing="trailing", skip_prk_steps=True), "v outputs"),
    "dpm_sde_noise": (dict(_class_name="DPMSolverSDEScheduler", timestep_spacing="trailing"), "noise_sampler_seed"),
}


@pytest.mark.parametrize("name", list(UNMATCHED_CASES))
def test_folder_advice_names_what_no_setting_reproduces(folder, caplog, name):
    """A scheduler setting sdlab has no equivalent of is named, and the advice promises no picture (before, the
    class and spacing alone were advised: 162/255 off for sde-dpmsolver++, 255 with thresholding, 20 for
    Euler's Karras sigmas on trailing spacing)."""
    changes, named = UNMATCHED_CASES[name]
    _set_scheduler(folder, **changes)
    with caplog.at_level(logging.INFO, logger="sdlab"):
        plan_checkpoint(folder)
    advice = [r.getMessage() for r in caplog.records if "diffusers draws this folder" in r.getMessage()]
    assert len(advice) == 1 and "no setting gives its picture" in advice[0] and named in advice[0], advice
    assert "to get its picture" not in advice[0]


def test_folder_advice_reads_settings_as_the_pipeline_runs_them():
    """diffusers' SD1 / SD2 pipelines set clip_sample false as they load a folder; SDXL's keep DDIM's default
    (true): x0 clipped to [-1, 1], which sdlab has no setting for (255/255 off on a tiny SDXL folder)."""
    from sdlab.checkpoints.diffusers_scheduler import DiffusersScheduler, equivalent_settings

    ddim = DiffusersScheduler(None, None, {"_class_name": "DDIMScheduler", "timestep_spacing": "trailing"})
    assert equivalent_settings(ddim, "StableDiffusionPipeline").unmatched == ()
    assert equivalent_settings(ddim, "StableDiffusionPipeline").request == {"sampler": "Euler",
                                                                            "schedule": "ddim_trailing"}
    assert equivalent_settings(ddim, "StableDiffusionXLPipeline").unmatched == ("sdlab has no clip_sample True",)


def test_zero_snr_folder_advice_says_when_diffusers_ignores_zero_snr(folder, caplog):
    """diffusers' HeunDiscreteScheduler has no rescale_betas_zero_snr: the advice says no setting gives its
    picture, as sdlab samples the model's zero-SNR schedule."""
    _set_scheduler(folder, _class_name="HeunDiscreteScheduler", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    with caplog.at_level(logging.INFO, logger="sdlab"):
        plan_checkpoint(folder)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("sampler 'Heun', schedule 'trailing'" in w and "ignores rescale_betas_zero_snr" in w
               and "no setting gives its picture" in w for w in warnings), warnings


def test_zero_snr_folder_draws_diffusers_picture(folder):
    """diffusers' pipeline with the folder's own EulerDiscreteScheduler(rescale_betas_zero_snr, trailing) and
    guidance rescale 0.7, against sdlab's Euler on the trailing schedule: the same picture within 2/255 (on the
    plain schedule it was 22/255 off)."""
    from diffusers import StableDiffusionPipeline

    _set_scheduler(folder, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.rescale_betas_zero_snr
    prompt, negative, seed, steps = "a photograph of an astronaut riding a horse", "blurry", 1234, 5
    ref = pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=7.0, width=SIZE,
               height=SIZE, generator=[torch.Generator("cpu").manual_seed(seed)], output_type="np",
               guidance_rescale=0.7).images
    ours = sdlab.load(folder)
    assert float(ours.bundle.model_sampling.schedule.alphas_cumprod[-1]) == float(pipe.scheduler.alphas_cumprod[-1])
    out = ours.txt2img(prompt, negative, steps=steps, cfg_scale=7.0, seed=seed, width=SIZE, height=SIZE,
                       sampler="Euler", schedule="trailing", guidance_rescale=0.7)
    a = np.stack([np.asarray(i) for i in out.images]).astype(np.int16)
    b = (ref * 255).round().astype(np.int16)
    assert np.abs(a - b).max() <= 2


def test_saved_bundle_keeps_its_schedule(folder, tmp_path):
    """A zero-SNR model saved as a single file keeps its schedule (metadata `sdlab.schedule`)."""
    _set_scheduler(folder, rescale_betas_zero_snr=True)
    bundle = sdlab.load(folder).bundle
    again = sdlab.load(save_bundle(bundle, tmp_path / "zsnr.safetensors")).bundle
    assert again.schedule == bundle.schedule and again.schedule.zero_terminal_snr
    assert again.model_sampling.sigma_max == pytest.approx(bundle.model_sampling.sigma_max)
    assert again.report.schedule_source == "metadata sdlab.schedule"


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory) -> Path:
    """A tiny SDXL folder, as released (`_released`)."""
    return _released(write_diffusers_folder(tiny_bundle("sdxl", seed=11), tmp_path_factory.mktemp("sdxl") / "pipe"))


def test_sdxl_folder_leading_spacing_counts_from_its_steps_offset(sdxl_folder, tmp_path):
    """diffusers' SDXL pipeline keeps a folder's steps_offset (its SD1 / SD2 pipelines set it to 1): on an SDXL
    folder with steps_offset 0, sdlab's `leading` schedule counts from 0 as the folder's EulerDiscreteScheduler
    does, and draws its picture within 2/255 (from 1, as before: 10/255 off)."""
    import shutil

    from diffusers import StableDiffusionXLPipeline

    folder = Path(shutil.copytree(sdxl_folder, tmp_path / "pipe"))
    _set_scheduler(folder, _class_name="EulerDiscreteScheduler", timestep_spacing="leading", steps_offset=0)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    prompt, negative, seed, steps = "a photograph of an astronaut riding a horse", "blurry", 1234, 5
    ref = pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=7.0, width=SIZE,
               height=SIZE, generator=[torch.Generator("cpu").manual_seed(seed)], output_type="np").images
    ours = sdlab.load(folder)
    assert ours.bundle.steps_offset == 0
    out = ours.txt2img(prompt, negative, steps=steps, cfg_scale=7.0, seed=seed, width=SIZE, height=SIZE,
                       sampler="Euler", schedule="leading")
    a = np.stack([np.asarray(i) for i in out.images]).astype(np.int16)
    b = (ref * 255).round().astype(np.int16)
    assert np.abs(a - b).max() <= 2


def test_a_saved_file_keeps_the_folders_steps_offset(sdxl_folder, tmp_path):
    """The offset is the model's: a single file saved from an SDXL folder with steps_offset 0 keeps it
    (`sdlab.steps_offset`) and draws the folder's `leading` picture (with 1, 8/255 off); inspect shows it."""
    import shutil

    folder = Path(shutil.copytree(sdxl_folder, tmp_path / "pipe"))
    _set_scheduler(folder, _class_name="EulerDiscreteScheduler", timestep_spacing="leading", steps_offset=0)
    model = sdlab.load(folder)
    saved = sdlab.load(save_bundle(model.bundle, tmp_path / "offset0.safetensors"))
    assert saved.bundle.steps_offset == 0
    assert saved.bundle.report.to_json()["steps_offset"] == model.bundle.report.to_json()["steps_offset"] == 0
    options = dict(steps=4, seed=5, width=SIZE, height=SIZE, sampler="Euler", schedule="leading")
    assert np.array_equal(np.asarray(saved.txt2img("a cat", "blurry", **options).images[0]),
                          np.asarray(model.txt2img("a cat", "blurry", **options).images[0]))
    plain = sdlab.load(save_bundle(sdlab.load(sdxl_folder).bundle, tmp_path / "offset1.safetensors"))
    assert plain.bundle.steps_offset == 1 and "sdlab.steps_offset" not in plain.bundle.report.metadata


def test_sd_folder_steps_offset_is_the_one_its_pipeline_sets(folder):
    """diffusers' StableDiffusionPipeline sets steps_offset 1 as it loads a folder, so an SD2 folder's 0 stays 1,
    and inspect says 1 (the folder's 0 is listed among its sampler settings)."""
    _set_scheduler(folder, steps_offset=0)
    report = plan_checkpoint(folder).report
    assert report.steps_offset == report.to_json()["steps_offset"] == 1
    assert report.to_json()["diffusers_sampler"]["steps_offset"] == 0
