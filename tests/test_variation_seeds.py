"""Variation seeds (A1111's subseed + strength) and how they are recorded.

Reference: A1111's `slerp` (modules/rng.py; modules/processing.py before A1111 1.6), transcribed in
tests/a1111_rng_reference.py, applied to each image's (C, h, w) noise exactly as A1111's `create_random_tensors` /
`ImageRNG.first` do.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from a1111_rng_reference import a1111_slerp
from cli_helpers import pixels, run

import sdlab
from sdlab.diffusion.noise import initial_noise, slerp_a1111, variation_noise
from sdlab.pipeline.png_info import parse_parameters, read_parameters
from sdlab.pipeline.request import GenerationRequest, RequestError


@pytest.mark.parametrize("strength", [0.05, 0.3, 0.9])
def test_blend_is_a1111s_slerp(strength):
    noise = initial_noise((2, 4, 8, 8), [3, 4])
    sub = initial_noise((2, 4, 8, 8), [10, 11])
    mixed = variation_noise(noise, [10, 11], strength)
    for i in range(2):
        assert torch.allclose(mixed[i], a1111_slerp(strength, noise[i], sub[i]), atol=1e-6)
        assert torch.allclose(slerp_a1111(strength, noise[i], sub[i]), a1111_slerp(strength, noise[i], sub[i]))
    assert torch.equal(variation_noise(noise, [10, 11], 0.0), noise)


@pytest.fixture(scope="module")
def pipe():
    return sdlab.load()


def _array(image):
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_strength_one_draws_the_subseeds_picture_and_zero_the_seeds(pipe):
    common = {"steps": 4, "sampler": "DPM++ 2M"}
    by_subseed = pipe.txt2img("a red apple", seed=5, subseed=9, subseed_strength=1.0, **common).images[0]
    assert np.abs(_array(by_subseed) - _array(pipe.txt2img("a red apple", seed=9, **common).images[0])).max() <= 1
    off = pipe.txt2img("a red apple", seed=5, subseed=9, subseed_strength=0.0, **common).images[0]
    assert np.array_equal(_array(off), _array(pipe.txt2img("a red apple", seed=5, **common).images[0]))
    half = pipe.txt2img("a red apple", seed=5, subseed=9, subseed_strength=0.5, **common).images[0]
    assert not np.array_equal(_array(half), _array(off))


def test_a_batch_keeps_the_seed_and_counts_the_subseeds_up(pipe):
    result = pipe.txt2img("a blue star", seed=7, subseed=100, subseed_strength=0.4, batch_size=2, steps=3)
    assert result.request.seeds() == [7, 7] and result.request.subseeds() == [100, 101]
    single = pipe.txt2img("a blue star", seed=7, subseed=101, subseed_strength=0.4, steps=3).images[0]
    assert np.abs(_array(result.images[1]) - _array(single)).max() <= 1
    random_subseed = pipe.resolve(GenerationRequest(prompt="x", subseed_strength=0.2)).request.subseed
    assert random_subseed is not None and random_subseed >= 0


@pytest.mark.parametrize("options, message", [
    ({"subseed_strength": 1.5}, "subseed_strength"),
    ({"subseed_strength": float("nan")}, "subseed_strength"),
    ({"subseed": 1.5, "subseed_strength": 0.1}, "subseed must be an integer"),
])
def test_bad_values_are_request_errors(pipe, options, message):
    with pytest.raises(RequestError, match=message):
        pipe.resolve(GenerationRequest(prompt="x", **options))


def test_cli_records_the_variation_and_from_png_draws_it_again(tmp_path, capsys):
    first = tmp_path / "v.png"
    code, _, err = run(["txt2img", "a green circle", "--seed", "3", "--subseed", "44", "--subseed-strength", "0.25",
                        "--steps", "3", "--no-progress", "--out", str(first)], capsys)
    assert code == 0, err
    recorded = parse_parameters(read_parameters(first))
    assert str(recorded["Variation seed"]) == "44" and float(recorded["Variation seed strength"]) == 0.25
    again = tmp_path / "again.png"
    code, _, err = run(["txt2img", "--from-png", str(first), "--no-progress", "--out", str(again)], capsys)
    assert code == 0, err
    assert np.array_equal(pixels(first), pixels(again))
    code, _, err = run(["txt2img", "x", "--subseed-strength", "2", "--out", str(tmp_path / "bad.png")], capsys)
    assert code == 2 and "subseed_strength" in err and not (tmp_path / "bad.png").exists()


def test_batch_count_continues_the_seeds(tmp_path, capsys):
    out = tmp_path / "many"
    code, stdout, err = run(["txt2img", "a red square", "--seed", "20", "--batch", "2", "--batch-count", "2",
                             "--steps", "3", "--no-progress", "--out", str(out)], capsys)
    assert code == 0, err
    files = stdout.split()
    assert len(files) == 4
    assert [parse_parameters(read_parameters(f))["Seed"] for f in files] == [20, 21, 22, 23]
    single = tmp_path / "23.png"
    code, _, err = run(["txt2img", "a red square", "--seed", "23", "--steps", "3", "--no-progress", "--out", str(single)],
                       capsys)
    assert code == 0, err
    assert np.abs(pixels(files[3]) - pixels(single)).max() <= 1          # batched vs single: float rounding only
    varied = tmp_path / "varied"
    code, stdout, err = run(["txt2img", "a red square", "--seed", "20", "--subseed", "5", "--subseed-strength", "0.3",
                             "--batch-count", "2", "--steps", "3", "--no-progress", "--out", str(varied)], capsys)
    assert code == 0, err
    recorded = [parse_parameters(read_parameters(f)) for f in stdout.split()]
    assert [(r["Seed"], r["Variation seed"]) for r in recorded] == [(20, 5), (20, 6)]
    code, _, err = run(["txt2img", "x", "--batch-count", "0", "--out", str(tmp_path / "none")], capsys)
    assert code == 2 and "--batch-count" in err
