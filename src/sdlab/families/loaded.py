"""A loaded model: the record `sdlab.checkpoints` produces and the pipeline and training consume.

`ModelBundle` holds the networks of one Stable Diffusion model and the facts needed to run them;
`TextEncoder` one of its text towers with its tokenizer. Defined here, below the loaders, so that code which
only runs a model names the type without importing a loader.

Imports `models` and `diffusion` (through the family spec) only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sdlab.diffusion.denoiser import Prediction
from sdlab.diffusion.guidance import needs_uncond
from sdlab.diffusion.model_sampling import ModelSampling
from sdlab.families.base import EDMSpec, FamilySpec, ScheduleSpec, TextEncoderSpec
from sdlab.families.latent_format import LatentStats
from sdlab.models.clip import CLIPTextConfig, CLIPTextModel
from sdlab.models.tokenizer import CLIPTokenizer
from sdlab.models.unet import UNet, UNetConfig
from sdlab.models.vae import AutoencoderKL, VAEConfig


@dataclass(frozen=True)
class TextEncoder:
    spec: TextEncoderSpec                   # layout, hidden state used, pad token
    config: CLIPTextConfig
    model: CLIPTextModel
    tokenizer: CLIPTokenizer


@dataclass(frozen=True)
class ModelBundle:
    """The networks of one Stable Diffusion model and the facts needed to run them."""

    family: FamilySpec
    unet: UNet
    vae: AutoencoderKL
    text_encoders: tuple[TextEncoder, ...]
    prediction: Prediction
    scaling_factor: float
    unet_config: UNetConfig
    vae_config: VAEConfig
    source: str | None = None
    report: Any = None                      # the `sdlab.checkpoints.plan.LoadReport` it was loaded from, if any
    native_size: int | None = None          # side it was trained at (`modelspec.resolution`; a diffusers
                                            # folder: unet `sample_size` x the VAE factor)
    preset: str | None = None               # few-step preset the file names (metadata `sdlab.preset`), e.g. "lcm"
    schedule: ScheduleSpec | None = None    # training schedule the model declares (zero terminal SNR, ...);
                                            # None: its family's
    zero_empty_negative: bool | None = None  # whether an empty negative prompt is a zero conditioning, as a
                                            # diffusers folder says (`force_zeros_for_empty_prompt`); None:
                                            # its family's (`ConditionerSpec.zero_empty_negative`)
    noise_model: EDMSpec | None = None      # a continuous EDM noise model the model declares in place of the
                                            # DDPM `schedule` (Playground v2.5, CosXL); None: discrete
    steps_offset: int = 1                   # what diffusers' leading spacing adds to its timesteps (a diffusers
                                            # folder's `steps_offset`, where its pipeline keeps it: SDXL's; a
                                            # saved file's `sdlab.steps_offset`)
    latent_stats: LatentStats | None = None  # per-channel latents mean / std its latents are normalised by
                                            # (Playground v2.5); None: scaling alone

    @property
    def text_configs(self) -> tuple[CLIPTextConfig, ...]:
        return tuple(te.config for te in self.text_encoders)

    @property
    def default_size(self) -> int:
        """The model's native side in pixels: the file's `modelspec.resolution` (a diffusers folder's
        `sample_size`), else the family's."""
        return self.native_size or self.family.size_for(self.prediction)

    @property
    def model_sampling(self) -> ModelSampling:
        """The noise parameterisation to sample (and train) this model with: its continuous EDM noise model
        where it declares one (`noise_model`), else its family's, for its prediction, on the schedule the model
        declares (`schedule`) where it declares one."""
        if self.noise_model is not None:
            return self.noise_model.build(self.prediction)
        return self.family.model_sampling(self.prediction, self.schedule)

    def to_model_latents(self, z_vae: Tensor) -> Tensor:
        """VAE latents -> the latents the U-Net sees: ``z_vae * scaling_factor``, or normalised by the model's
        per-channel statistics (`latent_stats`) first."""
        if self.latent_stats is not None:
            return self.latent_stats.to_model(z_vae, self.scaling_factor)
        return z_vae * self.scaling_factor

    def to_vae_latents(self, z: Tensor) -> Tensor:
        """The U-Net's latents -> what the VAE decoder takes (the inverse of `to_model_latents`)."""
        if self.latent_stats is not None:
            return self.latent_stats.to_vae(z, self.scaling_factor)
        return z / self.scaling_factor

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def runs_uncond(self, cfg_scale: float, cfg_pp: bool = False) -> bool:
        """Whether guidance at `cfg_scale` runs the negative prompt's U-Net pass: where ``needs_uncond`` says so
        (CFG above 1, or a CFG++ sampler), never on a U-Net that takes the CFG scale as an input instead (a
        guidance embedding, ``time_cond_proj_dim``: LCM-distilled models)."""
        return needs_uncond(cfg_scale, cfg_pp) and self.unet_config.time_cond_proj_dim is None


__all__ = ["ModelBundle", "TextEncoder"]
