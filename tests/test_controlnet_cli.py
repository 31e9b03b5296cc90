"""`sdlab txt2img | img2img --control FILE:IMAGE[:STRENGTH[:START:END]]`: the picture changes, the infotext
carries A1111's ControlNet lines, and every bad input gives one error line, exit status 2 and no file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from bundle_fixtures import tiny_bundle, write_original
from cli_helpers import pixels, run
from controlnet_fixtures import diffusers_controlnet, write_layout
from sdlab.pipeline.png_info import parse_parameters, read_parameters

FAST = ["--steps", "3", "--width", "32", "--height", "32", "--no-progress", "--seed", "3"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("controlnet")
    sd1 = tiny_bundle("sd1")
    model = folder / "tiny-sd1.safetensors"
    write_original(sd1, model, junk=False)
    (folder / "a").mkdir()
    (folder / "b").mkdir()
    net = write_layout(diffusers_controlnet(sd1.unet_config, 5, hint_widths=(16, 32), std=0.05), "original", folder / "a")
    xl = write_layout(diffusers_controlnet(tiny_bundle("sdxl").unet_config, 5, hint_widths=(16, 32)), "original",
                      folder / "b")
    hint = folder / "hint.png"
    image = Image.new("RGB", (32, 32), "black")
    ImageDraw.Draw(image).rectangle([6, 6, 24, 24], outline="white", width=3)
    image.save(hint)
    return {"model": model, "net": net, "sdxl_net": xl, "hint": hint, "folder": folder}


def test_control_changes_the_picture_and_is_recorded(files, tmp_path, capsys):
    plain, controlled, two = tmp_path / "plain.png", tmp_path / "control.png", tmp_path / "two.png"
    base = ["txt2img", "a red apple", "--model", str(files["model"]), *FAST]
    assert run([*base, "--out", str(plain)], capsys)[0] == 0
    spec = f"{files['net']}:{files['hint']}"
    code, stdout, stderr = run([*base, "--control", f"{spec}:0.9", "--out", str(controlled)], capsys)
    assert code == 0, stderr
    assert np.abs(pixels(plain) - pixels(controlled)).max() > 10
    params = parse_parameters(read_parameters(controlled))
    assert params["ControlNet 0"].startswith("Module: none, Model: control_cn [")
    assert params["ControlNet 0"].endswith("], Weight: 0.9, Resize Mode: Just Resize, Guidance Start: 0, "
                                           "Guidance End: 1")
    code, _, stderr = run([*base, "--control", f"{spec}:1:0:0.5", "--control", f"{spec}:0.5:0.5:1",
                           "--out", str(two)], capsys)
    assert code == 0, stderr
    params = parse_parameters(read_parameters(two))
    assert params["ControlNet 1"].endswith("Weight: 0.5, Resize Mode: Just Resize, Guidance Start: 0.5, Guidance End: 1")


def test_img2img_takes_controls(files, tmp_path, capsys):
    out = tmp_path / "i.png"
    code, _, stderr = run(["img2img", "a red apple", "--model", str(files["model"]), "--init", str(files["hint"]),
                           "--control", f"{files['net']}:{files['hint']}", "--out", str(out), *FAST], capsys)
    assert code == 0, stderr
    assert "ControlNet 0" in parse_parameters(read_parameters(out))


def _bad_inputs(files, tmp_path):
    sd = tmp_path / "sd.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, sd)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture")
    net, hint = files["net"], files["hint"]
    return [
        (f"{tmp_path / 'missing.safetensors'}:{hint}", "does not exist"),
        (f"{net}:{tmp_path / 'missing.png'}", "does not exist"),
        (f"{net}:{broken}", "cannot read the control image"),
        (f"{sd}:{hint}", "a Stable Diffusion checkpoint .* not a ControlNet"),
        (f"{files['sdxl_net']}:{hint}", "this ControlNet is for SDXL models .* the model is sd1"),
        (f"{net}:{hint}:nan", "hint.png:nan. does not exist"),
        (f"{net}:{hint}:1:0.5", r"expected FILE\[:IMAGE\[:STRENGTH\[:START:END\]\]\]"),
        (f"{net}:{hint}:1:0.7:0.2", "start < end"),
        (f"{net}:{hint}:-1", "strength must lie in"),
        (f"{net}", "control 0: needs an image; only an img2img or inpaint request's control may leave it out"),
    ]


def test_bad_controls_give_one_error_line_and_no_file(files, tmp_path, capsys):
    import re

    for spec, message in _bad_inputs(files, tmp_path):
        out = tmp_path / "never.png"
        code, stdout, stderr = run(["txt2img", "x", "--model", str(files["model"]), "--control", spec,
                                    "--out", str(out), *FAST], capsys)
        lines = [line for line in stderr.splitlines() if line.startswith("sdlab: error:")]
        assert code == 2 and len(lines) == 1 and re.search(message, lines[0]), (spec, stderr)
        assert "Traceback" not in stderr and not out.exists() and stdout == ""


def test_control_module_preprocesses_the_matching_hint(files, tmp_path, capsys):
    from sdlab.pipeline.preprocess import preprocess

    base = ["txt2img", "a red apple", "--model", str(files["model"]), *FAST]
    spec = f"{files['net']}:{files['hint']}"
    by_flag, by_hand = tmp_path / "flag.png", tmp_path / "hand.png"
    code, _, stderr = run([*base, "--control", spec, "--control-module", "canny", "--out", str(by_flag)], capsys)
    assert code == 0, stderr
    assert parse_parameters(read_parameters(by_flag))["ControlNet 0"].startswith("Module: canny, ")
    edges = tmp_path / "edges.png"
    preprocess(Image.open(files["hint"]).convert("RGB"), "canny").save(edges)
    code, _, stderr = run([*base, "--control", f"{files['net']}:{edges}", "--out", str(by_hand)], capsys)
    assert code == 0, stderr
    assert np.array_equal(pixels(by_flag), pixels(by_hand))
    for extra, message in ((["--control", spec, "--control-module", "sobel"], "sdlab has no preprocessor 'sobel'"),
                           (["--control-module", "canny"], "1 --control-module for 0 --control")):
        code, _, stderr = run([*base, *extra, "--out", str(tmp_path / "bad.png")], capsys)
        assert code == 2 and message in stderr and not (tmp_path / "bad.png").exists()


def _wide_hint(folder: Path) -> Path:
    """A 48x32 hint: each resize mode fits it to a square picture differently."""
    path = folder / "wide.png"
    image = Image.new("RGB", (48, 32), "black")
    ImageDraw.Draw(image).rectangle([4, 4, 44, 28], outline="white", width=3)
    image.save(path)
    return path


def test_control_mode_and_resize_go_to_the_matching_control(files, tmp_path, capsys):
    """--control-mode / --control-resize pair with the --control of the same rank, as --control-module does;
    the picture records them and equals the Python API's with the same modes."""
    from sdlab.pipeline.control import ControlInput

    base = ["txt2img", "a red apple", "--model", str(files["model"]), *FAST]
    spec = f"{files['net']}:{_wide_hint(tmp_path)}"
    plain, moded = tmp_path / "plain.png", tmp_path / "moded.png"
    assert run([*base, "--control", spec, "--control", spec, "--out", str(plain)], capsys)[0] == 0
    code, _, stderr = run([*base, "--control", spec, "--control", spec, "--control-mode", "prompt",
                           "--control-resize", "crop", "--control-resize", "fill", "--out", str(moded)], capsys)
    assert code == 0, stderr
    params = parse_parameters(read_parameters(moded))
    assert "Resize Mode: Crop and Resize" in params["ControlNet 0"]
    assert params["ControlNet 0"].endswith("Control Mode: My prompt is more important")
    assert "Resize Mode: Resize and Fill" in params["ControlNet 1"] and "Control Mode" not in params["ControlNet 1"]
    assert np.abs(pixels(plain) - pixels(moded)).max() > 0

    import sdlab
    pipe = sdlab.load(str(files["model"]))
    controls = [ControlInput(files["net"], tmp_path / "wide.png", control_mode="prompt", resize_mode="crop"),
                ControlInput(files["net"], tmp_path / "wide.png", resize_mode="fill")]
    image = pipe.txt2img("a red apple", steps=3, width=32, height=32, seed=3, controls=controls).images[0]
    assert np.array_equal(np.asarray(image.convert("RGB"), dtype=np.int16), pixels(moded))

    for extra, message in ((["--control-mode", "prompt"], "1 --control-mode for 0 --control"),
                           (["--control", spec, "--control-resize", "crop", "--control-resize", "fill"],
                            "2 --control-resize for 1 --control"),
                           (["--control", spec, "--control-mode", "loud"], "unknown control_mode 'loud'"),
                           (["--control", spec, "--control-resize", "stretch"], "unknown resize_mode 'stretch'")):
        code, _, stderr = run([*base, *extra, "--out", str(tmp_path / "bad.png")], capsys)
        assert code == 2 and message in stderr and not (tmp_path / "bad.png").exists(), stderr


