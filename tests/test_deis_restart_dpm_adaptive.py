"""ComfyUI's `deis`, A1111's Restart and k-diffusion's DPM adaptive (A1111 "DPM adaptive", ComfyUI `dpm_adaptive`).

References: k-diffusion's ``sample_dpm_adaptive`` itself (installed); ComfyUI's ``sample_deis`` and
``get_deis_coeff_list`` and A1111's ``restart_sampler``, transcribed below. Each runs against sdlab on a
two-Gaussian posterior-mean denoiser and on a tiny U-Net, and the pipeline end to end runs the reference in place
of sdlab's function on a tiny SD model.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from bundle_fixtures import tiny_bundle

import comfy_reference as C
import sampler_harness as H
from sdlab.diffusion import samplers
from sdlab.diffusion.discretization import get_discretization
from sdlab.diffusion.noise import generators_for, per_image_noise
from sdlab.diffusion.samplers import get_sampler
from sdlab.diffusion.sampling_k import restart_steps
from sdlab.diffusion.schedules import NoiseSchedule
from sdlab.pipeline import generate as G
from sdlab.pipeline.generate import generate
from sdlab.pipeline.request import GenerationRequest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def kd():
    return H.load_k_diffusion_sampling()


def mixture_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The exact denoiser of data 0.5 N(-1, 0.3^2) + 0.5 N(1, 0.3^2) per element (nonlinear in x)."""
    s2 = sigma.reshape(-1, 1, 1, 1).to(x.dtype) ** 2
    means = torch.tensor([-1.0, 1.0], dtype=x.dtype).reshape(2, 1, 1, 1, 1)
    weights = torch.softmax(-((x - means) ** 2) / (2 * (0.09 + s2)), dim=0)           # (2, B, C, h, w)
    return (weights * (means * s2 + x * 0.09) / (0.09 + s2)).sum(0)


def unit_noise(seed: int, like: torch.Tensor):
    """A noise source: unit Gaussians from its own generator, one draw per call (two alike for two runs)."""
    generator = torch.Generator().manual_seed(seed)
    return lambda sigma=None, sigma_next=None: torch.randn(like.shape, generator=generator, dtype=like.dtype)


def sd_sigmas(schedule: str, steps: int) -> torch.Tensor:
    return get_discretization(schedule)(NoiseSchedule.sd(), steps)


# ---------------------------------------------------------------------------------------------------------
# ComfyUI's deis: comfyanonymous/ComfyUI comfy/k_diffusion/deis.py (edm2t, cal_poly, t2alpha_fn, cal_intergrand,
# get_deis_coeff_list with deis_mode="tab") and comfy/k_diffusion/sampling.py (sample_deis), transcribed.
# np.log of a float32 tensor there is the float32 log.

def edm2t(edm_steps, epsilon_s=1e-3, sigma_min=0.002, sigma_max=80):
    vp_sigma_inv = lambda beta_d, beta_min: lambda sigma: ((beta_min ** 2 + 2 * beta_d * (sigma ** 2 + 1).log()).sqrt() - beta_min) / beta_d  # noqa: E501, E731
    vp_beta_d = 2 * (torch.log(torch.tensor(sigma_min).cpu() ** 2 + 1) / epsilon_s - torch.log(torch.tensor(sigma_max).cpu() ** 2 + 1)) / (epsilon_s - 1)  # noqa: E501
    vp_beta_min = torch.log(torch.tensor(sigma_max).cpu() ** 2 + 1) - 0.5 * vp_beta_d
    t_steps = vp_sigma_inv(vp_beta_d.clone().detach().cpu(), vp_beta_min.clone().detach().cpu())(edm_steps.clone().detach().cpu())  # noqa: E501
    return t_steps, vp_beta_min, vp_beta_d + vp_beta_min


def cal_poly(prev_t, j, taus):
    poly = 1
    for k in range(prev_t.shape[0]):
        if k == j:
            continue
        poly *= (taus - prev_t[k]) / (prev_t[j] - prev_t[k])
    return poly


def t2alpha_fn(beta_0, beta_1, t):
    return torch.exp(-0.5 * t ** 2 * (beta_1 - beta_0) - t * beta_0)


