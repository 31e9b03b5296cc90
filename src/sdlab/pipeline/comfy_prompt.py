"""ComfyUI's reading of a prompt's weights (its CLIPTextEncode, comfy/sd1_clip.py), for the ComfyUI emphasis mode.

ComfyUI's syntax is parentheses alone: ``(text)`` multiplies the weight by 1.1 at each level of nesting,
``(text:w)`` sets it to ``w`` (not multiplied by the enclosing weight), ``\\(`` and ``\\)`` are literal
parentheses; ``[text]`` is plain text (no de-emphasis), and so are ``BREAK`` and A1111's other syntax. A group
whose ``:w`` is no number keeps the 1.1 factor and its text, colon included. Unbalanced parentheses never fail
(`_groups`).

Its weights act on the encoding, not on a mean: ``z = z_empty + (z - z_empty) * w`` at each token, ``z_empty``
being the encoding of the empty prompt (``SDClipModel.encode_token_weights``; conditioning.py applies it).

`AreaPrompt` is one entry of ComfyUI's positive conditioning list under its area nodes (ConditioningSetArea,
ConditioningSetAreaPercentage, ConditioningSetAreaStrength): a prompt, its area and strength (`diffusion.area_conds`
draws them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sdlab.diffusion.area_conds import Area, AreaPart

__all__ = ["AreaPrompt", "area_rows", "check_area_prompts", "comfy_weighted_runs"]

_ESCAPED_CLOSE = "\0\1"
_ESCAPED_OPEN = "\0\2"


def comfy_weighted_runs(prompt: str) -> list[tuple[str, float]]:
    """``(text, weight)`` runs of `prompt` as ComfyUI's ``token_weights`` reads it, escapes undone."""
    escaped = prompt.replace("\\)", _ESCAPED_CLOSE).replace("\\(", _ESCAPED_OPEN)
    return [(_unescaped(text), weight) for text, weight in _weighted(escaped, 1.0)]


def _unescaped(text: str) -> str:
    return text.replace(_ESCAPED_CLOSE, ")").replace(_ESCAPED_OPEN, "(")


def _groups(text: str) -> list[str]:
    """`text` cut into plain runs and top-level parenthesised groups, as ComfyUI's ``parse_parentheses``: a group
    keeps its parentheses; one left open runs to the end as plain text; a stray ``)`` lowers the depth below 0,
    so that the ``(`` after it opens no group until the depth is back at 0."""
    groups: list[str] = []
    current = ""
    depth = 0
    for char in text:
        if char == "(":
            if depth == 0:
                if current:
                    groups.append(current)
                current = "("
            else:
                current += char
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                groups.append(current + ")")
                current = ""
            else:
                current += char
        else:
            current += char
    if current:
        groups.append(current)
    return groups


def _weighted(text: str, weight: float) -> list[tuple[str, float]]:
    runs: list[tuple[str, float]] = []
    for group in _groups(text):
        if len(group) >= 2 and group[0] == "(" and group[-1] == ")":
            inner = group[1:-1]
            inner_weight = weight * 1.1
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    inner_weight = float(inner[colon + 1:])
                    inner = inner[:colon]
                except ValueError:
                    pass
            runs += _weighted(inner, inner_weight)
        else:
            runs.append((group, weight))
    return runs


MAX_AREA_STRENGTH = 10.0                # ConditioningSetArea's strength range: 0..10


@dataclass(frozen=True)
class AreaPrompt:
    """One entry of ComfyUI's positive conditioning list: a prompt (a CLIPTextEncode), the area it is drawn on
    (ConditioningSetArea's pixels or ConditioningSetAreaPercentage's fractions, (width, height, x, y); neither:
    the whole picture) and the strength it weighs there (`diffusion.area_conds`)."""

    prompt: str
    pixels: tuple[int, int, int, int] | None = None
    fractions: tuple[float, float, float, float] | None = None
    strength: float = 1.0

    def latent_area(self, size: tuple[int, int], factor: int) -> Area | None:
        """The area on a latent of (h, w) `size` (a VAE of downsampling `factor`): ConditioningSetArea's pixels
        floor-divided by the factor (ComfyUI's ``(height // 8, width // 8, y // 8, x // 8)``, 8 being its VAEs'
        factor), or a percentage's as ComfyUI's `resolve_areas_and_cond_masks` rounds it ``(max(1, round(fh * h)),
        max(1, round(fw * w)), round(fy * h), round(fx * w))``; None for the whole latent."""
        if self.pixels is not None:
            width, height, x, y = self.pixels
            return Area(height // factor, width // factor, y // factor, x // factor)
        if self.fractions is not None:
            fw, fh, fx, fy = self.fractions
            h, w = size
            return Area(max(1, round(fh * h)), max(1, round(fw * w)), round(fy * h), round(fx * w))
        return None

    def part(self, cond: Any, size: tuple[int, int], factor: int) -> AreaPart:
        return AreaPart(cond, self.latent_area(size, factor), self.strength)


def check_area_prompts(prompts: Any, width: int, height: int, factor: int) -> tuple[AreaPrompt, ...]:
    """`prompts` as a tuple of `AreaPrompt`s whose strengths lie in 0..10 and whose areas start inside a
    width x height picture's latent (a VAE of downsampling `factor`); a `ValueError` saying which one is wrong
    otherwise."""
    found = tuple(prompts)
    size = (height // factor, width // factor)
    for i, each in enumerate(found):
        if not isinstance(each, AreaPrompt):
            raise ValueError(f"area prompt {i} must be an AreaPrompt, got {type(each).__name__}")
        strength = float(each.strength)
        if not 0.0 <= strength <= MAX_AREA_STRENGTH:
            raise ValueError(f"area prompt {i}'s strength must lie in 0..{MAX_AREA_STRENGTH:g}, got {each.strength!r}")
        area = each.latent_area(size, factor)
        if area is not None and (area.height <= 0 or area.width <= 0 or area.top >= size[0] or area.left >= size[1]):
            raise ValueError(f"area prompt {i}'s area (latent {area.width}x{area.height} at {area.left}, {area.top}) "
                             f"lies outside the {width}x{height} picture's {size[1]}x{size[0]} latent")
    return found


def area_rows(prompts: tuple[AreaPrompt, ...], width: int, height: int, factor: int, negative: bool) -> float:
    """The U-Net work a step of area prompts runs for one width x height picture, in whole-picture rows: each
    prompt's pass on its area's share of the latent (the whole: 1), and where guidance runs the `negative` its
    pass on each of their areas besides its whole-picture one (`area_conds.opposite_areas`)."""
    size = (height // factor, width // factor)
    whole = with_areas = 0.0
    for each in prompts:
        area = each.latent_area(size, factor)
        if area is None:
            whole += 1.0
            continue
        area = area.clamped(size)
        with_areas += max(0, area.height) * max(0, area.width) / (size[0] * size[1])
    return whole + with_areas * (2 if negative else 1)
