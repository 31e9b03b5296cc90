"""`--init-noise` and `--quantize-timesteps`: the request's exactness switches on the command line, the settings a
diffusers folder's advice names (`checkpoints.diffusers_scheduler._advice`) besides the sampler, schedule and eta."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bundle_fixtures import tiny_bundle, write_original
from cli_helpers import pixels, run
from sdlab.checkpoints.diffusers_scheduler import DiffusersScheduler, equivalent_settings
from sdlab.cli import build_parser
from sdlab.cli.generate import _options_from_args
from sdlab.pipeline.generate import generate
from sdlab.pipeline.png_info import parse_parameters, read_parameters
from sdlab.pipeline.request import GenerationRequest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

DRAW = ["a red apple", "--seed", "7", "--steps", "3", "--width", "32", "--height", "32", "--sampler", "DPM++ 2M",
        "--schedule", "karras", "--no-progress"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny-sd1.safetensors"
    write_original(tiny_bundle("sd1", seed=3), path, junk=False)
    return path


def test_the_flags_draw_as_the_request_fields_and_are_redrawn_from_the_png(model, tmp_path, capsys):
    """The picture is the one the request with init_noise "vp" and quantize_timesteps draws; its parameters record
    both and `--from-png` redraws it; without the flags the picture differs."""
    flagged, again = tmp_path / "flagged.png", tmp_path / "again.png"
    common = ["--model", str(model)]
    assert run(["txt2img", *DRAW, *common, "--init-noise", "vp", "--quantize-timesteps", "--out", str(flagged)],
               capsys)[0] == 0
    assert run(["txt2img", "--from-png", str(flagged), *common, "--no-progress", "--out", str(again)], capsys)[0] == 0
    params = parse_parameters(read_parameters(flagged))
    assert (params["Initial noise"], params["Timestep rounding"]) == ("vp", "true")
    plain = GenerationRequest("a red apple", seed=7, steps=3, width=32, height=32, sampler="DPM++ 2M",
                              schedule="karras")
    bundle = tiny_bundle("sd1", seed=3)
    expected = np.asarray(generate(bundle, replace(plain, init_noise="vp", quantize_timesteps=True)).images[0],
                          dtype=np.int16)
    assert np.array_equal(pixels(flagged), expected) and np.array_equal(pixels(again), expected)
    assert np.abs(np.asarray(generate(bundle, plain).images[0], dtype=np.int16) - expected).max() > 0


def test_a_bad_rule_is_one_error_line_and_no_file(model, tmp_path, capsys):
    out = tmp_path / "bad.png"
    code, _, err = run(["txt2img", *DRAW, "--model", str(model), "--init-noise", "bogus", "--out", str(out)], capsys)
    assert code != 0 and err.strip().count("\n") == 0 and "initial-noise convention 'bogus'" in err
    assert not out.exists()


@pytest.mark.parametrize("config", [
    {"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True, "timestep_spacing": "trailing"},
    {"_class_name": "UniPCMultistepScheduler", "use_exponential_sigmas": True, "timestep_spacing": "trailing"},
    {"_class_name": "TCDScheduler", "timestep_spacing": "trailing"},
])
def test_every_setting_a_folders_advice_names_is_a_flag(config):
    """`--name value` (`--name` for true) for each setting the advice names gives the request those settings."""
    asked = equivalent_settings(DiffusersScheduler(None, None, config)).request
    argv = ["txt2img", "x"]
    for name, value in asked.items():
        flag = "--" + name.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    options = _options_from_args(build_parser().parse_args(argv), {})
    assert {name: options.get(name) for name in asked} == asked