def cal_intergrand(beta_0, beta_1, taus):
    with torch.inference_mode(mode=False):
        taus = taus.clone()
        beta_0 = beta_0.clone()
        beta_1 = beta_1.clone()
        with torch.enable_grad():
            taus.requires_grad_(True)
            alpha = t2alpha_fn(beta_0, beta_1, taus)
            log_alpha = alpha.log()
            log_alpha.sum().backward()
            d_log_alpha_dtau = taus.grad
    integrand = -0.5 * d_log_alpha_dtau / torch.sqrt(alpha * (1 - alpha))
    return integrand


def get_deis_coeff_list(t_steps, max_order, N=10000):
    t_steps, beta_0, beta_1 = edm2t(t_steps)
    C = []
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        order = min(i + 1, max_order)
        if order == 1:
            C.append([])
        else:
            taus = torch.linspace(t_cur, t_next, N)
            dtau = (t_next - t_cur) / N
            prev_t = t_steps[[i - k for k in range(order)]]
            coeff_temp = []
            integrand = cal_intergrand(beta_0, beta_1, taus)
            for j in range(order):
                poly = cal_poly(prev_t, j, taus)
                coeff_temp.append(torch.sum(integrand * poly) * dtau)
            C.append(coeff_temp)
    return C


@torch.no_grad()
def comfy_sample_deis(model, x, sigmas, max_order=3):
    s_in = x.new_ones([x.shape[0]])
    x_next = x
    t_steps = sigmas
    coeff_list = get_deis_coeff_list(t_steps, max_order)
    buffer_model = []
    for i in range(len(sigmas) - 1):
        t_cur = sigmas[i]
        t_next = sigmas[i + 1]
        x_cur = x_next
        denoised = model(x_cur, t_cur * s_in)
        d_cur = (x_cur - denoised) / t_cur
        order = min(max_order, i + 1)
        if t_next <= 0:
            order = 1
        if order == 1:
            x_next = x_cur + (t_next - t_cur) * d_cur
        elif order == 2:
            coeff_cur, coeff_prev1 = coeff_list[i]
            x_next = x_cur + coeff_cur * d_cur + coeff_prev1 * buffer_model[-1]
        elif order == 3:
            coeff_cur, coeff_prev1, coeff_prev2 = coeff_list[i]
            x_next = x_cur + coeff_cur * d_cur + coeff_prev1 * buffer_model[-1] + coeff_prev2 * buffer_model[-2]
        elif order == 4:
            coeff_cur, coeff_prev1, coeff_prev2, coeff_prev3 = coeff_list[i]
            x_next = x_cur + coeff_cur * d_cur + coeff_prev1 * buffer_model[-1] + coeff_prev2 * buffer_model[-2] \
                + coeff_prev3 * buffer_model[-3]
        if len(buffer_model) == max_order - 1:
            for k in range(max_order - 2):
                buffer_model[k] = buffer_model[k + 1]
            buffer_model[-1] = d_cur.detach()
        else:
            buffer_model.append(d_cur.detach())
    return x_next


# ---------------------------------------------------------------------------------------------------------
# A1111's Restart: AUTOMATIC1111/stable-diffusion-webui modules/sd_samplers_extra.py (restart_sampler),
# transcribed; its torch.randn_like is A1111's TorchHijack, the per-image noise: `randn_like` here.

