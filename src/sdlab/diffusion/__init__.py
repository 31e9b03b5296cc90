"""Diffusion math: schedules, discretizations, the denoiser boundary, guidance, samplers. Knows nothing about U-Nets; imports only `sdlab.utils`."""
