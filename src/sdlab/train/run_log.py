"""Run logs: a CSV of per-step metrics and a loss-curve PNG drawn with Pillow.

The CSV (``<output_dir>/log.csv``) has one row per logged step; on resume, rows after the resumed step
(written by the interrupted run after its last checkpoint) are dropped, so the file always describes one
consistent history.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from sdlab.utils.files import atomic_write

__all__ = ["CSVLog", "RUN_LOG_COLUMNS", "draw_loss_curve", "read_log", "is_run_log"]

RUN_LOG_COLUMNS = ("step", "loss", "lr", "grad_norm", "images_per_s", "epoch", "time")
"""The columns of a training run's log.csv, its header line."""


def is_run_log(path: Path) -> bool:
    """Whether ``path`` is the log.csv of a training run: a file whose header line is `RUN_LOG_COLUMNS`."""
    try:
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            return f.readline(200).rstrip("\r\n") == ",".join(RUN_LOG_COLUMNS)
    except OSError:                                     # not a file, or unreadable
        return False


class CSVLog:
    """Append-only CSV with a fixed set of columns (``step`` first); new metric names become new columns
    only if they were known when the file was created, the others are dropped."""

    def __init__(self, path: Path, columns: Sequence[str], resume_step: int | None = None):
        self.path = Path(path)
        self.columns = ["step", *[c for c in columns if c != "step"]]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file() and resume_step is not None:
            rows = [r for r in read_log(self.path) if int(float(r["step"])) <= resume_step]
            existing = list(rows[0].keys()) if rows else self.columns
            self.columns = existing if "step" in existing else self.columns
            self._rewrite(rows)
        elif not self.path.is_file() or resume_step is None:
            self._rewrite([])

    def _rewrite(self, rows: list[dict[str, str]]) -> None:
        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)

        atomic_write(self.path, write)

    def append(self, row: dict[str, float | int | str]) -> None:
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore").writerow(row)


def read_log(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def draw_loss_curve(steps: Sequence[float], losses: Sequence[float], path: Path, *, size: tuple[int, int] = (800, 450),
                    log_scale: bool = True, title: str = "training loss") -> Path:
    """A PNG of loss against step: raw values in light grey, a moving average in blue, axes with min / max
    labels; the y axis is logarithmic when every loss is positive and ``log_scale``."""
    width, height = size
    margin_l, margin_r, margin_t, margin_b = 70, 20, 30, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((margin_l, 8), title, fill="black")
    points = [(float(s), float(v)) for s, v in zip(steps, losses) if math.isfinite(float(v))]
    if points:
        use_log = log_scale and all(v > 0 for _, v in points)
        ys = [math.log10(v) if use_log else v for _, v in points]
        xs = [s for s, _ in points]
        x0, x1 = min(xs), max(xs)
        y0, y1 = min(ys), max(ys)
        if x1 == x0:
            x1 = x0 + 1
        if y1 == y0:
            y0, y1 = y0 - 0.5, y1 + 0.5

        def to_px(x: float, y: float) -> tuple[float, float]:
            px = margin_l + (x - x0) / (x1 - x0) * (width - margin_l - margin_r)
            py = height - margin_b - (y - y0) / (y1 - y0) * (height - margin_t - margin_b)
            return px, py

        draw.rectangle([margin_l, margin_t, width - margin_r, height - margin_b], outline="black")
        raw = [to_px(x, y) for x, y in zip(xs, ys)]
        smooth = [to_px(x, y) for x, y in zip(xs, _smooth(ys, max(1, len(ys) // 50)))]
        if len(raw) > 1:
            draw.line(raw, fill=(200, 200, 200), width=1)
            draw.line(smooth, fill=(31, 119, 180), width=2)
        else:
            draw.ellipse([raw[0][0] - 2, raw[0][1] - 2, raw[0][0] + 2, raw[0][1] + 2], fill=(31, 119, 180))

        def label(y: float) -> str:
            return f"{10 ** y:.3g}" if use_log else f"{y:.3g}"

        draw.text((4, margin_t - 6), label(y1), fill="black")
        draw.text((4, height - margin_b - 6), label(y0), fill="black")
        draw.text((margin_l, height - margin_b + 6), f"{x0:g}", fill="black")
        draw.text((width - margin_r - 40, height - margin_b + 6), f"{x1:g}", fill="black")
        draw.text((width // 2 - 15, height - margin_b + 6), "step", fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    return path
