"""Running the `sdlab` command in-process and reading back what it drew (shared by the CLI tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
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
