"""Architecture inference: the config of each network, read from tensor shapes and key names.

Everything a shape can show is read from the file; what it cannot show comes from the family's default
config (the "conventions"): heads per U-Net level (SD1: 8 heads; SD2 / SDXL: 64-wide heads), upcast
attention, GroupNorm groups, text activation (QuickGELU for CLIP-L, GELU for OpenCLIP) and text head width
(64). A reduced-width model that follows the conventions therefore loads exactly like a released one.

All functions take unprefixed state dicts in sdlab (= LDM) layout, as key -> shape (or tensor).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import Tensor

from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.io import shapes_of
from sdlab.checkpoints.openclip import config_from_hf
from sdlab.models.clip import CLIPTextConfig
from sdlab.models.unet import UNetConfig, block_depths
from sdlab.models.vae import VAEConfig

_INPUT_BLOCK = re.compile(r"input_blocks\.(\d+)\.")
_TRANSFORMER_BLOCK = re.compile(r"\.1\.transformer_blocks\.(\d+)\.")


def _need(shapes: Mapping[str, torch.Size], key: str, what: str) -> torch.Size:
    if key not in shapes:
        raise CheckpointError(f"cannot infer the {what} architecture: key {key} is missing")
    return shapes[key]


def _depth(shapes: Mapping[str, torch.Size], block: str) -> int:
    """Number of `transformer_blocks.K` in `{block}.1` (0 when the block has no SpatialTransformer)."""
    pattern = re.compile(re.escape(block) + r"\.1\.transformer_blocks\.(\d+)\.")
    found = {int(m.group(1)) for k in shapes if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def infer_unet_config(state: Mapping[str, torch.Size | Tensor], conventions: UNetConfig) -> UNetConfig:
    """`UNetConfig` of an LDM / SGM U-Net state dict (without `model.diffusion_model.`).

    Levels are found by walking `input_blocks`: ResBlocks (`.0.in_layers`) until a Downsample (`.0.op`);
    channel_mult from each level's ResBlock output width; transformer depth by counting
    `transformer_blocks.K` (a `proj_in` without blocks: a transformer of depth 0), block by block where the
    blocks of a level differ (SSD-1B, Vega), and a middle block without transformer; Linear vs conv projection
    from `proj_in.weight`'s rank; the guidance-embedding width of LCM-distilled models from
    `time_embed.cond_proj.weight`. A U-Net without cross-attention keeps the conventions' context width.
    """
    shapes = shapes_of(state)
    conv_in = _need(shapes, "input_blocks.0.0.weight", "U-Net")
    model_channels, in_channels = int(conv_in[0]), int(conv_in[1])
    out = shapes.get("out.2.weight")  # when absent, the key check after inference names it as missing
    out_channels = int(out[0]) if out is not None else conventions.out_channels

    indices = sorted({int(m.group(1)) for k in shapes if (m := _INPUT_BLOCK.match(k))} - {0})
    levels: list[list[int]] = [[]]
    for index in indices:
        if f"input_blocks.{index}.0.op.weight" in shapes:
            levels.append([])
        elif f"input_blocks.{index}.0.in_layers.2.weight" in shapes:
            levels[-1].append(index)
        else:
            raise CheckpointError(f"cannot infer the U-Net architecture: input_blocks.{index} is neither ResBlock nor Downsample")
    res_counts = {len(level) for level in levels}
    if len(res_counts) != 1 or 0 in res_counts:
        raise CheckpointError(f"cannot infer the U-Net architecture: ResBlocks per level {[len(lv) for lv in levels]}")
    channel_mult, depth, empty = [], [], []
    for number, level in enumerate(levels):
        width = int(shapes[f"input_blocks.{level[0]}.0.in_layers.2.weight"][0])
        if width % model_channels:
            raise CheckpointError(f"cannot infer the U-Net architecture: level width {width} is not a multiple of {model_channels}")
        channel_mult.append(width // model_channels)
        depth.append(_depth(shapes, f"input_blocks.{level[0]}"))
        if not depth[-1] and f"input_blocks.{level[0]}.1.proj_in.weight" in shapes:   # a transformer without blocks
            empty.append(number)
    blocks = res_counts.pop()
    inputs = [_depth(shapes, f"input_blocks.{index}") for level in levels for index in level]
    outputs = [_depth(shapes, f"output_blocks.{index}") for index in range(len(levels) * (blocks + 1))]

    context = next((s for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((s for k, s in shapes.items() if k.endswith(".proj_in.weight")), None)
    label_emb = shapes.get("label_emb.0.0.weight")
    cond_proj = shapes.get("time_embed.cond_proj.weight")  # LCM guidance embedding (Linear, no bias)
    try:
        return replace(
            conventions,
            in_channels=in_channels,
            out_channels=out_channels,
            model_channels=model_channels,
            channel_mult=tuple(channel_mult),
            num_res_blocks=blocks,
            transformer_depth=tuple(depth),
            transformer_depth_middle=_depth(shapes, "middle_block"),
            empty_transformer_levels=tuple(empty),
            input_depths=block_depths(inputs, tuple(depth), blocks),
            output_depths=block_depths(outputs, tuple(depth[::-1]), blocks + 1),
            middle_transformer=any(k.startswith("middle_block.1.") for k in shapes),
            context_dim=int(context[1]) if context is not None else conventions.context_dim,
            use_linear_proj=proj_in is not None and len(proj_in) == 2,
            adm_in_channels=int(label_emb[1]) if label_emb is not None else None,
            time_cond_proj_dim=int(cond_proj[1]) if cond_proj is not None and len(cond_proj) == 2 else None,
        )
    except ValueError as exc:       # blocks a U-Net config cannot hold (transformers where a level has none, ...)
        raise CheckpointError(f"cannot infer the U-Net architecture: {exc}") from None


def infer_vae_config(state: Mapping[str, torch.Size | Tensor], conventions: VAEConfig) -> VAEConfig:
    """`VAEConfig` of an LDM AutoencoderKL state dict (without `first_stage_model.`)."""
    shapes = shapes_of(state)
    conv_in = _need(shapes, "encoder.conv_in.weight", "VAE")
    base = int(conv_in[0])
    down = re.compile(r"encoder\.down\.(\d+)\.block\.(\d+)\.conv1\.weight")
    blocks: dict[int, set[int]] = {}
    for key in shapes:
        if m := down.fullmatch(key):
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        raise CheckpointError(f"cannot infer the VAE architecture: encoder levels {sorted(blocks)}")
    per_level = {len(b) for b in blocks.values()}
    if len(per_level) != 1:
        raise CheckpointError(f"cannot infer the VAE architecture: ResBlocks per level differ {per_level}")
    mult = tuple(int(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0]) // base for i in range(len(blocks)))
    # When a decoder key is absent, fall back on the encoder's shapes; the key check then names what is missing.
    conv_out, post_quant = shapes.get("decoder.conv_out.weight"), shapes.get("post_quant_conv.weight")
    latent = int(post_quant[0]) if post_quant is not None else int(_need(shapes, "encoder.conv_out.weight", "VAE")[0]) // 2
    return replace(
        conventions,
        in_channels=int(conv_in[1]),
        out_channels=int(conv_out[0]) if conv_out is not None else int(conv_in[1]),
        latent_channels=latent,
        base_channels=base,
        channel_mult=mult,
        num_res_blocks=per_level.pop(),
    )


def infer_text_config(state: Mapping[str, torch.Size | Tensor], conventions: CLIPTextConfig) -> CLIPTextConfig:
    """`CLIPTextConfig` of an sdlab / HF-layout text tower (keys without `text_model.`).

    Width, layers, MLP width, vocabulary, positions and projection come from shapes; activation, epsilon and
    end token from the family; heads are 64 wide (every released CLIP text tower).
    """
    shapes = shapes_of(state)
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    try:
        found = config_from_hf(meta, activation=conventions.activation)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"cannot infer the text encoder architecture: {exc}") from None
    return replace(
        found,
        eos_token_id=conventions.eos_token_id,
        layer_norm_eps=conventions.layer_norm_eps,
    )
