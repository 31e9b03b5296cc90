"""T2I-Adapter (Mou et al. 2023, TencentARC): a small conv network that reads a hint image once and gives one
feature map per U-Net level, added to the U-Net's encoder features at every step.

Module names mirror TencentARC's original files (`Adapter`, `Adapter_light`, `Adapter_XL`), which A1111's
ControlNet extension and ComfyUI load:

    full    conv_in                   3x3 conv from the pixel-unshuffled hint (hint_channels * u^2) to channels[0]
            body.{i * R + j}          R ResnetBlocks per level i: [down_opt] [in_conv] block1 (3x3) ReLU block2, + input
                .down_opt.op          (a stride-2 conv where the file has one, else 2x2 average pooling: no tensors)
                .in_conv              kxk conv where the level changes width (first block of a level)
    light   body.{i}                  one extractor per level: [down_opt] in_conv (1x1, to channels[i] / 4),
                .body.{j}.block1/2    R light ResnetBlocks (3x3, ReLU, 3x3, + input), out_conv (1x1, to channels[i])

`downsampled[i]` says whether level i halves its input first: SD1 / SD2 adapters (u = 8) at every level but
the first, giving features at 1, 1/2, 1/4, 1/8 of the latent; SDXL's (`Adapter_XL`, diffusers'
`full_adapter_xl`, u = 16) at the third level only, giving 1/2, 1/2, 1/4, 1/4. Average pooling rounds odd
sizes up by default (`pool="ceil"`: diffusers' `ceil_mode=True`), so the features land on the grid of the U-Net's
own stride-2 convs; `forward(hint, pool="floor")` rounds them down as TencentARC's `AvgPool2d(2, 2)` does, which
A1111's ControlNet extension runs (its features then miss the U-Net's grid at odd sizes, and the U-Net resizes them:
`UNet.forward`'s `adapter_nearest`); `pool="pad"` pads an odd side by one zero on each end (counted in the mean) as
ComfyUI's adapter `Downsample` does (`padding = [h % 2, w % 2]`), which rounds up too but averages other cells. A
stride-2 conv (`down_opt.op`) rounds up under all three. Where the features
are added is the U-Net's business (`unet.adapter_blocks`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

ADAPTER_KINDS = ("full", "light")


@dataclass(frozen=True)
class T2IAdapterConfig:
    """Shape of a T2I-Adapter. `channels[i]` is the width of feature i; `num_res_blocks` (R) the ResnetBlocks of
    each level; `unshuffle` the pixel-unshuffle factor (pixels per position of the first feature, before any
    downsampling); `kernel_size` the kernel of a full adapter's in_conv and block2 (1 in every released file);
    `conv_downsample` a full adapter's stride-2 conv in place of average pooling."""

    kind: str = "full"
    hint_channels: int = 3
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    num_res_blocks: int = 2
    unshuffle: int = 8
    downsampled: tuple[bool, ...] = (False, True, True, True)
    kernel_size: int = 1
    conv_downsample: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ADAPTER_KINDS:
            raise ValueError(f"T2IAdapterConfig: kind {self.kind!r} is not one of {', '.join(ADAPTER_KINDS)}")
        if not self.channels or len(self.downsampled) != len(self.channels):
            raise ValueError("T2IAdapterConfig: downsampled needs one entry per level of channels")
        if self.kind == "light" and self.conv_downsample:
            raise ValueError("T2IAdapterConfig: a light adapter downsamples by average pooling only")

    def feature_factors(self) -> list[int]:
        """Pixels of hint per position of each feature."""
        factors, factor = [], self.unshuffle
        for down in self.downsampled:
            factor *= 2 if down else 1
            factors.append(factor)
        return factors


def _downsample(channels: int, conv: bool) -> nn.Module:
    return _Downsample(channels) if conv else _AveragePool()


class _AveragePool(nn.Module):
    """2x2 average pooling, stride 2 (no tensors): an odd size rounds up with `pool` "ceil" (diffusers'
    ceil_mode=True, the last window a single row), down with "floor" (TencentARC's AvgPool2d(2, 2)), up with "pad"
    (ComfyUI's: one zero row on each end, counted in the mean, so every window is shifted by one)."""

    def forward(self, x: Tensor, pool: str = "ceil") -> Tensor:
        if pool == "pad":
            padding = (x.shape[2] % 2, x.shape[3] % 2)
            return F.avg_pool2d(x, kernel_size=2, stride=2, padding=padding)   # (B, C, ceil(h / 2), ceil(w / 2))
        return F.avg_pool2d(x, kernel_size=2, stride=2, ceil_mode=pool == "ceil")   # (B, C, h / 2, w / 2)


