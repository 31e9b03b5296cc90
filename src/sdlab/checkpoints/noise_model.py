"""What a model declares beyond its family's DDPM schedule and latent scaling: a continuous EDM noise model
(`EDMSpec`) and per-channel latent statistics (`LatentStats`), read where diffusers and ComfyUI read them.

Continuous EDM noise model (`ModelBundle.noise_model`, sampled by `ContinuousEDMModelSampling`):
  - a diffusers folder whose `scheduler/scheduler_config.json` names an EDM scheduler (`EDMEulerScheduler`,
    `EDMDPMSolverMultistepScheduler`: Playground v2.5): its `sigma_min` / `sigma_max` / `sigma_data` (diffusers'
    defaults 0.002 / 80 / 0.5); `prediction_type` "epsilon" is EDM's F-prediction there, "v_prediction" v;
  - `EulerDiscreteScheduler` with `timestep_type: "continuous"` and v-prediction (CosXL as diffusers draws it:
    the net takes ``ln(sigma) / 4``, sigma_data 1), on its `sigma_min` / `sigma_max` where it gives them, else
    on its betas' sigma range; diffusers ignores `timestep_type` for other predictions, and so does sdlab;
  - a single file: sdlab's `sdlab.noise_model` metadata, else ComfyUI's keys (`supported_models.SDXL.model_type`;
    ComfyUI reads them on SDXL base models only, sdlab on every family as it reads `v_pred`): `edm_mean` +
    `edm_std` make Playground v2.5 (EDM's F-prediction, sigma 0.002..80, sigma_data 0.5), `edm_vpred.sigma_max`
    (+ `edm_vpred.sigma_min`, else 0.002) an EDM v-prediction model with sigma_data 1 (ComfyUI's
    `V_PREDICTION_EDM`).
A folder whose scheduler samples another noise model sdlab does not draw SD-architecture U-Nets with (flow
matching: `FlowMatch*` classes, `shift` / `use_dynamic_shifting`) is refused with one line; an unknown class
that names EDM settings is loaded as its family's DDPM model with a warning naming them.

Latent scaling: a file with `edm_mean` / `edm_std` keys and no `sdlab.scaling_factor` is scaled by Playground
v2.5's 0.5, as ComfyUI scales it (`file_scaling_factor`).

Latent statistics (`ModelBundle.latent_stats`): `vae/config.json` `latents_mean` / `latents_std` of an SDXL
folder, or of a `--vae` override on an SDXL model (`sdlab.checkpoints.single_file.declared_by_vae`): diffusers'
SDXL pipelines use the statistics of the VAE they run, its SD1 / SD2 pipeline never does (`vae_stats_apply`);
a single file's `sdlab.latent_stats` metadata, or the values of ComfyUI's `edm_mean` / `edm_std` keys
(ComfyUI's `SDXL_Playground_2_5` numbers when they hold none).

Saved files carry sdlab's metadata, and ComfyUI's keys where ComfyUI reads this very model from them
(`noise_model_keys`): an SDXL base model that is Playground v2.5 exactly (`PLAYGROUND_EDM`, its statistics and
latent scaling 0.5, which ComfyUI takes whatever `edm_mean` / `edm_std` hold), or an EDM v-prediction one with
sigma_data 1 and no statistics (`edm_vpred.sigma_max` / `sigma_min`). Any other EDM model is saved without
them, with a warning: ComfyUI would read another model from them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.file_format import (
    COMFY_EDM_MEAN_KEY,
    COMFY_EDM_STD_KEY,
    COMFY_EDM_VPRED_MAX_KEY,
    COMFY_EDM_VPRED_MIN_KEY,
    META_NOISE_MODEL,
    latent_stats,
    stored_latent_stats,
    stored_noise_model,
    stored_scaling_factor,
)
from sdlab.checkpoints.validate import check_positive_float
from sdlab.diffusion.prediction import Prediction
from sdlab.families import EDMSpec, FamilySpec, ScheduleSpec
from sdlab.families.latent_format import LatentStats
from sdlab.families.loaded import ModelBundle

logger = logging.getLogger(__name__)

__all__ = ["COMFY_NOISE_MODEL_KEYS", "PLAYGROUND_EDM", "PLAYGROUND_LATENT_STATS", "PLAYGROUND_SCALING_FACTOR",
           "config_latent_stats", "file_latent_stats", "file_noise_model", "file_scaling_factor", "folder_latent_stats",
           "folder_noise_model", "noise_model_keys", "vae_stats_apply"]

COMFY_NOISE_MODEL_KEYS = (COMFY_EDM_MEAN_KEY, COMFY_EDM_STD_KEY, COMFY_EDM_VPRED_MAX_KEY, COMFY_EDM_VPRED_MIN_KEY)
# ComfyUI `supported_models.SDXL.model_type` (edm_mean / edm_std) and `latent_formats.SDXL_Playground_2_5`
# (its statistics and scaling factor)
PLAYGROUND_EDM = EDMSpec(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)
PLAYGROUND_LATENT_STATS = LatentStats(mean=(-1.6574, 1.886, -1.383, 2.5155), std=(8.4927, 5.9022, 6.5498, 5.2299))
PLAYGROUND_SCALING_FACTOR = 0.5
# ComfyUI `ModelSamplingContinuousEDM`'s sigma_min when a file gives only edm_vpred.sigma_max
COMFY_EDM_SIGMA_MIN = 0.002
# diffusers' EDMEulerScheduler / EDMDPMSolverMultistepScheduler defaults
_DIFFUSERS_EDM = EDMSpec(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)
# keys of a scheduler config that only a noise model other than DDPM's uses
_EDM_KEYS = ("sigma_data", "timestep_type")
_FLOW_KEYS = ("shift", "use_dynamic_shifting", "base_shift", "max_shift")


# ----------------------------------------------------------------------------------------------------------
# diffusers folders


def folder_noise_model(config: Mapping[str, Any], schedule: ScheduleSpec, path: Path) -> EDMSpec | None:
    """The continuous EDM noise model a parsed `scheduler_config.json` declares (module docstring), or None for
    a DDPM one; `schedule` is the folder's training schedule (the betas' sigma range). A flow-matching
    scheduler is a CheckpointError naming `path`."""
    class_name = str(config.get("_class_name", ""))
    flow = [key for key in _FLOW_KEYS if config.get(key) not in (None, False)]
    if class_name.startswith("FlowMatch") or flow:
        named = class_name or f"a scheduler with {', '.join(flow)}"
        raise CheckpointError(f"{path}: {named} samples a flow-matching model; sdlab draws SD1 / SD2 / SDXL U-Nets "
                              "on DDPM or continuous EDM noise models only")
    try:
        if class_name.startswith("EDM"):
            return _edm_of(config, _DIFFUSERS_EDM)
        if config.get("timestep_type") == "continuous" and config.get("prediction_type") == "v_prediction":
            betas = schedule.build()
            return _edm_of(config, EDMSpec(betas.sigma_min, betas.sigma_max, 1.0), sigma_data=False)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    named = [key for key in _EDM_KEYS if config.get(key) not in (None, "discrete")]
    if named:
        logger.warning("%s: %s sets %s, which sdlab does not read for that class: drawn as the family's DDPM "
                       "model; the picture may differ from diffusers'", path, class_name or "the scheduler",
                       ", ".join(f"{key}={config[key]!r}" for key in named))
    return None


def _edm_of(config: Mapping[str, Any], default: EDMSpec, *, sigma_data: bool = True) -> EDMSpec:
    """`default` with the config's sigma_min / sigma_max (and sigma_data) where it gives them."""
    def number(key: str, fallback: float) -> float:
        return fallback if config.get(key) is None else check_positive_float(key, config[key])

    spec = EDMSpec(sigma_min=number("sigma_min", default.sigma_min), sigma_max=number("sigma_max", default.sigma_max),
                   sigma_data=number("sigma_data", default.sigma_data) if sigma_data else default.sigma_data)
    try:
        spec.build(Prediction.EPS)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    return spec


