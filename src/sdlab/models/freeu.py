"""FreeU (Si et al. 2023, "FreeU: Free Lunch in Diffusion U-Net"): the U-Net decoder's backbone features scaled up
and its skip features' lowest frequencies scaled down, at the two deepest decoder stages; no training.

At each output block, before the backbone features h (B, C, h, w) are concatenated with the skip s:

    v1:  h[:, :C/2] *= b                                    (the first half of the channels)
    v2:  h[:, :C/2] *= (b - 1) * m + 1,   m = (mean_c h - min) / (max - min)   (per picture, over h x w)
    both: s = IFFT(FFT(s) * mask),  mask = s_k on the 2 x 2 lowest frequencies (threshold 1), 1 elsewhere

with (b, s_k) = (b1, s1) at stage 1 and (b2, s2) at stage 2. The Fourier filter runs in fp32 and is cast back, as
every reference does (torch's FFT takes no bf16, and fp16 only for power-of-2 sizes). sd-webui-freeu
(ljleb/sd-webui-freeu, A1111's FreeU extension) scales a window of h's channels whose default, offset 0 and width
0.5, runs from channel 0 to channel round(C/2) inclusive (its `ratio_to_region` and `mask <= region_end`): the
first C/2 + 1 channels, one more than the others' half.

Which blocks are stage 1 and 2 differs between the references:
- "comfyui" (ChenyangSi/FreeU's free_lunch_utils.py, ComfyUI's nodes_freelunch.py, Forge's FreeU Integrated,
  sd-webui-freeu): by h's channel count, 4 x model_channels -> stage 1, 2 x model_channels -> stage 2 (sd-webui-freeu
  names the counts, 1280 and 640: those of every SD1 / SD2 / SDXL U-Net, whose model_channels is 320). SD1.5
  (320, 640, 1280, 1280): stage 1 is the six blocks of both 1280 levels and the first 640 block (which receives
  the upsampled 1280 features), stage 2 the other 640 blocks and the first 320 block.
- "diffusers" (`UNet2DConditionModel.enable_freeu`, `apply_freeu`): by up block, up block 0 -> stage 1, up block 1
  -> stage 2 (each up block = one level's num_res_blocks + 1 output blocks). SD1.5: stage 1 is the 8 x 8 1280
  level, stage 2 the 16 x 16 1280 level; SDXL: stage 1 the 1280 level, stage 2 the 640 level, where ComfyUI
  also counts the 640 level's first block to stage 1 and the 320 level's first block to stage 2. As diffusers'
  up blocks (`is_freeu_enabled` tests each factor's truth), a factor of 0 turns FreeU off at every block.
- "sd-webui-freeu": the "comfyui" stages, the backbone factor on sd-webui-freeu's default window of C/2 + 1 channels
  (above); its other settings (other windows, a skip cutoff or high-end factor, a third stage, its own schedule) are
  not drawn, and the A1111 API refuses them by name (server/alwayson.py).

The step window [start, end] is Forge's FreeU Integrated's (extensions-builtin/sd_forge_freeu/scripts/
forge_freeu.py since Forge PR #1689): FreeU acts on the model calls whose step fraction s / (N - 1) lies in
[start, end], N the sampler steps the pass runs and s the step A1111's state reports to `on_cfg_denoiser`, which
its sampler callback sets after a step's model calls: i - 1 during step i (0 during step 0). A one-step pass
counts as 0 (where Forge divides by zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

FREEU_VERSIONS = (1, 2)
FREEU_CONVENTIONS = ("comfyui", "diffusers", "sd-webui-freeu")
MAX_FREEU_FACTOR = 10.0     # |b|, |s|: ComfyUI's inputs stop at 10, the extensions' sliders at 2..4
FREEU_FACTORS = ("b1", "b2", "s1", "s2")
"""FreeU's factors in the order every door lists them (the CLI's --freeu, Forge's args and its freeu_* labels)."""
FREEU_WINDOW = ("start", "end")
"""The step window's fields in Forge's order (its args after the factors, its freeu_start / freeu_end labels)."""


