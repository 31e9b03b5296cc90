"""The SDXL base -> refiner handoff under diffusers' rule: samplers whose order follows the schedule's end, and an
img2img handoff whose switch lies above the strength's start.

diffusers' base pipeline (`denoising_end`) stops its scheduler part-way through the list that scheduler was set
up with, so a multistep scheduler that lowers its order near the end (UniPCMultistepScheduler's
`lower_order_final`: order min(solver_order, steps left in the whole list)) keeps its full order up to the handoff.
sdlab runs the base's part as a list of its own; the sampler is told how many steps follow (`steps_after`), so it
steps at the same orders. Before, UniPC dropped to first order at the base's last step: 21/255 off diffusers'
picture at 6 steps, switch 0.35 (leading), 18/255 with Karras sigmas at switch 0.7. Helpers and tolerance (2/255)
as in tests/test_pipeline_parity.py.
"""

from __future__ import annotations

import pytest
from bundle_fixtures import init_picture
from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, UniPCMultistepScheduler
from picture_parity import CFG, MAX_PIXEL_DIFF, PROMPT, SEED, SIZE, max_pixel_diff
from test_pipeline_parity import BATCH, NEGATIVE, SD_SCHEDULER_KEYS, _generators, _quiet
from test_pipeline_parity import sdxl, sdxl_refiner  # noqa: F401 (fixtures)

from sdlab.pipeline.generate import generate_with_refiner
from sdlab.pipeline.request import GenerationRequest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

STEPS = 6
CASES = {
    "leading": (dict(), dict(sampler="UniPC", schedule="leading")),
    "karras": (dict(use_karras_sigmas=True),
               dict(sampler="UniPC", schedule="karras", init_noise="vp", quantize_timesteps=True)),
}


@pytest.mark.parametrize("switch_at", [0.35, 0.7])
@pytest.mark.parametrize("schedule", list(CASES))
def test_unipc_handoff_keeps_the_whole_lists_orders(sdxl, sdxl_refiner, schedule, switch_at):  # noqa: F811
    (ours_base, base), (ours_refiner, refiner) = sdxl, sdxl_refiner
    scheduler_options, options = CASES[schedule]
    for pipe in (base, refiner):
        config = {key: pipe.scheduler.config[key] for key in SD_SCHEDULER_KEYS}
        pipe.scheduler = UniPCMultistepScheduler.from_config(config, **scheduler_options)
    generators = _generators(1)
    latents = base(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG, width=SIZE,
                   height=SIZE, generator=generators, denoising_end=switch_at, output_type="latent").images
    reference = refiner(PROMPT, image=latents, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG,
                        generator=generators, denoising_start=switch_at, output_type="np").images
    request = GenerationRequest(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE,
                                **options)
    ours = generate_with_refiner(ours_base.bundle, ours_refiner.bundle, request, switch_at=switch_at)
    assert max_pixel_diff(ours.images, reference) <= MAX_PIXEL_DIFF


@pytest.mark.parametrize("switch_at", [0.5, 0.3])
def test_a_switch_above_the_img2img_start_leaves_the_run_to_the_refiner(sdxl, sdxl_refiner, switch_at):  # noqa: F811
    """img2img at strength 0.6 of 6 steps runs timesteps 333, 167, 1: a switch at 0.5 (cut-off 500) or 0.3 leaves
    the base no step, and the refiner's img2img at that strength is the picture (the tiny pair shares its VAE
    weights). diffusers' chained pipelines differ (docs/samplers.md, known difference (7)): `denoising_start`
    ignores the strength, so the refiner is called from timestep 499 (665) on the base's latent, noised to 333 only:
    195/255 (255/255) off."""
    (ours_base, base), (ours_refiner, refiner) = sdxl, sdxl_refiner
    strength, steps = 0.6, 6
    config = {key: refiner.scheduler.config[key] for key in SD_SCHEDULER_KEYS}
    refiner.scheduler = EulerDiscreteScheduler.from_config(config)
    refiner_alone = refiner(PROMPT, image=init_picture(SIZE), strength=strength, negative_prompt=NEGATIVE,
                            num_images_per_prompt=BATCH, num_inference_steps=steps, guidance_scale=CFG,
                            generator=_generators(), output_type="np").images
    base_img2img = _quiet(StableDiffusionXLImg2ImgPipeline(**base.components))
    base_img2img.scheduler = EulerDiscreteScheduler.from_config(config)
    generators = _generators()
    latents = base_img2img(PROMPT, image=init_picture(SIZE), strength=strength, negative_prompt=NEGATIVE,
                           num_images_per_prompt=BATCH, num_inference_steps=steps, guidance_scale=CFG,
                           generator=generators, denoising_end=switch_at, output_type="latent").images
    chained = refiner(PROMPT, image=latents, negative_prompt=NEGATIVE, num_images_per_prompt=BATCH,
                      num_inference_steps=steps, guidance_scale=CFG, generator=generators,
                      denoising_start=switch_at, output_type="np").images
    request = GenerationRequest(PROMPT, NEGATIVE, steps=steps, cfg_scale=CFG, seed=SEED, batch_size=BATCH,
                                init_image=init_picture(SIZE), strength=strength, sampler="Euler", schedule="leading")
    ours = generate_with_refiner(ours_base.bundle, ours_refiner.bundle, request, switch_at=switch_at)
    assert ours.refined
    assert max_pixel_diff(ours.images, refiner_alone) <= MAX_PIXEL_DIFF
    assert max_pixel_diff(ours.images, chained) > 10 * MAX_PIXEL_DIFF
