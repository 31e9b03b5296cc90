"""sdlab: Stable Diffusion written from scratch in PyTorch.

Importing the package does no work: no device probing, no argument parsing, no model loading.
`sdlab.load` is `sdlab.api.load` (its signature and documentation), imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:                   # type checkers and IDEs see the real function
    from sdlab.api import load

__version__ = "0.1.0"
__all__ = ["load"]


def __getattr__(name: str) -> Any:
    if name == "load":
        from sdlab.api import load

        return load
    raise AttributeError(f"module 'sdlab' has no attribute {name!r}")
