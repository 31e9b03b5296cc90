"""One SD 1.5-size U-Net step with classifier-free guidance (batch 2 = cond + uncond, 4x64x64 latent, 77x768
context, random weights): sdlab vs diffusers, same weights, same process, interleaved runs.

    python benchmarks/bench_unet.py                       # CPU, fp32 and bf16, 3 timed runs each
    python benchmarks/bench_unet.py --device cuda --runs 20 --dtypes fp16 bf16

Time: median of `--runs` forwards after `--warmup`, sdlab and diffusers alternating (the order flips every
run) so that load from other processes hits both alike. Memory: on CPU, peak resident set size
(`getrusage` maxrss) of a fresh subprocess per (implementation, dtype) that builds only that model directly
in the dtype and runs one forward; on CUDA, `torch.cuda.max_memory_allocated` around one forward.
Numbers on a shared machine are noisy: compare the ratio, repeat before trusting a few percent.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from sdlab.checkpoints.diffusers_unet import unet_config_to_diffusers, unet_state_dict_from_diffusers
from sdlab.models.unet import UNet, UNetConfig

SD15 = UNetConfig()  # the defaults are SD 1.x
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_diffusers(dtype: torch.dtype, device: str, init: bool):
    """diffusers UNet2DConditionModel with SD 1.5 shapes; `init=False` leaves cheap random values (memory runs)."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its "cast with to()" advice is about from_pretrained loading
    if init:
        torch.manual_seed(0)
        model = UNet2DConditionModel(**_diffusers_kwargs())
        return model.to(device=device, dtype=dtype).eval()
    with torch.device("meta"):
        model = UNet2DConditionModel(**_diffusers_kwargs())
    return _materialize(model.to(dtype), device)


def build_sdlab(dtype: torch.dtype, device: str) -> UNet:
    with torch.device("meta"):
        model = UNet(SD15)
    return _materialize(model.to(dtype), device)


def sdlab_sharing_weights(diffusers_model) -> UNet:
    """sdlab U-Net whose parameters ARE the diffusers model's tensors (no copy)."""
    with torch.device("meta"):
        model = UNet(SD15)
    model.load_state_dict(unet_state_dict_from_diffusers(diffusers_model.state_dict(), SD15), assign=True)
    return model.to(memory_format=torch.channels_last).eval()  # copies only the conv weights


def _diffusers_kwargs() -> dict:
    return {k: v for k, v in unet_config_to_diffusers(SD15).items() if not k.startswith("_")}


def _materialize(model, device: str):
    model = model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.eval()


def inputs(dtype: torch.dtype, device: str, size: int):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, size, size, generator=g).to(device, dtype)
    t = torch.tensor([500.0, 500.0], device=device)
    context = torch.randn(2, 77, 768, generator=g).to(device, dtype)
    return x, t, context


def run_sdlab(model, x, t, context):
    return model(x, t, context)


def run_diffusers(model, x, t, context):
    return model(x, t, context, return_dict=False)[0]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(models: dict, args, dtype: torch.dtype) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and process CPU seconds per forward. On a shared CPU the CPU time is the steadier of the two."""
    x, t, context = inputs(dtype, args.device, args.size)
    times: dict[str, list[float]] = {name: [] for name in models}
    cpu_times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    with torch.inference_mode():
        for i in range(args.warmup + args.runs):
            for name in names if i % 2 == 0 else names[::-1]:
                model, call = models[name]
                _sync(args.device)
                start, cpu_start = time.perf_counter(), time.process_time()
                call(model, x, t, context)
                _sync(args.device)
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
                    cpu_times[name].append(time.process_time() - cpu_start)
    return times, cpu_times


def cuda_peak_memory(model, call, dtype: torch.dtype, args) -> float:
    """Extra GiB allocated during one forward (beyond the weights and inputs)."""
    x, t, context = inputs(dtype, args.device, args.size)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.inference_mode():
        call(model, x, t, context)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**30


def peak_rss_gib() -> float:
    """Peak resident set size of this process. Linux: VmHWM of the current address space, because getrusage's
    maxrss also counts the parent's memory copied before exec."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # KiB -> GiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux (bytes on macOS)


def memory_worker(impl: str, dtype_name: str, size: int) -> None:
    """Subprocess body: build one model directly in `dtype`, run one forward, print peak RSS (GiB) as JSON."""
    dtype = DTYPES[dtype_name]
    model = build_sdlab(dtype, "cpu") if impl == "sdlab" else build_diffusers(dtype, "cpu", init=False)
    call = run_sdlab if impl == "sdlab" else run_diffusers
    x, t, context = inputs(dtype, "cpu", size)
    weights = peak_rss_gib()
    with torch.inference_mode():
        call(model, x, t, context)
    print(json.dumps({"after_build_gib": weights, "peak_gib": peak_rss_gib()}))


def cpu_peak_memory(impl: str, dtype_name: str, size: int) -> dict:
    cmd = [sys.executable, __file__, "--memory-worker", impl, dtype_name, "--size", str(size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--size", type=int, default=64, help="latent side (64 = 512 px)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--no-time", action="store_true", help="skip the timing (memory only)")
    parser.add_argument("--memory-worker", nargs=2, metavar=("IMPL", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        memory_worker(*args.memory_worker, args.size)
        return

    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"batch 2 x 4x{args.size}x{args.size}, context 77x768, {args.runs} runs after {args.warmup} warm-up")
    on_cuda = args.device.startswith("cuda")
    needs_models = not args.no_time or (on_cuda and not args.no_memory)
    reference = build_diffusers(torch.float32, args.device, init=True) if needs_models else None
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        models = {}
        if reference is not None:
            diffusers_model = reference.to(dtype)  # in place; the weights' precision is irrelevant here
            models = {
                "sdlab": (sdlab_sharing_weights(diffusers_model), run_sdlab),
                "diffusers": (diffusers_model, run_diffusers),
            }
        line = f"{dtype_name}:"
        if not args.no_time:
            times, cpu_times = time_interleaved(models, args, dtype)
            ours, theirs = statistics.median(times["sdlab"]), statistics.median(times["diffusers"])
            cpu_ours, cpu_theirs = statistics.median(cpu_times["sdlab"]), statistics.median(cpu_times["diffusers"])
            line += (
                f" sdlab {ours:.3f} s, diffusers {theirs:.3f} s, sdlab/diffusers {ours / theirs:.3f} "
                f"(CPU time {cpu_ours:.2f} s vs {cpu_theirs:.2f} s, ratio {cpu_ours / cpu_theirs:.3f})"
                f"\n  all runs: sdlab {[round(s, 3) for s in times['sdlab']]}, "
                f"diffusers {[round(s, 3) for s in times['diffusers']]}"
            )
        if not args.no_memory:
            if on_cuda:
                mem = {name: cuda_peak_memory(m, call, dtype, args) for name, (m, call) in models.items()}
                line += f"\n  forward peak extra: sdlab {mem['sdlab']:.2f} GiB, diffusers {mem['diffusers']:.2f} GiB"
            else:
                mem = {name: cpu_peak_memory(name, dtype_name, args.size) for name in ("sdlab", "diffusers")}
                line += (
                    f"\n  peak RSS: sdlab {mem['sdlab']['peak_gib']:.2f} GiB "
                    f"(weights+runtime {mem['sdlab']['after_build_gib']:.2f}), "
                    f"diffusers {mem['diffusers']['peak_gib']:.2f} GiB "
                    f"(weights+runtime {mem['diffusers']['after_build_gib']:.2f})"
                )
        print(line, flush=True)
        del models


if __name__ == "__main__":
    main()
