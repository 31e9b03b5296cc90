"""Explicit, batch-reproducible noise: every random draw comes from a per-image generator.

Image i of a batch always gets the same noise for the same seed, whatever the batch size: draws are made
from image i's own generator (`generators_for`) and then moved. The generator is the request's random
source (`RNG_SOURCES`, A1111's "Random number generator source" option, ``randn_source``):

- "CPU" (sdlab's default): a seeded CPU ``torch.Generator``, the same noise on every device. This is
  diffusers' ``randn_tensor`` with a list of CPU generators (image i drawn as a ``(1, C, h, w)`` tensor
  from generator i).
- "NV": a `PhiloxGenerator` (``diffusion/philox.py``), the numbers an NVIDIA GPU's ``torch.randn`` draws,
  computed on the CPU: the same noise on every device.
- "GPU": on a CUDA device that device's own seeded ``torch.Generator``, as A1111 draws; on any other device
  the Philox numbers, since A1111's "GPU" pictures are drawn by NVIDIA GPUs (A1111 itself on a CPU or a Mac
  draws them on the CPU instead, as "CPU").

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

from sdlab.diffusion.philox import PhiloxGenerator

__all__ = ["BATCH_NOISE", "RNG_SOURCES", "Generator", "NoiseSource", "draw", "first_noise", "generators_for", "image_noise",
           "initial_noise", "per_image_noise"]

RNG_SOURCES = ("CPU", "GPU", "NV")            # A1111's randn_source values
BATCH_NOISE = ("per_image", "comfyui")        # a batch's noise: a generator per image, or one for the batch
Generator = torch.Generator | PhiloxGenerator


class NoiseSource(Protocol):
    """Fresh standard-normal noise shaped like the sample, for the step ``sigma -> sigma_next``.

    Plain Gaussian sources ignore the sigmas; a Brownian tree (SDE samplers) uses them.
    """

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor: ...


def generators_for(seeds: Sequence[int], rng: str = "CPU", device: torch.device | str = "cpu",
                   batch_noise: str = "per_image") -> list[Generator]:
    """One seeded generator per image of the random source `rng` (module docstring) for a run on `device`.

    `batch_noise` "comfyui": one generator, of ``seeds[0]``, stands for every image (the list holds that one object
    len(seeds) times), and the batch's noise is drawn from it as one (B, C, h, w) tensor (`_draw`), as ComfyUI's
    ``prepare_noise`` (``torch.manual_seed(seed)``, one ``torch.randn`` of the batch) and its step noise (one
    generator of the seed + 1 for the whole x) draw it. Image 0 is the same as with a generator per image."""
    if batch_noise == "comfyui":
        return generators_for(seeds[:1], rng, device) * len(seeds)
    device = torch.device(device)
    if rng == "NV" or (rng == "GPU" and device.type != "cuda"):
        return [PhiloxGenerator(seed) for seed in seeds]
    where = device if rng == "GPU" else torch.device("cpu")
    return [torch.Generator(where).manual_seed(int(seed)) for seed in seeds]


def draw(generator: Generator, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """The generator's next standard normal draw of `shape` in `dtype`, on the generator's device (a
    `PhiloxGenerator` draws float32, cast)."""
    if isinstance(generator, PhiloxGenerator):
        return generator.randn(shape).to(dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype)


def _draw(generators: Sequence[Generator], image_shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Image i from generator i, each ``(1, *image_shape)`` in ``dtype`` on the generators' device, concatenated;
    one generator standing for the whole batch (`generators_for`'s "comfyui") draws it as one tensor (torch's CPU
    normal fills in blocks of 16, so B draws of one image differ from one of the batch where an image is no
    multiple of 16 numbers)."""
    if len(generators) > 1 and all(g is generators[0] for g in generators):
        return draw(generators[0], (len(generators), *image_shape), dtype)               # (B, *image_shape)
    return torch.cat([draw(g, (1, *image_shape), dtype) for g in generators])


