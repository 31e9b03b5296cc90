"""One bf16 attention call: sdlab's CPU kernel (`sdlab.models.cpu_attention`) against PyTorch's
`scaled_dot_product_attention`, same inputs, same process, interleaved; with each one's error against an
fp64 reference.

    python benchmarks/bench_attention.py                   # SD1.5 / SDXL head shapes, one thread
    python benchmarks/bench_attention.py --threads 2 --runs 7

Inputs are (batch 2, tokens, heads x width) as the U-Net's projections give them: self-attention, and
cross-attention over a 77-token prompt. Time: best of `--runs`
calls after one warm-up, by thread CPU time with one thread (steadier on a shared machine) and by wall time
with more. Needs a CPU with AVX512-BF16 and a C++ compiler (the kernel is built on first use).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from sdlab.models import cpu_attention

SHAPES = (  # (heads, query tokens, key tokens, width)
    (8, 4096, 4096, 40),    # SD1.5 at 64 x 64 latents
    (8, 1024, 1024, 80),    # SD1.5 at 32 x 32
    (5, 4096, 4096, 64),    # SDXL-like heads
    (10, 1024, 1024, 64),
    (8, 1024, 1024, 160),
    (8, 4096, 77, 40),      # SD1.5's cross-attention at 64 x 64 latents
    (8, 1024, 77, 80),
    (10, 4096, 77, 64),     # SDXL's at 64 x 64
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
    module = cpu_attention.extension() if cpu_attention.runs_here() else None
    if module is None:
        raise SystemExit("sdlab's CPU attention kernel is not available here (no AVX512-BF16 or no compiler)")
    tiles = module.uses_amx()
    used = {keys: cpu_attention.enabled() and cpu_attention.beats_pytorch(module, keys)
            for keys in (cpu_attention.MIN_TOKENS, 77)}
    print(f"sdlab's kernel here: {'AMX tiles' if tiles else 'AVX512-BF16'} products; the U-Net uses it: "
          f"{'yes' if used[cpu_attention.MIN_TOKENS] else 'no'} (self-attention), "
          f"{'yes' if used[77] else 'no'} (cross-attention on 77 keys)")
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    print(f"torch {torch.__version__}, {args.threads} thread(s), best of {args.runs}, "
          f"{'thread CPU' if args.threads == 1 else 'wall'} time; error = max / mean abs against fp64")
    names = ["pytorch", "sdlab"] + (["sdlab avx512-bf16"] if tiles else [])
    print("heads x queries x keys x width | " + " | ".join(
        f"{name} ms (error) | ratio" if name != "pytorch" else "pytorch ms (error)" for name in names))
    g = torch.Generator().manual_seed(0)
    for heads, queries, keys, width in SHAPES:
        q = torch.randn(2, queries, heads * width, generator=g).bfloat16()
        k, v = (torch.randn(2, keys, heads * width, generator=g).bfloat16() for _ in range(2))
        exact = pytorch_attention(q.double(), k.double(), v.double(), heads)
        scale2 = cpu_attention.exp2_scale(width)
        calls = {"pytorch": lambda: pytorch_attention(q, k, v, heads),
                 "sdlab": lambda: module.flash_attention_bf16(q, k, v, heads, scale2, True),
                 "sdlab avx512-bf16": lambda: module.flash_attention_bf16(q, k, v, heads, scale2, False)}
        calls = {name: calls[name] for name in names}
        errors = {name: (call().double() - exact).abs() for name, call in calls.items()}
        times = best_times(calls, args.runs, clock)
        cells = [f"{times[name] * 1000:.0f} ({errors[name].max().item():.1e} / {errors[name].mean().item():.1e})"
                 + ("" if name == "pytorch" else f" | {times[name] / times['pytorch']:.2f}") for name in names]
        print(f"{heads} x {queries} x {keys} x {width} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
