"""ComfyUI's CFG++ samplers (`*_cfg_pp`): each against ComfyUI's function, transcribed below, and the guidance that
hands them the unguided prediction (`guidance.with_unguided`).

The reference is comfyanonymous/ComfyUI `comfy/k_diffusion/sampling.py` (`sample_euler_ancestral_cfg_pp`,
`sample_euler_cfg_pp`, `sample_dpmpp_2s_ancestral_cfg_pp`, `sample_dpmpp_2m_cfg_pp`, `res_multistep`,
`sample_gradient_estimation`), their variance-exploding branch (ComfyUI's `model_sampling` not CONST:
`sigma_to_half_log_snr` = -log sigma), with progress bars, callbacks and the CONST branches left out, and the way
ComfyUI hands them the unconditional prediction: `comfy/samplers.py` `sampling_function` / `cfg_function` (the
`sampler_post_cfg_function` hook, `disable_cfg1_optimization`) and `comfy/model_patcher.py`
`set_model_options_post_cfg_function`. The toy-denoiser comparisons run in float64 and agree to 1e-13 (tolerance
1e-10): in float32 the two round differently (ComfyUI takes logs and exps of float32 tensors, and its alpha =
sigma * exp(-log sigma) is 1 only to a rounding), up to 9e-5 of a sample of size 6 at CFG 4 and 10 steps, where the
toy's steep posterior amplifies it; the tiny U-Net runs in float32 (tolerance 1e-4).
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
from sdlab.diffusion.denoiser import Denoiser
from sdlab.diffusion.guidance import cfg, composable_cfg, masked, needs_uncond, with_unguided
from sdlab.diffusion.model_sampling import DiscreteModelSampling
from sdlab.diffusion.samplers import get_sampler
from sdlab.diffusion.schedules import NoiseSchedule
from sdlab.pipeline import generate as generate_module
from sdlab.pipeline.png_info import parse_parameters, read_parameters

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# -- comfy/model_patcher.py, comfy/samplers.py: how a CFG++ sampler gets the unconditional prediction ---------------
def set_model_options_post_cfg_function(model_options, post_cfg_function, disable_cfg1_optimization=False):
    model_options["sampler_post_cfg_function"] = (model_options.get("sampler_post_cfg_function", [])
                                                  + [post_cfg_function])
    if disable_cfg1_optimization:
        model_options["disable_cfg1_optimization"] = True
    return model_options


class ComfyGuidedModel:
    """`sampling_function` + `cfg_function` for one positive and one negative condition, without areas, masks or
    a `sampler_cfg_function`: at CFG 1 the negative is dropped unless `disable_cfg1_optimization` (then
    `calc_cond_batch` returns zeros for it)."""

    def __init__(self, cond_fn, uncond_fn, cond_scale):
        self.cond_fn, self.uncond_fn, self.cond_scale = cond_fn, uncond_fn, cond_scale

    def __call__(self, x, sigma, model_options=None):
        model_options = {} if model_options is None else model_options
        skip_uncond = math.isclose(self.cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False)
        cond_pred = self.cond_fn(x, sigma)
        uncond_pred = torch.zeros_like(x) if skip_uncond else self.uncond_fn(x, sigma)
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * self.cond_scale
        for fn in model_options.get("sampler_post_cfg_function", []):
            args = {"denoised": cfg_result, "cond_scale": self.cond_scale, "uncond_denoised": uncond_pred,
                    "cond_denoised": cond_pred, "sigma": sigma, "model_options": model_options, "input": x}
            cfg_result = fn(args)
        return cfg_result


def to_d(x, sigma, denoised):
    return (x - denoised) / sigma


get_ancestral_step = C.get_ancestral_step
lambda_fn = lambda sigma: sigma.log().neg()       # noqa: E731  (sigma_to_half_log_snr, not CONST)


# -- comfy/k_diffusion/sampling.py ---------------------------------------------------------------------------------
@torch.no_grad()
def sample_euler_ancestral_cfg_pp(model, x, sigmas, extra_args=None, eta=1., s_noise=1., noise_sampler=None):
    extra_args = {} if extra_args is None else extra_args
    uncond_denoised = None

    def post_cfg_function(args):
        nonlocal uncond_denoised
        uncond_denoised = args["uncond_denoised"]
        return args["denoised"]

    model_options = extra_args.get("model_options", {}).copy()
    extra_args["model_options"] = set_model_options_post_cfg_function(model_options, post_cfg_function,
                                                                      disable_cfg1_optimization=True)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            alpha_s = sigmas[i] * lambda_fn(sigmas[i]).exp()
            alpha_t = sigmas[i + 1] * lambda_fn(sigmas[i + 1]).exp()
            d = to_d(x, sigmas[i], alpha_s * uncond_denoised)
            sigma_down, sigma_up = get_ancestral_step(sigmas[i] / alpha_s, sigmas[i + 1] / alpha_t, eta=eta)
            sigma_down = alpha_t * sigma_down
            x = alpha_t * denoised + sigma_down * d
            if eta > 0 and s_noise > 0:
                x = x + alpha_t * noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_euler_cfg_pp(model, x, sigmas, extra_args=None):
    return sample_euler_ancestral_cfg_pp(model, x, sigmas, extra_args=extra_args, eta=0.0, s_noise=0.0,
                                         noise_sampler=None)


@torch.no_grad()
def sample_dpmpp_2s_ancestral_cfg_pp(model, x, sigmas, extra_args=None, eta=1., s_noise=1., noise_sampler=None):
    extra_args = {} if extra_args is None else extra_args
    uncond_denoised = None

    def post_cfg_function(args):
        nonlocal uncond_denoised
        uncond_denoised = args["uncond_denoised"]
        return args["denoised"]

    model_options = extra_args.get("model_options", {}).copy()
    extra_args["model_options"] = set_model_options_post_cfg_function(model_options, post_cfg_function,
                                                                      disable_cfg1_optimization=True)
    s_in = x.new_ones([x.shape[0]])
    sigma_fn = lambda t: t.neg().exp()            # noqa: E731
    t_fn = lambda sigma: sigma.log().neg()        # noqa: E731
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        guidance_vector = denoised - uncond_denoised
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if sigma_down == 0:
            d = to_d(x, sigmas[i], uncond_denoised)
            dt = sigma_down - sigmas[i]
            x = x + d * dt
        else:
            t, t_next = t_fn(sigmas[i]), t_fn(sigma_down)
            r = 1 / 2
            h = t_next - t
            s = t + r * h
            x_2 = (sigma_fn(s) / sigma_fn(t)) * x - (-h * r).expm1() * uncond_denoised
            _ = model(x_2, sigma_fn(s) * s_in, **extra_args)
            uncond_denoised_2 = uncond_denoised
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * uncond_denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        x += guidance_vector
    return x


@torch.no_grad()
def sample_dpmpp_2m_cfg_pp(model, x, sigmas, extra_args=None):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    t_fn = lambda sigma: sigma.log().neg()        # noqa: E731
    old_uncond_denoised = None
    uncond_denoised = None

    def post_cfg_function(args):
        nonlocal uncond_denoised
        uncond_denoised = args["uncond_denoised"]
        return args["denoised"]

    model_options = extra_args.get("model_options", {}).copy()
    extra_args["model_options"] = set_model_options_post_cfg_function(model_options, post_cfg_function,
                                                                      disable_cfg1_optimization=True)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_uncond_denoised is None or sigmas[i + 1] == 0:
            denoised_mix = -torch.exp(-h) * uncond_denoised
        else:
            h_last = t - t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_mix = (-torch.exp(-h) * uncond_denoised
                            - torch.expm1(-h) * (1 / (2 * r)) * (denoised - old_uncond_denoised))
        x = denoised + denoised_mix + torch.exp(-h) * x
        old_uncond_denoised = uncond_denoised
    return x


@torch.no_grad()
def res_multistep(model, x, sigmas, extra_args=None, s_noise=1., noise_sampler=None, eta=1., cfg_pp=False):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    sigma_fn = lambda t: t.neg().exp()            # noqa: E731
    t_fn = lambda sigma: sigma.log().neg()        # noqa: E731
    phi1_fn = lambda t: torch.expm1(t) / t        # noqa: E731
    phi2_fn = lambda t: (phi1_fn(t) - 1.0) / t    # noqa: E731
    old_sigma_down = None
    old_denoised = None
    uncond_denoised = None

    def post_cfg_function(args):
        nonlocal uncond_denoised
        uncond_denoised = args["uncond_denoised"]
        return args["denoised"]

    if cfg_pp:
        model_options = extra_args.get("model_options", {}).copy()
        extra_args["model_options"] = set_model_options_post_cfg_function(model_options, post_cfg_function,
                                                                          disable_cfg1_optimization=True)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if sigma_down == 0 or old_denoised is None:
            if cfg_pp:
                d = to_d(x, sigmas[i], uncond_denoised)
                x = denoised + d * sigma_down
            else:
                d = to_d(x, sigmas[i], denoised)
                dt = sigma_down - sigmas[i]
                x = x + d * dt
        else:
            t, t_old, t_next, t_prev = t_fn(sigmas[i]), t_fn(old_sigma_down), t_fn(sigma_down), t_fn(sigmas[i - 1])
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1_val, phi2_val = phi1_fn(-h), phi2_fn(-h)
            b1 = torch.nan_to_num(phi1_val - phi2_val / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2_val / c2, nan=0.0)
            if cfg_pp:
                x = x + (denoised - uncond_denoised)
                x = sigma_fn(h) * x + h * (b1 * uncond_denoised + b2 * old_denoised)
            else:
                x = sigma_fn(h) * x + h * (b1 * denoised + b2 * old_denoised)
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        if cfg_pp:
            old_denoised = uncond_denoised
        else:
            old_denoised = denoised
        old_sigma_down = sigma_down
    return x


@torch.no_grad()
def sample_gradient_estimation(model, x, sigmas, extra_args=None, ge_gamma=2., cfg_pp=False):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    old_d = None
    uncond_denoised = None

    def post_cfg_function(args):
        nonlocal uncond_denoised
        uncond_denoised = args["uncond_denoised"]
        return args["denoised"]

    if cfg_pp:
        model_options = extra_args.get("model_options", {}).copy()
        extra_args["model_options"] = set_model_options_post_cfg_function(model_options, post_cfg_function,
                                                                          disable_cfg1_optimization=True)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if cfg_pp:
            d = to_d(x, sigmas[i], uncond_denoised)
        else:
            d = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            if cfg_pp:
                x = denoised + d * sigmas[i + 1]
            else:
                x = x + d * dt
            if i >= 1:
                d_bar = (ge_gamma - 1) * (d - old_d)
                x = x + d_bar * dt
        old_d = d
    return x


REFERENCES = {  # ComfyUI name -> (its function, whether it draws noise)
    "euler_cfg_pp": (sample_euler_cfg_pp, False),
    "euler_ancestral_cfg_pp": (sample_euler_ancestral_cfg_pp, True),
    "dpmpp_2m_cfg_pp": (sample_dpmpp_2m_cfg_pp, False),
    "dpmpp_2s_ancestral_cfg_pp": (sample_dpmpp_2s_ancestral_cfg_pp, True),
    "res_multistep_cfg_pp": (partial(res_multistep, eta=0.0, cfg_pp=True), True),
    "res_multistep_ancestral_cfg_pp": (partial(res_multistep, eta=1.0, cfg_pp=True), True),
    "gradient_estimation_cfg_pp": (partial(sample_gradient_estimation, cfg_pp=True), False),
}
"""ComfyUI's KSAMPLER_NAMES ending in _cfg_pp (every one)."""


