"""Nearest-neighbour 2x upsampling followed by a 3x3 convolution, as one transposed convolution.

In conv3x3(up2(x)) (stride 1, padding 1) each output pixel (2i + a, 2j + b) reads only the 2 x 2 input
pixels around (i, j) on its side, through the 3x3 taps that land on each of them, summed. That is a stride-2
transposed convolution (padding 1) with a 4x4 kernel built from the 3x3 one:

    K[c, o, t, u] = sum over ky in S(t), kx in S(u) of w[o, c, ky, kx],   S = ({2}, {1, 2}, {0, 1}, {0})

16 multiply-adds per input pixel and channel pair instead of 36 (2.25 x fewer), and the 4x larger upsampled
copy of the input is never made. The SD VAE decoder's three upsampling convolutions at 512 px (bf16, the AMX
machine): 0.5-0.8 x the time of interpolate + conv; the result differs by the rounding of the summed
weights (in bf16 the error against an fp64 reference rises from ~0.016 to ~0.022 at outputs of ~7; in fp32
it falls). oneDNN's transposed convolution loses at the U-Net's 1280-channel levels (1.5-6 x slower), so
only the VAE takes it. CPU inference in bf16 only (in fp32 it is faster too, 0.4-0.7 x, but differs from
interpolate + conv by ~1e-6, where an fp32 decode is otherwise bit-identical with gradients on and off), and
only on a CPU that computes bf16 natively (`dtypes.cpu_has_native_bf16`): where bf16 is emulated (AVX2 without
AVX-512) oneDNN's bf16 transposed convolution is ~15 x slower than interpolate + conv (512 channels at 64 x 64:
91.9 s against 6.3 s) and its error against fp64 1.9-2.35 x the plain path's. Never with hooks on the
convolution (a LoRA in training adds its output through one), not while compiling.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdlab.models import cpu_kernels
from sdlab.utils import dtypes

# transposed tap t (0..3) <- the 3x3 taps summed into it
_TAPS = ((0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0))


def upsampled_conv(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """conv(F.interpolate(x, scale_factor=2, mode="nearest")). x: (B, C_in, H, W) -> (B, C_out, 2H, 2W)"""
    if not _transposes(x, conv):
        return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    return F.conv_transpose2d(x, transposed_weight(conv), conv.bias, stride=2, padding=1)


def transposed_weight(conv: nn.Conv2d) -> Tensor:
    """`conv`'s 3x3 weight (C_out, C_in, 3, 3) as the 4x4 transposed kernel (C_in, C_out, 4, 4) in its dtype,
    summed in fp32; made once per weight (kept on the module while the weight is the same tensor at the same
    address and version; an inference tensor has no version to watch, so for one it is made at every call)."""
    weight = conv.weight
    version = cpu_kernels.tensor_version(weight)
    kept = getattr(conv, "_sdlab_transposed", None)
    # the same tensor (not merely the same address: a freed weight's memory may hold a new one) unchanged
    if version is not None and kept is not None and kept[0]() is weight and kept[1] == (weight.data_ptr(), version):
        return kept[2]
    taps = torch.tensor(_TAPS, dtype=torch.float32, device=weight.device)   # (4, 3)
    kernel = torch.einsum("tk,ockl,ul->cotu", taps, weight.detach().float(), taps)   # (C_in, C_out, 4, 4)
    kernel = kernel.to(weight.dtype).contiguous(memory_format=torch.channels_last)
    conv._sdlab_transposed = None if version is None else (weakref.ref(weight), (weight.data_ptr(), version), kernel)
    return kernel


def _transposes(x: Tensor, conv: nn.Conv2d) -> bool:
    return (isinstance(conv, nn.Conv2d) and x.device.type == "cpu" and x.dim() == 4 and x.dtype == torch.bfloat16
            and conv.weight.dtype == x.dtype and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and not cpu_kernels.has_hooks(conv)
            and cpu_kernels.inference_only(x, conv.weight) and dtypes.cpu_has_native_bf16())


__all__ = ["transposed_weight", "upsampled_conv"]
