"""A1111's `Schedule min sigma`, `Schedule max sigma`, `Schedule rho` (its `sigma_min`, `sigma_max`, `rho` settings)
and `Discard penultimate sigma` (`always_discard_next_to_last_sigma`): applied where A1111's `get_sigmas` applies
them, written and read with its labels, taken from the A1111 API's options.

The reference is A1111 1.10's `KDiffusionSampler.get_sigmas` (modules/sd_samplers_kdiffusion.py) and its
schedulers (modules/sd_schedulers.py), transcribed; k-diffusion's `get_sigmas_*` are the installed ones, its
`DiscreteSchedule.sigma_to_t` / `t_to_sigma` (k_diffusion/external.py) transcribed."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch

import sampler_harness as H
from bundle_fixtures import tiny_bundle
from sdlab.diffusion.model_sampling import DiscreteModelSampling
from sdlab.diffusion.samplers import get_sampler
from sdlab.diffusion.schedules import NoiseSchedule
from sdlab.pipeline.generate import generate
from sdlab.pipeline.infotext import from_parameters, to_parameters, undrawn_labels
from sdlab.pipeline.plan import a1111_training_sigmas, request_sampling, request_sigmas
from sdlab.pipeline.png_info import format_parameters, parse_parameters
from sdlab.pipeline.request import GenerationRequest, RequestError, resolve
from sdlab.server.a1111 import Txt2ImgIn, _request
from sdlab.server.inputs import BadRequest
from test_a1111_schedules import beta_scheduler, kl_optimal

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

KD = H.load_k_diffusion_sampling()
SAMPLING = DiscreteModelSampling(NoiseSchedule.sd(), "epsilon")


class DiscreteSchedule:
    """k_diffusion/external.py `DiscreteSchedule` (float32 sigmas of SD's schedule), transcribed."""

    def __init__(self) -> None:
        self.sigmas = NoiseSchedule.sd().sigmas.float()
        self.log_sigmas = self.sigmas.log()

    def get_sigmas(self, n=None):
        t_max = len(self.sigmas) - 1
        t = torch.linspace(t_max, 0, n, device=self.sigmas.device)
        return torch.cat([self.t_to_sigma(t), t.new_zeros([1])])

    def sigma_to_t(self, sigma, quantize=None):
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = self.log_sigmas[low_idx], self.log_sigmas[high_idx]
        w = (low - log_sigma) / (low - high)
        w = w.clamp(0, 1)
        t = (1 - w) * low_idx + w * high_idx
        return t.view(sigma.shape)

    def t_to_sigma(self, t):
        t = t.float()
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]
        return log_sigma.exp()


# -- A1111 1.10 modules/sd_schedulers.py -------------------------------------------------------------------------
def uniform(n, sigma_min, sigma_max, inner_model, device):
    return inner_model.get_sigmas(n).to(device)


def sgm_uniform(n, sigma_min, sigma_max, inner_model, device):
    start = inner_model.sigma_to_t(torch.tensor(sigma_max))
    end = inner_model.sigma_to_t(torch.tensor(sigma_min))
    sigs = [
        inner_model.t_to_sigma(ts)
        for ts in torch.linspace(start, end, n + 1)[:-1]
    ]
    sigs += [0.0]
    return torch.FloatTensor(sigs).to(device)


def normal_scheduler(n, sigma_min, sigma_max, inner_model, device, sgm=False, floor=False):
    start = inner_model.sigma_to_t(torch.tensor(sigma_max))
    end = inner_model.sigma_to_t(torch.tensor(sigma_min))
    if sgm:
        timesteps = torch.linspace(start, end, n + 1)[:-1]
    else:
        timesteps = torch.linspace(start, end, n)
    sigs = []
    for x in range(len(timesteps)):
        ts = timesteps[x]
        sigs.append(inner_model.t_to_sigma(ts))
    sigs += [0.0]
    return torch.FloatTensor(sigs).to(device)