@torch.no_grad()
def a1111_restart_sampler(kd, model, x, sigmas, randn_like, s_noise=1., restart_list=None):
    s_in = x.new_ones([x.shape[0]])
    step_id = 0
    to_d, get_sigmas_karras = kd.to_d, kd.get_sigmas_karras

    def heun_step(x, old_sigma, new_sigma, second_order=True):
        nonlocal step_id
        denoised = model(x, old_sigma * s_in)
        d = to_d(x, old_sigma, denoised)
        dt = new_sigma - old_sigma
        if new_sigma == 0 or not second_order:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, new_sigma * s_in)
            d_2 = to_d(x_2, new_sigma, denoised_2)
            d_prime = (d + d_2) / 2
            x = x + d_prime * dt
        step_id += 1
        return x

    steps = sigmas.shape[0] - 1
    if restart_list is None:
        if steps >= 20:
            restart_steps = 9
            restart_times = 1
            if steps >= 36:
                restart_steps = steps // 4
                restart_times = 2
            sigmas = get_sigmas_karras(steps - restart_steps * restart_times, sigmas[-2].item(), sigmas[0].item(),
                                       device=sigmas.device)
            restart_list = {0.1: [restart_steps + 1, restart_times, 2]}
        else:
            restart_list = {}

    restart_list = {int(torch.argmin(abs(sigmas - key), dim=0)): value for key, value in restart_list.items()}

    step_list = []
    for i in range(len(sigmas) - 1):
        step_list.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in restart_list:
            restart_steps, restart_times, restart_max = restart_list[i + 1]
            min_idx = i + 1
            max_idx = int(torch.argmin(abs(sigmas - restart_max), dim=0))
            if max_idx < min_idx:
                sigma_restart = get_sigmas_karras(restart_steps, sigmas[min_idx].item(), sigmas[max_idx].item(),
                                                  device=sigmas.device)[:-1]
                while restart_times > 0:
                    restart_times -= 1
                    step_list.extend(zip(sigma_restart[:-1], sigma_restart[1:]))

    last_sigma = None
    for old_sigma, new_sigma in step_list:
        if last_sigma is None:
            last_sigma = old_sigma
        elif last_sigma < old_sigma:
            x = x + randn_like(x) * s_noise * (old_sigma ** 2 - last_sigma ** 2) ** 0.5
        x = heun_step(x, old_sigma, new_sigma)
        last_sigma = new_sigma

    return x


# ---------------------------------------------------------------------------------------------------------
# toy denoiser

DEIS_TOL = dict(rtol=1e-5, atol=1e-5)
"""sdlab's closed-form integrand and weights C_j / h against ComfyUI's autograd derivative and sums C_j d_j, all
float32: 1.7e-6 at most here."""


@pytest.mark.parametrize("scheduler", ["karras", "normal", "simple"])
@pytest.mark.parametrize("max_order", [2, 3, 4])
def test_deis_matches_comfyui(scheduler, max_order):
    """sdlab's `deis` (max_order 3 by default, as the KSampler runs it) against ComfyUI's on its KSampler sigmas."""
    comfy = C.ModelSamplingDiscrete()
    for steps in (1, 2, 3, 4, 5, 10, 20, 30):
        sigmas = C.ksampler_sigmas(comfy, "deis", scheduler, steps)
        x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(steps)) * sigmas[0]
        ours = get_sampler("deis").fn(mixture_denoiser, x.clone(), sigmas, max_order=max_order)
        reference = comfy_sample_deis(mixture_denoiser, x.clone(), sigmas, max_order=max_order)
        torch.testing.assert_close(ours, reference, **DEIS_TOL, msg=f"{steps} steps")
    sigmas = C.ksampler_sigmas(comfy, "deis", scheduler, 10)
    x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0)) * sigmas[0]
    torch.testing.assert_close(get_sampler("deis").fn(mixture_denoiser, x.clone(), sigmas),
                               comfy_sample_deis(mixture_denoiser, x.clone(), sigmas), **DEIS_TOL)


def test_deis_is_a_better_integrator_than_euler():
    """On a Gaussian (whose ODE solution is exact) 10 steps of DEIS land far nearer the exact end than Euler's."""
    sigmas = sd_sigmas("karras", 10)
    model = lambda x, sigma: x * (1.0 / (1.0 + sigma.reshape(-1, 1, 1, 1) ** 2))  # noqa: E731  data ~ N(0, 1)
    x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0)) * sigmas[0]
    exact = x / (1 + sigmas[0] ** 2) ** 0.5         # x_sigma = x0 scaled: the flow keeps x / sqrt(1 + sigma^2)
    deis = (get_sampler("deis").fn(model, x.clone(), sigmas) - exact).abs().max()
    euler = (get_sampler("euler").fn(model, x.clone(), sigmas) - exact).abs().max()
    assert deis < euler / 5


