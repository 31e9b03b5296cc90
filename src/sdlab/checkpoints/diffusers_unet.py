"""The diffusers `UNet2DConditionModel` format: its config.json and its parameter names, both derived from
`UNetConfig`.

sdlab's U-Net uses the original LDM names (`input_blocks.N.M...`). diffusers regroups the same tensors by
level (`down_blocks.{level}.resnets.{i}`, `.attentions.{i}`, `.downsamplers.0`, `mid_block`, `up_blocks`) and
renames the ResBlock and embedding layers; the transformer internals keep their names. The map is generated
from the config by walking the levels in the order the U-Net builds them (as ComfyUI's `unet_to_diffusers`
does), so every family and every reduced test model gets a complete map with no hand-written table.

Config traps handled here: diffusers' `attention_head_dim` is the NUMBER of heads per level (its
`num_attention_heads` is the same thing, and the constructor refuses it), `transformer_layers_per_block[-1]`
also sets the middle block's depth, a CrossAttn block (or the middle block) with 0 transformer layers still has
its transformers' norm, proj_in and proj_out (sdlab's `empty_transformer_levels`, a middle depth of 0), and
`upcast_attention` may be null. `time_cond_proj_dim` (LCM-distilled models) adds
`time_embedding.cond_proj.weight`, sdlab's `time_embed.cond_proj.weight`. Asymmetric U-Nets (SSD-1B, Vega): a
`transformer_layers_per_block` given per layer, `reverse_transformer_layers_per_block` (every up block's depths,
per layer; without it the up blocks mirror the down blocks' levels) and the ResNet-only `UNetMidBlock2D` become
`input_depths`, `output_depths` and `middle_transformer`; the middle's depth is then the last level's first
layer's, as diffusers reads it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.validate import check_int, check_unet
from sdlab.models.layers import SDXL_SIZE_EMBED_DIM
from sdlab.models.unet import UNetConfig, block_depths

# LDM ResBlock layer -> diffusers ResnetBlock2D layer (each has .weight and .bias).
_RESBLOCK_LAYERS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
}
_SKIP_LAYER = ("skip_connection", "conv_shortcut")


def _weight_and_bias(src: str, dst: str) -> dict[str, str]:
    return {f"{src}.weight": f"{dst}.weight", f"{src}.bias": f"{dst}.bias"}


def _resblock_keys(src: str, dst: str, has_skip_conv: bool) -> dict[str, str]:
    keys: dict[str, str] = {}
    for ldm, diffusers in _RESBLOCK_LAYERS.items():
        keys |= _weight_and_bias(f"{src}.{ldm}", f"{dst}.{diffusers}")
    if has_skip_conv:
        keys |= _weight_and_bias(f"{src}.{_SKIP_LAYER[0]}", f"{dst}.{_SKIP_LAYER[1]}")
    return keys


def _transformer_keys(src: str, dst: str, depth: int) -> dict[str, str]:
    """SpatialTransformer <-> Transformer2DModel: same names below the block prefix."""
    names = ["norm.weight", "norm.bias", "proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias"]
    for k in range(depth):
        block = f"transformer_blocks.{k}"
        for attn in ("attn1", "attn2"):
            names += [f"{block}.{attn}.to_{p}.weight" for p in ("q", "k", "v")]
            names += [f"{block}.{attn}.to_out.0.weight", f"{block}.{attn}.to_out.0.bias"]
        for layer in ("ff.net.0.proj", "ff.net.2", "norm1", "norm2", "norm3"):
            names += [f"{block}.{layer}.weight", f"{block}.{layer}.bias"]
    return {f"{src}.{n}": f"{dst}.{n}" for n in names}


def unet_key_map(cfg: UNetConfig) -> dict[str, str]:
    """Every sdlab (= LDM, unprefixed) U-Net parameter name -> its diffusers `UNet2DConditionModel` name."""
    _check_expressible(cfg)
    mc, levels, r = cfg.model_channels, len(cfg.channel_mult), cfg.num_res_blocks
    keys = _weight_and_bias("time_embed.0", "time_embedding.linear_1")
    keys |= _weight_and_bias("time_embed.2", "time_embedding.linear_2")
    if cfg.time_cond_proj_dim is not None:  # LCM guidance embedding
        keys["time_embed.cond_proj.weight"] = "time_embedding.cond_proj.weight"
    if cfg.adm_in_channels is not None:
        keys |= _weight_and_bias("label_emb.0.0", "add_embedding.linear_1")
        keys |= _weight_and_bias("label_emb.0.2", "add_embedding.linear_2")
    keys |= _weight_and_bias("input_blocks.0.0", "conv_in")

    index, ch, skip_channels = 1, mc, [mc]
    for level, mult in enumerate(cfg.channel_mult):
        for i in range(r):
            dst = f"down_blocks.{level}"
            keys |= _resblock_keys(f"input_blocks.{index}.0", f"{dst}.resnets.{i}", ch != mult * mc)
            ch = mult * mc
            if cfg.has_transformer(level):
                keys |= _transformer_keys(f"input_blocks.{index}.1", f"{dst}.attentions.{i}", cfg.input_depth(level, i))
            skip_channels.append(ch)
            index += 1
        if level != levels - 1:
            keys |= _weight_and_bias(f"input_blocks.{index}.0.op", f"down_blocks.{level}.downsamplers.0.conv")
            skip_channels.append(ch)
            index += 1

    keys |= _resblock_keys("middle_block.0", "mid_block.resnets.0", False)
    if cfg.middle_transformer:
        keys |= _transformer_keys("middle_block.1", "mid_block.attentions.0", cfg.transformer_depth_middle)
        keys |= _resblock_keys("middle_block.2", "mid_block.resnets.1", False)

    index = 0
    for up, level in enumerate(reversed(range(levels))):
        mult = cfg.channel_mult[level]
        for i in range(r + 1):
            dst = f"up_blocks.{up}"
            c_in = ch + skip_channels.pop()
            keys |= _resblock_keys(f"output_blocks.{index}.0", f"{dst}.resnets.{i}", c_in != mult * mc)
            ch = mult * mc
            if cfg.has_transformer(level):
                keys |= _transformer_keys(f"output_blocks.{index}.1", f"{dst}.attentions.{i}", cfg.output_depth(level, i))
            if level and i == r:
                upsample = 2 if cfg.has_transformer(level) else 1
                keys |= _weight_and_bias(f"output_blocks.{index}.{upsample}.conv", f"{dst}.upsamplers.0.conv")
            index += 1

    keys |= _weight_and_bias("out.0", "conv_norm_out")
    keys |= _weight_and_bias("out.2", "conv_out")
    return keys


def _convert(sd: Mapping[str, Any], key_map: Mapping[str, str], what: str) -> dict[str, Any]:
    missing = [k for k in key_map if k not in sd]
    unexpected = [k for k in sd if k not in key_map]
    if missing or unexpected:
        raise KeyError(
            f"{what}: {len(missing)} missing keys (first: {missing[:5]}), "
            f"{len(unexpected)} unexpected keys (first: {unexpected[:5]})"
        )
    return {key_map[k]: sd[k] for k in sd}


def unet_state_dict_to_diffusers(sd: Mapping[str, Any], cfg: UNetConfig) -> dict[str, Any]:
    """sdlab / LDM (unprefixed) U-Net state dict -> diffusers names. Same tensors, no copies; strict."""
    return _convert(sd, unet_key_map(cfg), "U-Net state dict to diffusers")


def unet_state_dict_from_diffusers(sd: Mapping[str, Any], cfg: UNetConfig) -> dict[str, Any]:
    """diffusers `UNet2DConditionModel` state dict -> sdlab / LDM (unprefixed) names. Same tensors; strict."""
    inverse = {d: s for s, d in unet_key_map(cfg).items()}
    return _convert(sd, inverse, "U-Net state dict from diffusers")


# --- config.json ------------------------------------------------------------------------------------------

# diffusers options that sdlab's U-Net does not implement, with the only value it accepts (None = absent).
_UNSUPPORTED_OPTIONS: dict[str, Any] = {
    "act_fn": "silu",
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_norm": None,
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-5,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "attention_type": "default",
}
_MID_BLOCKS = {"UNetMidBlock2DCrossAttn": True, "UNetMidBlock2D": False}   # mid block -> whether it has a transformer
_DEFAULT_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_DEFAULT_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")


def _per_level(value: Any, levels: int, name: str, minimum: int = 1) -> tuple[int, ...]:
    """A per-level integer option: one int for every level, or a list of one int per level."""
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise ValueError(f"diffusers U-Net config: {name} has {len(value)} entries for {levels} levels")
        return tuple(check_int(name, v, minimum) for v in value)
    return (check_int(name, value, minimum),) * levels


def _block_depths(value: Any, levels: int, blocks: int, name: str) -> list[tuple[int, ...]]:
    """diffusers' transformer_layers_per_block (or its reverse, per up block): for each of the `levels` blocks, the
    transformer depth of each of its `blocks` layers, from one int for all, or a list of an int or a list per layer."""
    entries = value if isinstance(value, (list, tuple)) else [value] * levels
    if len(entries) != levels:
        raise ValueError(f"diffusers U-Net config: {name} has {len(entries)} entries for {levels} blocks")
    depths = []
    for entry in entries:
        if not isinstance(entry, (list, tuple)):
            entry = [entry] * blocks
        if len(entry) != blocks:
            raise ValueError(f"diffusers U-Net config: {name} gives {len(entry)} layers to a block of {blocks}")
        depths.append(tuple(check_int(name, n, 0) for n in entry))
    return depths


def _single(value: Any, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if not value or len(set(map(repr, value))) != 1:
            raise ValueError(f"diffusers U-Net config: sdlab needs one {name} for all levels, got {value}")
        value = value[0]
    return check_int(name, value)


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _names(config: Mapping[str, Any], key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = config.get(key, default)
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"diffusers U-Net config: {key} must be a non-empty list of block names, got {value!r}")
    return tuple(value)


def _flag(config: Mapping[str, Any], key: str) -> bool:
    value = config.get(key)
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"diffusers U-Net config: {key} must be true or false, got {value!r}")
    return bool(value)


def _optional_int(config: Mapping[str, Any], key: str) -> int | None:
    value = config.get(key)
    return None if value is None else check_int(key, value)


def unet_config_from_diffusers(config: Mapping[str, Any]) -> UNetConfig:
    """`UNetConfig` from a diffusers `unet/config.json` (as a dict). Raises on options sdlab does not implement."""
    for key, accepted in _UNSUPPORTED_OPTIONS.items():
        value = config.get(key, accepted)
        if value != accepted:
            raise ValueError(f"diffusers U-Net config: {key}={value!r} is not supported (only {accepted!r})")
    if config.get("mid_block_only_cross_attention") not in (None, False):
        raise ValueError("diffusers U-Net config: mid_block_only_cross_attention is not supported")

    channels = config.get("block_out_channels", (320, 640, 1280, 1280))
    if not isinstance(channels, (list, tuple)) or not channels:
        raise ValueError(f"diffusers U-Net config: block_out_channels must be a non-empty list, got {channels!r}")
    channels = tuple(check_int("block_out_channels", c) for c in channels)
    levels, mc = len(channels), channels[0]
    if any(c % mc for c in channels):
        raise ValueError(f"diffusers U-Net config: block_out_channels {channels} are not multiples of the first")
    down = _names(config, "down_block_types", _DEFAULT_DOWN)
    up = _names(config, "up_block_types", _DEFAULT_UP)
    has_attention = []
    for level, kind in enumerate(down):
        if kind not in ("CrossAttnDownBlock2D", "DownBlock2D"):
            raise ValueError(f"diffusers U-Net config: down block {kind!r} is not supported")
        has_attention.append(kind == "CrossAttnDownBlock2D")
    expected_up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attention))
    if up != expected_up or len(down) != levels:
        raise ValueError(f"diffusers U-Net config: up blocks {up} do not mirror down blocks {down}")
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid not in _MID_BLOCKS:
        raise ValueError(f"diffusers U-Net config: mid block {mid!r} is not supported")
    middle_transformer = _MID_BLOCKS[mid]

    blocks = _single(config.get("layers_per_block", 2), "layers_per_block")
    down_layers = config.get("transformer_layers_per_block", 1)
    down_depths = _block_depths(down_layers, levels, blocks, "transformer_layers_per_block")
    up_layers = config.get("reverse_transformer_layers_per_block")
    if up_layers is None and any(isinstance(n, (list, tuple)) for n in _as_list(down_layers)):
        raise ValueError("diffusers U-Net config: a per-layer transformer_layers_per_block needs "
                         "reverse_transformer_layers_per_block (diffusers refuses it too)")
    up_depths = ([(d[0],) * (blocks + 1) for d in reversed(down_depths)] if up_layers is None
                 else _block_depths(up_layers, levels, blocks + 1, "reverse_transformer_layers_per_block"))
    up_depths.reverse()                                                   # by level, as down_depths
    # a CrossAttn block with 0 layers keeps its transformers' norm and projections (SDXL "small" ControlNets)
    depth = tuple(d[0] if a else 0 for d, a in zip(down_depths, has_attention))
    empty = tuple(level for level, (d, a) in enumerate(zip(down_depths, has_attention)) if a and not d[0])
    inputs = tuple(n if a else 0 for d, a in zip(down_depths, has_attention) for n in d)
    outputs = tuple(n if a else 0 for d, a in reversed(list(zip(up_depths, has_attention))) for n in d)
    attends = [a and max(*d, *u) > 0 for d, u, a in zip(down_depths, up_depths, has_attention)]

    # Number of heads per level: `num_attention_heads` if given, else the misnamed `attention_head_dim`.
    heads_spec = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    heads = _per_level(heads_spec, levels, "attention_head_dim")
    attended = [level for level in range(levels) if attends[level]] + [levels - 1]  # the middle uses the last
    widths = {channels[level] // heads[level] for level in attended}
    counts = {heads[level] for level in attended}
    if isinstance(heads_spec, int) or (len(counts) == 1 and len(widths) != 1):
        num_heads, head_dim = heads[levels - 1], None
    elif len(widths) == 1 and all(channels[level] % heads[level] == 0 for level in attended):
        num_heads, head_dim = None, widths.pop()
    else:
        raise ValueError(f"diffusers U-Net config: heads {heads} are neither constant nor a constant width")

    adm = None
    if config.get("addition_embed_type") is not None:
        if config["addition_embed_type"] != "text_time":
            raise ValueError(f"diffusers U-Net config: addition_embed_type {config['addition_embed_type']!r}")
        if config.get("addition_time_embed_dim") != SDXL_SIZE_EMBED_DIM:
            raise ValueError("diffusers U-Net config: addition_time_embed_dim must be 256 (SDXL)")
        adm = check_int("projection_class_embeddings_input_dim", config.get("projection_class_embeddings_input_dim"))

    cfg = UNetConfig(
        in_channels=check_int("in_channels", config.get("in_channels", 4)),
        out_channels=check_int("out_channels", config.get("out_channels", 4)),
        model_channels=mc,
        channel_mult=tuple(c // mc for c in channels),
        num_res_blocks=blocks,
        transformer_depth=depth,
        transformer_depth_middle=down_depths[-1][0] if middle_transformer else 0,   # diffusers' [-1] (its [0])
        empty_transformer_levels=empty,
        input_depths=block_depths(inputs, depth, blocks),
        output_depths=block_depths(outputs, depth[::-1], blocks + 1),
        middle_transformer=middle_transformer,
        num_heads=num_heads,
        head_dim=head_dim,
        context_dim=_single(config.get("cross_attention_dim", 1280), "cross_attention_dim"),
        use_linear_proj=_flag(config, "use_linear_projection"),
        adm_in_channels=adm,
        upcast_attention=_flag(config, "upcast_attention"),
        norm_groups=check_int("norm_num_groups", config.get("norm_num_groups", 32)),
        time_cond_proj_dim=_optional_int(config, "time_cond_proj_dim"),
    )
    check_unet(cfg)
    return cfg


# diffusers names of the config fields the tensors show, for messages
DIFFUSERS_UNET_NAMES = {
    "in_channels": "in_channels", "out_channels": "out_channels", "model_channels": "block_out_channels[0]",
    "channel_mult": "block_out_channels", "num_res_blocks": "layers_per_block",
    "transformer_depth": "transformer_layers_per_block / down_block_types",
    "transformer_depth_middle": "transformer_layers_per_block[-1]",
    "empty_transformer_levels": "CrossAttn blocks of transformer_layers_per_block 0",
    "context_dim": "cross_attention_dim",
    "use_linear_proj": "use_linear_projection", "adm_in_channels": "projection_class_embeddings_input_dim",
    "time_cond_proj_dim": "time_cond_proj_dim",
    "input_depths": "transformer_layers_per_block (per layer)",
    "output_depths": "reverse_transformer_layers_per_block",
    "middle_transformer": "mid_block_type",
}
_DOWN_RESNET = re.compile(r"down_blocks\.(\d+)\.resnets\.(\d+)\.conv1\.weight")
_TRANSFORMER = re.compile(r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.(\d+)\.transformer_blocks\.(\d+)"
                          r"\.norm1\.weight")
_DOWN_PROJ_IN = re.compile(r"down_blocks\.(\d+)\.attentions\.0\.proj_in\.weight")


def unet_config_from_diffusers_shapes(shapes: Mapping[str, torch.Size], declared: UNetConfig) -> UNetConfig:
    """`declared` with every field the tensors show replaced by what the diffusers-named `shapes` show.

    Reads names and shapes only, so a config.json that declares 100,000 blocks is caught before a key map
    or a module of that size is built."""
    conv_in = shapes.get("conv_in.weight")
    if conv_in is None or len(conv_in) != 4:
        raise CheckpointError("the U-Net weights have no 4-D conv_in.weight")
    per_level: dict[int, set[int]] = {}
    widths: dict[int, int] = {}
    for key, shape in shapes.items():
        if m := _DOWN_RESNET.fullmatch(key):
            level, index = int(m.group(1)), int(m.group(2))
            per_level.setdefault(level, set()).add(index)
            if index == 0:
                widths[level] = int(shape[0])
    if not per_level or sorted(per_level) != list(range(len(per_level))) or sorted(widths) != sorted(per_level):
        raise CheckpointError(f"the U-Net weights have down_blocks levels {sorted(per_level)}")
    depth: dict[str, int] = {}                 # "down_blocks.L.attentions.I" (and up_blocks, mid_block) -> blocks
    for key in shapes:
        if m := _TRANSFORMER.fullmatch(key):
            block = f"{m.group(1)}.attentions.{m.group(2)}"
            depth[block] = max(depth.get(block, 0), int(m.group(3)) + 1)
    with_transformer = {int(m.group(1)) for key in shapes if (m := _DOWN_PROJ_IN.fullmatch(key))}
    mc = int(conv_in[0])
    counts = {len(v) for v in per_level.values()}
    blocks, levels = (counts.pop() if len(counts) == 1 else -1), len(per_level)
    level_depths = tuple(depth.get(f"down_blocks.{level}.attentions.0", 0) for level in range(levels))
    inputs = [depth.get(f"down_blocks.{level}.attentions.{i}", 0) for level in range(levels) for i in range(blocks)]
    outputs = [depth.get(f"up_blocks.{up}.attentions.{i}", 0) for up in range(levels) for i in range(blocks + 1)]
    to_k = next((s for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((s for k, s in shapes.items() if k.endswith(".proj_in.weight")), None)
    conv_out, add = shapes.get("conv_out.weight"), shapes.get("add_embedding.linear_1.weight")
    cond_proj = shapes.get("time_embedding.cond_proj.weight")
    try:
        return replace(
            declared,
            in_channels=int(conv_in[1]),
            out_channels=int(conv_out[0]) if conv_out is not None else declared.out_channels,
            model_channels=mc,
            channel_mult=tuple(widths[level] // mc if widths[level] % mc == 0 else -widths[level]
                               for level in sorted(widths)),
            num_res_blocks=blocks,
            transformer_depth=level_depths,
            transformer_depth_middle=depth.get("mid_block.attentions.0", 0),
            empty_transformer_levels=tuple(level for level in sorted(with_transformer)
                                           if level in per_level and not level_depths[level]),
            input_depths=block_depths(inputs, level_depths, blocks),
            output_depths=block_depths(outputs, level_depths[::-1], blocks + 1),
            middle_transformer="mid_block.attentions.0.proj_in.weight" in shapes,
            context_dim=int(to_k[1]) if to_k is not None and len(to_k) == 2 else declared.context_dim,
            use_linear_proj=len(proj_in) == 2 if proj_in is not None else declared.use_linear_proj,
            adm_in_channels=int(add[1]) if add is not None and len(add) == 2 else None,
            time_cond_proj_dim=int(cond_proj[1]) if cond_proj is not None and len(cond_proj) == 2 else None,
        )
    except ValueError as exc:       # blocks the config cannot hold (transformers where a level has none, ...)
        raise CheckpointError(f"the U-Net weights: {exc}") from None


def _check_expressible(cfg: UNetConfig) -> None:
    """diffusers takes the middle block's depth from the last level; refuse configs where that conflicts."""
    last, attends = cfg.transformer_depth[-1], cfg.has_transformer(len(cfg.transformer_depth) - 1)
    if cfg.middle_transformer and attends and last != cfg.transformer_depth_middle:
        raise ValueError(
            f"UNetConfig: diffusers cannot express last-level depth {last} with middle depth "
            f"{cfg.transformer_depth_middle}"
        )


