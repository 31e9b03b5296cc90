"""One generate loop for txt2img, img2img and inpainting, and the SDXL base -> refiner handoff.

    request -> sigmas (discretization; img2img keeps the tail that `strength` asks for)
            -> x at sigmas[0]: noise * initial scale, or the image latent + noise * sigmas[0]
            -> guided denoiser: conditioning (cond, uncond) + CFG [+ latent blend for 4-channel
               inpainting | mask + masked-image latent as extra channels for 9-channel inpainting]
            -> sampler -> latent -> VAE decode (tiled for large images) -> PIL images
            [-> inpainting: the original pasted back outside the blurred mask (A1111; pipeline/overlay.py)]

Before any network runs, `resolve_for` checks the request against the model (clip skip within the text
encoders' layers) and against memory (`pipeline/memory.py`). While sampling, every denoiser input and
output is checked: a NaN or Inf (absurd settings, broken weights) stops the run with a `NonFiniteError`
instead of a black picture.

The modes differ only in the starting x, the sigma slice and the optional mask.

Random numbers. Image i of a batch draws everything from its own CPU generator seeded with seed + i, so
image i equals a single run with seed + i, on any device. The draws follow diffusers' pipelines in order:

1. the VAE posterior sample of the init image, only when the start or the blend needs it (img2img;
   inpainting below strength 1; 4-channel inpainting at any strength); diffusers' 9-channel inpainting at
   strength 1 starts from pure noise and encodes no init image, and neither does sdlab;
2. the initial noise;
3. the posterior sample of the masked image (9-channel inpainting models only);
4. the sampler's step noise (ancestral / SDE samplers).

Where diffusers differs (documented in tests/test_pipeline_parity.py): with ONE init image and a list of
generators its inpainting pipeline encodes the (masked) image with generator 0 only and repeats that latent,
and its 4-channel inpainting encodes the masked image (an unused draw between 2 and 4). sdlab draws per
image and never makes unused draws.

Initial scale of pure noise (``GenerationRequest.init_noise``): "sigma_max" (A1111, ComfyUI) or "vp"
(diffusers' ``init_noise_sigma`` of VP schedulers and Euler's leading spacing: sqrt(1 + sigma_max^2)); by
default the schedule's convention (``discretization.default_init_noise``). Inpainting at
strength 1 starts from pure noise, as diffusers' inpainting pipelines do; img2img always starts from the
image latent plus noise at sigmas[0] (diffusers' ``add_noise``), strength 1 included.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from sdlab.families.loaded import ModelBundle
from sdlab.diffusion.brownian import BrownianTreeNoise
from sdlab.diffusion.denoiser import DenoiseFn, Denoiser
from sdlab.diffusion.discretization import (
    discretize,
    img2img_sigmas,
    initial_noise_sigma,
)
from sdlab.diffusion.guidance import cfg, masked
from sdlab.diffusion.model_sampling import DiscreteModelSampling, ModelSampling
from sdlab.diffusion.noise import generators_for, per_image_noise
from sdlab.diffusion.samplers import SamplerSpec, get_sampler, steps_warning
from sdlab.diffusion.sampling_ldm import to_ddpm_latent
from sdlab.diffusion.schedules import NoiseSchedule
from sdlab.diffusion.steps import StepInfo
from sdlab.pipeline.conditioning import hidden_state_layers, make_cond
from sdlab.pipeline.images import (
    latent_mask,
    masked_image,
    pil_to_tensor,
    tensor_to_pil,
)
from sdlab.pipeline.memory import check_memory
from sdlab.pipeline.overlay import blur_mask, overlay_weight, paste_back
from sdlab.pipeline.request import (
    GenerationRequest,
    GenerationResult,
    RequestError,
    check_refiner_switch,
    resolve,
)
from sdlab.pipeline.tiling import decode_tiled, encode_tiled, should_tile

logger = logging.getLogger(__name__)

__all__ = [
    "NonFiniteError",
    "ProgressFn",
    "decode_latents",
    "encode_image",
    "generate",
    "generate_with_refiner",
    "handoff_index",
    "inpaint_channels",
    "request_sigmas",
    "resolve_for",
    "sample_latents",
]

ProgressFn = Callable[[StepInfo], None]
FAR_FROM_NATIVE = 2.0       # warn when a side is more than this factor above or below the model's size


class NonFiniteError(RequestError):
    """The sample became NaN or Inf: settings or weights that overflow. Nothing is returned or saved."""


def resolve_for(bundle: ModelBundle, request: GenerationRequest) -> GenerationRequest:
    """`resolve` with the bundle's family defaults, then the checks that need the model: clip skip, memory."""
    family = bundle.family
    req = resolve(
        request,
        default_size=bundle.default_size,
        default_sampler=family.default_sampler,
        default_schedule=family.default_sigma_schedule,
        factor=bundle.vae_config.downsample_factor,
        default_cfg=family.default_cfg,
    )
    for encoder in bundle.text_encoders:
        try:
            hidden_state_layers(encoder, req.clip_skip)
        except ValueError as err:
            raise RequestError(f"clip skip {req.clip_skip} is too large for this model: {err}") from None
    check_memory(bundle, req)
    return req


