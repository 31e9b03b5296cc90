"""A diffusers folder's `scheduler/scheduler_config.json`: what in it defines the model, what is only a sampler.

diffusers keeps two kinds of settings in one file:

- the training schedule, part of the model itself: `num_train_timesteps`, `beta_schedule`, `beta_start`,
  `beta_end`, `trained_betas`, `rescale_betas_zero_snr` (zero terminal SNR, Lin et al. 2023: the betas
  rescaled so the last timestep is pure noise; diffusers' Euler / DPM-Solver / UniPC schedulers then set the
  last alphas_cumprod to 2**-24 so sigma_max ~= 4096 is finite). These become the bundle's `ScheduleSpec`,
  so a folder is drawn on the noise levels diffusers draws it on; `trained_betas` (an explicit list) and
  an unknown `beta_schedule` are refused, never replaced by SD's schedule;
- how the pipeline's default scheduler spaces its steps: the scheduler class, `timestep_spacing`,
  `steps_offset`, `use_karras_sigmas`, ... sdlab's sampler and schedule are the request's (family default
  DPM++ 2M Karras), so these stay sampler settings: the load report lists them, and for a Turbo or
  zero-SNR folder (trailing spacing) the loader logs the sampler and schedule that step as the folder's
  scheduler does (`SCHEDULER_CLASSES`: `DDIMScheduler` with trailing spacing is `--sampler DDIM --schedule
  trailing`, `EulerAncestralDiscreteScheduler` is `--sampler "Euler a"`, ...).

A key the config leaves out takes the family's value (every released folder writes all of them).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.validate import check_int, check_positive_float
from sdlab.diffusion.schedules import ZERO_SNR_TERMINAL_ALPHAS_CUMPROD
from sdlab.families import ScheduleSpec

logger = logging.getLogger(__name__)

__all__ = ["SCHEDULER_CLASSES", "DiffusersScheduler", "SchedulerClass", "equivalent_settings", "log_scheduler",
           "read_scheduler_config"]

# diffusers' beta_schedule names sdlab builds (`sdlab.diffusion.schedules.make_betas`)
_BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")
# sampler settings worth reporting: how diffusers' default scheduler for this folder spaces its steps
_SAMPLER_KEYS = ("_class_name", "timestep_spacing", "steps_offset", "use_karras_sigmas", "set_alpha_to_one")


@dataclass(frozen=True)
class SchedulerClass:
    """How sdlab steps as one diffusers scheduler class does."""

    sampler: str                    # the sdlab sampler (`sdlab.diffusion.samplers`) that steps as the class does
    spacing: str                    # the class's default `timestep_spacing`
    spaced: bool = True             # False: the class has no spacing option and always steps on `spacing`
    zero_snr: bool = True           # False: the class ignores `rescale_betas_zero_snr` (its betas stay as given)


# diffusers' scheduler classes (0.42) -> the sdlab sampler that steps as each does, with its defaults
SCHEDULER_CLASSES: dict[str, SchedulerClass] = {
    "EulerDiscreteScheduler": SchedulerClass("Euler", "linspace"),
    "EulerAncestralDiscreteScheduler": SchedulerClass("Euler a", "linspace"),
    "HeunDiscreteScheduler": SchedulerClass("Heun", "linspace", zero_snr=False),
    "KDPM2DiscreteScheduler": SchedulerClass("DPM2", "linspace", zero_snr=False),
    "KDPM2AncestralDiscreteScheduler": SchedulerClass("DPM2 a", "linspace", zero_snr=False),
    "LMSDiscreteScheduler": SchedulerClass("LMS", "linspace", zero_snr=False),
    "DPMSolverMultistepScheduler": SchedulerClass("DPM++ 2M", "linspace"),
    "DPMSolverSinglestepScheduler": SchedulerClass("DPM++ 2S", "linspace", spaced=False, zero_snr=False),
    "DPMSolverSDEScheduler": SchedulerClass("DPM++ SDE", "linspace", zero_snr=False),
    "UniPCMultistepScheduler": SchedulerClass("UniPC", "linspace"),
    "DDIMScheduler": SchedulerClass("DDIM", "leading"),
    "PNDMScheduler": SchedulerClass("PLMS", "leading", zero_snr=False),
    "DDPMScheduler": SchedulerClass("DDPM", "leading"),
    "LCMScheduler": SchedulerClass("LCM", "leading"),
    "TCDScheduler": SchedulerClass("TCD", "leading"),
}


@dataclass(frozen=True)
class DiffusersScheduler:
    """What `scheduler_config.json` says, split into the model's schedule and the sampler's settings."""

    prediction_type: str | None                 # "epsilon" / "v_prediction" / "sample", if given
    schedule: ScheduleSpec | None               # the training schedule when it differs from the family's
    sampler: Mapping[str, Any]                  # _class_name, timestep_spacing, steps_offset, ... as written


def _number(config: Mapping[str, Any], key: str, default: float) -> float:
    return check_positive_float(key, config[key]) if config.get(key) is not None else default


def read_scheduler_config(config: Mapping[str, Any], family: ScheduleSpec, path: Path) -> DiffusersScheduler:
    """Split a parsed `scheduler_config.json` (module docstring); `family` fills the keys it leaves out.
    A bad or unsupported value is a CheckpointError naming `path`."""
    try:
        prediction = config.get("prediction_type")
        if prediction is not None and not isinstance(prediction, str):
            raise CheckpointError(f"prediction_type must be a string, got {prediction!r}")
        if config.get("trained_betas") is not None:
            raise CheckpointError(
                "trained_betas (an explicit beta list) is not supported: sdlab builds the schedule from "
                f"beta_schedule ({', '.join(_BETA_SCHEDULES)})")
        kind = config.get("beta_schedule", family.kind)
        if kind not in _BETA_SCHEDULES and kind != family.kind:
            raise CheckpointError(f"beta_schedule {kind!r} is not supported; sdlab builds {', '.join(_BETA_SCHEDULES)}")
        zero_snr = config.get("rescale_betas_zero_snr", False)
        if not isinstance(zero_snr, bool):
            raise CheckpointError(f"rescale_betas_zero_snr must be true or false, got {zero_snr!r}")
        steps = config.get("num_train_timesteps")
        schedule = ScheduleSpec(
            kind=kind,
            num_timesteps=family.num_timesteps if steps is None else check_int("num_train_timesteps", steps, 2),
            beta_start=_number(config, "beta_start", family.beta_start),
            beta_end=_number(config, "beta_end", family.beta_end),
            zero_terminal_snr=zero_snr,
            terminal=ZERO_SNR_TERMINAL_ALPHAS_CUMPROD,       # diffusers' value, so the folder draws as there
        )
        if kind == "squaredcos_cap_v2":                       # the cosine schedule ignores beta_start / beta_end
            schedule = replace(schedule, kind="cosine", beta_start=family.beta_start, beta_end=family.beta_end)
        schedule.build()                                      # beta_end < beta_start, ...: refused here
    except (CheckpointError, ValueError) as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    sampler = {key: config[key] for key in _SAMPLER_KEYS if key in config}
    return DiffusersScheduler(prediction, None if schedule == family else schedule, sampler)


def _spacing(scheduler: DiffusersScheduler) -> str | None:
    """The timestep spacing the folder's scheduler steps on: as written, else its class's default (None: a
    class sdlab does not know, with no spacing written)."""
    known = SCHEDULER_CLASSES.get(scheduler.sampler.get("_class_name"))
    if known is not None and not known.spaced:
        return known.spacing
    return scheduler.sampler.get("timestep_spacing") or (known.spacing if known is not None else None)


def equivalent_settings(scheduler: DiffusersScheduler) -> tuple[str, str] | None:
    """(sampler, schedule) that step as the folder's own scheduler does (`SCHEDULER_CLASSES`); None for a
    class sdlab does not know. DDIM with `set_alpha_to_one` (its default) ends at alpha 1, not at the first
    alpha: that is Euler (DDIM at eta 0) on DDIM's timesteps, schedule ``ddim_<spacing>``."""
    config = scheduler.sampler
    known = SCHEDULER_CLASSES.get(config.get("_class_name"))
    if known is None:
        return None
    spacing = _spacing(scheduler)
    if config.get("_class_name") == "DDIMScheduler" and config.get("set_alpha_to_one", True):
        return "Euler", f"ddim_{spacing}"
    return known.sampler, spacing