@dataclass(frozen=True)
class FreeU:
    """FreeU's setting: backbone factors b1, b2 and skip factors s1, s2 of stages 1 and 2, `version` 1 (the paper's
    constant backbone factor) or 2 (FreeU_V2: scaled by each position's normalised channel mean), and the
    `convention` that picks each stage's blocks and backbone channels ("comfyui", "diffusers" or "sd-webui-freeu":
    module docstring), and the fractions
    `start`..`end` of the sampler steps it acts on (Forge's window: module docstring). The default factors are
    ComfyUI's FreeU_V2 node's (1.3, 1.4, 0.9, 0.2), which are also ChenyangSi/FreeU's README values for SD1.4 and
    SDXL; that README gives SD1.5 1.5, 1.6, 0.9, 0.2 and SD2.1 1.4, 1.6, 0.9, 0.2 (Forge's presets too), ComfyUI's
    FreeU (v1) node defaults to 1.1, 1.2, 0.9, 0.2 and Forge's sliders to 1.01, 1.02, 0.99, 0.95."""

    b1: float = 1.3
    b2: float = 1.4
    s1: float = 0.9
    s2: float = 0.2
    version: int = 2
    convention: str = "comfyui"
    start: float = 0.0
    end: float = 1.0

    @property
    def windowed(self) -> bool:
        """Whether the step window leaves some steps out (FreeU then needs each model call's step)."""
        return self.start > 0 or self.end < 1

    def active(self, step: int, steps: int) -> bool:
        """Whether FreeU acts on the model calls of sampler step i (0-based) of N: Forge's start <= s / (N - 1)
        <= end with s = max(i - 1, 0), the step A1111's state reports then (module docstring)."""
        reported = max(step - 1, 0)
        return self.start <= (reported / (steps - 1) if steps > 1 else 0.0) <= self.end

    def stage_of(self, block: int, channels: int, model_channels: int, blocks_per_level: int) -> int | None:
        """The stage (1, 2 or None) of output block `block`, whose incoming backbone features have `channels`."""
        if self.convention == "diffusers":
            if not all(getattr(self, name) for name in FREEU_FACTORS):   # diffusers' is_freeu_enabled: truthiness
                return None
            up_block = block // blocks_per_level
            return up_block + 1 if up_block < 2 else None
        return {4 * model_channels: 1, 2 * model_channels: 2}.get(channels)

    def join(self, h: Tensor, skip: Tensor, stage: int | None) -> Tensor:
        """torch.cat([h, skip], dim=1) with FreeU applied at `stage` (None: plain): the factor on h's first C/2
        channels (sd-webui-freeu's: C/2 + 1). h: (B, C, h, w) backbone features, skip: (B, C_skip, h, w); returns
        (B, C + C_skip, h, w) in h's dtype. h and skip are not changed."""
        if stage is None:
            return torch.cat([h, skip], dim=1)
        b, s = (self.b1, self.s1) if stage == 1 else (self.b2, self.s2)
        half = round(h.shape[1] / 2) + 1 if self.convention == "sd-webui-freeu" else h.shape[1] // 2
        scale = b if self.version == 1 else (b - 1) * normalised_channel_mean(h) + 1   # float or (B, 1, h, w)
        return torch.cat([h[:, :half] * scale, h[:, half:], fourier_filter(skip, 1, s)], dim=1)


def normalised_channel_mean(h: Tensor) -> Tensor:
    """FreeU_V2's weight map: the channel mean of h (B, C, h, w), min-max normalised over each picture's positions
    to 0..1; (B, 1, h, w) in h's dtype (ComfyUI's FreeU_V2 arithmetic, op for op). A constant map (a 1 x 1 level:
    an 8 x 8 latent's deepest SD1 level) weighs 0, where ComfyUI divides 0 by 0 and draws NaN."""
    mean = h.mean(1).unsqueeze(1)                                       # (B, 1, h, w)
    rows = mean.view(len(mean), -1)                                     # (B, h * w)
    low = rows.min(dim=-1, keepdim=True)[0][:, :, None, None]          # (B, 1, 1, 1)
    span = rows.max(dim=-1, keepdim=True)[0][:, :, None, None] - low   # (B, 1, 1, 1)
    return (mean - low) / torch.where(span > 0, span, torch.ones_like(span))


def fourier_filter(x: Tensor, threshold: int, scale: float) -> Tensor:
    """x (B, C, h, w) with the centred `2 threshold` x `2 threshold` block of its shifted 2-D spectrum times `scale`
    (FreeU's Fourier_filter); computed in fp32, returned in x's dtype."""
    spectrum = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))   # (B, C, h, w) complex
    rows, cols = spectrum.shape[-2:]
    mask = torch.ones(rows, cols, device=x.device)                      # (h, w); broadcast over B, C
    mask[rows // 2 - threshold: rows // 2 + threshold, cols // 2 - threshold: cols // 2 + threshold] = scale
    spectrum = torch.fft.ifftshift(spectrum * mask, dim=(-2, -1))
    return torch.fft.ifftn(spectrum, dim=(-2, -1)).real.to(x.dtype)
