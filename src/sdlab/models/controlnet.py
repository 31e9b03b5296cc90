"""ControlNet (Zhang et al. 2023): a trainable copy of a U-Net's encoder that reads a hint image.

Module names mirror the original checkpoints (`control_model.*` in lllyasviel's files, prefix removed):

    time_embed, label_emb (SDXL), input_blocks, middle_block   the U-Net's encoder half (`unet.add_encoder`)
    input_hint_block   conv stack from the hint at pixel resolution to the latent grid: with hint widths
                       (16, 32, 96, 256) it reads 0 conv 3->16 | 2 conv 16->16 | 4 conv 16->32 stride 2
                       | 6 conv 32->32 | 8 conv 32->96 s2 | 10 conv 96->96 | 12 conv 96->256 s2
                       | 14 conv 256->model_channels (zero-initialised); SiLU at every odd index
    zero_convs.N.0     1x1 conv on the output of input block N (zero-initialised)
    middle_block_out.0 1x1 conv on the middle block's output (zero-initialised)

Forward: the hint features are added once, to the output of the first input block (conv_in); every input
block's output goes through its zero conv, giving one residual per U-Net skip (12 for SD1 / SD2, 9 for
SDXL) plus the middle residual. The U-Net adds them to its skips and middle output (`UNet.forward`'s
`control`), scaled by the control strength.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sdlab.models import cpu_kernels, generation_memo
from sdlab.models.cpu_memory import reuses_large_blocks
from sdlab.models.unet import (
    BlockEmbeddings, UNetConfig, add_encoder, copies_to, encoder_embedding, shared_rows
)

HINT_WIDTHS = (16, 32, 96, 256)  # every released ControlNet: 3 stride-2 convs, pixels -> the 1/8 latent grid


@dataclass(frozen=True)
class ControlNetConfig:
    """Shape of a ControlNet: the encoder of `unet` (in_channels = the latent's channels) and its hint block.

    `hint_widths` (w0, ..., wn) give convs hint_channels->w0, then per step i: w_i->w_i and w_i->w_{i+1}
    stride 2, then wn->model_channels: n stride-2 convs, so the hint is 2^n times the latent's size.
    `hint_bgr` (diffusers' `controlnet_conditioning_channel_order="bgr"`) reverses the hint's channels;
    `global_pool` (diffusers' `global_pool_conditions`, the "shuffle" model) averages every residual over
    space.
    """

    unet: UNetConfig
    hint_channels: int = 3
    hint_widths: tuple[int, ...] = HINT_WIDTHS
    hint_bgr: bool = False
    global_pool: bool = False

    def __post_init__(self) -> None:
        if not self.hint_widths:
            raise ValueError("ControlNetConfig: hint_widths needs at least one width")

    @property
    def hint_factor(self) -> int:
        """Pixels of hint per latent pixel."""
        return 2 ** (len(self.hint_widths) - 1)


def _hint_block(cfg: ControlNetConfig) -> nn.Sequential:
    widths = cfg.hint_widths
    layers: list[nn.Module] = [nn.Conv2d(cfg.hint_channels, widths[0], 3, padding=1), nn.SiLU()]
    for c_in, c_out in zip(widths, widths[1:]):
        layers += [nn.Conv2d(c_in, c_in, 3, padding=1), nn.SiLU()]
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, stride=2), nn.SiLU()]
    layers.append(_zero(nn.Conv2d(widths[-1], cfg.unet.model_channels, 3, padding=1)))
    return nn.Sequential(*layers)


def _zero(conv: nn.Conv2d) -> nn.Conv2d:
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def _zero_conv(channels: int) -> nn.Sequential:
    return nn.Sequential(_zero(nn.Conv2d(channels, channels, 1)))


class ControlNet(nn.Module):
    """(noisy latent, timestep, context[, SDXL vector], hint image) -> (skip residuals, middle residual)."""

    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        self.cfg = cfg
        skip_channels = add_encoder(self, cfg.unet)
        self.input_hint_block = _hint_block(cfg)
        self.zero_convs = nn.ModuleList(_zero_conv(c) for c in skip_channels)
        self.middle_block_out = _zero_conv(skip_channels[-1])
        self.to(memory_format=torch.channels_last)   # as the U-Net: conv weights and activations NHWC

    @reuses_large_blocks
    def forward(
        self, x: Tensor, t: Tensor, context: Tensor, hint: Tensor, y: Tensor | None = None
    ) -> tuple[list[Tensor], Tensor]:
        """x: (B, in_channels, h, w) latent as the U-Net gets it; t: (B,) or () timesteps; context: (B, T, C);
        hint: (B, hint_channels, h * f, w * f) in [0, 1] (-1 at an inpaint hint's masked pixels), f =
        `cfg.hint_factor`; y: SDXL vector or None.

        Returns one residual per input block (shaped as its output) and the middle residual, in the
        parameters' dtype."""
        unet = self.cfg.unet
        emb = BlockEmbeddings(encoder_embedding(self, unet, t, y, x.shape[0]), self)   # (B, 4 * mc)
        dtype = emb.silu.dtype
        context = context.to(dtype)
        h = x.to(dtype).contiguous(memory_format=torch.channels_last)  # (B, C, h, w)
        rows = len(h)
        # a guided step's equal halves (latent and hint) run the layers before the first text context once
        shared = shared_rows(h, emb, self.input_blocks, context)
        if shared < rows and (any(cpu_kernels.has_hooks(m) for m in self.input_hint_block.modules())
                              or not torch.equal(hint[:shared], hint[shared:])):
            shared = rows
        h, hint = h[:shared], hint[:shared]
        # (B or B / 2, mc, h, w): the hint block lands on the latent grid; once per generation
        guided_hint = generation_memo.reused((self.input_hint_block,), hint,
                                             lambda: self._hint_features(hint, dtype))
        residuals = []
        for i, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)  # (B, C_i, h_i, w_i) from the first text context on
            if i == 0:
                if guided_hint.shape[-2:] != h.shape[-2:]:
                    raise ValueError(
                        f"ControlNet: hint of {tuple(hint.shape[-2:])} px does not map onto a "
                        f"{tuple(h.shape[-2:])} latent (factor {self.cfg.hint_factor})"
                    )
                h = h + guided_hint
            residuals.append(zero_conv(copies_to(h, rows)))   # (B, C_i, h_i, w_i)
        h = copies_to(self.middle_block(h, emb, context), rows)
        middle = self.middle_block_out(h)    # (B, C_mid, h_mid, w_mid)
        if self.cfg.global_pool:
            residuals = [r.mean(dim=(2, 3), keepdim=True) for r in residuals]
            middle = middle.mean(dim=(2, 3), keepdim=True)
        return residuals, middle

    def _hint_features(self, hint: Tensor, dtype: torch.dtype) -> Tensor:
        """(B, hint_channels, h * f, w * f) hint -> (B, mc, h, w) features added after conv_in."""
        if self.cfg.hint_bgr:
            hint = hint.flip(1)
        return self.input_hint_block(hint.to(dtype).contiguous(memory_format=torch.channels_last))
