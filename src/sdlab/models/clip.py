"""CLIP text transformer (SD1's CLIP ViT-L/14, SD2's OpenCLIP ViT-H/14, SDXL's pair).

(Model code to follow; the config is fixed first because loaders and families depend on it.)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CLIPTextConfig:
    """Shape of a CLIP text tower. Defaults are CLIP ViT-L/14 (SD1, SDXL's first encoder).

    Heads are 64 wide in every released text encoder: `heads = width // 64`.
    """

    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    activation: str = "quick_gelu"               # "gelu" for OpenCLIP towers (SD2, SDXL bigG)
    projection_dim: int | None = None            # text_projection output width (bigG: 1280, CLIP-L: 768)
    eos_token_id: int = 49407
    layer_norm_eps: float = 1e-5
