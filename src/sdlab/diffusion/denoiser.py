"""The boundary between networks and diffusion math: ``denoise(x, sigma, **cond) -> x0``.

A sampler sees only a ``DenoiseFn``: it passes the noisy sample (VE scaling ``x = x0 + sigma*eps`` for
discrete models) and a per-image sigma, and gets back the denoised estimate of x0. ``Denoiser`` turns any
network ``net(x_in, t, **cond) -> output`` into such a function through the model's ``ModelSampling``
(``sdlab.diffusion.model_sampling``; for discrete models the preconditioning of Karras et al. 2022,
k-diffusion ``DiscreteEpsDDPMDenoiser`` / ``VDenoiser``):

    c_skip, c_out, c_in = sampling.scalings(sigma)
    x_in = c_in * x                  (discrete: the VP sample the net was trained on)
    t    = sampling.sigma_to_t(sigma)
    x0   = c_skip * x + c_out * net(x_in, t)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from sdlab.diffusion.model_sampling import ModelSampling
from sdlab.diffusion.prediction import Prediction, prediction_scalings

__all__ = ["DenoiseFn", "Denoiser", "Prediction", "prediction_scalings"]


class DenoiseFn(Protocol):
    """What samplers consume: ``(x (B,C,h,w), sigma (B,)) -> denoised x0 (B,C,h,w)``."""

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor: ...


def _as_batch_sigma(sigma: Tensor | float, batch: int, device: torch.device) -> Tensor:
    """Sigma as a float32 (B,) tensor on ``device``; a scalar is broadcast to the batch."""
    s = torch.as_tensor(sigma, device=device, dtype=torch.float32)
    if s.ndim == 0:
        return s.expand(batch)
    s = s.reshape(-1)
    if s.shape[0] != batch:
        raise ValueError(f"sigma has {s.shape[0]} entries for a batch of {batch}")
    return s


class Denoiser:
    """Wrap ``net(x_in, t, **cond) -> output`` as a ``DenoiseFn`` through the model's ``sampling``.

    ``net`` is any callable (a U-Net with ``(x, t, context, y)``, a test lambda); the denoiser never
    looks inside it. ``cond`` is forwarded by keyword, except ``concat`` (B, k, h, w): extra input
    channels (an inpainting model's mask and masked-image latent) appended to the scaled x along
    channels, unscaled, as diffusers' inpainting pipeline does.

    Precision: scalings and the skip connection are computed in float32; the net receives its inputs
    (x_in, ``concat`` and every floating tensor in ``cond``) in ``dtype`` (default: the dtype of the
    net's first parameter when it has parameters, else x's dtype) and t as float32. The returned x0
    has x's dtype.
    """

    def __init__(
        self,
        net: Callable[..., Tensor],
        sampling: ModelSampling,
        *,
        dtype: torch.dtype | None = None,
        quantize: bool = False,
    ) -> None:
        """``quantize``: round the net's time input to a training timestep (diffusers' DPM-Solver)."""
        self.net = net
        self.sampling = sampling
        self.dtype = dtype
        self.quantize = quantize

    @property
    def sigma_min(self) -> float:
        return self.sampling.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.sampling.sigma_max

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        return self.sampling.sigma_to_t(sigma, quantize=self.quantize)

    def _net_dtype(self, x: Tensor) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        parameters = getattr(self.net, "parameters", None)
        if callable(parameters):
            first = next(iter(parameters()), None)
            if first is not None and torch.is_floating_point(first):
                return first.dtype
        return x.dtype

    def __call__(self, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
        net_dtype = self._net_dtype(x)
        sigma_b = _as_batch_sigma(sigma, x.shape[0], x.device)  # (B,)
        c_skip, c_out, c_in = (c.view(-1, *([1] * (x.ndim - 1))) for c in self.sampling.scalings(sigma_b))
        t = self.sigma_to_t(sigma_b).to(torch.float32)  # (B,)

        x32 = x.to(torch.float32)
        x_in = (x32 * c_in).to(net_dtype)  # (B, C, h, w)
        concat = cond.pop("concat", None)
        if concat is not None:
            x_in = torch.cat([x_in, concat.to(device=x.device, dtype=net_dtype)], dim=1)  # (B, C+k, h, w)
        cond = {
            key: value.to(net_dtype) if isinstance(value, Tensor) and torch.is_floating_point(value) else value
            for key, value in cond.items()
        }

        out = self.net(x_in, t, **cond)  # (B, C, h, w)
        return (c_skip * x32 + c_out * out.to(torch.float32)).to(x.dtype)