def vae_stats_apply(family: FamilySpec, path: Path) -> bool:
    """Whether the latent statistics a VAE declares (`path`: its config, or its file) apply to `family`'s latents:
    where its diffusers pipelines take `vae.config.latents_mean` / `latents_std` (SDXL's base, refiner and
    inpainting pipelines), not SD1 / SD2's, whose pipeline ignores them (logged), however the VAE arrives."""
    if not family.is_sdxl:
        logger.info("%s: latents_mean / latents_std are not used: diffusers' %s ignores them",
                    path, family.diffusers_pipeline)
    return family.is_sdxl


def folder_latent_stats(vae_json: Mapping[str, Any], path: Path, family: FamilySpec) -> LatentStats | None:
    """`latents_mean` / `latents_std` of a VAE's `config.json` (`path`: a folder's `vae/config.json`, a `--vae`
    override's) where they apply (`vae_stats_apply`); both or neither must be set, one number per latent
    channel."""
    mean, std = vae_json.get("latents_mean"), vae_json.get("latents_std")
    if mean is None and std is None or not vae_stats_apply(family, path):
        return None
    return config_latent_stats(mean, std, family.latent_format.channels, path)


def config_latent_stats(mean: Any, std: Any, channels: int, path: Path) -> LatentStats:
    """`LatentStats` from a config's `latents_mean` / `latents_std` for `channels` latent channels; a
    CheckpointError names `path`."""
    try:
        if mean is None or std is None:
            raise ValueError("latents_mean and latents_std go together; only one is set")
        stats = latent_stats(mean, std)
        if len(stats.mean) != channels:
            raise ValueError(f"latents_mean / latents_std need {channels} numbers (one per latent channel), got "
                             f"{len(stats.mean)}")
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return stats


