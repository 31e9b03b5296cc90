"""Each few-step preset draws the picture of the diffusers scheduler its model card names, at 1, 2 and 4 steps.

Helpers, weights and tolerance as in tests/test_pipeline_parity.py: one reduced-width random-weight diffusers
folder loaded by both `sdlab.load` and `from_pretrained`, the same prompt, negative prompt, seed and size;
the uint8 pictures agree within 2/255 per pixel (`MAX_PIXEL_DIFF`). sdlab gets nothing but the preset
(``apply_preset``: sampler, schedule, steps, CFG, eta) and the step count; diffusers gets the scheduler and
call of the model card:

  preset     diffusers scheduler (from the folder's config)                    guidance_scale   eta
  turbo      EulerAncestralDiscreteScheduler(timestep_spacing="trailing")      0.0
  lcm        LCMScheduler                                                      1.0
  lightning  EulerDiscreteScheduler(timestep_spacing="trailing")               0.0
  hyper      DDIMScheduler(timestep_spacing="trailing")                        0.0
  tcd        TCDScheduler                                                      0.0              0.3

diffusers runs no unconditional pass at guidance_scale <= 1; sdlab's preset CFG 1 does the same, so the
negative prompt given to both plays no part. SD1 runs every preset at 1, 2 and 4 steps; SDXL every preset at
2 steps (its added time / text embeddings, the second text tower). Inpainting with SD1's 4-channel U-Net runs
every preset at 4 steps (`StableDiffusionInpaintPipeline`; the mask and the picture given once per image, as in
tests/test_pipeline_parity.py).
"""

from __future__ import annotations

import pytest
from diffusers import (
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    TCDScheduler,
)
from bundle_fixtures import init_picture, lower_right_mask
from picture_parity import (
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
from sdlab.pipeline.presets import PRESETS, apply_preset

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# preset -> (diffusers scheduler class, its extra config, the pipeline call's guidance_scale, extra call arguments)
REFERENCES = {
    "turbo": (EulerAncestralDiscreteScheduler, dict(timestep_spacing="trailing"), 0.0, {}),
    "lcm": (LCMScheduler, {}, 1.0, {}),
    "lightning": (EulerDiscreteScheduler, dict(timestep_spacing="trailing"), 0.0, {}),
    "hyper": (DDIMScheduler, dict(timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False), 0.0, {}),
    "tcd": (TCDScheduler, {}, 0.0, dict(eta=0.3)),
    "lcm-model": (LCMScheduler, {}, 8.5, {}),   # here on a model without a guidance embedding: plain CFG 8.5
}


def test_every_preset_has_a_reference():
    assert set(REFERENCES) == set(PRESETS)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder = _folder(tmp_path_factory, "sd1")
    return sdlab.load(folder), _quiet(StableDiffusionPipeline.from_pretrained(folder, local_files_only=True))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = _folder(tmp_path_factory, "sdxl")
    return sdlab.load(folder), _quiet(StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True))


def _reference_scheduler(pipe, preset: str):
    """The diffusers scheduler of `preset`'s model card, from the folder's scheduler config."""
    cls, extra, _, _ = REFERENCES[preset]
    config = {key: pipe.scheduler.config[key] for key in SD_SCHEDULER_KEYS}
    return cls.from_config({**config, **extra})


def _compare(pipes, preset: str, steps: int) -> int:
    ours_pipe, pipe = pipes
    _, _, guidance, call = REFERENCES[preset]
    pipe.scheduler = _reference_scheduler(pipe, preset)
    reference = pipe(PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=BATCH, num_inference_steps=steps,
                     guidance_scale=guidance, width=SIZE, height=SIZE, generator=_generators(), output_type="np",
                     **call).images
    options = apply_preset(preset, dict(steps=steps, seed=SEED, width=SIZE, height=SIZE, batch_size=BATCH))
    ours = ours_pipe.txt2img(PROMPT, NEGATIVE, **options)
    return max_pixel_diff(ours.images, reference)


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("preset", list(REFERENCES))
def test_sd1_preset_gives_the_diffusers_picture(sd1, preset, steps):
    assert _compare(sd1, preset, steps) <= MAX_PIXEL_DIFF


@pytest.mark.parametrize("preset", list(REFERENCES))
def test_sdxl_preset_gives_the_diffusers_picture(sdxl, preset):
    assert _compare(sdxl, preset, 2) <= MAX_PIXEL_DIFF


# another sampler under a preset: diffusers' picture for that sampler on the preset's trailing grid, at its own eta
OTHER_SAMPLERS = {"Euler a": "turbo", "DDIM": "hyper"}      # the preset whose reference scheduler is that sampler's


@pytest.mark.parametrize("sampler", list(OTHER_SAMPLERS))
def test_sd1_another_sampler_under_the_tcd_preset_runs_at_its_own_eta(sd1, sampler):
    ours_pipe, pipe = sd1
    pipe.scheduler = _reference_scheduler(pipe, OTHER_SAMPLERS[sampler])
    reference = pipe(PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=BATCH, num_inference_steps=4,
                     guidance_scale=0.0, width=SIZE, height=SIZE, generator=_generators(), output_type="np").images
    ours = ours_pipe.txt2img(PROMPT, NEGATIVE, preset="tcd", sampler=sampler, steps=4, seed=SEED, width=SIZE,
                             height=SIZE, batch_size=BATCH)
    assert max_pixel_diff(ours.images, reference) <= MAX_PIXEL_DIFF


def test_sd1_lcm_sampler_without_a_schedule_is_lcmschedulers_picture(sd1):
    """`--sampler LCM --steps 4 --cfg 1`: LCMScheduler's grid, not the family's Karras (tests/test_lcm_schedules.py)."""
    ours_pipe, pipe = sd1
    pipe.scheduler = _reference_scheduler(pipe, "lcm")
    reference = pipe(PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=BATCH, num_inference_steps=4,
                     guidance_scale=1.0, width=SIZE, height=SIZE, generator=_generators(), output_type="np").images
    ours = ours_pipe.txt2img(PROMPT, NEGATIVE, sampler="LCM", steps=4, cfg_scale=1.0, seed=SEED, width=SIZE,
                             height=SIZE, batch_size=BATCH)
    assert ours.request.schedule == "trailing" and max_pixel_diff(ours.images, reference) <= MAX_PIXEL_DIFF


@pytest.mark.parametrize("preset", list(REFERENCES))
def test_sd1_inpainting_preset_gives_the_diffusers_picture(sd1, preset):
    ours_pipe, pipe = sd1
    _, _, guidance, call = REFERENCES[preset]
    inpaint = _quiet(StableDiffusionInpaintPipeline(**pipe.components))
    inpaint.scheduler = _reference_scheduler(pipe, preset)
    image, mask = init_picture(SIZE), lower_right_mask(SIZE)
    reference = inpaint([PROMPT] * BATCH, image=[image] * BATCH, mask_image=[mask] * BATCH, strength=1.0,
                        negative_prompt=[NEGATIVE] * BATCH, num_inference_steps=4, guidance_scale=guidance,
                        width=SIZE, height=SIZE, generator=_generators(), output_type="np", **call).images
    options = apply_preset(preset, dict(steps=4, seed=SEED, batch_size=BATCH), mode="inpaint")
    ours = ours_pipe.inpaint(PROMPT, image, mask, NEGATIVE, strength=1.0, paste_back=False, **options)
    assert max_pixel_diff(ours.images, reference) <= MAX_PIXEL_DIFF
