"""The contract between the training loop and a training objective.

The loop (`sdlab.train.loop`) owns everything generic: optimiser (AdamW over every parameter of
`trainable_modules()` that requires grad), LR schedule, gradient accumulation and clipping, autocast,
EMA, DistributedDataParallel, run checkpoints / resume and logging. A task owns only its objective:
which modules learn, how a batch becomes a scalar loss, what file it delivers, how it previews.

Under DistributedDataParallel the loop wraps each trainable module and calls
``task.bind_wrapped(name, wrapped)`` if the task defines it; a task whose ``loss`` calls its modules
directly must then call the wrapper (DDP's gradient all-reduce hooks fire only through the wrapper's
forward). Tasks without ``bind_wrapped`` get their gradients averaged by the loop after backward
(``sdlab.train.distributed.all_reduce_grads``), which gives the same result.

Optional hooks for a task with state of its own besides the trainable modules (the lcd task's target
network): ``after_optimizer_step()`` runs after each optimiser step (and the EMA update), ``extra_state()``
returns tensors the run checkpoint keeps (``"task_state"``) and ``load_extra_state(state)`` restores them;
``keep_as_loaded(module)`` runs before a part that does not train moves to bf16 (``--mixed-precision bf16``), so
that a task delivering the whole model writes that part as loaded; only in the process that writes the model
(torchrun's rank 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

__all__ = ["Batch", "TrainTask"]


@dataclass
class Batch:
    """One (per-rank, per-micro-step) batch.

    images: (B, 3, H, W) float in [-1, 1]; empty (B, 0, 0, 0) is not allowed, but when latents are
        cached the images may be omitted by the data layer (then ``images`` is None).
    captions: B strings (already caption-dropped by the loop's data layer if configured).
    latents: (B, C, h, w) cached VAE latents *already multiplied by the scaling factor*, or None.
    paths: source file of each sample (for logging / debugging).
    seeds: one integer per sample, derived from (run seed, step, the sample's position in the global
        batch). Per-sample randomness drawn from these (noise, timesteps, caption dropout) does not depend
        on how the global batch is split over ranks and micro-steps, so 1 process and N DDP processes
        with the same global batch see the same numbers. Empty when the data layer does not set them.
    original_sizes: (height, width) of each source image before resize / crop (SDXL size conditioning).
    crops_top_left: (top, left) of each crop in the resized image (SDXL crop conditioning).
    """

    images: Tensor | None
    captions: list[str]
    latents: Tensor | None = None
    paths: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    original_sizes: list[tuple[int, int]] = field(default_factory=list)
    crops_top_left: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.captions)

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            images=None if self.images is None else self.images.to(device),
            captions=list(self.captions),
            latents=None if self.latents is None else self.latents.to(device),
            paths=list(self.paths),
            seeds=list(self.seeds),
            original_sizes=list(self.original_sizes),
            crops_top_left=list(self.crops_top_left),
        )


@runtime_checkable
class TrainTask(Protocol):
    """A training objective. See the module docstring for the division of labour with the loop."""

    name: str  # "unet", "vae", "text"

    def trainable_modules(self) -> dict[str, nn.Module]:
        """The modules the optimiser, EMA and DDP see, by a stable name (used as state-dict prefix)."""
        ...

    def loss(self, batch: Batch, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """Scalar loss (mean over the batch) plus metrics to log. Random draws come from the samples' seeds
        (`sdlab.train.data.sample_seeds`; ``generator`` only stands in for a batch without seeds), so that
        they do not depend on the number of processes or micro-steps."""
        ...

    def save_weights(self, path: Path, ema: bool) -> None:
        """Write the task's deliverable (safetensors, atomically). ``ema``: with EMA weights swapped in
        by the loop already; the flag only tells the task which name/metadata to use."""
        ...

    def preview(self, out_dir: Path, step: int) -> None:
        """Optional sample images / evaluation; may do nothing."""
        ...
