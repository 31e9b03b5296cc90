"""Reading A1111's pictures as A1111 reads them: `Sigma noise` written as A1111 writes it and read back; the hires
fix of A1111's files before 2023 (`First pass size`). The references are A1111 1.10's lines, transcribed."""

from __future__ import annotations

import math
import re
from dataclasses import replace

import numpy as np
import pytest
from bundle_fixtures import tiny_bundle
from cli_helpers import png_with_parameters, run
from PIL import Image

from sdlab.pipeline.generate import generate
from sdlab.pipeline.infotext import from_parameters, to_parameters
from sdlab.pipeline.png_info import format_parameters, parse_parameters
from sdlab.pipeline.request import GenerationRequest
from sdlab.server.a1111 import a1111_parameters

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


# ---------------------------------------------------------------- the hires fix before 2023

def old_hires_fix_first_pass_dimensions(width, height):     # modules/processing.py
    desired_pixel_count = 512 * 512
    actual_pixel_count = width * height
    scale = math.sqrt(desired_pixel_count / actual_pixel_count)
    width = math.ceil(scale * width / 64) * 64
    height = math.ceil(scale * height / 64) * 64
    return width, height


def restore_old_hires_fix_params(res):                       # modules/infotext_utils.py (the option off)
    firstpass_width = res.get('First pass size-1', None)
    firstpass_height = res.get('First pass size-2', None)
    if firstpass_width is None or firstpass_height is None:
        return
    firstpass_width, firstpass_height = int(firstpass_width), int(firstpass_height)
    width = int(res.get("Size-1", 512))
    height = int(res.get("Size-2", 512))
    if firstpass_width == 0 or firstpass_height == 0:
        firstpass_width, firstpass_height = old_hires_fix_first_pass_dimensions(width, height)
    res['Size-1'] = firstpass_width
    res['Size-2'] = firstpass_height
    res['Hires resize-1'] = width
    res['Hires resize-2'] = height


def split_sizes(p: dict) -> dict:
    """A1111's `WxH` split (`parse_generation_parameters`): `<label>-1` / `<label>-2` as text."""
    res = {}
    for key, value in p.items():
        m = re.match(r"^(\d+)x(\d+)$", str(value)) if key not in ("Prompt", "Negative prompt") else None
        res.update({f"{key}-1": m.group(1), f"{key}-2": m.group(2)} if m else {key: value})
    return res


OLD_HIRES = [
    "a red cube\nSteps: 6, Sampler: Euler a, CFG scale: 5, Seed: 41, Size: 128x128, Denoising strength: 0.7, "
    "First pass size: 64x64",
    "a red cube\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 41, Size: 1024x768, Denoising strength: 0.55, "
    "First pass size: 0x0",
    "a red cube\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 41, Size: 960x512, Denoising strength: 0.6, "
    "First pass size: 0x0",
]


@pytest.mark.parametrize("text", OLD_HIRES)
def test_an_old_hires_file_draws_its_first_pass_and_then_its_size(text):
    res = split_sizes(parse_parameters(text))
    restore_old_hires_fix_params(res)
    fields = from_parameters(parse_parameters(text))
    assert (fields["width"], fields["height"]) == (res["Size-1"], res["Size-2"])
    assert (fields["hr_width"], fields["hr_height"]) == (res["Hires resize-1"], res["Hires resize-2"])
    assert fields["hr_denoise"] == float(res["Denoising strength"]) and "strength" not in fields
    assert GenerationRequest(**fields).hires
    shown = a1111_parameters(text)                             # png-info's
    sizes = ("Size-1", "Size-2", "Hires resize-1", "Hires resize-2")
    assert {key: shown[key] for key in sizes} == {key: res[key] for key in sizes}


def test_from_png_redraws_an_old_hires_file_in_two_passes(tmp_path, capsys):
    text = ("a red cube\nSteps: 2, Sampler: Euler, CFG scale: 5, Seed: 41, Size: 64x64, Denoising strength: 0.5, "
            "First pass size: 32x32")
    recorded = png_with_parameters(tmp_path / "old.png", text, (64, 64))
    out = tmp_path / "again.png"
    code, _, err = run(["txt2img", "--from-png", str(recorded), "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    drawn = parse_parameters(Image.open(out).info["parameters"])
    assert drawn["Size"] == "32x32" and drawn["Hires resize"] == "64x64" and drawn["Denoising strength"] == 0.5
    assert Image.open(out).size == (64, 64)
