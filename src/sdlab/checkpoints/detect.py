"""Which family a checkpoint belongs to, from key names and tensor shapes only (never weight values).

Evidence is gathered once (`Evidence.of`): which text-tower prefixes hold keys, the U-Net's input channels,
number of levels, attention projection kind (Linear or 1x1 conv), whether it has an added-vector input
(`label_emb`) and the VAE's downsampling factor; widths are listed for messages. Then every registered
family's `Signature` (`sdlab.families`) is matched against it:

  1. a file with text-encoder keys: the families whose text-tower prefixes (`FamilySpec.text_layouts`, its
     own or another tool's) are exactly the ones found and whose required facts hold; among them those whose
     U-Net's added vector agrees with `label_emb` (SD2 saved by SGM code shares the SDXL refiner's
     `conditioner.embedders.0.model.` and has no `label_emb`); the most specific wins (sdlab-tiny, which
     needs Linear projections and an f=4 VAE, over SD1, which shares its `cond_stage_model.transformer.`
     layout);
  2. a file holding only a U-Net: the families whose default U-Net has its structure (levels, projection
     kind, added vector);
  3. the U-Net's input channels pick the variant among the families sharing the winning signature
     (4: text-to-image, 9: inpainting, the base family's `-inpaint` variant, 8: InstructPix2Pix, `-edit`).
  Widths never decide: a reduced SD1 file (32-64-128-128, context 128, as the ecosystem's tiny test models) is
  SD1 by its structure, and sizes are then inferred from the tensors. sdlab-tiny is recognised by its
  `sdlab.family` metadata or by the structure only it has in an SD1 layout.

A consistency check follows (a family with an added vector needs `label_emb`, the others must not have one),
so a mixed-up file fails with the evidence instead of loading wrongly. Before all of this, a model of a kind
sdlab recognises but does not draw with (`UNSUPPORTED_KINDS`: SD2 depth2img, SD 2.1 unCLIP, the x4 upscaler)
is refused with its name, from the parts only it has (`depth_model.*`, `low_scale_model.*`, ...), else from a
U-Net whose input channels no drawable family takes where the rest of its structure is the kind's (5 channels on
SD2's U-Net: depth2img; 7 on SD2's with a class embedding: the x4 upscaler); any other such U-Net is refused as
one that no family sdlab draws with takes. An 8-channel U-Net on SD1's or SDXL's structure is an InstructPix2Pix
edit model (A1111's config_instruct_pix2pix, `conditioning_key: hybrid`; ComfyUI's SD15_instructpix2pix /
SDXL_instructpix2pix; diffusers' in_channels 8): the `-edit` variant of its base, picked by step 3.
A text-to-image model of another architecture (`OTHER_ARCHITECTURES`: SD3, Flux, Stable Cascade, ...) is named
from a key only it has, bare or under `model.diffusion_model.` (ComfyUI's all-in-one files), or from its
diffusers pipeline class.
Diffusers folders are matched on `model_index.json` and the component configs (`detect_diffusers_family`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.io import shapes_of
from sdlab.families import FamilySpec, get_family, registered_families
from sdlab.families.base import UNET_PREFIX, VAE_PREFIX

_CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"
_LABEL_EMB = UNET_PREFIX + "label_emb.0.0.weight"
_CLASS_EMB = UNET_PREFIX + "label_emb.weight"      # nn.Embedding(num_classes, ...), not the added-vector MLP
_TO_K = re.compile(re.escape(UNET_PREFIX) + r".*\.attn2\.to_k\.weight$")
_VAE_DOWN = re.compile(re.escape(VAE_PREFIX) + r"encoder\.down\.(\d+)\.")
_PROJ_IN = re.compile(re.escape(UNET_PREFIX) + r".*\.proj_in\.weight$")
_DOWNSAMPLE = re.compile(re.escape(UNET_PREFIX) + r"input_blocks\.\d+\.0\.op\.weight$")


@dataclass(frozen=True)
class UnsupportedKind:
    """A kind of Stable Diffusion model that sdlab recognises but does not draw with (A1111 or ComfyUI do), so
    that its file is refused with its name rather than by the first check it fails."""

    name: str
    key_prefixes: tuple[str, ...]       # top-level key prefixes only its single files have
    in_channels: int | None             # its U-Net's input channels, if no drawable family takes as many
    bases: tuple[str, ...]              # the families whose U-Net structure (text towers aside) it otherwise has
    class_embedding: bool               # whether its U-Net embeds a class label (`num_classes`: the x4 noise level)
    pipelines: tuple[str, ...]          # its diffusers pipelines (`model_index.json` `_class_name`)
    components: tuple[str, ...]         # `model_index.json` components only its pipelines have


UNSUPPORTED_KINDS = (
    # A1111 sd_models_config: depth_model.model.pretrained.*; ComfyUI: a 5-channel U-Net (latent + depth)
    UnsupportedKind("SD2 depth-to-image (depth2img)", ("depth_model.",), 5, ("sd2",), False,
                    ("StableDiffusionDepth2ImgPipeline",), ("depth_estimator",)),
    # A1111: embedder.model.ln_final.weight (768 wide: L, 1024: H); ComfyUI SD21UnclipL/H: embedder.model.visual.*
    UnsupportedKind("SD 2.1 unCLIP (image variations)", ("embedder.", "noise_augmentor."), None, ("sd2",), False,
                    ("StableUnCLIPPipeline", "StableUnCLIPImg2ImgPipeline"),
                    ("image_normalizer", "image_noising_scheduler")),
    # ComfyUI SD_X4Upscaler: a 7-channel U-Net (latent + low-resolution picture), num_classes 1000 (the noise
    # level); low_scale_model.* its schedule
    UnsupportedKind("SD x4 upscaler", ("low_scale_model.",), 7, ("sd2",), True,
                    ("StableDiffusionUpscalePipeline",), ("low_res_scheduler",)),
)


class NoUNetError(CheckpointError):
    """A file with no U-Net under `model.diffusion_model.`: maybe a file of another kind (a LoRA, a VAE, ...),
    which the caller, knowing the file, can name (`other_kinds.not_a_model`)."""


def _refuse(kind: UnsupportedKind, why: str) -> CheckpointError:
    return CheckpointError(f"this is an {kind.name} model ({why}); sdlab does not draw with this kind of model")


@dataclass(frozen=True)
class OtherArchitecture:
    """A text-to-image model of another architecture than SD 1.x / 2.x / SDXL's, named from its files rather
    than refused by the first SD part they lack."""

    name: str
    keys: tuple[str, ...]               # any one names it: bare (its own release) or under model.diffusion_model.
    pipelines: tuple[str, ...]          # prefixes of its diffusers pipelines' `_class_name`


OTHER_ARCHITECTURES = (
    # diffusers single_file_utils.CHECKPOINT_KEY_NAMES "sd3" / "sd35_large" (SAI's and ComfyUI's files)
    OtherArchitecture("Stable Diffusion 3 / 3.5", ("joint_blocks.0.context_block.adaLN_modulation.1.bias",
                                                   "joint_blocks.37.x_block.mlp.fc1.weight"),
                      ("StableDiffusion3",)),
    # "flux" (BFL's files, ComfyUI's all-in-one under model.diffusion_model.), "flux2"
    OtherArchitecture("Flux", ("double_blocks.0.img_attn.norm.key_norm.scale", "single_stream_modulation.lin.weight"),
                      ("Flux",)),
    # "stable_cascade_stage_c" / "stable_cascade_stage_b"
    OtherArchitecture("Stable Cascade", ("clip_txt_mapper.weight", "down_blocks.1.0.channelwise.0.weight"),
                      ("StableCascade",)),
    # the original releases' caption projection and timestep block (diffusers' convert_pixart_*_to_diffusers.py)
    OtherArchitecture("PixArt", ("y_embedder.y_proj.fc1.weight", "t_block.1.weight"), ("PixArt",)),
    # the original release's T5 projection and padding (diffusers' convert_hunyuandit_to_diffusers.py)
    OtherArchitecture("Hunyuan-DiT", ("mlp_t5.0.weight", "text_embedding_padding"), ("HunyuanDiT",)),
    # "auraflow"
    OtherArchitecture("AuraFlow", ("double_layers.0.attn.w2q.weight", "cond_seq_linear.weight"), ("AuraFlow",)),
    # an SDXL-shaped U-Net fed by ChatGLM through a projection SD's U-Nets do not have
    OtherArchitecture("Kolors", ("encoder_hid_proj.weight",), ("Kolors",)),
)

_DRAWN = "sdlab draws SD 1.x / 2.x / SDXL models"


def _refuse_architecture(name: str, why: str) -> CheckpointError:
    article = "an" if name[0] in "AEIOU" else "a"
    return CheckpointError(f"this is {article} {name} model ({why}); {_DRAWN}")


def _refuse_undrawable_channels(in_channels: int, fitting: Iterable[FamilySpec], class_embedding: bool,
                                channels: str, found: str) -> None:
    """Raise the one-line error for a U-Net taking `in_channels` when no registered family takes as many: naming
    the `UNSUPPORTED_KINDS` kind with those channels whose structure the rest of the U-Net has (`fitting`: the
    families its structure fits, input channels aside; `class_embedding`: it embeds a class label), else saying
    only that. `channels` says where the count was read, `found` what else was."""
    if any(f.unet.in_channels == in_channels for f in registered_families()):
        return
    names = {f.name for f in fitting}
    for kind in UNSUPPORTED_KINDS:
        base = next((name for name in kind.bases if name in names), None)
        if kind.in_channels == in_channels and base is not None and class_embedding == kind.class_embedding:
            embedding = " with a class embedding" if class_embedding else ""
            raise _refuse(kind, f"{channels} on {base}'s U-Net structure{embedding}")
    raise CheckpointError(f"a U-Net with {in_channels} input channels, which no family sdlab draws with takes "
                          f"(4: text-to-image, 9: inpainting, 8: InstructPix2Pix on SD1 / SDXL); found: {found}")


def refuse_unsupported_kind(keys: Iterable[str]) -> None:
    """Raise the one-line error naming the kind of a single file of an `UNSUPPORTED_KINDS` model, by the keys
    only it has."""
    keys = set(keys)
    tops = {key.split(".", 1)[0] + "." for key in keys}
    for kind in UNSUPPORTED_KINDS:
        found = [p for p in kind.key_prefixes if p in tops]
        if found:
            raise _refuse(kind, "keys under " + ", ".join(p + "*" for p in found))
    for other in OTHER_ARCHITECTURES:
        found = [k for key in other.keys for k in (key, UNET_PREFIX + key) if k in keys]
        if found:
            raise _refuse_architecture(other.name, f"key {found[0]}")


def refuse_unsupported_pipeline(model_index: Mapping[str, Any]) -> None:
    """Raise the one-line error naming the kind of a diffusers folder of an `UNSUPPORTED_KINDS` model, by its
    pipeline class or the components only it has."""
    class_name = model_index.get("_class_name")
    for kind in UNSUPPORTED_KINDS:
        found = [c for c in kind.components if _component_present(model_index, c)]
        if class_name in kind.pipelines:
            raise _refuse(kind, f"model_index.json _class_name {class_name!r}")
        if found:
            raise _refuse(kind, f"model_index.json component {found[0]!r}")
    why = f"model_index.json _class_name {class_name!r}"
    for other in OTHER_ARCHITECTURES:
        if isinstance(class_name, str) and class_name.startswith(other.pipelines):
            raise _refuse_architecture(other.name, why)
    other = next((c for c in ("transformer", "prior", "decoder") if _component_present(model_index, c)), None)
    if other is not None and not _component_present(model_index, "unet"):
        raise CheckpointError(f"this is a diffusers {class_name or 'pipeline'} folder (its model is a {other!r}, "
                              f"not a U-Net); {_DRAWN}")


def text_prefixes() -> tuple[str, ...]:
    """The text-tower prefixes of every registered family (its own, then other tools'), in registry order."""
    return tuple(dict.fromkeys(p for f in registered_families() for te in f.text_encoders
                               for p in (te.prefix, *te.other_prefixes)))


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
    class_embedding: bool = False           # a class-label embedding (`label_emb.weight`: the x4 upscaler's)

    @classmethod
    def of(cls, shapes: Mapping[str, torch.Size]) -> Evidence:
        conv_in = shapes.get(_CONV_IN)
        label_emb = shapes.get(_LABEL_EMB)
        context_dim = next((s[1] for k, s in shapes.items() if len(s) == 2 and _TO_K.match(k)), None)
        proj_in = next((s for k, s in shapes.items() if _PROJ_IN.match(k)), None)
        vae_levels = {m.group(1) for k in shapes if (m := _VAE_DOWN.match(k))}
        text = frozenset(p for p in text_prefixes() if any(k.startswith(p) for k in shapes))
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
            class_embedding=_CLASS_EMB in shapes,
        )

    @property
    def added_vector(self) -> bool:
        return self.adm_in_channels is not None

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


