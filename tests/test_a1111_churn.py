"""A1111's churn (`Sigma churn`, `Sigma tmin`, `Sigma tmax`) and its s_noise rule: drawn where A1111 draws them,
with the noise A1111 feeds k-diffusion, written and read with A1111's labels, taken from an A1111 API request
as A1111 takes them. The references are k-diffusion's sampling functions and A1111 1.10's lines, transcribed."""

from __future__ import annotations

import math
import types
from dataclasses import replace

import numpy as np
import pytest
import torch

import sampler_harness as H
from bundle_fixtures import tiny_bundle, write_original
from cli_helpers import pixels, run
from sdlab.checkpoints.load import load_bundle
from sdlab.diffusion.model_sampling import DiscreteModelSampling
from sdlab.diffusion.samplers import get_sampler
from sdlab.diffusion.schedules import NoiseSchedule
from sdlab.pipeline.generate import _sampler_options, generate
from sdlab.pipeline.infotext import from_parameters, to_parameters, undrawn_labels
from sdlab.pipeline.plan import GenerationPlan, request_sigmas
from sdlab.pipeline.png_info import format_parameters, parse_parameters
from sdlab.pipeline.request import GenerationRequest, RequestError, resolve
from sdlab.server.a1111 import A1111_SIGMA_OPTIONS, Txt2ImgIn, _request, _sigma_options

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

KD = H.load_k_diffusion_sampling()
SAMPLING = DiscreteModelSampling(NoiseSchedule.sd(), "epsilon")
CHURN = dict(s_churn=1.5, s_tmin=0.3, s_tmax=6.0)


def _request_of(sampler: str, steps: int, **options) -> GenerationRequest:
    return resolve(GenerationRequest(prompt="x", sampler=sampler, schedule="karras", steps=steps, seed=H.SEEDS[0],
                                     batch_size=len(H.SEEDS), **options),
                   default_size=64, default_sampler="Euler", default_schedule="karras", factor=8)


class TorchHijack:
    """A1111's `TorchHijack` (sd_samplers_kdiffusion.py) as k-diffusion's `torch`: `randn_like` is the next draw of
    each picture's generator (`ImageRNG.next`), everything else torch's."""

    def __init__(self, generators: list[torch.Generator]) -> None:
        self.generators = generators

    def __getattr__(self, item):
        return getattr(torch, item)

    def randn_like(self, x):
        return torch.cat([torch.randn((1, *x.shape[1:]), generator=g) for g in self.generators])


# ---------------------------------------------------------------- drawing

@pytest.mark.parametrize("sampler, function", [("Euler", "sample_euler"), ("Heun", "sample_heun"),
                                               ("DPM2", "sample_dpm_2")])
def test_churn_draws_as_a1111_feeds_k_diffusion(sampler, function, monkeypatch):
    """A1111 passes s_churn / s_tmin / s_tmax / s_noise to these three functions (`sampler_extra_params`), whose
    churn noise is k-diffusion's `torch.randn_like`: the pictures' generators after the initial noise."""
    req = _request_of(sampler, 6, s_noise=0.9, **CHURN)
    spec = get_sampler(sampler)
    sigmas = request_sigmas(SAMPLING, spec, req)
    plan = GenerationPlan(request=req, sampler=spec, sampling=SAMPLING, sigmas=sigmas, latent_shape=H.LATENT_SHAPE)
    generators = [torch.Generator().manual_seed(seed) for seed in req.seeds()]
    x = torch.cat([torch.randn((1, *H.LATENT_SHAPE[1:]), generator=g) for g in generators]) * sigmas[0]
    model = H.sdlab_model(H.tiny_unet(), H.context(), "epsilon")
    ours = spec.fn(model, x, sigmas, **_sampler_options(plan, x, generators))

    step = [torch.Generator().manual_seed(seed) for seed in req.seeds()]
    for g in step:                                       # the initial noise's streams go on
        torch.randn((1, *H.LATENT_SHAPE[1:]), generator=g)
    monkeypatch.setattr(KD, "torch", TorchHijack(step))
    reference = getattr(KD, function)(model, x, sigmas, disable=True, s_noise=0.9, **CHURN)
    plain = spec.fn(model, x, sigmas)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    assert (ours - plain).abs().max() > 1e-2             # the churn changed the picture


def test_churn_out_of_range_is_one_error():
    for bad in (dict(s_churn=-1.0), dict(s_churn=math.nan), dict(s_tmin=-0.5), dict(s_tmax=-1.0)):
        with pytest.raises(RequestError, match="s_t?(churn|min|max)"):
            _request_of("Euler", 4, **bad)


