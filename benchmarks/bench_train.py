"""Training throughput and memory of one U-Net optimiser step (forward + MSE + backward + AdamW), sdlab vs
diffusers `UNet2DConditionModel` with the same config (converted with `unet_config_to_diffusers`).

    python benchmarks/bench_train.py --width 64 --size 32 --batch 4 --steps 5 [--bf16] [--device cuda]

Two measurements:
  1. Time, same weights, same inputs, one process: the two models' steps alternate (the order flips every
     round) so that load from other processes hits both alike; median wall-clock and median process CPU
     time per step. On a shared CPU the CPU time is the steadier of the two.
  2. Per side, a fresh subprocess that builds only that model (seeded random init; values do not matter for
     speed or memory): images/s (wall) and CPU s/step over ``--steps`` steps after one warm-up, and memory.
     CPU memory: VmHWM (peak resident set of this process, /proc/self/status; getrusage's maxrss would also
     count the parent's pages copied before exec) and the growth over the RSS before the first step
     (activations, gradients, AdamW state). CUDA: torch.cuda.max_memory_allocated.

On CPU both sides run with subnormal floats flushed to zero (`torch.set_flush_denormal`), as sdlab's training
loop does: random-init U-Nets produce subnormals within a few AdamW steps, and x86 handles those ~100x slower,
which otherwise swamps the comparison (one step measured at 29 s instead of 1.3 s).

`--width 320 --size 64` is the SD1.5 U-Net at 512 px (slow on CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace

import torch

from sdlab.checkpoints.diffusers_unet import unet_config_to_diffusers, unet_state_dict_to_diffusers
from sdlab.families import get_family
from sdlab.models.unet import UNet, UNetConfig


def _config(width: int) -> UNetConfig:
    return replace(get_family("sd1").unet, model_channels=width)


def _rss_mib(field: str) -> float:
    """VmHWM (peak) or VmRSS (current) of this process in MiB (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _build(impl: str, cfg: UNetConfig, device: torch.device, sdlab_model: UNet | None = None):
    """(model in train mode, call(model, x, t, ctx) -> output). diffusers copies sdlab's weights when given."""
    if impl == "sdlab":
        torch.manual_seed(0)
        model = sdlab_model if sdlab_model is not None else UNet(cfg)
        return model.to(device).train(), lambda m, x, t, ctx: m(x, t.float(), ctx)
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel.from_config(unet_config_to_diffusers(cfg))
    if sdlab_model is not None:
        model.load_state_dict(unet_state_dict_to_diffusers(sdlab_model.state_dict(), cfg))
    return model.to(device).train(), lambda m, x, t, ctx: m(x, t, encoder_hidden_states=ctx).sample


def _inputs(args, cfg: UNetConfig, device: torch.device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 4, args.size, args.size, generator=g).to(device)
    t = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
    ctx = torch.randn(args.batch, 77, cfg.context_dim, generator=g).to(device)
    return x, t, ctx, torch.randn(x.shape, generator=g).to(device)


def _make_step(model, call, inputs, bf16: bool, device: torch.device):
    x, t, ctx, target = inputs
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def step() -> tuple[float, float]:
        """One optimiser step; returns (wall s, process CPU s)."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = call(model, x, t, ctx)
        torch.nn.functional.mse_loss(out.float(), target).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, time.process_time() - cpu_start

    return step


def worker(impl: str, args) -> None:
    """Subprocess body: one model only; prints throughput and peak memory as JSON."""
    device = torch.device(args.device)
    cfg = _config(args.width)
    model, call = _build(impl, cfg, device)
    step = _make_step(model, call, _inputs(args, cfg, device), args.bf16, device)
    before = _rss_mib("VmRSS") if device.type == "cpu" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
    step()  # warm-up (allocates the AdamW state)
    walls, cpus = zip(*(step() for _ in range(args.steps)))
    peak = _rss_mib("VmHWM") if device.type == "cpu" else torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps({"images_per_s": args.batch * len(walls) / sum(walls), "cpu_s_per_step": statistics.median(cpus),
                      "peak_mib": peak, "before_first_step_mib": before}))


def _run_worker(impl: str, argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *argv, "--worker", impl], check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=64, help="model_channels (SD1: 320)")
    parser.add_argument("--size", type=int, default=32, help="latent side (SD1 at 512 px: 64)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-subprocess", action="store_true", help="skip the per-side subprocess runs")
    parser.add_argument("--worker", choices=("sdlab", "diffusers"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if torch.device(args.device).type == "cpu":
        torch.set_flush_denormal(True)
    if args.worker:
        worker(args.worker, args)
        return
    device = torch.device(args.device)
    cfg = _config(args.width)
    print(f"U-Net SD1 layout, model_channels={args.width}, latent {args.size}x{args.size}, batch {args.batch}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, {device}, {torch.get_num_threads()} threads, torch {torch.__version__}")

    ours, ours_call = _build("sdlab", cfg, device)
    theirs, theirs_call = _build("diffusers", cfg, device, sdlab_model=ours)
    inputs = _inputs(args, cfg, device)
    steps = {"sdlab": _make_step(ours, ours_call, inputs, args.bf16, device),
             "diffusers": _make_step(theirs, theirs_call, inputs, args.bf16, device)}
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for i in range(args.steps + 1):
        for name in names if i % 2 == 0 else names[::-1]:
            w, c = steps[name]()
            if i > 0:  # the first round is the warm-up
                wall[name].append(w)
                cpu[name].append(c)
    med = {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in names}
    print("same process, interleaved (median per step):")
    for name in names:
        print(f"  {name:10s} wall {med[name][0] * 1000:8.1f} ms ({args.batch / med[name][0]:7.2f} images/s)   "
              f"CPU {med[name][1] * 1000:8.1f} ms")
    print(f"  sdlab/diffusers: wall {med['sdlab'][0] / med['diffusers'][0]:.3f}, CPU {med['sdlab'][1] / med['diffusers'][1]:.3f}")
    del ours, theirs, steps
    if args.no_subprocess:
        return

    argv = list(sys.argv[1:])
    print("separate subprocesses (one model each):")
    unit = "max allocated" if device.type == "cuda" else "VmHWM"
    for name in ("sdlab", "diffusers"):
        r = _run_worker(name, argv)
        print(f"  {name:10s} {r['images_per_s']:7.2f} images/s   CPU {r['cpu_s_per_step'] * 1000:8.1f} ms/step   "
              f"peak ({unit}) {r['peak_mib']:8.0f} MiB, {r['peak_mib'] - r['before_first_step_mib']:7.0f} MiB above "
              f"the memory before the first step")


if __name__ == "__main__":
    main()
