"""Sampler overhead per step, outside the model: sdlab's sigma-space samplers vs diffusers' scheduler loop.

Both sides run the same trivial "model" (one multiply, ``x * 0.5``) on a (2, 4, 64, 64) latent, so what is
timed is the sampler's own work per step: sigma bookkeeping, the update arithmetic and, for ancestral
samplers, drawing the per-image noise. diffusers' loop is what its pipelines run per step:
``scale_model_input``, the model, ``step`` (with a per-image generator list where it takes one). The two
alternate (benchmarks/timing.py), one warm-up round, then the median of ``--repeats``.

Usage: ``python benchmarks/bench_samplers.py [--steps 50] [--repeats 7] [--threads N]``
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from timing import alternating, parse_args

from sdlab.diffusion import sampling_k as K
from sdlab.diffusion.noise import generators_for, per_image_noise

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from sampler_harness import sd_scheduler_config  # noqa: E402  (the SD 1.x scheduler settings the parity tests use)

SHAPE = (2, 4, 64, 64)
SEEDS = (1, 2)

# name -> (sdlab sampler, diffusers scheduler class name, extra scheduler config, scheduler in VP scaling)
CASES = {
    "Euler": (K.sample_euler, "EulerDiscreteScheduler", {}, False),
    "Euler a": (K.sample_euler_ancestral, "EulerAncestralDiscreteScheduler", {}, False),
    "DPM++ 2M": (K.sample_dpmpp_2m, "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, True),
}


def bench(name: str, steps: int, repeats: int) -> tuple[float, float]:
    import diffusers

    sampler, cls_name, extra, vp = CASES[name]
    scheduler = getattr(diffusers, cls_name)(**sd_scheduler_config(), **extra)
    scheduler.set_timesteps(steps)
    sigmas = torch.unique_consecutive(scheduler.sigmas)
    unit = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    scale = math.sqrt(1 + float(sigmas[0]) ** 2) if vp else float(scheduler.init_noise_sigma)

    def run_sdlab():
        x = unit * scale
        noise = per_image_noise(generators_for(SEEDS), x)
        return sampler(lambda x, sigma: x * 0.5, x, sigmas, noise=noise)

    def run_diffusers():
        scheduler.set_timesteps(steps)
        gens = generators_for(SEEDS)
        x = unit * scheduler.init_noise_sigma
        kwargs = {"generator": gens} if "generator" in scheduler.step.__code__.co_varnames else {}
        for t in scheduler.timesteps:
            model_output = scheduler.scale_model_input(x, t) * 0.5
            x = scheduler.step(model_output, t, x, **kwargs).prev_sample
        return x

    with torch.no_grad():
        times, _ = alternating(["sdlab", "diffusers"], repeats,
                               lambda side: run_sdlab() if side == "sdlab" else run_diffusers())
    return times["sdlab"][0] / steps, times["diffusers"][0] / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    args = parse_args(parser)
    print(f"latent {SHAPE}, {args.steps} steps, median of {args.repeats}, torch threads {torch.get_num_threads()}")
    print(f"{'sampler':<10} {'sdlab us/step':>14} {'diffusers us/step':>18} {'diffusers/sdlab':>16}")
    for name in CASES:
        ours, theirs = bench(name, args.steps, args.repeats)
        print(f"{name:<10} {ours * 1e6:>14.1f} {theirs * 1e6:>18.1f} {theirs / ours:>16.2f}")


if __name__ == "__main__":
    main()
