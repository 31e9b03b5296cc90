"""The diffusers layout of the SD VAE: config translation and the key table to and from sdlab (= LDM) names.

sdlab's ``AutoencoderKL`` uses the original LDM names (``encoder.down.0.block.1.conv1``); a diffusers folder
stores the same tensors under ``vae/diffusion_pytorch_model.safetensors`` with other names. The table is
generated from the config:

    LDM / sdlab                               diffusers
    encoder.down.{i}.block.{j}.*              encoder.down_blocks.{i}.resnets.{j}.*
    encoder.down.{i}.downsample.conv          encoder.down_blocks.{i}.downsamplers.0.conv
    {en,de}coder.mid.block_{1,2}              {en,de}coder.mid_block.resnets.{0,1}
    {en,de}coder.mid.attn_1.{norm,q,k,v,proj_out}
                                              {en,de}coder.mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}
    *.nin_shortcut                            *.conv_shortcut
    {en,de}coder.norm_out                     {en,de}coder.conv_norm_out
    decoder.up.{L-1-i}.block.{j}.*            decoder.up_blocks.{i}.resnets.{j}.*      (order reversed)
    decoder.up.{L-1-i}.upsample.conv          decoder.up_blocks.{i}.upsamplers.0.conv
    conv_in, conv_out, quant_conv, post_quant_conv: same names

The attention projections are 1x1 convs (C, C, 1, 1) in LDM and Linear (C, C) in diffusers; the state-dict
converters reshape them. Diffusers files written before diffusers 0.14 name the attention
``query/key/value/proj_attn``; the reader accepts those too.

Imports only ``sdlab.models`` (checkpoints may import families and models, never diffusers).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.validate import check_int, check_vae
from sdlab.models.vae import ATTENTION_PROJECTIONS, VAEConfig, normalize_vae_attention_shapes

logger = logging.getLogger(__name__)

DEFAULT_SCALING_FACTOR = 0.18215  # diffusers' default when a vae/config.json has no scaling_factor

_RESNET_PARAMS = ("norm1", "conv1", "norm2", "conv2")
_ATTENTION_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_SUPPORTED_DEFAULTS = {  # diffusers config fields sdlab's AutoencoderKL has no switch for, with the value it implements
    "act_fn": "silu",
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}


# ----------------------------------------------------------------------------------------------------------
# Config


# diffusers VAE classes people take for an SD VAE, with the names they know them by
_OTHER_VAE_CLASSES = {"AutoencoderTiny": "TAESD", "AsymmetricAutoencoderKL": "an asymmetric VAE",
                      "ConsistencyDecoderVAE": "OpenAI's consistency decoder"}


def vae_config_from_diffusers(config: Mapping[str, Any]) -> VAEConfig:
    """``VAEConfig`` from a diffusers ``vae/config.json`` (as a dict). Raises on features sdlab does not build,
    first on a class other than ``AutoencoderKL``, named."""
    class_name = config.get("_class_name", "AutoencoderKL")
    if class_name != "AutoencoderKL":
        known = f" ({_OTHER_VAE_CLASSES[class_name]})" if class_name in _OTHER_VAE_CLASSES else ""
        raise ValueError(f"_class_name {class_name}{known}: sdlab loads only AutoencoderKL VAEs")
    for field, expected in _SUPPORTED_DEFAULTS.items():
        if config.get(field, expected) != expected:
            raise ValueError(f"diffusers VAE config has {field}={config[field]!r}; sdlab supports only {expected!r}")
    widths = config.get("block_out_channels", (64,))
    if not isinstance(widths, (list, tuple)) or not widths:
        raise ValueError(f"block_out_channels must be a non-empty list, got {widths!r}")
    widths = [check_int("block_out_channels", w) for w in widths]
    for field, expected in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        kinds = config.get(field, [expected] * len(widths))
        if not isinstance(kinds, (list, tuple)) or len(kinds) != len(widths) or set(map(repr, kinds)) != {repr(expected)}:
            raise ValueError(f"diffusers VAE config has {field}={kinds!r}; sdlab supports only {len(widths)} x {expected}")
    base = widths[0]
    if any(w % base for w in widths):
        raise ValueError(f"block_out_channels {widths} are not multiples of the first width {base}")
    cfg = VAEConfig(
        in_channels=check_int("in_channels", config.get("in_channels", 3)),
        out_channels=check_int("out_channels", config.get("out_channels", 3)),
        latent_channels=check_int("latent_channels", config.get("latent_channels", 4)),
        base_channels=base,
        channel_mult=tuple(w // base for w in widths),
        num_res_blocks=check_int("layers_per_block", config.get("layers_per_block", 1)),
        norm_groups=check_int("norm_num_groups", config.get("norm_num_groups", 32)),
    )
    check_vae(cfg)
    return cfg


# diffusers names of the config fields the tensors show, for messages
DIFFUSERS_VAE_NAMES = {"base_channels": "block_out_channels[0]", "channel_mult": "block_out_channels",
                       "num_res_blocks": "layers_per_block"}
_DOWN_RESNET = re.compile(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.conv1\.weight")


def vae_config_from_diffusers_shapes(shapes: Mapping[str, torch.Size], conventions: VAEConfig) -> VAEConfig:
    """`conventions` with every field the diffusers-named tensors show (widths, levels, blocks, channels)."""
    blocks: dict[int, set[int]] = {}
    for key in shapes:
        if m := _DOWN_RESNET.fullmatch(key):
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    conv_in = shapes.get("encoder.conv_in.weight")
    if conv_in is None or len(conv_in) != 4 or not blocks or sorted(blocks) != list(range(len(blocks))):
        raise CheckpointError(f"the VAE weights have no encoder.conv_in or down_blocks levels {sorted(blocks)}")
    base = int(conv_in[0])
    widths = [shapes.get(f"encoder.down_blocks.{i}.resnets.0.conv1.weight") for i in range(len(blocks))]
    if any(w is None for w in widths):
        raise CheckpointError("the VAE weights lack a first resnet in some encoder level")
    counts = {len(b) for b in blocks.values()}
    conv_out, post_quant = shapes.get("decoder.conv_out.weight"), shapes.get("post_quant_conv.weight")
    return replace(
        conventions,
        in_channels=int(conv_in[1]),
        out_channels=int(conv_out[0]) if conv_out is not None else conventions.out_channels,
        latent_channels=int(post_quant[0]) if post_quant is not None else conventions.latent_channels,
        base_channels=base,
        channel_mult=tuple(int(w[0]) // base if int(w[0]) % base == 0 else -int(w[0]) for w in widths),
        num_res_blocks=counts.pop() if len(counts) == 1 else -1,
    )


def vae_scaling_factor_from_diffusers(config: Mapping[str, Any]) -> float:
    """The latent scaling factor a diffusers VAE config declares (0.18215 SD1/2, 0.13025 SDXL); families use it."""
    return float(config.get("scaling_factor", DEFAULT_SCALING_FACTOR))


def vae_config_to_diffusers(
    cfg: VAEConfig, scaling_factor: float = DEFAULT_SCALING_FACTOR, sample_size: int = 512
) -> dict[str, Any]:
    """A diffusers ``AutoencoderKL`` config dict for ``cfg`` (what a ``vae/config.json`` holds).

    ``scaling_factor`` and ``sample_size`` (diffusers' tiling size) are not VAE shape; the caller supplies them.
    """
    levels = len(cfg.channel_mult)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [cfg.base_channels * m for m in cfg.channel_mult],
        "layers_per_block": cfg.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_groups,
        "sample_size": sample_size,
        "scaling_factor": scaling_factor,
        "force_upcast": True,
        **{field: value for field, value in _SUPPORTED_DEFAULTS.items() if field != "act_fn"},
    }


# ----------------------------------------------------------------------------------------------------------
# Key table


def _module_map(cfg: VAEConfig) -> dict[str, str]:
    """LDM module path -> diffusers module path, for every module that owns parameters."""
    levels = len(cfg.channel_mult)
    widths = [cfg.base_channels * m for m in cfg.channel_mult]
    modules: dict[str, str] = {}

    def resnet(ldm: str, diffusers: str, has_shortcut: bool) -> None:
        for name in _RESNET_PARAMS:
            modules[f"{ldm}.{name}"] = f"{diffusers}.{name}"
        if has_shortcut:
            modules[f"{ldm}.nin_shortcut"] = f"{diffusers}.conv_shortcut"

    def mid(part: str) -> None:
        resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", False)
        for ldm_name, diffusers_name in _ATTENTION_NAMES.items():
            modules[f"{part}.mid.attn_1.{ldm_name}"] = f"{part}.mid_block.attentions.0.{diffusers_name}"
        resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", False)

    block_in = cfg.base_channels
    for i, width in enumerate(widths):
        for j in range(cfg.num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", block_in != width)
            block_in = width
        if i != levels - 1:
            modules[f"encoder.down.{i}.downsample.conv"] = f"encoder.down_blocks.{i}.downsamplers.0.conv"
    mid("encoder")

    block_in = widths[-1]
    for i in range(levels):  # diffusers' up_blocks run in execution order: up_blocks.0 is LDM's up.{L-1}
        level = levels - 1 - i
        for j in range(cfg.num_res_blocks + 1):
            resnet(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}", block_in != widths[level])
            block_in = widths[level]
        if level != 0:
            modules[f"decoder.up.{level}.upsample.conv"] = f"decoder.up_blocks.{i}.upsamplers.0.conv"
    mid("decoder")

    for part in ("encoder", "decoder"):
        modules[f"{part}.conv_in"] = f"{part}.conv_in"
        modules[f"{part}.norm_out"] = f"{part}.conv_norm_out"
        modules[f"{part}.conv_out"] = f"{part}.conv_out"
    modules["quant_conv"] = "quant_conv"
    modules["post_quant_conv"] = "post_quant_conv"
    return modules


def vae_key_map(cfg: VAEConfig) -> dict[str, str]:
    """sdlab/LDM state-dict key -> diffusers key, for every parameter of ``AutoencoderKL(cfg)`` (no prefix)."""
    return {
        f"{ldm}.{param}": f"{diffusers}.{param}"
        for ldm, diffusers in _module_map(cfg).items()
        for param in ("weight", "bias")
    }


def _is_attention_projection(ldm_key: str) -> bool:
    return any(ldm_key.endswith(f".attn_1.{name}.weight") for name in ATTENTION_PROJECTIONS)


def _check_keys(found: set[str], expected: set[str], what: str) -> None:
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise KeyError(
            f"{what}: {len(missing)} missing keys (first: {missing[:5]}), "
            f"{len(unexpected)} unexpected keys (first: {unexpected[:5]}); is the VAE config right?"
        )


# ----------------------------------------------------------------------------------------------------------
# Whole state dicts


def vae_state_dict_to_diffusers(state: Mapping[str, Tensor], cfg: VAEConfig) -> dict[str, Tensor]:
    """sdlab/LDM VAE state dict (no ``first_stage_model.`` prefix) -> diffusers ``AutoencoderKL`` state dict.

    Attention projections become Linear (C, C). Accepts them in Linear shape already. Tensors are not copied.
    """
    key_map = vae_key_map(cfg)
    _check_keys(set(state), set(key_map), "sdlab VAE state dict")
    converted = {}
    for ldm_key, diffusers_key in key_map.items():
        tensor = state[ldm_key]
        if _is_attention_projection(ldm_key):
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])  # (C, C, 1, 1) -> (C, C)
        converted[diffusers_key] = tensor
    return converted


def _rename_legacy_attention(key: str) -> str:
    """Pre-0.14 diffusers VAE attention names (``query``, ``proj_attn``) -> current ones (``to_q``, ``to_out.0``)."""
    head, sep, tail = key.rpartition(".attentions.0.")
    if not sep:
        return key
    name, _, param = tail.partition(".")
    return f"{head}{sep}{_LEGACY_ATTENTION_NAMES.get(name, name)}.{param}"


def vae_state_dict_from_diffusers(state: Mapping[str, Tensor], cfg: VAEConfig) -> dict[str, Tensor]:
    """diffusers ``AutoencoderKL`` state dict -> sdlab/LDM names, loadable by ``AutoencoderKL(cfg)``.

    Attention projections become 1x1 convs (C, C, 1, 1). Tensors are not copied.
    """
    renamed = {_rename_legacy_attention(key): value for key, value in state.items()}
    if len(renamed) != len(state):
        raise KeyError("diffusers VAE state dict holds both legacy and current attention names")
    if any(new != old for new, old in zip(renamed, state)):
        logger.info("diffusers VAE uses pre-0.14 attention names (query/key/value/proj_attn); renaming them")
    key_map = vae_key_map(cfg)
    _check_keys(set(renamed), set(key_map.values()), "diffusers VAE state dict")
    converted = {ldm_key: renamed[diffusers_key] for ldm_key, diffusers_key in key_map.items()}
    return normalize_vae_attention_shapes(converted)
