"""bf16 linear layers with the element-wise step that follows them done inside the product (CPU).

In a bf16 U-Net step on the CPU every linear layer writes its output to memory and the next step reads it
back: the residual add after an attention's output projection and after the feed-forward, and GEGLU's GELU
and product (PyTorch's `addmm` also first copies the bias into the output). Those passes are memory-bound.
oneDNN, which runs PyTorch's bf16 matrix products on the CPU, can apply such a step to each block of the
product while it is still in registers (a post-op); PyTorch exposes that as `torch.ops.mkldnn._linear_pointwise`
(the op its own CPU compiler emits). On the AMX machine this took a guided SD1.5 step from 1.49 to 1.35 s
(`benchmarks/bench_unet.py`; docs/performance.md). Here:

    linear_add(x, layer, other) = layer(x) + other
    geglu(x, proj)              = (x W_a^T + b_a) * gelu(x W_g^T + b_g),  proj's weight [W_a; W_g], bias [b_a; b_g]

Both round once to bf16 at the end (the unfused path rounds after each step). The fused op has no backward,
so it is used only where no gradient is wanted: `fuses` says when (bf16 on the CPU, PyTorch built with oneDNN,
no forward hooks on the layer, such as a LoRA's in training, not inside `torch.compile`, whose CPU backend
fuses these itself); elsewhere the plain ops run.

On CPUs with AMX a GEGLU runs as sdlab's own kernel instead (`kernels/cpu_patch_product.cpp`: the patch
product's tile loop with both halves' sums in tiles and the gated GELU applied before the one write, done
between the next block's tile products) where C >= `GEGLU_DEEP`, and below that over at most
`patch_conv.TILE_PIXELS` tokens: SD1.5's 16 x 16 level 9.5 -> 6.2 ms a call in the step, its 64 x 64 level
(C = 320) 53 -> 46 ms a step, SDXL's step 7.75 -> 7.60 s (docs/performance.md). So do the plain products
over at most `patch_conv.TILE_PIXELS` tokens with C_in <= `PRODUCT_DEEPEST` (`linear`, `linear_add`, `product`;
the residual added before the kernel's one rounding): SD1.5's 16 x 16 and 8 x 8 levels and the
cross-attention's keys and values over the prompt, 98 -> 88 ms a step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdlab.models import cpu_kernels, patch_conv
from sdlab.models.cpu_kernels import has_hooks, inference_only, onednn_fuses

GEGLU_DEEP = 320   # input channels from which the AMX GEGLU beats oneDNN's at any token count (docs/performance.md)
PRODUCT_DEEPEST = 1280   # input channels up to which the AMX product beats oneDNN's over few tokens (docs/performance.md)


def fuses(x: Tensor, layer: nn.Module, *others: Tensor) -> bool:
    """Whether `layer` (a linear layer, or a 1x1 convolution run as one) applied to `x`, and an add / product
    with `others`, runs fused here."""
    if x.device.type != "cpu" or any(t.dtype != torch.bfloat16 for t in (x, layer.weight, *others)):
        return False
    params = (layer.weight,) if layer.bias is None else (layer.weight, layer.bias)   # not .parameters(): a walk
    return not has_hooks(layer) and inference_only(x, *others, *params) and onednn_fuses()


def linear(x: Tensor, layer: nn.Linear) -> Tensor:
    """layer(x), as `product` where `fuses` says so. x: (..., C_in) -> (..., C_out)"""
    return product(x, layer.weight, layer.bias) if fuses(x, layer) else layer(x)


def linear_add(x: Tensor, layer: nn.Linear, other: Tensor) -> Tensor:
    """layer(x) + other as a new tensor. x: (..., C_in), other: (..., C_out) -> (..., C_out)"""
    if fuses(x, layer, other):
        return product(x, layer.weight, layer.bias, other)
    out = layer(x)
    out += other  # into the fresh output: nothing's backward needs it
    return out


def product(x: Tensor, weight: Tensor, bias: Tensor | None, other: Tensor | None = None) -> Tensor:
    """x W^T + b (+ other) in one product, rounded once, where `fuses` said so: sdlab's AMX kernel over few
    tokens (`_product_on_tiles`), else oneDNN's (with `other` as its add post-op).

    x: (..., C_in), weight: (C_out, C_in), other: (..., C_out) -> (..., C_out)
    """
    if _product_on_tiles(x, weight, bias, other):
        module = cpu_kernels.tile_kernels()
        if module is not None:
            rows, c_out = x.numel() // x.shape[-1], weight.shape[0]
            flat = None if other is None else other.reshape(rows, c_out)
            return module.linear_bf16(x.reshape(rows, x.shape[-1]), weight, bias, flat).view(*x.shape[:-1], c_out)
    if other is None:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise.binary(x, other, weight, bias, "add")


def geglu(x: Tensor, proj: nn.Linear) -> Tensor:
    """Gated GELU of `proj`'s output halves: a * gelu(gate), with proj(x) = [a, gate] on the last axis.

    x: (..., C) -> (..., inner), proj: C -> 2 * inner
    """
    inner = proj.out_features // 2
    if fuses(x, proj):
        if _geglu_on_tiles(x, proj):
            module = cpu_kernels.tile_kernels()
            if module is not None:
                rows = x.numel() // x.shape[-1]
                out = module.geglu_bf16(x.reshape(rows, x.shape[-1]), proj.weight, proj.bias)  # (rows, inner)
                return out.view(*x.shape[:-1], inner)
        return onednn_geglu(x, proj.weight, proj.bias)
    w_a, w_gate = proj.weight[:inner], proj.weight[inner:]  # row halves: views
    b_a, b_gate = (None, None) if proj.bias is None else (proj.bias[:inner], proj.bias[inner:])
    if x.device.type == "cpu" and not has_hooks(proj):
        # Two products over the weight's row halves: each output is half the size and contiguous, which on
        # the CPU saves a fresh 2 x inner allocation (42 MB per SD1.5 block at 512 px, above glibc's mmap
        # threshold) and the strided GELU / product.
        gate = F.linear(x, w_gate, b_gate)  # (..., inner)
        if not inference_only(x, proj.weight, *(() if proj.bias is None else (proj.bias,))):
            return F.linear(x, w_a, b_a) * F.gelu(gate)
        # No gradient wanted: the GELU and the gating written over the products' own outputs, two fresh
        # (..., inner) tensors fewer (the same values bit for bit; fp32 on an AVX2 CPU, SD1.5's 4,096-token
        # level: 0.71-0.81 x the time, docs/performance.md)
        torch.ops.aten.gelu_(gate)
        return F.linear(x, w_a, b_a).mul_(gate)
    a, gate = proj(x).chunk(2, dim=-1)  # 2 x (..., inner): hooks (a LoRA being trained) see the whole output
    return a * F.gelu(gate)


def onednn_geglu(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """(x W_a^T + b_a) * gelu(x W_g^T + b_g) as oneDNN's pair of fused products (the gate's with its GELU,
    then a's with the product), where `fuses` said so. weight: (2 inner, C) = [W_a; W_g], bias: (2 inner,)

    x: (..., C) -> (..., inner)
    """
    inner = weight.shape[0] // 2
    b_a, b_gate = (None, None) if bias is None else (bias[:inner], bias[inner:])
    gate = torch.ops.mkldnn._linear_pointwise(x, weight[inner:], b_gate, "gelu", [], "none")  # (..., inner)
    return torch.ops.mkldnn._linear_pointwise.binary(x, gate, weight[:inner], b_a, "mul")  # (..., inner)


def _geglu_on_tiles(x: Tensor, proj: nn.Linear) -> bool:
    """A GEGLU sdlab's AMX kernel takes (after `fuses`): the operands `_tile_operands` asks for, inner a
    multiple of 16 with a 16-channel block for each thread; few enough tokens, or any number where
    C >= `GEGLU_DEEP` (with 10 or more 32-deep steps per block the gated GELU of the block before runs between
    them; narrower inputs past `patch_conv.TILE_PIXELS` tokens stay with oneDNN, not measured there)."""
    channels, inner = x.shape[-1], proj.out_features // 2
    if not _tile_operands(x, proj.weight, proj.bias, inner, 16):
        return False
    rows = x.numel() // channels
    deep = channels >= GEGLU_DEEP     # any number of tokens: the epilogue hides behind the products
    return patch_conv.tile_product_pays(rows, None if deep else patch_conv.TILE_PIXELS)


def _product_on_tiles(x: Tensor, weight: Tensor, bias: Tensor | None, other: Tensor | None) -> bool:
    """A product sdlab's AMX kernel takes (after `fuses`): the operands `_tile_operands` asks for, C_out a
    multiple of 32 with a 32-channel block for each thread, a contiguous bf16 `other` of the output's shape or
    none, C_in at most `PRODUCT_DEEPEST`, at most `patch_conv.TILE_PIXELS` tokens (a transformer at SD1.5's
    16 x 16 and 8 x 8 levels, the cross-attention's keys and values over the prompt)."""
    c_in, c_out = x.shape[-1], weight.shape[0]
    if not (_tile_operands(x, weight, bias, c_out, 32) and c_in <= PRODUCT_DEEPEST
            and (other is None or (other.dtype == torch.bfloat16 and other.is_contiguous()
                                   and other.shape == (*x.shape[:-1], c_out)))):
        return False
    rows = x.numel() // c_in
    return patch_conv.tile_product_pays(rows)


def _tile_operands(x: Tensor, weight: Tensor, bias: Tensor | None, channels_out: int, block: int) -> bool:
    """What both tile products need of their operands: contiguous bf16 x and 2-D weight on the CPU, a
    contiguous 1-D bf16 bias or none, C_in a multiple of 32, `channels_out` a multiple of `block` with a block
    for each thread, x within the kernel's 32-bit gather offsets, and a CPU the kernels run on."""
    bf16 = torch.bfloat16
    return (x.dtype == weight.dtype == bf16 and x.device.type == "cpu" and x.is_contiguous()
            and weight.dim() == 2 and weight.is_contiguous()
            and (bias is None or (bias.dtype == bf16 and bias.dim() == 1 and bias.is_contiguous()))
            and x.shape[-1] % 32 == 0 and channels_out % block == 0 and channels_out >= block * torch.get_num_threads()
            and x.numel() < 2**31 and cpu_kernels.runs_here())


__all__ = ["fuses", "geglu", "linear", "linear_add", "onednn_geglu", "product"]
