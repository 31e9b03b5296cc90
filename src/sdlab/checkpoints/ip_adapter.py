"""IP-Adapter files (h94/IP-Adapter, `ip-adapter_sd15.safetensors` / `.bin`, `ip-adapter_sdxl*.safetensors`).

    .safetensors  flat: ``image_proj.proj.weight``, ``image_proj.proj.bias``, ``image_proj.norm.{weight,bias}``,
                  ``ip_adapter.{n}.to_k_ip.weight``, ``ip_adapter.{n}.to_v_ip.weight`` (n = 1, 3, 5, ...)
    .bin          a pickled dict {"image_proj": {...}, "ip_adapter": {...}} of the same tensors, read with the
                  weights-only unpickler (`checkpoints.io`, nested keys joined with dots): no pickled code runs.

Sizes come from the tensors: the image embedding's width (proj's input), the context width (norm), the token
count (proj's output / context width) and each cross-attention's width (to_k_ip's output). Plus adapters
(``image_proj.latents``, ``proj_in``, ``layers.N.{0,1}``, ``proj_out``, ``norm_out``: a Perceiver resampler over the
encoder's hidden states) read their sizes from those tensors too, and so does the Full-face adapter
(``image_proj.proj.0`` / ``proj.2`` / ``proj.3``: Linear, GELU, Linear, LayerNorm over the hidden states; h94's
`ip-adapter-full-face_sd15`). A FaceID adapter's projection (``image_proj.proj.0`` / ``proj.2`` / ``norm``, no
``proj.3``) reads an InsightFace face embedding, which sdlab does not compute: it draws with one given
(`pipeline.image_prompt`); so does FaceID Plus (``image_proj.perceiver_resampler.*`` beside FaceID's ``proj`` /
``norm``: its resampler also reads the picture's CLIP hidden states; Plus v2, the same file layout, adds a shortcut,
chosen as ComfyUI_IPAdapter_plus chooses it: a file whose name holds "plusv2"). A FaceID file that also holds
a LoRA for the U-Net's attention layers (``ip_adapter.N.to_q_lora.down.weight`` ...: ip-adapter-faceid_sd15 and
the Plus files, which diffusers' `load_ip_adapter` applies as a LoRA at weight 1) draws with that LoRA merged into
the U-Net (`IPAdapterConfig.unet_lora`; `checkpoints.lora` reads it by IP-Adapter's attention numbers).
`check_fits` refuses an adapter for another U-Net or image encoder with one line naming both widths.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.image_encoder import TOWERS_BY_WIDTH
from sdlab.checkpoints.io import read_checkpoint, shapes_of
from sdlab.checkpoints.runnable import check_builds, load_checked
from sdlab.models.clip_vision import CLIPVisionConfig
from sdlab.models.ip_adapter import IPAdapter, IPAdapterConfig, ResamplerConfig, cross_attentions
from sdlab.models.unet import UNet

_LAYER = re.compile(r"ip_adapter\.(\d+)\.to_k_ip\.weight")
_LORA = re.compile(r"ip_adapter\.\d+\.to_(q|k|v|out)_lora\.(down|up)\.weight")


@dataclass(frozen=True)
class LoadedIPAdapter:
    model: IPAdapter
    config: IPAdapterConfig
    origin: str

    @property
    def name(self) -> str:
        """The file name without its suffix, as infotext records a model."""
        return Path(self.origin).stem


def _config_from_shapes(shapes: Mapping[str, torch.Size], path: Path) -> IPAdapterConfig:
    if "image_proj.proj.3.weight" in shapes and "image_proj.perceiver_resampler.proj_in.weight" not in shapes:
        return _full_config(shapes, path, _layer_widths(shapes, path))
    if "image_proj.perceiver_resampler.proj_in.weight" in shapes:
        return _face_id_plus_config(shapes, path, _face_id_config(shapes, path, _layer_widths(shapes, path)))
    if "image_proj.latents" in shapes:
        return _plus_config(shapes, path, _layer_widths(shapes, path))
    if "image_proj.proj.0.weight" in shapes and "image_proj.norm.weight" in shapes:
        return _face_id_config(shapes, path, _layer_widths(shapes, path))
    if "image_proj.proj.weight" not in shapes or "image_proj.norm.weight" not in shapes:
        raise CheckpointError(f"{path}: not an IP-Adapter (no image_proj.proj.weight / image_proj.norm.weight)")
    widths = _layer_widths(shapes, path)
    context_dim = shapes["image_proj.norm.weight"][0]
    out_width, embed_dim = shapes["image_proj.proj.weight"]
    if out_width % context_dim:
        raise CheckpointError(f"{path}: image_proj.proj gives {out_width} numbers, not whole {context_dim}-wide tokens")
    return IPAdapterConfig(embed_dim=embed_dim, context_dim=context_dim, tokens=out_width // context_dim, widths=widths)


def _layer_widths(shapes: Mapping[str, torch.Size], path: Path) -> tuple[int, ...]:
    """Each cross-attention's width (to_k_ip's output), the layers numbered 1, 3, 5, ..."""
    numbers = sorted(int(m.group(1)) for key in shapes if (m := _LAYER.fullmatch(key)))
    if not numbers or numbers != list(range(1, 2 * len(numbers), 2)):
        raise CheckpointError(f"{path}: not an IP-Adapter: its ip_adapter.N.to_k_ip layers are numbered "
                              f"{numbers[:6]}..., not 1, 3, 5, ...")
    return tuple(shapes[f"ip_adapter.{n}.to_k_ip.weight"][0] for n in numbers)


def _full_config(shapes: Mapping[str, torch.Size], path: Path, widths: tuple[int, ...]) -> IPAdapterConfig:
    """The Full-face adapter's sizes: proj.0 (E, E), proj.2 (C, E), proj.3 (C); its token count is the image
    encoder's (0 here)."""
    try:
        hidden, embed_dim = shapes["image_proj.proj.0.weight"]
        context_dim, inner = shapes["image_proj.proj.2.weight"]
    except (KeyError, ValueError):
        raise CheckpointError(f"{path}: an IP-Adapter Full-face without the projection sdlab knows (proj.0, proj.2, "
                              "proj.3: Linear, GELU, Linear, LayerNorm)") from None
    if hidden != embed_dim or inner != hidden:
        raise CheckpointError(f"{path}: an IP-Adapter Full-face whose proj.0 is {hidden}x{embed_dim} and proj.2 "
                              f"{context_dim}x{inner}; sdlab knows the one whose first Linear keeps the width")
    return IPAdapterConfig(embed_dim=embed_dim, context_dim=context_dim, tokens=0, widths=widths, full=True)


