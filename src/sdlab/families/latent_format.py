"""How a family's latents relate to its VAE and to pixels: channels, scaling, shift and a linear RGB preview.

The sampler works on model latents ``z = (z_vae - shift) * scaling_factor``; the VAE decodes
``z_vae = z / scaling_factor + shift``. For a live preview without running the VAE decoder, each latent
pixel is mapped to RGB by one linear map fitted against the decoder:

    rgb = z @ rgb_factors + rgb_bias          z: (..., C) model latents, rgb in [-1, 1] (roughly)

The SD1 / SD2 and SDXL factors are the ones ComfyUI ships (``comfy/latent_formats.py``: ``SD15`` for both SD1
and SD2, ``SDXL``), fitted on model latents at the family's scaling factor. A file whose own scaling factor
differs (sdlab-tiny measures one per file) is rescaled to the one the factors were fitted at
(``rgb_fit_scaling``) before the map is applied.

A family may also ship a tiny distilled decoder for previews (``preview_decoder_file``, see
`sdlab.models.preview_decoder`): full-resolution pictures for a few milliseconds; previews prefer it when
it agrees with the model's VAE and fall back to the linear map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from sdlab.models.preview_decoder import PreviewDecoder, load_preview_decoder

RGB = tuple[float, float, float]


@dataclass(frozen=True)
class LatentFormat:
    """Latent channels, scaling and shift, and the latent -> RGB preview map of one family."""

    channels: int
    scaling_factor: float                       # z_model = (z_vae - shift) * scaling_factor
    shift: float = 0.0
    rgb_factors: tuple[RGB, ...] | None = None  # (channels, 3): one RGB row per latent channel
    rgb_bias: RGB = (0.0, 0.0, 0.0)
    rgb_fit_scaling: float | None = None        # scaling the factors were fitted at (None: scaling_factor)
    preview_decoder_file: str | None = None     # tiny preview decoder: a file in sdlab/models/data, or a path

    def __post_init__(self) -> None:
        if self.rgb_factors is not None and (
            len(self.rgb_factors) != self.channels or any(len(row) != 3 for row in self.rgb_factors)
        ):
            raise ValueError(f"LatentFormat: rgb_factors must be {self.channels} rows of 3")

    def to_model(self, z_vae: Tensor) -> Tensor:
        """VAE latents -> the latents the U-Net sees."""
        return (z_vae - self.shift) * self.scaling_factor

    def to_vae(self, z: Tensor) -> Tensor:
        """The U-Net's latents -> what the VAE decoder takes."""
        return z / self.scaling_factor + self.shift

    def preview_decoder(self) -> PreviewDecoder | None:
        """The family's tiny preview decoder (loaded on first use, then cached), or None when it has none."""
        if self.preview_decoder_file is None:
            return None
        path = Path(self.preview_decoder_file)
        if not path.is_absolute():
            path = Path(str(resources.files("sdlab.models").joinpath("data", self.preview_decoder_file)))
        return load_preview_decoder(path)

    def preview_rgb(self, latents: Tensor, scaling_factor: float | None = None) -> Tensor:
        """A cheap RGB picture of model latents (B, C, h, w) -> (B, 3, h, w) in [0, 1], one pixel per latent.

        ``scaling_factor`` is the model's own (``bundle.scaling_factor``) when it differs from the family's."""
        if self.rgb_factors is None:
            raise ValueError("this latent format has no RGB preview factors")
        fitted = self.rgb_fit_scaling or self.scaling_factor
        z = latents.to(torch.float32) * (fitted / (scaling_factor or self.scaling_factor))      # (B, C, h, w)
        factors = torch.tensor(self.rgb_factors, dtype=torch.float32, device=z.device)          # (C, 3)
        bias = torch.tensor(self.rgb_bias, dtype=torch.float32, device=z.device)                # (3,)
        rgb = torch.einsum("bchw,cr->brhw", z, factors) + bias[None, :, None, None]             # (B, 3, h, w)
        return ((rgb + 1) / 2).clamp(0, 1)


@dataclass(frozen=True)
class LatentStats:
    """Per-channel mean and standard deviation of one model's VAE latents (Playground v2.5: its
    `vae/config.json` `latents_mean` / `latents_std`; ComfyUI's `SDXL_Playground_2_5`), which its latents are
    normalised by: ``z = (z_vae - mean) * scaling_factor / std`` and back ``z_vae = z * std / scaling_factor +
    mean``, in diffusers' order of operations (`ModelBundle.to_model_latents` / `to_vae_latents`)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"latents mean and std need one number per channel each, got {len(self.mean)} "
                             f"and {len(self.std)}")
        if not all(math.isfinite(m) for m in self.mean) or not all(math.isfinite(s) and s > 0 for s in self.std):
            raise ValueError("latents mean must be finite numbers and latents std positive ones")

    def _view(self, values: tuple[float, ...], like: Tensor) -> Tensor:
        return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1).to(like.device, like.dtype)

    def to_model(self, z_vae: Tensor, scaling_factor: float) -> Tensor:
        """VAE latents (B, C, h, w) -> model latents (diffusers' SDXL img2img ``prepare_latents``)."""
        return (z_vae - self._view(self.mean, z_vae)) * scaling_factor / self._view(self.std, z_vae)

    def to_vae(self, z: Tensor, scaling_factor: float) -> Tensor:
        """Model latents (B, C, h, w) -> VAE latents (diffusers' SDXL pipelines before ``vae.decode``)."""
        return z * self._view(self.std, z) / scaling_factor + self._view(self.mean, z)

    def describe(self) -> str:
        return f"mean {[round(m, 4) for m in self.mean]}, std {[round(s, 4) for s in self.std]}"


# ComfyUI comfy/latent_formats.py SD15 (used for SD1 and SD2): no bias
SD_RGB_FACTORS: tuple[RGB, ...] = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)

# ComfyUI comfy/latent_formats.py SDXL
SDXL_RGB_FACTORS: tuple[RGB, ...] = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
SDXL_RGB_BIAS: RGB = (0.1084, -0.0175, -0.0011)

SD_LATENTS = LatentFormat(channels=4, scaling_factor=0.18215, rgb_factors=SD_RGB_FACTORS)
SDXL_LATENTS = LatentFormat(channels=4, scaling_factor=0.13025, rgb_factors=SDXL_RGB_FACTORS, rgb_bias=SDXL_RGB_BIAS)

__all__ = ["LatentFormat", "LatentStats", "SDXL_LATENTS", "SD_LATENTS"]
