"""A1111's schedule types sdlab names by A1111's labels ("Polyexponential", "KL Optimal", "Align Your Steps",
"Beta", and Forge's "Turbo"), each equal to A1111's function as its `get_sigmas` calls it.

A1111's `modules/sd_schedulers.py` cannot be imported here; the functions below are transcribed from it (and
`turbo_scheduler` from Forge's copy), k-diffusion's `get_sigmas_polyexponential` is the installed one, and
scipy's `beta.ppf` is the Beta quantile A1111 calls. sigma_min / sigma_max are `model_wrap.sigmas[0]` /
`[-1]`: float32 sigmas of SD's schedule.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

import sampler_harness as H
from sdlab.diffusion.discretization import DISCRETIZATIONS, beta_ppf
from sdlab.diffusion.model_sampling import DiscreteModelSampling
from sdlab.diffusion.samplers import get_sampler
from sdlab.diffusion.schedule_names import schedule_from_a1111
from sdlab.diffusion.schedules import NoiseSchedule
from sdlab.pipeline.plan import request_sigmas
from sdlab.pipeline.request import GenerationRequest, resolve

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

KD = H.load_k_diffusion_sampling()
SAMPLING = DiscreteModelSampling(NoiseSchedule.sd(), "epsilon")
MODEL_SIGMAS = NoiseSchedule.sd().sigmas.float()
SIGMA_MIN, SIGMA_MAX = MODEL_SIGMAS[0].item(), MODEL_SIGMAS[-1].item()
STEPS = (1, 2, 3, 7, 10, 11, 20, 30)


# -- A1111 modules/sd_schedulers.py (beta_dist_alpha = beta_dist_beta = 0.6, A1111's defaults) -------------------
def get_align_your_steps_sigmas(n, sigma_min, sigma_max, device, is_sdxl=False):
    def loglinear_interp(t_steps, num_steps):
        xs = np.linspace(0, 1, len(t_steps))
        ys = np.log(t_steps[::-1])
        new_xs = np.linspace(0, 1, num_steps)
        new_ys = np.interp(new_xs, xs, ys)
        interped_ys = np.exp(new_ys)[::-1].copy()
        return interped_ys

    if is_sdxl:
        sigmas = [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029]
    else:
        sigmas = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
    if n != len(sigmas):
        sigmas = np.append(loglinear_interp(sigmas, n), [0.0])
    else:
        sigmas.append(0.0)
    return torch.FloatTensor(sigmas).to(device)


def kl_optimal(n, sigma_min, sigma_max, device):
    alpha_min = torch.arctan(torch.tensor(sigma_min, device=device))
    alpha_max = torch.arctan(torch.tensor(sigma_max, device=device))
    step_indices = torch.arange(n + 1, device=device)
    sigmas = torch.tan(step_indices / n * alpha_min + (1.0 - step_indices / n) * alpha_max)
    return sigmas


def beta_scheduler(n, sigma_min, sigma_max, device, alpha=0.6, beta=0.6):
    timesteps = 1 - np.linspace(0, 1, n)
    timesteps = [scipy.stats.beta.ppf(x, alpha, beta) for x in timesteps]
    sigmas = [sigma_min + (x * (sigma_max - sigma_min)) for x in timesteps]
    sigmas += [0.0]
    return torch.FloatTensor(sigmas).to(device)


def turbo_scheduler(n, sigma_min, sigma_max, device):
    """Forge: `unet.model.predictor.sigma` of integer timesteps is the model's sigma table."""
    timesteps = torch.flip(torch.arange(1, n + 1) * float(1000.0 / n) - 1, (0,)).round().long().clip(0, 999)
    sigmas = MODEL_SIGMAS[timesteps]
    sigmas = torch.cat([sigmas, sigmas.new_zeros([1])])
    return sigmas.to(device)


A1111_FUNCTIONS = {
    "Polyexponential": KD.get_sigmas_polyexponential,     # A1111's default_rho 1.0 (opts.rho 0: not passed)
    "KL Optimal": kl_optimal,
    "Align Your Steps": get_align_your_steps_sigmas,
    "Beta": beta_scheduler,
    "Turbo": turbo_scheduler,
}