@pytest.mark.parametrize("schedule", ["karras", "normal", "exponential"])
def test_restart_matches_a1111(kd, schedule):
    """Below 20 steps Restart is Heun; from 20 on its own Karras list with one restart of 9 steps, from 36 on two
    of steps // 4. The per-image noise of the restarts is drawn alike in both runs."""
    for steps in (1, 3, 10, 19, 20, 21, 30, 35, 36, 40):
        sigmas = sd_sigmas(schedule, steps)
        x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(steps)) * sigmas[0]
        reports = []
        ours = get_sampler("Restart").fn(mixture_denoiser, x.clone(), sigmas, noise=unit_noise(7, x),
                                         callback=lambda info: reports.append(info.i))
        reference = a1111_restart_sampler(kd, mixture_denoiser, x.clone(), sigmas, unit_noise(7, x))
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=2e-5, msg=f"{steps} steps")
        assert reports == list(range(steps)) == list(range(len(restart_steps(sigmas))))


def test_restart_plan_at_20_and_36_steps():
    """20 Karras steps: 11 levels, a restart from the level nearest 2 down to the one nearest 0.1 in 9 steps."""
    plan = restart_steps(sd_sigmas("karras", 20))
    ups = [i for i in range(1, len(plan)) if plan[i][0] > plan[i - 1][1]]
    assert len(plan) == 20 and len(ups) == 1 and plan[-1][1] == 0
    up = ups[0]
    assert plan[up][0] == pytest.approx(2.0, rel=0.25) and plan[up - 1][1] == pytest.approx(0.1, rel=0.5)
    assert plan[up + 8][1] == plan[up - 1][1]                         # down again in 9 steps
    assert len([i for i in range(1, 40) if (p := restart_steps(sd_sigmas("karras", 40)))[i][0] > p[i - 1][1]]) == 2


@pytest.mark.parametrize("schedule", ["karras", "normal", "exponential"])
@pytest.mark.parametrize("name, eta", [("dpm_adaptive", 0.0), ("DPM adaptive", 1.0)])
def test_dpm_adaptive_matches_k_diffusion(kd, schedule, name, eta):
    """k-diffusion's sample_dpm_adaptive as ComfyUI calls it (sigma_min = the last positive sigma, sigma_max =
    sigmas[0], eta 0) and A1111 (eta 1; its txt2img passes the model's sigma_min / sigma_max, the ends of these
    lists): each image of sdlab's batch of 2 bit for bit k-diffusion's run of that image alone (k-diffusion
    would tie a batch's step sizes), with as many model calls as the image that needs most (k-diffusion's nfe)
    and one report per step of the list."""
    for steps in (2, 3, 10, 20, 50):
        sigmas = sd_sigmas(schedule, steps)
        x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(steps)) * sigmas[0]
        calls, reports = [], []

        def counted(x, sigma):
            calls.append(sigma.tolist())
            return mixture_denoiser(x, sigma)

        ours = get_sampler(name).fn(counted, x.clone(), sigmas, noise=per_image_noise(generators_for([7, 8]), x),
                                    callback=lambda info: reports.append(info))
        nfe = []
        for i in range(2):
            reference, info = kd.sample_dpm_adaptive(
                mixture_denoiser, x[i:i + 1].clone(), float(sigmas[-2]), float(sigmas[0]), disable=True, eta=eta,
                noise_sampler=per_image_noise(generators_for([7 + i]), x[i:i + 1]), return_info=True)
            assert torch.equal(ours[i:i + 1], reference), (steps, i)
            nfe.append(info["nfe"])
        assert len(calls) == max(nfe)
        assert [r.i for r in reports] == list(range(steps))
        ends = [r.sigma_next for r in reports]
        assert ends == sorted(ends, reverse=True)                        # the solver's progress, never back
        assert all(r.sigma_next <= level * (1 + 1e-5) for r, level in zip(reports, sigmas[1:-1].tolist()))


def test_dpm_adaptive_options_and_one_level():
    """order 2 (DPM-Solver-12) and other tolerances are k-diffusion's options; a list with one positive sigma
    leaves nothing to solve (ComfyUI: the noise comes back)."""
    kd = H.load_k_diffusion_sampling()
    sigmas = sd_sigmas("karras", 10)
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)) * sigmas[0]
    options = dict(order=2, rtol=0.02, atol=0.005, h_init=0.1, pcoeff=0.1, dcoeff=0.05)
    ours = get_sampler("dpm_adaptive").fn(mixture_denoiser, x.clone(), sigmas, **options)
    reference = kd.sample_dpm_adaptive(mixture_denoiser, x.clone(), float(sigmas[-2]), float(sigmas[0]),
                                       disable=True, **options)
    assert torch.equal(ours, reference)
    one = sd_sigmas("karras", 1)
    assert torch.equal(get_sampler("dpm_adaptive").fn(mixture_denoiser, x.clone(), one), x)
    with pytest.raises(ValueError, match="order is 2 or 3"):
        get_sampler("dpm_adaptive").fn(mixture_denoiser, x, sigmas, order=1)