def model_sampling(bundle: ModelBundle) -> ModelSampling:
    """The bundle's noise parameterisation: its family's training schedule with its prediction type."""
    return DiscreteModelSampling(bundle.family.schedule.build(), bundle.prediction)


def warn_if_far_from_native(bundle: ModelBundle, req: GenerationRequest) -> None:
    """Log a warning when a side is more than `FAR_FROM_NATIVE` times off the model's native size: a model
    draws well near the size it was trained at (repeated subjects above it, mush below it)."""
    native = bundle.default_size
    if any(not native / FAR_FROM_NATIVE <= side <= native * FAR_FROM_NATIVE for side in (req.width, req.height)):
        logger.warning(
            "%dx%d is far from this model's native %dx%d px; expect repeated or broken subjects "
            "(leave width and height unset for the native size)", req.width, req.height, native, native,
        )


@torch.no_grad()
def generate(bundle: ModelBundle, request: GenerationRequest, *, progress: ProgressFn | None = None) -> GenerationResult:
    """Run one request on `bundle`; returns PIL images and the resolved request."""
    req = resolve_for(bundle, request)
    warn_if_far_from_native(bundle, req)
    latents = sample_latents(bundle, req, progress=progress)   # (B, 4, h, w), model space
    return GenerationResult(images=_pictures(bundle, req, latents), seeds=req.seeds(), request=req)


def _pictures(bundle: ModelBundle, req: GenerationRequest, latents: Tensor) -> list[Image.Image]:
    """Decode, check, and for inpainting paste the original back outside the mask (A1111's overlay)."""
    images = decode_latents(bundle, latents, tiled=req.tiled_vae)                         # (B, 3, H, W)
    if not torch.isfinite(images).all():
        raise NonFiniteError(
            "the VAE decoded NaN or Inf values (its weights or the latent scaling factor are broken); "
            "no picture was made"
        )
    pictures = tensor_to_pil(images)
    if req.mask_image is not None and req.paste_back:
        soft = blur_mask(req.mask_image, req.mask_blur, (req.width, req.height))          # (1, 1, H, W)
        original = req.init_image.convert("RGB").resize((req.width, req.height), Image.Resampling.LANCZOS)
        pictures = paste_back(pictures, original, overlay_weight(soft))
    return pictures


@torch.no_grad()
def sample_latents(bundle: ModelBundle, req: GenerationRequest, *, progress: ProgressFn | None = None) -> Tensor:
    """The sampling half of `generate` for a resolved request: the model-space latents it ends with."""
    generators = generators_for(req.seeds())
    sigmas = request_sigmas(bundle, req)
    start = _start(bundle, req, sigmas, generators)
    model = _guided_model(bundle, req, start, generators)
    x = _run_sampler(model, start.x, sigmas, _sampler_options(bundle, req, start.x, sigmas, generators), req, progress)
    _check_finite(x, "the final latent", req)
    return to_ddpm_latent(x, sigmas[-1])


def _check_finite(x: Tensor, what: str, req: GenerationRequest) -> None:
    if not torch.isfinite(x).all():
        raise NonFiniteError(
            f"{what} became NaN or Inf (CFG {req.cfg_scale:g}, eta {req.eta}, prompt weights, or the model's "
            "weights overflow); stopped instead of making a black picture"
        )


# ----------------------------------------------------------------------------------------------------------
# SDXL base -> refiner


