"""A small convolutional image encoder: the image side of a CLIP-style contrastive pair.

CLIP (Radford et al. 2021) pairs its text transformer with a ResNet or ViT image encoder whose output is
projected into the shared embedding space. sdlab trains its own text encoder from scratch on small data,
where a tiny CNN learns far faster than a ViT; this is that CNN::

    img (B, 3, H, W) in [-1, 1]
    stem        conv3x3                          3 -> widths[0]                     H x W
    stages.i    conv3x3/2, GN, SiLU, conv3x3, GN, SiLU (+ 1x1/2 shortcut)  -> widths[i]  H/2^(i+1)
    pool        adaptive average pool to grid x grid                               grid x grid
    head        LayerNorm(widths[-1] * grid^2) -> Linear -> embed_dim

The head flattens a coarse grid instead of pooling globally, so the embedding keeps *where* things are
("a red circle in the top left"); a global average pool would throw that away. Any input size works: the
adaptive pool brings the last feature map to ``grid x grid``.

Imports only torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class ImageTowerConfig:
    in_channels: int = 3
    widths: tuple[int, ...] = (32, 64, 128)   # one stride-2 stage per entry
    grid: int = 4                             # spatial cells the head sees (grid x grid)
    embed_dim: int = 64                       # shared embedding width (= the text tower's projection_dim)
    norm_groups: int = 8


class DownStage(nn.Module):
    """Residual stage that halves the resolution: conv3x3/2 -> GN -> SiLU -> conv3x3 -> GN, plus a 1x1/2 conv
    shortcut, then SiLU."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        self.norm1 = nn.GroupNorm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=2)

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, H, W)
        h = F.silu(self.norm1(self.conv1(x)))  # (B, C_out, H/2, W/2)
        h = self.norm2(self.conv2(h))  # (B, C_out, H/2, W/2)
        return F.silu(h + self.shortcut(x))


class ImageTower(nn.Module):
    """img (B, in_channels, H, W) in [-1, 1] -> embedding (B, embed_dim), not normalised."""

    def __init__(self, cfg: ImageTowerConfig):
        super().__init__()
        self.cfg = cfg
        self.stem = nn.Conv2d(cfg.in_channels, cfg.widths[0], 3, padding=1)
        widths = (cfg.widths[0], *cfg.widths)
        self.stages = nn.ModuleList(
            DownStage(widths[i], widths[i + 1], cfg.norm_groups) for i in range(len(cfg.widths))
        )
        features = cfg.widths[-1] * cfg.grid * cfg.grid
        self.head_norm = nn.LayerNorm(features)
        self.head = nn.Linear(features, cfg.embed_dim)

    def forward(self, img: Tensor) -> Tensor:  # (B, C, H, W)
        h = F.silu(self.stem(img.to(self.head.weight.dtype)))  # (B, w0, H, W)
        for stage in self.stages:
            h = stage(h)  # (B, w_i, H/2^(i+1), W/2^(i+1))
        h = F.adaptive_avg_pool2d(h, self.cfg.grid).flatten(1)  # (B, w_last * grid^2)
        return self.head(self.head_norm(h))  # (B, embed_dim)
