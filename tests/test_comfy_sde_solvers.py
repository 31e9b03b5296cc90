"""ComfyUI's SDE solvers `er_sde`, `seeds_2`, `seeds_3`, `sa_solver`, `sa_solver_pece`: each against ComfyUI's
function, transcribed below.

The reference is comfyanonymous/ComfyUI `comfy/k_diffusion/sampling.py` (`sample_er_sde`, `sample_seeds_2`,
`sample_seeds_3`, `sample_sa_solver`, `sample_sa_solver_pece`, `ei_h_phi_1`, `ei_h_phi_2`) and
`comfy/k_diffusion/sa_solver.py` (`compute_exponential_coeffs`, `compute_stochastic_adams_b_coeffs`,
`get_tau_interval_func`), with progress bars and callbacks left out. ComfyUI's KSampler calls them with their
defaults (`comfy/samplers.py` `ksampler`: `sample_{name}` with no extra options), reading `model_sampling` for an
SD model (`comfy/model_sampling.py` `ModelSamplingDiscrete`, EPS): `sigma_to_half_log_snr` = -log sigma (not CONST),
`offset_first_sigma_for_snr` a no-op, `noise_scale` absent (1), and `percent_to_sigma` for SA-Solver's SDE interval.
The step noise is a source both runs read alike (its sigmas recorded and compared: a Brownian tree would be asked
for them).

Tolerances: on the toy denoiser in float64, 1e-10 (ComfyUI takes logs and exps of tensors and builds its SA-Solver
weights by a matrix where sdlab recurses, so the two round differently at 1e-13); on the shipped tiny U-Net in
float32, 1e-4 (ComfyUI's float32 sigma arithmetic against sdlab's float64 coefficients).
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
from cli_helpers import pixels, run

import comfy_reference as C
import sdlab
from sdlab.diffusion.comfy_sigmas import comfyui_percent_to_sigma
from sdlab.diffusion.denoiser import Denoiser
from sdlab.diffusion.guidance import cfg
from sdlab.diffusion.model_sampling import DiscreteModelSampling
from sdlab.diffusion.sa_solver import adams_weights
from sdlab.diffusion.samplers import get_sampler, sampler_names
from sdlab.diffusion.schedules import NoiseSchedule
from sdlab.pipeline import generate as generate_module
from sdlab.pipeline.plan import comfyui_timestep_sigma

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# -- comfy/k_diffusion/sampling.py helpers (ModelSamplingDiscrete.percent_to_sigma: comfy_reference.py's) -----------
def sigma_to_half_log_snr(sigma, model_sampling):
    return sigma.log().neg()            # not CONST


def half_log_snr_to_sigma(half_log_snr, model_sampling):
    return half_log_snr.neg().exp()


def offset_first_sigma_for_snr(sigmas, model_sampling, percent_offset=1e-4):
    return sigmas                       # not CONST


def ei_h_phi_1(h: torch.Tensor) -> torch.Tensor:
    return torch.expm1(h)


def ei_h_phi_2(h: torch.Tensor) -> torch.Tensor:
    return (torch.expm1(h) - h) / h


# -- comfy/k_diffusion/sa_solver.py --------------------------------------------------------------------------------
def compute_exponential_coeffs(s, t, solver_order, tau_t):
    tau_mul = 1 + tau_t ** 2
    h = t - s
    p = torch.arange(solver_order, dtype=s.dtype, device=s.device)
    product_terms_factored = (t ** p - s ** p * (-tau_mul * h).exp())
    recursive_depth_mat = p.unsqueeze(1) - p.unsqueeze(0)
    log_factorial = (p + 1).lgamma()
    recursive_coeff_mat = log_factorial.unsqueeze(1) - log_factorial.unsqueeze(0)
    if tau_t > 0:
        recursive_coeff_mat = recursive_coeff_mat - (recursive_depth_mat * math.log(tau_mul))
    signs = torch.where(recursive_depth_mat % 2 == 0, 1.0, -1.0)
    recursive_coeff_mat = (recursive_coeff_mat.exp() * signs).tril()
    return recursive_coeff_mat @ product_terms_factored


def compute_stochastic_adams_b_coeffs(sigma_next, curr_lambdas, lambda_s, lambda_t, tau_t, simple_order_2=False,
                                      is_corrector_step=False):
    num_timesteps = curr_lambdas.shape[0]
    assert not simple_order_2           # KSampler's default; its simple order-2 weights are not transcribed
    exp_integral_coeffs = compute_exponential_coeffs(lambda_s, lambda_t, num_timesteps, tau_t)
    vandermonde_matrix_T = torch.vander(curr_lambdas, num_timesteps, increasing=True).T
    lagrange_integrals = torch.linalg.solve(vandermonde_matrix_T, exp_integral_coeffs)
    alpha_t = sigma_next * lambda_t.exp()
    return alpha_t * lagrange_integrals


def get_tau_interval_func(start_sigma, end_sigma, eta=1.0):
    def tau_func(sigma):
        if eta <= 0:
            return 0.0  # ODE
        if isinstance(sigma, torch.Tensor):
            sigma = sigma.item()
        return eta if start_sigma >= sigma >= end_sigma else 0.0
    return tau_func


# -- comfy/k_diffusion/sampling.py (model_sampling passed in: ComfyUI reads it off the model) ------------------------
@torch.no_grad()
def sample_er_sde(model, x, sigmas, model_sampling, s_noise=1.0, noise_sampler=None, noise_scaler=None, max_stage=3):
    s_in = x.new_ones([x.shape[0]])

    def default_er_sde_noise_scaler(x):
        return x * ((x ** 0.3).exp() + 10.0)

    noise_scaler = default_er_sde_noise_scaler if noise_scaler is None else noise_scaler
    num_integration_points = 200.0
    point_indice = torch.arange(0, num_integration_points, dtype=torch.float32, device=x.device)

    sigmas = offset_first_sigma_for_snr(sigmas, model_sampling)
    half_log_snrs = sigma_to_half_log_snr(sigmas, model_sampling)
    er_lambdas = half_log_snrs.neg().exp()  # er_lambda_t = sigma_t / alpha_t

    old_denoised = None
    old_denoised_d = None

    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        stage_used = min(max_stage, i + 1)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            er_lambda_s, er_lambda_t = er_lambdas[i], er_lambdas[i + 1]
            alpha_s = sigmas[i] / er_lambda_s
            alpha_t = sigmas[i + 1] / er_lambda_t
            r_alpha = alpha_t / alpha_s
            r = noise_scaler(er_lambda_t) / noise_scaler(er_lambda_s)

            # Stage 1 Euler
            x = r_alpha * r * x + alpha_t * (1 - r) * denoised

            if stage_used >= 2:
                dt = er_lambda_t - er_lambda_s
                lambda_step_size = -dt / num_integration_points
                lambda_pos = er_lambda_t + point_indice * lambda_step_size
                scaled_pos = noise_scaler(lambda_pos)

                # Stage 2
                s = torch.sum(1 / scaled_pos) * lambda_step_size
                denoised_d = (denoised - old_denoised) / (er_lambda_s - er_lambdas[i - 1])
                x = x + alpha_t * (dt + s * noise_scaler(er_lambda_t)) * denoised_d

                if stage_used >= 3:
                    # Stage 3
                    s_u = torch.sum((lambda_pos - er_lambda_s) / scaled_pos) * lambda_step_size
                    denoised_u = (denoised_d - old_denoised_d) / ((er_lambda_s - er_lambdas[i - 2]) / 2)
                    x = x + alpha_t * ((dt ** 2) / 2 + s_u * noise_scaler(er_lambda_t)) * denoised_u
                old_denoised_d = denoised_d

            if s_noise > 0:
                x = x + alpha_t * noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * (
                    er_lambda_t ** 2 - er_lambda_s ** 2 * r ** 2).sqrt().nan_to_num(nan=0.0)
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_seeds_2(model, x, sigmas, model_sampling, eta=1., s_noise=1., noise_sampler=None, r=0.5,
                   solver_type="phi_1"):
    if solver_type not in {"phi_1", "phi_2"}:
        raise ValueError("solver_type must be 'phi_1' or 'phi_2'")
    s_in = x.new_ones([x.shape[0]])
    s_noise = s_noise * getattr(model_sampling, "noise_scale", 1.0)
    inject_noise = eta > 0 and s_noise > 0
    sigma_fn = partial(half_log_snr_to_sigma, model_sampling=model_sampling)
    lambda_fn = partial(sigma_to_half_log_snr, model_sampling=model_sampling)
    sigmas = offset_first_sigma_for_snr(sigmas, model_sampling)

    fac = 1 / (2 * r)

    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)

        if sigmas[i + 1] == 0:
            x = denoised
            continue

        lambda_s, lambda_t = lambda_fn(sigmas[i]), lambda_fn(sigmas[i + 1])
        h = lambda_t - lambda_s
        h_eta = h * (eta + 1)
        lambda_s_1 = torch.lerp(lambda_s, lambda_t, r)
        sigma_s_1 = sigma_fn(lambda_s_1)

        alpha_s_1 = sigma_s_1 * lambda_s_1.exp()
        alpha_t = sigmas[i + 1] * lambda_t.exp()

        # Step 1
        x_2 = sigma_s_1 / sigmas[i] * (-r * h * eta).exp() * x - alpha_s_1 * ei_h_phi_1(-r * h_eta) * denoised
        if inject_noise:
            sde_noise = (-2 * r * h * eta).expm1().neg().sqrt() * noise_sampler(sigmas[i], sigma_s_1)
            x_2 = x_2 + sde_noise * sigma_s_1 * s_noise
        denoised_2 = model(x_2, sigma_s_1 * s_in)

        # Step 2
        if solver_type == "phi_1":
            denoised_d = torch.lerp(denoised, denoised_2, fac)
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * ei_h_phi_1(-h_eta) * denoised_d
        elif solver_type == "phi_2":
            b2 = ei_h_phi_2(-h_eta) / r
            b1 = ei_h_phi_1(-h_eta) - b2
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * (b1 * denoised + b2 * denoised_2)

        if inject_noise:
            segment_factor = (r - 1) * h * eta
            sde_noise = sde_noise * segment_factor.exp()
            sde_noise = sde_noise + segment_factor.mul(2).expm1().neg().sqrt() * noise_sampler(sigma_s_1, sigmas[i + 1])
            x = x + sde_noise * sigmas[i + 1] * s_noise
    return x


@torch.no_grad()
def sample_seeds_3(model, x, sigmas, model_sampling, eta=1., s_noise=1., noise_sampler=None, r_1=1./3, r_2=2./3):
    s_in = x.new_ones([x.shape[0]])
    s_noise = s_noise * getattr(model_sampling, "noise_scale", 1.0)
    inject_noise = eta > 0 and s_noise > 0
    sigma_fn = partial(half_log_snr_to_sigma, model_sampling=model_sampling)
    lambda_fn = partial(sigma_to_half_log_snr, model_sampling=model_sampling)
    sigmas = offset_first_sigma_for_snr(sigmas, model_sampling)

    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)

        if sigmas[i + 1] == 0:
            x = denoised
            continue

        lambda_s, lambda_t = lambda_fn(sigmas[i]), lambda_fn(sigmas[i + 1])
        h = lambda_t - lambda_s
        h_eta = h * (eta + 1)
        lambda_s_1 = torch.lerp(lambda_s, lambda_t, r_1)
        lambda_s_2 = torch.lerp(lambda_s, lambda_t, r_2)
        sigma_s_1, sigma_s_2 = sigma_fn(lambda_s_1), sigma_fn(lambda_s_2)

        alpha_s_1 = sigma_s_1 * lambda_s_1.exp()
        alpha_s_2 = sigma_s_2 * lambda_s_2.exp()
        alpha_t = sigmas[i + 1] * lambda_t.exp()

        # Step 1
        x_2 = sigma_s_1 / sigmas[i] * (-r_1 * h * eta).exp() * x - alpha_s_1 * ei_h_phi_1(-r_1 * h_eta) * denoised
        if inject_noise:
            sde_noise = (-2 * r_1 * h * eta).expm1().neg().sqrt() * noise_sampler(sigmas[i], sigma_s_1)
            x_2 = x_2 + sde_noise * sigma_s_1 * s_noise
        denoised_2 = model(x_2, sigma_s_1 * s_in)

        # Step 2
        a3_2 = r_2 / r_1 * ei_h_phi_2(-r_2 * h_eta)
        a3_1 = ei_h_phi_1(-r_2 * h_eta) - a3_2
        x_3 = sigma_s_2 / sigmas[i] * (-r_2 * h * eta).exp() * x - alpha_s_2 * (a3_1 * denoised + a3_2 * denoised_2)
        if inject_noise:
            segment_factor = (r_1 - r_2) * h * eta
            sde_noise = sde_noise * segment_factor.exp()
            sde_noise = sde_noise + segment_factor.mul(2).expm1().neg().sqrt() * noise_sampler(sigma_s_1, sigma_s_2)
            x_3 = x_3 + sde_noise * sigma_s_2 * s_noise
        denoised_3 = model(x_3, sigma_s_2 * s_in)

        # Step 3
        b3 = ei_h_phi_2(-h_eta) / r_2
        b1 = ei_h_phi_1(-h_eta) - b3
        x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * (b1 * denoised + b3 * denoised_3)
        if inject_noise:
            segment_factor = (r_2 - 1) * h * eta
            sde_noise = sde_noise * segment_factor.exp()
            sde_noise = sde_noise + segment_factor.mul(2).expm1().neg().sqrt() * noise_sampler(sigma_s_2, sigmas[i + 1])
            x = x + sde_noise * sigmas[i + 1] * s_noise
    return x


@torch.no_grad()
def sample_sa_solver(model, x, sigmas, model_sampling, tau_func=None, s_noise=1.0, noise_sampler=None,
                     predictor_order=3, corrector_order=4, use_pece=False, simple_order_2=False):
    if len(sigmas) <= 1:
        return x
    s_in = x.new_ones([x.shape[0]])

    s_noise = s_noise * getattr(model_sampling, "noise_scale", 1.0)
    sigmas = offset_first_sigma_for_snr(sigmas, model_sampling)
    lambdas = sigma_to_half_log_snr(sigmas, model_sampling=model_sampling)

    if tau_func is None:
        # Use default interval for stochastic sampling
        start_sigma = model_sampling.percent_to_sigma(0.2)
        end_sigma = model_sampling.percent_to_sigma(0.8)
        tau_func = get_tau_interval_func(start_sigma, end_sigma, eta=1.0)

    max_used_order = max(predictor_order, corrector_order)
    x_pred = x  # x: current state, x_pred: predicted next state

    h = 0.0
    tau_t = 0.0
    noise = 0.0
    pred_list = []

    # Lower order near the end to improve stability
    lower_order_to_end = sigmas[-1].item() == 0

    for i in range(len(sigmas) - 1):
        # Evaluation
        denoised = model(x_pred, sigmas[i] * s_in)
        pred_list.append(denoised)
        pred_list = pred_list[-max_used_order:]

        predictor_order_used = min(predictor_order, len(pred_list))
        if i == 0 or (sigmas[i + 1] == 0 and not use_pece):
            corrector_order_used = 0
        else:
            corrector_order_used = min(corrector_order, len(pred_list))

        if lower_order_to_end:
            predictor_order_used = min(predictor_order_used, len(sigmas) - 2 - i)
            corrector_order_used = min(corrector_order_used, len(sigmas) - 1 - i)

        # Corrector
        if corrector_order_used == 0:
            # Update by the predicted state
            x = x_pred
        else:
            curr_lambdas = lambdas[i - corrector_order_used + 1:i + 1]
            b_coeffs = compute_stochastic_adams_b_coeffs(
                sigmas[i], curr_lambdas, lambdas[i - 1], lambdas[i], tau_t, simple_order_2, is_corrector_step=True)
            pred_mat = torch.stack(pred_list[-corrector_order_used:], dim=1)    # (B, K, ...)
            corr_res = torch.tensordot(pred_mat, b_coeffs, dims=([1], [0]))  # (B, ...)
            x = sigmas[i] / sigmas[i - 1] * (-(tau_t ** 2) * h).exp() * x + corr_res

            if tau_t > 0 and s_noise > 0:
                # The noise from the previous predictor step
                x = x + noise

            if use_pece:
                # Evaluate the corrected state
                denoised = model(x, sigmas[i] * s_in)
                pred_list[-1] = denoised

        # Predictor
        if sigmas[i + 1] == 0:
            # Denoising step
            x_pred = denoised
        else:
            tau_t = tau_func(sigmas[i + 1])
            curr_lambdas = lambdas[i - predictor_order_used + 1:i + 1]
            b_coeffs = compute_stochastic_adams_b_coeffs(
                sigmas[i + 1], curr_lambdas, lambdas[i], lambdas[i + 1], tau_t, simple_order_2,
                is_corrector_step=False)
            pred_mat = torch.stack(pred_list[-predictor_order_used:], dim=1)    # (B, K, ...)
            pred_res = torch.tensordot(pred_mat, b_coeffs, dims=([1], [0]))  # (B, ...)
            h = lambdas[i + 1] - lambdas[i]
            x_pred = sigmas[i + 1] / sigmas[i] * (-(tau_t ** 2) * h).exp() * x + pred_res

            if tau_t > 0 and s_noise > 0:
                noise = noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * tau_t ** 2 * h).expm1().neg(
                ).sqrt() * s_noise
                x_pred = x_pred + noise
    return x_pred


@torch.no_grad()
def sample_sa_solver_pece(model, x, sigmas, model_sampling, tau_func=None, s_noise=1.0, noise_sampler=None,
                          predictor_order=3, corrector_order=4, simple_order_2=False):
    return sample_sa_solver(model, x, sigmas, model_sampling, tau_func=tau_func, s_noise=s_noise,
                            noise_sampler=noise_sampler, predictor_order=predictor_order,
                            corrector_order=corrector_order, use_pece=True, simple_order_2=simple_order_2)


REFERENCES = {
    "er_sde": sample_er_sde,
    "seeds_2": sample_seeds_2,
    "seeds_3": sample_seeds_3,
    "sa_solver": sample_sa_solver,
    "sa_solver_pece": sample_sa_solver_pece,
}
"""The KSAMPLER_NAMES sdlab had left out, with ComfyUI's functions (KSampler: their defaults)."""


