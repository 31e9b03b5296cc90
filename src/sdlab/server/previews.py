"""Step previews: the sampler's current x0 estimate as a small picture, at a fraction of a step's cost.

A linear map from latent channels to RGB (A1111's "Approx cheap", ComfyUI's "latent2rgb"):
rgb = latent^T W + b per latent pixel, in [-1, 1], one pixel per latent pixel. The family's map
(`family.latent_format.preview_rgb`: SD1/SD2/SDXL with ComfyUI's factors, sdlab-tiny with its own) when it
has one; otherwise the map is fitted once per model by least squares against the model's own VAE decoder
on a few random latents (each decoded picture average-pooled to the latent grid), so any model, even
one trained here, gets a preview (the latents are the encoder's, of smooth random-colour pictures). The JPEG is encoded only when a client asks for it.
A family that ships a tiny preview decoder (`LatentFormat.preview_decoder`, sdlab-tiny) gets full-resolution
previews from it instead, when its probe latents show it agrees with this model's VAE (a file with another
VAE keeps the linear map).
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sdlab.families.loaded import ModelBundle
from sdlab.models.preview_decoder import PreviewDecoder
from sdlab.pipeline.grid import cell_picture

logger = logging.getLogger("sdlab.server")

FIT_SIDE = 16           # latent side of the fitting samples (128 px for SD's 8x VAE)
FIT_SAMPLES = 4


class LatentPreviewer:
    """`rgb(latent)` for one model: (C, h, w) latent in model space -> (h, w, 3) uint8 array."""

    def __init__(self, project: Callable[[Tensor], Tensor]) -> None:
        self.project = project                      # (1, C, h, w) -> (1, 3, h, w) in [0, 1]

    @classmethod
    def for_bundle(cls, bundle: ModelBundle) -> LatentPreviewer:
        """The family's tiny preview decoder when it has one that fits this model's VAE, else the family's
        preview map (`LatentFormat.preview_rgb`) when it has one, else one fitted now."""
        latent_format = getattr(bundle.family, "latent_format", None)
        decoder = matching_preview_decoder(bundle)
        if decoder is not None:
            return cls.scaled(bundle, decoder.preview)
        if latent_format is not None and getattr(latent_format, "rgb_factors", None) is not None:
            return cls.scaled(bundle, latent_format.preview_rgb)
        return cls.fitted(bundle)

    @classmethod
    def scaled(cls, bundle: ModelBundle, project: Callable[..., Tensor]) -> LatentPreviewer:
        """`project(latents, scaling_factor=...)` on the model's latents at its own scaling factor; a model with
        per-channel latent statistics has its latents mapped back to VAE latents first
        (`ModelBundle.to_vae_latents`), which are model latents at scaling factor 1."""
        if bundle.latent_stats is None:
            return cls(partial(project, scaling_factor=bundle.scaling_factor))
        return cls(lambda z: project(bundle.to_vae_latents(z), scaling_factor=1.0))

    @classmethod
    def fitted(cls, bundle: ModelBundle) -> LatentPreviewer:
        weight, bias = fit_linear_decoder(bundle)                                    # (C, 3), (3,)

        def project(z: Tensor) -> Tensor:
            rgb = torch.einsum("bchw,cr->brhw", z, weight) + bias[None, :, None, None]   # (1, 3, h, w)
            return ((rgb + 1) / 2).clamp(0, 1)

        return cls(project)

    @torch.no_grad()
    def rgb(self, latent: Tensor) -> Tensor:
        x = latent.detach().to("cpu", torch.float32)[None]                          # (1, C, h, w)
        rgb = self.project(x)[0]                                                     # (3, h, w) in [0, 1]
        return (rgb.permute(1, 2, 0) * 255).round().to(torch.uint8)                  # (h, w, 3)


def matching_preview_decoder(bundle: ModelBundle) -> PreviewDecoder | None:
    """The family's preview decoder if it has one and it agrees with ``bundle``'s VAE on its probe latents."""
    latent_format = getattr(bundle.family, "latent_format", None)
    if getattr(latent_format, "preview_decoder_file", None) is None:
        return None
    try:
        decoder = latent_format.preview_decoder()
        vae = bundle.vae
        if decoder.agrees_with(lambda z: vae.decode(z.to(bundle.device, vae.dtype))):
            return decoder
        logger.info("the preview decoder %s was not distilled from this model's VAE: linear previews",
                    latent_format.preview_decoder_file)
    except (OSError, ValueError, RuntimeError) as exc:
        logger.warning("preview decoder %s unusable (%s): linear previews", latent_format.preview_decoder_file, exc)
    return None


@torch.no_grad()
def fit_linear_decoder(bundle: ModelBundle, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Least-squares (W (C, 3), b (3,)) with picture(z) pooled to the latent grid ~= z^T W + b.

    The latents are the VAE encoder's means of smooth random-colour pictures (so they lie where sampled
    latents lie; plain Gaussian latents do not), in model space; the targets are those pictures pooled."""
    factor = bundle.vae_config.downsample_factor
    side = FIT_SIDE * factor
    generator = torch.Generator().manual_seed(seed)
    colours = torch.rand(FIT_SAMPLES, 3, 4, 4, generator=generator) * 2 - 1               # (N, 3, 4, 4)
    pictures = torch.nn.functional.interpolate(colours, size=(side, side), mode="bicubic").clamp(-1, 1)  # (N, 3, H, W)
    vae = bundle.vae
    z = bundle.to_model_latents(vae.encode(pictures.to(bundle.device, vae.dtype)).mean.to("cpu", torch.float32))
    channels = z.shape[1]                                                                  # z: (N, C, s, s)
    pooled = torch.nn.functional.avg_pool2d(pictures, factor)                             # (N, 3, s, s)
    inputs = z.permute(0, 2, 3, 1).reshape(-1, channels)                                  # (N*s*s, C)
    targets = pooled.permute(0, 2, 3, 1).reshape(-1, 3)                                   # (N*s*s, 3)
    design = torch.cat([inputs, torch.ones(len(inputs), 1)], dim=1)                       # (N*s*s, C+1)
    solution = torch.linalg.lstsq(design.double(), targets.double()).solution.float()    # (C+1, 3)
    return solution[:-1], solution[-1]


