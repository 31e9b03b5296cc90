"""Does a VAE keep absolute colour? Encode and decode every background colour of the training palette as a
flat 64 x 64 image (with a small darker square in the middle) and print the reconstructed corner colour
and its error. A VAE fit for sdlab-tiny keeps every background apart (the eval scores the background).

    python recipes/sdlab-tiny/check_vae_colours.py runs/sdlab-tiny/vae            # newest run checkpoint
    python recipes/sdlab-tiny/check_vae_colours.py runs/sdlab-tiny/vae/final.safetensors
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from sdlab.tiny.datasets.colours import BACKGROUND_COLOURS, PALETTE
from sdlab.families.sdlab_tiny import TINY_VAE
from sdlab.models.vae import AutoencoderKL
from sdlab.train.run_checkpoint import latest_checkpoint, load_run_checkpoint
from sdlab.train.vae_task import load_trained_vae


def load(path: Path) -> AutoencoderKL:
    if path.suffix == ".safetensors":
        return load_trained_vae(path)[0]
    checkpoint = path if path.is_file() else latest_checkpoint(path / "checkpoints")
    vae = AutoencoderKL(TINY_VAE)
    vae.load_state_dict(load_run_checkpoint(checkpoint)["modules"]["vae"])
    print(f"run checkpoint {checkpoint}")
    return vae


def main() -> None:
    vae = load(Path(sys.argv[1])).eval()
    worst = 0.0
    with torch.no_grad():
        for name in BACKGROUND_COLOURS:
            rgb = torch.tensor(PALETTE[name], dtype=torch.float32)  # (3,) 0..255
            x = (rgb / 127.5 - 1).view(1, 3, 1, 1).repeat(1, 1, 64, 64)  # (1, 3, 64, 64)
            x[:, :, 28:36, 28:36] *= 0.5
            y = vae.decode(vae.encode(x).mode())  # (1, 3, 64, 64)
            got = ((y[0, :, 4, 4].clamp(-1, 1) + 1) * 127.5).round()
            error = float((got - rgb).abs().max())
            worst = max(worst, error)
            print(f"{name:<12} {[int(v) for v in rgb]} -> {[int(v) for v in got]}  max error {error:.0f}")
    print(f"worst channel error {worst:.0f} / 255")


if __name__ == "__main__":
    main()