# -- a toy denoiser whose conditional and unconditional predictions differ ------------------------------------------
def toy_denoiser(x: torch.Tensor, sigma: torch.Tensor, *, shift: torch.Tensor) -> torch.Tensor:
    """The exact denoiser of data 0.5 N(shift - 1, 0.3^2) + 0.5 N(shift + 1, 0.3^2) per element, one `shift` per
    image (B,): nonlinear in x, and the condition moves it."""
    s2 = sigma.reshape(-1, 1, 1, 1).to(x.dtype) ** 2
    means = shift.to(x.dtype).reshape(1, -1, 1, 1, 1) + torch.tensor([-1.0, 1.0], dtype=x.dtype).reshape(2, 1, 1, 1, 1)
    weights = torch.softmax(-((x - means) ** 2) / (2 * (0.09 + s2)), dim=0)                    # (2, B, C, h, w)
    return (weights * (means * s2 + x * 0.09) / (0.09 + s2)).sum(0)


COND, UNCOND = {"shift": torch.tensor([0.4, -0.2])}, {"shift": torch.tensor([-0.3, 0.1])}


def noise_source(seed: int, like: torch.Tensor):
    generator = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(like.shape, generator=generator, dtype=like.dtype)


@pytest.fixture(scope="module")
def comfy():
    return C.ModelSamplingDiscrete()


