"""What a discrete-schedule network predicts (eps, v or x0), and the denoiser scalings of each.

With VE-scaled ``x = x0 + sigma * eps`` and sigma_data = 1 (Karras et al. 2022), the denoiser feeds the
net ``c_in * x`` and returns ``x0 = c_skip * x + c_out * net(...)``::

    prediction   c_skip             c_out                       c_in
    eps          1                  -sigma                      1 / sqrt(sigma^2 + 1)
    v            1 / (sigma^2 + 1)  -sigma / sqrt(sigma^2 + 1)  1 / sqrt(sigma^2 + 1)
    x0           0                  1                           1 / sqrt(sigma^2 + 1)
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor

__all__ = ["Prediction", "prediction_scalings"]


class Prediction(str, Enum):
    """What a discrete-schedule network outputs."""

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