Scheduler = types.SimpleNamespace
SCHEDULERS = {    # label -> Scheduler(function, default_rho, need_inner_model), as A1111's table
    "Uniform": Scheduler(label="Uniform", function=uniform, default_rho=-1, need_inner_model=True),
    "Karras": Scheduler(label="Karras", function=KD.get_sigmas_karras, default_rho=7.0, need_inner_model=False),
    "Exponential": Scheduler(label="Exponential", function=KD.get_sigmas_exponential, default_rho=-1,
                             need_inner_model=False),
    "Polyexponential": Scheduler(label="Polyexponential", function=KD.get_sigmas_polyexponential, default_rho=1.0,
                                 need_inner_model=False),
    "SGM Uniform": Scheduler(label="SGM Uniform", function=sgm_uniform, default_rho=-1, need_inner_model=True),
    "KL Optimal": Scheduler(label="KL Optimal", function=kl_optimal, default_rho=-1, need_inner_model=False),
    "Normal": Scheduler(label="Normal", function=normal_scheduler, default_rho=-1, need_inner_model=True),
    "Beta": Scheduler(label="Beta", function=beta_scheduler, default_rho=-1, need_inner_model=True),
}


def a1111_get_sigmas(scheduler_label, steps, row_discards, opts):
    """`KDiffusionSampler.get_sigmas` (A1111 1.10), transcribed; returns the sigmas and the labels it writes."""
    opts = types.SimpleNamespace(**{"sigma_min": 0.0, "sigma_max": 0.0, "rho": 0.0,
                                    "always_discard_next_to_last_sigma": False, **opts})
    model_wrap = DiscreteSchedule()
    extra_generation_params = {}
    discard_next_to_last_sigma = row_discards
    if opts.always_discard_next_to_last_sigma and not discard_next_to_last_sigma:
        discard_next_to_last_sigma = True
        extra_generation_params["Discard penultimate sigma"] = True

    steps += 1 if discard_next_to_last_sigma else 0

    scheduler = SCHEDULERS[scheduler_label]
    m_sigma_min, m_sigma_max = model_wrap.sigmas[0].item(), model_wrap.sigmas[-1].item()
    sigma_min, sigma_max = (m_sigma_min, m_sigma_max)

    sigmas_kwargs = {'sigma_min': sigma_min, 'sigma_max': sigma_max}
    if opts.sigma_min != 0 and opts.sigma_min != m_sigma_min:
        sigmas_kwargs['sigma_min'] = opts.sigma_min
        extra_generation_params["Schedule min sigma"] = opts.sigma_min
    if opts.sigma_max != 0 and opts.sigma_max != m_sigma_max:
        sigmas_kwargs['sigma_max'] = opts.sigma_max
        extra_generation_params["Schedule max sigma"] = opts.sigma_max
    if scheduler.default_rho != -1 and opts.rho != 0 and opts.rho != scheduler.default_rho:
        sigmas_kwargs['rho'] = opts.rho
        extra_generation_params["Schedule rho"] = opts.rho
    if scheduler.need_inner_model:
        sigmas_kwargs['inner_model'] = model_wrap
    if scheduler.label == "Beta":         # beta_scheduler takes no inner_model in the transcription it shares
        sigmas_kwargs.pop('inner_model')
    sigmas = scheduler.function(n=steps, **sigmas_kwargs, device="cpu")

    if discard_next_to_last_sigma:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas.cpu(), extra_generation_params


def _req(sampler, schedule, steps, **options):
    return resolve(GenerationRequest(prompt="x", sampler=sampler, schedule=schedule, steps=steps, seed=1, **options),
                   default_size=64, default_sampler="Euler", default_schedule="karras", factor=8)


OPTS = [{"sigma_min": 0.1}, {"sigma_max": 5.0}, {"rho": 3.0}, {"rho": 7.0}, {"rho": 1.0},
        {"sigma_min": 0.3, "sigma_max": 8.0, "rho": 2.5}, {"always_discard_next_to_last_sigma": True},
        {"sigma_min": 0.05, "always_discard_next_to_last_sigma": True}, {"rho": 0.5}, {"rho": 0.45, "sigma_max": 20.0},
        {"sigma_min": 0.001, "sigma_max": 30.0},
        {"sigma_min": 0.01, "rho": 0.8, "always_discard_next_to_last_sigma": True}]
"""Rho below 1 (k-diffusion's float32 Karras ramp cancels near sigma_min) and ends outside the model's range too."""


