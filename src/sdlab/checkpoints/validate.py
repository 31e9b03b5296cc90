"""Checks on declared architectures, run before any module is built.

A config comes from a file (sdlab's `sdlab.config` metadata, a diffusers `config.json`) or from the tensor
shapes (`infer`). A declared config is trusted only as far as the tensors confirm it: every field a shape
can show must equal what the shapes show (`check_declared`), and the fields no shape shows (heads, norm
groups, activation, ...) must make a network that can be built (`check_unet`, `check_vae`, `check_text`).
So a file that declares 100,000 ResBlocks fails in microseconds naming the field, instead of building a
15 GB module first. Each function raises `CheckpointError("<field>: <why>")`; callers prefix the file.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import fields
from typing import Any

from sdlab.checkpoints.errors import CheckpointError
from sdlab.models.clip import CLIPTextConfig
from sdlab.models.unet import UNetConfig
from sdlab.models.vae import VAEConfig

# Fields that the tensors show; the rest are conventions the file (or the family) must supply.
UNET_SHAPE_FIELDS = ("in_channels", "out_channels", "model_channels", "channel_mult", "num_res_blocks",
                     "transformer_depth", "transformer_depth_middle", "empty_transformer_levels", "input_depths",
                     "output_depths", "middle_transformer", "context_dim", "use_linear_proj", "adm_in_channels",
                     "time_cond_proj_dim")
VAE_SHAPE_FIELDS = ("in_channels", "out_channels", "latent_channels", "base_channels", "channel_mult", "num_res_blocks")
TEXT_SHAPE_FIELDS = ("vocab_size", "max_positions", "width", "layers", "mlp_width", "projection_dim")

ACTIVATIONS = ("quick_gelu", "gelu")
_NON_NEGATIVE = frozenset({"eos_token_id", "transformer_depth_middle"})   # ints that may be 0
_MAY_BE_EMPTY = (".empty_transformer_levels", ".input_depths", ".output_depths")   # lists of ints >= 0, maybe empty
MAX_INT = 1 << 24                                                         # far above any real width or count


# ----------------------------------------------------------------------------------------------------------
# Field types of JSON-stored configs


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """`value` when it is an integer (not a bool) in [minimum, MAX_INT]; else a CheckpointError naming `name`."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise CheckpointError(f"{name}: expected an integer, got {value!r}")
    if not minimum <= value <= MAX_INT:
        raise CheckpointError(f"{name}: {value} is out of range ({minimum} to {MAX_INT})")
    return value


def check_positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise CheckpointError(f"{name}: expected a positive finite number, got {value!r}")
    return float(value)


def _check_field(name: str, annotation: str, value: Any) -> None:
    minimum = 0 if name.rsplit(".", 1)[-1] in _NON_NEGATIVE else 1
    if annotation == "int":
        check_int(name, value, minimum)
    elif annotation == "int | None":
        if value is not None:
            check_int(name, value, minimum)
    elif annotation == "bool":
        if not isinstance(value, bool):
            raise CheckpointError(f"{name}: expected true or false, got {value!r}")
    elif annotation == "float":
        check_positive_float(name, value)
    elif annotation == "str":
        if not isinstance(value, str):
            raise CheckpointError(f"{name}: expected a string, got {value!r}")
    elif annotation.startswith("tuple[int"):
        may_be_empty = name.endswith(_MAY_BE_EMPTY)
        if not isinstance(value, (list, tuple)) or not (value or may_be_empty):
            raise CheckpointError(f"{name}: expected a non-empty list of integers, got {value!r}")
        for item in value:
            check_int(name, item, 0 if name.endswith((".transformer_depth", *_MAY_BE_EMPTY)) else 1)
    else:  # a field type this module does not know: refuse rather than pass it through unchecked
        raise CheckpointError(f"{name}: cannot check a field of type {annotation}")


def config_from_json(cls: type, data: Any) -> Any:
    """`cls` (a config dataclass) from its JSON object, every field type- and range-checked."""
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise CheckpointError(f"{cls.__name__}: unknown fields {unknown}")
    for name, value in data.items():
        _check_field(f"{cls.__name__}.{name}", str(known[name].type), value)
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
    except (TypeError, ValueError) as exc:
        message = str(exc)
        raise CheckpointError(message if message.startswith(cls.__name__) else f"{cls.__name__}: {message}") from None


