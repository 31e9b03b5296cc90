"""Whole `sdlab txt2img` against diffusers' StableDiffusionPipeline on the same SD1.5-size random weights.

Every measurement is a fresh process, so start-up, loading and generation are all counted, as a user
sees them; peak memory is that process's VmHWM (peak resident set). Four configurations run interleaved
(the order rotates every round, `--repeats` rounds, medians reported): sdlab with its default settings
(no flags), sdlab with `--best` flags (default `--dtype bf16`), diffusers in fp32 and diffusers in bf16. All
load the same fp16 weights, draw with DPM++ 2M Karras (diffusers: DPMSolverMultistep with Karras sigmas),
CFG 7 with a negative prompt, the same seed (diffusers is handed sdlab's float32 draw of it as `latents`: its
own half-precision draw depends on the torch version). `--device cuda` draws on the GPU (peak memory is then
the process's host memory only). Printed: times, ratios to diffusers fp32, and each picture's
pixel difference (max and mean over RGB, 0-255) from diffusers fp32's.

The second part decodes one 2048x2048 picture (a 256x256 latent) with each VAE alone: sdlab's default
(tiled above 1024x1024 pixels) against diffusers' `enable_tiling()` (its untiled decoder would need
tens of GB on CPU for the mid-block attention over 65,536 tokens), both with 512 px tiles. Reported: wall
time and the memory the decode needs beyond the loaded weights (peak RSS during the decode, counted from
a reset after loading, minus RSS after loading).

    python benchmarks/bench_txt2img.py --workdir /tmp/bench --size 512 --steps 20 --repeats 1
    python benchmarks/bench_txt2img.py --steps 4 --best "--dtype bf16 --compile" --skip-decode
    python benchmarks/bench_txt2img.py --device cuda --steps 50 --best "--dtype fp16 --compile" --skip-decode \
        --only "sdlab default" "sdlab best" "diffusers bf16"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry, lowres"

MEMORY = textwrap.dedent("""
    import resource

    def cpu_seconds():
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def memory(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) / 2**20  # GiB
""")

SDLAB_RUN = MEMORY + textwrap.dedent("""
    import json, sys, time
    from sdlab.cli import main
    start = time.perf_counter()
    code = main(sys.argv[1:])
    print(json.dumps({"code": code, "seconds": time.perf_counter() - start, "cpu_s": cpu_seconds(), "peak_gib": memory("VmHWM")}))
""")

DIFFUSERS_RUN = MEMORY + textwrap.dedent("""
    import json, sys, time
    start = time.perf_counter()
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    folder, out, size, steps, seed, dtype, device = sys.argv[1:8]
    size, steps, seed = int(size), int(steps), int(seed)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None, local_files_only=True).to(device)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    pipe.set_progress_bar_config(disable=True)
    # sdlab's initial noise (float32 draw, cast; `initial_noise` written out, so that this process times diffusers
    # without importing sdlab): diffusers' own half-precision draw depends on the torch version
    side = size // pipe.vae_scale_factor
    latents = torch.randn((1, pipe.unet.config.in_channels, side, side), generator=torch.Generator("cpu").manual_seed(seed))
    image = pipe(%r, negative_prompt=%r, num_inference_steps=steps, guidance_scale=7.0, height=size, width=size,
                 latents=latents.to(device, dtype)).images[0]
    image.save(out)
    print(json.dumps({"code": 0, "seconds": time.perf_counter() - start, "cpu_s": cpu_seconds(), "peak_gib": memory("VmHWM")}))
