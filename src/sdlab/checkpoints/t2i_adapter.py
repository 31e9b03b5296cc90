"""T2I-Adapter files: TencentARC's original layout and diffusers' `T2IAdapter`, full / light / SDXL.

    original   sdlab's own names (`sdlab.models.t2i_adapter`), as A1111's ControlNet extension and ComfyUI load
               them (`t2iadapter_canny_sd15v2.pth`, `t2iadapter_*_sd14v1.pth`, `t2i-adapter_xl_*.safetensors`):
               full `conv_in`, `body.{i * R + j}.{in_conv, block1, block2, down_opt.op}`; light
               `body.{i}.{in_conv, body.{j}.block1 / block2, out_conv}`. `.safetensors`, or `.pth` / `.ckpt`
               read with the weights-only unpickler.
    diffusers  a folder with config.json (`_class_name` T2IAdapter, `adapter_type` full_adapter /
               full_adapter_xl / light_adapter) + diffusion_pytorch_model.safetensors (or .bin), or one file of
               those tensors: `adapter.conv_in`, `adapter.body.{i}.in_conv`, `adapter.body.{i}.resnets.{j}.*`
               (light: and `adapter.body.{i}.out_conv`); renamed to the original names.

Sizes come from the tensors: the hint's channels (1 for the sketch models, else 3) and the pixel-unshuffle
factor u from conv_in's input width (channels * u^2), the widths from each level, R (blocks per level) from
diffusers' names or, in the original full layout, from where the width changes (A1111's extension takes 2).
What tensors cannot show is which levels halve the picture (average pooling has no weights): an SDXL adapter
(`Adapter_XL`, `full_adapter_xl`) only at its third level, the others at every level but the first. A
config.json's `adapter_type` says which; otherwise the file's unshuffle factor: u twice the pixels per latent
position (`latent_factor`, 8 for every released VAE) is SDXL's, whose first feature joins the U-Net after its
first halving (A1111's extension: conv_in reads 256 or 768 channels, u = 16), any other u the SD1 / SD2 pattern.
So an adapter is described as what it is whatever model it is given to, and `check_fits` refuses one whose
features do not land where the U-Net adds them (`unet.adapter_blocks`), naming both grids.

The StyleAdapter (`style_embedding`: tokens appended to the text context from a CLIP vision embedding) and
the CoAdapter fuser are refused with one line naming them (`RefusedAdapterError`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdlab.checkpoints.components import RenamedView
from sdlab.checkpoints.diffusers_folder import component_weights, read_config_json
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.io import read_checkpoint, shapes_of
from sdlab.checkpoints.runnable import check_builds, load_checked
from sdlab.models.t2i_adapter import T2IAdapter, T2IAdapterConfig
from sdlab.models.unet import UNetConfig, adapter_blocks

ADAPTER_MARKER = re.compile(r"(adapter\.)?body\.\d+\.(block1|in_conv|out_conv|resnets)\.")
"""A key that marks a T2I-Adapter file (both layouts); an upscaler's body.N.rdbK / body.N is none."""
_CONTROLNET_MARKERS = ("input_hint_block.", "controlnet_cond_embedding.", "model.diffusion_model.")
_STYLE = re.compile(r"(adapter\.)?style_embedding$")
_FUSER = re.compile(r"(adapter\.)?(task_embedding|spatial_feat_mapping|fuser)")
_DIFFUSERS_TYPES = {"full_adapter": ("full", False), "full_adapter_xl": ("full", True),
                    "light_adapter": ("light", False)}
_FULL_BLOCK = re.compile(r"body\.(\d+)\.block1\.weight")
_LIGHT_LEVEL = re.compile(r"body\.(\d+)\.out_conv\.weight")
_LIGHT_BLOCK = re.compile(r"body\.(\d+)\.body\.(\d+)\.block1\.weight")
_DIFFUSERS_RESNET = re.compile(r"body\.(\d+)\.resnets\.(\d+)\.(.+)")
_DIFFUSERS_LEVEL = re.compile(r"body\.(\d+)\.(in_conv|out_conv)\.(.+)")