def _advice(scheduler: DiffusersScheduler, zero_snr: bool) -> str:
    """What to ask for to draw the folder as diffusers' pipeline draws it with its own scheduler."""
    class_name = scheduler.sampler.get("_class_name")
    settings = equivalent_settings(scheduler)
    if settings is None:
        return "ask for its scheduler's sdlab equivalent (sampler and schedule) to get its picture"
    asked = f"sampler {settings[0]!r}, schedule {settings[1]!r}"
    if zero_snr and not SCHEDULER_CLASSES[class_name].zero_snr:
        return (f"{asked} step as {class_name} does, but diffusers' {class_name} ignores rescale_betas_zero_snr "
                "while sdlab samples the model's zero-SNR schedule, so no setting gives its picture")
    return f"ask for {asked} to get its picture"


def log_scheduler(path: Path, scheduler: DiffusersScheduler) -> None:
    """Say what the folder's schedule is when it is its own, and how to draw with the folder's own scheduler
    when sdlab's default differs from it (trailing spacing: Turbo and zero-SNR folders)."""
    if scheduler.schedule is not None:
        logger.info("%s: the model's own training schedule: %s", path, scheduler.schedule.describe())
    spacing = _spacing(scheduler)
    zero_snr = scheduler.schedule is not None and scheduler.schedule.zero_terminal_snr
    if spacing == "trailing" or zero_snr:
        # a zero-SNR model is trained for a first step at pure noise: warn, as the default schedule is not that
        class_name = scheduler.sampler.get("_class_name", "its scheduler")
        logger.log(
            logging.WARNING if zero_snr else logging.INFO,
            "%s: diffusers draws this folder with %s and %s timestep spacing; sdlab draws with the request's "
            "sampler and schedule (default: the family's): %s",
            path, class_name, spacing or "its default", _advice(scheduler, zero_snr),
        )
