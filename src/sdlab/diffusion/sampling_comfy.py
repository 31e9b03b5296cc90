"""The samplers ComfyUI adds to k-diffusion's (``comfy/k_diffusion/sampling.py``), in sigma space.

Conventions are ``sampling_k``'s: variance-exploding sigmas, ``model(x, sigma (B,)) -> denoised``, noise only
from an explicit source, ``callback`` once per step. Each function is ComfyUI's method on the sigmas given:

- ``sample_ipndm``: improved PNDM (Zhang & Chen 2023, zju-pi/diff-sampler), Adams-Bashforth of order up to 4
  on the ODE derivative ``d = (x - D) / sigma`` with the weights of equal steps, warming up from Euler;
- ``sample_ipndm_v``: the same with the weights of the actual (variable) steps;
- ``sample_deis``: the same with DEIS's weights, integrals of the Lagrange polynomials (``sdlab.diffusion.deis``);
- ``sample_heunpp2``: Heun++ (sd-webui-samplers-scheduler): a third evaluation two levels ahead, the slopes
  weighted by their sigmas relative to the first one;
- ``sample_res_multistep``: RES, the second-order multistep exponential integrator of Zhang et al. 2023
  (arXiv 2308.02157), deterministic or ancestral (``eta``);
- ``sample_gradient_estimation``: Euler with the gradient estimate of Permenter & Yuan 2024 (``ge_gamma``).

The CFG++ samplers (Chung et al. 2024, arXiv 2406.08070; ComfyUI's ``*_cfg_pp``) step from the guided estimate D
but renoise along the unguided one D_u (``guidance.with_unguided``): Euler's ``x' = D + sigma' (x - D_u) / sigma``.
``sample_euler_ancestral_cfg_pp`` (eta 0: ``euler_cfg_pp``), ``sample_dpmpp_2m_cfg_pp``,
``sample_dpmpp_2s_ancestral_cfg_pp``, and ``cfg_pp=True`` of ``sample_res_multistep`` and
``sample_gradient_estimation``. They take ComfyUI's variance-exploding branch (alpha = 1).

A step to sigma 0 is a plain Euler step (the denoised estimate) where ComfyUI's is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from sdlab.diffusion.deis import deis_coefficients
from sdlab.diffusion.denoiser import DenoiseFn
from sdlab.diffusion.guidance import with_unguided
from sdlab.diffusion.noise import NoiseSource
from sdlab.diffusion.sampling_ldm import ADAMS_BASHFORTH
from sdlab.diffusion.steps import (
    StepCallback, ancestral_step, report_step, require_noise, sigma_batch, to_d, within_step,
)

__all__ = [
    "sample_deis", "sample_dpmpp_2m_cfg_pp", "sample_dpmpp_2s_ancestral_cfg_pp", "sample_euler_ancestral_cfg_pp",
    "sample_gradient_estimation", "sample_heunpp2", "sample_ipndm", "sample_ipndm_v", "sample_res_multistep",
]


def _predictions(model: DenoiseFn, cfg_pp: bool) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``(x, sigma) -> (D, D_u)``: with ``cfg_pp`` the guided and the unguided prediction (``with_unguided``), else
    D twice (the call guides as it would for any sampler)."""
    if cfg_pp:
        return with_unguided(model)
    return lambda x, sigma: (denoised := model(x, sigma), denoised)


def _keep_last(history: list[Tensor], d: Tensor, size: int) -> list[Tensor]:
    """``history`` with ``d`` appended, at most ``size`` long (the oldest dropped)."""
    return [*history, d][-size:] if size > 0 else []


