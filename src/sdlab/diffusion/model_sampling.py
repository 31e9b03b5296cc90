"""Model sampling: how a network's inputs and outputs relate to the sampler's noisy sample and noise level.

Every sampler works on a sample ``x`` at a noise level ``sigma`` and asks a denoiser for x0. What ``x`` is,
what the network is fed and what it returns depend on how the model was trained; a ``ModelSampling``
object holds exactly that (ComfyUI's ``model_sampling``: EPS / V_PREDICTION / CONST with a discrete or a
flow time map), so the samplers and the generate loop stay the same for every kind of model:

- ``scalings(sigma) -> (c_skip, c_out, c_in)``: the denoiser feeds the net ``c_in * x`` and returns
  ``x0 = c_skip * x + c_out * net(...)`` (ComfyUI's ``calculate_input`` / ``calculate_denoised``);
- ``sigma_to_t`` / ``t_to_sigma``: the time input the net was trained on;
- ``schedule``: the model's training noise levels as a ``NoiseSchedule``, what the named discretizations
  (karras, simple, normal, ...) of ``sdlab.diffusion.discretization`` read;
- ``noise_scaling(sigma, noise, latent)``: the forward process that starts a run (pure noise, or an image
  latent noised to ``sigma`` for img2img) and re-noises the known region while inpainting;
  ``inverse_noise_scaling(sigma, x)``: the latent a run ending at ``sigma`` stands for;
- ``sample_timesteps`` / ``q_sample`` / ``training_target`` / ``loss_weights``: the same forward process
  as training sees it, so a fine-tune and the sampler agree by construction.

``DiscreteModelSampling(schedule, prediction)``: discrete DDPM models (SD1, SD2, SDXL), variance-exploding
``x = x0 + sigma * eps`` with ``sigma_t = sqrt((1 - ac_t) / ac_t)`` and the eps / v / x0 scalings of
Karras et al. 2022 (the table in ``sdlab.diffusion.prediction``).

``FlowMatchingModelSampling(shift, multiplier)``: rectified flow (SD3, Flux), ``x = (1 - s) x0 + s e`` for
s in [0, 1]; the net predicts the velocity ``v = e - x0`` from ``(x, t = s * multiplier)``, so
``c_skip = 1, c_out = -s, c_in = 1`` and the VE samplers' ``(x - x0) / s`` is exactly that velocity: Euler
on this ``x`` is the flow's Euler step. The time shift ``s' = shift * s / (1 + (shift - 1) * s)`` (SD3's
``shift=3``; Flux's resolution-dependent ``exp(mu)`` is the same map with ``shift = exp(mu)``) moves the
sampling steps to higher noise.

``ContinuousEDMModelSampling(prediction, sigma_min, sigma_max, sigma_data)``: continuous-time models trained
with the EDM preconditioning of Karras et al. 2022 (Playground v2.5, CosXL; ComfyUI's
``ModelSamplingContinuousEDM`` with its ``EDM`` / ``V_PREDICTION`` classes, diffusers' ``EDMEulerScheduler`` /
``EDMDPMSolverMultistepScheduler``), variance-exploding ``x = x0 + sigma * eps`` for any sigma in
[sigma_min, sigma_max], net time input ``c_noise = ln(sigma) / 4``::

    prediction                c_skip                c_out                       c_in
    eps (EDM's F-prediction)  sd^2 / (s^2 + sd^2)   s * sd / sqrt(s^2 + sd^2)   1 / sqrt(s^2 + sd^2)
    v                         sd^2 / (s^2 + sd^2)   -s * sd / sqrt(s^2 + sd^2)  1 / sqrt(s^2 + sd^2)
    x0                        0                     1                           1 / sqrt(s^2 + sd^2)

``eps`` here is what diffusers' EDM schedulers call ``prediction_type: "epsilon"`` and ComfyUI ``EDM``
(Playground v2.5, sigma_data 0.5); ``v`` is CosXL's EDM v-prediction (sigma_data 1, ComfyUI
``V_PREDICTION_EDM``). Its ``schedule`` is ComfyUI's table of 1000 log-spaced sigmas from sigma_min to
sigma_max, so karras / exponential span exactly [sigma_min, sigma_max] and the index-based schedules space
steps in log sigma.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cached_property
from typing import Protocol

import torch
from torch import Tensor

from sdlab.diffusion import loss
from sdlab.diffusion.discretization import initial_noise_sigma
from sdlab.diffusion.prediction import Prediction, prediction_scalings
from sdlab.diffusion.schedules import NoiseSchedule

__all__ = [
    "ContinuousEDMModelSampling",
    "DiscreteModelSampling",
    "FlowMatchingModelSampling",
    "ModelSampling",
    "Prediction",
    "prediction_scalings",
    "time_shift",
]


def _per_image(sigma: Tensor | float, like: Tensor) -> Tensor:
    """sigma in ``like``'s dtype and device: a 0-dim tensor as is, a (B,) one as (B, 1, ..., 1)."""
    s = torch.as_tensor(sigma, device=like.device, dtype=like.dtype)
    return s if s.ndim == 0 else s.reshape(-1, *([1] * (like.ndim - 1)))


