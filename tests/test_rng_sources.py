"""A1111's random sources ("CPU", "GPU", "NV") and "Seed resize from".

Reference: AUTOMATIC1111/stable-diffusion-webui ``modules/rng_philox.py`` (``Generator``, ``philox4_32``,
``box_muller``), transcribed below as `_A1111Philox`; its docstring's numbers are CUDA's ``torch.randn((3, 4))``
after ``torch.manual_seed(0)``.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from sdlab.diffusion.philox import PhiloxGenerator

# --- AUTOMATIC1111/stable-diffusion-webui modules/rng_philox.py, transcribed -------------------------------
_philox_m = [0xD2511F53, 0xCD9E8D57]
_philox_w = [0x9E3779B9, 0xBB67AE85]
_two_pow32_inv = np.array([2.3283064e-10], dtype=np.float32)
_two_pow32_inv_2pi = np.array([2.3283064e-10 * 6.2831855], dtype=np.float32)


def _uint32(x):
    return x.view(np.uint32).reshape(-1, 2).transpose(1, 0)


def _philox4_round(counter, key):
    v1 = _uint32(counter[0].astype(np.uint64) * _philox_m[0])
    v2 = _uint32(counter[2].astype(np.uint64) * _philox_m[1])
    counter[0] = v2[1] ^ counter[1] ^ key[0]
    counter[1] = v2[0]
    counter[2] = v1[1] ^ counter[3] ^ key[1]
    counter[3] = v1[0]


def _philox4_32(counter, key, rounds=10):
    for _ in range(rounds - 1):
        _philox4_round(counter, key)
        key[0] = key[0] + _philox_w[0]
        key[1] = key[1] + _philox_w[1]
    _philox4_round(counter, key)
    return counter


def _box_muller(x, y):
    u = x * _two_pow32_inv + _two_pow32_inv / 2
    v = y * _two_pow32_inv_2pi + _two_pow32_inv_2pi / 2
    s = np.sqrt(-2.0 * np.log(u))
    return (s * np.sin(v)).astype(np.float32)


class _A1111Philox:
    def __init__(self, seed):
        self.seed = seed
        self.offset = 0

    def randn(self, shape):
        n = 1
        for x in shape:
            n *= x
        counter = np.zeros((4, n), dtype=np.uint32)
        counter[0] = self.offset
        counter[2] = np.arange(n, dtype=np.uint32)
        self.offset += 1
        key = np.empty(n, dtype=np.uint64)
        key.fill(self.seed)
        key = _uint32(key)
        g = _philox4_32(counter, key)
        return _box_muller(g[0], g[1]).reshape(shape)
# ----------------------------------------------------------------------------------------------------------

CUDA_SEED_0 = np.array([[-0.92466259, -0.42534415, -2.6438457, 0.14518388],   # rng_philox.py's docstring:
                        [-0.12086647, -0.57972564, -0.62285122, -0.32838709],  # torch.manual_seed(0);
                        [-1.07454231, -0.36314407, -1.67105067, 2.26550497]])  # torch.randn((3, 4), device='cuda')


def test_philox_is_cudas_randn():
    assert np.abs(PhiloxGenerator(0).randn((3, 4)).numpy() - CUDA_SEED_0).max() < 1e-6


@pytest.mark.parametrize("seed", [0, 1, 42, 2**31 + 7, 2**32 + 5, 2**63 + 12345, 2**64 - 1])
def test_philox_equals_a1111_bit_for_bit(seed):
    ours, theirs = PhiloxGenerator(seed), _A1111Philox(seed)
    for shape in [(4, 64, 64), (3, 4), (1,), (4, 16, 24)]:          # each call is the next draw (offset + 1)
        got = ours.randn(shape)
        assert got.dtype == torch.float32 and tuple(got.shape) == shape
        assert np.array_equal(got.numpy(), theirs.randn(shape))


def test_philox_state_rewinds():
    generator = PhiloxGenerator(5)
    state = generator.get_state()
    first = generator.randn((2, 3))
    generator.set_state(state)
    assert torch.equal(generator.randn((2, 3)), first)
    assert not torch.equal(generator.randn((2, 3)), first)


def test_philox_sdxl_latent_speed():
    """An SDXL latent (4 x 128 x 128) draws in well under a second (measured: ~10 ms on one core)."""
    generator = PhiloxGenerator(1)
    start = time.perf_counter()
    for _ in range(4):
        generator.randn((4, 128, 128))
    assert (time.perf_counter() - start) / 4 < 0.5
