"""Large CPU blocks reused within a model's call (`kernels/cpu_memory.cpp`).

glibc serves every block of 32 MiB or more (its largest mmap threshold, which `utils.allocator.tune` sets) as
a fresh mapping and unmaps it when freed, and the kernel zeroes such memory page by page on its first touch.
A VAE decode makes many of them (SD1.5 at 512 px: 960 MB of 32-128 MB activations, ~240,000 pages; at 1024
px 4.3 GB), and on a virtual machine a first touch can also wait for the host to back the page: in a profile
of 1024-px decodes, a fifth of the time was the kernel clearing pages.

Inside `reusing_large_blocks()` the extension's allocator, put in front of PyTorch's CPU allocator, keeps
the large blocks freed and serves later ones from them (a large enough kept range's head, else all kept ranges
moved into one mapping with `mremap`, which moves page tables and copies nothing, completed with fresh pages).
So the memory held never exceeds the most the scope's large blocks needed at once, and the fresh pages are
that peak rather than the sum of every request: SD1.5's 512-px decode 960 -> 256 MB, 1024 px 4,352 -> 1,024
MB (with the VAE releasing the inputs it consumes, `vae._release`). What is kept is unmapped when no large
block is in use any more (an encoder past its large levels keeps nothing while its smaller ones grow the
heap), beyond the 16 largest kept ranges (a bound on the mappings a long scope makes), and when the
outermost scope ends. Blocks under 32 MiB, which the tuned glibc heap already reuses, go to PyTorch's allocator as before.
The models' calls run inside one (`reuses_large_blocks`: U-Net, ControlNet, VAE encoder and decoder), as do
upscaler passes. Needs the kernels' extension built (`cpu_kernels.built_extension`; this never
builds it).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

from sdlab.models import cpu_kernels

F = TypeVar("F", bound=Callable)


@contextlib.contextmanager
def reusing_large_blocks(device: torch.device) -> Iterator[None]:
    """Large CPU blocks freed inside are reused inside (nothing where `device` is not the CPU, the kernels are
    not built, or another allocator of higher priority runs PyTorch's CPU memory). Scopes nest; what is kept
    is unmapped when no large block is in use any more and when the outermost scope ends."""
    module = cpu_kernels.built_extension() if device.type == "cpu" else None
    entered = False
    try:
        entered = module is not None and module.reuse_enter()
        yield
    finally:
        if entered:
            module.reuse_leave()


def reuses_large_blocks(forward: F) -> F:
    """A module's `forward` run inside `reusing_large_blocks` on the device of its first tensor argument (no
    scope without one, or while compiling: the graph takes no calls into the extension)."""
    @functools.wraps(forward)
    def run(self, *args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if first is None or torch.compiler.is_compiling():
            return forward(self, *args, **kwargs)
        with reusing_large_blocks(first.device):
            return forward(self, *args, **kwargs)
    return run  # type: ignore[return-value]


def stats() -> dict[str, int] | None:
    """The allocator's counters for large blocks (None without the built extension): open scopes, bytes in use,
    the most in use at once since an outermost scope last began, bytes and segments kept for reuse, and fresh
    bytes mapped since the process began."""
    module = cpu_kernels.built_extension()
    if module is None:
        return None
    depth, live, peak, kept, fresh, segments = module.reuse_stats()
    return {"depth": depth, "live_bytes": live, "peak_bytes": peak, "kept_bytes": kept, "fresh_bytes": fresh,
            "kept_segments": segments}


__all__ = ["reuses_large_blocks", "reusing_large_blocks", "stats"]
