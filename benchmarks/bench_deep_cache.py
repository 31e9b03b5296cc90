"""DeepCache (`sdlab.models.deep_cache`): what a shallow U-Net call costs against a whole one on an SD 1.5-size U-Net,
what that makes of a run of steps, and what the cache does to a drawn picture's time and pixels.

    python benchmarks/bench_deep_cache.py                       # 512 px bf16 U-Net calls; the shipped model's pictures
    python benchmarks/bench_deep_cache.py --dtype fp32 --size 256 --branches 0 3 --runs 5
    python benchmarks/bench_deep_cache.py --no-calls --intervals 2 3 5 --rounds 5 --picture-steps 20
    python benchmarks/bench_deep_cache.py --no-calls --no-picture --runs-at 256 --run-steps 10 --rounds 2

U-Net calls: batch 2 (one latent twice, as guidance passes it; two 77 x 768 contexts), random weights (PyTorch's
initialisation, seed 0), inside one `reusing_generation_work()` scope as a generation's steps run. A whole call keeps
its features (`DeepFeature`), then each branch's shallow call runs on them; the whole call and the shallow ones
alternate (the order flips every run) so that load from other processes hits them alike; median of `--runs` after one
warm-up, wall and process CPU time. A run of S steps at interval N makes ceil(S / N) whole calls and the rest shallow,
so its U-Net time against plain is (W + (S - W) * shallow / whole) / S with W = ceil(S / N): the "run speed-up" column.
`--runs-at PX` also times such runs: `--run-steps` guided calls at PX, each output moving the latent, the slots from
`DeepCacheRun` as a generation's model takes them, each interval against off, alternating, median of `--rounds`.

Pictures (`--no-picture` skips them): the shipped model (sdlab-tiny) draws one prompt at `--picture-size` with each
interval (branch `--picture-branch`) and without DeepCache, same seed: one warm-up drawing, then `--rounds` rounds with
the settings alternating (the order flips every round), the median wall and process CPU time (all threads; it moves
less than wall time when other processes share the cores), and the largest and mean per-pixel difference of the uint8
picture against the plain one. Numbers on a shared machine are noisy: the load average is printed; repeat before
trusting a few per cent.
"""

from __future__ import annotations

import argparse
import math
import os

import torch
from timing import alternating, parse_args, picture_rows, print_picture_rows

from sdlab.models.deep_cache import DeepCache, DeepFeature
from sdlab.models.generation_memo import reusing_generation_work
from sdlab.models.unet import UNet, UNetConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROMPT = "a red fox in a snowy forest"


def call_times(dtype: torch.dtype, size: int, branches: list[int],
               runs: int) -> dict[int | None, tuple[float, float, torch.Tensor]]:
    """None (the whole call) or a branch -> (median wall seconds, median CPU seconds, its output in fp32)."""
    torch.manual_seed(0)
    unet = UNet(UNetConfig()).to(dtype).eval()
    cfg = unet.cfg
    side = size // 8
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, side, side, generator=gen).expand(2, -1, -1, -1).contiguous()
    t = torch.tensor([500.0, 500.0])
    context = torch.randn(2, 77, 768, generator=gen)
    blocks = {branch: DeepCache(2, branch).skip_block(cfg.num_res_blocks, len(cfg.channel_mult)) for branch in branches}
    with torch.inference_mode(), reusing_generation_work():
        kept = {}
        for branch, block in blocks.items():            # the features each branch reuses, from one whole call
            slot = DeepFeature(block)
            unet(x, t, context, deep_cache=slot)
            kept[branch] = slot.feature

        def call(kind: int | None) -> torch.Tensor:
            slot = None if kind is None else DeepFeature(blocks[kind], kept[kind])
            return unet(x, t, context, deep_cache=slot)     # (2, 4, side, side)

        times, outputs = alternating([None, *branches], runs, call)
    return {kind: (*times[kind], outputs[kind].float()) for kind in times}


def run_times(dtype: torch.dtype, size: int, steps: int, intervals: list[int], branch: int,
              rounds: int) -> dict[int, tuple[float, float]]:
    """interval (1: off) -> (median wall s, median CPU s) of `steps` guided U-Net calls as a sampler makes them (one
    a step, the latent moved by each output), through `DeepCacheRun` as a generation's model runs them."""
    from sdlab.models.deep_cache import DeepCacheRun

    torch.manual_seed(0)
    unet = UNet(UNetConfig()).to(dtype).eval()
    cfg = unet.cfg
    side = size // 8
    gen = torch.Generator().manual_seed(1)
    start_x = torch.randn(1, 4, side, side, generator=gen).to(dtype)
    context = torch.randn(2, 77, 768, generator=gen)

    def steps_run(interval: int) -> None:
        setting = DeepCache(interval, branch)
        run = DeepCacheRun(setting, setting.skip_block(cfg.num_res_blocks, len(cfg.channel_mult)))
        x = start_x
        for step in range(steps):
            t = torch.full((2,), 999.0 * (1 - step / steps))
            slot = run.slot(step, 2)
            out = unet(x.expand(2, -1, -1, -1), t, context, deep_cache=slot)   # (2, 4, side, side)
            run.keep(slot)
            x = x - 0.05 * out[:1]

    with torch.inference_mode(), reusing_generation_work():
        return alternating([1, *intervals], rounds, steps_run)[0]