@pytest.mark.parametrize("name", list(REFERENCES))
@pytest.mark.parametrize("scale", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("scheduler", ["karras", "normal"])
def test_cfg_pp_samplers_match_comfyui(comfy, name, scale, scheduler):
    """At CFG 1 and below too: ComfyUI's CFG++ samplers switch its CFG-1 shortcut off and guide at every scale."""
    reference_fn, noisy = REFERENCES[name]
    spec = get_sampler(name)
    assert spec.cfg_pp and spec.comfy == name
    for steps in (1, 2, 3, 5, 10, 20):
        sigmas = C.ksampler_sigmas(comfy, name, scheduler, steps).double()
        x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(steps), dtype=torch.float64) * sigmas[0]
        ours = spec.fn(cfg(toy_denoiser, COND, UNCOND, scale), x.clone(), sigmas,
                       **({"noise": noise_source(7, x)} if noisy else {}))
        guided = ComfyGuidedModel(partial(toy_denoiser, **COND), partial(toy_denoiser, **UNCOND), scale)
        reference = reference_fn(guided, x.clone(), sigmas, **({"noise_sampler": noise_source(7, x)} if noisy else {}))
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10, msg=f"{steps} steps")


def test_forge_labels_are_comfyuis_samplers():
    """Forge names three CFG++ samplers, ComfyUI's functions under A1111-style labels (its alter samplers)."""
    for label, name in (("Euler CFG++", "euler_cfg_pp"), ("Euler a CFG++", "euler_ancestral_cfg_pp"),
                        ("DPM++ 2M CFG++", "dpmpp_2m_cfg_pp")):
        assert get_sampler(label) is get_sampler(name) and get_sampler(label.lower()).name == label


