"""Learning proof: a small U-Net overfits a 4-image captioned set, so that sampling each caption
reproduces its image.

Pixel-space set-up to keep it CI-sized: an identity "VAE" (latent = image, 3 channels, factor 1), 8x8
images, a 2-level U-Net, the tiny SD1 text encoder. Training uses the real data layer and loop (v
objective, AdamW, warm-up + cosine, EMA off, no caption dropout); sampling is deterministic DDIM (eta = 0)
from seeded noise, conditioned on each caption. Two sizes:

- default (CI): 16 channels (GroupNorm of 8), 500 steps at lr 5e-3, 10 DDIM steps. Bound: mean absolute
  error below 32 / 255 per caption (measured: 11.3, 10.7, 15.6, 15.3); the sample's distance to every other
  image of the set is at least 2x the worst error (measured >= 58.6, i.e. 3.8x). With 2 more noise seeds
  per caption (200 + i, 300 + i) the worst error seen was 25.7 / 255 (at 600 steps: 21.9; at 400: 29.4).
  About 19 s of CPU time on one thread (31 s wall on the loaded 2-core machine).
- slow: 32 channels, 500 steps at lr 3e-3, 25 DDIM steps. Bound 24 / 255 (measured 11.6 .. 20.1); every
  other image at least 2.5x further (measured >= 54.4, i.e. 2.7x). About 9 min wall (4.5 min of CPU) on the
  loaded 2-core machine.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from torch import nn

from bundle_fixtures import tiny_bundle
from sdlab.families.loaded import ModelBundle
from sdlab.models.unet import UNet, UNetConfig
from sdlab.models.vae import DiagonalGaussian, VAEConfig
from sdlab.train.config import TrainConfig
from sdlab.train.data import TrainData, scan_dataset
from sdlab.train.distributed import DistContext
from sdlab.train.loop import train
from sdlab.train.unet_task import UNetTask, UNetTaskOptions, encode_captions
from train_fixtures import CAPTIONS, pattern_image, write_caption_folder

SIZE = 8


@dataclass(frozen=True)
class OverfitSetup:
    width: int             # model_channels of the U-Net
    norm_groups: int
    steps: int             # optimiser steps
    learning_rate: float
    sample_steps: int      # DDIM steps
    bound: float           # mean absolute error bound on the 0-255 scale
    separation: float      # every other image must be this many times further than the worst error


CI = OverfitSetup(width=16, norm_groups=8, steps=500, learning_rate=5e-3, sample_steps=10, bound=32, separation=2.0)
FULL = OverfitSetup(width=32, norm_groups=32, steps=500, learning_rate=3e-3, sample_steps=25, bound=24, separation=2.5)


class IdentityVAE(nn.Module):
    """latent = image: encode gives a posterior with (almost) zero variance, decode is the identity."""

    def __init__(self):
        super().__init__()
        self.cfg = VAEConfig(latent_channels=3, channel_mult=(1,))
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # gives the module a device / dtype

    def encode(self, img):
        return DiagonalGaussian(torch.cat([img, torch.full_like(img, -30.0)], dim=1))

    def decode(self, z):
        return z


def _bundle(setup: OverfitSetup) -> ModelBundle:
    base = tiny_bundle("sd1", seed=0)
    cfg = UNetConfig(in_channels=3, out_channels=3, model_channels=setup.width, channel_mult=(1, 2), num_res_blocks=1,
                     transformer_depth=(1, 1), num_heads=4, context_dim=64, norm_groups=setup.norm_groups)
    torch.manual_seed(0)
    vae = IdentityVAE()
    return replace(base, unet=UNet(cfg), vae=vae, unet_config=cfg, vae_config=vae.cfg, scaling_factor=1.0)


@torch.no_grad()
def ddim_sample(task: UNetTask, caption: str, seed: int, steps: int = 25) -> torch.Tensor:
    """Deterministic DDIM (Song et al. 2021, eq. 12 with sigma = 0) on the v-prediction U-Net."""
    ac = task.sampling.schedule.alphas_cumprod.float().double()
    ts = torch.linspace(len(ac) - 1, 0, steps).round().long()
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    context, _ = encode_captions(task.bundle.text_encoders, [caption])
    for i, t in enumerate(ts):
        v = task.bundle.unet(x.float(), t.float()[None], context).double()
        x0 = ac[t].sqrt() * x - (1 - ac[t]).sqrt() * v
        eps = (1 - ac[t]).sqrt() * x + ac[t].sqrt() * v
        ac_next = ac[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
        x = ac_next.sqrt() * x0 + (1 - ac_next).sqrt() * eps
    return x.float()[0]  # (3, H, W)


def _overfit_and_sample(tmp_path, setup: OverfitSetup) -> None:
    data_dir = write_caption_folder(tmp_path / "data", n=4, size=SIZE)
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), resolution=SIZE, max_steps=setup.steps, batch_size=4,
                      learning_rate=setup.learning_rate, warmup_steps=20, min_lr_ratio=0.05, caption_dropout=0.0,
                      weight_decay=0.0, checkpoint_every=10_000, progress=False, num_workers=1, seed=1)
    bundle = _bundle(setup)
    task = UNetTask(bundle, UNetTaskOptions(caption_dropout=0.0, prediction="v"))
    data = TrainData(scan_dataset(data_dir), resolution=SIZE, center_crop=True, random_flip=False, seed=1,
                     batch_size=4, grad_accum=1, num_workers=1)
    result = train(task, data, cfg, DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu")))
    assert result.step == setup.steps and result.weights is not None

    bundle.unet.eval()
    targets = [torch.from_numpy(np.asarray(pattern_image(i, SIZE), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
               for i in range(4)]
    errors, wrong = [], []
    for i, caption in enumerate(CAPTIONS):
        sample = ddim_sample(task, caption, seed=100 + i, steps=setup.sample_steps).clamp(-1, 1)
        errors.append(float((sample - targets[i]).abs().mean()) * 127.5)  # 0-255 scale
        wrong.append(min(float((sample - targets[j]).abs().mean()) for j in range(4) if j != i) * 127.5)
    print("mean abs error per caption (0-255):", [round(e, 2) for e in errors],
          "nearest other image:", [round(w, 2) for w in wrong])
    assert max(errors) < setup.bound, errors
    assert min(wrong) > setup.separation * max(errors), (errors, wrong)


def test_small_unet_overfits_four_captioned_images(tmp_path, one_thread):
    _overfit_and_sample(tmp_path, CI)


@pytest.mark.slow
def test_tiny_unet_overfits_four_captioned_images_longer(tmp_path):
    _overfit_and_sample(tmp_path, FULL)
