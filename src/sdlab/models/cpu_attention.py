"""bf16 attention on CPUs with AVX512-BF16: sdlab's own flash-attention kernel (`kernels/cpu_attention.cpp`).

PyTorch's CPU flash kernel runs bf16 attention no faster than fp32 (one guided SD1.5 step at 512 px spends
~40 % of its time there); this one multiplies bf16 pairs with fp32 accumulation (`vdpbf16ps`), about 2.3 x faster on
SD1.5's 4,096-token, 40-channel heads, with the same error against an fp64 reference as PyTorch's bf16 kernel
(`tests/test_cpu_attention.py`, `benchmarks/bench_unet.py`).

On CPUs with AMX tiles (Intel Sapphire Rapids and later) PyTorch's kernel multiplies on the tiles and is
2.5-5.6 x faster than pair dot products; built there (`-march=native` targets AMX), this kernel runs both
products on the tiles too and takes 0.45-0.9 x PyTorch's time on self-attention and 0.24-0.39 x on
cross-attention over a prompt's 77 keys (`benchmarks/bench_attention.py`), its error against fp64 within a few
per cent of PyTorch's (heads of at most 64 channels move the running maximum only past a margin: the .cpp file).
Where the CPU has AMX but the build does not (an older compiler, an OS that refuses the tile state),
PyTorch's kernel is used.

It is built with sdlab's other CPU kernels (`cpu_kernels`) the first time a bf16 model draws on such a CPU,
and used for inference-only attention with at least `MIN_TOKENS` queries: on the AMX tiles for any
key count, with pair dot products for at least `MIN_TOKENS` keys (self-attention, where it was measured to
win); everything else, and every machine where it cannot be built, goes to `F.scaled_dot_product_attention`. `SDLAB_CPU_ATTENTION=0` turns it
off; `SDLAB_CPU_ATTENTION=1` uses it wherever it can run (AVX512-BF16), also where it would lose.
"""

from __future__ import annotations

import functools
import math
import os
from types import ModuleType

import torch
from torch import Tensor

from sdlab.models.cpu_kernels import extension, inference_only, runs_here

MIN_TOKENS = 1024           # below this the kernel's gain is a few milliseconds (a fact of the shape, never of history)
VECTORS_PER_HEAD = (1, 2, 3, 4, 5, 6, 8, 10)   # the kernel's compiled cases (its switch), in 16-lane vectors
HEAD_WIDTHS = {d for d in range(2, 16 * max(VECTORS_PER_HEAD) + 1, 2) if (d + 15) // 16 in VECTORS_PER_HEAD}


@functools.cache
def _cpu_has_amx() -> bool:
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return probe is not None and probe()


def _setting() -> str:
    """`SDLAB_CPU_ATTENTION`: "off" (0), "on" (1: wherever the kernel runs) or "auto" (unset: where it wins)."""
    value = os.environ.get("SDLAB_CPU_ATTENTION", "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return "off"
    return "on" if value in ("1", "true", "yes", "on") else "auto"


def enabled() -> bool:
    """The kernel may be used here: it runs on this CPU and is not turned off."""
    return _setting() != "off" and runs_here()


def beats_pytorch(module: ModuleType, keys: int) -> bool:
    """Whether the built kernel beats PyTorch's on attention over `keys` keys here: on an AMX CPU only a build
    that uses the tiles does (PyTorch's kernel uses them too), then for any key count; elsewhere (pair dot
    products) for long self-attention."""
    if _setting() == "on":
        return True
    if _cpu_has_amx():
        return module.uses_amx()
    return keys >= MIN_TOKENS


def suits(q: Tensor, k: Tensor, v: Tensor, heads: int) -> bool:
    """Whether (B, N, C) q and (B, M, C) k, v split into `heads` are a case the kernel takes: bf16 on the CPU
    with contiguous channels, no gradient wanted, not inside `torch.compile` (which fuses PyTorch's attention
    itself), at least `MIN_TOKENS` queries, a head width it is compiled for."""
    c = q.shape[-1]
    return (q.dtype == k.dtype == v.dtype == torch.bfloat16 and q.device.type == "cpu" and q.dim() == 3
            and q.shape[-2] >= MIN_TOKENS and k.shape[-2] > 0 and k.shape[-2] == v.shape[-2]
            and q.shape[0] == k.shape[0] == v.shape[0]   # a broadcast context (batch 1) goes to PyTorch
            and c % heads == 0 and c // heads in HEAD_WIDTHS and c == k.shape[-1] == v.shape[-1]
            and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
            and inference_only(q, k, v) and enabled())


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor | None:
    """softmax(q k^T / sqrt(d)) v per head with the kernel, or None where it could not be built or would be
    slower than PyTorch's (`beats_pytorch`).

    q: (B, N, C), k and v: (B, M, C) bf16, C = heads * d -> (B, N, C) bf16
    """
    module = extension()
    if module is None or not beats_pytorch(module, k.shape[-2]):
        return None
    return module.flash_attention_bf16(q, k, v, heads, exp2_scale(q.shape[-1] // heads), True)  # (B, N, C)


def exp2_scale(width: int) -> float:
    """The kernel's score scale: 1 / sqrt(d) times log2(e), as it takes exponentials base 2."""
    return width ** -0.5 * math.log2(math.e)


__all__ = ["MIN_TOKENS", "attention", "beats_pytorch", "enabled", "exp2_scale", "extension", "runs_here", "suits"]
