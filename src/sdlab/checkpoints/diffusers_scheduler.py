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
  DPM++ 2M Karras), so these stay sampler settings: the load report lists them and the loader logs how to
  ask for the same steps (`--sampler Euler --schedule trailing` for a Turbo or zero-SNR folder).

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

__all__ = ["DiffusersScheduler", "log_scheduler", "read_scheduler_config"]

# diffusers' beta_schedule names sdlab builds (`sdlab.diffusion.schedules.make_betas`)
_BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")
# sampler settings worth reporting: how diffusers' default scheduler for this folder spaces its steps
_SAMPLER_KEYS = ("_class_name", "timestep_spacing", "steps_offset", "use_karras_sigmas")


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


def log_scheduler(path: Path, scheduler: DiffusersScheduler) -> None:
    """Say what the folder's schedule is when it is its own, and how diffusers' default scheduler spaces its
    steps when that is not what sdlab's default does (trailing spacing: Turbo and zero-SNR folders)."""
    if scheduler.schedule is not None:
        logger.info("%s: the model's own training schedule: %s", path, scheduler.schedule.describe())
    spacing = scheduler.sampler.get("timestep_spacing")
    zero_snr = scheduler.schedule is not None and scheduler.schedule.zero_terminal_snr
    if spacing == "trailing" or zero_snr:
        # a zero-SNR model is trained for a first step at pure noise: warn, as the default schedule is not that
        logger.log(
            logging.WARNING if zero_snr else logging.INFO,
            "%s: diffusers draws this folder with %s and %s timestep spacing; sdlab draws with the request's "
            "sampler and schedule (default: the family's), so ask for them to get its picture (sampler "
            "'Euler', schedule '%s')", path, scheduler.sampler.get("_class_name", "its scheduler"),
            spacing or "linspace", spacing or "linspace",
        )
