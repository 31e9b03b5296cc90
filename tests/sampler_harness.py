"""Shared helpers for sampler parity tests (sigma-space samplers here; DDIM/PLMS/DDPM/LCM/UniPC may reuse it).

What it gives a test:

- ``tiny_unet(seed)``: a fixed, seeded, reduced-width diffusers ``UNet2DConditionModel`` (block_out_channels
  (32, 64), one layer per block, cross-attention dim 32, 8x8 latents, default init) behind an identity skip
  so latents keep a realistic O(1) size (see ``SkipUNet``), and ``context(batch)``, its text conditioning. Build each once per module (pytest fixture with ``scope="module"``).
- ``sd_scheduler_config(prediction)``: SD 1.x scheduler settings (scaled_linear 0.00085..0.012, leading
  spacing, steps_offset 1) for any diffusers scheduler class; ``make_scheduler(cls, prediction)`` builds
  one, dropping the settings a class does not take.
- ``sdlab_model(unet, ctx, prediction)``: the same network behind sdlab's ``Denoiser`` as a
  ``DenoiseFn`` ``(x, sigma (B,)) -> x0``.
- ``run_diffusers(scheduler, unet, ctx, steps, seeds)``: the diffusers pipeline loop (``set_timesteps``,
  ``init_noise_sigma``, ``scale_model_input``, unet, ``step`` with a per-image generator list), returning the
  final latents, the scheduler and the unit initial noise.
- ``noise_for(seeds, shape)``: the same initial noise for sdlab, and the per-image generators advanced past
  it (diffusers pipelines draw the initial latents and then the step noise from the same generators), as a
  ``NoiseSource``.
- ``load_k_diffusion_sampling()``: k-diffusion's ``sampling.py`` loaded by file path (the package itself
  cannot import here: it needs torchvision), with ``utils`` and ``torchdiffeq`` stubbed;
  ``load_k_diffusion_external()``: its ``external.py`` (``DiscreteSchedule``) the same way.

Everything runs on the CPU in float32; keep batch 2 and 8x8 latents so a test file stays fast.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import types
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from sdlab.diffusion.denoiser import Denoiser
from sdlab.diffusion.model_sampling import DiscreteModelSampling
from sdlab.diffusion.noise import NoiseSource, generators_for, initial_noise, per_image_noise
from sdlab.diffusion.schedules import NoiseSchedule

LATENT_SHAPE = (2, 4, 8, 8)  # (B, C, h, w)
SEEDS = (1234, 98765)
CROSS_ATTENTION_DIM = 32
CONTEXT_TOKENS = 5


class _SkipOutput:
    def __init__(self, sample: Tensor) -> None:
        self.sample = sample


class SkipUNet(torch.nn.Module):
    """``x_in + scale * unet(x_in, t, context)``, called like a diffusers U-Net (``.sample`` on the result).

    A random U-Net's eps (or v) is uncorrelated with its input, so its denoised estimate
    ``x - sigma * eps`` is O(sigma_max) ~ 15 and float32 rounding of the references alone exceeds 1e-5
    in the final latents. With the identity skip the prediction is close to what a trained model gives at
    high noise (eps ~ the scaled input) and latents stay O(1), as in real use; every value still flows
    through the U-Net, its time embedding and cross-attention.
    """

    def __init__(self, unet: torch.nn.Module, scale: float = 0.1) -> None:
        super().__init__()
        self.unet = unet
        self.scale = scale

    def forward(self, x_in: Tensor, t, encoder_hidden_states: Tensor) -> _SkipOutput:
        return _SkipOutput(x_in + self.scale * self.unet(x_in, t, encoder_hidden_states=encoder_hidden_states).sample)


def tiny_unet(seed: int = 0) -> SkipUNet:
    """A fixed random reduced-width diffusers U-Net (every code path of SD1's U-Net, tiny widths),
    behind an identity skip (see ``SkipUNet``)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_ATTENTION_DIM,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    return SkipUNet(unet.eval().requires_grad_(False))


def context(batch: int = LATENT_SHAPE[0], seed: int = 7) -> Tensor:
    """Text conditioning for ``tiny_unet``: (B, tokens, 32)."""
    return torch.randn(batch, CONTEXT_TOKENS, CROSS_ATTENTION_DIM, generator=torch.Generator().manual_seed(seed))


def sd_scheduler_config(prediction: str = "epsilon", **overrides) -> dict:
    """SD 1.x scheduler settings; ``prediction`` is a diffusers prediction_type ("epsilon" | "v_prediction")."""
    config = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
        prediction_type=prediction,
    )
    config.update(overrides)
    return config


def make_scheduler(cls, prediction: str = "epsilon", **overrides):
    """A diffusers scheduler ``cls`` with ``sd_scheduler_config``, minus the settings ``cls`` does not take
    (``DPMSolverSinglestepScheduler`` has no ``timestep_spacing`` / ``steps_offset``: its grid is always
    ``linspace(0, 999, n + 1)`` rounded, without the last entry)."""
    accepted = inspect.signature(cls.__init__).parameters
    config = {k: v for k, v in sd_scheduler_config(prediction, **overrides).items() if k in accepted}
    return cls(**config)