_EVIDENCE_FIELDS = frozenset(f.name for f in fields(Evidence)) | {"added_vector"}


def _unet_alone_matches(family: FamilySpec, e: Evidence) -> bool:
    unet = family.unet
    return (family.signature.from_unet_alone and e.unet_levels == len(unet.channel_mult)
            and e.linear_proj == unet.use_linear_proj and e.added_vector == (unet.adm_in_channels is not None))


def _holds(family: FamilySpec, e: Evidence) -> bool:
    """Whether every fact the family's signature requires is what the evidence shows."""
    for name, value in family.signature.requires:
        if name not in _EVIDENCE_FIELDS:
            raise ValueError(f"family {family.name}: its signature requires {name!r}, which detection does not "
                             f"gather (one of {', '.join(sorted(_EVIDENCE_FIELDS))})")
        if getattr(e, name) != value:
            return False
    return True


def _candidates(e: Evidence) -> list[FamilySpec]:
    """The registered families whose signature the evidence fits, most specific first (see module docstring)."""
    families = registered_families()
    if e.text_prefixes:
        fits = [f for f in families if e.text_prefixes in map(frozenset, f.text_layouts) and _holds(f, e)]
        fits = [f for f in fits if _added_vector_agrees(f, e)] or fits     # else _check_consistent says why
        best = max((len(f.signature.requires) for f in fits), default=0)
        return [f for f in fits if len(f.signature.requires) == best]
    return [f for f in families if _unet_alone_matches(f, e)]