# -- the comparisons ---------------------------------------------------------------------------------------------
def mixture_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The exact denoiser of data 0.5 N(-1, 0.3^2) + 0.5 N(1, 0.3^2) per element: nonlinear in x."""
    s2 = sigma.reshape(-1, 1, 1, 1).to(x.dtype) ** 2
    means = torch.tensor([-1.0, 1.0], dtype=x.dtype).reshape(2, 1, 1, 1, 1)
    weights = torch.softmax(-((x - means) ** 2) / (2 * (0.09 + s2)), dim=0)           # (2, B, C, h, w)
    return (weights * (means * s2 + x * 0.09) / (0.09 + s2)).sum(0)


class RecordedNoise:
    """Unit Gaussian noise from its own generator, one draw per call, recording the sigmas it is asked for."""

    def __init__(self, seed: int, like: torch.Tensor) -> None:
        self.generator, self.like, self.asked = torch.Generator().manual_seed(seed), like, []

    def __call__(self, sigma, sigma_next):
        self.asked.append((float(sigma), float(sigma_next)))
        return torch.randn(self.like.shape, generator=self.generator, dtype=self.like.dtype)


@pytest.fixture(scope="module")
def comfy():
    return C.ModelSamplingDiscrete()


SD_SAMPLING = DiscreteModelSampling(NoiseSchedule.sd(), "eps")


def run_both(name, model, x, sigmas, comfy, ours_options=None, reference_options=None):
    """sdlab's row and ComfyUI's function from the same x and noise: (ours, reference, ours' noise, theirs)."""
    ours_noise, reference_noise = RecordedNoise(7, x), RecordedNoise(7, x)
    spec = get_sampler(name)
    extra = {"t_to_sigma": comfyui_timestep_sigma(SD_SAMPLING)} if spec.wants_t_to_sigma else {}   # generate's
    ours = spec.fn(model, x.clone(), sigmas, noise=ours_noise, **extra, **(ours_options or {}))
    reference = REFERENCES[name](model, x.clone(), sigmas, comfy, noise_sampler=reference_noise,
                                 **(reference_options or {}))
    return ours, reference, ours_noise, reference_noise


@pytest.mark.parametrize("name", list(REFERENCES))
@pytest.mark.parametrize("scheduler", ["karras", "normal", "simple", "exponential"])
def test_samplers_match_comfyui(comfy, name, scheduler):
    """Every step count from 1 to 20 on ComfyUI's KSampler sigmas; the noise source is asked for the same sigma
    pairs in the same order (a Brownian tree, or the step count of a Gaussian stream, would see no difference)."""
    for steps in (1, 2, 3, 4, 5, 6, 7, 10, 20):
        sigmas = C.ksampler_sigmas(comfy, name, scheduler, steps).double()
        x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(steps), dtype=torch.float64) * sigmas[0]
        ours, reference, ours_noise, reference_noise = run_both(name, mixture_denoiser, x, sigmas, comfy)
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10, msg=f"{steps} steps")
        np.testing.assert_allclose(ours_noise.asked, reference_noise.asked, rtol=1e-12, err_msg=f"{steps} steps")


