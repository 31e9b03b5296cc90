"""`sdlab txt2img --hr-*`: the hires fix from the command line equals the Python API, its parameters read back
with --from-png draw the same picture (a model upscaler found by its recorded name beside the picture), and bad
values are one error line with nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file

import sdlab
from cli_helpers import pixels, png_with_parameters, run
from sdlab.pipeline.png_info import read_parameters
from test_upscale_models import new_arch_state

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red apple on a table"


@pytest.fixture
def esrgan_x2(tmp_path: Path) -> Path:
    path = tmp_path / "pictures" / "RealESRGAN_x2_random.safetensors"
    path.parent.mkdir()
    save_file(new_arch_state(2, seed=3), path)
    return path


def test_cli_equals_api_and_round_trips_through_from_png(esrgan_x2: Path, tmp_path: Path, capsys,
                                                         monkeypatch) -> None:
    first = esrgan_x2.parent / "a.png"
    code, out, err = run(["txt2img", PROMPT, "--steps", "3", "--seed", "5", "--hr-scale", "2", "--hr-upscaler",
                          str(esrgan_x2), "--hr-steps", "2", "--hr-denoise", "0.5", "--out", str(first), "--no-progress"],
                         capsys)
    assert code == 0, err
    text = read_parameters(first)
    assert "Size: 64x64" in text and "Denoising strength: 0.5, Hires upscale: 2, Hires steps: 2, " \
        "Hires upscaler: RealESRGAN_x2_random" in text
    api = sdlab.load().txt2img(PROMPT, steps=3, seed=5, hr_scale=2, hr_upscaler=str(esrgan_x2), hr_steps=2,
                               hr_denoise=0.5).images[0]
    assert np.array_equal(pixels(first), np.asarray(api, dtype=np.int16))

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)                                      # the upscaler is found beside the picture
    code, out, err = run(["txt2img", "--from-png", str(first), "--out", "b.png", "--no-progress"], capsys)
    assert code == 0, err
    assert pixels(elsewhere / "b.png").shape == (128, 128, 3)
    assert np.array_equal(pixels(elsewhere / "b.png"), pixels(first))


def test_hr_size_round_trip_and_flags_override_the_png(tmp_path: Path, capsys) -> None:
    first = tmp_path / "a.png"
    code, _, err = run(["txt2img", PROMPT, "--steps", "3", "--seed", "5", "--hr-size", "128x96",
                        "--hr-upscaler", "Latent (bicubic)", "--out", str(first), "--no-progress"], capsys)
    assert code == 0, err
    assert "Hires resize: 128x96, Hires upscaler: Latent (bicubic)" in read_parameters(first)
    assert pixels(first).shape == (96, 128, 3)
    code, _, err = run(["txt2img", "--from-png", str(first), "--out", str(tmp_path / "b.png"), "--no-progress"], capsys)
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "b.png"), pixels(first))
    code, _, err = run(["txt2img", "--from-png", str(first), "--hr-scale", "1.5", "--out", str(tmp_path / "c.png"),
                        "--no-progress"], capsys)                    # --hr-scale replaces the recorded size
    assert code == 0, err
    assert pixels(tmp_path / "c.png").shape == (96, 96, 3)
    code, _, err = run(["img2img", "--from-png", str(first), "--init", str(first), "--out", str(tmp_path / "d.png"),
                        "--no-progress"], capsys)                    # img2img leaves the hires fields out
    assert code == 0, err
    recorded = read_parameters(tmp_path / "d.png")
    assert "Hires" not in recorded and "Denoising strength: 0.7," in recorded


@pytest.mark.parametrize("flags, message", [
    (["--hr-scale", "2", "--hr-upscaler", "SuperResolver9000"], "unknown hires upscaler"),
    (["--hr-scale", "0.5"], "hr_scale must be at least 1"),
    (["--hr-scale", "300"], "each side must lie in"),
    (["--hr-scale", "2", "--hr-denoise", "0"], "hr_denoise"),
    (["--hr-scale", "2", "--hr-denoise=-0.5"], "hr_denoise"),
    (["--hr-size", "big"], "--hr-size wants WIDTHxHEIGHT"),
    (["--hr-size", "0x0"], "--hr-size wants pixel counts"),
    (["--hr-steps", "4"], "need hr_scale"),
])
def test_bad_hires_flags_are_one_error_line_and_nothing_written(tmp_path: Path, capsys, flags, message) -> None:
    out = tmp_path / "out"
    code, stdout, err = run(["txt2img", PROMPT, "--steps", "2", *flags, "--out", str(out), "--no-progress"], capsys)
    assert code == 2 and stdout == ""
    assert err.startswith("sdlab: error:") and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() or not any(out.iterdir())


def test_a_broken_upscaler_file_is_one_error_line(tmp_path: Path, capsys) -> None:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    out = tmp_path / "out"
    code, _, err = run(["txt2img", PROMPT, "--steps", "2", "--hr-scale", "2", "--hr-upscaler", str(broken),
                        "--out", str(out), "--no-progress"], capsys)
    assert code == 2 and err.startswith("sdlab: error:") and len(err.strip().splitlines()) == 1, err
    assert not out.exists() or not any(out.iterdir())


def test_from_png_warns_about_a1111s_own_hires_pass_settings(tmp_path: Path, capsys) -> None:
    """A1111 writes Hires checkpoint for a second pass unlike the first, which sdlab's second pass does not draw (it
    takes the first pass's model), and says so; its Hires sampler / schedule type / prompt / negative prompt and
    Forge's Hires CFG Scale (`hr_cfg_scale`) it draws (tests/test_hires_pass_settings.py, test_comfyui_hires.py)."""
    text = ("a red apple\nNegative prompt: ugly\nSteps: 2, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, "
            "Seed: 5, Size: 64x64, Denoising strength: 0.5, Hires upscale: 1, Hires upscaler: Latent, "
            "Hires checkpoint: other_model, Hires sampler: DPM++ 2M, Hires schedule type: Karras, "
            "Hires CFG Scale: 5.0, Hires prompt: a green pear, Hires negative prompt: blurry")
    recorded = png_with_parameters(tmp_path / "a1111.png", text)
    code, _, err = run(["txt2img", "--from-png", str(recorded), "--out", str(tmp_path / "b.png"), "--no-progress"],
                       capsys)
    assert code == 0, err
    warning = next(line for line in err.splitlines() if "hires pass had its own" in line)
    assert "Hires checkpoint 'other_model'" in warning and "CFG" not in warning
    assert "sampler" not in warning and "prompt" not in warning and "schedule" not in warning   # drawn
    assert "Hires sampler: DPM++ 2M, Hires prompt: a green pear" in read_parameters(tmp_path / "b.png")
    assert "Hires CFG Scale: 5," in read_parameters(tmp_path / "b.png")


