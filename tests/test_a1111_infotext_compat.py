"""Reading A1111's pictures as A1111 reads them: `Sigma noise` written as A1111 writes it and read back; the hires
fix of A1111's files before 2023 (`First pass size`); the refiner switched by sampling steps (the label, and every
refiner file before 1.8); png-info's version keys, NovelAI conversion and defaults of a picture without parameters;
the settings sdlab does not draw named in one warning. The references are A1111 1.10's lines, transcribed."""

from __future__ import annotations

import base64
import io
import json
import math
import re
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
from bundle_fixtures import tiny_bundle
from cli_helpers import png_with_parameters, run
from packaging import version
from PIL import Image, PngImagePlugin

from sdlab.diffusion.discretization import get_discretization
from sdlab.families import get_family
from sdlab.pipeline.generate import generate, generate_with_refiner
from sdlab.pipeline.infotext import (
    a1111_backcompat, a1111_version, from_parameters, old_hires_sizes, refiner_handoff, to_parameters, undrawn_labels,
)
from sdlab.pipeline.plan import handoff_index, make_plan
from sdlab.pipeline.png_info import format_parameters, parse_parameters
from sdlab.pipeline.request import GenerationRequest
from sdlab.pipeline.styles import StyleDatabase
from sdlab.server.a1111 import PngInfoIn, a1111_parameters, png_info
from sdlab.server.config import Limits

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


@pytest.mark.parametrize("first, size", [((64, 64), (128, 128)), ((0, 0), (1024, 768)), ((0, 512), (960, 512)),
                                         ((32, 48), (0, 96)), ((640, 0), (0, 0)), ((0, 0), (0, 768))])
def test_both_readers_restore_an_old_hires_fix_with_one_rule(first, size):
    """`old_hires_sizes` is A1111's `restore_old_hires_fix_params` for `--from-png` (`from_parameters`) and
    png-info (`a1111_parameters`) alike; where A1111 divides by zero (a first pass of 0, a Size side of 0) png-info
    restores nothing, and `from_parameters` refuses a Size side of 0 before."""
    res = {"First pass size-1": str(first[0]), "First pass size-2": str(first[1]), "Size-1": str(size[0]),
           "Size-2": str(size[1])}
    try:
        restore_old_hires_fix_params(res)
        a1111 = (res["Size-1"], res["Size-2"]), (res["Hires resize-1"], res["Hires resize-2"])
    except ZeroDivisionError:
        a1111 = None
    assert old_hires_sizes(first, size) == a1111
    text = (f"a red cube\nSteps: 6, Seed: 41, Size: {size[0]}x{size[1]}, Denoising strength: 0.7, "
            f"First pass size: {first[0]}x{first[1]}")
    shown = a1111_parameters(text)
    as_is = (str(size[0]), str(size[1])), (0, 0)
    assert ((shown["Size-1"], shown["Size-2"]), (shown["Hires resize-1"], shown["Hires resize-2"])) == (a1111 or as_is)
    if 0 in size:
        with pytest.raises(ValueError, match="is not a positive WIDTHxHEIGHT"):
            from_parameters(parse_parameters(text))
    else:
        fields = from_parameters(parse_parameters(text))
        assert ((fields["width"], fields["height"]), (fields["hr_width"], fields["hr_height"])) == a1111


@pytest.mark.parametrize("label, value, error", [
    ("Size", "64", "is not WIDTHxHEIGHT"), ("Size", "64x64x2", "is not WIDTHxHEIGHT"),
    ("Size", "0x64", "is not a positive WIDTHxHEIGHT"), ("Hires resize", "96xa", "is not WIDTHxHEIGHT"),
    ("First pass size", "x", "is not WIDTHxHEIGHT"),
])
def test_a_size_label_that_is_not_widthxheight_is_an_error_naming_it(label, value, error):
    with pytest.raises(ValueError, match=f"^the PNG's {label} value '{value}' {error}$"):
        from_parameters({label: value})


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


# ---------------------------------------------------------------- the refiner switched by sampling steps

def parse_version(text):                                     # modules/infotext_versions.py
    if text is None:
        return None
    m = re.match(r'([^-]+-[^-]+)-.*', text)
    if m:
        text = m.group(1)
    try:
        return version.parse(text)
    except Exception:
        return None


def backcompat(d):                                           # modules/infotext_versions.py
    v160, v170_tsnr, v180 = version.parse("1.6.0"), version.parse("v1.7.0-225"), version.parse("1.8.0")
    ver = parse_version(d.get("Version"))
    if ver is None:
        return
    if ver < v160 and '[' in d.get('Prompt', ''):
        d["Old prompt editing timelines"] = True
    if ver < v160 and d.get('Sampler', '') in ('DDIM', 'PLMS'):
        d["Pad conds v0"] = True
    if ver < v170_tsnr:
        d["Downcast alphas_cumprod"] = True
    if ver < v180 and d.get('Refiner'):
        d["Refiner switch by sampling steps"] = True


