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
``sample_euler_ancestral_cfg_pp`` (eta 0: ``euler_cfg_pp``), ``sample_dpmpp_2m_cfg_pp`` and
``sample_dpmpp_2s_ancestral_cfg_pp`` are ``cfg_pp=True`` of ``sampling_k``'s samplers, the other two that of
``sample_res_multistep`` and ``sample_gradient_estimation``. They take ComfyUI's variance-exploding branch (alpha = 1).

ComfyUI's SDE solvers in data prediction, their variance-exploding branch too (half-log-SNR lambda = -log sigma):

- ``sample_er_sde``: ER-SDE-Solver-3 (Cui et al. 2023, arXiv 2309.06169), third order from the third step on;
- ``sample_seeds_2`` / ``sample_seeds_3``: SEEDS of two and three stages (Gonzalez et al. 2023, arXiv 2305.14267);
- ``sample_sa_solver``: SA-Solver (Xue et al. 2023, arXiv 2309.05019), stochastic Adams predictor-corrector,
  ``use_pece=True`` re-evaluating the corrected state (``sa_solver_pece``), weights from ``sdlab.diffusion.sa_solver``.

Each draws its fresh Gaussian noise from the ``noise`` source, in ComfyUI's order and with its sigmas.

A step to sigma 0 is a plain Euler step (the denoised estimate) where ComfyUI's is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from sdlab.diffusion.deis import deis_coefficients
from sdlab.diffusion.denoiser import DenoiseFn
from sdlab.diffusion.noise import NoiseSource
from sdlab.diffusion.comfy_sigmas import comfyui_percent_to_sigma
from sdlab.diffusion.sa_solver import adams_weights, tau_interval
from sdlab.diffusion.sampling_k import sample_dpmpp_2m, sample_dpmpp_2s_ancestral, sample_euler_ancestral
from sdlab.diffusion.sampling_ldm import ADAMS_BASHFORTH
from sdlab.diffusion.steps import (
    StepCallback, ancestral_step, predictions, report_step, require_noise, sigma_batch, to_d, within_step,
)

__all__ = [
    "sample_deis", "sample_dpmpp_2m_cfg_pp", "sample_dpmpp_2s_ancestral_cfg_pp", "sample_er_sde",
    "sample_euler_ancestral_cfg_pp", "sample_gradient_estimation", "sample_heunpp2", "sample_ipndm", "sample_ipndm_v",
    "sample_res_multistep", "sample_sa_solver", "sample_seeds_2", "sample_seeds_3",
]


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
    predict = predictions(model, cfg_pp)
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
    predict = predictions(model, cfg_pp)
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


def sample_euler_ancestral_cfg_pp(model: DenoiseFn, x: Tensor, sigmas: Tensor, *, noise: NoiseSource | None = None,
                                  callback: StepCallback | None = None, eta: float = 1.0,
                                  s_noise: float = 1.0) -> Tensor:
    """Euler a CFG++: ``x' = D + sigma_down (x - D_u) / sigma`` (``ancestral_step`` with ``eta``), then
    ``sigma_up`` of fresh noise; the step to sigma 0 returns D. ``eta=0`` is ``euler_cfg_pp``."""
    return sample_euler_ancestral(model, x, sigmas, noise=noise, callback=callback, eta=eta, s_noise=s_noise,
                                  cfg_pp=True)


def sample_euler_cfg_pp(model: DenoiseFn, x: Tensor, sigmas: Tensor, *, noise: NoiseSource | None = None,
                        callback: StepCallback | None = None) -> Tensor:
    """Euler CFG++: ``x' = D + sigma' (x - D_u) / sigma``; ``sample_euler_ancestral_cfg_pp`` with eta 0."""
    return sample_euler_ancestral_cfg_pp(model, x, sigmas, callback=callback, eta=0.0, s_noise=0.0)


