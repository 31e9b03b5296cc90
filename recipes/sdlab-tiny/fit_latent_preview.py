"""Fit sdlab-tiny's latent -> RGB preview map (`sdlab.families.sdlab_tiny.TINY_RGB_FACTORS` / `TINY_RGB_BIAS`).

The shipped model draws every third evaluation prompt (two seeds, 12 steps); each picture is encoded by its VAE (the mean, times the
file's scaling factor: the latents a sampler ends on) and decoded again. The decoded picture, average-pooled
to the latent grid (4 x 4 pixels per latent) and mapped to [-1, 1], is regressed on the latent channels
plus a constant by least squares. Prints the constants to paste and the fit's RMS error.

    PYTHONPATH=src python recipes/sdlab-tiny/fit_latent_preview.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import sdlab

PROMPTS = Path(__file__).resolve().parents[2] / "prompts" / "eval_prompts.txt"


def main() -> None:
    torch.set_grad_enabled(False)
    pipe = sdlab.load()
    bundle = pipe.bundle
    prompts = [line.strip() for line in PROMPTS.read_text().splitlines() if line.strip() and not line.startswith("#")]
    images = []
    for i, prompt in enumerate(prompts[::3]):
        for image in pipe.txt2img(prompt, seed=1000 + i, steps=12, batch_size=2).images:
            images.append(torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1))
    pixels = torch.stack(images).permute(0, 3, 1, 2)                                   # (N, 3, H, W)
    z = bundle.vae.encode(pixels).mean * bundle.scaling_factor                         # (N, 4, h, w)
    decoded = bundle.vae.decode(z / bundle.scaling_factor).clamp(-1, 1)               # (N, 3, H, W)
    target = F.avg_pool2d(decoded, bundle.vae_config.downsample_factor)                # (N, 3, h, w)
    x = torch.cat([z, torch.ones_like(z[:, :1])], 1).permute(0, 2, 3, 1).reshape(-1, z.shape[1] + 1).double()
    y = target.permute(0, 2, 3, 1).reshape(-1, 3).double()
    solution = torch.linalg.lstsq(x, y).solution                                       # (C + 1, 3)
    rms = float((x @ solution - y).pow(2).mean().sqrt())
    print(f"scaling factor {bundle.scaling_factor}, {len(images)} pictures, RMS error {rms:.4f} (of [-1, 1])")
    print("TINY_RGB_FACTORS = (")
    for row in solution[:-1].tolist():
        print("    (" + ", ".join(f"{v:.4f}" for v in row) + "),")
    print(")")
    print("TINY_RGB_BIAS = (" + ", ".join(f"{v:.4f}" for v in solution[-1].tolist()) + ")")


if __name__ == "__main__":
    main()
