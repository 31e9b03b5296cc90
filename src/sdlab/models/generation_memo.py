"""Work that depends only on a generation's fixed inputs and the weights, made once per generation.

Two such products run at every step of a sampler: every cross-attention's k = context W_k^T and
v = context W_v^T over the prompt (SD1.5 at 512 px: 32 products, ~7 ms of a guided CPU step), and a
ControlNet's hint block over its hint image (SD1.5 at 512 px: 8 convolutions at 64-512 px, ~10-20 ms).
Inside `reusing_generation_work()` (the pipeline runs its sampler there) `reused` keeps the first result
and hands it out again while the input and the weights stay the same: the input is the same tensor (or
the same view of the same memory) at the same version, or on the CPU an equal one (a fresh copy of the
same prompt costs a comparison of ~10^5 values; elsewhere only the same memory, since comparing would wait
for the device), and the weights keep their addresses and versions. Outside the scope, with gradients,
or with hooks on the modules (a LoRA in training) nothing is kept, nor while `torch.compile` traces.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

import torch
from torch import Tensor, nn

from sdlab.models.cpu_kernels import has_hooks, tensor_version

T = TypeVar("T")

KEPT_PER_SHAPE = 4               # results kept per (module, source shape): see `reused`

_memo: ContextVar[dict[tuple, tuple] | None] = ContextVar("sdlab_generation_work", default=None)


@contextmanager
def reusing_generation_work() -> Iterator[None]:
    """Within this block `reused` results are kept (see the module docstring); they are dropped when it ends."""
    token = _memo.set({})
    try:
        yield
    finally:
        _memo.reset(token)


def reused(modules: tuple[nn.Module, ...], source: Tensor, make: Callable[[], T]) -> T:
    """`make()`, a function of `source` and the parameters of `modules` only, kept where the scope allows.

    Up to `KEPT_PER_SHAPE` results are kept per (first module, source shape), the most recently used first:
    a prompt and a negative prompt of different lengths, which guidance runs as two passes, are kept side by
    side, and so are the few prompts a prompt schedule switches between (A1111's `[a|b]` alternates every
    step). A source that is none of them is made anew, never served a kept result."""
    memo = None if torch.compiler.is_compiling() else _memo.get()   # a compiled graph would break on the lookup
    if (memo is None or torch.is_grad_enabled()
            or any(has_hooks(m) for module in modules for m in module.modules())):
        return make()
    weights = tuple(_identity(p) for module in modules for p in module.parameters())
    key = (modules[0], tuple(source.shape))
    kept = [entry for entry in memo.get(key, []) if entry[2] == weights]
    hit = next((entry for entry in kept if _same(entry[0], entry[1], source)), None)
    value = make() if hit is None else hit[3]
    entry = (source, tensor_version(source), weights, value)     # an equal new source: by identity next
    memo[key] = [entry, *(e for e in kept if e is not hit)][:KEPT_PER_SHAPE]
    return value


def _identity(weight: Tensor) -> tuple[int, int | None]:
    return weight.data_ptr(), tensor_version(weight)


def _same_view(kept: Tensor, source: Tensor) -> bool:
    """Whether `source` views the memory `kept` views, the same way (`kept` is alive: an equal address is its
    storage)."""
    return (source.numel() > 0 and kept.untyped_storage().data_ptr() == source.untyped_storage().data_ptr()
            and kept.storage_offset() == source.storage_offset() and kept.shape == source.shape
            and kept.stride() == source.stride() and kept.dtype == source.dtype and kept.device == source.device)


def _same(kept: Tensor, kept_version: int | None, source: Tensor) -> bool:
    """Whether `source` holds what `kept` held when its result was made."""
    if kept is source or _same_view(kept, source):   # unchanged since, as far as the version counter tells
        return kept_version is None or tensor_version(source) == kept_version
    return (kept.device.type == source.device.type == "cpu" and kept.shape == source.shape
            and kept.dtype == source.dtype and torch.equal(kept, source))


__all__ = ["reused", "reusing_generation_work"]
