"""Model sampling: the discrete eps / v / x0 objects reproduce the former Denoiser arithmetic bit for bit,
training and sampling share one forward process, and a flow-matching object runs on the existing Euler
sampler with no sampler change."""

from __future__ import annotations

import math

import pytest
import torch

from sdlab.diffusion import loss
from sdlab.diffusion.denoiser import Denoiser
from sdlab.diffusion.discretization import initial_noise_sigma, karras_sigmas
from sdlab.diffusion.guidance import blend_known, cfg
from sdlab.diffusion.model_sampling import DiscreteModelSampling, FlowMatchingModelSampling, time_shift
from sdlab.diffusion.prediction import Prediction, prediction_scalings
from sdlab.diffusion.sampling_k import sample_euler
from sdlab.diffusion.sampling_ldm import to_ddpm_latent
from sdlab.diffusion.schedules import NoiseSchedule


def _net(x_in, t, context=None):
    """A fixed nonlinear fake network of x_in, t and a context."""
    out = torch.tanh(x_in) * 0.7 + (t / 1000.0).view(-1, 1, 1, 1)
    return out if context is None else out + context.mean() * x_in.sin()


def _x(seed=1, shape=(2, 4, 6, 5)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3.0


@pytest.mark.parametrize("schedule_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("prediction", list(Prediction))
@pytest.mark.parametrize("quantize", [False, True])
def test_discrete_denoiser_is_bit_identical_to_the_scalings(prediction, schedule_dtype, quantize):
    """Denoiser(net, DiscreteModelSampling(schedule, p)) computes exactly the former
    c_skip * x + c_out * net(c_in * x, schedule.sigma_to_t(sigma))."""
    schedule = NoiseSchedule.sd(dtype=schedule_dtype)
    x, sigma, context = _x(), torch.tensor([14.6146, 0.0371]), torch.randn(2, 3, 4)
    got = Denoiser(_net, DiscreteModelSampling(schedule, prediction), quantize=quantize)(x, sigma, context=context)

    c_skip, c_out, c_in = (c.view(-1, 1, 1, 1) for c in prediction_scalings(prediction, sigma))
    t = schedule.sigma_to_t(sigma, quantize=quantize).to(torch.float32)
    expected = c_skip * x + c_out * _net(x * c_in, t, context=context)
    assert torch.equal(got, expected)


def test_discrete_start_noise_is_bit_identical_to_the_former_start():
    """img2img: latent + noise * sigmas[0]; txt2img: noise * initial_noise_sigma(sigmas, convention)."""
    sampling = DiscreteModelSampling(NoiseSchedule.sd(), "eps")
    sigmas = karras_sigmas(sampling.schedule, 7)
    noise, latent = _x(2), _x(3)
    assert torch.equal(sampling.noise_scaling(sigmas[0], noise, latent), latent + noise * sigmas[0])
    for convention in ("sigma_max", "vp"):
        assert torch.equal(
            sampling.noise_scaling(sigmas[0], noise, init_noise=convention),
            noise * initial_noise_sigma(sigmas, convention),
        )
    assert torch.equal(sampling.inverse_noise_scaling(sigmas[-1], noise), to_ddpm_latent(noise, sigmas[-1]))
    assert torch.equal(sampling.inverse_noise_scaling(0.03, noise), to_ddpm_latent(noise, 0.03))


def test_blend_known_through_the_model_sampling_equals_the_ve_blend():
    sampling = DiscreteModelSampling(NoiseSchedule.sd(), "v")
    x, known, noise = _x(1), _x(2), _x(3)
    mask = (torch.rand(1, 1, 6, 5, generator=torch.Generator().manual_seed(4)) > 0.5).float()
    sigma = torch.tensor([3.2, 0.4])
    assert torch.equal(
        blend_known(x, sigma, known, mask, noise, sampling.noise_scaling), blend_known(x, sigma, known, mask, noise)
    )


@pytest.mark.parametrize("prediction", list(Prediction))
def test_cfg_rescale_defaults_to_the_model_samplings_space(prediction):
    sampling = DiscreteModelSampling(NoiseSchedule.sd(dtype=torch.float32), prediction)
    denoiser = Denoiser(_net, sampling)
    cond, uncond = {"context": torch.ones(2, 3, 4)}, {"context": torch.zeros(2, 3, 4)}
    x, sigma = _x(), torch.tensor([5.0, 0.5])
    default = cfg(denoiser, cond, uncond, 6.0, 0.7)(x, sigma)
    explicit = cfg(denoiser, cond, uncond, 6.0, 0.7, rescale_space=prediction)(x, sigma)
    assert torch.equal(default, explicit)


@pytest.mark.parametrize("prediction", list(Prediction))
def test_discrete_training_is_the_loss_modules_arithmetic(prediction):
    schedule = NoiseSchedule.sd()
    sampling = DiscreteModelSampling(schedule, prediction)
    ac32 = schedule.alphas_cumprod.to(torch.float32)   # what the U-Net task held before
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    t = sampling.sample_timesteps(gens)
    assert torch.equal(t, loss.sample_timesteps([torch.Generator().manual_seed(s) for s in (5, 6)], 1000))
    x0, noise = _x(7), _x(8)
    assert torch.equal(sampling.q_sample(x0, noise, t), loss.q_sample(x0, t, noise, ac32))
    assert torch.equal(sampling.training_target(x0, noise, t), loss.prediction_target(prediction, x0, noise, t, ac32))
    assert torch.equal(sampling.loss_weights(t, 5.0), loss.min_snr_weights(t, ac32, 5.0, prediction))
    assert sampling.loss_weights(t, None) is None


@pytest.mark.parametrize(
    "sampling",
    [*(DiscreteModelSampling(NoiseSchedule.sd(), p) for p in Prediction), FlowMatchingModelSampling(shift=3.0)],
    ids=["eps", "v", "x0", "flow"],
)
def test_training_and_sampling_share_one_forward_process(sampling):
    """A net that outputs exactly the training target for the training sample denoises the sampler's x
    (noise_scaling at the same level) back to x0: what a fine-tune learns is what the sampler asks."""
    x0, noise = _x(1).double(), _x(2).double()
    t = torch.tensor([999, 420]) if isinstance(sampling, DiscreteModelSampling) else torch.tensor([990.0, 420.0])
    sigma = sampling.t_to_sigma(t).double()                                    # (B,)
    x_train = sampling.q_sample(x0, noise, t)
    x = sampling.noise_scaling(sigma, noise, x0)                               # the sampler's x at sigma
    c_skip, c_out, c_in = (c.view(-1, 1, 1, 1) for c in sampling.scalings(sigma))
    torch.testing.assert_close(c_in * x, x_train)                             # the net sees the training sample
    torch.testing.assert_close(sampling.sigma_to_t(sigma).double(), t.double(), atol=1e-3, rtol=0)
    denoised = c_skip * x + c_out * sampling.training_target(x0, noise, t)
    torch.testing.assert_close(denoised, x0)


# -- flow matching ------------------------------------------------------------------------------------
def test_time_shift_is_sd3s_and_fluxs_map():
    s = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(time_shift(3.0, s), 3 * s / (1 + 2 * s))
    mu = 1.15   # Flux: exp(mu) / (exp(mu) + (1 / s - 1)) for s > 0
    torch.testing.assert_close(time_shift(math.exp(mu), s[1:]), math.exp(mu) / (math.exp(mu) + (1 / s[1:] - 1)))
    assert torch.equal(time_shift(1.0, s), s)
    sampling = FlowMatchingModelSampling(shift=3.0)
    assert sampling.sigma_max == 1.0 and sampling.sigma_min == pytest.approx(3e-3 / (1 + 2e-3))
    sigmas = sampling.sigmas(10)
    assert float(sigmas[0]) == 1.0 and float(sigmas[-1]) == 0.0 and bool((sigmas[1:] < sigmas[:-1]).all())


def _gaussian_velocity_net(mu: float, tau: float, multiplier: float = 1000.0):
    """The exact flow velocity E[e - x0 | x_s] for data x0 ~ N(mu, tau^2) per element, as a network of
    (x_in, t = s * multiplier); it records what it was fed."""
    seen = []

    def net(x_in, t):
        seen.append((x_in.clone(), t.clone()))
        s = (t.to(torch.float64) / multiplier).view(-1, 1, 1, 1)
        var = (1 - s) ** 2 * tau**2 + s**2
        centred = x_in.to(torch.float64) - (1 - s) * mu
        return ((s - (1 - s) * tau**2) / var * centred - mu).to(x_in.dtype)  # E[e|x] - E[x0|x]

    return net, seen


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_matching_runs_on_the_existing_euler_sampler(shift):
    """Euler from sampling_k, unchanged, through Denoiser and a flow-matching model sampling: with the exact
    velocity of a Gaussian the probability-flow ODE carries noise e to mu + tau * e, and Euler converges there."""
    mu, tau = 0.5, 0.3
    net, seen = _gaussian_velocity_net(mu, tau)
    sampling = FlowMatchingModelSampling(shift=shift)
    denoiser = Denoiser(net, sampling, dtype=torch.float64)
    e = _x(11).double() / 3.0
    exact = mu + tau * e

    errors = []
    for steps in (10, 40, 160):
        sigmas = sampling.sigmas(steps)
        x = sampling.noise_scaling(sigmas[0], e)                              # pure noise at s = 1
        out = sampling.inverse_noise_scaling(sigmas[-1], sample_euler(denoiser, x, sigmas))
        errors.append(float((out - exact).abs().max()))
    assert errors[-1] < 0.03
    assert all(3.5 < a / b < 4.5 for a, b in zip(errors, errors[1:]))          # first order: 4x steps, 1/4 the error
    x_in, t = seen[0]
    assert torch.equal(x_in, e.float().double()) and torch.equal(t, torch.full((2,), 1000.0))   # c_in = 1, t = s * 1000


def test_flow_matching_img2img_start_is_the_forward_process():
    sampling = FlowMatchingModelSampling(shift=3.0)
    latent, noise = _x(1), _x(2)
    s = float(sampling.sigmas(10)[4])
    torch.testing.assert_close(sampling.noise_scaling(s, noise, latent), (1 - s) * latent + s * noise)
    torch.testing.assert_close(sampling.inverse_noise_scaling(0.0, latent), latent)
    with pytest.raises(ValueError, match="Min-SNR"):
        sampling.loss_weights(torch.tensor([1.0]), 5.0)
    t = sampling.sample_timesteps([torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    assert t.dtype == torch.float32 and bool(((t >= 0) & (t <= 1000)).all())


def test_flow_schedule_is_the_shifted_table_the_discretizations_read():
    sampling = FlowMatchingModelSampling(shift=3.0)
    table = time_shift(3.0, torch.arange(1, 1001, dtype=torch.float64) / 1000)
    torch.testing.assert_close(sampling.schedule.sigmas, table)
    assert sampling.schedule.num_timesteps == 1000 and sampling.schedule.sigma_max == 1.0
    assert sampling.sigma_min == pytest.approx(float(table[0]))
    karras = karras_sigmas(sampling.schedule, 6)
    assert float(karras[0]) == 1.0 and float(karras[-2]) == pytest.approx(float(table[0]), rel=1e-6)
