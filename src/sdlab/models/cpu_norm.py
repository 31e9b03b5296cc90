"""GroupNorm (followed by SiLU or not) on bf16 channels-last maps, and LayerNorm on bf16 token rows, each in
one kernel on the CPU.

PyTorch runs GroupNorm + SiLU as two operations of two and one passes over memory (statistics, normalize;
then SiLU); `kernels/cpu_norm.cpp` takes two passes in all and rounds to bf16 once, 2.5-3.6 x faster on the
U-Net's activations with a smaller error against fp64 (`tests/test_cpu_norm.py`, `benchmarks/bench_unet.py`).
Its LayerNorm (each row's statistics while the row is in cache, then the normalized row) runs the
transformer blocks' norms 1.4 x faster than PyTorch's bf16 LayerNorm with the same error. Both are used for
inference (no gradient wanted) on CPUs where sdlab's kernels build (`cpu_kernels`, AVX512-BF16), at every
size: the first such norm builds them, and they beat PyTorch's ops on small maps and rows too (the shipped
model's (2, 64, 16, 16) GroupNorm + SiLU 60 -> 9 us, SD1.5's (2, 1280, 8, 8) 104 -> 39 us, LayerNorm over
(2, 16, 128) to (2, 256, 1280) 0.55-0.73 x PyTorch's time; docs/performance.md). Everything else, and every
machine where they cannot be built, runs the module (and `F.silu`). The choice depends on the tensor and the
machine only, never on whether something larger loaded the kernels before (`cpu_kernels`): a bf16 picture is
the same whatever ran earlier in the process.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdlab.models import cpu_kernels
from sdlab.models.cpu_kernels import has_hooks


def group_norm(norm: nn.GroupNorm, x: Tensor, silu: bool = False, overwrite: bool = False) -> Tensor:
    """norm(x), then SiLU if `silu`. x: (B, C, H, W) -> the same shape. `overwrite`: the caller is done with x
    (a fresh output of its own), so the kernel may write the result into it: one large allocation less, which
    on a VAE decode at 512 px and above is fresh memory faulted in page by page."""
    if (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and _suits(norm, x)):
        module = cpu_kernels.extension()
        if module is not None:
            return module.group_norm_bf16(x, norm.weight, norm.bias, norm.num_groups, norm.eps, silu,
                                          overwrite)  # (B, C, H, W)
    h = norm(x)
    if not silu:
        return h
    # in place on the norm's own fresh output (one copy less), not on one a hook may hold or on x itself
    return F.silu(h, inplace=not (h.requires_grad or has_hooks(norm) or h is x))


def layer_norm(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    """norm(x). x: (..., C) -> the same shape."""
    if (len(norm.normalized_shape) == 1 and x.dim() >= 2 and x.shape[-1] == norm.normalized_shape[0]
            and x.is_contiguous() and _suits(norm, x)):
        module = cpu_kernels.extension()
        if module is not None:
            return module.layer_norm_bf16(x, norm.weight, norm.bias, norm.eps)  # (..., C)
    return norm(x)


def _suits(norm: nn.GroupNorm | nn.LayerNorm, x: Tensor) -> bool:
    """A case the kernels take (x's layout checked by the caller): bf16 on the CPU, floating-point norm
    parameters, no gradient wanted, not inside `torch.compile` (which fuses for itself), no hooks on the norm,
    a CPU the kernels run on; of any size."""
    params = tuple(p for p in (norm.weight, norm.bias) if p is not None)   # not .parameters(): a walk
    return (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() > 0
            and all(p.dtype in (torch.bfloat16, torch.float16, torch.float32) for p in params)
            and cpu_kernels.inference_only(x, *params) and not has_hooks(norm) and cpu_kernels.runs_here())


__all__ = ["group_norm", "layer_norm"]