# ---------------------------------------------------------------- infotext

@pytest.mark.parametrize("sampler, labelled", [("Euler", True), ("Heun", True), ("DPM2", True),
                                               ("Euler a", False), ("DPM++ 2M", False)])
def test_churn_is_written_as_a1111_writes_it_and_read_back(sampler, labelled):
    """A1111's `Sampler.initialize`: `if 's_churn' in extra_params_kwargs and s_churn != self.s_churn: ...
    p.extra_generation_params['Sigma churn'] = s_churn` (and `Sigma tmin`, `Sigma tmax`: defaults 0, inf)."""
    req = GenerationRequest(prompt="a cat", steps=4, seed=1, width=64, height=64, sampler=sampler, **CHURN)
    written = to_parameters(req)
    expected = {"Sigma churn": 1.5, "Sigma tmin": 0.3, "Sigma tmax": 6.0}
    assert {label: written[label] for label in expected} == (expected if labelled else dict.fromkeys(expected))
    read = from_parameters(parse_parameters(format_parameters(written)))
    assert {name: read.get(name) for name in CHURN} == (CHURN if labelled else dict.fromkeys(CHURN))
    plain = to_parameters(GenerationRequest(prompt="a cat", steps=4, seed=1, sampler=sampler))
    assert not any(plain[label] for label in expected)


def test_an_a1111_picture_with_churn_is_redrawn_with_it():
    text = "a cat\nSteps: 4, Sampler: Euler, Seed: 3, Size: 16x16, Sigma churn: 0.8, Sigma tmin: 0.5, Version: v1.10.1"
    p = parse_parameters(text)
    assert undrawn_labels(p) == []
    fields = from_parameters(p)
    assert (fields["s_churn"], fields["s_tmin"]) == (0.8, 0.5) and "s_tmax" not in fields
    bundle = tiny_bundle("sd1", seed=5)
    req = GenerationRequest(**{**fields, "schedule": "karras"})
    first = np.asarray(generate(bundle, req).images[0], dtype=np.int16)
    again = np.asarray(generate(bundle, GenerationRequest(**from_parameters(parse_parameters(
        format_parameters(to_parameters(req)))))).images[0], dtype=np.int16)
    unchurned = np.asarray(generate(bundle, GenerationRequest(**{**fields, "s_churn": 0.0, "schedule": "karras"})
                                    ).images[0], dtype=np.int16)
    assert np.array_equal(first, again) and np.abs(first - unchurned).max() > 0


@pytest.mark.parametrize("sampler", ["Euler", "Heun", "DPM2"])
def test_churns_ensd_is_written_and_redraws_the_picture(sampler):
    """Churn draws its noise from the seed + ENSD generators, so the picture's own text records the ENSD (A1111's
    `is_sampler_using_eta_noise_seed_delta` leaves it out; A1111 reads the label back as an override)."""
    req = GenerationRequest(prompt="a red apple", steps=4, seed=3, width=16, height=16, sampler=sampler,
                            schedule="karras", s_churn=1.2, eta_noise_seed_delta=31337)
    written = to_parameters(req)
    assert written["ENSD"] == 31337
    bundle = tiny_bundle("sd1", seed=5)
    first = np.asarray(generate(bundle, req).images[0], dtype=np.int16)
    again = np.asarray(generate(bundle, GenerationRequest(**from_parameters(parse_parameters(
        format_parameters(written))))).images[0], dtype=np.int16)
    without = np.asarray(generate(bundle, replace(req, eta_noise_seed_delta=None)).images[0], dtype=np.int16)
    assert np.array_equal(first, again) and np.abs(first - without).max() > 0
    assert to_parameters(replace(req, s_churn=0.0))["ENSD"] is None


# ---------------------------------------------------------------- the A1111 API

