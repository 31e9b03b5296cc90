"""How many CPU threads torch uses for a model, when the user has not said.

Measured on this project's 2-core machine (`benchmarks/bench_shipped.py` and one guided SD1.5-size U-Net
step at 64 x 64 latents, fp32):

- the shipped 7 M-parameter U-Net: a whole `sdlab txt2img` in 3.9 s with 1 thread and 4.2 s with 2 when the
  machine is idle, 3.6 s and 6.6 s while another process keeps one core busy. Its operations are so small
  that OpenMP's fork / join at every parallel region costs more than the second core gives, and when that
  core is taken every region waits for the descheduled thread;
- an 860 M-parameter SD1.5 U-Net: 20.0 s per step with 1 thread, 12.1 s with 2 (idle): the matrix products
  are large enough to use every core.

So a small model runs on one thread, a large one on torch's default (the physical cores). OMP_NUM_THREADS
or an explicit count always wins.
"""

from __future__ import annotations

import os

import torch
from torch import nn

SMALL_MODEL_PARAMETERS = 100_000_000        # below this, one thread (see the module docstring)


def threads_for(model: nn.Module, explicit: int | None = None) -> int:
    """The thread count to run `model` with on the CPU."""
    if explicit is not None:
        return explicit
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    parameters = sum(p.numel() for p in model.parameters())
    return 1 if parameters < SMALL_MODEL_PARAMETERS else torch.get_num_threads()


def use_threads_for(model: nn.Module, device: torch.device, explicit: int | None = None) -> None:
    """Set torch's CPU thread count for `model` (nothing to do on an accelerator)."""
    if device.type == "cpu":
        torch.set_num_threads(threads_for(model, explicit))


__all__ = ["SMALL_MODEL_PARAMETERS", "threads_for", "use_threads_for"]
