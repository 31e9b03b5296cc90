"""Merge checkpoints as A1111's Checkpoint Merger does (`modules/extras.py` `run_modelmerger`, 1.10).

Primary model A, secondary B, tertiary C and a multiplier M; per tensor key of A:
  - "Weighted sum"      A * (1 - M) + B * M                 (A and B)
  - "Add difference"    A + (B - C) * M                     (A, B and C)
  - "No interpolation"  A                                   (format conversion, fp16, VAE baking, discarding)
as A1111 computes them: in the tensors' own dtypes (fp16 files in fp16), B - C first, only keys whose name
holds "model" and that B holds (the rest are A's; a B key that C lacks adds nothing), the CLIP position ids
never merged (`checkpoint_dict_skip_on_merge`). An inpainting (9-channel) or instruct-pix2pix (8-channel) A
merged with a normal B mixes only the 4 latent channels of the U-Net's first convolution
(`model.diffusion_model.input_blocks.0.0.weight`); the other way round is refused as A1111 refuses it, as is
any other pair of shapes (where A1111 would fail or broadcast), but for the VAE attention projections, which
sdlab loads as linear [C, C] or 1x1 convolutions [C, C, 1, 1]: B's and C's take A's layout. "Save as float16"
halves the fp32 tensors it merges (every fp32 tensor under "No interpolation"). "Bake in VAE" then replaces A's
VAE tensors with a VAE file's (halved likewise), and "discard weights" drops the keys a regular expression finds
(`re.search`).

Keys are A1111's: a single file's own (the pre-`text_model.` CLIP names of old SD1 files renamed, SD 2.1
Turbo's `conditioner.embedders.0.` read as `cond_stage_model.`, as its `read_state_dict` does); a diffusers
folder's in the layout sdlab saves single files in (`save.bundle_state_dict`). Models of different families
(SD1, SD2, SDXL, ...; an inpainting or instruct-pix2pix model counts as its base family) are refused.

Memory: nothing is held whole. Safetensors inputs are read one tensor at a time, the result is written one
tensor at a time (`MergedState`, a `LazyMapping` whose shapes and dtypes come from the same merge run on
`meta` tensors, so every shape is checked before a byte is written), a `.ckpt` too (`torch_zip`: torch.save's
zip format, its pickle made from those shapes and dtypes). A zip `.ckpt` / `.pt` input is read tensor by tensor
too (`read_checkpoint(lazy=True)`: its pickle unpickled by the same weights-only loader onto `meta`, each tensor
read from its record when the merge asks for it); a legacy (pre-zip) pickle is unpickled whole, and a diffusers
folder's text towers are converted whole (the rest of a folder streams).

Metadata (`merge_metadata`), as A1111's "Save metadata" writes it: the inputs' own (A, then B, then C, each
replacing the last: "Copy metadata from merged models"), the user's JSON, `format` "pt", and with "Add merge
recipe" `sd_merge_recipe` and `sd_merge_models` (each input by its sha256: name, legacy hash, its own
recipe, and the models it was merged from). The keys sdlab loads a file by describe its networks, which are
A's (A1111 draws a merge as A: its config `.yaml` is A's first), so they come from A alone (a diffusers folder's
from what its configs declare): sdlab's own `sdlab.*` and Stability's model spec `modelspec.*` (prediction type,
native size, architecture), but for the keys that name A's file (`modelspec.title`, which names the pictures
drawn with it, and its hash), which the merge, a new model named by its file as in A1111, does not have. The
user's JSON comes after them all: a key it names, `sdlab.*` or `modelspec.*` too, is what the user asked for.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdlab.checkpoints.components import ComponentSource, SubStateDict, meta_view
from sdlab.checkpoints.controlnet import legacy_hash
from sdlab.checkpoints.detect import detect_family
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.file_format import META_FAMILY, bundle_metadata
from sdlab.checkpoints.io import KeyedEntries, LazyMapping, meta_tensor, read_checkpoint, shapes_of
from sdlab.checkpoints.plan import CheckpointPlan
from sdlab.checkpoints.save import prediction_markers, text_file_state
from sdlab.checkpoints.sidecar import sidecar_of
from sdlab.families import FamilySpec
from sdlab.families.loaded import ModelBundle, TextEncoder
from sdlab.models.vae import ATTENTION_PROJECTIONS
from sdlab.utils.file_hashes import file_sha256

logger = logging.getLogger(__name__)

WEIGHTED_SUM, ADD_DIFFERENCE, NO_INTERPOLATION = "Weighted sum", "Add difference", "No interpolation"
METHODS = (NO_INTERPOLATION, WEIGHTED_SUM, ADD_DIFFERENCE)       # A1111's radio, in its order
MODELS_NEEDED = {NO_INTERPOLATION: 1, WEIGHTED_SUM: 2, ADD_DIFFERENCE: 3}
CONFIG_SOURCES = ("A, B or C", "B", "C", "Don't")                 # A1111's "Copy config from", by index
SKIP_ON_MERGE = ("cond_stage_model.transformer.text_model.embeddings.position_ids",)
CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
INPAINT_CHANNELS, PIX2PIX_CHANNELS = 9, 8
VAE_ATTENTION = tuple(f".attn_1.{name}.weight" for name in ATTENTION_PROJECTIONS)
MODEL_KEYS = ("sdlab.", "modelspec.")                           # metadata describing the networks: A's
FILE_KEYS = ("modelspec.title", "modelspec.hash_sha256")        # ... but those naming A's file: none

# A1111 `sd_models.checkpoint_dict_replacements_sd1` / `_sd2_turbo`, applied as `read_state_dict` applies them
_SD1_RENAMES = {
    "cond_stage_model.transformer.embeddings.": "cond_stage_model.transformer.text_model.embeddings.",
    "cond_stage_model.transformer.encoder.": "cond_stage_model.transformer.text_model.encoder.",
    "cond_stage_model.transformer.final_layer_norm.": "cond_stage_model.transformer.text_model.final_layer_norm.",
}
_SD2_TURBO_RENAMES = {"conditioner.embedders.0.": "cond_stage_model."}
_SD2_TURBO_MARK = "conditioner.embedders.0.model.ln_final.weight"


class MergeError(CheckpointError):
    """The models cannot be merged as asked (one line, naming what and why)."""


@dataclass(frozen=True)
class MergeOptions:
    """The Checkpoint Merger's settings, A1111's defaults."""

    method: str = WEIGHTED_SUM
    multiplier: float = 0.3
    save_as_half: bool = False
    vae: Path | None = None                     # "Bake in VAE": a VAE file or diffusers VAE folder
    discard: str = ""                           # "Discard weights with matching name" (a regular expression)
    config_source: int = 0                      # index into CONFIG_SOURCES
    save_metadata: bool = True
    add_recipe: bool = True
    copy_metadata: bool = True
    metadata_json: Mapping[str, Any] = field(default_factory=dict)
    custom_name: str = ""                       # recorded in the recipe (the output's name when the user gave it)


# ----------------------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class MergeInput:
    """One model to merge: its tensors under A1111's keys (read lazily), its metadata and its family."""

    path: Path
    tensors: Mapping[str, Tensor]
    metadata: Mapping[str, str]                 # what A1111 copies: a .safetensors header's (a pickle's entries: none)
    family: FamilySpec | None                   # None: a B or C whose tensors name none (a U-Net alone, ...)
    own: Mapping[str, str]                      # the metadata that describes its networks (`model_metadata`)

    @property
    def model_name(self) -> str:
        """A1111's `model_name`: the file's name without its suffix (a folder's name)."""
        return self.path.name if self.path.is_dir() else self.path.stem