def _adams_bashforth_steps(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    callback: StepCallback | None,
    max_order: int,
    weights_of: Callable[[list[float], int, int], Sequence[float]],
) -> Tensor:
    """``x += (sigma' - sigma) * sum_k w_k d_k`` over the last ``min(max_order, i + 1)`` derivatives (newest
    first), the weights ``weights_of(levels, i, order)``; a step to sigma 0 is the denoised estimate; one model
    call per step."""
    levels = sigmas.tolist()
    history: list[Tensor] = []  # earlier derivatives, oldest first
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = model(x, sigma_batch(sigma, x, sigmas))  # (B, C, h, w)
        report_step(callback, i, x, sigma, sigma_next, denoised)
        d = to_d(x, sigma, denoised)
        if sigma_next == 0:
            x_next = denoised
        else:
            weights = weights_of(levels, i, min(max_order, i + 1))
            x_next = x + (sigma_next - sigma) * sum(w * d_k for w, d_k in zip(weights, [d, *reversed(history)]))
        history = _keep_last(history, d, max_order - 1)
        x = x_next
    return x


@torch.no_grad()
def sample_ipndm(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    max_order: int = 4,
) -> Tensor:
    """iPNDM: Adams-Bashforth's fixed weights (those of equal steps) on the ODE derivatives."""
    return _adams_bashforth_steps(model, x, sigmas, callback, max_order,
                                  lambda levels, i, order: ADAMS_BASHFORTH[order])


def _ipndm_v_weights(levels: list[float], i: int, order: int) -> tuple[float, ...]:
    """The variable-step Adams-Bashforth weights of iPNDM-v for the step ``levels[i] -> levels[i + 1]``, newest
    derivative first (zju-pi/diff-sampler's closed forms for orders 1-4)."""
    h = [levels[i + 1] - levels[i]] + [levels[i - k] - levels[i - k - 1] for k in range(order - 1)]
    if order == 1:
        return (1.0,)
    r1 = h[0] / h[1]
    if order == 2:
        return (1 + r1 / 2, -r1 / 2)
    temp1 = (1 - h[0] / (3 * (h[0] + h[1])) * (h[0] * (h[0] + h[1])) / (h[1] * (h[1] + h[2]))) / 2
    if order == 3:
        return ((2 + r1) / 2 + temp1, -r1 / 2 - (1 + h[1] / h[2]) * temp1, temp1 * h[1] / h[2])
    span = h[0] + h[1] + h[2]
    temp2 = ((1 - h[0] / (3 * (h[0] + h[1]))) / 2 + (1 - h[0] / (2 * (h[0] + h[1]))) * h[0] / (6 * span)) \
        * (h[0] * (h[0] + h[1]) * span) / (h[1] * (h[1] + h[2]) * (h[1] + h[2] + h[3]))
    ratio = h[1] * (h[1] + h[2]) / (h[2] * (h[2] + h[3]))
    return (
        (2 + r1) / 2 + temp1 + temp2,
        -r1 / 2 - (1 + h[1] / h[2]) * temp1 - (1 + h[1] / h[2] + ratio) * temp2,
        temp1 * h[1] / h[2] + (h[1] / h[2] + ratio * (1 + h[2] / h[3])) * temp2,
        -temp2 * ratio * h[1] / h[2],
    )


@torch.no_grad()
def sample_ipndm_v(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    max_order: int = 4,
) -> Tensor:
    """iPNDM-v: iPNDM with the Adams-Bashforth weights of the actual step sizes (``_ipndm_v_weights``)."""
    return _adams_bashforth_steps(model, x, sigmas, callback, max_order, _ipndm_v_weights)


@torch.no_grad()
def sample_deis(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    max_order: int = 3,
) -> Tensor:
    """DEIS (tAB, ComfyUI's ``deis``): the Adams-Bashforth steps with ``deis.deis_coefficients``' weights C_j
    over the step size (Euler's where it has none: the first step, the step to sigma 0)."""
    coefficients = deis_coefficients(sigmas, max_order)
    return _adams_bashforth_steps(model, x, sigmas, callback, max_order, lambda levels, i, order: [
        c / (levels[i + 1] - levels[i]) for c in coefficients[i]] or [1.0])


