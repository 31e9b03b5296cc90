"""sdlab's checkpoint file format: the safetensors `__metadata__` keys sdlab writes and reads, and their
(de)serialisers.

A whole model (`save_bundle`) records the format version, family, prediction type, latent scaling factor,
every network's config as JSON (`sdlab.config`) and the hidden state each text encoder feeds the U-Net; the
square side it was trained at goes in Stability's model-spec key `modelspec.resolution`, an eps or v prediction
also in `modelspec.prediction_type` (Stability's model spec, as kohya writes it) and `modelspec.predict_key`
(ComfyUI's checkpoint saver). What a model declares beyond its family goes along: its own training schedule
(`sdlab.schedule`), continuous EDM noise model (`sdlab.noise_model`), per-channel latent statistics
(`sdlab.latent_stats`) and a diffusers folder's `steps_offset` other than 1 (`sdlab.steps_offset`). Single networks
written by training (`sdlab train --task vae`, the sdlab-tiny text task) record which network they hold
(`sdlab.component`), which weights (`sdlab.weights`: "raw" or "ema") and their own config; U-Net training
checkpoints record the family and whether the weights are the EMA ones (`sdlab.ema`).

Readers here type-check what they find and raise `CheckpointError` naming the key.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any, TypeVar

from sdlab.checkpoints.components import ComponentConfig
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.validate import check_int, config_from_json
from sdlab.diffusion.prediction import Prediction
from sdlab.families import EDMSpec, FamilySpec, ScheduleSpec
from sdlab.families.base import HIDDEN_STATES
from sdlab.families.latent_format import LatentStats
from sdlab.families.loaded import ModelBundle
from sdlab.models.clip import CLIPTextConfig
from sdlab.models.unet import UNetConfig
from sdlab.models.vae import VAEConfig

# whole models (`bundle_metadata`)
META_FORMAT = "sdlab.format"
META_FAMILY = "sdlab.family"
META_PREDICTION = "sdlab.prediction"
META_SCALING = "sdlab.scaling_factor"
META_CONFIG = "sdlab.config"
META_HIDDEN_STATES = "sdlab.text_hidden_states"
META_RESOLUTION = "modelspec.resolution"    # Stability's model spec: "WxH" the model was trained at
META_MODELSPEC_PREDICTION = "modelspec.prediction_type"  # Stability's model spec: "epsilon" or "v"
META_COMFY_PREDICTION = "modelspec.predict_key"         # ComfyUI's `save_checkpoint`: "epsilon" or "v"
COMFY_V_PRED_KEY = "v_pred"     # ComfyUI's empty marker tensors (`save_checkpoint`): a v-prediction model,
COMFY_ZTSNR_KEY = "ztsnr"       # and one on the zero-terminal-SNR schedule
META_SCHEDULE = "sdlab.schedule"            # the model's own training schedule (JSON `ScheduleSpec`), if not
                                            # its family's
META_NOISE_MODEL = "sdlab.noise_model"      # a continuous EDM noise model (JSON `EDMSpec`), if the model has one
META_LATENT_STATS = "sdlab.latent_stats"    # per-channel latents mean / std (JSON `LatentStats`), if it has them
META_STEPS_OFFSET = "sdlab.steps_offset"    # what diffusers' leading spacing adds to its timesteps, if not 1 (a
                                            # diffusers folder's whose pipeline keeps it)
COMFY_EDM_MEAN_KEY = "edm_mean"             # ComfyUI (`supported_models.SDXL.model_type`): both keys make a
COMFY_EDM_STD_KEY = "edm_std"               # Playground v2.5 EDM model with its latent statistics,
COMFY_EDM_VPRED_MAX_KEY = "edm_vpred.sigma_max"  # these (scalars) an EDM v-prediction model (CosXL), as
COMFY_EDM_VPRED_MIN_KEY = "edm_vpred.sigma_min"  # ComfyUI's checkpoint saver writes them
FORMAT_VERSION = "1"

# single networks and training checkpoints
META_COMPONENT = "sdlab.component"          # "vae", "text_encoder", "image_tower"
META_WEIGHTS = "sdlab.weights"              # "raw" or "ema"
META_EMA = "sdlab.ema"                      # U-Net training checkpoints: "True" / "False"
META_PRESET = "sdlab.preset"                # the few-step preset a distilled model is drawn with ("lcm", ...)
META_LOGIT_SCALE = "sdlab.logit_scale"      # sdlab-tiny image tower: the contrastive logit scale


# ----------------------------------------------------------------------------------------------------------
# Writing


def config_to_json(cfg: ComponentConfig) -> dict[str, Any]:
    """A config's fields as JSON values. A field added after files were first written (``saved_when_set`` in
    its metadata) is left out at its default, so a file that uses no newer feature loads in the sdlab versions
    before it (which refuse fields they do not know); reading it back takes the default."""
    values = {f.name: getattr(cfg, f.name) for f in fields(cfg)
              if not (f.metadata.get("saved_when_set") and getattr(cfg, f.name) == f.default)}
    return {name: list(v) if isinstance(v, tuple) else v for name, v in values.items()}


# the prediction types the model spec names (it has no name for x0)
_MODELSPEC_PREDICTIONS = {Prediction.EPS: "epsilon", Prediction.V: "v"}


def modelspec_prediction(prediction: Prediction) -> str | None:
    """The model spec's name of `prediction` ("epsilon" / "v"); None for x0, which it does not name."""
    return _MODELSPEC_PREDICTIONS.get(prediction)