def _face_id_config(shapes: Mapping[str, torch.Size], path: Path, widths: tuple[int, ...]) -> IPAdapterConfig:
    """A FaceID adapter's sizes: proj.0 (H, E), proj.2 (T * C, H), norm (C); and whether the file also holds a
    LoRA for the U-Net's attention layers (`unet_lora`: merged while the adapter draws, `pipeline.image_prompt`)."""
    try:
        hidden, embed_dim = shapes["image_proj.proj.0.weight"]
        out_width, inner = shapes["image_proj.proj.2.weight"]
        context_dim = shapes["image_proj.norm.weight"][0]
    except (KeyError, ValueError):
        raise CheckpointError(f"{path}: an IP-Adapter FaceID without the projection sdlab knows (proj.0, proj.2, "
                              "norm)") from None
    if inner != hidden or out_width % context_dim:
        raise CheckpointError(f"{path}: an IP-Adapter FaceID whose proj.2 ({out_width}x{inner}) does not follow proj.0 "
                              f"({hidden}x{embed_dim}) into whole {context_dim}-wide tokens")
    return IPAdapterConfig(embed_dim=embed_dim, context_dim=context_dim, tokens=out_width // context_dim,
                           widths=widths, face_id=True, mlp_width=hidden,
                           unet_lora=any(_LORA.fullmatch(key) for key in shapes))


