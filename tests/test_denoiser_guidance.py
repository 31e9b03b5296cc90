"""The denoiser boundary, classifier-free guidance, inpaint masking and noise, against hand
computations and diffusers (scheduler conversions, ``rescale_noise_cfg``, ``randn_tensor``)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.utils.torch_utils import randn_tensor

from sdlab.diffusion.denoiser import Denoiser
from sdlab.diffusion.model_sampling import DiscreteModelSampling, Prediction
from sdlab.diffusion.guidance import blend_known, cfg, masked
from sdlab.diffusion.noise import generators_for, initial_noise, per_image_noise
from sdlab.diffusion.schedules import NoiseSchedule

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


class RecordingNet:
    """A fake network: output depends on x_in, t and context; remembers every call."""

    def __init__(self, channels_out: int = 4):
        self.calls: list[dict] = []
        self.channels_out = channels_out

    def __call__(self, x_in, t, context=None, y=None):
        self.calls.append(dict(x_in=x_in.clone(), t=t.clone(), context=context, y=y))
        out = torch.tanh(x_in[:, : self.channels_out]) * 0.7 + (t / 1000.0).view(-1, 1, 1, 1)
        if context is not None:
            out = out + context.mean(dim=(1, 2)).view(-1, 1, 1, 1) * x_in[:, : self.channels_out].sin()
        if y is not None:
            out = out + y.mean(dim=1).view(-1, 1, 1, 1)
        return out


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule.sd(dtype=torch.float32)


def _x(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 6, 5, generator=g) * 3.0


# -- Prediction -------------------------------------------------------------------------------
def test_prediction_parse_accepts_diffusers_names():
    assert Prediction.parse("epsilon") is Prediction.EPS
    assert Prediction.parse("EPS") is Prediction.EPS
    assert Prediction.parse("v_prediction") is Prediction.V
    assert Prediction.parse("v") is Prediction.V
    assert Prediction.parse("sample") is Prediction.X0
    assert Prediction.parse(Prediction.X0) is Prediction.X0
    with pytest.raises(ValueError, match="epsilon"):
        Prediction.parse("flow")


# -- Denoiser ---------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", list(Prediction))
def test_denoiser_matches_hand_computation(prediction, schedule):
    net = RecordingNet()
    denoiser = Denoiser(net, DiscreteModelSampling(schedule, prediction))
    x = _x()
    sigma = torch.tensor([14.6, 0.37])
    context = torch.randn(2, 7, 3)
    x0 = denoiser(x, sigma, context=context)

    (call,) = net.calls
    s = sigma.view(-1, 1, 1, 1)
    x_in = x / (s**2 + 1) ** 0.5
    torch.testing.assert_close(call["x_in"], x_in)
    torch.testing.assert_close(call["t"], schedule.sigma_to_t(sigma))
    assert call["context"] is not None and torch.equal(call["context"], context)
    out = net(x_in, call["t"], context=context)
    expected = {
        Prediction.EPS: x - s * out,
        Prediction.V: x / (s**2 + 1) - s / (s**2 + 1) ** 0.5 * out,
        Prediction.X0: out,
    }[prediction]
    torch.testing.assert_close(x0, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_denoiser_matches_diffusers_euler(prediction_type, schedule):
    ref = EulerDiscreteScheduler(**SD, prediction_type=prediction_type, timestep_spacing="leading")
    ref.set_timesteps(10)
    output = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(3))
    net = RecordingNet()
    denoiser = Denoiser(lambda x_in, t, **c: net(x_in, t, **c) * 0 + output, DiscreteModelSampling(schedule, prediction_type))
    worst = 0.0
    for i in (0, 4, 9):
        ref._step_index = None
        sample = _x(seed=i)
        timestep = ref.timesteps[i]
        scaled = ref.scale_model_input(sample, timestep)
        reference = ref.step(output, timestep, sample).pred_original_sample
        sigma = ref.sigmas[i].expand(2)
        x0 = denoiser(sample, sigma)
        torch.testing.assert_close(net.calls[-1]["x_in"], scaled, rtol=1e-6, atol=1e-6)
        # the continuous t found from sigma is the discrete timestep diffusers feeds
        torch.testing.assert_close(net.calls[-1]["t"], timestep.expand(2), rtol=0, atol=2e-3)
        torch.testing.assert_close(x0, reference, rtol=1e-5, atol=1e-5)
        worst = max(worst, (x0 - reference).abs().max().item())
    assert worst < 1e-5


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_denoiser_matches_diffusers_ddim_in_vp_scaling(prediction_type, schedule):
    """DDIM works on VP samples x_vp = sqrt(ac) * x_ve; its predicted x0 must equal ours."""
    ref = DDIMScheduler(**SD, prediction_type=prediction_type, set_alpha_to_one=False, clip_sample=False)
    ref.set_timesteps(20)
    output = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(4))
    denoiser = Denoiser(lambda x_in, t, **c: output, DiscreteModelSampling(schedule, prediction_type))
    for t in ref.timesteps[[0, 7, 19]]:
        ac = ref.alphas_cumprod[t]
        x_vp = _x(seed=int(t))
        reference = ref.step(output, t, x_vp).pred_original_sample
        sigma = ((1 - ac) / ac) ** 0.5
        x0 = denoiser(x_vp / ac**0.5, sigma.expand(2))
        torch.testing.assert_close(x0, reference, rtol=1e-5, atol=1e-5)


def test_denoiser_concat_channels_and_scalar_sigma(schedule):
    net = RecordingNet()
    denoiser = Denoiser(net, DiscreteModelSampling(schedule, "eps"))
    x = _x()
    concat = torch.randn(2, 5, 6, 5)  # mask (1) + masked-image latent (4)
    denoiser(x, 2.0, concat=concat)
    x_in = net.calls[-1]["x_in"]
    assert x_in.shape == (2, 9, 6, 5)
    torch.testing.assert_close(x_in[:, :4], x / math.sqrt(5.0))
    assert torch.equal(x_in[:, 4:], concat)  # unscaled, after the noisy latent
    with pytest.raises(ValueError, match="entries for a batch"):
        denoiser(x, torch.tensor([1.0, 2.0, 3.0]))


def test_denoiser_feeds_the_net_its_dtype_and_returns_x_dtype(schedule):
    class HalfNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones((), dtype=torch.bfloat16))
            self.seen = {}

        def forward(self, x_in, t, context=None):
            self.seen = dict(x=x_in.dtype, t=t.dtype, context=context.dtype)
            return x_in * self.w

    net = HalfNet()
    x0 = Denoiser(net, DiscreteModelSampling(schedule, "v"))(_x(), torch.tensor([1.0, 3.0]), context=torch.randn(2, 3, 4))
    assert net.seen == dict(x=torch.bfloat16, t=torch.float32, context=torch.bfloat16)
    assert x0.dtype == torch.float32


# -- CFG --------------------------------------------------------------------------------------
def _conds(batch=2, tokens_u=7):
    g = torch.Generator().manual_seed(5)
    cond = dict(context=torch.randn(batch, 7, 3, generator=g), y=torch.randn(batch, 6, generator=g))
    uncond = dict(context=torch.randn(batch, tokens_u, 3, generator=g), y=torch.randn(batch, 6, generator=g))
    return cond, uncond


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_cfg_batched_equals_two_calls(prediction, schedule):
    net = RecordingNet()
    denoiser = Denoiser(net, DiscreteModelSampling(schedule, prediction))
    cond, uncond = _conds()
    x, sigma = _x(), torch.tensor([5.0, 0.5])
    guided = cfg(denoiser, cond, uncond, 7.5)(x, sigma)
    assert len(net.calls) == 1 and net.calls[0]["x_in"].shape[0] == 4
    x0_c = denoiser(x, sigma, **cond)
    x0_u = denoiser(x, sigma, **uncond)
    torch.testing.assert_close(guided, x0_u + 7.5 * (x0_c - x0_u), rtol=1e-5, atol=1e-5)


def test_cfg_runs_two_passes_when_conds_do_not_batch(schedule):
    net = RecordingNet()
    cond, uncond = _conds(tokens_u=14)  # a longer negative prompt
    x, sigma = _x(), torch.tensor([5.0, 0.5])
    denoiser = Denoiser(net, DiscreteModelSampling(schedule, "eps"))
    guided = cfg(denoiser, cond, uncond, 3.0)(x, sigma)
    assert len(net.calls) == 2
    x0_c, x0_u = denoiser(x, sigma, **cond), denoiser(x, sigma, **uncond)
    torch.testing.assert_close(guided, x0_u + 3.0 * (x0_c - x0_u))


def test_cfg_single_pass_when_scale_is_one_or_no_uncond(schedule):
    cond, uncond = _conds()
    x, sigma = _x(), torch.tensor([5.0, 0.5])
    for scale, neg in ((1.0, uncond), (7.0, None)):
        net = RecordingNet()
        out = cfg(Denoiser(net, DiscreteModelSampling(schedule, "eps")), cond, neg, scale)(x, sigma)
        assert len(net.calls) == 1 and net.calls[0]["x_in"].shape[0] == 2
        torch.testing.assert_close(out, Denoiser(RecordingNet(), DiscreteModelSampling(schedule, "eps"))(x, sigma, **cond))


@pytest.mark.parametrize("scale", [math.inf, -math.inf, math.nan])
def test_cfg_rejects_non_finite_scale(scale, schedule):
    cond, uncond = _conds()
    with pytest.raises(ValueError, match="finite"):
        cfg(Denoiser(RecordingNet(), DiscreteModelSampling(schedule, "eps")), cond, uncond, scale)


def test_cfg_rejects_mismatched_keys(schedule):
    """A pair that cannot run as one batch is refused at its first guided call, before the network runs."""
    cond, uncond = _conds()
    del uncond["y"]
    net = RecordingNet()
    with pytest.raises(ValueError, match="same keys"):
        cfg(Denoiser(net, DiscreteModelSampling(schedule, "eps")), cond, uncond, 5.0)(_x(), torch.tensor([5.0, 0.5]))
    assert net.calls == []


def test_cfg_leaves_a_pair_it_does_not_run_unbatched(schedule):
    """At scale 1 the negative pass never runs, so cfg neither batches nor checks the pair: options that could not
    share a batch (here a key the prompt lacks) are no error, and the result is the conditional prediction."""
    cond, uncond = _conds()
    del uncond["y"]
    x, sigma = _x(), torch.tensor([5.0, 0.5])
    denoiser = Denoiser(RecordingNet(), DiscreteModelSampling(schedule, "eps"))
    torch.testing.assert_close(cfg(denoiser, cond, uncond, 1.0)(x, sigma), denoiser(x, sigma, **cond))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("rescale", [0.0, 0.7, 1.0])
def test_cfg_rescale_matches_diffusers_pipeline(prediction_type, rescale, schedule):
    """diffusers' SD pipeline: noise_pred = u + s (c - u); rescale_noise_cfg(noise_pred, c, phi) on the
    raw U-Net output (eps or v), then the scheduler converts to x0."""
    net = RecordingNet()
    denoiser = Denoiser(net, DiscreteModelSampling(schedule, prediction_type))
    cond, uncond = _conds()
    ref = EulerDiscreteScheduler(**SD, prediction_type=prediction_type, timestep_spacing="trailing")
    ref.set_timesteps(8)
    for i in (0, 5):
        ref._step_index = None
        x = _x(seed=10 + i)
        timestep, sigma = ref.timesteps[i], ref.sigmas[i]
        x_in = ref.scale_model_input(x, timestep)
        t = schedule.sigma_to_t(sigma.expand(2))
        out_u, out_c = net(x_in, t, **uncond), net(x_in, t, **cond)
        noise_pred = out_u + 6.0 * (out_c - out_u)
        if rescale > 0:
            noise_pred = rescale_noise_cfg(noise_pred, out_c, guidance_rescale=rescale)
        expected = ref.step(noise_pred, timestep, x).pred_original_sample
        ours = cfg(denoiser, cond, uncond, 6.0, rescale)(x, sigma.expand(2))
        torch.testing.assert_close(ours, expected, rtol=2e-5, atol=2e-5)


def test_cfg_rescale_space_changes_result(schedule):
    cond, uncond = _conds()
    x, sigma = _x(), torch.tensor([2.0, 2.0])
    denoiser = Denoiser(RecordingNet(), DiscreteModelSampling(schedule, "eps"))
    a = cfg(denoiser, cond, uncond, 6.0, 0.7)(x, sigma)
    b = cfg(denoiser, cond, uncond, 6.0, 0.7, rescale_space="x0")(x, sigma)
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="rescale"):
        cfg(denoiser, cond, uncond, 6.0, 1.5)


# -- inpaint masking --------------------------------------------------------------------------
def test_masked_blends_input_and_pastes_known_output(schedule):
    net = RecordingNet()
    inner = Denoiser(net, DiscreteModelSampling(schedule, "eps"))
    x0_known, noise = _x(seed=20), _x(seed=21) / 3
    mask = torch.zeros(1, 1, 6, 5)
    mask[..., 2:5, 1:4] = 1.0  # generate here
    x, sigma = _x(seed=22), torch.tensor([3.0, 3.0])
    x0 = masked(inner, x0_known, mask, noise)(x, sigma)

    blended = mask * x + (1 - mask) * (x0_known + 3.0 * noise)
    torch.testing.assert_close(net.calls[0]["x_in"], blended / math.sqrt(10.0))
    keep = mask.expand_as(x0) == 0
    assert torch.equal(x0[keep], x0_known[keep])
    torch.testing.assert_close(x0[~keep], inner(blended, sigma)[~keep])
    torch.testing.assert_close(blend_known(x, sigma, x0_known, mask, noise), blended)


def test_masked_euler_step_reproduces_diffusers_blend(schedule):
    """One Euler step with the masked denoiser leaves the known region at x0 + noise * sigma_next,
    which is what diffusers' inpaint pipeline writes there after each step."""
    inner = Denoiser(RecordingNet(), DiscreteModelSampling(schedule, "eps"))
    x0_known, noise = _x(seed=30), _x(seed=31) / 3
    mask = (torch.rand(1, 1, 6, 5, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    sigma, sigma_next = torch.tensor([4.0, 4.0]), 2.5
    x = blend_known(_x(seed=32), sigma, x0_known, mask, noise)
    x0 = masked(inner, x0_known, mask, noise)(x, sigma)
    x_next = x + (x - x0) / 4.0 * (sigma_next - 4.0)
    torch.testing.assert_close(x_next, blend_known(x_next, sigma_next, x0_known, mask, noise), rtol=1e-6, atol=1e-6)


# -- noise ------------------------------------------------------------------------------------
@pytest.mark.parametrize("hw", [(8, 6), (5, 5)])
def test_initial_noise_matches_diffusers_generator_list(hw):
    seeds = [11, 12, 13]
    shape = (3, 4, *hw)
    ours = initial_noise(shape, seeds, torch.float16)
    # diffusers draws in the pipeline dtype: same values as a float32 draw when an image has a
    # multiple of 16 elements (4*8*6 = 192), otherwise only with draw_dtype (4*5*5 = 100).
    reference = randn_tensor(shape, generator=generators_for(seeds), dtype=torch.float16)
    assert torch.equal(ours, reference) == (4 * hw[0] * hw[1] % 16 == 0)
    assert torch.equal(initial_noise(shape, seeds, torch.float16, draw_dtype=torch.float16), reference)
    assert torch.equal(initial_noise(shape, seeds), randn_tensor(shape, generator=generators_for(seeds)))
    # image i depends only on its own seed, whatever the batch
    assert torch.equal(initial_noise((1, 4, *hw), [12], torch.float16)[0], ours[1])
    with pytest.raises(ValueError, match="seeds"):
        initial_noise((2, 4, *hw), [1], torch.float32)


@pytest.mark.parametrize("draw_dtype", [torch.float32, torch.bfloat16])
def test_per_image_noise_continues_each_generator(draw_dtype):
    seeds, shape = [3, 4], (2, 4, 5, 5)
    like = torch.empty(shape, dtype=torch.bfloat16)
    ours_gens, ref_gens = generators_for(seeds), generators_for(seeds)
    first = initial_noise(shape, seeds)
    # the initial latents consume one draw from each generator, then the sampler draws per step
    for gens in (ours_gens, ref_gens):
        randn_tensor(shape, generator=gens)
    source = per_image_noise(ours_gens, like, draw_dtype=draw_dtype)
    for sigma, sigma_next in ((2.0, 1.0), (1.0, 0.5)):
        step = source(torch.tensor(sigma), torch.tensor(sigma_next))
        assert step.dtype == torch.bfloat16 and step.shape == like.shape
        expected = randn_tensor(shape, generator=ref_gens, dtype=draw_dtype).to(torch.bfloat16)
        assert torch.equal(step, expected)
        assert not torch.equal(first.bfloat16(), step)
    with pytest.raises(ValueError, match="generators"):
        per_image_noise(generators_for([1]), like)
