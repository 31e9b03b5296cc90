"""Small building blocks shared by the networks: timestep embeddings and multi-head attention.

Kept free of module state so that the U-Net, the VAE and the conditioners can all use them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from sdlab.models import cpu_attention

SDXL_SIZE_EMBED_DIM = 256  # width of each SDXL size / crop / aesthetic-score embedding (SGM `ConcatTimestepEmbedderND`)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, LDM convention: cosines first.

    emb[:, i] = cos(t * f_i), emb[:, half + i] = sin(t * f_i), with f_i = max_period ** (-i / half), i < half
    (Vaswani et al. 2017 eq. 5 with the halves swapped; diffusers' flip_sin_to_cos=True, freq_shift=0).
    Always computed in fp32; an odd `dim` gets one zero column at the end.

    t: (B,) -> (B, dim) float32
    """
    half = dim // 2
    # Same operation order as LDM, so the result is bit-identical to the original code.
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def sdxl_vector(pooled: Tensor, size_conds: Tensor) -> Tensor:
    """SDXL's vector conditioning `y`: pooled text embedding followed by one 256-wide sinusoidal embedding per
    size condition (SGM's `ConcatTimestepEmbedderND`).

    Base model: size_conds = (orig_h, orig_w, crop_top, crop_left, target_h, target_w) -> y is 1280 + 6*256 = 2816.
    Refiner: (orig_h, orig_w, crop_top, crop_left, aesthetic_score) -> 1280 + 5*256 = 2560.

    pooled: (B, P), size_conds: (B, K) -> (B, P + K * 256), float32
    """
    b, k = size_conds.shape
    sizes = timestep_embedding(size_conds.reshape(-1), SDXL_SIZE_EMBED_DIM)  # (B * K, 256)
    return torch.cat([pooled.to(torch.float32), sizes.reshape(b, k * SDXL_SIZE_EMBED_DIM)], dim=-1)


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int, upcast: bool = False) -> Tensor:
    """Multi-head scaled dot-product attention, softmax(q k^T / sqrt(d)) v per head, on (batch, tokens, channels).

    Heads are split as views (no copies) and the work goes to `F.scaled_dot_product_attention`, which picks
    the fused flash / memory-efficient kernel for the device, or for long bf16 self-attention on a CPU with
    AVX512-BF16 to sdlab's own kernel (`cpu_attention`). `upcast` runs it in fp32 and casts back
    (SD 2.1 in fp16 overflows q k^T otherwise).

    q: (B, N, C), k and v: (B, M, C) -> (B, N, C)
    """
    if not upcast and cpu_attention.suits(q, k, v, heads):
        out = cpu_attention.attention(q, k, v, heads)
        if out is not None:
            return out
    b, n, c = q.shape
    dtype = q.dtype
    if upcast and dtype != torch.float32:
        q, k, v = q.float(), k.float(), v.float()
    q = q.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, H, N, d)
    k = k.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, H, M, d)
    v = v.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, H, M, d)
    out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, d)
    return out.transpose(1, 2).reshape(b, n, c).to(dtype)  # (B, N, C)
