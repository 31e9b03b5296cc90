"""Per-layer IP-Adapter scales (InstantStyle, Wang et al. 2024): which cross-attentions an image prompt acts in.

The grammar is diffusers' `set_ip_adapter_scale` dict (loaders/unet_loader_utils.py `_maybe_expand_lora_scales`,
default 0): parts "down", "mid", "up"; "mid" a number (or a list of one); "down" / "up" either what every block
of that half takes (a number, or one number per transformer of a block: {"down": [0, 1]} gives each down block
[0, 1]) or {"block_N": number or [one number per transformer of the block]} where N is diffusers' block index
(down_blocks.N / up_blocks.N; up_blocks.0 is the deepest; "block_" and the number as diffusers writes it, no
leading zero) and a block has `num_res_blocks` transformers going down, one more going up. A list of one number
is that number. Every cross-attention of a transformer takes its number; a block or part not named takes 0. So
on SDXL

    style           {"up": {"block_0": [0.0, 1.0, 0.0]}}                                 up_blocks.0.attentions.1
    style+layout    {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}  + down_blocks.2.attentions.1

are the diffusers docs' InstantStyle settings (`PRESETS`). Unlike diffusers, which passes over a block name that has
no transformer or is not spelled as it writes one ("block_01": scale 0 there), such a name is an error here, as
is a list of the wrong length.

Spellings: a preset name, the JSON dict, or the compact text infotext records (`layer_scales_text`): space-separated
`part=value` or `part.block_N=value` items, a value one number or numbers joined by "/", e.g.
"down.block_2=0/1 up.block_0=0/1/0"; a part given as no blocks ({"down": {}}: every block at 0) is "down=0".
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from sdlab.models.unet import UNetConfig
from sdlab.pipeline.perturbed_attention import self_attention_names

PRESETS: dict[str, dict[str, Any]] = {
    "style": {"up": {"block_0": [0.0, 1.0, 0.0]}},
    "style+layout": {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}},
}
"""diffusers' documented InstantStyle settings (docs: IP-Adapter, "Style & layout control"), for SDXL."""

PARTS = ("down", "mid", "up")
_BLOCK = re.compile(r"block_(0|[1-9][0-9]*)")     # diffusers' f"block_{i}"


class LayerScaleError(ValueError):
    """Layer scales that are not diffusers' grammar, or that name a block the model lacks."""


