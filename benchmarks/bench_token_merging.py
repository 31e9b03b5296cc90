"""Token merging (A1111's Token merging ratio, `sdlab.models.token_merging`): one SD 1.5-size guided U-Net step at
each ratio, and how far merging moves the step's output and a drawn picture.

    python benchmarks/bench_token_merging.py                         # 512 px, fp32 and bf16, ratios 0 and 0.5
    python benchmarks/bench_token_merging.py --size 768 --ratios 0 0.3 0.5 --runs 5
    python benchmarks/bench_token_merging.py --dtypes bf16 --no-picture

Step: batch 2 (one latent twice, as guidance passes it; two 77 x 768 contexts), random weights (PyTorch's
initialisation, seed 0), inside one `reusing_generation_work()` scope as a generation's steps run. Time: median of
`--runs` forwards after one warm-up, the ratios alternating (the order flips every run) so that load from other
processes hits them alike. Output difference: max |out_r - out_0| / max |out_0| and the relative RMS of the step's
output (random weights: the U-Net's own numbers, no picture). Picture difference (`--no-picture` skips it): the
shipped model (sdlab-tiny) draws one prompt at `--size` with each ratio, same seed; the largest and mean per-pixel
difference of the uint8 pictures against ratio 0, and the drawing's wall time. Numbers on a shared machine are
noisy: repeat before trusting a few per cent.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from sdlab.models.generation_memo import reusing_generation_work
from sdlab.models.token_merging import TokenMerging, merging_tokens
from sdlab.models.unet import UNet, UNetConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def step_times(dtype: torch.dtype, size: int, ratios: list[float], runs: int) -> dict[float, tuple[float, torch.Tensor]]:
    """ratio -> (median seconds of one guided step, its output in fp32)."""
    torch.manual_seed(0)
    unet = UNet(UNetConfig()).to(dtype).eval()
    side = size // 8
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, side, side, generator=gen).expand(2, -1, -1, -1).contiguous()
    t = torch.tensor([500.0, 500.0])
    context = torch.randn(2, 77, 768, generator=gen)
    times: dict[float, list[float]] = {ratio: [] for ratio in ratios}
    outputs: dict[float, torch.Tensor] = {}
    with torch.inference_mode(), reusing_generation_work():
        for run in range(runs + 1):
            for ratio in (ratios if run % 2 == 0 else ratios[::-1]):
                with merging_tokens(unet, TokenMerging(ratio)):
                    start = time.perf_counter()
                    out = unet(x, t, context)
                    elapsed = time.perf_counter() - start
                if run:                                   # run 0 warms up
                    times[ratio].append(elapsed)
                outputs[ratio] = out.float()
    return {ratio: (statistics.median(times[ratio]), outputs[ratio]) for ratio in ratios}


def picture_differences(size: int, ratios: list[float], dtype: str) -> dict[float, tuple[float, float, float]]:
    """ratio -> (largest, mean per-pixel difference to ratio 0 out of 255, seconds) of the shipped model's picture."""
    import sdlab

    pipe = sdlab.load(dtype=dtype)
    pictures, seconds = {}, {}
    for ratio in [0.0, *[r for r in ratios if r]]:
        start = time.perf_counter()
        result = pipe.txt2img("a red fox in a snowy forest", seed=7, width=size, height=size,
                              token_merging_ratio=ratio)
        seconds[ratio] = time.perf_counter() - start
        pictures[ratio] = np.asarray(result.images[0]).astype(np.int16)
    return {ratio: (float(np.abs(pictures[ratio] - pictures[0.0]).max()),
                    float(np.abs(pictures[ratio] - pictures[0.0]).mean()), seconds[ratio]) for ratio in pictures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="picture side in pixels (latent: size / 8)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's)")
    parser.add_argument("--no-picture", action="store_true", help="skip the shipped model's pictures")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ratios = sorted(set([0.0, *args.ratios]))
    print(f"SD1.5 U-Net, {args.size} px ({args.size // 8}^2 latent), guided step (batch 2), "
          f"{torch.get_num_threads()} threads, median of {args.runs}")
    print(f"{'dtype':6} {'ratio':>5} {'step ms':>9} {'speed-up':>9} {'max diff':>9} {'rms diff':>9}")
    for name in args.dtypes:
        results = step_times(DTYPES[name], args.size, ratios, args.runs)
        base_time, base = results[0.0]
        for ratio in ratios:
            seconds, out = results[ratio]
            scale = base.abs().max()
            rms = ((out - base).square().mean().sqrt() / base.square().mean().sqrt()).item()
            print(f"{name:6} {ratio:5.2f} {seconds * 1e3:9.0f} {base_time / seconds:8.2f}x "
                  f"{((out - base).abs().max() / scale).item():9.4f} {rms:9.4f}")
    if not args.no_picture:
        print(f"\nshipped model (sdlab-tiny), {args.size} px, its default steps and sampler, seed 7:")
        print(f"{'ratio':>5} {'max px diff':>11} {'mean px diff':>12} {'draw s':>7}")
        for ratio, (largest, mean, seconds) in picture_differences(args.size, ratios, "fp32").items():
            print(f"{ratio:5.2f} {largest:11.0f} {mean:12.2f} {seconds:7.2f}")


if __name__ == "__main__":
    main()