def handoff_index(sigmas: Tensor, schedule: NoiseSchedule, switch_at: float) -> int:
    """How many steps of `sigmas` the base model takes before the refiner takes over at ``sigmas[index]``.

    diffusers' ``denoising_end`` / ``denoising_start`` rule: with T training timesteps the cut-off is
    ``round(T * (1 - switch_at))``; the base takes every step whose timestep is >= the cut-off and the
    refiner every step below it (``StableDiffusionXLPipeline`` / ``StableDiffusionXLImg2ImgPipeline``,
    ``discrete_timestep_cutoff``). A step's timestep is that of its starting sigma (``sigma_to_t``,
    fractional for Karras-like lists, as diffusers' Euler uses it). sdlab samplers count steps, not model
    calls, so second-order samplers never split inside a step (diffusers' "+1 for order 2" fix-up).
    `switch_at` lies strictly between 0 and 1 (`check_refiner_switch`, done by `generate_with_refiner`).
    """
    cutoff = round(schedule.num_timesteps * (1.0 - float(switch_at)))
    steps = sigmas[:-1].to(torch.float64).cpu()                                 # each step's starting sigma
    timesteps = schedule.sigma_to_t(steps)                                      # (steps,)
    return int((timesteps >= cutoff - 1e-3).sum())   # integer timesteps come back from sigma_to_t within ~1e-5


@torch.no_grad()
def generate_with_refiner(
    base: ModelBundle,
    refiner: ModelBundle,
    request: GenerationRequest,
    switch_at: float = 0.8,
    *,
    progress: ProgressFn | None = None,
) -> GenerationResult:
    """Run the first `switch_at` of the schedule on `base`, the rest on `refiner`, decode with the refiner's VAE.

    The refiner continues from the base's latent at the handoff sigma on the same sigma list (diffusers'
    ``denoising_end=switch_at`` on the base with ``output_type="latent"``, then ``denoising_start=switch_at``
    on the refiner's img2img pipeline: no noise is added at the handoff). Each model is guided with its own
    conditioning (the refiner's: bigG only, with the request's aesthetic scores). Image i keeps drawing from
    generator seed + i across the handoff, like passing the same generators to both diffusers pipelines.
    Multistep samplers restart their history at the handoff, as a fresh diffusers scheduler does.
    """
    check_refiner_switch(switch_at, "switch_at")
    req = resolve_for(base, request)
    warn_if_far_from_native(base, req)
    if refiner.unet_config.out_channels != base.unet_config.out_channels or (
        refiner.vae_config.downsample_factor != base.vae_config.downsample_factor
    ):
        raise RequestError("the refiner's latent space (channels, VAE factor) differs from the base model's")
    if refiner.scaling_factor != base.scaling_factor:
        raise RequestError(
            f"the base scales latents by {base.scaling_factor} and the refiner by {refiner.scaling_factor}; "
            "a latent handoff needs the same latent space"
        )
    generators = generators_for(req.seeds())
    sigmas = request_sigmas(base, req)
    split = handoff_index(sigmas, base.family.schedule.build(), switch_at)
    logger.info("refiner handoff after %d of %d steps, at sigma %.4f", split, len(sigmas) - 1, float(sigmas[split]))
    start = _start(base, req, sigmas, generators)
    options = _sampler_options(base, req, start.x, sigmas, generators)      # one noise source across both halves
    x = start.x
    if split > 0:
        base_model = _guided_model(base, req, start, generators)
        x = _run_sampler(base_model, x, sigmas[: split + 1], options, req, progress)
    if split < len(sigmas) - 1:
        refiner_model = _guided_model(refiner, req, start, generators)
        x = _run_sampler(refiner_model, x, sigmas[split:], options, req, _offset(progress, split))
    _check_finite(x, "the final latent", req)
    latents = to_ddpm_latent(x, sigmas[-1])                                  # (B, 4, h, w)
    return GenerationResult(images=_pictures(refiner, req, latents), seeds=req.seeds(), request=req)


def _offset(progress: ProgressFn | None, steps_done: int) -> ProgressFn | None:
    if progress is None:
        return None
    return lambda info: progress(dataclasses.replace(info, i=info.i + steps_done))


# ----------------------------------------------------------------------------------------------------------
# the pieces of one run


