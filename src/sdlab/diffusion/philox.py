"""CUDA's ``torch.randn`` on any device: Philox4x32-10 and Box-Muller, as A1111's "NV" random source draws.

torch draws a float32 normal tensor of n elements on an NVIDIA GPU one Philox4x32-10 block per element
(while n fits in the GPU's resident threads: 270,336 on an H100, 125,952 on an RTX 3090; an SDXL latent
4 x 128 x 128 is 65,536): the key is the seed's two 32-bit halves, the counter (draw, 0, element, 0), where
draw counts the generator's earlier draws; element i is ``sqrt(-2 ln u) sin(v)`` of its block's first two
words as uniforms in (0, 1) (the block's other two words are dropped). A1111's ``modules/rng_philox.py``
imitates this in NumPy, with the Box-Muller in float64 rounded to float32; `PhiloxGenerator` computes the
same numbers in the same way, so they equal A1111's bit for bit and CUDA's to about 1e-6.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["PhiloxGenerator", "philox4x32"]

_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_KEY_STEPS = (0x9E3779B9, 0xBB67AE85)
_LOW32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
# curand's uniform scales, as float32 constants: 2^-32 and 2^-32 * 2 pi
_U_SCALE = float(np.float32(2.3283064e-10))
_V_SCALE = float(np.float32(2.3283064e-10 * 6.2831855))


def philox4x32(counter: Sequence[np.ndarray], key: tuple[int, int], rounds: int = 10) -> tuple[np.ndarray, ...]:
    """Philox4x32 of the four counter words (each an (n,) uint64 array of 32-bit values) under the 32-bit `key`
    pair: `rounds` rounds of two 32x32 -> 64-bit products, the key bumped by the Weyl steps between rounds.
    Returns the four output words, (n,) uint64 arrays of 32-bit values."""
    c0, c1, c2, c3 = (np.asarray(word, dtype=np.uint64) for word in counter)
    k0, k1 = key
    for _ in range(rounds):
        p0 = c0 * np.uint64(_MULTIPLIERS[0])                                   # (n,) exact: < 2^64
        p1 = c2 * np.uint64(_MULTIPLIERS[1])
        c0, c1, c2, c3 = ((p1 >> _SHIFT32) ^ c1 ^ np.uint64(k0), p1 & _LOW32,
                          (p0 >> _SHIFT32) ^ c3 ^ np.uint64(k1), p0 & _LOW32)
        k0, k1 = (k0 + _KEY_STEPS[0]) & 0xFFFFFFFF, (k1 + _KEY_STEPS[1]) & 0xFFFFFFFF
    return c0, c1, c2, c3


def _box_muller_sin(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The first normal of Box-Muller on two words as uniforms (u, v in (0, 1) x (0, 2 pi)), float64 -> float32."""
    u = x.astype(np.float64) * _U_SCALE + _U_SCALE / 2
    v = y.astype(np.float64) * _V_SCALE + _V_SCALE / 2
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32)


class PhiloxGenerator:
    """A seeded stream of CUDA-equal normal draws (A1111's ``rng_philox.Generator``): each `randn` call is one
    CUDA ``torch.randn`` call of the generator, so the n-th call's counter starts at n. Draws are made on the
    CPU (`device`), in float32."""

    device = torch.device("cpu")

    def __init__(self, seed: int) -> None:
        self.seed = int(seed) % 2**64                  # torch.manual_seed reads a seed modulo 2^64
        self.offset = 0

    def randn(self, shape: Sequence[int]) -> Tensor:
        """Standard normal float32 noise of `shape`, the generator's next draw."""
        n = int(np.prod(shape, dtype=np.int64))
        elements = np.arange(n, dtype=np.uint64)
        zeros = np.zeros(n, dtype=np.uint64)
        counter = (np.full(n, self.offset & 0xFFFFFFFF, dtype=np.uint64), zeros, elements, zeros)
        words = philox4x32(counter, (self.seed & 0xFFFFFFFF, self.seed >> 32))
        self.offset += 1
        return torch.from_numpy(_box_muller_sin(words[0], words[1]).reshape(tuple(shape)))

    def get_state(self) -> int:
        """The number of draws made (what `set_state` rewinds to)."""
        return self.offset

    def set_state(self, state: int) -> None:
        self.offset = int(state)
