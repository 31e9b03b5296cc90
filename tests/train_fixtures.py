"""Shared helpers for the training tests: tiny captioned datasets, tiny checkpoints on disk, and runs of the
training CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.torch import load_file

from bundle_fixtures import tiny_bundle
from sdlab.checkpoints.save import save_bundle

CAPTIONS = ("a red square", "a blue circle", "a green stripe", "a yellow cross")


def pattern_image(i: int, size: int = 32) -> Image.Image:
    """Four clearly different small pictures (flat colours with a shape)."""
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.zeros((size, size, 3), dtype=np.uint8)
    c = size // 2
    if i % 4 == 0:
        img[:] = (30, 30, 30)
        img[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = (220, 40, 40)
    elif i % 4 == 1:
        img[:] = (230, 230, 230)
        img[(yy - c) ** 2 + (xx - c) ** 2 < (size // 3) ** 2] = (40, 60, 220)
    elif i % 4 == 2:
        img[:] = (20, 90, 20)
        img[:, c - size // 8: c + size // 8] = (120, 240, 120)
    else:
        img[:] = (60, 20, 80)
        img[c - 2: c + 2, :] = (240, 230, 40)
        img[:, c - 2: c + 2] = (240, 230, 40)
    return Image.fromarray(img)


def write_caption_folder(folder: Path, n: int = 4, size: int = 32) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pattern_image(i, size).save(folder / f"img{i:02d}.png")
        (folder / f"img{i:02d}.txt").write_text(CAPTIONS[i % 4])
    return folder


def write_jsonl_folder(folder: Path, n: int = 4, size: int = 32) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(n):
            pattern_image(i, size).save(folder / f"p{i}.png")
            f.write(json.dumps({"file_name": f"p{i}.png", "text": CAPTIONS[i % 4]}) + "\n")
    return folder


def write_tiny_model(path: Path, family: str = "sd1", seed: int = 0) -> Path:
    return save_bundle(tiny_bundle(family, seed), path)


# --- running `python -m sdlab.train.cli` in a subprocess -------------------------------------------------

CLI_RES = 16  # pixels; the tiny VAE halves it, so the U-Net sees 8x8 latents


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    return env


def cli_args(out: Path, model: Path, data: Path, *extra: str) -> list[str]:
    return ["-m", "sdlab.train.cli", "--model", str(model), "--data-dir", str(data), "--output-dir", str(out),
            "--resolution", str(CLI_RES), "--no-progress", "--num-workers", "1", "--device", "cpu", *extra]


def run_cli(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], env=cli_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def max_weight_diff(a: Path, b: Path) -> float:
    """Largest absolute difference between two safetensors files with the same keys (empty marker tensors
    such as `v_pred` count as equal)."""
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    return max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta if ta[k].numel())


def run_in_process(out: Path, model: Path, data: Path, *extra: str):
    """The same run as `run_cli(cli_args(...))`, in this process (no interpreter start-up); returns the
    `RunResult`. Set one torch thread (the ``one_thread`` fixture) to match the subprocess runs."""
    import argparse

    from sdlab.train.cli import run_from_config
    from sdlab.train.config import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return run_from_config(config_from_args(parser.parse_args(cli_args(out, model, data, *extra)[2:])))