def _added_vector_agrees(family: FamilySpec, e: Evidence) -> bool:
    return (family.unet.adm_in_channels is not None) == e.added_vector


def _variant(candidates: list[FamilySpec], in_channels: int | None) -> FamilySpec:
    """The candidate whose U-Net takes `in_channels`, among variants of one signature (base first)."""
    signatures = list(dict.fromkeys(f.signature for f in candidates))
    if len(signatures) > 1:
        names = ", ".join(dict.fromkeys(f.name for f in candidates))
        raise CheckpointError(f"checkpoint fits several model families ({names}); pass the family explicitly")
    base = candidates[0]
    for family in candidates:
        if family.unet.in_channels == in_channels:
            return family
    if in_channels == 9:
        raise CheckpointError(
            f"found a 9-channel (inpainting) U-Net in a {base.name} checkpoint; sdlab knows no {base.name}-inpaint"
        )
    if in_channels == 8:
        raise CheckpointError(
            f"found an 8-channel (InstructPix2Pix edit) U-Net in a {base.name} checkpoint; sdlab draws edit models "
            f"of SD1 and SDXL, and knows no {base.name}-edit"
        )
    raise CheckpointError(
        f"U-Net takes {in_channels} input channels; expected 4 (text-to-image), 9 (inpainting) or 8 (InstructPix2Pix)"
    )


