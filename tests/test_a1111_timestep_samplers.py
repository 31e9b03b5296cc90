"""A1111's timestep samplers, DDIM, PLMS and UniPC, as A1111 1.10 runs them: its spelling on the schedule its API and
texts give them (`samplers.runs_a1111_timesteps`), on its timesteps (`discretization.a1111_timestep_sigmas`), from
the unit noise as a VP latent, its img2img noised a timestep above the first it samples on.

The reference is AUTOMATIC1111/stable-diffusion-webui 1.10 (the same loops as Forge neo's copy of it):
modules/sd_samplers_timesteps.py (`CompVisSampler.get_timesteps`, `sample`, `sample_img2img`),
modules/sd_samplers_timesteps_impl.py (`ddim`, `plms`, `unipc`) and modules/models/diffusion/uni_pc/uni_pc.py
(`NoiseScheduleVP('discrete')`, `UniPC.sample` multistep with B(h), data prediction, `interpolate_fn`),
transcribed below without callbacks, progress bars, eta noise and thresholding, and run on the fixed tiny diffusers
U-Net of `sampler_harness` (eps and v, through A1111's `CompVisTimestepsVDenoiser` conversion) and, for the pipeline,
on sdlab's tiny SD1 with CFG."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from bundle_fixtures import init_picture, tiny_bundle
from sampler_harness import context, noise_for, sd_schedule, sdlab_model, tiny_unet
from sdlab.diffusion.discretization import A1111_IMG2IMG
from sdlab.diffusion.model_sampling import DiscreteModelSampling
from sdlab.diffusion.noise import generators_for
from sdlab.diffusion.samplers import a1111_run, get_sampler
from sdlab.diffusion.sampling_ldm import to_ddpm_latent
from sdlab.pipeline.conditioning import encode_prompt
from sdlab.pipeline.generate import _start, sample_latents
from sdlab.pipeline.infotext import to_parameters
from sdlab.pipeline.plan import make_plan, request_sigmas
from sdlab.pipeline.request import GenerationRequest, RequestError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TOLERANCE = 1e-5
SCHEDULE = sd_schedule()


# ---------------------------------------------------------------- A1111 1.10, transcribed

def get_timesteps(steps, discard_next_to_last_sigma=False):
    steps += 1 if discard_next_to_last_sigma else 0
    return torch.clip(torch.asarray(list(range(0, 1000, 1000 // steps))) + 1, 0, 999)


def setup_img2img_steps(steps, denoising_strength, img2img_fix_steps):
    if img2img_fix_steps:
        requested_steps = steps
        steps = int(requested_steps / min(denoising_strength, 0.999)) if denoising_strength > 0 else 0
        t_enc = requested_steps - 1
    else:
        t_enc = int(min(denoising_strength, 0.999) * steps)
    return steps, t_enc


def img2img_start(x, noise, alphas_cumprod, timestep, extra_noise=0.0):
    """`sample_img2img`'s xi, noised at `timestep` (its timesteps[t_enc]), with Extra noise."""
    sqrt_alpha_cumprod = torch.sqrt(alphas_cumprod[timestep])
    sqrt_one_minus_alpha_cumprod = torch.sqrt(1 - alphas_cumprod[timestep])
    xi = x * sqrt_alpha_cumprod + noise * sqrt_one_minus_alpha_cumprod
    if extra_noise > 0:
        xi += noise * extra_noise * sqrt_alpha_cumprod
    return xi


@torch.no_grad()
def ddim(model, x, timesteps, alphas_cumprod):
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(torch.float64)
    sqrt_one_minus_alphas = torch.sqrt(1 - alphas)
    s_in = x.new_ones((x.shape[0]))
    s_x = x.new_ones((x.shape[0], 1, 1, 1))
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = model(x, timesteps[index].item() * s_in)
        a_t = alphas[index].item() * s_x
        a_prev = alphas_prev[index].item() * s_x
        sqrt_one_minus_at = sqrt_one_minus_alphas[index].item() * s_x
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_xt = (1. - a_prev).sqrt() * e_t                 # eta 0: sigma_t = 0, no noise
        x = a_prev.sqrt() * pred_x0 + dir_xt
    return x


