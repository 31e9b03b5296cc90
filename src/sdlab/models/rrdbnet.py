"""RRDBNet: the ESRGAN / Real-ESRGAN super-resolution network (Wang et al. 2018, 2021).

    x -> [pixel-unshuffle] -> conv_first -> feat
    feat + conv_body(body(feat))                         # `num_blocks` RRDBs, one long skip
      -> (nearest x2 upsample -> conv -> LeakyReLU) * n  # `conv_ups`, n = log2 of the net's own factor
      -> conv_hr -> LeakyReLU -> conv_last -> y

A residual dense block (RDB) grows `growth` channels per conv: conv_k sees the input and every earlier
output, x1..x4 pass a LeakyReLU(0.2), and `x + 0.2 * x5` is returned; an RRDB is three RDBs with the same
0.2-scaled skip around them. Real-ESRGAN's x2 and x1 models run the x4 body on a pixel-unshuffled input
(2x2 or 4x4 pixels folded into channels), so their first conv takes 12 or 48 channels; the input is
reflect-padded to a multiple of the fold and the output cropped back.

Module names follow the Real-ESRGAN ("new arch") layout; `sdlab.checkpoints.upscaler` maps ESRGAN's
"old arch" keys (`model.0`, `model.1.sub.N.RDB1.conv1.0`, ...) onto them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class RRDBNetConfig:
    in_channels: int = 3           # image channels (before any pixel-unshuffle)
    out_channels: int = 3
    features: int = 64             # width of the trunk
    growth: int = 32               # channels each dense conv adds
    num_blocks: int = 23           # RRDBs in the body
    num_upsamples: int = 2         # nearest x2 + conv stages: the body's own factor is 2 ** num_upsamples
    unshuffle: int = 1             # pixel-unshuffle factor of the input (Real-ESRGAN x2: 2, x1: 4)

    @property
    def scale(self) -> int:
        """Output size / input size."""
        return 2 ** self.num_upsamples // self.unshuffle


def _conv(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1)


class ResidualDenseBlock(nn.Module):
    def __init__(self, features: int, growth: int) -> None:
        super().__init__()
        self.conv1 = _conv(features, growth)
        self.conv2 = _conv(features + growth, growth)
        self.conv3 = _conv(features + 2 * growth, growth)
        self.conv4 = _conv(features + 3 * growth, growth)
        self.conv5 = _conv(features + 4 * growth, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]                                              # (B, F, H, W), then (B, G, H, W) each
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), 0.2))
        return x + 0.2 * self.conv5(torch.cat(feats, 1))        # (B, F, H, W)


class RRDB(nn.Module):
    def __init__(self, features: int, growth: int) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(features, growth)
        self.rdb2 = ResidualDenseBlock(features, growth)
        self.rdb3 = ResidualDenseBlock(features, growth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.2 * self.rdb3(self.rdb2(self.rdb1(x)))


class RRDBNet(nn.Module):
    def __init__(self, config: RRDBNetConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.conv_first = _conv(c.in_channels * c.unshuffle ** 2, c.features)
        self.body = nn.Sequential(*(RRDB(c.features, c.growth) for _ in range(c.num_blocks)))
        self.conv_body = _conv(c.features, c.features)
        self.conv_ups = nn.ModuleList(_conv(c.features, c.features) for _ in range(c.num_upsamples))
        self.conv_hr = _conv(c.features, c.features)
        self.conv_last = _conv(c.features, c.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, H, W) in [0, 1] -> (B, C_out, H * scale, W * scale)."""
        height, width = x.shape[-2:]
        fold = self.config.unshuffle
        if fold > 1:
            x = F.pad(x, (0, -width % fold, 0, -height % fold), mode="reflect")
            x = F.pixel_unshuffle(x, fold)                       # (B, C_in * fold^2, H / fold, W / fold)
        feat = self.conv_first(x)                                # (B, F, h, w)
        feat = feat + self.conv_body(self.body(feat))
        for conv in self.conv_ups:
            feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)   # (B, F, 2h, 2w)
        y = self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))
        scale = self.config.scale
        return y[..., : height * scale, : width * scale]         # (B, C_out, H * scale, W * scale)
