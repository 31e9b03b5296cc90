"""Shared helpers for the training tests: tiny captioned datasets and tiny checkpoints on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

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