""" % (PROMPT, NEGATIVE))

DECODE_RUN = MEMORY + textwrap.dedent("""
    import json, sys, time
    import torch
    which, source, side = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.manual_seed(0)
    z = torch.randn(1, 4, side // 8, side // 8)
    if which == "sdlab":
        from sdlab.api import load
        from sdlab.pipeline.generate import decode_latents
        bundle = load(source).bundle
        decode = lambda: decode_latents(bundle, z)
    else:
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch.float32, local_files_only=True)
        vae.enable_tiling()
        # the tile size comes from the folder's sample_size (the test fixture writes 64 px); use the 512 px
        # (64-latent) tiles of the released SD1.5 VAE config, the size sdlab tiles with
        vae.tile_sample_min_size, vae.tile_latent_min_size = 512, 64
        decode = lambda: vae.decode(z / vae.config.scaling_factor).sample
    load_peak = memory("VmHWM")
    open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current RSS: the decode's own peak
    loaded = memory("VmRSS")
    start, cpu_start = time.perf_counter(), cpu_seconds()
    with torch.no_grad():
        image = decode()
    seconds = time.perf_counter() - start
    assert image.shape[-1] == side and torch.isfinite(image).all()
    print(json.dumps({"code": 0, "seconds": seconds, "cpu_s": cpu_seconds() - cpu_start, "peak_gib": max(load_peak, memory("VmHWM")), "beyond_weights_gib": memory("VmHWM") - loaded}))
""")


def run_json(command: list[str]) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"benchmark step failed: {' '.join(command[:4])}...\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def prepare(workdir: Path) -> tuple[Path, Path]:
    """SD1.5-size random weights (fp16) as an original single file and as a diffusers folder."""
    single, folder = workdir / "sd15-random.safetensors", workdir / "sd15-random-diffusers"
    if single.exists() and (folder / "model_index.json").exists():
        return single, folder
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from bundle_fixtures import write_diffusers_folder

    from sdlab.checkpoints.create import new_bundle
    from sdlab.checkpoints.save import save_bundle

    workdir.mkdir(parents=True, exist_ok=True)
    bundle = new_bundle("sd1", seed=0)
    for module in (bundle.unet, bundle.vae, *(te.model for te in bundle.text_encoders)):
        module.to(torch.float16)
    save_bundle(bundle, single)
    write_diffusers_folder(bundle, folder)
    return single, folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sdlab-bench"))
    parser.add_argument("--device", default="cpu", help="where both draw (the decode part runs on the CPU)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the four configurations (medians)")
    parser.add_argument("--best", default="--dtype bf16", help='sdlab flags of the "best" run (default: %(default)s)')
    parser.add_argument("--only", nargs="+", choices=CHOICES, default=list(CONFIGS), help="configurations to run")
    parser.add_argument("--decode-size", type=int, default=2048)
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--skip-txt2img", action="store_true")
    args = parser.parse_args()

    started = time.perf_counter()
    single, folder = prepare(args.workdir)
    print(f"weights ready in {time.perf_counter() - started:.0f} s: {single}, {folder}")

    if not args.skip_txt2img:
        txt2img(args, single, folder)
    if not args.skip_decode:
        decode(args.decode_size, single, folder)


CONFIGS = ("sdlab default", "sdlab best", "diffusers fp32", "diffusers bf16")  # run by default
CHOICES = (*CONFIGS, "diffusers fp16")                                        # fp16: for GPUs


def txt2img_command(config: str, args: argparse.Namespace, single: Path, folder: Path, out: Path) -> list[str]:
    if config.startswith("sdlab"):
        flags = [] if config == "sdlab default" else shlex.split(args.best)
        return [sys.executable, "-c", SDLAB_RUN, "txt2img", PROMPT, "--negative", NEGATIVE, "--model", str(single),
                "--steps", str(args.steps), "--width", str(args.size), "--height", str(args.size), "--seed", "1",
                "--cfg", "7", "--sampler", "DPM++ 2M", "--schedule", "karras", "--device", args.device, *flags,
                "--no-progress", "--out", str(out)]
    dtype = config.split()[-1]
    return [sys.executable, "-c", DIFFUSERS_RUN, str(folder), str(out), str(args.size), str(args.steps), "1", dtype,
            args.device]


def pixel_difference(a: Path, b: Path) -> tuple[int, float]:
    """(max, mean) absolute difference of two pictures' RGB values, 0-255."""
    import numpy as np
    from PIL import Image

    pa, pb = (np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in (a, b))
    diff = np.abs(pa - pb)
    return int(diff.max()), float(diff.mean())