class _Downsample(nn.Module):
    """The original `Downsample(use_conv=True)`: a 3x3 stride-2 conv under the name `op` (rounds up)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, pool: str = "ceil") -> Tensor:
        return self.op(x)


class _ResnetBlock(nn.Module):
    """A full adapter's block: [downsample] [kxk in_conv to the new width], then x + block2(relu(block1(x)))."""

    def __init__(self, in_c: int, out_c: int, down: bool, kernel_size: int, conv_down: bool):
        super().__init__()
        pad = kernel_size // 2
        self.down_opt = _downsample(in_c, conv_down) if down else None
        self.in_conv = nn.Conv2d(in_c, out_c, kernel_size, padding=pad) if in_c != out_c else None
        self.block1 = nn.Conv2d(out_c, out_c, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(out_c, out_c, kernel_size, padding=pad)

    def forward(self, x: Tensor, pool: str = "ceil") -> Tensor:
        if self.down_opt is not None:
            x = self.down_opt(x, pool)               # (B, C_in, h / 2, w / 2)
        if self.in_conv is not None:
            x = self.in_conv(x)                      # (B, C_out, h, w)
        return x + self.block2(self.act(self.block1(x)))


class _LightResnetBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block2(self.act(self.block1(x)))


class _Extractor(nn.Module):
    """A light adapter's level: [average pooling], 1x1 in_conv to a quarter of the width, R light blocks, 1x1
    out_conv to the width."""

    def __init__(self, in_c: int, out_c: int, blocks: int, down: bool):
        super().__init__()
        inner = out_c // 4
        self.down_opt = _downsample(in_c, False) if down else None
        self.in_conv = nn.Conv2d(in_c, inner, 1)
        self.body = nn.Sequential(*(_LightResnetBlock(inner) for _ in range(blocks)))
        self.out_conv = nn.Conv2d(inner, out_c, 1)

    def forward(self, x: Tensor, pool: str = "ceil") -> Tensor:
        if self.down_opt is not None:
            x = self.down_opt(x, pool)               # (B, C_in, h / 2, w / 2)
        return self.out_conv(self.body(self.in_conv(x)))   # (B, C_out, h, w)


class T2IAdapter(nn.Module):
    """hint image (B, hint_channels, H, W) in [0, 1] -> one feature map per level (module docstring)."""

    def __init__(self, cfg: T2IAdapterConfig):
        super().__init__()
        self.cfg = cfg
        self.unshuffle = nn.PixelUnshuffle(cfg.unshuffle)
        unshuffled = cfg.hint_channels * cfg.unshuffle ** 2
        if cfg.kind == "full":
            self.conv_in = nn.Conv2d(unshuffled, cfg.channels[0], 3, padding=1)
            blocks, width = [], cfg.channels[0]
            for out_c, down in zip(cfg.channels, cfg.downsampled):
                for j in range(cfg.num_res_blocks):
                    first = j == 0
                    blocks.append(_ResnetBlock(width, out_c, down and first, cfg.kernel_size, cfg.conv_downsample))
                    width = out_c
            self.body = nn.ModuleList(blocks)
        else:
            self.conv_in = None
            widths = (unshuffled, *cfg.channels[:-1])
            self.body = nn.ModuleList(_Extractor(in_c, out_c, cfg.num_res_blocks, down)
                                      for in_c, out_c, down in zip(widths, cfg.channels, cfg.downsampled))

    def forward(self, hint: Tensor, pool: str = "ceil") -> list[Tensor]:
        """hint: (B, hint_channels, H, W), H and W multiples of `cfg.unshuffle` -> features, feature i
        (B, channels[i], H / f_i, W / f_i) with f_i = `cfg.feature_factors()[i]`, in the parameters' dtype;
        `pool`: how average pooling treats odd sizes (diffusers' "ceil", TencentARC's and A1111's extension's
        "floor", ComfyUI's "pad")."""
        dtype = next(self.parameters()).dtype
        x = self.unshuffle(hint.to(dtype))              # (B, hint_channels * u^2, H / u, W / u)
        features = []
        if self.conv_in is None:
            for level in self.body:
                x = level(x, pool)
                features.append(x)
            return features
        x = self.conv_in(x)                              # (B, channels[0], H / u, W / u)
        per_level = self.cfg.num_res_blocks
        for i, block in enumerate(self.body):
            x = block(x, pool)
            if (i + 1) % per_level == 0:
                features.append(x)
        return features


def hint_input(hint: Tensor, cfg: T2IAdapterConfig, convention: str = "diffusers") -> Tensor:
    """An RGB hint (B, 3, H, W) as the adapter reads it: a one-channel adapter (the sketch models) takes the first
    channel, as A1111's ControlNet extension gives it (`hint[0]`), or under ComfyUI's `convention` the mean of the
    channels (comfy/controlnet.py `T2IAdapter.get_control`: torch.mean(hint, 1, keepdim=True))."""
    if cfg.hint_channels >= hint.shape[1]:
        return hint
    if convention == "comfyui" and cfg.hint_channels == 1:
        return hint.mean(1, keepdim=True)                                   # (B, 1, H, W)
    return hint[:, : cfg.hint_channels]
