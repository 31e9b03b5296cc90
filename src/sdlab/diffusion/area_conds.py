"""Area conditioning: several conditionings, each on its own rectangle of the latent, averaged by weight.

ComfyUI's area composition (ConditioningSetArea and its kin; comfy/samplers.py `get_area_and_mult` and
`calc_cond_batch`): each conditioning runs the denoiser on the crop of x under its area, and its prediction is
added into the whole at that area times a weight, `strength` inside the area, fading linearly over up to 8 latent
rows / columns (a quarter of its side at most) at every edge that lies inside the picture. The sum is divided by
the summed weights (plus 1e-37, so a pixel no area covers comes out 0). `opposite_areas` gives each side an entry
of every area the other side has (ComfyUI's `create_cond_with_same_area_if_none`), so that the negative prompt is
drawn on the same crops as the positive's areas.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from sdlab.diffusion.denoiser import DenoiseFn

__all__ = ["Area", "AreaPart", "FEATHER", "area_average", "area_weight", "opposite_areas"]

FEATHER = 8
"""Latent rows / columns an inner edge of an area fades over (ComfyUI's `fuzz`), at most a quarter of its side."""
EMPTY_COUNT = 1e-37
"""What ComfyUI's sum of weights starts at, so that a pixel no area covers divides 0 by it."""


@dataclass(frozen=True)
class Area:
    """A rectangle of the latent in latent pixels, in ComfyUI's ``conds['area']`` order."""

    height: int
    width: int
    top: int
    left: int

    def clamped(self, size: tuple[int, int]) -> Area:
        """The area cut at the latent's (h, w) bottom and right edges (ComfyUI's
        ``area[i] = min(shape - offset, area[i])``)."""
        return replace(self, height=min(size[0] - self.top, self.height), width=min(size[1] - self.left, self.width))

    def contains(self, other: Area) -> bool:
        return (other.top >= self.top and other.left >= self.left and self.top + self.height >= other.top + other.height
                and self.left + self.width >= other.left + other.width)


@dataclass(frozen=True)
class AreaPart:
    """One conditioning of a side: what it conditions on (`cond`: the denoiser's keyword arguments), its area
    (None: the whole latent) and the weight it is averaged with."""

    cond: Mapping[str, Any]
    area: Area | None = None
    strength: float = 1.0


def area_weight(area: Area | None, strength: float, size: tuple[int, int], like: Tensor) -> Tensor:
    """The weight of a part over its (clamped) area (1, 1, ah, aw) like `like`: `strength`, times
    ``(t + 1) / rr`` on row / column t from each edge inside the latent of (h, w) `size` (rr = min(8, side // 4));
    a part without an area weighs `strength` everywhere, unfeathered."""
    if area is None:
        return torch.full((1, 1, *size), float(strength), dtype=like.dtype, device=like.device)
    weight = torch.full((1, 1, area.height, area.width), float(strength), dtype=like.dtype, device=like.device)
    for dim, (side, offset, whole) in enumerate(((area.height, area.top, size[0]), (area.width, area.left, size[1]))):
        rr = min(FEATHER, side // 4)
        for t in range(rr):
            fade = (1.0 / rr) * (t + 1)
            if offset != 0:
                weight.narrow(dim + 2, t, 1).mul_(fade)
            if side + offset < whole:
                weight.narrow(dim + 2, side - 1 - t, 1).mul_(fade)
    return weight


def _cropped(value: Any, area: Area, size: tuple[int, int]) -> Any:
    """A conditioning tensor laid out like the latent (an inpainting model's ``concat``: (B, C, h, w)) cut to the
    area, as ComfyUI's CONDNoiseShape; any other value as it is."""
    if isinstance(value, Tensor) and value.dim() == 4 and tuple(value.shape[-2:]) == size:
        return value[:, :, area.top:area.top + area.height, area.left:area.left + area.width]
    return value


def area_average(parts: Sequence[AreaPart], denoiser: DenoiseFn) -> DenoiseFn:
    """The denoiser of one side: `denoiser` on each part's area's crop of x with its conditioning (`part.cond`: the
    denoiser's keyword arguments, those laid out like the latent cut to the area as x is), summed with its
    `area_weight` and divided by the summed weights (ComfyUI's `calc_cond_batch` for one side)."""

    def averaged(x: Tensor, sigma: Tensor, **extra: Any) -> Tensor:
        size = (x.shape[-2], x.shape[-1])
        total = torch.zeros_like(x)                                                  # (B, C, h, w)
        count = torch.full_like(x, EMPTY_COUNT)                                      # (B, C, h, w)
        for part in parts:
            given = {**part.cond, **extra}
            if part.area is None:
                total += denoiser(x, sigma, **given) * part.strength
                count += part.strength
                continue
            area = part.area.clamped(size)
            if area.height <= 0 or area.width <= 0:
                raise ValueError(f"an area at ({area.left}, {area.top}) lies outside the {size[1]}x{size[0]} latent")
            box = (slice(None), slice(None), slice(area.top, area.top + area.height),
                   slice(area.left, area.left + area.width))
            crop = x[box]                                                            # (B, C, ah, aw)
            weight = area_weight(area, part.strength, size, x)                       # (1, 1, ah, aw)
            out = denoiser(crop, sigma, **{k: _cropped(v, area, size) for k, v in given.items()})
            total[box] += out * weight
            count[box] += weight
        return total / count

    return averaged


def opposite_areas(positive: list[AreaPart], negative: list[AreaPart]) -> tuple[list[AreaPart], list[AreaPart]]:
    """Both sides, each given a part for every area of the other side it lacks (ComfyUI's `process_conds`: for
    each side in order, `create_cond_with_same_area_if_none` on the other): the copy keeps the area and strength
    and takes the conditioning of the smallest part of its own side whose area holds that area (a part without
    one holding every area, but losing to any area that holds it); none where that part's area is the same one,
    or where no part holds it."""
    sides = [list(positive), list(negative)]
    for k in (0, 1):
        for part in sides[k]:           # the negative's loop sees the copies the positive's appended to it
            _add_same_area(sides[1 - k], part)
    return sides[0], sides[1]


def _add_same_area(side: list[AreaPart], part: AreaPart) -> None:
    if part.area is None:
        return
    smallest: AreaPart | None = None
    for other in side:
        if other.area is not None:
            if other.area.contains(part.area):
                if smallest is None or smallest.area is None or \
                        smallest.area.height * smallest.area.width > other.area.height * other.area.width:
                    smallest = other
        elif smallest is None:
            smallest = other
    if smallest is None or smallest.area == part.area:
        return
    side.append(replace(part, cond=smallest.cond))