def test_from_png_gives_a_control_the_recorded_modes(files, tmp_path, capsys):
    """--from-png with --control redraws the picture with the modes its `ControlNet N` line records (A1111's
    paste sets them on its N-th unit); a mode given on the line wins."""
    base = ["txt2img", "--model", str(files["model"]), "--no-progress"]
    spec = f"{files['net']}:{_wide_hint(tmp_path)}"
    first, again, own = tmp_path / "first.png", tmp_path / "again.png", tmp_path / "own.png"
    code, _, stderr = run([*base, "a red apple", *FAST, "--control", spec, "--control-mode", "control",
                           "--control-resize", "fill", "--out", str(first)], capsys)
    assert code == 0, stderr
    code, _, stderr = run([*base, "--from-png", str(first), "--control", spec, "--out", str(again)], capsys)
    assert code == 0, stderr
    assert np.array_equal(pixels(first), pixels(again))
    assert read_parameters(first) == read_parameters(again)
    code, _, stderr = run([*base, "--from-png", str(first), "--control", spec, "--control-mode", "balanced",
                           "--out", str(own)], capsys)
    assert code == 0, stderr
    line = parse_parameters(read_parameters(own))["ControlNet 0"]
    assert "Control Mode" not in line and "Resize Mode: Resize and Fill" in line


