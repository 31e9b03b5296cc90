"""A model file may name the few-step preset it is drawn with (metadata `sdlab.preset`, e.g. a consistency-
distilled model: "lcm"); with no options given, `Pipeline.txt2img` and `sdlab txt2img` use it, and every
option given wins over it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import sdlab
from bundle_fixtures import tiny_bundle
from cli_helpers import pixels, run
from sdlab.checkpoints.save import save_bundle
from sdlab.pipeline.png_info import read_parameters

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lcm_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("preset") / "distilled.safetensors"
    save_bundle(replace(tiny_bundle("sd1", seed=3), preset="lcm"), path)
    return path


def _array(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_the_preset_a_file_names_is_loaded_and_saved_again(lcm_model, tmp_path):
    pipe = sdlab.load(lcm_model)
    assert pipe.bundle.preset == "lcm"
    again = save_bundle(pipe.bundle, tmp_path / "again.safetensors")
    assert sdlab.load(again).bundle.preset == "lcm"
    assert sdlab.load(save_bundle(tiny_bundle("sd1"), tmp_path / "plain.safetensors")).bundle.preset is None


def test_txt2img_uses_the_model_preset_unless_options_say_otherwise(lcm_model):
    pipe = sdlab.load(lcm_model)
    kw = dict(seed=1, width=64, height=64)
    default = _array(pipe.txt2img("a fox", **kw).images[0])
    assert np.array_equal(default, _array(pipe.txt2img("a fox", preset="lcm", **kw).images[0]))
    assert not np.array_equal(default, _array(pipe.txt2img("a fox", preset=None, **kw).images[0]))
    given = _array(pipe.txt2img("a fox", steps=3, **kw).images[0])  # the preset's sampler, the given steps
    assert np.array_equal(given, _array(pipe.txt2img("a fox", preset="lcm", steps=3, **kw).images[0]))


def test_cli_draws_with_the_model_preset_and_the_given_options_win(lcm_model, tmp_path, capsys):
    out = tmp_path / "a.png"
    code, _, err = run(["txt2img", "a fox", "--model", str(lcm_model), "--seed", "1", "--width", "64", "--height", "64",
                        "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    parameters = read_parameters(out)
    assert "Sampler: LCM" in parameters and "Steps: 4" in parameters and "CFG scale: 1" in parameters, parameters
    explicit = tmp_path / "b.png"
    code, _, err = run(["txt2img", "a fox", "--model", str(lcm_model), "--seed", "1", "--width", "64", "--height", "64",
                        "--sampler", "LCM", "--schedule", "trailing", "--steps", "4", "--cfg", "1",
                        "--out", str(explicit), "--no-progress"], capsys)
    assert code == 0 and np.array_equal(pixels(out), pixels(explicit))
    code, _, err = run(["txt2img", "a fox", "--model", str(lcm_model), "--seed", "1", "--width", "64", "--height", "64",
                        "--sampler", "Euler", "--steps", "2", "--out", str(tmp_path / "c.png"), "--no-progress"], capsys)
    assert code == 0 and "Sampler: Euler" in read_parameters(tmp_path / "c.png")
    assert "Steps: 2" in read_parameters(tmp_path / "c.png")