def a1111_names(keys: list[str], shapes: Mapping[str, torch.Size]) -> dict[str, str]:
    """A1111's key -> the file's key (`sd_models.get_state_dict_from_checkpoint`'s renames)."""
    sd2_turbo = _SD2_TURBO_MARK in shapes and shapes[_SD2_TURBO_MARK][0] == 1024
    renames = _SD2_TURBO_RENAMES if sd2_turbo else _SD1_RENAMES
    names = {}
    for key in keys:
        new = key
        for old, replacement in renames.items():
            if new.startswith(old):
                new = replacement + new[len(old):]
        names[new] = key
    return names


def base_family(path: Path, shapes: Mapping[str, torch.Size], metadata: Mapping[str, str]) -> FamilySpec:
    """The family of a single file's tensors; an 8-channel (instruct-pix2pix) U-Net is its base's edit variant
    (`sd1-edit`, `sdxl-edit`, which merge with their base), and one on a base with no edit variant is read as its
    4-channel base's."""
    try:
        return detect_family(shapes, override=metadata.get(META_FAMILY))
    except CheckpointError as exc:
        conv_in = shapes.get(CONV_IN)
        if conv_in is None or len(conv_in) != 4 or conv_in[1] != PIX2PIX_CHANNELS:
            raise CheckpointError(f"{path}: {exc}") from None
    try:
        return detect_family({**shapes, CONV_IN: torch.Size((conv_in[0], 4, *conv_in[2:]))})
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def _why_read_whole(path: Path) -> str:
    """Why `read_checkpoint(path, lazy=True)` read a pickle whole: a legacy pickle always is; a zip one (its
    records deflated, or it would be mapped) where the lazy read left a tensor to torch.load (`zip_tensors`)."""
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return ("a legacy (pre-zip) PyTorch pickle, whose tensors cannot be read one at a time (torch.save's zip "
                    "format and .safetensors files are)")
    return ("a zip PyTorch checkpoint with compressed records, one of whose tensors cannot be read from its record "
            "alone (read as torch.load reads it)")


