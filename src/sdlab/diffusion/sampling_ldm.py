"""The timestep-family samplers of the LDM world (DDIM, PLMS, DDPM, LCM, TCD, UniPC), written in sigma space.

CompVis' and diffusers' versions of these samplers step a variance-preserving (VP) latent
``z_t = sqrt(ac_t) x0 + sqrt(1 - ac_t) eps`` over a list of integer timesteps. sdlab's samplers are
plain functions over a denoiser and a descending tensor of sigmas, in the variance-exploding (VE)
scaling every sdlab sampler uses:

    x = x0 + sigma * eps,     sigma = sqrt((1 - ac) / ac),     ac = 1 / (1 + sigma^2),
    z = x / sqrt(1 + sigma^2)                                  (the VP / "DDPM-space" latent).

Every VP update below is the VE update multiplied through by ``sqrt(ac_next)``, so running these
functions on the sigmas of a scheduler's timesteps reproduces that scheduler step for step.

Sampler signature (shared with ``sampling_k``)::

    sample_<name>(model, x, sigmas, *, noise=None, callback=None, **options) -> Tensor

``model(x (B,C,h,w), sigma (B,)) -> denoised x0``; ``sigmas`` (N+1,) descending, the last entry the
final sigma; ``x`` the VE sample at ``sigmas[0]`` (pure noise: ``noise * sqrt(1 + sigmas[0]^2)``
when diffusers' ``init_noise_sigma`` is 1 and ``x_T = noise`` in VP space); ``noise`` an explicit
``NoiseSource`` (no sampler ever touches the global RNG; stochastic samplers raise without one).

Final sigma and where the division happens
------------------------------------------
Original DDIM and PLMS end at ``alphas_cumprod[0]`` (diffusers ``set_alpha_to_one=False``), i.e. at
sigma_min ~= 0.0292 for SD, not at 0. The samplers always *return VE x at ``sigmas[-1]``*; when that
sigma is > 0 the latent to decode is the VP latent ``to_ddpm_latent(x, sigmas[-1])``, which the
generate loop applies (it is the identity for a final sigma of 0). The sampler table
(``sdlab.diffusion.samplers``) says which final sigma each sampler's reference uses:
``"first_alpha"`` (sigma_min) or ``"zero"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from sdlab.diffusion.denoiser import DenoiseFn
from sdlab.diffusion.noise import NoiseSource
from sdlab.diffusion.steps import (
    StepCallback, ancestral_step, predictions, report_step, require_noise, sigma_batch, to_d, within_step,
)

__all__ = [
    "sample_ddim",
    "sample_ddpm",
    "sample_lcm",
    "sample_plms",
    "sample_tcd",
    "sample_unipc",
    "to_ddpm_latent",
]


def to_ddpm_latent(x: Tensor, sigma_final: float | Tensor) -> Tensor:
    """The VP ("DDPM-space") latent of a VE sample: ``x / sqrt(1 + sigma^2)``; identity at sigma 0."""
    sigma = float(sigma_final)
    return x if sigma == 0.0 else x / math.sqrt(1.0 + sigma * sigma)


# --------------------------------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------------------------------


def _check_sigmas(sigmas: Tensor) -> list[float]:
    """The sigmas as float64 Python numbers (one device sync), validated."""
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 entries, got shape {tuple(sigmas.shape)}")
    values = sigmas.detach().to("cpu", torch.float64).tolist()
    if any(b > a for a, b in zip(values, values[1:])):
        raise ValueError("sigmas must be non-increasing")
    return values


# --------------------------------------------------------------------------------------------------
# DDIM
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_ddim(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    eta: float = 0.0,
    cfg_pp: bool = False,
) -> Tensor:
    """DDIM (Song et al. 2020, eq. 12) with stochasticity ``eta`` (0: deterministic, 1: DDPM-like).

    VP update: ``z' = sqrt(ac') x0 + sqrt(1 - ac' - s_t^2) eps + s_t z_noise``. Divided by
    ``sqrt(ac')`` it is, in VE sigmas (``steps.ancestral_step``, the ancestral split of k-diffusion)::

        x' = x0 + sigma_down * (x - x0) / sigma + sigma_up * noise

    so eta = 0 is exactly Euler on the same sigmas. diffusers' ``DDIMScheduler`` steps from t to
    ``t - T // steps``; that is the next timestep of its list for "leading" spacing (the SD default),
    and the last step goes to ``alphas_cumprod[0]`` (``set_alpha_to_one=False``): pass the sigmas of
    the timesteps followed by sigma_min (its row's ``final_sigma`` in ``sdlab.diffusion.samplers``).

    ``cfg_pp``: A1111's DDIM CFG++ (``ddim_cfgpp``): x0 the guided prediction, the direction ``dir_xt`` the
    unguided eps (its ``last_noise_uncond``), ``x' = x0 + sigma_down * (x - x0_u) / sigma + sigma_up * noise``.
    """
    sigma_values = _check_sigmas(sigmas)
    ref = torch.tensor(sigma_values, dtype=torch.float64)  # the split in float64, on the validated values
    predict = predictions(model, cfg_pp)
    for i in range(len(sigma_values) - 1):
        sigma, sigma_next = sigma_values[i], sigma_values[i + 1]
        denoised, unguided = predict(x, sigma_batch(sigma, x, sigmas))  # (B, C, h, w) each
        report_step(callback, i, x, sigma, sigma_next, denoised)
        sigma_down, sigma_up = ancestral_step(ref[i], ref[i + 1], eta)
        x_next = denoised + (sigma_down / sigma) * (x - unguided)
        if sigma_up > 0.0:
            name = "DDIM CFG++" if cfg_pp else "DDIM"
            x_next = x_next + sigma_up * require_noise(noise, name, "eta > 0")(sigmas[i], sigmas[i + 1])
        x = x_next
    return x


# --------------------------------------------------------------------------------------------------
# PLMS
# --------------------------------------------------------------------------------------------------

# Adams-Bashforth weights of equal steps, newest first: PLMS applies them to eps (its "pseudo" method steps in
# timestep index), iPNDM (`sampling_comfy`) to the ODE derivative.
ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


@torch.no_grad()
def sample_plms(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    euler_start_alone: bool = False,
) -> Tensor:
    """PLMS, the pseudo linear multistep sampler of PNDM (Liu et al. 2022), as in CompVis' ``plms.py``.

    The "transfer" part of PNDM (its eq. 9, diffusers' ``_get_prev_sample``) is algebraically the
    DDIM step with a given eps, which in VE sigmas is ``x' = x + (sigma' - sigma) * eps``. PLMS feeds
    it a combination of eps values, ``eps = (x - denoised) / sigma``:

    - first step: pseudo improved Euler. Step to sigma_1 with eps_0, evaluate eps at that point,
      then redo the step from x with the average of the two (an extra model evaluation; it is Heun
      in sigma). Only eps_0 enters the history.
    - later steps: Adams-Bashforth of order 2, 3, 4 over the newest eps values with the constant
      weights of ``ADAMS_BASHFORTH`` (equal steps in timestep index, not in sigma: "pseudo").

    Takes the plain descending sigmas (timesteps' sigmas, then the final sigma) and makes the extra
    evaluation itself. Correspondence with diffusers ``PNDMScheduler(skip_prk_steps=True)``: its
    timestep list ``[t0, t1, t1, t2, ..., t_{N-1}]`` repeats t1 because its second ``step`` call is
    that extra evaluation (at the Euler point, labelled t1), after which it re-steps from the saved
    sample; so N steps cost N + 1 evaluations in both. For a single step (N = 1) diffusers makes no
    extra evaluation (a plain DDIM step) and neither does this function: the improved-Euler start is
    used only when the first step is not also the last (``euler_start_alone``: there too, as A1111's ``plms`` does,
    evaluating at the step's end). (CompVis does evaluate there, at ``alphas_cumprod[0]`` but labelled with the
    current timestep, an off-by-one we do not copy.)
    The final sigma is sigma_min in both originals (the row's ``final_sigma``).

    Prediction types: CompVis' PLMS is eps-only. For a v-prediction model diffusers combines the raw
    v outputs and converts the combination to eps with the current sample; sdlab combines eps (from
    the denoiser), i.e. the same multistep method in the variable the DDIM transfer step uses.
    """
    sigma_values = _check_sigmas(sigmas)
    n_steps = len(sigma_values) - 1
    old_eps: list[Tensor] = []  # newest last, at most 3 kept
    for i in range(n_steps):
        sigma, sigma_next = sigma_values[i], sigma_values[i + 1]
        denoised = model(x, sigma_batch(sigma, x, sigmas))  # (B, C, h, w)
        report_step(callback, i, x, sigma, sigma_next, denoised)
        eps = to_d(x, sigma, denoised)  # (B, C, h, w)
        if not old_eps and (i < n_steps - 1 or euler_start_alone) and sigma_next > 0.0:
            x_euler = x + (sigma_next - sigma) * eps
            with within_step(i):
                eps_euler = to_d(x_euler, sigma_next, model(x_euler, sigma_batch(sigma_next, x, sigmas)))
            eps_prime = (eps + eps_euler) / 2
        else:
            history = [eps, *reversed(old_eps)]  # newest first
            weights = ADAMS_BASHFORTH[len(history)]
            eps_prime = sum(w * e for w, e in zip(weights, history))
        x = x + (sigma_next - sigma) * eps_prime
        old_eps = [*old_eps, eps][-3:]
    return x


# --------------------------------------------------------------------------------------------------
# DDPM
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_ddpm(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, eqs. 6-7) with the posterior variance ("fixed_small").

    Each step samples q(z' | z, x0): mean ``c_x0 x0 + c_z z``, variance
    ``(1 - ac') / (1 - ac) * (1 - ac / ac')``. In VE sigmas this is::

        x' = x0 + (sigma' / sigma)^2 (x - x0) + sigma' sqrt(1 - (sigma' / sigma)^2) * noise

    i.e. the ancestral split with eta = 1 (``steps.ancestral_step``: ``sigma_down = sigma'^2 / sigma``,
    ``sigma_up = sigma' sqrt(1 - (sigma' / sigma)^2)``; DDIM with eta = 1). diffusers' ``DDPMScheduler``
    steps between consecutive timesteps of its list and ends at alphas_cumprod = 1, i.e. sigma 0, where the
    last step returns x0. Noise is drawn once per step that ends above sigma 0.
    """
    sigma_values = _check_sigmas(sigmas)
    ref = torch.tensor(sigma_values, dtype=torch.float64)  # the split in float64, on the validated values
    for i in range(len(sigma_values) - 1):
        sigma, sigma_next = sigma_values[i], sigma_values[i + 1]
        denoised = model(x, sigma_batch(sigma, x, sigmas))  # (B, C, h, w)
        report_step(callback, i, x, sigma, sigma_next, denoised)
        sigma_down, sigma_up = ancestral_step(ref[i], ref[i + 1])
        x_next = denoised + (sigma_down / sigma) * (x - denoised)
        if sigma_next > 0.0:
            source = require_noise(noise, "DDPM", "fresh noise at each step")
            x_next = x_next + sigma_up * source(sigmas[i], sigmas[i + 1])
        x = x_next
    return x


# --------------------------------------------------------------------------------------------------
# LCM
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_lcm(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    sigma_to_t: Callable[[Tensor], Tensor] | None = None,
    timestep_scaling: float = 10.0,
    sigma_data: float = 0.5,
) -> Tensor:
    """Latent Consistency Model multistep sampling (Luo et al. 2023, Algorithm 1).

    Each step maps x to the consistency function's x0 estimate and re-noises it to the next sigma
    with fresh noise: ``x' = f(x, sigma) + sigma' * noise`` (in VP terms
    ``z' = sqrt(ac') f + sqrt(1 - ac') noise``); the last step returns f.

    The consistency function carries the boundary-condition scalings of the consistency-model
    parameterization (Song et al. 2023)::

        f = c_skip(t) * z + c_out(t) * x0_pred,   c_skip = sd^2 / ((k t)^2 + sd^2),
        c_out = k t / sqrt((k t)^2 + sd^2),       k = timestep_scaling (10), sd = sigma_data (0.5),

    applied to the VP sample ``z = x / sqrt(1 + sigma^2)`` as diffusers' ``LCMScheduler`` does. They
    depend on the *timestep*, so pass ``sigma_to_t`` (the generate loop passes its schedule's
    ``NoiseSchedule.sigma_to_t``). With ``sigma_to_t=None`` no scaling is applied (f = the denoiser's
    x0): the convention of k-diffusion/ComfyUI's ``sample_lcm``, whose model wrapper owns the scaling.
    diffusers' timesteps (``original_inference_steps=50``, e.g. 999, 759, 499, 259 for 4 steps) end
    at sigma 0.
    """
    sigma_values = _check_sigmas(sigmas)
    for i in range(len(sigma_values) - 1):
        sigma, sigma_next = sigma_values[i], sigma_values[i + 1]
        denoised = model(x, sigma_batch(sigma, x, sigmas))  # (B, C, h, w)
        if sigma_to_t is not None:
            t = float(torch.as_tensor(sigma_to_t(sigmas[i : i + 1])).reshape(-1)[0])
            scaled_t = t * timestep_scaling
            c_skip = sigma_data**2 / (scaled_t**2 + sigma_data**2)
            c_out = scaled_t / math.sqrt(scaled_t**2 + sigma_data**2)
            denoised = c_out * denoised + (c_skip / math.sqrt(1.0 + sigma * sigma)) * x
        report_step(callback, i, x, sigma, sigma_next, denoised)
        x = denoised
        if sigma_next > 0.0:
            x = x + sigma_next * require_noise(noise, "LCM", "re-noises after each step")(sigmas[i], sigmas[i + 1])
    return x


# --------------------------------------------------------------------------------------------------
# TCD
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_tcd(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    eta: float = 0.3,
    sigma_to_t: Callable[[Tensor], Tensor] | None = None,
    t_to_sigma: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Trajectory Consistency Distillation's strategic stochastic sampling (Zheng et al. 2024, Alg. 4),
    as diffusers' ``TCDScheduler.step``; ``eta`` is the paper's gamma (0: deterministic, 1: LCM-like).

    From x at t the step jumps along the trajectory to the earlier timestep s = floor((1 - eta) t'),
    t' the next timestep, then re-noises forward to t'. In VE sigmas (the VP update divided by sqrt(ac'))::

        x_s = x0 + sigma_s * (x - x0) / sigma,     x' = x_s + sqrt(sigma'^2 - sigma_s^2) * noise

    The last step returns x_s without noise (diffusers draws none there; at eta = 0 no step draws); at the
    schedule's end t' = 0 gives s = 0 and x_s is at the final sigma, while a list that ends early (the
    base model's part before a refiner) re-noises its last step to its last sigma as the others.
    eta = 0 is DDIM / Euler on the same sigmas. s is an integer timestep of the training schedule, so the
    sampler needs the schedule's ``sigma_to_t`` and ``t_to_sigma`` (the generate loop passes both); a
    next sigma that is not a training level (karras, ...) maps to its fractional timestep first. The
    reference ends at alphas_cumprod[0] (t' = 0 after the last timestep): pass sigma_min as the final
    sigma (its table row's ``final_sigma="first_alpha"``); with a final sigma of 0 the last step returns x0.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"TCD's eta (gamma) must lie in [0, 1], got {eta}")
    if sigma_to_t is None or t_to_sigma is None:
        raise ValueError("TCD steps to integer training timesteps: pass the schedule's sigma_to_t and t_to_sigma")
    sigma_values = _check_sigmas(sigmas)
    last = len(sigma_values) - 2
    for i in range(last + 1):
        sigma, sigma_next = sigma_values[i], sigma_values[i + 1]
        denoised = model(x, sigma_batch(sigma, x, sigmas))  # (B, C, h, w)
        sigma_s = _tcd_sigma_s(sigma_next, eta, sigma_to_t, t_to_sigma)
        report_step(callback, i, x, sigma, sigma_next, denoised)
        x = denoised + (sigma_s / sigma) * (x - denoised)
        if eta > 0.0 and (i < last or sigma_s < sigma_next):  # a list cut short (refiner handoff) re-noises
            step_noise = require_noise(noise, "TCD", "eta > 0")(sigmas[i], sigmas[i + 1])
            x = x + math.sqrt(max(sigma_next * sigma_next - sigma_s * sigma_s, 0.0)) * step_noise
    return x


def _tcd_sigma_s(sigma_next: float, eta: float, sigma_to_t: Callable, t_to_sigma: Callable) -> float:
    """sigma at TCD's s = floor((1 - eta) t'), never above sigma' (sigma' itself when eta = 0)."""
    if eta == 0.0 or sigma_next == 0.0:
        return sigma_next
    t_next = float(torch.as_tensor(sigma_to_t(torch.tensor([sigma_next], dtype=torch.float64))).reshape(-1)[0])
    if abs(t_next - round(t_next)) < 1e-3:  # a training timestep, up to the rounding of the sigma round trip
        t_next = float(round(t_next))
    s = math.floor((1.0 - eta) * t_next)
    sigma_s = float(torch.as_tensor(t_to_sigma(torch.tensor([s], dtype=torch.float64))).reshape(-1)[0])
    return min(sigma_s, sigma_next)


# --------------------------------------------------------------------------------------------------
# UniPC
# --------------------------------------------------------------------------------------------------


def _unipc_coefficients(h: float, order: int, variant: str) -> tuple[float, float, list[float]]:
    """(h_phi_1, B_h, b) of UniPC's B(h) construction, data-prediction form (Zhao et al. 2023, Alg. 2).

    With hh = -h (h = lambda' - lambda > 0, lambda = -log sigma): ``h_phi_1 = expm1(hh)``,
    ``B(h) = hh`` (bh1) or ``expm1(hh)`` (bh2), and ``b_k = k! phi_{k+1}(hh) hh / B(h)`` for k = 1..order,
    from the recursion ``h_phi_{k+1} = h_phi_k / hh - 1 / k!``.
    """
    hh = -h
    h_phi_1 = math.expm1(hh)
    if variant == "bh1":
        b_h = hh
    elif variant == "bh2":
        b_h = math.expm1(hh)
    else:
        raise ValueError(f"unknown UniPC variant {variant!r}; expected 'bh1' or 'bh2'")
    h_phi_k = h_phi_1 / hh - 1.0
    factorial = 1
    b = []
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return h_phi_1, b_h, b


def _solve_rhos(rks: Sequence[float], b: Sequence[float]) -> list[float]:
    """Solve ``sum_j rks[j]^(k-1) rho_j = b_k`` (k = 1..len(rks)) in float64."""
    r = torch.tensor(list(rks), dtype=torch.float64)
    matrix = torch.stack([r**k for k in range(len(rks))])  # (K, K)
    return torch.linalg.solve(matrix, torch.tensor(list(b), dtype=torch.float64)).tolist()


def _unipc_update(
    x: Tensor,
    sigma: float,
    sigma_next: float,
    m0: Tensor,
    older: Sequence[tuple[Tensor, float]],
    variant: str,
    model_next: Tensor | None = None,
) -> Tensor:
    """One UniP step (``model_next is None``) or UniC step from (x, sigma) to sigma_next, VE form.

    ``m0`` is the data prediction at sigma; ``older`` the earlier ones with their lambdas, newest
    first; the order is ``len(older) + 1``. With r_k = (lambda_k - lambda) / h and D_k = (m_k - m0) / r_k::

        x' = (sigma'/sigma) x - h_phi_1 m0 - B(h) * sum_k rho_k D_k        (UniP)
        x' = ... - B(h) * (sum_k rho_k D_k + rho_c (m' - m0))              (UniC, m' at sigma')

    (the VP update of diffusers' ``multistep_uni_{p,c}_bh_update`` divided by alpha').
    """
    lam, lam_next = -math.log(sigma), -math.log(sigma_next)
    h = lam_next - lam
    rks = [(lam_k - lam) / h for _, lam_k in older]
    order = len(older) + 1
    h_phi_1, b_h, b = _unipc_coefficients(h, order, variant)
    x_next = (sigma_next / sigma) * x - h_phi_1 * m0  # (B, C, h, w)
    if model_next is None:  # predictor UniP-p
        if not older:
            return x_next
        rhos = [0.5] if order == 2 else _solve_rhos(rks, b[:-1])
        residual = sum((rho / rk) * (m_k - m0) for rho, rk, (m_k, _) in zip(rhos, rks, older))
        return x_next - b_h * residual
    # corrector UniC-p
    rhos = [0.5] if order == 1 else _solve_rhos([*rks, 1.0], b)
    residual = rhos[-1] * (model_next - m0)
    for rho, rk, (m_k, _) in zip(rhos[:-1], rks, older):
        residual = residual + (rho / rk) * (m_k - m0)
    return x_next - b_h * residual


@torch.no_grad()
def sample_unipc(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    order: int = 2,
    variant: str = "bh2",
    lower_order_final: bool = True,
    disable_corrector: Sequence[int] = (),
    min_last_sigma: float = 0.0,
    steps_after: int = 0,
) -> Tensor:
    """UniPC (Zhao et al. 2023): multistep predictor UniP with the corrector UniC, on data predictions.

    Works in lambda = -log sigma (the log-SNR half of the VP form: lambda = log(alpha / sigma_VP)),
    with the model's x0 predictions (``predict_x0=True``). Step i:

    1. m_i = model(x_i, sigma_i);
    2. if i > 0 (and i - 1 not in ``disable_corrector``): UniC replaces x_i by a corrected value,
       using x_{i-1}, the earlier predictions and m_i (m_i itself is not re-evaluated);
    3. UniP steps x_i to sigma_{i+1} using m_i and up to ``order - 1`` earlier predictions.

    The predictor order warms up as 1, 2, ..., ``order``; with ``lower_order_final`` it also drops to
    the number of remaining steps (counting ``steps_after``, the steps of the schedule that follow ``sigmas`` in
    another run: an SDXL base's part before the refiner takes over, which diffusers' scheduler steps at the
    orders of its whole list); a step that ends at sigma 0 is always first order (it returns m_i;
    higher orders have no limit there). The corrector uses the order of the predictor that produced
    x_i. Defaults match diffusers' ``UniPCMultistepScheduler`` (bh2, solver_order 2,
    lower_order_final, ``final_sigmas_type="zero"``); pass the
    scheduler's ``sigmas``. ComfyUI's ``uni_pc`` / ``uni_pc_bh2`` are order 3 with bh1 / bh2
    (rows of the sampler table); A1111's "UniPC" settings default to bh1 and order 3 as well.

    ``min_last_sigma``: a last sigma below it is raised to it, and the result is x there (ComfyUI's
    ``sample_unipc`` ends at 0.001 instead of 0 and returns that x; its other order rule, min(3, steps - 1),
    gives the orders above). With one step ComfyUI's never moves x; this takes the first-order step.
    """
    if order < 1:
        raise ValueError(f"UniPC order must be >= 1, got {order}")
    sigma_values = _check_sigmas(sigmas)
    sigma_values[-1] = max(sigma_values[-1], min_last_sigma)
    n_steps = len(sigma_values) - 1
    history: list[tuple[Tensor, float]] = []  # (data prediction, lambda), newest last, at most `order`
    x_prev: Tensor | None = None  # x at the previous sigma (after its correction)
    prev_order = 0
    for i in range(n_steps):
        sigma, sigma_next = sigma_values[i], sigma_values[i + 1]
        denoised = model(x, sigma_batch(sigma, x, sigmas))  # (B, C, h, w)
        if x_prev is not None and (i - 1) not in disable_corrector:
            m_prev = history[-1][0]
            older = list(reversed(history[-prev_order:-1])) if prev_order > 1 else []
            x = _unipc_update(x_prev, sigma_values[i - 1], sigma, m_prev, older, variant, model_next=denoised)
        report_step(callback, i, x, sigma, sigma_next, denoised)
        history = [*history, (denoised, -math.log(sigma))][-order:]
        step_order = min(order, n_steps + steps_after - i) if lower_order_final else order
        step_order = min(step_order, len(history))
        x_prev, prev_order = x, step_order
        if sigma_next == 0.0:
            x = denoised
            continue
        older = list(reversed(history[-step_order:-1])) if step_order > 1 else []
        x = _unipc_update(x, sigma, sigma_next, denoised, older, variant)
    return x
