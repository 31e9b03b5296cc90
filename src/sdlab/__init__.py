"""sdlab: Stable Diffusion written from scratch in PyTorch.

Importing the package does no work: no device probing, no argument parsing, no model loading.
"""

__version__ = "0.1.0"


def load(*args, **kwargs):
    """Load a checkpoint into a `Pipeline`; see `sdlab.api.load` (imported on first use)."""
    from sdlab.api import load as _load

    return _load(*args, **kwargs)
