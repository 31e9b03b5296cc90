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

kohya-ss/sd-scripts' training options (``library/train_util.py``, ``library/custom_train_functions.py``):

- a timestep range ``t ~ U{min..max-1}`` (``get_timesteps``; min = max: every t is max);
- multi-resolution ("pyramid") noise: eps plus upsampled coarser draws at ``discount^i``, renormalised to unit
  std (``pyramid_noise_like``; the std of each image, so the draw does not depend on the batch it is in);
- input perturbation (Ning et al. 2023): x_t from ``eps + gamma * n``, the target from eps (``ip_noise_gamma``);
- debiased estimation (Yu et al. 2024): weight ``1 / sqrt(SNR_t)`` for eps, ``1 / (SNR_t + 1)`` for v, SNR
  capped at 1000 (``apply_debiased_estimation``);
- the pseudo-Huber losses ``2 c (sqrt(d^2 + c^2) - c)`` (huber) and ``2 (sqrt(d^2 + c^2) - c)`` (smooth_l1)
  with c constant, ``exp(-alpha t)`` (alpha = -ln(c) / T) or ``(1 - c) / (1 + sigma_t)^2 + c``
  (``get_huber_threshold_if_needed``, ``conditional_loss``).

Imports only ``sdlab.diffusion``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from sdlab.diffusion.prediction import Prediction

__all__ = [
    "LOSS_TYPES",
    "HUBER_SCHEDULES",
    "debiased_weights",
    "elementwise_loss",
    "huber_thresholds",
    "input_perturbation",
    "min_snr_weights",
    "offset_noise",
    "per_sample_normal",
    "prediction_target",
    "pyramid_noise",
    "q_sample",
    "sample_timesteps",
    "snr",
]

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")
DEBIASED_SNR_CAP = 1000.0       # kohya's cap of SNR_t (SNR is infinite at t = 0 on a zero-start schedule)


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


def sample_timesteps(generators: Sequence[torch.Generator], num_timesteps: int, *, device=None, low: int = 0,
                     high: int | None = None) -> Tensor:
    """One integer timestep per image, uniform on [low, high) (default [0, num_timesteps)), each from its
    generator: (B,) int64. ``low == high`` gives ``high`` without a draw (kohya's ``get_timesteps``)."""
    high = num_timesteps if high is None else high
    if low >= high:
        return torch.full((len(generators),), high, dtype=torch.int64, device=device)
    rows = [torch.randint(low, high, (1,), generator=g) for g in generators]
    return torch.cat(rows).to(device)


def pyramid_noise(noise: Tensor, generators: Sequence[torch.Generator], iterations: int, discount: float) -> Tensor:
    """Multi-resolution noise of each image (kohya's ``pyramid_noise_like``): for i = 0 .. iterations - 1,
    ``r ~ U[2, 4)`` and a (C, H / r^i, W / r^i) normal draw upsampled bilinearly times ``discount^i`` is added
    (stopping after a 1-pixel side), then the image's noise is divided by its std. Draws: r, then the noise."""
    b, c, h, w = noise.shape
    rows = []
    for row, g in zip(noise, generators):
        row = row[None].clone()                                                  # (1, C, H, W)
        for i in range(iterations):
            r = float(torch.rand((), generator=g, dtype=torch.float64)) * 2 + 2
            hn, wn = max(1, int(h / (r**i))), max(1, int(w / (r**i)))
            coarse = torch.randn((1, c, hn, wn), generator=g, dtype=noise.dtype).to(noise.device)
            row = row + F.interpolate(coarse, size=(h, w), mode="bilinear") * discount**i
            if hn == 1 or wn == 1:
                break
        rows.append(row / row.std())
    return torch.cat(rows)                                                       # (B, C, H, W)


def input_perturbation(noise: Tensor, gamma: float, generators: Sequence[torch.Generator],
                       random_strength: bool = False) -> Tensor:
    """``eps + s * n`` with n ~ N(0, I) per image, s = gamma or (``random_strength``) ``u * gamma``, u ~ U[0, 1)
    drawn first from the image's generator: the noise x_t is made from; the target keeps eps."""
    rows = []
    for row, g in zip(noise, generators):
        strength = float(torch.rand((1,), generator=g)) * gamma if random_strength else gamma
        rows.append(row[None] + strength * torch.randn((1, *row.shape), generator=g, dtype=noise.dtype).to(noise.device))
    return torch.cat(rows)


def debiased_weights(t: Tensor, alphas_cumprod: Tensor, prediction: Prediction) -> Tensor:
    """Per-sample weights (B,) of debiased estimation: 1 / sqrt(SNR_t) (eps), 1 / (SNR_t + 1) (v), SNR_t capped
    at `DEBIASED_SNR_CAP`."""
    s = snr(t, alphas_cumprod).clamp(max=DEBIASED_SNR_CAP)  # (B,)
    if prediction is Prediction.EPS:
        return 1 / s.sqrt()
    if prediction is Prediction.V:
        return 1 / (s + 1)
    raise ValueError(f"debiased estimation is defined for eps and v prediction, not {prediction.value}")


def huber_thresholds(t: Tensor, schedule: str, c: float, num_timesteps: int,
                     alphas_cumprod: Tensor | None = None) -> Tensor:
    """The pseudo-Huber constant of each sample (B,) float32 for the ``schedule`` (module docstring)."""
    if schedule == "constant":
        return torch.full(t.shape, c, dtype=torch.float32, device=t.device)
    if schedule == "exponential":
        alpha = -math.log(c) / num_timesteps
        return torch.exp(-alpha * t.to(torch.float32))
    if schedule == "snr":
        if alphas_cumprod is None:
            raise ValueError("the snr Huber schedule needs a discrete noise schedule")
        ac = alphas_cumprod.to(t.device)[t].to(torch.float32)  # (B,)
        sigmas = ((1.0 - ac) / ac) ** 0.5
        return (1 - c) / (1 + sigmas) ** 2 + c
    raise ValueError(f"unknown Huber schedule {schedule!r} (one of {', '.join(HUBER_SCHEDULES)})")


def elementwise_loss(pred: Tensor, target: Tensor, loss_type: str, huber_c: Tensor | None = None) -> Tensor:
    """The loss of every element (B, ...) of ``loss_type`` (module docstring); ``huber_c`` (B,) for the
    pseudo-Huber types."""
    if loss_type == "l2":
        return (pred - target).pow(2)
    if loss_type == "l1":
        return (pred - target).abs()
    if loss_type in ("huber", "smooth_l1"):
        c = huber_c.reshape(-1, *([1] * (pred.ndim - 1))).to(pred.dtype)
        distance = ((pred - target) ** 2 + c**2).sqrt() - c
        return 2 * c * distance if loss_type == "huber" else 2 * distance
    raise ValueError(f"unknown loss type {loss_type!r} (one of {', '.join(LOSS_TYPES)})")
