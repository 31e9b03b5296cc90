"""LoRA files in kohya-ss sd-scripts' format (what A1111, ComfyUI and diffusers' `load_lora_weights` read):
reading them, merging them into a loaded model, and the names and metadata that writing them needs.

Each module ``<name>`` has ``<name>.lora_down.weight`` (r, in[, kh, kw]), ``<name>.lora_up.weight``
(out, r[, 1, 1]) and ``<name>.alpha`` (a scalar); merging adds ``multiplier * (alpha / r) * up @ down`` to
the weight of the layer ``<name>`` names. Names are a prefix plus a module path with dots replaced by
underscores, in kohya's convention for each family:

- U-Net of SD1 / SD2 (kohya trains diffusers' U-Net): ``lora_unet_`` + the diffusers path, e.g.
  ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``;
- U-Net of SDXL (kohya trains Stability's SGM U-Net): ``lora_unet_`` + the original path, e.g.
  ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``;
- text encoders: ``lora_te_`` (one encoder) or ``lora_te1_`` / ``lora_te2_`` (SDXL's CLIP-L / bigG) + the
  Hugging Face path, e.g. ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``.

Reading accepts both U-Net conventions for every family (files converted by other tools mix them), and
``lora_te1_`` for a single text encoder (diffusers' kohya converter writes it). Files in diffusers / peft
naming carry no ``alpha`` tensors: their scale is the peft config's ``lora_alpha / r`` (per module where
``alpha_pattern`` / ``rank_pattern`` name it; ``lora_alpha / sqrt(r)`` with rsLoRA) from the
``lora_adapter_metadata`` diffusers writes, else 1; their DoRA magnitudes (``lora_magnitude_vector``, one
norm per output row) merge as peft merges them at a weight (`sdlab.checkpoints.lycoris`: the weight scales
the LoRA product before the rows are renormalised). diffusers' older attention-processor names
(``unet...attn1.processor.to_q_lora.down.weight``; in a text encoder ``...self_attn.to_q_lora.down.weight``,
``to_k`` / ``to_v`` / ``to_out`` for ``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj``) name the layers
diffusers applies them to. ComfyUI's own naming (``diffusion_model.<SGM path>``,
``text_encoders.clip_l.transformer.<HF path>``, as its LoraSave node writes) and SimpleTuner's
``lycoris_<diffusers path>`` name the same layers.
Training writes these files with `sdlab.train.lora`; `kohya_metadata` gives the ``ss_*`` metadata kohya
writes, and `write_lora_file` adds kohya's ``sshs_*`` hashes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor, nn

from sdlab.checkpoints.diffusers_unet import unet_key_map
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.file_format import META_MODELSPEC_PREDICTION, modelspec_prediction, named_preset
from sdlab.checkpoints.io import meta_tensor, read_checkpoint, write_safetensors_atomic
from sdlab.checkpoints.lycoris import FIELDS, merged_weight, module_kind
from sdlab.diffusion.denoiser import Prediction
from sdlab.families import FamilySpec
from sdlab.models.cpu_memory import reusing_large_blocks
from sdlab.models.unet import UNetConfig

logger = logging.getLogger(__name__)

__all__ = [
    "UNET_PREFIX",
    "UnusableLoRAError",
    "apply_lora",
    "bundle_lora_weights",
    "kohya_metadata",
    "kohya_name",
    "kohya_unet_names",
    "load_lora_file",
    "lora_layer_tables",
    "lora_merges",
    "lora_preset",
    "merge_lora_",
    "merged_layers",
    "text_encoder_prefixes",
    "write_layers_",
    "write_lora_file",
]

# the layers a module may name: LoRA / LyCORIS kinds target Linear and Conv2d; full diffs and (IA)^3 norms too
_TARGETS = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)

UNET_PREFIX = "lora_unet_"


def kohya_name(prefix: str, module_path: str) -> str:
    """``lora_unet_`` + ``input_blocks.1.1.attn1.to_q`` -> ``lora_unet_input_blocks_1_1_attn1_to_q``."""
    return prefix + module_path.replace(".", "_")


def text_encoder_prefixes(count: int) -> list[str]:
    """``lora_te_`` for one text encoder, ``lora_te1_``, ``lora_te2_`` for two (SDXL); the Hugging Face
    ``text_model.`` level is part of the name."""
    if count == 1:
        return ["lora_te_text_model_"]
    return [f"lora_te{i + 1}_text_model_" for i in range(count)]


# --- names ---------------------------------------------------------------------------------------------


def _diffusers_module_paths(cfg: UNetConfig) -> dict[str, str]:
    """sdlab (LDM) module path -> diffusers module path, for every module with a weight; empty when the
    config has no diffusers equivalent."""
    try:
        key_map = unet_key_map(cfg)
    except ValueError as exc:
        logger.debug("no diffusers names for this U-Net: %s", exc)
        return {}
    return {ldm[: -len(".weight")]: hf[: -len(".weight")] for ldm, hf in key_map.items() if ldm.endswith(".weight")}


def kohya_unet_names(cfg: UNetConfig, paths: Iterable[str]) -> dict[str, str]:
    """sdlab U-Net module path -> the name kohya-ss writes for it: the SGM (= sdlab) path for SDXL-layout
    U-Nets (those with added conditioning), the diffusers path for SD1 / SD2 layouts (the sdlab path when a
    config has no diffusers form)."""
    diffusers_paths = {} if cfg.adm_in_channels is not None else _diffusers_module_paths(cfg)
    return {path: kohya_name(UNET_PREFIX, diffusers_paths.get(path, path)) for path in paths}


def _unet_layer_table(unet: nn.Module, cfg: UNetConfig) -> dict[str, nn.Module]:
    """kohya name -> layer for every Linear / Conv2d / norm of the U-Net, under its SGM name and (when the config
    has a diffusers equivalent) its diffusers name: files in either convention apply to any family. The attention
    projections also go by an IP-Adapter FaceID file's names (`_ip_adapter_attention_names`)."""
    modules = dict(unet.named_modules())
    layers = {path: m for path, m in modules.items() if isinstance(m, _TARGETS) and m.weight is not None}
    table = {kohya_name(UNET_PREFIX, path): m for path, m in layers.items()}
    for path, hf_path in _diffusers_module_paths(cfg).items():
        if path in layers:
            table.setdefault(kohya_name(UNET_PREFIX, hf_path), layers[path])
    table.update(_ip_adapter_attention_names(unet))
    return table


