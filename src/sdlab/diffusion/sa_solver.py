"""SA-Solver's step weights (Xue et al. 2023, arXiv 2309.05019; ComfyUI's ``comfy/k_diffusion/sa_solver.py``).

SA-Solver integrates the SDE of data prediction in lambda = -log sigma (variance-exploding, alpha = 1), whose
noise strength tau makes the step from lambda_s to lambda_t

    x_t = (sigma_t / sigma_s) e^(-tau^2 h) x_s + sum_j b_j D_j (+ sigma_t sqrt(1 - e^(-2 tau^2 h)) noise),

h = lambda_t - lambda_s, with D_j the denoised estimates at the points lambda_j and b_j the integral of
``(1 + tau^2) e^((1 + tau^2)(lambda - lambda_t))`` times their Lagrange basis polynomial over [lambda_s, lambda_t].
Those integrals come from the moments ``I_p`` (the same integral of lambda^p), solved against the Vandermonde
matrix of the points. tau is 0 (the ODE) outside an interval of sigmas and ``eta`` inside it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["adams_weights", "tau_interval"]


def _moments(lambda_s: float, lambda_t: float, count: int, tau: float) -> Tensor:
    """``I_p = integral over [lambda_s, lambda_t] of c e^(c (x - lambda_t)) x^p dx``, c = 1 + tau^2, p < count
    (float64): by parts, ``I_p = lambda_t^p - lambda_s^p e^(-c h) - (p / c) I_(p-1)``."""
    c = 1.0 + tau**2
    decay = math.exp(-c * (lambda_t - lambda_s))
    moments: list[float] = []
    for p in range(count):
        boundary = lambda_t**p - lambda_s**p * decay
        moments.append(boundary - (p / c) * moments[-1] if p else boundary)
    return torch.tensor(moments, dtype=torch.float64)


def adams_weights(points: Sequence[float], lambda_s: float, lambda_t: float, tau: float) -> list[float]:
    """The weights b_j of the denoised estimates at ``points`` (oldest first) for the step lambda_s -> lambda_t
    (module docstring): ``V^T b = I`` with V the Vandermonde matrix of the points."""
    nodes = torch.tensor(list(points), dtype=torch.float64)                  # (K,)
    vandermonde_t = torch.vander(nodes, len(points), increasing=True).T      # (K, K): row p holds nodes^p
    return torch.linalg.solve(vandermonde_t, _moments(lambda_s, lambda_t, len(points), tau)).tolist()


def tau_interval(start_sigma: float, end_sigma: float, eta: float) -> Callable[[float], float]:
    """SA-Solver's noise strength at a sigma: ``eta`` for ``start_sigma >= sigma >= end_sigma``, else 0 (ComfyUI's
    ``get_tau_interval_func``)."""
    return lambda sigma: eta if eta > 0 and start_sigma >= sigma >= end_sigma else 0.0
