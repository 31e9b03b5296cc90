"""A tiny latent -> pixel decoder for live previews (TAESD-style, after Bohan Ollin Boer's TAESD decoder).

The full VAE decoder of a small model costs about half a sampling step; this one costs a few
milliseconds and draws the full-resolution picture (the linear latent -> RGB map draws one pixel per
latent). It is distilled from one VAE decoder (`sdlab.tiny.preview_decoder`), so it is only valid for
latents of that VAE: the file carries a few probe latents and the error the decoder makes on them, and
`agrees_with(vae_decode)` checks a model's VAE against them before a preview trusts it.

Network: the input (VAE latents times the ``latent_scale`` it was trained at, about unit variance) is
soft-clamped, ``3 tanh(x / 3)``; a 3x3 conv widens it, residual blocks (three 3x3 convs, ReLU) work at the
latent grid, then each nearest x2 upsampling is followed by a 3x3 conv (and blocks when asked); a last conv
gives RGB in [0, 1].

File layout (safetensors, fp16 weights): the ``nn.Module`` state dict under ``decoder.``, the probe
latents ``probe.latents`` (N, C, h, w, VAE space); metadata ``sdlab.preview_decoder`` = "1",
``sdlab.preview_decoder.config`` (JSON of `PreviewDecoderConfig`), ``sdlab.preview_decoder.latent_scale``,
``sdlab.preview_decoder.probe_tolerance`` (mean abs error in [0, 1] that `agrees_with` accepts) and
free-form provenance keys.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from sdlab.utils.file_hashes import stat_version
from sdlab.utils.files import atomic_write

FORMAT_KEY = "sdlab.preview_decoder"


@dataclass(frozen=True)
class PreviewDecoderConfig:
    """Widths per resolution (latent grid first; each further entry is one x2 upsampling) and residual
    blocks per resolution."""

    latent_channels: int = 4
    widths: tuple[int, ...] = (32, 16, 16)
    blocks: tuple[int, ...] = (2, 0, 0)

    def __post_init__(self) -> None:
        if len(self.widths) != len(self.blocks) or not self.widths:
            raise ValueError("PreviewDecoderConfig: widths and blocks need one entry per resolution")

    @property
    def upscale(self) -> int:
        return 2 ** (len(self.widths) - 1)


def _conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class Block(nn.Module):
    """relu(conv(relu(conv(relu(conv(x))))) + x), TAESD's block at a fixed width."""

    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(width, width), nn.ReLU(), _conv(width, width), nn.ReLU(), _conv(width, width))

    def forward(self, x: Tensor) -> Tensor:  # (B, W, h, w)
        return torch.relu(self.conv(x) + x)


class TinyDecoder(nn.Module):
    """(B, C, h, w) scaled VAE latents -> (B, 3, h * upscale, w * upscale) pixels in [0, 1] (unclamped)."""

    def __init__(self, config: PreviewDecoderConfig = PreviewDecoderConfig()):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = [_conv(config.latent_channels, config.widths[0]), nn.ReLU()]
        layers += [Block(config.widths[0]) for _ in range(config.blocks[0])]
        for previous, width, blocks in zip(config.widths, config.widths[1:], config.blocks[1:]):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), _conv(previous, width, bias=False), nn.ReLU()]
            layers += [Block(width) for _ in range(blocks)]
        layers.append(_conv(config.widths[-1], 3))
        self.layers = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:  # (B, C, h, w)
        return self.layers(torch.tanh(z / 3) * 3)                                 # (B, 3, H, W)


