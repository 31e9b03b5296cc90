"""`POST /sdapi/v1/options` (and a request's `override_settings`, checked by the same rules: `a1111._check_options`)
refuses a sampler option past the bound every later job's request has (`request.resolve`: s_churn 0..MAX_CHURN,
s_noise and eta 0..MAX_ETA, ENSD 0..MAX_SEED) with a 422 naming it, where it was stored and each later job then
failed; a number past a float's range (JSON's 10**400) is a 422 too, where it was a 500 (OverflowError; SDXL's
crop option at the job, in its float conditioning). Values
A1111's sliders give (shared_options.py: s_churn 0..100, s_noise 0..1.1, eta 0..1) and the request's own bounds
stay drawn."""

from __future__ import annotations

import pytest

from sdlab.pipeline.request import MAX_CHURN, MAX_ETA, MAX_SEED, GenerationRequest, RequestError, resolve
from sdlab.server.a1111 import Txt2ImgIn, _check_options, _request
from sdlab.server.inputs import BadRequest

BIG = 10**400


@pytest.mark.parametrize("key, value, named", [
    ("s_noise", 1e20, "s_noise must be a number in 0..10, got 1e+20"),
    ("s_noise", 10.5, "s_noise must be a number in 0..10, got 10.5"),
    ("s_churn", 1e6, "s_churn must be a number in 0..1000, got 1000000.0"),
    ("eta_ancestral", 200, "eta_ancestral must be a number in 0..10, got 200"),
    ("eta_ddim", 11, "eta_ddim must be a number in 0..10, got 11"),
    ("eta_noise_seed_delta", 2**64, f"eta_noise_seed_delta must be an integer in 0..{MAX_SEED}, got {2**64}"),
    ("s_tmin", BIG, "s_tmin must be a number >= 0, got"),
    ("s_tmax", BIG, "s_tmax must be a number >= 0, got"),
    ("sigma_max", BIG, "sigma_max must be a number >= 0, got"),
    ("s_min_uncond", BIG, "s_min_uncond must be a number, got"),
    ("skip_early_cond", -BIG, "skip_early_cond must be a number in 0..1, got"),
    ("sdxl_crop_top", BIG, "sdxl_crop_top must be an integer in 0..2**127, got"),
    ("sdxl_crop_left", 2**128, "sdxl_crop_left must be an integer in 0..2**127, got"),   # the request's bound
], ids=lambda v: "10**400" if v in (BIG, -BIG) else None)
def test_an_option_no_job_can_draw_with_is_a_422_naming_it(key, value, named):
    with pytest.raises(BadRequest) as refused:
        _check_options({key: value})
    assert refused.value.status == 422 and str(refused.value).startswith(named), str(refused.value)
    assert len(str(refused.value)) < 200                        # 10**400's digits cut to 80 characters
    with pytest.raises(BadRequest) as overridden:
        _request(Txt2ImgIn(prompt="x", sampler_name="Euler", override_settings={key: value}))
    assert str(overridden.value).startswith("override_settings." + named), str(overridden.value)


@pytest.mark.parametrize("key, value", [
    ("s_noise", 1.1), ("s_noise", MAX_ETA), ("s_churn", 100), ("s_churn", MAX_CHURN), ("eta_ancestral", 1.0),
    ("eta_ddim", MAX_ETA), ("eta_noise_seed_delta", 31337), ("eta_noise_seed_delta", MAX_SEED), ("s_tmax", 999.0),
    ("sigma_max", 1e4), ("s_min_uncond", -2.0),
])
def test_a1111s_slider_values_and_the_requests_bounds_stay_accepted(key, value):
    _check_options({key: value})
    for sampler in ("Euler", "Euler a", "DDIM"):                # the request each sampler's options reach
        request = _request(Txt2ImgIn(prompt="x", sampler_name=sampler, override_settings={key: value}))
        try:
            resolve(request, default_size=512, default_sampler="euler", default_schedule="karras", factor=8)
        except RequestError as err:                             # only the model's checks are left to the job
            pytest.fail(f"{key}={value!r} with {sampler}: {err}")
    assert isinstance(request, GenerationRequest)
