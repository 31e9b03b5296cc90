"""Convolutions over few pixels as one matrix product (CPU).

oneDNN's convolution takes time that grows with its weight more than with its work when the image is small
(by all appearances it re-lays the weight out on every call): at the U-Net's lowest levels (SD1.5 at 512 px: 8 x 8 and 16 x 16 latents over 1280-2560
channels, batch 2 with guidance) a bf16 3x3 convolution ran at 0.07-0.8 TFLOP/s where matrix products of
the same size run at 1.1-1.5 on the AMX machine (`docs/performance.md`). There `patch_conv.Conv2d` gathers the
input's k x k patches and multiplies them by the weight in one `F.linear`:

    patches[b, y, x, (dy, dx, c)] = x_padded[b, c, s*y + dy, s*x + dx]      (B, H', W', k*k*C_in)
    out = patches @ W^T + bias,  W[o, (dy, dx, c)] = weight[o, c, dy, dx]    (B, H', W', C_out)

A channels-last weight already lies in memory as (C_out, k, k, C_in), so W is a view; a channels-last input
is (B, H, W, C) in memory, so padding and slicing it gives the patches with one concatenation. The result is
returned as a channels-last (B, C_out, H', W') view. The product path is taken on the CPU when the weight
holds at least `WEIGHT_PER_PIXEL` elements per output pixel (batch included), measured as where it wins;
everything else runs `nn.Conv2d`'s own convolution.

On CPUs with AMX, bf16 inference takes sdlab's own product instead (`kernels/cpu_patch_product.cpp`: the
weight read in place as the tiles' left operand, the patches gathered straight into tile order; 1.3-1.7 x
oneDNN's product at these shapes) for convolutions of at most `TILE_PIXELS` output pixels, where it
beats oneDNN's convolution too (1.4-2.2 TFLOP/s on 128-1152 pixels x 1280 channels, 1.05-1.5 x the
convolution's speed; at 2048 pixels it falls 10 % behind, at 8192 to 0.5-0.7 x). It takes them at any size
(the first one builds the kernels: `cpu_kernels.tile_kernels`), so a small model's products go the same way
whether or not a larger model ran before; CPUs without AMX never send a convolution there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdlab.models import cpu_kernels

WEIGHT_PER_PIXEL = 16384  # weight elements per output pixel above which the product wins (docs/performance.md)
TILE_PIXELS = 1536        # output pixels (batch included) up to which the AMX kernel wins (docs/performance.md)


def patch_product_conv(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int) -> Tensor:
    """A square convolution (zero padding, no dilation or groups) as patches @ weight.

    x: (B, C_in, H, W), weight: (C_out, C_in, k, k) -> (B, C_out, H', W') channels-last,
    H' = (H + 2 padding - k) // stride + 1 (W' alike)
    """
    b, c, h, w = x.shape
    c_out, _, k, _ = weight.shape
    flat = weight.permute(0, 2, 3, 1).reshape(c_out, k * k * c)  # (C_out, k*k*C): a view of a channels-last weight
    if _on_tiles(x, weight, bias, stride, padding):
        module = cpu_kernels.tile_kernels()
        if module is not None:
            return module.patch_product_bf16(x, flat, bias, k, stride, padding).permute(0, 3, 1, 2)
    oh, ow = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    pixels = x.permute(0, 2, 3, 1)  # (B, H, W, C): a view of a channels-last x
    if padding:
        pixels = F.pad(pixels, (0, 0, padding, padding, padding, padding))  # (B, H + 2p, W + 2p, C)
    taps = [pixels[:, dy : dy + stride * (oh - 1) + 1 : stride, dx : dx + stride * (ow - 1) + 1 : stride]
            for dy in range(k) for dx in range(k)]  # k*k x (B, H', W', C)
    patches = taps[0] if len(taps) == 1 else torch.cat(taps, dim=-1)  # (B, H', W', k*k*C)
    out = F.linear(patches, flat, bias)  # (B, H', W', C_out)
    return out.permute(0, 3, 1, 2)  # (B, C_out, H', W'), channels-last


def _on_tiles(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int) -> bool:
    """A product sdlab's AMX kernel takes: bf16 channels-last input and weight on the CPU, no gradient wanted,
    not compiling, K = k*k*C_in and C_out multiples of 32 (and a 32-channel block for each thread), at most
    `TILE_PIXELS` output pixels, a CPU where the tile kernels run (`tile_product_pays`)."""
    b, c, h, w = x.shape
    c_out, _, k, _ = weight.shape
    if torch.compiler.is_compiling() or not (
            x.dtype == weight.dtype == torch.bfloat16 and (bias is None or bias.dtype == torch.bfloat16)
            and x.device.type == "cpu" and x.is_contiguous(memory_format=torch.channels_last)
            and weight.is_contiguous(memory_format=torch.channels_last) and (k * k * c) % 32 == 0 and c_out % 32 == 0
            and c_out >= 32 * torch.get_num_threads() and cpu_kernels.runs_here()
            and cpu_kernels.inference_only(x, weight, *(() if bias is None else (bias,)))):
        return False
    pixels = b * ((h + 2 * padding - k) // stride + 1) * ((w + 2 * padding - k) // stride + 1)
    return tile_product_pays(pixels)


def tile_product_pays(rows: int, max_rows: int | None = TILE_PIXELS) -> bool:
    """Whether sdlab's AMX product kernel should take a product with `rows` output rows (pixels or tokens,
    batch included): it beats oneDNN's convolution up to `TILE_PIXELS` rows (`max_rows`; None: any number), on
    a CPU where the tile kernels run (built by the first product that asks). Nothing else: not the product's
    size, nor whether the kernels are loaded already (the same picture whatever ran before)."""
    return 0 < rows <= (max_rows or rows) and cpu_kernels.tile_kernels() is not None


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` (same parameters, checkpoint keys and results up to rounding) that runs as
    `patch_product_conv` on the CPU where the weight is large against the output (see the module docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_bias(x, self.bias)

    def forward_with_bias(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """The convolution with `bias` (C_out,) in place of the module's own (no hooks run: callers check)."""
        if self._as_product(x, bias):
            return patch_product_conv(x, self.weight, bias, self.stride[0], self.padding[0])
        return self._conv_forward(x, self.weight, bias)

    def forward_add(self, x: Tensor, other: Tensor, into_other: bool = False) -> Tensor:
        """self(x) + other (a ResBlock's skip connection): a new tensor, or with `into_other` (the caller gives
        `other` up; taken only where no gradient is wanted) written into `other`. In bf16 inference on the CPU
        where oneDNN's convolution runs (`_adds_inside`), the add is done inside it, before its one rounding to
        bf16 (SD1.5's ResBlocks at 64 x 64 and 32 x 32 latents: 6 ms a step less). other: the output's shape"""
        into_other = into_other and cpu_kernels.inference_only(x, other, self.weight)
        if self._adds_inside(x, other):
            conv = (self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups, "add", None, None, [],
                    None)
            if into_other:
                return torch.ops.mkldnn._convolution_pointwise_.binary(other, x, *conv)  # other, written over
            return torch.ops.mkldnn._convolution_pointwise.binary(x, other, *conv)  # (B, C_out, H', W') channels-last
        if into_other:
            other += self(x)
            return other
        out = self(x)
        out += other  # into the fresh output: nothing's backward needs it
        return out

    def _adds_inside(self, x: Tensor, other: Tensor) -> bool:
        """bf16 channels-last x and `other` of the output's shape on the CPU, no gradient wanted, no hooks, and
        oneDNN's convolution is what runs here (not the patch product)."""
        tensors = (x, other, self.weight, *(() if self.bias is None else (self.bias,)))
        if not (all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors) and x.dim() == 4
                and isinstance(self.padding, tuple)):
            return False
        size = [(n + 2 * p - d * (k - 1) - 1) // s + 1   # the output's height and width
                for n, p, d, k, s in zip(x.shape[2:], self.padding, self.dilation, self.kernel_size, self.stride)]
        return (other.shape == (x.shape[0], self.out_channels, *size)
                and x.is_contiguous(memory_format=torch.channels_last)
                and other.is_contiguous(memory_format=torch.channels_last)
                and self.padding_mode == "zeros" and not cpu_kernels.has_hooks(self)
                and cpu_kernels.inference_only(*tensors) and cpu_kernels.onednn_fuses()
                and not self._as_product(x, self.bias))

    def _as_product(self, x: Tensor, bias: Tensor | None) -> bool:
        k = self.kernel_size[0]
        square = (self.kernel_size == (k, k) and self.stride[0] == self.stride[1] and self.dilation == (1, 1)
                  and self.groups == 1 and self.padding_mode == "zeros" and self.padding == (k // 2, k // 2))
        if not (square and x.device.type == "cpu" and x.dim() == 4):
            return False
        s, p = self.stride[0], k // 2
        out_pixels = x.shape[0] * ((x.shape[2] + 2 * p - k) // s + 1) * ((x.shape[3] + 2 * p - k) // s + 1)
        return self.weight.numel() >= WEIGHT_PER_PIXEL * out_pixels or _on_tiles(x, self.weight, bias, s, p)


__all__ = ["TILE_PIXELS", "WEIGHT_PER_PIXEL", "Conv2d", "patch_product_conv"]