def a1111_get_sigmas(label: str, steps: int, discard_next_to_last_sigma: bool) -> torch.Tensor:
    """`KDiffusionSampler.get_sigmas`: steps + 1 for a discarding sampler, the function, then the discard."""
    steps += 1 if discard_next_to_last_sigma else 0
    sigmas = A1111_FUNCTIONS[label](n=steps, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, device="cpu")
    if discard_next_to_last_sigma:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas


def _request(sampler: str, schedule: str, steps: int) -> GenerationRequest:
    return resolve(GenerationRequest(prompt="x", sampler=sampler, schedule=schedule, steps=steps, seed=1),
                   default_size=64, default_sampler="Euler", default_schedule="karras", factor=8)


@pytest.mark.parametrize("label", list(A1111_FUNCTIONS))
@pytest.mark.parametrize("sampler", ["Euler", "DPM2"])
def test_a1111_schedules_by_label(label, sampler):
    """A request naming the schedule by A1111's label runs on A1111's sigmas (DPM2: the next-to-last dropped)."""
    spec = get_sampler(sampler)
    for steps in STEPS:
        ours = request_sigmas(SAMPLING, spec, _request(sampler, label, steps))
        reference = a1111_get_sigmas(label, steps, spec.discard_penultimate)
        assert ours.shape == reference.shape, (steps, ours, reference)
        torch.testing.assert_close(ours, reference, rtol=2e-6, atol=1e-7)


def test_keys_and_labels():
    """A1111's keys and labels of the schedules whose word ComfyUI does not use for another one; "Beta" and
    "KL Optimal" as A1111 spells them are A1111's, "beta" and "kl_optimal" ComfyUI's."""
    for key, label in (("polyexponential", "Polyexponential"), ("align_your_steps", "Align Your Steps"),
                       ("turbo", "Turbo")):
        assert schedule_from_a1111(key) == schedule_from_a1111(label) == key
    assert schedule_from_a1111("Beta") == "a1111_beta" and schedule_from_a1111("beta") == "beta"
    assert schedule_from_a1111("KL Optimal") == "a1111_kl_optimal" and schedule_from_a1111("kl_optimal") == "kl_optimal"
    assert set(DISCRETIZATIONS) >= {"beta", "kl_optimal", "linear_quadratic", "a1111_beta", "a1111_kl_optimal"}


def test_align_your_steps_takes_sdxl_levels_for_sdxl():
    """A1111 picks the SDXL list when `shared.sd_model.is_sdxl`."""
    from bundle_fixtures import tiny_bundle
    from sdlab.pipeline.plan import resolve_for

    for family, expected in (("sd1", "align_your_steps"), ("sdxl", "align_your_steps_sdxl")):
        request = resolve_for(tiny_bundle(family), GenerationRequest(prompt="x", schedule="Align Your Steps"))
        assert request.schedule == expected
    for steps in STEPS:
        ours = DISCRETIZATIONS["align_your_steps_sdxl"](NoiseSchedule.sd(), steps)
        reference = get_align_your_steps_sigmas(steps, SIGMA_MIN, SIGMA_MAX, "cpu", is_sdxl=True)
        torch.testing.assert_close(ours, reference, rtol=2e-6, atol=0)


def test_beta_quantile_is_scipys():
    """The Beta quantile of both beta schedules, computed without scipy, against scipy.stats.beta.ppf."""
    for a, b in ((0.6, 0.6), (0.5, 0.5), (2.0, 5.0), (0.3, 3.0), (10.0, 10.0)):
        for q in np.linspace(0, 1, 401):
            assert beta_ppf(float(q), a, b) == pytest.approx(scipy.stats.beta.ppf(q, a, b), abs=1e-12)


def test_the_server_lists_every_schedule_once_under_a_name_that_picks_it():
    """`/sdapi/v1/schedulers` (and the web UI's list): A1111's rows, "Beta" and "KL Optimal" named so that they
    pick A1111's, then every other sdlab schedule, ComfyUI's beta and kl_optimal among them."""
    from sdlab.server.inputs import schedule_name, scheduler_rows

    resolved = [schedule_name(row["name"]) for row in scheduler_rows()]
    assert resolved[0] is None and sorted(resolved[1:]) == sorted(DISCRETIZATIONS)
    assert {row["label"]: schedule_name(row["name"]) for row in scheduler_rows()}["Beta"] == "a1111_beta"