def _check_consistent(family: FamilySpec, evidence: Evidence) -> None:
    says = family.signature.says if evidence.text_prefixes else "its U-Net's structure"
    if family.unet.adm_in_channels is not None and evidence.adm_in_channels is None:
        raise CheckpointError(
            f"checkpoint looks like {family.name} ({says}) but its U-Net has no label_emb "
            f"(the size/crop vector input of {family.name}); found: {evidence.describe()}"
        )
    if family.unet.adm_in_channels is None and evidence.adm_in_channels is not None:
        raise CheckpointError(
            f"checkpoint looks like {family.name} ({says}) but its U-Net has a label_emb of width "
            f"{evidence.adm_in_channels} (an added-vector input, as SDXL's and SD 2.1 unCLIP's U-Nets have), "
            f"which {family.name} models do not have; found: {evidence.describe()}"
        )


def _override(name: str, in_channels: int, where: str) -> FamilySpec:
    try:
        family = get_family(name)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    if family.unet.in_channels != in_channels:
        raise CheckpointError(
            f"family {family.name} expects a {family.unet.in_channels}-channel U-Net input, {where} has {in_channels}"
        )
    return family


def detect_family(keys_and_shapes: Mapping[str, torch.Size | Tensor], override: str | None = None) -> FamilySpec:
    """The family of an original-layout (LDM / sgm) state dict, from names and shapes only.

    `override` (a family name) skips the signatures; it is still checked against the U-Net's input channels.
    Raises `CheckpointError` saying what was found and what was expected.
    """
    shapes = shapes_of(keys_and_shapes)
    evidence = Evidence.of(shapes)
    refuse_unsupported_kind(shapes)
    if not evidence.has_unet:
        raise NoUNetError(
            f"no key starting with {UNET_PREFIX} (the U-Net); top-level prefixes: "
            f"{', '.join(evidence.top_level_prefixes[:8]) or 'none'}; expected a checkpoint in the original "
            f"single-file layout ({UNET_PREFIX}, {VAE_PREFIX}, and text towers under "
            f"{', '.join(text_prefixes())})"
        )
    if evidence.in_channels is None:
        raise CheckpointError(f"U-Net keys present but {_CONV_IN} is missing or not a 4-D conv weight")
    candidates = _candidates(evidence)
    _refuse_undrawable_channels(evidence.in_channels, candidates, evidence.class_embedding,
                                f"{evidence.in_channels} U-Net input channels", evidence.describe())
    if override is not None:
        return _override(override, evidence.in_channels, "the file")
    if not candidates:
        raise CheckpointError(
            f"cannot tell the model family: {evidence.describe()}; expected text-encoder keys under "
            f"{' or '.join(text_prefixes())}, or a U-Net laid out as one of "
            f"{', '.join(f.name for f in registered_families() if f.signature.from_unet_alone and f.unet.in_channels == 4)}; "
            "pass the family explicitly (--family NAME)"
        )
    family = _variant(candidates, evidence.in_channels)
    _check_consistent(family, evidence)
    return family


