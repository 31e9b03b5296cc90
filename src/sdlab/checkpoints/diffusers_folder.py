"""Diffusers pipeline folders: `model_index.json` + one subfolder per component.

    model_index.json                    `_class_name` (StableDiffusionPipeline, StableDiffusionXLPipeline, ...);
                                        SDXL's `force_zeros_for_empty_prompt` (an empty negative prompt is a
                                        zero conditioning; absent: true, the family's rule)
    unet/config.json + weights          UNet2DConditionModel: converted with `diffusers_unet`
    vae/config.json + weights           AutoencoderKL: converted with `diffusers_vae`; `scaling_factor`, and
                                        SDXL's `latents_mean` / `latents_std` (Playground v2.5): `noise_model`
    text_encoder[_2]/config.json + ...  transformers CLIPTextModel(WithProjection): HF layout, the same names
                                        as sdlab's CLIPTextModel after removing `text_model.`
    unet/config.json `sample_size`      the model's native latent side: x the VAE factor, the default picture
                                        size (as diffusers' pipelines default to it; SDXL-Turbo: 64 x 8 = 512)
    scheduler/scheduler_config.json     `prediction_type` ("epsilon" / "v_prediction") and the training
                                        schedule (betas, zero terminal SNR): `diffusers_scheduler`; an EDM
                                        noise model (EDM* classes, continuous v): `noise_model`
    tokenizer[_2]/                      not read: every SD family uses CLIP's BPE, shipped with sdlab

Weights per component, first found wins, the plain files before a variant's, as diffusers reads a folder
without `variant=`: `diffusion_pytorch_model.safetensors` / `model.safetensors` or their shard index
(`*.safetensors.index.json`), then the `.bin` pickles (weights-only) in the same order, then the same in the
`.fp16` variant (`*.fp16.safetensors`, `*.safetensors.index.fp16.json`, `*.fp16.bin`). Where a component
folder holds several, the loader logs the one it reads and the others; the component's origin (`sdlab
inspect`) is that file. Configs come
from config.json files; every field they declare that a shape can show is compared with the tensors before
any module (or key table) is built, and the other fields are type- and range-checked.

Only regular files are read (a FIFO or a link to a device is refused, never opened), JSON files up to
`MAX_JSON_BYTES`, and a shard index may name only files inside its component folder.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from sdlab.checkpoints.components import ComponentSource, SubStateDict, hf_text_to_sdlab
from sdlab.checkpoints.detect import detect_diffusers_family, refuse_unsupported_pipeline
from sdlab.checkpoints.diffusers_scheduler import log_scheduler, read_scheduler_config, spacing_offset
from sdlab.checkpoints.diffusers_unet import (
    DIFFUSERS_UNET_NAMES,
    unet_config_from_diffusers,
    unet_config_from_diffusers_shapes,
    unet_state_dict_from_diffusers,
)
from sdlab.checkpoints.diffusers_vae import (
    DIFFUSERS_VAE_NAMES,
    vae_config_from_diffusers,
    vae_config_from_diffusers_shapes,
    vae_state_dict_from_diffusers,
)
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.infer import infer_text_config
from sdlab.checkpoints.io import KeyedEntries, LazyMapping, read_as, read_checkpoint, shapes_of
from sdlab.checkpoints.noise_model import folder_latent_stats, folder_noise_model
from sdlab.checkpoints.tolerated import is_hf_text_tolerated
from sdlab.checkpoints.validate import (
    UNET_SHAPE_FIELDS,
    VAE_SHAPE_FIELDS,
    check_declared,
    check_int,
    check_positive_float,
    check_text,
)
from sdlab.families import EDMSpec, FamilySpec, ScheduleSpec, TextEncoderSpec
from sdlab.families.latent_format import LatentStats
from sdlab.models.clip import CLIPTextConfig
from sdlab.models.unet import UNet
from sdlab.models.vae import AutoencoderKL, VAEConfig

ConfigT = TypeVar("ConfigT")
logger = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"
MAX_JSON_BYTES = 16 << 20       # a sharded SDXL U-Net's index is ~100 KB; configs are a few KB
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
_VARIANTS = ("", ".fp16")


@dataclass(frozen=True)
class DiffusersFolder:
    """The components of a diffusers folder, checked for presence and ready to plan."""

    path: Path
    family: FamilySpec
    family_source: str
    unet: ComponentSource
    vae: ComponentSource | None             # None: the folder has no vae/, read with need_vae False
    text_encoders: tuple[tuple[TextEncoderSpec, ComponentSource], ...]
    prediction_type: str | None             # scheduler_config.json `prediction_type`, if any
    scaling_factor: float | None            # vae/config.json `scaling_factor`, if any
    total_keys: int
    ignored: tuple[str, ...]
    schedule: ScheduleSpec | None = None    # scheduler_config.json's training schedule, where not the family's
    sampler: Mapping[str, Any] = field(default_factory=dict)   # its sampler settings (class, spacing, offset)
    steps_offset: int = 1                   # what its pipeline's leading spacing adds (`spacing_offset`)
    native_size: int | None = None          # unet/config.json `sample_size` x the VAE factor, if square
    zero_empty_negative: bool | None = None  # model_index.json `force_zeros_for_empty_prompt`, if it says
    noise_model: EDMSpec | None = None      # a continuous EDM noise model its scheduler declares (`noise_model`)
    latent_stats: LatentStats | None = None  # vae/config.json `latents_mean` / `latents_std` (SDXL pipelines)


class ShardedStateDict(KeyedEntries, LazyMapping):
    """Several checkpoint files seen as one state dict (diffusers / transformers `*.index.json` shards)."""

    def __init__(self, parts: list[Mapping[str, Tensor]]):
        self._entries: dict[str, Mapping[str, Tensor]] = {}         # key -> the part that holds it
        for part in parts:
            for key in part:
                self._entries[key] = part

    def __getitem__(self, key: str) -> Tensor:
        return self._entries[key][key]

    def read_as(self, key: str, dtype: torch.dtype) -> Tensor:
        return read_as(self._entries[key], key, dtype)

    def shape(self, key: str) -> torch.Size:
        part = self._entries[key]
        return part.shape(key) if isinstance(part, LazyMapping) else part[key].shape

    def dtype(self, key: str) -> torch.dtype:
        part = self._entries[key]
        return part.dtype(key) if isinstance(part, LazyMapping) else part[key].dtype


def _regular_file(path: Path) -> bool:
    """Whether `path` (links followed) is a regular file; never opens it, so a FIFO cannot block."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def read_config_json(path: Path) -> dict[str, Any]:
    """A JSON object from a regular file of at most `MAX_JSON_BYTES`."""
    if not path.exists():
        raise CheckpointError(f"{path}: missing")
    if not _regular_file(path):
        raise CheckpointError(f"{path}: not a regular file")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(raw) > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: larger than {MAX_JSON_BYTES >> 20} MiB; not a config")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _shard_paths(index: Path) -> list[Path]:
    """The shard files a shard index (`*.index.json`) names, each a regular file inside the index's folder."""
    weight_map = read_config_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: weight_map must be a non-empty object of tensor name -> shard file name")
    shards = []
    for name in sorted(set(weight_map.values())):
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts or "\\" in name:
            raise CheckpointError(f"{index}: shard {name!r} is not a file name inside {index.parent}")
        shard = index.parent / name
        if not _regular_file(shard):
            raise CheckpointError(f"{index}: shard {name!r} is not a regular file in {index.parent}")
        shards.append(shard)
    return shards


