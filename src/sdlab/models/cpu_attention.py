"""bf16 self-attention on CPUs with AVX512-BF16: sdlab's own flash-attention kernel (`kernels/cpu_attention.cpp`).

PyTorch's CPU flash kernel runs bf16 attention no faster than fp32 (one guided SD1.5 step at 512 px spends
~40 % of its time there); this one multiplies bf16 pairs with fp32 accumulation (`vdpbf16ps`), about 1.8 x faster on
SD1.5's 4,096-token, 40-channel heads, with the same error against an fp64 reference as PyTorch's bf16 kernel
(`tests/test_cpu_attention.py`, `benchmarks/bench_unet.py`).

It is built the first time a large bf16 model draws on such a CPU (`torch.utils.cpp_extension`: a C++
compiler and ninja; about 30 s once, then loaded from torch's extension cache) and used for inference-only
self-attention whose key count is a multiple of 64 and at least `MIN_TOKENS`; everything else, and every
machine where it cannot be built, goes to `F.scaled_dot_product_attention`. `SDLAB_CPU_ATTENTION=0` turns it
off.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels") / "cpu_attention.cpp"
NAME = "sdlab_cpu_attention_v2"   # torch's extension cache keys builds by name (and rebuilds when SOURCE changes)
MIN_TOKENS = 1024           # below this the kernel's gain is a few milliseconds (and tiny models never build it)
KEY_BLOCK = 64              # keys per block in the kernel: the key count must be a multiple
HEAD_WIDTHS = {d for d in range(2, 161, 2) if (d + 15) // 16 in (1, 2, 3, 4, 5, 6, 8, 10)}

_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}


def enabled() -> bool:
    """The kernel may be used here: not turned off, and the CPU multiplies bf16 natively."""
    if os.environ.get("SDLAB_CPU_ATTENTION", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return torch.cpu._is_avx512_bf16_supported()


def extension() -> ModuleType | None:
    """The built kernel module (built on the first call), or None where it cannot be built."""
    with _lock:
        if "module" not in _state:
            _state["module"] = _build()
        return _state["module"]


def _build() -> ModuleType | None:
    from torch.utils import cpp_extension

    try:
        built = Path(cpp_extension._get_build_directory(NAME, verbose=False)) / f"{NAME}.so"
        if not built.exists():
            logger.warning("building sdlab's bf16 CPU attention kernel (once; about 30 s)")
        module = cpp_extension.load(name=NAME, sources=[str(SOURCE)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                                    extra_ldflags=["-fopenmp"], verbose=False)   # OpenMP: at::parallel_for uses the threads
    except Exception as err:   # no compiler, no ninja, a build error: PyTorch's attention instead
        logger.warning("sdlab's CPU attention kernel could not be built (%s); using PyTorch's attention",
                       str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__)
        return None
    return module if hasattr(module, "flash_attention_bf16") else None


def suits(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether (B, H, N, d) q, k, v are a case the kernel takes: bf16 on the CPU, no gradient wanted, not
    inside `torch.compile` (which fuses PyTorch's attention itself), at least `MIN_TOKENS` keys in whole
    blocks, a head width it is compiled for."""
    return (q.dtype == k.dtype == v.dtype == torch.bfloat16 and q.device.type == "cpu"
            and k.shape[-2] >= MIN_TOKENS and k.shape[-2] % KEY_BLOCK == 0 and q.shape[-1] in HEAD_WIDTHS
            and q.shape[-1] == k.shape[-1] == v.shape[-1]
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            and not torch.compiler.is_compiling() and enabled())


def flash_attention_bf16(module: ModuleType, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) v with the kernel. q: (B, H, N, d), k and v: (B, H, M, d), bf16 -> (B, H, N, d)."""
    b, h, n, d = q.shape
    m = k.shape[-2]
    width = (d + 15) // 16 * 16
    q3 = q.reshape(b * h, n, d).contiguous()                                          # (BH, N, d)
    k_pairs = k.reshape(b * h, m, d // 2, 2).permute(0, 2, 1, 3).contiguous()         # (BH, d/2, M, 2)
    v_pairs = F.pad(v.reshape(b * h, m, d), (0, width - d))                           # (BH, M, Dp)
    v_pairs = v_pairs.reshape(b * h, m // 2, 2, width).permute(0, 1, 3, 2).contiguous()  # (BH, M/2, Dp, 2)
    out = module.flash_attention_bf16(q3, k_pairs, v_pairs, d ** -0.5 * math.log2(math.e))  # (BH, N, d) fp32
    return out.reshape(b, h, n, d).to(q.dtype)


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """`F.scaled_dot_product_attention(q, k, v)` (no mask, default scale), through the kernel where it suits."""
    if suits(q, k, v):
        module = extension()
        if module is not None:
            return flash_attention_bf16(module, q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


__all__ = ["MIN_TOKENS", "enabled", "extension", "flash_attention_bf16", "scaled_dot_product_attention", "suits"]
