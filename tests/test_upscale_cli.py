"""`sdlab upscale`: model and plain resizes, A1111's --scale semantics, the parameters chunk carried over, and
bad inputs as one error line with nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

from cli_helpers import pixels, run
from sdlab.checkpoints.upscaler import load_upscaler
from sdlab.pipeline.png_info import read_parameters
from sdlab.pipeline.upscale import run_upscaler
from test_upscale_models import new_arch_state, old_arch_state

pytestmark = pytest.mark.usefixtures("one_thread")

PARAMETERS = "a red apple\nNegative prompt: blurry\nSteps: 4, Sampler: Euler, CFG scale: 5, Seed: 3, Size: 24x20"


@pytest.fixture
def picture(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", PARAMETERS)
    path = tmp_path / "in.png"
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path, pnginfo=info)
    return path


@pytest.fixture
def x4_model(tmp_path: Path) -> Path:
    path = tmp_path / "RealESRGAN_x4plus.pth"
    torch.save({"params_ema": new_arch_state(4)}, path)
    return path


@pytest.fixture
def x2_model(tmp_path: Path) -> Path:
    path = tmp_path / "2x_old.safetensors"
    save_file(old_arch_state(2), str(path))
    return path


def test_model_scale_by_default_and_parameters_kept(tmp_path, picture, x4_model, capsys) -> None:
    out = tmp_path / "big.png"
    code, stdout, err = run(["upscale", str(picture), "--model", str(x4_model), "--out", str(out)], capsys)
    assert code == 0, err
    assert stdout.strip() == str(out)
    assert Image.open(out).size == (96, 80)
    assert read_parameters(out) == PARAMETERS
    want = run_upscaler(load_upscaler(x4_model), Image.open(picture).convert("RGB"))
    assert np.array_equal(pixels(out), np.asarray(want, dtype=np.int16))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []      # no temporary left


def test_dtype_auto_is_fp32_for_an_upscaler(tmp_path, picture, x4_model, capsys, monkeypatch) -> None:
    """--dtype auto, the default as for the other commands, keeps an upscaler in fp32 (README: bf16 moved a
    Real-ESRGAN-size RRDBNet's pixels by up to 9/255); a named dtype is taken as given."""
    import sdlab.checkpoints.upscaler as upscaler_module

    loaded = []
    real_load = upscaler_module.load_upscaler

    def spying_load(*args, **kwargs):
        upscaler = real_load(*args, **kwargs)
        loaded.append(next(upscaler.net.parameters()).dtype)
        return upscaler

    monkeypatch.setattr(upscaler_module, "load_upscaler", spying_load)
    for flags in ([], ["--dtype", "auto"], ["--dtype", "bf16"]):
        out = tmp_path / f"out{len(loaded)}.png"
        code, _, err = run(["upscale", str(picture), "--model", str(x4_model), "--out", str(out), *flags], capsys)
        assert code == 0, err
    assert loaded == [torch.float32, torch.float32, torch.bfloat16]
    assert np.array_equal(pixels(tmp_path / "out0.png"), pixels(tmp_path / "out1.png"))


def test_other_scale_is_model_then_lanczos(tmp_path, picture, x2_model, capsys) -> None:
    out = tmp_path / "x3.webp"
    code, _, err = run(["upscale", str(picture), "--model", str(x2_model), "--scale", "3", "--tile", "0", "--out", str(out)], capsys)
    assert code == 0, err
    upscaler = load_upscaler(x2_model)
    twice = run_upscaler(upscaler, run_upscaler(upscaler, Image.open(picture).convert("RGB"), tile=0), tile=0)   # x4
    assert Image.open(out).size == (72, 56)                                         # 72 x 60 to multiples of 8
    assert read_parameters(out) == PARAMETERS
    ours = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
    want = np.asarray(twice.resize((72, 56), Image.Resampling.LANCZOS), dtype=np.int16)
    assert np.abs(ours - want).mean() < 3                                           # WebP at quality 95


def test_plain_resizes(tmp_path, picture, capsys) -> None:
    out = tmp_path / "l.png"
    code, _, err = run(["upscale", str(picture), "--scale", "2.5", "--out", str(out)], capsys)
    assert code == 0, err
    scaled = Image.open(picture).convert("RGB").resize((60, 50), Image.Resampling.LANCZOS)   # A1111's do_upscale
    want = scaled.resize((56, 48), Image.Resampling.LANCZOS)                           # to multiples of 8
    assert np.array_equal(pixels(out), np.asarray(want, dtype=np.int16))
    out = tmp_path / "n.png"
    assert run(["upscale", str(picture), "--model", "Nearest", "--out", str(out)], capsys)[0] == 0
    assert Image.open(out).size == (96, 80)                                         # A1111's default 4


def _fails(args: list[str], capsys, match: str, tmp_path: Path) -> None:
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stdout, err = run(args, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdlab: error:") and match in lines[0], err
    assert "Traceback" not in err and stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_bad_inputs_write_nothing(tmp_path, picture, x4_model, capsys) -> None:
    out = str(tmp_path / "out.png")
    _fails(["upscale", str(tmp_path / "missing.png"), "--model", str(x4_model), "--out", out], capsys, "does not exist", tmp_path)
    _fails(["upscale", str(picture), "--model", str(tmp_path / "nope.pth"), "--out", out], capsys, "does not exist", tmp_path)
    sd = tmp_path / "sd.safetensors"
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 320, 3, 3)}, str(sd))
    _fails(["upscale", str(picture), "--model", str(sd), "--out", out], capsys, "not an ESRGAN / Real-ESRGAN upscaler", tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    _fails(["upscale", str(text), "--model", str(x4_model), "--out", out], capsys, "cannot read the image", tmp_path)
    _fails(["upscale", str(picture), "--model", str(text), "--out", out], capsys, "unknown checkpoint format", tmp_path)
    _fails(["upscale", str(picture), "--model", str(x4_model), "--out", str(tmp_path / "x.gif")], capsys, "--out", tmp_path)
    _fails(["upscale", str(picture), "--scale", "-2", "--out", out], capsys, "--scale", tmp_path)
    for tile, overlap in (("16", "40"), ("16", "15"), ("192", "97")):   # tiles one step of tile - overlap apart
        _fails(["upscale", str(picture), "--model", str(x4_model), "--tile", tile, "--tile-overlap", overlap,
                "--out", out], capsys, f"--tile-overlap {overlap} must be at most half of --tile {tile}", tmp_path)
    big = tmp_path / "big.png"
    Image.new("RGB", (2100, 2100), "white").save(big)           # x4: 8400 x 8400 = 70.6 MP, over the 67 MP limit
    _fails(["upscale", str(big), "--model", str(x4_model), "--out", out], capsys, "beyond the limit", tmp_path)


def test_decompression_bombs_are_refused(tmp_path, picture, monkeypatch, capsys) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)           # the 24 x 20 picture is now "too large"
    out = str(tmp_path / "out.png")
    _fails(["upscale", str(picture), "--scale", "2", "--out", out], capsys, "too large to open safely", tmp_path)