OPTIONS = [  # (name, sdlab's options, ComfyUI's)
    ("er_sde", {"s_noise": 0.5}, {"s_noise": 0.5}),
    ("er_sde", {"s_noise": 0.0}, {"s_noise": 0.0}),
    ("er_sde", {"max_stage": 2}, {"max_stage": 2}),
    ("er_sde", {"max_stage": 1}, {"max_stage": 1}),
    ("seeds_2", {"eta": 0.0}, {"eta": 0.0}),
    ("seeds_2", {"eta": 0.5, "s_noise": 0.8}, {"eta": 0.5, "s_noise": 0.8}),
    ("seeds_2", {"solver_type": "phi_2", "r": 1.0}, {"solver_type": "phi_2", "r": 1.0}),
    ("seeds_2", {"solver_type": "phi_2", "r": 0.3}, {"solver_type": "phi_2", "r": 0.3}),
    ("seeds_3", {"eta": 0.0}, {"eta": 0.0}),
    ("seeds_3", {"eta": 0.7, "r_1": 0.25, "r_2": 0.6}, {"eta": 0.7, "r_1": 0.25, "r_2": 0.6}),
    ("sa_solver", {"eta": 0.0}, {"tau_func": lambda sigma: 0.0}),
    ("sa_solver", {"eta": 0.6, "s_noise": 0.9}, {"eta": 0.6, "s_noise": 0.9}),
    ("sa_solver", {"predictor_order": 2, "corrector_order": 1}, {"predictor_order": 2, "corrector_order": 1}),
    ("sa_solver_pece", {"predictor_order": 4, "corrector_order": 2},
     {"predictor_order": 4, "corrector_order": 2}),
]


