"""Training throughput of one U-Net step (forward + backward + AdamW) for sdlab vs diffusers.

Same config (converted with `unet_config_to_diffusers`), same weights, same inputs, in the same script:
reports images/s of a full optimiser step and the peak memory (CUDA: max allocated; CPU: peak RSS growth
of the process, ru_maxrss, coarse). Usage:

    python benchmarks/bench_train.py --width 64 --size 32 --batch 4 --steps 5 [--bf16] [--device cuda]

`--width 320 --size 64` is the SD1.5 U-Net at 512 px (slow on CPU).
"""

from __future__ import annotations

import argparse
import resource
import time
from dataclasses import replace

import torch

from sdlab.checkpoints.diffusers_unet import unet_config_to_diffusers, unet_state_dict_to_diffusers
from sdlab.families import get_family
from sdlab.models.unet import UNet


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _bench(name: str, step, device: torch.device, steps: int, batch: int) -> None:
    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    print(f"{name:10s} {steps * batch / elapsed:8.2f} images/s   {elapsed / steps * 1000:8.1f} ms/step   peak {_peak_mb(device):8.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=64, help="model_channels (SD1: 320)")
    parser.add_argument("--size", type=int, default=32, help="latent side (SD1 at 512 px: 64)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    cfg = replace(get_family("sd1").unet, model_channels=args.width)
    torch.manual_seed(0)
    ours = UNet(cfg).to(device)
    from diffusers import UNet2DConditionModel

    theirs = UNet2DConditionModel.from_config(unet_config_to_diffusers(cfg))
    theirs.load_state_dict(unet_state_dict_to_diffusers(ours.state_dict(), cfg))
    theirs.to(device).train()
    ours.train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 4, args.size, args.size, generator=g).to(device)
    t = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
    ctx = torch.randn(args.batch, 77, cfg.context_dim, generator=g).to(device)
    target = torch.randn_like(x)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def make_step(model, call):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step():
            opt.zero_grad(set_to_none=True)
            with autocast:
                out = call(model)
            torch.nn.functional.mse_loss(out.float(), target).backward()
            opt.step()

        return step

    print(f"U-Net SD1 layout, model_channels={args.width}, latent {args.size}x{args.size}, batch {args.batch}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, {device}, {torch.get_num_threads()} threads")
    _bench("diffusers", make_step(theirs, lambda m: m(x, t, encoder_hidden_states=ctx).sample), device, args.steps, args.batch)
    _bench("sdlab", make_step(ours, lambda m: m(x, t.float(), ctx)), device, args.steps, args.batch)


if __name__ == "__main__":
    main()
