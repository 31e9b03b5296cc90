"""A1111's img2img script Loopback (scripts/loopback.py of A1111 1.10): each picture drawn again from the last.

A batch of `loops` img2img passes, every pass one picture (batch size 1) whose init picture is the previous pass's
picture (the first: the request's), its seed the previous pass's plus one, its denoising strength moving from the
request's towards `final_denoising_strength` along a curve (`loop_strength`); with a mask, the passes after the
first of a batch take Masked content "original". The request's `n_iter` is how many such batches run, one after
another, each from the request's picture and strength again, the seeds counting on (`loop_plan`).

What comes back (`kept_pictures`, `loop_grid`): with one batch every pass's picture, with several each batch's
last; with more than one, first their grid in one row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

from sdlab.pipeline.grid import image_grid

CURVES = ("Aggressive", "Linear", "Lazy")
INTERROGATIONS = ("None", "CLIP", "DeepBooru")


def loop_strength(loop: int, loops: int, initial: float, final: float, curve: str) -> float:
    """A1111's `calculate_denoising_strength(loop)`: the strength after `loop` passes, from `initial` (loop 0)
    to `final` (loop `loops` - 1) along `curve`: Aggressive sin(t pi / 2), Lazy 1 - cos(t pi / 2), Linear t, with
    t = loop / (loops - 1). One loop keeps `initial`."""
    if loops == 1:
        return initial
    progress = loop / (loops - 1)
    if curve == "Aggressive":
        shape = math.sin(progress * math.pi * 0.5)
    elif curve == "Lazy":
        shape = 1 - math.cos(progress * math.pi * 0.5)
    else:
        shape = progress
    return initial + (final - initial) * shape


@dataclass(frozen=True)
class Pass:
    """One img2img pass of the loopback: its batch (of `n_iter`) and loop in it, seed and strength, and whether it
    starts from the request's picture (the first of its batch) or the previous pass's."""

    batch: int
    loop: int
    seed: int
    strength: float

    @property
    def from_request(self) -> bool:
        return self.loop == 0


def loop_plan(loops: int, batch_count: int, seed: int, initial: float, final: float, curve: str) -> list[Pass]:
    """Every pass in A1111's order: batch by batch, each from the request's strength again (`loop_strength`), the
    seed one more than the pass before (A1111's `p.seed = processed.seed + 1`) across batches too; `seed` fixed."""
    return [Pass(batch, loop, seed + batch * loops + loop, loop_strength(loop, loops, initial, final, curve))
            for batch in range(batch_count) for loop in range(loops)]


def last_strength(loops: int, drawn: int, initial: float, final: float, curve: str) -> float:
    """A1111's `p.denoising_strength` when the script ends after `drawn` passes of the last batch it ran (the
    strength it set for the next pass, `loop_strength(drawn)`; one past the last loop at the end of a batch)."""
    return loop_strength(drawn, loops, initial, final, curve)


def kept_pictures(plan: list[Pass], done: list[bool]) -> list[int]:
    """The passes whose pictures A1111 returns (its `history` / `all_images`), by index into `plan`: with one batch
    every pass `done`; with several the last pass of each batch done to its end. A pass not done (interrupted or
    skipped) ends its batch's passes there (A1111's `break`)."""
    batches = max(p.batch for p in plan) + 1
    kept = []
    for batch in range(batches):
        passes = [i for i, p in enumerate(plan) if p.batch == batch]
        finished = [i for i in passes if done[i]]
        if batches == 1:
            kept += finished
        elif len(finished) == len(passes):
            kept.append(passes[-1])
    return kept


def loop_fields(final: float, curve: str) -> dict[str, object]:
    """A1111's `extra_generation_params` of Loopback, in every pass's parameters."""
    return {"Final denoising strength": final, "Denoising curve": curve}


def loop_grid(pictures: list[Image.Image]) -> Image.Image:
    """A1111's `images.image_grid(history, rows=1)`: the pictures side by side."""
    return image_grid(pictures, rows=1)
