"""One SD 1.5-size U-Net step with classifier-free guidance (batch 2 = uncond + cond: one 4x64x64 latent twice,
as guidance passes it, and two 77x768 contexts; random weights): sdlab vs diffusers, same weights, same process,
interleaved runs. `--model sdxl`: the SDXL base U-Net at 1024 px (4x128x128 latent, 77x2048 context, pooled text and size conditioning).

    python benchmarks/bench_unet.py                       # CPU, fp32 and bf16, 3 timed runs each
    python benchmarks/bench_unet.py --device cuda --runs 20 --dtypes fp16 bf16
    python benchmarks/bench_unet.py --dtypes bf16 --compile --no-memory   # + both under torch.compile
    python benchmarks/bench_unet.py --model sdxl --dtypes bf16 --runs 1   # SDXL at 1024 px

Time: median of `--runs` forwards after `--warmup`, sdlab and diffusers alternating (the order flips every
run) so that load from other processes hits both alike. Memory: on CPU, peak resident set size
(`getrusage` maxrss) of a fresh subprocess per (implementation, dtype) that builds only that model directly
in the dtype and runs one forward; on CUDA, `torch.cuda.max_memory_allocated` around one forward.
Numbers on a shared machine are noisy: compare the ratio, repeat before trusting a few percent. The runs go
as a generation's steps do: sdlab's inside one `reusing_generation_work()` scope (the prompt's
cross-attention k and v made at the first step, `sdlab.models.generation_memo`; SD1.5 ~7 ms a CPU step). On
the CPU sdlab runs the layers before the first text context once for the two equal halves
(`sdlab.models.unet.shared_rows`; SD1.5 ~25 ms a step); the FLOP limit below counts the whole step.

FLOP limit: the step's FLOPs are counted (`torch.utils.flop_counter`; SD1.5 at 64x64 latents with guidance:
1.354 TFLOP in convolutions and linear layers plus 0.252 in attention's two matrix products) and divided by
the measured peak of one large matrix product in the dtype (`--peak-size`, best wall time of ten, after the
runs): the fastest this machine could possibly run the step; each implementation's step is printed as a
multiple of that limit. A shared machine's speed moves between phases (this one's peak between 1.8 and
2.2 TFLOP/s), so each timed round also starts with a peak of its own (best of ten), and the step is
printed against its round's limit too (the median over rounds of time x peak / FLOPs). `--compile` adds both U-Nets under
`torch.compile` (`sdlab.utils.compile.compile_module`: inductor, static shapes, its cache; diffusers' also
channels-last; compile times printed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from sdlab.checkpoints.diffusers_unet import unet_config_to_diffusers, unet_state_dict_from_diffusers
from sdlab.families.sdxl import SDXL_UNET
from sdlab.models.layers import sdxl_vector
from sdlab.models.generation_memo import reusing_generation_work
from sdlab.models.unet import UNet, UNetConfig

MODELS = {"sd15": (UNetConfig(), 64), "sdxl": (SDXL_UNET, 128)}  # U-Net config, default latent side
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_diffusers(cfg: UNetConfig, dtype: torch.dtype, device: str, init: bool):
    """diffusers UNet2DConditionModel with SD 1.5 shapes; `init=False` leaves cheap random values (memory runs)."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its "cast with to()" advice is about from_pretrained loading
    if init:
        torch.manual_seed(0)
        model = UNet2DConditionModel(**_diffusers_kwargs(cfg))
        return model.to(device=device, dtype=dtype).eval()
    with torch.device("meta"):
        model = UNet2DConditionModel(**_diffusers_kwargs(cfg))
    return _materialize(model.to(dtype), device)


def build_sdlab(cfg: UNetConfig, dtype: torch.dtype, device: str) -> UNet:
    with torch.device("meta"):
        model = UNet(cfg)
    return _materialize(model.to(dtype), device)


