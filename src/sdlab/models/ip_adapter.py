"""IP-Adapter (Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image Diffusion
Models"): a picture as a prompt, through extra tokens and a second cross-attention in every transformer block.

    tokens = LayerNorm(reshape(proj(image_embeds), (T, C_ctx)))              image_proj, base adapters (T = 4)
    tokens = Resampler(hidden_states[-2])                                     image_proj, Plus adapters (T = 16)
    tokens = LayerNorm(Linear(GELU(Linear(hidden_states[-2]))))              image_proj, Full-face (T = positions)
    tokens = LayerNorm(reshape(Linear(GELU(Linear(face_embeds))), (T, C)))  image_proj, FaceID (T = 4 or 16)
    tokens = Resampler(hidden_states[-2], latents = FaceID's tokens)          image_proj, FaceID Plus (T = 4)
             [+ FaceID's tokens * shortcut scale]                             ... Plus v2 (`shortcut`)
    attn2(x) = to_out(softmax(q k^T) v + scale * softmax(q k_ip^T) v_ip)     per cross-attention, same q

with k = to_k(text context), v = to_v(text context) as before and k_ip = to_k_ip(tokens), v_ip = to_v_ip(tokens)
from the adapter's own projections ("decoupled cross-attention", section 3.2, eq. 5). `image_embeds` is the
CLIP image encoder's projected class token (`models.clip_vision`); Plus adapters read the encoder's penultimate
hidden states instead, through a Perceiver resampler (Jaegle et al. 2021; Flamingo's): T learned latents
attend, in `depth` blocks, to the projected patch tokens and themselves. Several adapters add one term each.

Parameter names are those of h94/IP-Adapter's files: ``image_proj.proj``, ``image_proj.norm``, and
``ip_adapter.{n}.to_k_ip`` / ``to_v_ip`` where n = 2k + 1 for the k-th cross-attention counted over
the input blocks, then the output blocks, then the middle block (diffusers' ``attn_processors`` order: every
attention has a number, the self-attentions the even ones). `cross_attentions` lists them in that order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sdlab.models import cpu_linear, generation_memo
from sdlab.models.layers import attention


@dataclass(frozen=True)
class ResamplerConfig:
    """A Plus adapter's resampler: its width, blocks, heads (64 wide) and feed-forward ratio."""

    width: int
    depth: int
    heads: int
    ff_mult: int = 4
    head_dim: int = 64


@dataclass(frozen=True)
class IPAdapterConfig:
    """embed_dim: the width of what the image projection reads: the image embedding (the image encoder's
    projection_dim: ViT-H/14 1024, bigG 1280), for a Plus adapter (`resampler`) the encoder's hidden states (its
    width: ViT-H/14 1280); context_dim: the U-Net's text-context width; tokens: image tokens (base: 4, Plus: 16);
    widths: each cross-attention's width, in `cross_attentions` order."""

    embed_dim: int
    context_dim: int
    tokens: int
    widths: tuple[int, ...]
    resampler: ResamplerConfig | None = None
    full: bool = False          # the Full-face adapter's MLP over every hidden state (`tokens`: 0, the encoder's)
    face_id: bool = False       # FaceID's MLP over an InsightFace face embedding (`embed_dim` wide) ...
    mlp_width: int = 0          # ... through a `mlp_width`-wide hidden layer
    # FaceID Plus: a resampler whose latents are FaceID's tokens, over `clip_width`-wide encoder hidden states
    face_resampler: ResamplerConfig | None = None
    clip_width: int = 0
    unet_lora: bool = False     # the file also holds a LoRA for the U-Net's attentions (ip-adapter-faceid_sd15)

    @property
    def face_id_plus(self) -> bool:
        """Whether this is a FaceID Plus adapter (reads a face embedding and a picture's hidden states)."""
        return self.face_resampler is not None