def test_from_png_of_an_a1111_picture_takes_a_control_with_start_equal_to_end(files, tmp_path, capsys):
    """A picture A1111 wrote is redrawn under A1111's ControlNet step rule, which takes start == end (one
    step): the --control is checked with it, not refused by diffusers' start < end."""
    from cli_helpers import png_with_parameters

    recorded = png_with_parameters(tmp_path / "a1111.png", "a red apple\nSteps: 3, Sampler: Euler, CFG scale: 7, "
                                   "Seed: 3, Size: 32x32", (32, 32))
    out = tmp_path / "again.png"
    code, _, stderr = run(["txt2img", "--model", str(files["model"]), "--no-progress", "--from-png", str(recorded),
                           "--control", f"{files['net']}:{files['hint']}:1:0.5:0.5", "--out", str(out)], capsys)
    assert code == 0, stderr
    assert "Guidance Start: 0.5, Guidance End: 0.5" in parse_parameters(read_parameters(out))["ControlNet 0"]


def test_from_png_warns_of_the_recorded_units_no_control_redraws(files, tmp_path, capsys):
    """Two recorded ControlNet units and one --control: the first redraws unit 0, unit 1 is named as left out."""
    from cli_helpers import png_with_parameters

    recorded = png_with_parameters(tmp_path / "two.png", "a red apple\nSteps: 3, Sampler: Euler, CFG scale: 7, "
                                   'Seed: 3, Size: 32x32, ControlNet 0: "Module: none, Model: cn, Weight: 1", '
                                   'ControlNet 1: "Module: none, Model: cn2, Weight: 1"', (32, 32))
    code, _, stderr = run(["txt2img", "--model", str(files["model"]), "--no-progress", "--from-png", str(recorded),
                           "--control", f"{files['net']}:{files['hint']}", "--out", str(tmp_path / "again.png")],
                          capsys)
    assert code == 0, stderr
    assert "drawn with ControlNet 1;" in stderr and "ControlNet 0" not in stderr


