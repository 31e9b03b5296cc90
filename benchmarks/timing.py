"""What the benchmarks share: their `--threads` option, timing settings against each other, and the shipped
model's pictures drawn with each setting (their time and how far each moves the picture).

Timing alternates the settings, the order flipping every round, so that load from other processes hits them alike;
each setting's time is the median wall time and the median CPU time of the process (all threads; it moves less than
wall time when other processes share the cores). Run a benchmark as `python benchmarks/bench_NAME.py`: this module
is beside it on `sys.path`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np
import torch


def parse_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The command line read by `parser` with `--threads` added; a number of threads given is torch's from now."""
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def alternating(settings: Sequence[Hashable], rounds: int, measure: Callable[[Any], Any],
                warm_up: bool = True) -> tuple[dict[Any, tuple[float, float]], dict[Any, Any]]:
    """`measure(setting)` for each setting, `rounds` rounds (after one uncounted round with `warm_up`), the order
    flipping every round: setting -> (median wall seconds, median CPU seconds), and setting -> its last result."""
    walls: dict[Any, list[float]] = {setting: [] for setting in settings}
    cpus: dict[Any, list[float]] = {setting: [] for setting in settings}
    results: dict[Any, Any] = {}
    for round_ in range(rounds + warm_up):
        for setting in (settings if round_ % 2 == 0 else settings[::-1]):
            start, cpu_start = time.perf_counter(), time.process_time()
            results[setting] = measure(setting)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            if round_ >= warm_up:
                walls[setting].append(wall)
                cpus[setting].append(cpu)
    medians = {setting: (statistics.median(walls[setting]), statistics.median(cpus[setting])) for setting in settings}
    return medians, results


def picture_rows(settings: Sequence[Hashable], draw: Callable[[Any], Any],
                 rounds: int) -> dict[Any, tuple[float, float, float, float]]:
    """setting -> (largest, mean per-pixel difference to the first setting's picture out of 255, median wall
    seconds, median CPU seconds) of `draw(setting)` (a PIL picture): drawn once with the last setting to warm up
    (kernels, caches, the text encoder's memo), then `rounds` rounds, the settings alternating."""
    draw(settings[-1])
    times, drawn = alternating(settings, rounds, lambda setting: np.asarray(draw(setting)).astype(np.int16),
                               warm_up=False)
    base = drawn[settings[0]]
    return {setting: (float(np.abs(drawn[setting] - base).max()), float(np.abs(drawn[setting] - base).mean()),
                      *times[setting]) for setting in settings}


def print_picture_rows(column: str, rows: dict[str, tuple[float, float, float, float]]) -> None:
    """`picture_rows` as a table whose first column, `column`, names each row; the speed-up is the first row's wall
    time over the row's."""
    width = len(column)
    print(f"{column:>{width}} {'max px diff':>11} {'mean px diff':>12} {'wall s':>7} {'cpu s':>7} {'speed-up':>9}")
    base_wall = next(iter(rows.values()))[2]
    for name, (largest, mean, wall, cpu) in rows.items():
        print(f"{name:>{width}} {largest:11.0f} {mean:12.2f} {wall:7.2f} {cpu:7.2f} {base_wall / wall:8.2f}x")