def _ip_adapter_attention_names(unet: nn.Module) -> dict[str, nn.Module]:
    """kohya name -> layer of the U-Net LoRA an IP-Adapter FaceID file holds (``ip_adapter.{n}.to_q_lora.down.weight``
    ..., read as ``lora_unet_ip_adapter_{n}_to_q`` / ``_to_out_0``): n numbers every attention as diffusers'
    ``attn_processors`` does (`models.ip_adapter.all_attentions`), which is how diffusers' `_load_ip_adapter_loras`
    names them."""
    from sdlab.models.ip_adapter import all_attentions

    table = {}
    for n, attn in enumerate(all_attentions(unet)):
        for name, layer in (("to_q", attn.to_q), ("to_k", attn.to_k), ("to_v", attn.to_v), ("to_out.0", attn.to_out[0])):
            table[kohya_name(UNET_PREFIX, f"ip_adapter.{n}.{name}")] = layer
    return table


def _text_layer_table(text_encoders) -> dict[str, nn.Module]:
    """kohya name -> layer of each text encoder (``lora_te_`` / ``lora_te1_`` / ``lora_te2_``, with or without
    the ``text_model`` level); ``lora_te_`` also names the first of two (diffusers' ``text_encoder.``), and
    ``lora_te1_`` the only one (diffusers' ``convert_state_dict_to_kohya`` numbers it so)."""
    table: dict[str, nn.Module] = {}
    for i, (prefix, te) in enumerate(zip(text_encoder_prefixes(len(text_encoders)), text_encoders)):
        for module_path, m in te.model.named_modules():
            if isinstance(m, _TARGETS) and m.weight is not None:
                names = [prefix, prefix.replace("text_model_", "")]     # some files omit the text_model level
                if i == 0:
                    names += ["lora_te_text_model_", "lora_te_", "lora_te1_text_model_", "lora_te1_"]
                for name in names:
                    table.setdefault(kohya_name(name, module_path), m)
    return table


