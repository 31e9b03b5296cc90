"""Train sdlab-tiny's preview decoder (`sdlab.models.preview_decoder`) by distillation from its VAE decoder.

The tiny decoder learns to map the shipped model's latents to what its full VAE decoder draws from them
(L1 in pixel space, [0, 1]). The inputs are the latents live previews will see:

* clean latents: the VAE encoder's posterior means of images rendered by `sdlab.tiny.datasets.build`;
* mid-sampling x0 predictions: the model draws the captions of some of those images (its default sampler,
  ``--x0-steps`` steps) and every step's ``denoised`` latent is kept (blurry and off the clean manifold
  early on; what a preview shows);
* noisy latents: clean ones plus Gaussian noise (model-space std drawn from U(0, ``NOISE_MAX``)), so that
  latents between the two kinds do not surprise it.

Every target is the full decoder's picture of that very latent, so nothing needs to be "right", only
faithful to the VAE. The steps (each deterministic from its seed; recipes/sdlab-tiny/README.md gives the
sequence that made the shipped file; training runs about 2000 steps of 16 on one thread):

    python -m sdlab.tiny.datasets.build /tmp/pd/train --count 1200 --seed 17 --emoji-fraction 0.6
    python -m sdlab.tiny.preview_decoder prepare /tmp/pd/train /tmp/pd/train.safetensors --x0-prompts 24
    python -m sdlab.tiny.preview_decoder train /tmp/pd/train.safetensors /tmp/pd/run.safetensors
    python -m sdlab.tiny.preview_decoder export /tmp/pd/run.safetensors /tmp/pd/heldout.safetensors OUT
    python -m sdlab.tiny.preview_decoder measure OUT /tmp/pd/heldout.safetensors

A prepared set is a safetensors file: ``latents`` (N, C, h, w) VAE latents (float32), ``targets``
(N, 3, H, W) the VAE decoder's pictures in [0, 1] (float16), ``kinds`` (N,) 0 clean / 1 x0 / 2 noisy;
metadata ``latent_scale`` (the model's scaling factor), ``model``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

import sdlab
from sdlab.models.preview_decoder import (
    PreviewDecoder,
    PreviewDecoderConfig,
    TinyDecoder,
    read_preview_decoder,
    save_preview_decoder,
)
from sdlab.utils.files import atomic_write

logger = logging.getLogger(__name__)

KINDS = ("clean", "x0", "noisy")
NOISE_MAX = 0.5                 # largest model-space noise std added to a clean latent
PROBE_COUNT = 2                 # probe latents written into the exported file
DEFAULT_CONFIG = PreviewDecoderConfig()


# ---------------------------------------------------------------------------------------------- data


def read_images(folder: Path, limit: int | None = None) -> tuple[Tensor, list[str]]:
    """The PNGs of a built set, sorted (at most ``limit``), as (N, 3, H, W) in [-1, 1], and their captions."""
    paths = sorted(folder.glob("*.png"))[:limit]
    if not paths:
        raise FileNotFoundError(f"{folder}: no .png images")
    pixels, captions = [], []
    for path in paths:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1        # (H, W, 3)
        pixels.append(torch.from_numpy(array).permute(2, 0, 1))
        caption = path.with_suffix(".txt")
        captions.append(caption.read_text().strip() if caption.is_file() else "")
    return torch.stack(pixels), captions                                                   # (N, 3, H, W)


@torch.no_grad()
def batched(fn: Callable[[Tensor], Tensor], x: Tensor, batch: int = 32) -> Tensor:
    return torch.cat([fn(x[i:i + batch]) for i in range(0, len(x), batch)])


@torch.no_grad()
def collect_x0(pipe: sdlab.Pipeline, prompts: Sequence[str], seed: int, steps: int, batch_size: int) -> Tensor:
    """Every step's x0 prediction while ``pipe`` draws each prompt: (N, C, h, w) model latents."""
    found: list[Tensor] = []
    for i, prompt in enumerate(prompts):
        pipe.txt2img(prompt, seed=seed + i, steps=steps, batch_size=batch_size,
                     progress=lambda info: found.append(info.denoised.detach().float().cpu()))
    return torch.cat(found)