# ----------------------------------------------------------------------------------------------------------
# single files


def file_noise_model(metadata: Mapping[str, str], markers: Mapping[str, Tensor]) -> tuple[EDMSpec | None, str | None]:
    """(the file's continuous EDM noise model or None, where it came from): sdlab's metadata, then ComfyUI's keys
    (`markers`: those of `COMFY_NOISE_MODEL_KEYS` the file holds)."""
    stored = stored_noise_model(metadata)
    if stored is not None:
        return stored, f"metadata {META_NOISE_MODEL}"
    if COMFY_EDM_MEAN_KEY in markers and COMFY_EDM_STD_KEY in markers:
        return PLAYGROUND_EDM, f"{COMFY_EDM_MEAN_KEY} / {COMFY_EDM_STD_KEY} keys (Playground v2.5)"
    if COMFY_EDM_VPRED_MAX_KEY in markers:
        sigma_max = _scalar(markers, COMFY_EDM_VPRED_MAX_KEY)
        sigma_min = _scalar(markers, COMFY_EDM_VPRED_MIN_KEY) if COMFY_EDM_VPRED_MIN_KEY in markers else COMFY_EDM_SIGMA_MIN
        try:
            spec = _edm_of({"sigma_min": sigma_min, "sigma_max": sigma_max}, EDMSpec(), sigma_data=False)
        except CheckpointError as exc:
            raise CheckpointError(f"keys {COMFY_EDM_VPRED_MAX_KEY} / {COMFY_EDM_VPRED_MIN_KEY}: {exc}") from None
        return spec, f"{COMFY_EDM_VPRED_MAX_KEY} key (EDM v-prediction)"
    return None, None


def _scalar(markers: Mapping[str, Tensor], key: str) -> float:
    value = markers[key]
    if value.numel() != 1:
        raise CheckpointError(f"key {key} must hold one number, got shape {tuple(value.shape)}")
    return _decimals(value)[0]


def _decimals(values: Tensor) -> list[float]:
    """A tensor's numbers as the shortest decimals its float32 values round-trip to (a float32 0.002 is read as
    0.002, the number the saver was given, not 0.0020000000949949026)."""
    return [float(str(np.float32(v))) for v in values.reshape(-1).to(torch.float32).tolist()]