def sdlab_sharing_weights(cfg: UNetConfig, diffusers_model) -> UNet:
    """sdlab U-Net whose parameters ARE the diffusers model's tensors (no copy)."""
    with torch.device("meta"):
        model = UNet(cfg)
    model.load_state_dict(unet_state_dict_from_diffusers(diffusers_model.state_dict(), cfg), assign=True)
    return model.to(memory_format=torch.channels_last).eval()  # copies only the conv weights


def _diffusers_kwargs(cfg: UNetConfig) -> dict:
    return {k: v for k, v in unet_config_to_diffusers(cfg).items() if not k.startswith("_")}


def _materialize(model, device: str):
    model = model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.eval()


def inputs(cfg: UNetConfig, dtype: torch.dtype, device: str, size: int):
    """A guided step's batch (x, t, context, sizes): sizes is None, or for SDXL the pooled text embedding and
    the six size conditions, which sdlab takes as one vector y and diffusers as `added_cond_kwargs`."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, size, size, generator=g).to(device, dtype).repeat(2, 1, 1, 1)  # [x, x], as guidance
    t = torch.tensor([500.0, 500.0], device=device)
    context = torch.randn(2, 77, cfg.context_dim, generator=g).to(device, dtype)
    sizes = None
    if cfg.adm_in_channels is not None:
        pooled = torch.randn(2, 1280, generator=g).to(device, dtype)
        side = float(size * 8)
        sizes = (pooled, torch.tensor([[side, side, 0.0, 0.0, side, side]] * 2, device=device))
    return x, t, context, sizes


def run_sdlab(model, x, t, context, sizes):
    y = None if sizes is None else sdxl_vector(*sizes).to(x.dtype)  # (B, 2816)
    return model(x, t, context, y)


def run_diffusers(model, x, t, context, sizes):
    added = None if sizes is None else {"text_embeds": sizes[0], "time_ids": sizes[1].to(x.dtype)}
    return model(x, t, context, added_cond_kwargs=added, return_dict=False)[0]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(models: dict, args, dtype: torch.dtype
                     ) -> tuple[dict[str, list[float]], dict[str, list[float]], list[float]]:
    """Wall-clock and process CPU seconds per forward, and the matmul peak (FLOP/s, best of ten) measured
    at the start of each timed round (empty with `--peak-size 0`): a shared machine's speed drifts between
    phases, so the step is also compared with the limit of its own round. On a shared CPU the CPU time is
    the steadier of the two."""
    x, t, context, sizes = inputs(args.cfg, dtype, args.device, args.size)
    times: dict[str, list[float]] = {name: [] for name in models}
    cpu_times: dict[str, list[float]] = {name: [] for name in models}
    peaks: list[float] = []
    names = list(models)
    with torch.inference_mode(), reusing_generation_work():   # as a generation's steps run sdlab's U-Net
        for i in range(args.warmup + args.runs):
            if i >= args.warmup and args.peak_size:
                peaks.append(matmul_peak(dtype, args.device, args.peak_size)[0])
            for name in names if i % 2 == 0 else names[::-1]:
                model, call = models[name]
                _sync(args.device)
                start, cpu_start = time.perf_counter(), time.process_time()
                call(model, x, t, context, sizes)
                _sync(args.device)
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
                    cpu_times[name].append(time.process_time() - cpu_start)
    return times, cpu_times, peaks


def step_flops(cfg: UNetConfig, size: int) -> tuple[float, float]:
    """FLOPs of one guided forward at `size` latents (multiply-add = 2), counted on the meta device by
    torch's flop counter: (convolutions and linear layers, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = UNet(cfg)
        x, t, context = torch.randn(2, 4, size, size), torch.full((2,), 500.0), torch.randn(2, 77, cfg.context_dim)
        y = None if cfg.adm_in_channels is None else torch.randn(2, cfg.adm_in_channels)
        with FlopCounterMode(display=False) as counter:
            model(x, t, context, y)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    attention = sum(n for op, n in counts.items() if "bmm" in op or "attention" in op)
    return sum(counts.values()) - attention, attention