@torch.no_grad()
def sample_heunpp2(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Heun++: from each level an Euler predictor to the next and, unless the level after it is the last, a
    second one on to that level; the step takes the slopes weighted by w_k = sigma_k / (n sigma_0) for the
    n - 1 looked-ahead levels (n = 3, or 2 for plain Heun), the current slope taking the rest. The step onto
    the last level is Euler's (three, two and one model calls)."""
    levels = sigmas.tolist()
    first, end = levels[0], levels[-1]
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = model(x, sigma_batch(sigma, x, sigmas))  # (B, C, h, w)
        report_step(callback, i, x, sigma, sigma_next, denoised)
        d = to_d(x, sigma, denoised)
        dt = sigma_next - sigma
        if sigma_next == end:
            x = x + d * dt
            continue
        ahead = [sigma_next] if levels[i + 2] == end else [sigma_next, levels[i + 2]]
        slopes, x_k, at = [d], x, sigma
        for level in ahead:                         # Euler predictors on to each level looked at
            x_k = x_k + slopes[-1] * (level - at)
            with within_step(i):
                slopes.append(to_d(x_k, level, model(x_k, sigma_batch(level, x, sigmas))))
            at = level
        weights = [level / ((len(ahead) + 1) * first) for level in ahead]
        d_prime = (1 - sum(weights)) * d + sum(w * d_k for w, d_k in zip(weights, slopes[1:]))
        x = x + d_prime * dt
    return x


@torch.no_grad()
def sample_res_multistep(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    eta: float = 0.0,
    s_noise: float = 1.0,
    cfg_pp: bool = False,
) -> Tensor:
    """RES multistep: in t = -log sigma, from t to t' = -log sigma_down (``ancestral_step`` with ``eta``),
    ``x' = e^-h x + h (b1 D + b2 D_old)`` with h = t' - t, c2 = (t_prev - t_old) / h (t_old: the previous
    step's sigma_down), ``b2 = phi2(-h) / c2``, ``b1 = phi1(-h) - b2``; Euler on the first step and to sigma 0;
    then ``sigma_up`` of fresh noise (``eta > 0``: ComfyUI's ``res_multistep_ancestral``). ``cfg_pp``: CFG++
    (``res_multistep_cfg_pp``), x first moved by the guidance D - D_u, then D_u in D's place (D_old: the last D_u);
    its Euler step is ``D + sigma_down (x - D_u) / sigma``."""
    if eta:
        noise = require_noise(noise, "res_multistep_ancestral", "eta > 0")
    predict = _predictions(model, cfg_pp)
    levels, ref = sigmas.tolist(), sigmas.detach().cpu()
    old_denoised: Tensor | None = None
    old_sigma_down = 0.0
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised, unguided = predict(x, sigma_batch(sigma, x, sigmas))  # (B, C, h, w) each
        sigma_down, sigma_up = ancestral_step(ref[i], ref[i + 1], eta)
        report_step(callback, i, x, sigma, sigma_next, denoised)
        if sigma_down == 0 or old_denoised is None:
            d = to_d(x, sigma, unguided)
            x = denoised + d * sigma_down if cfg_pp else x + d * (sigma_down - sigma)
        else:
            h = math.log(sigma) - math.log(sigma_down)
            c2 = (math.log(old_sigma_down) - math.log(levels[i - 1])) / h
            phi1 = math.expm1(-h) / -h
            phi2 = (phi1 - 1.0) / -h
            b2 = phi2 / c2
            if cfg_pp:
                x = x + (denoised - unguided)
            x = math.exp(-h) * x + h * ((phi1 - b2) * unguided + b2 * old_denoised)
        if sigma_next > 0 and sigma_up > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * (s_noise * sigma_up)  # type: ignore[misc]
        old_denoised, old_sigma_down = unguided, sigma_down
    return x


@torch.no_grad()
def sample_gradient_estimation(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    ge_gamma: float = 2.0,
    cfg_pp: bool = False,
) -> Tensor:
    """Gradient estimation: an Euler step, then from the second step on ``(ge_gamma - 1) (d - d_old) dt``
    more; the step to sigma 0 returns the denoised estimate. ``cfg_pp``: CFG++ (``gradient_estimation_cfg_pp``),
    d from the unguided D_u and the Euler step ``D + sigma' d``."""
    predict = _predictions(model, cfg_pp)
    levels = sigmas.tolist()
    old_d: Tensor | None = None
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised, unguided = predict(x, sigma_batch(sigma, x, sigmas))  # (B, C, h, w) each
        report_step(callback, i, x, sigma, sigma_next, denoised)
        d = to_d(x, sigma, unguided)
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = denoised
        else:
            x = denoised + d * sigma_next if cfg_pp else x + d * dt
            if old_d is not None:
                x = x + (ge_gamma - 1) * (d - old_d) * dt
        old_d = d
    return x


@torch.no_grad()
def sample_euler_ancestral_cfg_pp(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Euler a CFG++: ``x' = D + sigma_down (x - D_u) / sigma`` (``ancestral_step`` with ``eta``), then
    ``sigma_up`` of fresh noise; the step to sigma 0 returns D. ``eta=0`` is ``euler_cfg_pp``."""
    if eta and s_noise:
        noise = require_noise(noise, "euler_ancestral_cfg_pp", "eta > 0")
    predict = with_unguided(model)
    levels, ref = sigmas.tolist(), sigmas.detach().cpu()
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised, unguided = predict(x, sigma_batch(sigma, x, sigmas))  # (B, C, h, w) each
        report_step(callback, i, x, sigma, sigma_next, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        sigma_down, sigma_up = ancestral_step(ref[i], ref[i + 1], eta)
        x = denoised + sigma_down * to_d(x, sigma, unguided)
        if sigma_up > 0 and s_noise > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * (s_noise * sigma_up)  # type: ignore[misc]
    return x


def sample_euler_cfg_pp(model: DenoiseFn, x: Tensor, sigmas: Tensor, *, noise: NoiseSource | None = None,
                        callback: StepCallback | None = None) -> Tensor:
    """Euler CFG++: ``x' = D + sigma' (x - D_u) / sigma``; ``sample_euler_ancestral_cfg_pp`` with eta 0."""
    return sample_euler_ancestral_cfg_pp(model, x, sigmas, callback=callback, eta=0.0, s_noise=0.0)


@torch.no_grad()
def sample_dpmpp_2m_cfg_pp(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """DPM++ 2M CFG++: ``x' = D - e^-h D_u + e^-h x - expm1(-h) (D - D_u_old) / (2 r)`` with h = log(sigma / sigma'),
    r = h_last / h and D_u_old the previous step's D_u; no last term on the first step and to sigma 0 (x' = D)."""
    predict = with_unguided(model)
    levels = sigmas.tolist()
    old_unguided: Tensor | None = None
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised, unguided = predict(x, sigma_batch(sigma, x, sigmas))  # (B, C, h, w) each
        report_step(callback, i, x, sigma, sigma_next, denoised)
        decay = sigma_next / sigma                                                       # e^-h
        mix = -decay * unguided
        if old_unguided is not None and sigma_next > 0:
            h, h_last = math.log(sigma / sigma_next), math.log(levels[i - 1] / sigma)
            mix = mix - (decay - 1.0) * (h / (2 * h_last)) * (denoised - old_unguided)
        x = denoised + mix + decay * x
        old_unguided = unguided
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral_cfg_pp(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM++ 2S a CFG++: DPM++ 2S a's step (``sample_dpmpp_2s_ancestral``) on the unguided predictions, D_u at
    sigma and the midpoint call's D_u, then ``sigma_up`` of fresh noise, then x moved by this step's guidance
    D - D_u; the step to sigma_down 0 lands on D."""
    if eta:
        noise = require_noise(noise, "dpmpp_2s_ancestral_cfg_pp", "eta > 0")
    predict = with_unguided(model)
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
            _, unguided_mid = predict(x_mid, sigma_batch(sigma_mid, x, sigmas))
            x = (sigma_down / sigma) * x - math.expm1(-h) * unguided_mid
        if sigma_next > 0 and sigma_up > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * (s_noise * sigma_up)  # type: ignore[misc]
        x = x + (denoised - unguided)
    return x