def detect_diffusers_family(
    model_index: Mapping[str, Any],
    unet_config: Mapping[str, Any],
    text_encoder_config: Mapping[str, Any] | None,
    override: str | None = None,
) -> FamilySpec:
    """The family of a diffusers folder from `model_index.json`, `unet/config.json` and the first text encoder.

    A family fits when its U-Net's added vector agrees with `addition_embed_type` ("text_time"), the folder has
    a `text_encoder` component exactly when the family keeps a tower there (the SDXL refiner has only
    `text_encoder_2`), and that tower's activation is the config's `hidden_act` (`quick_gelu` CLIP-L, `gelu`
    OpenCLIP). Without an activation, the context width picks among the fits. Inpainting: 9 U-Net input
    channels; InstructPix2Pix (an edit model): 8.
    """
    in_channels = int(unet_config.get("in_channels", 4))
    class_name = str(model_index.get("_class_name", ""))
    embed = unet_config.get("addition_embed_type")
    has_text_encoder = _component_present(model_index, "text_encoder")
    act = (text_encoder_config or {}).get("hidden_act")
    context = unet_config.get("cross_attention_dim")

    def fits(family: FamilySpec) -> bool:
        first = next((te for te in family.text_encoders if te.diffusers_folder == "text_encoder"), None)
        return (family.signature.from_diffusers and embed in (None, "text_time")
                and (embed == "text_time") == (family.unet.adm_in_channels is not None)
                and (first is not None) == has_text_encoder
                and (act is None or first is None or act == first.config.activation))

    candidates = [f for f in registered_families() if fits(f)]
    if len({f.signature for f in candidates}) > 1:
        candidates = [f for f in candidates if f.unet.context_dim == context] or candidates
    evidence = (f"model_index _class_name {class_name!r}, U-Net in_channels {in_channels}, addition_embed_type "
                f"{embed!r}, text_encoder/config.json hidden_act {act!r}, unet/config.json cross_attention_dim {context!r}")
    _refuse_undrawable_channels(in_channels, candidates, unet_config.get("num_class_embeds") is not None,
                                f"unet/config.json in_channels {in_channels}", evidence)
    if override is not None:
        return _override(override, in_channels, "the folder")
    if not candidates:
        raise CheckpointError(
            f"unsupported diffusers folder: {evidence}; expected a pipeline of one of "
            f"{', '.join(f.name for f in registered_families() if f.signature.from_diffusers)}"
        )
    if len({f.signature for f in candidates}) > 1:
        raise CheckpointError(
            f"cannot tell the family of the diffusers folder ({', '.join(f.name for f in candidates)} fit): "
            f"{evidence}; pass the family explicitly"
        )
    return _variant(candidates, in_channels)


def _component_present(model_index: Mapping[str, Any], name: str) -> bool:
    entry = model_index.get(name)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None
