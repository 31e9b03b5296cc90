"""sdlab: Stable Diffusion written from scratch in PyTorch.

Importing the package does no work: no device probing, no argument parsing, no model loading.
"""

__version__ = "0.1.0"
