"""Perturbed-attention guidance's cost (`sdlab.pipeline.perturbed_attention`): one SD 1.5-shaped U-Net call with CFG
alone ([uncond, cond], batch 2), with CFG and PAG on the middle block ([uncond, cond, perturbed], batch 3, the
perturbed row's middle self-attention the identity) and a plain batch of 3, for comparison.

    python benchmarks/bench_pag.py                                   # 32x32 latents (256 px), fp32 and bf16
    python benchmarks/bench_pag.py --side 64 --dtypes bf16 --runs 3  # 512 px

Random weights (PyTorch's initialisation, seed 0), one thread. Time: the thread's CPU time (`time.thread_time`, so
other processes' load does not count), best of `--runs` calls after one warm-up, the three calls interleaved (the
order flips every run). Ratios are against the CFG-only call.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from sdlab.families.sd1 import SD1_UNET
from sdlab.models.unet import UNet

MIDDLE = ["middle_block.1.transformer_blocks.0.attn1"]          # diffusers' "mid" on SD1.5: its one self-attention


def calls(unet: UNet, side: int, dtype: torch.dtype) -> dict[str, Callable[[], torch.Tensor]]:
    x = torch.randn(1, 4, side, side, dtype=dtype)                # (1, 4, side, side), the latent each row sees
    ctx = torch.randn(3, 77, 768, dtype=dtype)                    # (3, 77, 768): uncond, cond, another text
    t = torch.tensor(500.0)
    perturbed = torch.tensor([False, False, True])
    return {
        "CFG [u, c] (batch 2)": lambda: unet(x.repeat(2, 1, 1, 1), t.expand(2), ctx[:2]),
        "CFG + PAG [u, c, p] (batch 3)": lambda: unet(x.repeat(3, 1, 1, 1), t.expand(3),
                                                      torch.cat([ctx[:2], ctx[1:2]]), identity_rows=perturbed,
                                                      identity_layers=MIDDLE),
        "plain batch 3": lambda: unet(x.repeat(3, 1, 1, 1), t.expand(3), ctx),
    }


def best_cpu_times(named: dict[str, Callable[[], torch.Tensor]], runs: int) -> dict[str, float]:
    best = dict.fromkeys(named, float("inf"))
    names = list(named)
    for f in named.values():                                      # warm-up (bf16: builds sdlab's kernels once)
        f()
    for i in range(runs):
        for name in names if i % 2 == 0 else names[::-1]:
            start = time.thread_time()
            named[name]()
            best[name] = min(best[name], time.thread_time() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=32, help="latent side (32: 256 px, 64: 512 px)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for dtype_name in args.dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        torch.manual_seed(0)
        unet = UNet(SD1_UNET).to(dtype).eval()
        with torch.no_grad():
            best = best_cpu_times(calls(unet, args.side, dtype), args.runs)
        base = next(iter(best.values()))
        for name, seconds in best.items():
            print(f"{args.side}x{args.side} {dtype_name} {name}: {seconds:.2f} s CPU ({seconds / base:.2f}x)",
                  flush=True)


if __name__ == "__main__":
    main()