# --- metadata and writing ------------------------------------------------------------------------------


def kohya_metadata(family: FamilySpec, prediction: Prediction | str, rank: int, alpha: float, *,
                   title: str = "", resolution: int | None = None, comment: str = "") -> dict[str, str]:
    """The metadata kohya-ss writes into a LoRA file (``ss_*`` and the SAI model spec), as strings; the
    family's names for it are its ``FamilySpec.kohya``."""
    prediction = Prediction.parse(prediction)
    size = resolution or family.size_for(prediction)
    names = family.kohya
    spec_prediction = modelspec_prediction(prediction)
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": str(float(alpha)),
        "ss_v2": str(names.v2),
        "ss_base_model_version": names.version(prediction),
        "ss_v_parameterization": str(prediction is Prediction.V),
        "ss_training_comment": comment,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": names.architecture_for(prediction),
        "modelspec.implementation": names.implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{size}x{size}",
        **({META_MODELSPEC_PREDICTION: spec_prediction} if spec_prediction else {}),     # none for x0
    }


def _kohya_hashes(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """kohya's ``sshs_model_hash`` (sha256 of the tensor data) and ``sshs_legacy_hash`` (8 hex digits of the
    sha256 of 64 KiB at 1 MiB into the file written with only the ``ss_*`` metadata)."""
    blob = safetensors.torch.save(dict(tensors), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    data_start = 8 + int.from_bytes(blob[:8], "little")     # safetensors' own bytes: header length, header, data
    return {"sshs_model_hash": hashlib.sha256(blob[data_start:]).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]}


def write_lora_file(path: str | os.PathLike[str], tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> Path:
    """Write a kohya-format LoRA atomically, with kohya's ``sshs_*`` hashes added to `metadata`."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return write_safetensors_atomic(path, tensors, {**metadata, **_kohya_hashes(tensors, metadata)})


# --- reading -------------------------------------------------------------------------------------------

# key suffix -> field (`sdlab.checkpoints.lycoris`), most specific first: kohya / LyCORIS, peft
# (``lora_A`` / ``lora_B``; DoRA's ``lora_magnitude_vector``, one norm per output row, merged by peft's rule:
# A1111 and ComfyUI read only ``dora_scale``), diffusers' older
# ``lora.down`` / attention-processor ``to_q_lora.down`` names
_MAGNITUDE = ".lora_magnitude_vector"
_SUFFIXES = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_mid.weight", "mid"),
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (_MAGNITUDE + ".default.weight", "magnitude"), (_MAGNITUDE + ".weight", "magnitude"), (_MAGNITUDE, "magnitude"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".w_norm", "diff"), (".b_norm", "diff_b"),             # LyCORIS ``train_norm``: a norm layer's full diff
    *((f".{field[len('glora_'):]}.weight", field) for field in FIELDS if field.startswith("glora_")),   # a1.weight ...
    *((f".{field}", field) for field in FIELDS if field not in ("down", "up", "mid", "weight") and not field.startswith("glora_")),
    (".weight", "weight"),                                          # (IA)^3, only beside ``on_input``
)
# a module name's start -> kohya's prefix: diffusers / peft components; ComfyUI's own model paths (comfy/lora.py
# `model_lora_keys_unet` / `model_lora_keys_clip`: ``diffusion_model.<SGM path>``, ``text_encoders.<clip>.
# transformer.<HF path>``, with CLIP-L SD1's and SDXL's first encoder, CLIP-H SD2's, CLIP-G SDXL's second)
_TEXT_PREFIXES = (("text_encoder_2.", "lora_te2_"), ("text_encoder.", "lora_te_"), ("unet.", UNET_PREFIX),
                  ("diffusion_model.", UNET_PREFIX), ("text_encoders.clip_l.transformer.", "lora_te1_"),
                  ("text_encoders.clip_h.transformer.", "lora_te_"), ("text_encoders.clip_g.transformer.", "lora_te2_"))
_LYCORIS_PREFIX = "lycoris_"     # SimpleTuner's LyCORIS files: lycoris_ + the diffusers path (ComfyUI reads them)
# diffusers' older text-encoder attention names -> Hugging Face's (state_dict_utils.py DIFFUSERS_OLD_TO_PEFT)
_OLD_TEXT_ATTENTION = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


_IP_ADAPTER_WEIGHT = re.compile(r"image_proj\.|ip_adapter\.\d+\.to_[kv]_ip\.")   # a FaceID file's adapter part


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, field in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], field
    return None


def _kohya_module_name(name: str) -> str:
    """A module name of any supported naming -> kohya's: ``lora_*`` names are kept, ``lycoris_*`` become
    ``lora_unet_*``; diffusers / peft names (``unet.down_blocks.0...to_q``, ``text_encoder.text_model...q_proj``,
    bare U-Net paths as ``save_attn_procs`` writes them, ``...attn1.processor.to_out``; a text encoder's
    ``...self_attn.to_q``, read as ``q_proj``) and ComfyUI's (``diffusion_model.input_blocks...``,
    ``text_encoders.clip_l.transformer.text_model...``) become ``lora_unet_`` / ``lora_te_`` / ``lora_te1_``
    / ``lora_te2_`` + the path with underscores."""
    if name.startswith("lora_"):
        return name
    if name.startswith(_LYCORIS_PREFIX):
        return UNET_PREFIX + name[len(_LYCORIS_PREFIX):]
    name = name.removeprefix("base_model.model.")
    prefix = UNET_PREFIX
    for start, kohya_prefix in _TEXT_PREFIXES:
        if name.startswith(start):
            name, prefix = name[len(start):], kohya_prefix
            break
    name = name.replace(".processor.", ".")
    head, _, last = name.rpartition(".")
    if prefix != UNET_PREFIX and last in _OLD_TEXT_ATTENTION:      # diffusers' older text-encoder names
        name = f"{head}.{_OLD_TEXT_ATTENTION[last]}"
    elif last == "to_out":                                         # attention processors' to_out_lora
        name += ".0"
    return kohya_name(prefix, name)


# key suffix -> the peft adapter kind whose files carry it and sdlab does not merge (peft's OFT ``oft_R`` / older
# ``oft_r``, BOFT ``boft_R`` / ``boft_s``, (IA)^3 ``ia3_l``, VeRA ``vera_lambda_b`` / ``vera_lambda_d``)
_PEFT_UNSUPPORTED = ((".oft_R.weight", "OFT"), (".oft_r", "OFT"), (".boft_R", "BOFT"), (".ia3_l", "(IA)^3"),
                     (".vera_lambda_b", "VeRA"))


def _unsupported_kind(state: Mapping[str, Tensor]) -> str | None:
    """The adapter kind of a file whose keys are one's that sdlab does not merge: the LyCORIS kind A1111 /
    ComfyUI read ("LyCORIS OFT / BOFT": ``oft_blocks`` / ``oft_diag``) and peft's ("peft OFT", ...
    `_PEFT_UNSUPPORTED`); else None."""
    if any(key.endswith((".oft_blocks", ".oft_diag")) for key in state):
        return "LyCORIS OFT / BOFT"
    for suffix, kind in _PEFT_UNSUPPORTED:
        if any(key.endswith(suffix) for key in state):
            return f"peft {kind}"
    return None


class UnusableLoRAError(CheckpointError):
    """A file with LoRA / LyCORIS keys that sdlab cannot merge: a kind it does not read (LyCORIS OFT / BOFT, peft
    OFT / BOFT / (IA)^3 / VeRA) or a module with missing, non-numeric or non-finite tensors."""


def load_lora_file(path: str | os.PathLike[str], *, weights: bool = True) -> dict[str, dict[str, Tensor]]:
    """kohya name -> {field: tensor} (fields of `sdlab.checkpoints.lycoris`: "down", "up", "alpha" for a
    LoRA; "hada_w1_a", ... for LyCORIS kinds) from a LoRA / LyCORIS file in kohya, LyCORIS, diffusers or peft
    naming. A file that is not one (a full checkpoint, an empty or unreadable file) is a `CheckpointError`
    naming it; one of an unsupported kind, or a module with missing or non-finite tensors, an
    `UnusableLoRAError`. Without `weights`, every tensor but the
    alphas is on the meta device: a safetensors file is read from its header and alphas only, and values
    are not checked (`sdlab inspect`)."""
    state, metadata = read_checkpoint(path, nested=Path(path).suffix.lower() == ".bin")   # h94's FaceID .bin
    peft = _peft_configs(path, metadata)
    groups: dict[str, dict[str, str]] = {}
    for key in state:
        split = _split_key(key)
        if split is not None:
            groups.setdefault(split[0], {})[split[1]] = key
    modules = {name: g for name, g in groups.items() if any(FIELDS[f] and f != "weight" for f in g)}
    if not modules:
        unsupported = _unsupported_kind(state)
        if unsupported:
            raise UnusableLoRAError(f"{path}: a {unsupported} file ({', '.join(list(state)[:2])}); sdlab merges "
                                    f"LoRA / LoCon, LoHa, LoKr, GLoRA, LyCORIS (IA)^3, full diffs and DoRA, not {unsupported}")
        if {"emb_params", "clip_l", "clip_g"} & state.keys():          # `embeddings.load_embedding`'s keys
            raise CheckpointError(f"{path}: a textual-inversion embedding ({', '.join(list(state)[:2])}), not a LoRA: "
                                  f"its name in a prompt uses it, from an embeddings folder (--embeddings-dir)")
        raise CheckpointError(
            f"{path}: not a LoRA file: no LoRA / LyCORIS module keys ('<name>.lora_down.weight', "
            f"'<name>.hada_w1_a', '<name>.lokr_w1', '<name>.diff', ...) among its {len(state)} tensors "
            f"(e.g. {', '.join(list(state)[:2])}); a full model is passed with --model")
    used = {key for g in modules.values() for key in g.values()}
    others = [key for key in state if key not in used and not _IP_ADAPTER_WEIGHT.match(key)]
    if others:
        logger.warning("%s: ignoring %d tensors that are not LoRA / LyCORIS module weights, e.g. %s",
                       path, len(others), ", ".join(others[:3]))
    lora: dict[str, dict[str, Tensor]] = {}
    for name, g in modules.items():
        entry = {field: state[key] if weights or field == "alpha" else meta_tensor(state, key)
                 for field, key in g.items()}
        if "magnitude" in entry:                      # peft: (out,) for a Linear, (1, out, 1, 1) for a conv
            entry["magnitude"] = entry["magnitude"].flatten()
        if peft and "down" in entry and "alpha" not in entry:
            alpha = _peft_alpha(peft, name, entry["down"].shape[0])
            if alpha is not None:
                entry["alpha"] = torch.tensor(alpha)
        try:
            module_kind(entry)
        except ValueError as exc:
            raise UnusableLoRAError(f"{path}: module {name}: {exc}") from None
        if any(not t.is_floating_point() for f, t in entry.items() if f not in ("on_input", "alpha")):  # alpha: any number
            raise UnusableLoRAError(f"{path}: LoRA module {name} has non-floating-point weights")
        if weights and not all(bool(torch.isfinite(t.to(torch.float32)).all()) for t in entry.values()):
            raise UnusableLoRAError(f"{path}: LoRA module {name} has NaN or infinite weights")
        kohya = _kohya_module_name(name)
        if kohya in lora:
            raise UnusableLoRAError(f"{path}: two modules for the layer {kohya} ({name} and another naming)")
        lora[kohya] = entry
    return lora


PEFT_METADATA_KEY = "lora_adapter_metadata"   # diffusers' `save_lora_weights` / `save_lora_adapter`
_PEFT_COMPONENTS = ("text_encoder_2", "text_encoder", "unet")


def _peft_configs(path, metadata: Mapping[str, str]) -> dict[str, dict]:
    """Component ("unet", "text_encoder", "text_encoder_2"; "" in a single model's file) -> its peft LoRA
    config fields (``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora``), from the JSON
    diffusers stores under ``lora_adapter_metadata`` with ``<component>.`` before each field."""
    raw = metadata.get(PEFT_METADATA_KEY)
    if not raw:
        return {}
    try:
        fields = json.loads(raw)
    except ValueError:
        fields = None
    if not isinstance(fields, dict):
        logger.warning("%s: unreadable %s metadata; LoRA scales default to 1", path, PEFT_METADATA_KEY)
        return {}
    configs: dict[str, dict] = {}
    for key, value in fields.items():
        component, _, field = key.rpartition(".")
        configs.setdefault(component, {})[field] = value
    return configs


def _peft_pattern(patterns, module_path: str, default):
    """peft's `get_pattern_key`: the value of the first pattern that matches the end of the module path."""
    for pattern, value in (patterns if isinstance(patterns, dict) else {}).items():
        try:
            if re.match(rf"(.*\.)?({pattern})$", module_path):
                return value
        except re.error:                 # not a regular expression: it names no module
            continue
    return default


def _peft_alpha(configs: Mapping[str, dict], name: str, rank: int) -> float | None:
    """The ``alpha`` that gives the module `name` (a file's peft / diffusers module name) of rank `rank` the
    scale peft gives it: ``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA. None without a config for it."""
    component = next((c for c in _PEFT_COMPONENTS if name.startswith(c + ".")), "")
    config = configs.get(component)
    if not isinstance(config, dict) or not isinstance(config.get("lora_alpha"), (int, float)):
        return None
    path = name[len(component) + 1:] if component else name
    path = path.removeprefix("base_model.model.")
    try:
        alpha = float(_peft_pattern(config.get("alpha_pattern"), path, config["lora_alpha"]))
        r = float(_peft_pattern(config.get("rank_pattern"), path, config.get("r", rank)))
    except (TypeError, ValueError):      # a value that is not a number: no scale from the metadata
        return None
    if not (math.isfinite(alpha) and math.isfinite(r) and r > 0):
        return None
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r) * rank