def open_input(path: str | Path, *, primary: bool = True) -> MergeInput:
    """A single file or a diffusers folder, ready to merge (names, shapes and metadata read; no weights). A file
    that is not a `primary` model may be of no family sdlab can tell (a part of a model): its shapes are
    checked key by key instead."""
    path = Path(path)
    if path.is_dir():
        return _open_folder(path)
    state, metadata = read_checkpoint(path, lazy=True)
    if not isinstance(state, LazyMapping):
        logger.info("%s: read whole into memory: %s", path, _why_read_whole(path))
    shapes = shapes_of(state)
    try:
        family = base_family(path, shapes, metadata)
    except CheckpointError as exc:
        if primary:
            raise
        logger.info("%s", exc)
        family = None
    tensors = SubStateDict(state, a1111_names(list(state), shapes))
    copied = dict(metadata) if path.suffix.lower() == ".safetensors" else {}   # A1111 reads a header's alone
    return MergeInput(path, tensors, copied, family, model_metadata(metadata))


def model_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """The keys of `metadata` that describe a model's networks as sdlab loads them (module docstring)."""
    return {k: v for k, v in metadata.items() if k.startswith(MODEL_KEYS) and k not in FILE_KEYS}


def _open_folder(path: Path) -> MergeInput:
    from sdlab.checkpoints.load import plan_checkpoint

    plan = plan_checkpoint(path, sidecar_vae=False)
    report = plan.report
    family = report.family
    parts = [(plan.unet, lambda s: {family.unet_prefix + k: v for k, v in s.items()}),
             (plan.vae, lambda s: {family.vae_prefix + k: v for k, v in s.items()})]
    for spec, (_, source) in zip(family.text_encoders, plan.text_encoders):
        parts.append((source, lambda s, spec=spec: text_file_state(spec, s)))
    description = _described(plan)
    markers = prediction_markers(description)
    return MergeInput(path, FolderState(parts, markers), {}, family, bundle_metadata(description))


def _described(plan: CheckpointPlan) -> ModelBundle:
    """A `ModelBundle` without networks that describes a planned model (for its metadata and markers)."""
    report = plan.report
    return ModelBundle(
        family=report.family, unet=None, vae=None, prediction=report.prediction,
        text_encoders=tuple(TextEncoder(spec=spec, config=src.config, model=None, tokenizer=None)
                            for spec, src in plan.text_encoders),
        scaling_factor=report.scaling_factor, unet_config=plan.unet.config, vae_config=plan.vae.config,
        native_size=report.native_size, schedule=report.schedule, noise_model=report.noise_model,
        steps_offset=report.steps_offset, latent_stats=report.latent_stats)


