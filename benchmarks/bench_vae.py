"""The SD VAE's decode (SD1.x / 2.x / SDXL share its shape; random weights): sdlab vs diffusers' AutoencoderKL,
same weights, same process, interleaved; and each decode's peak memory in a fresh process.

    python benchmarks/bench_vae.py                          # bf16, 512 px, 5 timed decodes each
    python benchmarks/bench_vae.py --sizes 512 1024 --runs 3 --dtypes bf16 fp32

Time: the first decode of each implementation in the process (what a one-picture `sdlab txt2img` pays: its
activations are memory the process has never touched, and oneDNN makes its kernels), then the median of
`--runs` more, sdlab and diffusers alternating with the order flipped every run. Both run with glibc's
allocator tuned as the `sdlab` command tunes it (`sdlab.utils.allocator.tune`) and channels-last, as sdlab
loads its VAE. Memory (`--no-memory` skips it): peak resident set of a fresh subprocess per implementation
that builds the VAE in the dtype and decodes once, minus its resident set just before the decode: what the
decode itself needs on top of the weights. Pixels: each against an fp32 decode of the same weights, on [0, 255].
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from sdlab.checkpoints.diffusers_vae import vae_config_to_diffusers, vae_state_dict_from_diffusers
from sdlab.models.vae import AutoencoderKL, VAEConfig
from sdlab.utils.allocator import tune

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CFG = VAEConfig()


@torch.no_grad()
def _randomize(module: torch.nn.Module) -> None:
    """Weights of std 1/sqrt(fan_in), so that activations stay in range through the deep network (norms and
    biases keep PyTorch's initial values)."""
    gen = torch.Generator().manual_seed(0)
    for param in module.parameters():
        if param.ndim >= 2:
            param.normal_(0.0, param[0].numel() ** -0.5, generator=gen)


def build(dtype: torch.dtype, which: tuple[str, ...] = ("sdlab", "diffusers")) -> dict:
    """The named implementations' VAEs on the same random weights, in `dtype`, channels-last, eval."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    config = {k: v for k, v in vae_config_to_diffusers(CFG).items() if not k.startswith("_")}
    reference = DiffusersAutoencoderKL(**config).eval()
    _randomize(reference)
    models = {}
    if "sdlab" in which:
        ours = AutoencoderKL(CFG).eval()
        ours.load_state_dict(vae_state_dict_from_diffusers(reference.state_dict(), CFG))
        models["sdlab"] = ours.to(dtype).to(memory_format=torch.channels_last)
    if "diffusers" in which:
        models["diffusers"] = reference.to(dtype).to(memory_format=torch.channels_last)
    else:
        del reference
    return models


def decode(name: str, model, z: torch.Tensor) -> torch.Tensor:
    if name == "sdlab":
        return model.decode(z)
    return model.decode(z).sample


def latent(dtype: torch.dtype, size: int) -> torch.Tensor:
    side = size // CFG.downsample_factor
    return torch.randn(1, CFG.latent_channels, side, side, generator=torch.Generator().manual_seed(1)).to(dtype)


def peak_worker(name: str, dtype_name: str, size: int) -> None:
    """Print {"before": RSS GiB before the decode, "peak": peak RSS GiB during it} for one decode in this
    process (the peak is reset before the decode: Linux's clear_refs 5, so building the model does not count)."""
    tune()
    dtype = DTYPES[dtype_name]
    with torch.device("meta"):   # built straight in the dtype: no freed fp32 copy for the decode to reuse
        model = build(torch.float32, (name,))[name].to(dtype)
    model = model.to_empty(device="cpu").to(memory_format=torch.channels_last)
    _randomize(model)
    z = latent(dtype, size)
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
        clear.write("5")
    before = _status_gib("VmRSS")
    with torch.inference_mode():
        decode(name, model, z)
    print(json.dumps({"before": before, "peak": _status_gib("VmHWM")}))


def _status_gib(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) / 2**20   # kB


def _peak(name: str, dtype_name: str, size: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--peak-worker", name, dtype_name, str(size)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _pixels(image: torch.Tensor) -> torch.Tensor:
    return ((image.float().clamp(-1, 1) + 1) * 127.5).round()   # [-1, 1] -> [0, 255]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--peak-worker", nargs=3, metavar=("IMPL", "DTYPE", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_worker:
        name, dtype_name, size = args.peak_worker
        peak_worker(name, dtype_name, int(size))
        return
    tune()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        models = build(dtype)
        for size in args.sizes:
            z = latent(dtype, size)
            first, times, outs = {}, {name: [] for name in models}, {}
            with torch.inference_mode():
                for run in range(args.runs + 1):
                    order = list(models) if run % 2 == 0 else list(models)[::-1]
                    for name in order:
                        start = time.perf_counter()
                        outs[name] = decode(name, models[name], z)
                        elapsed = time.perf_counter() - start
                        if run == 0:
                            first[name] = elapsed
                        else:
                            times[name].append(elapsed)
                exact = _pixels(decode("diffusers", models["diffusers"].float(), z.float()))
                models["diffusers"].to(dtype)
            errors = ", ".join(f"{name} max {d.max().item():.0f}/255 mean {d.mean().item():.2f}"
                               for name in models for d in [(_pixels(outs[name]) - exact).abs()])
            med = {name: statistics.median(t) for name, t in times.items()}
            print(f"{dtype_name} {size} px: first decode sdlab {first['sdlab']:.2f} s, diffusers "
                  f"{first['diffusers']:.2f} s ({first['sdlab'] / first['diffusers']:.3f}); median of {args.runs}: "
                  f"sdlab {med['sdlab']:.3f} s, diffusers {med['diffusers']:.3f} s "
                  f"({med['sdlab'] / med['diffusers']:.3f}); pixels against an fp32 decode: {errors}")
            if not args.no_memory:
                peaks = {name: _peak(name, dtype_name, size) for name in models}
                line = ", ".join(f"{name} {p['peak'] - p['before']:.2f} GiB (peak {p['peak']:.2f})"
                                 for name, p in peaks.items())
                print(f"  decode's memory above the weights: {line}")
        del models


if __name__ == "__main__":
    main()
