"""diffusers' `guidance_rescale` (CFG rescale) from the command line and the native API, not only from Python.

The values themselves are diffusers' (`test_denoiser_guidance.py`, `test_folder_schedule.py`); here the flag and the
API field reach the request, the picture records `CFG rescale` and `--from-png` draws it again.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from bundle_fixtures import tiny_bundle, write_original
from cli_helpers import pixels, run
from server_fixtures import sdlab_server  # noqa: F401  (a session fixture)

import sdlab
from sdlab.pipeline.infotext import to_parameters
from sdlab.pipeline.png_info import parse_parameters, read_parameters
from sdlab.pipeline.request import GenerationRequest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

DRAW = ["a red apple", "--seed", "7", "--steps", "3", "--width", "32", "--height", "32", "--sampler", "Euler",
        "--cfg", "9", "--no-progress"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny-sd1.safetensors"
    write_original(tiny_bundle("sd1", seed=3), path, junk=False)
    return path


def test_the_flag_draws_the_request_field_and_the_png_draws_it_again(model, tmp_path, capsys):
    flagged, again = tmp_path / "flagged.png", tmp_path / "again.png"
    common = ["--model", str(model)]
    assert run(["txt2img", *DRAW, *common, "--guidance-rescale", "0.7", "--out", str(flagged)], capsys)[0] == 0
    assert run(["txt2img", "--from-png", str(flagged), *common, "--no-progress", "--out", str(again)], capsys)[0] == 0
    assert parse_parameters(read_parameters(flagged))["CFG rescale"] == "0.7"
    plain = GenerationRequest("a red apple", seed=7, steps=3, width=32, height=32, sampler="Euler", cfg_scale=9)
    loaded = sdlab.load(model)  # the file the CLI loads, not the in-memory bundle
    expected = np.asarray(loaded.run(replace(plain, guidance_rescale=0.7)).images[0], dtype=np.int16)
    assert np.array_equal(pixels(flagged), expected) and np.array_equal(pixels(again), expected)
    assert np.abs(np.asarray(loaded.run(plain).images[0], dtype=np.int16) - expected).max() > 0


@pytest.mark.parametrize("where", [{"cfg_scale": 1}, {"prompt": "a red apple AND a green pear"},
                                   {"prompt": "a red apple :2"}])
def test_it_is_not_recorded_where_it_does_not_act(model, where):
    """At CFG 1 (no negative prompt's pass) or with composable diffusion (AND, :WEIGHT) guidance rescale changes
    nothing: the picture is the one without it, and it records no `CFG rescale` label of a setting that did not act
    (the request as drawn, `request.drawn_request`)."""
    pipe = sdlab.load(model)
    plain = replace(GenerationRequest("a red apple", seed=7, steps=2, width=32, height=32, sampler="Euler",
                                      cfg_scale=9), **where)
    rescaled = pipe.run(replace(plain, guidance_rescale=0.7))
    assert np.array_equal(np.asarray(rescaled.images[0]), np.asarray(pipe.run(plain).images[0]))
    assert rescaled.request.guidance_rescale == 0 and to_parameters(rescaled.request)["CFG rescale"] is None


def test_a_value_outside_0_1_is_one_error_line_and_no_file(model, tmp_path, capsys):
    out = tmp_path / "bad.png"
    code, _, err = run(["txt2img", *DRAW, "--model", str(model), "--guidance-rescale", "1.5", "--out", str(out)],
                       capsys)
    assert code != 0 and err.strip().count("\n") == 0 and "guidance rescale" in err
    assert not out.exists()


def test_the_native_api_takes_it(sdlab_server):
    import httpx
    from server_fixtures import run_job

    with httpx.Client(base_url=sdlab_server.url, timeout=120) as client:
        job = run_job(client, {"prompt": "a red apple", "steps": 2, "seed": 7, "width": 32, "height": 32,
                               "guidance_rescale": 0.7})
        assert job["status"] == "done", job
        assert job["request"]["guidance_rescale"] == 0.7 and "CFG rescale: 0.7" in job["infotexts"][0]
        refused = client.post("/api/jobs", json={"prompt": "x", "guidance_rescale": 2})
        assert refused.status_code in (400, 422) and "guidance rescale" in refused.text