def test_from_png_draws_a_units_processor_res_and_pixel_perfect_and_warns_of_its_hr_option(files, tmp_path, capsys):
    """A recorded unit's Processor Res and Pixel Perfect are drawn (the redraw's line records them); an Hr Option
    other than Both (with a hires pass) is not, and is named in one warning line."""
    from cli_helpers import png_with_parameters

    units = ('ControlNet 0: "Module: canny, Model: cn [12345678], Weight: 0.8, Resize Mode: Crop and Resize, '
             'Processor Res: 768, Threshold A: 50.0, Threshold B: 150.0, Guidance Start: 0.0, Guidance End: 0.9, '
             'Pixel Perfect: True, Control Mode: Balanced, Hr Option: Low res only", '
             'ControlNet 1: "Module: tile_resample, Model: cn2 [12345678], Weight: 0.6, Resize Mode: Just Resize, '
             'Processor Res: 512, Threshold A: 2.0, Threshold B: 0.5, Guidance Start: 0.1, Guidance End: 1.0, '
             'Pixel Perfect: False, Control Mode: Balanced, Hr Option: High res only"')
    for hires, expected in (("", None),
                            ("Hires upscale: 2, Hires upscaler: Latent, Denoising strength: 0.5, ",
                             "(ControlNet 0: Hr Option: Low res only; ControlNet 1: Hr Option: High res only)")):
        recorded = png_with_parameters(tmp_path / "a1111.png", "a red apple\nSteps: 2, Sampler: Euler, CFG scale: 7, "
                                       f"Seed: 3, Size: 16x16, {hires}{units}", (16, 16))
        spec = f"{files['net']}:{files['hint']}"
        code, _, stderr = run(["txt2img", "--model", str(files["model"]), "--no-progress", "--from-png",
                               str(recorded), "--control", spec, "--control", spec,
                               "--out", str(tmp_path / "again.png")], capsys)
        assert code == 0, stderr
        warnings = [line for line in stderr.splitlines() if "settings sdlab does not draw (ControlNet" in line]
        assert (warnings == []) if expected is None else (len(warnings) == 1 and expected in warnings[0]), stderr
        redrawn = parse_parameters(read_parameters(tmp_path / "again.png"))
        assert "Processor Res: 768" in redrawn["ControlNet 0"] and "Pixel Perfect: True" in redrawn["ControlNet 0"]
        assert "Processor Res: 512" in redrawn["ControlNet 1"]      # the extension writes its unit's on every line


def test_from_png_names_no_processor_res_at_the_hint_images_size(files, tmp_path, capsys):
    """--from-png with a canny unit recorded at Processor Res = the hint's short side (32 here) warns of nothing."""
    from cli_helpers import png_with_parameters

    unit = ('ControlNet 0: "Module: canny, Model: cn [12345678], Weight: 0.8, Resize Mode: Crop and Resize, '
            'Processor Res: 32, Threshold A: 50.0, Threshold B: 150.0, Guidance Start: 0.0, Guidance End: 0.9, '
            'Pixel Perfect: False, Control Mode: Balanced, Hr Option: Both"')
    recorded = png_with_parameters(tmp_path / "a1111.png", "a red apple\nSteps: 2, Sampler: Euler, CFG scale: 7, "
                                   f"Seed: 3, Size: 16x16, {unit}", (16, 16))
    code, _, stderr = run(["txt2img", "--model", str(files["model"]), "--no-progress", "--from-png", str(recorded),
                           "--control", f"{files['net']}:{files['hint']}", "--out", str(tmp_path / "again.png")],
                          capsys)
    assert code == 0, stderr
    assert "settings sdlab does not draw (ControlNet" not in stderr, stderr


