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
- a sampler step: every model call of a full step runs whole (Heun's, DPM2's two), and the j-th call of a cached
  step reuses the features of the j-th call of the last full step, so calls that see different things (Heun's
  second evaluation, a negative prompt that runs in its own pass) keep their own features;
- CFG's negative and positive prompt, batched into one call, share one call's features row by row;
- a call whose rows differ from those features' (a pass whose negative prompt is skipped at some steps) runs
  whole and keeps its features;
- each sampling pass starts empty: the hires fix's second pass, img2img's shortened schedule, every picture of
  a batch count (`DeepCacheRun` lives as long as one pass's model).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass
class DeepCacheRun:
    """DeepCache over one sampling pass: which calls run whole, and the features each call position of the last
    full step left (module docstring: a step's j-th call reuses the j-th call's)."""

    setting: DeepCache
    skip_block: int
    features: dict[int, Tensor] = field(default_factory=dict)
    step: int | None = None
    call: int = 0

    def slot(self, step: int, rows: int) -> DeepFeature:
        """The slot of the next model call, made in sampler step `step` on `rows` rows."""
        self.call = self.call + 1 if step == self.step else 0
        self.step = step
        kept = self.features.get(self.call)
        if self.setting.full_step(step) or kept is None or len(kept) != rows:
            return DeepFeature(self.skip_block)
        return DeepFeature(self.skip_block, kept)

    def keep(self, slot: DeepFeature) -> None:
        """Keep what a whole call left in its slot, for the same call of the steps up to the next full one."""
        if slot.feature is not None:
            self.features[self.call] = slot.feature
