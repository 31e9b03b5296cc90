"""The latent-diffusion U-Net, with module names that mirror the original checkpoints.

Parameter names are those of CompVis LDM / Stability SGM `openaimodel.UNetModel` without the
`model.diffusion_model.` prefix, so an original checkpoint loads by stripping that prefix and what we train
saves in the layout every other tool reads. With R = num_res_blocks and L = len(channel_mult) levels:

    input_blocks.0          conv_in (in_channels -> model_channels)                         at 1/1
    input_blocks.1 .. R     level 0: [ResBlock, SpatialTransformer if level 0 has one] at 1/1
    input_blocks.R+1        Downsample (`.0.op`, stride-2 conv)                               1/1 -> 1/2
    input_blocks.R+2 ..     level 1: R more [ResBlock, SpatialTransformer?], then Downsample, ...
                            (no Downsample after the last level)
    middle_block            .0 ResBlock, .1 SpatialTransformer(transformer_depth_middle), .2 ResBlock (or .0
                            alone: `middle_transformer` False, diffusers' UNetMidBlock2D)
    output_blocks.0 .. R    level L-1: [ResBlock(on concat with a skip), SpatialTransformer?], the last
                            of the R+1 also gets Upsample (`.conv`) at index 1 or 2 (after the transformer)
    output_blocks.R+1 ..    level L-2, ... down to level 0 (which has no Upsample)
    out                     .0 GroupNorm, .1 SiLU, .2 conv_out (model_channels -> out_channels)

SD 1.x (R=2, channel_mult (1, 2, 4, 4), transformer_depth (1, 1, 1, 0)) therefore reads

    input_blocks   0 conv | 1 2 res+attn 320 @64 | 3 down | 4 5 res+attn 640 @32 | 6 down
                   | 7 8 res+attn 1280 @16 | 9 down | 10 11 res 1280 @8
    middle_block   res, attn, res 1280 @8
    output_blocks  0 1 2 res 1280 @8 (2.1 up) | 3 4 5 res+attn 1280 @16 (5.2 up)
                   | 6 7 8 res+attn 640 @32 (8.2 up) | 9 10 11 res+attn 320 @64

and SDXL base (channel_mult (1, 2, 4), transformer_depth (0, 2, 10)) has 9 input and 9 output blocks with
no attention at the first level. Every skip connection is the output of one input block, consumed in reverse
order by the output blocks.

Inside a SpatialTransformer: norm (GroupNorm, eps 1e-6), proj_in (1x1 conv for SD1, Linear for SD2/SDXL),
transformer_blocks.K = {norm1, attn1 (self), norm2, attn2 (cross, on the text context), norm3, ff (GEGLU)},
proj_out, plus the residual. Attention heads: `cfg.heads_at(channels)`. A level has a SpatialTransformer when
its `transformer_depth` is above 0 or it is one of `empty_transformer_levels`, whose transformers hold no
blocks (x + proj_out(proj_in(norm(x))): diffusers' CrossAttn blocks with 0 transformer layers, as in SDXL's
"small" and "mid" ControlNets); the middle block has one, of `transformer_depth_middle` blocks (0 too), unless
`middle_transformer` is False. An asymmetric U-Net (SSD-1B, Segmind Vega) gives each block of a level with
transformers its own depth (`input_depths`, `output_depths`: the distilled models dropped transformer blocks
from some blocks only).

Speed: attention goes through `F.scaled_dot_product_attention` (fused kernels, no h*w x h*w matrix on the
heap), feature maps stay channels-last so the token view costs no copy, and residuals are added in place
into fresh outputs. fp32, fp16 and bf16 all run; `upcast_attention` runs attention itself in fp32.

Guidance embedding (LCM-distilled models, diffusers' `time_cond_proj_dim`): `time_embed.cond_proj`, a Linear
without bias from the `guidance_scale_embedding` of w (the CFG scale minus 1) to the model_channels-wide
sinusoidal timestep features, to which its output is added before `time_embed.0`. Absent unless the config
sets `time_cond_proj_dim`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdlab.models import cpu_kernels, cpu_linear, cpu_norm, generation_memo, patch_conv
from sdlab.models.cpu_memory import reuses_large_blocks
from sdlab.models.deep_cache import DeepFeature
from sdlab.models.freeu import FreeU
from sdlab.models.ip_adapter import ImagePrompt
from sdlab.models.layers import attention, timestep_embedding
from sdlab.models.token_merging import MergingCall, TokenMerging


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
    transformer_depth_middle: int = 1            # SDXL base: 10; 0: a transformer without blocks
    # depth-0 levels that still have a transformer without blocks; saved only when set (`config_to_json`)
    empty_transformer_levels: tuple[int, ...] = field(default=(), metadata={"saved_when_set": True})
    # asymmetric U-Nets (SSD-1B, Segmind Vega: diffusers' per-layer transformer_layers_per_block and
    # reverse_transformer_layers_per_block): the depth of every block's transformer, in the order the blocks are
    # built, where one differs from its level's `transformer_depth`; empty: none does (`input_depth`, `output_depth`)
    input_depths: tuple[int, ...] = field(default=(), metadata={"saved_when_set": True})     # L x R, level 0 first
    output_depths: tuple[int, ...] = field(default=(), metadata={"saved_when_set": True})    # L x (R + 1), last first
    # False: the middle block is one ResBlock, without transformer (diffusers' UNetMidBlock2D: SSD-1B, Vega)
    middle_transformer: bool = field(default=True, metadata={"saved_when_set": True})
    num_heads: int | None = 8
    head_dim: int | None = None
    context_dim: int = 768                       # 1024 SD2, 2048 SDXL, 1280 SDXL refiner
    use_linear_proj: bool = False                # SD2 / SDXL: Linear proj_in/out; SD1: 1x1 conv
    adm_in_channels: int | None = None           # SDXL vector conditioning width (2816 base, 2560 refiner)
    upcast_attention: bool = False               # compute attention in fp32 (SD2.1 in fp16)
    norm_groups: int = 32
    time_cond_proj_dim: int | None = None        # guidance-embedding width of LCM-distilled models (256)

    def __post_init__(self) -> None:
        if (self.num_heads is None) == (self.head_dim is None):
            raise ValueError("UNetConfig: set exactly one of num_heads and head_dim")
        if len(self.transformer_depth) != len(self.channel_mult):
            raise ValueError("UNetConfig: transformer_depth needs one entry per channel_mult level")
        if any(not 0 <= level < len(self.transformer_depth) or self.transformer_depth[level]
               for level in self.empty_transformer_levels):
            raise ValueError(f"UNetConfig: empty_transformer_levels {list(self.empty_transformer_levels)} must name "
                             f"levels of transformer_depth 0")
        levels, blocks = len(self.channel_mult), self.num_res_blocks
        for name, per_level in (("input_depths", blocks), ("output_depths", blocks + 1)):
            depths = getattr(self, name)
            if depths and len(depths) != levels * per_level:
                raise ValueError(f"UNetConfig: {name} needs {levels * per_level} entries (one per block), got {len(depths)}")
        if any(self.input_depth(level, i) for level in range(levels) for i in range(blocks)
               if not self.has_transformer(level)) or any(
                self.output_depth(level, i) for level in range(levels) for i in range(blocks + 1)
                if not self.has_transformer(level)):
            raise ValueError("UNetConfig: input_depths / output_depths give transformer blocks to a level without "
                             "transformers")
        if not self.middle_transformer and self.transformer_depth_middle:
            raise ValueError("UNetConfig: a middle block without transformer has transformer_depth_middle 0")

    def has_transformer(self, level: int) -> bool:
        """Whether the blocks of `level` have a SpatialTransformer (each with its `input_depth` / `output_depth`
        blocks: `transformer_depth[level]` unless the U-Net is asymmetric)."""
        return self.transformer_depth[level] > 0 or level in self.empty_transformer_levels

    def input_depth(self, level: int, index: int) -> int:
        """The transformer depth of ResBlock `index` (0 .. R-1) of input `level`."""
        return self.input_depths[level * self.num_res_blocks + index] if self.input_depths else self.transformer_depth[level]

    def output_depth(self, level: int, index: int) -> int:
        """The transformer depth of output block `index` (0 .. R) of `level`."""
        if not self.output_depths:
            return self.transformer_depth[level]
        return self.output_depths[(len(self.channel_mult) - 1 - level) * (self.num_res_blocks + 1) + index]

    @property
    def cross_attends(self) -> bool:
        """Whether any transformer block reads the text context (SDXL's "small" ControlNet has none)."""
        return any((*self.transformer_depth, *self.input_depths, *self.output_depths, self.transformer_depth_middle))

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    def heads_at(self, channels: int) -> int:
        """Number of attention heads in a transformer `channels` wide."""
        return self.num_heads if self.num_heads is not None else channels // self.head_dim


def block_depths(depths: tuple[int, ...], level_depths: tuple[int, ...], per_level: int) -> tuple[int, ...]:
    """`depths`, one per block in build order (`per_level` blocks for each of `level_depths`, the levels' depths in
    that order), as `UNetConfig.input_depths` / `output_depths` keep them: empty when every block has its level's."""
    return () if tuple(depths) == tuple(d for d in level_depths for _ in range(per_level)) else tuple(depths)


TRANSFORMER_NORM_EPS = 1e-6  # SpatialTransformer's GroupNorm; ResBlocks and `out` use PyTorch's 1e-5


def guidance_scale_embedding(w: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of guidance strengths w (CFG scale - 1) that LCM-distilled U-Nets take (VDM's
    timestep embedding, diffusers' `get_guidance_scale_embedding`): sines first, then cosines.

    emb[:, i] = sin(1000 w f_i), emb[:, half + i] = cos(1000 w f_i), f_i = 10000 ** (-i / (half - 1)), i < half
    (half - 1, unlike `timestep_embedding`). Computed in fp32; an odd `dim` gets one zero column at the end.

    w: (B,) -> (B, dim) float32
    """
    half = dim // 2
    if half < 2:
        raise ValueError(f"guidance_scale_embedding: dim must be at least 4, got {dim}")
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -step).to(w.device)  # (half,)
    args = (w.to(torch.float32) * 1000.0)[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # (B, 2 * half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimeEmbed(nn.Sequential):
    """`time_embed`: Linear-SiLU-Linear on the sinusoidal timestep features (indices 0-2, as in the checkpoints),
    plus `cond_proj` (Linear, no bias) when `cond_dim` is set: the projected guidance embedding is added to the
    features first (diffusers' `TimestepEmbedding.cond_proj`)."""

    def __init__(self, channels: int, emb_dim: int, cond_dim: int | None = None):
        super().__init__(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.cond_proj = nn.Linear(cond_dim, channels, bias=False) if cond_dim is not None else None

    def forward(self, features: Tensor, cond: Tensor | None = None) -> Tensor:
        if cond is not None:
            if self.cond_proj is None:
                raise ValueError("UNet: this model takes no guidance embedding (time_cond_proj_dim is not set)")
            features = features + self.cond_proj(cond.to(features.dtype))  # (B, model_channels)
        return self[2](self[1](self[0](features)))  # (B, 4 * model_channels)


def _embedding_into_bias(emb: Tensor, conv: nn.Conv2d, shared: bool | None = None) -> bool:
    """Whether the time embedding can go into `conv`'s bias instead of a pass over its output: inference on
    the CPU with one embedding for the whole batch (one timestep, as in guided sampling; `shared` where the
    caller knows) and no hooks on the convolution (a LoRA's in training). emb: (B, C_out)"""
    return (emb.device.type == "cpu" and not torch.is_grad_enabled() and conv.bias is not None
            and not cpu_kernels.has_hooks(conv) and (bool((emb == emb[:1]).all()) if shared is None else shared))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, add the projected time embedding, GroupNorm-SiLU-conv, plus a (1x1 conv) skip."""

    def __init__(self, channels: int, out_channels: int, emb_dim: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, channels), nn.SiLU(), patch_conv.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),  # kept so the conv stays at index 3, as in the checkpoints
            patch_conv.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = (
            nn.Identity() if channels == out_channels else patch_conv.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb_silu: Tensor | BlockEmbeddings) -> Tensor:
        """x (B, C_in, h, w); emb_silu: SiLU of the time embedding, `emb_layers[0]`'s output, which is the
        same for every ResBlock and so computed once per U-Net call (`encoder_embedding`), or with this
        block's projection of it already made (`BlockEmbeddings`).

        The layers are called one by one rather than through their Sequentials (the SiLUs as functions, the
        Dropout(0) not at all): the same arithmetic with a third fewer module calls, which is what an
        eager GPU step waits on."""
        norm1, _, conv1 = self.in_layers
        norm2, _, _, conv2 = self.out_layers
        if isinstance(emb_silu, BlockEmbeddings):
            # rows of one embedding project to one row, unless a hook (per-image LoRA weights) tells them apart
            emb, shared = emb_silu.of(self), emb_silu.shared and not cpu_kernels.has_hooks(self.emb_layers[1])
        else:
            emb, shared = self.emb_layers[1](emb_silu), None
        h = cpu_norm.group_norm(norm1, x, silu=True)  # (B, C_in, h, w)
        if _embedding_into_bias(emb, conv1, shared):
            h = conv1.forward_with_bias(h, conv1.bias + emb[0])  # (B, C_out, h, w)
        else:
            # In-place adds go into fresh conv outputs, which no backward needs, so autograd stays valid.
            h = conv1(h)  # (B, C_out, h, w)
            # time embedding broadcast over space; where x's rows stand for copies (`UNet.forward`'s shared
            # rows) emb's rows are one embedding, of which x takes as many
            h += (emb[: len(h)] if shared else emb)[:, :, None, None]
        # conv1's output is this block's own (unless a hook holds it): the norm may write over it
        h = cpu_norm.group_norm(norm2, h, silu=True, overwrite=not cpu_kernels.has_hooks(conv1))  # (B, C_out, h, w)
        return conv2.forward_add(h, self.skip_connection(x))  # conv2(h) + skip


class CrossAttention(nn.Module):
    """Multi-head attention from `x` to `context` (self-attention when `context` is None)."""

    def __init__(self, dim: int, context_dim: int, heads: int, upcast: bool):
        super().__init__()
        self.heads = heads
        self.upcast = upcast
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))  # index 0 as in the checkpoints (LDM had Dropout at 1)

    def forward(self, x: Tensor, context: Tensor | None = None, residual: Tensor | None = None,
                identity: Tensor | None = None, image_prompt: ImagePrompt | None = None) -> Tensor:
        """x: (B, N, C), context: (B, M, C_ctx) or None -> (B, N, C), plus `residual` (B, N, C) where given.
        `image_prompt`: IP-Adapters' image tokens, whose decoupled attention with the same queries is added to
        the text attention's output before `to_out` (`models.ip_adapter`).
        `identity` (B,) bool, self-attention only: the rows whose attention map is the identity, whose output is
        `to_out(to_v(x))` (`SelfAttentionIdentity`)."""
        if identity is not None:
            if context is not None:
                raise ValueError("CrossAttention: only a self-attention can be made the identity")
            return self._with_identity_rows(x, residual, identity)
        q = cpu_linear.linear(x, self.to_q)  # (B, N, C)
        if context is None:
            k, v = cpu_linear.linear(x, self.to_k), cpu_linear.linear(x, self.to_v)  # 2 x (B, N, C)
        else:
            k, v = generation_memo.reused(   # 2 x (B, M, C), once per generation
                (self.to_k, self.to_v), context,
                lambda: (cpu_linear.linear(context, self.to_k), cpu_linear.linear(context, self.to_v)))
        out = attention(q, k, v, self.heads, self.upcast)  # (B, N, C)
        image_attention = None if image_prompt is None else image_prompt.attended(self, q)  # (B, N, C) or None
        if image_attention is not None:
            out = out + image_attention
        return self._project_out(out, residual)

    def _project_out(self, out: Tensor, residual: Tensor | None) -> Tensor:
        if residual is None:
            return self.to_out[0](out)
        return cpu_linear.linear_add(out, self.to_out[0], residual)  # (B, N, C)

    def _with_identity_rows(self, x: Tensor, residual: Tensor | None, identity: Tensor) -> Tensor:
        """Self-attention whose rows `identity` take their own value vectors (PAG's perturbed pass; diffusers'
        `PAGCFGIdentitySelfAttnProcessor2_0`): softmax(q k^T / sqrt(d)) is the identity matrix there, so only
        the other rows compute queries, keys and an attention (with whichever kernel `attention` picks)."""
        v = cpu_linear.linear(x, self.to_v)  # (B, N, C)
        attend = ~identity.to(device=x.device, dtype=torch.bool)  # (B,)
        if not bool(attend.any()):
            return self._project_out(v, residual)
        xa = x[attend]  # (B_a, N, C)
        out = v.clone()  # (B, N, C): the identity rows keep their values
        out[attend] = attention(cpu_linear.linear(xa, self.to_q), cpu_linear.linear(xa, self.to_k), v[attend],
                                self.heads, self.upcast)  # (B_a, N, C)
        return self._project_out(out, residual)


class GEGLU(nn.Module):
    """Gated GELU feed-forward input (Shazeer 2020): proj to 2 * inner, then a * gelu(gate)."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner_dim)

    def forward(self, x: Tensor) -> Tensor:
        return cpu_linear.geglu(x, self.proj)  # (B, N, inner)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # The Dropout(0) keeps the output Linear at index 2, as in the checkpoints (`ff.net.2`).
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Dropout(0.0), nn.Linear(mult * dim, dim))

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """GEGLU, then the output Linear (the Dropout(0) is an identity); plus `residual` where given."""
        h = self.net[0](x)  # (B, N, inner)
        return self.net[2](h) if residual is None else cpu_linear.linear_add(h, self.net[2], residual)


@dataclass(frozen=True)
class SelfAttentionIdentity:
    """Perturbed-attention guidance's perturbation (Ahn et al. 2024): on the batch `rows` ((B,) bool) the
    self-attentions `layers` (`attn1` modules) have the identity for attention map, so that they output their
    value projection; every other row and layer attends as usual (`UNet.forward`'s `identity_rows`)."""

    rows: Tensor
    layers: frozenset[nn.Module]

    def rows_of(self, attention: nn.Module) -> Tensor | None:
        return self.rows if attention in self.layers else None


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on the text context, GEGLU feed-forward; each residual."""

    def __init__(self, dim: int, context_dim: int, heads: int, upcast: bool):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, upcast)
        self.attn2 = CrossAttention(dim, context_dim, heads, upcast)
        self.ff = FeedForward(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor, merging: MergingCall | None = None,
                identity: SelfAttentionIdentity | None = None, image_prompt: ImagePrompt | None = None) -> Tensor:
        """x: (B, N, C), or (B / k, N, C) standing for k identical copies of itself (`UNet.forward`'s shared
        rows), which the self-attention runs once for; context: (B, T, C_ctx) -> (B, N, C). `merging`: the
        U-Net call's token merging, which merges the self-attention's input tokens where this block's level
        does (`models.token_merging`). `identity`: the self-attentions made the identity on some rows (PAG),
        this block's `attn1` maybe among them. `image_prompt`: IP-Adapters' image tokens, which the
        cross-attention attends to besides the text."""
        # Each residual is added to its branch's output as a new tensor (inside the output product on the CPU
        # in bf16: `cpu_linear`), never into x, which LayerNorm's backward needs.
        matched = None if merging is None else merging.matching(x)
        rows = None if identity is None else identity.rows_of(self.attn1)  # (B,) bool or None
        if matched is None:
            h = self.attn1(cpu_norm.layer_norm(self.norm1, x), residual=x, identity=rows)  # (B or B / k, N, C)
        else:
            merge, unmerge = matched
            h = unmerge(self.attn1(merge(cpu_norm.layer_norm(self.norm1, x)), identity=rows))  # (B or B / k, N, C), from N - r
            h += x
        if len(h) < len(context):   # copies: the context tells them apart from here (else it may broadcast)
            h = copies_to(h, len(context))  # (B, N, C)
        x = self.attn2(cpu_norm.layer_norm(self.norm2, h), context, residual=h, image_prompt=image_prompt)
        return self.ff(cpu_norm.layer_norm(self.norm3, x), residual=x)


class SpatialTransformer(nn.Module):
    """Transformer over the h*w positions of a feature map, conditioned on the text context; residual."""

    def __init__(
        self, channels: int, heads: int, depth: int, context_dim: int, linear_proj: bool, upcast: bool, groups: int
    ):
        super().__init__()
        if depth and channels % heads:
            raise ValueError(f"SpatialTransformer: {channels} channels do not split into {heads} heads")
        self.linear_proj = linear_proj
        self.norm = nn.GroupNorm(groups, channels, eps=TRANSFORMER_NORM_EPS)
        self.proj_in = nn.Linear(channels, channels) if linear_proj else patch_conv.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, context_dim, heads, upcast) for _ in range(depth)
        )
        self.proj_out = nn.Linear(channels, channels) if linear_proj else patch_conv.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, context: Tensor, merging: MergingCall | None = None,
                identity: SelfAttentionIdentity | None = None, image_prompt: ImagePrompt | None = None) -> Tensor:
        """x: (B, C, h, w), or (B / k, C, h, w) standing for k copies of itself (`UNet.forward`'s shared
        rows); context: (B, T, C_ctx) -> (B, C, h, w); `merging`, `identity`, `image_prompt`: see
        `BasicTransformerBlock`."""
        b, c, height, width = x.shape
        h = cpu_norm.group_norm(self.norm, x)  # (B, C, h, w)
        # bf16 inference on the CPU (`cpu_linear.fuses`): both projections run as linear layers over the tokens
        # (a 1x1 convolution is one), the residual added inside proj_out's product where nothing needs a
        # gradient there either (a context that does, textual inversion's, reaches h through the blocks)
        fused = cpu_linear.fuses(h, self.proj_in) and cpu_linear.fuses(h, self.proj_out)
        on_tokens = self.linear_proj or fused  # projections over (B, hw, C), not 1x1 convolutions over the map
        if not on_tokens:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(b, height * width, c)  # (B, hw, C), a view when x is channels-last
        if fused:
            h = cpu_linear.product(h, self.proj_in.weight.flatten(1), self.proj_in.bias)  # a 1x1 conv's weight as (C, C)
        elif on_tokens:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context, merging, identity, image_prompt=image_prompt)  # (B, hw, C)
        b = len(h)
        x = copies_to(x, b)  # (B, C, h, w)
        if fused:
            residual = x.permute(0, 2, 3, 1).reshape(b, height * width, c)  # (B, hw, C)
            weight = self.proj_out.weight.flatten(1)  # (C, C)
            if cpu_linear.fuses(h, self.proj_out, residual):
                h = cpu_linear.product(h, weight, self.proj_out.bias, residual)  # (B, hw, C)
            else:  # the blocks made h need a gradient (a trained text context): the product with a backward
                h = F.linear(h, weight, self.proj_out.bias) + residual  # (B, hw, C)
            return h.view(b, height, width, c).permute(0, 3, 1, 2)  # (B, C, h, w) channels-last view
        if on_tokens:
            h = self.proj_out(h)
        h = h.view(b, height, width, c).permute(0, 3, 1, 2)  # (B, C, h, w) channels-last view
        if not on_tokens:
            h = self.proj_out(h)
        h += x
        return h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = patch_conv.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)  # (B, C, ceil(h/2), ceil(w/2))


class Upsample(nn.Module):
    """Nearest-neighbour 2x (or to `size`, the matching skip's size, for latents not divisible by 2^levels), conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = patch_conv.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: torch.Size | None = None) -> Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


def copies_to(x: Tensor, rows: int) -> Tensor:
    """x: (B', ...) standing for rows / B' copies of itself along the batch (`UNet.forward`'s shared rows)
    -> (rows, ...); x itself where it has `rows` rows. Concatenation keeps a channels-last layout."""
    return x if len(x) == rows else torch.cat([x] * (rows // len(x)))


def adapter_blocks(cfg: UNetConfig) -> list[int]:
    """The input blocks whose outputs take a T2I-Adapter's features, one per level, as diffusers adds its
    `down_intrablock_additional_residuals`: a level with transformers at its last [ResBlock, transformer] (before
    its Downsample), a level without at its Downsample's output, or its last ResBlock where it has none (the
    last level). SD 1.x: 2, 5, 8, 11; SDXL: 3, 5, 8, and a fourth feature goes to the middle block's output:
    the indices A1111's ControlNet extension and ComfyUI write down for the two."""
    blocks, index = [], 0                  # index: the input block before the level's first ResBlock
    last_level = len(cfg.channel_mult) - 1
    for level in range(len(cfg.channel_mult)):
        last_res = index + cfg.num_res_blocks
        downsample = level != last_level
        blocks.append(last_res + 1 if downsample and not cfg.has_transformer(level) else last_res)
        index = last_res + downsample
    return blocks


def _with_feature(h: Tensor, feature: Tensor, rows: int, nearest: bool = False) -> Tensor:
    """h (B' rows standing for `rows`, `copies_to`) plus a T2I-Adapter feature (rows, C, h, w) of its shape;
    `nearest`: a feature of another height or width is first resized to h's with nearest interpolation (A1111's
    ControlNet extension, hook.py `aligned_adding`)."""
    if feature.shape[1] != h.shape[1] or (feature.shape[2:] != h.shape[2:] and not nearest):
        raise ValueError(f"UNet: a T2I-Adapter feature of shape {tuple(feature.shape[1:])} meets features of "
                         f"{tuple(h.shape[1:])}")
    if feature.shape[2:] != h.shape[2:]:
        feature = F.interpolate(feature, size=h.shape[2:], mode="nearest")   # (rows, C, h_i, w_i)
    return copies_to(h, rows) + feature.to(h.dtype)


def shared_rows(x: Tensor, emb: BlockEmbeddings, blocks: nn.ModuleList, context: Tensor) -> int:
    """How many of x's first rows the U-Net's opening blocks need to run: B // 2 where the batch is two
    equal halves with one time embedding, as in every guided step ([x, x] for the negative and the positive
    prompt, one context row each), else B. Until the first text context the halves stay equal, so the layers
    before it (SD1.x / 2.x at the widest level: conv_in, a ResBlock, the first transformer's input
    projection and self-attention) run once for both. Only in CPU inference, where `emb.shared` holds, where
    one of `blocks` (the input blocks) has a transformer block, and not while hooks watch the layers before it
    (they would see half a batch). x: (B, C, h, w), context: (B, T, C_ctx)"""
    half = len(x) // 2
    if (not (emb.shared and half and len(x) % 2 == 0 and len(context) == len(x))
            or torch.compiler.is_compiling()):
        return len(x)
    for block in blocks:
        if any(cpu_kernels.has_hooks(module) for module in block.modules()):
            return len(x)
        if any(isinstance(layer, SpatialTransformer) and len(layer.transformer_blocks) for layer in block):
            return half if torch.equal(x[:half], x[half:]) else len(x)   # the rows part here
    return len(x)


class BlockEmbeddings:
    """SiLU of the time embedding (`silu`, (B, 4 * model_channels)) and every ResBlock's projection of it
    (`of(block)`, (B, C_out)), all made at once when the U-Net call starts: these products over one or two
    rows are bound by reading their weights, and back to back they take half the time they take between the
    convolutions (SD1.5 at 512 px, 22 of them: 9.3 -> 4.7 ms a step). Each runs through its module, so hooks
    (a LoRA's in training) see it. `shared`: in CPU inference, whether all rows are one embedding (one
    timestep for the batch), checked once here rather than in each ResBlock."""

    def __init__(self, silu: Tensor, module: nn.Module):
        self.silu = silu
        self.shared = (silu.device.type == "cpu" and not torch.is_grad_enabled()
                       and bool((silu == silu[:1]).all()))
        blocks = [*module.input_blocks, module.middle_block, *getattr(module, "output_blocks", ())]
        self._projected = {layer: layer.emb_layers[1](silu) for block in blocks for layer in block
                           if isinstance(layer, ResBlock)}

    def of(self, block: ResBlock) -> Tensor:
        projected = self._projected.get(block)
        return block.emb_layers[1](self.silu) if projected is None else projected


class UNetBlock(nn.ModuleList):
    """One entry of input_blocks / middle_block / output_blocks: its layers in order, each fed what it needs
    (LDM's TimestepEmbedSequential)."""

    def forward(self, x: Tensor, emb: Tensor | BlockEmbeddings, context: Tensor,
                out_size: torch.Size | None = None, merging: MergingCall | None = None,
                identity: SelfAttentionIdentity | None = None, image_prompt: ImagePrompt | None = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, merging, identity, image_prompt=image_prompt)
            elif isinstance(layer, Upsample):
                x = layer(x, out_size)
            else:
                x = layer(x)
        return x


def _res(cfg: UNetConfig, c_in: int, c_out: int) -> ResBlock:
    return ResBlock(c_in, c_out, cfg.time_embed_dim, cfg.norm_groups)


def _transformer(cfg: UNetConfig, c: int, depth: int) -> SpatialTransformer:
    return SpatialTransformer(
        c, cfg.heads_at(c), depth, cfg.context_dim, cfg.use_linear_proj, cfg.upcast_attention, cfg.norm_groups
    )


def add_encoder(module: nn.Module, cfg: UNetConfig) -> list[int]:
    """Give `module` the encoder half of a U-Net under the checkpoint names: `time_embed`, `label_emb`
    (SDXL), `input_blocks` and `middle_block`. Returns the output width of each input block (the skips).

    Shared by `UNet` and the ControlNet (a trainable copy of this half, `sdlab.models.controlnet`)."""
    mc, emb_dim = cfg.model_channels, cfg.time_embed_dim
    module.time_embed = TimeEmbed(mc, emb_dim, cfg.time_cond_proj_dim)
    if cfg.adm_in_channels is not None:  # SDXL: the vector conditioning is added to the time embedding
        module.label_emb = nn.Sequential(
            nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        )

    module.input_blocks = nn.ModuleList([UNetBlock([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])])
    skip_channels = [mc]
    ch = mc
    last_level = len(cfg.channel_mult) - 1
    for level, mult in enumerate(cfg.channel_mult):
        for i in range(cfg.num_res_blocks):
            layers: list[nn.Module] = [_res(cfg, ch, mult * mc)]
            ch = mult * mc
            if cfg.has_transformer(level):
                layers.append(_transformer(cfg, ch, cfg.input_depth(level, i)))
            module.input_blocks.append(UNetBlock(layers))
            skip_channels.append(ch)
        if level != last_level:
            module.input_blocks.append(UNetBlock([Downsample(ch)]))
            skip_channels.append(ch)

    middle: list[nn.Module] = [_res(cfg, ch, ch)]
    if cfg.middle_transformer:
        middle += [_transformer(cfg, ch, cfg.transformer_depth_middle), _res(cfg, ch, ch)]
    module.middle_block = UNetBlock(middle)
    return skip_channels


def encoder_embedding(
    module: nn.Module, cfg: UNetConfig, t: Tensor, y: Tensor | None, batch: int, guidance_emb: Tensor | None = None
) -> Tensor:
    """SiLU of the (B, 4 * model_channels) embedding of timesteps `t` ((B,) or ()) [+ the guidance embedding
    `guidance_emb` (B, time_cond_proj_dim)] [+ SDXL vector `y`], in the parameters' dtype: what every block of
    a module built by `add_encoder` receives (each ResBlock's `emb_layers` opens with that SiLU, applied
    here once for all of them)."""
    dtype = module.time_embed[0].weight.dtype
    if t.ndim == 0:
        t = t.expand(batch)
    features = timestep_embedding(t, cfg.model_channels).to(dtype)  # (B, mc)
    emb = module.time_embed(features, guidance_emb)  # (B, 4 * mc)
    if cfg.adm_in_channels is not None:
        if y is None:
            raise ValueError("UNet: this model needs the vector conditioning y (SDXL)")
        emb = emb + module.label_emb(y.to(dtype))
    return F.silu(emb)


class UNet(nn.Module):
    """Text-conditioned latent U-Net: (noisy latent, timestep, text context[, SDXL vector]) -> model output."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc, groups = cfg.model_channels, cfg.norm_groups
        skip_channels = add_encoder(self, cfg)
        ch = skip_channels[-1]

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(cfg.channel_mult))):
            mult = cfg.channel_mult[level]
            for i in range(cfg.num_res_blocks + 1):
                layers = [_res(cfg, ch + skip_channels.pop(), mult * mc)]
                ch = mult * mc
                if cfg.has_transformer(level):
                    layers.append(_transformer(cfg, ch, cfg.output_depth(level, i)))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(UNetBlock(layers))

        self.out = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))
        # Activations run channels-last (NHWC, see `forward`); conv weights are stored the same way so that no
        # call has to convert them. `load_state_dict` copies into this layout; after `assign=True` loading,
        # call `.to(memory_format=torch.channels_last)` again. Measured on CPU (oneDNN): 3-4 % less conv time than
        # NCHW in fp32 and bf16, and the transformers' token views cost no copy. `memory_format` is the layout
        # the forward puts its input in (set it with `.to(memory_format=...)` to compare layouts).
        self.memory_format = torch.channels_last
        self.to(memory_format=self.memory_format)
        # token merging in the self-attention of the finest levels (`models.token_merging`; `merging_tokens`
        # sets it for a block); None: every token attends
        self.token_merging: TokenMerging | None = None

    @reuses_large_blocks
    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor,
        y: Tensor | None = None,
        control: tuple[list[Tensor], Tensor] | None = None,
        guidance_emb: Tensor | None = None,
        freeu: FreeU | None = None,
        image_prompt: ImagePrompt | None = None,
        identity_rows: Tensor | None = None,
        identity_layers: Collection[str] = (),
        adapter: list[Tensor] | None = None,
        adapter_nearest: bool = False,
        deep_cache: DeepFeature | None = None,
    ) -> Tensor:
        """x: (B, in_channels, h, w) noisy latent; t: (B,) or () float timesteps in [0, 1000);
        context: (B, T, context_dim) text embeddings; y: (B, adm_in_channels) for SDXL, else None;
        control: ControlNet residuals (one per input block, each shaped like that block's output, and one
        shaped like the middle block's output), added to each skip as it is stored and to the middle
        block's output (diffusers' down_block_additional_residuals / mid_block_additional_residual);
        guidance_emb: (B, time_cond_proj_dim) `guidance_scale_embedding` of w for models with a guidance
        embedding (diffusers' timestep_cond; None: nothing added, as in diffusers).
        freeu: FreeU's scaling of the decoder's backbone and skip features where each output block joins them
        (`models.freeu`; after the control residuals, as ComfyUI and diffusers add them); None: plain.
        image_prompt: IP-Adapters' image tokens (B, T, context_dim) and decoupled k/v projections, attended to
        by every cross-attention besides the text context (`models.ip_adapter`); None: text alone.
        identity_rows: (B,) bool, the rows on which the self-attentions named in identity_layers (their module
        names, e.g. "middle_block.1.transformer_blocks.0.attn1") have the identity for attention map:
        perturbed-attention guidance's perturbed pass (`SelfAttentionIdentity`); None: every row attends.
        adapter: T2I-Adapter features, one per level, each added to the output of its `adapter_blocks` input block
        before the block's skip is stored (both the skip and the next block see it), any further one to the
        middle block's output (diffusers' down_intrablock_additional_residuals). adapter_nearest: a feature off its
        block's grid (an adapter that pooled odd sizes down) is resized to it with nearest interpolation, as A1111's
        ControlNet extension adds it (hook.py `aligned_adding`); False: such a feature is an error.
        deep_cache: DeepCache's slot for this call (`models.deep_cache`): with its `feature`, only the shallow branch
        runs (input blocks 0..K, then output blocks from len(output_blocks) - 1 - K on, starting from that feature;
        the control residuals and adapter features of the blocks it skips are not read); without, the whole
        U-Net runs and leaves there the features entering that output block. None: the whole U-Net.
        Inputs are cast to the parameters' dtype; returns (B, out_channels, h, w) in that dtype.

        Feature maps are kept channels-last (NHWC strides, NCHW shape): oneDNN and cuDNN convolutions take that
        layout without reordering, and a SpatialTransformer's (B, hw, C) token view of it is free."""
        emb = BlockEmbeddings(encoder_embedding(self, self.cfg, t, y, x.shape[0], guidance_emb), self)  # (B, 4 * mc)
        dtype = emb.silu.dtype
        context = context.to(dtype)
        skip_residuals, middle_residual = control if control is not None else (None, None)
        if skip_residuals is not None and len(skip_residuals) != len(self.input_blocks):
            raise ValueError(f"UNet: {len(skip_residuals)} control residuals for {len(self.input_blocks)} skips")

        h = x.to(dtype).contiguous(memory_format=self.memory_format)  # (B, C, h, w) stored as NHWC
        rows = len(h)
        merging = None if self.token_merging is None else MergingCall(self.token_merging, tuple(h.shape[-2:]), rows)
        identity = self._identity(identity_rows, identity_layers, rows)
        if identity is None:   # perturbed rows differ from the others from their first self-attention on
            h = h[: shared_rows(h, emb, self.input_blocks, context)]  # (B or B / 2, C, h, w): equal halves run once
        # T2I-Adapter features by the input block they join; a further one joins the middle block's output
        joins = [*adapter_blocks(self.cfg), -1]
        if adapter is not None and len(adapter) > len(joins):
            raise ValueError(f"UNet: {len(adapter)} T2I-Adapter features for {len(joins)} places (levels + middle)")
        features = dict(zip(joins, adapter or ()))
        skips = []
        shallow = deep_cache is not None and deep_cache.feature is not None
        encoder = self.input_blocks[: deep_cache.skip_block + 1] if shallow else self.input_blocks
        for i, block in enumerate(encoder):
            h = block(h, emb, context, merging=merging, identity=identity,
                      image_prompt=image_prompt)  # (B, C_i, h_i, w_i) from the first text context on
            if i in features:
                h = _with_feature(h, features.pop(i), rows, adapter_nearest)   # (B, C_i, h_i, w_i)
            skip = copies_to(h, rows)
            skips.append(skip if skip_residuals is None else skip + skip_residuals[i].to(dtype))
        cached_at = None if deep_cache is None else len(self.output_blocks) - 1 - deep_cache.skip_block
        if shallow:
            h = deep_cache.feature   # (B, C, h_k, w_k): the last full call's features entering output block k
        else:
            h = copies_to(self.middle_block(h, emb, context, merging=merging, identity=identity,
                                            image_prompt=image_prompt), rows)  # (B, C_mid, h_mid, w_mid)
            if middle_residual is not None:
                h = h + middle_residual.to(dtype)
            if -1 in features:
                h = _with_feature(h, features.pop(-1), rows, adapter_nearest)   # (B, C_mid, h_mid, w_mid)
        per_level = self.cfg.num_res_blocks + 1
        first = cached_at if shallow else 0
        for i, block in enumerate(self.output_blocks[first:], start=first):
            if i == cached_at and not shallow:
                deep_cache.feature = h   # (B, C, h_k, w_k), kept for the shallow calls that follow
            skip = skips.pop()
            if freeu is None:
                h = torch.cat([h, skip], dim=1)  # (B, C + C_skip, h, w)
            else:
                h = freeu.join(h, skip, freeu.stage_of(i, h.shape[1], self.cfg.model_channels, per_level))
            h = block(h, emb, context, out_size=skips[-1].shape[-2:] if skips else None, merging=merging,
                      identity=identity, image_prompt=image_prompt)
        norm, _, conv = self.out
        return conv(cpu_norm.group_norm(norm, h, silu=True)).contiguous()  # (B, out_channels, h, w)

    def _identity(self, rows: Tensor | None, layers: Collection[str], batch: int) -> SelfAttentionIdentity | None:
        """`forward`'s identity_rows / identity_layers as a `SelfAttentionIdentity`; None where no row is perturbed."""
        if rows is None or not layers:
            return None
        rows = rows.reshape(-1).to(dtype=torch.bool)  # (B,)
        if len(rows) != batch:
            raise ValueError(f"UNet: {len(rows)} identity rows for a batch of {batch}")
        if not bool(rows.any()):
            return None
        modules = []
        for name in layers:
            module = self.get_submodule(name)
            if not (isinstance(module, CrossAttention) and name.endswith(".attn1")):
                raise ValueError(f"UNet: {name} is not a self-attention (a transformer block's attn1)")
            modules.append(module)
        return SelfAttentionIdentity(rows, frozenset(modules))
