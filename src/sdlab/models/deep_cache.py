"""DeepCache (Ma, Fang & Wang 2023, "DeepCache: Accelerating Diffusion Models for Free"): the U-Net's deep features
reused across adjacent sampler steps; no training.

Between two steps the U-Net's high-level features change little. On a "full" step the whole U-Net runs and the
backbone features entering one output block (before it joins its skip) are kept; on the following steps only the
shallow branch runs: the input blocks up to that skip's block and the output blocks from the kept one on, with the
kept features in place of everything deeper (the rest of the encoder, the middle block, the deeper decoder):

    full:     input 0..K -> input K+1.. -> middle -> output ..k-1 -> h_k (kept) -> join skip K -> output k..
    shallow:  input 0..K                                  cached h_k -> join skip K -> output k..

`branch` picks the skip, as DeepCache's `cache_branch_id`: block id b // 3 (a level, 0 the finest) and layer id
b % 3 (counting the level's decoder ResBlocks from its last one) of diffusers' up blocks. In the checkpoint layout
(R ResBlocks a level) that is input block K = (b // 3) (R + 1) + b % 3 (0: conv_in) and output block k =
len(output_blocks) - 1 - K, the one whose skip is input block K's output. SD 1.x / 2.x / SDXL have R = 2, so a
level is exactly three branches (12 for SD 1.x / 2.x, 9 for SDXL); branch 0, the cheapest, runs conv_in, the
last output block and the output convolution. DeepCache's "uniform" rule makes every `interval`-th step a full
step, counting from the pass's first (step i with i % interval == 0). Its non-uniform rule is not offered: it lives
in DeepCache's experiment pipeline only (`sample_from_quad_center(steps, n, center, pow)`, whose center and power
have no defaults there), and `DeepCacheSDHelper` 0.1.1 with `skip_mode` other than "uniform" never runs a full step.

What a "step" is (sdlab's choices where DeepCache, written for one model call per step, says nothing):
- a sampler step: every model call of a full step runs whole (Heun's, DPM2's two), and a call of a cached step
  reuses the features of the same pass at the last full step: a pass is the call's conditioning (its prompt
  embeddings, pooled vector and row marks, compared by value) and its order among the step's calls on that
  conditioning, so calls that see different things (Heun's second evaluation, each part of a composable prompt,
  a negative prompt that runs in its own pass) keep their own features whatever calls a step leaves out;
- CFG's negative and positive prompt, batched into one call, share one call's features row by row;
- a pass the last full step did not run (a negative prompt skipped there by NGMS, the conditional rows run
  alone at another step) runs whole at its first call and keeps its features for the steps up to the next
  full one; a pass's features never stand for another's;
- each sampling pass starts empty: the hires fix's second pass, img2img's shortened schedule, every picture of
  a batch count (`DeepCacheRun` lives as long as one pass's model);
- a sampler that calls the model at sigmas it chooses rather than at the list's (DPM fast: DPM-Solver's steps
  on its own grid, each call at a sigma of its own; DPM adaptive: as many calls as its step-size control takes,
  a refused try's first call repeated at the same sigma) has no sampler step a call belongs to. There a call's
  step is the place of its timesteps among the distinct timesteps the pass has called at, in the order first
  called (`DeepCacheRun.timestep_place`): DeepCacheSDHelper's own rule (the index of the call's timestep in the
  scheduler's list of the timesteps it calls at), which the sd-webui-deepcache-standalone extension's count of
  U-Net calls agrees with while every call is at a new sigma (DPM fast: every `interval`-th call runs whole). A
  call repeated at a timestep is that timestep's step again. In a batch DPM adaptive moves each picture at its
  own sigma, so its rows' timesteps together are the call's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

DEEP_CACHE_FIELDS = ("interval", "branch")
"""DeepCache's fields in the order every door lists them (the CLI's flags, the infotext's labels)."""
MAX_DEEP_CACHE_INTERVAL = 1000
BRANCHES_PER_LEVEL = 3      # DeepCache's cache_layer_id = branch % 3, cache_block_id = branch // 3


