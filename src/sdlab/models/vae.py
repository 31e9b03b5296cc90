"""AutoencoderKL (the SD VAE), with module names that mirror the original checkpoints.

(Model code to follow; the config is fixed first because loaders and families depend on it.)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VAEConfig:
    """Shape of an LDM AutoencoderKL. Defaults are the SD / SDXL VAE (f=8, 4 latent channels).

    The latent scaling factor (0.18215 / 0.13025) is a property of the model family, not of the VAE.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # downsampling factor is 2 ** (len(channel_mult) - 1)
    num_res_blocks: int = 2
    norm_groups: int = 32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)