def prediction_metadata(prediction: Prediction) -> dict[str, str]:
    """The model-spec prediction keys other tools read (kohya / Stability's and ComfyUI's), empty for x0."""
    name = modelspec_prediction(prediction)
    return {META_MODELSPEC_PREDICTION: name, META_COMFY_PREDICTION: name} if name else {}


def _json_entry(key: str, spec: ScheduleSpec | EDMSpec | LatentStats | None) -> dict[str, str]:
    """{key: spec as JSON}, or nothing without a spec."""
    return {} if spec is None else {key: json.dumps(config_to_json(spec), sort_keys=True)}


def bundle_metadata(bundle: ModelBundle) -> dict[str, str]:
    """The `__metadata__` sdlab writes: format version, family, prediction (also in the model-spec keys),
    scaling factor, configs, the hidden state each text encoder feeds the U-Net, and what the model declares
    beyond its family (module docstring)."""
    configs = {
        "unet": config_to_json(bundle.unet_config),
        "vae": config_to_json(bundle.vae_config),
        "text_encoders": [config_to_json(te.config) for te in bundle.text_encoders],
    }
    native = {META_RESOLUTION: f"{bundle.native_size}x{bundle.native_size}"} if bundle.native_size else {}
    preset = {META_PRESET: bundle.preset} if bundle.preset else {}
    own_schedule = bundle.schedule if bundle.schedule != bundle.family.schedule else None
    return {
        **native,
        **preset,
        **_json_entry(META_SCHEDULE, own_schedule),
        **_json_entry(META_NOISE_MODEL, bundle.noise_model),
        **_json_entry(META_LATENT_STATS, bundle.latent_stats),
        **({META_STEPS_OFFSET: str(bundle.steps_offset)} if bundle.steps_offset != 1 else {}),
        **prediction_metadata(bundle.prediction),
        META_FORMAT: FORMAT_VERSION,
        META_FAMILY: bundle.family.name,
        META_PREDICTION: bundle.prediction.value,
        META_SCALING: repr(float(bundle.scaling_factor)),
        META_CONFIG: json.dumps(configs, sort_keys=True),
        META_HIDDEN_STATES: json.dumps([te.spec.hidden_state for te in bundle.text_encoders]),
    }


# ----------------------------------------------------------------------------------------------------------
# Reading


def config_json(metadata: Mapping[str, str]) -> Any:
    """The parsed JSON of `sdlab.config` (the caller checks the key is there)."""
    try:
        return json.loads(metadata[META_CONFIG])
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"metadata {META_CONFIG} is not JSON: {exc}") from None


