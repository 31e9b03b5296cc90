"""A1111's `use_old_karras_scheduler_sigmas` ("Use old karras scheduler sigmas (0.1 to 10)"): its
`KDiffusionSampler.get_sigmas` gives every schedule function sigma_min 0.1 and sigma_max 10 instead of the model's
ends, under the `sigma_min` / `sigma_max` options where those are set; Uniform, Simple, DDIM and Align Your Steps
do not read the ends. The A1111 API takes it from its options and a request's `override_settings`.

Reference, transcribed from AUTOMATIC1111/stable-diffusion-webui 1.10 modules/sd_samplers_kdiffusion.py
`get_sigmas` (`sigma_min, sigma_max = (0.1, 10) if opts.use_old_karras_scheduler_sigmas else (m_sigma_min,
m_sigma_max)`, then the sigma_min / sigma_max options) and modules/sd_schedulers.py `sgm_uniform`, on k-diffusion's
`get_sigmas_karras` / `get_sigmas_exponential` and `DiscreteSchedule` of the model's float32 sigmas."""

from __future__ import annotations

import pytest
import torch

import sampler_harness as H
from sdlab.diffusion.model_sampling import DiscreteModelSampling
from sdlab.diffusion.samplers import get_sampler
from sdlab.diffusion.schedules import NoiseSchedule, a1111_schedule_override
from sdlab.pipeline.plan import request_sigmas
from sdlab.pipeline.request import resolve
from sdlab.server.a1111 import Txt2ImgIn
from sdlab.server.a1111 import _request as api_request
from sdlab.server.inputs import BadRequest

KD = H.load_k_diffusion_sampling()
EXT = H.load_k_diffusion_external()
SAMPLING = DiscreteModelSampling(a1111_schedule_override(NoiseSchedule.sd()), "epsilon")   # float32 tables
AC = NoiseSchedule.sd().alphas_cumprod.float()
MODEL_WRAP = EXT.DiscreteSchedule(((1 - AC) / AC) ** 0.5, quantize=False)
STEPS = 7


def sgm_uniform(n, sigma_min, sigma_max, inner_model, device):         # modules/sd_schedulers.py
    start = inner_model.sigma_to_t(torch.tensor(sigma_max))
    end = inner_model.sigma_to_t(torch.tensor(sigma_min))
    sigs = [inner_model.t_to_sigma(ts) for ts in torch.linspace(start, end, n + 1)[:-1]]
    sigs += [0.0]
    return torch.FloatTensor(sigs).to(device)


FUNCTIONS = {"Karras": KD.get_sigmas_karras, "Exponential": KD.get_sigmas_exponential,
             "SGM Uniform": lambda n, sigma_min, sigma_max, device: sgm_uniform(n, sigma_min, sigma_max, MODEL_WRAP,
                                                                                 device)}


def a1111_sigmas(label, opts):
    m_sigma_min, m_sigma_max = MODEL_WRAP.sigmas[0].item(), MODEL_WRAP.sigmas[-1].item()
    sigma_min, sigma_max = (0.1, 10) if opts.get("use_old_karras_scheduler_sigmas") else (m_sigma_min, m_sigma_max)
    if opts.get("sigma_min", 0) not in (0, m_sigma_min):
        sigma_min = opts["sigma_min"]
    if opts.get("sigma_max", 0) not in (0, m_sigma_max):
        sigma_max = opts["sigma_max"]
    return FUNCTIONS[label](n=STEPS, sigma_min=sigma_min, sigma_max=sigma_max, device="cpu")


def _sigmas(scheduler, overrides, options=None):
    request = api_request(Txt2ImgIn(prompt="x", steps=STEPS, sampler_name="Euler", scheduler=scheduler,
                                    override_settings=overrides), options=options)
    request = resolve(request, default_size=64, default_sampler="Euler", default_schedule="karras", factor=8)
    return request_sigmas(SAMPLING, get_sampler("Euler"), request)


OPTIONS = [dict(use_old_karras_scheduler_sigmas=True), dict(use_old_karras_scheduler_sigmas=True, sigma_max=5.0),
           dict(use_old_karras_scheduler_sigmas=True, sigma_min=0.3), dict(use_old_karras_scheduler_sigmas=False)]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("label", list(FUNCTIONS))
def test_the_api_option_gives_a1111s_sigmas(label, opts):
    torch.testing.assert_close(_sigmas(label, opts), a1111_sigmas(label, opts), rtol=2e-6, atol=0)


def test_the_servers_option_counts_as_an_override_does():
    torch.testing.assert_close(_sigmas("Karras", {}, {"use_old_karras_scheduler_sigmas": True}),
                               a1111_sigmas("Karras", {"use_old_karras_scheduler_sigmas": True}), rtol=2e-6, atol=0)


@pytest.mark.parametrize("label", ["Uniform", "Simple", "DDIM", "Align Your Steps"])
def test_schedules_that_read_no_ends_are_unchanged(label):
    torch.testing.assert_close(_sigmas(label, {"use_old_karras_scheduler_sigmas": True}), _sigmas(label, {}),
                               rtol=0, atol=0)


@pytest.mark.parametrize("value", [1, "true", None])
def test_a_value_that_is_not_true_or_false_is_a_422(value):
    with pytest.raises(BadRequest) as err:
        api_request(Txt2ImgIn(prompt="x", override_settings={"use_old_karras_scheduler_sigmas": value}))
    assert err.value.status == 422 and "use_old_karras_scheduler_sigmas must be true or false" in str(err.value)