class RefusedAdapterError(CheckpointError):
    """A T2I-Adapter file of a kind sdlab recognises and does not run (StyleAdapter, CoAdapter fuser)."""


@dataclass(frozen=True)
class LoadedT2IAdapter:
    """A T2I-Adapter ready to run, and what it was loaded from."""

    model: T2IAdapter
    config: T2IAdapterConfig
    origin: str                     # file or folder
    layout: str                     # "original" | "diffusers"

    @property
    def name(self) -> str:
        """File name without its suffix (A1111's model name in the infotext)."""
        return Path(self.origin).stem if Path(self.origin).is_file() else Path(self.origin).name

    def check_compatible(self, unet: UNetConfig, latent_factor: int, model_family: str | None = None) -> None:
        """Raise `CheckpointError` unless this adapter's features land where a U-Net of config `unet` adds them
        (`check_fits`); `latent_factor`: pixels per latent position (the VAE's)."""
        check_fits(self.origin, self.config, unet, latent_factor, model_family)


def adapter_places(unet: UNetConfig) -> list[tuple[int, int]]:
    """(width, latent positions per feature position) of every place a U-Net adds a T2I-Adapter feature: its
    `adapter_blocks` input blocks, then the middle block."""
    places, block = [], 0
    joins = adapter_blocks(unet)
    for level, mult in enumerate(unet.channel_mult):
        width = mult * unet.model_channels
        for _ in range(unet.num_res_blocks):
            block += 1
            if block in joins:
                places.append((width, 2 ** level))
        if level != len(unet.channel_mult) - 1:
            block += 1                                                  # the level's Downsample
            if block in joins:
                places.append((width, 2 ** (level + 1)))
    top = len(unet.channel_mult) - 1
    return places + [(unet.channel_mult[top] * unet.model_channels, 2 ** top)]


def check_fits(origin: str, cfg: T2IAdapterConfig, unet: UNetConfig, latent_factor: int,
               model_family: str | None = None) -> None:
    """Each feature of an adapter of `cfg` has the width and grid of the place the U-Net adds it
    (`adapter_places`), else a `CheckpointError` naming both."""
    places = adapter_places(unet)
    features = [(width, factor) for width, factor in zip(cfg.channels, cfg.feature_factors())]
    wanted = [(width, latent_factor * step) for width, step in places[: len(features)]]
    if len(features) > len(places) or features != wanted:
        ours = ", ".join(f"{w} at 1/{f}" for w, f in features)
        theirs = ", ".join(f"{w} at 1/{latent_factor * s}" for w, s in places)
        model = f"the {model_family} model" if model_family else "the model"
        raise CheckpointError(f"{origin}: this T2I-Adapter gives features {ours} (of the picture) but {model} "
                              f"takes {theirs}")