def _weight_files(folder: Path) -> list[Path]:
    """The weights files and shard indexes of one component folder, in the order they are tried (module
    docstring)."""
    found = []
    for variant in _VARIANTS:
        for suffix in ("safetensors", "bin"):
            for stem in _WEIGHT_STEMS:
                single = folder / f"{stem}{variant}.{suffix}"
                found += [single] if _regular_file(single) else []
                index = _shard_index(folder, stem, suffix, variant)
                found += [index] if index is not None else []
    return found


def weights_file(folder: Path) -> Path:
    """The file one component folder's weights are read from (a shard index when sharded): the first found;
    where there are others (a variant, the other format), a log line names them."""
    files = _weight_files(folder)
    if not files:
        raise CheckpointError(
            f"{folder}: no weights found (looked for diffusion_pytorch_model / model / pytorch_model "
            ".safetensors, .fp16.safetensors, .safetensors.index.json, .safetensors.index.fp16.json, .bin and "
            "their shard indexes)"
        )
    if len(files) > 1:
        logger.info("%s: reading %s (also there, not read: %s)", folder, files[0].name,
                    ", ".join(f.name for f in files[1:]))
    return files[0]


def read_weights(path: Path) -> Mapping[str, Tensor]:
    """The weights of a checkpoint file, or of the shards a shard index names."""
    if path.name.endswith(".json"):
        return ShardedStateDict([read_checkpoint(shard)[0] for shard in _shard_paths(path)])
    return read_checkpoint(path)[0]