class FolderState(LazyMapping):
    """The networks of planned components in sdlab's single-file layout, read lazily: a tensor the layout only
    renames is read alone; the others (a diffusers text tower's fused OpenCLIP projections, a VAE's attention
    as 1x1 convs) come from converting their whole component, kept until another component is read."""

    def __init__(self, parts: list[tuple[ComponentSource, Callable[[dict[str, Tensor]], dict[str, Tensor]]]],
                 extra: Mapping[str, Tensor] | None = None):
        self._parts = parts
        self._index: dict[str, tuple[int, str | None]] = {}
        self._meta: dict[str, Tensor] = {}
        for i, (source, to_file) in enumerate(parts):
            meta = meta_view(source.state)
            local_of = {id(t): k for k, t in meta.items()}
            for key, t in to_file(source.convert(meta)).items():
                self._index[key] = (i, local_of.get(id(t)))
                self._meta[key] = t
        self._extra = dict(extra or {})
        self._converted: tuple[int, dict[str, Tensor]] | None = None

    def __getitem__(self, key: str) -> Tensor:
        if key in self._extra:
            return self._extra[key]
        i, local = self._index[key]
        source, to_file = self._parts[i]
        if local is not None:
            return source.state[local]
        if self._converted is None or self._converted[0] != i:
            self._converted = None                                  # the last one let go before the next is made
            self._converted = (i, to_file(source.convert(source.state)))
        return self._converted[1][key]

    def __iter__(self) -> Iterator[str]:
        yield from self._index
        yield from self._extra

    def __len__(self) -> int:
        return len(self._index) + len(self._extra)

    def __contains__(self, key: object) -> bool:
        return key in self._index or key in self._extra

    def shape(self, key: str) -> torch.Size:
        return self._extra[key].shape if key in self._extra else self._meta[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self._extra[key].dtype if key in self._extra else self._meta[key].dtype


def baked_vae(path: Path, family: FamilySpec) -> Mapping[str, Tensor]:
    """A VAE file's (or diffusers VAE folder's) tensors under the checkpoint keys A1111 bakes them into
    (`first_stage_model.` + its LDM names)."""
    from sdlab.checkpoints.single_file import load_vae_source

    source = load_vae_source(path)
    return FolderState([(source, lambda s: {family.vae_prefix + k: v for k, v in s.items()})])


def check_families(inputs: list[MergeInput]) -> None:
    """Refuse models of different families (variants of one base merge: an inpainting A with its base's B)."""
    a = inputs[0]
    for name, other in zip("BC", inputs[1:]):
        if other.family is not None and other.family.signature != a.family.signature:
            raise MergeError(f"cannot merge {other.path} ({other.family.name}, model {name}) into {a.path} "
                             f"({a.family.name}, model A): models of different families have different networks")


# ----------------------------------------------------------------------------------------------------------
# The merge


def to_half(tensor: Tensor, enable: bool) -> Tensor:
    """A1111's `to_half`: fp32 -> fp16 when enabled; other dtypes as they are."""
    return tensor.half() if enable and tensor.dtype == torch.float32 else tensor


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


class MergedState(KeyedEntries, LazyMapping):
    """The merged checkpoint, one tensor made per access; shapes and dtypes known (and every shape checked)
    from the same merge run on `meta` tensors when it is made."""

    def __init__(self, inputs: list[MergeInput], options: MergeOptions, vae: Mapping[str, Tensor] | None = None):
        self.a, self.b, self.c = (inputs + [None, None])[:3]
        self.options, self.vae = options, vae
        self.is_inpainting = self.is_instruct_pix2pix = False
        discard = re.compile(options.discard) if options.discard else None
        keys = [k for k in self.a.tensors if discard is None or not discard.search(k)]
        self._entries = {key: self._make(key, meta_tensor) for key in keys}          # each output tensor on meta
        named = [k for k in keys if self.b is not None and "model" in k and k not in SKIP_ON_MERGE]
        self.unmatched = [k for k in named if k not in self.b.tensors]      # A1111 keeps these A's
        self.merged_count = len(named) - len(self.unmatched)

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._entries:
            raise KeyError(key)
        return self._make(key, lambda state, k: state[k])

    def shape(self, key: str) -> torch.Size:
        return self._entries[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key].dtype

    def _make(self, key: str, read: Callable[[Mapping[str, Tensor], str], Tensor]) -> Tensor:
        """The output tensor at `key`; `read(state, key)` gives real or `meta` tensors."""
        half = self.options.save_as_half
        if self.vae is not None and key in self.vae:           # baked in after the merge, which it replaces
            out = self._baked(key, read)
        elif self.b is not None and "model" in key and key in self.b.tensors and key not in SKIP_ON_MERGE:   # A1111's test
            out = to_half(self._merged(key, read), half)
        else:
            out = read(self.a.tensors, key)
        return to_half(out, half) if self.b is None else out

    def _baked(self, key: str, read: Callable[[Mapping[str, Tensor], str], Tensor]) -> Tensor:
        baked, shape = read(self.vae, key), meta_tensor(self.a.tensors, key).shape
        if baked.numel() != shape.numel():
            raise MergeError(f"{self.options.vae}: its {key} holds {_shape(baked)}, the model's {tuple(shape)}: "
                             "a VAE of another shape")
        return to_half(baked.reshape(shape), self.options.save_as_half)

    def _merged(self, key: str, read: Callable[[Mapping[str, Tensor], str], Tensor]) -> Tensor:
        """A1111's merge of A's and B's (minus C's) tensor at `key`."""
        m = self.options.multiplier
        b = self._in_a_layout(key, read(self.b.tensors, key))
        if self.c is not None:
            if key in self.c.tensors:
                c = self._in_a_layout(key, read(self.c.tensors, key))
                if c.shape != b.shape:
                    raise MergeError(f"cannot merge {key}: B holds {_shape(b)}, C {_shape(c)} (B - C needs one shape)")
                b = b - c
            else:
                b = torch.zeros_like(b)
        a = read(self.a.tensors, key)
        if a.shape == b.shape:
            return self._combine(a, b, m)
        if a.ndim == b.ndim == 4 and a.shape[0:1] + a.shape[2:] == b.shape[0:1] + b.shape[2:]:
            if b.shape[1] in (INPAINT_CHANNELS, PIX2PIX_CHANNELS) and a.shape[1] == 4:
                kind = "an inpainting" if b.shape[1] == INPAINT_CHANNELS else "an instruct-pix2pix"
                raise MergeError(f"when merging {kind} model with a normal one, A must be the {kind[3:]} model "
                                 f"({key}: A has {a.shape[1]} input channels, B {b.shape[1]})")
            if a.shape[1] in (INPAINT_CHANNELS, PIX2PIX_CHANNELS) and b.shape[1] == 4:
                out = a.clone()
                out[:, 0:4, :, :] = self._combine(a[:, 0:4, :, :], b, m)
                self.is_inpainting |= a.shape[1] == INPAINT_CHANNELS
                self.is_instruct_pix2pix |= a.shape[1] == PIX2PIX_CHANNELS
                return out
        raise MergeError(f"cannot merge {key}: A holds {_shape(a)}, B {_shape(b)} (models of different shapes)")

    def _in_a_layout(self, key: str, t: Tensor) -> Tensor:
        """B's or C's tensor at `key` in A's shape where sdlab loads both as one weight: a VAE attention
        projection stored as a linear [C, C] (some converted files) or a 1x1 convolution [C, C, 1, 1]."""
        if not (key.startswith(self.a.family.vae_prefix) and key.endswith(VAE_ATTENTION)):
            return t
        shape = meta_tensor(self.a.tensors, key).shape
        return t.reshape(shape) if t.numel() == shape.numel() else t

    def _combine(self, a: Tensor, b: Tensor, m: float) -> Tensor:
        """`weighted_sum(a, b, m)` or `add_difference(a, b, m)` of A1111, operation for operation."""
        if self.c is None:
            return ((1 - m) * a) + (m * b)
        return a + (m * b)


# ----------------------------------------------------------------------------------------------------------
# Metadata, names, config


def _json_object(text: str | None) -> Any:
    """A metadata value as A1111 reads it (`read_metadata_from_safetensors`): JSON when it starts with '{'."""
    if isinstance(text, str) and text[:1] == "{":
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def input_hash(model: MergeInput) -> str | None:
    """A1111's sha256 of a checkpoint file (the whole file's, kept in sdlab's hash cache per file version); None
    for a folder (A1111 has none)."""
    return None if model.path.is_dir() else file_sha256(model.path)


def merge_metadata(inputs: list[MergeInput], options: MergeOptions, merged: MergedState) -> dict[str, str]:
    """The output's metadata, as A1111 writes it with "Save metadata" (module docstring); {} without."""
    if not options.save_metadata:
        return {}
    metadata: dict[str, str] = {}
    if options.copy_metadata:
        for model in inputs:
            metadata.update(model.metadata)
    metadata = {k: v for k, v in metadata.items() if not k.startswith(MODEL_KEYS)} | dict(inputs[0].own)
    metadata.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in options.metadata_json.items()})
    metadata["format"] = "pt"
    if options.add_recipe:
        hashes = [input_hash(model) for model in inputs]
        recipe = {
            "type": "webui",
            "primary_model_hash": hashes[0],
            "secondary_model_hash": hashes[1] if len(inputs) > 1 else None,
            "tertiary_model_hash": hashes[2] if len(inputs) > 2 else None,
            "interp_method": options.method,
            "multiplier": options.multiplier,
            "save_as_half": options.save_as_half,
            "custom_name": options.custom_name,
            "config_source": options.config_source,
            "bake_in_vae": options.vae.name if options.vae is not None else "None",
            "discard_weights": options.discard,
            "is_inpainting": merged.is_inpainting,
            "is_instruct_pix2pix": merged.is_instruct_pix2pix,
        }
        models: dict[str, Any] = {}
        for model, sha256 in zip(inputs, hashes):
            models[sha256 or model.path.name] = {
                "name": model.path.name, "legacy_hash": legacy_hash(model.path),
                "sd_merge_recipe": _json_object(model.metadata.get("sd_merge_recipe")),
            }
            earlier = _json_object(model.metadata.get("sd_merge_models"))
            models.update(earlier if isinstance(earlier, dict) else {})
        metadata["sd_merge_recipe"] = json.dumps(recipe)
        metadata["sd_merge_models"] = json.dumps(models)
    return metadata


