"""A1111's random sources, transcribed as the reference of the RNG and variation-seed tests.

AUTOMATIC1111/stable-diffusion-webui:
- ``modules/rng_philox.py`` (``Generator``, ``philox4_32``, ``box_muller``) as `A1111Philox`;
- ``modules/rng.py`` (``randn``, ``slerp``, ``ImageRNG.first`` / ``next``) as `a1111_randn`, `a1111_slerp` and
  `A1111ImageRNG`, with ``opts.randn_source`` "NV" (``create_generator`` and ``randn`` then make `A1111Philox`
  generators). ``slerp`` is the same in ``modules/processing.py`` of A1111 before 1.6.
"""

from __future__ import annotations

import numpy as np
import torch

# --- modules/rng_philox.py --------------------------------------------------------------------------------
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


class A1111Philox:
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


# --- modules/rng.py, opts.randn_source "NV" ----------------------------------------------------------------
def a1111_randn(seed, shape, generator=None):
    return torch.from_numpy((generator or A1111Philox(seed)).randn(shape))


def a1111_slerp(val, low, high):
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


class A1111ImageRNG:
    def __init__(self, shape, seeds, subseeds=None, subseed_strength=0.0, seed_resize_from_h=0, seed_resize_from_w=0,
                 eta_noise_seed_delta=0):
        self.shape = shape
        self.seeds = seeds
        self.subseeds = subseeds
        self.subseed_strength = subseed_strength
        self.seed_resize_from_h = seed_resize_from_h
        self.seed_resize_from_w = seed_resize_from_w
        self.eta_noise_seed_delta = eta_noise_seed_delta                  # shared.opts.eta_noise_seed_delta
        self.generators = [A1111Philox(seed) for seed in seeds]
        self.is_first = True

    def first(self):
        noise_shape = self.shape if self.seed_resize_from_h <= 0 or self.seed_resize_from_w <= 0 else (
            self.shape[0], self.seed_resize_from_h // 8, self.seed_resize_from_w // 8)
        xs = []
        for i, (seed, generator) in enumerate(zip(self.seeds, self.generators)):
            subnoise = None
            if self.subseeds is not None and self.subseed_strength != 0:
                subseed = 0 if i >= len(self.subseeds) else self.subseeds[i]
                subnoise = a1111_randn(subseed, noise_shape)
            if noise_shape != self.shape:
                noise = a1111_randn(seed, noise_shape)
            else:
                noise = a1111_randn(seed, self.shape, generator=generator)
            if subnoise is not None:
                noise = a1111_slerp(self.subseed_strength, noise, subnoise)
            if noise_shape != self.shape:
                x = a1111_randn(seed, self.shape, generator=generator)
                dx = (self.shape[2] - noise_shape[2]) // 2
                dy = (self.shape[1] - noise_shape[1]) // 2
                w = noise_shape[2] if dx >= 0 else noise_shape[2] + 2 * dx
                h = noise_shape[1] if dy >= 0 else noise_shape[1] + 2 * dy
                tx = 0 if dx < 0 else dx
                ty = 0 if dy < 0 else dy
                dx = max(-dx, 0)
                dy = max(-dy, 0)
                x[:, ty:ty + h, tx:tx + w] = noise[:, dy:dy + h, dx:dx + w]
                noise = x
            xs.append(noise)
        if self.eta_noise_seed_delta:
            self.generators = [A1111Philox(seed + self.eta_noise_seed_delta) for seed in self.seeds]
        return torch.stack(xs)

    def next(self):
        if self.is_first:
            self.is_first = False
            return self.first()
        return torch.stack([a1111_randn(None, self.shape, generator=generator) for generator in self.generators])