@dataclass(frozen=True)
class DeepCache:
    """DeepCache's setting: a full U-Net call every `interval` steps (1: every step, DeepCache off in effect), the
    others run the shallow `branch` (DeepCacheSDHelper's cache_interval and cache_branch_id; module docstring).
    The defaults are diffusers' DeepCache page's (`set_params(cache_interval=3, cache_branch_id=0)`)."""

    interval: int = 3
    branch: int = 0

    def full_step(self, step: int) -> bool:
        """Whether sampler step `step` (0-based, of the pass) runs the whole U-Net: DeepCache's uniform rule."""
        return step % self.interval == 0

    def skip_block(self, num_res_blocks: int, num_levels: int) -> int:
        """Input block K whose output is the shallow branch's deepest skip (module docstring); ValueError for a
        branch past the network's last level."""
        level, layer = divmod(self.branch, BRANCHES_PER_LEVEL)
        if level >= num_levels or layer > num_res_blocks:
            raise ValueError(f"DeepCache branch {self.branch} (level {level}, layer {layer}) is not in this U-Net: "
                             f"{num_levels} levels of {num_res_blocks + 1} decoder ResBlocks")
        return level * (num_res_blocks + 1) + layer


@dataclass
class DeepFeature:
    """One U-Net call's DeepCache slot (`UNet.forward`'s `deep_cache`): `skip_block` K, and `feature`, the cached
    backbone features (B, C, h, w) entering output block len(output_blocks) - 1 - K: given, the call runs the
    shallow branch on them; None, the call runs whole and leaves its features here."""

    skip_block: int
    feature: Tensor | None = None


Conditioning = tuple["Tensor | None", ...]
"""What a U-Net call is conditioned on, row by row (`ControlledUNet`: context, pooled vector y, cond_mark,
identity_rows): two calls of a step on equal conditioning are the same pass."""


def same_conditioning(a: Conditioning, b: Conditioning) -> bool:
    """Whether two calls' conditionings are equal: the same tensors, or equal shapes and values."""
    return len(a) == len(b) and all(
        u is v or (u is not None and v is not None and u.shape == v.shape and u.dtype == v.dtype
                   and u.device == v.device and torch.equal(u, v))
        for u, v in zip(a, b))


@dataclass
class KeptFeature:
    """The features a whole call of pass (`conditioning`, `order`) left since the last full step."""

    conditioning: Conditioning
    order: int
    feature: Tensor


@dataclass
class DeepCacheRun:
    """DeepCache over one sampling pass: which calls run whole, and the features each pass (its conditioning and
    its order among the step's calls on it) left at its last whole call since the last full step (module
    docstring)."""

    setting: DeepCache
    skip_block: int
    kept: list[KeptFeature] = field(default_factory=list)
    step: int | None = None
    places: dict[tuple[float, ...], int] = field(default_factory=dict)   # the distinct timesteps called at, in order
    seen: list[Conditioning] = field(default_factory=list)   # the conditionings of this step's calls so far
    current: tuple[Conditioning, int] = ((), 0)              # the pass of the call being made

    def slot(self, step: int, rows: int, conditioning: Conditioning = ()) -> DeepFeature:
        """The slot of the next model call, made in sampler step `step` on `rows` rows conditioned on
        `conditioning`: the features its pass left, else None (the call runs whole)."""
        if step != self.step:
            self.step, self.seen = step, []
            if self.setting.full_step(step):
                self.kept = []
        order = sum(same_conditioning(c, conditioning) for c in self.seen)
        self.seen.append(conditioning)
        self.current = (conditioning, order)
        kept = self._kept(conditioning, order)
        if self.setting.full_step(step) or kept is None or len(kept.feature) != rows:
            return DeepFeature(self.skip_block)
        return DeepFeature(self.skip_block, kept.feature)

    def timestep_place(self, t: Tensor) -> int:
        """The step of a call at timesteps `t` (B,) for a sampler that chooses its own sigmas: the place of `t` among
        the distinct timesteps the pass has called at, in the order first called (module docstring)."""
        key = tuple(t.flatten().tolist())
        return self.places.setdefault(key, len(self.places))

    def keep(self, slot: DeepFeature) -> None:
        """Keep what a whole call left in its slot, for its pass's calls of the steps up to the next full one."""
        conditioning, order = self.current
        kept = self._kept(conditioning, order)
        if slot.feature is None or (kept is not None and kept.feature is slot.feature):
            return
        if kept is not None:
            self.kept.remove(kept)
        self.kept.append(KeptFeature(conditioning, order, slot.feature))

    def _kept(self, conditioning: Conditioning, order: int) -> KeptFeature | None:
        return next((k for k in self.kept if k.order == order and same_conditioning(k.conditioning, conditioning)),
                    None)
