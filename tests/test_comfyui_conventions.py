"""A sampler named as ComfyUI spells it draws ComfyUI's picture: its KSampler's noise conventions, not sdlab's.

The reference is ComfyUI's code, transcribed below from Comfy-Org/ComfyUI (each function names its file):
``comfy/sample.py`` ``prepare_noise`` (the initial noise: the seed's first draw), ``comfy/samplers.py``
``KSAMPLER.sample`` / ``Sampler.max_denoise`` with ``comfy/model_sampling.py`` ``EPS.noise_scaling`` (the start),
``KSampler.set_steps`` (``comfy_reference.ksampler_sigmas``), ``comfy/k_diffusion/sampling.py``
``default_noise_sampler`` (the step noise: a generator seeded seed + 1 on the CPU), ``BatchedBrownianTree`` /
``BrownianTreeNoiseSampler(..., cpu=True)`` and the samplers that use them.

Two levels: the toy mixture denoiser for the pieces, and the shipped sdlab-tiny model for the whole run, where
sdlab's own guided denoiser (caught from its run) drives the transcribed KSampler, so the two runs differ only
in the conventions. Every comparison is of latents in float32 at 1e-5 (relative and absolute, on latents of
size ~1): the same operations in the same order, so any convention change is orders of magnitude above it.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchsde

from sdlab.diffusion.brownian import BrownianTreeNoise

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# -- ComfyUI, transcribed ----------------------------------------------------------------------------------------
class BatchedBrownianTree:
    """comfy/k_diffusion/sampling.py ``BatchedBrownianTree`` (an int seed: one tree for the batch)."""

    def __init__(self, x, t0, t1, seed=None, **kwargs):
        self.cpu_tree = kwargs.pop("cpu", True)
        t0, t1, self.sign = self.sort(t0, t1)
        w0 = kwargs.pop('w0', None)
        if w0 is None:
            w0 = torch.zeros_like(x)
        self.batched = False
        if isinstance(seed, (tuple, list)):
            self.batched = True
            w0 = w0[0]
        else:
            seed = (seed,)
        if self.cpu_tree:
            t0, w0, t1 = t0.detach().cpu(), w0.detach().cpu(), t1.detach().cpu()
        self.trees = tuple(torchsde.BrownianTree(t0, w0, t1, entropy=s, **kwargs) for s in seed)

    @staticmethod
    def sort(a, b):
        return (a, b, 1) if a < b else (b, a, -1)

    def __call__(self, t0, t1):
        t0, t1, sign = self.sort(t0, t1)
        device, dtype = t0.device, t0.dtype
        if self.cpu_tree:
            t0, t1 = t0.detach().cpu().float(), t1.detach().cpu().float()
        w = torch.stack([tree(t0, t1) for tree in self.trees]).to(device=device, dtype=dtype) * (self.sign * sign)
        return w if self.batched else w[0]


class BrownianTreeNoiseSampler:
    """comfy/k_diffusion/sampling.py ``BrownianTreeNoiseSampler`` (identity transform)."""

    def __init__(self, x, sigma_min, sigma_max, seed=None, cpu=False):
        t0, t1 = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
        self.tree = BatchedBrownianTree(x, t0, t1, seed, cpu=cpu)

    def __call__(self, sigma, sigma_next):
        t0, t1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        return self.tree(t0, t1) / (t1 - t0).abs().sqrt()


# -- the SDE samplers' Brownian tree ------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Should have tb<=t1")   # ComfyUI queries its float32 sigma_max past the tree
def test_brownian_trees_are_cpu_trees_moved_to_the_latents_device(monkeypatch):
    """ComfyUI's plain SDE names (sample_dpmpp_sde, sample_dpmpp_2m_sde, sample_dpmpp_3m_sde) build their tree with
    ``cpu=True`` and move each increment to the latent's device, so a seed draws one picture on every device (a
    tree on a GPU draws from that device's generator: its ``_gpu`` names). sdlab's trees are built on the CPU
    whatever the latent's device: a latent on the "meta" device (any device but the CPU, without values) gets
    trees on the CPU and increments on its own device; on the CPU the increments are ComfyUI's at batch 1."""
    built_on = []

    def recording(*args, **kwargs):
        built_on.append(torch.device(kwargs["device"]))
        return real(*args, **kwargs)

    real = torchsde.BrownianInterval
    monkeypatch.setattr(torchsde, "BrownianInterval", recording)
    sigmas = torch.tensor([14.6146, 6.0, 1.5, 0.3, 0.0292, 0.0])
    meta = BrownianTreeNoise.for_sigmas(torch.empty((2, 4, 8, 8), device="meta"), sigmas, [5, 6])
    increment = meta(sigmas[0], sigmas[1])
    assert built_on == [torch.device("cpu")] * 2 and increment.device.type == "meta" and increment.shape == (2, 4, 8, 8)

    like = torch.zeros((1, 4, 8, 8))
    ours = BrownianTreeNoise.for_sigmas(like, sigmas, [5])
    comfy = BrownianTreeNoiseSampler(like, sigmas[sigmas > 0].min(), sigmas.max(), seed=5, cpu=True)
    for sigma, sigma_next in zip(sigmas[:-2], sigmas[1:-1]):
        torch.testing.assert_close(ours(sigma, sigma_next), comfy(sigma, sigma_next), rtol=1e-5, atol=1e-5)