@pytest.mark.parametrize("label", list(SCHEDULERS))
@pytest.mark.parametrize("sampler", ["Euler", "DPM2"])
@pytest.mark.parametrize("opts", OPTS)
def test_the_overrides_apply_where_a1111s_get_sigmas_applies_them(label, sampler, opts):
    """Every A1111 schedule whose function takes them, at 1..20 steps, through `request_sigmas`, and the labels
    it writes; DPM2's row drops the next-to-last sigma itself (no label)."""
    spec = get_sampler(sampler)
    fields = dict(schedule_sigma_min=opts.get("sigma_min", 0.0), schedule_sigma_max=opts.get("sigma_max", 0.0),
                  schedule_rho=opts.get("rho", 0.0),
                  discard_penultimate_sigma=opts.get("always_discard_next_to_last_sigma", False))
    for steps in (1, 2, 7, 20):
        req = _req(sampler, label, steps, **fields)
        ours = request_sigmas(SAMPLING, spec, req)
        reference, labels = a1111_get_sigmas(label, steps, spec.discard_penultimate, opts)
        assert ours.shape == reference.shape, (steps, ours, reference)
        torch.testing.assert_close(ours.float(), reference, rtol=2e-5, atol=1e-6)
        written = {k: v for k, v in to_parameters(req).items() if k in (
            "Schedule min sigma", "Schedule max sigma", "Schedule rho", "Discard penultimate sigma") and v}
        if label != "Uniform":            # A1111 labels the ends it passes to a function that ignores them
            assert written == labels
        else:
            assert written == {k: v for k, v in labels.items() if k == "Discard penultimate sigma"}


def test_a_karras_rho_whose_float32_ramp_reaches_zero_is_refused():
    """At rho 0.3 k-diffusion's float32 ramp ends on sigma 0 before the final 0 (A1111's and ComfyUI's samplers then
    divide by it): a request error naming rho, not a NaN picture."""
    reference, _ = a1111_get_sigmas("Karras", 10, False, {"rho": 0.3})
    assert float(reference[-2]) == 0.0
    with pytest.raises(RequestError, match="rho 0.3"):
        request_sigmas(SAMPLING, get_sampler("Euler"), _req("Euler", "Karras", 10, schedule_rho=0.3))


@pytest.mark.parametrize("label", ["Karras", "SGM Uniform", "Exponential"])
@pytest.mark.parametrize("fields", [{"schedule_sigma_min": 1e30}, {"schedule_sigma_min": 5.0, "schedule_sigma_max": 5.0},
                                    {"schedule_sigma_min": 8.0, "schedule_sigma_max": 2.0}])
def test_overrides_whose_sigmas_do_not_fall_are_refused(label, fields):
    """A minimum at or past the maximum (the model's where unset), or a rho so large every step lands on one sigma:
    a request error naming the overrides. Before, DPM++ 2M failed mid-job with a ZeroDivisionError (its step
    before's size 0), which the native API reported as an "internal error"."""
    with pytest.raises(RequestError, match="schedule_sigma_min .* do not fall step by step"):
        request_sigmas(SAMPLING, get_sampler("DPM++ 2M"), _req("DPM++ 2M", label, 6, **fields))
    if label == "Karras":
        with pytest.raises(RequestError, match="schedule_rho 1e.30 .* do not fall step by step"):
            request_sigmas(SAMPLING, get_sampler("DPM++ 2M"), _req("DPM++ 2M", label, 6, schedule_rho=1e30))


def test_defaults_leave_the_sigmas_as_they_were():
    for label in SCHEDULERS:
        for sampler in ("Euler", "DPM2", "DDIM", "DPM++ 2M"):
            req = _req(sampler, label, 9)
            plain = request_sigmas(SAMPLING, get_sampler(sampler), req)
            zeros = request_sigmas(SAMPLING, get_sampler(sampler), _req(sampler, label, 9, schedule_sigma_min=0.0,
                                                                          schedule_rho=0.0))
            assert torch.equal(plain, zeros)