def default_name(inputs: list[MergeInput], options: MergeOptions, merged: MergedState) -> str:
    """A1111's file name (without its format suffix) for a merge given no custom name."""
    m = options.multiplier
    a = inputs[0].model_name
    if options.method == WEIGHTED_SUM:
        name = f"{round(1 - m, 2)}({a}) + {round(m, 2)}({inputs[1].model_name})"
    elif options.method == ADD_DIFFERENCE:
        name = f"{a} + {round(m, 2)}({inputs[1].model_name} - {inputs[2].model_name})"
    else:
        name = a
    return name + (".inpainting" if merged.is_inpainting else "") + (".instruct-pix2pix" if merged.is_instruct_pix2pix else "")


def config_to_copy(inputs: list[MergeInput], config_source: int) -> Path | None:
    """A1111's `create_config`: the `.yaml` beside A, B or C (the first there is), B's, C's, or none."""
    if config_source == 3:
        return None
    candidates = inputs if config_source == 0 else inputs[config_source:config_source + 1]
    return next((s for s in (sidecar_of(m.path) for m in candidates) if s is not None), None)


# ----------------------------------------------------------------------------------------------------------
# Entry point


@dataclass(frozen=True)
class MergeResult:
    path: Path
    config: Path | None                         # the config copied beside it, if any
    is_inpainting: bool
    is_instruct_pix2pix: bool
    unmatched: tuple[str, ...]                  # A's "model" keys B lacks (kept from A)


