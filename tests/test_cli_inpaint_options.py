"""`sdlab img2img --resize-mode` and `sdlab inpaint --masked-content / --only-masked / --only-masked-padding`:
the flags reach the request, the pictures record A1111's labels and `--from-png` redraws from them; the
defaults are the whole picture from its original content, as before the flags existed; a bad value is one
error. A reduced-width random SD1 file, 48 x 32 pictures drawn at 32 x 32, 2 steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sdlab
from bundle_fixtures import tiny_bundle, write_original
from cli_helpers import pixels, run
from sdlab.pipeline.png_info import read_parameters

FAST = ["--steps", "2", "--seed", "3", "--sampler", "Euler", "--no-progress"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny-sd1.safetensors"
    write_original(tiny_bundle("sd1"), path, junk=False)
    return path


@pytest.fixture()
def files(tmp_path: Path) -> tuple[Path, Path]:
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(init)
    m = Image.new("L", (48, 32), 0)
    m.paste(255, (28, 8, 40, 16))
    m.save(mask)
    return init, mask


def test_inpaint_flags_are_recorded_and_redrawn(model, files, tmp_path, capsys) -> None:
    init, mask = files
    out = tmp_path / "a.png"
    code, _, err = run(["inpaint", "a hat", "--init", str(init), "--mask", str(mask), "--model", str(model), "--width",
                        "32", "--height", "32", "--mask-blur", "2", "--masked-content", "latent-noise", "--only-masked",
                        "--only-masked-padding", "4", "--out", str(out), *FAST], capsys)
    assert code == 0, err
    assert Image.open(out).size == (48, 32)                        # Only masked: the picture's own size
    assert "Inpaint area: Only masked, Masked area padding: 4, Masked content: latent noise" in read_parameters(out)
    outside = np.ones((32, 48), dtype=bool)
    outside[:, 14:] = False                                        # left of every region the mask can grow to
    assert np.array_equal(pixels(out)[outside], pixels(init)[outside])

    again = tmp_path / "b.png"
    code, _, err = run(["inpaint", "--from-png", str(out), "--init", str(init), "--mask", str(mask), "--model",
                        str(model), "--out", str(again), "--no-progress"], capsys)
    assert code == 0, err
    assert np.array_equal(pixels(again), pixels(out))

    whole = tmp_path / "c.png"
    code, _, err = run(["inpaint", "--from-png", str(out), "--init", str(init), "--mask", str(mask), "--model",
                        str(model), "--no-only-masked", "--masked-content", "original", "--out", str(whole),
                        "--no-progress"], capsys)
    assert code == 0, err
    assert Image.open(whole).size == (32, 32)
    assert "Inpaint area" not in read_parameters(whole) and "Masked content" not in read_parameters(whole)


def test_defaults_are_the_whole_picture_from_its_original_content(model, files, tmp_path, capsys) -> None:
    init, mask = files
    out = tmp_path / "a.png"
    code, _, err = run(["inpaint", "a hat", "--init", str(init), "--mask", str(mask), "--model", str(model),
                        "--width", "32", "--height", "32", "--out", str(out), *FAST], capsys)
    assert code == 0, err
    pipe = sdlab.load(model)
    expected = pipe.inpaint("a hat", init, mask, width=32, height=32, steps=2, seed=3, sampler="Euler",
                            inpaint_fill="original", inpaint_only_masked=False, resize_mode="resize")
    assert np.array_equal(pixels(out), np.asarray(expected.images[0].convert("RGB"), dtype=np.int16))
    assert "Masked content" not in read_parameters(out) and "Inpaint area" not in read_parameters(out)


@pytest.mark.parametrize("mode", ["crop", "fill", "latent"])
def test_img2img_resize_mode_reaches_the_request(model, files, tmp_path, capsys, mode) -> None:
    init, _ = files
    out = tmp_path / "a.png"
    code, _, err = run(["img2img", "a hat", "--init", str(init), "--model", str(model), "--width", "32", "--height",
                        "32", "--resize-mode", mode, "--strength", "0.5", "--out", str(out), *FAST], capsys)
    assert code == 0, err
    expected = sdlab.load(model).img2img("a hat", init, strength=0.5, width=32, height=32, steps=2, seed=3,
                                         sampler="Euler", resize_mode=mode)
    assert np.array_equal(pixels(out), np.asarray(expected.images[0].convert("RGB"), dtype=np.int16))


@pytest.mark.parametrize("flag, value", [("--masked-content", "noise"), ("--resize-mode", "stretch")])
def test_an_unknown_mode_is_refused_by_name(model, files, tmp_path, capsys, flag, value) -> None:
    init, mask = files
    code, _, err = run(["inpaint", "a hat", "--init", str(init), "--mask", str(mask), "--model", str(model), flag,
                        value, "--out", str(tmp_path / "x.png"), *FAST], capsys)
    assert code == 2 and f"argument {flag}: invalid choice: '{value}'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_a_negative_padding_is_one_error_and_no_file(model, files, tmp_path, capsys) -> None:
    init, mask = files
    out = tmp_path / "x.png"
    code, _, err = run(["inpaint", "a hat", "--init", str(init), "--mask", str(mask), "--model", str(model),
                        "--only-masked", "--only-masked-padding", "-1", "--out", str(out), *FAST], capsys)
    assert code != 0 and err.count("sdlab: error:") == 1
    assert "--only-masked-padding must be 0 or more pixels, got -1" in err and not out.exists()


def test_invert_mask_is_recorded_and_redrawn_from_png(model, files, tmp_path, capsys) -> None:
    """--invert-mask repaints where the mask is black: A1111's Mask mode "Inpaint not masked", which
    --from-png reads back (--no-invert-mask turns it off)."""
    init, mask = files
    inverted, again, plain = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    code, _, err = run(["inpaint", "a hat", "--init", str(init), "--mask", str(mask), "--model", str(model),
                        "--invert-mask", "--out", str(inverted), *FAST], capsys)
    assert code == 0, err
    assert "Mask mode: Inpaint not masked" in read_parameters(inverted)
    assert np.array_equal(pixels(inverted)[8:16, 28:40], pixels(init)[8:16, 28:40])    # the white area is kept
    code, _, err = run(["inpaint", "--from-png", str(inverted), "--init", str(init), "--mask", str(mask), "--model",
                        str(model), "--out", str(again), "--no-progress"], capsys)
    assert code == 0, err
    assert np.array_equal(pixels(again), pixels(inverted))
    code, _, err = run(["inpaint", "--from-png", str(inverted), "--init", str(init), "--mask", str(mask), "--model",
                        str(model), "--no-invert-mask", "--out", str(plain), "--no-progress"], capsys)
    assert code == 0, err
    assert "Mask mode" not in read_parameters(plain)


def test_mask_round_off_is_recorded_and_redrawn_from_png(model, files, tmp_path, capsys) -> None:
    """--no-mask-round is A1111's API field mask_round off: it changes the picture of a blurred (soft) mask, so
    sdlab records it (Mask round: False; A1111 writes no label) and --from-png redraws it; --mask-round turns a
    picture's off."""
    init, mask = files
    soft, plain, again, rounded = (tmp_path / f"{name}.png" for name in ("soft", "plain", "again", "rounded"))
    common = ["--init", str(init), "--mask", str(mask), "--model", str(model), "--mask-blur", "3"]
    for out, flag in ((soft, "--no-mask-round"), (plain, "--mask-round")):
        code, _, err = run(["inpaint", "a hat", *common, flag, "--out", str(out), *FAST], capsys)
        assert code == 0, err
    assert "Mask round: False" in read_parameters(soft) and "Mask round" not in read_parameters(plain)
    assert not np.array_equal(pixels(soft), pixels(plain))
    for out, extra in ((again, []), (rounded, ["--mask-round"])):
        code, _, err = run(["inpaint", "--from-png", str(soft), *common, *extra, "--out", str(out), "--no-progress"],
                           capsys)
        assert code == 0, err
    assert np.array_equal(pixels(again), pixels(soft))
    assert np.array_equal(pixels(rounded), pixels(plain)) and "Mask round" not in read_parameters(rounded)


def test_help_says_what_mask_blur_and_strength_are_and_their_defaults(capsys):
    """--mask-blur is A1111's Mask blur, the Gaussian's standard deviation (sigma of cv2.GaussianBlur with
    2 * int(2.5 * sigma + 0.5) + 1 taps, `pipeline/overlay.py`), default 0; --strength defaults to 0.75 for
    img2img and 1 for inpaint."""
    from sdlab.cli import main

    texts = {}
    for mode in ("img2img", "inpaint"):
        with pytest.raises(SystemExit):
            main([mode, "--help"])
        texts[mode] = " ".join(capsys.readouterr().out.split())
    assert "standard deviation in pixels of the Gaussian blur" in texts["inpaint"]
    assert "default 0, no blur" in texts["inpaint"] and "radius" not in texts["inpaint"]
    assert "in (0, 1] (default 1," in texts["inpaint"] and "in (0, 1] (default 0.75," in texts["img2img"]