@pytest.mark.parametrize("name, ours_options, reference_options", OPTIONS,
                         ids=[f"{c[0]}-{'-'.join(map(str, c[1].items()))}" for c in OPTIONS])
def test_options_match_comfyui(comfy, name, ours_options, reference_options):
    """The functions' other options (ComfyUI's SamplerER_SDE / SamplerSEEDS2 / SamplerSASolver nodes set them);
    SA-Solver's eta is its tau inside the KSampler's interval."""
    if "eta" in reference_options and name.startswith("sa_solver"):
        eta = reference_options.pop("eta")
        reference_options["tau_func"] = get_tau_interval_func(comfy.percent_to_sigma(0.2), comfy.percent_to_sigma(0.8),
                                                              eta)
    for steps in (3, 10, 20):
        sigmas = C.ksampler_sigmas(comfy, name, "karras", steps).double()
        x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(steps), dtype=torch.float64) * sigmas[0]
        ours, reference, ours_noise, reference_noise = run_both(name, mixture_denoiser, x, sigmas, comfy,
                                                                ours_options, dict(reference_options))
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10, msg=f"{steps} steps")
        assert len(ours_noise.asked) == len(reference_noise.asked)


def test_an_img2img_tail_keeps_the_orders_of_a_schedule_ending_at_zero(comfy):
    """A schedule cut from the middle (KSampler's denoise) and one ending above 0 (its last_step): SA-Solver
    lowers its orders towards the end only when the sigmas end at 0."""
    full = C.ksampler_sigmas(comfy, "sa_solver", "karras", 12).double()
    for sigmas in (C.ksampler_sigmas(comfy, "sa_solver", "karras", 8, 0.5).double(), full[:9]):
        x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3), dtype=torch.float64) * sigmas[0]
        for name in ("sa_solver", "sa_solver_pece", "er_sde", "seeds_3"):
            ours, reference, _, _ = run_both(name, mixture_denoiser, x, sigmas, comfy)
            torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0])