def unet_config_to_diffusers(cfg: UNetConfig) -> dict[str, Any]:
    """A diffusers `UNet2DConditionModel` config dict that builds the same network as `UNet(cfg)`.

    Heads go in `attention_head_dim` as diffusers reads it (a head count): one int for num_heads configs (as
    SD1 files have), a per-level list for head_dim configs (as SD2 / SDXL files have).
    """
    _check_expressible(cfg)
    channels = [cfg.model_channels * m for m in cfg.channel_mult]
    has_attention = [cfg.has_transformer(level) for level in range(len(channels))]
    layers: list[Any] = [d if a else 1 for d, a in zip(cfg.transformer_depth, has_attention)]
    if cfg.middle_transformer:
        layers[-1] = cfg.transformer_depth_middle
    if cfg.input_depths:        # per layer; diffusers then takes the middle's depth from the last level's first
        layers = [[cfg.input_depth(level, i) for i in range(cfg.num_res_blocks)] if a else layers[level]
                  for level, a in enumerate(has_attention)]
    if cfg.num_heads is not None:
        heads: int | list[int] = cfg.num_heads
    else:
        heads = [max(1, cfg.heads_at(c)) for c in channels]
    config: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "block_out_channels": channels,
        "layers_per_block": cfg.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attention],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if cfg.middle_transformer else "UNetMidBlock2D",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attention)],
        "transformer_layers_per_block": layers if cfg.input_depths or len(set(layers)) > 1 else layers[0],
        "attention_head_dim": heads,
        "cross_attention_dim": cfg.context_dim,
        "use_linear_projection": cfg.use_linear_proj,
        "upcast_attention": cfg.upcast_attention,
        "norm_num_groups": cfg.norm_groups,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "center_input_sample": False,
    }
    if cfg.adm_in_channels is not None:
        config |= {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": SDXL_SIZE_EMBED_DIM,
            "projection_class_embeddings_input_dim": cfg.adm_in_channels,
        }
    if cfg.time_cond_proj_dim is not None:
        config["time_cond_proj_dim"] = cfg.time_cond_proj_dim
    if cfg.input_depths or cfg.output_depths:   # an asymmetric U-Net: every up block's depth per layer
        config["reverse_transformer_layers_per_block"] = [
            [cfg.output_depth(level, i) for i in range(cfg.num_res_blocks + 1)] if a else 1
            for level, a in reversed(list(enumerate(has_attention)))]
    return config