def request_sigmas(bundle: ModelBundle, req: GenerationRequest) -> Tensor:
    """The sigmas a resolved request visits (the img2img tail for an init image), on the bundle's device."""
    schedule = bundle.family.schedule.build()
    sampler = get_sampler(req.sampler)
    options = dict(final=sampler.final_sigma, scheduler=sampler.spacing)  # a diffusers spacing: the sampler's
    advice = steps_warning(sampler, req.steps, req.schedule) if req.cfg_scale != 1.0 else None
    if advice:
        logger.warning(advice)
    try:
        if req.init_image is None:
            sigmas = discretize(req.schedule, schedule, req.steps, **options)
        else:
            sigmas = img2img_sigmas(req.schedule, schedule, req.steps, req.strength, req.img2img_convention, **options)
    except ValueError as err:   # e.g. a strength so low that no step runs, LCM past its 50 steps
        raise RequestError(str(err)) from None
    return sigmas.to(bundle.device)


@dataclass(frozen=True)
class _Start:
    """Where sampling starts, and the picture inputs the guided model needs."""

    x: Tensor                        # (B, 4, h, w) VE sample at sigmas[0]
    noise: Tensor                    # (B, 4, h, w) the unit noise in x
    pixels: Tensor | None            # (1, 3, H, W) init image in [-1, 1]
    image_latent: Tensor | None      # (B, 4, h, w) posterior samples of the init image, when drawn
    mask: Tensor | None              # (1, 1, H, W) 1 = repaint


