"""CFG at or below 1 runs the conditional prediction alone: one U-Net call (of batch B) per step.

The few-step models are published with ``guidance_scale=0`` (diffusers: no guidance at or below 1) or CFG 1
(A1111 / ComfyUI). Both must give the conditional picture with one network call per step, the negative
prompt unused; above 1 the unconditional half runs in the same batched call.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from bundle_fixtures import tiny_bundle

from sdlab.diffusion.denoiser import Denoiser
from sdlab.diffusion.guidance import cfg, needs_uncond
from sdlab.diffusion.model_sampling import DiscreteModelSampling
from sdlab.diffusion.samplers import get_sampler
from sdlab.diffusion.schedules import NoiseSchedule
from sdlab.pipeline.generate import generate
from sdlab.pipeline.memory import estimate_bytes
from sdlab.pipeline.request import GenerationRequest, resolve

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SIZE = 16
STEPS = 3


class CountingNet(torch.nn.Module):
    """eps = 0.1 * x_in + mean of the context (so cond and uncond differ); records each call's batch."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def forward(self, x_in, t, *, context):
        self.batches.append(x_in.shape[0])
        return 0.1 * x_in + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)


def _conds(batch: int = 2):
    cond = {"context": torch.full((batch, 4, 8), 0.5)}
    uncond = {"context": torch.full((batch, 4, 8), -0.5)}
    return cond, uncond


@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0, -2.0])
def test_scale_at_or_below_one_is_the_conditional_prediction_in_one_call(scale):
    denoiser = Denoiser(net := CountingNet(), DiscreteModelSampling(NoiseSchedule.sd(), "eps"))
    cond, uncond = _conds()
    x, sigma = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([3.0, 3.0])
    out = cfg(denoiser, cond, uncond, scale)(x, sigma)
    assert net.batches == [2]
    torch.testing.assert_close(out, denoiser(x, sigma, **cond), rtol=0, atol=0)
    assert not needs_uncond(scale)


def test_scale_above_one_runs_both_halves_in_one_batched_call():
    denoiser = Denoiser(net := CountingNet(), DiscreteModelSampling(NoiseSchedule.sd(), "eps"))
    cond, uncond = _conds()
    x, sigma = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([3.0, 3.0])
    out = cfg(denoiser, cond, uncond, 1.5)(x, sigma)
    assert net.batches == [4] and needs_uncond(1.5)
    x0_c, x0_u = denoiser(x, sigma, **cond), denoiser(x, sigma, **uncond)
    torch.testing.assert_close(out, x0_u + 1.5 * (x0_c - x0_u))


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle("sd1", seed=3)


def _run(bundle, cfg_scale: float, negative: str = "blurry"):
    batches: list[int] = []
    hook = bundle.unet.register_forward_hook(lambda module, args, kwargs_out: batches.append(args[0].shape[0]))
    try:
        request = GenerationRequest("a red cube", negative, steps=STEPS, cfg_scale=cfg_scale, seed=7, width=SIZE,
                                    height=SIZE, batch_size=2, sampler="Euler", schedule="trailing")
        result = generate(bundle, request)
    finally:
        hook.remove()
    return np.stack([np.asarray(image) for image in result.images]), batches


@pytest.mark.parametrize("scale", [0.0, 0.5])
def test_generate_below_one_calls_the_unet_once_per_step_and_draws_the_conditional_picture(bundle, scale):
    picture, batches = _run(bundle, scale)
    assert batches == [2] * STEPS                                    # one call of batch B per step
    same, _ = _run(bundle, 1.0, negative="a completely different negative prompt")
    assert np.array_equal(picture, same)                             # the negative prompt plays no part
    guided, guided_batches = _run(bundle, 4.0)
    assert guided_batches == [4] * STEPS and not np.array_equal(picture, guided)


def _resolved(scale: float, sampler: str = "Euler") -> GenerationRequest:
    return resolve(GenerationRequest("x", cfg_scale=scale, width=64, height=64, batch_size=2, sampler=sampler),
                   default_size=64, default_sampler="Euler", default_schedule="normal", factor=2)


def test_memory_estimate_counts_one_row_per_image_without_guidance(bundle):
    assert estimate_bytes(bundle, _resolved(0.0)) == estimate_bytes(bundle, _resolved(1.0))
    assert estimate_bytes(bundle, _resolved(0.0)) < estimate_bytes(bundle, _resolved(3.0))


def test_memory_estimate_counts_one_row_per_image_on_a_guidance_embedded_unet(bundle):
    """A U-Net that takes the CFG scale as an input (LCM-distilled) runs no negative pass at CFG 8.5, nor under a
    CFG++ sampler: one row per image, as generate runs it."""
    lcm = replace(bundle, unet_config=replace(bundle.unet_config, time_cond_proj_dim=32))
    for sampler in ("Euler", "euler_cfg_pp"):
        assert not lcm.runs_uncond(8.5, get_sampler(sampler).cfg_pp) and bundle.runs_uncond(8.5)
        assert estimate_bytes(lcm, _resolved(8.5, sampler)) == estimate_bytes(bundle, _resolved(1.0))