def component_weights(folder: Path) -> Mapping[str, Tensor]:
    """The weights of one component folder (see module docstring for the search order)."""
    return read_weights(weights_file(folder))


def _shard_index(folder: Path, stem: str, suffix: str, variant: str) -> Path | None:
    """The shard index of `stem`.`suffix` in `variant`: diffusers and transformers put the variant before
    ``.json`` (``diffusion_pytorch_model.safetensors.index.fp16.json``); also taken before the suffix."""
    for name in dict.fromkeys((f"{stem}.{suffix}.index{variant}.json", f"{stem}{variant}.{suffix}.index.json")):
        if (folder / name).exists():
            return folder / name
    return None


def _config_from_json(path: Path, convert: Callable[[dict[str, Any]], ConfigT],
                      config_json: dict[str, Any] | None = None) -> ConfigT:
    """``convert`` applied to the JSON file ``path`` (``config_json`` when already read); its ValueError becomes
    a CheckpointError naming the file."""
    config_json = read_config_json(path) if config_json is None else config_json
    try:
        return convert(config_json)
    except (ValueError, CheckpointError) as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def _confirm(config_path: Path, declared: Any, found: Callable[[], Any], names: tuple[str, ...],
             aliases: Mapping[str, str]) -> None:
    """The fields of `declared` (from `config_path`) that the tensors show equal what they show."""
    try:
        check_declared(declared, found(), names, aliases)
    except CheckpointError as exc:
        raise CheckpointError(f"{config_path}: {exc}") from None


def _unet_source(folder: Path, config_json: dict[str, Any]) -> ComponentSource:
    """The U-Net of a diffusers folder, checked before detection (which reads its config); the family's module
    factory replaces `UNet` once the family is known."""
    config = _config_from_json(folder / "config.json", unet_config_from_diffusers, config_json)
    weights = weights_file(folder)
    state = read_weights(weights)
    _confirm(folder / "config.json", config, lambda: unet_config_from_diffusers_shapes(shapes_of(state), config),
             UNET_SHAPE_FIELDS, DIFFUSERS_UNET_NAMES)
    return ComponentSource(
        name="unet", build=UNet, origin=str(weights), state=state,
        to_sdlab=lambda s: unet_state_dict_from_diffusers(s, config), config=config,
    )


def vae_source_from_folder(folder: Path, config_json: dict[str, Any] | None = None) -> ComponentSource:
    """A diffusers `AutoencoderKL` folder (`config.json`, or `config_json` when already read, + weights)."""
    config = _config_from_json(folder / "config.json", vae_config_from_diffusers, config_json)
    weights = weights_file(folder)
    state = read_weights(weights)
    _confirm(folder / "config.json", config, lambda: vae_config_from_diffusers_shapes(shapes_of(state), config),
             VAE_SHAPE_FIELDS, DIFFUSERS_VAE_NAMES)
    return _vae_source(str(weights), state, config)


def _vae_source(origin: str, state: Mapping[str, Tensor], config: VAEConfig) -> ComponentSource:
    return ComponentSource(
        name="vae", build=AutoencoderKL, origin=origin, state=state,
        to_sdlab=lambda s: vae_state_dict_from_diffusers(s, config), config=config,
    )


def vae_source_from_diffusers_state(path: Path, state: Mapping[str, Tensor]) -> ComponentSource:
    """A diffusers-layout VAE in a single file: config from a `config.json` beside it, else from shapes."""
    beside = path.parent / "config.json"
    if beside.exists():
        config = _config_from_json(beside, vae_config_from_diffusers)
        _confirm(beside, config, lambda: vae_config_from_diffusers_shapes(shapes_of(state), config),
                 VAE_SHAPE_FIELDS, DIFFUSERS_VAE_NAMES)
        return _vae_source(str(path), state, config)
    try:
        config = vae_config_from_diffusers_shapes(shapes_of(state), VAEConfig())
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: diffusers-style VAE keys, but {exc}") from None
    if min(config.channel_mult) < 1 or config.num_res_blocks < 1:
        raise CheckpointError(f"{path}: cannot read the VAE's levels from its diffusers-style keys")
    return _vae_source(str(path), state, config)


