"""Run prompts x seeds through a generator, score every image, aggregate, write report.json + grid.png.

The generator is passed in (`generate_fn(prompt, seed) -> PIL.Image`), so this layer knows nothing
about pipelines. Splits: "emoji", "shape_seen" (the (shape, colour) pair is in training) and
"shape_held_out" (one of `HELD_OUT_SHAPE_COLOURS`). Every score is also pooled per phrasing family
("template phrasing/...": the prompt is word for word a caption template; "free phrasing/...": anything
else, `captions.phrasing_family`), so the gap between them is visible, and the background is scored per
named colour ("background=<colour>"). Words of a prompt the grammar does not know are ignored (and listed
in the report), as the model is meant to ignore them. Diversity is the mean over prompts of the mean
pairwise absolute pixel difference (0..1) between the images of different seeds.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sdlab.tiny.datasets.captions import phrasing_family, read_prompt
from sdlab.tiny.datasets.shapes import is_held_out
from sdlab.tiny.evaluation.scoring import score_image
from sdlab.utils.files import atomic_write

__all__ = ["BACKGROUND_TARGET", "TARGETS", "evaluate", "read_prompt_file", "render_grid", "summarise"]

logger = logging.getLogger(__name__)

#: (split, attribute) -> minimum accuracy the shipped model must reach; "any" pools every image that states it
TARGETS: dict[str, float] = {
    "any/background": 0.90,
    "template phrasing/background": 0.90,
    "free phrasing/background": 0.90,
    "emoji/top1": 0.60,
    "emoji/top5": 0.85,
    "shape_seen/shape": 0.85,
    "shape_seen/colour": 0.85,
    "shape_seen/size": 0.80,
    "shape_seen/position": 0.80,
    "shape_held_out/shape": 0.70,
    "shape_held_out/colour": 0.70,
    "shape_held_out/size": 0.60,
    "shape_held_out/position": 0.60,
}
#: the background target holds for every named colour ("background=<colour>")
BACKGROUND_TARGET = 0.90
CELL = 128  # grid cell side in pixels
LABEL_WIDTH = 240


def read_prompt_file(path: str | os.PathLike[str]) -> list[str]:
    """Prompts of a file: one a line; blank lines and lines starting with '#' are skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _split(spec) -> str:
    if spec.kind == "emoji":
        return "emoji"
    return "shape_held_out" if is_held_out(spec.subject, spec.colour) else "shape_seen"


def _diversity(images: Sequence[Image.Image]) -> float | None:
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255 for im in images]
    pairs = [float(np.abs(a - b).mean()) for a, b in itertools.combinations(arrays, 2) if a.shape == b.shape]
    return float(np.mean(pairs)) if pairs else None


def summarise(records: list[dict[str, object]]) -> dict[str, object]:
    """Accuracy per split and attribute (pooled over splits as "any/<attribute>", per phrasing family as
    "<family> phrasing/<attribute>", and the background per stated colour as "background=<colour>"), with counts."""
    tallies: dict[str, list[bool]] = {}
    for record in records:
        family = record.get("family", "template")
        for image in record["images"]:
            for attribute, ok in image["correct"].items():
                tallies.setdefault(f"{record['split']}/{attribute}", []).append(ok)
                tallies.setdefault(f"any/{attribute}", []).append(ok)
                tallies.setdefault(f"{family} phrasing/{attribute}", []).append(ok)
                if attribute == "background":
                    tallies.setdefault(f"background={record['spec']['background']}", []).append(ok)
    accuracy = {key: float(np.mean(values)) for key, values in sorted(tallies.items())}
    counts = {key: len(values) for key, values in sorted(tallies.items())}
    goals = TARGETS | {key: BACKGROUND_TARGET for key in accuracy if key.startswith("background=")}
    targets = {
        key: {"target": target, "accuracy": accuracy.get(key), "met": accuracy.get(key, -1.0) >= target}
        for key, target in goals.items()
        if key in accuracy
    }
    diversities = [r["diversity"] for r in records if r["diversity"] is not None]
    return {
        "accuracy": accuracy,
        "counts": counts,
        "targets": targets,
        "diversity": float(np.mean(diversities)) if diversities else None,
    }


def _label_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _wrap(text: str, width: int, draw: ImageDraw.ImageDraw, font) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def render_grid(prompts: Sequence[str], images: Sequence[Sequence[Image.Image]]) -> Image.Image:
    """One row per prompt: the prompt (wrapped, Pillow's default font), then one cell per seed."""
    columns = max((len(row) for row in images), default=0)
    grid = Image.new("RGB", (LABEL_WIDTH + columns * CELL, max(1, len(prompts)) * CELL), "white")
    draw = ImageDraw.Draw(grid)
    font = _label_font()
    for row, (prompt, row_images) in enumerate(zip(prompts, images)):
        top = row * CELL
        for line_index, line in enumerate(_wrap(prompt, LABEL_WIDTH - 8, draw, font)):
            draw.text((4, top + 4 + 12 * line_index), line, fill="black", font=font)
        for column, image in enumerate(row_images):
            cell = image.convert("RGB").resize((CELL, CELL), Image.Resampling.NEAREST)
            grid.paste(cell, (LABEL_WIDTH + column * CELL, top))
    return grid


def evaluate(
    generate_fn: Callable[[str, int], Image.Image],
    prompts: list[str],
    seeds: list[int],
    out_dir: str | os.PathLike[str],
) -> dict[str, object]:
    """Generate every (prompt, seed), score it, write `report.json` and `grid.png`; return the report.

    Every prompt must name a subject (`read_prompt`); a prompt that does not raises ValueError before any
    generation starts. Words it does not know are ignored and listed in the record ("ignored_words").
    """
    readings = [read_prompt(prompt) for prompt in prompts]
    records: list[dict[str, object]] = []
    grid_images: list[list[Image.Image]] = []
    for prompt, (spec, ignored) in zip(prompts, readings):
        images, scored = [], []
        for seed in seeds:
            image = generate_fn(prompt, seed)
            images.append(image)
            scored.append({"seed": seed, **score_image(image, spec)})
        logger.info("scored %r", prompt)
        grid_images.append(images)
        records.append(
            {
                "prompt": prompt,
                "spec": asdict(spec),
                "split": _split(spec),
                "family": phrasing_family(prompt),
                "ignored_words": ignored,
                "images": scored,
                "diversity": _diversity(images),
            }
        )
    report = {"summary": summarise(records), "seeds": list(seeds), "prompts": records}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2)
    atomic_write(out / "report.json", lambda p: p.write_text(text, encoding="utf-8"))
    grid = render_grid(prompts, grid_images)
    atomic_write(out / "grid.png", lambda p: grid.save(p, format="PNG"))
    return report
