"""DEIS's time-quadratic Adams-Bashforth weights (Zhang & Chen 2023, "tAB-DEIS"), as ComfyUI computes them for its
``deis`` sampler (``comfy/k_diffusion/deis.py``, from zju-pi/diff-sampler).

DEIS integrates the probability-flow ODE ``dx/dsigma = d`` in the time ``tau`` of a variance-preserving process
fitted to EDM's range: ``sigma(tau)^2 = exp(beta_d tau^2 / 2 + beta_min tau) - 1`` with sigma(1e-3) = 0.002 and
sigma(1) = 80, whatever the model's own range. Over a step tau_i -> tau_i+1 the derivative is the Lagrange
polynomial through the last ``order`` derivatives, so the step is ``x' = x + sum_j C_j d_(i-j)`` with
``C_j = integral of dsigma/dtau * L_j(tau) dtau``, where ``dsigma/dtau = -(log alpha)' / (2 sqrt(alpha (1 -
alpha)))`` and ``alpha = 1 / (1 + sigma^2)``. The integral is ComfyUI's Riemann sum: 10,000 points of
``linspace(tau_i, tau_i+1)`` times ``(tau_i+1 - tau_i) / 10,000``, in float32 on the CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["deis_coefficients"]

EDM_SIGMA_MIN, EDM_SIGMA_MAX, EDM_EPSILON = 0.002, 80.0, 1e-3
QUADRATURE_POINTS = 10_000


def _vp_times(sigmas: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The VP time of each sigma and (beta_0, beta_1) of ``alpha(tau) = exp(-tau^2 (beta_1 - beta_0) / 2 -
    tau beta_0)`` (ComfyUI's ``edm2t``, float32)."""
    low, high = (torch.tensor(sigma) ** 2 + 1 for sigma in (EDM_SIGMA_MIN, EDM_SIGMA_MAX))
    beta_d = 2 * (low.log() / EDM_EPSILON - high.log()) / (EDM_EPSILON - 1)
    beta_min = high.log() - 0.5 * beta_d
    taus = ((beta_min**2 + 2 * beta_d * (sigmas**2 + 1).log()).sqrt() - beta_min) / beta_d
    return taus, beta_min, beta_d + beta_min


def _dsigma_dtau(taus: Tensor, beta_0: Tensor, beta_1: Tensor) -> Tensor:
    alpha = torch.exp(-0.5 * taus**2 * (beta_1 - beta_0) - taus * beta_0)
    d_log_alpha = -(taus * (beta_1 - beta_0) + beta_0)
    return -0.5 * d_log_alpha / torch.sqrt(alpha * (1 - alpha))


def _lagrange(nodes: Tensor, j: int, taus: Tensor) -> Tensor:
    """The Lagrange basis polynomial of ``nodes[j]`` at ``taus``."""
    poly: Tensor | float = 1.0
    for k in range(len(nodes)):
        if k != j:
            poly = poly * ((taus - nodes[k]) / (nodes[j] - nodes[k]))
    return poly  # type: ignore[return-value]


def deis_coefficients(sigmas: Tensor, max_order: int) -> list[tuple[float, ...]]:
    """``C_j`` (newest derivative first) of each step ``sigmas[i] -> sigmas[i + 1]`` at order
    ``min(i + 1, max_order)``; ``()`` for the steps that are Euler's: the first, and those to sigma 0."""
    levels = sigmas.detach().float().cpu()
    taus, beta_0, beta_1 = _vp_times(levels)
    coefficients: list[tuple[float, ...]] = []
    for i in range(len(levels) - 1):
        order = min(i + 1, max_order)
        if order == 1 or levels[i + 1] <= 0:
            coefficients.append(())
            continue
        points = torch.linspace(float(taus[i]), float(taus[i + 1]), QUADRATURE_POINTS)
        dtau = (taus[i + 1] - taus[i]) / QUADRATURE_POINTS
        integrand = _dsigma_dtau(points, beta_0, beta_1)
        nodes = taus[[i - k for k in range(order)]]
        coefficients.append(tuple(float(torch.sum(integrand * _lagrange(nodes, j, points)) * dtau)
                                  for j in range(order)))
    return coefficients