def _face_id_plus_config(shapes: Mapping[str, torch.Size], path: Path, face_id: IPAdapterConfig) -> IPAdapterConfig:
    """A FaceID Plus adapter's sizes: FaceID's (`face_id`), and its perceiver_resampler's: proj_in (W, E_clip),
    to_q (heads * 64, W), the feed-forward's first Linear (mult * W, W), how many layers, proj_out (C, W). Its
    latents are FaceID's C-wide tokens, so W must be C (as in every h94 file: ProjPlusModel's dim)."""
    prefix = "image_proj.perceiver_resampler."
    try:
        width, clip_width = shapes[prefix + "proj_in.weight"]
        heads = shapes[prefix + "layers.0.0.to_q.weight"][0] // 64
        ff_mult = shapes[prefix + "layers.0.1.1.weight"][0] // width
        out_width = shapes[prefix + "proj_out.weight"][0]
    except (KeyError, ValueError):
        raise CheckpointError(f"{path}: an IP-Adapter FaceID Plus without the resampler sdlab knows "
                              "(perceiver_resampler.proj_in, layers.N.0.to_q / to_kv / to_out, layers.N.1, proj_out, "
                              "norm_out)") from None
    if width != face_id.context_dim or out_width != face_id.context_dim:
        raise CheckpointError(f"{path}: an IP-Adapter FaceID Plus whose resampler is {width} wide and gives "
                              f"{out_width}-wide tokens; sdlab knows the one as wide as its {face_id.context_dim}-wide "
                              "face tokens")
    depth = sum(1 for key in shapes if re.fullmatch(re.escape(prefix) + r"layers\.\d+\.0\.to_q\.weight", key))
    return replace(face_id, clip_width=clip_width,
                   face_resampler=ResamplerConfig(width=width, depth=depth, heads=heads, ff_mult=ff_mult))


def is_face_id_plus_v2(path: str | os.PathLike[str]) -> bool:
    """Whether a FaceID Plus file is a Plus v2 (its tokens take the shortcut): its name holds "plusv2" (h94's
    ip-adapter-faceid-plusv2_sd15.bin), ComfyUI_IPAdapter_plus' rule (utils.py `ipadapter_model_loader`: the file
    layout is v1's)."""
    return "plusv2" in Path(path).name.lower()


def _plus_config(shapes: Mapping[str, torch.Size], path: Path, widths: tuple[int, ...]) -> IPAdapterConfig:
    """A Plus adapter's sizes: latents (1, T, W), proj_in (W, E), proj_out (C, W), to_q (heads * 64, W), the
    feed-forward's first Linear (mult * W, W), and how many layers."""
    try:
        _, tokens, width = shapes["image_proj.latents"]
        embed_dim = shapes["image_proj.proj_in.weight"][1]
        context_dim = shapes["image_proj.proj_out.weight"][0]
        heads = shapes["image_proj.layers.0.0.to_q.weight"][0] // 64
        ff_mult = shapes["image_proj.layers.0.1.1.weight"][0] // width
    except (KeyError, ValueError):
        raise CheckpointError(f"{path}: an IP-Adapter Plus without the resampler sdlab knows (latents, proj_in, "
                              "layers.N.0.to_q / to_kv / to_out, layers.N.1, proj_out, norm_out)") from None
    depth = sum(1 for key in shapes if re.fullmatch(r"image_proj\.layers\.\d+\.0\.to_q\.weight", key))
    return IPAdapterConfig(embed_dim=embed_dim, context_dim=context_dim, tokens=tokens, widths=widths,
                           resampler=ResamplerConfig(width=width, depth=depth, heads=heads, ff_mult=ff_mult))