def file_latent_stats(metadata: Mapping[str, str], markers: Mapping[str, Tensor], channels: int) -> LatentStats | None:
    """The file's per-channel latent statistics: sdlab's metadata, else the values of ComfyUI's `edm_mean` /
    `edm_std` keys (one number per channel), or ComfyUI's Playground v2.5 numbers where they are markers only."""
    stored = stored_latent_stats(metadata)
    if stored is not None:
        return stored
    if not (COMFY_EDM_MEAN_KEY in markers and COMFY_EDM_STD_KEY in markers):
        return None
    mean, std = (_decimals(markers[key]) for key in (COMFY_EDM_MEAN_KEY, COMFY_EDM_STD_KEY))
    if not mean and not std:
        return PLAYGROUND_LATENT_STATS
    return config_latent_stats(mean, std, channels, Path(f"keys {COMFY_EDM_MEAN_KEY} / {COMFY_EDM_STD_KEY}"))


def file_scaling_factor(metadata: Mapping[str, str], markers: Mapping[str, Tensor], default: float) -> float:
    """The file's latent scaling factor: sdlab's `sdlab.scaling_factor`, else Playground v2.5's 0.5 where ComfyUI's
    `edm_mean` / `edm_std` keys make it that model (ComfyUI's `SDXL_Playground_2_5` latent format), else
    `default` (its family's)."""
    playground = COMFY_EDM_MEAN_KEY in markers and COMFY_EDM_STD_KEY in markers
    return stored_scaling_factor(metadata, PLAYGROUND_SCALING_FACTOR if playground else default)


def noise_model_keys(bundle: ModelBundle) -> dict[str, Tensor]:
    """ComfyUI's keys for `bundle`'s continuous EDM noise model and latent statistics (module docstring), where
    ComfyUI reads this very model from them; else none, with a warning saying why (sdlab's metadata still
    carries the model)."""
    if bundle.noise_model is None:
        return {}
    misread = _comfy_misreading(bundle)
    if misread:
        logger.warning("%s: saved without ComfyUI's EDM keys, from which ComfyUI would read another model (%s); "
                       "sdlab reads it from its metadata (%s)", bundle.source or "the model", misread, META_NOISE_MODEL)
        return {}
    if bundle.prediction is Prediction.V:
        edm = bundle.noise_model
        return {COMFY_EDM_VPRED_MAX_KEY: torch.tensor(edm.sigma_max), COMFY_EDM_VPRED_MIN_KEY: torch.tensor(edm.sigma_min)}
    stats = bundle.latent_stats
    return {COMFY_EDM_MEAN_KEY: torch.tensor(stats.mean).view(1, -1, 1, 1),
            COMFY_EDM_STD_KEY: torch.tensor(stats.std).view(1, -1, 1, 1)}


def _comfy_misreading(bundle: ModelBundle) -> str | None:
    """How ComfyUI's reading of the EDM keys (`supported_models.SDXL.model_type`) would differ from `bundle`'s
    model, or None where it gives the same: `edm_vpred.*` is v-prediction with sigma_data 1 and SDXL's latent
    format, `edm_mean` / `edm_std` is Playground v2.5 whatever the keys hold (`PLAYGROUND_EDM`, its statistics
    and scaling factor 0.5: `latent_formats.SDXL_Playground_2_5`). Only SDXL's base model class reads them."""
    family, edm, stats = bundle.family, bundle.noise_model, bundle.latent_stats
    if not family.is_sdxl or family.is_refiner:
        return f"ComfyUI reads them on SDXL base models only, not on {family.name}"
    if bundle.prediction is Prediction.V:
        if edm.sigma_data != 1.0:
            return f"sigma_data {edm.sigma_data:g}, where its edm_vpred model has 1"
        return "latent statistics, which its edm_vpred model does not apply" if stats is not None else None
    if bundle.prediction is not Prediction.EPS:
        return f"{bundle.prediction.value}-prediction, which no ComfyUI key names"
    if edm != PLAYGROUND_EDM:
        return f"{edm.describe()}, where its edm_mean / edm_std model is Playground v2.5's {PLAYGROUND_EDM.describe()}"
    if stats != PLAYGROUND_LATENT_STATS:
        return (f"latent statistics {stats.describe() if stats else 'none'}, where it takes Playground v2.5's "
                "whatever the keys hold")
    if bundle.scaling_factor != PLAYGROUND_SCALING_FACTOR:
        return f"latent scaling {bundle.scaling_factor:g}, where it takes Playground v2.5's {PLAYGROUND_SCALING_FACTOR:g}"
    return None