def sample_dpmpp_2m_cfg_pp(model: DenoiseFn, x: Tensor, sigmas: Tensor, *, noise: NoiseSource | None = None,
                           callback: StepCallback | None = None) -> Tensor:
    """DPM++ 2M CFG++: ``x' = D - e^-h D_u + e^-h x - expm1(-h) (D - D_u_old) / (2 r)`` with h = log(sigma / sigma'),
    r = h_last / h and D_u_old the previous step's D_u; no last term on the first step and to sigma 0 (x' = D)."""
    return sample_dpmpp_2m(model, x, sigmas, callback=callback, cfg_pp=True)


def sample_dpmpp_2s_ancestral_cfg_pp(model: DenoiseFn, x: Tensor, sigmas: Tensor, *, noise: NoiseSource | None = None,
                                     callback: StepCallback | None = None, eta: float = 1.0,
                                     s_noise: float = 1.0) -> Tensor:
    """DPM++ 2S a CFG++: DPM++ 2S a's step (``sample_dpmpp_2s_ancestral``) on the unguided predictions, D_u at
    sigma and the midpoint call's D_u, then ``sigma_up`` of fresh noise, then x moved by this step's guidance
    D - D_u; the step to sigma_down 0 lands on D."""
    return sample_dpmpp_2s_ancestral(model, x, sigmas, noise=noise, callback=callback, eta=eta, s_noise=s_noise,
                                     cfg_pp=True)


def _er_sde_noise_scaler(lam: Tensor) -> Tensor:
    """ER-SDE-Solver-3's noise scale function ``lambda (e^(lambda^0.3) + 10)`` (ComfyUI's default)."""
    return lam * ((lam**0.3).exp() + 10.0)


ER_SDE_POINTS = 200
"""The points of the Riemann sums of ER-SDE's second and third stage (ComfyUI's ``num_integration_points``)."""


@torch.no_grad()
def sample_er_sde(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    s_noise: float = 1.0,
    max_stage: int = 3,
    noise_scaler: Callable[[Tensor], Tensor] = _er_sde_noise_scaler,
) -> Tensor:
    """ER-SDE-Solver-3 (Cui et al. 2023, arXiv 2309.06169; ComfyUI's ``er_sde``) in lambda = sigma: with
    r = f(sigma') / f(sigma) (f: ``noise_scaler``), ``x' = r x + (1 - r) D``, from the second step on plus the
    first difference of D over sigma times ``dt + f(sigma') S1``, from the third the second difference times
    ``dt^2 / 2 + f(sigma') S2`` (S1, S2: Riemann sums of 1 / f and (lambda - sigma) / f over the step); then
    ``sqrt(sigma'^2 - r^2 sigma^2)`` of fresh noise, drawn at every step to a positive sigma while s_noise > 0.
    The step to sigma 0 returns D."""
    if s_noise > 0:
        noise = require_noise(noise, "er_sde", "s_noise > 0")
    levels = sigmas.tolist()
    points = torch.arange(ER_SDE_POINTS, dtype=torch.float32)    # (200,): the sums run in float32, as ComfyUI's
    old_denoised: Tensor | None = None
    old_difference: Tensor | None = None
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = model(x, sigma_batch(sigma, x, sigmas))                              # (B, C, h, w)
        report_step(callback, i, x, sigma, sigma_next, denoised)
        if sigma_next == 0:
            x = denoised
        else:
            lam, lam_next = torch.tensor(sigma, dtype=torch.float64), torch.tensor(sigma_next, dtype=torch.float64)
            scale_next = noise_scaler(lam_next)
            r = float(scale_next / noise_scaler(lam))
            x = r * x + (1 - r) * denoised
            stage = min(max_stage, i + 1)
            if stage >= 2:
                dt = sigma_next - sigma
                width = torch.tensor(-dt / ER_SDE_POINTS, dtype=torch.float64)
                at = lam_next + points * width                                          # (200,) float32
                scaled = noise_scaler(at)
                difference = (denoised - old_denoised) / (sigma - levels[i - 1])        # type: ignore[operator]
                x = x + (dt + float((1 / scaled).sum() * width * scale_next)) * difference
                if stage >= 3:
                    s_u = float(((at - sigma) / scaled).sum() * width * scale_next)
                    second = (difference - old_difference) / ((sigma - levels[i - 2]) / 2)  # type: ignore[operator]
                    x = x + (dt**2 / 2 + s_u) * second
                old_difference = difference
            if s_noise > 0:
                spread = math.sqrt(max(sigma_next**2 - sigma**2 * r**2, 0.0))
                x = x + noise(sigmas[i], sigmas[i + 1]) * (s_noise * spread)            # type: ignore[misc]
        old_denoised = denoised
    return x


