"""sdlab against diffusers, whole txt2img generations in one process on one device (a GPU, typically).

Both load the same random weights (written once as an fp16 single file for sdlab and a diffusers folder
for diffusers' `from_pretrained`), then draw the same prompt with a negative prompt, CFG 7, DPM++ 2M Karras
(diffusers: DPMSolverMultistep with Karras sigmas) and the same initial noise (diffusers is handed sdlab's
float32 draw of the seed: its own half-precision draw differs from it on some torch versions, which would
make the pixel comparison one of two seeds); a draw is everything from the prompt
to the PIL picture (text encoding, sampling, VAE decode). Per dtype, the draws alternate between the two
(the order flips every round) after a first draw each (reported apart: cuDNN's autotuning, and with
`--compile` the compilation); times are medians. `--compile` then compiles both U-Nets in place
(`sdlab.utils.compile.compile_module`, inductor with static shapes; diffusers' U-Net also channels-last,
as its torch.compile guide does) and times the compiled pair the same way.

Printed per configuration: median seconds per draw, the ratio sdlab / diffusers, the first draw's seconds,
the weights' memory and the draw's peak memory beyond them (CUDA: `max_memory_allocated`), and the pixel
difference of sdlab's picture from diffusers' (max and mean over RGB, 0-255).

    python benchmarks/bench_pipeline.py --device cuda --model sd15 --dtypes fp16 bf16 --compile   # 512 px, 50 steps
    python benchmarks/bench_pipeline.py --device cuda --model sdxl --dtypes fp16                  # 1024 px, 30 steps
    python benchmarks/bench_pipeline.py --device cpu --model sd15 --tiny --steps 4 --runs 2       # smoke test
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry, lowres"
SEED = 1
MODELS = {"sd15": ("sd1", 512, 50), "sdxl": ("sdxl", 1024, 30)}  # family, default size, default steps
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def prepare(family: str, tiny: bool, workdir: Path, device: str) -> tuple[Path, Path]:
    """Random weights of `family` (fp16) as a single file and as a diffusers folder, made on `device`."""
    name = f"{family}{'-tiny' if tiny else ''}-random"
    single, folder = workdir / f"{name}.safetensors", workdir / f"{name}-diffusers"
    if single.exists() and (folder / "model_index.json").exists():
        return single, folder
    sys.path.insert(0, str(ROOT / "tests"))
    from bundle_fixtures import write_diffusers_folder

    from sdlab.checkpoints.create import new_bundle
    from sdlab.checkpoints.save import save_bundle

    workdir.mkdir(parents=True, exist_ok=True)
    bundle = new_bundle(family, tiny=tiny, seed=0, device=device)
    save_bundle(bundle, single, dtype=torch.float16)
    with torch.device(device):          # diffusers' and transformers' modules are built there too
        write_diffusers_folder(bundle, folder, dtype=torch.float16)
    return single, folder


class Sdlab:
    def __init__(self, single: Path, device: str, dtype: torch.dtype):
        import sdlab

        self.pipe = sdlab.load(single, device=device, dtype=dtype)

    def draw(self, size: int, steps: int):
        return self.pipe.txt2img(PROMPT, NEGATIVE, steps=steps, cfg_scale=7.0, seed=SEED, width=size, height=size,
                                 sampler="DPM++ 2M", schedule="karras").images[0]

    def compile(self) -> None:
        from sdlab.utils.compile import compile_module

        compile_module(self.pipe.bundle.unet)


class Diffusers:
    def __init__(self, folder: Path, device: str, dtype: torch.dtype):
        from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        self.pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, local_files_only=True).to(device)
        self.pipe.scheduler = DPMSolverMultistepScheduler.from_config(self.pipe.scheduler.config, use_karras_sigmas=True)
        self.pipe.set_progress_bar_config(disable=True)

    def draw(self, size: int, steps: int):
        return self.pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.0, width=size,
                         height=size, latents=self.noise(size)).images[0]

    def noise(self, size: int) -> torch.Tensor:
        """sdlab's initial noise (`initial_noise`: float32 from the seeded CPU generator, then cast)."""
        from sdlab.diffusion.noise import initial_noise

        side = size // self.pipe.vae_scale_factor
        shape = (1, self.pipe.unet.config.in_channels, side, side)
        return initial_noise(shape, [SEED], self.pipe.unet.dtype, self.pipe.device)  # (1, 4, h, w)

    def compile(self) -> None:
        from sdlab.utils.compile import compile_module

        compile_module(self.pipe.unet.to(memory_format=torch.channels_last))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def allocated(device: str) -> float:
    return torch.cuda.memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")


