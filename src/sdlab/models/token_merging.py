"""Token merging for Stable Diffusion (ToMe for SD: Bolya & Hoffman 2023, `tomesd`), A1111's "Token merging ratio".

Self-attention over a 64 x 64 latent reads 4,096 tokens; many of them (sky, a wall) are near copies of their
neighbours. Before a transformer block's self-attention, ToMe merges the fraction `ratio` of the tokens into
the tokens they most resemble, runs the attention on what is left, and copies each merged token's output back
to every token that went into it ("unmerge"), so the block's output has all its tokens again:

    x (B, N, C) -> norm1 -> merge -> (B, N - r, C) -> attn1 -> unmerge -> (B, N, C) -> + x

Bipartite soft matching (`bipartite_soft_matching`): the tokens are split into destinations, one in each
sy x sx cell of the token grid (its top-left corner, or one drawn at random), and sources, the rest. Each
source finds its most similar destination by cosine similarity of the block's input tokens; the r = int(N *
ratio) sources with the highest similarity are averaged into their destinations (r is at most the number of
sources: 3/4 of the tokens for 2 x 2 cells). Where sx or sy does not divide the grid, the tokens past the last
whole cell are all sources.

As tomesd applies it (and A1111 with it: `merge_attn` only, no merging for cross-attention or the
feed-forward), only the self-attention input of the transformer blocks merges, and only at the levels whose
token grid is at most `max_downsample` times smaller on a side than the latent's (1: the full-resolution
level alone, SD1's 5 of 16 transformer blocks: 2 down, 3 up; SDXL has none there). The level is found from the
token count, as tomesd does: downsample = ceil(sqrt(latent tokens // N)); its grid is ceil(latent side /
downsample) on each side.

The U-Net reads its `token_merging` setting (`TokenMerging` or None) each call; `merging_tokens` sets it for
the length of a block, as a pipeline run holds its model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

Merge = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class TokenMerging:
    """How the U-Net merges tokens. `ratio`: the fraction of a level's tokens merged away, in [0, 1) (0: none);
    `max_downsample`: the coarsest level that merges (1, 2, 4 or 8: tomesd's); `sx`, `sy`: the destination
    cells' width and height in tokens. `generator`: draws each cell's destination at random, from this
    generator, for a batch of even size (tomesd's `use_rand`; a batch of odd size takes the corner, as there);
    None: always the top-left corner (A1111's use_rand=False)."""

    ratio: float
    max_downsample: int = 1
    sx: int = 2
    sy: int = 2
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"TokenMerging: ratio must lie in [0, 1), got {self.ratio}")
        if self.max_downsample not in (1, 2, 4, 8):
            raise ValueError(f"TokenMerging: max_downsample must be 1, 2, 4 or 8, got {self.max_downsample}")
        if self.sx < 1 or self.sy < 1:
            raise ValueError(f"TokenMerging: sx and sy must be at least 1, got {self.sx}, {self.sy}")


@dataclass(frozen=True)
class MergingCall:
    """One U-Net call's token merging: the setting, the latent's (height, width) and the call's batch size
    (which decides whether destinations are random), from which each transformer block finds its level."""

    setting: TokenMerging
    latent_size: tuple[int, int]
    batch: int

    def matching(self, x: Tensor) -> tuple[Merge, Merge] | None:
        """(merge, unmerge) for a transformer block whose input is x (B, N, C), from x's tokens; None where
        the block's level does not merge (coarser than `max_downsample`, or no token to merge)."""
        height, width = self.latent_size
        n = x.shape[1]
        downsample = math.ceil(math.sqrt(height * width // n))
        r = int(n * self.setting.ratio)
        if downsample > self.setting.max_downsample or r <= 0:
            return None
        generator = self.setting.generator if self.batch % 2 == 0 else None
        return bipartite_soft_matching(x, math.ceil(width / downsample), math.ceil(height / downsample),
                                       self.setting.sx, self.setting.sy, r, generator)


def _destinations(w: int, h: int, sx: int, sy: int, device: torch.device,
                  generator: torch.Generator | None) -> Tensor:
    """The token order destinations first, then sources, each in grid order: (h * w,) int64. A destination is
    one token of each whole sy x sx cell: the top-left, or where `generator` draws it."""
    hsy, wsx = h // sy, w // sx
    if generator is None:
        pick = torch.zeros(hsy, wsx, 1, dtype=torch.int64, device=device)                 # (h/sy, w/sx, 1)
    else:
        pick = torch.randint(sy * sx, size=(hsy, wsx, 1), device=generator.device, generator=generator).to(device)
    marks = torch.zeros(hsy, wsx, sy * sx, dtype=torch.int64, device=device)
    marks.scatter_(2, pick, -1)                                                            # -1: destination
    marks = marks.view(hsy, wsx, sy, sx).transpose(1, 2).reshape(hsy * sy, wsx * sx)      # back onto the grid
    grid = torch.zeros(h, w, dtype=torch.int64, device=device)
    grid[: hsy * sy, : wsx * sx] = marks                                                   # partial cells: sources
    return grid.flatten().argsort(stable=True)                                             # (h * w,)


def bipartite_soft_matching(metric: Tensor, w: int, h: int, sx: int, sy: int, r: int,
                            generator: torch.Generator | None = None) -> tuple[Merge, Merge]:
    """(merge, unmerge) that take away r of the w x h tokens of `metric` (B, N, C) by averaging them into the
    destination each is most similar to (module docstring). merge: (B, N, C') -> (B, N - r, C'): the unmerged
    sources in order of falling similarity, then the destinations; unmerge: (B, N - r, C') -> (B, N, C'), each
    merged token's row given back to all the tokens that went into it."""
    b, n, _ = metric.shape
    with torch.no_grad():
        order = _destinations(w, h, sx, sy, metric.device, generator)                      # (N,)
        num_dst = (h // sy) * (w // sx)
        dst_idx, src_idx = order[:num_dst], order[num_dst:]                                # grid positions
        unit = metric / metric.norm(dim=-1, keepdim=True)                                  # (B, N, C)
        scores = unit[:, src_idx] @ unit[:, dst_idx].transpose(-1, -2)                     # (B, N_src, N_dst)
        r = min(len(src_idx), r)
        best, best_dst = scores.max(dim=-1)                                                # (B, N_src)
        ranked = best.argsort(dim=-1, descending=True)                                     # (B, N_src)
        kept, merged = ranked[:, r:], ranked[:, :r]                                        # indices into sources
        into = best_dst.gather(1, merged)                                                  # (B, r) destinations

    def merge(x: Tensor) -> Tensor:
        c = x.shape[-1]
        src, dst = x[:, src_idx], x[:, dst_idx]                                            # (B, N_src / N_dst, C)
        unmerged = src.gather(1, kept[..., None].expand(-1, -1, c))                        # (B, N_src - r, C)
        moving = src.gather(1, merged[..., None].expand(-1, -1, c))                        # (B, r, C)
        dst = dst.scatter_reduce(1, into[..., None].expand(-1, -1, c), moving, reduce="mean")
        return torch.cat([unmerged, dst], dim=1)                                           # (B, N - r, C)

    def unmerge(x: Tensor) -> Tensor:
        c = x.shape[-1]
        n_kept = kept.shape[1]
        unmerged, dst = x[:, :n_kept], x[:, n_kept:]                                       # (B, N_src - r / N_dst, C)
        out = x.new_zeros(b, n, c)                                                         # (B, N, C)
        out[:, dst_idx] = dst
        out.scatter_(1, src_idx[kept][..., None].expand(-1, -1, c), unmerged)
        out.scatter_(1, src_idx[merged][..., None].expand(-1, -1, c), dst.gather(1, into[..., None].expand(-1, -1, c)))
        return out

    return merge, unmerge


@contextmanager
def merging_tokens(unet: nn.Module, setting: TokenMerging | None) -> Iterator[None]:
    """Within the block `unet` merges tokens as `setting` says (None or ratio 0: not at all), then goes back to
    what it did before, also when the block raises. Blocks nest."""
    before = unet.token_merging
    unet.token_merging = setting if setting is not None and setting.ratio > 0 else None
    try:
        yield
    finally:
        unet.token_merging = before
