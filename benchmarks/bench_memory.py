"""Peak memory of a whole txt2img process against the size of the weights: sdlab and diffusers.

For each family (SD1.5 at 512 px, SDXL at 1024 px) random full-size weights are written once as fp16
(an original single file for sdlab, a diffusers folder for diffusers) and each case runs in a fresh
process: load, encode the prompt, `--steps` guided U-Net steps (CFG 7 with a negative prompt, so every
step runs a batch of 2), VAE decode, save. The peak is the process's `ru_maxrss` (peak resident set).
One or two steps give the same peak as fifty: every step needs the same memory and frees it again.

"weights MB" is the size of the weights in the run's dtype (the fp16 file's size for bf16 / fp16 runs,
twice that for fp32); "ratio" is peak RSS / weights MB. What is above the weights is the Python and
torch runtime (~0.4 GB), the activations of one U-Net step and the VAE decode of one picture.

    python benchmarks/bench_memory.py --workdir /tmp/sdlab-mem --families sd1 sdxl --steps 1
    python benchmarks/bench_memory.py --families sd1 --dtype fp32 --diffusers

Cases run one after another (never side by side), so each peak is that process's own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry, lowres"
SIZES = {"sd1": 512, "sdxl": 1024}

PEAK = textwrap.dedent("""
    import resource
    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux
""")

SDLAB_RUN = PEAK + textwrap.dedent("""
    import json, sys, time
    from sdlab.cli import main
    start = time.perf_counter()
    code = main(sys.argv[1:])
    print(json.dumps({"code": code, "seconds": time.perf_counter() - start, "peak_mb": peak_mb()}))
""")

DIFFUSERS_RUN = PEAK + textwrap.dedent("""
    import json, sys, time
    start = time.perf_counter()
    import torch
    import diffusers
    folder, out, size, steps, dtype = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    index = json.load(open(folder + "/model_index.json"))
    cls = getattr(diffusers, index["_class_name"])
    extra = {} if "XL" in index["_class_name"] else {"safety_checker": None}
    pipe = cls.from_pretrained(folder, torch_dtype=dtype, local_files_only=True, **extra)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        image = pipe(%r, negative_prompt=%r, num_inference_steps=steps, guidance_scale=7.0, height=size,
                     width=size, generator=torch.Generator("cpu").manual_seed(1)).images[0]
    image.save(out)
    print(json.dumps({"code": 0, "seconds": time.perf_counter() - start, "peak_mb": peak_mb()}))
""" % (PROMPT, NEGATIVE))


def prepare(workdir: Path, family: str, diffusers: bool) -> tuple[Path, Path]:
    """Full-size random weights of `family` as fp16: an original single file (written one tensor at a time,
    so even SDXL never holds more than one tensor) and, with `diffusers`, a diffusers folder (built with
    fp16 as torch's default dtype: about twice the weights in memory while it is written)."""
    single, folder = workdir / f"{family}-random-fp16.safetensors", workdir / f"{family}-random-fp16-diffusers"
    workdir.mkdir(parents=True, exist_ok=True)
    if not single.exists():
        write_random_single_file(family, single)
    if diffusers and not (folder / "model_index.json").exists():
        import torch

        sys.path.insert(0, str(ROOT / "tests"))
        from bundle_fixtures import write_diffusers_folder

        from sdlab.checkpoints.create import new_bundle

        torch.set_default_dtype(torch.float16)
        try:
            write_diffusers_folder(new_bundle(family, seed=0), folder)
        finally:
            torch.set_default_dtype(torch.float32)
    return single, folder


def write_random_single_file(family: str, path: Path) -> None:
    """The family's full-size original layout with seeded random fp16 weights (norm scales 1, the rest
    N(0, 0.02)) and sdlab's metadata, streamed to `path` (temp file, then rename)."""
    import torch

    from sdlab.checkpoints.create import new_bundle
    from sdlab.checkpoints.file_format import bundle_metadata
    from sdlab.checkpoints.io import _safetensors_header
    from sdlab.checkpoints.save import bundle_state_dict

    meta = new_bundle(family, device="meta")                       # configs and keys, no memory
    layout = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in bundle_state_dict(meta).items()}
    header, order = _safetensors_header(layout, bundle_metadata(meta))
    generator = torch.Generator().manual_seed(0)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(header)
        for key in order:
            spec = layout[key]
            if not spec.is_floating_point():
                t = torch.zeros(spec.shape, dtype=spec.dtype)
            elif spec.dim() == 1 and key.endswith(".weight"):
                t = torch.ones(spec.shape, dtype=spec.dtype)              # GroupNorm / LayerNorm scales
            else:
                t = (torch.randn(spec.shape, generator=generator) * 0.02).to(spec.dtype)
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    tmp.rename(path)


def run_json(command: list[str]) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"benchmark step failed: {' '.join(command[:4])}...\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def sdlab_case(single: Path, out: Path, size: int, steps: int, dtype: str) -> dict:
    return run_json([sys.executable, "-c", SDLAB_RUN, "txt2img", PROMPT, "--negative", NEGATIVE, "--model", str(single),
                     "--steps", str(steps), "--width", str(size), "--height", str(size), "--seed", "1", "--cfg", "7",
                     "--sampler", "DPM++ 2M", "--schedule", "karras", "--dtype", dtype, "--no-progress",
                     "--out", str(out)])


def diffusers_case(folder: Path, out: Path, size: int, steps: int, dtype: str) -> dict:
    return run_json([sys.executable, "-c", DIFFUSERS_RUN, str(folder), str(out), str(size), str(steps), dtype])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sdlab-mem"))
    parser.add_argument("--families", nargs="+", choices=sorted(SIZES), default=["sd1", "sdxl"])
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="bf16")
    parser.add_argument("--diffusers", nargs="*", choices=sorted(SIZES), default=["sd1"],
                        help="families to run diffusers on too (SDXL's diffusers folder takes ~14 GB to write)")
    parser.add_argument("--prepare-only", action="store_true")
    args = parser.parse_args()

    rows = []
    for family in args.families:
        started = time.perf_counter()
        single, folder = prepare(args.workdir, family, diffusers=family in args.diffusers)
        print(f"{family}: weights ready in {time.perf_counter() - started:.0f} s", flush=True)
        if args.prepare_only:
            continue
        size = SIZES[family]
        weights_mb = single.stat().st_size / 2**20 * (2 if args.dtype == "fp32" else 1)
        result = sdlab_case(single, args.workdir / f"{family}-sdlab.png", size, args.steps, args.dtype)
        rows.append(("sdlab", family, size, weights_mb, result))
        print(f"  sdlab {family}: {result}", flush=True)
        if family in args.diffusers:
            result = diffusers_case(folder, args.workdir / f"{family}-diffusers.png", size, args.steps, args.dtype)
            rows.append(("diffusers", family, size, weights_mb, result))
            print(f"  diffusers {family}: {result}", flush=True)

    if rows:
        print(f"\ntxt2img peak RSS, {args.dtype}, {args.steps} step(s), CFG 7 + negative prompt, fp16 files:")
        print(f"  {'':10} {'model':6} {'px':>5} {'weights MB':>11} {'peak RSS MB':>12} {'ratio':>6} {'wall s':>7}")
        for name, family, size, weights_mb, r in rows:
            print(f"  {name:10} {family:6} {size:5d} {weights_mb:11.0f} {r['peak_mb']:12.0f} "
                  f"{r['peak_mb'] / weights_mb:6.2f} {r['seconds']:7.1f}")


if __name__ == "__main__":
    main()