# --- merging -------------------------------------------------------------------------------------------

# layer -> the modules to merge into it, in order: (kohya name, module, multiplier)
LayerMerges = dict[nn.Module, list[tuple[str, Mapping[str, Tensor], float]]]


_LATENT_IN = 4          # conv_in's input channels for the latent alone; wider ones: + the mask and the masked latent
_EXTRA_IN = {9: "an inpainting", 8: "an edit"}          # (inpainting), + the picture's latent (edit)
_INPAINT_IN = 9         # the width A1111 zero-pads a latent-only update to


def _merged_weight(name: str, module: Mapping[str, Tensor], weight: Tensor,
                   multiplier: float) -> tuple[Tensor | None, Tensor | None]:
    """`merged_weight`, and A1111's handling (networks.py `network_apply_weights`) of a module for a
    4-channel ``conv_in`` on a U-Net whose ``conv_in`` takes more: on an inpainting U-Net's 9 channels the update
    is zero-padded to 9 input channels (``F.pad(updown, (0, 0, 0, 0, 0, 5))``), so it changes the latent's 4 and
    leaves the mask's and the masked image's. A1111 pads for 9 channels alone: on an edit (InstructPix2Pix) U-Net's
    8 the sum fails, and its padding fails for (IA)^3 and DoRA modules (their update depends on the whole
    weight); the reverse, a module for 9 or 8 channels on a 4-channel ``conv_in``, does not fit either. There
    A1111 logs an error and leaves the layer as it is, and so does this, with a warning (new weight None); the
    rest of the file applies. (A LoHa without Tucker cores is padded here too, where A1111's padding of its 2-D
    update fails: its update does not depend on the weight, so padding it is unambiguous.)"""
    try:
        return merged_weight(module, weight, multiplier)
    except ValueError as exc:
        if weight.ndim != 4 or (weight.shape[1] != _LATENT_IN and weight.shape[1] not in _EXTRA_IN):
            raise
        error = exc
    if weight.shape[1] in _EXTRA_IN:
        try:
            latent, delta_bias = merged_weight(module, weight[:, :_LATENT_IN], multiplier)   # (out, 4, kh, kw)
        except ValueError:
            raise error from None
        dora = "dora_scale" in module or "magnitude" in module
        if weight.shape[1] == _INPAINT_IN and not dora and module_kind(module) != "ia3":
            return torch.cat([latent, weight[:, _LATENT_IN:]], dim=1), delta_bias
        kind = "" if weight.shape[1] != _INPAINT_IN else " DoRA" if dora else " (IA)^3"
        reason = f"a {_LATENT_IN}-channel{kind} module"
    else:
        for channels, model in _EXTRA_IN.items():
            padded = torch.nn.functional.pad(weight, (0, 0, 0, 0, 0, channels - _LATENT_IN))
            try:
                merged_weight(module, padded, multiplier)
            except ValueError:
                continue
            reason = f"a module for {model} model's {channels} input channels"
            break
        else:
            raise error from None
    logger.warning("LoRA module %s is %s on a %d-channel conv: the layer is left as it is, as in A1111",
                   name, reason, weight.shape[1])
    return None, None


