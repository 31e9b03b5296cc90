"""The canny preprocessor (`pipeline.preprocess.canny`) on big pictures: its time against OpenCV's cv2.Canny (the
algorithm it reproduces; when installed) on the same picture, alternating, and its peak memory (numpy's and
Pillow's allocations, by tracemalloc, in a call of its own) against the picture's bytes, and whether every pixel
is OpenCV's.

    python benchmarks/bench_canny.py                        # 2048 x 2048 and 4096 x 3072, photo and noise
    python benchmarks/bench_canny.py --sizes 1024x1024 --rounds 5

Pictures: docs/samples.png scaled to the size (bicubic), and noise blurred by 1.5 px (weak parts of many pixels,
the hysteresis's hardest case); thresholds 100 / 200 (the extension's default) and 20 / 60.
"""

from __future__ import annotations

import argparse
import tracemalloc
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from sdlab.pipeline.preprocess import canny
from timing import alternating, parse_args

SAMPLE_PHOTO = Path(__file__).resolve().parents[1] / "docs" / "samples.png"


def pictures(width: int, height: int) -> dict[str, Image.Image]:
    """The photo and the blurred noise at `width` x `height`."""
    noise = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return {"photo": Image.open(SAMPLE_PHOTO).convert("RGB").resize((width, height), Image.Resampling.BICUBIC),
            "noise": Image.fromarray(noise).filter(ImageFilter.GaussianBlur(1.5))}


def peak_bytes(picture: Image.Image, low: float, high: float) -> int:
    """The most bytes allocated at once during `canny(picture, low, high)`, above what was held before."""
    tracemalloc.start()
    try:
        canny(picture, low, high)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["2048x2048", "4096x3072"], help="WIDTHxHEIGHT")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each implementation")
    args = parse_args(parser)
    try:
        import cv2
    except ImportError:
        cv2 = None
        print("cv2 is not installed: sdlab's times alone (pip install opencv-python-headless --no-deps)")
    print(f"{'picture':>20} {'thresholds':>10} {'sdlab s':>8} {'cv2 s':>7} {'sdlab/cv2':>9} "
          f"{'peak MiB':>8} {'peak/picture':>12} {'as cv2':>6}")
    for size in args.sizes:
        width, height = map(int, size.split("x"))
        for name, picture in pictures(width, height).items():
            pixels = np.asarray(picture)                                    # (H, W, 3) uint8
            for low, high in ((100, 200), (20, 60)):
                settings = ["sdlab"] + (["cv2"] if cv2 else [])
                run = {"sdlab": lambda: np.asarray(canny(picture, low, high))[..., 0],
                       "cv2": lambda: cv2.Canny(pixels, low, high)}
                times, results = alternating(settings, args.rounds, lambda setting: run[setting]())
                peak = peak_bytes(picture, low, high)
                ours = times["sdlab"][0]
                theirs = f"{times['cv2'][0]:7.3f} {ours / times['cv2'][0]:8.1f}x" if cv2 else f"{'-':>7} {'-':>9}"
                same = str(np.array_equal(results["sdlab"], results["cv2"])) if cv2 else "-"
                print(f"{name + ' ' + size:>20} {f'{low}/{high}':>10} {ours:8.3f} {theirs} {peak / 2**20:8.0f} "
                      f"{peak / pixels.nbytes:11.2f}x {same:>6}", flush=True)


if __name__ == "__main__":
    main()
