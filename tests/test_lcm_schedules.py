"""The schedule the LCM and TCD samplers run on when a request names none, and A1111's LCM grid.

sdlab and diffusers: a request naming the LCM or TCD sampler and no schedule runs LCMScheduler's grid (every
(50 / steps)-th of the 50 distillation timesteps: 999, 759, 499, 259 at 4 steps), not the family's default
(Karras for SD1 / SDXL, whose last step at t = 0 would throw the model's output away: c_out(0) = 0).

AUTOMATIC1111: its LCM sampler (`modules/sd_samplers_lcm.py`) wraps the model in an `LCMCompVisDenoiser`
whose table holds only the 50 distillation timesteps; its "Automatic" (the row has no scheduler option, so
`KDiffusionSampler.get_sigmas` calls the denoiser's `get_sigmas`), "Uniform" (`sd_schedulers.uniform`, the
same call) and "Normal" (the same linspace over the denoiser's quantized `sigma_to_t`) are the grid
transcribed below, ending at t = 19. The class is transcribed over k-diffusion's installed
`DiscreteEpsDDPMDenoiser` (its `t_to_sigma`), fed SD's float32 alphas_cumprod as A1111's model holds them.
"""

from __future__ import annotations

import types

import pytest
import torch

import sampler_harness as H
from sdlab.diffusion.model_sampling import DiscreteModelSampling
from sdlab.diffusion.samplers import a1111_schedule, get_sampler
from sdlab.diffusion.schedules import NoiseSchedule
from sdlab.pipeline.infotext import from_parameters
from sdlab.pipeline.plan import request_sigmas
from sdlab.pipeline.request import GenerationRequest, resolve

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

KE = H.load_k_diffusion_external()
KS = H.load_k_diffusion_sampling()
SAMPLING = DiscreteModelSampling(NoiseSchedule.sd(), "epsilon")
STEPS = (1, 2, 3, 4, 7, 8, 20, 50)


class LCMCompVisDenoiser(KE.DiscreteEpsDDPMDenoiser):
    """A1111 `modules/sd_samplers_lcm.py`, transcribed (the model stands in: only its alphas_cumprod is read)."""

    def __init__(self, model):
        timesteps = 1000
        original_timesteps = 50     # LCM Original Timesteps (default=50, for current version of LCM)
        self.skip_steps = timesteps // original_timesteps
        alphas_cumprod_valid = torch.zeros((original_timesteps), dtype=torch.float32)
        for x in range(original_timesteps):
            alphas_cumprod_valid[original_timesteps - 1 - x] = model.alphas_cumprod[timesteps - 1 - x * self.skip_steps]
        super().__init__(model, alphas_cumprod_valid, quantize=None)

    def get_sigmas(self, n=None):
        if n is None:
            return KS.append_zero(self.sigmas.flip(0))
        start = self.sigma_to_t(self.sigma_max)
        end = self.sigma_to_t(self.sigma_min)
        t = torch.linspace(start, end, n)
        return KS.append_zero(self.t_to_sigma(t))

    def sigma_to_t(self, sigma, quantize=None):
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape) * self.skip_steps + (self.skip_steps - 1)

    def t_to_sigma(self, timestep):
        t = torch.clamp(((timestep - (self.skip_steps - 1)) / self.skip_steps).float(), min=0,
                        max=(len(self.sigmas) - 1))
        return super().t_to_sigma(t)


A1111_LCM = LCMCompVisDenoiser(types.SimpleNamespace(alphas_cumprod=NoiseSchedule.sd().alphas_cumprod.float()))


def _resolved(sampler: str, schedule: str | None, steps: int) -> GenerationRequest:
    return resolve(GenerationRequest(prompt="x", sampler=sampler, schedule=schedule, steps=steps, seed=1),
                   default_size=64, default_sampler="Euler", default_schedule="karras", factor=8)


@pytest.mark.parametrize("sampler", ["LCM", "lcm", "TCD", "tcd"])
def test_lcm_and_tcd_without_a_schedule_run_lcms_grid(sampler):
    request = _resolved(sampler, None, 4)
    assert request.schedule == "trailing"
    timesteps = SAMPLING.sigma_to_t(request_sigmas(SAMPLING, get_sampler(sampler), request)[:-1].double())
    torch.testing.assert_close(timesteps, torch.tensor([999.0, 759, 499, 259], dtype=torch.float64), atol=1e-3, rtol=0)
    assert _resolved(sampler, "karras", 4).schedule == "karras"         # a schedule named still wins
    assert _resolved("Euler", None, 4).schedule == "karras"             # other samplers: the model's default


@pytest.mark.parametrize("steps", STEPS)
def test_a1111_lcm_automatic_is_its_denoisers_grid(steps):
    assert a1111_schedule("LCM", None) == a1111_schedule("LCM", "uniform") == a1111_schedule("LCM", "normal")
    ours = request_sigmas(SAMPLING, get_sampler("LCM"), _resolved("LCM", a1111_schedule("LCM", None), steps))
    reference = A1111_LCM.get_sigmas(steps)
    assert ours.shape == reference.shape
    torch.testing.assert_close(ours, reference, rtol=2e-6, atol=0)
    last = int(A1111_LCM.sigma_to_t(ours[-2:-1]))                      # the last step's call counts: t = 19
    assert last == (19 if steps > 1 else 999)


def test_a1111_lcm_keeps_the_other_schedules_and_other_samplers_keep_uniform():
    assert a1111_schedule("LCM", "karras") == "karras" and a1111_schedule("Euler", None) == "uniform"


@pytest.mark.parametrize("recorded", [{"Sampler": "LCM"}, {"Sampler": "LCM", "Schedule type": "Uniform"},
                                      {"Sampler": "LCM", "Schedule type": "Automatic"}])
def test_a_file_a1111_wrote_with_lcm_reads_as_its_lcm_grid(recorded):
    """A1111 writes no `Schedule type` for a sampler run on "Automatic" without a scheduler option (LCM's)."""
    assert from_parameters(recorded)["schedule"] == "a1111_lcm"
