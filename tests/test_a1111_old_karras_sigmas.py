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


OWN_MIN, OWN_MAX = MODEL_WRAP.sigmas[0].item(), MODEL_WRAP.sigmas[-1].item()     # the model's ends, as A1111 reads
ENDS = {"unset": {}, "set": {"sigma_min": 0.3, "sigma_max": 5.0}, "own": {"sigma_min": OWN_MIN, "sigma_max": OWN_MAX}}
OPTIONS = {f"old={old}-min={low}-max={high}": {"use_old_karras_scheduler_sigmas": old,
                                               **{k: v for k, v in ENDS[low].items() if k == "sigma_min"},
                                               **{k: v for k, v in ENDS[high].items() if k == "sigma_max"}}
           for old in (True, False) for low in ENDS for high in ENDS}
"""Every combination of the old Karras sigmas on / off and each of sigma_min / sigma_max unset, set, or equal to the
model's own end (which A1111 leaves out, keeping 0.1 / 10 with the old sigmas on)."""


@pytest.mark.parametrize("opts", list(OPTIONS.values()), ids=list(OPTIONS))
@pytest.mark.parametrize("label", list(FUNCTIONS))
def test_the_api_option_gives_a1111s_sigmas(label, opts):
    torch.testing.assert_close(_sigmas(label, opts), a1111_sigmas(label, opts), rtol=2e-6, atol=0)


def test_the_models_own_end_keeps_the_old_ends():
    """The case that tells: the old sigmas on and an option at the model's own end draw from 0.1 / 10, as with the
    option unset, not from the model's end (which the old sigmas off draw from)."""
    own = {"use_old_karras_scheduler_sigmas": True, "sigma_min": OWN_MIN, "sigma_max": OWN_MAX}
    sigmas = _sigmas("Karras", own)
    assert sigmas[0].item() == pytest.approx(10.0) and sigmas[-2].item() == pytest.approx(0.1)
    torch.testing.assert_close(sigmas, _sigmas("Karras", {"use_old_karras_scheduler_sigmas": True}), rtol=0, atol=0)
    off = _sigmas("Karras", {**own, "use_old_karras_scheduler_sigmas": False})
    assert off[0].item() == pytest.approx(OWN_MAX) and off[-2].item() == pytest.approx(OWN_MIN)


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


def test_a_drawing_resolves_them_records_the_ends_and_redraws_from_its_infotext():
    """`generate` (the plan) on a reduced SD1 model: the old sigmas with Schedule min / max sigma at the model's own
    ends draw the picture of the old sigmas alone, 0/255, not the model's ends' picture; the written infotext holds
    the ends drawn (Schedule min sigma 0.1, max sigma 10) and redraws the same picture; a request's
    old_karras_sigmas that is not True or False is refused."""
    import numpy as np

    from bundle_fixtures import tiny_bundle
    from sdlab.pipeline.generate import generate
    from sdlab.pipeline.infotext import from_parameters, to_parameters
    from sdlab.pipeline.plan import a1111_training_sigmas, request_sampling
    from sdlab.pipeline.png_info import format_parameters, parse_parameters
    from sdlab.pipeline.request import GenerationRequest, RequestError

    bundle = tiny_bundle("sd1", seed=5)
    ends = a1111_training_sigmas(request_sampling(bundle.model_sampling, GenerationRequest(prompt="x")))
    fields = dict(prompt="a cat", sampler="DPM++ 2M", schedule="karras", steps=4, seed=3, width=16, height=16)
    own = dict(schedule_sigma_min=float(ends[0]), schedule_sigma_max=float(ends[-1]))
    drawn = generate(bundle, GenerationRequest(**fields, **own, old_karras_sigmas=True))
    pictures = {name: np.asarray(result.images[0], dtype=np.int16) for name, result in (
        ("own", drawn), ("old", generate(bundle, GenerationRequest(**fields, old_karras_sigmas=True))),
        ("model", generate(bundle, GenerationRequest(**fields, **own))))}
    assert np.array_equal(pictures["own"], pictures["old"]) and np.abs(pictures["own"] - pictures["model"]).max() > 0
    written = to_parameters(drawn.request)
    assert (written["Schedule min sigma"], written["Schedule max sigma"]) == (0.1, 10.0)
    again = generate(bundle, GenerationRequest(**from_parameters(parse_parameters(format_parameters(written)))))
    assert np.array_equal(np.asarray(again.images[0], dtype=np.int16), pictures["own"])
    with pytest.raises(RequestError, match="old_karras_sigmas must be True or False, got 1"):
        generate(bundle, GenerationRequest(**fields, old_karras_sigmas=1))


HIRES_CASES = {f"{first}-then-{hires}-{name}": (first, hires, fields)
               for first in ("uniform", "simple", "ddim_uniform", "align_your_steps")
               for hires in ("exponential", "karras")
               for name, fields in (("old", {"old_karras_sigmas": True}),
                                    ("set", {"schedule_sigma_min": 0.3, "schedule_sigma_max": 5.0}))}
"""A first pass whose schedule ignores the ends, a hires pass whose schedule takes them: the old Karras ends, or
Schedule min / max sigma set."""


@pytest.mark.parametrize("first, hires, fields", list(HIRES_CASES.values()), ids=list(HIRES_CASES))
def test_a_hires_pass_that_takes_the_ends_redraws_from_its_infotext(first, hires, fields):
    """The ends only the hires pass's schedule took are recorded (A1111's hires `get_sigmas` writes them into the
    same `extra_generation_params`), so the infotext, read back as `--from-png` and /api/parameters read it, redraws
    the picture 0/255; before, it recorded the schedule types only and the redraw's hires pass drew from the model's
    ends (14.6 ... 0.029 where the old ends give 10 ... 0.1)."""
    import numpy as np

    from bundle_fixtures import tiny_bundle
    from sdlab.pipeline.generate import generate
    from sdlab.pipeline.infotext import from_parameters, to_parameters
    from sdlab.pipeline.png_info import format_parameters, parse_parameters
    from sdlab.pipeline.request import GenerationRequest

    bundle = tiny_bundle("sd1", seed=5)
    drawn = generate(bundle, GenerationRequest(prompt="a cat", sampler="Euler", schedule=first, steps=4, seed=3,
                                               width=16, height=16, hr_scale=2, hr_upscaler="Latent",
                                               hr_schedule=hires, hr_denoise=0.8, **fields))
    written = to_parameters(drawn.request)
    ends = (0.1, 10.0) if fields.get("old_karras_sigmas") else (0.3, 5.0)
    assert (written["Schedule min sigma"], written["Schedule max sigma"]) == ends
    again = generate(bundle, GenerationRequest(**from_parameters(parse_parameters(format_parameters(written)))))
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(drawn.images[0]))