@torch.no_grad()
def plms(model, x, timesteps, alphas_cumprod):
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(torch.float64)
    sqrt_one_minus_alphas = torch.sqrt(1 - alphas)
    s_in = x.new_ones([x.shape[0]])
    s_x = x.new_ones((x.shape[0], 1, 1, 1))
    old_eps = []

    def get_x_prev_and_pred_x0(e_t, index):
        a_t = alphas[index].item() * s_x
        a_prev = alphas_prev[index].item() * s_x
        sqrt_one_minus_at = sqrt_one_minus_alphas[index].item() * s_x
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_xt = (1. - a_prev).sqrt() * e_t
        x_prev = a_prev.sqrt() * pred_x0 + dir_xt
        return x_prev, pred_x0

    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        ts = timesteps[index].item() * s_in
        t_next = timesteps[max(index - 1, 0)].item() * s_in
        e_t = model(x, ts)
        if len(old_eps) == 0:
            x_prev, pred_x0 = get_x_prev_and_pred_x0(e_t, index)
            e_t_next = model(x_prev, t_next)
            e_t_prime = (e_t + e_t_next) / 2
        elif len(old_eps) == 1:
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x_prev, pred_x0 = get_x_prev_and_pred_x0(e_t_prime, index)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
        x = x_prev
    return x


def interpolate_fn(x, xp, yp):
    N, K = x.shape[0], xp.shape[1]
    all_x = torch.cat([x.unsqueeze(2), xp.unsqueeze(0).repeat((N, 1, 1))], dim=2)
    sorted_all_x, x_indices = torch.sort(all_x, dim=2)
    x_idx = torch.argmin(x_indices, dim=2)
    cand_start_idx = x_idx - 1
    start_idx = torch.where(torch.eq(x_idx, 0), torch.tensor(1, device=x.device),
                            torch.where(torch.eq(x_idx, K), torch.tensor(K - 2, device=x.device), cand_start_idx))
    end_idx = torch.where(torch.eq(start_idx, cand_start_idx), start_idx + 2, start_idx + 1)
    start_x = torch.gather(sorted_all_x, dim=2, index=start_idx.unsqueeze(2)).squeeze(2)
    end_x = torch.gather(sorted_all_x, dim=2, index=end_idx.unsqueeze(2)).squeeze(2)
    start_idx2 = torch.where(torch.eq(x_idx, 0), torch.tensor(0, device=x.device),
                             torch.where(torch.eq(x_idx, K), torch.tensor(K - 2, device=x.device), cand_start_idx))
    y_positions_expanded = yp.unsqueeze(0).expand(N, -1, -1)
    start_y = torch.gather(y_positions_expanded, dim=2, index=start_idx2.unsqueeze(2)).squeeze(2)
    end_y = torch.gather(y_positions_expanded, dim=2, index=(start_idx2 + 1).unsqueeze(2)).squeeze(2)
    return start_y + (x - start_x) * (end_y - start_y) / (end_x - start_x)


def expand_dims(v, dims):
    return v[(...,) + (None,) * (dims - 1)]


