"""sdlab's AMX tile products (`kernels/cpu_patch_product.cpp`) against oneDNN, same inputs, same process,
interleaved: the feed-forward's GEGLU (against oneDNN's pair of fused products, `cpu_linear`'s fallback)
and 3x3 convolutions (against `F.conv2d`), with each one's error against an fp64 reference, and whether
sdlab's selection rule (`cpu_linear._geglu_on_tiles`, `patch_conv._on_tiles`) takes the kernel there.

    python benchmarks/bench_tile_products.py                 # SD1.5 / SDXL shapes, all threads
    python benchmarks/bench_tile_products.py --runs 11 --only geglu

Time: the smaller of two medians of `--runs` calls, the two implementations alternating, each call on one of
three weights in turn (so a weight is not still in cache from the call before, as in a U-Net step). Needs a
CPU with AMX and a C++ compiler (the kernels are built on first use).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sdlab.models import cpu_kernels, cpu_linear, patch_conv
from sdlab.utils.allocator import tune

GEGLU_SHAPES = (  # (tokens with guidance, channels, inner)
    (8192, 320, 1280), (2048, 640, 2560), (512, 1280, 5120), (128, 1280, 5120),   # SD1.5 at 512 px
    (8192, 640, 2560), (2048, 1280, 5120),                                        # SDXL at 1024 px
)
CONV_SHAPES = (  # (batch, C_in, side, C_out)
    (2, 1280, 8, 1280), (2, 2560, 8, 1280), (2, 1280, 16, 1280), (2, 2560, 16, 1280),   # taken
    (2, 640, 32, 640), (2, 1280, 32, 1280),                                           # oneDNN's
)
WEIGHTS = 3


def timed(calls: dict, runs: int) -> dict[str, float]:
    """Smaller of two medians (ms) of `runs` calls per implementation, alternating."""
    for call in calls.values():
        call()
    best = {}
    for _ in range(2):
        times = {name: [] for name in calls}
        for _ in range(runs):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
        for name, t in times.items():
            best[name] = min(best.get(name, float("inf")), statistics.median(t) * 1e3)
    return best


def geglu_rows(module, runs: int) -> None:
    print("GEGLU (tokens x C -> 2 x inner): oneDNN's pair of fused products / sdlab's tiles, ms; error vs fp64")
    for rows, channels, inner in GEGLU_SHAPES:
        g = torch.Generator().manual_seed(rows + channels)
        x = torch.randn(rows, channels, generator=g).bfloat16()
        layers = [torch.nn.Linear(channels, 2 * inner).bfloat16().requires_grad_(False) for _ in range(WEIGHTS)]
        turn = iter(range(1 << 30))

        def onednn(layer=None):
            layer = layer or layers[next(turn) % WEIGHTS]
            return cpu_linear.onednn_geglu(x, layer.weight, layer.bias)

        def tiles(layer=None):
            layer = layer or layers[next(turn) % WEIGHTS]
            return module.geglu_bf16(x, layer.weight, layer.bias)

        with torch.inference_mode():
            a, gate = F.linear(x.double(), layers[0].weight.double(), layers[0].bias.double()).chunk(2, dim=-1)
            exact = a * F.gelu(gate)
            errors = [(f(layers[0]).double() - exact).abs().mean().item() for f in (onednn, tiles)]
            t = timed({"onednn": onednn, "tiles": tiles}, runs)
            taken = cpu_linear._geglu_on_tiles(x, layers[0])
        print(f"  {rows:5d} x {channels:4d} -> 2 x {inner:4d}: {t['onednn']:8.2f} / {t['tiles']:8.2f} "
              f"= {t['tiles'] / t['onednn']:.2f}   error {errors[0]:.2e} / {errors[1]:.2e}   "
              f"{'taken' if taken else 'oneDNN'}")


def conv_rows(module, runs: int) -> None:
    print("3x3 convolution (batch, C_in, side -> C_out): oneDNN / sdlab's tiles, ms; error vs fp64")
    for batch, c_in, side, c_out in CONV_SHAPES:
        g = torch.Generator().manual_seed(c_in + side)
        x = torch.randn(batch, c_in, side, side, generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
        weights = [(torch.randn(c_out, c_in, 3, 3, generator=g) / (9 * c_in) ** 0.5).bfloat16()
                   .contiguous(memory_format=torch.channels_last) for _ in range(WEIGHTS)]
        bias = torch.randn(c_out, generator=g).bfloat16()
        turn = iter(range(1 << 30))

        def onednn(w=None):
            return F.conv2d(x, weights[next(turn) % WEIGHTS] if w is None else w, bias, padding=1)

        def tiles(w=None):
            w = weights[next(turn) % WEIGHTS] if w is None else w
            return module.patch_product_bf16(x, w.permute(0, 2, 3, 1).reshape(c_out, -1), bias, 3, 1, 1).permute(0, 3, 1, 2)

        with torch.inference_mode():
            exact = F.conv2d(x.double(), weights[0].double(), bias.double(), padding=1)
            errors = [(f(weights[0]).double() - exact).abs().mean().item() for f in (onednn, tiles)]
            t = timed({"onednn": onednn, "tiles": tiles}, runs)
            taken = patch_conv._on_tiles(x, weights[0], bias, 1, 1)
        print(f"  ({batch}, {c_in:4d}, {side:2d}) -> {c_out:4d}: {t['onednn']:8.2f} / {t['tiles']:8.2f} "
              f"= {t['tiles'] / t['onednn']:.2f}   error {errors[0]:.2e} / {errors[1]:.2e}   "
              f"{'taken' if taken else 'oneDNN'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="calls per median (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--only", choices=("geglu", "conv"), help="one of the two tables")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tune()  # sdlab's allocator settings, as in its own processes
    module = cpu_kernels.tile_kernels() if cpu_kernels.runs_here() else None
    if module is None:
        raise SystemExit("bench_tile_products: sdlab's tile kernels need a CPU with AMX (and a C++ compiler)")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.runs} runs per median")
    if args.only != "conv":
        geglu_rows(module, args.runs)
    if args.only != "geglu":
        conv_rows(module, args.runs)


if __name__ == "__main__":
    main()
