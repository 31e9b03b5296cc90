"""ControlNet files: lllyasviel's original layout and diffusers' `ControlNetModel`, SD1 / SD2 / SDXL.

    original   `control_model.` + sdlab's own names (`sdlab.models.controlnet`): input_hint_block.{0..14},
               zero_convs.N.0, middle_block_out.0, input_blocks, middle_block, time_embed, label_emb (SDXL);
               some files omit the `control_model.` prefix. `.safetensors`, or `.pth` / `.ckpt` read with the
               weights-only unpickler (`checkpoints.io`).
    diffusers  a folder with config.json + diffusion_pytorch_model.safetensors (or .bin), or one file of
               those tensors: controlnet_cond_embedding.{conv_in, blocks.K, conv_out}, controlnet_down_blocks.N,
               controlnet_mid_block, and the U-Net encoder under diffusers' names (conv_in, time_embedding,
               add_embedding, down_blocks, mid_block), renamed with the U-Net's generated key map
               (`checkpoints.diffusers_unet.unet_key_map`).

A diffusers config's `global_pool_conditions` (the shuffle model) pools the residuals over the picture; for
single files the sidecar `.yaml`'s `global_average_pooling` says so, else a name ending in `_shuffle`.
Every size is read from the tensors. What tensors cannot show (heads per level, upcast attention, norm groups)
comes from the model the ControlNet is used with (`like`), else from a diffusers config.json, else from the
structure: 1x1-conv attention projections are SD1's 8 heads, Linear projections SD2 / SDXL's 64-wide heads.
The loaded ControlNet carries its text-context width and SDXL vector width; `check_compatible` refuses a model
whose widths differ (an SD1 ControlNet on SDXL, ...) with one line naming both families.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdlab.checkpoints.components import CastingView, RenamedView, meta_device_without_init
from sdlab.checkpoints.diffusers_folder import read_config_json, component_weights
from sdlab.checkpoints.diffusers_unet import (
    unet_config_from_diffusers,
    unet_config_from_diffusers_shapes,
    unet_key_map,
)
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.sidecar import model_params, sidecar_of
from sdlab.checkpoints.infer import infer_unet_config
from sdlab.checkpoints.io import read_checkpoint, shapes_of
from sdlab.checkpoints.runnable import check_builds, nonfinite_tensors
from sdlab.checkpoints.validate import check_unet
from sdlab.models.controlnet import ControlNet, ControlNetConfig
from sdlab.models.unet import UNetConfig

ORIGINAL_MARKER = "input_hint_block.0.weight"
DIFFUSERS_MARKER = "controlnet_cond_embedding.conv_in.weight"
_ENCODER_PARTS = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")
_HINT_CONV = re.compile(r"input_hint_block\.(\d+)\.weight")
_COND_BLOCK = re.compile(r"controlnet_cond_embedding\.blocks\.(\d+)\.(weight|bias)")
_DOWN_ZERO = re.compile(r"controlnet_down_blocks\.(\d+)\.(weight|bias)")

# Family conventions by attention projection, used when neither the model nor a config.json says more.
_SD1_HEADS = UNetConfig()                                                     # 8 heads, 1x1-conv projections
_WIDE_HEADS = UNetConfig(num_heads=None, head_dim=64, use_linear_proj=True)  # SD2 / SDXL: 64-wide heads


@dataclass(frozen=True)
class LoadedControlNet:
    """A ControlNet ready to run, and what it was loaded from."""

    model: ControlNet
    config: ControlNetConfig
    origin: str                     # file or folder
    layout: str                     # "original" | "diffusers"

    @property
    def name(self) -> str:
        """File name without its suffix (A1111's model name in the infotext)."""
        return Path(self.origin).stem if Path(self.origin).is_file() else Path(self.origin).name

    @property
    def family(self) -> str:
        return family_label(self.config.unet)

    def check_compatible(self, unet: UNetConfig, model_family: str | None = None) -> None:
        """Raise `CheckpointError` unless this ControlNet fits a U-Net of config `unet` (same text-context
        width, attention projection and SDXL vector width)."""
        _check_fits(self.origin, self.config.unet, unet, model_family)


def _check_fits(origin: str, mine: UNetConfig, theirs: UNetConfig, model_family: str | None = None) -> None:
    """The text-context width is compared only where this ControlNet reads the context (SDXL's "small"
    ControlNet has no cross-attention)."""
    context = theirs.context_dim if not mine.cross_attends else mine.context_dim
    if (context, mine.adm_in_channels, mine.use_linear_proj) != (
        theirs.context_dim, theirs.adm_in_channels, theirs.use_linear_proj
    ):
        raise CheckpointError(
            f"{origin}: this ControlNet is for {family_label(mine)} models (text context {_widths(mine)}) "
            f"but the model is {model_family or family_label(theirs)} ({_widths(theirs)})"
        )


def _signature(shapes: Mapping[str, torch.Size]) -> UNetConfig:
    """A config holding only the conditioning widths that the tensors (under either naming) show; without
    any cross-attention key, one whose transformers have no blocks (it reads no text context)."""
    to_k = next((s for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((s for k, s in shapes.items() if k.endswith(".proj_in.weight")), None)
    adm = shapes.get("label_emb.0.0.weight", shapes.get("add_embedding.linear_1.weight"))
    no_blocks = {} if to_k is not None else {"transformer_depth": (0,) * len(_SD1_HEADS.channel_mult),
                                             "transformer_depth_middle": 0}
    return replace(
        _SD1_HEADS,
        **no_blocks,
        context_dim=int(to_k[1]) if to_k is not None and len(to_k) == 2 else -1,
        use_linear_proj=proj_in is not None and len(proj_in) == 2,
        adm_in_channels=int(adm[1]) if adm is not None and len(adm) == 2 else None,
    )


def family_label(cfg: UNetConfig) -> str:
    """The family a U-Net (or ControlNet) encoder belongs to, by its conditioning widths, for messages."""
    if cfg.adm_in_channels is not None:
        return "SDXL refiner" if cfg.context_dim == 1280 else "SDXL"
    return {768: "SD1", 1024: "SD2"}.get(cfg.context_dim, "SD2-like" if cfg.use_linear_proj else "SD1-like")


def _widths(cfg: UNetConfig) -> str:
    context = f"{cfg.context_dim} wide" if cfg.cross_attends else "not read"
    text = f"{context}, {'Linear' if cfg.use_linear_proj else 'conv'} attention projections"
    return text + (f", vector {cfg.adm_in_channels}" if cfg.adm_in_channels is not None else "")


def legacy_hash(path: str | os.PathLike[str]) -> str:
    """A1111's short model hash, which its ControlNet extension writes as `Model: NAME [hash]`: the first 8
    hex digits of the SHA-256 of the 64 KiB at offset 1 MiB (of the weights file inside a folder)."""
    path = Path(path)
    if path.is_dir():
        found = [p for p in sorted(path.iterdir()) if p.suffix in (".safetensors", ".bin") and p.is_file()]
        if not found:
            return "00000000"
        path = found[0]
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


# ----------------------------------------------------------------------------------------------------------
# reading


# Other control networks, by the keys that mark their files: (what the file is, what sdlab does with it, its
# marker keys).
_OTHER_CONTROLS = (
    ("a ControlNet-LLLite (kohya)", "sdlab does not load ControlNet-LLLites", re.compile(r"lllite_")),
    ("an IP-Adapter", "an image prompt (--ip-adapter, IPAdapterInput, the native ip_adapters, an A1111 ControlNet "
     "unit with an IP-Adapter module: ip-adapter_clip_h, ip-adapter_clip_g, ip-adapter-auto) draws with it",
     re.compile(r"(image_proj|ip_adapter)\.")),
    # TencentARC's StyleAdapter (style_embedding), refused by the T2I-Adapter reader too
    ("a T2I StyleAdapter", "sdlab does not load StyleAdapters (they add CLIP vision tokens to the text context)",
     re.compile(r"(adapter\.)?style_embedding$")),
    # TencentARC's files (full: body.N.block1 / block2 / in_conv; light: body.N.in_conv / out_conv) and diffusers'
    # T2IAdapter (adapter.conv_in, adapter.body.N.resnets / in_conv); an upscaler's body.N.rdbK (Real-ESRGAN) or
    # body.N (compact SRVGG) is none of them
    ("a T2I-Adapter", "a control (--control, a ControlNet unit) loads it as one (checkpoints.t2i_adapter)",
     re.compile(r"(adapter\.)?body\.\d+\.(block1|block2|in_conv|out_conv|resnets)\.|adapter\.conv_in\.")),
)


def _not_a_controlnet(path: Path, keys: list[str]) -> CheckpointError:
    other = next(((what, kind) for what, kind, marker in _OTHER_CONTROLS if any(marker.match(k) for k in keys)), None)
    if any(k.startswith("model.diffusion_model.") for k in keys):
        what = "a Stable Diffusion checkpoint (model.diffusion_model.* keys), not a ControlNet"
    elif any(k.startswith(("lora_unet_", "lora_te")) or ".lora_" in k for k in keys):
        what = "a LoRA (lora_* keys), not a ControlNet"
    elif other is not None:
        what = f"{other[0]}, not a ControlNet; {other[1]}"
    elif any(k.startswith(("down_blocks.", "conv_in.")) for k in keys) and not any("controlnet" in k for k in keys):
        what = "a diffusers U-Net, not a ControlNet"
    else:
        what = f"not a ControlNet: no {ORIGINAL_MARKER} or {DIFFUSERS_MARKER} key among {len(keys)} keys"
    return CheckpointError(f"{path}: {what}")


def _prefixed(state: Mapping[str, Tensor], marker: str) -> tuple[str, dict[str, str]] | None:
    """(prefix, local name -> file name) of the keys under the prefix of `marker`, or None."""
    for key in state:
        if key.endswith(marker):
            prefix = key[: -len(marker)]
            return prefix, {k[len(prefix):]: k for k in state if k.startswith(prefix)}
    return None


def _hint_widths(shapes: Mapping[str, torch.Size], path: Path) -> tuple[int, tuple[int, ...]]:
    """(hint channels, hint widths) from input_hint_block conv shapes (original names)."""
    indices = sorted(int(m.group(1)) for k in shapes if (m := _HINT_CONV.fullmatch(k)))
    count = len(indices)
    if count < 2 or count % 2 or indices != list(range(0, 2 * count, 2)):
        raise CheckpointError(f"{path}: input_hint_block has convs at {indices}; expected 0, 2, 4, ... (an even count)")
    first = shapes["input_hint_block.0.weight"]
    widths = [int(first[0])] + [int(shapes[f"input_hint_block.{4 * k}.weight"][0]) for k in range(1, count // 2)]
    return int(first[1]), tuple(widths)


def _diffusers_to_original(state_shapes: Mapping[str, torch.Size], declared: UNetConfig, path: Path) -> dict[str, str]:
    """original name -> diffusers name for every tensor of a diffusers ControlNet."""
    try:
        encoder_cfg = unet_config_from_diffusers_shapes(state_shapes, declared)
        check_unet(encoder_cfg)
        unet_names = {d: s for s, d in unet_key_map(encoder_cfg).items() if s.startswith(_ENCODER_PARTS)}
    except (CheckpointError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read the ControlNet's U-Net encoder: {exc}") from None
    names: dict[str, str] = {}
    for key in state_shapes:
        if key in unet_names:
            names[unet_names[key]] = key
        elif m := _COND_BLOCK.fullmatch(key):
            names[f"input_hint_block.{2 * int(m.group(1)) + 2}.{m.group(2)}"] = key
        elif m := _DOWN_ZERO.fullmatch(key):
            names[f"zero_convs.{m.group(1)}.0.{m.group(2)}"] = key
        elif key.startswith("controlnet_cond_embedding.conv_in."):
            names["input_hint_block.0." + key.rsplit(".", 1)[1]] = key
        elif key.startswith("controlnet_cond_embedding.conv_out."):
            count = sum(1 for k in state_shapes if _COND_BLOCK.fullmatch(k) and k.endswith(".weight"))
            names[f"input_hint_block.{2 * count + 2}." + key.rsplit(".", 1)[1]] = key
        elif key.startswith("controlnet_mid_block."):
            names["middle_block_out.0." + key.rsplit(".", 1)[1]] = key
        else:
            names[f"<unknown>{key}"] = key   # reported as unexpected by the key check
    return names


def _conventions(shapes: Mapping[str, torch.Size], like: UNetConfig | None) -> UNetConfig:
    if like is not None:
        return like
    proj_in = next((s for k, s in shapes.items() if k.endswith(".proj_in.weight")), None)
    return _WIDE_HEADS if proj_in is not None and len(proj_in) == 2 else _SD1_HEADS


def _diffusers_options(config: Mapping[str, Any], path: Path) -> tuple[UNetConfig, bool, bool]:
    """(encoder conventions, bgr hint, global pooling) from a diffusers ControlNetModel config.json."""
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise CheckpointError(f"{path}: mid_block_type {config['mid_block_type']!r} is not supported")
    down = config.get("down_block_types")
    as_unet = {k: v for k, v in config.items() if not k.startswith(("controlnet_", "conditioning_", "global_pool"))}
    if isinstance(down, list):   # a ControlNet has no decoder; give the U-Net reader the mirrored one it checks
        as_unet["up_block_types"] = [kind.replace("Down", "Up") for kind in reversed(down)]
    order = config.get("controlnet_conditioning_channel_order", "rgb")
    if order not in ("rgb", "bgr"):
        raise CheckpointError(f"{path}: controlnet_conditioning_channel_order {order!r} (expected rgb or bgr)")
    try:
        return unet_config_from_diffusers(as_unet), order == "bgr", bool(config.get("global_pool_conditions"))
    except (ValueError, CheckpointError) as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def _original_pooling(path: Path) -> bool:
    """Whether a single-file ControlNet pools its residuals (the shuffle model): its sidecar `.yaml` says
    so (`model.params.global_average_pooling`, as A1111 reads it), else its name ends in ``_shuffle`` or
    ``_shuffle_fp16`` (ComfyUI's rule; lllyasviel ships `control_v11e_sd15_shuffle`)."""
    sidecar = sidecar_of(path)
    value = model_params(sidecar).get("global_average_pooling") if sidecar is not None else None
    if value is not None:
        if not isinstance(value, bool):
            raise CheckpointError(f"{sidecar}: model.params.global_average_pooling must be true or false, "
                                  f"got {value!r}")
        return value
    return path.stem.lower().endswith(("_shuffle", "_shuffle_fp16"))


def _read(path: Path, shapes_only: bool) -> tuple[Mapping[str, Tensor], dict[str, Any] | None]:
    if path.is_dir():
        config = read_config_json(path / "config.json")
        if config.get("_class_name") not in (None, "ControlNetModel"):
            raise CheckpointError(f"{path}: config.json describes a {config['_class_name']}, not a ControlNetModel")
        return component_weights(path), config
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    # nested: an IP-Adapter .bin's two dicts, to name it
    return read_checkpoint(path, nested=True, shapes_only=shapes_only)[0], None


@dataclass(frozen=True)
class ControlNetFile:
    """A ControlNet file or folder read from its names and shapes: its config, and its tensors under sdlab's
    names (not read yet from a safetensors file; on the meta device from a pickle read ``shapes_only``)."""

    config: ControlNetConfig
    tensors: Mapping[str, Tensor]
    origin: str
    layout: str                     # "original" | "diffusers"


def read_controlnet(
    path: str | os.PathLike[str],
    *,
    like: UNetConfig | None = None,
    like_family: str | None = None,
    shapes_only: bool = False,
) -> ControlNetFile:
    """What a ControlNet file or diffusers folder holds (module docstring), from names and shapes; `like` is
    the config of the U-Net it will run with (its conventions, and a compatibility check naming it
    `like_family`). Raises `CheckpointError` with one line."""
    path = Path(path)
    state, config_json = _read(path, shapes_only)
    bgr = pool = False
    declared = None
    if config_json is not None:
        declared, bgr, pool = _diffusers_options(config_json, path)
    else:
        pool = _original_pooling(path)

    shapes = shapes_of(state)
    if "lora_controlnet" in state:
        raise CheckpointError(f"{path}: a Control-LoRA (lora_controlnet key); only full ControlNets are supported")
    if found := _prefixed(state, ORIGINAL_MARKER):
        layout, (_, names) = "original", found
        local_shapes = {local: shapes[key] for local, key in names.items()}
    elif found := _prefixed(state, DIFFUSERS_MARKER):
        layout, (_, diffusers_names) = "diffusers", found
        diffusers_shapes = {local: shapes[key] for local, key in diffusers_names.items()}
        if like is not None:
            _check_fits(str(path), _signature(diffusers_shapes), like, like_family)
        conventions = declared or _conventions(diffusers_shapes, like)
        renamed = _diffusers_to_original(diffusers_shapes, conventions, path)
        names = {new: diffusers_names[old] for new, old in renamed.items()}
        local_shapes = {new: diffusers_shapes[old] for new, old in renamed.items()}
    else:
        raise _not_a_controlnet(path, list(state))
    if like is not None and layout == "original":
        _check_fits(str(path), _signature(local_shapes), like, like_family)

    conventions = _conventions(local_shapes, like) if declared is None else replace(
        declared, upcast_attention=like.upcast_attention if like is not None else declared.upcast_attention
    )
    try:
        encoder = infer_unet_config({k: s for k, s in local_shapes.items() if k.startswith(_ENCODER_PARTS)}, conventions)
        check_unet(encoder)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: ControlNet encoder: {exc}") from None
    hint_channels, widths = _hint_widths(local_shapes, path)
    cfg = ControlNetConfig(unet=encoder, hint_channels=hint_channels, hint_widths=widths, hint_bgr=bgr, global_pool=pool)

    _check_keys(cfg, local_shapes, path)
    return ControlNetFile(config=cfg, tensors=RenamedView(state, names), origin=str(path), layout=layout)


def load_controlnet(
    path: str | os.PathLike[str],
    *,
    like: UNetConfig | None = None,
    like_family: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> LoadedControlNet:
    """Read a ControlNet file or diffusers folder (`read_controlnet`) and load its weights as `dtype` on
    `device`. Raises `CheckpointError` with one line."""
    found = read_controlnet(path, like=like, like_family=like_family)
    with meta_device_without_init():
        model = ControlNet(found.config)
    model.load_state_dict(CastingView(found.tensors, dtype, device), strict=True, assign=True)
    model.to(memory_format=torch.channels_last).eval()
    bad = nonfinite_tensors(model)
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} ControlNet tensors hold NaN or infinite values ({', '.join(bad[:3])})")
    return LoadedControlNet(model=model, config=found.config, origin=found.origin, layout=found.layout)


def _check_keys(cfg: ControlNetConfig, shapes: Mapping[str, torch.Size], path: Path) -> None:
    check_builds(lambda: ControlNet(cfg), shapes, path, "a ControlNet", shown=lambda key: key.removeprefix("<unknown>"))
