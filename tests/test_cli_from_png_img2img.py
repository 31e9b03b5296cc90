"""`sdlab txt2img --from-png` of a picture drawn from a picture (img2img, inpaint) says so: txt2img cannot draw it
again, `sdlab img2img --from-png P --init PICTURE` can. Before, the txt2img picture was drawn without a word."""

from __future__ import annotations

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from bundle_fixtures import tiny_bundle, write_original
from sdlab.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

FAST = ["--steps", "1", "--width", "32", "--height", "32", "--no-progress"]


def _picture(path, settings: str):
    info = PngInfo()
    info.add_text("parameters", f"a castle\n{settings}")
    Image.new("RGB", (32, 32)).save(path, pnginfo=info)
    return path


@pytest.mark.parametrize("settings, says", [
    ("Steps: 2, Sampler: Euler, Seed: 3, Size: 32x32, Denoising strength: 0.6, Img2img steps: diffusers",
     "'Img2img steps' label"),
    ("Steps: 2, Sampler: Euler, Seed: 3, Size: 32x32, Denoising strength: 0.6", "without a hires fix"),
    ("Steps: 2, Sampler: Euler, Seed: 3, Size: 32x32, Denoising strength: 0.6, Hires upscale: 1.5", None),
    ("Steps: 2, Sampler: Euler, Seed: 3, Size: 32x32", None)])
def test_txt2img_of_a_picture_drawn_from_a_picture_says_so(tmp_path, capsys, settings, says):
    model = tmp_path / "tiny.safetensors"
    write_original(tiny_bundle("sd1"), model, junk=False)
    picture = _picture(tmp_path / "p.png", settings)
    code = main(["txt2img", "--from-png", str(picture), "--model", str(model), *FAST, "--out", str(tmp_path / "out.png")])
    err = capsys.readouterr().err
    assert code == 0, err
    warned = [line for line in err.splitlines() if "drawn from a picture" in line]
    if says is None:
        assert warned == []
    else:
        assert len(warned) == 1 and says in warned[0] and "sdlab img2img --from-png" in warned[0], warned
