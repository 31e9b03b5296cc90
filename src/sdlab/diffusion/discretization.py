"""Discretizations: which noise levels a sampler visits, chosen independently of the sampler.

Every function here has the signature ``fn(schedule, steps, *, final="zero", **options) -> sigmas``
and returns a descending float32 tensor of length ``steps + 1`` (exceptions, as their references:
``ddim_uniform`` and ``beta`` can give another number of steps, ``a1111_kl_optimal`` ends at sigma_min).
A sampler takes ``steps`` steps ``sigmas[i] -> sigmas[i+1]``; the last entry is the "final sigma":

- ``final="zero"`` (default): 0, the clean sample (k-diffusion, ComfyUI, A1111, diffusers Euler/DPM).
- ``final="first_alpha"``: sigma(t=0) = sqrt((1 - ac[0]) / ac[0]), the convention of the original
  DDIM/PLMS/DDPM code and diffusers' DDIM with ``set_alpha_to_one=False`` (SD's config) or
  ``final_sigmas_type="sigma_min"``.

Families (all sigmas are VE: ``x = x0 + sigma * eps``):

diffusers timestep spacings (Lin et al. 2023, Table 2), T = num_train_timesteps:
  ``leading``   t_i = round(i * (T // steps)) + steps_offset, descending (SD1/SD2/SDXL: offset 1)
  ``trailing``  t_i = round(T - i * T / steps) - 1
  ``linspace``  t_i = linspace(0, T - 1, steps), descending (fractional for Euler)
  Each diffusers scheduler implements these its own way, so the plain names take a ``scheduler``
  option (``SPACING_SCHEDULERS``; the generate loop passes the sampler's, ``SamplerSpec.spacing``):
  ``euler`` (Euler, Euler a, Heun, KDPM2, KDPM2 a, LMS, DPMSolverSDE): sigma linearly interpolated at
  the timesteps above, ``np.interp(timesteps, arange(T), sigmas)``; ``dpm_solver``
  (DPMSolverMultistep, UniPCMultistep): integer timesteps from a grid of steps + 1 points without
  its last, ``leading`` = arange(steps + 1) * (T // (steps + 1)) + offset, ``linspace`` =
  round(linspace(0, T - 1, steps + 1)), ``trailing`` as above; ``ddim`` (DDIM, PNDM, DDPM):
  ``DDIMScheduler``'s integer timesteps (its ``linspace`` rounds); ``lcm``: ``LCMScheduler``'s own
  grid (every (50 / steps)-th of its 50 distillation timesteps), whatever the spacing name. The
  ``ddim_*`` names give ``DDIMScheduler``'s timesteps for any sampler.
``diffusers_karras`` / ``diffusers_exponential``
  Euler's ``use_karras_sigmas`` / ``use_exponential_sigmas``: the Karras/exponential ramp between the
  first and last sigma of the *spacing* above (for SD's leading spacing, sigma(t=1) .. sigma(t=981)
  at 50 steps), not the model's full range. (DPMSolverMultistep's karras option uses the full range
  and equals ``karras`` below.)
k-diffusion / ComfyUI (``comfy/samplers.py``) / A1111 (``modules/sd_schedulers.py``):
  ``karras``        (s_max^(1/rho) + i/(n-1) * (s_min^(1/rho) - s_max^(1/rho)))^rho, rho = 7
                    (Karras et al. 2022 eq. 5; k-diffusion ``get_sigmas_karras``), s_min/s_max of the model
  ``exponential``   exp(linspace(log s_max, log s_min, n)) (k-diffusion ``get_sigmas_exponential``)
  ``normal``        sigma(t) at t = linspace(T-1, 0, n), log-sigma interpolation (ComfyUI ``normal``,
                    A1111 ``uniform``/``normal``, k-diffusion ``DiscreteSchedule.get_sigmas``)
  ``sgm_uniform``   the same at t = linspace(T-1, 0, n+1)[:-1] (Stability's generative-models)
  ``simple``        sigmas[T - 1 - int(i * T / n)] for i < n (ComfyUI ``simple``)
  ``ddim_uniform``  sigmas[1 + k * max(T // n, 1)] for every such index < T, descending (ComfyUI)
  ``beta``          sigmas[rint(ppf(1 - i/n) * (T-1))], Beta(0.6, 0.6) quantiles, repeats left out (ComfyUI)
  ``linear_quadratic``  s_max * (1 - s_i), s linear then quadratic (ComfyUI, from Mochi)
  ``kl_optimal``    tan(linspace(atan s_max, atan s_min, n)) (ComfyUI)
  ``polyexponential``  exp(log s_min + linspace(1, 0, n)^rho * (log s_max - log s_min)), rho = 1 (A1111)
  ``align_your_steps`` / ``_sdxl``  NVIDIA's 10-step lists, log-linearly interpolated to n (A1111)
  ``turbo``         sigmas[round(k T / n) - 1], k = n..1 (Forge)
  ``a1111_beta``    s_min + ppf(1 - linspace(0, 1, n)) * (s_max - s_min): A1111's "Beta", linear in sigma
  ``a1111_kl_optimal``  the atan ramp on n + 1 points, ending at s_min: A1111's "KL Optimal"
  ``a1111_lcm``     sigma(t) log-interpolated on the 50 LCM timesteps 19, 39, ..., 999 at evenly spaced
                    indices: A1111's LCM sampler's "Automatic" / "Uniform" grid, ending at t = 19
  A1111 and ComfyUI give "beta" and "kl_optimal" to different schedules: the plain names are ComfyUI's,
  A1111's labels "Beta" and "KL Optimal" pick its own (``schedule_names``).

Two exceptions in ComfyUI (``normal`` and ``ddim_uniform`` change the step count when the model's
sigma(t=0) is ~0) cannot trigger here: ``NoiseSchedule`` guarantees sigma_min > 0.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sdlab.diffusion.schedules import NoiseSchedule

__all__ = [
    "A1111_IMG2IMG",
    "DIFFUSERS_NAMES",
    "DISCRETIZATIONS",
    "FINAL_SIGMAS",
    "IMG2IMG_CONVENTIONS",
    "INIT_NOISE_CONVENTIONS",
    "Discretization",
    "SPACING_SCHEDULERS",
    "UI_IMG2IMG",
    "UnknownDiscretizationError",
    "a1111_timestep_sigmas",
    "a1111_timesteps",
    "comfyui_options",
    "ddim_timesteps",
    "ddim_uniform_sigmas",
    "default_init_noise",
    "diffusers_ddim_sigmas",
    "diffusers_euler_sigmas",
    "diffusers_exponential_sigmas",
    "diffusers_karras_sigmas",
    "diffusers_spacing_sigmas",
    "discretize",
    "dpm_solver_timesteps",
    "euler_timesteps",
    "exponential_sigmas",
    "get_discretization",
    "img2img_sigmas",
    "initial_noise_sigma",
    "karras_sigmas",
    "lcm_timesteps",
    "normal_sigmas",
    "partial_sigmas",
    "schedule_overrides",
    "sgm_uniform_sigmas",
    "simple_sigmas",
    "steps_run",
    "uniform_sigmas",
]

Discretization = Callable[..., Tensor]
FINAL_SIGMAS = ("zero", "first_alpha")
SPACINGS = ("leading", "trailing", "linspace")
KARRAS_RHO = 7.0


# -- helpers ----------------------------------------------------------------------------------
def _unknown_spacing(spacing: str) -> ValueError:
    return ValueError(f"unknown timestep spacing {spacing!r}; expected one of {', '.join(SPACINGS)}")


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return int(steps)


def _final_sigma(schedule: NoiseSchedule, final: str) -> float:
    if final == "zero":
        return 0.0
    if final == "first_alpha":
        return schedule.sigma_min
    raise ValueError(f"unknown final sigma {final!r}; expected one of {', '.join(FINAL_SIGMAS)}")


def _finish(sigmas: Tensor, schedule: NoiseSchedule, final: str) -> Tensor:
    """Append the final sigma and return float32 (steps+1,) on the CPU."""
    last = torch.tensor([_final_sigma(schedule, final)], dtype=torch.float64)
    return torch.cat([sigmas.to(torch.float64).cpu(), last]).to(torch.float32)


def _finish_ramp(sigmas: Tensor, schedule: NoiseSchedule, final: str) -> Tensor:
    """`_finish` for the k-diffusion schedules (karras, exponential, normal), which already end at sigma_min:
    there a "first_alpha" end (DDIM, PLMS, TCD) is 0 instead, since sigma_min again would make the last of the
    requested steps an empty one (diffusers' own spacings keep theirs, as diffusers does)."""
    if final == "first_alpha" and float(sigmas[-1]) <= schedule.sigma_min * (1 + 1e-6):
        final = "zero"
    return _finish(sigmas, schedule, final)


def _interp_sigmas(schedule: NoiseSchedule, timesteps: Tensor) -> Tensor:
    """Sigma linearly interpolated at fractional timesteps, clamped to [0, T-1] (``np.interp``)."""
    table = schedule.sigmas.to(torch.float64).cpu()  # (T,)
    t = timesteps.to(torch.float64).clamp(0, schedule.num_timesteps - 1)
    low = t.floor().long().clamp(max=schedule.num_timesteps - 2)
    w = t - low.to(torch.float64)
    return (table[low + 1] - table[low]) * w + table[low]


def _linspace64(start: float, stop: float, num: int) -> Tensor:
    """``numpy.linspace`` in float64 (start + i * step, last entry exactly ``stop``)."""
    if num == 1:
        return torch.tensor([float(start)], dtype=torch.float64)
    step = (stop - start) / (num - 1)
    out = torch.arange(num, dtype=torch.float64) * step + start
    out[-1] = stop
    return out


# -- diffusers timestep spacings --------------------------------------------------------------
def _leading(steps: int, num_train_timesteps: int, steps_offset: int) -> Tensor:
    ratio = num_train_timesteps // steps
    return (torch.arange(steps, dtype=torch.float64) * ratio).round().flip(0) + steps_offset


def _trailing(steps: int, num_train_timesteps: int) -> Tensor:
    # diffusers computes np.arange(T, 0, -T/steps); for some step counts (61, 103, ...) float error
    # makes that arange one longer, ending in timestep -1. We always return exactly `steps` entries.
    ratio = num_train_timesteps / steps
    return (num_train_timesteps + torch.arange(steps, dtype=torch.float64) * -ratio).round() - 1


def euler_timesteps(
    steps: int, spacing: str = "leading", *, steps_offset: int = 1, num_train_timesteps: int = 1000
) -> Tensor:
    """Timesteps of diffusers' ``EulerDiscreteScheduler.set_timesteps`` (float64, descending).

    ``linspace`` keeps fractional timesteps (computed in float32 as diffusers does). ``steps_offset``
    applies to ``leading`` only.
    """
    steps = _check_steps(steps)
    if spacing == "leading":
        return _leading(steps, num_train_timesteps, steps_offset)
    if spacing == "trailing":
        return _trailing(steps, num_train_timesteps)
    if spacing == "linspace":
        return _linspace64(0, num_train_timesteps - 1, steps).to(torch.float32).to(torch.float64).flip(0)
    raise _unknown_spacing(spacing)


def ddim_timesteps(
    steps: int, spacing: str = "leading", *, steps_offset: int = 1, num_train_timesteps: int = 1000
) -> Tensor:
    """Timesteps of diffusers' ``DDIMScheduler.set_timesteps`` (int64, descending).

    Differs from Euler's only for ``linspace``, which DDIM rounds to integers. Note that diffusers'
    DDIM steps from t to ``t - T // steps``, which is the next listed timestep only for ``leading``
    spacing, and for ``trailing`` when the steps divide T; the sigma list of ``diffusers_ddim_sigmas`` always steps to the next listed timestep.
    """
    steps = _check_steps(steps)
    if steps > num_train_timesteps:
        raise ValueError(f"DDIM cannot take {steps} steps on a {num_train_timesteps}-step schedule")
    if spacing == "linspace":
        return _linspace64(0, num_train_timesteps - 1, steps).round().flip(0).long()
    if spacing in ("leading", "trailing"):
        t = euler_timesteps(steps, spacing, steps_offset=steps_offset, num_train_timesteps=num_train_timesteps)
        return t.long()
    raise _unknown_spacing(spacing)


def dpm_solver_timesteps(
    steps: int, spacing: str = "linspace", *, steps_offset: int = 1, num_train_timesteps: int = 1000
) -> Tensor:
    """Timesteps of diffusers' ``DPMSolverMultistepScheduler`` / ``UniPCMultistepScheduler`` (int64, descending).

    ``leading`` and ``linspace`` lay ``steps + 1`` points and drop the last (t = 0 or ``steps_offset``):
    ``leading`` = arange(steps + 1) * (T // (steps + 1)) + offset, ``linspace`` = round(linspace(0, T - 1,
    steps + 1)); ``trailing`` is Euler's, as integers. ``DPMSolverSinglestepScheduler`` has no spacing
    option: its grid is always this ``linspace``.
    """
    steps = _check_steps(steps)
    if steps > num_train_timesteps:
        raise ValueError(f"DPM-Solver cannot take {steps} steps on a {num_train_timesteps}-step schedule")
    if spacing == "leading":
        ratio = num_train_timesteps // (steps + 1)
        return (torch.arange(steps + 1, dtype=torch.float64) * ratio).flip(0)[:-1].long() + steps_offset
    if spacing == "linspace":
        return _linspace64(0, num_train_timesteps - 1, steps + 1).round().flip(0)[:-1].long()
    if spacing == "trailing":
        return _trailing(steps, num_train_timesteps).long()
    raise _unknown_spacing(spacing)


LCM_ORIGINAL_STEPS = 50  # LCMScheduler's original_inference_steps: the distillation grid


def lcm_timesteps(steps: int, *, original_steps: int = LCM_ORIGINAL_STEPS, num_train_timesteps: int = 1000,
                  strength: float = 1.0) -> Tensor:
    """Timesteps of diffusers' ``LCMScheduler.set_timesteps`` (int64, descending; it has no spacing option).

    Every ``original_steps / steps``-th (floored) of the distillation grid t = 999, 979, ..., 19 (k - 1 for
    k = 20, ..., 1000 with ``original_steps`` = 50), starting at its top. With a ``strength`` below 1 (its
    img2img option) the grid keeps its lowest ``int(original_steps * strength)`` timesteps (`_lcm_kept`) and
    the steps are spread over those: strength 0.5 at 4 steps gives 499, 379, 259, 139.
    """
    steps = _check_steps(steps)
    if steps > original_steps:
        raise ValueError(f"LCM takes at most {original_steps} steps (its distillation grid), got {steps}")
    kept = _lcm_kept(steps, strength, original_steps)
    stride = num_train_timesteps // original_steps
    origin = (torch.arange(1, kept + 1, dtype=torch.int64) * stride - 1).flip(0)  # (kept,)
    index = _linspace64(0, kept, steps + 1)[:-1].floor().long()                  # endpoint=False
    return origin[index]


def _lcm_kept(steps: int, strength: float, original_steps: int = LCM_ORIGINAL_STEPS) -> int:
    """How many distillation timesteps LCMScheduler keeps at ``strength``, ``int(original_steps * strength)``;
    a ValueError when they are fewer than ``steps`` (each step takes one of them)."""
    kept = int(original_steps * strength)
    if kept < steps:
        raise ValueError(f"strength {strength} keeps {kept} of LCM's {original_steps} distillation timesteps, fewer "
                         f"than the {steps} steps; lower the steps or raise the strength")
    return kept


def a1111_lcm_sigmas(schedule: NoiseSchedule, steps: int, *, final: str = "zero") -> Tensor:
    """A1111's LCM sampler's grid (its "Automatic", "Uniform" and "Normal": ``LCMCompVisDenoiser.get_sigmas``).

    A1111's LCM denoiser holds only the training sigmas at the 50 distillation timesteps t = 19, 39, ..., 999
    (every (T / 50)-th, ending at T-1); ``steps`` points evenly spaced over that table's index, from its top to
    its bottom, interpolate it in log sigma. The last step starts at t = 19 (sigma 0.1345 on SD's schedule),
    where the boundary scalings still keep the model's x0, not at t = 0.
    """
    steps = _check_steps(steps)
    stride = schedule.num_timesteps // LCM_ORIGINAL_STEPS
    timesteps = schedule.num_timesteps - 1 - stride * torch.arange(LCM_ORIGINAL_STEPS).flip(0)  # (50,) ascending
    log_table = schedule.sigmas.to(torch.float64).cpu()[timesteps].log()                      # (50,)
    index = _linspace64(LCM_ORIGINAL_STEPS - 1, 0, steps)
    low, high = index.floor().long(), index.ceil().long()
    w = index - low.to(torch.float64)
    return _finish(((1 - w) * log_table[low] + w * log_table[high]).exp(), schedule, final)


def _euler_spacing_sigmas(schedule: NoiseSchedule, steps: int, spacing: str, steps_offset: int) -> Tensor:
    t = euler_timesteps(steps, spacing, steps_offset=steps_offset, num_train_timesteps=schedule.num_timesteps)
    return _interp_sigmas(schedule, t)  # (steps,) float64


def diffusers_euler_sigmas(
    schedule: NoiseSchedule, steps: int, *, spacing: str = "leading", steps_offset: int = 1, final: str = "zero"
) -> Tensor:
    """``EulerDiscreteScheduler.sigmas``: sigma interpolated linearly at ``euler_timesteps``.

    A timestep past T-1 (``leading`` with 1000 steps and offset 1 gives t=1000) clamps to sigma_max,
    as ``np.interp`` does.
    """
    return _finish(_euler_spacing_sigmas(schedule, steps, spacing, steps_offset), schedule, final)


def diffusers_ddim_sigmas(
    schedule: NoiseSchedule, steps: int, *, spacing: str = "leading", steps_offset: int = 1, final: str = "zero"
) -> Tensor:
    """Sigmas at ``DDIMScheduler.timesteps``: sigmas[t], with t clamped to T-1.

    Use ``final="first_alpha"`` for SD's DDIM config (``set_alpha_to_one=False``), ``"zero"`` for
    ``set_alpha_to_one=True``.
    """
    t = ddim_timesteps(steps, spacing, steps_offset=steps_offset, num_train_timesteps=schedule.num_timesteps)
    return _finish(_interp_sigmas(schedule, t.to(torch.float64)), schedule, final)


SPACING_SCHEDULERS = ("euler", "dpm_solver", "ddim", "lcm")


def diffusers_spacing_sigmas(
    schedule: NoiseSchedule,
    steps: int,
    *,
    spacing: str = "leading",
    scheduler: str = "euler",
    steps_offset: int = 1,
    final: str = "zero",
) -> Tensor:
    """The sigmas diffusers' scheduler family ``scheduler`` visits with ``timestep_spacing=spacing``.

    ``euler``: ``diffusers_euler_sigmas``; ``dpm_solver``: sigmas[t] at ``dpm_solver_timesteps``;
    ``ddim``: ``diffusers_ddim_sigmas``; ``lcm``: sigmas[t] at ``lcm_timesteps`` (LCM ignores the spacing).
    """
    if scheduler == "euler":
        return diffusers_euler_sigmas(schedule, steps, spacing=spacing, steps_offset=steps_offset, final=final)
    if scheduler == "ddim":
        return diffusers_ddim_sigmas(schedule, steps, spacing=spacing, steps_offset=steps_offset, final=final)
    if scheduler == "dpm_solver":
        t = dpm_solver_timesteps(steps, spacing, steps_offset=steps_offset, num_train_timesteps=schedule.num_timesteps)
    elif scheduler == "lcm":
        if spacing not in SPACINGS:
            raise _unknown_spacing(spacing)
        t = lcm_timesteps(steps, num_train_timesteps=schedule.num_timesteps)
    else:
        raise ValueError(f"unknown diffusers scheduler family {scheduler!r}; expected one of {', '.join(SPACING_SCHEDULERS)}")
    return _finish(_interp_sigmas(schedule, t.to(torch.float64)), schedule, final)


def _karras_ramp(ramp: Tensor, sigma_min: float, sigma_max: float, rho: float) -> Tensor:
    """Karras et al. eq. 5 at `ramp` (0 .. 1), in `ramp`'s dtype; the ends' 1/rho powers are Python floats."""
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def _exponential_ramp(steps: int, sigma_min: float, sigma_max: float) -> Tensor:
    return _linspace64(math.log(sigma_max), math.log(sigma_min), steps).exp()


def diffusers_karras_sigmas(
    schedule: NoiseSchedule, steps: int, *, spacing: str = "leading", steps_offset: int = 1, final: str = "zero"
) -> Tensor:
    """``EulerDiscreteScheduler(use_karras_sigmas=True)``: Karras ramp between the spacing's end sigmas."""
    steps = _check_steps(steps)
    inner = _euler_spacing_sigmas(schedule, steps, spacing, steps_offset)
    return _finish(_karras_ramp(_linspace64(0, 1, steps), float(inner[-1]), float(inner[0]), KARRAS_RHO), schedule,
                   final)


def diffusers_exponential_sigmas(
    schedule: NoiseSchedule, steps: int, *, spacing: str = "leading", steps_offset: int = 1, final: str = "zero"
) -> Tensor:
    """``EulerDiscreteScheduler(use_exponential_sigmas=True)``: log-uniform between the spacing's end sigmas."""
    steps = _check_steps(steps)
    inner = _euler_spacing_sigmas(schedule, steps, spacing, steps_offset)
    return _finish(_exponential_ramp(steps, float(inner[-1]), float(inner[0])), schedule, final)


# -- k-diffusion / ComfyUI / A1111 schedule types ---------------------------------------------
def _sigma_range(schedule: NoiseSchedule, sigma_min: float | None, sigma_max: float | None) -> tuple[float, float]:
    """(sigma_min, sigma_max) of a ramp: the model's own, unless overridden."""
    lo = schedule.sigma_min if sigma_min is None else sigma_min
    hi = schedule.sigma_max if sigma_max is None else sigma_max
    return lo, hi


def karras_sigmas(
    schedule: NoiseSchedule,
    steps: int,
    *,
    rho: float = KARRAS_RHO,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    final: str = "zero",
) -> Tensor:
    """Karras et al. 2022 eq. 5 between the model's sigma_min and sigma_max (overridable), on a float32 ramp as
    k-diffusion's ``get_sigmas_karras`` (A1111, ComfyUI) computes it: with rho below 1 the float32 sum cancels
    near sigma_min (the last sigma moves by ~1e-3 at rho 0.5, and reaches 0 at SD's ends by rho 0.35, which a
    ValueError refuses: the samplers would divide by it)."""
    steps = _check_steps(steps)
    lo, hi = _sigma_range(schedule, sigma_min, sigma_max)
    sigmas = _karras_ramp(torch.linspace(0, 1, steps, dtype=torch.float32), lo, hi, rho)   # (steps,)
    if not bool((sigmas > 0).all()):
        raise ValueError(f"the Karras schedule with rho {rho:g} between sigma {lo:g} and {hi:g} reaches sigma "
                         f"{float(sigmas.nan_to_num(0).min()):g} in float32 (as in k-diffusion); raise rho or the "
                         "schedule's min sigma")
    return _finish_ramp(sigmas, schedule, final)


def exponential_sigmas(
    schedule: NoiseSchedule,
    steps: int,
    *,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    final: str = "zero",
) -> Tensor:
    """Uniform in log sigma between the model's sigma_max and sigma_min (overridable)."""
    steps = _check_steps(steps)
    lo, hi = _sigma_range(schedule, sigma_min, sigma_max)
    return _finish_ramp(_exponential_ramp(steps, lo, hi), schedule, final)


def _t_range(schedule: NoiseSchedule, sigma_min: float | None, sigma_max: float | None) -> tuple[float, float]:
    """The timesteps of a ramp's ends: T-1 and 0, or those of overriding sigmas (`sigma_to_t`, as A1111's Normal
    and SGM Uniform take A1111's `Schedule max sigma` / `min sigma`)."""
    top = schedule.num_timesteps - 1 if sigma_max is None else float(schedule.sigma_to_t(float(sigma_max)))
    return top, 0.0 if sigma_min is None else float(schedule.sigma_to_t(float(sigma_min)))


def _comfyui_normal_ramp(schedule: NoiseSchedule, count: int) -> Tensor:
    """ComfyUI's ``normal_scheduler`` ramp (comfy/samplers.py) between the model's ends, ComfyUI having no other:
    its float32 ``sigma`` at ``count`` timesteps ``torch.linspace(timestep(sigma_max), timestep(sigma_min), count)``
    in float32, ``timestep`` the nearest training timestep (`comfy_sigmas`: the schedule's maps in float32).
    (count,) float32."""
    ends = torch.tensor([schedule.sigma_max, schedule.sigma_min], dtype=torch.float32)               # (2,)
    start, end = schedule.sigma_to_t(ends, quantize=True, dtype=torch.float32).tolist()             # whole numbers
    return schedule.t_to_sigma(torch.linspace(start, end, count, dtype=torch.float32), dtype=torch.float32)


def normal_sigmas(schedule: NoiseSchedule, steps: int, *, sigma_min: float | None = None,
                  sigma_max: float | None = None, final: str = "zero", comfyui: bool = False) -> Tensor:
    """sigma(t) at ``steps`` timesteps evenly spaced from T-1 down to 0 (log-sigma interpolation); between the
    timesteps of `sigma_max` and `sigma_min` where given. `comfyui`: in ComfyUI's float32 arithmetic
    (`_comfyui_normal_ramp`; the ends' nearest timesteps), else in float64 on fractional timesteps, rounded; ends
    given (A1111's Schedule min / max sigma, which ComfyUI has not) keep the float64 path, `comfyui` or not."""
    steps = _check_steps(steps)
    if comfyui and sigma_min is None and sigma_max is None:
        return _finish_ramp(_comfyui_normal_ramp(schedule, steps), schedule, final)
    t = _linspace64(*_t_range(schedule, sigma_min, sigma_max), steps)
    return _finish_ramp(schedule.t_to_sigma(t), schedule, final)


def uniform_sigmas(schedule: NoiseSchedule, steps: int, *, final: str = "zero") -> Tensor:
    """A1111's "Uniform" (k-diffusion's `DiscreteSchedule.get_sigmas`): `normal_sigmas` on the model's ends, which
    A1111's `Schedule min sigma` / `max sigma` do not move."""
    return normal_sigmas(schedule, steps, final=final)


def sgm_uniform_sigmas(schedule: NoiseSchedule, steps: int, *, sigma_min: float | None = None,
                       sigma_max: float | None = None, final: str = "zero", comfyui: bool = False) -> Tensor:
    """sigma(t) at ``linspace(T-1, 0, steps+1)[:-1]``: never visits t=0 before the final step (the ends
    overridable and `comfyui` as `normal_sigmas`')."""
    steps = _check_steps(steps)
    if comfyui and sigma_min is None and sigma_max is None:
        return _finish(_comfyui_normal_ramp(schedule, steps + 1)[:-1], schedule, final)
    t = _linspace64(*_t_range(schedule, sigma_min, sigma_max), steps + 1)[:-1]
    return _finish(schedule.t_to_sigma(t), schedule, final)


def simple_sigmas(schedule: NoiseSchedule, steps: int, *, final: str = "zero") -> Tensor:
    """Every (T/steps)-th training sigma from the top: ``sigmas[T - 1 - int(i * T / steps)]``."""
    steps = _check_steps(steps)
    stride = schedule.num_timesteps / steps
    index = torch.tensor([schedule.num_timesteps - 1 - int(i * stride) for i in range(steps)])
    return _finish(schedule.sigmas[index], schedule, final)


def ddim_uniform_sigmas(schedule: NoiseSchedule, steps: int, *, final: str = "zero") -> Tensor:
    """Training sigmas at t = 1, 1 + k, 1 + 2k, ... < T with k = max(T // steps, 1), descending.

    As in ComfyUI (and the original ``make_ddim_timesteps(..., "uniform")``) this gives MORE than
    ``steps`` steps when T is not a multiple of ``steps`` (7 steps -> 8: t = 1, 143, ..., 995).
    """
    steps = _check_steps(steps)
    stride = max(schedule.num_timesteps // steps, 1)
    index = torch.arange(1, schedule.num_timesteps, stride).flip(0)
    return _finish(schedule.sigmas[index], schedule, final)


# -- A1111's timestep samplers (DDIM, PLMS, UniPC) -------------------------------------------------------
def a1111_timesteps(num_timesteps: int, steps: int) -> Tensor:
    """The timesteps of A1111's timestep samplers (`CompVisSampler.get_timesteps`), ascending: ``range(0, T,
    T // steps) + 1`` clipped to T - 1 (T = 1000: 20 steps give 1, 51, ..., 951; 7 steps 8 timesteps, 1, 143, ...,
    995; 9 steps 10, the last 999)."""
    steps = _check_steps(steps)
    return (torch.arange(0, num_timesteps, max(num_timesteps // steps, 1)) + 1).clamp(max=num_timesteps - 1)


def a1111_timestep_sigmas(schedule: NoiseSchedule, steps: int, *, encoded: int | None = None,
                          unipc: bool = False) -> Tensor:
    """The sigmas A1111's timestep samplers (`sd_samplers_timesteps`) visit on the timesteps of `steps`
    (`a1111_timesteps`; img2img: the first `encoded` of them, `sample_img2img`'s ``timesteps[:t_enc]``), descending,
    float32 on the CPU.

    DDIM and PLMS (`sd_samplers_timesteps_impl.ddim` / `plms`) loop ``for i in trange(len(timesteps) - 1)``: they
    step from the highest timestep down to the lowest, where the run ends (its ``alphas_prev``: t = 1 for
    txt2img), one model call fewer than timesteps and none down to alphas_cumprod[0]. These are the sigmas of the
    timesteps, with no final sigma after them. UniPC (`unipc`) takes only their number N: N steps of its
    ``UniPC.sample``, uniform ("time_uniform") in its continuous time t = (timestep + 1) / T from 1 (img2img: from
    the highest timestep sampled, ``timesteps[-1] / T + 1 / T``) down to 1 / T, ending at alphas_cumprod[0] (no
    denoising to zero), each sigma its ``NoiseScheduleVP``'s, whose log alpha is linear in t between the training
    timesteps (`_a1111_unipc_sigmas`)."""
    timesteps = a1111_timesteps(schedule.num_timesteps, steps)
    if encoded is not None:
        timesteps = timesteps[:encoded]
    if unipc and not len(timesteps):        # img2img at a strength that samples on no timestep: no step either
        return torch.zeros(0)
    if unipc:
        start = 1.0 if encoded is None else timesteps[-1:] / schedule.num_timesteps + 1 / schedule.num_timesteps
        return _a1111_unipc_sigmas(schedule, start, len(timesteps))
    return schedule.sigmas[timesteps.flip(0).to(schedule.sigmas.device)].to("cpu", torch.float32)


def _a1111_unipc_sigmas(schedule: NoiseSchedule, start: float | Tensor, steps: int) -> Tensor:
    """The sigmas of A1111's UniPC (`a1111_timestep_sigmas`): continuous times ``torch.linspace(start, 1 / T,
    steps + 1)`` in float32 as UniPC's ``get_time_steps``, log alpha (half log alphas_cumprod) interpolated linearly
    at them over t_i = (i + 1) / T (``NoiseScheduleVP.marginal_log_mean_coeff``), sigma = sqrt(1 / alpha^2 - 1)."""
    total = schedule.num_timesteps
    times = torch.linspace(float(start), 1.0 / total, steps + 1).to(torch.float64)      # (steps + 1,)
    position = (times * total - 1).clamp(0, total - 1)                      # t_i = (i + 1) / T: index i
    low = position.floor().long().clamp(max=total - 2)
    w = position - low.to(torch.float64)
    log_alpha = 0.5 * schedule.alphas_cumprod.to("cpu", torch.float64).log()              # (T,)
    at = log_alpha[low] + w * (log_alpha[low + 1] - log_alpha[low])
    return torch.expm1(-2.0 * at).sqrt().to(torch.float32)


# -- the Beta distribution's quantiles (the beta schedules), without scipy --------------------------------
def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    value = d
    for m in range(1, 1000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            value *= c * d
        if abs(c * d - 1.0) < 1e-16:
            break
    return value


def _beta_cdf(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b), the CDF of Beta(a, b), in float64."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def beta_ppf(q: float, a: float, b: float) -> float:
    """The q-quantile of Beta(a, b) (``scipy.stats.beta.ppf``): the CDF inverted by bisection to float64
    resolution (|error| < 1e-15). The median of a symmetric one is 1/2 exactly: ComfyUI's ``beta`` rounds
    ``ppf * 999``, where scipy's median of Beta(0.6, 0.6), 0.5000000000000001, gives 500 as 1/2 does (half to
    even) and a value a hair below 1/2 would give 499."""
    if not 0.0 < q < 1.0:
        return min(max(q, 0.0), 1.0)
    if a == b and q == 0.5:
        return 0.5
    low, high = 0.0, 1.0
    while True:
        middle = 0.5 * (low + high)
        if middle in (low, high):
            return middle
        low, high = (middle, high) if _beta_cdf(middle, a, b) < q else (low, middle)


# -- more ComfyUI / A1111 schedule types ------------------------------------------------------------------
def beta_sigmas(schedule: NoiseSchedule, steps: int, *, alpha: float = 0.6, beta: float = 0.6,
                final: str = "zero") -> Tensor:
    """ComfyUI ``beta`` (Lee et al. 2024, "Beta Sampling is All You Need"): the training sigmas at timesteps
    ``rint(ppf(1 - i / steps) * (T - 1))``, i < steps, ppf the Beta(alpha, beta) quantile. As in ComfyUI, a
    timestep equal to the one before is left out, so a fine grid can give fewer steps than asked."""
    steps = _check_steps(steps)
    top = schedule.num_timesteps - 1
    timesteps = [round(beta_ppf(1.0 - i * (1.0 / steps), alpha, beta) * top) for i in range(steps)]  # numpy.rint
    distinct = [t for i, t in enumerate(timesteps) if i == 0 or t != timesteps[i - 1]]
    return _finish(schedule.sigmas[torch.tensor(distinct)], schedule, final)


def a1111_beta_sigmas(schedule: NoiseSchedule, steps: int, *, alpha: float = 0.6, beta: float = 0.6,
                      sigma_min: float | None = None, sigma_max: float | None = None, final: str = "zero") -> Tensor:
    """A1111's "Beta": ``sigma_min + ppf(q) * (sigma_max - sigma_min)`` at q = 1 - linspace(0, 1, steps), linear
    in sigma between the model's ends (ComfyUI's ``beta`` picks training timesteps instead)."""
    steps = _check_steps(steps)
    lo, hi = _sigma_range(schedule, sigma_min, sigma_max)
    quantiles = torch.tensor([beta_ppf(1.0 - float(q), alpha, beta) for q in _linspace64(0, 1, steps)])
    return _finish_ramp(lo + quantiles * (hi - lo), schedule, final)


def linear_quadratic_sigmas(schedule: NoiseSchedule, steps: int, *, threshold_noise: float = 0.025,
                            linear_steps: int | None = None, final: str = "zero") -> Tensor:
    """ComfyUI ``linear_quadratic`` (Mochi's schedule): sigma_max * (1 - s_i), s rising linearly from 0 to
    ``threshold_noise`` over ``linear_steps`` (default steps // 2) steps, then along a parabola that reaches 1
    at the last step. One step: sigma_max."""
    steps = _check_steps(steps)
    if steps == 1:
        rise = [0.0]
    else:
        linear_steps = steps // 2 if linear_steps is None else linear_steps
        quadratic_steps = steps - linear_steps
        step_diff = linear_steps - threshold_noise * steps
        quadratic = step_diff / (linear_steps * quadratic_steps**2)
        linear = threshold_noise / linear_steps - 2 * step_diff / quadratic_steps**2
        const = quadratic * linear_steps**2
        rise = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        rise += [quadratic * i**2 + linear * i + const for i in range(linear_steps, steps)]
    levels = torch.tensor([1.0 - value for value in rise], dtype=torch.float64) * schedule.sigma_max
    return _finish(levels, schedule, final)


def _tan_ramp(points: int, sigma_min: float, sigma_max: float) -> Tensor:
    """tan of ``points`` values from atan(sigma_max) to atan(sigma_min), evenly spaced."""
    ramp = _linspace64(0, 1, points)
    return (ramp * math.atan(sigma_min) + (1 - ramp) * math.atan(sigma_max)).tan()


def kl_optimal_sigmas(schedule: NoiseSchedule, steps: int, *, sigma_min: float | None = None,
                      sigma_max: float | None = None, final: str = "zero") -> Tensor:
    """ComfyUI ``kl_optimal`` (Sabour et al. 2024, "Align Your Steps", its KL-optimal schedule): ``steps``
    sigmas evenly spaced in atan(sigma) from sigma_max to sigma_min. One step: sigma_max (ComfyUI's 0 / 0
    gives NaN there)."""
    steps = _check_steps(steps)
    lo, hi = _sigma_range(schedule, sigma_min, sigma_max)
    return _finish_ramp(_tan_ramp(steps, lo, hi), schedule, final)


def a1111_kl_optimal_sigmas(schedule: NoiseSchedule, steps: int, *, sigma_min: float | None = None,
                            sigma_max: float | None = None, final: str = "zero") -> Tensor:
    """A1111's "KL Optimal": the same atan ramp on ``steps + 1`` points, so its last sigma is sigma_min, with
    no 0 after it, whatever ``final`` says (the one schedule here that ends above 0 by itself)."""
    steps = _check_steps(steps)
    lo, hi = _sigma_range(schedule, sigma_min, sigma_max)
    return _tan_ramp(steps + 1, lo, hi).to(torch.float32)


def polyexponential_sigmas(schedule: NoiseSchedule, steps: int, *, rho: float = 1.0, sigma_min: float | None = None,
                           sigma_max: float | None = None, final: str = "zero") -> Tensor:
    """A1111's "Polyexponential" (k-diffusion ``get_sigmas_polyexponential``): log sigma from log sigma_max to
    log sigma_min along ``linspace(1, 0, steps) ** rho``; A1111's default rho 1 is ``exponential``."""
    steps = _check_steps(steps)
    lo, hi = _sigma_range(schedule, sigma_min, sigma_max)
    ramp = _linspace64(1, 0, steps) ** rho
    return _finish_ramp((ramp * (math.log(hi) - math.log(lo)) + math.log(lo)).exp(), schedule, final)


AYS_SD1 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
AYS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)
"""NVIDIA's published Align Your Steps sigmas (10 steps) for SD 1.5 and SDXL, as A1111 rounds them."""


def align_your_steps_sigmas(schedule: NoiseSchedule, steps: int, *, levels: tuple[float, ...] = AYS_SD1,
                            final: str = "zero") -> Tensor:
    """A1111's "Align Your Steps" (Sabour et al. 2024): ``levels`` as published when they are ``steps`` many,
    else interpolated to ``steps`` sigmas linearly in log sigma over evenly spaced positions (its
    ``loglinear_interp``); then the final sigma. SD1's levels, or SDXL's (``align_your_steps_sdxl``)."""
    steps = _check_steps(steps)
    if steps == len(levels):
        return _finish_ramp(torch.tensor(levels, dtype=torch.float64), schedule, final)
    log_levels = np.log(np.array(levels[::-1]))
    positions = np.linspace(0, 1, len(levels))
    interpolated = np.exp(np.interp(np.linspace(0, 1, steps), positions, log_levels))[::-1].copy()
    return _finish_ramp(torch.from_numpy(interpolated), schedule, final)


def turbo_sigmas(schedule: NoiseSchedule, steps: int, *, final: str = "zero") -> Tensor:
    """Forge's "Turbo" (SD-Turbo's schedule): the training sigmas at timesteps ``round(k * T / steps) - 1``,
    k = steps .. 1 (float32 and half-to-even rounding, as Forge computes them)."""
    steps = _check_steps(steps)
    top = schedule.num_timesteps
    timesteps = (torch.arange(1, steps + 1) * float(top / steps) - 1).flip(0).round().long().clip(0, top - 1)
    return _finish(schedule.sigmas[timesteps], schedule, final)


# -- registry ---------------------------------------------------------------------------------
def _with_spacing(fn: Discretization, spacing: str) -> Discretization:
    def discretize(schedule: NoiseSchedule, steps: int, **options: Any) -> Tensor:
        return fn(schedule, steps, spacing=spacing, **options)

    discretize.__name__ = f"{fn.__name__}[{spacing}]"
    discretize.__doc__ = f"{fn.__name__} with spacing={spacing!r}."
    return discretize


_DIFFUSERS_DISCRETIZATIONS: dict[str, Discretization] = {
    "leading": _with_spacing(diffusers_spacing_sigmas, "leading"),
    "trailing": _with_spacing(diffusers_spacing_sigmas, "trailing"),
    "linspace": _with_spacing(diffusers_spacing_sigmas, "linspace"),
    "ddim_leading": _with_spacing(diffusers_ddim_sigmas, "leading"),
    "ddim_trailing": _with_spacing(diffusers_ddim_sigmas, "trailing"),
    "ddim_linspace": _with_spacing(diffusers_ddim_sigmas, "linspace"),
    "diffusers_karras": diffusers_karras_sigmas,
    "diffusers_exponential": diffusers_exponential_sigmas,
}
"""The schedules named the diffusers way (they start as the sampler's diffusers scheduler does)."""

DISCRETIZATIONS: dict[str, Discretization] = {
    **_DIFFUSERS_DISCRETIZATIONS,
    "karras": karras_sigmas,
    "exponential": exponential_sigmas,
    "normal": normal_sigmas,
    "uniform": uniform_sigmas,  # A1111's name for k-diffusion's DiscreteSchedule.get_sigmas
    "sgm_uniform": sgm_uniform_sigmas,
    "simple": simple_sigmas,
    "ddim_uniform": ddim_uniform_sigmas,
    "beta": beta_sigmas,
    "linear_quadratic": linear_quadratic_sigmas,
    "kl_optimal": kl_optimal_sigmas,
    "polyexponential": polyexponential_sigmas,
    "align_your_steps": align_your_steps_sigmas,
    "align_your_steps_sdxl": partial(align_your_steps_sigmas, levels=AYS_SDXL),
    "turbo": turbo_sigmas,
    "a1111_beta": a1111_beta_sigmas,            # A1111's "Beta" and "KL Optimal" are other schedules than ComfyUI's
    "a1111_kl_optimal": a1111_kl_optimal_sigmas,
    "a1111_lcm": a1111_lcm_sigmas,              # A1111's LCM sampler runs on its own 50-timestep table
}


class UnknownDiscretizationError(ValueError):
    """A discretization (schedule) name sdlab does not have; the message lists the valid names."""


def get_discretization(name: str) -> Discretization:
    """Look up a discretization by name, case-insensitively."""
    found = DISCRETIZATIONS.get(name.strip().lower())
    if found is None:
        raise UnknownDiscretizationError(f"unknown discretization {name!r}; valid names: "
                                         f"{', '.join(sorted(DISCRETIZATIONS))}")
    return found


def schedule_overrides(name: str, *, sigma_min: float = 0.0, sigma_max: float = 0.0,
                       rho: float = 0.0, alpha: float = 0.6, beta: float = 0.6) -> dict[str, float]:
    """The options of discretization `name` that A1111's `Schedule min sigma`, `max sigma` and `rho` set (its
    `sigma_min`, `sigma_max`, `rho` settings; 0 = the model's / the schedule's): those its function takes (karras,
    exponential, polyexponential, A1111's Beta and KL Optimal), as A1111's `get_sigmas` passes them to its
    scheduler's function; rho only where it differs from the function's own (karras 7, polyexponential 1). The beta
    schedules' `alpha` / `beta` (A1111's Beta schedule alpha / beta, its beta_dist_alpha / beta_dist_beta) where
    they differ from the function's own (0.6)."""
    taken = inspect.signature(get_discretization(name)).parameters
    given = {"sigma_min": sigma_min, "sigma_max": sigma_max, "rho": rho, "alpha": alpha, "beta": beta}
    return {key: float(value) for key, value in given.items()
            if value and key in taken and (key in ("sigma_min", "sigma_max") or value != taken[key].default)}


def comfyui_options(name: str) -> dict[str, bool]:
    """The option that builds discretization `name` in ComfyUI's float32 arithmetic (``comfyui=True``: `normal` and
    `sgm_uniform`, `comfy_sigmas`) where it has one; none for the others, whose sigmas are ComfyUI's as they are
    or computed as k-diffusion's (karras, exponential) for A1111 and ComfyUI alike."""
    return {"comfyui": True} if "comfyui" in inspect.signature(get_discretization(name)).parameters else {}


def discretize(name: str, schedule: NoiseSchedule, steps: int, *, scheduler: str = "euler",
               discard_penultimate: bool = False, **options: Any) -> Tensor:
    """Build discretization ``name``; a plain diffusers spacing name (``SPACINGS``) takes the spacing of the
    diffusers scheduler family ``scheduler`` (the sampler's ``SamplerSpec.spacing``), other names ignore it.

    ``discard_penultimate`` (``SamplerSpec.discard_penultimate``: A1111's DPM2, DPM2 a and DPM++ 3M SDE,
    ComfyUI's dpm_2, dpm_2_ancestral, uni_pc and uni_pc_bh2): build ``steps + 1`` sigmas and drop the
    next-to-last, as A1111's ``get_sigmas`` and ComfyUI's ``KSampler.calculate_sigmas`` do, so the last step
    runs from a larger sigma to the end; diffusers' own spacings keep their schedulers' grids."""
    key = name.strip().lower()
    if key in SPACINGS:
        options["scheduler"] = scheduler
    if discard_penultimate and key not in _DIFFUSERS_DISCRETIZATIONS:
        sigmas = get_discretization(name)(schedule, steps + 1, **options)
        return torch.cat([sigmas[:-2], sigmas[-1:]])
    return get_discretization(name)(schedule, steps, **options)


# -- starting part-way (img2img) --------------------------------------------------------------
IMG2IMG_CONVENTIONS = ("diffusers", "a1111", "comfyui", "lcm", "a1111_fix_steps")
A1111_IMG2IMG = ("a1111", "a1111_fix_steps")
"""The conventions that draw img2img as A1111 does (its noise, latent mask and blending), differing in the steps."""
UI_IMG2IMG = (*A1111_IMG2IMG, "comfyui")
"""A1111's and ComfyUI's conventions: they take the init image's VAE posterior mean (both UIs sample the
posterior from their global random state, which no seed reproduces), and their inpainting at strength 1 starts
from the image latent plus noise, where diffusers' starts from pure noise."""


def _check_strength(strength: float, convention: str = "diffusers") -> float:
    """A strength in (0, 1]; from 0 under the a1111 convention, where 0 still runs one step (at the lowest
    sigma), as A1111's img2img does (not a1111_fix_steps, whose schedule is steps / strength long). A1111's
    conventions take any strength above 1 too, and run it as 1 (their steps read min(strength, 0.999))."""
    low = 0.0 if convention == "a1111" else math.nextafter(0.0, 1.0)
    high = math.inf if convention in A1111_IMG2IMG else 1.0
    if not (low <= strength <= high):
        interval = ("[0, " if low == 0.0 else "(0, ") + ("inf)" if high == math.inf else "1]")
        raise ValueError(f"strength must lie in {interval} under the {convention} convention, got {strength!r}")
    return float(strength)


def steps_run(steps: int, strength: float, convention: str = "diffusers") -> tuple[int, int]:
    """``(total, run)``: length of the full schedule to build and how many of its last steps run.

    - ``diffusers`` (img2img pipelines): total = steps, run = min(int(steps * strength), steps)
      (``init_timestep``; the first ``steps - run`` steps are skipped).
    - ``a1111`` (default settings): total = steps, run = int(min(strength, 0.999) * steps) + 1
      (``sigmas[steps - t_enc - 1:]``, capped at ``steps``); strength 0 runs one step, at the lowest sigma.
    - ``a1111_fix_steps`` (A1111 with its option "img2img_fix_steps", ``setup_img2img_steps``): total =
      int(steps / min(strength, 0.999)), run = steps: every requested step runs, on a stretched schedule.
    - ``comfyui`` (``denoise``): total = int(steps / strength), run = steps: the requested steps all run, on
      a stretched schedule.
    - ``lcm`` (``LatentConsistencyModelImg2ImgPipeline``, diffusers' pipeline for a full LCM model):
      total = run = steps, every step on LCM's grid cut by strength (``lcm_img2img_sigmas``); the grid
      must keep at least ``steps`` of its 50 timesteps.
    """
    steps = _check_steps(steps)
    strength = _check_strength(strength, convention)
    if convention == "diffusers":
        run = min(int(steps * strength), steps)
        total = steps
    elif convention == "a1111":
        run = min(int(min(strength, 0.999) * steps) + 1, steps)
        total = steps
    elif convention == "a1111_fix_steps":
        total = int(steps / min(strength, 0.999))
        run = steps
    elif convention == "comfyui":
        total = int(steps / strength) if strength < 1.0 else steps
        run = steps
    elif convention == "lcm":
        _lcm_kept(steps, strength)
        total = run = steps
    else:
        raise ValueError(f"unknown img2img convention {convention!r}; expected one of {', '.join(IMG2IMG_CONVENTIONS)}")
    if run < 1:
        raise ValueError(f"strength {strength} with {steps} steps runs no step under the {convention} convention")
    return total, run


def partial_sigmas(sigmas: Tensor, strength: float, convention: str = "diffusers") -> Tensor:
    """The tail of a full ``sigmas`` list (steps+1 entries) that an img2img run at ``strength`` visits.

    Returns ``sigmas[steps - run:]`` with ``run`` from ``steps_run`` (``diffusers`` or ``a1111``;
    ``comfyui`` needs a longer schedule: use ``img2img_sigmas``). Diffusers' ``timesteps[t_start *
    order:]`` is the same cut for a sigma list: sdlab samplers count steps, not model calls.
    """
    if convention in ("comfyui", "lcm", "a1111_fix_steps"):
        raise ValueError(f"the {convention} convention builds a schedule of its own; use img2img_sigmas")
    steps = sigmas.shape[0] - 1
    _, run = steps_run(steps, strength, convention)
    return sigmas[steps - run :]


def img2img_sigmas(
    name: str, schedule: NoiseSchedule, steps: int, strength: float, convention: str = "diffusers", **options: Any
) -> Tensor:
    """Build discretization ``name`` for an img2img run (``discretize``'s options); ``result[0]`` is the
    sigma to noise the image to.

    The tail is the last ``run + 1`` sigmas, except under A1111's conventions, whose ``sample_img2img`` counts
    from the start (``sigma_sched = sigmas[steps - t_enc - 1:]``): the same for a schedule of ``total + 1``
    sigmas, more steps for one that is longer (A1111's "DDIM" schedule, 7 sigmas and 0 for 6 steps)."""
    if convention == "lcm":     # LCMScheduler's grid: no penultimate sigma to discard, no spacing offset
        return lcm_img2img_sigmas(name, schedule, steps, strength, scheduler=options.get("scheduler", "euler"),
                                  final=options.get("final", "zero"))
    total, run = steps_run(steps, strength, convention)
    sigmas = discretize(name, schedule, total, **options)                    # (total + 1,) or longer
    if convention in A1111_IMG2IMG:
        return sigmas[total - run:]
    return sigmas[-(run + 1) :]


def lcm_img2img_sigmas(name: str, schedule: NoiseSchedule, steps: int, strength: float, *, scheduler: str = "euler",
                       final: str = "zero") -> Tensor:
    """The ``lcm`` img2img convention, ``LatentConsistencyModelImg2ImgPipeline``'s: LCMScheduler takes the
    strength itself (``set_timesteps(steps, strength=strength)``: ``lcm_timesteps``) and every step runs, from
    the first timestep. It needs that grid: the LCM or TCD sampler (``scheduler="lcm"``) on a diffusers spacing
    name, which keeps its grid whole (no ``discard_penultimate``, as in ``discretize``) and has no
    ``steps_offset``."""
    if name.strip().lower() not in SPACINGS or scheduler != "lcm":
        raise ValueError(f"the lcm img2img convention is LCMScheduler's: it takes the LCM or TCD sampler on a "
                         f"diffusers spacing (trailing), got schedule {name!r} and a sampler of diffusers' "
                         f"{scheduler!r} family")
    steps_run(steps, strength, "lcm")
    t = lcm_timesteps(steps, strength=strength, num_train_timesteps=schedule.num_timesteps)
    return _finish(_interp_sigmas(schedule, t.to(torch.float64)), schedule, final)


# -- initial noise scale ----------------------------------------------------------------------
INIT_NOISE_CONVENTIONS = ("sigma_max", "vp", "diffusers_leading", "comfyui")
DIFFUSERS_NAMES = tuple(_DIFFUSERS_DISCRETIZATIONS)


def default_init_noise(name: str, scheduler: str = "euler", *, comfyui: bool = False) -> str:
    """The initial-noise convention that schedule ``name`` brings when the caller sets none.

    The one rule (``GenerationRequest.init_noise=None`` resolves through here): a schedule named the
    diffusers way (``DIFFUSERS_NAMES``) starts as the diffusers scheduler of the sampler does (its
    ``init_noise_sigma``); every A1111 / ComfyUI name (karras, exponential, normal, simple, ...) starts
    at ``"sigma_max"`` as A1111 does, or, for a sampler spelt as ComfyUI spells it (``comfyui``), by
    ComfyUI's KSampler rule, ``"comfyui"``. diffusers' Euler family (``scheduler="euler"``) starts at
    sigma_max for ``trailing`` / ``linspace`` and at ``"vp"`` otherwise (``leading``, its karras /
    exponential options); the schedulers that work in VP scaling (``dpm_solver``, ``ddim``, ``lcm``, and
    every ``ddim_*`` name) start from unit VP noise, ``"vp"``.
    """
    name = name.strip().lower()
    if name not in DIFFUSERS_NAMES:
        return "comfyui" if comfyui else "sigma_max"
    if scheduler == "euler" and name in ("trailing", "linspace"):
        return "sigma_max"
    return "vp"


def comfyui_max_denoise(first_sigma: float, sigma_max: float) -> bool:
    """ComfyUI's ``Sampler.max_denoise`` (comfy/samplers.py): whether a run starts at the model's ``sigma_max``
    (to a relative 1e-5) or above it."""
    return math.isclose(sigma_max, first_sigma, rel_tol=1e-05) or first_sigma > sigma_max


def initial_noise_sigma(sigmas: Tensor, convention: str = "sigma_max", sigma_max: float | None = None) -> float:
    """Factor for unit noise to give x at ``sigmas[0]`` in VE scaling: ``x_T = noise * factor``.

    - ``sigma_max`` (k-diffusion, A1111, diffusers Euler with ``linspace``/``trailing`` spacing):
      ``sigmas[0]``.
    - ``vp``: ``sqrt(sigmas[0]^2 + 1)``. DDIM/DDPM/PLMS/DPM-Solver/UniPC start from x_T = noise in VP
      scaling, whose VE equivalent is noise * sqrt(1 + sigma_max^2). diffusers' Euler-family schedulers
      use this for ``leading`` spacing (``init_noise_sigma``); ``diffusers_leading`` is an alias.
    - ``comfyui`` (ComfyUI's KSampler: ``EPS.noise_scaling`` with ``max_denoise``): ``vp``'s factor when
      ``sigmas[0]`` is the model's ``sigma_max`` (``comfyui_max_denoise``), else ``sigmas[0]``, as for
      ``ddim_uniform``, whose first sigma lies below it. Needs the model's ``sigma_max``.

    Which one a request gets by default: ``default_init_noise``.
    """
    top = float(sigmas[0])
    if convention == "comfyui":
        if sigma_max is None:
            raise ValueError("the comfyui initial-noise convention needs the model's sigma_max")
        convention = "vp" if comfyui_max_denoise(top, sigma_max) else "sigma_max"
    if convention == "sigma_max":
        return top
    if convention in ("vp", "diffusers_leading"):
        return math.sqrt(top * top + 1.0)
    valid = ", ".join(INIT_NOISE_CONVENTIONS)
    raise ValueError(f"unknown initial-noise convention {convention!r}; expected one of {valid}")
