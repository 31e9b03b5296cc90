"""The SDXL base -> refiner handoff under diffusers' rule with samplers whose order follows the schedule's end.

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
from diffusers import UniPCMultistepScheduler
from picture_parity import CFG, MAX_PIXEL_DIFF, PROMPT, SEED, SIZE, max_pixel_diff
from test_pipeline_parity import NEGATIVE, SD_SCHEDULER_KEYS, _generators, sdxl, sdxl_refiner  # noqa: F401 (fixtures)

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
