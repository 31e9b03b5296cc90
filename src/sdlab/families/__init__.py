"""Model families (SD1, SD2, SDXL) as Python constants: configs, prefixes, prediction, latent scaling. Imports `models`, `diffusion`, `utils`."""
