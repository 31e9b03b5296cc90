"""The boundary between networks and diffusion math: ``denoise(x, sigma, **cond) -> x0``.

A sampler sees only a ``DenoiseFn``: it passes the noisy sample in VE scaling (``x = x0 + sigma*eps``)
and a per-image sigma, and gets back the denoised estimate of x0. ``Denoiser`` turns any discrete-time
network ``net(x_in, t, **cond) -> output`` into such a function with the preconditioning of Karras et
al. 2022 (k-diffusion ``DiscreteEpsDDPMDenoiser`` / ``VDenoiser``, sigma_data = 1):

    x_in = c_in * x,  c_in = 1 / sqrt(sigma^2 + 1)   (the VP sample the net was trained on)
    t    = schedule.sigma_to_t(sigma)
    x0   = c_skip * x + c_out * net(x_in, t)

    prediction   c_skip             c_out
    eps          1                  -sigma
    v            1 / (sigma^2 + 1)  -sigma / sqrt(sigma^2 + 1)
    x0           0                  1
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Any, Protocol

import torch
from torch import Tensor

from sdlab.diffusion.schedules import NoiseSchedule

__all__ = ["DenoiseFn", "Denoiser", "Prediction", "prediction_scalings"]


class DenoiseFn(Protocol):
    """What samplers consume: ``(x (B,C,h,w), sigma (B,)) -> denoised x0 (B,C,h,w)``."""

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor: ...


class Prediction(str, Enum):
    """What the network outputs."""

    EPS = "eps"
    V = "v"
    X0 = "x0"

    @classmethod
    def parse(cls, name: str | Prediction) -> Prediction:
        """Accept sdlab names and diffusers' ``prediction_type`` names ("epsilon", "v_prediction", "sample")."""
        if isinstance(name, Prediction):
            return name
        key = str(name).strip().lower()
        found = _PREDICTION_ALIASES.get(key)
        if found is None:
            valid = ", ".join(sorted(_PREDICTION_ALIASES))
            raise ValueError(f"unknown prediction type {name!r}; expected one of {valid}")
        return found


_PREDICTION_ALIASES = {
    "eps": Prediction.EPS,
    "epsilon": Prediction.EPS,
    "v": Prediction.V,
    "v_prediction": Prediction.V,
    "x0": Prediction.X0,
    "sample": Prediction.X0,
}


def prediction_scalings(prediction: Prediction, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in) for VE-scaled x with sigma_data = 1; same shape and dtype as sigma."""
    c_in = (sigma**2 + 1) ** -0.5
    if prediction is Prediction.EPS:
        return torch.ones_like(sigma), -sigma, c_in
    if prediction is Prediction.V:
        return 1 / (sigma**2 + 1), -sigma * c_in, c_in
    if prediction is Prediction.X0:
        return torch.zeros_like(sigma), torch.ones_like(sigma), c_in
    raise ValueError(f"unhandled prediction {prediction!r}")


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
    """Wrap ``net(x_in, t, **cond) -> output`` as a ``DenoiseFn`` for a discrete schedule.

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
        schedule: NoiseSchedule,
        prediction: Prediction | str,
        *,
        dtype: torch.dtype | None = None,
        quantize: bool = False,
    ) -> None:
        self.net = net
        self.schedule = schedule
        self.prediction = Prediction.parse(prediction)
        self.dtype = dtype
        self.quantize = quantize

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        return self.schedule.sigma_to_t(sigma, quantize=self.quantize)

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
        c_skip, c_out, c_in = (c.view(-1, *([1] * (x.ndim - 1))) for c in prediction_scalings(self.prediction, sigma_b))
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