def is_t2i_adapter(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a T2I-Adapter file or diffusers folder (any kind, the refused ones too), by its names."""
    path = Path(path)
    try:
        if path.is_dir():
            config_file = path / "config.json"
            return config_file.is_file() and read_config_json(config_file).get("_class_name") in (
                "T2IAdapter", "MultiAdapter")
        keys = list(read_checkpoint(path, shapes_only=True)[0])
    except CheckpointError:
        return False
    return _adapter_keys(keys)


def _adapter_keys(keys: list[str]) -> bool:
    if any(marker in k for k in keys for marker in _CONTROLNET_MARKERS):    # a ControlNet or a whole model
        return False
    return any(ADAPTER_MARKER.match(k) or _STYLE.match(k) or _FUSER.match(k) for k in keys)


def _refused(path: Path, keys: list[str]) -> None:
    if any(_STYLE.match(k) for k in keys):
        raise RefusedAdapterError(f"{path}: a T2I StyleAdapter (style_embedding): it adds tokens from a CLIP vision "
                              "embedding to the text context, which sdlab does not do; only full and light "
                              "T2I-Adapters load")
    if any(_FUSER.match(k) for k in keys):
        raise RefusedAdapterError(f"{path}: a CoAdapter fuser: sdlab does not combine CoAdapters; give each "
                              "adapter as its own control")


def _original_names(keys: list[str]) -> tuple[dict[str, str], str]:
    """(original name -> file name, layout) of an adapter's keys, `adapter.` dropped."""
    local = {k.removeprefix("adapter."): k for k in keys}
    if not any(".resnets." in k for k in local):
        return local, "original"
    full = "conv_in.weight" in local
    per_level = 1 + max(int(m.group(2)) for k in local if (m := _DIFFUSERS_RESNET.fullmatch(k)))
    names = {}
    for key, file_key in local.items():
        if m := _DIFFUSERS_RESNET.fullmatch(key):
            level, block, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            name = f"body.{level * per_level + block}.{rest}" if full else f"body.{level}.body.{block}.{rest}"
            names[name] = file_key
        elif full and (m := _DIFFUSERS_LEVEL.fullmatch(key)) and m.group(2) == "in_conv":
            names[f"body.{int(m.group(1)) * per_level}.in_conv.{m.group(3)}"] = file_key
        else:
            names[key] = file_key
    return names, "diffusers"


def _unshuffled(width: int, path: Path) -> tuple[int, int]:
    """(hint channels, unshuffle factor) of a conv_in reading `width` = channels * u^2, RGB first."""
    for channels in (3, 1):
        if width % channels == 0 and math.isqrt(width // channels) ** 2 == width // channels:
            return channels, math.isqrt(width // channels)
    raise CheckpointError(f"{path}: the adapter reads {width} channels, not 3 or 1 hint channels times a square")


def _downsampled(levels: int, xl: bool) -> tuple[bool, ...]:
    return tuple(level == 2 if xl else level > 0 for level in range(levels))


def _full_config(shapes: Mapping[str, torch.Size], xl: bool | None, latent_factor: int,
                 path: Path) -> T2IAdapterConfig:
    blocks = sorted(int(m.group(1)) for k in shapes if (m := _FULL_BLOCK.fullmatch(k)))
    count = len(blocks)
    if not count or blocks != list(range(count)):
        raise CheckpointError(f"{path}: the adapter's body has blocks {blocks}; expected 0, 1, 2, ...")
    starts = [i for i in blocks if f"body.{i}.in_conv.weight" in shapes]
    per_level = math.gcd(*starts, count) if starts else (2 if count % 2 == 0 else 1)
    hint_channels, unshuffle = _unshuffled(int(shapes["conv_in.weight"][1]), path)
    levels = count // per_level
    conv_down = tuple(f"body.{i * per_level}.down_opt.op.weight" in shapes for i in range(levels))
    if any(conv_down):
        downsampled = conv_down
    else:
        downsampled = _downsampled(levels, unshuffle == 2 * latent_factor if xl is None else xl)
    return T2IAdapterConfig(
        kind="full", hint_channels=hint_channels,
        channels=tuple(int(shapes[f"body.{i * per_level}.block1.weight"][0]) for i in range(levels)),
        num_res_blocks=per_level, unshuffle=unshuffle, downsampled=downsampled,
        kernel_size=int(shapes["body.0.block2.weight"][2]), conv_downsample=any(conv_down),
    )


def _light_config(shapes: Mapping[str, torch.Size], path: Path) -> T2IAdapterConfig:
    levels = sorted(int(m.group(1)) for k in shapes if (m := _LIGHT_LEVEL.fullmatch(k)))
    if not levels or levels != list(range(len(levels))):
        raise CheckpointError(f"{path}: the light adapter has levels {levels}; expected 0, 1, 2, ...")
    per_level = 1 + max((int(m.group(2)) for k in shapes if (m := _LIGHT_BLOCK.fullmatch(k))), default=-1)
    hint_channels, unshuffle = _unshuffled(int(shapes["body.0.in_conv.weight"][1]), path)
    return T2IAdapterConfig(
        kind="light", hint_channels=hint_channels,
        channels=tuple(int(shapes[f"body.{i}.out_conv.weight"][0]) for i in levels),
        num_res_blocks=per_level, unshuffle=unshuffle, downsampled=_downsampled(len(levels), False),
    )


def _read(path: Path, shapes_only: bool) -> tuple[Mapping[str, Tensor], dict[str, Any] | None]:
    if path.is_dir():
        config = read_config_json(path / "config.json")
        if config.get("_class_name") == "MultiAdapter":
            raise CheckpointError(f"{path}: a diffusers MultiAdapter folder; give each of its adapters as its own "
                                  "control")
        if config.get("_class_name") != "T2IAdapter":
            raise CheckpointError(f"{path}: config.json describes a {config.get('_class_name')}, not a T2IAdapter")
        return component_weights(path), config
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    return read_checkpoint(path, shapes_only=shapes_only)[0], None


@dataclass(frozen=True)
class T2IAdapterFile:
    """A T2I-Adapter file or folder read from its names and shapes: its config and its tensors under sdlab's
    names (not read yet from a safetensors file)."""

    config: T2IAdapterConfig
    tensors: Mapping[str, Tensor]
    origin: str
    layout: str                     # "original" | "diffusers"


def read_t2i_adapter(path: str | os.PathLike[str], *, latent_factor: int = 8,
                     shapes_only: bool = False) -> T2IAdapterFile:
    """What a T2I-Adapter file or diffusers folder holds (module docstring), from names and shapes;
    `latent_factor`: pixels per latent position of the models it is for (which levels downsample, where no
    config.json says). Raises `CheckpointError` with one line."""
    path = Path(path)
    state, config_json = _read(path, shapes_only)
    keys = list(state)
    _refused(path, keys)
    if not _adapter_keys(keys):
        raise CheckpointError(f"{path}: not a T2I-Adapter: no body.N.block1 / in_conv / out_conv / resnets key among "
                              f"{len(keys)} keys")
    names, layout = _original_names(keys)
    all_shapes = shapes_of(state)
    shapes = {name: all_shapes[key] for name, key in names.items()}
    xl = None                                       # from the unshuffle factor (`_full_config`)
    if config_json is not None:
        kind = config_json.get("adapter_type", "full_adapter")
        if kind not in _DIFFUSERS_TYPES:
            raise CheckpointError(f"{path}: adapter_type {kind!r} is not one of {', '.join(_DIFFUSERS_TYPES)}")
        xl = _DIFFUSERS_TYPES[kind][1]
    if "conv_in.weight" in shapes:
        cfg = _full_config(shapes, xl, latent_factor, path)
    elif "body.0.out_conv.weight" in shapes and "body.0.in_conv.weight" in shapes:
        cfg = _light_config(shapes, path)
    else:
        raise CheckpointError(f"{path}: a T2I-Adapter of neither the full (conv_in) nor the light "
                              "(body.0.in_conv / out_conv) kind")
    check_builds(lambda: T2IAdapter(cfg), shapes, path, "a T2I-Adapter")
    return T2IAdapterFile(cfg, RenamedView(state, names), str(path), layout)


def load_t2i_adapter(path: str | os.PathLike[str], *, latent_factor: int = 8,
                     dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> LoadedT2IAdapter:
    """Read a T2I-Adapter (`read_t2i_adapter`, `latent_factor` as there) and load its weights as `dtype` on
    `device`. Raises `CheckpointError` with one line."""
    found = read_t2i_adapter(path, latent_factor=latent_factor)
    model = load_checked(lambda: T2IAdapter(found.config), found.tensors, dtype, device, path, "T2I-Adapter")
    return LoadedT2IAdapter(model=model, config=found.config, origin=found.origin, layout=found.layout)
