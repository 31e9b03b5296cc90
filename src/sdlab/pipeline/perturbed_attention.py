"""Perturbed-attention guidance (PAG, Ahn et al. 2024): which self-attentions its perturbed pass makes the identity.

PAG guides away from a prediction whose chosen self-attention maps are replaced by the identity (each token keeps its
own value vector: `models.unet.SelfAttentionIdentity`); the guidance itself is `diffusion.guidance.PerturbedGuidance`.
The layers are named as diffusers' `pag_applied_layers` names them: each entry is a regular expression searched in the
diffusers module names of the U-Net's self-attentions,

    down_blocks.L.attentions.I.transformer_blocks.K.attn1     input level L, its I-th block with a transformer
    mid_block.attentions.0.transformer_blocks.K.attn1         the middle block
    up_blocks.U.attentions.I.transformer_blocks.K.attn1       output level U (0 is the deepest), block I

so "mid" is every self-attention of the middle block (diffusers' default, ComfyUI's and Forge's `middle` block 0),
"down" / "up" every one of a half, "down_blocks.1" one level, "up_blocks.0.attentions.1" one block, and
"transformer_blocks.0" the first of every transformer. As in diffusers (`PAGMixin._set_pag_attn_processor`), an entry
whose last dot-separated part is a number does not select a name whose last part is the same number (so "blocks.1"
is not a match for `...blocks.1` alone), and an entry that selects nothing is an error.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from sdlab.models.unet import UNetConfig

__all__ = ["DEFAULT_LAYERS", "PagLayerError", "check_layer_patterns", "pag_layer_names", "self_attention_names"]

DEFAULT_LAYERS = ("mid",)
"""diffusers' default `pag_applied_layers` (StableDiffusionPAGPipeline, StableDiffusionXLPAGPipeline)."""


class PagLayerError(ValueError):
    """A PAG layer entry that is not a regular expression, or selects no self-attention of the model."""


def _transformer_names(sdlab: str, diffusers: str, depth: int) -> dict[str, str]:
    return {f"{diffusers}.transformer_blocks.{k}.attn1": f"{sdlab}.transformer_blocks.{k}.attn1" for k in range(depth)}


def self_attention_names(cfg: UNetConfig) -> dict[str, str]:
    """Every self-attention of a U-Net of `cfg`: its diffusers module name -> its sdlab one (the checkpoint's layout,
    `input_blocks.N.1.transformer_blocks.K.attn1`), in the U-Net's order (input, middle, output blocks)."""
    names: dict[str, str] = {}
    index, levels = 1, len(cfg.channel_mult)
    for level in range(levels):
        for i in range(cfg.num_res_blocks):
            if cfg.has_transformer(level):
                names |= _transformer_names(f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{i}",
                                            cfg.input_depth(level, i))
            index += 1
        index += level != levels - 1                      # the level's Downsample
    if cfg.middle_transformer:
        names |= _transformer_names("middle_block.1", "mid_block.attentions.0", cfg.transformer_depth_middle)
    index = 0
    for up, level in enumerate(reversed(range(levels))):
        for i in range(cfg.num_res_blocks + 1):
            if cfg.has_transformer(level):
                names |= _transformer_names(f"output_blocks.{index}.1", f"up_blocks.{up}.attentions.{i}",
                                            cfg.output_depth(level, i))
            index += 1
    return names


def _pattern(entry: str) -> re.Pattern[str]:
    if not isinstance(entry, str) or not entry.strip():
        raise PagLayerError(f"a PAG layer must be a non-empty name or regular expression, got {entry!r}")
    try:
        return re.compile(entry.strip())
    except re.error as exc:
        raise PagLayerError(f"PAG layer {entry!r} is not a regular expression: {exc}") from None


def check_layer_patterns(entries: Sequence[str]) -> tuple[str, ...]:
    """`entries` as a tuple of stripped layer entries, each a valid regular expression (a `PagLayerError` names the
    first that is not); at least one."""
    if isinstance(entries, str) or not entries:
        raise PagLayerError(f"PAG layers must be a list of one or more names, got {entries!r}")
    for entry in entries:
        _pattern(entry)
    return tuple(entry.strip() for entry in entries)


def _same_last_number(entry: str, name: str) -> bool:
    """diffusers' `is_fake_integral_match`: both end in the same number after their last dot."""
    last_entry, last_name = entry.split(".")[-1], name.split(".")[-1]
    return last_entry.isnumeric() and last_name.isnumeric() and last_entry == last_name


def pag_layer_names(cfg: UNetConfig, entries: Sequence[str], model: str = "this model") -> tuple[str, ...]:
    """The sdlab module names of the self-attentions that the PAG layer `entries` select in a U-Net of `cfg`, in the
    U-Net's order; a `PagLayerError` for an entry that selects none, naming `model` and its transformer blocks."""
    names = self_attention_names(cfg)
    chosen: set[str] = set()
    for entry in check_layer_patterns(entries):
        pattern = _pattern(entry)
        found = {ours for theirs, ours in names.items()
                 if pattern.search(theirs) and not _same_last_number(entry, theirs)}
        if not found:
            blocks = sorted({theirs.split(".transformer_blocks")[0] for theirs in names})
            raise PagLayerError(f"PAG layer {entry!r} selects no self-attention of {model}; its transformers: "
                                f"{', '.join(blocks) or 'none'}")
        chosen |= found
    return tuple(ours for ours in names.values() if ours in chosen)