@dataclass(frozen=True)
class PreviewDecoder:
    """A loaded tiny decoder with the latent scale it was trained at and its probe."""

    network: TinyDecoder
    latent_scale: float                 # network input = VAE latents * latent_scale
    probe_latents: Tensor | None        # (N, C, h, w) VAE latents of the decoder's own training VAE
    probe_tolerance: float | None       # mean abs error (of [0, 1]) accepted on the probe

    @torch.no_grad()
    def decode(self, z_vae: Tensor) -> Tensor:
        """(B, C, h, w) VAE latents -> (B, 3, H, W) float32 pixels in [0, 1]."""
        weight = next(self.network.parameters())
        x = z_vae.to(weight.device, weight.dtype) * self.latent_scale                 # (B, C, h, w)
        return self.network(x).float().clamp(0, 1)                                    # (B, 3, H, W)

    def preview(self, latents: Tensor, scaling_factor: float) -> Tensor:
        """(B, C, h, w) model latents (z_vae * scaling_factor) -> (B, 3, H, W) in [0, 1]."""
        return self.decode(latents.float() / scaling_factor)

    @torch.no_grad()
    def probe_error(self, vae_decode: Callable[[Tensor], Tensor]) -> float:
        """Mean abs error (of [0, 1]) against ``vae_decode`` ((N, C, h, w) VAE latents -> pixels in [-1, 1])
        on the probe latents."""
        if self.probe_latents is None:
            raise ValueError("this preview decoder carries no probe latents")
        reference = ((vae_decode(self.probe_latents).float().cpu() + 1) / 2).clamp(0, 1)   # (N, 3, H, W)
        return float((self.decode(self.probe_latents).cpu() - reference).abs().mean())

    def agrees_with(self, vae_decode: Callable[[Tensor], Tensor]) -> bool:
        """Whether ``vae_decode`` is (up to the decoder's own error) the VAE this decoder was distilled from."""
        if self.probe_latents is None or self.probe_tolerance is None:
            return False
        return self.probe_error(vae_decode) <= self.probe_tolerance


def save_preview_decoder(path: str | os.PathLike[str], decoder: PreviewDecoder,
                         metadata: dict[str, str] | None = None, dtype: torch.dtype = torch.float16) -> None:
    """Write ``decoder`` (weights in ``dtype``; the layout in the module docstring) to ``path`` (temp file,
    then rename)."""
    tensors = {f"decoder.{k}": v.detach().to("cpu", dtype).contiguous()
               for k, v in decoder.network.state_dict().items()}
    info = dict(metadata or {})
    config = asdict(decoder.network.config)
    info.update({FORMAT_KEY: "1", f"{FORMAT_KEY}.config": json.dumps(config),
                 f"{FORMAT_KEY}.latent_scale": repr(float(decoder.latent_scale))})
    if decoder.probe_latents is not None:
        tensors["probe.latents"] = decoder.probe_latents.detach().to("cpu", torch.float16).contiguous()
    if decoder.probe_tolerance is not None:
        info[f"{FORMAT_KEY}.probe_tolerance"] = repr(float(decoder.probe_tolerance))
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=info))


def read_preview_decoder(path: str | os.PathLike[str]) -> PreviewDecoder:
    """Read a preview decoder file (fp32 on the CPU, eval mode). Raises ValueError when it is not one."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        info = handle.metadata() or {}
    if info.get(FORMAT_KEY) != "1":
        raise ValueError(f"{path}: not an sdlab preview decoder file (no {FORMAT_KEY} metadata)")
    fields = json.loads(info[f"{FORMAT_KEY}.config"])
    config = PreviewDecoderConfig(latent_channels=int(fields["latent_channels"]),
                                  widths=tuple(fields["widths"]), blocks=tuple(fields["blocks"]))
    tensors = load_file(str(path))
    network = TinyDecoder(config)
    network.load_state_dict({k.removeprefix("decoder."): v.float() for k, v in tensors.items()
                             if k.startswith("decoder.")})
    network.eval().requires_grad_(False)
    probe = tensors.get("probe.latents")
    tolerance = info.get(f"{FORMAT_KEY}.probe_tolerance")
    return PreviewDecoder(network, float(info[f"{FORMAT_KEY}.latent_scale"]),
                          probe.float() if probe is not None else None,
                          float(tolerance) if tolerance is not None else None)


@lru_cache(maxsize=8)
def _cached(path: str, version: tuple[int, ...]) -> PreviewDecoder:
    return read_preview_decoder(path)


def load_preview_decoder(path: str | os.PathLike[str]) -> PreviewDecoder:
    """`read_preview_decoder`, cached per version of the file (`file_hashes.stat_version`): callers share one
    network."""
    path = Path(path).resolve()
    return _cached(str(path), stat_version(path.stat()))


__all__ = ["Block", "PreviewDecoder", "PreviewDecoderConfig", "TinyDecoder", "load_preview_decoder",
           "read_preview_decoder", "save_preview_decoder"]
