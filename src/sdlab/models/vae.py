"""AutoencoderKL (the SD VAE), with module names that mirror the original checkpoints.

The parameter names are exactly those found under ``first_stage_model.`` in original SD 1.x / 2.x / SDXL
files (CompVis ``ldm/modules/diffusionmodules/model.py``), so loading one is a prefix strip. Block layout,
with ``ch = base_channels``, ``m = channel_mult``, ``R = num_res_blocks``, ``L = len(m)`` (SD: ch 128,
m (1, 2, 4, 4), R 2, so the levels are 128 @ 512², 256 @ 256², 512 @ 128², 512 @ 64² for a 512² image)::

    img (B, 3, H, W) in [-1, 1]
    encoder.conv_in                      3 -> ch                              H x W
    encoder.down.0   .block.0..R-1       -> ch*m[0]    .downsample.conv       H   -> H/2
    encoder.down.1   .block.0..R-1       -> ch*m[1]    .downsample.conv       H/2 -> H/4
      ...
    encoder.down.L-1 .block.0..R-1       -> ch*m[L-1]  (no downsample)        H/f
    encoder.mid      .block_1 .attn_1 .block_2
    encoder.norm_out, swish, encoder.conv_out  -> 2 * latent (mean | logvar)
    quant_conv       (1x1)  2*latent -> 2*latent          => DiagonalGaussian
    ----------------------------------------------------------------------
    post_quant_conv  (1x1)  latent -> latent
    decoder.conv_in                      latent -> ch*m[L-1]                  H/f
    decoder.mid      .block_1 .attn_1 .block_2
    decoder.up.L-1   .block.0..R         -> ch*m[L-1]  .upsample.conv         runs first, H/f -> 2H/f
      ...
    decoder.up.1     .block.0..R         -> ch*m[1]    .upsample.conv         H/2 -> H
    decoder.up.0     .block.0..R         -> ch*m[0]    (no upsample)          runs last, H
    decoder.norm_out, swish, decoder.conv_out  -> 3   img in [-1, 1] (not clamped)

``f = 2 ** (L - 1)``. The decoder has R + 1 blocks per level and its ``up`` index counts resolution levels
(``up.0`` is full resolution), so it runs in reverse index order. A block is ``ResnetBlock``: norm1, swish,
conv1, norm2, swish, conv2, plus ``nin_shortcut`` (1x1) where channels change. ``attn_1`` is single-head
self-attention over the h*w positions with ``norm`` and 1x1-conv ``q``, ``k``, ``v``, ``proj_out``.
GroupNorm everywhere is (norm_groups, eps 1e-6). Downsampling pads (0, 1, 0, 1) then convolves 3x3 with
stride 2; upsampling is nearest x2 then a 3x3 conv (in CPU inference one transposed convolution,
`sdlab.models.upsampled_conv`).

The latent scaling factor (0.18215 / 0.13025) is not applied here: ``encode`` returns the raw latent
distribution and ``decode`` takes a raw latent. Families own the scaling.

Imports only torch (``sdlab.models`` may import ``sdlab.utils`` and nothing else from sdlab).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdlab.models import cpu_kernels, cpu_norm, patch_conv
from sdlab.models.cpu_memory import reuses_large_blocks
from sdlab.models.layers import attention
from sdlab.models.upsampled_conv import upsampled_conv

GROUP_NORM_EPS = 1e-6
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
ATTENTION_PROJECTIONS = ("q", "k", "v", "proj_out")


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


# ----------------------------------------------------------------------------------------------------------
# Latent distribution


def _randn(shape: tuple[int, ...], generator, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Standard normal noise drawn the way diffusers' ``randn_tensor`` draws it, so seeds agree with it.

    A list of generators draws one image at a time, each from its own generator (a list of one counts as a
    single generator); a single generator draws the whole batch at once. Noise is drawn on the generator's
    device (a CPU generator gives the same noise whatever device the model is on) and then moved.
    """
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        per_image = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
        return torch.cat(per_image).to(device)  # (B, C, h, w)
    draw_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)


