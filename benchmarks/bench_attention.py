"""One bf16 self-attention call: sdlab's CPU kernel (`sdlab.models.cpu_attention`) against PyTorch's
`scaled_dot_product_attention`, same inputs, same process, interleaved; with each one's error against an
fp64 reference.

    python benchmarks/bench_attention.py                   # SD1.5 / SDXL head shapes, one thread
    python benchmarks/bench_attention.py --threads 2 --runs 7

Inputs are (batch 2, tokens, heads x width) as the U-Net's projections give them. Time: best of `--runs`
calls after one warm-up, by thread CPU time with one thread (steadier on a shared machine) and by wall time
with more. Needs a CPU with AVX512-BF16 and a C++ compiler (the kernel is built on first use).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from sdlab.models import cpu_attention

SHAPES = (  # (heads, tokens, width)
    (8, 4096, 40),    # SD1.5 at 64 x 64 latents
    (8, 1024, 80),    # SD1.5 at 32 x 32
    (5, 4096, 64),    # SDXL-like heads
    (10, 1024, 64),
    (8, 1024, 160),
)


def pytorch_attention(q, k, v, heads):
    split = [x.unflatten(-1, (heads, -1)).transpose(1, 2) for x in (q, k, v)]  # (B, H, N, d)
    return F.scaled_dot_product_attention(*split).transpose(1, 2).flatten(2)  # (B, N, C)


def best_times(calls: dict, runs: int, clock) -> dict[str, float]:
    """Best seconds of each call over `runs` rounds after a warm-up; the order flips every round."""
    best = {name: float("inf") for name in calls}
    names = list(calls)
    for call in calls.values():
        call()
    for i in range(runs):
        for name in names if i % 2 == 0 else names[::-1]:
            start = clock()
            calls[name]()
            best[name] = min(best[name], clock() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not cpu_attention.runs_here() or cpu_attention.extension() is None:
        raise SystemExit("sdlab's CPU attention kernel is not available here (no AVX512-BF16 or no compiler)")
    print(f"sdlab's kernel here: {'AMX tiles' if cpu_attention.extension().uses_amx() else 'AVX512-BF16'} "
          f"products; the U-Net uses it: {'yes' if cpu_attention.enabled() and cpu_attention._wins(cpu_attention.extension()) else 'no'}")
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    print(f"torch {torch.__version__}, {args.threads} thread(s), best of {args.runs}, "
          f"{'thread CPU' if args.threads == 1 else 'wall'} time; error = max / mean abs against fp64")
    print("heads x tokens x width | PyTorch ms (error) | sdlab ms (error) | ratio")
    g = torch.Generator().manual_seed(0)
    for heads, tokens, width in SHAPES:
        q, k, v = (torch.randn(2, tokens, heads * width, generator=g).bfloat16() for _ in range(3))
        exact = pytorch_attention(q.double(), k.double(), v.double(), heads)
        calls = {"pytorch": lambda: pytorch_attention(q, k, v, heads),
                 "sdlab": lambda: cpu_attention.attention(q, k, v, heads)}
        errors = {name: (call().double() - exact).abs() for name, call in calls.items()}
        times = best_times(calls, args.runs, clock)
        results = {name: (times[name] * 1000, errors[name].max().item(), errors[name].mean().item()) for name in calls}
        (t_p, max_p, mean_p), (t_s, max_s, mean_s) = results["pytorch"], results["sdlab"]
        print(f"{heads} x {tokens} x {width} | {t_p:.0f} ({max_p:.1e} / {mean_p:.1e}) | "
              f"{t_s:.0f} ({max_s:.1e} / {mean_s:.1e}) | {t_s / t_p:.2f}")


if __name__ == "__main__":
    main()
