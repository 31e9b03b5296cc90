"""Brownian-tree noise for the SDE samplers, reproducible per image.

An SDE sampler needs the Brownian increment ``W(sigma_next) - W(sigma)`` of one fixed Brownian path,
so that the result converges as steps are refined (Kidger et al. 2021, "Efficient and Accurate
Gradients for Neural SDEs": the Brownian Interval). k-diffusion's ``BrownianTreeNoiseSampler`` and
diffusers' ``DPMSolverSDEScheduler`` both draw it from ``torchsde``'s Brownian interval with midpoint
("halfway") splitting, ``tol=1e-6`` and ``pool_size=24``, one tree per image seeded by that image's
seed, over ``[sigma_min, sigma_max]`` of the sigma schedule (smallest non-zero and largest sigma).
``BrownianTreeNoise`` builds exactly that tree, and image i depends only on ``seeds[i]``. The trees are built
and queried on the CPU and each increment is moved to the latent's device (ComfyUI's
``BrownianTreeNoiseSampler(..., cpu=True)`` of its plain SDE sampler names), so a seed gives the same noise on
every device: the references' noise on the CPU. k-diffusion (A1111) and diffusers build their trees on the
latent's device; on a GPU theirs draw from that device's generator, another picture for the seed, which sdlab
does not reproduce.

Returned noise is normalised to unit variance: ``(W(t1) - W(t0)) / sqrt(|t1 - t0|)``.

Query times. A tree with ``tol=1e-6`` keeps its ends and resolves every query at times rounded to 6
decimals, so its top end is ``round(sigma_max, 6)``, which can lie below sigma_max (14.614641 for SD's
14.6146411...). The first step's query at sigma_max is then past the end: torchsde clamps it, with a
"Should have tb<=t1" warning on every run. ``BrownianTreeNoise`` rounds each query to the tree's
precision and keeps it inside the tree's ends first: the same W (torchsde rounds queries itself) and no
out-of-range query.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["BrownianTreeNoise"]

_TOL = 1e-6
_POOL_SIZE = 24
_DIGITS = -int(math.log10(_TOL))  # torchsde resolves times to this many decimals


def _sorted(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, int]:
    return (a, b, 1) if a < b else (b, a, -1)


class BrownianTreeNoise:
    """A ``NoiseSource`` answering ``noise(sigma, sigma_next)`` from one Brownian tree per image.

    Args:
        like: a latent (B, C, h, w); the trees draw (C, h, w) in its dtype on the CPU, moved to its device.
        sigma_min, sigma_max: the interval the trees span; queries must stay inside it.
        seeds: one integer seed per image (the tree's entropy).
        batch_noise: "comfyui": one tree of the whole (B, C, h, w), seeded ``seeds[0]``, as ComfyUI's
            ``BatchedBrownianTree`` with an int seed (image 0 then differs from a one-image run's).
    """

    def __init__(self, like: Tensor, sigma_min: float | Tensor, sigma_max: float | Tensor, seeds: Sequence[int],
                 batch_noise: str = "per_image") -> None:
        import torchsde  # imported here: a fifth of a second that only the SDE samplers need

        if len(seeds) != like.shape[0]:
            raise ValueError(f"got {len(seeds)} seeds for a batch of {like.shape[0]}")
        t0, t1, self._sign = _sorted(torch.as_tensor(sigma_min), torch.as_tensor(sigma_max))
        self._ends = (round(float(t0), _DIGITS), round(float(t1), _DIGITS))  # as the tree keeps them
        self._device = like.device
        self._whole_batch = batch_noise == "comfyui"
        if self._whole_batch:
            seeds = seeds[:1]
        self._trees = [
            torchsde.BrownianInterval(
                t0=t0,
                t1=t1,
                size=tuple(like.shape if self._whole_batch else like.shape[1:]),
                dtype=like.dtype,
                device="cpu",
                entropy=int(seed),
                tol=_TOL,
                pool_size=_POOL_SIZE,
                halfway_tree=True,
            )
            for seed in seeds
        ]

    @classmethod
    def for_sigmas(cls, like: Tensor, sigmas: Tensor, seeds: Sequence[int],
                   batch_noise: str = "per_image") -> BrownianTreeNoise:
        """Span the schedule as k-diffusion does: smallest positive sigma to the largest sigma."""
        return cls(like, sigmas[sigmas > 0].min(), sigmas.max(), seeds, batch_noise)

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        t0, t1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        lo, hi, sign = _sorted(t0, t1)
        lo, hi = self._query_time(lo), self._query_time(hi)
        if self._whole_batch:
            w = self._trees[0](lo, hi).to(self._device)                                  # (B, C, h, w)
        else:
            w = torch.stack([tree(lo, hi) for tree in self._trees]).to(self._device)  # (B, C, h, w)
        w = w * (self._sign * sign)
        return w / (t1 - t0).abs().sqrt()

    def _query_time(self, t: Tensor) -> float:
        """``t`` at the tree's precision, inside its ends (where torchsde would clamp it)."""
        start, end = self._ends
        return min(max(round(float(t), _DIGITS), start), end)
