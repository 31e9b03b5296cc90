"""Running the `sdlab` command in-process and reading back what it drew (shared by the CLI tests)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from bundle_fixtures import tiny_bundle, write_original
from PIL import Image, PngImagePlugin

from sdlab.cli import main


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`sdlab ARGS` in this process: (exit status, stdout, stderr)."""
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def pixels(path: Path) -> np.ndarray:
    """The picture at `path` as (H, W, 3) int16, so differences do not wrap around."""
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def png_with_parameters(path: Path, parameters: str, size: tuple[int, int] = (64, 64)) -> Path:
    """A blank picture at `path` whose `parameters` text chunk holds `parameters` (an A1111 / sdlab infotext)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    Image.new("RGB", size).save(path, pnginfo=info)
    return path


@dataclass
class FeatureDraws:
    """Two `sdlab txt2img "a wall"` pictures of the reduced SD1 model (32 px, seed 3): `drawn` with a feature's
    flags, `plain` without; `fast` the flags both were drawn with (the model, steps, size, seed)."""
    model: Path
    fast: list[str]
    drawn: Path
    plain: Path


def draw_with_and_without(tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str],
                          steps: int) -> FeatureDraws:
    """The reduced SD1 model written to `tmp_path`, and its picture drawn with `flags` and without them."""
    model = tmp_path / "tiny-sd1.safetensors"
    write_original(tiny_bundle("sd1", seed=3), model, junk=False)
    fast = ["--model", str(model), "--steps", str(steps), "--width", "32", "--height", "32", "--seed", "3",
            "--no-progress"]
    drawn, plain = tmp_path / "drawn.png", tmp_path / "plain.png"
    assert run(["txt2img", "a wall", *flags, "--out", str(drawn), *fast], capsys)[0] == 0
    assert run(["txt2img", "a wall", "--out", str(plain), *fast], capsys)[0] == 0
    return FeatureDraws(model, fast, drawn, plain)


def assert_from_png_redraws(draws: FeatureDraws, off_flag: str, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    """`--from-png` of the feature's picture draws it again, pixel for pixel; with `off_flag` (--no-FEATURE) it
    draws the plain picture."""
    again = tmp_path / "again.png"
    for flags, expected in (([], draws.drawn), ([off_flag], draws.plain)):
        assert run(["txt2img", "--from-png", str(draws.drawn), *flags, "--out", str(again), *draws.fast],
                   capsys)[0] == 0
        assert np.array_equal(pixels(again), pixels(expected)), flags