# ---------------------------------------------------------------------------------------------------------
# tiny U-Net

@pytest.fixture(scope="module")
def tiny():
    return H.sdlab_model(H.tiny_unet(), H.context(), "epsilon")


def test_on_a_tiny_unet(kd, tiny):
    """All three against their references on a random tiny U-Net (eps prediction) on 25 Karras steps."""
    sigmas = sd_sigmas("karras", 25)
    unit, _ = H.noise_for()
    x = unit * sigmas[0]
    torch.testing.assert_close(get_sampler("deis").fn(tiny, x, sigmas), comfy_sample_deis(tiny, x, sigmas),
                               **DEIS_TOL)
    torch.testing.assert_close(get_sampler("Restart").fn(tiny, x, sigmas, noise=unit_noise(3, x)),
                               a1111_restart_sampler(kd, tiny, x, sigmas, unit_noise(3, x)), rtol=1e-5, atol=2e-5)
    unet, ctx = H.tiny_unet(), H.context()
    for eta in (0.0, 1.0):                      # DPM adaptive: image i against k-diffusion's run of it alone
        noise = per_image_noise(generators_for([3, 4]), x)
        ours = get_sampler("dpm_adaptive").fn(tiny, x, sigmas, eta=eta, noise=noise)
        for i in range(2):
            one, x_i = H.sdlab_model(unet, ctx[i:i + 1], "epsilon"), x[i:i + 1]
            reference = kd.sample_dpm_adaptive(one, x_i, float(sigmas[-2]), float(sigmas[0]), disable=True, eta=eta,
                                               noise_sampler=per_image_noise(generators_for([3 + i]), x_i))
            alone = get_sampler("dpm_adaptive").fn(one, x_i, sigmas, eta=eta,
                                                   noise=per_image_noise(generators_for([3 + i]), x_i))
            assert torch.equal(alone, reference)
            # in the batch: the U-Net rounds a batch of 2 unlike one (2e-6 a call), 4.5e-5 at the end here
            torch.testing.assert_close(ours[i:i + 1], reference, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# end to end: the pipeline with the reference in the row's place

SIZE = 16


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle("sd1", seed=5)


def _reference_fn(name: str):
    """The reference as a row's function: ``fn(model, x, sigmas, *, noise, callback, **options)``."""
    kd = H.load_k_diffusion_sampling()
    if name == "deis":
        return lambda model, x, sigmas, callback=None: comfy_sample_deis(model, x, sigmas)
    if name == "Restart":
        return lambda model, x, sigmas, noise, callback=None: a1111_restart_sampler(kd, model, x, sigmas, noise)
    eta = 1.0 if name == "DPM adaptive" else 0.0
    return lambda model, x, sigmas, noise, callback=None: kd.sample_dpm_adaptive(
        model, x, float(sigmas[sigmas > 0].min()), float(sigmas[0]), disable=True, eta=eta, noise_sampler=noise)


@pytest.mark.parametrize("name", ["deis", "Restart", "DPM adaptive", "dpm_adaptive"])
def test_pictures_match_the_reference_end_to_end(bundle, monkeypatch, name):
    """txt2img on a tiny SD model, 20 steps with CFG (Restart restarts from 20): sdlab's picture is the one the
    same pipeline draws with the reference function in the row's place (seeded noise and all)."""
    request = GenerationRequest("a red cube", negative_prompt="blurry", steps=20, seed=11, width=SIZE, height=SIZE,
                                sampler=name, cfg_scale=5.0)
    ours = np.asarray(generate(bundle, request).images[0]).astype(int)
    spec = get_sampler(name)
    monkeypatch.setitem(samplers._BY_SPELLING, name, dataclasses.replace(spec, fn=_reference_fn(name)))
    reference = np.asarray(generate(bundle, request).images[0]).astype(int)
    assert np.abs(ours - reference).max() <= 1                 # 0 here; 1 allows a float32 rounding's flip


@pytest.mark.parametrize("name", ["DPM adaptive", "dpm_adaptive"])
def test_dpm_adaptive_batch_image_is_the_one_picture_run(bundle, name):
    """Image 1 of a batch of 2 is the one-picture run with seed + 1 (each image has its own step sizes; with
    one error for the batch it differed by 2/255), with a prompt edit counting model calls."""
    request = GenerationRequest("a [red:blue:0.5] cube", negative_prompt="blurry", steps=8, seed=21, width=SIZE,
                                height=SIZE, sampler=name, cfg_scale=5.0, batch_size=2)
    batch = generate(bundle, request).images
    for i in range(2):
        alone = generate(bundle, dataclasses.replace(request, batch_size=1, seed=21 + i)).images[0]
        assert np.abs(np.asarray(batch[i]).astype(int) - np.asarray(alone).astype(int)).max() <= 1, i


def test_dpm_adaptive_prompt_edits_count_model_calls_as_a1111(bundle, monkeypatch):
    """A1111 schedules a prompt edit over `steps` model calls (CFGDenoiser.step, DPM adaptive is no second-order
    sampler) and, past them, falls back to the first prompt (reconstruct_cond_batch): `[red:blue:0.5]` at 6 steps
    is red for calls 0-3, blue for 4-6, red again after, however many calls the solver makes."""
    runs: list[int] = []
    original = G.switch_at_calls

    def recording(models, first_call=0):
        tagged = [(end, (lambda k, model: lambda *a, **kw: runs.append(k) or model(*a, **kw))(k, model))
                  for k, (end, model) in enumerate(models)]
        return original(tagged, first_call)

    monkeypatch.setattr(G, "switch_at_calls", recording)
    request = GenerationRequest("a [red:blue:0.5] cube", steps=6, seed=2, width=SIZE, height=SIZE,
                                sampler="DPM adaptive", cfg_scale=5.0)
    generate(bundle, request)
    assert len(runs) > 7
    assert runs == [0] * 4 + [1] * 3 + [0] * (len(runs) - 7)


def test_restart_keeps_the_end_of_a_slice_above_0():
    """A list that ends above 0 (the base's share before diffusers' refiner handoff, ``sigmas[:split + 1]``)
    keeps its end from 20 steps on: as many steps, the last onto the slice's end, none below it."""
    sigmas = sd_sigmas("karras", 40)
    for split in (10, 20, 25, 36):
        plan = restart_steps(sigmas[: split + 1])
        end = float(sigmas[split])
        assert len(plan) == split and plan[-1][1] == pytest.approx(end)
        assert min(level for step in plan for level in step) == pytest.approx(end)


def test_restart_base_stops_at_the_refiner_handoff(monkeypatch):
    """Tiny SDXL base + refiner, Restart at 32 steps (20 on the base): every base call is at or above the handoff
    sigma, the refiner's first call is there, and no call is at sigma 0 (a 0 -> 0 step)."""
    base, refiner = tiny_bundle("sdxl", seed=25), tiny_bundle("sdxl-refiner", seed=45)
    spec = get_sampler("Restart")
    runs: list[tuple[float, list[float]]] = []

    def recording(model, x, sigmas, noise, callback=None):
        calls: list[float] = []
        runs.append((float(sigmas[-1]), calls))
        return spec.fn(lambda x, sigma, **kw: calls.append(float(sigma[0])) or model(x, sigma, **kw), x, sigmas,
                       noise=noise, callback=callback)

    monkeypatch.setitem(samplers._BY_SPELLING, "Restart", dataclasses.replace(spec, fn=recording))
    request = GenerationRequest("a cube", sampler="Restart", steps=32, seed=7, width=32, height=32)
    G.generate_with_refiner(base, refiner, request)
    (handoff, base_calls), (end, refiner_calls) = runs
    assert end == 0 and handoff > 0
    assert min(base_calls) == pytest.approx(handoff) and refiner_calls[0] == pytest.approx(handoff)
    assert 0 not in base_calls + refiner_calls
