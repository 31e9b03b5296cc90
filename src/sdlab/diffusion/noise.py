"""Explicit, batch-reproducible noise: every random draw comes from a per-image CPU generator.

Image i of a batch always gets the same noise for the same seed, whatever the batch size or the
device: draws are made on the CPU from image i's own ``torch.Generator`` and then moved. This is
diffusers' ``randn_tensor`` with a list of CPU generators (image i drawn as a ``(1, C, h, w)`` tensor
from generator i).

Draw dtype: sdlab draws in float32 and casts (A1111 and ComfyUI do the same), so a seed draws the same
noise in every dtype and with every torch. diffusers draws directly in the pipeline dtype, and whether a
CPU float16/bfloat16 draw equals the cast float32 draw depends on the torch version: on torch 2.13 it does
when the tensor has fewer than 16 elements or a multiple of 16 (true for SD latents whose h*w is a multiple
of 4, e.g. 64x64); torch 2.11 draws half precision on another path (a (1, 4, 64, 64) draw differs from
the cast float32 one by up to 6.5: diffusers' fp16 pictures there come from other noise than its fp32 ones;
diffusers issue #11056). Pass ``draw_dtype=torch.float16`` to reproduce diffusers' half-precision draws on
the torch at hand.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

__all__ = ["NoiseSource", "generators_for", "image_noise", "initial_noise", "per_image_noise"]


class NoiseSource(Protocol):
    """Fresh standard-normal noise shaped like the sample, for the step ``sigma -> sigma_next``.

    Plain Gaussian sources ignore the sigmas; a Brownian tree (SDE samplers) uses them.
    """

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor: ...


def generators_for(seeds: Sequence[int]) -> list[torch.Generator]:
    """One seeded CPU generator per image."""
    return [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]


def _draw(generators: Sequence[torch.Generator], image_shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Image i from generator i, each ``(1, *image_shape)`` in ``dtype`` on the CPU, concatenated."""
    return torch.cat([torch.randn((1, *image_shape), generator=g, dtype=dtype) for g in generators])


def initial_noise(
    shape: tuple[int, ...],
    seeds: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    *,
    draw_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Unit Gaussian noise of ``shape`` (B, C, h, w); image i seeded by ``seeds[i]``.

    Equals diffusers' ``randn_tensor(shape, generator=[Generator('cpu').manual_seed(s) for s in seeds])``.
    """
    if len(seeds) != shape[0]:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {shape[0]}")
    noise = _draw(generators_for(seeds), tuple(shape[1:]), draw_dtype)                # (B, C, h, w)
    return _upload(noise, torch.device(device), dtype)


class _PerImageNoise:
    """A ``NoiseSource`` drawing each image's step noise from its own generator, in call order."""

    def __init__(self, generators: Sequence[torch.Generator], like: Tensor, draw_dtype: torch.dtype) -> None:
        if len(generators) != like.shape[0]:
            raise ValueError(f"got {len(generators)} generators for a batch of {like.shape[0]}")
        self.generators = list(generators)
        self.image_shape = tuple(like.shape[1:])
        self.device = like.device
        self.dtype = like.dtype
        self.draw_dtype = draw_dtype

    def __call__(self, sigma: Tensor | None = None, sigma_next: Tensor | None = None) -> Tensor:
        noise = _draw(self.generators, self.image_shape, self.draw_dtype)  # (B, C, h, w)
        return _upload(noise, self.device, self.dtype)

    def image(self, i: int) -> _PerImageNoise:
        """Image i's stream alone: its generator's draws, (1, C, h, w)."""
        alone = copy.copy(self)
        alone.generators = self.generators[i:i + 1]
        return alone


def image_noise(noise: NoiseSource, i: int) -> NoiseSource:
    """Image i's noise alone, (1, C, h, w), for a sampler whose images step apart: a source that keeps one
    stream per image (``per_image_noise``) hands over image i's (so image i draws only when it steps); any
    other gives row i of its draw, which for a Brownian tree is image i's increment whenever it is asked."""
    own = getattr(noise, "image", None)
    if own is not None:
        return own(i)
    return lambda sigma, sigma_next: noise(sigma, sigma_next)[i:i + 1]


def _upload(noise: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """CPU-drawn noise in `dtype` on `device`. To CUDA from pinned memory without blocking: a copy from
    ordinary (pageable) memory first waits for the whole GPU queue, which would be once per sampler step.
    The cast happens on the CPU, so the pinned tensor is what is copied."""
    if device.type == "cuda":
        return noise.to(dtype).pin_memory().to(device, non_blocking=True)
    return noise.to(device=device, dtype=dtype)


def per_image_noise(
    generators: Sequence[torch.Generator], like: Tensor, *, draw_dtype: torch.dtype = torch.float32
) -> NoiseSource:
    """Noise source for ancestral/SDE steps: image i's noise comes from ``generators[i]``.

    Pass the same generators that drew the initial noise to continue their streams, as diffusers'
    pipelines do (the generator list reaches both ``prepare_latents`` and ``scheduler.step``).
    """
    return _PerImageNoise(generators, like, draw_dtype)


def slerp_a1111(strength: float, low: Tensor, high: Tensor) -> Tensor:
    """A1111's variation-seed blend (modules/processing.py ``slerp``) of one image's noise ``low`` toward
    ``high`` (both (C, h, w)) by ``strength`` in [0, 1]: spherical interpolation with the vectors taken along
    dim 1 of the (C, h, w) tensor, as A1111 applies it; a linear mix when they are nearly parallel."""
    low_n = low / torch.norm(low, dim=1, keepdim=True)
    high_n = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_n * high_n).sum(1)                                        # (C, w)
    if dot.mean() > 0.9995:
        return low * strength + high * (1 - strength)
    omega = torch.acos(dot)                                              # (C, w)
    so = torch.sin(omega)
    return (torch.sin((1.0 - strength) * omega) / so).unsqueeze(1) * low + (torch.sin(strength * omega) / so).unsqueeze(1) * high


def variation_noise(noise: Tensor, subseeds: Sequence[int], strength: float) -> Tensor:
    """``noise`` (B, C, h, w) with image i blended toward the noise of ``subseeds[i]`` by ``strength``
    (A1111's variation seed; the subseed noise is drawn on the CPU in float32 like the main noise)."""
    if strength == 0:
        return noise
    sub = _draw(generators_for(subseeds), tuple(noise.shape[1:]), torch.float32)      # (B, C, h, w)
    mixed = [slerp_a1111(strength, n.float().cpu(), s) for n, s in zip(noise, sub)]
    return torch.stack(mixed).to(device=noise.device, dtype=noise.dtype)              # (B, C, h, w)