def posterior_draw(mean: Tensor, std: Tensor, generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
    """z = mean + std * eps (B, C, h, w), eps ~ N(0, I) drawn as diffusers' ``randn_tensor`` draws it (``_randn``), in
    the dtype of ``mean``: diffusers' ``DiagonalGaussianDistribution.sample``. sdlab's one posterior draw
    (`DiagonalGaussian.sample`; training's per-image draw, ``train.data.posterior_sample``)."""
    return mean + std * _randn(tuple(mean.shape), generator, mean.device, mean.dtype)


class DiagonalGaussian:
    """The posterior q(z | x) = N(mean, diag(exp(logvar))) that the encoder outputs (raw, unscaled latent).

    ``logvar`` is clamped to [-30, 20] as in LDM; ``mean`` is a view of the encoder moments.
    """

    def __init__(self, moments: Tensor):  # (B, 2 * C, h, w)
        mean, logvar = moments.chunk(2, dim=1)
        self.mean = mean  # (B, C, h, w)
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)  # (B, C, h, w)

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> Tensor:
        return torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
        """z = mean + std * eps (`posterior_draw`)."""
        return posterior_draw(self.mean, self.std, generator)

    def mode(self) -> Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> Tensor:
        """KL(self || other) summed over (C, h, w), per image; ``other`` defaults to N(0, I).

        KL = 1/2 sum[(mu1 - mu2)^2 / var2 + var1 / var2 - 1 - logvar1 + logvar2].
        """
        if other is None:
            terms = self.mean.pow(2) + self.var - 1.0 - self.logvar
        else:
            squared_distance = (self.mean - other.mean).pow(2)
            terms = (squared_distance + self.var) / other.var - 1.0 - self.logvar + other.logvar
        return 0.5 * terms.sum(dim=(1, 2, 3))  # (B,)


# ----------------------------------------------------------------------------------------------------------
# Building blocks


def _group_norm(num_channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, num_channels, eps=GROUP_NORM_EPS, affine=True)


def _memory_format(x: Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


class ResnetBlock(nn.Module):
    """norm1 -> swish -> conv1 -> norm2 -> swish -> conv2, plus the (1x1 ``nin_shortcut``) input. No dropout."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels, groups)
        self.conv1 = patch_conv.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels, groups)
        self.conv2 = patch_conv.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = patch_conv.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, consume: bool = False) -> Tensor:  # (B, C_in, H, W) -> (B, C_out, H, W)
        """`consume`: x is the caller's to give up (the encoder's and decoder's own activations in inference,
        `_consumes`), so its memory may hold the result.

        One step per line, so that each intermediate is freed as soon as the next exists. At 512 px and above
        each new one is a fresh mapping that the kernel faults in page by page (SD1.5's decode at 512 px
        allocated 1.5 GB), so few are made: norm2 writes over conv1's output where no hook holds it, and conv2
        adds its result to the shortcut, inside the convolution where oneDNN can
        (`patch_conv.Conv2d.forward_add`): into the 1x1 shortcut's own output, or into x when consumed; with a
        1x1 shortcut norm1 then writes over a consumed x too, and x's memory is released after conv1 (the
        caller's frames still name x, but hold no memory for it)."""
        if self.nin_shortcut is None:
            shortcut, mine = x, consume
            h = cpu_norm.group_norm(self.norm1, x, silu=True)  # (B, C_in, H, W)
        else:
            shortcut, mine = self.nin_shortcut(x), not cpu_kernels.has_hooks(self.nin_shortcut)  # (B, C_out, H, W)
            h = cpu_norm.group_norm(self.norm1, x, silu=True, overwrite=consume)
        h = self.conv1(h)  # (B, C_out, H, W)
        if consume and shortcut is not x:
            _release(x)   # norm1 wrote over it and conv1 has read it
        h = cpu_norm.group_norm(self.norm2, h, silu=True, overwrite=not cpu_kernels.has_hooks(self.conv1))
        return self.conv2.forward_add(h, shortcut, into_other=mine)  # conv2(h) + shortcut


def _release(x: Tensor) -> None:
    """Free a consumed activation's memory now, though the callers' frames still name it (an encoder's or
    decoder's level input, its block's input) until the call returns: they never read it again. Of SD1.5's
    512-px decode, the most memory in large blocks at once 352 -> 256 MB (`cpu_memory.stats`)."""
    x.untyped_storage().resize_(0)