def test_sa_solver_weights_are_comfyuis(order, tau):
    """`adams_weights` (moments by recursion) against `compute_stochastic_adams_b_coeffs` (by a matrix), on
    half-log-SNR points of a Karras schedule."""
    lambdas = (-torch.tensor([14.6, 6.1, 2.3, 0.9, 0.31, 0.08], dtype=torch.float64).log()).tolist()
    for i in range(order, len(lambdas) - 1):
        points = lambdas[i - order + 1:i + 1]
        ours = adams_weights(points, lambdas[i], lambdas[i + 1], tau)
        reference = compute_stochastic_adams_b_coeffs(torch.tensor(math.exp(-lambdas[i + 1]), dtype=torch.float64),
                                                      torch.tensor(points, dtype=torch.float64),
                                                      torch.tensor(lambdas[i], dtype=torch.float64),
                                                      torch.tensor(lambdas[i + 1], dtype=torch.float64), tau)
        np.testing.assert_allclose(ours, reference.numpy(), rtol=1e-12, atol=1e-13)
    assert sum(adams_weights(lambdas[:order], lambdas[order - 1], lambdas[order], 0.0)) == pytest.approx(
        1 - math.exp(lambdas[order - 1] - lambdas[order]), rel=1e-12)   # the weights of D = const: 1 - sigma'/sigma