def stored_configs(metadata: Mapping[str, str], spec: FamilySpec) -> dict[str, Any] | None:
    """The configs sdlab's saver stored for a whole model (`bundle_metadata`), type-checked, or None."""
    if META_CONFIG not in metadata:
        return None
    data = config_json(metadata)
    try:
        if not isinstance(data, dict):
            raise CheckpointError(f"expected a JSON object, got {type(data).__name__}")
        missing = [k for k in ("unet", "vae", "text_encoders") if k not in data]
        if missing:
            raise CheckpointError(f"no {', '.join(missing)} entry")
        texts = data["text_encoders"]
        if not isinstance(texts, list) or len(texts) != len(spec.text_encoders):
            raise CheckpointError(
                f"text_encoders: {spec.name} has {len(spec.text_encoders)} text encoder(s), the metadata lists "
                f"{len(texts) if isinstance(texts, list) else repr(texts)}"
            )
        return {
            "unet": config_from_json(UNetConfig, data["unet"]),
            "vae": config_from_json(VAEConfig, data["vae"]),
            "text_encoders": [config_from_json(CLIPTextConfig, t) for t in texts],
        }
    except CheckpointError as exc:
        raise CheckpointError(f"metadata {META_CONFIG}: {exc}") from None


def stored_vae_config(metadata: Mapping[str, str]) -> VAEConfig | None:
    """The `VAEConfig` in a standalone VAE file's metadata: the flat config `sdlab train --task vae` writes, or
    the `vae` entry of a whole model's config."""
    if META_CONFIG not in metadata:
        return None
    data = config_json(metadata)
    if isinstance(data, dict) and isinstance(data.get("vae"), dict):
        data = data["vae"]
    try:
        return config_from_json(VAEConfig, data)
    except CheckpointError as exc:
        raise CheckpointError(f"metadata {META_CONFIG}: {exc}") from None


def stored_scaling_factor(metadata: Mapping[str, str], default: float) -> float:
    """`sdlab.scaling_factor` as a number, or `default` without one."""
    raw = metadata.get(META_SCALING)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise CheckpointError(f"metadata {META_SCALING}={raw!r}: expected a number") from None


def stored_hidden_states(metadata: Mapping[str, str], count: int) -> list[str] | None:
    """Which hidden state each text encoder feeds the U-Net, when sdlab's saver recorded it (it differs from the
    family default only for towers that came truncated from a diffusers SD2 folder)."""
    raw = metadata.get(META_HIDDEN_STATES)
    if raw is None:
        return None
    try:
        states = json.loads(raw)
    except ValueError:
        states = None
    if not isinstance(states, list) or len(states) != count or any(s not in HIDDEN_STATES for s in states):
        raise CheckpointError(f"metadata {META_HIDDEN_STATES}={raw!r}: expected {count} of {', '.join(HIDDEN_STATES)}")
    return states


T = TypeVar("T")


def _stored_json(metadata: Mapping[str, str], key: str, parse: Callable[[Any], T]) -> T | None:
    """`parse` of the JSON value sdlab's saver wrote under `key`, or None without the key; a value that is not
    JSON or that `parse` refuses (ValueError, CheckpointError) is a CheckpointError naming the key."""
    raw = metadata.get(key)
    if raw is None:
        return None
    try:
        return parse(json.loads(raw))
    except (ValueError, RecursionError, CheckpointError) as exc:
        raise CheckpointError(f"metadata {key}={raw[:200]!r}: {exc}") from None


def _schedule(data: Any) -> ScheduleSpec:
    schedule = config_from_json(ScheduleSpec, data)
    schedule.build()                                        # an unknown kind, terminal >= 1, ...
    return schedule


def _noise_model(data: Any) -> EDMSpec:
    spec = config_from_json(EDMSpec, data)
    spec.build("eps")                                       # sigma_min below sigma_max
    return spec


