"""New models: a bundle of freshly initialised networks for a family, full size or reduced width.

Training from scratch starts here, and so do tests and demos that need a checkpoint without
downloading one. Reduced-width ("tiny") configs follow the family conventions (SD1 U-Net: 8 heads;
SD2 / SDXL U-Net and every text encoder: 64-wide heads; 32 GroupNorm groups), so a saved tiny model
loads exactly as a released file of its family does. A tiny model's native size is `TINY_SIZE` (64 px, as
sdlab-tiny), not its family's 512 / 768 / 1024: it is recorded in the file (`modelspec.resolution`), so
drawing and training with it default to 64 px.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from sdlab.families import FamilySpec, get_family
from sdlab.families.loaded import ModelBundle, TextEncoder
from sdlab.models.clip import CLIPTextConfig
from sdlab.models.layers import SDXL_SIZE_EMBED_DIM
from sdlab.models.tokenizer import default_tokenizer
from sdlab.models.unet import UNetConfig
from sdlab.models.vae import VAEConfig

TINY_VAE = VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1)
TINY_SIZE = 64                                                      # pixels per side


def _tiny_text_width(full_width: int) -> int:
    """64 for towers up to 1024 wide (CLIP-L, OpenCLIP-H), 128 for wider ones (OpenCLIP bigG)."""
    return 64 if full_width <= 1024 else 128


def tiny_text_configs(family: FamilySpec) -> tuple[CLIPTextConfig, ...]:
    """Two-layer text towers, 64 or 128 wide, one per text encoder of the family."""
    configs = []
    for te in family.text_encoders:
        width = _tiny_text_width(te.config.width)
        configs.append(replace(
            te.config, width=width, layers=2, heads=width // 64, mlp_width=2 * width,
            projection_dim=width if te.config.projection_dim is not None else None,
        ))
    return tuple(configs)


def tiny_unet_config(family: FamilySpec) -> UNetConfig:
    """A two-level U-Net with every code path of the family (attention, linear proj, added vector)."""
    texts = tiny_text_configs(family)
    context = sum(c.width for c in texts)
    base = family.unet
    conditioner = family.conditioner
    if conditioner.added_vector:                       # pooled text + size/crop (+ aesthetic) embeddings, 256 each
        pooled = texts[-1].projection_dim if conditioner.pooled else 0
        return replace(
            base, model_channels=64, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(0, 2),
            transformer_depth_middle=2, context_dim=context,
            adm_in_channels=pooled + conditioner.num_size_numbers * SDXL_SIZE_EMBED_DIM,
        )
    width = 32 if base.num_heads is not None else 64                 # SD1: 8 heads of 4; SD2: one 64-wide head
    return replace(
        base, model_channels=width, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1),
        transformer_depth_middle=1, context_dim=context,
    )


def new_bundle(
    family: FamilySpec | str,
    *,
    tiny: bool = False,
    unet: UNetConfig | None = None,
    vae: VAEConfig | None = None,
    text: tuple[CLIPTextConfig, ...] | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> ModelBundle:
    """Freshly initialised networks (PyTorch's default init, seeded) for `family`.

    Configs default to the family's full size, or its reduced-width variant with `tiny=True` (native size
    `TINY_SIZE`).
    """
    family = get_family(family) if isinstance(family, str) else family
    text = text or (tiny_text_configs(family) if tiny else tuple(te.config for te in family.text_encoders))
    unet = unet or (tiny_unet_config(family) if tiny else family.unet)
    vae = vae or (TINY_VAE if tiny else family.vae)
    if len(text) != len(family.text_encoders):
        raise ValueError(f"family {family.name} has {len(family.text_encoders)} text encoders, got {len(text)} configs")
    torch.manual_seed(seed)
    with torch.device(device):
        encoders = tuple(
            TextEncoder(spec=spec, config=cfg, model=family.text_module(cfg).eval(),
                        tokenizer=default_tokenizer(spec.pad_token_id))
            for spec, cfg in zip(family.text_encoders, text)
        )
        return ModelBundle(
            family=family,
            unet=family.unet_module(unet).eval(),
            vae=family.vae_module(vae).eval(),
            text_encoders=encoders,
            prediction=family.prediction,
            scaling_factor=family.latent_scaling_factor,
            unet_config=unet,
            vae_config=vae,
            native_size=TINY_SIZE if tiny else None,
        )