def test_without_guidance_cfg_pp_is_its_plain_sampler():
    """A model that runs no guidance (no negative, a guidance-embedded model) is its own unguided prediction: the
    CFG++ sampler is then the sampler it comes from."""
    sigmas = torch.tensor([14.6, 6.0, 2.5, 0.9, 0.3, 0.0])
    x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1)) * sigmas[0]
    plain = partial(toy_denoiser, **COND)
    for cfg_pp, base in (("euler_cfg_pp", "euler"), ("dpmpp_2m_cfg_pp", "dpmpp_2m"),
                         ("gradient_estimation_cfg_pp", "gradient_estimation"),
                         ("res_multistep_cfg_pp", "res_multistep")):
        torch.testing.assert_close(get_sampler(cfg_pp).fn(plain, x.clone(), sigmas),
                                   get_sampler(base).fn(plain, x.clone(), sigmas), rtol=1e-5, atol=1e-5)


# -- the unguided prediction through sdlab's guidance -------------------------------------------------------------
class CountingNet(torch.nn.Module):
    """eps = 0.1 * x_in + mean of the context; records each call's batch."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def forward(self, x_in, t, *, context):
        self.batches.append(x_in.shape[0])
        return 0.1 * x_in + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)


def _counting_denoiser():
    return Denoiser(net := CountingNet(), DiscreteModelSampling(NoiseSchedule.sd(), "eps")), net


@pytest.mark.parametrize("scale", [0.0, 1.0, 6.0])
@pytest.mark.parametrize("tokens", [8, 16])
def test_the_unguided_prediction_costs_no_model_call(scale, tokens):
    """One batched call of 2B per step whatever the scale (cfg 1 and below included), or two of B when the
    prompts cannot share a batch (other token lengths); x0_u is the negative's prediction from that call."""
    denoiser, net = _counting_denoiser()
    cond = {"context": torch.full((2, 8, 4), 0.5)}
    uncond = {"context": torch.full((2, tokens, 4), -0.5)}
    x, sigma = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([3.0, 3.0])
    x0, x0_u = with_unguided(cfg(denoiser, cond, uncond, scale))(x, sigma)
    assert net.batches == ([4] if tokens == 8 else [2, 2])
    expected_u, expected_c = denoiser(x, sigma, **uncond), denoiser(x, sigma, **cond)
    torch.testing.assert_close(x0_u, expected_u)
    torch.testing.assert_close(x0, expected_u + scale * (expected_c - expected_u))
    net.batches.clear()
    cfg(denoiser, cond, uncond, scale)(x, sigma)               # outside: the usual shortcut at and below 1
    assert net.batches == ([2] if scale <= 1 else [4] if tokens == 8 else [2, 2])
    assert needs_uncond(scale, cfg_pp=True) and needs_uncond(scale) is (scale > 1)


