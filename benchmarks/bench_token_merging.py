"""Token merging (A1111's Token merging ratio, `sdlab.models.token_merging`): one SD 1.5-size guided U-Net step at
each ratio, and how far merging moves the step's output and a drawn picture.

    python benchmarks/bench_token_merging.py                         # 512 px, fp32 and bf16, ratios 0 and 0.5
    python benchmarks/bench_token_merging.py --size 768 --ratios 0 0.3 0.5 --runs 5
    python benchmarks/bench_token_merging.py --dtypes bf16 --no-picture
    python benchmarks/bench_token_merging.py --no-steps --picture-size 256 --picture-steps 4 --rounds 5

Step: batch 2 (one latent twice, as guidance passes it; two 77 x 768 contexts), random weights (PyTorch's
initialisation, seed 0), inside one `reusing_generation_work()` scope as a generation's steps run. Time: median of
`--runs` forwards after one warm-up, the ratios alternating (the order flips every run) so that load from other
processes hits them alike. Output difference: max |out_r - out_0| / max |out_0| and the relative RMS of the step's
output (random weights: the U-Net's own numbers, no picture). Picture difference (`--no-picture` skips it): the
shipped model (sdlab-tiny) draws one prompt at `--picture-size` with each ratio, same seed; the largest and mean
per-pixel difference of the uint8 pictures against ratio 0, and the drawing's time: one warm-up drawing, then
`--rounds` rounds with the ratios alternating (the order flips every round), the median wall time and the median
CPU time of the process (all threads; it moves less than wall time when other processes share the cores). Numbers
on a shared machine are noisy: repeat before trusting a few per cent.
"""

from __future__ import annotations

import argparse

import torch
from timing import alternating, parse_args, picture_rows, print_picture_rows

from sdlab.models.generation_memo import reusing_generation_work
from sdlab.models.token_merging import TokenMerging, merging_tokens
from sdlab.models.unet import UNet, UNetConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def step_times(dtype: torch.dtype, size: int, ratios: list[float],
               runs: int) -> dict[float, tuple[float, float, torch.Tensor]]:
    """ratio -> (median wall seconds, median CPU seconds of one guided step, its output in fp32)."""
    torch.manual_seed(0)
    unet = UNet(UNetConfig()).to(dtype).eval()
    side = size // 8
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, side, side, generator=gen).expand(2, -1, -1, -1).contiguous()
    t = torch.tensor([500.0, 500.0])
    context = torch.randn(2, 77, 768, generator=gen)

    def step(ratio: float) -> torch.Tensor:
        with merging_tokens(unet, TokenMerging(ratio)):
            return unet(x, t, context)                    # (2, 4, side, side)

    with torch.inference_mode(), reusing_generation_work():
        times, outputs = alternating(ratios, runs, step)
    return {ratio: (*times[ratio], outputs[ratio].float()) for ratio in ratios}


def picture_differences(size: int, ratios: list[float], dtype: str, steps: int | None,
                        rounds: int) -> dict[float, tuple[float, float, float, float]]:
    """ratio -> (largest, mean per-pixel difference to ratio 0 out of 255, median wall seconds, median CPU seconds)
    of the shipped model's picture, drawn once to warm up and then `rounds` times a ratio, the ratios alternating."""
    import sdlab

    pipe = sdlab.load(dtype=dtype)
    options = {"seed": 7, "width": size, "height": size, **({"steps": steps} if steps else {})}

    def draw(ratio: float):
        return pipe.txt2img("a red fox in a snowy forest", token_merging_ratio=ratio, **options).images[0]

    return picture_rows(ratios, draw, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="picture side in pixels (latent: size / 8)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-steps", action="store_true", help="skip the SD1.5-size U-Net steps")
    parser.add_argument("--no-picture", action="store_true", help="skip the shipped model's pictures")
    parser.add_argument("--picture-size", type=int, default=None, help="the pictures' side (default: --size)")
    parser.add_argument("--picture-steps", type=int, default=None, help="the pictures' steps (default: the model's)")
    parser.add_argument("--rounds", type=int, default=3, help="timed pictures a ratio (median), after a warm-up")
    args = parse_args(parser)
    ratios = sorted(set([0.0, *args.ratios]))
    if not args.no_steps:
        print(f"SD1.5 U-Net, {args.size} px ({args.size // 8}^2 latent), guided step (batch 2), "
              f"{torch.get_num_threads()} threads, median of {args.runs}")
        print(f"{'dtype':6} {'ratio':>5} {'step ms':>9} {'cpu ms':>9} {'speed-up':>9} {'max diff':>9} {'rms diff':>9}")
        for name in args.dtypes:
            results = step_times(DTYPES[name], args.size, ratios, args.runs)
            base_time, _, base = results[0.0]
            for ratio in ratios:
                seconds, cpu, out = results[ratio]
                scale = base.abs().max()
                rms = ((out - base).square().mean().sqrt() / base.square().mean().sqrt()).item()
                print(f"{name:6} {ratio:5.2f} {seconds * 1e3:9.0f} {cpu * 1e3:9.0f} {base_time / seconds:8.2f}x "
                      f"{((out - base).abs().max() / scale).item():9.4f} {rms:9.4f}")
    if not args.no_picture:
        size = args.picture_size or args.size
        steps = f"{args.picture_steps} steps" if args.picture_steps else "its default steps"
        print(f"\nshipped model (sdlab-tiny), {size} px, {steps} and sampler, seed 7, {torch.get_num_threads()} "
              f"threads, one warm-up drawing, median of {args.rounds} interleaved rounds:")
        pictures = picture_differences(size, ratios, "fp32", args.picture_steps, args.rounds)
        print_picture_rows("ratio", {f"{ratio:.2f}": row for ratio, row in pictures.items()})


if __name__ == "__main__":
    main()