def test_sa_solver_sde_interval_is_comfyuis(comfy):
    """percent_to_sigma(0.2) and (0.8) of an SD model, as the generate loop gives SA-Solver its map
    (`plan.comfyui_timestep_sigma`): ComfyUI's float32 edges bit for bit (0.2's is the sigma of step 1 of `normal` at
    6 steps, which SA-Solver then runs as an SDE step, as ComfyUI's does)."""
    for percent in (0.2, 0.8):
        assert comfyui_percent_to_sigma(percent, comfyui_timestep_sigma(SD_SAMPLING)) == comfy.percent_to_sigma(percent)
    assert comfy.percent_to_sigma(0.2) == float(C.ksampler_sigmas(comfy, "sa_solver", "normal", 6)[1])


# comfy/samplers.py KSAMPLER_NAMES and SAMPLER_NAMES (comfy/sampler_names.py in later versions)
KSAMPLER_NAMES = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2", "dpm_2_ancestral",
    "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu",
    "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep",
    "res_multistep_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation",
    "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece",
]
SAMPLER_NAMES = KSAMPLER_NAMES + ["ddim", "uni_pc", "uni_pc_bh2"]


def test_every_comfyui_sampler_name_runs_its_row():
    """Each of ComfyUI's sampler names, as ComfyUI spells it, is a row's ComfyUI name."""
    for name in SAMPLER_NAMES:
        spec = get_sampler(name)
        assert name == spec.comfy or name in spec.comfy_aliases, name


