"""ComfyUI's sigma schedules and KSampler sigmas, transcribed as the reference of the ComfyUI parity tests.

ComfyUI cannot be installed here. The lines below are copied from ``comfy/samplers.py`` (the scheduler
functions, ``calculate_sigmas``, ``KSampler.calculate_sigmas`` / ``set_steps``) and ``comfy/model_sampling.py``
(``ModelSamplingDiscrete`` for an eps model), in float32 as ComfyUI holds its sigmas. Karras and
exponential are k-diffusion's functions, which ComfyUI calls.
"""

from __future__ import annotations

import math

import numpy
import scipy.stats
import torch

import sampler_harness as H


class ModelSamplingDiscrete:
    """comfy/model_sampling.py, SD's scaled_linear betas (``make_beta_schedule``: float64, then float32 sigmas)."""

    def __init__(self) -> None:
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.sigmas = sigmas.float()
        self.log_sigmas = sigmas.log().float()

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def timestep(self, sigma):
        log_sigma = sigma.log()
        dists = log_sigma.to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def sigma(self, timestep):
        t = torch.clamp(timestep.float(), min=0, max=(len(self.sigmas) - 1))
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]
        return log_sigma.exp()


def simple_scheduler(s, steps):
    sigs = []
    ss = len(s.sigmas) / steps
    for x in range(steps):
        sigs += [float(s.sigmas[-(1 + int(x * ss))])]
    sigs += [0.0]
    return torch.FloatTensor(sigs)


def ddim_scheduler(s, steps):
    x = 1
    if math.isclose(float(s.sigmas[x]), 0, abs_tol=0.00001):
        steps += 1
        sigs = []
    else:
        sigs = [0.0]
    ss = max(len(s.sigmas) // steps, 1)
    while x < len(s.sigmas):
        sigs += [float(s.sigmas[x])]
        x += ss
    sigs = sigs[::-1]
    return torch.FloatTensor(sigs)


def normal_scheduler(s, steps, sgm=False):
    start, end = s.timestep(s.sigma_max), s.timestep(s.sigma_min)
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(s.sigma(end)), 0, abs_tol=0.00001):
            steps += 1
            append_zero = False
        timesteps = torch.linspace(start, end, steps)
    sigs = [float(s.sigma(ts)) for ts in timesteps]
    if append_zero:
        sigs += [0.0]
    return torch.FloatTensor(sigs)


def beta_scheduler(s, steps, alpha=0.6, beta=0.6):
    total_timesteps = len(s.sigmas) - 1
    ts = 1 - numpy.linspace(0, 1, steps, endpoint=False)
    ts = numpy.rint(scipy.stats.beta.ppf(ts, alpha, beta) * total_timesteps)
    sigs = []
    last_t = -1
    for t in ts:
        if t != last_t:
            sigs += [float(s.sigmas[int(t)])]
        last_t = t
    sigs += [0.0]
    return torch.FloatTensor(sigs)


def linear_quadratic_schedule(s, steps, threshold_noise=0.025, linear_steps=None):
    if steps == 1:
        sigma_schedule = [1.0, 0.0]
    else:
        if linear_steps is None:
            linear_steps = steps // 2
        linear_sigma_schedule = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        threshold_noise_step_diff = linear_steps - threshold_noise * steps
        quadratic_steps = steps - linear_steps
        quadratic_coef = threshold_noise_step_diff / (linear_steps * quadratic_steps ** 2)
        linear_coef = threshold_noise / linear_steps - 2 * threshold_noise_step_diff / (quadratic_steps ** 2)
        const = quadratic_coef * (linear_steps ** 2)
        quadratic_sigma_schedule = [
            quadratic_coef * (i ** 2) + linear_coef * i + const for i in range(linear_steps, steps)
        ]
        sigma_schedule = linear_sigma_schedule + quadratic_sigma_schedule + [1.0]
        sigma_schedule = [1.0 - x for x in sigma_schedule]
    return torch.FloatTensor(sigma_schedule) * s.sigma_max.cpu()


def kl_optimal_scheduler(n, sigma_min, sigma_max):
    adj_idxs = torch.arange(n, dtype=torch.float).div_(n - 1)
    sigmas = adj_idxs.new_zeros(n + 1)
    sigmas[:-1] = (adj_idxs * math.atan(sigma_min) + (1 - adj_idxs) * math.atan(sigma_max)).tan_()
    return sigmas


def calculate_sigmas(s, scheduler_name, steps):
    """``calculate_sigmas``: the SCHEDULER_HANDLERS table."""
    kd = H.load_k_diffusion_sampling()
    ends = dict(sigma_min=float(s.sigma_min), sigma_max=float(s.sigma_max))
    handlers = {
        "simple": lambda: simple_scheduler(s, steps),
        "sgm_uniform": lambda: normal_scheduler(s, steps, sgm=True),
        "karras": lambda: kd.get_sigmas_karras(n=steps, **ends),
        "exponential": lambda: kd.get_sigmas_exponential(n=steps, **ends),
        "ddim_uniform": lambda: ddim_scheduler(s, steps),
        "beta": lambda: beta_scheduler(s, steps),
        "normal": lambda: normal_scheduler(s, steps),
        "linear_quadratic": lambda: linear_quadratic_schedule(s, steps),
        "kl_optimal": lambda: kl_optimal_scheduler(n=steps, **ends),
    }
    return handlers[scheduler_name]()


DISCARD_PENULTIMATE_SIGMA_SAMPLERS = {"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"}


def ksampler_sigmas(s, sampler, scheduler, steps, denoise=None):
    """``KSampler(...).sigmas``: ``set_steps``, whose ``calculate_sigmas`` drops the penultimate sigma of the
    samplers in ``DISCARD_PENULTIMATE_SIGMA_SAMPLERS`` before the denoise cut."""

    def ksampler_calculate_sigmas(steps):
        discard_penultimate_sigma = False
        if sampler in DISCARD_PENULTIMATE_SIGMA_SAMPLERS:
            steps += 1
            discard_penultimate_sigma = True
        sigmas = calculate_sigmas(s, scheduler, steps)
        if discard_penultimate_sigma:
            sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
        return sigmas

    if denoise is None or denoise > 0.9999:
        return ksampler_calculate_sigmas(steps)
    new_steps = int(steps / denoise)
    return ksampler_calculate_sigmas(new_steps)[-(steps + 1):]
