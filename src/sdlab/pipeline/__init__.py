"""Prompt -> conditioning, the generate loop, image conversion. Imports `checkpoints`, `families`, `diffusion`, `models`, `utils`."""