def a1111_base_steps_by_sampling_steps(steps: int, switch_at: float) -> int:
    """sd_samplers_common.apply_refiner with `opts.refiner_switch_by_sample_steps`, called at each model call
    (`cfg_denoiser.step` counts them) of a first-order sampler: the steps the base runs."""
    for step in range(steps):
        completed_ratio = step / steps
        if not (completed_ratio < switch_at):
            return step
    return steps


@pytest.mark.parametrize("schedule", ["normal", "karras", "exponential"])
@pytest.mark.parametrize("steps", [5, 10, 20, 25, 30])
@pytest.mark.parametrize("switch_at", [0.3, 0.5, 0.7, 0.8, 0.9])
def test_handoff_by_sampling_steps_is_apply_refiners(schedule, steps, switch_at):
    noise_schedule = get_family("sdxl").schedule.build()
    sigmas = get_discretization(schedule)(noise_schedule, steps)
    assert handoff_index(sigmas, noise_schedule, switch_at, "a1111_steps") == a1111_base_steps_by_sampling_steps(
        steps, switch_at)


REFINER = ("a cat\nSteps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 1024x1024, "
           "Refiner: sd_xl_refiner_1.0 [7440042bbd], Refiner switch at: 0.8{extra}, Version: {version}")
REFINER_FILES = [
    ("v1.6.0", "", "a1111_steps"), ("v1.7.0", "", "a1111_steps"), ("1.8.0-RC", "", "a1111_steps"),
    ("v1.8.0", "", "a1111"), ("v1.10.1", "", "a1111"),
    ("v1.10.1", ", Refiner switch by sampling steps: True", "a1111_steps"),
    ("f0.0.17v1.8.0rc-latest-276-g29be1da7", "", "a1111"),        # Forge's: no version A1111 reads
]


@pytest.mark.parametrize("version_, extra, rule", REFINER_FILES)
def test_a1111s_refiner_files_switch_as_a1111_reads_them(version_, extra, rule):
    p = parse_parameters(REFINER.format(extra=extra, version=version_))
    res = dict(p, **{"Refiner switch by sampling steps": p.get("Refiner switch by sampling steps", False)})
    backcompat(res)
    assert rule == ("a1111_steps" if str(res["Refiner switch by sampling steps"]) == "True" else "a1111")
    assert refiner_handoff(p) == (0.8, rule)


def test_sdlabs_refiner_rule_by_sampling_steps_is_recorded_and_read_back():
    from sdlab.pipeline.infotext import RefinerRef

    req = GenerationRequest(prompt="a cat", steps=5, seed=1, width=64, height=64, sampler="Euler", schedule="karras")
    written = to_parameters(req, refiner=RefinerRef("refiner", None, 0.7, "a1111_steps"))
    assert written["Refiner steps"] == "a1111_steps" and written["Refiner switch by sampling steps"] is True
    assert refiner_handoff(parse_parameters(format_parameters(written))) == (0.7, "a1111_steps")


def test_a1111_version_sorts_as_a1111s_parse_version():
    texts = ["1.6.0", "v1.6.0", "v1.5.2", "1.8.0-RC", "v1.7.0-225-g1234abc", "v1.7.0-224-gabc", "v1.7.0-226-gabc",
             "v1.7.0", "v1.7.0-RC-5-gabc", "v1.10.1", "v1.10.1-amd-2-gabc", "f0.0.17v1.8.0rc-latest-276-g29be1da7",
             "sdlab 0.1.0", "1b5ebc5", "1.6.0.dev1", "1.6.0a1", "1.6", "1.6.0.post1", "1.8.0rc1", "1.8.0-pre",
             "1.7.0.post225.dev1", "1.0+local.1", "app=sd.next"]
    for a in texts:
        assert (a1111_version(a) is None) == (parse_version(a) is None), a
        for b in texts:
            if parse_version(a) is not None and parse_version(b) is not None:
                assert (a1111_version(a) < a1111_version(b)) == (parse_version(a) < parse_version(b)), (a, b)