def test_a1111s_timestep_samplers_keep_their_timesteps():
    """A1111's DDIM / PLMS / UniPC (sd_samplers_timesteps) have no `get_sigmas`: the sigma overrides change nothing
    (Discard penultimate sigma takes the timesteps of a step more: tests/test_a1111_timestep_samplers.py)."""
    for sampler in ("DDIM", "PLMS", "UniPC"):
        plain = request_sigmas(SAMPLING, get_sampler(sampler), _req(sampler, "ddim_uniform", 10))
        asked = request_sigmas(SAMPLING, get_sampler(sampler), _req(sampler, "ddim_uniform", 10, schedule_sigma_min=0.3,
                                                                    schedule_sigma_max=8.0, schedule_rho=2.5))
        assert torch.equal(plain, asked)


def test_an_a1111_picture_with_overrides_is_redrawn_with_them():
    text = ("a cat\nSteps: 4, Sampler: DPM++ 2M, Schedule type: Karras, Seed: 3, Size: 16x16, Schedule min sigma: 0.2, "
            "Schedule max sigma: 6, Schedule rho: 3, Discard penultimate sigma: True, Version: v1.10.1")
    p = parse_parameters(text)
    assert undrawn_labels(p) == []
    fields = from_parameters(p)
    assert (fields["schedule_sigma_min"], fields["schedule_sigma_max"], fields["schedule_rho"],
            fields["discard_penultimate_sigma"]) == (0.2, 6.0, 3.0, True)
    bundle = tiny_bundle("sd1", seed=5)
    req = GenerationRequest(**fields)
    first = np.asarray(generate(bundle, req).images[0], dtype=np.int16)
    again = np.asarray(generate(bundle, GenerationRequest(**from_parameters(parse_parameters(
        format_parameters(to_parameters(req)))))).images[0], dtype=np.int16)
    plain = np.asarray(generate(bundle, GenerationRequest(**{**fields, "schedule_rho": 0.0})).images[0],
                       dtype=np.int16)
    assert np.array_equal(first, again) and np.abs(first - plain).max() > 0


def test_the_api_takes_them_from_its_options():
    body = Txt2ImgIn(prompt="x", sampler_name="DPM++ 2M", scheduler="karras",
                     override_settings={"sigma_min": 0.2, "sigma_max": 6, "rho": 3,
                                        "always_discard_next_to_last_sigma": True})
    req = _request(body)
    assert (req.schedule_sigma_min, req.schedule_sigma_max, req.schedule_rho, req.discard_penultimate_sigma) == (
        0.2, 6, 3, True)
    plain = _request(Txt2ImgIn(prompt="x", sampler_name="DPM++ 2M"))
    assert (plain.schedule_sigma_min, plain.schedule_sigma_max, plain.schedule_rho,
            plain.discard_penultimate_sigma) == (0.0, 0.0, 0.0, False)
    for bad in ({"rho": -1}, {"sigma_min": "x"}, {"sigma_max": math.inf}, {"always_discard_next_to_last_sigma": 1}):
        with pytest.raises(BadRequest, match="override_settings"):
            _request(Txt2ImgIn(prompt="x", override_settings=bad))


def test_the_models_own_ends_are_not_applied_nor_written():
    """Schedule min / max sigma equal to the model's ends (A1111's m_sigma_min / m_sigma_max, k-diffusion's sigmas of
    the float32 alphas_cumprod, `a1111_training_sigmas`): A1111's `get_sigmas` leaves them out
    (``opts.sigma_min != m_sigma_min``) and writes no label; the picture is the plain one, the written infotext
    has neither label (both were written before `plan.a1111_schedule_ends`)."""
    bundle = tiny_bundle("sd1", seed=5)
    ends = a1111_training_sigmas(request_sampling(bundle.model_sampling, GenerationRequest(prompt="x")))
    fields = dict(prompt="a cat", sampler="DPM++ 2M", schedule="karras", steps=4, seed=3, width=16, height=16)
    own = generate(bundle, GenerationRequest(**fields, schedule_sigma_min=float(ends[0]),
                                             schedule_sigma_max=float(ends[-1])))
    plain = generate(bundle, GenerationRequest(**fields))
    assert np.array_equal(np.asarray(own.images[0]), np.asarray(plain.images[0]))
    written = to_parameters(own.request)
    assert written.get("Schedule min sigma") is None and written.get("Schedule max sigma") is None