def test_a_sampler_step_runs_one_batched_call():
    denoiser, net = _counting_denoiser()
    cond, uncond = {"context": torch.full((2, 8, 4), 0.5)}, {"context": torch.full((2, 8, 4), -0.5)}
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * 10
    get_sampler("euler_cfg_pp").fn(cfg(denoiser, cond, uncond, 1.0), x, torch.tensor([10.0, 3.0, 1.0, 0.0]))
    assert net.batches == [4, 4, 4]


def test_no_negative_or_a_bare_denoiser_is_its_own_unguided_prediction():
    x, sigma = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([3.0, 3.0])
    x0, x0_u = with_unguided(cfg(toy_denoiser, COND, None, 5.0))(x, sigma)
    assert x0_u is x0
    x0, x0_u = with_unguided(partial(toy_denoiser, **COND))(x, sigma)
    assert x0_u is x0


def test_inpainting_pastes_the_known_region_into_the_unguided_prediction():
    x, sigma = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([3.0, 3.0])
    known, noise = torch.full((1, 4, 4, 4), 0.7), torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2] = 1.0                                                          # generate the left half
    model = masked(cfg(toy_denoiser, COND, UNCOND, 3.0), known, mask, noise)
    x0, x0_u = with_unguided(model)(x, sigma)
    seen = mask * x + (1 - mask) * (known + noise * 3.0)
    torch.testing.assert_close(x0_u, mask * toy_denoiser(seen, sigma, **UNCOND) + (1 - mask) * known)
    torch.testing.assert_close(x0[..., 2:], known.expand(2, -1, -1, -1)[..., 2:])


def test_composable_guidance_hands_over_its_unconditional_prediction():
    x, sigma = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([3.0, 3.0])
    parts = [(partial(toy_denoiser, shift=torch.tensor([0.4, 0.4])), 0.7), (partial(toy_denoiser, **COND), 0.5)]
    x0, x0_u = with_unguided(composable_cfg(parts, partial(toy_denoiser, **UNCOND), 2.0))(x, sigma)
    torch.testing.assert_close(x0_u, toy_denoiser(x, sigma, **UNCOND))


# -- the tiny model: the ComfyUI function on its U-Net, and the whole command ------------------------------------
@pytest.fixture(scope="module")
def bundle():
    return sdlab.load().bundle                      # the shipped sdlab-tiny: its prompts and negatives differ


@pytest.mark.parametrize("name", ["euler_ancestral_cfg_pp", "dpmpp_2m_cfg_pp", "dpmpp_2s_ancestral_cfg_pp"])
def test_tiny_unet_matches_comfyui(bundle, comfy, name):
    """The real U-Net behind `cfg` (its batched [uncond, cond] call, whose shared rows run once) against ComfyUI's
    function with the conditional and unconditional U-Net calls made apart."""
    from sdlab.pipeline.conditioning import make_cond

    cond, uncond = make_cond(bundle.text_encoders, bundle.family, "a red circle", "blue", batch_size=2)
    denoiser = Denoiser(bundle.unet, bundle.model_sampling)
    reference_fn, noisy = REFERENCES[name]
    sigmas = C.ksampler_sigmas(comfy, name, "karras", 6)
    x = torch.randn((2, bundle.unet_config.out_channels, 8, 8), generator=torch.Generator().manual_seed(5)) * sigmas[0]
    ours = get_sampler(name).fn(cfg(denoiser, cond, uncond, 3.0), x.clone(), sigmas,
                                **({"noise": noise_source(7, x)} if noisy else {}))
    guided = ComfyGuidedModel(partial(denoiser, **cond), partial(denoiser, **uncond), 3.0)
    reference = reference_fn(guided, x.clone(), sigmas, **({"noise_sampler": noise_source(7, x)} if noisy else {}))
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def _comfy_in_place_of_sdlab(name):
    """`_run_sampler` running ComfyUI's function for `name`, its guided model reading sdlab's model and the
    unguided prediction of that call (what ComfyUI's `cfg_function` hands its post-CFG hook)."""
    reference_fn, noisy = REFERENCES[name]

    def run_sampler(plan, model, x, sigmas, options, progress):
        both = with_unguided(model)

        def guided(x, sigma, model_options=None):
            denoised, unguided = both(x, sigma)
            for fn in (model_options or {}).get("sampler_post_cfg_function", []):
                denoised = fn({"denoised": denoised, "uncond_denoised": unguided})
            return denoised

        return reference_fn(guided, x, sigmas, **({"noise_sampler": options["noise"]} if noisy else {}))

    return run_sampler