def prepare_merge(models: list[str | Path], options: MergeOptions) -> tuple[list[MergeInput], MergedState]:
    """Open the inputs, check they can merge, and check every tensor's shape (no weight read)."""
    needed = MODELS_NEEDED[options.method]
    if len(models) != needed:
        raise MergeError(f"{options.method} merges {needed} model{'s' if needed > 1 else ''} "
                         f"({'A B C'[:2 * needed - 1]}), got {len(models)}")
    try:
        re.compile(options.discard)
    except re.error as exc:
        raise MergeError(f"discard weights: {options.discard!r} is not a regular expression ({exc})") from None
    inputs = [open_input(m, primary=i == 0) for i, m in enumerate(models)]
    check_families(inputs)
    vae = baked_vae(options.vae, inputs[0].family) if options.vae is not None else None
    merged = MergedState(inputs, options, vae)
    if len(inputs) > 1 and merged.merged_count == 0:
        raise MergeError(f"{inputs[1].path} holds none of the weights of {inputs[0].path} (model A): nothing to merge")
    if merged.unmatched:
        logger.warning("%d of A's tensors named like model weights are not in B and stay A's (as A1111 keeps them): "
                       "%s%s", len(merged.unmatched), ", ".join(merged.unmatched[:5]),
                       " ..." if len(merged.unmatched) > 5 else "")
    return inputs, merged