def _consumes(module: nn.Module) -> bool:
    """Whether `module`'s blocks may write over the activations they are handed: gradients off (with them on,
    a layer that trains could have saved an activation for its backward, even where the activation itself
    needs no gradient), no compiled graph traced, and no hook anywhere in it (one could hold an activation or
    see it overwritten)."""
    return (not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not any(cpu_kernels.has_hooks(m) for m in module.modules()))


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, residual; q/k/v/proj_out are 1x1 convs.

    softmax(q k^T / sqrt(C)) v, computed by the models' shared `layers.attention` (a fused kernel: the (h*w)^2
    score matrix is never materialised). Loading accepts the q/k/v/proj_out weights in the
    Linear shape (C, C) some converted files use (see ``normalize_vae_attention_shapes``).
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W)
        b, c, height, width = x.shape
        tokens = cpu_norm.group_norm(self.norm, x).flatten(2).transpose(1, 2)  # (B, HW, C)
        # a 1x1 conv on (B, C, H, W) is a linear map on (B, HW, C) tokens
        q = F.linear(tokens, self.q.weight.view(c, c), self.q.bias)  # (B, HW, C)
        k = F.linear(tokens, self.k.weight.view(c, c), self.k.bias)  # (B, HW, C)
        v = F.linear(tokens, self.v.weight.view(c, c), self.v.bias)  # (B, HW, C)
        del tokens
        attended = attention(q, k, v, heads=1)  # (B, HW, C)
        del q, k, v
        out = F.linear(attended, self.proj_out.weight.view(c, c), self.proj_out.bias)  # (B, HW, C)
        # back to (B, C, H, W) as a channels-last view; the output keeps the input's memory format, which the
        # following layers propagate
        out = out.view(b, height, width, c).permute(0, 3, 1, 2)  # (B, C, H, W)
        return out.contiguous(memory_format=_memory_format(x)).add_(x)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ATTENTION_PROJECTIONS:
            key = f"{prefix}{name}.weight"
            if key in state_dict:
                state_dict[key] = _as_conv1x1(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Downsample(nn.Module):
    """Pad (0, 1, 0, 1) (right and bottom only, as in LDM), then a stride-2 3x3 conv without padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor, consume: bool = False) -> Tensor:  # (B, C, H, W)
        """`consume`: as `ResnetBlock`'s: x is released once padded."""
        padded = F.pad(x, (0, 1, 0, 1))  # (B, C, H + 1, W + 1)
        if consume:
            _release(x)
        return self.conv(padded)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, consume: bool = False) -> Tensor:  # (B, C, H, W)
        """`consume`: as `ResnetBlock`'s: x is released once used. In CPU inference the pair runs as one
        transposed convolution (`upsampled_conv`: 2.25 x fewer FLOPs, no enlarged copy)."""
        out = upsampled_conv(x, self.conv)  # (B, C, 2H, 2W)
        if consume:
            _release(x)
        return out


class MidBlock(nn.Module):
    """block_1 -> attn_1 -> block_2 at the lowest resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor, consume: bool = False) -> Tensor:
        """`consume`: as `ResnetBlock`'s (the attention block's output is always its own)."""
        return self.block_2(self.attn_1(self.block_1(x, consume)), consume)


class Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks) then an optional ``downsample`` / ``upsample``."""

    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None, resample_name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.resample_name = resample_name
        if resample is not None:
            self.add_module(resample_name, resample)

    def forward(self, x: Tensor, consume: bool = False) -> Tensor:
        """`consume`: as `ResnetBlock`'s."""
        for block in self.block:
            x = block(x, consume)
        resample = getattr(self, self.resample_name, None)
        return x if resample is None else resample(x, consume)


