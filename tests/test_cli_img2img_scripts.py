"""`sdlab img2img --loopback` / `--sd-upscale`: A1111's Loopback and SD upscale on the command line draw exactly
what the server's scripts (`/sdapi/v1/img2img` with `script_name`, tests/test_server_a1111_loopback_upscale.py)
draw for the same request, and write the pictures A1111 saves (every Loopback pass with its parameters and their
row grid without; SD upscale's picture with the first tile batch's parameters). The CLI takes the server's
settings from a server picture's parameters (--from-png), as a user redraws one; bad flags are one line, exit 2,
nothing written."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageFilter, PngImagePlugin
from safetensors.torch import save_file

from cli_helpers import run
from sdlab.pipeline.loopback import CURVES
from sdlab.pipeline.png_info import parse_parameters, read_parameters
from sdlab.pipeline.upscale import upscale_by
from sdlab.checkpoints.upscaler import load_upscaler
from server_fixtures import b64_png, sdlab_server  # noqa: F401  (sdlab_server: a session fixture)
from test_upscale_models import new_arch_state

BASE = {"prompt": "a red apple", "negative_prompt": "blurry", "steps": 4, "seed": 7, "cfg_scale": 5.0,
        "sampler_name": "Euler", "width": 64, "height": 64}
SERVERS_THREADS = ("--threads", "1", "--no-progress")    # the test server draws on one thread (server_env)
INIT = Image.fromarray(np.stack([np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1)),
                                 np.tile(np.linspace(255, 0, 64, dtype=np.uint8), (64, 1)).T,
                                 np.full((64, 64), 90, dtype=np.uint8)], axis=-1))


def decoded(b64: str) -> bytes:
    return base64.b64decode(b64)


def pixels(picture: bytes | Path) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(picture) if isinstance(picture, bytes) else picture).convert("RGB"))


def png_with(path: Path, image: Image.Image, parameters: str) -> Path:
    """`image` at `path` with the `parameters` text (what --from-png reads the server's settings from)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    image.save(path, pnginfo=info)
    return path


@pytest.fixture
def client(sdlab_server):
    with httpx.Client(base_url=sdlab_server.url + "/sdapi/v1", timeout=300) as c:
        yield c


def img2img(client, init: Image.Image, **fields) -> dict:
    answer = client.post("/img2img", json={**BASE, "init_images": [b64_png(init)], **fields})
    assert answer.status_code == 200, answer.text
    return answer.json()


def written(out: str) -> list[Path]:
    return [Path(line) for line in out.splitlines()]


def test_each_loopback_pass_and_the_grid_equal_the_servers_loopback(client, tmp_path: Path, capsys) -> None:
    """3 loops, Lazy curve from 0.6 to 0.2: the CLI's passes (seeds 7, 8, 9), each with its parameters and the
    script's fields, and their row grid without parameters, pixel-equal to the server's Loopback answer."""
    answer = img2img(client, INIT, denoising_strength=0.6, script_name="Loopback", script_args=[3, 0.2, "Lazy"])
    served = [decoded(image) for image in answer["images"]]                    # the grid, then the 3 passes
    settings = png_with(tmp_path / "server-pass.png", INIT, read_parameters(io.BytesIO(served[1])))
    INIT.save(tmp_path / "init.png")
    code, out, err = run(["img2img", "--from-png", str(settings), "--init", str(tmp_path / "init.png"),
                          "--loopback", "3", "--final-strength", "0.2", "--strength-curve", "Lazy",
                          "--out", str(tmp_path / "loop.png"), *SERVERS_THREADS], capsys)
    assert code == 0, err
    paths = written(out)
    assert [path.name for path in paths] == ["loop-0.png", "loop-1.png", "loop-2.png", "loop-grid.png"]
    for k, path in enumerate(paths[:3]):
        assert np.array_equal(pixels(path), pixels(served[1 + k])), k
        ours, theirs = (parse_parameters(read_parameters(p)) for p in (path, io.BytesIO(served[1 + k])))
        assert ours["Seed"] == theirs["Seed"] == 7 + k
        assert ours["Denoising strength"] == pytest.approx(theirs["Denoising strength"])
        assert (ours["Final denoising strength"], ours["Denoising curve"]) == ("0.2", "Lazy")
        assert list(ours)[-3:] == ["Final denoising strength", "Denoising curve", "Version"]
    assert np.array_equal(pixels(paths[3]), pixels(served[0]))
    assert read_parameters(paths[3]) is None                                    # A1111's grid has no text


def test_loopback_batches_start_from_the_init_picture_again(client, tmp_path: Path, capsys) -> None:
    """--batch-count 2 x 2 loops: seeds 7, 8 | 9, 10, every pass written (A1111 saves each), the grid of each
    batch's last picture, as the server answers n_iter 2."""
    answer = img2img(client, INIT, n_iter=2, denoising_strength=0.5, script_name="Loopback", script_args=[2, 0.9])
    served = [decoded(image) for image in answer["images"]]                    # the grid, then 8 and 10
    settings = png_with(tmp_path / "server-pass.png", INIT, read_parameters(io.BytesIO(served[1])))
    INIT.save(tmp_path / "init.png")
    code, out, err = run(["img2img", "--from-png", str(settings), "--init", str(tmp_path / "init.png"), "--seed", "7",
                          "--strength", "0.5", "--loopback", "2", "--final-strength", "0.9", "--batch-count", "2",
                          "--out", str(tmp_path / "loops"), *SERVERS_THREADS], capsys)
    assert code == 0, err
    paths = written(out)
    assert [path.name.split("-")[:2] for path in paths] == [["00000", "7"], ["00001", "8"], ["00002", "9"],
                                                             ["00003", "10"], ["00004", "grid"]]
    assert np.array_equal(pixels(paths[1]), pixels(served[1]))
    assert np.array_equal(pixels(paths[3]), pixels(served[2]))
    assert np.array_equal(pixels(paths[4]), pixels(served[0]))


def test_sd_upscale_equals_the_servers_sd_upscale(client, tmp_path: Path, capsys) -> None:
    """48x48 by Lanczos x2, 64x64 tiles overlapping by 32, batch size 3 (a batch of 3 tiles at seed 5, the last
    tile 3 times at seed 6): the CLI's picture pixel-equal to the server's, written with the first tile batch's
    parameters (the server's info text), as A1111 saves it."""
    small = INIT.resize((48, 48))
    answer = img2img(client, small, seed=5, batch_size=3, denoising_strength=0.4, steps=3,
                     script_name="SD upscale", script_args=["", 32, "Lanczos", 2])
    served, info = decoded(answer["images"][0]), json.loads(answer["info"])
    settings = png_with(tmp_path / "server-tile.png", small, info["infotexts"][0])
    small.save(tmp_path / "small.png")
    code, out, err = run(["img2img", "--from-png", str(settings), "--init", str(tmp_path / "small.png"),
                          "--batch", "3", "--sd-upscale", "2", "--upscaler", "lanczos", "--tile-overlap", "32",
                          "--out", str(tmp_path / "up.png"), *SERVERS_THREADS], capsys)
    assert code == 0, err
    [path] = written(out)
    assert pixels(path).shape == (96, 96, 3)
    assert np.array_equal(pixels(path), pixels(served))
    ours, theirs = parse_parameters(read_parameters(path)), parse_parameters(info["infotexts"][0])
    assert {key: ours[key] for key in theirs if key != "Version"} == {k: v for k, v in theirs.items() if k != "Version"}
    assert (ours["SD upscale overlap"], ours["SD upscale upscaler"]) == ("32", "Lanczos")


def test_sd_upscale_runs_an_upscaler_file_found_by_a1111s_name(tmp_path: Path, capsys) -> None:
    """--upscaler "R-ESRGAN 2x+" finds RealESRGAN_x2plus in --models-dir's RealESRGAN folder: the picture is SD
    upscale without an upscaler ("None") of the init through that network (`upscale_by`), recorded by A1111's
    name; --batch-count 2 writes two pictures, the second from seed + 1."""
    folder = tmp_path / "models" / "RealESRGAN"
    folder.mkdir(parents=True)
    save_file(new_arch_state(2, seed=3), folder / "RealESRGAN_x2plus.safetensors")
    small = INIT.resize((24, 24))
    small.save(tmp_path / "small.png")
    upscale_by(small, load_upscaler(folder / "RealESRGAN_x2plus.safetensors"), 2).save(tmp_path / "big.png")
    common = ["a red apple", "--steps", "4", "--seed", "3", "--strength", "0.5", "--width", "32", "--height", "32",
              "--sd-upscale", "2", "--tile-overlap", "16", "--batch", "4", "--batch-count", "2", "--no-progress"]
    code, out, err = run(["img2img", *common, "--init", str(tmp_path / "small.png"), "--upscaler", "R-ESRGAN 2x+",
                          "--models-dir", str(tmp_path / "models"), "--out", str(tmp_path / "a.png")], capsys)
    assert code == 0, err
    by_name = written(out)
    code, out, err = run(["img2img", *common, "--init", str(tmp_path / "big.png"), "--upscaler", "None",
                          "--out", str(tmp_path / "b.png")], capsys)
    assert code == 0, err
    pre_upscaled = written(out)
    assert [path.name for path in by_name] == ["a-0.png", "a-1.png"]
    for ours, reference in zip(by_name, pre_upscaled):
        assert pixels(ours).shape == (48, 48, 3)
        assert np.array_equal(pixels(ours), pixels(reference))
    assert not np.array_equal(pixels(by_name[0]), pixels(by_name[1]))
    assert parse_parameters(read_parameters(by_name[1]))["SD upscale upscaler"] == "R-ESRGAN 2x+"


MASK = Image.fromarray(np.pad(np.full((32, 40), 255, dtype=np.uint8), ((8, 24), (16, 8))))   # a white box


def test_inpaint_loopback_equals_the_servers_loopback_with_the_mask(client, tmp_path: Path, capsys) -> None:
    """`sdlab inpaint --loopback 3` with the server's mask and settings (Masked content fill, mask blur 4, taken
    from its first pass's picture): every pass pixel-equal to the server's Loopback on the same inpaint request,
    the passes after the first with Masked content "original" (A1111's `p.inpainting_fill = 1`), outside the
    mask the init picture's pixels kept."""
    answer = img2img(client, INIT, mask=b64_png(MASK), mask_blur=4, inpainting_fill=0, denoising_strength=0.9,
                     script_name="Loopback", script_args=[3, 0.4, "Aggressive"])
    served = [decoded(image) for image in answer["images"]]                    # the grid, then the 3 passes
    settings = png_with(tmp_path / "server-pass.png", INIT, read_parameters(io.BytesIO(served[1])))
    INIT.save(tmp_path / "init.png")
    MASK.save(tmp_path / "mask.png")
    code, out, err = run(["inpaint", "--from-png", str(settings), "--init", str(tmp_path / "init.png"),
                          "--mask", str(tmp_path / "mask.png"), "--loopback", "3", "--final-strength", "0.4",
                          "--strength-curve", "aggressive", "--out", str(tmp_path / "loop.png"), *SERVERS_THREADS],
                         capsys)
    assert code == 0, err
    paths = written(out)
    assert [path.name for path in paths] == ["loop-0.png", "loop-1.png", "loop-2.png", "loop-grid.png"]
    for k, path in enumerate(paths[:3]):
        assert np.array_equal(pixels(path), pixels(served[1 + k])), k
        ours = parse_parameters(read_parameters(path))
        assert ours.get("Masked content") == ("fill" if k == 0 else None)       # sdlab writes no "original"
        assert (ours["Final denoising strength"], ours["Denoising curve"]) == ("0.4", "Aggressive")
    assert np.array_equal(pixels(paths[3]), pixels(served[0]))
    kept = np.asarray(MASK.filter(ImageFilter.MaxFilter(21))) == 0     # well outside the blurred mask
    assert np.array_equal(pixels(paths[2])[kept], np.asarray(INIT)[kept])


def test_from_png_takes_the_pictures_loopback_and_sd_upscale_settings(client, tmp_path: Path, capsys) -> None:
    """A picture the server's Loopback (SD upscale) drew, redrawn with --loopback 2 (--sd-upscale 2) and no other
    script flag: its `Final denoising strength` / `Denoising curve` (`SD upscale overlap` / `SD upscale upscaler`)
    are the flags, so the redraw equals the server's (the defaults, 0.5 Linear and an 8 px overlap of 64 px
    tiles, draw other pictures)."""
    loop = img2img(client, INIT, denoising_strength=0.6, script_name="Loopback", script_args=[2, 0.1, "Lazy"])
    loop_pictures = [decoded(image) for image in loop["images"]]
    small = INIT.resize((48, 48))
    upscaled = img2img(client, small, seed=5, denoising_strength=0.4, steps=3, script_name="SD upscale",
                       script_args=["", 24, "Nearest", 2])
    INIT.save(tmp_path / "init.png")
    small.save(tmp_path / "small.png")
    loop_png = png_with(tmp_path / "loop-pass.png", INIT, read_parameters(io.BytesIO(loop_pictures[1])))
    tile_png = png_with(tmp_path / "tile.png", small, json.loads(upscaled["info"])["infotexts"][0])
    code, out, err = run(["img2img", "--from-png", str(loop_png), "--init", str(tmp_path / "init.png"),
                          "--loopback", "2", "--out", str(tmp_path / "loop.png"), *SERVERS_THREADS], capsys)
    assert code == 0, err
    for path, served in zip(written(out), loop_pictures[1:]):
        assert np.array_equal(pixels(path), pixels(served))
    code, out, err = run(["img2img", "--from-png", str(tile_png), "--init", str(tmp_path / "small.png"),
                          "--sd-upscale", "2", "--out", str(tmp_path / "up.png"), *SERVERS_THREADS], capsys)
    assert code == 0, err
    [path] = written(out)
    assert np.array_equal(pixels(path), pixels(decoded(upscaled["images"][0])))
    assert (parse_parameters(read_parameters(path))["SD upscale overlap"],
            parse_parameters(read_parameters(path))["SD upscale upscaler"]) == ("24", "Nearest")


LOOP_TEXT = ("a red apple\nSteps: 2, Sampler: Euler, CFG scale: 5, Seed: 7, Size: 64x64, Denoising strength: 0.5, "
             "Final denoising strength: 0.2, Denoising curve: Lazy")
TILE_TEXT = ("a red apple\nSteps: 2, Sampler: Euler, CFG scale: 5, Seed: 7, Size: 64x64, Denoising strength: 0.5, "
             "SD upscale overlap: 16, SD upscale upscaler: Lanczos")


@pytest.mark.parametrize("mode, text, flags, warning", [
    ("img2img", LOOP_TEXT, [], "drawn by A1111's Loopback script (Final denoising strength: 0.2, Denoising curve: "
                               "Lazy); this run draws one img2img request: pass --loopback N to redraw it"),
    ("txt2img", LOOP_TEXT, [], "this run draws one txt2img request: sdlab txt2img does not run it"),
    ("img2img", TILE_TEXT, [], "drawn by A1111's SD upscale script (SD upscale overlap: 16, SD upscale upscaler: "
                               "Lanczos); this run draws one img2img request: pass --sd-upscale SCALE to redraw it"),
    ("inpaint", TILE_TEXT, ["--mask", "MASK"], "sdlab inpaint does not run it, so the redraw differs"),
    ("img2img", TILE_TEXT, ["--loopback", "1"], "drawn by A1111's SD upscale script"),
])
def test_a_picture_a_script_drew_redrawn_without_it_is_a_warning(tmp_path: Path, capsys, mode, text, flags,
                                                                  warning) -> None:
    INIT.save(tmp_path / "init.png")
    MASK.save(tmp_path / "mask.png")
    png_with(tmp_path / "drawn.png", INIT, text)
    init = [] if mode == "txt2img" else ["--init", str(tmp_path / "init.png")]
    flags = [str(tmp_path / "mask.png") if flag == "MASK" else flag for flag in flags]
    code, out, err = run([mode, "--from-png", str(tmp_path / "drawn.png"), *init, *flags, "--steps", "1",
                          "--out", str(tmp_path / "out.png"), "--no-progress"], capsys)
    assert code == 0, err
    assert warning in err, err


@pytest.mark.parametrize("text, message", [
    (LOOP_TEXT.replace("0.2,", "much,"), "the --from-png picture's 'Final denoising strength' value 'much' is not a "
                                         "number"),
    (LOOP_TEXT.replace("Lazy", "Steep"), "'Denoising curve' value 'Steep' is none of A1111's curves"),
    (LOOP_TEXT.replace("0.2,", "1.5,"), "the --from-png picture's 'Final denoising strength' must be 0..1, got 1.5 "
                                        "(give --final-strength to override it)"),
    (LOOP_TEXT.replace("0.2,", "nan,"), "the --from-png picture's 'Final denoising strength' must be 0..1, got nan "
                                        "(give --final-strength to override it)"),
    (TILE_TEXT.replace("overlap: 16", "overlap: 64"),
     "the --from-png picture's 'SD upscale overlap' must be below the tiles' width and height (64x64, --width x "
     "--height), got 64 (give --tile-overlap to override it)"),
    (TILE_TEXT.replace("overlap: 16", "overlap: -8"),
     "the --from-png picture's 'SD upscale overlap' must be 0 or more pixels, got -8 (give --tile-overlap to "
     "override it)"),
    (TILE_TEXT.replace("Lanczos", "R-ESRGAN 4x+"),
     "the --from-png picture's 'SD upscale upscaler': the upscaler 'R-ESRGAN 4x+' is A1111's name of the file "
     "RealESRGAN_x4plus.pth, which was not found"),
])
def test_a_recorded_script_field_that_does_not_read_is_one_line(tmp_path: Path, capsys, text, message) -> None:
    """A picture's script field that fails its check is named as the picture's, with the flag that overrides it
    (the flag's own message when the flag is given: test_bad_script_flags_are_one_line_and_nothing_is_written)."""
    INIT.save(tmp_path / "init.png")
    png_with(tmp_path / "drawn.png", INIT, text)
    script = ["--sd-upscale", "2"] if "SD upscale" in text else ["--loopback", "2"]
    code, out, err = run(["img2img", "--from-png", str(tmp_path / "drawn.png"), "--init", str(tmp_path / "init.png"),
                          *script, "--out", str(tmp_path / "out"), "--no-progress"], capsys)
    if "R-ESRGAN" in message:
        assert err.rstrip().endswith("(give --upscaler to override it)"), err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_the_curve_flags_are_a1111s_curves() -> None:
    from sdlab.cli.img2img_scripts import CURVE_FLAGS

    assert [flag.capitalize() for flag in CURVE_FLAGS] == list(CURVES)


def test_inpaint_help_offers_only_the_scripts_it_draws(capsys) -> None:
    """inpaint --help lists Loopback's flags and not SD upscale's, which inpaint refuses (its --sd-upscale stays a
    one-line refusal that says why: test_bad_script_flags_are_one_line_and_nothing_is_written); img2img lists both."""
    sd_upscale = ("--sd-upscale", "--upscaler", "--tile-overlap")
    for mode, listed in (("inpaint", False), ("img2img", True)):
        with pytest.raises(SystemExit):
            run([mode, "--help"], capsys)
        shown = capsys.readouterr().out
        assert "--loopback" in shown and "--final-strength" in shown
        assert [flag in shown for flag in sd_upscale] == [listed] * 3, mode


@pytest.mark.parametrize("flags, message", [
    (["--loopback", "0"], "--loopback must be 1 or more passes"),
    (["--loopback", "400", "--batch-count", "3"], "passes x --batch-count at most 1000, got 400 x 3"),
    (["--loopback", "2", "--final-strength", "1.5"], "--final-strength must be 0..1, got 1.5"),
    (["--loopback", "2", "--final-strength", "nan"], "--final-strength must be 0..1, got nan"),
    (["--loopback", "2", "--batch", "2"], "--loopback draws one picture per pass"),
    (["--loopback", "2", "--strength-curve", "steep"], "argument --strength-curve: invalid choice: 'steep'"),
    (["--final-strength", "0.3"], "--final-strength: only with --loopback N"),
    (["--upscaler", "Lanczos", "--tile-overlap", "8"], "--upscaler, --tile-overlap: only with --sd-upscale SCALE"),
    (["--loopback", "2", "--sd-upscale", "2"], "give either --loopback or --sd-upscale, not both"),
    (["--loopback", "2", "--prompts-file", "lines.txt"], "do not run with --prompts-file"),
    (["--sd-upscale", "0"], "--sd-upscale must be a scale above 0, got 0"),
    (["--sd-upscale", "2", "--tile-overlap", "-1"], "--tile-overlap must be 0 or more pixels, got -1"),
    (["--sd-upscale", "2", "--tile-overlap", "64"], "--tile-overlap must be below the tiles' width and height (64x64"),
    (["--sd-upscale", "2", "--upscaler", "nosuch"], "--upscaler 'nosuch' is no file, nor an upscaler file"),
    (["--sd-upscale", "2", "--upscaler", "R-ESRGAN 4x+"], "A1111's name of the file RealESRGAN_x4plus.pth"),
    (["--sd-upscale", "1000"], "--sd-upscale: upscaling to 48000x48000 pixels is beyond the limit"),
    (["--sd-upscale", "2", "--width", "8", "--height", "8", "--tile-overlap", "0", "--batch-count", "100"],
     "--sd-upscale: 144 tiles x 100 make 14400 batches; the limit is 1000"),
    (["--sd-upscale", "2", "--steps", "0"], "steps must be an integer in 1..1000, got 0"),
    (["--sd-upscale", "2", "--inpaint"], "--sd-upscale does not inpaint: A1111's SD upscale cuts the picture alone"),
    (["--loopback", "2", "--batch", "2", "--inpaint"], "--loopback draws one picture per pass"),
    (["--loopback", "2", "--strength", "0.6", "--final-strength", "0.05", "--steps", "4"], "runs no step"),
])
def test_bad_script_flags_are_one_line_and_nothing_is_written(tmp_path: Path, capsys, flags, message) -> None:
    """img2img's, and with "--inpaint" inpaint's (with a mask)."""
    INIT.resize((48, 48)).save(tmp_path / "init.png")
    MASK.resize((48, 48)).save(tmp_path / "mask.png")
    out = tmp_path / "out"
    mode = ["inpaint", "--mask", str(tmp_path / "mask.png")] if "--inpaint" in flags else ["img2img"]
    flags = [flag for flag in flags if flag != "--inpaint"]
    code, stdout, err = run([*mode, "a red apple", "--init", str(tmp_path / "init.png"), *flags,
                             "--out", str(out), "--no-progress"], capsys)
    assert code == 2 and message in err, err
    assert err.splitlines()[-1].startswith("sdlab: error: ") and err.count("sdlab: error:") == 1   # one line
    assert "Traceback" not in err and stdout == ""
    assert not out.exists() or not any(out.iterdir())
