"""Reading A1111's pictures as A1111 reads them: `Sigma noise` written as A1111 writes it and read back. The
references are A1111 1.10's lines, transcribed."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from bundle_fixtures import tiny_bundle

from sdlab.pipeline.generate import generate
from sdlab.pipeline.infotext import from_parameters, to_parameters
from sdlab.pipeline.png_info import format_parameters, parse_parameters
from sdlab.pipeline.request import GenerationRequest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---------------------------------------------------------------- Sigma noise

@pytest.mark.parametrize("sampler, s_noise, label", [
    ("Euler a", 0.5, 0.5), ("DPM++ SDE", 0.7, 0.7), ("Euler", 0.9, 0.9),    # their functions take s_noise
    ("Euler a", 1.0, None), ("DPM++ 2M", 0.5, None),                       # 1, or a function without it
])
def test_sigma_noise_is_written_as_a1111_writes_it_and_read_back(sampler, s_noise, label):
    """A1111's `Sampler.initialize`: `if 's_noise' in extra_params_kwargs and s_noise != self.s_noise: ...
    p.extra_generation_params['Sigma noise'] = s_noise` (its default 1.0), where its function takes s_noise."""
    req = GenerationRequest(prompt="a cat", steps=4, seed=1, width=64, height=64, sampler=sampler, schedule="karras",
                            s_noise=s_noise)
    written = to_parameters(req)
    assert written["Sigma noise"] == label
    read = from_parameters(parse_parameters(format_parameters(written)))
    assert read.get("s_noise", 1.0) == (s_noise if label is not None else 1.0)
    a1111s = parse_parameters("a cat\nSteps: 4, Sampler: Euler, Seed: 1, Sigma noise: 0.8, Version: v1.10.1")
    assert from_parameters(a1111s)["s_noise"] == 0.8


def test_a_picture_drawn_with_s_noise_is_redrawn_with_it():
    bundle = tiny_bundle("sd1", seed=5)
    req = GenerationRequest(prompt="a cat", negative_prompt="ugly", steps=4, seed=3, width=16, height=16,
                            sampler="Euler a", schedule="karras", s_noise=0.5)
    first = np.asarray(generate(bundle, req).images[0], dtype=np.int16)
    text = format_parameters(to_parameters(req))
    again = np.asarray(generate(bundle, GenerationRequest(**from_parameters(parse_parameters(text)))).images[0],
                       dtype=np.int16)
    plain = np.asarray(generate(bundle, replace(req, s_noise=1.0)).images[0], dtype=np.int16)
    assert np.array_equal(first, again) and np.abs(first - plain).max() > 0