def _ve_noise_scaling(sigma: Tensor | float, noise: Tensor, latent: Tensor | None, init_noise: str,
                      sigma_max: float) -> Tensor:
    """A variance-exploding model's x at ``sigma``: ``latent + sigma * noise``; pure noise is scaled by
    ``initial_noise_sigma(sigma, init_noise)`` (``"sigma_max"``: sigma; ``"vp"``: sqrt(sigma^2 + 1), unit noise in
    VP scaling). ComfyUI's rule (``"comfyui"``: sqrt(sigma^2 + 1) at the model's ``sigma_max``) scales the noise
    with a latent too, as its ``EPS.noise_scaling(sigma, noise, latent_image, max_denoise)`` does."""
    if latent is not None and init_noise != "comfyui":
        return latent + noise * _per_image(sigma, noise)
    start = noise * initial_noise_sigma(torch.as_tensor(sigma).reshape(1), init_noise, sigma_max)
    return start if latent is None else latent + start


class ModelSampling(Protocol):
    """The noise parameterisation of one model (module docstring)."""

    sigma_min: float
    sigma_max: float
    num_timesteps: int
    schedule: NoiseSchedule     # the training noise levels, for the discretizations

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in), each shaped and typed like ``sigma``."""
        ...

    def sigma_to_t(self, sigma: Tensor | float, quantize: bool = False) -> Tensor: ...

    def t_to_sigma(self, t: Tensor | float) -> Tensor: ...

    def noise_scaling(
        self, sigma: Tensor | float, noise: Tensor, latent: Tensor | None = None, *, init_noise: str = "sigma_max"
    ) -> Tensor:
        """The sampler's x at ``sigma``: ``latent`` (None: pure noise) noised with the unit ``noise``."""
        ...

    def inverse_noise_scaling(self, sigma: Tensor | float, x: Tensor) -> Tensor: ...

    def sample_timesteps(self, generators: Sequence[torch.Generator], *, device=None) -> Tensor: ...

    def q_sample(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor: ...

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor: ...

    def loss_weights(self, t: Tensor, min_snr_gamma: float | None) -> Tensor | None: ...


class DiscreteModelSampling:
    """eps / v / x0 prediction on a discrete DDPM schedule (module docstring), VE scaling.

    The net sees the VP sample ``x / sqrt(sigma^2 + 1)`` and the fractional timestep ``schedule.sigma_to_t``.
    In training, ``t`` is an integer timestep and ``q_sample`` gives the VP sample (``loss.q_sample``).
    """

    def __init__(self, schedule: NoiseSchedule, prediction: Prediction | str) -> None:
        self.schedule = schedule
        self.prediction = Prediction.parse(prediction)

    def __repr__(self) -> str:
        return f"DiscreteModelSampling({self.prediction.value}, T={self.num_timesteps})"

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return prediction_scalings(self.prediction, sigma)

    def sigma_to_t(self, sigma: Tensor | float, quantize: bool = False) -> Tensor:
        return self.schedule.sigma_to_t(sigma, quantize=quantize)

    def t_to_sigma(self, t: Tensor | float) -> Tensor:
        return self.schedule.t_to_sigma(t)

    def noise_scaling(
        self, sigma: Tensor | float, noise: Tensor, latent: Tensor | None = None, *, init_noise: str = "sigma_max"
    ) -> Tensor:
        """``latent + sigma * noise`` (`_ve_noise_scaling`)."""
        return _ve_noise_scaling(sigma, noise, latent, init_noise, self.sigma_max)

    def inverse_noise_scaling(self, sigma: Tensor | float, x: Tensor) -> Tensor:
        """The VP latent of x: ``x / sqrt(1 + sigma^2)``, identity at sigma 0 (DDIM / PLMS end above 0)."""
        s = float(sigma)
        return x if s == 0.0 else x / math.sqrt(1.0 + s * s)

    # -- training -------------------------------------------------------------------------------------
    def sample_timesteps(self, generators: Sequence[torch.Generator], *, device=None) -> Tensor:
        """One integer timestep per image, uniform on [0, T): (B,) int64."""
        return loss.sample_timesteps(generators, self.num_timesteps, device=device)

    def q_sample(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The VP sample ``sqrt(ac_t) x0 + sqrt(1 - ac_t) noise`` the net is trained on."""
        return loss.q_sample(x0, t, noise, self.schedule.alphas_cumprod)

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return loss.prediction_target(self.prediction, x0, noise, t, self.schedule.alphas_cumprod)

    def loss_weights(self, t: Tensor, min_snr_gamma: float | None) -> Tensor | None:
        """Min-SNR-gamma weights (B,), or None (uniform) without a gamma."""
        if min_snr_gamma is None:
            return None
        return loss.min_snr_weights(t, self.schedule.alphas_cumprod, min_snr_gamma, self.prediction)


def time_shift(shift: float, s: Tensor) -> Tensor:
    """SD3's time shift ``shift * s / (1 + (shift - 1) * s)``: 0 -> 0, 1 -> 1, more time at high noise."""
    if shift == 1.0:
        return s
    return shift * s / (1 + (shift - 1) * s)


class FlowMatchingModelSampling:
    """Rectified-flow models (module docstring): ``x = (1 - s) x0 + s e``, the net predicts ``e - x0``
    from ``(x, s * multiplier)``. ``shift`` is SD3's time shift (3.0 for SD3; 1.0: none)."""

    def __init__(self, shift: float = 1.0, multiplier: float = 1000.0) -> None:
        if not (math.isfinite(shift) and shift > 0):
            raise ValueError(f"shift must be a positive number, got {shift!r}")
        self.shift = float(shift)
        self.multiplier = float(multiplier)

    def __repr__(self) -> str:
        return f"FlowMatchingModelSampling(shift={self.shift:g}, multiplier={self.multiplier:g})"

    @property
    def num_timesteps(self) -> int:
        return int(self.multiplier)

    @cached_property
    def schedule(self) -> NoiseSchedule:
        """The shifted training levels ``s_i = time_shift(i / T)``, i = 1..T (ComfyUI's flow sigma table), as
        a ``NoiseSchedule`` with ``ac_i = 1 / (1 + s_i^2)`` (so its ``sigmas`` are the s_i): the named
        discretizations then space a flow model's steps as ComfyUI's schedulers do (karras, exponential and
        simple exactly; normal / sgm_uniform interpolate the table by index). Its ``sigma_to_t`` is the
        table index; the net's time input is ``self.sigma_to_t``."""
        T = self.num_timesteps
        s = time_shift(self.shift, torch.arange(1, T + 1, dtype=torch.float64) / T)  # (T,) ascending, s_T = 1
        return NoiseSchedule(1.0 / (1.0 + s**2))

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return 1.0

    def sigmas(self, steps: int) -> Tensor:
        """``steps + 1`` descending sigmas: ``linspace(1, 0)`` through the time shift (float64)."""
        return time_shift(self.shift, torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64))

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        ones = torch.ones_like(sigma)
        return ones, -sigma, ones

    def sigma_to_t(self, sigma: Tensor | float, quantize: bool = False) -> Tensor:
        s = torch.as_tensor(sigma)
        s = s if torch.is_floating_point(s) else s.to(torch.float32)
        t = s * self.multiplier
        return t.round() if quantize else t

    def t_to_sigma(self, t: Tensor | float) -> Tensor:
        t_t = torch.as_tensor(t)
        return (t_t if torch.is_floating_point(t_t) else t_t.to(torch.float32)) / self.multiplier

    def noise_scaling(
        self, sigma: Tensor | float, noise: Tensor, latent: Tensor | None = None, *, init_noise: str = "sigma_max"
    ) -> Tensor:
        """``(1 - s) latent + s noise``; pure noise is ``s noise`` (the VP / VE conventions do not apply)."""
        s = _per_image(sigma, noise)
        if latent is None:
            return noise * s
        return (1 - s) * latent + s * noise

    def inverse_noise_scaling(self, sigma: Tensor | float, x: Tensor) -> Tensor:
        return x / (1.0 - float(sigma))

    # -- training -------------------------------------------------------------------------------------
    def sample_timesteps(self, generators: Sequence[torch.Generator], *, device=None) -> Tensor:
        """One time input ``shift(u) * multiplier`` per image, u uniform on [0, 1): (B,) float32."""
        u = torch.cat([torch.rand((1,), generator=g, dtype=torch.float64) for g in generators])  # (B,)
        return (time_shift(self.shift, u) * self.multiplier).to(device=device, dtype=torch.float32)

    def q_sample(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return self.noise_scaling(self.t_to_sigma(t), noise, x0)

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The velocity ``noise - x0``."""
        return noise - x0

    def loss_weights(self, t: Tensor, min_snr_gamma: float | None) -> Tensor | None:
        if min_snr_gamma is not None:
            raise ValueError("Min-SNR-gamma weighting is defined for discrete DDPM schedules, not for flow matching")
        return None


# EDM's training distribution of ln(sigma) (Karras et al. 2022, Table 1: P_mean, P_std)
EDM_LOG_SIGMA_MEAN = -1.2
EDM_LOG_SIGMA_STD = 1.2


class ContinuousEDMModelSampling:
    """Continuous EDM models (module docstring): VE ``x = x0 + sigma * eps``, the net sees
    ``x / sqrt(sigma^2 + sigma_data^2)`` and ``ln(sigma) / 4``; ``prediction`` eps is EDM's F-prediction."""

    num_timesteps = 1000            # length of the sigma table the named schedules read (ComfyUI's)

    def __init__(self, prediction: Prediction | str, sigma_min: float = 0.002, sigma_max: float = 120.0,
                 sigma_data: float = 1.0) -> None:
        for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("sigma_data", sigma_data)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not sigma_min < sigma_max:
            raise ValueError(f"sigma_min {sigma_min!r} must lie below sigma_max {sigma_max!r}")
        self.prediction = Prediction.parse(prediction)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.sigma_data = float(sigma_data)

    def __repr__(self) -> str:
        return (f"ContinuousEDMModelSampling({self.prediction.value}, sigma {self.sigma_min:g}..{self.sigma_max:g}, "
                f"sigma_data={self.sigma_data:g})")

    @cached_property
    def schedule(self) -> NoiseSchedule:
        """ComfyUI's table ``exp(linspace(ln sigma_min, ln sigma_max, 1000))`` as a ``NoiseSchedule`` (float64,
        ``ac = 1 / (1 + sigma^2)``, so its ``sigmas`` are the table)."""
        log_sigmas = torch.linspace(math.log(self.sigma_min), math.log(self.sigma_max), self.num_timesteps,
                                    dtype=torch.float64)
        return NoiseSchedule(1.0 / (1.0 + log_sigmas.exp() ** 2))

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        sd2 = self.sigma_data**2
        c_in = (sigma**2 + sd2) ** -0.5
        if self.prediction is Prediction.X0:
            return torch.zeros_like(sigma), torch.ones_like(sigma), c_in
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data * c_in
        return c_skip, (-c_out if self.prediction is Prediction.V else c_out), c_in

    def sigma_to_t(self, sigma: Tensor | float, quantize: bool = False) -> Tensor:
        """``c_noise = ln(sigma) / 4``; continuous, so ``quantize`` (a discrete-timestep rounding) does not apply."""
        s = torch.as_tensor(sigma)
        return 0.25 * (s if torch.is_floating_point(s) else s.to(torch.float32)).log()

    def t_to_sigma(self, t: Tensor | float) -> Tensor:
        t_t = torch.as_tensor(t)
        return (4.0 * (t_t if torch.is_floating_point(t_t) else t_t.to(torch.float32))).exp()

    def noise_scaling(
        self, sigma: Tensor | float, noise: Tensor, latent: Tensor | None = None, *, init_noise: str = "sigma_max"
    ) -> Tensor:
        """``latent + sigma * noise`` as on a discrete model (`_ve_noise_scaling`; ``"vp"`` is diffusers' EDM
        ``init_noise_sigma`` sqrt(sigma^2 + 1))."""
        return _ve_noise_scaling(sigma, noise, latent, init_noise, self.sigma_max)

    def inverse_noise_scaling(self, sigma: Tensor | float, x: Tensor) -> Tensor:
        """x itself: a run ending at sigma > 0 keeps that noise, as ComfyUI's and diffusers' EDM samplers do."""
        return x

    # -- training -------------------------------------------------------------------------------------
    def sample_timesteps(self, generators: Sequence[torch.Generator], *, device=None) -> Tensor:
        """One time input ``ln(sigma) / 4`` per image, ln(sigma) ~ N(-1.2, 1.2^2) (EDM's training
        distribution): (B,) float32."""
        n = torch.cat([torch.randn((1,), generator=g, dtype=torch.float64) for g in generators])  # (B,)
        return (0.25 * (EDM_LOG_SIGMA_MEAN + EDM_LOG_SIGMA_STD * n)).to(device=device, dtype=torch.float32)

    def _sigma(self, t: Tensor, like: Tensor) -> Tensor:
        return _per_image(self.t_to_sigma(t).to(like.device), like)

    def q_sample(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the net is fed: ``c_in * (x0 + sigma * noise)``."""
        sigma = self._sigma(t, x0)
        return (x0 + sigma * noise) * self.scalings(sigma)[2]

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The net output that gives x0 exactly: ``(x0 - c_skip * x) / c_out`` (EDM's effective target; with
        it a plain mean-squared error carries EDM's loss weighting)."""
        sigma = self._sigma(t, x0)
        c_skip, c_out, _ = self.scalings(sigma)
        return (x0 - c_skip * (x0 + sigma * noise)) / c_out

    def loss_weights(self, t: Tensor, min_snr_gamma: float | None) -> Tensor | None:
        if min_snr_gamma is not None:
            raise ValueError("Min-SNR-gamma weighting is defined for discrete DDPM schedules, not for continuous EDM")
        return None
