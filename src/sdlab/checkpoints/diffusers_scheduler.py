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
  zero-SNR folder (trailing spacing) the loader logs the request settings that step as the folder's
  scheduler does (`equivalent_settings`: the class's sampler, `SCHEDULER_CLASSES`, on its spacing, changed
  by its other settings: `use_karras_sigmas` on DPMSolverMultistepScheduler is `schedule="karras",
  init_noise="vp", quantize_timesteps=True`, TCDScheduler draws at the pipelines' eta 0, ...), or, where
  the class has a setting no sdlab setting reproduces (`thresholding`, `algorithm_type="sde-dpmsolver++"`,
  ...), says so and names it. The settings are read as diffusers' pipeline runs them: its SD1 / SD2
  pipelines set `steps_offset` 1 and `clip_sample` false as they load a folder, SDXL's keep both. That
  `steps_offset` is the model's (`spacing_offset`, `ModelBundle.steps_offset`): sdlab's diffusers-spaced
  schedules (`leading`, ...) count from it, as that pipeline's scheduler does.

A key the config leaves out takes the family's value (every released folder writes all of them).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.validate import check_int, check_positive_float
from sdlab.diffusion.samplers import get_sampler
from sdlab.diffusion.schedules import ZERO_SNR_TERMINAL_ALPHAS_CUMPROD
from sdlab.families import ScheduleSpec

logger = logging.getLogger(__name__)

__all__ = ["SCHEDULER_CLASSES", "DiffusersScheduler", "Equivalent", "SchedulerClass", "Setting", "equivalent_settings",
           "log_scheduler", "read_scheduler_config", "spacing_offset"]

# diffusers' beta_schedule names sdlab builds (`sdlab.diffusion.schedules.make_betas`)
_BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")


@dataclass(frozen=True)
class Setting:
    """One setting of a scheduler class that changes its picture: its default in diffusers, and each value
    sdlab reproduces with the request settings that draw it (a value not listed: no sdlab setting does)."""

    name: str
    default: Any
    values: tuple[tuple[Any, Mapping[str, Any]], ...]

    def request(self, value: Any) -> Mapping[str, Any] | None:
        """The request settings that draw `value` (on top of the class's), or None where none does."""
        return next((request for known, request in self.values if known == value), None)


def _only(name: str, default: Any) -> Setting:
    """A setting sdlab steps with at its default value alone."""
    return Setting(name, default, ((default, {}),))


@dataclass(frozen=True)
class SchedulerClass:
    """How sdlab steps as one diffusers scheduler class does."""

    sampler: str                    # the sdlab sampler (`sdlab.diffusion.samplers`) that steps as the class does
    spacing: str                    # the class's default `timestep_spacing`
    spaced: bool = True             # False: the class has no spacing option and always steps on `spacing`
    zero_snr: bool = True           # False: the class ignores `rescale_betas_zero_snr` (its betas stay as given)
    settings: tuple[Setting, ...] = ()   # its other settings that change the picture
    ramp: str | None = None         # its use_karras_sigmas / _exponential_ / _beta_ ramp spans "model": the model's
                                    # sigma range, timesteps rounded, VP start (DPM-Solver, UniPC); "spacing": the
                                    # spaced sigmas' (Euler's family; the model's range on linspace spacing)
    request: Mapping[str, Any] = field(default_factory=dict)   # request settings besides sampler and schedule
    unmatched: str | None = None    # why no sdlab setting draws its picture at all
    mixes_v: bool = False           # True: its multistep formula mixes a v-prediction model's outputs as they are,
                                    # where sdlab's sampler mixes noise predictions (PNDM)


_THRESHOLDING = _only("thresholding", False)
_CLIP_SAMPLE = Setting("clip_sample", True, ((False, {}),))      # DDIM's / DDPM's default clips x0 to [-1, 1]
_NO_CLIP_SAMPLE = _only("clip_sample", False)
_FINAL_ZERO = _only("final_sigmas_type", "zero")                 # "sigma_min" ends one level above sdlab's 0
_NO_FLOW = _only("use_flow_sigmas", False)
_LCM = (_NO_CLIP_SAMPLE, _THRESHOLDING, _only("original_inference_steps", 50), _only("timestep_scaling", 10.0))
_DPM = (_only("solver_order", 2), _only("algorithm_type", "dpmsolver++"), _THRESHOLDING, _FINAL_ZERO, _NO_FLOW)

# diffusers' scheduler classes (0.42) -> the sdlab sampler that steps as each does, with its defaults
SCHEDULER_CLASSES: dict[str, SchedulerClass] = {
    "EulerDiscreteScheduler": SchedulerClass(
        "Euler", "linspace", ramp="spacing", settings=(_only("interpolation_type", "linear"), _FINAL_ZERO)),
    "EulerAncestralDiscreteScheduler": SchedulerClass("Euler a", "linspace"),
    "HeunDiscreteScheduler": SchedulerClass("Heun", "linspace", zero_snr=False, ramp="spacing",
                                            settings=(_NO_CLIP_SAMPLE,)),
    "KDPM2DiscreteScheduler": SchedulerClass("DPM2", "linspace", zero_snr=False, ramp="spacing"),
    "KDPM2AncestralDiscreteScheduler": SchedulerClass("DPM2 a", "linspace", zero_snr=False, ramp="spacing"),
    "LMSDiscreteScheduler": SchedulerClass("LMS", "linspace", zero_snr=False, ramp="spacing"),
    "DPMSolverMultistepScheduler": SchedulerClass("DPM++ 2M", "linspace", ramp="model", settings=(
        *_DPM, _only("use_lu_lambdas", False),
        Setting("solver_type", "midpoint", (("midpoint", {}), ("heun", {"sampler": "DPM++ 2M SDE Heun", "eta": 0.0}))),
    )),
    "DPMSolverSinglestepScheduler": SchedulerClass("DPM++ 2S", "linspace", spaced=False, zero_snr=False, ramp="model",
                                                   settings=(*_DPM, _only("solver_type", "midpoint"))),
    "DPMSolverSDEScheduler": SchedulerClass(
        "DPM++ SDE", "linspace", zero_snr=False, ramp="spacing",
        unmatched="DPMSolverSDEScheduler seeds its Brownian noise with noise_sampler_seed or torch's global random "
                  "state, sdlab's DPM++ SDE with the picture's seed"),
    "UniPCMultistepScheduler": SchedulerClass("UniPC", "linspace", ramp="model", settings=(
        _only("solver_order", 2), _only("solver_type", "bh2"), _only("predict_x0", True),
        _only("lower_order_final", True), _only("disable_corrector", []), _only("solver_p", None), _THRESHOLDING,
        _FINAL_ZERO, _NO_FLOW,
    )),
    "DDIMScheduler": SchedulerClass("DDIM", "leading", settings=(
        _CLIP_SAMPLE, _THRESHOLDING,
        # alpha 1 after the last step, not the first alpha: Euler (DDIM at eta 0) on DDIM's timesteps
        Setting("set_alpha_to_one", True, ((True, {"sampler": "Euler", "schedule": "ddim_{spacing}"}), (False, {}))),
    )),
    "PNDMScheduler": SchedulerClass("PLMS", "leading", zero_snr=False, mixes_v=True, settings=(
        Setting("skip_prk_steps", False, ((True, {}),)), _only("set_alpha_to_one", False))),
    "DDPMScheduler": SchedulerClass("DDPM", "leading", settings=(
        _CLIP_SAMPLE, _THRESHOLDING,
        Setting("variance_type", "fixed_small", (("fixed_small", {}), ("fixed_small_log", {}))),
    )),
    "LCMScheduler": SchedulerClass("LCM", "leading", settings=_LCM),
    # the pipelines pass their eta (0.0) to a step that takes one: TCD's gamma
    "TCDScheduler": SchedulerClass("TCD", "leading", settings=_LCM, request={"eta": 0.0}),
}

# use_karras_sigmas, ... -> the schedule of that ramp over the model's sigma range
_RAMPS = {"use_karras_sigmas": "karras", "use_exponential_sigmas": "exponential", "use_beta_sigmas": "a1111_beta"}
# sampler settings worth reporting: how diffusers' default scheduler for this folder steps
_SAMPLER_KEYS = ("_class_name", "timestep_spacing", "steps_offset", *_RAMPS, *dict.fromkeys(
    s.name for known in SCHEDULER_CLASSES.values() for s in known.settings))
# diffusers' SD1 / SD2 pipelines rewrite two settings as they load a folder (a deprecation fix-up); SDXL's keep them
_PIPELINE_RESETS = {"steps_offset": 1, "clip_sample": False}
_RESETTING_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")


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


@dataclass(frozen=True)
class Equivalent:
    """The request settings that step as a folder's scheduler does, and what of it none reproduces."""

    request: Mapping[str, Any]      # sampler, schedule; eta, init_noise, quantize_timesteps where they differ
    unmatched: tuple[str, ...]      # why they do not give its picture (empty: they do)


def _as_pipeline_runs(sampler: Mapping[str, Any], pipeline: str | None) -> Mapping[str, Any]:
    """The scheduler settings as diffusers' pipeline class `pipeline` (model_index.json `_class_name`) runs them."""
    return {**sampler, **_PIPELINE_RESETS} if pipeline in _RESETTING_PIPELINES else sampler


def spacing_offset(scheduler: DiffusersScheduler, pipeline: str | None, path: Path) -> int:
    """The `steps_offset` diffusers' pipeline class `pipeline` adds to the folder's leading-spaced timesteps: the
    config's, as that pipeline runs it (SD1 / SD2's: 1); without one, the family's (1)."""
    try:
        return check_int("steps_offset", _as_pipeline_runs(scheduler.sampler, pipeline).get("steps_offset", 1), 0)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def _ramp(known: SchedulerClass, config: Mapping[str, Any], spacing: str | None
          ) -> tuple[Mapping[str, Any], str | None]:
    """(request settings, or why none draws it) for the class's sigma ramp option, if one is on."""
    key = next((key for key in _RAMPS if config.get(key)), None)
    if key is None or known.ramp is None:
        return {}, None
    name = _RAMPS[key]
    if known.ramp == "model":
        return {"schedule": name, "init_noise": "vp", "quantize_timesteps": True}, None
    if spacing == "linspace":                          # sigma(T - 1) .. sigma(0): the model's range
        if get_sampler(known.sampler).discard_penultimate:
            return {}, f"sdlab's {known.sampler} drops the next-to-last sigma of a {name} schedule"
        return {"schedule": name}, None
    if spacing == "leading" and name != "a1111_beta":
        return {"schedule": f"diffusers_{name}"}, None
    return {}, f"sdlab has no {key} on {spacing} spacing"


def equivalent_settings(scheduler: DiffusersScheduler, pipeline: str | None = None) -> Equivalent | None:
    """The request settings that step as the folder's own scheduler does in diffusers' pipeline `pipeline`:
    the class's sampler (`SCHEDULER_CLASSES`) on its spacing, changed by each of its settings; None for a class
    sdlab does not know."""
    config = _as_pipeline_runs(scheduler.sampler, pipeline)
    class_name = config.get("_class_name")
    known = SCHEDULER_CLASSES.get(class_name)
    if known is None:
        return None
    spacing = _spacing(scheduler)
    request: dict[str, Any] = {"sampler": known.sampler, "schedule": spacing, **known.request}
    unmatched = [known.unmatched] if known.unmatched else []
    if scheduler.schedule is not None and scheduler.schedule.zero_terminal_snr and not known.zero_snr:
        unmatched.append(f"diffusers' {class_name} ignores rescale_betas_zero_snr while sdlab samples the model's "
                         "zero-SNR schedule")
    if known.mixes_v and scheduler.prediction_type == "v_prediction":
        unmatched.append(f"diffusers' {class_name} mixes the model's v outputs of several steps, sdlab's "
                         f"{known.sampler} its noise predictions")
    for setting in known.settings:
        value = config.get(setting.name, setting.default)
        changes = setting.request(value)
        if changes is None:
            unmatched.append(f"sdlab has no {setting.name} {value!r}")
        request.update(changes or {})
    changes, why = _ramp(known, config, spacing)
    request.update(changes)
    unmatched += [why] if why else []
    request["schedule"] = request["schedule"].format(spacing=spacing)
    return Equivalent(request, tuple(unmatched))


def _advice(scheduler: DiffusersScheduler, pipeline: str | None) -> str:
    """What to ask for to draw the folder as diffusers' pipeline draws it with its own scheduler."""
    equivalent = equivalent_settings(scheduler, pipeline)
    if equivalent is None:
        return "ask for its scheduler's sdlab equivalent (sampler and schedule) to get its picture"
    asked = ", ".join(f"{key} {value!r}" for key, value in equivalent.request.items())
    if not equivalent.unmatched:
        return f"ask for {asked} to get its picture"
    return f"no setting gives its picture: {'; '.join(equivalent.unmatched)}; {asked} step as it does otherwise"


def log_scheduler(path: Path, scheduler: DiffusersScheduler, pipeline: str | None = None) -> None:
    """Say what the folder's schedule is when it is its own, and how to draw with the folder's own scheduler in
    diffusers' pipeline class `pipeline` when sdlab's default differs from it (trailing spacing: Turbo and
    zero-SNR folders)."""
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
            path, class_name, spacing or "its default", _advice(scheduler, pipeline),
        )