def test_recorded_unit_reads_a1111s_labels():
    """A ControlNet line as the extension writes it (`ControlNetUnit.serialize`) gives the unit its paste gives:
    module (its UI alias too), weight, guidance, thresholds and modes; a -1 threshold is the default."""
    from sdlab.pipeline.control import recorded_unit

    line = ("Module: inpaint_global_harmonious, Model: cn [12345678], Weight: 0.5, Resize Mode: Scale to Fit (Inner "
            "Fit), Processor Res: 512, Threshold A: 0.5, Threshold B: -1, Guidance Start: 0.25, Guidance End: 0.75, "
            "Pixel Perfect: False, Control Mode: ControlNet is more important")
    assert recorded_unit(line) == {"module": "inpaint", "strength": 0.5, "start": 0.25, "end": 0.75,
                                   "threshold_a": 0.5, "control_mode": "control", "resize_mode": "crop",
                                   "processor_res": 512, "pixel_perfect": False}
    assert recorded_unit("Module: None, Model: cn [12345678]") == {"module": "none"}
    for bad, message in (("Module: none, Control Mode: Sideways", "Control Mode 'Sideways'"),
                         ("Module: depth_midas, Weight: 1", "no preprocessor 'depth_midas'"),
                         ("Module: canny, Weight: heavy", "Weight 'heavy' is not a number")):
        with pytest.raises(ValueError, match=message):
            recorded_unit(bad)


def test_from_png_gives_a_control_the_recorded_unit(files, tmp_path, capsys):
    """--from-png with --control FILE:IMAGE draws the unit the picture's `ControlNet 0` line records, module,
    weight, guidance start / end and thresholds included (A1111's paste fills its unit with them): the same
    picture; what the --control spec and its options give wins."""
    base = ["txt2img", "--model", str(files["model"]), "--no-progress"]
    spec = f"{files['net']}:{_wide_hint(tmp_path)}"
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    code, _, stderr = run([*base, "a red apple", *FAST, "--control", f"{spec}:0.5:0.25:0.75", "--control-module",
                           "canny", "--control-threshold-a", "60", "--control-threshold-b", "120",
                           "--out", str(first)], capsys)
    assert code == 0, stderr
    line = parse_parameters(read_parameters(first))["ControlNet 0"]
    assert all(item in line for item in ("Module: canny", "Weight: 0.5", "Threshold A: 60", "Threshold B: 120",
                                         "Guidance Start: 0.25", "Guidance End: 0.75")), line
    code, _, stderr = run([*base, "--from-png", str(first), "--control", spec, "--out", str(again)], capsys)
    assert code == 0, stderr
    assert np.array_equal(pixels(first), pixels(again))
    assert read_parameters(first) == read_parameters(again)
    own = tmp_path / "own.png"
    code, _, stderr = run([*base, "--from-png", str(first), "--control", f"{spec}:0.9", "--control-module", "none",
                           "--control-threshold-a", "-1", "--out", str(own)], capsys)
    assert code == 0, stderr
    line = parse_parameters(read_parameters(own))["ControlNet 0"]
    assert all(item in line for item in ("Module: none", "Weight: 0.9", "Guidance Start: 0.25")), line
    assert "Threshold" not in line          # canny's thresholds are not the new module's