class ImageProjection(nn.Module):
    """Image embedding -> `tokens` context tokens (diffusers' `ImageProjection`, IP-Adapter's `ImageProjModel`)."""

    def __init__(self, cfg: IPAdapterConfig):
        super().__init__()
        self.tokens = cfg.tokens
        self.proj = nn.Linear(cfg.embed_dim, cfg.tokens * cfg.context_dim)
        self.norm = nn.LayerNorm(cfg.context_dim)

    def forward(self, image_embeds: Tensor) -> Tensor:
        """image_embeds: (B, embed_dim) -> (B, tokens, context_dim)"""
        x = self.proj(image_embeds.to(self.proj.weight.dtype))                   # (B, T * C)
        return self.norm(x.reshape(len(x), self.tokens, -1))                      # (B, T, C)


class FullImageProjection(nn.Module):
    """The Full-face adapter's image projection (diffusers' `IPAdapterFullImageProjection`, IP-Adapter's
    `MLPProjModel`): each of the encoder's penultimate hidden states through Linear (E -> E), GELU, Linear (E -> C)
    and LayerNorm, one token per position. Names as in h94's file: proj.0, proj.2, proj.3 (the LayerNorm)."""

    def __init__(self, cfg: IPAdapterConfig):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(cfg.embed_dim, cfg.embed_dim), nn.GELU(),
                                  nn.Linear(cfg.embed_dim, cfg.context_dim), nn.LayerNorm(cfg.context_dim))

    def forward(self, hidden_states: Tensor) -> Tensor:
        """hidden_states: (B, N, embed_dim) -> (B, N, context_dim)"""
        return self.proj(hidden_states.to(self.proj[0].weight.dtype))             # (B, N, C)


class FaceIDProjection(nn.Module):
    """FaceID's image projection (diffusers' `IPAdapterFaceIDImageProjection`, IP-Adapter's faceid
    `MLPProjModel`): a face embedding through Linear (E -> H), GELU, Linear (H -> T * C), then each of the T
    tokens LayerNorm'd. Names as in h94's files: proj.0, proj.2, norm."""

    def __init__(self, cfg: IPAdapterConfig):
        super().__init__()
        self.tokens = cfg.tokens
        self.proj = nn.Sequential(nn.Linear(cfg.embed_dim, cfg.mlp_width), nn.GELU(),
                                  nn.Linear(cfg.mlp_width, cfg.tokens * cfg.context_dim))
        self.norm = nn.LayerNorm(cfg.context_dim)

    def forward(self, face_embeds: Tensor) -> Tensor:
        """face_embeds: (B, embed_dim) -> (B, tokens, context_dim)"""
        x = self.proj(face_embeds.to(self.proj[0].weight.dtype))                  # (B, T * C)
        return self.norm(x.reshape(len(x), self.tokens, -1))                      # (B, T, C)


class PerceiverAttention(nn.Module):
    """The latents attend to [image tokens, latents] (both LayerNorm'd), heads `head_dim` wide; no output bias."""

    def __init__(self, cfg: ResamplerConfig):
        super().__init__()
        inner = cfg.heads * cfg.head_dim
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(cfg.width)
        self.norm2 = nn.LayerNorm(cfg.width)
        self.to_q = nn.Linear(cfg.width, inner, bias=False)
        self.to_kv = nn.Linear(cfg.width, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, cfg.width, bias=False)

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:
        """x: (B, N, W) image tokens, latents: (B, T, W) -> (B, T, W)"""
        x, latents = self.norm1(x), self.norm2(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)          # 2 x (B, N + T, inner)
        return self.to_out(attention(self.to_q(latents), k, v, self.heads))        # (B, T, W)