def initial_noise(
    shape: tuple[int, ...],
    seeds: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    *,
    draw_dtype: torch.dtype = torch.float32,
    rng: str = "CPU",
) -> Tensor:
    """Unit Gaussian noise of ``shape`` (B, C, h, w); image i the first draw of ``seeds[i]``'s generator of the
    random source `rng`.

    "CPU" equals diffusers' ``randn_tensor(shape, generator=[Generator('cpu').manual_seed(s) for s in seeds])``.
    """
    if len(seeds) != shape[0]:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {shape[0]}")
    noise = _draw(generators_for(seeds, rng, device), tuple(shape[1:]), draw_dtype)  # (B, C, h, w)
    return _upload(noise, torch.device(device), dtype)


class _PerImageNoise:
    """A ``NoiseSource`` drawing each image's step noise from its own generator, in call order."""

    def __init__(self, generators: Sequence[Generator], like: Tensor, draw_dtype: torch.dtype) -> None:
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
    """Drawn noise in `dtype` on `device`. From the CPU to CUDA from pinned memory without blocking: a copy
    from ordinary (pageable) memory first waits for the whole GPU queue, which would be once per sampler
    step. The cast happens on the CPU, so the pinned tensor is what is copied."""
    if device.type == "cuda" and noise.device.type == "cpu":
        return noise.to(dtype).pin_memory().to(device, non_blocking=True)
    return noise.to(device=device, dtype=dtype)


def per_image_noise(
    generators: Sequence[Generator], like: Tensor, *, draw_dtype: torch.dtype = torch.float32
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


def variation_noise(noise: Tensor, subseeds: Sequence[int], strength: float, rng: str = "CPU") -> Tensor:
    """``noise`` (B, C, h, w) with image i blended toward the noise of ``subseeds[i]`` by ``strength``
    (A1111's variation seed; the subseed noise is the first float32 draw of a fresh generator of the random
    source `rng`, like the main noise; blended on the CPU)."""
    if strength == 0:
        return noise
    subseed_generators = generators_for(subseeds, rng, noise.device)
    sub = _draw(subseed_generators, tuple(noise.shape[1:]), torch.float32).cpu()        # (B, C, h, w)
    mixed = [slerp_a1111(strength, n.float().cpu(), s) for n, s in zip(noise, sub)]
    return torch.stack(mixed).to(device=noise.device, dtype=noise.dtype)              # (B, C, h, w)


def first_noise(generators: Sequence[Generator], like: Tensor, seeds: Sequence[int], subseeds: Sequence[int],
                subseed_strength: float, rng: str = "CPU", resize_from: tuple[int, int] | None = None) -> Tensor:
    """The unit noise of the first x (B, C, h, w) shaped like `like`, A1111's ``ImageRNG.first``: image i's
    generator's first draw blended toward its subseed's noise (`variation_noise`). With `resize_from` (h', w')
    latent pixels (A1111's "Seed resize from"), the seed's noise at that size (a fresh generator's first draw,
    blended toward the subseed's at that size) is placed at the centre of the generator's first draw at the
    full size (`place_centred`), so that a picture keeps its composition at another size."""
    if resize_from is None or tuple(resize_from) == tuple(like.shape[-2:]):
        return variation_noise(per_image_noise(generators, like)(), subseeds, subseed_strength, rng)
    small_shape = (like.shape[0], like.shape[1], *resize_from)
    small = initial_noise(small_shape, seeds, like.dtype, like.device, rng=rng)            # (B, C, h', w')
    small = variation_noise(small, subseeds, subseed_strength, rng)
    return place_centred(per_image_noise(generators, like)(), small)                      # (B, C, h, w)


def place_centred(noise: Tensor, small: Tensor) -> Tensor:
    """`noise` (B, C, h, w) with `small` (B, C, h', w') written over its centre, cut to its centre where it is
    larger, by A1111's offsets (``ImageRNG.first``): floor((h - h') / 2) (for a larger `small` whose size
    differs by an odd number, the last row / column of `noise` stays)."""
    (height, width), (small_height, small_width) = noise.shape[-2:], small.shape[-2:]
    dy, dx = (height - small_height) // 2, (width - small_width) // 2
    rows = small_height if dy >= 0 else small_height + 2 * dy
    cols = small_width if dx >= 0 else small_width + 2 * dx
    to_y, to_x, from_y, from_x = max(dy, 0), max(dx, 0), max(-dy, 0), max(-dx, 0)
    placed = noise.clone()
    placed[..., to_y:to_y + rows, to_x:to_x + cols] = small[..., from_y:from_y + rows, from_x:from_x + cols]
    return placed
