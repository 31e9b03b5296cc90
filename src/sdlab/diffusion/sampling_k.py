"""Samplers in sigma space ("k-diffusion family"), as pure functions over a denoiser.

Conventions (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"):

- Variance-exploding scaling: ``x = x0 + sigma * eps``. A ``DenoiseFn`` maps ``(x (B, C, h, w), sigma (B,))``
  to the denoised estimate ``D(x; sigma)`` of ``x0``; the probability-flow ODE is
  ``dx/dsigma = (x - D(x; sigma)) / sigma``.
- ``sigmas`` is a descending 1-D tensor whose last entry is the final noise level (usually 0); ``x`` enters
  at ``sigmas[0]`` (pure noise times the initial scale, or a noised init image for img2img).
- Randomness comes only from an explicit ``noise`` source, ``noise(sigma, sigma_next) -> Tensor`` shaped like
  ``x`` with unit variance per element. Stochastic samplers raise if they need noise and none is given.
- The DPM-Solver++ samplers work in ``t = -log(sigma)`` (the half log-SNR ``lambda`` of Lu et al.; in VE
  scaling ``lambda = -log sigma``), which is the same method as diffusers' lambda-based formulation written
  in VP scaling.

Each sampler returns the final ``x`` (at ``sigmas[-1]``) and calls ``callback(StepInfo(...))`` once per step,
after the first model evaluation of the step (``sdlab.diffusion.steps``). Their names (AUTOMATIC1111's and
ComfyUI's), noise kinds and the lookup live in the sampler table, ``sdlab.diffusion.samplers``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from sdlab.diffusion.denoiser import DenoiseFn
from sdlab.diffusion.noise import NoiseSource, image_noise
from sdlab.diffusion.steps import (
    StepCallback, ancestral_step, predictions, report_step, require_noise, sigma_batch, to_d, within_step,
)

# ----------------------------------------------------------------------------------------------------------
# Shared pieces (the step helpers every sampler uses live in sdlab.diffusion.steps)


def _log_midpoint(sigma: float, sigma_to: float, like: Tensor) -> float:
    """``sqrt(sigma * sigma_to)`` computed as the references do (lerp of logs in the schedule's dtype)."""
    a, b = torch.tensor([sigma, sigma_to], dtype=like.dtype).log()
    return float(a.lerp(b, 0.5).exp())


def _churn(
    x: Tensor,
    sigmas: Tensor,
    i: int,
    sigma: float,
    noise: NoiseSource | None,
    sampler: str,
    churn: tuple[float, float, float, float],
) -> tuple[Tensor, float]:
    """Karras et al. 2022 Alg. 2, lines 4-6: raise the noise level from ``sigma = sigmas[i]`` to
    ``sigma_hat = (1 + gamma) sigma`` by adding fresh noise; ``churn = (s_churn, s_tmin, s_tmax, s_noise)``.

    ``gamma = min(s_churn / steps, sqrt(2) - 1)`` inside ``[s_tmin, s_tmax]``, else 0. With churn, every step
    draws its noise, used or not, as k-diffusion's do (so a step outside the range moves the later ones' noise).
    """
    s_churn, s_tmin, s_tmax, s_noise = churn
    gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_churn > 0 and s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if s_churn > 0:
        source = require_noise(noise, sampler, "s_churn > 0")
        eps = source(sigmas[i], sigmas.new_tensor(sigma_hat)) * s_noise  # (B, C, h, w)
        if gamma > 0:
            x = x + eps * math.sqrt(sigma_hat**2 - sigma**2)
    return x, sigma_hat


def _renoise(x: Tensor, noise: NoiseSource, sigmas: Tensor, i: int, sigma_up: float, s_noise: float) -> Tensor:
    """Ancestral samplers: add ``sigma_up`` of fresh noise for the step ``sigmas[i] -> sigmas[i + 1]``
    (nothing is drawn when ``sigma_up`` is 0, which includes every step to ``sigma_next == 0``)."""
    if not sigma_up > 0:
        return x
    return x + noise(sigmas[i], sigmas[i + 1]) * (s_noise * sigma_up)  # (B, C, h, w)


# ----------------------------------------------------------------------------------------------------------
# Karras et al. 2022 samplers (ODE in sigma, optional churn)


@torch.no_grad()
def sample_euler(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> Tensor:
    """Euler, Karras et al. 2022 Alg. 2 with Euler steps (first order).

    Per step: optional churn (raise sigma to sigma_hat with fresh noise), one model call,
    ``x += (x - D) / sigma_hat * (sigma_next - sigma_hat)``.
    """
    levels, churn = sigmas.tolist(), (s_churn, s_tmin, s_tmax, s_noise)
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        x, sigma_hat = _churn(x, sigmas, i, sigma, noise, "Euler", churn)
        denoised = model(x, sigma_batch(sigma_hat, x, sigmas))  # (B, C, h, w)
        report_step(callback, i, x, sigma_hat, sigma_next, denoised)
        d = to_d(x, sigma_hat, denoised)
        x = x + d * (sigma_next - sigma_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    cfg_pp: bool = False,
) -> Tensor:
    """Euler a: ancestral sampling with Euler steps.

    Per step: one model call, Euler step down to ``sigma_down``, then add ``sigma_up`` of fresh noise
    (noise is drawn only when ``sigma_next > 0``). ``cfg_pp``: CFG++ (ComfyUI's ``euler_ancestral_cfg_pp``),
    d from the unguided D_u and the step ``x' = D + sigma_down d``; no noise is drawn at ``s_noise`` 0.
    """
    draws_noise = eta and (s_noise or not cfg_pp)
    if draws_noise:
        noise = require_noise(noise, "euler_ancestral_cfg_pp" if cfg_pp else "Euler a", "eta > 0")
    predict = predictions(model, cfg_pp)
    levels, ref = sigmas.tolist(), sigmas.detach().cpu()
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised, unguided = predict(x, sigma_batch(sigma, x, sigmas))  # (B, C, h, w) each
        sigma_down, sigma_up = ancestral_step(ref[i], ref[i + 1], eta)
        report_step(callback, i, x, sigma, sigma_next, denoised)
        d = to_d(x, sigma, unguided)
        x = denoised + d * sigma_down if cfg_pp else x + d * (sigma_down - sigma)
        if draws_noise:
            x = _renoise(x, noise, sigmas, i, sigma_up, s_noise)
    return x


@torch.no_grad()
def sample_heun(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> Tensor:
    """Heun, Karras et al. 2022 Alg. 2 (second order, two model calls per step).

    Per step: optional churn, model call at ``sigma_hat``, Euler predictor to ``sigma_next``, model call there,
    trapezoidal corrector with the mean slope. The last step to ``sigma_next == 0`` is a plain Euler step.
    """
    levels, churn = sigmas.tolist(), (s_churn, s_tmin, s_tmax, s_noise)
    for i in range(len(levels) - 1):
        x, sigma_hat = _churn(x, sigmas, i, levels[i], noise, "Heun", churn)
        x = _heun_step(model, x, sigma_hat, levels[i + 1], i, sigmas, callback)
    return x


def _heun_step(model: DenoiseFn, x: Tensor, sigma: float, sigma_next: float, i: int, sigmas: Tensor,
               callback: StepCallback | None) -> Tensor:
    """Step ``i`` of Heun from ``sigma`` to ``sigma_next``: the model at both ends (the second call declared
    inside step ``i``), the mean slope; Euler's step (one call) when ``sigma_next`` is 0."""
    denoised = model(x, sigma_batch(sigma, x, sigmas))  # (B, C, h, w)
    report_step(callback, i, x, sigma, sigma_next, denoised)
    d = to_d(x, sigma, denoised)
    dt = sigma_next - sigma
    if sigma_next == 0:
        return x + d * dt
    x_pred = x + d * dt
    with within_step(i):
        denoised_pred = model(x_pred, sigma_batch(sigma_next, x, sigmas))
    d_pred = to_d(x_pred, sigma_next, denoised_pred)
    return x + (d + d_pred) / 2 * dt


@torch.no_grad()
def sample_dpm_2(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> Tensor:
    """DPM2: DPM-Solver-2 (Lu et al. 2022) midpoint steps inside Karras et al. 2022 Alg. 2.

    Per step: optional churn, model call at ``sigma_hat``, Euler half step to the log-midpoint
    ``sigma_mid = sqrt(sigma_hat * sigma_next)``, model call there, full step with the midpoint slope.
    The last step to ``sigma_next == 0`` is a plain Euler step.
    """
    levels, churn = sigmas.tolist(), (s_churn, s_tmin, s_tmax, s_noise)
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        x, sigma_hat = _churn(x, sigmas, i, sigma, noise, "DPM2", churn)
        denoised = model(x, sigma_batch(sigma_hat, x, sigmas))  # (B, C, h, w)
        report_step(callback, i, x, sigma_hat, sigma_next, denoised)
        d = to_d(x, sigma_hat, denoised)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma_hat)
            continue
        x, _ = _dpm2_midpoint_step(model, x, d, sigma_hat, sigma_next, sigmas)
    return x


def _dpm2_midpoint_step(
    model: DenoiseFn, x: Tensor, d: Tensor, sigma: float, sigma_to: float, sigmas: Tensor
) -> tuple[Tensor, Tensor]:
    sigma_mid = _log_midpoint(sigma, sigma_to, sigmas)
    x_mid = x + d * (sigma_mid - sigma)
    denoised_mid = model(x_mid, sigma_batch(sigma_mid, x, sigmas))
    d_mid = to_d(x_mid, sigma_mid, denoised_mid)
    return x + d_mid * (sigma_to - sigma), denoised_mid


@torch.no_grad()
def sample_dpm_2_ancestral(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM2 a: ancestral sampling with DPM-Solver-2 midpoint steps.

    Per step: model call, DPM2 step down to ``sigma_down`` (midpoint between ``sigma`` and ``sigma_down`` in
    log sigma), then ``sigma_up`` of fresh noise. The last step (``sigma_down == 0``) is a plain Euler step.
    """
    if eta:
        noise = require_noise(noise, "DPM2 a", "eta > 0")
    levels, ref = sigmas.tolist(), sigmas.detach().cpu()
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = model(x, sigma_batch(sigma, x, sigmas))  # (B, C, h, w)
        sigma_down, sigma_up = ancestral_step(ref[i], ref[i + 1], eta)
        report_step(callback, i, x, sigma, sigma_next, denoised)
        d = to_d(x, sigma, denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigma)
            continue
        with within_step(i):        # the midpoint lies below sigma_next when sigma_down does
            x, _ = _dpm2_midpoint_step(model, x, d, sigma, sigma_down, sigmas)
        x = _renoise(x, noise, sigmas, i, sigma_up, s_noise)
    return x


# ----------------------------------------------------------------------------------------------------------
# Linear multistep


def lms_coefficients(levels: list[float], i: int, order: int) -> list[float]:
    """Adams-Bashforth weights for the step ``levels[i] -> levels[i+1]`` on the non-uniform sigma grid.

    Weight ``j`` is the integral over ``[sigma_i, sigma_{i+1}]`` of the Lagrange basis polynomial that is 1 at
    ``sigma_{i-j}`` and 0 at the other ``order - 1`` past levels. The integrand has degree ``order - 1``, so
    ``order``-point Gauss-Legendre quadrature integrates it exactly (k-diffusion and diffusers use
    ``scipy.integrate.quad``, which agrees to machine precision).
    """
    if order - 1 > i:
        raise ValueError(f"LMS order {order} too high for step {i}")
    nodes, weights = np.polynomial.legendre.leggauss(order)
    a, b = levels[i], levels[i + 1]
    taus = (b - a) / 2 * nodes + (a + b) / 2  # quadrature points mapped onto [a, b]
    past = [levels[i - k] for k in range(order)]
    coeffs = []
    for j in range(order):
        basis = np.ones_like(taus)
        for k in range(order):
            if k != j:
                basis *= (taus - past[k]) / (past[j] - past[k])
        coeffs.append(float((b - a) / 2 * np.dot(weights, basis)))
    return coeffs


@torch.no_grad()
def sample_lms(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    order: int = 4,
) -> Tensor:
    """LMS: linear multistep (Adams-Bashforth) on the probability-flow ODE in sigma, order 4 by default.

    Per step: one model call, keep the last ``order`` slopes, ``x += sum_j c_j * d_{i-j}`` with coefficients
    from ``lms_coefficients`` (order ramps up 1, 2, 3, 4 over the first steps).
    """
    levels = sigmas.tolist()
    slopes: list[Tensor] = []
    for i in range(len(levels) - 1):
        sigma = levels[i]
        denoised = model(x, sigma_batch(sigma, x, sigmas))  # (B, C, h, w)
        slopes.append(to_d(x, sigma, denoised))
        if len(slopes) > order:
            slopes.pop(0)
        report_step(callback, i, x, sigma, levels[i + 1], denoised)
        coeffs = lms_coefficients(levels, i, min(i + 1, order))
        for coeff, d in zip(coeffs, reversed(slopes)):
            x = x + coeff * d
    return x


# ----------------------------------------------------------------------------------------------------------
# DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
# Models"), written in t = -log(sigma). A first-order DPM-Solver++ step from t to t_next is
#   x_next = (sigma_next / sigma) * x - expm1(-h) * D,   h = t_next - t,
# i.e. the exact solution of the ODE when D is constant over the step.


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    cfg_pp: bool = False,
) -> Tensor:
    """DPM++ 2S a: DPM-Solver++(2S) single-step second order (Lu et al. 2022, Alg. 1 with r = 1/2), ancestral.

    Per step: model call at ``sigma``; first-order step to the log-midpoint of ``sigma`` and ``sigma_down``;
    model call there; full step using the midpoint estimate; then ``sigma_up`` of fresh noise when
    ``sigma_next > 0``. The last step (``sigma_down == 0``) is a plain Euler step. ``cfg_pp``: CFG++ (ComfyUI's
    ``dpmpp_2s_ancestral_cfg_pp``), the step on the unguided predictions D_u, then x moved by the guidance D - D_u.
    """
    if eta:
        noise = require_noise(noise, "dpmpp_2s_ancestral_cfg_pp" if cfg_pp else "DPM++ 2S a", "eta > 0")
    predict = predictions(model, cfg_pp)
    levels, ref = sigmas.tolist(), sigmas.detach().cpu()
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised, unguided = predict(x, sigma_batch(sigma, x, sigmas))  # (B, C, h, w) each
        sigma_down, sigma_up = ancestral_step(ref[i], ref[i + 1], eta)
        report_step(callback, i, x, sigma, sigma_next, denoised)
        if sigma_down == 0:
            x = x + to_d(x, sigma, unguided) * (sigma_down - sigma)
        else:
            t, t_next = -math.log(sigma), -math.log(sigma_down)
            h = t_next - t
            sigma_mid = math.exp(-(t + h / 2))
            x_mid = (sigma_mid / sigma) * x - math.expm1(-h / 2) * unguided
            with within_step(i):    # the midpoint of sigma and sigma_down may lie below sigma_next
                _, unguided_mid = predict(x_mid, sigma_batch(sigma_mid, x, sigmas))
            x = (sigma_down / sigma) * x - math.expm1(-h) * unguided_mid
        x = _renoise(x, noise, sigmas, i, sigma_up, s_noise)
        if cfg_pp:
            x = x + (denoised - unguided)
    return x


def singlestep_orders(steps: int, lower_order_final: bool, ends_at_zero: bool) -> list[int]:
    """The order of each grid interval for :func:`sample_dpmpp_2s` (diffusers' ``get_order_list`` for
    ``solver_order=2``): pairs ``[1, 2]`` from the start; an odd last interval is first order; with
    ``lower_order_final`` an even grid's last pair is ``[1, 1]``. diffusers forces ``lower_order_final``
    when the step count is odd or the grid ends at sigma 0 (a second-order step cannot land on 0).
    """
    if lower_order_final or ends_at_zero or steps % 2:
        pairs, tail = (steps - 1) // 2, ([1] if steps % 2 else [1, 1])
        return [1, 2] * pairs + tail
    return [1, 2] * (steps // 2)


@torch.no_grad()
def sample_dpmpp_2s(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    lower_order_final: bool = True,
) -> Tensor:
    """DPM++ 2S: deterministic DPM-Solver++(2S) (Lu et al. 2022, Alg. 1) whose intermediate point is the
    next grid sigma: diffusers' ``DPMSolverSinglestepScheduler`` (``solver_order=2``, ``dpmsolver++``,
    ``solver_type="midpoint"``).

    The grid is walked in pairs of intervals ``sigma_i -> sigma_{i+1} -> sigma_{i+2}``: a model call at
    ``sigma_i`` and a first-order step to ``sigma_{i+1}`` (Alg. 1's ``u``), a model call there, then a
    second-order step from ``x_i`` straight to ``sigma_{i+2}`` (``t = -log sigma``):
    ``x_{i+2} = (sigma_{i+2}/sigma_i) x_i - expm1(-h) [(1 - 1/2r) D_i + 1/2r D_{i+1}]``,
    ``h = t_{i+2} - t_i``, ``r = (t_{i+1} - t_i) / h``. One model call per grid sigma, like every
    one-call-per-step sampler; ``singlestep_orders`` gives the first-order warm-up / final intervals
    (the step to sigma 0 is always first order and returns ``D``). The callback fires once per interval.

    Relation to "DPM++ 2S a" (:func:`sample_dpmpp_2s_ancestral`, k-diffusion / A1111): that sampler makes
    every interval its own 2S step with an extra model call at the interval's log-midpoint (``r = 1/2``)
    and adds ancestral noise. With ``eta = 0`` it equals this sampler on the grid with every log-midpoint
    inserted (``[s_0, m_0, s_1, m_1, ..., s_{N-1}, 0]``); on a plain grid the two differ.
    """
    levels = sigmas.tolist()
    orders = singlestep_orders(len(levels) - 1, lower_order_final, levels[-1] == 0)
    x_start, denoised_start, sigma_start = x, x, levels[0]  # where the current 2S step began
    for i, order in enumerate(orders):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = model(x, sigma_batch(sigma, x, sigmas))  # (B, C, h, w)
        report_step(callback, i, x, sigma, sigma_next, denoised)
        if order == 1:
            x_start, denoised_start, sigma_start = x, denoised, sigma
            if sigma_next == 0:
                x = denoised  # first-order step to sigma = 0: (0 / sigma) * x + 1 * D
            else:
                h = math.log(sigma) - math.log(sigma_next)
                x = (sigma_next / sigma) * x - math.expm1(-h) * denoised
        else:
            h = math.log(sigma_start) - math.log(sigma_next)
            half_inv_r = h / (2 * (math.log(sigma_start) - math.log(sigma)))  # 1 / (2 r)
            denoised_d = (1 - half_inv_r) * denoised_start + half_inv_r * denoised
            x = (sigma_next / sigma_start) * x_start - math.expm1(-h) * denoised_d
    return x


@torch.no_grad()
def sample_dpmpp_sde(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
) -> Tensor:
    """DPM++ SDE: stochastic DPM-Solver++ single-step second order (k-diffusion ``sample_dpmpp_sde``).

    Per step from t to t_next (``h = t_next - t``, intermediate ``s = t + r h``):
      1. model call at sigma; ancestral first-order step t -> s (with ``sigma_up`` noise over [sigma, sigma(s)]);
      2. model call at sigma(s); ancestral step t -> t_next with ``(1 - 1/2r) D + 1/2r D_s``, plus noise
         over [sigma, sigma_next].
    The last step to ``sigma_next == 0`` is a plain Euler step. References draw the noise from a Brownian
    tree (``sdlab.diffusion.brownian``); the query times are computed in float32 exactly as the reference
    does, because a Brownian tree answers differently for times that differ by one ulp.
    """
    if eta:
        noise = require_noise(noise, "DPM++ SDE", "eta > 0")
    levels, ref = sigmas.tolist(), sigmas.detach().cpu()
    fac = 1 / (2 * r)
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = model(x, sigma_batch(sigma, x, sigmas))  # (B, C, h, w)
        report_step(callback, i, x, sigma, sigma_next, denoised)
        if sigma_next == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
            continue
        # Levels in t = -log(sigma), as 0-dim tensors in the schedule's dtype: the Brownian tree must be
        # queried at exactly the reference's times.
        t, t_next = ref[i].log().neg(), ref[i + 1].log().neg()
        s_mid = t + (t_next - t) * r
        sigma_t, sigma_s, sigma_t_next = t.neg().exp(), s_mid.neg().exp(), t_next.neg().exp()
        # Step 1: ancestral first-order step t -> s.
        sd, su = ancestral_step(sigma_t, sigma_s, eta)
        x_s = (sd / float(sigma_t)) * x - math.expm1(math.log(sd) - float(t.neg())) * denoised
        if su > 0:
            x_s = x_s + noise(sigma_t, sigma_s) * (s_noise * su)
        denoised_s = model(x_s, sigma_batch(float(sigma_s), x, sigmas))
        # Step 2: ancestral step t -> t_next with the combined estimate.
        sd, su = ancestral_step(sigma_t, sigma_t_next, eta)
        denoised_d = (1 - fac) * denoised + fac * denoised_s
        x = (sd / float(sigma_t)) * x - math.expm1(math.log(sd) - float(t.neg())) * denoised_d
        if su > 0:
            x = x + noise(sigma_t, sigma_t_next) * (s_noise * su)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    cfg_pp: bool = False,
) -> Tensor:
    """DPM++ 2M: DPM-Solver++(2M) multistep second order (Lu et al. 2022, Alg. 2).

    Per step: one model call; the first step and the final step to ``sigma_next == 0`` are first order
    (diffusers' ``lower_order_final``); other steps extrapolate ``D`` linearly in t from the previous step:
    ``D_d = (1 + 1/2r) D_i - 1/2r D_{i-1}``, ``r = h_{i-1} / h_i``. ``cfg_pp``: CFG++ (ComfyUI's
    ``dpmpp_2m_cfg_pp``, ``x' = D - e^-h D_u + e^-h x - expm1(-h) (D - D_u_old) / 2r``): this step from x moved by
    the guidance D - D_u, with the unguided D_u as the previous step's D.
    """
    predict = predictions(model, cfg_pp)
    levels = sigmas.tolist()
    old_denoised: Tensor | None = None
    h_last = 0.0
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised, unguided = predict(x, sigma_batch(sigma, x, sigmas))  # (B, C, h, w) each
        report_step(callback, i, x, sigma, sigma_next, denoised)
        if sigma_next == 0:
            x = denoised  # first-order step to sigma = 0: (0 / sigma) * x + 1 * D
        else:
            h = math.log(sigma) - math.log(sigma_next)
            if old_denoised is None:
                denoised_d = denoised
            else:
                half_inv_r = h / (2 * h_last)
                denoised_d = (1 + half_inv_r) * denoised - half_inv_r * old_denoised
            if cfg_pp:
                x = x + (denoised - unguided)
            x = (sigma_next / sigma) * x - math.expm1(-h) * denoised_d
            h_last = h
        old_denoised = unguided
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
) -> Tensor:
    """DPM++ 2M SDE: SDE-DPM-Solver++(2M) (Lu et al. 2022, sec. 5), with eta scaling the injected noise.

    Per step (``h = t_next - t``, ``eta_h = eta * h``): one model call;
    ``x = (sigma_next/sigma) e^{-eta_h} x + (1 - e^{-h-eta_h}) D`` plus a second-order correction from the
    previous ``D`` (``solver_type`` "midpoint": ``1/2 (1 - e^{-h-eta_h}) / r``; "heun":
    ``((1 - e^{-h-eta_h}) / (-h-eta_h) + 1) / r``), plus ``sigma_next sqrt(1 - e^{-2 eta_h})`` of noise.
    The final step to ``sigma_next == 0`` returns ``D``.
    """
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    if eta:
        noise = require_noise(noise, "DPM++ 2M SDE", "eta > 0")
    levels = sigmas.tolist()
    old_denoised: Tensor | None = None
    h_last = 0.0
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = model(x, sigma_batch(sigma, x, sigmas))  # (B, C, h, w)
        report_step(callback, i, x, sigma, sigma_next, denoised)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            eta_h = eta * h
            one_minus = -math.expm1(-h - eta_h)  # 1 - e^{-h - eta_h}
            x = (sigma_next / sigma * math.exp(-eta_h)) * x + one_minus * denoised
            if old_denoised is not None:
                inv_r = h / h_last
                if solver_type == "heun":
                    coeff = (one_minus / (-h - eta_h) + 1) * inv_r
                else:
                    coeff = 0.5 * one_minus * inv_r
                x = x + coeff * (denoised - old_denoised)
            if eta:
                x = x + noise(sigmas[i], sigmas[i + 1]) * (sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise)
            h_last = h
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM++ 3M SDE: third-order multistep SDE-DPM-Solver++ (k-diffusion ``sample_dpmpp_3m_sde``).

    Per step (``h_eta = (1 + eta) h``, ``phi_2 = (e^{-h_eta} - 1)/h_eta + 1``, ``phi_3 = phi_2/h_eta - 1/2``):
    one model call; ``x = e^{-h_eta} x + (1 - e^{-h_eta}) D``; with two past estimates add
    ``phi_2 d1 - phi_3 d2`` (first and second divided differences of D in t), with one add ``phi_2 d``;
    then ``sigma_next sqrt(1 - e^{-2 eta h})`` of noise. The final step to ``sigma_next == 0`` returns ``D``.
    """
    if eta:
        noise = require_noise(noise, "DPM++ 3M SDE", "eta > 0")
    levels = sigmas.tolist()
    denoised_1: Tensor | None = None
    denoised_2: Tensor | None = None
    h_1: float | None = None
    h_2: float | None = None
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = model(x, sigma_batch(sigma, x, sigmas))  # (B, C, h, w)
        report_step(callback, i, x, sigma, sigma_next, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma) - math.log(sigma_next)
        h_eta = h * (eta + 1)
        x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
        phi_2 = math.expm1(-h_eta) / h_eta + 1
        if h_2 is not None:
            r0, r1 = h_1 / h, h_2 / h
            d1_0 = (denoised - denoised_1) / r0
            d1_1 = (denoised_1 - denoised_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_3 = phi_2 / h_eta - 0.5
            x = x + phi_2 * d1 - phi_3 * d2
        elif h_1 is not None:
            x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
        if eta:
            x = x + noise(sigmas[i], sigmas[i + 1]) * (sigma_next * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise)
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


# ----------------------------------------------------------------------------------------------------------
# DPM-Solver (Lu et al. 2022) with its own grid


def _dpm_solver_orders(
    eps_at, x: Tensor, t: Tensor, t_next: Tensor, order: int, eps: Tensor, r1: float
) -> list[Tensor]:
    """The results of DPM-Solver-1 up to DPM-Solver-``order`` (Lu et al. 2022, Alg. 1-2; r2 = 2/3) for one step
    from t to t_next in t = -log sigma (0-dim float32 tensors, k-diffusion's arithmetic), sharing their model
    calls: the second order's intermediate point at ``r1``, which the third order reuses. ``eps`` is the noise
    prediction at (x, t) and ``eps_at(x, t)`` evaluates one."""
    h = t_next - t
    sigma_next = t_next.neg().exp()
    results = [x - sigma_next * h.expm1() * eps]
    if order == 1:
        return results
    s1 = t + r1 * h
    eps_r1 = eps_at(x - s1.neg().exp() * (r1 * h).expm1() * eps, s1)
    results.append(results[0] - sigma_next / (2 * r1) * h.expm1() * (eps_r1 - eps))
    if order == 2:
        return results
    r2 = 2 / 3
    s2 = t + r2 * h
    u2 = x - s2.neg().exp() * (r2 * h).expm1() * eps \
        - s2.neg().exp() * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps)
    eps_r2 = eps_at(u2, s2)
    results.append(results[0] - sigma_next / r2 * (h.expm1() / h - 1) * (eps_r2 - eps))
    return results


def _dpm_solver_step(eps_at, x: Tensor, t: Tensor, t_next: Tensor, order: int, eps: Tensor) -> Tensor:
    """One DPM-Solver-1/2/3 step (r1 = 1/2 for order 2, r1 = 1/3 for order 3), ``_dpm_solver_orders``'s last."""
    return _dpm_solver_orders(eps_at, x, t, t_next, order, eps, 1 / 2 if order == 2 else 1 / 3)[-1]


def dpm_fast_orders(calls: int) -> list[int]:
    """The step orders of DPM-Solver-Fast for ``calls`` model calls: order 3 but for the last one or two steps."""
    m = calls // 3 + 1
    return [3] * (m - 2) + [2, 1] if calls % 3 == 0 else [3] * (m - 1) + [calls % 3]


@torch.no_grad()
def sample_dpm_fast(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    eta: float = 0.0,
    s_noise: float = 1.0,
    sigma_max: float | None = None,
    sigma_min: float | None = None,
    n: int | None = None,
) -> Tensor:
    """DPM-Solver-Fast (Lu et al. 2022, section 3.4; k-diffusion's ``sample_dpm_fast``): ``n`` model calls
    (``len(sigmas) - 1`` when None) in steps of ``dpm_fast_orders`` on a grid uniform in t = -log sigma from
    ``sigmas[0]`` to the smallest positive sigma, where it ends: the result is x there, and the list's other
    levels are not visited (A1111's img2img and ComfyUI pass only these two ends; ``sigma_max`` / ``sigma_min``
    replace them, as A1111's txt2img passes the model's, and ``n`` its steps). ``eta > 0``: each step goes down to ``ancestral_step``'s
    sigma_down (not below the grid's end) and adds fresh noise up to the step's end, the last step's too.
    ``callback`` once per model call. The grid and coefficients are float32, as k-diffusion computes them."""
    if eta:
        noise = require_noise(noise, "DPM fast", "eta > 0")
    orders = dpm_fast_orders(len(sigmas) - 1 if n is None else n)
    ends = _solver_ends(sigmas, sigma_max, sigma_min)                                     # t of the two ends
    ts = torch.linspace(ends[0], ends[1], len(orders) + 1)                                # (steps + 1,)
    reported = 0
    step_end = 0.0

    def eps_at(x_in: Tensor, t: Tensor) -> Tensor:
        nonlocal reported
        sigma = t.neg().exp()
        denoised = model(x_in, sigma_batch(float(sigma), x_in, sigmas))  # (B, C, h, w)
        report_step(callback, reported, x_in, float(sigma), step_end, denoised)
        reported += 1
        return (x_in - denoised) / sigma.to(x_in.device)

    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        step_end = float(t_next.neg().exp())
        t_down = t_next
        if eta:     # down to sigma_down, not below the grid's end, then noise up to the step's end
            sigma_down, _ = ancestral_step(t.neg().exp(), t_next.neg().exp(), eta)
            t_down = torch.minimum(ts[-1], torch.tensor(sigma_down).log().neg())
        x = _dpm_solver_step(eps_at, x, t, t_down, order, eps_at(x, t))
        sigma_up = (t_next.neg().exp() ** 2 - t_down.neg().exp() ** 2).clamp_min(0) ** 0.5
        if sigma_up > 0:
            fresh = noise(sigmas.new_tensor(float(t.neg().exp())), sigmas.new_tensor(step_end))  # type: ignore[misc]
            x = x + sigma_up.to(x.device) * s_noise * fresh
    return x


def _solver_ends(sigmas: Tensor, sigma_max: float | None, sigma_min: float | None) -> Tensor:
    """t = -log sigma (2,) float32 where DPM fast / adaptive start and end: `sigma_max` / `sigma_min` where given,
    else ``sigmas[0]`` and the smallest positive sigma of the list."""
    high = float(sigmas[0]) if sigma_max is None else sigma_max
    low = float(sigmas[sigmas > 0].min()) if sigma_min is None else sigma_min
    return torch.tensor([high, low], dtype=torch.float32).log().neg()


class _StepSizeController:
    """k-diffusion's PID controller of the step size h (Söderlind 2003): with ``b = (p + i + d, -(p + 2d), d) /
    order`` and the last inverse errors ``e0, e1, e2``, ``h *= 1 + atan(e0^b0 e1^b1 e2^b2 - 1)``; the step is
    accepted when that factor is at least ``accept_safety`` (only accepted errors move into e1, e2)."""

    def __init__(self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float, accept_safety: float):
        self.h = h
        self.b = ((pcoeff + icoeff + dcoeff) / order, -(pcoeff + 2 * dcoeff) / order, dcoeff / order)
        self.accept_safety = accept_safety
        self.inverse_errors: list[float] = []

    def propose(self, error: float) -> bool:
        inverse = 1 / (error + 1e-8)
        if not self.inverse_errors:
            self.inverse_errors = [inverse] * 3
        self.inverse_errors[0] = inverse
        e0, e1, e2 = self.inverse_errors
        factor = 1 + math.atan(e0 ** self.b[0] * e1 ** self.b[1] * e2 ** self.b[2] - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.inverse_errors[1:] = [e0, e1]
        self.h *= factor
        return accept


@torch.no_grad()
def sample_dpm_adaptive(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    order: int = 3,
    rtol: float = 0.05,
    atol: float = 0.0078,
    h_init: float = 0.05,
    pcoeff: float = 0.0,
    icoeff: float = 1.0,
    dcoeff: float = 0.0,
    accept_safety: float = 0.81,
    eta: float = 0.0,
    s_noise: float = 1.0,
    sigma_max: float | None = None,
    sigma_min: float | None = None,
) -> Tensor:
    """DPM-Solver-12 / -23 with adaptive step size (Lu et al. 2022, section 3.3; k-diffusion's
    ``sample_dpm_adaptive``) in t = -log sigma from ``sigmas[0]`` to the smallest positive sigma, where it ends
    (the result is x there; A1111's img2img and ComfyUI pass only these two ends; ``sigma_max`` / ``sigma_min``
    replace them, as A1111's txt2img passes the model's). Each try makes ``order`` model calls:
    the orders ``order - 1`` and ``order`` from the same calls (``_dpm_solver_orders``, r1 = 1/3 for order 3);
    their difference, scaled by ``max(atol, rtol * max(|x_low|, |x_prev_low|))``, is the error (RMS) the
    controller (``_StepSizeController``) accepts or refuses. ``eta > 0``: an accepted step goes down to
    ``ancestral_step``'s sigma_down (not below the end) and adds fresh noise up to the step's end.

    Each image has its own step size and error (k-diffusion's one RMS and step size for the whole batch tie
    each image's steps to the others'): the images try their steps together, one model call for the batch at
    each image's own sigma, and an image that has reached the end waits there (its rows are not changed) while
    the others go on; its step noise comes from its own stream (``image_noise``). So image i is the
    one-picture run of its own x, calls and all, as k-diffusion's for a batch of one.

    The model call count follows the pictures, not ``len(sigmas) - 1``. ``callback`` reports the list's steps
    instead: step ``i`` once every image has passed its end ``sigmas[i + 1]`` (several at once after a long
    step; the rest when it ends), with each image's latest accepted try's x and denoised estimate and the
    sigmas of the image furthest behind, so that progress counts ``len(sigmas) - 1`` steps. Equal ends (a list
    with one positive sigma) leave nothing to solve: x comes back as it is, without a model call or report. Float32
    0-dim arithmetic per image, as k-diffusion's."""
    if order not in (2, 3):
        raise ValueError(f"DPM adaptive's order is 2 or 3, not {order}")
    if eta:
        noise = require_noise(noise, "DPM adaptive", "eta > 0")
    images = range(x.shape[0])
    levels = sigmas.tolist()
    t_start, t_end = _solver_ends(sigmas, sigma_max, sigma_min)
    step_ends = [-math.log(level) if level > 0 else math.inf for level in levels[1:]]   # t where step i ends
    tolerance = (torch.tensor(atol), torch.tensor(rtol))
    controllers = [_StepSizeController(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
                   for _ in images]
    sources = [image_noise(noise, i) for i in images] if eta else []
    s = [t_start for _ in images]                                     # where each image is
    x_prev, reported = x, 0
    seen: tuple[Tensor, Tensor] | None = None           # each image's latest accepted try: its x and estimate
    seen_sigmas = [(0.0, 0.0) for _ in images]          # and that try's sigmas

    def per_image(values: Sequence[Tensor | bool]) -> Tensor:           # one value per image -> (B, 1, 1, 1)
        return torch.stack([torch.as_tensor(v) for v in values]).reshape(-1, *[1] * (x.ndim - 1)).to(x.device)

    def eps_at(x_in: Tensor, t: Tensor) -> Tensor:
        sigma = t.neg().exp()                                                               # (B, 1, 1, 1)
        x_in = torch.where(running, x_in, x)                              # an image at the end waits there
        return (x_in - model(x_in, sigma.reshape(-1).to(sigmas.dtype))) / sigma

    while any(still := [bool(s_i < t_end - 1e-5) for s_i in s]):
        running = per_image(still)
        t = [torch.minimum(t_end, s_i + c.h) if go else s_i for s_i, c, go in zip(s, controllers, still)]
        t_down = [_adaptive_step_end(s_i, t_i, t_end, eta) for s_i, t_i in zip(s, t)]
        s_b = per_image(s)
        eps = eps_at(x, s_b)
        denoised = x - s_b.neg().exp() * eps
        x_low, x_high = _dpm_solver_orders(eps_at, x, s_b, per_image(t_down), order, eps,
                                           1 / 3 if order == 3 else 1 / 2)[-2:]
        errors = (x_low - x_high) / torch.maximum(tolerance[0], tolerance[1] * torch.maximum(x_low.abs(), x_prev.abs()))
        accepted = [go and c.propose(float(torch.linalg.norm(errors[i]) / errors[i].numel() ** 0.5))
                    for i, (go, c) in enumerate(zip(still, controllers))]
        if not any(accepted):
            continue
        if eta:
            x_high = x_high + torch.cat([_adaptive_noise(sources[i], s[i], t[i], t_down[i], s_noise, x[i:i + 1])
                                         if accepted[i] else torch.zeros_like(x[i:i + 1]) for i in images])
        keep = per_image(accepted)
        seen = (torch.where(keep, x, seen[0]), torch.where(keep, denoised, seen[1])) if seen else (x, denoised)
        seen_sigmas = [(float(s[i].neg().exp()), float(t[i].neg().exp())) if accepted[i] else seen_sigmas[i]
                       for i in images]
        x_prev, x = torch.where(keep, x_low, x_prev), torch.where(keep, x_high, x)
        s = [t_i if a else s_i for s_i, t_i, a in zip(s, t, accepted)]
        behind = min(images, key=lambda i: float(s[i]))
        while reported < len(step_ends) and float(s[behind]) >= step_ends[reported] - 1e-5:
            report_step(callback, reported, seen[0], *seen_sigmas[behind], seen[1])
            reported += 1
    for i in range(reported, len(step_ends) if seen is not None else reported):
        report_step(callback, i, seen[0], *seen_sigmas[behind], seen[1])  # type: ignore[index]
    return x


def _adaptive_step_end(s: Tensor, t: Tensor, t_end: Tensor, eta: float) -> Tensor:
    """Where DPM adaptive's try from s towards t lands before its noise: t, or with ``eta`` the step's
    sigma_down (``ancestral_step``), not below the end."""
    if not eta:
        return t
    sigma_down, _ = ancestral_step(s.neg().exp(), t.neg().exp(), eta)
    return torch.minimum(t_end, torch.tensor(sigma_down).log().neg())


def _adaptive_noise(source: NoiseSource, s: Tensor, t: Tensor, t_down: Tensor, s_noise: float, like: Tensor
                    ) -> Tensor:
    """The fresh noise an accepted DPM adaptive step adds from sigma_down up to its end: one image's."""
    sigma_up = (t.neg().exp() ** 2 - t_down.neg().exp() ** 2) ** 0.5
    if not sigma_up > 0:
        return torch.zeros_like(like)
    return sigma_up.to(like.device) * s_noise * source(s.neg().exp(), t.neg().exp())


# ----------------------------------------------------------------------------------------------------------
# Restart (Xu et al. 2023, arXiv 2306.14878), as AUTOMATIC1111 runs it (modules/sd_samplers_extra.py)


def _karras_float32(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """k-diffusion's ``get_sigmas_karras``: n levels in float32, then 0."""
    ramp = torch.linspace(0, 1, n)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(max_inv + ramp * (min_inv - max_inv)) ** rho, ramp.new_zeros(1)])


def _restart_levels(levels: Tensor, steps: int) -> Tensor:
    """The Karras list (rho 7) of ``steps`` steps that replaces ``levels`` from 20 steps on: A1111's, with
    ``steps`` levels from the first down to the last positive sigma and then 0, for a list that ends at 0; for a
    slice that ends above 0 (the base's share before a refiner handoff), ``steps + 1`` levels from the first
    sigma down to the slice's own end, so that the slice still ends where the next model starts."""
    if levels[-1] == 0:
        return _karras_float32(steps, float(levels[-2]), float(levels[0]))
    return _karras_float32(steps + 1, float(levels[-1]), float(levels[0]))[:-1]


def restart_steps(sigmas: Tensor) -> list[tuple[float, float]]:
    """The (from, to) sigma pairs A1111's Restart steps through for ``sigmas`` (its ``step_list``), as many as
    ``len(sigmas) - 1``. Below 20 steps, the list's own steps. From 20 on, a Karras list of ``steps - k n``
    steps with the list's ends (``_restart_levels``) replaces the list, and after the step onto its level
    nearest 0.1 the sampler goes n times back up to its level nearest 2 and down again in the k steps of a
    Karras list of k + 1 levels: k, n = 9, 1, or steps // 4, 2 from 36 steps."""
    levels = sigmas.float().cpu()
    steps = len(levels) - 1
    if steps >= 20:
        k, n = (9, 1) if steps < 36 else (steps // 4, 2)
        levels = _restart_levels(levels, steps - k * n)
    plan = list(zip(levels.tolist()[:-1], levels.tolist()[1:]))
    if steps >= 20:
        low, high = int((levels - 0.1).abs().argmin()), int((levels - 2).abs().argmin())
        if high < low:
            loop = _karras_float32(k + 1, float(levels[low]), float(levels[high]))[:-1].tolist()
            plan[low:low] = list(zip(loop[:-1], loop[1:])) * n
    return plan


@torch.no_grad()
def sample_restart(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    s_noise: float = 1.0,
) -> Tensor:
    """Restart sampling (A1111's ``restart_sampler``): Heun's steps (``_heun_step``) through ``restart_steps``;
    where a step starts above the last one's end, fresh noise raises x to it first,
    ``x += s_noise sqrt(sigma^2 - sigma_last^2) n``. Each step's calls are declared inside it (``within_step``),
    ``callback`` once per step: ``len(sigmas) - 1`` steps of two calls (the last one's: one)."""
    last = math.inf
    for i, (sigma, sigma_next) in enumerate(restart_steps(sigmas)):
        if sigma > last:
            source = require_noise(noise, "Restart", "it adds noise at each restart")
            x = x + source(sigmas.new_tensor(last), sigmas.new_tensor(sigma)) * s_noise * math.sqrt(sigma**2 - last**2)
        with within_step(i):
            x = _heun_step(model, x, sigma, sigma_next, i, sigmas, callback)
        last = sigma_next
    return x