class PerceiverResampler(nn.Module):
    """Latents (B, T, W) attend, in `depth` blocks, to projected hidden states (B, N, E); -> (B, T, C_ctx).
    Names as in h94's files: proj_in, layers.{i}.0 (attention), layers.{i}.1 (LayerNorm, Linear, GELU, Linear),
    proj_out, norm_out (FaceID Plus' `perceiver_resampler`, IP-Adapter's FacePerceiverResampler)."""

    def __init__(self, embed_dim: int, context_dim: int, r: ResamplerConfig):
        super().__init__()
        self.proj_in = nn.Linear(embed_dim, r.width)
        self.layers = nn.ModuleList(nn.ModuleList([
            PerceiverAttention(r),
            nn.Sequential(nn.LayerNorm(r.width), nn.Linear(r.width, r.ff_mult * r.width, bias=False), nn.GELU(),
                          nn.Linear(r.ff_mult * r.width, r.width, bias=False)),
        ]) for _ in range(r.depth))
        self.proj_out = nn.Linear(r.width, context_dim)
        self.norm_out = nn.LayerNorm(context_dim)

    def resample(self, hidden_states: Tensor, latents: Tensor) -> Tensor:
        """hidden_states: (B, N, embed_dim), latents: (B, T, W) -> (B, T, context_dim)"""
        x = self.proj_in(hidden_states.to(self.proj_in.weight.dtype))               # (B, N, W)
        latents = latents.to(x.dtype)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))                                 # (B, T, C)


class Resampler(PerceiverResampler):
    """IP-Adapter Plus' image projection (diffusers' `IPAdapterPlusImageProjection`): `tokens` learned latents
    (``latents``) resample the hidden states (B, N, E) -> (B, T, C_ctx)."""

    def __init__(self, cfg: IPAdapterConfig):
        r = cfg.resampler
        assert r is not None
        super().__init__(cfg.embed_dim, cfg.context_dim, r)
        self.latents = nn.Parameter(torch.zeros(1, cfg.tokens, r.width))

    def forward(self, hidden_states: Tensor) -> Tensor:
        """hidden_states: (B, N, embed_dim) -> (B, tokens, context_dim)"""
        return self.resample(hidden_states, self.latents.expand(len(hidden_states), -1, -1))   # (B, T, C)


class FaceIDPlusProjection(FaceIDProjection):
    """FaceID Plus' image projection (diffusers' `IPAdapterFaceIDPlusImageProjection`, IP-Adapter's
    `ProjPlusModel`): FaceID's T tokens of the face embedding are the latents of a resampler over the picture's
    penultimate hidden states; Plus v2 adds the face tokens back, `shortcut` times the resampler's output. Names as
    in h94's files: proj.0, proj.2, norm, perceiver_resampler.*."""

    def __init__(self, cfg: IPAdapterConfig):
        super().__init__(cfg)
        assert cfg.face_resampler is not None
        self.perceiver_resampler = PerceiverResampler(cfg.clip_width, cfg.context_dim, cfg.face_resampler)

    def forward(self, face_embeds: Tensor, hidden_states: Tensor, shortcut: float | None = None) -> Tensor:
        """face_embeds: (B, embed_dim), hidden_states: (B, N, clip_width) -> (B, tokens, context_dim)"""
        faces = super().forward(face_embeds)                                          # (B, T, C)
        out = self.perceiver_resampler.resample(hidden_states, faces)                 # (B, T, C)
        return out if shortcut is None else faces + shortcut * out


class DecoupledKV(nn.Module):
    """One cross-attention's key and value projections of the image tokens."""

    def __init__(self, context_dim: int, width: int):
        super().__init__()
        self.to_k_ip = nn.Linear(context_dim, width, bias=False)
        self.to_v_ip = nn.Linear(context_dim, width, bias=False)


class IPAdapter(nn.Module):
    def __init__(self, cfg: IPAdapterConfig):
        super().__init__()
        self.cfg = cfg
        self.image_proj = (Resampler(cfg) if cfg.resampler is not None else FullImageProjection(cfg) if cfg.full
                           else FaceIDPlusProjection(cfg) if cfg.face_id_plus
                           else FaceIDProjection(cfg) if cfg.face_id else ImageProjection(cfg))
        self.ip_adapter = nn.ModuleDict({str(2 * k + 1): DecoupledKV(cfg.context_dim, width)
                                         for k, width in enumerate(cfg.widths)})

    @property
    def reads_hidden_states(self) -> bool:
        """Whether the image projection reads the encoder's penultimate hidden states (Plus, Full-face), not
        image_embeds."""
        return self.cfg.resampler is not None or self.cfg.full

    def layers(self) -> list[DecoupledKV]:
        """The k/v projections in `cross_attentions` order."""
        return [self.ip_adapter[str(2 * k + 1)] for k in range(len(self.cfg.widths))]