def _text_source(spec: TextEncoderSpec, build: Callable[[CLIPTextConfig], nn.Module], folder: Path) -> ComponentSource:
    config_path = folder / "config.json"
    config_json = read_config_json(config_path)
    weights = weights_file(folder)
    state = read_weights(weights)
    tolerated = sorted(k for k in state if is_hf_text_tolerated(k))
    sub = SubStateDict(state, {k: k for k in state if k not in tolerated})
    try:
        conventions = replace(
            spec.config,
            activation=config_json.get("hidden_act", spec.config.activation),
            layer_norm_eps=check_positive_float(
                "layer_norm_eps", config_json.get("layer_norm_eps", spec.config.layer_norm_eps)),
        )
        config = infer_text_config(hf_text_to_sdlab(shapes_of(sub)), conventions)
        heads = config_json.get("num_attention_heads")
        if heads is not None:
            config = replace(config, heads=check_int("num_attention_heads", heads))
        check_text(config)
    except CheckpointError as exc:
        raise CheckpointError(f"{config_path}: {exc}") from None
    return ComponentSource(
        name=spec.name, build=build, origin=str(weights), state=sub, to_sdlab=hf_text_to_sdlab,
        config=config, ignored=tuple(tolerated),
    )


def read_as_diffusers(te: TextEncoderSpec) -> TextEncoderSpec:
    """`te` read as diffusers reads its text encoders: the final-norm output of every layer the tower holds.

    diffusers' SD2 `text_encoder` is OpenCLIP-H without its last layer (23 of 24, `num_hidden_layers=23`), so
    that output is SD2's "penultimate_norm" conditioning: such a tower is read at "last". SD1's "last" and
    SDXL's "penultimate" stay: diffusers stores those towers whole and reads the same layers.
    """
    return replace(te, hidden_state="last") if te.hidden_state == "penultimate_norm" else te


def _first_text_config(path: Path, model_index: Mapping[str, Any]) -> dict[str, Any] | None:
    """`text_encoder/config.json`, which family detection reads; None where the folder has no first text encoder
    (the SDXL refiner's `model_index.json` lists it as [null, null]). One that `model_index.json` lists and the
    folder lacks (an incomplete download) is an error naming it, before detection finds no family."""
    config = path / "text_encoder" / "config.json"
    entry = model_index.get("text_encoder")
    if not config.exists() and isinstance(entry, (list, tuple)) and any(part is not None for part in entry):
        raise CheckpointError(f"{path}: model_index.json lists text_encoder, but text_encoder/config.json is missing")
    return read_config_json(config) if config.exists() else None


def _not_a_pipeline(path: Path) -> CheckpointError:
    """The error for a folder without `model_index.json` given as a model: what it is where it is a part of a
    pipeline (`unet/`: the pipeline folder to pass) or a VAE folder (`other_kinds.not_a_model`), else that it is no
    pipeline, naming the checkpoint files it holds (a models folder passed for one of its models)."""
    from sdlab.checkpoints.io import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES
    from sdlab.checkpoints.other_kinds import not_a_model

    described = not_a_model(path)
    if described is not None:
        return described
    files = sorted(p.name for p in path.iterdir()
                   if p.is_file() and p.suffix.lower() in (*SAFETENSORS_SUFFIXES, *PICKLE_SUFFIXES))
    hint = (f"; it holds {len(files)} checkpoint file(s), pass one: {', '.join(files[:4])}{' ...' if len(files) > 4 else ''}"
            if files else "")
    return CheckpointError(f"{path}: not a diffusers pipeline folder (no {MODEL_INDEX}){hint}")