def _a1111_initialize(funcname: str, body: dict, opts: dict) -> dict:
    """A1111 1.10, transcribed: `processing.StableDiffusionProcessing.__post_init__` (the request's field, else the
    option; s_tmax 0 = inf), `sd_samplers_kdiffusion.sampler_extra_params` and `Sampler.initialize` (every
    function named there takes all of its parameters)."""
    sampler_extra_params = {
        'sample_euler': ['s_churn', 's_tmin', 's_tmax', 's_noise'],
        'sample_heun': ['s_churn', 's_tmin', 's_tmax', 's_noise'],
        'sample_dpm_2': ['s_churn', 's_tmin', 's_tmax', 's_noise'],
        'sample_dpm_fast': ['s_noise'],
        'sample_dpm_2_ancestral': ['s_noise'],
        'sample_dpmpp_2s_ancestral': ['s_noise'],
        'sample_dpmpp_sde': ['s_noise'],
        'sample_dpmpp_2m_sde': ['s_noise'],
        'sample_dpmpp_3m_sde': ['s_noise'],
    }
    opts = types.SimpleNamespace(**{"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0, **opts})
    p = types.SimpleNamespace(**{name: body.get(name) for name in ("s_churn", "s_tmin", "s_tmax", "s_noise")})
    p.s_churn = p.s_churn if p.s_churn is not None else opts.s_churn
    p.s_tmin = p.s_tmin if p.s_tmin is not None else opts.s_tmin
    p.s_tmax = (p.s_tmax if p.s_tmax is not None else opts.s_tmax) or float('inf')
    p.s_noise = p.s_noise if p.s_noise is not None else opts.s_noise
    self = types.SimpleNamespace(extra_params=sampler_extra_params.get(funcname, []), s_churn=0.0, s_tmin=0.0,
                                 s_tmax=float('inf'), s_noise=1.0)
    extra_params_kwargs = {}
    for param_name in self.extra_params:
        if hasattr(p, param_name):
            extra_params_kwargs[param_name] = getattr(p, param_name)
    if len(self.extra_params) > 0:
        s_churn = getattr(opts, 's_churn', p.s_churn)
        s_tmin = getattr(opts, 's_tmin', p.s_tmin)
        s_tmax = getattr(opts, 's_tmax', p.s_tmax) or self.s_tmax  # 0 = inf
        s_noise = getattr(opts, 's_noise', p.s_noise)
        if 's_churn' in extra_params_kwargs and s_churn != self.s_churn:
            extra_params_kwargs['s_churn'] = s_churn
        if 's_tmin' in extra_params_kwargs and s_tmin != self.s_tmin:
            extra_params_kwargs['s_tmin'] = s_tmin
        if 's_tmax' in extra_params_kwargs and s_tmax != self.s_tmax:
            extra_params_kwargs['s_tmax'] = s_tmax
        if 's_noise' in extra_params_kwargs and s_noise != self.s_noise:
            extra_params_kwargs['s_noise'] = s_noise
    return extra_params_kwargs


FUNCTIONS = {"Euler": "sample_euler", "Heun": "sample_heun", "DPM2": "sample_dpm_2",
             "Euler a": "sample_euler_ancestral", "DPM2 a": "sample_dpm_2_ancestral", "DPM++ 2M": "sample_dpmpp_2m", "DPM++ SDE": "sample_dpmpp_sde",
             "DPM++ 2M SDE Heun": "sample_dpmpp_2m_sde", "DPM++ 3M SDE": "sample_dpmpp_3m_sde", "LMS": "sample_lms"}
BODIES = [{}, {"s_churn": 0.7}, {"s_churn": 0.7, "s_tmin": 0.2, "s_tmax": 0}, {"s_noise": 0.5},
          {"s_churn": 0.7, "s_tmax": 3.0, "s_noise": 0.0}]
OPTIONS = [{}, {"s_churn": 0.4}, {"s_noise": 0.8, "s_tmax": 9.0}, {"s_noise": 0.0, "s_tmin": 0.1}]


@pytest.mark.parametrize("sampler", list(FUNCTIONS))
@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("opts", OPTIONS)
def test_the_api_takes_churn_and_s_noise_as_a1111_does(sampler, body, opts):
    """Which sampler gets which of the four, and whether the request's field or the option (`POST options`,
    `override_settings`) wins: A1111's rule, compared with its lines on every combination."""
    expected = {name: float(value) for name, value in _a1111_initialize(FUNCTIONS[sampler], body, opts).items()}
    ours = _sigma_options(Txt2ImgIn(prompt="x", sampler_name=sampler, **body), {**opts}, sampler)
    assert {name: math.inf if value is None else value for name, value in ours.items()} == expected
    req = _request(Txt2ImgIn(prompt="x", sampler_name=sampler, override_settings=opts, **body))
    drawn = {name: getattr(req, name) for name in A1111_SIGMA_OPTIONS}
    assert drawn == {**A1111_SIGMA_OPTIONS, "s_tmax": None, **ours}     # the request's s_tmax None: inf


def test_an_api_request_with_churn_draws_the_cli_picture(tmp_path, capsys):
    model = tmp_path / "tiny-sd1.safetensors"
    write_original(tiny_bundle("sd1"), model, junk=False)
    out = tmp_path / "cli.png"
    code, _, err = run(["txt2img", "a red cube", "--model", str(model), "--steps", "4", "--seed", "3", "--sampler",
                        "Euler", "--schedule", "karras", "--cfg", "5", "--width", "32", "--height", "32", "--s-churn",
                        "1.2", "--s-tmin", "0.4", "--s-tmax", "8", "--s-noise", "0.95", "--no-progress", "--out",
                        str(out)], capsys)
    assert code == 0, err
    body = Txt2ImgIn(prompt="a red cube", steps=4, seed=3, sampler_name="Euler", scheduler="karras", cfg_scale=5,
                     width=32, height=32, s_churn=1.2, s_tmin=0.4, s_tmax=8, s_noise=0.95)
    bundle = load_bundle(model)
    api = np.asarray(generate(bundle, _request(body)).images[0], dtype=np.int16)
    assert np.array_equal(api, pixels(out))
    plain = np.asarray(generate(bundle, _request(Txt2ImgIn(**{**body.model_dump(), "s_churn": None}))).images[0],
                       dtype=np.int16)
    assert np.abs(api - plain).max() > 0


def test_s_tmax_0_is_no_upper_end_everywhere(tmp_path, capsys):
    """A1111 reads s_tmax 0 as inf (`processing`: `... or float('inf')`; `Sampler.initialize`: `... or
    self.s_tmax`), so `Sigma tmax: 0` churns at every step; the CLI, a request and the text read it so too."""
    model = tmp_path / "tiny-sd1.safetensors"
    write_original(tiny_bundle("sd1"), model, junk=False)
    drawn = {}
    for name, tmax in (("zero", ["--s-tmax", "0"]), ("unset", []), ("none", ["--s-churn", "0"])):
        out = tmp_path / f"{name}.png"
        code, _, err = run(["txt2img", "a red cube", "--model", str(model), "--steps", "4", "--seed", "3", "--sampler",
                            "Euler", "--width", "32", "--height", "32", "--s-churn", "0.8", *tmax, "--no-progress",
                            "--out", str(out)], capsys)
        assert code == 0, err
        drawn[name] = pixels(out)
    assert np.array_equal(drawn["zero"], drawn["unset"]) and np.abs(drawn["zero"] - drawn["none"]).max() > 0
    assert _request_of("Euler", 4, s_churn=0.8, s_tmax=0.0).s_tmax is None
    assert to_parameters(GenerationRequest(prompt="x", seed=1, sampler="Euler", s_churn=0.8, s_tmax=0.0))["Sigma tmax"] is None
    text = "a cat\nSteps: 4, Sampler: Euler, Seed: 3, Size: 16x16, Sigma churn: 0.8, Sigma tmax: 0"
    fields = from_parameters(parse_parameters(text))
    bundle = tiny_bundle("sd1", seed=5)
    read = np.asarray(generate(bundle, GenerationRequest(**fields)).images[0], dtype=np.int16)
    unset = np.asarray(generate(bundle, GenerationRequest(**{**fields, "s_tmax": None})).images[0], dtype=np.int16)
    assert np.array_equal(read, unset)


@pytest.mark.parametrize("value", [-0.5, "1", True, math.inf])
def test_a_churn_option_that_is_not_a_number_is_a_422(value):
    from sdlab.server.inputs import BadRequest
    with pytest.raises(BadRequest, match=r"override_settings.s_churn must be a number in 0\.\.1000"):
        _request(Txt2ImgIn(prompt="x", sampler_name="Euler", override_settings={"s_churn": value}))


@pytest.mark.parametrize("name", ["s_churn", "s_tmin", "s_noise"])
def test_an_infinite_churn_field_is_refused_naming_the_value_sent(name):
    """A JSON body may carry `Infinity` (Python's json, which FastAPI reads bodies with, takes it): inf is "no
    upper end" for s_tmax alone (None in the request); the other fields refuse it as sent, not as None."""
    import json

    from sdlab.server.config import Limits
    from sdlab.server.inputs import BadRequest, check_request

    body = Txt2ImgIn(**json.loads(f'{{"prompt": "x", "sampler_name": "Euler", "{name}": Infinity}}'))
    with pytest.raises(BadRequest, match=f"^{name} must be a finite number, got inf$"):
        check_request(_request(body), Limits())
    assert _request(Txt2ImgIn(prompt="x", sampler_name="Euler", s_tmax=math.inf)).s_tmax is None
