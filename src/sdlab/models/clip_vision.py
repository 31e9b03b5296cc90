"""CLIP vision tower with its projection: the image encoder of IP-Adapter (ViT-H/14, ViT-bigG/14).

A Vision Transformer (Dosovitskiy et al. 2020) as CLIP trains it (Radford et al. 2021): the picture, 224 x 224
in CLIP's normalisation (`sdlab.pipeline.clip_image`), is cut into 14 x 14 patches by a strided convolution
without bias; a learned class token is put in front of the (224 / 14)^2 = 256 patch tokens, learned position
embeddings are added, then a LayerNorm ("pre_layrnorm", HF's spelling) and ``layers`` pre-norm blocks, the same
blocks as the text tower's (`sdlab.models.clip.CLIPEncoderLayer`) but attending over every position. The pooled
output is the class token's last state under ``post_layernorm``; ``visual_projection`` maps it to the image
embedding (``image_embeds``) that CLIP compares with text.

Parameter names are those of Hugging Face's ``CLIPVisionModelWithProjection`` without the ``vision_model.``
prefix (``embeddings.class_embedding``, ``embeddings.patch_embedding.weight``, ``pre_layrnorm.weight``,
``encoder.layers.{i}.self_attn.q_proj.weight``, ``post_layernorm.weight``), plus ``visual_projection.weight``.
No ``position_ids`` buffer: positions are ``arange``.

IP-Adapter reads ``image_embeds`` (base adapters) or ``hidden_states[-2]``, the penultimate layer's output
without a norm (Plus adapters).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sdlab.models.clip import CLIPEncoderLayer


@dataclass(frozen=True)
class CLIPVisionConfig:
    """Shape of a CLIP vision tower. Defaults are OpenCLIP ViT-H/14 (laion2B), IP-Adapter's SD1.5 encoder."""

    width: int = 1280
    layers: int = 32
    heads: int = 16
    mlp_width: int = 5120
    patch_size: int = 14
    image_size: int = 224
    projection_dim: int = 1024
    activation: str = "gelu"                  # "quick_gelu" for OpenAI's towers (ViT-L/14)
    layer_norm_eps: float = 1e-5

    @property
    def positions(self) -> int:
        """The class token and one token per patch."""
        return (self.image_size // self.patch_size) ** 2 + 1


VIT_H_14 = CLIPVisionConfig()
"""OpenCLIP ViT-H/14: h94/IP-Adapter `models/image_encoder` (SD1.5 adapters, SDXL `*_vit-h` adapters)."""
VIT_BIGG_14 = CLIPVisionConfig(width=1664, layers=48, heads=16, mlp_width=8192, projection_dim=1280)
"""OpenCLIP ViT-bigG/14: h94/IP-Adapter `sdxl_models/image_encoder` (SDXL base adapters)."""
KNOWN_TOWERS = {"ViT-H/14": VIT_H_14, "ViT-bigG/14": VIT_BIGG_14}


@dataclass(frozen=True)
class CLIPVisionOutput:
    """hidden_states: the pre-LayerNorm'd embeddings, then each layer's output, ``layers + 1`` tensors of
    (B, positions, width); image_embeds: the projected, post-LayerNorm'd class token, (B, projection_dim)."""

    hidden_states: tuple[Tensor, ...]
    image_embeds: Tensor


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.width))
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.positions, cfg.width)

    def forward(self, pixels: Tensor) -> Tensor:
        """pixels: (B, 3, image_size, image_size) -> (B, positions, width)"""
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))     # (B, D, g, g)
        patches = patches.flatten(2).transpose(1, 2)                                     # (B, g*g, D)
        cls = self.class_embedding.to(patches.dtype).expand(len(patches), 1, -1)        # (B, 1, D)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight        # (B, 1 + g*g, D)


class CLIPVisionEncoder(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg, causal=False) for _ in range(cfg.layers))


class CLIPVisionModel(nn.Module):
    """CLIP vision tower + projection; ``forward(pixels)`` with pixels from `sdlab.pipeline.clip_image`."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"width {cfg.width} is not divisible by {cfg.heads} heads")
        self.cfg = cfg
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.encoder = CLIPVisionEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.visual_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    def forward(self, pixels: Tensor) -> CLIPVisionOutput:
        """pixels: (B, 3, image_size, image_size), CLIP-normalised."""
        size = self.cfg.image_size
        if pixels.shape[-2:] != (size, size):
            raise ValueError(f"the image encoder takes {size}x{size} pictures, got {tuple(pixels.shape[-2:])}")
        x = self.pre_layrnorm(self.embeddings(pixels))                                  # (B, P, D)
        hidden_states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            hidden_states.append(x)
        pooled = self.post_layernorm(x[:, 0])                                           # (B, D)
        return CLIPVisionOutput(hidden_states=tuple(hidden_states), image_embeds=self.visual_projection(pooled))