def _phi_1(h: float) -> float:
    """``h phi_1(h) = e^h - 1`` (ComfyUI's ``ei_h_phi_1``)."""
    return math.expm1(h)


def _phi_2(h: float) -> float:
    """``h phi_2(h) = (e^h - 1 - h) / h`` (ComfyUI's ``ei_h_phi_2``)."""
    return (math.expm1(h) - h) / h


class _SeedsNoise:
    """SEEDS' noise along one step: each stage's Gaussian increment decays with the step's exponential and adds
    fresh noise for its own segment, so the last stage's noise carries the earlier ones (ComfyUI's ``sde_noise``)."""

    def __init__(self, noise: NoiseSource | None, sigmas: Tensor, rate: float) -> None:
        self.noise, self.sigmas, self.rate = noise, sigmas, rate    # rate: h eta
        self.total: Tensor | float = 0.0

    def segment(self, r_from: float, r_to: float, sigma_from: float, sigma_to: float) -> Tensor:
        """The noise from r_from h to r_to h into the step, at unit scale."""
        factor = (r_from - r_to) * self.rate
        fresh = self.noise(self.sigmas.new_tensor(sigma_from), self.sigmas.new_tensor(sigma_to))  # type: ignore[misc]
        self.total = self.total * math.exp(factor) + math.sqrt(-math.expm1(2 * factor)) * fresh
        return self.total  # type: ignore[return-value]


def _seeds_stage(x: Tensor, sigma: float, sigma_to: float, r: float, h: float, eta: float,
                 weighted: Tensor) -> Tensor:
    """``x`` carried from sigma to the stage at ``r h``: ``(sigma_to / sigma) e^(-r h eta) x - weighted``."""
    return (sigma_to / sigma) * math.exp(-r * h * eta) * x - weighted


@torch.no_grad()
def sample_seeds_2(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
    solver_type: str = "phi_1",
) -> Tensor:
    """SEEDS-2 (Gonzalez et al. 2023, arXiv 2305.14267; ComfyUI's ``seeds_2``): in lambda = -log sigma, h =
    lambda' - lambda, a first stage at lambda + r h, ``x_2 = (sigma_2 / sigma) e^(-r h eta) x - expm1(-r h (1 +
    eta)) D`` plus its noise, then the step with D and D_2 mixed (``phi_1``: D + (D_2 - D) / (2 r); ``phi_2``: the
    exponential integrator's b1, b2) plus the noise of both segments; two model calls a step, the step to sigma 0
    returns D. ``eta`` sets the SDE's strength (0: the ODE)."""
    if solver_type not in ("phi_1", "phi_2"):
        raise ValueError(f"solver_type must be 'phi_1' or 'phi_2', got {solver_type!r}")
    inject = eta > 0 and s_noise > 0
    if inject:
        noise = require_noise(noise, "seeds_2", "eta > 0")
    levels = sigmas.tolist()
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = model(x, sigma_batch(sigma, x, sigmas))                              # (B, C, h, w)
        report_step(callback, i, x, sigma, sigma_next, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma) - math.log(sigma_next)
        h_eta = h * (eta + 1)
        sigma_2 = math.exp(math.log(sigma) - r * h)
        step_noise = _SeedsNoise(noise, sigmas, h * eta)
        x_2 = _seeds_stage(x, sigma, sigma_2, r, h, eta, _phi_1(-r * h_eta) * denoised)
        if inject:
            x_2 = x_2 + step_noise.segment(0.0, r, sigma, sigma_2) * (sigma_2 * s_noise)
        denoised_2 = model(x_2, sigma_batch(sigma_2, x, sigmas))
        if solver_type == "phi_1":
            weighted = _phi_1(-h_eta) * torch.lerp(denoised, denoised_2, 1 / (2 * r))
        else:
            b2 = _phi_2(-h_eta) / r
            weighted = (_phi_1(-h_eta) - b2) * denoised + b2 * denoised_2
        x = _seeds_stage(x, sigma, sigma_next, 1.0, h, eta, weighted)
        if inject:
            x = x + step_noise.segment(r, 1.0, sigma_2, sigma_next) * (sigma_next * s_noise)
    return x