class NoiseScheduleVP:
    """`NoiseScheduleVP('discrete', alphas_cumprod=...)`."""

    def __init__(self, alphas_cumprod):
        log_alphas = 0.5 * torch.log(alphas_cumprod)
        self.total_N = len(log_alphas)
        self.T = 1.
        self.t_array = torch.linspace(0., 1., self.total_N + 1)[1:].reshape((1, -1))
        self.log_alpha_array = log_alphas.reshape((1, -1,))

    def marginal_log_mean_coeff(self, t):
        return interpolate_fn(t.reshape((-1, 1)), self.t_array.to(t.device),
                              self.log_alpha_array.to(t.device)).reshape((-1))

    def marginal_alpha(self, t):
        return torch.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t):
        return torch.sqrt(1. - torch.exp(2. * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t):
        log_mean_coeff = self.marginal_log_mean_coeff(t)
        log_std = 0.5 * torch.log(1. - torch.exp(2. * log_mean_coeff))
        return log_mean_coeff - log_std


class UniPCCFG:
    """`UniPCCFG(uni_pc.UniPC)` with predict_x0=True, thresholding=False, variant 'bh1': `model` (its t input, A1111's
    `get_model_input_time`), `data_prediction_fn`, `multistep_uni_pc_bh_update`, `sample(method="multistep")`."""

    def __init__(self, cfg_model, noise_schedule, variant="bh1"):
        self.cfg_model = cfg_model
        self.noise_schedule = noise_schedule
        self.variant = variant

    def model(self, x, t):
        t_input = (t - 1. / self.noise_schedule.total_N) * 1000.
        return self.cfg_model(x, t_input)

    def model_fn(self, x, t):
        noise = self.model(x, t)
        dims = x.dim()
        alpha_t, sigma_t = self.noise_schedule.marginal_alpha(t), self.noise_schedule.marginal_std(t)
        return (x - expand_dims(sigma_t, dims) * noise) / expand_dims(alpha_t, dims)

    def multistep_uni_pc_bh_update(self, x, model_prev_list, t_prev_list, t, order, x_t=None, use_corrector=True):
        ns = self.noise_schedule
        dims = x.dim()
        t_prev_0 = t_prev_list[-1]
        lambda_prev_0 = ns.marginal_lambda(t_prev_0)
        lambda_t = ns.marginal_lambda(t)
        model_prev_0 = model_prev_list[-1]
        sigma_prev_0, sigma_t = ns.marginal_std(t_prev_0), ns.marginal_std(t)
        log_alpha_t = ns.marginal_log_mean_coeff(t)
        alpha_t = torch.exp(log_alpha_t)
        h = lambda_t - lambda_prev_0
        rks = []
        D1s = []
        for i in range(1, order):
            t_prev_i = t_prev_list[-(i + 1)]
            model_prev_i = model_prev_list[-(i + 1)]
            lambda_prev_i = ns.marginal_lambda(t_prev_i)
            rk = ((lambda_prev_i - lambda_prev_0) / h)[0]
            rks.append(rk)
            D1s.append((model_prev_i - model_prev_0) / rk)
        rks.append(1.)
        rks = torch.tensor(rks, device=x.device)
        R = []
        b = []
        hh = -h[0]
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        factorial_i = 1
        B_h = hh if self.variant == 'bh1' else torch.expm1(hh)
        for i in range(1, order + 1):
            R.append(torch.pow(rks, i - 1))
            b.append(h_phi_k * factorial_i / B_h)
            factorial_i *= (i + 1)
            h_phi_k = h_phi_k / hh - 1 / factorial_i
        R = torch.stack(R)
        b = torch.tensor(b, device=x.device)
        use_predictor = len(D1s) > 0 and x_t is None
        if len(D1s) > 0:
            D1s = torch.stack(D1s, dim=1)
            if x_t is None:
                if order == 2:
                    rhos_p = torch.tensor([0.5], device=b.device)
                else:
                    rhos_p = torch.linalg.solve(R[:-1, :-1], b[:-1])
        else:
            D1s = None
        if use_corrector:
            if order == 1:
                rhos_c = torch.tensor([0.5], device=b.device)
            else:
                rhos_c = torch.linalg.solve(R, b)
        model_t = None
        x_t_ = expand_dims(sigma_t / sigma_prev_0, dims) * x - expand_dims(alpha_t * h_phi_1, dims) * model_prev_0
        if x_t is None:
            if use_predictor:
                pred_res = torch.einsum('k,bkchw->bchw', rhos_p, D1s)
            else:
                pred_res = 0
            x_t = x_t_ - expand_dims(alpha_t * B_h, dims) * pred_res
        if use_corrector:
            model_t = self.model_fn(x_t, t)
            if D1s is not None:
                corr_res = torch.einsum('k,bkchw->bchw', rhos_c[:-1], D1s)
            else:
                corr_res = 0
            D1_t = (model_t - model_prev_0)
            x_t = x_t_ - expand_dims(alpha_t * B_h, dims) * (corr_res + rhos_c[-1] * D1_t)
        return x_t, model_t

    @torch.no_grad()
    def sample(self, x, steps=20, t_start=None, order=3, lower_order_final=True):
        t_0 = 1. / self.noise_schedule.total_N
        t_T = self.noise_schedule.T if t_start is None else t_start
        assert steps >= order, "UniPC order must be < sampling steps"
        timesteps = torch.linspace(t_T, t_0, steps + 1)                    # skip_type 'time_uniform'
        vec_t = timesteps[0].expand((x.shape[0]))
        model_prev_list = [self.model_fn(x, vec_t)]
        t_prev_list = [vec_t]
        for init_order in range(1, order):
            vec_t = timesteps[init_order].expand(x.shape[0])
            x, model_x = self.multistep_uni_pc_bh_update(x, model_prev_list, t_prev_list, vec_t, init_order,
                                                         use_corrector=True)
            if model_x is None:
                model_x = self.model_fn(x, vec_t)
            model_prev_list.append(model_x)
            t_prev_list.append(vec_t)
        for step in range(order, steps + 1):
            vec_t = timesteps[step].expand(x.shape[0])
            if lower_order_final:
                step_order = min(order, steps + 1 - step)
            else:
                step_order = order
            use_corrector = step != steps
            x, model_x = self.multistep_uni_pc_bh_update(x, model_prev_list, t_prev_list, vec_t, step_order,
                                                         use_corrector=use_corrector)
            for i in range(order - 1):
                t_prev_list[i] = t_prev_list[i + 1]
                model_prev_list[i] = model_prev_list[i + 1]
            t_prev_list[-1] = vec_t
            if step < steps:
                if model_x is None:
                    model_x = self.model_fn(x, vec_t)
                model_prev_list[-1] = model_x
        return x


def unipc(model, x, timesteps, alphas_cumprod, is_img2img=False):
    ns = NoiseScheduleVP(alphas_cumprod)
    t_start = timesteps[-1] / 1000 + 1 / 1000 if is_img2img else None
    return UniPCCFG(model, ns).sample(x, steps=len(timesteps), t_start=t_start, order=3, lower_order_final=True)


A1111 = {"DDIM": ddim, "PLMS": plms, "UniPC": unipc}


def v_model(unet, ctx, alphas_cumprod=SCHEDULE.alphas_cumprod):
    """`CompVisTimestepsVDenoiser`: a v model's eps, `predict_eps_from_z_and_v` at the timestep truncated to int."""
    sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod = alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()

    def forward(x_t, t):
        v = unet(x_t, t, encoder_hidden_states=ctx).sample
        return (sqrt_alphas_cumprod[t.to(torch.int), None, None, None] * v
                + sqrt_one_minus_alphas_cumprod[t.to(torch.int), None, None, None] * x_t)
    return forward


# ---------------------------------------------------------------- the samplers on the harness U-Net

@pytest.fixture(scope="module")
def unet():
    return tiny_unet(0)


@pytest.fixture(scope="module")
def ctx():
    return context(2)


def _counted(model, calls: list):
    def counting(*args):
        calls.append(1)
        return model(*args)
    return counting


# UniPC on eps only: A1111's v conversion reads alphas_cumprod at the timestep truncated to an integer, and UniPC's
# timesteps are fractional (sdlab converts at the sigma itself)
CASES = [(sampler, steps, prediction) for sampler, steps in [("DDIM", 2), ("DDIM", 7), ("DDIM", 20), ("PLMS", 2),
                                                             ("PLMS", 9), ("PLMS", 20)]
         for prediction in ("epsilon", "v_prediction")] + [("UniPC", steps, "epsilon") for steps in (3, 10, 25)]


@pytest.mark.parametrize("sampler, steps, prediction", CASES)
@torch.no_grad()
def test_the_timestep_samplers_step_as_a1111s(unet, ctx, sampler, steps, prediction):
    """From the same unit noise, the same VP latent within 1e-5 and as many model calls: DDIM and PLMS one fewer than
    A1111's timesteps (PLMS one more for its first step), UniPC one per timestep (7 steps: 8 timesteps)."""
    req = GenerationRequest(prompt="x", sampler=sampler, schedule="ddim_uniform", steps=steps)
    spec = a1111_run(get_sampler(sampler))
    sigmas = request_sigmas(DiscreteModelSampling(SCHEDULE, "eps" if prediction == "epsilon" else "v"), spec, req)
    unit, _ = noise_for((0, 1))
    ours_calls, ref_calls = [], []
    model = sdlab_model(unet, ctx, "eps" if prediction == "epsilon" else "v")
    ours = to_ddpm_latent(spec.fn(_counted(model, ours_calls), unit * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas),
                          sigmas[-1])
    eps = _counted(v_model(unet, ctx) if prediction == "v_prediction" else
                   (lambda x, t: unet(x, t, encoder_hidden_states=ctx).sample), ref_calls)
    reference = A1111[sampler](eps, unit, get_timesteps(steps), SCHEDULE.alphas_cumprod)
    assert len(ours_calls) == len(ref_calls)
    assert (ours - reference).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("variant, order, lower_order_final, steps", [
    ("bh2", 3, True, 10), ("bh1", 2, True, 6), ("bh2", 1, True, 4), ("bh1", 4, True, 8), ("bh1", 3, False, 6)])
@torch.no_grad()
def test_a1111s_unipc_takes_its_uni_pc_options(unet, ctx, variant, order, lower_order_final, steps):
    """A1111's `unipc`: `UniPCCFG(..., variant=shared.opts.uni_pc_variant)` sampled with `order=shared.opts.uni_pc_order,
    lower_order_final=shared.opts.uni_pc_lower_order_final`: the request's unipc_* fields, within 1e-5 (without
    lower_order_final, within 1e-4: docs/samplers.md)."""
    req = GenerationRequest(prompt="x", sampler="UniPC", schedule="ddim_uniform", steps=steps, unipc_variant=variant,
                            unipc_order=order, unipc_lower_order_final=lower_order_final)
    spec = a1111_run(get_sampler("UniPC"), unipc_order=order, unipc_variant=variant,
                     unipc_lower_order_final=lower_order_final)
    sigmas = request_sigmas(DiscreteModelSampling(SCHEDULE, "eps"), spec, req)
    unit, _ = noise_for((0, 1))
    ours = to_ddpm_latent(spec.fn(sdlab_model(unet, ctx, "eps"), unit * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas),
                          sigmas[-1])
    eps = lambda x, t: unet(x, t, encoder_hidden_states=ctx).sample          # noqa: E731
    reference = UniPCCFG(eps, NoiseScheduleVP(SCHEDULE.alphas_cumprod), variant=variant).sample(
        unit, steps=len(get_timesteps(steps)), order=order, lower_order_final=lower_order_final)
    assert (ours - reference).abs().max().item() <= (TOLERANCE if lower_order_final else 1e-4)
    plan = make_plan(tiny_bundle("sd1"), replace(req, width=32, height=32, seed=1))
    assert plan.sampler.fn.keywords == dict(order=order, variant=variant, lower_order_final=lower_order_final)
    with pytest.raises(RequestError, match="order"):
        make_plan(tiny_bundle("sd1"), replace(req, width=32, height=32, seed=1, unipc_order=steps + 2))


def test_cli_flags_set_a1111s_unipc_options_over_a_pictures(tmp_path, capsys):
    """--unipc-variant / --unipc-order / --[no-]unipc-lower-order-final are the request's unipc_* fields (the Python
    API's picture; A1111's UniPC, on ddim_uniform), written under A1111's labels and read back by --from-png, a flag given there winning."""
    import numpy as np

    import sdlab
    from cli_helpers import pixels, run
    from sdlab.pipeline.png_info import parse_parameters, read_parameters

    out, again = tmp_path / "a.png", tmp_path / "b.png"
    fields = dict(sampler="UniPC", schedule="ddim_uniform", steps=6, seed=3, unipc_variant="bh2", unipc_order=2,
                  unipc_lower_order_final=False)
    code, _, err = run(["txt2img", "a cat", "--sampler", "UniPC", "--schedule", "ddim_uniform", "--steps", "6", "--seed",
                        "3", "--unipc-variant",
                        "bh2", "--unipc-order", "2", "--no-unipc-lower-order-final", "--out", str(out), "--no-progress"],
                       capsys)
    assert code == 0, err
    assert np.array_equal(pixels(out), np.asarray(sdlab.load().txt2img("a cat", **fields).images[0], dtype=np.int16))
    labels = parse_parameters(read_parameters(out))
    assert (labels["UniPC variant"], labels["UniPC order"], labels["UniPC lower order final"]) == ("bh2", "2", "False")
    code, _, err = run(["txt2img", "--from-png", str(out), "--unipc-order", "1", "--unipc-lower-order-final",
                        "--out", str(again), "--no-progress"], capsys)
    assert code == 0, err
    labels = parse_parameters(read_parameters(again))
    assert labels["UniPC variant"] == "bh2" and labels["UniPC order"] == "1"
    assert "UniPC lower order final" not in labels                           # A1111's default: no label
    code, _, err = run(["txt2img", "a cat", "--sampler", "UniPC", "--unipc-variant", "vary_coeff", "--out",
                        str(tmp_path / "c.png"), "--no-progress"], capsys)
    assert code != 0 and "UniPC variant must be one of bh1, bh2" in err and "Traceback" not in err
    assert not (tmp_path / "c.png").exists()


def test_ddim_takes_one_model_call_fewer_than_its_timesteps():
    req = GenerationRequest(prompt="x", sampler="DDIM", schedule="ddim_uniform", steps=20)
    sigmas = request_sigmas(DiscreteModelSampling(SCHEDULE, "eps"), get_sampler("DDIM"), req)
    assert torch.equal(sigmas, SCHEDULE.sigmas[get_timesteps(20).flip(0)].float())          # 951, ..., 51, then 1
    assert len(sigmas) - 1 == 19


@pytest.mark.parametrize("sampler", ["DDIM", "PLMS", "UniPC"])
def test_discard_penultimate_sigma_takes_one_step_mores_timesteps(sampler):
    """`get_timesteps`: A1111's always_discard_next_to_last_sigma builds the timesteps of steps + 1, and is written."""
    sampling, spec = DiscreteModelSampling(SCHEDULE, "eps"), get_sampler(sampler)
    req = GenerationRequest(prompt="x", sampler=sampler, schedule="ddim_uniform", steps=10)
    more = request_sigmas(sampling, spec, replace(req, steps=11))
    assert torch.equal(request_sigmas(sampling, spec, replace(req, discard_penultimate_sigma=True)), more)
    assert to_parameters(replace(req, discard_penultimate_sigma=True, seed=1))["Discard penultimate sigma"] is True


@pytest.mark.parametrize("fields", [dict(sampler="DDIM", steps=1), dict(sampler="UniPC", steps=2),
                                    dict(sampler="DDIM", steps=10, init_image=init_picture(32), strength=0.15,
                                         img2img_convention="a1111"),
                                    *(dict(sampler=sampler, steps=steps, init_image=init_picture(32),
                                           strength=strength, img2img_convention="a1111")   # t_enc 0: no timestep
                                      for sampler in ("UniPC", "DDIM", "PLMS")
                                      for steps, strength in ((3, 0.3), (1, 0.6)))])
def test_runs_that_take_no_step_are_refused(fields):
    """A1111's DDIM on one timestep (1 step, or an img2img t_enc of 1) returns its noise; its UniPC asserts its order,
    3, is at most the steps: a RequestError here, which counts no negative steps. An img2img whose t_enc is 0 samples
    on no timestep: the same RequestError (UniPC's was an internal ValueError)."""
    with pytest.raises(RequestError, match=r"A1111's \w+ at .* takes \d+ step\(s\)"):
        make_plan(tiny_bundle("sd1"), GenerationRequest(prompt="x", schedule="ddim_uniform", width=32, height=32,
                                                        seed=1, **fields))


@pytest.mark.parametrize("sampler, hr_steps", [("DDIM", 2), ("PLMS", 2), ("UniPC", 3)])
def test_a_hires_pass_that_takes_no_step_is_refused_by_make_plan(sampler, hr_steps):
    """A1111's hires pass samples on hr_steps - 1 timesteps whatever its denoise (`setup_img2img_steps` with steps
    given): refused when the plan is made, before the first pass is drawn, naming hr_steps, not the strength."""
    req = GenerationRequest(prompt="x", sampler="Euler", steps=4, seed=1, width=32, height=32, hr_scale=1.5,
                            hr_denoise=0.5, hr_steps=hr_steps, hr_sampler=sampler, hr_schedule="ddim_uniform",
                            hr_upscaler="Latent")
    with pytest.raises(RequestError, match=r"raise hr_steps$"):
        make_plan(tiny_bundle("sd1"), req)
    make_plan(tiny_bundle("sd1"), replace(req, hr_steps=hr_steps + 1))


# ---------------------------------------------------------------- the pipeline on the tiny SD1

@pytest.fixture(scope="module")
def sd1():
    return tiny_bundle("sd1", seed=0)


def _cfg_eps(bundle, prompt: str, negative: str, scale: float):
    """A1111's CFGDenoiserTimesteps on the U-Net: eps of the prompt and the negative, combined at `scale`."""
    cond = encode_prompt(bundle.text_encoders, prompt).context
    uncond = encode_prompt(bundle.text_encoders, negative).context

    def model(x, t):
        out = bundle.unet(torch.cat([x, x]), torch.cat([t, t]).float(), context=torch.cat([cond, uncond]))
        eps_c, eps_u = out.chunk(2)
        return eps_u + (eps_c - eps_u) * scale
    return model


def _close(ours, reference) -> bool:
    """Within 1e-5 of the latents' scale (the tiny SD1's random U-Net gives latents of ~40, float32's rounding)."""
    return (ours - reference).abs().max().item() <= TOLERANCE * reference.abs().max().item()


@pytest.mark.parametrize("sampler, steps", [("DDIM", 20), ("PLMS", 9), ("UniPC", 8)])
@torch.no_grad()
def test_txt2img_starts_from_the_unit_noise_as_a1111s_sample(sd1, sampler, steps):
    req = GenerationRequest(prompt="a red cube", negative_prompt="blurry", sampler=sampler, schedule="ddim_uniform",
                            steps=steps, cfg_scale=6.0, seed=3, width=32, height=32)
    plan = make_plan(sd1, req)
    start = _start(sd1, plan, generators_for(plan.request.seeds(), plan.request.rng, sd1.device))
    assert plan.request.init_noise == "vp"
    reference = A1111[sampler](_cfg_eps(sd1, req.prompt, req.negative_prompt, 6.0), start.noise,
                               get_timesteps(steps), plan.sampling.schedule.alphas_cumprod.float())
    assert _close(sample_latents(sd1, plan), reference)


@pytest.mark.parametrize("sampler, convention, strength, extra", [
    ("DDIM", "a1111", 0.55, 0.0), ("DDIM", "a1111_fix_steps", 0.5, 0.3), ("PLMS", "a1111", 0.75, 0.0),
    ("UniPC", "a1111", 0.6, 0.2),
])
@torch.no_grad()
def test_img2img_is_noised_a_timestep_above_the_first_sampled_as_a1111s_sample_img2img(sd1, sampler, convention,
                                                                                      strength, extra):
    """`sample_img2img` noises the init latent at timesteps[t_enc] and samples on timesteps[:t_enc], reading it at
    the first of them (UniPC: from t = timesteps[t_enc - 1] / 1000 + 1 / 1000)."""
    assert convention in A1111_IMG2IMG
    req = GenerationRequest(prompt="a red cube", negative_prompt="blurry", sampler=sampler, schedule="ddim_uniform",
                            steps=10, cfg_scale=6.0, seed=3, width=32, height=32, init_image=init_picture(32),
                            strength=strength, img2img_convention=convention, extra_noise=extra)
    plan = make_plan(sd1, req)
    start = _start(sd1, plan, generators_for(plan.request.seeds(), plan.request.rng, sd1.device))
    steps, t_enc = setup_img2img_steps(10, strength, convention == "a1111_fix_steps")
    timesteps = get_timesteps(steps)
    alphas_cumprod = plan.sampling.schedule.alphas_cumprod.float()
    xi = img2img_start(start.image_latent, start.noise, alphas_cumprod, timesteps[t_enc], extra)
    model = _cfg_eps(sd1, req.prompt, req.negative_prompt, 6.0)
    sched = timesteps[:t_enc]
    reference = unipc(model, xi, sched, alphas_cumprod, True) if sampler == "UniPC" else A1111[sampler](
        model, xi, sched, alphas_cumprod)
    assert _close(sample_latents(sd1, plan), reference)


def _a1111_base_calls(calls: int, total_steps: int, switch_at: float) -> int:
    """A1111's `apply_refiner` by sampling steps (sd_samplers_common.py): call `step` (from 0) switches once
    `step / total_steps` is not below the switch; the base's calls before it (all of them where none does)."""
    return next((step for step in range(calls) if not step / total_steps < switch_at), calls)


@pytest.mark.parametrize("sampler, fields, switch_at, total_steps, calls", [
    ("DDIM", dict(steps=20), 0.26, 20, 19),                                   # txt2img: launch_sampling(steps)
    ("PLMS", dict(steps=20), 0.26, 20, 20),                                   # PLMS's first step: two calls
    ("UniPC", dict(steps=10), 0.45, 10, 9),
    ("DDIM", dict(steps=20, strength=0.5), 0.3, 11, 9),                       # img2img: launch_sampling(t_enc + 1)
    ("DDIM", dict(steps=20, strength=0.5), 0.5, 11, 9),
    ("DDIM", dict(steps=20, strength=0.5), 0.8, 11, 9),                       # 8 / 11 < 0.8: no swap
    ("DDIM", dict(steps=20, strength=0.75), 0.8, 16, 14),
])
def test_the_refiner_switch_by_sampling_steps_counts_a1111s_total_steps(sampler, fields, switch_at, total_steps,
                                                                          calls):
    """The base takes the calls A1111's switch by sampling steps leaves it: it counts them against
    `launch_sampling`'s total_steps, the steps (txt2img) or t_enc + 1 (img2img), not the calls the sampler makes."""
    from sdlab.pipeline.generate import _a1111_switch
    if "strength" in fields:
        fields = dict(fields, init_image=init_picture(32), img2img_convention="a1111")
    bundle = tiny_bundle("sd1")
    plan = make_plan(bundle, GenerationRequest(prompt="x", sampler=sampler, schedule="ddim_uniform", width=32,
                                               height=32, seed=1, **fields),
                     refiner=bundle, switch_at=switch_at, refiner_convention="a1111_steps")
    assert plan.a1111_total_steps == total_steps
    expected = _a1111_base_calls(calls, total_steps, switch_at)
    switches = _a1111_switch(plan)
    assert next((call for call in range(calls) if switches(call, plan.sigmas[:1])), calls) == expected
    extra = sampler == "PLMS"                                          # the split counts steps: PLMS's first has two
    assert plan.refiner_split == (plan.steps_run if expected == calls else max(expected - extra, 0))


@pytest.mark.parametrize("sampler", ["DDIM", "PLMS", "UniPC"])
def test_the_vp_start_the_timestep_samplers_bring_is_not_labelled(sampler):
    """A1111 writes no `Initial noise`: its timestep samplers start from the unit noise as a VP latent, which an
    unlabelled text implies again on reading; another start noise keeps sdlab's label."""
    from sdlab.pipeline.infotext import from_parameters
    from sdlab.pipeline.plan import resolve_for
    from sdlab.pipeline.png_info import format_parameters, parse_parameters
    bundle = tiny_bundle("sd1")
    req = resolve_for(bundle, GenerationRequest(prompt="x", sampler=sampler, schedule="ddim_uniform", steps=20,
                                                seed=1, width=32, height=32))
    assert req.init_noise == "vp" and "Initial noise" not in format_parameters(to_parameters(req))
    back = from_parameters(parse_parameters(format_parameters(to_parameters(req))))
    assert resolve_for(bundle, GenerationRequest(**back)).init_noise == "vp"
    other = resolve_for(bundle, replace(req, init_noise="sigma_max"))
    assert to_parameters(other)["Initial noise"] == "sigma_max"


def test_ddims_eta_noise_follows_the_ensd_which_the_text_records():
    """A1111's DDIM draws its eta noise from `p.rng`, which `ImageRNG.first` re-seeds with seed + ENSD, though
    `is_sampler_using_eta_noise_seed_delta` writes no ENSD for it: sdlab's noise follows the ENSD too, so its text
    records it (else it would not redraw)."""
    from sdlab.pipeline.generate import generate
    bundle = tiny_bundle("sd1")
    req = GenerationRequest(prompt="x", sampler="DDIM", schedule="ddim_uniform", steps=3, seed=1, width=32, height=32,
                            eta=0.5, eta_noise_seed_delta=31337)
    plain, seeded = (torch.tensor(list(generate(bundle, r).images[0].getdata()))
                     for r in (replace(req, eta_noise_seed_delta=0), req))
    assert not torch.equal(plain, seeded)
    assert to_parameters(replace(req, seed=1))["ENSD"] == 31337