def _on_meta(module: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`module`'s tensors as shapes only (meta), but the fields read as numbers (alpha, on_input)."""
    return {f: t if f in ("alpha", "on_input") else t.to("meta") for f, t in module.items()}


def _merge_module(name: str, module: Mapping[str, Tensor], weight: Tensor, bias: Tensor | None,
                  multiplier: float) -> tuple[Tensor, Tensor | None] | None:
    """(weight, bias) in float32 after merging `module` at `multiplier` into a layer's float32 (weight, bias);
    None where the layer is left as it is (`_merged_weight`). ValueError names a module that does not fit."""
    try:
        new_weight, delta_bias = _merged_weight(name, module, weight, multiplier)
    except ValueError as exc:
        raise ValueError(f"module {name}: {exc}") from None
    if new_weight is None:
        return None
    if delta_bias is not None:
        if bias is None or delta_bias.numel() != bias.numel():
            raise ValueError(f"module {name}: diff_b {tuple(delta_bias.shape)} does not fit the layer's bias")
        bias = bias + delta_bias.to(bias.device).reshape(bias.shape)
    return new_weight.to(weight.device), bias


def lora_merges(layers: Mapping[str, nn.Module], lora: Mapping[str, Mapping[str, Tensor]], multiplier: float,
                merges: LayerMerges | None = None) -> tuple[LayerMerges, list[str]]:
    """(`merges` with `lora`'s modules at `multiplier` added to the named layers; the names that match no
    layer). Computes nothing: each module is merged on the meta device (shapes only), so ValueError names a
    module that does not fit its layer before any layer is written, and modules a layer is left without
    (`_merged_weight`) are not added."""
    merges = {layer: list(modules) for layer, modules in (merges or {}).items()}
    unmatched = []
    for name, entry in lora.items():
        layer = layers.get(name)
        if layer is None:
            unmatched.append(name)
            continue
        weight = torch.empty_like(layer.weight, dtype=torch.float32, device="meta")
        bias = None if layer.bias is None else torch.empty_like(layer.bias, dtype=torch.float32, device="meta")
        if _merge_module(name, _on_meta(entry), weight, bias, multiplier) is not None:
            merges.setdefault(layer, []).append((name, entry, multiplier))
    return merges, unmatched


@torch.no_grad()
def merged_layers(merges: LayerMerges) -> Iterator[tuple[nn.Module, Tensor, Tensor | None]]:
    """(layer, new weight, new bias or None where it stays), in float32, for each layer of `merges` in turn:
    a stack of LoRAs adds up in float32 (cast once, by the caller), and only one layer's float32 copy is
    made at a time (the next is computed once the caller has taken this one). The float32 blocks of one layer
    serve the next (`reusing_large_blocks`): fresh pages are faulted in for the largest layer only, not for
    every layer's weight, update and sum."""
    with reusing_large_blocks(torch.device("cpu")):
        for layer, modules in merges.items():
            weight = layer.weight.to(torch.float32)
            own_bias = bias = None if layer.bias is None else layer.bias.to(torch.float32)
            for name, module, multiplier in modules:
                weight, bias = _merge_module(name, module, weight, bias, multiplier)
            yield layer, weight, None if bias is own_bias else bias


@torch.no_grad()
def write_layers_(merges: LayerMerges) -> None:
    """Merge `merges` into their layers in place, one layer at a time (`merged_layers`), in each layer's dtype."""
    for layer, weight, bias in merged_layers(merges):
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)