@torch.no_grad()
def sample_seeds_3(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r_1: float = 1.0 / 3,
    r_2: float = 2.0 / 3,
) -> Tensor:
    """SEEDS-3 (ComfyUI's ``seeds_3``): ``sample_seeds_2``'s stages at lambda + r_1 h and lambda + r_2 h (the second
    from D and D_2 with the weights of phi_2), the step from D and D_3; each stage adds its segment's noise; three
    model calls a step, the step to sigma 0 returns D."""
    inject = eta > 0 and s_noise > 0
    if inject:
        noise = require_noise(noise, "seeds_3", "eta > 0")
    levels = sigmas.tolist()
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = model(x, sigma_batch(sigma, x, sigmas))                              # (B, C, h, w)
        report_step(callback, i, x, sigma, sigma_next, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma) - math.log(sigma_next)
        h_eta = h * (eta + 1)
        sigma_2, sigma_3 = (math.exp(math.log(sigma) - r * h) for r in (r_1, r_2))
        step_noise = _SeedsNoise(noise, sigmas, h * eta)
        x_2 = _seeds_stage(x, sigma, sigma_2, r_1, h, eta, _phi_1(-r_1 * h_eta) * denoised)
        if inject:
            x_2 = x_2 + step_noise.segment(0.0, r_1, sigma, sigma_2) * (sigma_2 * s_noise)
        denoised_2 = model(x_2, sigma_batch(sigma_2, x, sigmas))
        a2 = r_2 / r_1 * _phi_2(-r_2 * h_eta)
        x_3 = _seeds_stage(x, sigma, sigma_3, r_2, h, eta, (_phi_1(-r_2 * h_eta) - a2) * denoised + a2 * denoised_2)
        if inject:
            x_3 = x_3 + step_noise.segment(r_1, r_2, sigma_2, sigma_3) * (sigma_3 * s_noise)
        denoised_3 = model(x_3, sigma_batch(sigma_3, x, sigmas))
        b3 = _phi_2(-h_eta) / r_2
        x = _seeds_stage(x, sigma, sigma_next, 1.0, h, eta, (_phi_1(-h_eta) - b3) * denoised + b3 * denoised_3)
        if inject:
            x = x + step_noise.segment(r_2, 1.0, sigma_3, sigma_next) * (sigma_next * s_noise)
    return x


SA_SOLVER_SDE_PERCENTS = (0.2, 0.8)
"""Where ComfyUI's KSampler runs SA-Solver as an SDE: from percent_to_sigma(0.2) down to percent_to_sigma(0.8)."""


