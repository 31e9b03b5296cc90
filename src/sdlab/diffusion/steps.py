"""Pieces every sampler step shares (``sampling_k`` and ``sampling_ldm`` both import them).

- ``StepInfo`` / ``StepCallback`` / ``report_step``: what a sampler reports once per step;
- ``to_d``: the probability-flow ODE derivative in variance-exploding sigmas;
- ``ancestral_step``: the split of a step into a deterministic move and fresh noise (ancestral
  samplers, DDIM with eta > 0, DPM++ SDE);
- ``sigma_batch`` and ``require_noise``: one sigma per batch item, and the error a stochastic sampler
  raises without a noise source;
- ``predictions``: a step's guided and unguided prediction (D twice, or D and D_u for a CFG++ sampler);
- ``within_step`` / ``step_of_call``: a model call a step makes at the next step's sigma (Heun's corrector,
  PLMS's first improved-Euler call) says which step it belongs to, since its sigma cannot (ControlNet
  start / end count steps: ``pipeline.control.tag_steps``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor

from sdlab.diffusion.denoiser import DenoiseFn
from sdlab.diffusion.guidance import with_unguided
from sdlab.diffusion.noise import NoiseSource

__all__ = [
    "StepCallback", "StepInfo", "ancestral_step", "predictions", "report_step", "require_noise", "sigma_batch",
    "step_of_call", "to_d", "within_step",
]

_STEP_OF_CALL: ContextVar[int | None] = ContextVar("sdlab_step_of_call", default=None)


@dataclass(frozen=True)
class StepInfo:
    """What a sampler reports once per step (progress bars, previews).

    ``x`` is the latent the first model call of step ``i`` saw, at noise level ``sigma`` (for Euler/Heun/DPM2
    with churn this is the raised level ``sigma_hat``); ``denoised`` is the model's estimate of x0 there;
    the step ends at ``sigma_next``.
    """

    i: int
    x: Tensor
    sigma: float
    sigma_next: float
    denoised: Tensor


StepCallback = Callable[[StepInfo], None]


def report_step(
    callback: StepCallback | None, i: int, x: Tensor, sigma: float, sigma_next: float, denoised: Tensor
) -> None:
    """``callback(StepInfo)`` once per step, after the step's first model evaluation."""
    if callback is not None:
        callback(StepInfo(i=i, x=x, sigma=sigma, sigma_next=sigma_next, denoised=denoised))


def to_d(x: Tensor, sigma: float, denoised: Tensor) -> Tensor:
    """The probability-flow ODE derivative ``dx/dsigma = (x - D(x; sigma)) / sigma`` (Karras et al. 2022, eq. 4)."""
    return (x - denoised) / sigma  # (B, C, h, w)


def ancestral_step(sigma: Tensor, sigma_next: Tensor, eta: float = 1.0) -> tuple[float, float]:
    """Split the move from ``sigma`` to ``sigma_next`` into a deterministic move down to ``sigma_down`` and
    fresh noise of size ``sigma_up`` (``sigma_down**2 + sigma_up**2 == sigma_next**2``).

    ``eta = 1`` is ancestral (DDPM-like) sampling, ``eta = 0`` is the deterministic ODE step; ``sigma_up``
    is capped at ``sigma_next`` (eta > 1). This is also DDIM's noise (Song et al. 2020, eq. 16): its VP std
    ``eta sqrt((1-ac_next)/(1-ac) (1 - ac/ac_next))`` divided by ``sqrt(ac_next)`` is, in VE sigmas,
    ``eta * sigma_next * sqrt(sigma^2 - sigma_next^2) / sigma`` (k-diffusion's ``get_ancestral_step``).

    Computed on 0-dim tensors in the dtype the caller passes, in the references' order of operations:
    ``sigma_next**2 - sigma_up**2`` cancels badly in float32 (relative error ~1e-4 in ``sigma_down``
    when ``sigma_next << sigma``), and sdlab reproduces the references' rounding rather than a more
    accurate value, so that the same seed gives the same image. (The k-diffusion samplers pass the
    schedule's dtype; DDIM passes its float64 sigmas.)
    """
    if not eta:
        return float(sigma_next), 0.0
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return float(sigma_down), float(sigma_up)


def require_noise(noise: NoiseSource | None, sampler: str, why: str) -> NoiseSource:
    """``noise``, or a ValueError that says why ``sampler`` needs one."""
    if noise is None:
        raise ValueError(
            f"{sampler} is stochastic ({why}) and needs a noise source: pass noise=... "
            "(e.g. per-image seeded Gaussian noise, or a Brownian tree for the SDE samplers)"
        )
    return noise


def predictions(model: DenoiseFn, cfg_pp: bool) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``(x, sigma) -> (D, D_u)``: with ``cfg_pp`` the guided and the unguided prediction (``with_unguided``), else
    D twice (the call guides as it would for any sampler)."""
    if cfg_pp:
        return with_unguided(model)
    return lambda x, sigma: (denoised := model(x, sigma), denoised)


def sigma_batch(sigma: float, x: Tensor, like: Tensor) -> Tensor:
    """One noise level per batch item, in the dtype of the sigma schedule: (B,)."""
    return torch.full((x.shape[0],), sigma, dtype=like.dtype, device=x.device)


@contextmanager
def within_step(i: int) -> Iterator[None]:
    """Model calls made inside belong to step ``i`` whatever their sigma: wrap a step's call at the next
    step's sigma (it would otherwise read as the first call of step ``i + 1``)."""
    token = _STEP_OF_CALL.set(i)
    try:
        yield
    finally:
        _STEP_OF_CALL.reset(token)


def step_of_call() -> int | None:
    """The step a sampler declared for the model call being made (``within_step``), else None."""
    return _STEP_OF_CALL.get()
