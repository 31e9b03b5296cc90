"""Which family a checkpoint belongs to, from key names and tensor shapes only (never weight values).

Evidence is collected first (`Evidence.of`), then an ordered list of probes (`PROBES`) is walked; the first
probe that matches names the base family and the U-Net's input width picks the inpainting variant:

  1. text-encoder keys, the strongest signal because they follow the release's module tree:
       `conditioner.embedders.0.model.*` and no `conditioner.embedders.1.*`  -> sdxl-refiner (bigG only)
       `conditioner.embedders.0.transformer.*` + `conditioner.embedders.1.model.*` -> sdxl
       `cond_stage_model.model.*` (OpenCLIP)                                   -> sd2
       `cond_stage_model.transformer.*` + Linear `proj_in` + an f=4 VAE        -> sdlab-tiny (sdlab's own model)
       `cond_stage_model.transformer.*` (Hugging Face CLIP)                    -> sd1
  2. U-Net-only files: the vector-conditioning width `label_emb.0.0.weight` (2816 sdxl, 2560 refiner);
  3. the cross-attention context width from `attn2.to_k.weight` (768 sd1, 1024 sd2, 2048 sdxl, 1280 refiner).
  Widths never decide between families that share a layout: a reduced SD1 file (32-64-128-128, context 128,
  as the ecosystem's tiny test models) is SD1 by its structure, and sizes are then inferred from the tensors.
  sdlab-tiny is recognised by its `sdlab.family` metadata, or by the structure only it has in an SD1 layout:
  Linear attention projections (SD1 uses 1x1 convs) and an f=4 VAE (three encoder levels; SD's is f=8).
  Then `input_blocks.0.0.weight` has 4 input channels (plain) or 9 (inpainting: latent, mask, masked latent).

Consistency checks follow (an SDXL layout needs `label_emb`; SD1/SD2 must not have one), so a mixed-up file
fails with the evidence instead of loading wrongly. Diffusers folders are detected from `model_index.json`
and the component configs (`detect_diffusers_family`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.io import shapes_of
from sdlab.families import FamilySpec, get_family
from sdlab.families.base import UNET_PREFIX, VAE_PREFIX
from sdlab.families.sdlab_tiny import SDLAB_TINY

_CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"
_LABEL_EMB = UNET_PREFIX + "label_emb.0.0.weight"
_TO_K = re.compile(re.escape(UNET_PREFIX) + r".*\.attn2\.to_k\.weight$")

_TEXT_PREFIXES = (
    "cond_stage_model.transformer.",
    "cond_stage_model.model.",
    "conditioner.embedders.0.transformer.",
    "conditioner.embedders.0.model.",
    "conditioner.embedders.1.model.",
)
_VAE_DOWN = re.compile(re.escape(VAE_PREFIX) + r"encoder\.down\.(\d+)\.")
_PROJ_IN = re.compile(re.escape(UNET_PREFIX) + r".*\.proj_in\.weight$")
_DOWNSAMPLE = re.compile(re.escape(UNET_PREFIX) + r"input_blocks\.\d+\.0\.op\.weight$")
_CONTEXT_TO_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl-refiner"}
_ADM_TO_FAMILY = {2816: "sdxl", 2560: "sdxl-refiner"}


@dataclass(frozen=True)
class Evidence:
    """What detection looks at, gathered once from the key names and shapes."""

    num_keys: int
    has_unet: bool
    in_channels: int | None
    context_dim: int | None
    adm_in_channels: int | None
    text_prefixes: frozenset[str]
    top_level_prefixes: tuple[str, ...]
    unet_levels: int | None = None          # 1 + number of Downsample blocks
    linear_proj: bool | None = None         # attention proj_in is a Linear (SD2/SDXL/sdlab-tiny) or a 1x1 conv (SD1)
    vae_factor: int | None = None           # 2 ** (encoder levels - 1); None without VAE keys

    @classmethod
    def of(cls, shapes: Mapping[str, torch.Size]) -> Evidence:
        conv_in = shapes.get(_CONV_IN)
        label_emb = shapes.get(_LABEL_EMB)
        context_dim = next((s[1] for k, s in shapes.items() if len(s) == 2 and _TO_K.match(k)), None)
        proj_in = next((s for k, s in shapes.items() if _PROJ_IN.match(k)), None)
        vae_levels = {m.group(1) for k in shapes if (m := _VAE_DOWN.match(k))}
        text = frozenset(p for p in _TEXT_PREFIXES if any(k.startswith(p) for k in shapes))
        tops: dict[str, int] = {}
        for key in shapes:
            top = key.split(".", 1)[0]
            tops[top] = tops.get(top, 0) + 1
        return cls(
            num_keys=len(shapes),
            has_unet=any(k.startswith(UNET_PREFIX) for k in shapes),
            in_channels=conv_in[1] if conv_in is not None and len(conv_in) == 4 else None,
            context_dim=int(context_dim) if context_dim is not None else None,
            adm_in_channels=label_emb[1] if label_emb is not None and len(label_emb) == 2 else None,
            text_prefixes=text,
            top_level_prefixes=tuple(f"{t}. ({n} keys)" for t, n in sorted(tops.items(), key=lambda kv: -kv[1])),
            unet_levels=1 + sum(1 for k in shapes if _DOWNSAMPLE.match(k)) if conv_in is not None else None,
            linear_proj=len(proj_in) == 2 if proj_in is not None else None,
            vae_factor=2 ** (len(vae_levels) - 1) if vae_levels else None,
        )

    def describe(self) -> str:
        parts = [f"{self.num_keys} keys"]
        parts.append(f"U-Net input channels {self.in_channels}" if self.in_channels else "no U-Net conv_in")
        if self.context_dim:
            parts.append(f"cross-attention context {self.context_dim}")
        if self.adm_in_channels:
            parts.append(f"label_emb width {self.adm_in_channels}")
        parts.append("text keys under " + (", ".join(sorted(self.text_prefixes)) or "no known prefix"))
        if self.unet_levels:
            parts.append(f"{self.unet_levels} U-Net levels")
        if self.linear_proj is not None:
            parts.append("Linear attention projections" if self.linear_proj else "1x1-conv attention projections")
        if self.vae_factor:
            parts.append(f"f={self.vae_factor} VAE")
        return "; ".join(parts)


@dataclass(frozen=True)
class Probe:
    """One detection rule: when `matches(evidence)`, the checkpoint is of base family `family`."""

    family: str
    says: str
    matches: Callable[[Evidence], bool]


PROBES: tuple[Probe, ...] = (
    Probe(
        "sdxl-refiner",
        "conditioner.embedders.0.model.* (OpenCLIP bigG alone)",
        lambda e: "conditioner.embedders.0.model." in e.text_prefixes
        and "conditioner.embedders.1.model." not in e.text_prefixes,
    ),
    Probe(
        "sdxl",
        "conditioner.embedders.0.transformer.* + conditioner.embedders.1.model.* (CLIP-L + OpenCLIP bigG)",
        lambda e: {"conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."} <= e.text_prefixes,
    ),
    Probe("sd2", "cond_stage_model.model.* (OpenCLIP ViT-H)", lambda e: "cond_stage_model.model." in e.text_prefixes),
    Probe(
        "sdlab-tiny",
        "cond_stage_model.transformer.* with Linear attention projections and an f=4 VAE (sdlab's own model)",
        lambda e: "cond_stage_model.transformer." in e.text_prefixes and e.linear_proj is True
        and e.vae_factor == SDLAB_TINY.vae.downsample_factor,
    ),
    Probe(
        "sd1", "cond_stage_model.transformer.* (CLIP ViT-L)", lambda e: "cond_stage_model.transformer." in e.text_prefixes
    ),
    Probe("sdxl-refiner", "label_emb width 2560", lambda e: e.adm_in_channels == 2560),
    Probe("sdxl", "label_emb width 2816", lambda e: e.adm_in_channels == 2816),
    *(
        Probe(name, f"cross-attention context {dim}", lambda e, dim=dim: e.adm_in_channels is None and e.context_dim == dim)
        for dim, name in _CONTEXT_TO_FAMILY.items()
    ),
)


def _inpaint_variant(base: str, evidence: Evidence) -> str:
    if evidence.in_channels == 4:
        return base
    if evidence.in_channels == 9:
        name = f"{base}-inpaint"
        try:
            get_family(name)
        except ValueError:
            raise CheckpointError(f"found a 9-channel (inpainting) U-Net in a {base} checkpoint; sdlab knows no {name}") from None
        return name
    raise CheckpointError(
        f"U-Net takes {evidence.in_channels} input channels; expected 4 (text-to-image) or 9 (inpainting)"
    )


def _check_consistent(family: FamilySpec, evidence: Evidence, probe: Probe) -> None:
    if family.is_sdxl and evidence.adm_in_channels is None:
        raise CheckpointError(
            f"checkpoint looks like {family.name} ({probe.says}) but its U-Net has no label_emb "
            f"(SDXL's size/crop vector input); found: {evidence.describe()}"
        )
    if not family.is_sdxl and evidence.adm_in_channels is not None:
        raise CheckpointError(
            f"checkpoint looks like {family.name} ({probe.says}) but its U-Net has a label_emb of width "
            f"{evidence.adm_in_channels}, which only SDXL models have; found: {evidence.describe()}"
        )


def detect_family(keys_and_shapes: Mapping[str, torch.Size | Tensor], override: str | None = None) -> FamilySpec:
    """The family of an original-layout (LDM / sgm) state dict, from names and shapes only.

    `override` (a family name) skips the probes; it is still checked against the U-Net's input channels.
    Raises `CheckpointError` saying what was found and what was expected.
    """
    shapes = shapes_of(keys_and_shapes)
    evidence = Evidence.of(shapes)
    if not evidence.has_unet:
        raise CheckpointError(
            f"no key starting with {UNET_PREFIX} (the U-Net); top-level prefixes: "
            f"{', '.join(evidence.top_level_prefixes[:8]) or 'none'}; expected an SD1/SD2/SDXL checkpoint in the "
            "original single-file layout (model.diffusion_model., first_stage_model., cond_stage_model. or conditioner.)"
        )
    if evidence.in_channels is None:
        raise CheckpointError(f"U-Net keys present but {_CONV_IN} is missing or not a 4-D conv weight")
    if override is not None:
        try:
            family = get_family(override)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
        if family.unet.in_channels != evidence.in_channels:
            raise CheckpointError(
                f"family {family.name} expects a {family.unet.in_channels}-channel U-Net input, "
                f"the file has {evidence.in_channels}"
            )
        return family
    for probe in PROBES:
        if probe.matches(evidence):
            family = get_family(_inpaint_variant(probe.family, evidence))
            _check_consistent(family, evidence, probe)
            return family
    raise CheckpointError(
        f"cannot tell the model family: {evidence.describe()}; expected text-encoder keys under "
        f"{' or '.join(_TEXT_PREFIXES[:4])}, a label_emb of width 2816/2560, or a context width of "
        "768/1024/2048/1280; pass the family explicitly (--family sd1|sd2|sdxl|...)"
    )


def detect_diffusers_family(
    model_index: Mapping[str, Any],
    unet_config: Mapping[str, Any],
    text_encoder_config: Mapping[str, Any] | None,
    override: str | None = None,
) -> FamilySpec:
    """The family of a diffusers folder from `model_index.json`, `unet/config.json` and the first text encoder.

    SDXL: the U-Net has `addition_embed_type == "text_time"`; the refiner has no `text_encoder` (only
    `text_encoder_2`). SD1 vs SD2: the text encoder's activation (`quick_gelu` CLIP-L vs `gelu` OpenCLIP),
    then the context width. Inpainting: 9 U-Net input channels.
    """
    in_channels = int(unet_config.get("in_channels", 4))
    if override is not None:
        try:
            family = get_family(override)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
        if family.unet.in_channels != in_channels:
            raise CheckpointError(
                f"family {family.name} expects a {family.unet.in_channels}-channel U-Net input, the folder has {in_channels}"
            )
        return family
    class_name = str(model_index.get("_class_name", ""))
    evidence = f"model_index _class_name {class_name!r}, U-Net in_channels {in_channels}"
    if unet_config.get("addition_embed_type") == "text_time":
        has_first_encoder = _component_present(model_index, "text_encoder")
        base = "sdxl" if has_first_encoder else "sdxl-refiner"
    elif unet_config.get("addition_embed_type") is None and "StableDiffusionXL" not in class_name:
        act = (text_encoder_config or {}).get("hidden_act")
        context = unet_config.get("cross_attention_dim")
        if act == "quick_gelu" or (act is None and context == 768):
            base = "sd1"
        elif act == "gelu" or (act is None and context == 1024):
            base = "sd2"
        else:
            raise CheckpointError(
                f"cannot tell SD1 from SD2 in diffusers folder: {evidence}, text_encoder/config.json hidden_act "
                f"{act!r}, unet/config.json cross_attention_dim {context!r}; pass the family explicitly"
            )
    else:
        raise CheckpointError(
            f"unsupported diffusers folder: {evidence}, addition_embed_type "
            f"{unet_config.get('addition_embed_type')!r}; expected a StableDiffusion or StableDiffusionXL pipeline"
        )
    return get_family(_inpaint_variant(base, _channels_only(in_channels)))


def _component_present(model_index: Mapping[str, Any], name: str) -> bool:
    entry = model_index.get(name)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None


def _channels_only(in_channels: int) -> Evidence:
    return Evidence(0, True, in_channels, None, None, frozenset(), ())