@torch.no_grad()
def prepare(images: Path, out: Path, *, model: str | None = None, count: int | None = None, x0_prompts: int = 40,
            x0_steps: int = 12, x0_batch: int = 2, noisy: int = 500, seed: int = 0) -> dict[str, int]:
    """Encode ``images``, collect x0 predictions on their first ``x0_prompts`` captions, add ``noisy`` noisy
    copies, decode every latent with the full VAE decoder, write the set to ``out``. Returns counts per kind."""
    torch.manual_seed(seed)
    pipe = sdlab.load(model)
    bundle = pipe.bundle
    vae, scale = bundle.vae, bundle.scaling_factor
    dtype, device = vae.dtype, bundle.device
    pixels, captions = read_images(images, count)
    clean = batched(lambda x: vae.encode(x.to(device, dtype)).mean.float().cpu(), pixels)      # (N, C, h, w)
    prompts = [c for c in captions if c][:x0_prompts]
    x0 = collect_x0(pipe, prompts, seed, x0_steps, x0_batch) / scale if prompts else clean[:0]
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(clean), (noisy,), generator=generator)
    sigmas = torch.rand(noisy, 1, 1, 1, generator=generator) * NOISE_MAX / scale              # VAE space
    noised = clean[picks] + sigmas * torch.randn(clean[picks].shape, generator=generator)     # (noisy, C, h, w)
    latents = torch.cat([clean, x0, noised]).contiguous()
    kinds = torch.cat([torch.full((len(part),), k, dtype=torch.int64) for k, part in enumerate((clean, x0, noised))])
    targets = batched(lambda z: ((vae.decode(z.to(device, dtype)).float().cpu() + 1) / 2).clamp(0, 1), latents)
    tensors = {"latents": latents, "targets": targets.to(torch.float16).contiguous(), "kinds": kinds}
    metadata = {"latent_scale": repr(float(scale)), "model": str(model or "shipped"), "images": str(images)}
    atomic_write(out, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), fsync=False)
    return {name: int((kinds == k).sum()) for k, name in enumerate(KINDS)}


def read_set(*paths: Path) -> tuple[Tensor, Tensor, Tensor, float]:
    """Prepared sets (of one model), joined: latents (N, C, h, w), targets (N, 3, H, W) float32, kinds (N,),
    latent scale."""
    parts, scales = [], set()
    for path in paths:
        with safe_open(str(path), framework="pt") as handle:
            scales.add(float((handle.metadata() or {})["latent_scale"]))
        parts.append(load_file(str(path)))
    if len(scales) != 1:
        raise ValueError(f"prepared sets of different latent scales: {sorted(scales)}")
    latents, targets, kinds = (torch.cat([part[key] for part in parts]) for key in ("latents", "targets", "kinds"))
    return latents.float(), targets.float(), kinds, scales.pop()


# ------------------------------------------------------------------------------------------ training