def _start(bundle: ModelBundle, req: GenerationRequest, sigmas: Tensor, generators: list[torch.Generator]) -> _Start:
    device = bundle.device
    factor = bundle.vae_config.downsample_factor
    shape = (req.batch_size, bundle.unet_config.out_channels, req.height // factor, req.width // factor)

    pixels = mask = image_latent = None
    if req.init_image is not None:
        pixels = pil_to_tensor(req.init_image, size=(req.width, req.height)).to(device)       # (1, 3, H, W)
        if req.mask_image is not None:   # repaint where the blurred mask is >= 1/2 (pipeline/overlay.py)
            soft = blur_mask(req.mask_image, req.mask_blur, (req.width, req.height))             # (1, 1, H, W)
            mask = (soft >= 0.5).to(torch.float32).to(device)
    from_noise = pixels is None or (mask is not None and req.strength == 1.0)
    blends = mask is not None and not bundle.family.is_inpaint
    if pixels is not None and (not from_noise or blends):
        image_latent = encode_image(bundle, pixels, generators)                                # (B, 4, h, w)

    noise = per_image_noise(generators, torch.empty(shape, device=device))(sigmas[0], sigmas[0])  # (B, 4, h, w)
    if from_noise:
        x = noise * initial_noise_sigma(sigmas, req.init_noise)
    else:
        x = image_latent + noise * sigmas[0]
    return _Start(x=x, noise=noise, pixels=pixels, image_latent=image_latent, mask=mask)


def _guided_model(
    bundle: ModelBundle, req: GenerationRequest, start: _Start, generators: list[torch.Generator]
) -> DenoiseFn:
    """The bundle's U-Net as a CFG-guided denoiser with the request's conditioning and picture inputs."""
    device = bundle.device
    cond, uncond = make_cond(
        bundle.text_encoders,
        bundle.family,
        req.prompt,
        req.negative_prompt,
        adm_width=bundle.unet_config.adm_in_channels,
        batch_size=req.batch_size,
        clip_skip=req.clip_skip,
        guidance=req.cfg_scale != 1.0,
        width=req.width,
        height=req.height,
        original_size=req.original_size,
        crops_coords_top_left=req.crops_coords_top_left,
        target_size=req.target_size,
        aesthetic_score=req.aesthetic_score,
        negative_aesthetic_score=req.negative_aesthetic_score,
    )
    denoiser = Denoiser(bundle.unet, model_sampling(bundle), quantize=req.quantize_timesteps)
    if bundle.family.is_inpaint:
        pixels, mask = start.pixels, start.mask
        if mask is None:  # txt2img / img2img with an inpainting model: repaint everything (as A1111)
            mask = torch.ones((1, 1, req.height, req.width), device=device)
            pixels = torch.zeros((1, 3, req.height, req.width), device=device)
        extra = inpaint_channels(bundle, pixels, mask, generators)                           # (B, 5, h, w)
        cond = {**cond, "concat": extra}
        uncond = None if uncond is None else {**uncond, "concat": extra}
    model = cfg(denoiser, cond, uncond, req.cfg_scale, req.guidance_rescale)
    if start.mask is not None and not bundle.family.is_inpaint:
        small_mask = latent_mask(start.mask, bundle.vae_config.downsample_factor).to(device)  # (1, 1, h, w)
        model = masked(model, start.image_latent, small_mask, start.noise)
    return model


def _run_sampler(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    options: dict[str, Any],
    req: GenerationRequest,
    progress: ProgressFn | None,
) -> Tensor:
    sampler = get_sampler(req.sampler)
    return sampler.fn(_finite_only(model, req), x, sigmas, **options, callback=progress)


def _finite_only(model: DenoiseFn, req: GenerationRequest) -> DenoiseFn:
    """`model` that raises `NonFiniteError` as soon as its input or output holds a NaN or Inf."""
    def denoise(x: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor:
        where = f"at sigma {float(sigma.flatten()[0]):.4g}"
        _check_finite(x, f"the sample {where}", req)
        denoised = model(x, sigma, **kwargs)                                               # (B, C, h, w)
        _check_finite(denoised, f"the denoised sample {where}", req)
        return denoised
    return denoise


def _sampler_options(
    bundle: ModelBundle, req: GenerationRequest, x: Tensor, sigmas: Tensor, generators: list[torch.Generator]
) -> dict[str, Any]:
    """Keyword arguments of the request's sampler: its noise source and the options it accepts."""
    sampler: SamplerSpec = get_sampler(req.sampler)
    options: dict[str, Any] = {}
    if sampler.noise == "brownian":
        options["noise"] = BrownianTreeNoise.for_sigmas(x, sigmas, req.seeds())
    elif sampler.noise == "gaussian":
        options["noise"] = per_image_noise(generators, x)
    if req.eta is not None:
        options["eta"] = req.eta
    if req.s_noise != 1.0:
        options["s_noise"] = req.s_noise
    if sampler.wants_sigma_to_t:
        options["sigma_to_t"] = bundle.family.schedule.build().sigma_to_t
    accepted = inspect.signature(sampler.fn).parameters
    ignored = sorted(name for name in options if name not in accepted and name != "noise")
    if ignored:
        logger.warning("sampler %s takes no %s; ignored", sampler.name, ", ".join(ignored))
    return {name: value for name, value in options.items() if name in accepted}


# ----------------------------------------------------------------------------------------------------------
# VAE


def encode_image(bundle: ModelBundle, pixels: Tensor, generators: list[torch.Generator]) -> Tensor:
    """Init image (1, 3, H, W) in [-1, 1] -> model-space latents (B, 4, h, w), one posterior sample per
    image drawn from that image's generator (diffusers' `retrieve_latents(..., generator[i])`).

    Large pictures are encoded in tiles and use the posterior mean (no draw): a tiled encode has no single
    posterior to sample from."""
    vae = bundle.vae
    pixels = pixels.to(vae.dtype)
    height, width = pixels.shape[-2:]
    if should_tile(height, width):
        mean = encode_tiled(lambda tile: vae.encode(tile).mean, pixels, factor=bundle.vae_config.downsample_factor)
        samples = mean.expand(len(generators), -1, -1, -1)
    else:
        posterior = vae.encode(pixels)
        samples = torch.cat([posterior.sample(g) for g in generators])                  # (B, 4, h, w)
    return samples.to(torch.float32) * bundle.scaling_factor


def inpaint_channels(bundle: ModelBundle, pixels: Tensor, mask: Tensor, generators: list[torch.Generator]) -> Tensor:
    """The 5 extra input channels of 9-channel inpainting U-Nets: latent mask, then masked-image latent."""
    factor = bundle.vae_config.downsample_factor
    masked_latent = encode_image(bundle, masked_image(pixels, mask), generators)          # (B, 4, h, w)
    small_mask = latent_mask(mask, factor).expand(masked_latent.shape[0], -1, -1, -1)    # (B, 1, h, w)
    return torch.cat([small_mask.to(masked_latent), masked_latent], dim=1)


def decode_latents(bundle: ModelBundle, latents: Tensor, *, tiled: bool | None = None) -> Tensor:
    """Model-space latents (B, 4, h, w) -> images (B, 3, H, W) in [-1, 1]."""
    vae = bundle.vae
    factor = bundle.vae_config.downsample_factor
    z = (latents / bundle.scaling_factor).to(vae.dtype)
    height, width = z.shape[-2] * factor, z.shape[-1] * factor
    if tiled if tiled is not None else should_tile(height, width):
        return decode_tiled(vae.decode, z, factor=factor)
    return vae.decode(z)