def _number(value: Any, where: str, top: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 <= value <= top:
        raise LayerScaleError(f"layer scales: {where} must be a number in [0, {top:g}], got {value!r}")
    return float(value)


def _numbers(value: Any, where: str, top: float) -> float | list[float]:
    if isinstance(value, list):
        if not value:
            raise LayerScaleError(f"layer scales: {where} is an empty list")
        return [_number(v, where, top) for v in value]
    return _number(value, where, top)


def check_layer_scales(spec: Mapping[str, Any] | str, top: float) -> dict[str, Any]:
    """`spec` (a dict, a preset name, JSON or the compact text) as a checked dict of diffusers' grammar, its
    numbers in [0, top]; a `LayerScaleError` names what is wrong. Model-independent (`expand_layer_scales` checks
    the blocks against a model)."""
    if isinstance(spec, str):
        spec = parse_layer_scales(spec)
    if not isinstance(spec, Mapping) or not spec:
        raise LayerScaleError(f"layer scales must name one or more of {', '.join(PARTS)}, got {spec!r}")
    checked: dict[str, Any] = {}
    for part, value in spec.items():
        if part not in PARTS:
            raise LayerScaleError(f"layer scales: unknown part {part!r}; the parts are {', '.join(PARTS)}")
        if part == "mid":
            mid = _numbers(value, "mid", top)
            if isinstance(mid, list) and len(mid) != 1:
                raise LayerScaleError(f"layer scales: mid takes 1 number, got {len(mid)}")
            checked[part] = mid[0] if isinstance(mid, list) else mid
        elif isinstance(value, Mapping):
            blocks = {}
            for block, numbers in value.items():
                if not isinstance(block, str) or not _BLOCK.fullmatch(block):
                    raise LayerScaleError(f"layer scales: {part}.{block} is not a block name (block_ and its index "
                                          f"without a leading zero: block_0, block_1, ...)")
                blocks[block] = _numbers(numbers, f"{part}.{block}", top)
            checked[part] = blocks
        else:
            checked[part] = _numbers(value, part, top)
    return checked


def parse_layer_scales(text: str) -> dict[str, Any]:
    """A preset name, a JSON dict or the compact text as a dict (unchecked numbers); a `LayerScaleError` else."""
    text = text.strip()
    if text in PRESETS:
        return json.loads(json.dumps(PRESETS[text]))
    if text.startswith("{"):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as err:
            raise LayerScaleError(f"layer scales {text!r} are not JSON: {err.msg}") from None
        if not isinstance(spec, dict):
            raise LayerScaleError(f"layer scales {text!r} are not a JSON object")
        return spec
    spec: dict[str, Any] = {}
    for item in text.split():
        name, sep, value = item.partition("=")
        part, _, block = name.partition(".")
        try:
            numbers = [float(v) for v in value.split("/")]
        except ValueError:
            numbers = []
        if not sep or part not in PARTS or not numbers or (block and part == "mid"):
            raise LayerScaleError(
                f"layer scales: {item!r} is not part=NUMBERS or part.block_N=NUMBERS (a part {', '.join(PARTS)}, "
                f"numbers joined by '/'); or give a preset ({', '.join(PRESETS)}) or a JSON dict")
        number = numbers[0] if len(numbers) == 1 else numbers
        if block:
            if not isinstance(spec.setdefault(part, {}), dict) or block in spec[part]:
                raise LayerScaleError(f"layer scales: {name} is given twice")
            spec[part][block] = number
        elif part in spec:
            raise LayerScaleError(f"layer scales: {part} is given twice")
        else:
            spec[part] = number
    if not spec:
        raise LayerScaleError("layer scales: none given")
    return spec


def layer_scales_text(spec: Mapping[str, Any] | str) -> str:
    """The compact text of layer scales (a preset keeps its name): "down.block_2=0/1 up.block_0=0/1/0"."""
    if isinstance(spec, str) and spec.strip() in PRESETS:
        return spec.strip()
    spec = parse_layer_scales(spec) if isinstance(spec, str) else spec

    def numbers(value: Any) -> str:
        return "/".join(f"{float(v):g}" for v in (value if isinstance(value, list) else [value]))

    items = []
    for part in PARTS:
        value = spec.get(part)
        if isinstance(value, Mapping):
            items += [f"{part}.{block}={numbers(v)}" for block, v in value.items()] or [f"{part}=0"]
        elif value is not None:
            items.append(f"{part}={numbers(value)}")
    return " ".join(items)


def cross_attention_blocks(cfg: UNetConfig) -> list[str]:
    """diffusers' name of the transformer ("down_blocks.1.attentions.0", "mid_block.attentions.0") of each of a
    U-Net's cross-attentions, in `models.ip_adapter.cross_attentions` order (down, up, mid)."""
    blocks = [name.split(".transformer_blocks")[0] for name in self_attention_names(cfg)]
    return [b for half in ("down_blocks", "up_blocks", "mid_block") for b in blocks if b.startswith(half)]


def expand_layer_scales(spec: Mapping[str, Any] | str, cfg: UNetConfig, top: float) -> tuple[float, ...]:
    """The scale of each cross-attention (`cross_attention_blocks` order) that `spec` gives a U-Net of `cfg`, as
    diffusers' `set_ip_adapter_scale` (names not given: 0). A `LayerScaleError` names a block without a
    transformer or a list whose length is not 1 or the block's transformer count."""
    spec = check_layer_scales(spec, top)
    attentions = cross_attention_blocks(cfg)
    with_transformer = {half: sorted({int(b.split(".")[1]) for b in attentions if b.startswith(f"{half}_blocks.")})
                        for half in ("down", "up")}
    per_block = {"down": cfg.num_res_blocks, "up": cfg.num_res_blocks + 1}
    by_block: dict[str, float] = {}
    if "mid" in spec:
        if not any(b.startswith("mid_block") for b in attentions):
            raise LayerScaleError("layer scales name mid; this model's middle block has no transformer")
        by_block["mid_block.attentions.0"] = spec["mid"]
    for half in ("down", "up"):
        value = spec.get(half, 0.0)
        blocks = value if isinstance(value, Mapping) else {f"block_{i}": value for i in with_transformer[half]}
        for block, numbers in blocks.items():
            named = f"{half}.{block}" if isinstance(value, Mapping) else f"{half} (for each of its blocks)"
            index = int(_BLOCK.fullmatch(block).group(1))
            if index not in with_transformer[half]:
                have = ", ".join(f"block_{i}" for i in with_transformer[half]) or "none"
                raise LayerScaleError(f"layer scales name {half}.{block}, which has no transformer in this model; "
                                      f"its {half} blocks with transformers: {have}")
            if not isinstance(numbers, list):
                numbers = [numbers] * per_block[half]
            elif len(numbers) == 1:
                numbers = numbers * per_block[half]
            elif len(numbers) != per_block[half]:
                raise LayerScaleError(f"layer scales: {named} takes {per_block[half]} numbers (one per "
                                      f"transformer) or 1, got {len(numbers)}")
            for j, number in enumerate(numbers):
                by_block[f"{half}_blocks.{index}.attentions.{j}"] = number
    return tuple(by_block.get(block, 0.0) for block in attentions)