def test_rows_tie_to_comfyuis_names():
    """ComfyUI's KSAMPLER_NAMES ending `er_sde`, `seeds_2`, `seeds_3`, `sa_solver`, `sa_solver_pece`: ComfyUI-only
    rows of Gaussian step noise, counting their model calls (SA-Solver's SDE interval reads t_to_sigma)."""
    calls = {"er_sde": 1, "seeds_2": 2, "seeds_3": 3, "sa_solver": 1, "sa_solver_pece": 2}
    for name, per_step in calls.items():
        spec = get_sampler(name)
        assert (spec.name, spec.a1111, spec.noise, spec.calls_per_step) == (name, None, "gaussian", per_step)
        assert name in sampler_names() and get_sampler(name.upper()) is spec
        assert spec.wants_t_to_sigma == name.startswith("sa_solver")
        count = []
        sigmas = C.ksampler_sigmas(C.ModelSamplingDiscrete(), name, "karras", 10)
        x = torch.randn((1, 4, 4, 4), generator=torch.Generator().manual_seed(0)) * sigmas[0]
        spec.fn(lambda x, sigma: count.append(1) or mixture_denoiser(x, sigma), x, sigmas, noise=RecordedNoise(0, x),
                **({"t_to_sigma": SD_SAMPLING.t_to_sigma} if spec.wants_t_to_sigma else {}))
        # the step to sigma 0 makes one call; SA-Solver's first step has no corrector to evaluate
        assert len(count) == {"sa_solver_pece": 2 * 10 - 1}.get(name, per_step * 9 + 1)