def matmul_peak(dtype: torch.dtype, device: str, n: int, runs: int = 10) -> tuple[float, float]:
    """Best FLOP/s of an n x n x n matrix product in `dtype` (the roof the U-Net's matmuls and convs share):
    (by wall time, per thread by process CPU time). On a loaded machine the second is the steadier one. Ten
    runs: with three, one slow window of a shared machine put the peak 30 % low (and the limit as far high)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best, best_cpu = float("inf"), float("inf")
    for _ in range(runs + 1):
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        a @ b
        _sync(device)
        best, best_cpu = min(best, time.perf_counter() - start), min(best_cpu, time.process_time() - cpu_start)
    return 2 * n**3 / best, 2 * n**3 / best_cpu


def cuda_peak_memory(model, call, dtype: torch.dtype, args) -> float:
    """Extra GiB allocated during one forward (beyond the weights and inputs)."""
    x, t, context, sizes = inputs(args.cfg, dtype, args.device, args.size)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.inference_mode():
        call(model, x, t, context, sizes)
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


def memory_worker(cfg: UNetConfig, impl: str, dtype_name: str, size: int) -> None:
    """Subprocess body: build one model directly in `dtype`, run one forward, print peak RSS (GiB) as JSON."""
    dtype = DTYPES[dtype_name]
    model = build_sdlab(cfg, dtype, "cpu") if impl == "sdlab" else build_diffusers(cfg, dtype, "cpu", init=False)
    call = run_sdlab if impl == "sdlab" else run_diffusers
    x, t, context, sizes = inputs(cfg, dtype, "cpu", size)
    weights = peak_rss_gib()
    with torch.inference_mode():
        call(model, x, t, context, sizes)
    print(json.dumps({"after_build_gib": weights, "peak_gib": peak_rss_gib()}))


def compiled_twin(name: str, model, dtype: torch.dtype, args):
    """A second U-Net of `model`'s kind on the same weights, compiled (diffusers' also channels-last, as its
    torch.compile guide does); the first forward (the compile) is timed here."""
    from sdlab.utils.compile import compile_module

    if name == "sdlab":
        with torch.device("meta"):
            twin = UNet(args.cfg)
        call = run_sdlab
    else:
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            twin = UNet2DConditionModel(**_diffusers_kwargs(args.cfg))
        call = run_diffusers
    twin.load_state_dict(model.state_dict(), assign=True)
    twin = compile_module(twin.eval().to(memory_format=torch.channels_last))
    start = time.perf_counter()
    with torch.inference_mode():
        call(twin, *inputs(args.cfg, dtype, args.device, args.size))
    _sync(args.device)
    print(f"  {dtype_name_of(dtype)}: torch.compile of the {name} U-Net (first forward) took {time.perf_counter() - start:.1f} s",
          flush=True)
    return twin, call


def dtype_name_of(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


def cpu_peak_memory(model: str, impl: str, dtype_name: str, size: int) -> dict:
    cmd = [sys.executable, __file__, "--model", model, "--memory-worker", impl, dtype_name, "--size", str(size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15", choices=sorted(MODELS), help="U-Net shape (default: %(default)s)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--size", type=int, help="latent side (default: 64 = 512 px for sd15, 128 for sdxl)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--no-time", action="store_true", help="skip the timing (memory only)")
    parser.add_argument("--compile", action="store_true", help="also time both U-Nets under torch.compile")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, the physical cores)")
    parser.add_argument("--peak-size", type=int, default=4096, help="matrix side for the matmul peak (0: skip)")
    parser.add_argument("--memory-worker", nargs=2, metavar=("IMPL", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.cfg, default_size = MODELS[args.model]
    args.size = args.size or default_size
    if args.memory_worker:
        memory_worker(args.cfg, *args.memory_worker, args.size)
        return

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"{args.model}, batch 2 x 4x{args.size}x{args.size}, context 77x{args.cfg.context_dim}, "
          f"{args.runs} runs after {args.warmup} warm-up, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    on_cuda = args.device.startswith("cuda")
    needs_models = not args.no_time or (on_cuda and not args.no_memory)
    reference = build_diffusers(args.cfg, torch.float32, args.device, init=True) if needs_models else None
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        models = {}
        if reference is not None:
            diffusers_model = reference.to(dtype)  # in place; the weights' precision is irrelevant here
            models = {
                "sdlab": (sdlab_sharing_weights(args.cfg, diffusers_model), run_sdlab),
                "diffusers": (diffusers_model, run_diffusers),
            }
            if args.compile:
                for name in ("sdlab", "diffusers"):
                    models[f"{name} compiled"] = compiled_twin(name, models[name][0], dtype, args)
        line = f"{dtype_name}:"
        if not args.no_time:
            times, cpu_times, round_peaks = time_interleaved(models, args, dtype)
            ours, theirs = statistics.median(times["sdlab"]), statistics.median(times["diffusers"])
            cpu_ours, cpu_theirs = statistics.median(cpu_times["sdlab"]), statistics.median(cpu_times["diffusers"])
            line += (
                f" sdlab {ours:.3f} s, diffusers {theirs:.3f} s, sdlab/diffusers {ours / theirs:.3f} "
                f"(CPU time {cpu_ours:.2f} s vs {cpu_theirs:.2f} s, ratio {cpu_ours / cpu_theirs:.3f})"
                f"\n  all runs: " + ", ".join(f"{name} {[round(s, 3) for s in runs]}" for name, runs in times.items())
            )
            if "sdlab compiled" in times:
                compiled, theirs_compiled = (statistics.median(times[f"{name} compiled"]) for name in ("sdlab", "diffusers"))
                line += (f"\n  compiled: sdlab {compiled:.3f} s ({compiled / ours:.3f} x eager sdlab), diffusers "
                         f"{theirs_compiled:.3f} s ({theirs_compiled / theirs:.3f} x eager diffusers), "
                         f"sdlab/diffusers {compiled / theirs_compiled:.3f}")
            if args.peak_size:
                dense, attention = step_flops(args.cfg, args.size)
                peak, per_thread = matmul_peak(dtype, args.device, args.peak_size)
                limit = (dense + attention) / peak
                line += (f"\n  FLOP limit: ({dense / 1e12:.3f} + {attention / 1e12:.3f} attention) TFLOP per step / "
                         f"{dtype_name} matmul peak {peak / 1e9:.0f} GFLOP/s = {limit:.3g} s "
                         f"({dense / peak:.3g} s without attention); " + ", ".join(
                             f"{name} {statistics.median(runs) / limit:.2f} x limit" for name, runs in times.items()))
                line += ("\n  against each round's own peak (best of ten, measured as the round starts; median "
                         f"{statistics.median(round_peaks) / 1e9:.0f} GFLOP/s): " + ", ".join(
                             f"{name} {statistics.median(t * p for t, p in zip(runs, round_peaks)) / (dense + attention):.2f} x"
                             for name, runs in times.items()))
                if not on_cuda:
                    cpu_limit = (dense + attention) / per_thread
                    line += (f"\n  by CPU time: matmul {per_thread / 1e9:.0f} GFLOP/s per thread, so the step needs at least "
                             f"{cpu_limit:.2f} CPU s; " + ", ".join(
                                 f"{name} {statistics.median(cpu_times[name]) / cpu_limit:.2f} x" for name in cpu_times))
        if not args.no_memory:
            if on_cuda:
                mem = {name: cuda_peak_memory(m, call, dtype, args) for name, (m, call) in models.items()}
                line += f"\n  forward peak extra: sdlab {mem['sdlab']:.2f} GiB, diffusers {mem['diffusers']:.2f} GiB"
            else:
                mem = {name: cpu_peak_memory(args.model, name, dtype_name, args.size) for name in ("sdlab", "diffusers")}
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
