"""Weight dtypes by their short names (``fp32``, ``fp16``, ``bf16``), as flags and config files spell them.

The names are plain strings so that argument parsers can list them without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["DTYPE_NAMES", "dtype_from_name"]

#: short name -> attribute of ``torch``
_TORCH_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
DTYPE_NAMES: tuple[str, ...] = tuple(_TORCH_NAMES)


def dtype_from_name(name: str) -> torch.dtype:
    """``"fp16"`` -> ``torch.float16``; a ``KeyError`` for a name not in ``DTYPE_NAMES``."""
    import torch

    return getattr(torch, _TORCH_NAMES[name])