def read_diffusers_folder(path: Path, *, family: str | None = None,
                          vae_override: ComponentSource | None = None, need_vae: bool = True) -> DiffusersFolder:
    """Detect the family of a diffusers folder and open each component (weights are read lazily).
    `vae_override`: the VAE drawn with in place of the folder's (`--vae`), which stands for it where the folder
    has no `vae/` (as diffusers' `from_pretrained(folder, vae=...)` needs none). A folder with neither is
    refused, or with `need_vae` False (describing it: `sdlab inspect`) read without a VAE."""
    if not (path / MODEL_INDEX).exists():
        raise _not_a_pipeline(path)
    model_index = read_config_json(path / MODEL_INDEX)
    refuse_unsupported_pipeline(model_index)
    unet_json = read_config_json(path / "unet" / "config.json")
    unet = _unet_source(path / "unet", unet_json)  # checks unet/config.json before detection reads it
    spec = detect_diffusers_family(model_index, unet_json, _first_text_config(path, model_index), override=family)
    unet = replace(unet, build=spec.unet_module)
    vae: ComponentSource | None
    if vae_override is not None and not (path / "vae").exists():
        vae_json, vae = {}, vae_override
    elif not (path / "vae").exists():
        if need_vae:
            raise CheckpointError(f"{path}: {spec.name} folder has no vae/; pass a VAE file or folder "
                                  "(vae=... / --vae)")
        vae_json, vae = {}, None
    else:
        vae_json = read_config_json(path / "vae" / "config.json")
        vae = replace(vae_source_from_folder(path / "vae", vae_json), build=spec.vae_module)
    scaling = vae_json.get("scaling_factor")
    if scaling is not None and (isinstance(scaling, bool) or not isinstance(scaling, (int, float))):
        raise CheckpointError(f"{path / 'vae' / 'config.json'}: scaling_factor must be a number, got {scaling!r}")
    text = []
    for te in spec.text_encoders:
        folder = path / te.diffusers_folder
        if not folder.is_dir():
            raise CheckpointError(f"{path}: {spec.name} folder has no {te.diffusers_folder}/ for {te.name}")
        # diffusers reads a folder's tower at its final-norm output whatever its layer count, so "last" is
        # what it draws with even for a folder that keeps all of OpenCLIP-H's 24 layers
        text.append((read_as_diffusers(te), _text_source(te, spec.text_module, folder)))
    scheduler_path = path / "scheduler" / "scheduler_config.json"
    scheduler_config = read_config_json(scheduler_path) if scheduler_path.exists() else {}
    scheduler = read_scheduler_config(scheduler_config, spec.schedule, scheduler_path)
    log_scheduler(scheduler_path, scheduler, model_index.get("_class_name"))
    noise_model = folder_noise_model(scheduler_config, scheduler.schedule or spec.schedule, scheduler_path)
    total = sum(len(c.state) + len(c.ignored) for c in [unet, vae, *(src for _, src in text)] if c is not None)
    return DiffusersFolder(
        path=path,
        family=spec,
        family_source="argument" if family is not None else f"{MODEL_INDEX} + component configs",
        unet=unet,
        vae=vae,
        text_encoders=tuple(text),
        prediction_type=scheduler.prediction_type,
        scaling_factor=float(scaling) if scaling is not None else None,
        total_keys=total,
        ignored=(),
        schedule=scheduler.schedule,
        sampler=scheduler.sampler,
        steps_offset=spacing_offset(scheduler, model_index.get("_class_name"), scheduler_path),
        native_size=_native_size(path / "unet" / "config.json", unet_json,
                                 (spec.vae if vae is None else vae.config).downsample_factor),
        zero_empty_negative=_force_zeros_for_empty_prompt(path / MODEL_INDEX, model_index, spec),
        noise_model=noise_model,
        latent_stats=folder_latent_stats(vae_json, path / "vae" / "config.json", spec),
    )


def _force_zeros_for_empty_prompt(index_path: Path, model_index: Mapping[str, Any], spec: FamilySpec) -> bool | None:
    """`force_zeros_for_empty_prompt` of `model_index.json`: whether diffusers' SDXL pipelines make an empty
    negative prompt a zero conditioning (they default to true; the released refiner folder says false).
    None where the folder does not say, or where the family never zeroes one (SD1 / SD2: diffusers'
    StableDiffusionPipeline has no such setting)."""
    value = model_index.get("force_zeros_for_empty_prompt")
    if value is None or not spec.conditioner.zero_empty_negative:
        return None
    if not isinstance(value, bool):
        raise CheckpointError(f"{index_path}: force_zeros_for_empty_prompt must be true or false, got {value!r}")
    return value


def _native_size(config_path: Path, unet_json: Mapping[str, Any], vae_factor: int) -> int | None:
    """The picture side a folder's U-Net was made for: `sample_size` (latent side; an int, or [h, w] when
    square) x the VAE factor, the size diffusers' pipelines draw by default (`default_sample_size *
    vae_scale_factor`); None without one. A non-square `sample_size` keeps the family default, logged."""
    size = unet_json.get("sample_size")
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if size is None:
        return None
    if isinstance(size, (list, tuple)):
        logger.info("%s: sample_size %s is not square; the default picture size is the family's", config_path, size)
        return None
    try:
        return check_int("sample_size", size) * vae_factor
    except CheckpointError as exc:
        raise CheckpointError(f"{config_path}: {exc}") from None