def sd_schedule() -> NoiseSchedule:
    """sdlab's SD schedule in float32, the precision diffusers' schedulers hold alphas_cumprod in."""
    return NoiseSchedule.sd(dtype=torch.float32)


def sdlab_model(unet, ctx: Tensor, prediction: str):
    """The U-Net behind sdlab's ``Denoiser``: a ``DenoiseFn`` ``(x, sigma) -> x0``."""

    def net(x_in: Tensor, t: Tensor, *, context: Tensor) -> Tensor:
        return unet(x_in, t, encoder_hidden_states=context).sample

    denoiser = Denoiser(net, DiscreteModelSampling(sd_schedule(), prediction))
    return lambda x, sigma: denoiser(x, sigma, context=ctx)


def noise_for(seeds: Sequence[int] = SEEDS, shape: tuple[int, ...] = LATENT_SHAPE) -> tuple[Tensor, NoiseSource]:
    """Unit initial noise for ``seeds`` and a step-noise source continuing the same per-image generators."""
    gens = generators_for(seeds)
    unit = torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in gens])  # (B, C, h, w)
    assert torch.equal(unit, initial_noise(shape, seeds))
    return unit, per_image_noise(gens, unit)


@torch.no_grad()
def run_diffusers(scheduler, unet, ctx: Tensor, steps: int, seeds: Sequence[int] = SEEDS, **step_kwargs):
    """The diffusers pipeline loop. Returns (final latents, scheduler after set_timesteps, unit initial noise)."""
    scheduler.set_timesteps(steps)
    gens = generators_for(seeds)
    unit = torch.cat([torch.randn((1, *LATENT_SHAPE[1:]), generator=g) for g in gens])  # (B, C, h, w)
    x = unit * scheduler.init_noise_sigma
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    if takes_generator:
        step_kwargs = {**step_kwargs, "generator": gens}
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        out = unet(x_in, t, encoder_hidden_states=ctx).sample
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x, scheduler, unit


def distinct_sigmas(scheduler_sigmas: Tensor) -> Tensor:
    """The step sigmas of a scheduler that repeats each for its second-order half-steps (Heun, KDPM2,
    DPMSolverSDE: [s0, s1, s1, s2, s2, ..., 0]) as the plain descending list [s0, s1, ..., 0]."""
    return torch.unique_consecutive(scheduler_sigmas)


def load_k_diffusion_sampling() -> types.ModuleType:
    """k-diffusion's ``sampling.py`` by file path; ``utils`` (needs torchvision) and ``torchdiffeq`` stubbed."""
    name = "_kdiff_ref"
    if f"{name}.sampling" in sys.modules:
        return sys.modules[f"{name}.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    assert spec is not None and spec.submodule_search_locations, "k-diffusion is a test dependency"
    path = Path(next(iter(spec.submodule_search_locations))) / "sampling.py"

    package = types.ModuleType(name)
    package.__path__ = []
    utils = types.ModuleType(f"{name}.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    package.utils = utils
    sys.modules[name] = package
    sys.modules[f"{name}.utils"] = utils
    if "torchdiffeq" not in sys.modules:
        torchdiffeq = types.ModuleType("torchdiffeq")
        torchdiffeq.odeint = None  # only k-diffusion's log_likelihood uses it
        sys.modules["torchdiffeq"] = torchdiffeq

    module_spec = importlib.util.spec_from_file_location(f"{name}.sampling", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[f"{name}.sampling"] = module
    module_spec.loader.exec_module(module)
    package.sampling = module
    return module


def load_k_diffusion_external() -> types.ModuleType:
    """k-diffusion's ``external.py`` (``DiscreteSchedule``, the model wrappers) by file path, beside the
    ``sampling`` module of :func:`load_k_diffusion_sampling` that it imports."""
    sampling = load_k_diffusion_sampling()
    name = sampling.__name__.rpartition(".")[0]
    if f"{name}.external" in sys.modules:
        return sys.modules[f"{name}.external"]
    path = Path(sampling.__file__).with_name("external.py")
    module_spec = importlib.util.spec_from_file_location(f"{name}.external", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[f"{name}.external"] = module
    module_spec.loader.exec_module(module)
    return module


class VToEps(torch.nn.Module):
    """A v-predicting diffusers U-Net seen as an eps model, ``eps = sqrt(ac) v + sqrt(1 - ac) z`` (z: the VP
    input): references such as PNDM combine raw v outputs differently from PLMS on eps, so they run on eps."""

    def __init__(self, unet, alphas_cumprod: Tensor) -> None:
        super().__init__()
        self.unet = unet
        self.alphas_cumprod = alphas_cumprod

    def forward(self, z, t, encoder_hidden_states):
        v = self.unet(z, t, encoder_hidden_states=encoder_hidden_states).sample
        ac = self.alphas_cumprod[int(t)]
        return types.SimpleNamespace(sample=ac.sqrt() * v + (1 - ac).sqrt() * z)
