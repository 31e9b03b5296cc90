"""ComfyUI's timestep <-> sigma arithmetic of a discrete model, in float32 as ComfyUI computes it.

ComfyUI's ``ModelSamplingDiscrete`` (comfy/model_sampling.py) keeps a discrete model's training levels as two
float32 tables, each its float64 value rounded (``set_sigmas``: ``sigmas.float()``, ``sigmas.log().float()``),
and maps between timesteps and sigmas on them in float32. sdlab's `NoiseSchedule` maps compute so with
``dtype=torch.float32``:

- ``timestep(sigma)``: the index of the nearest log sigma, ``argmin |log sigma - log_sigmas|`` (an integer):
  ``sigma_to_t(sigma, quantize=True, dtype=torch.float32)``;
- ``sigma(t)``: ``exp((1 - w) log_sigmas[floor t] + w log_sigmas[ceil t])``, w = frac(t), t clamped to
  [0, T - 1], every operation in float32: ``t_to_sigma(t, dtype=torch.float32)``;
- ``percent_to_sigma(p)``: ``sigma(torch.tensor((1 - p) * 999.0))`` (a float32 timestep), 999999999.9 for
  p <= 0 and 0 for p >= 1 (the edges of comfy/controlnet.py's ControlNet windows): `comfyui_percent_to_sigma`.

Its ``normal`` and ``sgm_uniform`` schedules (comfy/samplers.py ``normal_scheduler``) are ``sigma`` at
``torch.linspace(timestep(sigma_max), timestep(sigma_min), n)`` (float32; sgm_uniform: n = steps + 1 without its
last). sdlab's own maps interpolate in float64: rounded to float32, about half of those sigmas and a third of the
percents' sigmas differ from ComfyUI's in their last bit, and a ControlNet window whose edge falls on a step's sigma
then takes one step more or less. A pass that follows ComfyUI's arithmetic (`pipeline.plan.comfyui_arithmetic`)
computes them in float32 instead (``discretization.normal_sigmas(..., comfyui=True)``,
`pipeline.plan.pass_timestep_sigma`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["COMFYUI_ALWAYS", "comfyui_percent_to_sigma"]

COMFYUI_ALWAYS = 999999999.9
"""ComfyUI's percent_to_sigma(0): above every sigma (a window from the start takes every call)."""


def comfyui_percent_to_sigma(percent: float, sigma_of: Callable[[Tensor], Tensor]) -> float:
    """ComfyUI's ``percent_to_sigma(percent)``: ``sigma_of`` (the model's ``sigma(timestep)``: a discrete model's
    ``t_to_sigma(t, dtype=torch.float32)``) at the timestep ``(1 - percent) * 999`` rounded to float32,
    ``COMFYUI_ALWAYS`` for percent <= 0 and 0 for percent >= 1."""
    if percent <= 0.0:
        return COMFYUI_ALWAYS
    if percent >= 1.0:
        return 0.0
    return float(sigma_of(torch.tensor((1.0 - percent) * 999.0, dtype=torch.float32)))