def test_from_png_keeps_the_recorded_thresholds_only_with_the_recorded_module(files):
    """The thresholds and Processor Res a picture's `ControlNet N` line records are its module's sliders: a
    control that runs another module (--control-module) starts at that module's defaults (Processor Res: 512),
    as A1111's UI resets the sliders when the module changes (canny's 100 / 200 are no tile_resample rate); a
    --control-threshold-* / --control-processor-res given still wins."""
    import argparse

    from sdlab.cli.generate import _controls

    recorded = {"ControlNet 0": "Module: canny, Model: cn [12345678], Weight: 1.0, Resize Mode: Crop and Resize, "
                                "Processor Res: 768, Threshold A: 100.0, Threshold B: 200.0, Guidance Start: 0.0, "
                                "Guidance End: 1.0, Pixel Perfect: False, Control Mode: Balanced"}

    def control(module=(), threshold_b=(), processor_res=()):
        args = argparse.Namespace(control=[f"{files['net']}:{files['hint']}"], control_module=list(module),
                                  control_mode=[], control_resize=[], control_threshold_a=[],
                                  control_threshold_b=list(threshold_b), control_mask=[],
                                  control_processor_res=list(processor_res), control_pixel_perfect=[],
                                  from_png="pic.png")
        (unit,) = _controls(args, recorded, "a1111")
        return unit.module, unit.threshold_a, unit.threshold_b, unit.processor_res

    assert control() == control(["canny"]) == ("canny", 100.0, 200.0, 768)
    assert control(["tile_resample"]) == ("tile_resample", None, None, 512)
    assert control(["threshold"], [5.0]) == ("threshold", None, 5.0, 512)      # the slider's reset value
    assert control(["threshold"], processor_res=[300]) == ("threshold", None, None, 300)


def test_control_mask_and_thresholds_reach_the_control(files, tmp_path, monkeypatch):
    """--control-threshold-a / -b, --control-mask, --control-processor-res and --control-pixel-perfect set the
    matching control's `threshold_a` / `threshold_b`, `mask` (`none` and -1: unset), `processor_res` (-1: unset)
    and `pixel_perfect`, as `ControlInput(..., threshold_a=, mask=, processor_res=, pixel_perfect=)` does."""
    import argparse

    from sdlab.cli.generate import _controls

    mask = tmp_path / "mask.png"
    Image.new("L", (32, 32), 255).save(mask)
    spec = f"{files['net']}:{files['hint']}"
    args = argparse.Namespace(control=[spec, spec], control_module=["inpaint", "canny"], control_mode=[],
                              control_resize=[], control_threshold_a=[-1, 30.0], control_threshold_b=[],
                              control_mask=[str(mask), "none"], control_processor_res=[-1, 256],
                              control_pixel_perfect=["false", "true"], from_png=None)
    first, second = _controls(args, {}, "diffusers")
    assert (first.module, first.threshold_a, second.threshold_a, second.mask) == ("inpaint", None, 30.0, None)
    assert (first.processor_res, first.pixel_perfect, second.processor_res, second.pixel_perfect) == \
        (None, False, 256, True)
    assert np.array_equal(np.asarray(first.mask), np.asarray(Image.open(mask)))


def test_a_control_mask_of_another_size_than_its_image_is_refused(files, tmp_path, capsys):
    """--control-mask must have the size of its --control's image, as the extension's `combine_image_and_mask`
    requires (each is fitted to the picture on its own, so another size would mask other pixels): one error
    line naming both sizes, no file."""
    mask, out = tmp_path / "mask.png", tmp_path / "never.png"
    Image.new("L", (16, 32), 255).save(mask)
    code, stdout, stderr = run(["txt2img", "x", "--model", str(files["model"]), "--control",
                                f"{files['net']}:{files['hint']}", "--control-module", "inpaint", "--control-mask",
                                str(mask), "--out", str(out), *FAST], capsys)
    lines = [line for line in stderr.splitlines() if line.startswith("sdlab: error:")]
    assert code == 2 and len(lines) == 1 and "the mask is 16x32 but its image 32x32" in lines[0], stderr
    assert "Traceback" not in stderr and not out.exists() and stdout == ""


def test_help_names_every_preprocessor(capsys):
    """--control-module's help lists every module sdlab accepts (`PREPROCESSORS`), as the error for an
    unknown one does."""
    from sdlab.cli import main
    from sdlab.pipeline.preprocess import PREPROCESSORS

    for mode in ("txt2img", "img2img", "inpaint"):
        with pytest.raises(SystemExit):
            main([mode, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        listed = text[text.index("--control-module NAME preprocessor"):text.index("--control-mode MODE A1111")]
        assert all(f" {name}" in listed for name in PREPROCESSORS), listed