def jpeg_data_url(rgb: Tensor, min_side: int = 64) -> str:
    """A (h, w, 3) uint8 preview as a `data:image/jpeg;base64,...` URL, scaled up to `min_side` at least."""
    return "data:image/jpeg;base64," + base64.b64encode(jpeg_bytes(rgb, min_side)).decode("ascii")


def jpeg_bytes(rgb: Tensor, min_side: int = 64) -> bytes:
    buffer = io.BytesIO()
    preview_image(rgb, min_side).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def preview_image(rgb: Tensor, min_side: int = 64) -> Image.Image:
    """A (h, w, 3) uint8 preview as a picture, scaled up (bilinear, by a whole factor) to `min_side` at least."""
    image = Image.fromarray(rgb.numpy(), "RGB")
    scale = max(1, -(-min_side // max(1, min(image.size))))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.BILINEAR)
    return image


def batch_preview(rgbs: list[Tensor]) -> Tensor:
    """A1111's live preview of a batch (`State.set_current_image` under its default `show_progress_grid`:
    `samples_to_image_grid`): the pictures' (h, w, 3) uint8 previews in one grid as `images.image_grid` lays a batch
    out (`grid.cell_picture`: round(sqrt(n)) rows, on white), one picture's as it is."""
    if len(rgbs) == 1:
        return rgbs[0]
    grid = cell_picture([Image.fromarray(rgb.numpy(), "RGB") for rgb in rgbs])
    return torch.from_numpy(np.array(grid))                                    # (rows h, columns w, 3)