def run_speed_up(steps: int, interval: int, shallow_over_whole: float) -> float:
    """A run of `steps` steps at `interval`: plain U-Net time over DeepCache's (whole calls ceil(steps / interval))."""
    whole = math.ceil(steps / interval)
    return steps / (whole + (steps - whole) * shallow_over_whole)


def pictures(size: int, intervals: list[int], branch: int, steps: int | None,
             rounds: int) -> dict[int, tuple[float, float, float, float]]:
    """interval (1: off) -> (largest, mean per-pixel difference to off out of 255, median wall s, median CPU s)."""
    import sdlab

    pipe = sdlab.load(dtype="fp32")
    options = {"seed": 7, "width": size, "height": size, **({"steps": steps} if steps else {})}

    def draw(interval: int):
        setting = None if interval == 1 else DeepCache(interval, branch)
        return pipe.txt2img(PROMPT, deep_cache=setting, **options).images[0]

    return picture_rows([1, *intervals], draw, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="the U-Net calls' picture side (latent: size / 8)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--branches", type=int, nargs="+", default=[0, 3], help="shallow branches timed")
    parser.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 5])
    parser.add_argument("--run-steps", type=int, default=20, help="the run the call times are turned into")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-calls", action="store_true", help="skip the SD1.5-size U-Net calls")
    parser.add_argument("--runs-at", type=int, default=None, metavar="PX",
                        help="also time whole runs of --run-steps guided SD1.5-size U-Net calls at this size, branch "
                             "--picture-branch, each interval against off (--rounds rounds after a warm-up one)")
    parser.add_argument("--no-picture", action="store_true", help="skip the shipped model's pictures")
    parser.add_argument("--picture-size", type=int, default=None, help="the pictures' side (default: the model's)")
    parser.add_argument("--picture-steps", type=int, default=None, help="the pictures' steps (default: the model's)")
    parser.add_argument("--picture-branch", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3, help="timed pictures a setting (median), after a warm-up")
    args = parse_args(parser)
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if not args.no_calls:
        print(f"SD1.5 U-Net, {args.size} px ({args.size // 8}^2 latent), {args.dtype}, guided call (batch 2), "
              f"{torch.get_num_threads()} threads, median of {args.runs}")
        results = call_times(DTYPES[args.dtype], args.size, args.branches, args.runs)
        whole_time, whole_cpu, whole = results[None]
        print(f"{'call':>10} {'wall ms':>9} {'cpu ms':>9} {'of whole':>9}  "
              + " ".join(f"{f'run x (N={n})':>12}" for n in args.intervals))
        print(f"{'whole':>10} {whole_time * 1e3:9.0f} {whole_cpu * 1e3:9.0f} {1.0:9.3f}")
        for branch in args.branches:
            seconds, cpu, out = results[branch]
            share = seconds / whole_time
            ups = " ".join(f"{run_speed_up(args.run_steps, n, share):11.2f}x" for n in args.intervals)
            same = (out - whole).abs().max().item()
            print(f"{f'branch {branch}':>10} {seconds * 1e3:9.0f} {cpu * 1e3:9.0f} {share:9.3f}  {ups}"
                  f"   (on its own features: max |diff| {same:.2g})")
        print(f"run x: a {args.run_steps}-step run's U-Net time, plain over DeepCache, from these call times")
    if args.runs_at:
        print(f"\nSD1.5 U-Net runs: {args.run_steps} guided calls at {args.runs_at} px, {args.dtype}, branch "
              f"{args.picture_branch}, one warm-up round, median of {args.rounds} interleaved rounds:")
        print(f"{'interval':>8} {'wall s':>8} {'cpu s':>8} {'speed-up':>9}")
        runs = run_times(DTYPES[args.dtype], args.runs_at, args.run_steps, args.intervals, args.picture_branch,
                         args.rounds)
        for interval, (wall, cpu) in runs.items():
            name = "off" if interval == 1 else str(interval)
            print(f"{name:>8} {wall:8.2f} {cpu:8.2f} {runs[1][0] / wall:8.2f}x")
    if not args.no_picture:
        size = f"{args.picture_size} px" if args.picture_size else "its native size"
        steps = f"{args.picture_steps} steps" if args.picture_steps else "its default steps"
        print(f"\nshipped model (sdlab-tiny, fp32), {size}, {steps} and sampler, seed 7, branch {args.picture_branch}, "
              f"{torch.get_num_threads()} threads, one warm-up drawing, median of {args.rounds} interleaved rounds:")
        drawn = pictures(args.picture_size, args.intervals, args.picture_branch, args.picture_steps, args.rounds)
        print_picture_rows("interval", {"off" if interval == 1 else str(interval): row
                                        for interval, row in drawn.items()})
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