@pytest.mark.parametrize("v, prompt, sampler", [
    ("v1.5.2", "a [red:blue:5] cube", "DDIM"), ("v1.6.0", "a [red:blue:5] cube", "PLMS"),
    ("v1.7.0-224-gabcdef0", "a cube", "Euler"), ("v1.7.0-225-gabcdef0", "a cube", "Euler"),
    ("v1.10.1", "a [cube]", "DDIM"), ("sdlab 0.1.0", "a [cube]", "DDIM"),
])
def test_the_settings_a_version_implies_are_a1111s(v, prompt, sampler):
    p = parse_parameters(f"{prompt}\nSteps: 6, Sampler: {sampler}, CFG scale: 5, Seed: 41, Version: {v}")
    res = dict(p)
    backcompat(res)
    assert a1111_backcompat(p) == {key: value for key, value in res.items() if key not in p}


@pytest.fixture(scope="module")
def sdxl():
    return tiny_bundle("sdxl", seed=25), tiny_bundle("sdxl-refiner", seed=45)


@pytest.mark.parametrize("sampler, second_order", [("Euler", False), ("Heun", True), ("DPM++ 2M", False)])
def test_the_refiner_takes_over_at_the_model_call_a1111_switches_by_steps_at(sdxl, sampler, second_order):
    """A1111 counts model calls (`cfg_denoiser.step`) over `total_steps`, twice the steps for a second-order
    sampler, and swaps the model at the first call whose share is not below the switch: a Heun step can end on
    the refiner."""
    base, refiner = sdxl
    request = GenerationRequest(prompt="a cat", negative_prompt="ugly", steps=5, seed=3, width=16, height=16,
                                sampler=sampler, schedule="karras", cfg_scale=5)
    switch_at = 0.7
    calls = {"base": 0, "refiner": 0}
    hooks = [base.unet.register_forward_hook(lambda *a: calls.__setitem__("base", calls["base"] + 1)),
             refiner.unet.register_forward_hook(lambda *a: calls.__setitem__("refiner", calls["refiner"] + 1))]
    model_calls = 9 if second_order else 5                             # Heun's last step: one call
    try:
        generate(base, request)
        per_call = calls["base"] / model_calls                          # forwards a model call makes
        calls.update(base=0, refiner=0)
        plan = make_plan(base, request, refiner=refiner, switch_at=switch_at, refiner_convention="a1111_steps")
        generate_with_refiner(base, refiner, plan)
    finally:
        for hook in hooks:
            hook.remove()
    total_steps = 5 * (2 if second_order else 1)                       # SamplerData.total_steps
    switched = next(step for step in range(model_calls) if not (step / total_steps < switch_at))
    assert calls == {"base": switched * per_call, "refiner": (model_calls - switched) * per_call}


# ---------------------------------------------------------------- png-info

def png_info_of(image: Image.Image, chunks: dict[str, str]) -> dict:
    info = PngImagePlugin.PngInfo()
    for key, text in chunks.items():
        info.add_text(key, text)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    service = SimpleNamespace(config=SimpleNamespace(limits=Limits()), styles=StyleDatabase(), options={})  # what png-info reads
    request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(service=service)))
    return png_info(PngInfoIn(image=base64.b64encode(buffer.getvalue()).decode()), request)


@pytest.mark.parametrize("text", [
    *OLD_HIRES, *(REFINER.format(extra=extra, version=v) for v, extra, _ in REFINER_FILES),
    "a [red:blue:5] cube\nSteps: 6, Sampler: DDIM, Seed: 41, Size: 64x64, Version: v1.5.2",
])
def test_png_info_sets_the_labels_a_version_implies_and_restores_an_old_hires_fix(text):
    """`parse_generation_parameters`: ... `restore_old_hires_fix_params(res)` ... `res["Refiner switch by sampling
    steps"] = False` where missing ... `infotext_versions.backcompat(res)`."""
    shown = a1111_parameters(text)
    res = split_sizes(parse_parameters(text))
    restore_old_hires_fix_params(res)
    res.setdefault("Refiner switch by sampling steps", False)
    backcompat(res)
    assert {key: shown[key] for key in res} == res


def test_png_info_of_a_picture_without_parameters_is_a1111s_defaults():
    answer = png_info_of(Image.new("RGB", (8, 8)), {})
    assert answer["info"] == "" and answer["parameters"] == a1111_parameters("")
    assert answer["parameters"]["Prompt"] == "" and answer["parameters"]["Clip skip"] == "1"