def cross_attentions(unet: nn.Module) -> list[nn.Module]:
    """The U-Net's text cross-attentions (each transformer block's `attn2`) in IP-Adapter's order: input blocks,
    output blocks, middle block (diffusers registers `up_blocks` before `mid_block`)."""
    return all_attentions(unet)[1::2]


def all_attentions(unet: nn.Module) -> list[nn.Module]:
    """Every attention of the U-Net in IP-Adapter's numbering (diffusers' ``attn_processors`` order): each
    transformer block's `attn1` (2k) and `attn2` (2k + 1), over the input, output, then middle blocks. A FaceID
    file's U-Net LoRA (``ip_adapter.{n}.to_q_lora`` ...) names the attentions by these numbers."""
    blocks = [*unet.input_blocks, *unet.output_blocks, unet.middle_block]
    return [attn for block in blocks for module in block.modules() if hasattr(module, "attn2")
            for attn in (module.attn1, module.attn2)]


class ImagePrompt:
    """One U-Net call's image prompts: for each adapter its tokens (B, T_i, C_ctx) and scale, one number or one
    per cross-attention (InstantStyle's per-layer scales), and which of the U-Net's cross-attentions
    (`cross_attentions`) each of its k/v projections serves. The cross-attention asks `attended(attention, q)` for
    the sum of scale * softmax(q k_ip^T / sqrt(d)) v_ip over the adapters; a scale of 0 skips the term, as
    diffusers' IPAdapterAttnProcessor does."""

    def __init__(self, attentions: Sequence[nn.Module],
                 adapters: Sequence[tuple[IPAdapter, Tensor, float | Sequence[float]]]):
        self.by_attention: dict[nn.Module, list[tuple[DecoupledKV, Tensor, float]]] = {a: [] for a in attentions}
        for adapter, tokens, scale in adapters:
            layers = adapter.layers()
            scales = [float(scale)] * len(attentions) if isinstance(scale, (int, float)) else list(map(float, scale))
            if len(layers) != len(attentions) or len(scales) != len(attentions):
                raise ValueError(f"ImagePrompt: an IP-Adapter of {len(layers)} cross-attentions and {len(scales)} "
                                 f"scales on a U-Net of {len(attentions)}")
            for attn, kv, layer_scale in zip(attentions, layers, scales):
                if layer_scale != 0.0:
                    self.by_attention[attn].append((kv, tokens, layer_scale))

    def attended(self, attn: nn.Module, q: Tensor) -> Tensor | None:
        """q: (B, N, C) the cross-attention's queries -> (B, N, C), or None where no adapter serves `attn`."""
        total = None
        for kv, tokens, scale in self.by_attention.get(attn, ()):
            tokens = tokens.to(q.dtype)                                          # (B, T, C_ctx)
            k, v = generation_memo.reused(                                       # 2 x (B, T, C), once per generation
                (kv.to_k_ip, kv.to_v_ip), tokens,
                lambda: (cpu_linear.linear(tokens, kv.to_k_ip), cpu_linear.linear(tokens, kv.to_v_ip)))
            out = attention(q, k, v, attn.heads, attn.upcast) * scale            # (B, N, C)
            total = out if total is None else total + out
        return total


def embeds_tokens(adapter: IPAdapter, embeds: Tensor) -> tuple[Tensor, Tensor]:
    """A base or FaceID adapter's tokens of embeddings (N, embed_dim) (a picture's image_embeds, or N faces') and
    of zero embeddings, the negative rows (diffusers' `encode_image` gives `zeros_like(image_embeds)`, its FaceID
    examples `zeros_like` of the faces'), projected together as diffusers projects both halves of its batch:
    2 x (N, T, C_ctx)."""
    with torch.no_grad():
        both = adapter.image_proj(torch.cat([embeds, torch.zeros_like(embeds)]))              # (2N, T, C_ctx)
    tokens, negative = both.chunk(2)
    return tokens, negative
