"""End to end: a diffusers spacing name draws diffusers' picture with no other setting (issue 12, items 2-3).

``schedule="leading"`` (or ``trailing`` / ``linspace``) and no ``init_noise`` must give the picture of the
diffusers pipeline whose scheduler for that sampler has ``timestep_spacing`` set to the same name: the
sampler's own spacing (DPM++ 2M's leading grid has steps + 1 points, Euler's does not) and the scheduler's
initial noise scale. SD2-v is where DPM++ 2M leading once differed by 125/255. Helpers and tolerance
(2/255) as in tests/test_pipeline_parity.py.
"""

from __future__ import annotations

import pytest
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionPipeline
from diffusers import UniPCMultistepScheduler
from picture_parity import (
    CFG,
    MAX_PIXEL_DIFF,
    PROMPT,
    SEED,
    SIZE,
    max_pixel_diff,
)
from test_pipeline_parity import (
    BATCH,
    NEGATIVE,
    SD_SCHEDULER_KEYS,
    _folder,
    _generators,
    _quiet,
)

import sdlab
from sdlab.diffusion.denoiser import Prediction

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

STEPS = 8
SCHEDULERS = {
    "Euler": (EulerDiscreteScheduler, {}),
    "DPM++ 2M": (DPMSolverMultistepScheduler, {}),
    "UniPC": (UniPCMultistepScheduler, {}),
    "DDIM": (DDIMScheduler, dict(clip_sample=False, set_alpha_to_one=False)),
}
CASES = [
    ("DPM++ 2M", "leading"),
    ("DPM++ 2M", "trailing"),
    ("DPM++ 2M", "linspace"),
    ("Euler", "leading"),
    ("Euler", "linspace"),
    ("UniPC", "leading"),
    ("DDIM", "trailing"),
]


@pytest.fixture(scope="module")
def sd2_v(tmp_path_factory):
    folder = _folder(tmp_path_factory, "sd2", prediction=Prediction.V)
    return sdlab.load(folder), _quiet(StableDiffusionPipeline.from_pretrained(folder, local_files_only=True))


@pytest.mark.parametrize("sampler, spacing", CASES, ids=[f"{s}-{p}" for s, p in CASES])
def test_sd2_v_spacing_name_alone_gives_diffusers_picture(sd2_v, sampler, spacing):
    ours_pipe, pipe = sd2_v
    cls, extra = SCHEDULERS[sampler]
    config = {key: pipe.scheduler.config[key] for key in SD_SCHEDULER_KEYS}
    pipe.scheduler = cls.from_config({**config, "timestep_spacing": spacing}, **extra)
    reference = pipe(PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=BATCH, num_inference_steps=STEPS,
                     guidance_scale=CFG, width=SIZE, height=SIZE, generator=_generators(), output_type="np").images
    ours = ours_pipe.txt2img(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE,
                             batch_size=BATCH, sampler=sampler, schedule=spacing)
    assert max_pixel_diff(ours.images, reference) <= MAX_PIXEL_DIFF