class Encoder(nn.Module):
    """img (B, in_channels, H, W) -> moments (B, 2 * latent_channels, H/f, W/f), before ``quant_conv``."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = cfg.base_channels
        for level, width in enumerate(widths):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, width, cfg.norm_groups))
                block_in = width
            is_lowest = level == len(widths) - 1
            self.down.append(Level(blocks, None if is_lowest else Downsample(width), "downsample"))
        self.mid = MidBlock(block_in, cfg.norm_groups)
        self.norm_out = _group_norm(block_in, cfg.norm_groups)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.latent_channels, 3, padding=1)

    @reuses_large_blocks
    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        consume = _consumes(self)   # from here on every activation is this encoder's own
        for level in self.down:
            h = level(h, consume)  # (B, ch*m[i], H/2^i, W/2^i) after the level's downsample
        h = self.mid(h, consume)  # (B, ch*m[-1], H/f, W/f)
        h = cpu_norm.group_norm(self.norm_out, h, silu=True, overwrite=consume)
        return self.conv_out(h)  # (B, 2 * latent, H/f, W/f)


class Decoder(nn.Module):
    """latent (B, latent_channels, h, w) -> img (B, out_channels, h*f, w*f), after ``post_quant_conv``."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        block_in = widths[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, cfg.norm_groups)
        levels: list[Level] = []
        for level in reversed(range(len(widths))):  # built lowest resolution first, stored by level index
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, widths[level], cfg.norm_groups))
                block_in = widths[level]
            levels.insert(0, Level(blocks, Upsample(block_in) if level != 0 else None, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(block_in, cfg.norm_groups)
        self.conv_out = nn.Conv2d(block_in, cfg.out_channels, 3, padding=1)

    @reuses_large_blocks
    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)  # (B, ch*m[-1], h, w)
        consume = _consumes(self)   # from here on every activation is this decoder's own
        h = self.mid(h, consume)
        for level in reversed(self.up):
            h = level(h, consume)  # doubles the resolution except at up.0
        h = cpu_norm.group_norm(self.norm_out, h, silu=True, overwrite=consume)
        return self.conv_out(h)  # (B, out_channels, h*f, w*f)


class AutoencoderKL(nn.Module):
    """The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, sec. 3 and appendix G)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def moments(self, img: Tensor) -> Tensor:
        """img (B, in_channels, H, W) in [-1, 1] -> the raw posterior's moments (B, 2 * latent, H//f, W//f): mean,
        then log-variance (unclamped; ``DiagonalGaussian`` clamps it).

        Any H and W: each `Downsample` halves a side rounding down (its right / bottom pad), as in LDM and
        diffusers, so a side that is not a multiple of f gives floor(side / f) latent pixels. The input is cast
        to the model's dtype.
        """
        return self.quant_conv(self.encoder(img.to(self.dtype)))  # (B, 2 * latent, H//f, W//f)

    def encode(self, img: Tensor) -> DiagonalGaussian:
        """img (B, in_channels, H, W) in [-1, 1] -> raw (unscaled) posterior over (B, latent, H/f, W/f)."""
        return DiagonalGaussian(self.moments(img))

    def decode(self, z: Tensor) -> Tensor:
        """Raw latent (B, latent, h, w) -> img (B, out_channels, h*f, w*f), nominally in [-1, 1], unclamped."""
        return self.decoder(self.post_quant_conv(z.to(self.dtype)))

    def forward(
        self,
        img: Tensor,
        sample_posterior: bool = True,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruction for training: returns (decoded image, posterior). The image's sides must be multiples
        of f, so that the reconstruction has its size."""
        f = self.cfg.downsample_factor
        if img.shape[-2] % f or img.shape[-1] % f:
            raise ValueError(f"image size {tuple(img.shape[-2:])} is not a multiple of the VAE factor {f}")
        posterior = self.encode(img)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


# ----------------------------------------------------------------------------------------------------------
# Loading helpers


def _as_conv1x1(weight: Tensor) -> Tensor:
    """(C_out, C_in) Linear or (C_out, C_in, 1) Conv1d weight -> (C_out, C_in, 1, 1) Conv2d weight (a view)."""
    if weight.ndim == 2:
        return weight[:, :, None, None]
    if weight.ndim == 3:
        return weight[:, :, :, None]
    return weight


def normalize_vae_attention_shapes(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Return a copy of ``state`` whose mid-attention q/k/v/proj_out weights have the 1x1-conv shape.

    Some converted files store them as Linear (C, C) (or Conv1d (C, C, 1)); original LDM files use
    (C, C, 1, 1). Works with any key prefix (e.g. ``first_stage_model.``); other keys pass through unchanged.
    """
    suffixes = tuple(f".attn_1.{name}.weight" for name in ATTENTION_PROJECTIONS)
    return {key: _as_conv1x1(value) if key.endswith(suffixes) else value for key, value in state.items()}
