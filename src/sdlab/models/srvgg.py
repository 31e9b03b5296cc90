"""SRVGGNetCompact: Real-ESRGAN's small upscaler ("realesr-general-x4v3", "realesr-animevideov3").

    x -> conv -> PReLU -> (conv -> PReLU) * num_convs -> conv to C_out * s^2 -> pixel-shuffle(s)
      + nearest-upsampled x                              # the network learns the residual

All in low resolution; the last conv's channels carry the s x s sub-pixels. Module names (`body.N`, PReLU
weights at the odd indices) are those of the released files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class SRVGGConfig:
    in_channels: int = 3
    out_channels: int = 3
    features: int = 64
    num_convs: int = 16             # hidden convs between the first and the last
    scale: int = 4
    unshuffle: int = 1              # no pixel-unshuffle: kept so upscalers share one interface


class SRVGGNetCompact(nn.Module):
    def __init__(self, config: SRVGGConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        layers: list[nn.Module] = [nn.Conv2d(c.in_channels, c.features, 3, padding=1), nn.PReLU(c.features)]
        for _ in range(c.num_convs):
            layers += [nn.Conv2d(c.features, c.features, 3, padding=1), nn.PReLU(c.features)]
        layers.append(nn.Conv2d(c.features, c.out_channels * c.scale ** 2, 3, padding=1))
        self.body = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, H, W) in [0, 1] -> (B, C_out, H * scale, W * scale)."""
        y = x
        for layer in self.body:
            y = layer(y)                                         # (B, F, H, W); last: (B, C_out * s^2, H, W)
        base = F.interpolate(x, scale_factor=self.config.scale, mode="nearest")   # (B, C_in, sH, sW)
        return F.pixel_shuffle(y, self.config.scale) + base      # (B, C_out, sH, sW)
