"""OpenCLIP text tower <-> sdlab/Hugging Face CLIP text names.

SD2 files hold OpenCLIP ViT-H/14 under ``cond_stage_model.model.``; SDXL holds bigG/14 under
``conditioner.embedders.1.model.`` (the refiner under ``conditioner.embedders.0.model.``). The functions
here take the tower's own keys, with that prefix already removed, and return ``sdlab.models.clip`` names
(which are Hugging Face's ``CLIPTextModel.text_model`` names without ``text_model.``).

The conversion is a rename table plus two transforms (as ComfyUI's ``transformers_convert``):

- ``attn.in_proj_weight`` (3D, D) / ``attn.in_proj_bias`` (3D,) are the q, k, v projections stacked in
  that order along dim 0 (``torch.nn.MultiheadAttention``'s layout); they are split in three;
- ``text_projection`` is stored (D, P) and applied as ``x @ P``, so it is the transpose of the
  ``nn.Linear(D, P, bias=False).weight`` (P, D) that sdlab uses.

Towers converted from Hugging Face ones by renaming (diffusers' ``convert_diffusers_to_original_sdxl.py``)
hold the projection under its Hugging Face name ``text_projection.weight``, already in ``nn.Linear``
layout: it is taken as is (ComfyUI's ``clip_text_transformers_convert``; diffusers' ``single_file_utils``
transposes only the bare name). A tower holding both spellings is refused.

``logit_scale`` (the contrastive temperature), ``attn_mask`` (a causal-mask buffer in some files) and the
position-ids buffer that diffusers' conversion scripts leave under its Hugging Face name are known extras
and are dropped (``sdlab.checkpoints.tolerated.OPENCLIP_TOLERATED``); any other key is unknown and
reported (:class:`UnknownKeysError`).

Converted tensors may share storage with the inputs (q/k/v are views of ``in_proj``); clone them
before saving with safetensors, which refuses shared storage.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import torch
from torch import Tensor

from sdlab.checkpoints.tolerated import OPENCLIP_TOLERATED, SDLAB_TEXT_TOLERATED
from sdlab.models.clip import CLIPTextConfig

logger = logging.getLogger(__name__)

# whole-tower keys: OpenCLIP name -> sdlab name
TOP_LEVEL_RENAMES: dict[str, str] = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
# per-block keys, under "transformer.resblocks.{i}." -> "encoder.layers.{i}."
BLOCK_RENAMES: dict[str, str] = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
# transform 1: fused q,k,v (OpenCLIP, per block) -> three projections (sdlab, per block)
FUSED_QKV: dict[str, tuple[str, str, str]] = {
    "attn.in_proj_weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.in_proj_bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
}
# transform 2: (D, P) matrix used as x @ P  <->  nn.Linear weight (P, D)
TRANSPOSED: dict[str, str] = {"text_projection": "text_projection.weight"}
# the projection as diffusers' SDXL conversion script leaves it: nn.Linear layout (P, D), sdlab's own name
LINEAR_PROJECTION = "text_projection.weight"

_OPENCLIP_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_SDLAB_BLOCK = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_OPENCLIP_BLOCK_PREFIX = "transformer.resblocks.{}."
_SDLAB_BLOCK_PREFIX = "encoder.layers.{}."


class UnknownKeysError(ValueError):
    """A state dict had keys the conversion table does not know; ``keys`` lists them."""

    def __init__(self, direction: str, keys: list[str]):
        self.keys = keys
        shown = ", ".join(keys[:10]) + (f" ... ({len(keys)} in all)" if len(keys) > 10 else "")
        super().__init__(f"{direction}: unknown keys {shown}")


def _report_unknown(direction: str, unknown: list[str], ignore_unknown: bool) -> None:
    if not unknown:
        return
    if not ignore_unknown:
        raise UnknownKeysError(direction, sorted(unknown))
    logger.warning("%s: ignored %d unknown keys: %s", direction, len(unknown), sorted(unknown))


def openclip_to_sdlab(state: Mapping[str, Tensor], *, ignore_unknown: bool = False) -> dict[str, Tensor]:
    """OpenCLIP text-tower keys (prefix removed) -> sdlab ``CLIPTextModel`` keys.

    Raises :class:`UnknownKeysError` listing keys outside the table (``ignore_unknown=True`` logs and drops
    them instead), and ValueError for a tower holding its projection under both names. The keys of
    ``OPENCLIP_TOLERATED`` are dropped.
    """
    if "text_projection" in state and LINEAR_PROJECTION in state:
        raise ValueError("openclip_to_sdlab: the text projection is stored twice, as text_projection and "
                         f"{LINEAR_PROJECTION}")
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        if key in TOP_LEVEL_RENAMES:
            out[TOP_LEVEL_RENAMES[key]] = value
        elif key in TRANSPOSED:
            out[TRANSPOSED[key]] = value.t().contiguous()                     # (D, P) -> (P, D)
        elif key == LINEAR_PROJECTION:
            out[key] = value                                                  # (P, D) already
        elif key in OPENCLIP_TOLERATED:
            logger.debug("dropping %s", key)
        elif (match := _OPENCLIP_BLOCK.fullmatch(key)) is not None:
            block, name = match.groups()
            prefix = _SDLAB_BLOCK_PREFIX.format(block)
            if name in BLOCK_RENAMES:
                out[prefix + BLOCK_RENAMES[name]] = value
            elif name in FUSED_QKV:
                for target, part in zip(FUSED_QKV[name], value.chunk(3, dim=0)):   # (3D, ...) -> 3 x (D, ...)
                    out[prefix + target] = part
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    _report_unknown("openclip_to_sdlab", unknown, ignore_unknown)
    return out


def sdlab_to_openclip(state: Mapping[str, Tensor], *, ignore_unknown: bool = False) -> dict[str, Tensor]:
    """sdlab ``CLIPTextModel`` keys -> OpenCLIP text-tower keys; the exact inverse of :func:`openclip_to_sdlab`.

    q/k/v of each block must all be present (they are fused into ``in_proj``). Unknown keys are reported as
    in :func:`openclip_to_sdlab`; ``embeddings.position_ids`` is dropped.
    """
    top_level = {v: k for k, v in TOP_LEVEL_RENAMES.items()}
    transposed = {v: k for k, v in TRANSPOSED.items()}
    block_renames = {v: k for k, v in BLOCK_RENAMES.items()}
    fused_part = {part: (fused, i) for fused, parts in FUSED_QKV.items() for i, part in enumerate(parts)}

    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    pending: dict[tuple[str, str], list[Tensor | None]] = {}          # (block, fused name) -> [q, k, v]
    for key, value in state.items():
        if key in top_level:
            out[top_level[key]] = value
        elif key in transposed:
            out[transposed[key]] = value.t().contiguous()                     # (P, D) -> (D, P)
        elif key in SDLAB_TEXT_TOLERATED:
            logger.debug("dropping %s", key)
        elif (match := _SDLAB_BLOCK.fullmatch(key)) is not None:
            block, name = match.groups()
            if name in block_renames:
                out[_OPENCLIP_BLOCK_PREFIX.format(block) + block_renames[name]] = value
            elif name in fused_part:
                fused, index = fused_part[name]
                pending.setdefault((block, fused), [None, None, None])[index] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    _report_unknown("sdlab_to_openclip", unknown, ignore_unknown)

    for (block, fused), parts in sorted(pending.items(), key=lambda item: (int(item[0][0]), item[0][1])):
        missing = [_SDLAB_BLOCK_PREFIX.format(block) + FUSED_QKV[fused][i] for i, p in enumerate(parts) if p is None]
        if missing:
            raise KeyError(f"sdlab_to_openclip: cannot fuse q/k/v, missing {missing}")
        out[_OPENCLIP_BLOCK_PREFIX.format(block) + fused] = torch.cat(parts, dim=0)   # 3 x (D, ...) -> (3D, ...)
    return out


def _count_blocks(state: Mapping[str, Tensor], pattern: re.Pattern[str]) -> int:
    blocks = {int(m.group(1)) for key in state if (m := pattern.fullmatch(key)) is not None}
    if blocks != set(range(len(blocks))):
        raise ValueError(f"transformer blocks are not numbered 0..n-1: {sorted(blocks)}")
    return len(blocks)


def config_from_openclip(state: Mapping[str, Tensor], *, head_width: int = 64) -> CLIPTextConfig:
    """CLIPTextConfig of an OpenCLIP text tower (keys without prefix); OpenCLIP towers use exact GELU."""
    vocab_size, width = state["token_embedding.weight"].shape
    return CLIPTextConfig(
        vocab_size=vocab_size,
        max_positions=state["positional_embedding"].shape[0],
        width=width,
        layers=_count_blocks(state, _OPENCLIP_BLOCK),
        heads=max(1, width // head_width),      # one head below 64 wide (no released tower is)
        mlp_width=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        activation="gelu",
        projection_dim=_openclip_projection_dim(state),
    )


def _openclip_projection_dim(state: Mapping[str, Tensor]) -> int | None:
    """P of an OpenCLIP tower's projection: stored (D, P), or (P, D) as ``text_projection.weight``."""
    if "text_projection" in state:
        return state["text_projection"].shape[1]
    if LINEAR_PROJECTION in state:
        return state[LINEAR_PROJECTION].shape[0]
    return None


def config_from_hf(
    state: Mapping[str, Tensor], *, activation: str = "quick_gelu", head_width: int = 64
) -> CLIPTextConfig:
    """CLIPTextConfig of an HF-layout / sdlab text tower (keys without ``text_model.``).

    The activation cannot be read from weights: ``quick_gelu`` (OpenAI CLIP-L, SD1) by default; pass
    ``activation="gelu"`` for OpenCLIP towers saved in HF layout (diffusers' SD2 / SDXL ``text_encoder_2``).
    """
    vocab_size, width = state["embeddings.token_embedding.weight"].shape
    projection = state.get("text_projection.weight")
    return CLIPTextConfig(
        vocab_size=vocab_size,
        max_positions=state["embeddings.position_embedding.weight"].shape[0],
        width=width,
        layers=_count_blocks(state, _SDLAB_BLOCK),
        heads=max(1, width // head_width),      # one head below 64 wide (no released tower is)
        mlp_width=state["encoder.layers.0.mlp.fc1.weight"].shape[0],
        activation=activation,
        projection_dim=projection.shape[0] if projection is not None else None,
    )