def picture_path(args: argparse.Namespace, config: str) -> Path:
    return args.workdir / f"{config.replace(' ', '-')}-{args.size}px-{args.steps}steps.png"


def txt2img(args: argparse.Namespace, single: Path, folder: Path) -> None:
    configs = list(args.only)
    outs = {c: picture_path(args, c) for c in configs}
    results: dict[str, list[dict]] = {c: [] for c in configs}
    loads = [os.getloadavg()[0]]
    for round_ in range(args.repeats):
        shift = round_ % len(configs)
        for config in configs[shift:] + configs[:shift]:
            results[config].append(run_json(txt2img_command(config, args, single, folder, outs[config])))
            loads.append(os.getloadavg()[0])
            print(f"  round {round_ + 1} {config}: {results[config][-1]['seconds']:.1f} s", flush=True)
    median = {c: {k: statistics.median(r[k] for r in results[c]) for k in ("seconds", "cpu_s", "peak_gib")} for c in configs}
    reference = "diffusers fp32" if "diffusers fp32" in configs else configs[0]
    # pixels are compared with diffusers fp32's picture, also one left in --workdir by an earlier run
    picture = picture_path(args, "diffusers fp32")
    picture_ref = "diffusers fp32" if picture.exists() else reference
    picture = picture if picture.exists() else outs[reference]
    print(f"\ntxt2img {args.size}x{args.size}, {args.steps} steps DPM++ 2M Karras, CFG 7 + negative, whole process, "
          f"median of {args.repeats}; best = {args.best!r}; load average {min(loads):.2f}-{max(loads):.2f} "
          f"on {os.cpu_count()} CPUs:")
    print(f"  {'':15} {'wall s':>8} {'CPU s':>8} {'peak GiB':>9} {'wall / ' + reference:>22} {'pixels vs ' + picture_ref + ' (max, mean)':>38}")
    for c in configs:
        m, ref = median[c], median[reference]
        most, mean = pixel_difference(outs[c], picture)
        print(f"  {c:15} {m['seconds']:8.1f} {m['cpu_s']:8.1f} {m['peak_gib']:9.2f} {m['seconds'] / ref['seconds']:22.3f} "
              f"{most:>30d}, {mean:6.2f}")
    for ours in ("sdlab default", "sdlab best"):
        if ours in configs and "diffusers bf16" in configs:
            print(f"  {ours} / diffusers bf16: {median[ours]['seconds'] / median['diffusers bf16']['seconds']:.3f}")


def decode(side: int, single: Path, folder: Path) -> None:
    ours = run_json([sys.executable, "-c", DECODE_RUN, "sdlab", str(single), str(side)])
    theirs = run_json([sys.executable, "-c", DECODE_RUN, "diffusers", str(folder), str(side)])
    print(f"\nVAE decode alone, {side}x{side} (sdlab tiled by default; diffusers with enable_tiling()):")
    print(f"  {'':10} {'wall s':>8} {'CPU s':>8} {'beyond weights GiB':>19} {'peak GiB':>9}")
    for name, r in (("sdlab", ours), ("diffusers", theirs)):
        print(f"  {name:10} {r['seconds']:8.1f} {r['cpu_s']:8.1f} {r['beyond_weights_gib']:19.2f} {r['peak_gib']:9.2f}")
    print(f"  ratio sdlab/diffusers: wall {ours['seconds'] / theirs['seconds']:.2f}, CPU {ours['cpu_s'] / theirs['cpu_s']:.2f}, "
          f"memory beyond weights {ours['beyond_weights_gib'] / theirs['beyond_weights_gib']:.2f}")


if __name__ == "__main__":
    main()