def timed_draw(impl, args) -> tuple[float, float, object]:
    """(seconds, peak GiB beyond what was allocated before, picture)."""
    on_cuda = args.device.startswith("cuda")
    _sync(args.device)
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    before = allocated(args.device)
    start = time.perf_counter()
    with torch.inference_mode():
        picture = impl.draw(args.size, args.steps)
    _sync(args.device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 - before if on_cuda else float("nan")
    return seconds, peak, picture


def pixel_difference(a, b) -> tuple[int, float]:
    pa, pb = (np.asarray(p.convert("RGB"), dtype=np.int16) for p in (a, b))
    diff = np.abs(pa - pb)
    return int(diff.max()), float(diff.mean())


def measure(impls: dict, args, label: str) -> dict[str, dict]:
    """First draw of each, then `args.runs` alternating rounds; medians."""
    results = {name: {"first": timed_draw(impl, args)[0], "times": [], "peaks": []} for name, impl in impls.items()}
    names = list(impls)
    for i in range(args.runs):
        for name in names if i % 2 == 0 else names[::-1]:
            seconds, peak, picture = timed_draw(impls[name], args)
            results[name]["times"].append(seconds)
            results[name]["peaks"].append(peak)
            results[name]["picture"] = picture
    for name, r in results.items():
        r["median"] = statistics.median(r["times"])
        memory = f", peak beyond weights {max(r['peaks']):.2f} GiB" if args.device.startswith("cuda") else ""
        print(f"  {label} {name:9}: median {r['median']:.3f} s ({r['median'] / args.steps * 1000:.1f} ms per step), "
              f"first draw {r['first']:.1f} s, runs {[round(s, 3) for s in r['times']]}{memory}", flush=True)
    ours, theirs = results["sdlab"], results["diffusers"]
    most, mean = pixel_difference(ours["picture"], theirs["picture"])
    print(f"  {label} sdlab / diffusers: {ours['median'] / theirs['median']:.3f}; pixels max {most}, mean {mean:.2f}",
          flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15", choices=sorted(MODELS))
    parser.add_argument("--tiny", action="store_true", help="the family's reduced-width test model (smoke test)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", nargs="+", default=["fp16"], choices=sorted(DTYPES))
    parser.add_argument("--size", type=int, help="pixels (default: 512 for sd15, 1024 for sdxl)")
    parser.add_argument("--steps", type=int, help="steps (default: 50 for sd15, 30 for sdxl)")
    parser.add_argument("--runs", type=int, default=3, help="timed rounds after the first draw")
    parser.add_argument("--compile", action="store_true", help="also time both U-Nets under torch.compile")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sdlab-bench-pipeline"))
    args = parser.parse_args()
    family, size, steps = MODELS[args.model]
    args.size, args.steps = args.size or size, args.steps or steps

    started = time.perf_counter()
    single, folder = prepare(family, args.tiny, args.workdir, args.device)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {name}; {args.model}{' tiny' if args.tiny else ''} {args.size}x{args.size}, "
          f"{args.steps} steps DPM++ 2M Karras, CFG 7 + negative; weights ready in {time.perf_counter() - started:.0f} s",
          flush=True)
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        before = allocated(args.device)
        impls = {"sdlab": Sdlab(single, args.device, dtype)}
        weights = {"sdlab": allocated(args.device) - before}
        impls["diffusers"] = Diffusers(folder, args.device, dtype)
        weights["diffusers"] = allocated(args.device) - before - weights["sdlab"]
        if args.device.startswith("cuda"):
            print(f"{dtype_name}: weights on the device: sdlab {weights['sdlab']:.2f} GiB, "
                  f"diffusers {weights['diffusers']:.2f} GiB", flush=True)
        eager = measure(impls, args, f"{dtype_name} eager")
        if args.compile:
            for impl in impls.values():
                impl.compile()
            compiled = measure(impls, args, f"{dtype_name} compiled")
            for name in impls:
                most, mean = pixel_difference(compiled[name]["picture"], eager[name]["picture"])
                print(f"  {dtype_name} {name} compiled / eager: {compiled[name]['median'] / eager[name]['median']:.3f}; "
                      f"pixels vs eager max {most}, mean {mean:.2f}", flush=True)
        del impls
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