# ----------------------------------------------------------------------------------------------------------
# Buildable networks


def _divides(name: str, divisor: int, widths: Iterable[int], what: str) -> None:
    for width in widths:
        if divisor <= 0 or width % divisor:
            raise CheckpointError(f"{name}={divisor} does not divide the {what} width {width}")


def check_unet(cfg: UNetConfig) -> None:
    """The conventions of a U-Net config make a network: norm groups and heads divide the widths."""
    if len(cfg.transformer_depth) != len(cfg.channel_mult):
        raise CheckpointError(f"UNetConfig.transformer_depth: {len(cfg.transformer_depth)} entries for "
                              f"{len(cfg.channel_mult)} levels")
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    _divides("UNetConfig.norm_groups", cfg.norm_groups, [cfg.model_channels, *widths], "U-Net level")
    r = cfg.num_res_blocks
    depths = [max([cfg.input_depth(level, i) for i in range(r)] + [cfg.output_depth(level, i) for i in range(r + 1)])
              for level in range(len(widths))] + [cfg.transformer_depth_middle]
    attended = [w for w, d in zip([*widths, widths[-1]], depths) if d]   # heads matter where blocks attend
    if cfg.num_heads is not None:
        _divides("UNetConfig.num_heads", cfg.num_heads, attended, "attention")
    elif cfg.head_dim is not None:
        _divides("UNetConfig.head_dim", cfg.head_dim, attended, "attention")


def check_vae(cfg: VAEConfig) -> None:
    widths = [cfg.base_channels * m for m in cfg.channel_mult]
    _divides("VAEConfig.norm_groups", cfg.norm_groups, widths, "VAE level")


def check_text(cfg: CLIPTextConfig) -> None:
    """Heads divide the width, a known activation, an end token inside the vocabulary."""
    _divides("CLIPTextConfig.heads", cfg.heads, [cfg.width], "text encoder")
    if cfg.activation not in ACTIVATIONS:
        raise CheckpointError(f"CLIPTextConfig.activation: {cfg.activation!r} is not one of {', '.join(ACTIVATIONS)}")
    if not 0 <= cfg.eos_token_id < cfg.vocab_size:
        raise CheckpointError(f"CLIPTextConfig.eos_token_id: {cfg.eos_token_id} is not a token id")
    check_positive_float("CLIPTextConfig.layer_norm_eps", cfg.layer_norm_eps)


def check_buildable(cfg: UNetConfig | VAEConfig | CLIPTextConfig) -> None:
    if isinstance(cfg, UNetConfig):
        check_unet(cfg)
    elif isinstance(cfg, VAEConfig):
        check_vae(cfg)
    else:
        check_text(cfg)


# ----------------------------------------------------------------------------------------------------------
# Declared against present


def check_declared(declared: Any, found: Any, names: Iterable[str], aliases: Mapping[str, str] | None = None) -> None:
    """Every field in `names` of the `declared` config equals the one the tensors show (`found`).

    `aliases` names a field as its file spells it (diffusers' `layers_per_block` for `num_res_blocks`).
    """
    aliases = aliases or {}
    for name in names:
        want, have = getattr(declared, name), getattr(found, name)
        if want != have:
            label = f"{type(declared).__name__}.{name}" + (f" ({aliases[name]})" if name in aliases else "")
            raise CheckpointError(f"{label}: declares {_show(want)} but the weights have {_show(have)}")


def unet_shape_fields(found: UNetConfig) -> tuple[str, ...]:
    """The fields of `UNET_SHAPE_FIELDS` that the tensors of the U-Net `found` show: the text width only where
    a transformer block reads the text (attn2.to_k); a U-Net without one keeps the width its file declares."""
    return UNET_SHAPE_FIELDS if found.cross_attends else tuple(f for f in UNET_SHAPE_FIELDS if f != "context_dim")


def _show(value: Any) -> str:
    return str(list(value)) if isinstance(value, tuple) else repr(value)