def merge_lora_(layers: Mapping[str, nn.Module], lora: Mapping[str, Mapping[str, Tensor]], multiplier: float) -> list[str]:
    """Merge `lora` into the named layers in place at `multiplier` (computed in float32), after checking
    that every matched module fits (nothing changes otherwise). Returns the names that matched no layer."""
    merges, unmatched = lora_merges(layers, lora, multiplier)
    write_layers_(merges)
    return unmatched


def lora_layer_tables(bundle) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """(U-Net layers, text-encoder layers) of a `ModelBundle` by kohya name, in every naming files use."""
    return _unet_layer_table(bundle.unet, bundle.unet_config), _text_layer_table(bundle.text_encoders)


def bundle_lora_weights(bundle, path: str | os.PathLike[str], lora: Mapping[str, Mapping[str, Tensor]],
                        te_multiplier: float, unet_multiplier: float,
                        current: LayerMerges | None = None) -> tuple[LayerMerges, int]:
    """The merges (`lora_merges`) of `lora` (the content of `path`) into `bundle`'s layers at `te_multiplier`
    on the text encoders and `unet_multiplier` on the U-Net, after those of `current`; and the number of
    modules that matched. Nothing is computed or written. None matching, or a module that does not fit its layer, is a
    `CheckpointError` naming the file; some not matching is a warning (as in A1111)."""
    unet_layers, text_layers = lora_layer_tables(bundle)
    unet_part = {n: e for n, e in lora.items() if n in unet_layers}
    text_part = {n: e for n, e in lora.items() if n in text_layers and n not in unet_part}
    unmatched = [n for n in lora if n not in unet_part and n not in text_part]
    if not unet_part and not text_part:
        raise CheckpointError(
            f"{path}: none of its {len(lora)} LoRA modules matches a layer of this {bundle.family.name} model "
            f"(e.g. {', '.join(list(lora)[:2])}): a LoRA for another model family?")
    try:
        merges, _ = lora_merges(unet_layers, unet_part, unet_multiplier, current)
        merges, _ = lora_merges(text_layers, text_part, te_multiplier, merges)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}: a LoRA for another model?") from exc
    if unmatched:
        logger.warning("%s: %d LoRA module(s) match no layer of this model, e.g. %s", path, len(unmatched), unmatched[:3])
    return merges, len(unet_part) + len(text_part)


