"""The latent-diffusion U-Net, with module names that mirror the original checkpoints.

(Model code to follow; the config is fixed first because loaders and families depend on it.)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class UNetConfig:
    """Shape of an LDM / SGM U-Net. Defaults are SD 1.x.

    Exactly one of `num_heads` (SD1: 8 heads at every level) and `head_dim` (SD2 / SDXL: 64-wide heads)
    is set; `heads_at(channels)` resolves it.
    """

    in_channels: int = 4                         # 9 for inpainting models: latent, mask, masked-image latent
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)  # per level, 0 = no attention there (SDXL: 0, 2, 10)
    transformer_depth_middle: int = 1            # SDXL base: 10
    num_heads: int | None = 8
    head_dim: int | None = None
    context_dim: int = 768                       # 1024 SD2, 2048 SDXL, 1280 SDXL refiner
    use_linear_proj: bool = False                # SD2 / SDXL: Linear proj_in/out; SD1: 1x1 conv
    adm_in_channels: int | None = None           # SDXL vector conditioning width (2816 base, 2560 refiner)
    upcast_attention: bool = False               # compute attention in fp32 (SD2.1 in fp16)
    norm_groups: int = 32

    def __post_init__(self) -> None:
        if (self.num_heads is None) == (self.head_dim is None):
            raise ValueError("UNetConfig: set exactly one of num_heads and head_dim")
        if len(self.transformer_depth) != len(self.channel_mult):
            raise ValueError("UNetConfig: transformer_depth needs one entry per channel_mult level")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    def heads_at(self, channels: int) -> int:
        """Number of attention heads in a transformer `channels` wide."""
        return self.num_heads if self.num_heads is not None else channels // self.head_dim
