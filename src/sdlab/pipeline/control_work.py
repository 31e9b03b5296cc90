"""What a ControlNet adds to a generation's U-Net work, counted before anything loads.

A ControlNet is a copy of its U-Net's encoder half and middle block (`models.controlnet`) that runs beside the U-Net
at every model call of the steps its window takes (`control.in_window`), over the same rows (CFG's negative, PAG's
row and each AND part included: `ControlledUNet`). Its cost relative to one U-Net row, `controlnet_share`, is the
ratio of the two forwards' floating-point operations at the latent's size. Each network's operations are counted
once per config, layer by layer from the config as `torch.utils.flop_counter` counts them (no module built, no
weight: a few microseconds, so a request naming a new ControlNet waits on nothing), kept apart by how they grow
(`FlopProfile`): a constant part (the timestep and SDXL vector embeddings, the text context's keys and values), a
part linear in each level's positions (convolutions, linear layers, cross-attention's scores and weighted sums over
the 77 context tokens) and a part growing with their square (self-attention's scores and weighted sums), level by
level; any size is then that sum at its own level positions (each level ceil(h / 2) x ceil(w / 2) of the one above,
as the stride-2 convs give), equal to the counter's count of the network at that size on the meta device.
Attention grows with the square of the positions and the encoder holds most of the finest, attending level, so the
share moves with the size (SD 1.x at 512 px: 0.33 of the U-Net; SDXL at 1024 px: 0.44). The hint block is left
out: it runs once per generation (`generation_memo`). A T2I-Adapter runs once before sampling and adds nothing per
step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from sdlab.checkpoints.controlnet import LoadedControlNet, read_controlnet
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.t2i_adapter import LoadedT2IAdapter
from sdlab.models.controlnet import ControlNetConfig
from sdlab.models.unet import UNetConfig
from sdlab.pipeline.control import ControlInput, in_window
from sdlab.utils.file_hashes import read_per_version

__all__ = ["FlopProfile", "active_steps", "controlnet_config", "controlnet_share", "flop_profile"]

CONTEXT_TOKENS = 77         # one prompt chunk: the cross-attention's keys


def controlnet_config(control: ControlInput) -> ControlNetConfig | None:
    """The config of the ControlNet `control` runs, read from its file's names and shapes (kept per file version);
    None for a T2I-Adapter, or a file that is no ControlNet (loading it names the problem)."""
    if isinstance(control.model, LoadedControlNet):
        return control.model.config
    if isinstance(control.model, LoadedT2IAdapter):
        return None
    return read_per_version(Path(control.model), _read_config)


def _read_config(path: Path) -> ControlNetConfig | None:
    try:
        return read_controlnet(path, shapes_only=True).config
    except (CheckpointError, OSError, ValueError):
        return None


def active_steps(control: ControlInput, steps: int, convention: str, until: int | None = None) -> int:
    """The steps of a pass of `steps` sampler steps whose calls run the control (`control.in_window` under the
    request's `control_convention`), among its first `until` (an SDXL refiner's handoff: the base's steps) or all."""
    return sum(in_window(control.start, control.end, i, steps, convention)
               for i in range(steps if until is None else min(until, steps)))


def controlnet_share(unet: UNetConfig, controlnet: ControlNetConfig, height: int, width: int) -> float:
    """FLOPs of one ControlNet forward (its hint block left out) over FLOPs of one forward of the U-Net of config
    `unet`, one row each over a latent of `height` x `width` (each network counted once, `flop_profile`)."""
    return flop_profile(controlnet).at(height, width) / flop_profile(unet).at(height, width)


@dataclass(frozen=True)
class FlopProfile:
    """One row's forward FLOPs of a network as a function of its latent's size: `constant` + sum over levels l of
    `linear[l]` * N_l + `quadratic[l]` * N_l^2, N_l the positions of level l (level 0 the latent's own)."""

    constant: int
    linear: tuple[int, ...]         # per level: FLOPs per position
    quadratic: tuple[int, ...]      # per level: FLOPs per position squared (self-attention)

    def at(self, height: int, width: int) -> int:
        """The FLOPs over a `height` x `width` latent."""
        positions = level_positions(height, width, len(self.linear))
        return self.constant + sum(a * n + b * n * n for a, b, n in zip(self.linear, self.quadratic, positions))


def level_positions(height: int, width: int, levels: int) -> list[int]:
    """The positions of each level of a `height` x `width` latent: each stride-2 conv (padding 1) takes h to
    ceil(h / 2); the decoder's upsampling lands on its skip's size, so the same levels."""
    found = []
    for _ in range(levels):
        found.append(height * width)
        height, width = math.ceil(height / 2), math.ceil(width / 2)
    return found


@lru_cache(maxsize=32)
def flop_profile(config: UNetConfig | ControlNetConfig) -> FlopProfile:
    """The `FlopProfile` of the U-Net or ControlNet (hint block left out) `config` describes, from the config alone:
    each layer's FLOPs as `torch.utils.flop_counter` counts them (2 per multiply-add of a convolution, linear layer
    or batched product; bias, norms, activations and resizes none), added up by how they grow (`_LayerTally`).
    Equal to the counter's count of the network on the meta device (tests/test_server_controlnet_work.py), in
    microseconds rather than seconds."""
    unet = config.unet if isinstance(config, ControlNetConfig) else config
    tally = _LayerTally(len(unet.channel_mult))
    mc, emb = unet.model_channels, unet.time_embed_dim
    tally.constant += 2 * mc * emb + 2 * emb * emb                          # time_embed: two linear layers
    if unet.adm_in_channels is not None:                                    # SDXL's label_emb
        tally.constant += 2 * unet.adm_in_channels * emb + 2 * emb * emb
    skips = _encoder(tally, unet)
    if isinstance(config, ControlNetConfig):
        for level, channels in skips:                                       # a 1x1 zero conv per skip ...
            tally.linear[level] += 2 * channels * channels
        level, channels = skips[-1]                                         # ... and after the middle block
        tally.linear[level] += 2 * channels * channels
    else:
        _decoder(tally, unet, skips)
    return FlopProfile(tally.constant, tuple(tally.linear), tuple(tally.quadratic))


class _LayerTally:
    """FLOPs of one row's forward as they are added up layer by layer: constant, per position of a level (linear)
    and per position squared (quadratic)."""

    def __init__(self, levels: int) -> None:
        self.constant = 0
        self.linear = [0] * levels
        self.quadratic = [0] * levels

    def resblock(self, unet: UNetConfig, level: int, c_in: int, c_out: int) -> None:
        """A ResBlock: its time-embedding projection, two 3x3 convs and a 1x1 skip conv where widths differ."""
        self.constant += 2 * unet.time_embed_dim * c_out
        self.linear[level] += 18 * c_in * c_out + 18 * c_out * c_out + (2 * c_in * c_out if c_in != c_out else 0)

    def transformer(self, unet: UNetConfig, level: int, c: int, depth: int) -> None:
        """A SpatialTransformer of `depth` blocks: proj_in and proj_out; per block the self-attention's q, k, v and
        out projections and its scores and weighted sum over the level's positions, the cross-attention's q and out
        projections, its k and v of the context's tokens and its scores and sum over them, GEGLU's c -> 8c and the
        feed-forward's 4c -> c (heads split c without changing any product's FLOPs)."""
        self.linear[level] += 4 * c * c
        self.constant += depth * 2 * 2 * CONTEXT_TOKENS * unet.context_dim * c
        self.linear[level] += depth * (8 * c * c + 4 * c * c + 4 * CONTEXT_TOKENS * c + 24 * c * c)
        self.quadratic[level] += depth * 4 * c


def _encoder(tally: _LayerTally, unet: UNetConfig) -> list[tuple[int, int]]:
    """Add the encoder half and middle block (`unet.add_encoder`); returns each input block's (level, width)."""
    mc = unet.model_channels
    tally.linear[0] += 18 * unet.in_channels * mc                           # conv_in
    skips, channels, last = [(0, mc)], mc, len(unet.channel_mult) - 1
    for level, mult in enumerate(unet.channel_mult):
        for i in range(unet.num_res_blocks):
            tally.resblock(unet, level, channels, mult * mc)
            channels = mult * mc
            if unet.has_transformer(level):
                tally.transformer(unet, level, channels, unet.input_depth(level, i))
            skips.append((level, channels))
        if level != last:
            tally.linear[level + 1] += 18 * channels * channels             # stride-2 conv, on the next level's grid
            skips.append((level + 1, channels))
    tally.resblock(unet, last, channels, channels)
    if unet.middle_transformer:
        tally.transformer(unet, last, channels, unet.transformer_depth_middle)
        tally.resblock(unet, last, channels, channels)
    return skips


def _decoder(tally: _LayerTally, unet: UNetConfig, skips: list[tuple[int, int]]) -> None:
    """Add the U-Net's output blocks (each joining a skip, `UNet.__init__`) and its output conv."""
    mc, skips = unet.model_channels, list(skips)
    channels = skips[-1][1]
    for level in reversed(range(len(unet.channel_mult))):
        width = unet.channel_mult[level] * mc
        for i in range(unet.num_res_blocks + 1):
            tally.resblock(unet, level, channels + skips.pop()[1], width)
            channels = width
            if unet.has_transformer(level):
                tally.transformer(unet, level, channels, unet.output_depth(level, i))
            if level and i == unet.num_res_blocks:
                tally.linear[level - 1] += 18 * channels * channels         # upsample's conv, on the finer grid
    tally.linear[0] += 18 * mc * unet.out_channels                          # out