def lora_preset(path: str | os.PathLike[str]) -> str | None:
    """The preset a LoRA file names in its metadata (`sdlab.preset`, e.g. "lcm" for an LCM-LoRA sdlab
    trained), or None (no metadata, as in pickled files)."""
    if Path(path).suffix.lower() != ".safetensors":
        return None
    _, metadata = read_checkpoint(path)
    return named_preset(metadata)


def apply_lora(bundle, path: str | os.PathLike[str], multiplier: float = 1.0,
               lora: Mapping[str, Mapping[str, Tensor]] | None = None,
               unet_multiplier: float | None = None) -> int:
    """Merge a LoRA / LyCORIS file into a `ModelBundle`'s U-Net and text encoders, permanently, at
    ``multiplier`` (A1111's ``<lora:name:weight>``, sdlab's ``--lora FILE:WEIGHT``; ``unet_multiplier``,
    when given, is the U-Net's and ``multiplier`` the text encoders'). Returns the number of layers
    changed; errors as `bundle_lora_weights`. ``lora`` is the file's content when already read by
    `load_lora_file` (so a bad file is found before a model is loaded)."""
    lora = load_lora_file(path) if lora is None else lora
    unet_multiplier = multiplier if unet_multiplier is None else unet_multiplier
    merges, matched = bundle_lora_weights(bundle, path, lora, multiplier, unet_multiplier)
    write_layers_(merges)
    logger.info("applied LoRA %s at %.3g to %d layers", path, multiplier, matched)
    return matched