def test_without_noise_a_stochastic_run_says_what_it_needs():
    sigmas = C.ksampler_sigmas(C.ModelSamplingDiscrete(), "er_sde", "karras", 4)
    x = torch.zeros((1, 4, 4, 4))
    for name in REFERENCES:
        spec = get_sampler(name)
        extra = {"t_to_sigma": SD_SAMPLING.t_to_sigma} if spec.wants_t_to_sigma else {}
        with pytest.raises(ValueError, match="noise source"):
            spec.fn(mixture_denoiser, x, sigmas, **extra)
    with pytest.raises(ValueError, match="t_to_sigma"):
        get_sampler("sa_solver").fn(mixture_denoiser, x, sigmas)


# -- the shipped tiny model ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle():
    return sdlab.load().bundle


@pytest.mark.parametrize("name", list(REFERENCES))
def test_tiny_unet_matches_comfyui(bundle, comfy, name):
    """The shipped sdlab-tiny U-Net with classifier-free guidance at 5, 8 Karras steps, float32."""
    from sdlab.pipeline.conditioning import make_cond

    cond, uncond = make_cond(bundle.text_encoders, bundle.family, "a red circle", "blue", batch_size=2)
    model = cfg(Denoiser(bundle.unet, bundle.model_sampling), cond, uncond, 5.0)
    sigmas = C.ksampler_sigmas(comfy, name, "karras", 8)
    x = torch.randn((2, bundle.unet_config.out_channels, 8, 8), generator=torch.Generator().manual_seed(5)) * sigmas[0]
    ours, reference, _, _ = run_both(name, model, x, sigmas, comfy)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def _comfy_in_place_of_sdlab(name):
    """`_run_sampler` running ComfyUI's function for `name` on sdlab's guided model, noise source and sigmas."""
    def run_sampler(plan, model, x, sigmas, options, progress):
        return REFERENCES[name](model, x, sigmas, C.ModelSamplingDiscrete(), noise_sampler=options["noise"])
    return run_sampler


def test_cli_draws_comfyuis_picture(tmp_path, capsys, monkeypatch):
    """`sdlab txt2img --sampler sa_solver_pece` on the shipped tiny model: the picture ComfyUI's function draws in
    the sampler's place (to 1/255; its SDE interval from ComfyUI's table, sdlab's from the model's t_to_sigma),
    recorded under the row's name."""
    from sdlab.pipeline.png_info import parse_parameters, read_parameters

    name = "sa_solver_pece"
    args = ["txt2img", "a red circle", "--negative", "blue", "--seed", "3", "--steps", "8", "--schedule", "karras",
            "--no-progress", "--sampler", name]
    code, _, err = run([*args, "--out", str(tmp_path / "ours.png")], capsys)
    assert code == 0, err
    assert parse_parameters(read_parameters(tmp_path / "ours.png"))["Sampler"] == name
    with monkeypatch.context() as patch:
        patch.setattr(generate_module, "_run_sampler", _comfy_in_place_of_sdlab(name))
        code, _, err = run([*args, "--out", str(tmp_path / "comfy.png")], capsys)
    assert code == 0, err
    assert np.abs(pixels(tmp_path / "ours.png") - pixels(tmp_path / "comfy.png")).max() <= 1
