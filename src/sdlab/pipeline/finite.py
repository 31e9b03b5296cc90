"""NaN / Inf checks of the sampling loop that do not stall a GPU.

Reading whether a CUDA tensor is finite (`bool(torch.isfinite(x).all())`) waits for every kernel queued so
far. Done around every model call, it would keep the CPU from queueing the next step while the GPU works,
and an eager GPU step, bound by how fast Python launches kernels, idles at each check. `FiniteWatch` checks
CPU (and other) tensors at once; on CUDA it copies each verdict into pinned host memory behind the queued
work, records an event, and reads it when told to (`settle`, one model call later in the sampling loop), by
which time the GPU has long computed it. The error then surfaces one call late, naming the call it came from.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["FiniteWatch"]


class FiniteWatch:
    """Raises `fail(what())` for the first checked tensor that holds a NaN or Inf."""

    def __init__(self, fail: Callable[[str], Exception]) -> None:
        self.fail = fail
        self._pending: deque[tuple[Callable[[], bool], Callable[[], str]]] = deque()

    def check(self, x: Tensor, what: Callable[[], str]) -> None:
        """Check `x` (at once, or on CUDA at a later `settle`); `what()` names it in the error."""
        finite = torch.isfinite(x).all()                                    # 0-dim bool on x's device
        if _defers(x.device):
            self._pending.append((_read_later(finite), what))
        elif not finite:
            raise self.fail(what())

    def settle(self, keep: int = 0) -> None:
        """Read the deferred verdicts, oldest first, all but the newest `keep`."""
        while len(self._pending) > keep:
            read, what = self._pending.popleft()
            if not read():
                raise self.fail(what())


def _defers(device: torch.device) -> bool:
    return device.type == "cuda"


def _read_later(flag: Tensor) -> Callable[[], bool]:
    """`flag`'s value, copied to pinned host memory behind the work queued so far; the callable waits for that
    copy alone (an event), not for what is queued after it."""
    host = torch.empty((), dtype=torch.bool, pin_memory=True)
    host.copy_(flag, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(flag.device))

    def read() -> bool:
        copied.synchronize()
        return bool(host)

    return read