def _latent_stats(data: Any) -> LatentStats:
    if not isinstance(data, dict) or set(data) != {"mean", "std"}:
        raise ValueError("expected an object with mean and std")
    return latent_stats(data["mean"], data["std"])


def stored_schedule(metadata: Mapping[str, str]) -> ScheduleSpec | None:
    """The training schedule sdlab's saver recorded for a model that has its own (`sdlab.schedule`), or None."""
    return _stored_json(metadata, META_SCHEDULE, _schedule)


def stored_noise_model(metadata: Mapping[str, str]) -> EDMSpec | None:
    """The continuous EDM noise model sdlab's saver recorded (`sdlab.noise_model`), or None."""
    return _stored_json(metadata, META_NOISE_MODEL, _noise_model)


def stored_latent_stats(metadata: Mapping[str, str]) -> LatentStats | None:
    """The per-channel latent statistics sdlab's saver recorded (`sdlab.latent_stats`), or None."""
    return _stored_json(metadata, META_LATENT_STATS, _latent_stats)


def stored_steps_offset(metadata: Mapping[str, str]) -> int:
    """The `steps_offset` sdlab's saver recorded for a model whose own is not 1 (`sdlab.steps_offset`), else 1."""
    offset = _stored_json(metadata, META_STEPS_OFFSET, lambda value: check_int("steps_offset", value, 0))
    return 1 if offset is None else offset


def latent_stats(mean: Any, std: Any) -> LatentStats:
    """`LatentStats` from two lists of numbers (a JSON config's or a tensor's); a ValueError says what is wrong."""
    def numbers(name: str, values: Any) -> tuple[float, ...]:
        if not isinstance(values, (list, tuple)) or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
            raise ValueError(f"latents_{name} must be a list of numbers, got {str(values)[:80]}")
        return tuple(float(v) for v in values)

    return LatentStats(numbers("mean", mean), numbers("std", std))


def named_preset(metadata: Mapping[str, str]) -> str | None:
    """The preset name a file's `sdlab.preset` gives (lower case), or None without one; the pipeline checks
    the name when it draws."""
    name = str(metadata.get(META_PRESET, "")).strip().lower()
    return name if re.fullmatch(r"[a-z0-9_-]{1,32}", name) else None


def native_size(metadata: Mapping[str, str]) -> int | None:
    """The square side of the metadata's `modelspec.resolution` ("64x64"), or None without a usable one."""
    match = re.fullmatch(r"\s*(\d{1,5})\s*x\s*(\d{1,5})\s*", str(metadata.get(META_RESOLUTION, "")))
    if not match or match.group(1) != match.group(2) or not 8 <= int(match.group(1)) <= 8192:
        return None
    return int(match.group(1))


__all__ = [
    "COMFY_EDM_VPRED_MIN_KEY",
    "COMFY_EDM_VPRED_MAX_KEY",
    "COMFY_EDM_STD_KEY",
    "COMFY_EDM_MEAN_KEY",
    "COMFY_V_PRED_KEY",
    "COMFY_ZTSNR_KEY",
    "FORMAT_VERSION",
    "META_COMFY_PREDICTION",
    "META_COMPONENT",
    "META_CONFIG",
    "META_EMA",
    "META_FAMILY",
    "META_FORMAT",
    "META_HIDDEN_STATES",
    "META_LATENT_STATS",
    "META_LOGIT_SCALE",
    "META_MODELSPEC_PREDICTION",
    "META_NOISE_MODEL",
    "META_PREDICTION",
    "META_PRESET",
    "META_RESOLUTION",
    "META_SCALING",
    "META_SCHEDULE",
    "META_STEPS_OFFSET",
    "META_WEIGHTS",
    "bundle_metadata",
    "config_from_json",
    "config_json",
    "config_to_json",
    "latent_stats",
    "named_preset",
    "native_size",
    "prediction_metadata",
    "stored_configs",
    "stored_hidden_states",
    "stored_latent_stats",
    "stored_noise_model",
    "stored_scaling_factor",
    "stored_schedule",
    "stored_steps_offset",
    "stored_vae_config",
]