def write_merged(path: Path, merged: MergedState, metadata: Mapping[str, str]) -> Path:
    """Write the merge to `path` atomically, tensor by tensor: `.safetensors`, or `.ckpt` as A1111's `torch.save`
    of the plain dict of tensors writes it (`torch_zip.write_torch_checkpoint`: weights-only loadable, no
    metadata)."""
    from sdlab.checkpoints.io import write_safetensors_atomic
    from sdlab.checkpoints.torch_zip import write_torch_checkpoint
    from sdlab.utils.files import atomic_write

    if path.suffix.lower() == ".safetensors":
        return write_safetensors_atomic(path, merged, metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: write_torch_checkpoint(tmp, merged))
    return path


FORMATS = ("safetensors", "ckpt")


def is_folder_output(out: str | os.PathLike[str]) -> bool:
    """Whether `out` names a folder to write the merge in under A1111's name: an existing folder, or a path
    ending in a separator (`models/`), made when the merge is written as a missing parent of a file is."""
    return Path(out).is_dir() or os.fspath(out).endswith(("/", os.sep))


def merge_checkpoints(models: list[str | Path], out: str | Path, options: MergeOptions = MergeOptions(), *,
                      checkpoint_format: str = "safetensors") -> MergeResult:
    """Merge `models` (A, B, C as the method needs) into `out`, hash it into sdlab's hash cache and copy the config
    `.yaml` beside it as A1111 does (module docstring). `out` is a `.safetensors` or `.ckpt` file, or a folder
    (`is_folder_output`) to write A1111's name for the merge in (`default_name` + `checkpoint_format`)."""
    folder = is_folder_output(out)
    out = Path(out)
    if not folder and out.suffix.lower().lstrip(".") not in FORMATS:
        raise MergeError(f"{out}: the merge is written as .safetensors or .ckpt; name one of these (or a folder/)")
    inputs, merged = prepare_merge(models, options)
    if folder:
        out = out / f"{default_name(inputs, options, merged)}.{checkpoint_format}"
    write_merged(out, merged, merge_metadata(inputs, options, merged))
    file_sha256(out)              # hashed as A1111 hashes the merge it saves: its listings show the hash at once
    config = config_to_copy(inputs, options.config_source)
    if config is not None:
        from sdlab.utils.files import atomic_write

        data = config.read_bytes()
        atomic_write(out.with_suffix(".yaml"), lambda tmp: tmp.write_bytes(data))
        logger.info("copied the config %s to %s", config, out.with_suffix(".yaml"))
    return MergeResult(out, out.with_suffix(".yaml") if config else None, merged.is_inpainting,
                       merged.is_instruct_pix2pix, tuple(merged.unmatched))


__all__ = [
    "ADD_DIFFERENCE", "CONFIG_SOURCES", "FORMATS", "METHODS", "MergeError", "MergeInput", "MergeOptions", "MergeResult",
    "MergedState", "NO_INTERPOLATION", "WEIGHTED_SUM", "default_name", "is_folder_output", "merge_checkpoints",
    "merge_metadata", "open_input", "prepare_merge", "write_merged",
]
