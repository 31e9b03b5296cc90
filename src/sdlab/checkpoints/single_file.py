"""Original single-file checkpoints (`.safetensors` / `.ckpt`, every network under its prefix) and standalone
VAE files, opened as components ready to plan (the counterpart of `diffusers_folder.py` for folders).

`read_single_file` detects the family (the argument, else the file's `sdlab.family`, else the tensors),
splits the keys into the family's components by their prefixes (`FamilySpec.components`), infers every config (or takes the one sdlab's saver stored in the
metadata, confirmed against the tensors) and refuses keys that belong to no component and are not known
junk (text towers under the prefixes the file uses: `FamilySpec.text_layouts`, as SD2 saved by SGM code
keeps OpenCLIP-H under `conditioner.embedders.0.model.`). A text tower one layer short of the family's (SD2 written from a diffusers folder) is read as
diffusers reads it. `load_vae_source` opens a standalone VAE (bare LDM keys, `first_stage_model.*`,
diffusers names, or a diffusers VAE folder). Prediction type and scaling factor are resolved by the caller
(`load.py`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from sdlab.checkpoints import diffusers_folder
from sdlab.checkpoints.components import ComponentSource, SubStateDict, hf_text_to_sdlab, meta_view
from sdlab.checkpoints.detect import NoUNetError, detect_family
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.file_format import (
    META_CONFIG,
    META_FAMILY,
    stored_configs,
    stored_latent_stats,
    stored_scaling_factor,
    stored_hidden_states,
    stored_vae_config,
)
from sdlab.checkpoints.infer import infer_text_config, infer_unet_config, infer_vae_config
from sdlab.checkpoints.io import read_checkpoint, shapes_of
from sdlab.checkpoints.noise_model import COMFY_NOISE_MODEL_KEYS, folder_latent_stats, vae_stats_apply
from sdlab.checkpoints.openclip import openclip_to_sdlab
from sdlab.checkpoints.other_kinds import not_a_model
from sdlab.checkpoints.tolerated import (
    OPENCLIP_TOLERATED,
    SINGLE_FILE_TOLERATED,
    TRAINING_PARTS,
    VAE_FILE_TOLERATED,
    is_hf_text_tolerated,
)
from sdlab.checkpoints.validate import (
    TEXT_SHAPE_FIELDS,
    VAE_SHAPE_FIELDS,
    check_buildable,
    check_declared,
    check_positive_float,
    unet_shape_fields,
)
from sdlab.families import FamilySpec, TextEncoderSpec
from sdlab.families.base import UNET_PREFIX
from sdlab.models.clip import CLIPTextConfig
from sdlab.models.vae import AutoencoderKL, VAEConfig, normalize_vae_attention_shapes

logger = logging.getLogger(__name__)

VAE_FILE_PREFIX = "first_stage_model."

# U-Net keys some converters leave under their diffusers name -> sdlab's: diffusers' convert_diffusers_to_original
# script keeps an LCM model's guidance projection as `time_embedding.cond_proj.weight`
_UNET_ALIASES = {"time_embedding.cond_proj.weight": "time_embed.cond_proj.weight"}

# text-tower key layout -> (file names -> sdlab names, file keys known to be unused)
_TEXT_LAYOUTS: dict[str, tuple[Callable[[Mapping[str, Tensor]], dict[str, Tensor]], Callable[[str], bool]]] = {
    "hf": (hf_text_to_sdlab, is_hf_text_tolerated),
    "openclip": (openclip_to_sdlab, lambda key: key in OPENCLIP_TOLERATED),
}


@dataclass(frozen=True)
class SingleFile:
    """The components of a single-file checkpoint, checked for presence and ready to plan."""

    path: Path
    family: FamilySpec
    family_source: str                      # "argument", "metadata sdlab.family", "detected"
    unet: ComponentSource
    vae: ComponentSource | None             # None: the file has none, read with need_vae False (`missing_vae`)
    text_encoders: tuple[tuple[TextEncoderSpec, ComponentSource], ...]
    metadata: Mapping[str, str]
    shapes: Mapping[str, Any]               # every key of the file -> its shape
    total_keys: int
    ignored: tuple[str, ...]                # file keys outside every component, known to be unused
    markers: Mapping[str, Tensor] = field(default_factory=dict)  # ComfyUI's EDM keys it holds (`noise_model`)
    schedule_buffers: Mapping[str, Tensor] = field(default_factory=dict)  # its LDM `alphas_cumprod` / `betas`
    missing_vae: str | None = None          # why `vae` is None ("no key starting with first_stage_model.")


def _confirmed(stored: Any, found: Any, shape_fields: tuple[str, ...]) -> Any:
    """`stored` when the tensors confirm every field they show (else `found`, the inferred config), checked to
    make a buildable network: nothing is built from a declaration the weights do not back."""
    config = found
    try:
        if stored is not None:
            check_declared(stored, found, shape_fields)
            config = stored
        check_buildable(config)
    except CheckpointError as exc:
        where = f"metadata {META_CONFIG}" if stored is not None else "inferred from the tensors"
        raise CheckpointError(f"{where}: {exc}") from None
    return config


def _text_source(spec: TextEncoderSpec, build: Callable[[CLIPTextConfig], nn.Module], origin: str,
                 state: Mapping[str, Tensor], keys: list[str], stored: CLIPTextConfig | None) -> ComponentSource:
    local = {k[len(spec.prefix):]: k for k in keys}
    convert, is_tolerated = _TEXT_LAYOUTS[spec.layout]
    tolerated = {k for k in local if is_tolerated(k)}
    sub = SubStateDict(state, {k: f for k, f in local.items() if k not in tolerated})
    try:
        sdlab_shapes = convert(meta_view(sub))
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{origin}: {spec.name}: {exc}") from None
    config = _confirmed(stored, infer_text_config(sdlab_shapes, spec.config), TEXT_SHAPE_FIELDS)
    return ComponentSource(
        name=spec.name, build=build, origin=origin, state=sub, to_sdlab=convert, config=config,
        ignored=tuple(sorted(local[k] for k in tolerated)),
    )


def _text_prefixes(family: FamilySpec, shapes: Mapping[str, Any]) -> dict[str, str]:
    """Text encoder name -> the prefix this file keeps it under: the first of the family's `text_layouts`
    whose every prefix holds keys (the family's own when none does)."""
    found = {p for layout in family.text_layouts for p in layout if any(k.startswith(p) for k in shapes)}
    layout = next((lay for lay in family.text_layouts if set(lay) <= found), family.text_layouts[0])
    return {te.name: prefix for te, prefix in zip(family.text_encoders, layout)}


def _hidden_state_for_layers(te: TextEncoderSpec, layers: int) -> TextEncoderSpec:
    """`te` for a tower of `layers` layers. One that lacks the family's last layer is a tower from a diffusers
    folder (diffusers' convert_diffusers_to_original_stable_diffusion.py writes SD2's 23 of OpenCLIP-H's 24)
    and is read as diffusers reads it (`read_as_diffusers`): the final-norm output of all 23 is SD2's
    conditioning, as diffusers' from_single_file (`last_hidden_state`), A1111 and ComfyUI (their 24-layer
    towers run to the penultimate layer, the file's last, then the final norm) compute it."""
    return diffusers_folder.read_as_diffusers(te) if layers == te.config.layers - 1 else te


def _vae_source(origin: str, state: Mapping[str, Tensor], local: Mapping[str, str], stored: VAEConfig | None,
                conventions: VAEConfig, ignored: tuple[str, ...] = (),
                build: Callable[[VAEConfig], nn.Module] = AutoencoderKL) -> ComponentSource:
    sub = SubStateDict(state, local)
    found = infer_vae_config(normalize_vae_attention_shapes(meta_view(sub)), conventions)
    config = _confirmed(stored, found, VAE_SHAPE_FIELDS)
    return ComponentSource(
        name="vae", build=build, origin=origin, state=sub, to_sdlab=normalize_vae_attention_shapes,
        config=config, ignored=ignored,
    )


def _missing_component(path: Path, family: FamilySpec, what: str, prefix: str, hint: str = "") -> CheckpointError:
    return CheckpointError(f"{path}: {family.name} checkpoint has no {what} (no key starting with {prefix}){hint}")


def read_single_file(path: Path, *, family: str | None = None, vae: str | os.PathLike[str] | None = None,
                     need_vae: bool = True) -> SingleFile:
    """Detect the family of a single-file checkpoint, split its keys into components by prefix and check each
    against its inferred (or stored and confirmed) config; `vae` replaces the file's own VAE. A file without a
    VAE is refused, or with `need_vae` False (describing it: `sdlab inspect`) read without one."""
    state, metadata = read_checkpoint(path)
    shapes = shapes_of(state)
    if family is not None:
        override, family_source = family, "argument"
    elif META_FAMILY in metadata:
        override, family_source = metadata[META_FAMILY], f"metadata {META_FAMILY}"
    else:
        override, family_source = None, "detected"
    if shapes and all(key.startswith(UNET_PREFIX) for key in shapes):          # a U-Net alone, prefixed
        unet_alone = not_a_model(path)
        if unet_alone is not None:
            raise unet_alone
    try:
        spec = detect_family(shapes, override=override)
    except NoUNetError as exc:
        raise not_a_model(path) or exc from None
    stored = stored_configs(metadata, spec)
    origin = str(path)

    text_prefixes = _text_prefixes(spec, shapes)
    prefixes = [(name, text_prefixes.get(name, prefix)) for name, prefix in spec.prefixes.items()]
    buckets: dict[str, list[str]] = {name: [] for name, _ in prefixes}
    ignored, unexpected = [], []
    parts: dict[str, list[str]] = {}
    for key in shapes:
        part = next((prefix for prefix in TRAINING_PARTS if key.startswith(prefix)), None)
        owner = next((name for name, prefix in prefixes if key.startswith(prefix)), None)
        if part is not None:
            parts.setdefault(part, []).append(key)
        elif owner is not None:
            buckets[owner].append(key)
        elif SINGLE_FILE_TOLERATED.fullmatch(key):
            ignored.append(key)
        else:
            unexpected.append(key)
    for part, keys in parts.items():
        logger.warning("%s: not using its %s: %d keys under %s", path.name, TRAINING_PARTS[part], len(keys), part)
        ignored.extend(keys)
    if unexpected:
        tops = sorted({k.split(".")[0] + "." for k in unexpected})
        raise CheckpointError(
            f"{path}: {len(unexpected)} keys belong to no {spec.name} component (prefixes {', '.join(tops)}): "
            f"{', '.join(sorted(unexpected)[:8])}{' ...' if len(unexpected) > 8 else ''}"
        )

    unet_local: dict[str, str] = {}
    for key in buckets["unet"]:
        local = key[len(spec.unet_prefix):]
        local = _UNET_ALIASES.get(local, local)
        if local in unet_local:
            raise CheckpointError(f"{path}: the U-Net holds {local} twice ({unet_local[local]} and {key})")
        unet_local[local] = key
    unet_sub = SubStateDict(state, unet_local)
    found_unet = infer_unet_config(shapes_of(unet_sub), spec.unet)
    unet_config = _confirmed(stored["unet"] if stored else None, found_unet, unet_shape_fields(found_unet))
    unet = ComponentSource("unet", spec.unet_module, origin, unet_sub, dict, unet_config)

    vae_source: ComponentSource | None = None
    missing_vae = None
    if vae is not None:
        vae_source = load_vae_source(vae)
        if buckets["vae"]:
            logger.info("%s: using the VAE from %s instead of the file's own", path.name, vae)
            ignored.extend(buckets["vae"])
    elif not buckets["vae"]:
        if need_vae:
            raise _missing_component(path, spec, "VAE", spec.vae_prefix, "; pass a VAE file (vae=... / --vae)")
        missing_vae = f"no key starting with {spec.vae_prefix}"
    else:
        vae_local = {k[len(spec.vae_prefix):]: k for k in buckets["vae"]}
        vae_source = _vae_source(origin, state, vae_local, stored["vae"] if stored else None, spec.vae,
                                 build=spec.vae_module)

    text = []
    hidden_states = stored_hidden_states(metadata, len(spec.text_encoders))
    for i, te in enumerate(spec.text_encoders):
        if hidden_states is not None:
            te = replace(te, hidden_state=hidden_states[i])
        if not buckets[te.name]:
            raise _missing_component(path, spec, f"text encoder {te.name}", text_prefixes[te.name])
        te_stored = stored["text_encoders"][i] if stored else None
        source = _text_source(replace(te, prefix=text_prefixes[te.name]), spec.text_module, origin, state,
                              buckets[te.name], te_stored)
        text.append((_hidden_state_for_layers(te, source.config.layers), source))

    return SingleFile(
        path=path, family=spec, family_source=family_source, unet=unet, vae=vae_source, text_encoders=tuple(text),
        metadata=metadata, shapes=shapes, total_keys=len(shapes), ignored=tuple(sorted(ignored)),
        markers={key: state[key] for key in COMFY_NOISE_MODEL_KEYS if key in shapes},
        schedule_buffers={key: state[key] for key in ("alphas_cumprod", "betas") if key in shapes},
        missing_vae=missing_vae,
    )


# ----------------------------------------------------------------------------------------------------------
# Standalone VAE files


def load_vae_source(path: str | os.PathLike[str]) -> ComponentSource:
    """A VAE from a file with bare LDM keys (`encoder.*`, `decoder.*`, `quant_conv.*`), `first_stage_model.*`
    keys, or diffusers names; or from a diffusers VAE folder (`config.json` + weights)."""
    path = Path(path)
    try:
        return _vae_file_source(path)
    except CheckpointError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise CheckpointError(f"{path}: {exc}") from None


def declared_by_vae(path: str | os.PathLike[str], family: FamilySpec) -> dict[str, Any]:
    """What a standalone VAE declares about its latents, as diffusers' pipelines read a VAE's config: a subset of
    {"scaling_factor": float, "latent_stats": LatentStats or None} holding only what it says. From a diffusers VAE
    folder's `config.json`, or an `AutoencoderKL` `config.json` beside a weights file (`scaling_factor`;
    `latents_mean` / `latents_std`, null there meaning none), else a `.safetensors` file's sdlab metadata
    (`sdlab.scaling_factor`, `sdlab.latent_stats`: a VAE `sdlab train --task vae` wrote). Statistics count only
    on a `family` whose diffusers pipelines apply them (`vae_stats_apply`: SDXL's)."""
    path = Path(path)
    config_path = path / "config.json" if path.is_dir() else path.parent / "config.json"
    declared: dict[str, Any] = {}
    if config_path.is_file():
        config = diffusers_folder.read_config_json(config_path)
        if path.is_dir() or (config.get("_class_name", "AutoencoderKL") == "AutoencoderKL" and "latent_channels" in config):
            if config.get("scaling_factor") is not None:
                declared["scaling_factor"] = check_positive_float(f"{config_path}: scaling_factor", config["scaling_factor"])
            if ("latents_mean" in config or "latents_std" in config) and vae_stats_apply(family, config_path):
                declared["latent_stats"] = folder_latent_stats(config, config_path, family)
            return declared
    if path.suffix.lower() == ".safetensors":
        _, metadata = read_checkpoint(path)
        try:
            scaling, stats = stored_scaling_factor(metadata, None), stored_latent_stats(metadata)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        declared |= {"scaling_factor": scaling} if scaling is not None else {}
        declared |= {"latent_stats": stats} if stats is not None and vae_stats_apply(family, path) else {}
    return declared


def _vae_file_source(path: Path) -> ComponentSource:
    if not path.exists():
        raise CheckpointError("no such VAE file or folder")
    if path.is_dir():
        return diffusers_folder.vae_source_from_folder(path)
    state, metadata = read_checkpoint(path)
    keys = list(state)
    if any(".down_blocks." in k or ".up_blocks." in k for k in keys):
        return diffusers_folder.vae_source_from_diffusers_state(path, state)
    local: dict[str, str] = {}
    ignored = []
    for key in keys:
        bare = key.removeprefix(VAE_FILE_PREFIX)
        if bare.split(".")[0] in ("encoder", "decoder", "quant_conv", "post_quant_conv"):
            local[bare] = key
        elif VAE_FILE_TOLERATED.fullmatch(key) or SINGLE_FILE_TOLERATED.fullmatch(key):
            ignored.append(key)
        else:
            raise CheckpointError(
                f"{path}: not a VAE file: key {key} is none of encoder.*, decoder.*, quant_conv.*, post_quant_conv.* "
                "(optionally under first_stage_model.)"
            )
    if not local:
        raise CheckpointError(f"{path}: holds no VAE weights")
    return _vae_source(str(path), state, local, stored_vae_config(metadata), VAEConfig(), tuple(ignored))


__all__ = ["SingleFile", "VAE_FILE_PREFIX", "declared_by_vae", "load_vae_source", "read_single_file"]
