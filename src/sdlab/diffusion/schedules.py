"""Training noise schedules: betas -> alphas_cumprod -> sigmas, and the sigma <-> timestep map.

A discrete DDPM model is trained on ``T`` noise levels. In the variance-preserving (VP) form of the
forward process, ``x_t = sqrt(ac_t) * x0 + sqrt(1 - ac_t) * eps`` with ``ac = alphas_cumprod``.
Dividing by ``sqrt(ac_t)`` gives the variance-exploding (VE) form that every sdlab sampler uses
(Karras et al. 2022, k-diffusion):

    x = x0 + sigma * eps,        sigma_t = sqrt((1 - ac_t) / ac_t).

``NoiseSchedule`` holds ``alphas_cumprod`` and maps a continuous sigma to the fractional timestep the
network was trained on (``sigma_to_t``) and back (``t_to_sigma``), both by piecewise-linear
interpolation in log sigma (k-diffusion ``DiscreteSchedule``, diffusers ``_sigma_to_t``).

Precision: the original CompVis code, k-diffusion on CompVis models and ComfyUI compute betas and
``alphas_cumprod`` in float64; diffusers computes them in float32, which moves the smallest sigmas by
~1e-5 relative. ``make_betas(..., dtype=torch.float32)`` reproduces diffusers' arithmetic exactly; the
default is float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

__all__ = [
    "BETA_SCHEDULES",
    "A1111_ZERO_SNR_TERMINAL_ALPHAS_CUMPROD",
    "ZERO_SNR_TERMINAL_ALPHAS_CUMPROD",
    "NoiseSchedule",
    "a1111_schedule_override",
    "make_betas",
    "rescale_zero_terminal_snr",
    "rescale_zero_terminal_snr_abar",
]

BETA_SCHEDULES = ("scaled_linear", "linear", "cosine")

# Zero terminal SNR makes alphas_cumprod[-1] == 0, i.e. sigma_max == inf. Like diffusers'
# EulerDiscreteScheduler(rescale_betas_zero_snr=True) we replace it with 2**-24 (the smallest positive
# fp16 subnormal), which gives sigma_max = sqrt(2**24 - 1) ~= 4096.
ZERO_SNR_TERMINAL_ALPHAS_CUMPROD = 2.0**-24
# A1111 (``rescale_zero_terminal_snr_abar``) and ComfyUI (``rescale_zero_terminal_snr_sigmas``, the ``ztsnr``
# marker of single files) use this value instead: sigma_max = sqrt(1 / 4.897e-08 - 1) ~= 4519.
A1111_ZERO_SNR_TERMINAL_ALPHAS_CUMPROD = 4.8973451890853435e-08

# The cosine schedule caps betas below 1 so the last step stays invertible (Nichol & Dhariwal 2021).
_COSINE_MAX_BETA = 0.999
_COSINE_OFFSET = 0.008


def _cosine_alpha_bar(t: float) -> float:
    """alpha_bar(t) = cos^2((t + s) / (1 + s) * pi / 2), s = 0.008 (Improved DDPM eq. 17)."""
    return math.cos((t + _COSINE_OFFSET) / (1 + _COSINE_OFFSET) * math.pi / 2) ** 2


def make_betas(
    kind: str,
    n: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    *,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Return the ``(n,)`` betas of a named training schedule.

    - ``scaled_linear``: SD's "linear" schedule, linear in sqrt(beta) then squared (CompVis
      ``make_beta_schedule('linear')``, diffusers ``scaled_linear``).
    - ``linear``: plain linear betas (DDPM, Ho et al. 2020).
    - ``cosine``: ``1 - alpha_bar((i+1)/n) / alpha_bar(i/n)`` capped at 0.999 (diffusers
      ``squaredcos_cap_v2``); ``beta_start``/``beta_end`` are ignored.

    ``dtype=torch.float32`` reproduces diffusers' float32 arithmetic bit for bit.
    """
    if n < 1:
        raise ValueError(f"a schedule needs at least one timestep, got n={n}")
    key = kind.lower()
    if key == "squaredcos_cap_v2":
        key = "cosine"
    if key == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=dtype) ** 2
    if key == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=dtype)
    if key == "cosine":
        betas = [
            min(1.0 - _cosine_alpha_bar((i + 1) / n) / _cosine_alpha_bar(i / n), _COSINE_MAX_BETA)
            for i in range(n)
        ]
        return torch.tensor(betas, dtype=dtype)
    raise ValueError(f"unknown beta schedule {kind!r}; expected one of {', '.join(BETA_SCHEDULES)}")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale betas so the last timestep has zero SNR (Lin et al. 2023, Algorithm 1).

    sqrt(alphas_cumprod) is shifted so its last entry is 0 and scaled so its first entry is unchanged;
    the result is converted back to betas (so ``betas[-1] == 1``). Feed it to
    ``NoiseSchedule.from_betas``, which handles the resulting infinite sigma_max.
    """
    sqrt_ac = torch.cumprod(1.0 - betas, dim=0).sqrt()  # (T,)
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * (first / (first - last))
    ac = sqrt_ac**2
    alphas = torch.cat([ac[:1], ac[1:] / ac[:-1]])
    return 1.0 - alphas


def rescale_zero_terminal_snr_abar(alphas_cumprod: Tensor) -> Tensor:
    """A1111's zero terminal SNR (``modules/sd_models.py``, ``rescale_zero_terminal_snr_abar``): Lin et al.'s
    shift and scale of sqrt(alphas_cumprod) done on alphas_cumprod itself, in its dtype, the last entry then set
    to ``A1111_ZERO_SNR_TERMINAL_ALPHAS_CUMPROD``. (T,) -> (T,)."""
    sqrt_ac = alphas_cumprod.sqrt()                                            # (T,)
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * (first / (first - last))
    ac = sqrt_ac**2
    ac[-1] = A1111_ZERO_SNR_TERMINAL_ALPHAS_CUMPROD
    return ac


def a1111_schedule_override(schedule: NoiseSchedule, *, downcast: bool = False,
                            zero_terminal_snr: bool = False) -> NoiseSchedule:
    """The schedule A1111's k-diffusion samplers see under its ``use_downcasted_alpha_bar`` and
    ``sd_noise_schedule = "Zero Terminal SNR"`` options (``sd_models.apply_alpha_schedule_override``, then
    k-diffusion's ``CompVisDenoiser`` / ``DiscreteSchedule`` on the model's ``alphas_cumprod``): the float32
    alphas_cumprod, in float16 with ``downcast`` (A1111 before 1.7.0-225 always), rescaled by
    ``rescale_zero_terminal_snr_abar``; its sigma and log-sigma tables are computed in that dtype, as A1111's are.
    Both at once overflow float16 (A1111's sigmas become inf): a ValueError."""
    if downcast and zero_terminal_snr:
        raise ValueError("zero terminal SNR on downcast (float16) alphas_cumprod gives infinite sigmas (A1111 draws "
                         "NaN there); use one of the two")
    ac = schedule.alphas_cumprod.to(torch.float32)                             # (T,) A1111's alphas_cumprod
    if downcast:
        ac = ac.half()
    if zero_terminal_snr:
        ac = rescale_zero_terminal_snr_abar(ac)
    return NoiseSchedule(ac.to(torch.float64), table_dtype=ac.dtype)


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A discrete training schedule, stored as ``alphas_cumprod`` (T,), increasing noise with t.

    ``alphas_cumprod`` must lie strictly in (0, 1) and be non-increasing, so every sigma is finite and
    positive. ``sigmas`` ascend with t: for SD, ``sigmas[0] ~= 0.0292`` and ``sigmas[-1] ~= 14.6146``.
    All derived tensors keep the dtype of ``alphas_cumprod``; ``table_dtype`` is the one the sigma and log-sigma
    tables are computed in where that is another (A1111's float16 / float32: ``a1111_schedule_override``).
    """

    alphas_cumprod: Tensor  # (T,)
    table_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        ac = self.alphas_cumprod
        if ac.ndim != 1 or ac.numel() < 2:
            raise ValueError(f"alphas_cumprod must be 1-D with at least 2 entries, got shape {tuple(ac.shape)}")
        if not torch.is_floating_point(ac):
            raise ValueError(f"alphas_cumprod must be floating point, got {ac.dtype}")
        if bool((ac <= 0).any()) or bool((ac >= 1).any()):
            raise ValueError(
                "alphas_cumprod must lie in (0, 1) so every sigma is finite and positive; for zero "
                "terminal SNR build the schedule with NoiseSchedule.from_betas(rescale_zero_terminal_snr(betas))"
            )
        if bool((ac[1:] > ac[:-1]).any()):
            raise ValueError("alphas_cumprod must be non-increasing (noise grows with t)")

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def from_betas(cls, betas: Tensor, *, terminal: float = ZERO_SNR_TERMINAL_ALPHAS_CUMPROD) -> NoiseSchedule:
        """Build from betas; ``alphas_cumprod = cumprod(1 - betas)`` in the dtype of ``betas``.

        A zero terminal alphas_cumprod (from ``rescale_zero_terminal_snr``) makes sigma_max infinite; it is
        replaced by ``terminal``: ``ZERO_SNR_TERMINAL_ALPHAS_CUMPROD`` (2**-24, sigma_max ~= 4096) as
        diffusers' Euler-family schedulers do, or ``A1111_ZERO_SNR_TERMINAL_ALPHAS_CUMPROD`` (sigma_max ~=
        4519) as A1111 and ComfyUI do. Every sampler then starts from a finite sigma_max.
        """
        if not 0.0 < terminal < 1.0:
            raise ValueError(f"the zero-SNR terminal alphas_cumprod must lie in (0, 1), got {terminal!r}")
        ac = torch.cumprod(1.0 - betas, dim=0)  # (T,)
        if float(ac[-1]) <= 0.0:
            ac = ac.clone()
            ac[-1] = terminal
        return cls(ac)

    @classmethod
    def make(
        cls,
        kind: str = "scaled_linear",
        n: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        *,
        zero_terminal_snr: bool = False,
        terminal: float = ZERO_SNR_TERMINAL_ALPHAS_CUMPROD,
        dtype: torch.dtype = torch.float64,
    ) -> NoiseSchedule:
        """Build from a named beta schedule (see ``make_betas``), optionally rescaled to zero terminal SNR
        (whose last alphas_cumprod becomes ``terminal``, see ``from_betas``)."""
        betas = make_betas(kind, n, beta_start, beta_end, dtype=dtype)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls.from_betas(betas, terminal=terminal)

    @classmethod
    def sd(cls, *, zero_terminal_snr: bool = False, dtype: torch.dtype = torch.float64) -> NoiseSchedule:
        """Stable Diffusion's schedule (SD1, SD2, SDXL): scaled_linear 0.00085..0.012, 1000 steps."""
        return cls.make("scaled_linear", 1000, 0.00085, 0.012, zero_terminal_snr=zero_terminal_snr, dtype=dtype)

    # -- derived quantities -------------------------------------------------------------------
    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @cached_property
    def sigmas(self) -> Tensor:
        """sqrt((1 - ac) / ac), ascending with t. (T,)"""
        ac = self.alphas_cumprod
        if self.table_dtype is not None:
            ac = ac.to(self.table_dtype)
        return (((1 - ac) / ac) ** 0.5).to(self.alphas_cumprod.dtype)

    @cached_property
    def log_sigmas(self) -> Tensor:
        if self.table_dtype is not None:
            return self.sigmas.to(self.table_dtype).log().to(self.alphas_cumprod.dtype)  # (T,)
        return self.sigmas.log()  # (T,)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    # -- sigma <-> t ----------------------------------------------------------------------------
    def _log_sigmas_on(self, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
        """log_sigmas on ``device``: rounded to ``dtype`` where given, else in their own dtype, float32 where float64
        is unsupported (MPS)."""
        if dtype is not None:
            return self.log_sigmas.to(device=device, dtype=dtype)
        if device.type == "mps":
            return self.log_sigmas.to(device=device, dtype=torch.float32)
        return self.log_sigmas.to(device)

    def sigma_to_t(self, sigma: Tensor | float, quantize: bool = False, dtype: torch.dtype | None = None) -> Tensor:
        """Fractional timestep whose log sigma interpolates to ``log(sigma)``.

        Piecewise-linear in log sigma between the two neighbouring training levels, clamped to
        ``[0, T-1]`` (k-diffusion ``DiscreteSchedule.sigma_to_t``, diffusers ``_sigma_to_t``).
        ``quantize=True`` returns the nearest training timestep instead. Computed in the schedule's
        dtype, or in ``dtype`` on the log-sigma table rounded to it (float32: ComfyUI's
        ``ModelSamplingDiscrete.timestep`` with ``quantize``, `comfy_sigmas`); returned in sigma's dtype (float32
        for non-float input), same shape as sigma.
        """
        sigma_t = torch.as_tensor(sigma)
        out_dtype = sigma_t.dtype if torch.is_floating_point(sigma_t) else torch.float32
        log_sigmas = self._log_sigmas_on(sigma_t.device, dtype)  # (T,)
        # sigma == 0 has no timestep; clamp like diffusers (1e-10) so it maps to t = 0.
        log_sigma = sigma_t.to(log_sigmas.dtype).clamp_min(1e-10).log()  # (...)
        if quantize:
            t = (log_sigma.reshape(-1, 1) - log_sigmas).abs().argmin(dim=1).reshape(sigma_t.shape)
            return t.to(out_dtype)
        # low = last index whose log sigma is <= log_sigma, kept inside [0, T-2].
        low = torch.searchsorted(log_sigmas, log_sigma.contiguous(), right=True) - 1
        low = low.clamp(0, self.num_timesteps - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return (low.to(log_sigmas.dtype) + w).to(out_dtype)

    def t_to_sigma(self, t: Tensor | float, dtype: torch.dtype | None = None) -> Tensor:
        """Sigma at fractional timestep t, interpolating linearly in log sigma, in the schedule's dtype or in
        ``dtype`` on the log-sigma table rounded to it (float32: ComfyUI's ``ModelSamplingDiscrete.sigma``,
        `comfy_sigmas`). Returned in t's dtype (the schedule's dtype for integer t), same shape as t."""
        t_t = torch.as_tensor(t)
        out_dtype = t_t.dtype if torch.is_floating_point(t_t) else self.alphas_cumprod.dtype
        log_sigmas = self._log_sigmas_on(t_t.device, dtype)  # (T,)
        tf = t_t.to(log_sigmas.dtype).clamp(0, self.num_timesteps - 1)
        low = tf.floor().long()
        high = tf.ceil().long()
        w = tf - low.to(tf.dtype)
        log_sigma = (1 - w) * log_sigmas[low] + w * log_sigmas[high]
        return log_sigma.exp().to(out_dtype)
