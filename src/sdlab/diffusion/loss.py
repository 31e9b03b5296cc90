"""Diffusion training math: the forward process, regression targets, timestep sampling, loss weights.

The forward process of a discrete VP model with ``ac_t = alphas_cumprod[t]`` (Ho et al. 2020, eq. 4):

    x_t = sqrt(ac_t) * x0 + sqrt(1 - ac_t) * eps,        eps ~ N(0, I)

and what the network is trained to output from ``(x_t, t)``:

    prediction  target
    eps         eps
    v           sqrt(ac_t) * eps - sqrt(1 - ac_t) * x0     (Salimans & Ho 2022, "v-parameterization", sec. 4)
    x0          x0

Min-SNR-gamma (Hang et al. 2023, eq. 10 and appendix) weights each timestep's MSE by
``min(SNR_t, gamma) / SNR_t`` for eps, ``min(SNR_t, gamma) / (SNR_t + 1)`` for v and
``min(SNR_t, gamma)`` for x0, with ``SNR_t = ac_t / (1 - ac_t)``; gamma = 5 in the paper.

Offset noise (Guttenberg 2023, "Diffusion with offset noise") adds a per-image, per-channel constant to
eps: ``eps + strength * n``, ``n ~ N(0, 1)`` of shape (B, C, 1, 1), so the model learns to change the
mean brightness of an image.

Imports only ``sdlab.diffusion``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sdlab.diffusion.prediction import Prediction

__all__ = [
    "min_snr_weights",
    "offset_noise",
    "per_sample_normal",
    "prediction_target",
    "q_sample",
    "sample_timesteps",
    "snr",
]


def _at(alphas_cumprod: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """alphas_cumprod[t] as (B, 1, ..., 1) in the dtype and device of ``like``."""
    ac = alphas_cumprod.to(like.device)[t.to(like.device)].to(like.dtype)  # (B,)
    return ac.reshape(-1, *([1] * (like.ndim - 1)))


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """x_t = sqrt(ac_t) x0 + sqrt(1 - ac_t) eps; x0, noise (B, C, h, w), t (B,) integer timesteps."""
    ac = _at(alphas_cumprod, t, x0)  # (B, 1, 1, 1)
    return ac.sqrt() * x0 + (1 - ac).sqrt() * noise


def prediction_target(prediction: Prediction, x0: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """The regression target for ``prediction`` (see the module docstring)."""
    if prediction is Prediction.EPS:
        return noise
    if prediction is Prediction.V:
        ac = _at(alphas_cumprod, t, x0)  # (B, 1, 1, 1)
        return ac.sqrt() * noise - (1 - ac).sqrt() * x0
    if prediction is Prediction.X0:
        return x0
    raise ValueError(f"unhandled prediction {prediction!r}")


def snr(t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Signal-to-noise ratio ac_t / (1 - ac_t) of integer timesteps t (B,), float32."""
    ac = alphas_cumprod.to(t.device)[t].to(torch.float32)  # (B,)
    return ac / (1 - ac)


def min_snr_weights(t: Tensor, alphas_cumprod: Tensor, gamma: float, prediction: Prediction) -> Tensor:
    """Per-sample MSE weights (B,) of Min-SNR-gamma for the given prediction type."""
    s = snr(t, alphas_cumprod)  # (B,)
    clipped = s.clamp(max=gamma)
    if prediction is Prediction.EPS:
        return clipped / s
    if prediction is Prediction.V:
        return clipped / (s + 1)
    if prediction is Prediction.X0:
        return clipped
    raise ValueError(f"unhandled prediction {prediction!r}")


def per_sample_normal(shape: Sequence[int], generators: Sequence[torch.Generator], *, device=None,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal (B, *shape[1:]) drawn one row per generator (each on the CPU), then moved."""
    if len(generators) != shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]}")
    rows = [torch.randn((1, *shape[1:]), generator=g, dtype=dtype) for g in generators]
    return torch.cat(rows).to(device)


def offset_noise(noise: Tensor, strength: float, generators: Sequence[torch.Generator]) -> Tensor:
    """eps + strength * n with n (B, C, 1, 1) ~ N(0, 1), one draw per image from its generator."""
    if strength == 0:
        return noise
    b, c = noise.shape[:2]
    shift = per_sample_normal((b, c, 1, 1), generators, device=noise.device, dtype=noise.dtype)  # (B, C, 1, 1)
    return noise + strength * shift


def sample_timesteps(generators: Sequence[torch.Generator], num_timesteps: int, *, device=None) -> Tensor:
    """One integer timestep per image, uniform on [0, num_timesteps), each from its generator: (B,) int64."""
    rows = [torch.randint(0, num_timesteps, (1,), generator=g) for g in generators]
    return torch.cat(rows).to(device)