def test_a_recorded_upscaler_is_found_in_a_models_dirs_esrgan_folder(tmp_path: Path, capsys, monkeypatch) -> None:
    """An A1111 picture's 'Hires upscaler: 4x-UltraSharp' (or --hr-upscaler 4x-UltraSharp) is found in A1111's
    models/ESRGAN under --models-dir, as img2img's --upscaler finds it. Before, only the picture's folder and the
    current folder were searched: 'unknown hires upscaler '4x-UltraSharp''."""
    models = tmp_path / "webui" / "models"
    (models / "ESRGAN").mkdir(parents=True)
    upscaler = models / "ESRGAN" / "4x-UltraSharp.safetensors"
    save_file(new_arch_state(2, seed=3), upscaler)
    monkeypatch.chdir(tmp_path)
    common = ["--steps", "2", "--seed", "5", "--hr-scale", "2", "--hr-steps", "1", "--hr-denoise", "0.5", "--no-progress"]
    code, _, err = run(["txt2img", PROMPT, *common, "--hr-upscaler", str(upscaler), "--out", "by_path.png"], capsys)
    assert code == 0, err
    code, _, err = run(["txt2img", PROMPT, *common, "--hr-upscaler", "4x-UltraSharp", "--models-dir", str(models),
                        "--out", "by_name.png"], capsys)
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "by_name.png"), pixels(tmp_path / "by_path.png"))
    assert "Hires upscaler: 4x-UltraSharp" in read_parameters(tmp_path / "by_name.png")
    code, _, err = run(["txt2img", "--from-png", "by_name.png", "--models-dir", str(models), "--out", "re.png",
                        "--no-progress"], capsys)
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "re.png"), pixels(tmp_path / "by_path.png"))
    code, _, err = run(["txt2img", "--from-png", "by_name.png", "--out", "none.png", "--no-progress"], capsys)
    assert code == 2 and "'4x-UltraSharp'" in err and not (tmp_path / "none.png").exists(), err