def test_cli_draws_comfyuis_picture(tmp_path, capsys, monkeypatch):
    """`sdlab txt2img --sampler "Euler a CFG++"` end to end on the shipped tiny model at CFG 1: the picture ComfyUI's
    function draws in the sampler's place (to 1/255), recorded under the row's name, and not Euler a's (at CFG 1
    it still steps along the negative prompt's prediction)."""
    name, label = "euler_ancestral_cfg_pp", "Euler a CFG++"
    args = ["txt2img", "a red circle", "--negative", "blue", "--seed", "3", "--cfg", "1", "--steps", "6",
            "--schedule", "karras", "--no-progress"]
    code, _, err = run([*args, "--sampler", label, "--out", str(tmp_path / "ours.png")], capsys)
    assert code == 0, err
    assert parse_parameters(read_parameters(tmp_path / "ours.png"))["Sampler"] == label
    with monkeypatch.context() as patch:
        patch.setattr(generate_module, "_run_sampler", _comfy_in_place_of_sdlab(name))
        code, _, err = run([*args, "--sampler", label, "--out", str(tmp_path / "comfy.png")], capsys)  # same noise
    assert code == 0, err
    assert np.abs(pixels(tmp_path / "ours.png") - pixels(tmp_path / "comfy.png")).max() <= 1
    plain = name.removesuffix("_cfg_pp")
    code, _, err = run([*args, "--sampler", plain, "--out", str(tmp_path / "plain.png")], capsys)
    assert code == 0, err
    assert np.abs(pixels(tmp_path / "ours.png") - pixels(tmp_path / "plain.png")).mean() > 1


def _unet_batches(bundle, request):
    from sdlab.pipeline.generate import generate

    batches: list[int] = []
    hook = bundle.unet.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[0]))
    try:
        result = generate(bundle, request)
    finally:
        hook.remove()
    return batches, result


@pytest.mark.parametrize("scale", [0.0, 1.0])
def test_generate_encodes_the_negative_at_any_cfg_for_cfg_pp(bundle, scale):
    """At CFG 1 and below the loop drops the negative for a sampler that does not read it, and keeps it (one
    batched call of 2B per step, and the memory estimate of two rows per image) for a CFG++ one."""
    from sdlab.pipeline.plan import resolve_for
    from sdlab.pipeline.memory import estimate_bytes
    from sdlab.pipeline.request import GenerationRequest

    def request(sampler):
        return GenerationRequest("a red circle", "blue", steps=3, cfg_scale=scale, seed=1, sampler=sampler,
                                 schedule="karras", batch_size=2)

    plain, _ = _unet_batches(bundle, request("euler"))
    guided, _ = _unet_batches(bundle, request("euler_cfg_pp"))
    assert set(plain) == {2} and set(guided) == {4}
    assert estimate_bytes(bundle, resolve_for(bundle, request("euler_cfg_pp"))) > \
        estimate_bytes(bundle, resolve_for(bundle, request("euler")))


def test_inpainting_keeps_the_known_region(bundle):
    """4-channel inpainting (`guidance.masked`) with a CFG++ sampler keeps the picture outside the mask as Euler
    does: both paste the known latent there."""
    from PIL import Image

    from sdlab.pipeline.request import GenerationRequest

    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    pictures = {}
    for sampler in ("euler", "euler_cfg_pp"):
        request = GenerationRequest("a red circle", "blue", steps=4, cfg_scale=1.0, seed=1, sampler=sampler,
                                    init_image=init, mask_image=mask, strength=1.0)
        pictures[sampler] = np.asarray(_unet_batches(bundle, request)[1].images[0].convert("RGB"), dtype=np.int16)
    kept = np.ones((64, 64), bool)
    kept[8:56, 8:56] = False                                                    # away from the mask's blur
    assert np.abs(pictures["euler"] - pictures["euler_cfg_pp"])[kept].max() <= 2
    assert np.abs(pictures["euler"] - pictures["euler_cfg_pp"])[24:40, 24:40].mean() > 1