@torch.no_grad()
def sample_sa_solver(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    t_to_sigma: Callable[[Tensor], Tensor] | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    predictor_order: int = 3,
    corrector_order: int = 4,
    use_pece: bool = False,
) -> Tensor:
    """SA-Solver (Xue et al. 2023; ComfyUI's ``sa_solver``): a stochastic Adams predictor of order up to
    ``predictor_order`` on the last denoised estimates, each step first corrected with the new estimate by a
    stochastic Adams-Moulton corrector of order up to ``corrector_order`` (not on the first step, nor the last
    unless ``use_pece``); weights from ``sa_solver.adams_weights`` in lambda = -log sigma. The noise strength tau
    is ``eta`` for the sigmas between ComfyUI's percent_to_sigma(0.2) and (0.8) of the model (``t_to_sigma``: its
    ``ModelSamplingDiscrete.sigma`` in float32 where the pass follows ComfyUI's arithmetic,
    ``pipeline.plan.pass_timestep_sigma``, for ComfyUI's edges),
    0 elsewhere; the predictor's noise ``sigma' sqrt(1 - e^(-2 tau^2 h))`` carries into the corrected state. With
    a schedule ending at 0 the orders fall towards the end (the predictor's to the steps left after this one).
    ``use_pece`` (``sa_solver_pece``): the corrected state is evaluated again (two model calls a step)."""
    if len(sigmas) <= 1:
        return x
    if t_to_sigma is None:
        raise ValueError("sa_solver needs the model's t_to_sigma: its SDE interval is a range of the model's timesteps")
    tau_of = tau_interval(*(comfyui_percent_to_sigma(p, t_to_sigma) for p in SA_SOLVER_SDE_PERCENTS), eta)
    levels = sigmas.tolist()
    lambdas = [-math.log(s) if s > 0 else math.inf for s in levels]
    last = len(levels) - 1
    lower_order_to_end = levels[-1] == 0
    history: list[Tensor] = []  # denoised estimates, oldest first
    x_pred, tau, h = x, 0.0, 0.0
    step_noise: Tensor | None = None
    for i in range(last):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = model(x_pred, sigma_batch(sigma, x, sigmas))                         # (B, C, h, w)
        report_step(callback, i, x_pred, sigma, sigma_next, denoised)
        history = _keep_last(history, denoised, max(predictor_order, corrector_order))
        order = min(predictor_order, len(history))
        corrector = 0 if i == 0 or (sigma_next == 0 and not use_pece) else min(corrector_order, len(history))
        if lower_order_to_end:
            order, corrector = min(order, last - 1 - i), min(corrector, last - i)
        if corrector == 0:
            x = x_pred
        else:
            weights = adams_weights(lambdas[i - corrector + 1:i + 1], lambdas[i - 1], lambdas[i], tau)
            x = (sigma / levels[i - 1]) * math.exp(-(tau**2) * h) * x + _weighted(weights, history[-corrector:])
            if step_noise is not None:
                x = x + step_noise
            if use_pece:
                denoised = model(x, sigma_batch(sigma, x, sigmas))
                history[-1] = denoised
        if sigma_next == 0:
            x_pred = denoised
            continue
        tau = tau_of(sigma_next)
        weights = adams_weights(lambdas[i - order + 1:i + 1], lambdas[i], lambdas[i + 1], tau)
        h = lambdas[i + 1] - lambdas[i]
        x_pred = (sigma_next / sigma) * math.exp(-(tau**2) * h) * x + _weighted(weights, history[-order:])
        step_noise = None
        if tau > 0 and s_noise > 0:
            source = require_noise(noise, "sa_solver", "eta > 0")
            step_noise = source(sigmas[i], sigmas[i + 1]) * (sigma_next * math.sqrt(-math.expm1(-2 * tau**2 * h))
                                                              * s_noise)
            x_pred = x_pred + step_noise
    return x_pred


def _weighted(weights: Sequence[float], estimates: Sequence[Tensor]) -> Tensor:
    """``sum_j w_j D_j``."""
    return sum(w * d for w, d in zip(weights, estimates))  # type: ignore[return-value]