def test_png_info_reads_a_novelai_picture_as_a1111_does():
    comment = {"steps": 28, "sampler": "k_euler_ancestral", "seed": 12345, "strength": 0.7, "noise": 0.2,
               "scale": 11.0, "uc": "lowres, bad anatomy", "n_samples": 1}
    image = Image.new("RGB", (64, 96))
    chunks = {"Title": "AI generated image", "Description": "masterpiece, 1girl", "Software": "NovelAI",
              "Source": "Stable Diffusion 81274D13", "Comment": json.dumps(comment)}
    answer = png_info_of(image, chunks)
    items, json_info = chunks, comment                             # modules/images.py read_info_from_image
    sampler = {"k_euler_ancestral": "Euler a"}.get(json_info["sampler"], "Euler a")
    geninfo = f"""{items["Description"]}
Negative prompt: {json_info["uc"]}
Steps: {json_info["steps"]}, Sampler: {sampler}, CFG scale: {json_info["scale"]}, Seed: {json_info["seed"]}, Size: {image.width}x{image.height}, Clip skip: 2, ENSD: 31337"""  # noqa: E501
    assert answer["info"] == geninfo and answer["parameters"]["Sampler"] == "Euler a"
    assert answer["parameters"]["Size-1"] == "64" and answer["items"]["Software"] == "NovelAI"
    dpm = png_info_of(image, {**chunks, "Comment": json.dumps({**comment, "sampler": "k_dpmpp_2m"})})
    assert dpm["parameters"]["Sampler"] == "DPM++ 2M"
    odd = png_info_of(image, {**chunks, "Comment": json.dumps({**comment, "sampler": "nai_smea"})})
    assert odd["parameters"]["Sampler"] == "Euler a"              # samplers_map.get(..., "Euler a")
    assert png_info_of(image, {**chunks, "Comment": "not json"})["info"] == ""


# ---------------------------------------------------------------- what sdlab does not draw

BASE = "a [red:blue:5] cube\nSteps: 6, Sampler: {sampler}, CFG scale: 5, Seed: 41, Size: 64x64{extra}, Version: {v}"


@pytest.mark.parametrize("extra, named", [
    (", Sigma churn: 0.9, Sigma tmin: 0.2", []),                  # drawn (tests/test_a1111_churn.py)
    (", Schedule max sigma: 5, Schedule min sigma: 0.1, Schedule rho: 3", []),   # drawn
     # (tests/test_a1111_schedule_overrides.py)
    (", Noise Schedule: Zero Terminal SNR", []),                   # drawn (tests/test_a1111_alpha_schedule.py)
    (", Discard penultimate sigma: True", []),
    (", Emphasis: No norm", []), (", Emphasis: Original", []),    # drawn (tests/test_a1111_prompt_options.py)
    (", Downcast alphas_cumprod: True", []),
    (", NGMS: 5, Skip Early CFG: 0.5, Pad conds: True", []),      # drawn (tests/test_a1111_guidance_options.py)
    (", CFG Rescale phi: 0.7", ["CFG Rescale phi: 0.7"]), (", CFG Rescale phi: 0", []),
    (", Schedule rho: 0, Sigma churn: 0.0", []), ("", []),
])
def test_the_settings_sdlab_does_not_draw_are_named(extra, named):
    assert undrawn_labels(parse_parameters(BASE.format(sampler="Euler", extra=extra, v="v1.10.1"))) == named


@pytest.mark.parametrize("v, sampler", [("v1.5.2", "DDIM"), ("v1.6.0", "PLMS"), ("v1.7.0-224-gabcdef0", "Euler"),
                                        ("v1.7.0-225-gabcdef0", "Euler"), ("v1.10.1", "DDIM"), ("sdlab 0.1.0", "DDIM")])
def test_the_settings_a_version_implies_are_drawn(v, sampler):
    """What A1111's `backcompat` sets by a text's version (old prompt editing timelines, downcast alphas_cumprod)
    is drawn: read into the request, named nowhere."""
    p = parse_parameters(BASE.format(sampler=sampler, extra="", v=v))
    res = dict(p)
    backcompat(res)
    fields = from_parameters(p)
    assert fields.get("downcast_alphas_cumprod", False) == ("Downcast alphas_cumprod" in res)
    assert fields.get("old_prompt_editing", False) == ("Old prompt editing timelines" in res)
    assert not [label for label in undrawn_labels(p) if "Downcast" in label or "Old prompt" in label]


def test_from_png_names_what_it_cannot_draw_in_one_warning(tmp_path, capsys):
    text = ("a red cube\nSteps: 2, Sampler: Euler, CFG scale: 5, Seed: 41, Size: 32x32, Face restoration: CodeFormer, "
            "CFG Rescale phi: 0.7, Version: v1.6.0")
    recorded = png_with_parameters(tmp_path / "old.png", text, (32, 32))
    code, _, err = run(["txt2img", "--from-png", str(recorded), "--out", str(tmp_path / "again.png"), "--no-progress"],
                       capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "does not draw" in line]
    assert len(warnings) == 1
    assert "Face restoration: CodeFormer" in warnings[0] and "CFG Rescale phi: 0.7" in warnings[0]