@pytest.mark.parametrize("raw", [b"", b"B", b"ab", b"BM\x00"])
def test_a_file_of_under_4_bytes_is_no_picture(tmp_path, raw: bytes, capsys) -> None:
    """Pillow's BMP / DIB `accept` raises struct.error on fewer than 4 bytes, which Image.open takes as "not this
    format"; `declared_pixels` let it escape: rc 1 "internal error: unpack_from requires a buffer of at least 4
    bytes" instead of Pillow's "cannot identify image file" (rc 2)."""
    short = tmp_path / "short.png"
    short.write_bytes(raw)
    _fails(["upscale", str(short), "--scale", "2", "--out", str(tmp_path / "out.png")], capsys,
           "cannot identify image file", tmp_path)


def test_a_png_says_what_was_done_as_a1111s_extras_and_keeps_the_inputs_texts(tmp_path, x4_model, capsys) -> None:
    """As A1111's Extras saves an upscaled PNG (run_postprocessing): the input's parameters and other text items
    (a ComfyUI workflow here) kept, and the infotext of what was done (ScriptPostprocessingUpscale: the scale, then
    the upscaler as A1111 lists it, R-ESRGAN 4x+ for RealESRGAN_x4plus) as its postprocessing and extras items."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", PARAMETERS)
    info.add_text("workflow", '{"nodes": []}')
    source = tmp_path / "in.png"
    Image.fromarray(np.zeros((20, 24, 3), dtype=np.uint8)).save(source, pnginfo=info)
    for options, done in ((["--model", str(x4_model), "--scale", "2"], "Postprocess upscale by: 2.0, Postprocess "
                           "upscaler: R-ESRGAN 4x+"), ([], "Postprocess upscale by: 4.0, Postprocess upscaler: Lanczos")):
        out = tmp_path / "out.png"
        code, _, err = run(["upscale", str(source), *options, "--out", str(out)], capsys)
        assert code == 0, err
        texts = Image.open(out).text
        assert texts == {"parameters": PARAMETERS, "workflow": '{"nodes": []}', "postprocessing": done,
                         "extras": done}, texts
