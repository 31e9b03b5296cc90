"""ComfyUI's timestep <-> sigma arithmetic of a discrete model, in float32 as ComfyUI computes it.

ComfyUI's ``ModelSamplingDiscrete`` (comfy/model_sampling.py) keeps a discrete model's training levels as two
float32 tables, each its float64 value rounded (``set_sigmas``: ``sigmas.float()``, ``sigmas.log().float()``),
and maps between timesteps and sigmas on them in float32:

- ``timestep(sigma)``: the index of the nearest log sigma, ``argmin |log sigma - log_sigmas|`` (an integer);
- ``sigma(t)``: ``exp((1 - w) log_sigmas[floor t] + w log_sigmas[ceil t])``, w = frac(t), t clamped to
  [0, T - 1], every operation in float32;
- ``percent_to_sigma(p)``: ``sigma(torch.tensor((1 - p) * 999.0))`` (a float32 timestep), 999999999.9 for
  p <= 0 and 0 for p >= 1 (the edges of comfy/controlnet.py's ControlNet windows).

Its ``normal`` and ``sgm_uniform`` schedules (comfy/samplers.py ``normal_scheduler``) are ``sigma`` at
``torch.linspace(timestep(sigma_max), timestep(sigma_min), n)`` (float32; sgm_uniform: n = steps + 1 without its
last). sdlab's own maps (``NoiseSchedule.t_to_sigma``) interpolate in float64: rounded to float32, about half of
those sigmas and a third of the percents' sigmas differ from ComfyUI's in their last bit, and a ControlNet window
whose edge falls on a step's sigma then takes one step more or less. Under ComfyUI's conventions sdlab computes
them here instead (``discretization.normal_sigmas(..., comfyui=True)``, ``pipeline.control.comfyui_sigma_window``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from sdlab.diffusion.schedules import NoiseSchedule

__all__ = ["COMFYUI_ALWAYS", "comfyui_log_sigmas", "comfyui_percent_to_sigma", "comfyui_sigma", "comfyui_timestep"]

COMFYUI_ALWAYS = 999999999.9
"""ComfyUI's percent_to_sigma(0): above every sigma (a window from the start takes every call)."""


def comfyui_log_sigmas(schedule: NoiseSchedule) -> Tensor:
    """ComfyUI's ``log_sigmas``: the log of the schedule's sigmas, taken in their dtype, rounded to float32. (T,)"""
    return schedule.sigmas.log().to(torch.float32)


def comfyui_timestep(schedule: NoiseSchedule, sigma: Tensor | float) -> Tensor:
    """ComfyUI's ``timestep(sigma)``: the training timestep whose float32 log sigma lies nearest to log(sigma), sigma
    taken in float32 (int64, sigma's shape)."""
    sigma_t = torch.as_tensor(sigma, dtype=torch.float32)
    log_sigmas = comfyui_log_sigmas(schedule)                                       # (T,)
    distances = sigma_t.log().reshape(1, -1) - log_sigmas[:, None]                  # (T, n)
    return distances.abs().argmin(dim=0).reshape(sigma_t.shape)


def comfyui_sigma(schedule: NoiseSchedule, timestep: Tensor | float) -> Tensor:
    """ComfyUI's ``sigma(timestep)``: log sigma interpolated linearly between the two neighbouring training timesteps,
    in float32 (float32, timestep's shape)."""
    log_sigmas = comfyui_log_sigmas(schedule)                                       # (T,)
    t = torch.as_tensor(timestep).float().clamp(min=0, max=schedule.num_timesteps - 1)
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


def comfyui_percent_to_sigma(percent: float, sigma_of: Callable[[Tensor], Tensor]) -> float:
    """ComfyUI's ``percent_to_sigma(percent)``: ``sigma_of`` (the model's ``sigma(timestep)``: `comfyui_sigma` of a
    discrete model) at the timestep ``(1 - percent) * 999`` rounded to float32, ``COMFYUI_ALWAYS`` for percent <= 0
    and 0 for percent >= 1."""
    if percent <= 0.0:
        return COMFYUI_ALWAYS
    if percent >= 1.0:
        return 0.0
    return float(sigma_of(torch.tensor((1.0 - percent) * 999.0, dtype=torch.float32)))