def read_ip_adapter(path: str | os.PathLike[str]) -> tuple[IPAdapterConfig, Mapping[str, Tensor]]:
    """The config and tensors of an IP-Adapter file, checked to build; `CheckpointError` (one line) else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such IP-Adapter file")
    tensors, _ = read_checkpoint(path, nested=True)
    shapes = shapes_of(tensors)
    config = _config_from_shapes(shapes, path)
    tensors = {key: value for key, value in tensors.items() if not _LORA.fullmatch(key)}   # the U-Net's, not ours
    shapes = shapes_of(tensors)
    check_builds(lambda: IPAdapter(config), shapes, path, "an IP-Adapter")
    return config, tensors


def is_ip_adapter_file(path: str | os.PathLike[str]) -> bool:
    """Whether `path` holds IP-Adapter tensors (``image_proj.*`` and ``ip_adapter.*``, flat or nested as a `.bin`
    nests them), read from its names alone (a safetensors header, a pickle on the meta device): how a folder of
    ControlNets, T2I-Adapters and IP-Adapters (A1111's models/ControlNet) tells them apart before one is loaded.
    A file that cannot be read is none (its loader names why)."""
    try:
        tensors, _ = read_checkpoint(Path(path), nested=True, shapes_only=True)
    except CheckpointError:
        return False
    prefixes = {key.split(".", 1)[0] for key in tensors}
    return {"image_proj", "ip_adapter"} <= prefixes


def load_ip_adapter(path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> LoadedIPAdapter:
    config, tensors = read_ip_adapter(path)
    model = load_checked(lambda: IPAdapter(config), tensors, dtype, device, path, "IP-Adapter")
    return LoadedIPAdapter(model=model, config=config, origin=os.fspath(path))


def _tower(width: int) -> str:
    """'ViT-H/14' for an embedding width of a known tower's projection, else ''."""
    names = [name for name, cfg in TOWERS_BY_WIDTH.values() if cfg.projection_dim == width]
    return f" ({' or '.join(names)})" if names else ""


def _tower_by_width(width: int) -> str:
    return f" ({TOWERS_BY_WIDTH[width][0]})" if width in TOWERS_BY_WIDTH else ""


def check_fits_unet(cfg: IPAdapterConfig, origin: str, unet: UNet) -> None:
    """Refuse (`CheckpointError`, one line naming both sides) an adapter of config `cfg` (from file `origin`) for
    another U-Net: its text context width, or the number or widths of its cross-attentions. `unet` may be on the
    meta device (built from a checkpoint's shapes, not loaded): only its layers' shapes are read."""
    if cfg.context_dim != unet.cfg.context_dim:
        raise CheckpointError(f"{origin}: this IP-Adapter is for a U-Net with a {cfg.context_dim}-wide text "
                              f"context; the model's is {unet.cfg.context_dim}-wide (an adapter for another family)")
    widths = tuple(attn.to_q.weight.shape[0] for attn in cross_attentions(unet))
    if widths != cfg.widths:
        raise CheckpointError(f"{origin}: this IP-Adapter has {len(cfg.widths)} cross-attention layers; the "
                              f"model has {len(widths)} (widths {sorted(set(cfg.widths))} vs {sorted(set(widths))})")


def check_fits(adapter: LoadedIPAdapter, unet: UNet, encoder: CLIPVisionConfig | None, encoder_origin: str) -> None:
    """Refuse (`CheckpointError`, one line naming both sides) an adapter for another U-Net (context width, number
    or widths of the cross-attentions) or for another image encoder (embedding width, or the hidden states' width
    of a Plus, Full-face or FaceID Plus adapter; None: a FaceID adapter's face embedding, no encoder)."""
    cfg = adapter.config
    check_fits_unet(cfg, adapter.origin, unet)
    if encoder is None:
        return
    if cfg.face_id_plus:
        if encoder.width != cfg.clip_width:
            raise CheckpointError(
                f"{adapter.origin}: this IP-Adapter FaceID Plus reads {cfg.clip_width}-wide image encoder hidden "
                f"states{_tower_by_width(cfg.clip_width)}; the image encoder {encoder_origin} is {encoder.width} wide"
                f"{_tower_by_width(encoder.width)}: use the image encoder the adapter was trained with")
    elif cfg.resampler is not None or cfg.full:
        if encoder.width != cfg.embed_dim:
            raise CheckpointError(
                f"{adapter.origin}: this IP-Adapter {'Full-face' if cfg.full else 'Plus'} reads {cfg.embed_dim}-wide "
                f"image encoder hidden states"
                f"{_tower_by_width(cfg.embed_dim)}; the image encoder {encoder_origin} is {encoder.width} wide"
                f"{_tower_by_width(encoder.width)}: use the image encoder the adapter was trained with")
    elif encoder.projection_dim != cfg.embed_dim:
        raise CheckpointError(
            f"{adapter.origin}: this IP-Adapter takes {cfg.embed_dim}-wide image embeddings{_tower(cfg.embed_dim)}; "
            f"the image encoder {encoder_origin} gives {encoder.projection_dim}-wide ones"
            f"{_tower(encoder.projection_dim)}: use the image encoder the adapter was trained with")
