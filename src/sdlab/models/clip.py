"""CLIP text transformer (SD1's CLIP ViT-L/14, SD2's OpenCLIP ViT-H/14, SDXL's CLIP-L + OpenCLIP bigG/14).

A pre-LayerNorm causal transformer (Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision", section 2.4): token + learned position embeddings, ``layers`` blocks of
``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``, a final LayerNorm, and optionally a linear projection of
the end-of-text token ("pooled" output).

Parameter names are those of Hugging Face's ``CLIPTextModel.text_model`` without the ``text_model.``
prefix (``embeddings.token_embedding.weight``, ``encoder.layers.{i}.self_attn.q_proj.weight``,
``final_layer_norm.weight``...), plus ``text_projection.weight`` laid out as HF's
``CLIPTextModelWithProjection`` (an ``nn.Linear(width, projection_dim, bias=False)``). OpenCLIP towers
are converted to these names by ``sdlab.checkpoints.openclip``. There is no ``position_ids`` buffer:
positions are ``arange(T)`` (checkpoint loaders drop stored ``position_ids``, often corrupted floats).

Which output each family feeds the U-Net (``out = model(ids, ...)``):

- SD1: ``out.last_hidden_state`` (last layer + final LayerNorm). A1111's "clip skip n" takes
  ``hidden_states[-n]`` and applies the final LayerNorm: ``model(ids, num_layers=layers - (n - 1))``
  gives exactly that as ``last_hidden_state`` without running the skipped layers.
- SD2: penultimate layer + final LayerNorm: ``model(ids, num_layers=layers - 1).last_hidden_state``
  (OpenCLIP's ``layer="penultimate"``).
- SDXL: ``hidden_states[-2]`` *without* the final LayerNorm from both encoders, concatenated on the
  feature axis (768 + 1280 = 2048); the pooled vector is bigG's projected ``out.pooled`` (full run).
  CLIP-L can stop early: ``model_l(ids, num_layers=11).hidden_states[-1]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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


@dataclass(frozen=True)
class CLIPTextOutput:
    """What one forward pass returns.

    hidden_states: embedding output, then the output of each layer that ran, ``num_layers + 1`` tensors
        of shape (B, T, width), none of them normalised.
    last_hidden_state: final LayerNorm of ``hidden_states[-1]``, (B, T, width).
    pooled: final-LayerNorm'd state at the first end-of-text token, projected by ``text_projection``
        when the config has one, (B, projection_dim or width). ``None`` when ``num_layers`` stopped early,
        since it is defined only for the full tower.
    """

    hidden_states: tuple[Tensor, ...]
    last_hidden_state: Tensor
    pooled: Tensor | None


def quick_gelu(x: Tensor) -> Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}      # "gelu" is the exact erf form, as nn.GELU()


class CLIPTextEmbeddings(nn.Module):
    """Token + position embeddings. Ids from ``vocab_size`` on name rows of ``added_tokens`` (K, D): the
    vectors of textual-inversion embeddings, as diffusers' ``load_textual_inversion`` appends rows to the
    token table. They are not weights of the model (no state-dict entry)."""

    added_tokens: Tensor | None

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)
        self.register_buffer("added_tokens", None, persistent=False)

    def forward(self, input_ids: Tensor) -> Tensor:
        T = input_ids.shape[1]
        if T > self.position_embedding.num_embeddings:
            raise ValueError(f"{T} tokens exceed the {self.position_embedding.num_embeddings} positions")
        return self.token_vectors(input_ids) + self.position_embedding.weight[:T]   # (B, T, D)

    def token_vectors(self, input_ids: Tensor) -> Tensor:
        vocab = self.token_embedding.num_embeddings
        added = input_ids >= vocab                                                    # (B, T)
        if not added.any():
            return self.token_embedding(input_ids)                                    # (B, T, D)
        if self.added_tokens is None or int(input_ids.max()) >= vocab + self.added_tokens.shape[0]:
            raise ValueError(f"token id {int(input_ids.max())} is past the vocabulary and the added tokens")
        base = self.token_embedding(input_ids.clamp(max=vocab - 1))                   # (B, T, D)
        extra = self.added_tokens.to(base.dtype)[(input_ids - vocab).clamp(min=0)]    # (B, T, D)
        return torch.where(added.unsqueeze(-1), extra, base)


class CLIPAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (HF layout): causal in the text tower, over
    every position in the vision tower (`causal=False`, `sdlab.models.clip_vision`)."""

    def __init__(self, cfg: CLIPTextConfig, causal: bool = True):
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"width {cfg.width} is not divisible by {cfg.heads} heads")
        self.heads = cfg.heads
        self.causal = causal
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape

        def split_heads(t: Tensor) -> Tensor:
            return t.view(B, T, self.heads, D // self.heads).transpose(1, 2)   # (B, H, T, D/H)

        q, k, v = split_heads(self.q_proj(x)), split_heads(self.k_proj(x)), split_heads(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)    # (B, H, T, D/H), scale D/H^-0.5
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))              # (B, T, D)


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        if cfg.activation not in _ACTIVATIONS:
            raise ValueError(f"activation {cfg.activation!r} is not one of {sorted(_ACTIVATIONS)}")
        self.act = _ACTIVATIONS[cfg.activation]
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))                                # (B, T, D)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(ln1(x)), then x + mlp(ln2(x)). `cfg` needs width, heads, mlp_width,
    activation and layer_norm_eps (a text or a vision config)."""

    def __init__(self, cfg: CLIPTextConfig, causal: bool = True):
        super().__init__()
        self.self_attn = CLIPAttention(cfg, causal)
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))                              # (B, T, D)


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.layers))


class CLIPTextModel(nn.Module):
    """CLIP text tower; ``forward(input_ids)`` with ids from ``sdlab.models.tokenizer``, (B, T<=77)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.text_projection = (
            nn.Linear(cfg.width, cfg.projection_dim, bias=False) if cfg.projection_dim is not None else None
        )

    def forward(self, input_ids: Tensor, *, num_layers: int | None = None) -> CLIPTextOutput:
        """Run the embeddings and the first ``num_layers`` blocks (all by default).

        Stopping early skips the work that clip skip / penultimate-layer conditioning throws away; the
        outputs are then those of a tower truncated after ``num_layers`` blocks and ``pooled`` is None.
        """
        n = self.cfg.layers if num_layers is None else num_layers
        if not 0 <= n <= self.cfg.layers:
            raise ValueError(f"num_layers={num_layers} outside 0..{self.cfg.layers}")
        x = self.embeddings(input_ids)                                        # (B, T, D)
        hidden_states = [x]
        for layer in self.encoder.layers[:n]:
            x = layer(x)
            hidden_states.append(x)
        last = self.final_layer_norm(x)                                       # (B, T, D)
        pooled = self.pool(last, input_ids) if n == self.cfg.layers else None
        return CLIPTextOutput(hidden_states=tuple(hidden_states), last_hidden_state=last, pooled=pooled)

    def pool(self, last_hidden_state: Tensor, input_ids: Tensor) -> Tensor:
        """State at the first ``eos_token_id`` of each row (argmax of the ids where a row has none, as
        OpenAI CLIP, where the end token is the largest id), then ``text_projection`` if present."""
        is_eos = input_ids == self.cfg.eos_token_id                           # (B, T)
        index = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), input_ids.argmax(dim=1))  # (B,)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        pooled = last_hidden_state[rows, index.to(last_hidden_state.device)]  # (B, D)
        return self.text_projection(pooled) if self.text_projection is not None else pooled