def train(data: Path | Sequence[Path], out: Path, *, steps: int = 2000, batch_size: int = 16, lr: float = 2e-3,
          seed: int = 0, config: PreviewDecoderConfig = DEFAULT_CONFIG, log_every: int = 100) -> list[float]:
    """Distil a `TinyDecoder` on a prepared set (Adam, cosine decay, L1); writes it (fp32) to ``out``.
    Returns the mean loss of each ``log_every`` steps."""
    torch.manual_seed(seed)
    paths = [data] if isinstance(data, (str, Path)) else list(data)
    latents, targets, _, scale = read_set(*paths)
    network = TinyDecoder(config)
    optimizer = torch.optim.Adam(network.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    generator = torch.Generator().manual_seed(seed)
    losses, window = [], []
    started = time.perf_counter()
    for step in range(steps):
        index = torch.randint(len(latents), (batch_size,), generator=generator)
        prediction = network(latents[index] * scale)                                          # (B, 3, H, W)
        loss = F.l1_loss(prediction, targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        window.append(loss.item())
        if len(window) == log_every or step == steps - 1:
            losses.append(statistics.fmean(window))
            logger.info("step %d / %d: L1 %.4f (%.0f s)", step + 1, steps, losses[-1], time.perf_counter() - started)
            window = []
    network.eval().requires_grad_(False)
    save_preview_decoder(out, PreviewDecoder(network, scale, None, None), dtype=torch.float32,
                         metadata={"sdlab.preview_decoder.steps": str(steps), "sdlab.preview_decoder.seed": str(seed),
                                   "sdlab.preview_decoder.data": " ".join(map(str, paths))})
    return losses


def export(run: Path, heldout: Path, out: Path, *, model: str | None = None) -> float:
    """Write the trained decoder in fp16 with probe latents (the first clean latents of ``heldout``) and
    a tolerance: 1.5 x its own probe error (against the model's VAE) + 0.01. Returns the probe error."""
    trained = read_preview_decoder(run)
    latents, _, kinds, _ = read_set(heldout)
    probe = latents[kinds == 0][:PROBE_COUNT].to(torch.float16).float()       # what the fp16 file will hold
    half = PreviewDecoder(trained.network.half().float(), trained.latent_scale, probe, None)
    vae = sdlab.load(model).bundle.vae
    error = half.probe_error(lambda z: vae.decode(z.to(vae.dtype)))
    decoder = PreviewDecoder(half.network, trained.latent_scale, probe, 1.5 * error + 0.01)
    config = json.dumps({"probe_error": round(error, 5), "source": str(run)})
    save_preview_decoder(out, decoder, metadata={"sdlab.preview_decoder.export": config,
                                                 "sdlab.preview_decoder.model": "sdlab-tiny"})
    return error


# ---------------------------------------------------------------------------------------- measuring


def psnr(a: Tensor, b: Tensor) -> float:
    """Mean PSNR (dB) of pictures in [0, 1]: (N, 3, H, W) each."""
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


def per_image_ms(fn: Callable[[Tensor], Tensor], latent: Tensor, repeats: int) -> float:
    """Milliseconds of ``fn`` on one latent (1, C, h, w): the fastest of ``repeats`` calls (on a loaded
    machine the other processes' time slices inflate the median, not the minimum)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn(latent)
        times.append(time.perf_counter() - started)
    return 1000 * min(times)


@torch.no_grad()
def measure(decoder_file: Path, heldout: Path, *, model: str | None = None, repeats: int = 30) -> dict[str, object]:
    """Error (mean abs of [0, 1], PSNR) against the full VAE decoder of the tiny decoder and of the linear
    projection (its 16 x 16 picture upsampled bilinearly to the full size) on each kind of held-out latent,
    and the per-image time of the three, interleaved in this process."""
    decoder = read_preview_decoder(decoder_file)
    bundle = sdlab.load(model).bundle
    scale, latent_format = bundle.scaling_factor, bundle.family.latent_format
    latents, targets, kinds, _ = read_set(heldout)
    side = targets.shape[-1]

    def linear(z_vae: Tensor) -> Tensor:
        rgb = latent_format.preview_rgb(z_vae * scale, scaling_factor=scale)                  # (B, 3, h, w)
        return F.interpolate(rgb, size=(side, side), mode="bilinear", align_corners=False).clamp(0, 1)

    def full(z_vae: Tensor) -> Tensor:
        return ((bundle.vae.decode(z_vae.to(bundle.vae.dtype)).float() + 1) / 2).clamp(0, 1)

    report: dict[str, object] = {"threads": torch.get_num_threads(), "count": {}}
    for k, kind in enumerate(KINDS):
        mask = kinds == k
        if not mask.any():
            continue
        report["count"][kind] = int(mask.sum())
        for name, fn in (("tiny", decoder.decode), ("linear", linear)):
            out = batched(fn, latents[mask])
            report[f"{name}/{kind}/mae"] = round(float((out - targets[mask]).abs().mean()), 4)
            report[f"{name}/{kind}/psnr"] = round(psnr(out, targets[mask]), 2)
    one = latents[:1]
    times: dict[str, list[float]] = {"full": [], "tiny": [], "linear": []}
    for _ in range(3):                                      # interleaved rounds: the machine's load hits all alike
        for name, fn in (("full", full), ("tiny", decoder.decode), ("linear", linear)):
            times[name].append(per_image_ms(fn, one, repeats))
    for name, values in times.items():
        report[f"{name}/ms"] = round(min(values), 2)
    report["full/tiny"] = round(min(times["full"]) / min(times["tiny"]), 1)
    return report


# --------------------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdlab.tiny.preview_decoder", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("prepare", help="latents of a built image set (+ x0 predictions, noisy) and their decodes")
    p.add_argument("images", type=Path, help="folder written by python -m sdlab.tiny.datasets.build")
    p.add_argument("out", type=Path)
    p.add_argument("--model", help="model file (default: the shipped one)")
    p.add_argument("--count", type=int, help="use only the first N images")
    p.add_argument("--x0-prompts", type=int, default=40, help="captions drawn to collect x0 predictions")
    p.add_argument("--x0-steps", type=int, default=12)
    p.add_argument("--x0-batch", type=int, default=2, help="pictures per prompt")
    p.add_argument("--noisy", type=int, default=500, help="noisy copies of clean latents")
    p.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("train", help="distil the tiny decoder on a prepared set (fp32 file)")
    t.add_argument("data", type=Path, nargs="+", help="prepared sets")
    t.add_argument("out", type=Path)
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--widths", default=",".join(map(str, DEFAULT_CONFIG.widths)))
    t.add_argument("--blocks", default=",".join(map(str, DEFAULT_CONFIG.blocks)))
    e = sub.add_parser("export", help="fp16 file with probe latents, for the package")
    e.add_argument("run", type=Path, help="file written by train")
    e.add_argument("heldout", type=Path, help="prepared held-out set (its first clean latents become the probe)")
    e.add_argument("out", type=Path)
    e.add_argument("--model")
    m = sub.add_parser("measure", help="error and time of the tiny decoder and the linear map vs the VAE decoder")
    m.add_argument("decoder", type=Path)
    m.add_argument("heldout", type=Path)
    m.add_argument("--model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.action == "prepare":
        counts = prepare(args.images, args.out, model=args.model, count=args.count, x0_prompts=args.x0_prompts,
                         x0_steps=args.x0_steps, x0_batch=args.x0_batch, noisy=args.noisy, seed=args.seed)
        logger.info("wrote %s: %s", args.out, counts)
    elif args.action == "train":
        config = PreviewDecoderConfig(widths=tuple(int(w) for w in args.widths.split(",")),
                                      blocks=tuple(int(b) for b in args.blocks.split(",")))
        train(args.data, args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
              config=config)
    elif args.action == "export":
        error = export(args.run, args.heldout, args.out, model=args.model)
        logger.info("wrote %s (probe error %.4f)", args.out, error)
    else:
        print(json.dumps(measure(args.decoder, args.heldout, model=args.model), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
