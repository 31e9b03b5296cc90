"""diffusers' DDIMScheduler with `set_alpha_to_one=True` (its last step goes to alpha 1, not alphas_cumprod[0]) is
sdlab's Euler on DDIM's timesteps at eta 0, and Euler a at the same eta above it: in sigma form the DDIM step with
eta, x' = sqrt(a') x0 + sqrt(1 - a' - s^2) eps + s z with s^2 = eta^2 (1 - a') / (1 - a) (1 - a / a'), is
k-diffusion's ancestral Euler step (sigma_up^2 = eta^2 sigma'^2 (sigma^2 - sigma'^2) / sigma^2), and both draw
the step's noise from each image's generator. On a zero-SNR v-prediction folder (where the setting is used): within
1/255, while sdlab's "DDIM" row (ending at alphas_cumprod[0]) is 9-17/255 off. Helpers and tolerance (2/255) as
in tests/test_pipeline_parity.py.
"""

from __future__ import annotations

import json

import pytest
from diffusers import DDIMScheduler, StableDiffusionPipeline
from picture_parity import CFG, MAX_PIXEL_DIFF, PROMPT, SEED, SIZE, max_pixel_diff
from test_pipeline_parity import BATCH, NEGATIVE, SD_SCHEDULER_KEYS, _folder, _generators, _quiet

import sdlab
from sdlab.diffusion.denoiser import Prediction

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

STEPS = 5


@pytest.fixture(scope="module")
def sd2_v_zero_snr(tmp_path_factory):
    folder = _folder(tmp_path_factory, "sd2", prediction=Prediction.V)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "rescale_betas_zero_snr": True}))
    return sdlab.load(folder), _quiet(StableDiffusionPipeline.from_pretrained(folder, local_files_only=True))


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_to_alpha_one_is_euler_on_ddims_timesteps(sd2_v_zero_snr, eta, spacing):
    ours_pipe, pipe = sd2_v_zero_snr
    config = {key: pipe.scheduler.config[key] for key in SD_SCHEDULER_KEYS}
    pipe.scheduler = DDIMScheduler.from_config({**config, "timestep_spacing": spacing, "rescale_betas_zero_snr": True},
                                               clip_sample=False, set_alpha_to_one=True)
    reference = pipe(PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=BATCH, num_inference_steps=STEPS,
                     guidance_scale=CFG, eta=eta, width=SIZE, height=SIZE, generator=_generators(),
                     output_type="np").images

    def ours(**sampler):
        return ours_pipe.txt2img(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE,
                                 batch_size=BATCH, schedule=f"ddim_{spacing}", **sampler).images

    euler = dict(sampler="Euler") if eta == 0 else dict(sampler="Euler a", eta=eta)
    assert max_pixel_diff(ours(**euler), reference) <= MAX_PIXEL_DIFF
    assert max_pixel_diff(ours(sampler="DDIM", eta=eta), reference) > 2 * MAX_PIXEL_DIFF
