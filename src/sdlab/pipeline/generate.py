"""One generate loop for txt2img, img2img and inpainting, and the SDXL base -> refiner handoff.

    request -> plan (resolved once; sigmas: img2img keeps the tail that `strength` asks for)
            -> x at sigmas[0] by the model sampling's forward process: noise * initial scale, or the
               image latent + noise * sigmas[0]
            -> guided denoiser: conditioning (cond, uncond) + CFG [+ latent blend for 4-channel
               inpainting | mask + masked-image latent as extra channels for 9-channel inpainting]
            -> sampler -> latent -> VAE decode (tiled for large images) -> PIL images
            [-> inpainting: the original pasted back outside the blurred mask (A1111; pipeline/overlay.py)]

The init picture and mask come from the plan as A1111 prepares them (`pipeline/init_picture.py`: resized by the
resize mode, or the mask's region for Inpaint area "Only masked", filled by Masked content).

Before any network runs, the request is resolved once into a `GenerationPlan` (`pipeline/plan.py`: the
resolved request, sampler row, model sampling, sigmas, sizes, blurred mask, refiner split), which checks it
against the model(s) (clip skip, memory); the loop only reads the plan. While sampling, every denoiser input
and output is checked: a NaN or Inf (absurd settings, broken weights) stops the run with a `NonFiniteError`
instead of a black picture (on CUDA one model call later, so that the check never stalls the GPU's queue:
`pipeline/finite.py`).

The modes differ only in the starting x, the sigma slice and the optional mask.

A progress callback that raises `SamplingStopped` ends the run at that step as A1111's interrupt and skip end
its sampler: the pictures are those of the step's x0 estimate, decoded as the last step's would be, and the
passes after it (the hires fix's second, the refiner's part) do not run.

Random numbers. Image i of a batch draws everything from its own generator seeded with seed + i, of the
request's random source (`rng`: a CPU generator by default, `diffusion/noise.py`), so image i equals a single
run with seed + i. The draws follow diffusers' pipelines in order:

1. the VAE posterior sample of the init image, only when the start or the blend needs it (img2img;
   inpainting below strength 1; 4-channel inpainting at any strength); diffusers' 9-channel inpainting at
   strength 1 starts from pure noise and encodes no init image, and neither does sdlab;
2. the initial noise;
3. the posterior sample of the masked image: 9-channel inpainting models; and under diffusers' convention
   4-channel inpainting too, whose U-Net never reads it (diffusers' inpainting pipelines encode the masked
   image for every U-Net): there the latent-sized draw is made and dropped;
4. the sampler's step noise (ancestral / SDE / LCM / TCD samplers); with an ENSD (A1111's, and 1 for a sampler
   spelt as ComfyUI spells it: ComfyUI's ``default_noise_sampler``) from fresh generators seeded seed + i + ENSD.

Under A1111's img2img convention the initial noise is each seed's first draw and the step noise follows
it directly (A1111's `ImageRNG`): A1111 samples its posteriors (1 and 3) from its global random state,
apart from the seeds' generators, and sdlab takes the posterior means there, drawing nothing. So does
ComfyUI (its VAE encode samples the posterior with ``torch.randn`` on the global state), whose initial noise
is the seed's first draw (``prepare_noise``): under its convention too sdlab draws no posterior.

Where diffusers differs (documented in tests/test_pipeline_parity.py): with ONE init image and a list of
generators its inpainting pipeline encodes the (masked) image with generator 0 only and repeats that latent.
sdlab draws per image.

Initial scale of pure noise (``GenerationRequest.init_noise``): "sigma_max" (A1111), "vp" (diffusers'
``init_noise_sigma`` of VP schedulers and Euler's leading spacing: sqrt(1 + sigma_max^2)) or "comfyui"
(ComfyUI's KSampler: "vp"'s where the run starts at the model's sigma_max, else sigma_max's); by default the
schedule's convention (``discretization.default_init_noise``). Inpainting at strength 1 starts from pure
noise, as diffusers' inpainting pipelines do; img2img always starts from the image latent plus noise at
sigmas[0] (diffusers' ``add_noise``), strength 1 included, where ComfyUI's rule scales that noise too.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from sdlab.families.loaded import ModelBundle
from sdlab.diffusion.area_conds import AreaPart, area_average, opposite_areas
from sdlab.diffusion.brownian import BrownianTreeNoise
from sdlab.diffusion.denoiser import DenoiseFn, Denoiser
from sdlab.diffusion.discretization import A1111_IMG2IMG, UI_IMG2IMG, steps_run
from sdlab.diffusion.guidance import (
    a1111_skips, cfg, composable_cfg, edit_cfg, edit_guidance, masked, masked_input, recording_effects, skipping_uncond,
    switch_at_calls, took_effect,
)
from sdlab.diffusion.guidance import PerturbedGuidance
from sdlab.diffusion.model_sampling import ModelSampling
from sdlab.diffusion.noise import Generator, draw, first_noise, generators_for, per_image_noise
from sdlab.diffusion.samplers import A1111_TIMESTEP_SAMPLERS, SamplerSpec, get_sampler, runs_a1111_timesteps
from sdlab.diffusion.steps import StepInfo
from sdlab.models.circular_padding import circular_padding
from sdlab.models.token_merging import TokenMerging, merging_tokens
from sdlab.models.generation_memo import reusing_generation_work
from sdlab.models.unet import guidance_scale_embedding
from sdlab.models.vae import DiagonalGaussian
from sdlab.pipeline.control import (
    controlled_unet, inpaint_mask, prepare_controls, prompt_marks, sigma_windowed, spans_part, tag_steps,
)
from sdlab.pipeline.conditioning import ClipSkip, composed_schedule, empty_context_once, make_cond_schedule
from sdlab.pipeline.finite import FiniteWatch
from sdlab.pipeline.image_prompt import image_prompt_conds, image_prompted, prepare_image_prompts
from sdlab.pipeline.images import (
    a1111_latent_mask,
    comfyui_grown_mask,
    comfyui_latent_mask,
    latent_mask,
    masked_image,
    pil_to_tensor,
    tensor_to_pil,
    unit_pixels,
)
from sdlab.pipeline.init_picture import InitPicture
from sdlab.pipeline.masked_content import masked_latent
from sdlab.pipeline.overlay import Overlay, apply_overlay
from sdlab.pipeline.perturbed_attention import PagLayerError, pag_layer_names
from sdlab.pipeline.plan import (
    check_deep_cache_branch,
    GenerationPlan,
    a1111_switches,
    a1111_training_sigmas,
    encoder_clip_skips,
    handoff_index,
    make_plan,
    pass_timestep_sigma,
    prompt_parts,
    prompt_schedule_steps,
    request_sigmas,
    resolve_for,
    warn_if_far_from_native,
)
from sdlab.pipeline.request import GenerationRequest, GenerationResult, RequestError, drawn_request
from sdlab.pipeline.tiling import decode_tiled, encode_tiled, should_tile
from sdlab.pipeline.upscale import upscale_latent

logger = logging.getLogger(__name__)

__all__ = [
    "GenerationPlan",
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
    "tiling_padding",
    "token_merging",
    "warn_if_far_from_native",
]

ProgressFn = Callable[[StepInfo], None]


class NonFiniteError(RequestError):
    """The sample became NaN or Inf: settings or weights that overflow. Nothing is returned or saved."""


def _as_plan(
    bundle: ModelBundle,
    plan_or_request: GenerationPlan | GenerationRequest,
    refiner: ModelBundle | None = None,
    switch_at: float = 0.8,
) -> GenerationPlan:
    """A plan as given, or the request resolved into one (`make_plan`)."""
    if isinstance(plan_or_request, GenerationPlan):
        if refiner is not None and plan_or_request.refiner_split is None:
            raise ValueError("this plan was made without a refiner; make it with make_plan(..., refiner=...)")
        return plan_or_request
    return make_plan(bundle, plan_or_request, refiner=refiner, switch_at=switch_at)


class SamplingStopped(Exception):
    """Raised from a progress callback to end the run at that step with what it has (module docstring): the
    run raises it again with `latents`, the step's x0 estimate (model space), and once decoded `result`.
    `skipped`: A1111's skip rather than its interrupt (they differ only between the hires fix's passes:
    `hires.generate_hires`)."""

    def __init__(self, skipped: bool = False) -> None:
        super().__init__("sampling stopped")
        self.skipped = skipped
        self.latents: Tensor | None = None
        self.result: GenerationResult | None = None


@contextmanager
def pictures_if_stopped(bundle: ModelBundle, plan: GenerationPlan,
                        request: GenerationRequest | None = None) -> Iterator[None]:
    """A `SamplingStopped` from the block gets its `result` (unless it has one): its latents decoded by
    `bundle` for `plan` (`_pictures`), recorded with `request` (the plan's by default) as drawn so far
    (`drawn_request`)."""
    with recording_effects() as effects:
        try:
            yield
        except SamplingStopped as stop:
            if stop.result is None:
                stop.result = _stopped_result(bundle, plan, plan.request if request is None else request,
                                              stop.latents, effects)
            raise


def _stopped_result(bundle: ModelBundle, plan: GenerationPlan, request: GenerationRequest, latents: Tensor,
                    effects: set[str], refined: bool = False) -> GenerationResult:
    """A stopped run's result: `latents` decoded by `bundle` for `plan`, recorded with `request` as drawn so far."""
    req = drawn_request(request, effects)
    images, pixels = _pictures(bundle, plan, latents)
    return GenerationResult(images=images, seeds=req.seeds(), request=req, refined=refined, pixels=pixels)


@torch.no_grad()
def generate(
    bundle: ModelBundle, request: GenerationPlan | GenerationRequest, *, progress: ProgressFn | None = None
) -> GenerationResult:
    """Run one request (or a plan made for `bundle`) on `bundle`; returns PIL images and the resolved request as
    drawn (`drawn_request`: A1111's options that changed nothing are off)."""
    plan = _as_plan(bundle, request)
    with recording_effects() as effects, tiling_padding(plan.request, bundle), pictures_if_stopped(bundle, plan):
        latents = sample_latents(bundle, plan, progress=progress)   # (B, 4, h, w), model space
        images, pixels = _pictures(bundle, plan, latents)
    return GenerationResult(images=images, seeds=plan.request.seeds(), request=drawn_request(plan.request, effects),
                            pixels=pixels)


def tiling_padding(req: GenerationRequest, *bundles: ModelBundle) -> AbstractContextManager[None]:
    """A1111's Tiling (`req.tiling`) for the block: every padded convolution of the bundles' U-Nets and VAEs
    pads circularly (`models.circular_padding`; the ControlNets: `ControlledUNet`)."""
    return circular_padding(*(net for bundle in bundles for net in (bundle.unet, bundle.vae)), enabled=req.tiling)


def token_merging(req: GenerationRequest, bundle: ModelBundle) -> AbstractContextManager[None]:
    """A1111's Token merging ratio (`req.token_merging_ratio`, a pass's) for the block: the bundle's U-Net merges
    tokens as tomesd with A1111's settings (`models.token_merging`: use_rand off, max_downsample 1, 2 x 2 cells).
    An SDXL refiner's U-Net does not (A1111 patches the model it loaded for the job, the base). Ratio 0 leaves
    the network alone, so a plug-in family's own network, which may not merge tokens, draws as before."""
    if req.token_merging_ratio <= 0:
        return nullcontext()
    if not hasattr(bundle.unet, "token_merging"):
        raise RequestError(f"token merging needs sdlab's U-Net; this model's network ({type(bundle.unet).__name__}) "
                           "does not merge tokens")
    return merging_tokens(bundle.unet, TokenMerging(req.token_merging_ratio))


def _pictures(bundle: ModelBundle, plan: GenerationPlan,
              latents: Tensor) -> tuple[list[Image.Image], Tensor | None]:
    """Decode, check, and for inpainting paste the original back outside the mask (A1111's overlay; for
    Inpaint area "Only masked" the pictures go back into their region of the original first). With the pictures,
    their float decode (`GenerationResult.pixels`), None where they were pasted back."""
    req = plan.request
    images = decode_latents(bundle, latents, tiled=req.tiled_vae)                         # (B, 3, H, W)
    pictures = tensor_to_pil(images)
    if _overlay(plan) is not None and req.paste_back:
        return _pasted_back(pictures, plan.pictures), None
    return pictures, unit_pixels(images)


def _overlay(plan: GenerationPlan) -> Overlay | None:
    """Inpainting's overlay (`plan.picture`'s); None without an init picture or a mask."""
    return None if plan.picture is None else plan.picture.overlay


def _pasted_back(pictures: list[Image.Image], inputs: tuple[InitPicture, ...]) -> list[Image.Image]:
    """Picture i pasted onto the overlay of init picture i % N (`per_picture`'s rule), each overlay's
    pictures in one `apply_overlay`."""
    pasted = list(pictures)
    for k, picture_inputs in enumerate(inputs):
        pasted[k::len(inputs)] = apply_overlay(pictures[k::len(inputs)], picture_inputs.overlay)
    return pasted


@torch.no_grad()
def sample_latents(
    bundle: ModelBundle, request: GenerationPlan | GenerationRequest, *, progress: ProgressFn | None = None,
    init_latent: Tensor | None = None, init_pixels: Tensor | None = None,
) -> Tensor:
    """The sampling half of `generate`: the model-space latents a plan (or a request) ends with.

    `init_latent` (B, C, h, w), model space, with a plan made `from_latent`: img2img from this latent instead
    of an init image (noise drawn first from each image's generator; no VAE encode). `init_pixels` (N, 3, H, W):
    the pictures that latent stands for, which a 9-channel inpainting model is conditioned on as an init image's
    (a Conditional mask weight below 1: `_inpaint_extra`); without them, txt2img's mid-grey."""
    plan = _as_plan(bundle, request)
    if (init_latent is not None) != plan.from_latent or (
            init_latent is not None and tuple(init_latent.shape) != plan.latent_shape):
        raise ValueError(f"init_latent goes with a plan made from_latent, of shape {plan.latent_shape}")
    generators = generators_for(plan.request.seeds(), plan.request.rng, bundle.device, plan.request.batch_noise)
    with tiling_padding(plan.request, bundle), token_merging(plan.request, bundle):
        start = _start(bundle, plan, generators, init_latent)
        if init_pixels is not None:
            start = replace(start, pixels=init_pixels.to(bundle.device))
        model = _guided_model(bundle, plan.sampling, plan.request, start, _overlay(plan), generators, plan.sigmas)
        try:
            x = _run_sampler(plan, model, start.x, plan.sigmas, _sampler_options(plan, start.x, generators), progress)
        except SamplingStopped as stop:
            stop.latents = _keep_known(bundle, start, stop.latents, plan.request)
            raise
    _check_finite(x, "the final latent", plan.request)
    return _keep_known(bundle, start, plan.sampling.inverse_noise_scaling(plan.sigmas[-1], x), plan.request)


def _blends_latent(bundle: ModelBundle, req: GenerationRequest) -> bool:
    """Whether inpainting blends the init image's latent into the kept region (`guidance.masked`,
    `_keep_known`): always for an ordinary model; for a 9-channel inpainting model under A1111's and ComfyUI's
    img2img conventions, as A1111 blends for every model (`CFGDenoiser`: ``init_latent * mask + nmask * denoised``)
    and so does ComfyUI's KSampler wherever a noise mask is set (comfy/samplers.py ``KSamplerX0Inpaint``), where
    diffusers' inpainting pipelines leave it to the model."""
    return not bundle.family.is_inpaint or req.img2img_convention in UI_IMG2IMG


def _keep_known(bundle: ModelBundle, start: _Start, latents: Tensor, req: GenerationRequest) -> Tensor:
    """Inpainting that blends (`_blends_latent`): the kept region of the final latents (B, C, h, w) set to
    the init image's latent, as diffusers and A1111 do after the last step. Samplers that end above sigma 0
    (DDIM, PLMS, TCD: at sigma_min) would otherwise leave it noised to that sigma (`guidance.masked` pastes
    the known x0 into every denoised estimate, which is all a sampler ending at 0 returns). ComfyUI's KSampler
    returns the sampler's latent as it is (comfy/samplers.py `KSAMPLER.sample`): a soft latent mask's cells
    keep that blend once, not twice."""
    if start.mask is None or not _blends_latent(bundle, req) or req.img2img_convention == "comfyui":
        return latents
    keep = 1 - start.latent_mask.to(latents.device)                                        # (1, 1, h, w)
    return latents + keep * (start.image_latent.to(latents.dtype) - latents)


def _check_finite(x: Tensor, what: str, req: GenerationRequest) -> None:
    if not torch.isfinite(x).all():
        raise _non_finite(what, req)


def _non_finite(what: str, req: GenerationRequest) -> NonFiniteError:
    return NonFiniteError(
        f"{what} became NaN or Inf (CFG {req.cfg_scale:g}, eta {req.eta}, prompt weights, or the model's "
        "weights overflow); stopped instead of making a black picture"
    )


# ----------------------------------------------------------------------------------------------------------
# SDXL base -> refiner


@torch.no_grad()
def generate_with_refiner(
    base: ModelBundle,
    refiner: ModelBundle,
    request: GenerationPlan | GenerationRequest,
    switch_at: float = 0.8,
    *,
    progress: ProgressFn | None = None,
) -> GenerationResult:
    """Run the first `switch_at` of the schedule on `base`, the rest on `refiner`, decode with the refiner's VAE
    (a split at the last step, where the refiner never takes over, is the base's run, decoded by its VAE: A1111's
    `apply_refiner` swaps nothing then; the result is not `refined`). A stopped run is decoded by the model drawing
    at the stop, and is `refined` once the refiner has been called (A1111's swap writes its Refiner label).

    The refiner continues from the base's latent at the handoff sigma on the same sigma list (diffusers'
    ``denoising_end=switch_at`` on the base with ``output_type="latent"``, then ``denoising_start=switch_at``
    on the refiner's img2img pipeline: no noise is added at the handoff; inpainting that blends hands over as
    diffusers' inpainting pipelines do, `_inpaint_handoff`). Each model is guided with its own
    conditioning (the refiner's: bigG only, with the request's aesthetic scores). Image i keeps drawing from
    generator seed + i across the handoff, like passing the same generators to both diffusers pipelines.
    Multistep samplers restart their history at the handoff, as a fresh diffusers scheduler does. A plan made
    with ``refiner_convention="a1111"`` or ``"a1111_steps"`` runs one sampler over the whole schedule and swaps the
    model at the first call A1111's rule hands over at (`_a1111_swapping_model`): the history runs on, as in A1111.

    A plan (`make_plan(base, request, refiner=refiner, switch_at=...)`) carries its own split; `switch_at`
    is then unused.
    """
    plan = _as_plan(base, request, refiner, switch_at)
    req, sigmas, split = plan.request, plan.sigmas, plan.refiner_split
    logger.info("refiner handoff after %d of %d steps, at sigma %.4f", split, len(sigmas) - 1, float(sigmas[split]))
    generators = generators_for(req.seeds(), req.rng, base.device, req.batch_noise)
    with recording_effects() as effects, tiling_padding(req, base, refiner), token_merging(req, base):
        start = _start(base, plan, generators, refiner=refiner)
        options = _sampler_options(plan, start.x, generators)                 # one noise source across both halves
        overlay = _overlay(plan)
        base_model = _guided_model(base, plan.sampling, req, start, overlay, generators, sigmas) if split > 0 else None
        took_over = [False]                                             # whether the refiner's first call ran
        refine = None
        if split < len(sigmas) - 1:
            # ControlNets fit the base only; FreeU patches the base's U-Net alone, as ComfyUI's FreeU node patches
            # the one model it is given and diffusers' enable_freeu one pipeline's U-Net
            no_controls = dataclasses.replace(req, controls=(), freeu=None, deep_cache=None,   # DeepCache too
                                              ip_adapters=())   # IP-Adapters too

            def refine(at: _Start) -> DenoiseFn:
                return _noting_a_call(_guided_model(refiner, plan.refiner_sampling, no_controls, at, overlay,
                                                    generators, sigmas, steps_done=split), took_over)
        try:
            x = _refined(plan, base_model, refine, start, _inpaint_handoff(base, refiner, plan, generators), options,
                         progress)
        except SamplingStopped as stop:                 # the model drawing at the stop decodes, as A1111's swap
            drawing = refiner if took_over[0] else base
            stop.latents = _keep_known(drawing, start, stop.latents, req)
            stop.result = _stopped_result(drawing, plan, req, stop.latents, effects, refined=took_over[0])
            raise
        last = refiner if split < len(sigmas) - 1 else base             # a refiner that never takes over: the base's
        _check_finite(x, "the final latent", req)
        sampling = plan.refiner_sampling if last is refiner else plan.sampling
        latents = _keep_known(last, start, sampling.inverse_noise_scaling(sigmas[-1], x), req)
        images, pixels = _pictures(last, plan, latents)
    return GenerationResult(images=images, seeds=req.seeds(), request=drawn_request(req, effects),
                            refined=last is refiner, pixels=pixels)


def _noting_a_call(model: DenoiseFn, called: list[bool]) -> DenoiseFn:
    """`model` that sets `called[0]` once it is called (a refiner: it has taken over)."""
    def denoise(x: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor:
        called[0] = True
        return model(x, sigma, **kwargs)
    return denoise


def _refined(plan: GenerationPlan, base_model: DenoiseFn | None, refine: Callable[[_Start], DenoiseFn] | None,
             start: _Start, handoff: Callable[[Tensor, _Start], tuple[Tensor, _Start]] | None,
             options: dict[str, Any], progress: ProgressFn | None) -> Tensor:
    """The latent the plan's schedule ends with: the base's part then the refiner's (its model `refine` of the start
    it continues from: `start`, or what `handoff` makes of it and the base's latent), or under A1111's conventions
    one sampler that swaps the model (`_a1111_swapping_model`)."""
    sigmas, split, x = plan.sigmas, plan.refiner_split, start.x
    if plan.refiner_convention in ("a1111", "a1111_steps") and base_model is not None and refine is not None:
        return _run_sampler(plan, _a1111_swapping_model(base_model, refine(start), plan), x, sigmas, options, progress)
    if base_model is not None:
        base_share = _share(options, True, refine is None, plan.sampler, steps_after=len(sigmas) - 1 - split)
        x = _run_sampler(plan, base_model, x, sigmas[: split + 1], base_share, progress)
        if refine is not None and handoff is not None:
            x, start = handoff(x, start)
    if refine is not None:
        x = _run_sampler(plan, refine(start), x, sigmas[split:], _share(options, base_model is None, True),
                         _offset(progress, split), first_call=split * plan.sampler.calls_per_step)
    return x


def _inpaint_handoff(base: ModelBundle, refiner: ModelBundle, plan: GenerationPlan,
                     generators: list[Generator]) -> Callable[[Tensor, _Start], tuple[Tensor, _Start]] | None:
    """diffusers' handoff of inpainting that blends (a 4-channel base and refiner, diffusers' refiner and img2img
    conventions; None otherwise): its base's last blend (``denoising_end``) pastes the clean init latent into the
    kept region of the latent it hands over, and the refiner's pipeline (``denoising_start``, that latent as its
    image) feeds it to the model unblended, then blends at each later call with a fresh noise it draws from each
    image's generator before its first step. Returns (x, start) -> (the refiner's x, its start)."""
    req = plan.request
    if not (plan.refiner_convention == "diffusers" and req.img2img_convention == "diffusers"
            and req.mask_image is not None and _blends_latent(base, req) and _blends_latent(refiner, req)):
        return None

    def handoff(x: Tensor, start: _Start) -> tuple[Tensor, _Start]:
        noise = per_image_noise(generators, x)()                                           # (B, 4, h, w)
        return _keep_known(base, start, x, req), replace(start, noise=noise, handed_over=True)
    return handoff


def _a1111_swapping_model(base_model: DenoiseFn, refiner_model: DenoiseFn, plan: GenerationPlan) -> DenoiseFn:
    """One denoiser for A1111's refiner: `base_model` until the first call A1111's ``apply_refiner`` hands over at
    (`_a1111_switch`), `refiner_model` from that call on (A1111 swaps the model inside the running sampler, so a
    multistep sampler keeps its history and a second-order step can end on the refiner)."""
    switches = _a1111_switch(plan)
    swapped, calls = False, 0

    def denoise(x: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor:
        nonlocal swapped, calls
        swapped = swapped or switches(calls, sigma)
        calls += 1
        return (refiner_model if swapped else base_model)(x, sigma, **kwargs)
    return denoise


def _a1111_switch(plan: GenerationPlan) -> Callable[[int, Tensor], bool]:
    """Whether ``apply_refiner`` hands over at model call number `call` (from 0) at `sigma`: under "a1111" when the
    call's sigma `a1111_switches`; under "a1111_steps" (by sampling steps) once ``call / total_steps`` reaches the
    switch, A1111's ``total_steps`` counting two calls a step for its second-order samplers (``calls_per_step``)."""
    switch_at = plan.refiner_switch_at
    if plan.refiner_convention == "a1111_steps":
        total = plan.a1111_total_steps
        return lambda call, sigma: call / total >= switch_at
    training = a1111_training_sigmas(plan.sampling)                          # (T,)
    return lambda call, sigma: bool(a1111_switches(sigma.flatten()[:1], training, switch_at)[0])


def _share(options: dict[str, Any], first: bool, last: bool, sampler: SamplerSpec | None = None,
           steps_after: int = 0) -> dict[str, Any]:
    """`options` of a run over a part of the plan's sigmas: a solver span's start (`plan.solver_span`'s sigma_max)
    only for the part that starts the list (`first`), its end (sigma_min) only for the part that ends it (`last`),
    its model calls (`plan.solver_calls`) only for a run over the whole list;
    for a part followed by `steps_after` steps of the list, that count where `sampler`'s function takes it (UniPC
    lowers its order only at the list's end, as diffusers' scheduler counts its whole list)."""
    dropped = {name for name, kept in (("sigma_max", first), ("sigma_min", last), ("n", first and last)) if not kept}
    share = {name: value for name, value in options.items() if name not in dropped}
    if steps_after and sampler is not None and "steps_after" in sampler.parameters:
        share["steps_after"] = steps_after
    return share


def _offset(progress: ProgressFn | None, steps_done: int) -> ProgressFn | None:
    if progress is None:
        return None
    return lambda info: progress(dataclasses.replace(info, i=info.i + steps_done))


# ----------------------------------------------------------------------------------------------------------
# the pieces of one run


@dataclass(frozen=True)
class _Start:
    """Where sampling starts, and the picture inputs the guided model needs."""

    x: Tensor                        # (B, 4, h, w) the sampler's x at sigmas[0]
    noise: Tensor                    # (B, 4, h, w) the unit noise in x
    pixels: Tensor | None            # (N, 3, H, W) the N init pictures in [-1, 1] (`plan.pictures`)
    image_latent: Tensor | None      # (B, 4, h, w) the init image's posterior samples (means), when encoded
    mask: Tensor | None              # (1, 1, H, W) 1 = repaint
    latent_mask: Tensor | None       # (1, 1, h, w) the latent cells repainted (`_latent_repaint`)
    from_noise: bool = False         # x is pure noise (no init latent in it)
    handed_over: bool = False        # a refiner's start at diffusers' inpainting handoff (`_inpaint_handoff`)


def _start(bundle: ModelBundle, plan: GenerationPlan, generators: list[Generator],
           init_latent: Tensor | None = None, refiner: ModelBundle | None = None) -> _Start:
    """The first x: the model's forward process (``plan.sampling.noise_scaling``) applied to pure noise, or
    to the init image's latent (or `init_latent`) at ``sigmas[0]``. Inpainting at strength 1 starts from pure
    noise as diffusers does, from the noised init latent under A1111's and ComfyUI's conventions (both always
    add the noise to the init latent). The init image's latent is drawn also when only a 4-channel `refiner` blends
    it in. 4-channel inpainting under diffusers' convention then makes the masked image's unread draw."""
    device, req, sigmas = bundle.device, plan.request, plan.sigmas
    pixels = mask = small_mask = None
    image_latent = None if init_latent is None else init_latent.to(device, torch.float32)  # (B, C, h, w)
    if plan.picture is not None:
        pixels = torch.cat([pil_to_tensor(p.image) for p in plan.pictures]).to(device)   # (N, 3, H, W); "latent":
                                                                                         # the pictures' own size
        if plan.mask is not None:        # repaint where the blurred mask is >= 1/2 (pipeline/overlay.py)
            mask = (plan.mask >= 0.5 if req.mask_round else plan.mask).to(torch.float32).to(device)
            small_mask = _latent_repaint(bundle, plan, mask)                                 # (1, 1, h, w)
            if not req.mask_round and (_soft(mask) or _soft(small_mask)):    # levels rounding would have changed
                took_effect("mask_round")
    from_noise = image_latent is None and (pixels is None or (
        mask is not None and req.strength == 1.0 and req.img2img_convention not in UI_IMG2IMG)
        or _edits_from_noise(bundle, req))
    blends = mask is not None and any(_blends_latent(model, req) for model in (bundle, refiner) if model)
    # diffusers' prepare_latents samples the posterior, then the noise; under A1111's convention nothing is
    # drawn for the posterior, so the noise is each seed's first draw (`sample`: x = self.rng.next())
    if pixels is not None and (not from_noise or blends):
        encoded = pixels if mask is None or req.inpaint_fill != "grey" else masked_image(pixels, mask.round())
        image_latent = _init_latent(bundle, plan, encoded, small_mask, generators)          # (B, 4, h, w)
    noise = _initial_noise(plan, generators, device, bundle.vae_config.downsample_factor)  # (B, 4, h, w)
    if pixels is not None:              # A1111's img2img `sample`: x = self.rng.next() * initial_noise_multiplier
        noise = noise * req.noise_multiplier                                                # (B, 4, h, w)
    if mask is not None and not bundle.family.is_inpaint and req.img2img_convention == "diffusers":
        _draw_unread_masked_image_sample(plan, generators)
    if from_noise:
        x = plan.sampling.noise_scaling(sigmas[0], noise, init_noise=req.init_noise)
    else:
        level = sigmas[0] if plan.noised_at is None else plan.noised_at
        x = plan.sampling.noise_scaling(level, noise, image_latent, init_noise=req.init_noise)
        if req.extra_noise:             # A1111's `sample_img2img` (img2img, hires): xi += noise * img2img_extra_noise
            took_effect("extra_noise")
            x = x + noise * req.extra_noise
        if plan.noised_at is not None:  # A1111's timestep samplers read that VP latent at sigmas[0], a timestep lower
            x = x * math.sqrt((1.0 + float(sigmas[0]) ** 2) / (1.0 + plan.noised_at ** 2))
    return _Start(x=x, noise=noise, pixels=pixels, image_latent=image_latent, mask=mask, latent_mask=small_mask,
                  from_noise=from_noise)


def _edits_from_noise(bundle: ModelBundle, req: GenerationRequest) -> bool:
    """Whether an edit model starts from pure noise over the whole schedule: under diffusers' img2img convention, as
    its InstructPix2Pix pipelines do (the picture enters as conditioning alone; `plan.resolve_for` sets strength 1).
    Under A1111's and ComfyUI's an edit model's img2img is any model's: the noised init latent at the strength's
    step (A1111's `StableDiffusionProcessingImg2Img`)."""
    return bundle.family.is_edit and req.img2img_convention == "diffusers"


def _soft(mask: Tensor) -> bool:
    """Whether `mask` has a level between 0 and 1."""
    return bool(((mask > 0) & (mask < 1)).any())


def _latent_repaint(bundle: ModelBundle, plan: GenerationPlan, mask: Tensor) -> Tensor:
    """The latent cells inpainting repaints (1, 1, h, w): under A1111's img2img convention A1111's (the blurred
    mask resized bicubic and rounded, `a1111_latent_mask`), under ComfyUI's its noise mask (`mask` resized
    bilinearly, soft at an edge off the latent grid, `comfyui_latent_mask`; a `mask_grow` first grows the rounded
    mask as VAEEncodeForInpaint does, `comfyui_grown_mask`), else diffusers' (the thresholded
    `mask` (1, 1, H, W) shrunk with nearest neighbour, `latent_mask`); with `mask_round` off A1111's and diffusers'
    keep the levels. A request's latent mask (A1111's `p.latent_mask`) stands for the blurred mask."""
    source = plan.picture.latent_mask
    height, width = plan.latent_shape[-2:]
    if plan.request.img2img_convention in A1111_IMG2IMG:
        source = plan.mask if source is None else source
        return a1111_latent_mask(source, (width, height), plan.request.mask_round).to(mask.device)
    if source is not None:
        mask = (source >= 0.5 if plan.request.mask_round else source).to(mask)
    if plan.request.img2img_convention == "comfyui":
        grown = comfyui_grown_mask(mask, plan.request.mask_grow) if plan.request.mask_grow else mask  # (1, 1, H, W)
        return comfyui_latent_mask(grown, (width, height))
    return latent_mask(mask, bundle.vae_config.downsample_factor)


def _init_latent(bundle: ModelBundle, plan: GenerationPlan, pixels: Tensor, repaint: Tensor | None,
                 generators: list[Generator]) -> Tensor:
    """The init pictures' latent (B, 4, h, w), picture i's of init picture i % N: `pixels` (N, 3, H, W) encoded
    (`encode_image`), interpolated to
    the latent size for the "latent" resize mode (A1111: bilinear, its "Latent" upscaler), then with the
    latent cells `repaint` (1, 1, h, w) as Masked content asks (`masked_latent`)."""
    req = plan.request
    latent = encode_image(bundle, pixels, _posterior_generators(req, generators), tiled=req.tiled_vae)
    latent = per_picture(latent, req.batch_size)                                           # (B, 4, h', w')
    if req.resize_mode == "latent":
        latent = upscale_latent(latent, *plan.latent_shape[-2:])                            # (B, 4, h, w)
    if repaint is None:
        return latent
    return masked_latent(latent, repaint.to(latent), req.inpaint_fill, _latent_noise_seeds(req), req.rng)


def _latent_noise_seeds(req: GenerationRequest) -> list[int]:
    """The seeds "latent noise" draws from: the request's own (`seeds`), or `latent_noise_seed`'s images where set
    (`next_batch`: batch 0's, under A1111's img2img convention)."""
    return req.seeds() if req.latent_noise_seed is None else replace(req, seed=req.latent_noise_seed).seeds()


def _draw_unread_masked_image_sample(plan: GenerationPlan, generators: list[Generator]) -> None:
    """The draw diffusers' inpainting pipelines make for a 4-channel U-Net, which never reads it: they
    VAE-encode the masked image for every U-Net and sample its posterior from each image's generator
    (`prepare_mask_latents`), one latent-sized normal draw per image between the initial noise and the
    step noise. Drawn and dropped, so that the step noise (ancestral, SDE, LCM, TCD) is diffusers'."""
    per_image_noise(generators, torch.empty(plan.latent_shape))()                           # (B, 4, h, w)


def _posterior_generators(req: GenerationRequest,
                          generators: list[Generator]) -> list[Generator] | None:
    """The generators that VAE posterior samples are drawn from: the seeds' own (diffusers), or none under
    A1111's and ComfyUI's img2img conventions, which sample their posteriors from their global random state,
    apart from the seeds' generators: sdlab takes the posterior mean there and draws nothing (`encode_image`)."""
    return None if req.img2img_convention in UI_IMG2IMG else generators


def _initial_noise(plan: GenerationPlan, generators: list[Generator], device: torch.device, factor: int) -> Tensor:
    """The unit noise of the first x, one draw per image's generator, with the request's variation seeds mixed in
    and its "Seed resize from" size (pixels, latent pixels of `factor`) placed at the centre (`first_noise`)."""
    req = plan.request
    resize_from = None if not req.seed_resize_from_w else (req.seed_resize_from_h // factor,
                                                          req.seed_resize_from_w // factor)
    return first_noise(generators, torch.empty(plan.latent_shape, device=device), req.seeds(), req.subseeds(),
                       req.subseed_strength, req.rng, resize_from)                          # (B, 4, h, w)


def _guided_model(
    bundle: ModelBundle,
    sampling: ModelSampling,
    req: GenerationRequest,
    start: _Start,
    overlay: Overlay | None,
    generators: list[Generator],
    sigmas: Tensor,
    steps_done: int = 0,
) -> DenoiseFn:
    """The bundle's U-Net (with the request's ControlNets, on their fraction of `sigmas`' steps) as a
    CFG-guided denoiser with the request's conditioning and picture inputs; its prompt schedule counts on
    after `steps_done` steps (a refiner's: the base's). `overlay`: inpainting's (`_overlay`); its region is the
    part "Only masked" draws, where the ControlNets' and IP-Adapters' pictures are cut.

    A U-Net with a guidance embedding (LCM-distilled, `time_cond_proj_dim`) runs once per step on the prompt
    alone and takes the CFG scale as its input instead: the embedding of w = cfg_scale - 1 (diffusers'
    LatentConsistencyModelPipeline: guidance_scale 8.5 embeds w = 7.5, no unconditional pass)."""
    device = bundle.device
    embedded = bundle.unet_config.time_cond_proj_dim
    parts = prompt_parts(bundle, req.prompt)                            # A1111's AND, :WEIGHT
    composed = len(parts) > 1 or parts[0][1] != 1.0
    calls = get_sampler(req.sampler).calls_per_step                     # A1111 counts every model call
    first_call = steps_done * calls
    steps, hires_steps = prompt_schedule_steps(req, calls)              # a hires pass counts on
    empty_context = empty_context_once(bundle.text_encoders)            # Pad conds' "", encoded once for the pass
    conditioning = partial(        # A1111 prompt editing: (end_at_call, cond, uncond) per run of equal prompts
        make_cond_schedule,
        bundle.text_encoders,
        bundle.family,
        steps=steps,
        hires_steps=hires_steps,
        adm_width=bundle.unet_config.adm_in_channels,
        batch_size=req.batch_size,
        clip_skip=encoder_clip_skips(bundle, req),
        negative_clip_skip=_negative_clip_skip(bundle, req),
        emphasis=req.emphasis,
        old_prompt_editing=req.old_prompt_editing,
        width=req.width,
        height=req.height,
        original_size=req.original_size,
        crops_coords_top_left=req.crops_coords_top_left,
        target_size=req.target_size,
        aesthetic_score=req.aesthetic_score,
        negative_aesthetic_score=req.negative_aesthetic_score,
        **_negative_sizes(bundle, req, img2img=_starts_from_a_picture(start) or steps_done > 0),
        zero_empty_negative=_zero_empty_negative(bundle, req),
        pad_rule=pad_rule(req),
        empty_context=empty_context,
        **_second_prompts(bundle, req),
    )
    extra_cond: dict[str, Tensor] = {}
    if embedded is not None:
        w = torch.full((req.batch_size,), req.cfg_scale - 1.0, device=device)                   # (B,)
        extra_cond["guidance_emb"] = guidance_scale_embedding(w, embedded)                      # (B, dim)
    controls = prepare_controls(bundle, req.controls, req.width, req.height, req.control_convention,
                                hires_pass=req.first_pass_steps is not None,
                                region=None if overlay is None else overlay.region,
                                picture_size=None if overlay is None else overlay.original.size,
                                mask=inpaint_mask(req.mask_image, req.invert_mask, req.mask_blur,
                                                  req.mask_blur_y),
                                t_to_sigma=pass_timestep_sigma(sampling, req))
    image_prompts = prepare_image_prompts(bundle, req.ip_adapters, req.batch_size,    # IP-Adapters' tokens
                                          req.control_convention,
                                          region=None if overlay is None else overlay.region,
                                          picture_size=None if overlay is None else overlay.original.size,
                                          size=(req.width, req.height))
    net = image_prompted(controlled_unet(bundle.unet, controls, circular=req.tiling, freeu=req.freeu,
                                         deep_cache=check_deep_cache_branch(bundle, req),
                                         sigmas_chosen=get_sampler(req.sampler).chooses_sigmas),
                         bundle.unet, image_prompts)
    denoiser = Denoiser(net, sampling, quantize=req.quantize_timesteps)
    if spans_part(controls) or (req.freeu is not None and req.freeu.windowed) or req.deep_cache is not None \
            or (image_prompts is not None and image_prompts.windowed):
        denoiser = tag_steps(denoiser, sigmas, with_sigma=sigma_windowed(controls))   # else all act at every step
    marks, extra_uncond = prompt_marks(controls, req.batch_size, device)   # which rows are the prompt's
    extra_cond.update(marks)
    image_tokens, uncond_image_tokens = image_prompt_conds(image_prompts)  # CFG batches them as the prompts
    extra_cond.update(image_tokens)
    extra_uncond.update(uncond_image_tokens)
    if bundle.family.is_inpaint:
        extra_cond["concat"] = extra_uncond["concat"] = _inpaint_extra(bundle, req, start, generators)
    edit = _edit_guidance(bundle, req)
    if composed and edit == "image":
        raise RequestError("an edit (InstructPix2Pix) model guides one prompt with its picture; a prompt with AND "
                           "or a :WEIGHT (composable diffusion) is drawn on one only without image guidance "
                           "(image CFG scale unset or 1), as A1111")
    if composed and edit is not None:   # A1111's is_edit_model off: the picture in every pass, plain guidance
        extra_cond["concat"] = extra_uncond["concat"] = _edit_image(bundle, req, start)
        if req.image_cfg_scale is not None:
            took_effect("image_cfg_scale")
    if req.area_prompts:
        _refuse_with_areas(composed, edit, controls, image_prompts, req)
        factor = bundle.vae_config.downsample_factor
        model = _area_model(denoiser, conditioning, req, extra_cond, extra_uncond, factor,
                            bundle.runs_uncond(req.cfg_scale, get_sampler(req.sampler).cfg_pp))
    elif not composed:
        guided = bundle.runs_uncond(req.cfg_scale, get_sampler(req.sampler).cfg_pp) or edit == "image"
        guide = partial(cfg, denoiser, scale=guidance_scale(req), rescale=req.guidance_rescale,
                        perturbed=_perturbed_guidance(bundle, sampling, req, extra_cond, extra_uncond))
        if edit is not None:                # the picture's latent as the U-Net's extra channels, an image scale
            guide = partial(edit_cfg, denoiser, image=_edit_image(bundle, req, start), scale=guidance_scale(req),
                            image_scale=req.image_cfg_scale, rescale=req.guidance_rescale,
                            convention=req.img2img_convention)
        model = switch_at_calls([
            (end, guide({**cond, **extra_cond}, None if uncond is None else {**uncond, **extra_uncond}))
            for end, cond, uncond in conditioning(parts[0][0], req.negative_prompt, guidance=guided)
        ], first_call)
    else:
        model = _composed_model(denoiser, conditioning, parts, req, extra_cond, extra_uncond, first_call,
                                empty_context)
    if start.mask is not None and _blends_latent(bundle, req):
        model = _with_latent_blend(model, bundle, sampling, req, start, steps_done)
    return model


def _edit_guidance(bundle: ModelBundle, req: GenerationRequest) -> str | None:
    """How an edit model's guidance runs under the request's img2img convention (`guidance.edit_guidance`:
    "plain", "image" or "conditional"); None for any other model."""
    if not bundle.family.is_edit:
        return None
    return edit_guidance(guidance_scale(req), req.image_cfg_scale, req.img2img_convention)


def _perturbed_guidance(bundle: ModelBundle, sampling: ModelSampling, req: GenerationRequest,
                        extra_cond: dict[str, Any], extra_uncond: dict[str, Any]) -> PerturbedGuidance | None:
    """The request's perturbed-attention guidance (None: off), its layers' sdlab names put into both condition dicts
    (the U-Net's `identity_layers`); a layer entry that selects no self-attention of the model is a RequestError."""
    if not req.pag_scale:
        return None
    if bundle.family.is_edit:
        logger.warning("perturbed-attention guidance is not applied to an edit (InstructPix2Pix) model")
        return None
    try:
        extra_cond["identity_layers"] = extra_uncond["identity_layers"] = pag_layer_names(bundle.unet_config,
                                                                                          req.pag_layers)
    except PagLayerError as exc:
        raise RequestError(str(exc)) from None
    return PerturbedGuidance(req.pag_scale, req.pag_adaptive_scale,
                             partial(sampling.sigma_to_t, quantize=req.quantize_timesteps))


def _starts_from_a_picture(start: _Start) -> bool:
    """img2img or inpainting: an init image, or a latent to start from (diffusers' img2img / inpaint pipelines)."""
    return start.pixels is not None or start.image_latent is not None


def _zero_empty_negative(bundle: ModelBundle, req: GenerationRequest) -> bool | None:
    """Whether an empty negative prompt is a zero conditioning: the request's rule (False under a ComfyUI
    spelling), else the model's (None: its family's)."""
    return bundle.zero_empty_negative if req.zero_empty_negative is None else req.zero_empty_negative


def _second_prompts(bundle: ModelBundle, req: GenerationRequest) -> dict[str, str]:
    """The second text encoder's prompts (`make_cond_schedule`'s prompt_2 / negative_prompt_2) for a model with two;
    none for one with one (an SDXL refiner reads the prompt, as diffusers' refiner pipeline, whose one encoder
    `encode_prompt` hands `prompt`)."""
    if len(bundle.text_encoders) < 2:
        return {}
    return {"prompt_2": req.prompt_2, "negative_prompt_2": req.negative_prompt_2}


def _negative_clip_skip(bundle: ModelBundle, req: GenerationRequest) -> ClipSkip:
    """The negative prompt's clip skip: the prompt's under A1111's convention (A1111 encodes both at one
    layer); the usual layer under diffusers', whose `encode_prompt` applies `clip_skip` to the prompt only."""
    return encoder_clip_skips(bundle, req) if req.clip_skip_convention in ("a1111", "comfyui") else 1


def _negative_sizes(bundle: ModelBundle, req: GenerationRequest, img2img: bool) -> dict[str, Any]:
    """The negative prompt's SDXL size numbers (`make_cond`'s negative_* options; left out: the positive's)
    from the request's negative_* fields, as diffusers' SDXL pipelines pick them:

    - a model with an aesthetic score (the refiner, `requires_aesthetics_score`): the negative original
      size and crop corner (StableDiffusionXLImg2Img / InpaintPipeline `_get_add_time_ids`);
    - img2img, inpainting and the second half of a handoff (`img2img`): the negative original and target
      size with the positive's crop corner (the same `_get_add_time_ids` without an aesthetic score);
    - txt2img (StableDiffusionXLPipeline): all three when both negative sizes are given, else the
      positive's numbers.
    """
    if bundle.family.is_refiner:
        return dict(negative_original_size=req.negative_original_size,
                    negative_crops_coords_top_left=req.negative_crops_coords_top_left)
    if img2img:
        return dict(negative_original_size=req.negative_original_size, negative_target_size=req.negative_target_size)
    if req.negative_original_size is None or req.negative_target_size is None:
        return {}
    return dict(negative_original_size=req.negative_original_size, negative_target_size=req.negative_target_size,
                negative_crops_coords_top_left=req.negative_crops_coords_top_left)


def _edit_image(bundle: ModelBundle, req: GenerationRequest, start: _Start) -> Tensor:
    """An edit model's picture conditioning (B, 4, h, w): each init picture's VAE posterior mode (its mean), in the
    VAE's own latent space, unscaled (diffusers' `prepare_image_latents`: ``latent_dist.mode()``; A1111's
    `edit_image_conditioning`: ``encode_first_stage(...).mode()``), picture i's of init picture i % N, at the
    latent size (the "latent" resize mode's pictures keep their own size: interpolated as the init latent is)."""
    if start.pixels is None:
        raise RequestError("an edit (InstructPix2Pix) model draws from a picture; give it an init image (img2img)")
    latent = encode_image(bundle, start.pixels, None, tiled=req.tiled_vae, model_space=False)   # (N, 4, h', w')
    latent = per_picture(latent, req.batch_size)                                           # (B, 4, h', w')
    height, width = start.x.shape[-2:]
    if latent.shape[-2:] != (height, width):
        latent = upscale_latent(latent, height, width)                                     # (B, 4, h, w)
    return latent


def _inpaint_extra(bundle: ModelBundle, req: GenerationRequest, start: _Start,
                   generators: list[Generator]) -> Tensor:
    """The extra input channels of a 9-channel inpainting model (`inpaint_channels`), (B, 5, h, w). txt2img and
    img2img repaint everything, as A1111's `txt2img_image_conditioning` / `inpainting_image_conditioning` without a
    mask: txt2img's masked picture is mid-grey, img2img's too but for a Conditional mask weight below 1, which keeps
    (1 - weight) of the init picture (a hires pass: of its upscaled pictures, `sample_latents`' `init_pixels`).
    Inpainting under ComfyUI's img2img convention is ComfyUI's (comfy/model_base.py ``BaseModel.concat_cond`` with no
    concat_latent_image): the latent noise mask rounded, then the init latent the run starts from, as it is (a
    VAEEncode's: the whole picture; "grey", VAEEncodeForInpaint's: its masked picture)."""
    pixels, mask, weight = start.pixels, start.mask, req.inpainting_mask_weight
    if mask is not None and req.img2img_convention == "comfyui":
        latent = start.image_latent                                                       # (B, 4, h, w)
        small_mask = start.latent_mask.round().to(latent).expand(latent.shape[0], -1, -1, -1)   # (B, 1, h, w)
        return torch.cat([small_mask, latent], dim=1)                                     # (B, 5, h, w)
    took_effect("inpainting_mask_weight")                  # A1111 records its setting wherever it conditions so
    if mask is None:
        mask = torch.ones((1, 1, req.height, req.width), device=bundle.device)
        if pixels is None or weight == 1.0:
            pixels = torch.zeros((1, 3, req.height, req.width), device=bundle.device)
        elif pixels.shape[-2:] != mask.shape[-2:]:
            raise RequestError("a Conditional mask weight below 1 conditions an inpainting model on the init picture "
                               "at the picture's size; resize mode 'latent' keeps another size")
    extra = inpaint_channels(bundle, pixels, mask, _posterior_generators(req, generators), tiled=req.tiled_vae,
                             weight=weight)
    return per_picture(extra, req.batch_size)                                             # (B, 5, h, w)


def _composed_model(denoiser: DenoiseFn, conditioning: Callable[..., Any], parts: list[tuple[str, float]],
                    req: GenerationRequest, extra_cond: dict[str, Tensor], extra_uncond: dict[str, Tensor],
                    first_call: int, empty_context: Callable[[], Tensor]) -> DenoiseFn:
    """A1111's composable diffusion (a prompt with AND or a :WEIGHT): each part and the negative prompt run
    their own pass, on their own prompt schedules (`conditioning`: `make_cond_schedule` with the run's options),
    padded to each other by A1111's Pad conds rule where the request sets one (`composed_schedule`, with the context
    of "" `empty_context` gives)."""
    if req.guidance_rescale:
        logger.warning("guidance rescale is not applied to a prompt with AND or a :WEIGHT (composable diffusion)")
    if req.pag_scale:
        logger.warning("perturbed-attention guidance is not applied to a prompt with AND or a :WEIGHT (composable "
                       "diffusion)")
    weights = [weight for _, weight in parts]
    schedule = composed_schedule([conditioning(text, guidance=False) for text, _ in parts],
                                 conditioning("", req.negative_prompt), pad_rule(req), empty_context)
    return switch_at_calls([
        (end, composable_cfg([(partial(denoiser, **cond, **extra_cond), weight)
                              for cond, weight in zip(conds, weights)],
                             partial(denoiser, **uncond, **extra_uncond), guidance_scale(req)))
        for end, conds, uncond in schedule
    ], first_call)


def _refuse_with_areas(composed: bool, edit: str | None, controls: Any, image_prompts: Any,
                       req: GenerationRequest) -> None:
    """A `RequestError` naming what area prompts are not drawn with."""
    refused = [what for what, found in (("a prompt with AND or a :WEIGHT", composed),
                                        ("an edit (InstructPix2Pix) model", edit is not None),
                                        ("ControlNets", bool(controls)), ("IP-Adapters", image_prompts is not None),
                                        ("perturbed-attention guidance", bool(req.pag_scale)),
                                        ("guidance rescale", bool(req.guidance_rescale)),
                                        ("tiling (an area's crop would wrap on itself)", req.tiling)) if found]
    if refused:
        raise RequestError(f"area prompts are not drawn with {', '.join(refused)}")


def _area_model(denoiser: DenoiseFn, conditioning: Callable[..., Any], req: GenerationRequest,
                extra_cond: dict[str, Tensor], extra_uncond: dict[str, Tensor], factor: int,
                guided: bool) -> DenoiseFn:
    """ComfyUI's area composition (`diffusion.area_conds`): each area prompt's conditioning run on its area of the
    latent (a VAE of downsampling `factor`), the negative prompt on the whole and on each of their areas, both sides
    averaged by weight, then guided as ComfyUI's ``uncond + (cond - uncond) * cfg``."""
    latent_size = (req.height // factor, req.width // factor)
    positive: list[AreaPart] = []
    uncond = None
    for area_prompt in req.area_prompts:
        schedule = conditioning(area_prompt.prompt, req.negative_prompt, guidance=guided)
        if len(schedule) > 1:
            raise RequestError("area prompts are drawn without prompt editing ([from:to:when])")
        _, cond, uncond = schedule[0]
        positive.append(area_prompt.part({**cond, **extra_cond}, latent_size, factor))
    negative = [] if uncond is None else [AreaPart({**uncond, **extra_uncond})]
    positive, negative = opposite_areas(positive, negative)

    if uncond is None:
        return area_average(positive, denoiser)
    return composable_cfg([(area_average(positive, denoiser), 1.0)], area_average(negative, denoiser),
                          guidance_scale(req))


def guidance_scale(req: GenerationRequest) -> float:
    """The scale guidance runs at: the request's CFG scale times its sampler's `cfg_scale_factor` (A1111's DDIM CFG++
    guides at CFG / 12.5; the pictures record the CFG scale as asked, as A1111's)."""
    return req.cfg_scale * get_sampler(req.sampler).cfg_scale_factor


def pad_rule(req: GenerationRequest) -> str | None:
    """The request's A1111 Pad conds rule (`conditioning.pad_cond_uncond`): v0's wins, as in A1111."""
    return "v0" if req.pad_cond_uncond_v0 else "pad" if req.pad_cond_uncond else None


def _skipping_uncond(plan: GenerationPlan, model: DenoiseFn, first_call: int) -> DenoiseFn:
    """`model` without its unconditional pass at the calls A1111's NGMS and Skip Early CFG skip (`a1111_skips`), over
    the plan's whole run (A1111's `total_steps`: its steps, two calls each for its second-order samplers); A1111's
    timestep samplers compare their timestep with NGMS, to a thousandth (their integer timesteps exactly)."""
    req = plan.request
    if not (req.s_min_uncond or req.skip_early_cond):
        return model
    timesteps = plan.sampler.a1111 in A1111_TIMESTEP_SAMPLERS
    level = (lambda sigma: round(float(plan.sampling.sigma_to_t(sigma)[0]), 3)) if timesteps else None
    return skipping_uncond(model, a1111_skips(plan.a1111_total_steps, req.skip_early_cond, req.s_min_uncond,
                                              req.s_min_uncond_all, level), first_call)


def _with_latent_blend(model: DenoiseFn, bundle: ModelBundle, sampling: ModelSampling, req: GenerationRequest,
                       start: _Start, steps_done: int) -> DenoiseFn:
    """`model` with the init image's latent blended into the kept region (`guidance.masked`); A1111's timestep
    samplers under its convention blend the clean latent into the model's input alone (`guidance.masked_input`)."""
    small_mask = start.latent_mask.to(bundle.device)                                          # (1, 1, h, w)
    if req.img2img_convention in A1111_IMG2IMG and runs_a1111_timesteps(get_sampler(req.sampler), req.schedule):
        return masked_input(model, start.image_latent, small_mask)
    return masked(model, start.image_latent, small_mask, start.noise, sampling.noise_scaling,
                  blend_from_call=_blend_from_call(req, start, steps_done))


def _blend_from_call(req: GenerationRequest, start: _Start, steps_done: int) -> int | None:
    """The first model call whose input 4-channel inpainting blends (`guidance.masked`): A1111 blends the
    output only (None); diffusers first blends after the first step (its pure noise unblended, and the latent
    its refiner is handed: 1); else 0."""
    if req.img2img_convention in A1111_IMG2IMG:
        return None
    first_unblended = start.handed_over or (start.from_noise and steps_done == 0)
    return 1 if first_unblended and req.img2img_convention == "diffusers" else 0


def _run_sampler(
    plan: GenerationPlan,
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    options: dict[str, Any],
    progress: ProgressFn | None,
    first_call: int = 0,
) -> Tensor:
    """`sigmas` of the plan's sampler on `model`, whose calls count from `first_call` (a refiner's: after the base's).
    A `SamplingStopped` from `progress` leaves with the x0 estimate of the step it stopped at as its `latents`."""
    watch = FiniteWatch(lambda what: _non_finite(what, plan.request))
    model = _skipping_uncond(plan, model, first_call)
    latest: list[Tensor] = []

    def watched(info: StepInfo) -> None:
        latest[:] = [info.denoised]
        progress(info)

    try:
        with reusing_generation_work():   # the prompt's k and v, ControlNet hint features: made at the first step
            x = plan.sampler.fn(_finite_only(model, watch), x, sigmas, **options,
                                callback=None if progress is None else watched)
    except SamplingStopped as stop:
        stop.latents = latest[0]
        raise
    watch.settle()
    return x


def _finite_only(model: DenoiseFn, watch: FiniteWatch) -> DenoiseFn:
    """`model` whose input and output are checked for NaN / Inf: at once on the CPU, on CUDA one call later
    (`pipeline.finite`: reading a GPU tensor's verdict at once would stall the queue at every step)."""
    def denoise(x: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor:
        def where() -> str:
            return f"at sigma {float(sigma.flatten()[0]):.4g}"
        watch.check(x, lambda: f"the sample {where()}")
        denoised = model(x, sigma, **kwargs)                                               # (B, C, h, w)
        watch.check(denoised, lambda: f"the denoised sample {where()}")
        watch.settle(keep=2)                                                               # the previous call's
        return denoised
    return denoise


def _brownian_span(plan: GenerationPlan) -> Tensor:
    """The sigmas the SDE samplers' Brownian tree spans: for img2img (and a hires pass) A1111 and diffusers
    span the whole schedule the tail was cut from (A1111 `sample_img2img` makes its noise sampler from all of
    `get_sigmas`, stretched with img2img_fix_steps; DPMSolverSDEScheduler from all of `set_timesteps`), ComfyUI
    the sigmas it runs."""
    req = plan.request
    if not (plan.from_latent or req.init_image is not None) or req.img2img_convention == "comfyui":
        return plan.sigmas
    total, _ = steps_run(req.steps, req.strength, req.img2img_convention)
    return request_sigmas(plan.sampling, plan.sampler, replace(req, steps=total), plan.sigmas.device, img2img=False,
                          steps_offset=plan.steps_offset)


def _sampler_options(plan: GenerationPlan, x: Tensor, generators: list[Generator]) -> dict[str, Any]:
    """Keyword arguments of the plan's sampler: its noise source and the options it accepts."""
    sampler, req = plan.sampler, plan.request
    options: dict[str, Any] = {}
    if sampler.noise == "brownian":
        options["noise"] = BrownianTreeNoise.for_sigmas(x, _brownian_span(plan), req.seeds(), req.batch_noise)
    elif sampler.noise == "gaussian" or req.s_churn:   # after the initial noise: the same generators (A1111's
        # `ImageRNG.next`, churn's too), or reseeded by ENSD
        options["noise"] = per_image_noise(generators_for(req.step_noise_seeds(), req.rng, x.device, req.batch_noise)
                                           if req.eta_noise_seed_delta else generators, x)
    if req.eta is not None:
        options["eta"] = req.eta
    if req.s_noise != 1.0:
        options["s_noise"] = req.s_noise
    if req.s_churn:                      # Euler, Heun, DPM2's churn; its range matters only with it
        tmax = req.s_tmax or float("inf")   # None or 0 (A1111's): no upper end
        options.update(s_churn=req.s_churn, s_tmin=req.s_tmin, s_tmax=tmax)
    if plan.solver_span is not None:
        options["sigma_max"], options["sigma_min"] = plan.solver_span
    if plan.solver_calls is not None and "n" in sampler.parameters:
        options["n"] = plan.solver_calls
    if sampler.wants_sigma_to_t:
        options["sigma_to_t"] = plan.sampling.sigma_to_t
    if sampler.wants_t_to_sigma:        # TCD's integer timesteps are diffusers'; ComfyUI's own samplers (SA-Solver)
        options["t_to_sigma"] = (plan.sampling.t_to_sigma if sampler.a1111     # read ComfyUI's percent_to_sigma
                                 else pass_timestep_sigma(plan.sampling, req))
    accepted = sampler.parameters
    ignored = sorted(name for name in options if name not in accepted and name != "noise")
    if ignored:
        logger.warning("sampler %s takes no %s; ignored", sampler.name, ", ".join(ignored))
    return {name: value for name, value in options.items() if name in accepted}


# ----------------------------------------------------------------------------------------------------------
# VAE


def in_safe_vae_precision(bundle: ModelBundle, run: Callable[[], Tensor]) -> Tensor:
    """`run()`, a pass through the bundle's VAE that casts its input to `bundle.vae.dtype`; repeated in float32
    when a float16 VAE's result holds inf / NaN. The SDXL VAE's activations overflow float16 (max 65504) on
    its released weights (diffusers upcasts it, `force_upcast`); the VAE then stays float32 for good, as
    A1111's automatic VAE precision does (one warning). bfloat16 has float32's range and is left alone."""
    out = run()
    if bundle.vae.dtype == torch.float16 and not torch.isfinite(out).all():
        logger.warning("the VAE overflowed float16 (inf / NaN); it runs in float32 from now on")
        bundle.vae.to(torch.float32)
        out = run()
    return out


def encode_image(bundle: ModelBundle, pixels: Tensor, generators: list[Generator] | None = None, *,
                 tiled: bool | None = None, model_space: bool = True) -> Tensor:
    """Pictures in [-1, 1] -> model-space latents: with `generators`, one posterior sample of init picture
    i % N of (N, 3, H, W) per generator i, drawn from it (diffusers' `retrieve_latents(..., generator[i])`),
    (B, 4, h, w); without, the posterior mean of each picture (N, 3, H, W) -> (N, 4, h, w), no draw.

    Pictures are encoded in tiles when `tiled` says so (None: large ones, `should_tile`): the encoder's moments
    (mean and log-variance) are blended across the tiles into one posterior, as diffusers' tiled encode does
    (`AutoencoderKL._tiled_encode`), which is then sampled, or its mean taken, as an untiled one. A picture
    whose sides are not multiples of the VAE factor (the "latent" resize mode encodes any size, h = H // f) is
    encoded whole: tiles must start on latent pixels. `model_space` False: the VAE's own latents, unscaled (an
    edit model's picture conditioning)."""
    vae = bundle.vae
    height, width = pixels.shape[-2:]
    tile = tiled if tiled is not None else should_tile(height, width)
    factor = bundle.vae_config.downsample_factor
    if tile and (height % factor or width % factor):
        logger.info("a %dx%d picture is encoded whole: VAE tiles need sides that are multiples of %d",
                    width, height, factor)
        tile = False
    states = [g.get_state() for g in generators or ()]   # a float32 retry draws what the first try drew

    def encode() -> Tensor:
        moments = torch.cat([encode_tiled(vae.moments, x, factor=factor) if tile else vae.moments(x)  # one picture
                             for x in pixels.to(vae.dtype).split(1)])                        # at a time: (N, 2 * 4, h, w)
        if generators is None:
            return DiagonalGaussian(moments).mean
        for generator, state in zip(generators, states):
            generator.set_state(state)
        rows = per_picture(moments, len(generators))                                     # (B, 2 * 4, h, w)
        return torch.cat([_posterior_sample(DiagonalGaussian(row[None]), g) for row, g in zip(rows, generators)])

    latents = in_safe_vae_precision(bundle, encode).to(torch.float32)
    return bundle.to_model_latents(latents) if model_space else latents


def _posterior_sample(posterior: DiagonalGaussian, generator: Generator) -> Tensor:
    """One sample of `posterior` (1, 4, h, w), its noise the generator's next draw: diffusers' own draw in the
    posterior's dtype from a torch generator, a float32 draw cast from a Philox one (`noise.draw`)."""
    if isinstance(generator, torch.Generator):
        return posterior.sample(generator)
    return posterior.mean + posterior.std * draw(generator, tuple(posterior.mean.shape)).to(posterior.mean)


def per_picture(rows: Tensor, batch_size: int) -> Tensor:
    """(N, ...) rows, one per init picture, as (batch_size, ...): picture i's is row i % N."""
    return rows[torch.arange(batch_size, device=rows.device) % rows.shape[0]]


def inpaint_channels(bundle: ModelBundle, pixels: Tensor, mask: Tensor,
                     generators: list[Generator] | None, *, tiled: bool | None = None, weight: float = 1.0) -> Tensor:
    """The 5 extra input channels of 9-channel inpainting U-Nets: latent mask, then masked-image latent
    (`encode_image`: one posterior sample per generator, or the mean without; in tiles as `tiled` decides). The
    masked picture is ``lerp(pixels, masked, weight)``, A1111's Conditional mask weight (`inpainting_mask_weight`,
    its `inpainting_image_conditioning`): 1 masks fully, 0 not at all."""
    factor = bundle.vae_config.downsample_factor
    masked = masked_image(pixels, mask)                                                       # (N, 3, H, W)
    if weight != 1.0:
        masked = torch.lerp(pixels, masked, weight)
    masked_latent = encode_image(bundle, masked, generators, tiled=tiled)                     # (B, 4, h, w)
    small_mask = latent_mask(mask, factor).expand(masked_latent.shape[0], -1, -1, -1)    # (B, 1, h, w)
    return torch.cat([small_mask.to(masked_latent), masked_latent], dim=1)


def decode_latents(bundle: ModelBundle, latents: Tensor, *, tiled: bool | None = None) -> Tensor:
    """Model-space latents (B, 4, h, w) -> images (B, 3, H, W) in [-1, 1], decoded one picture at a time; a
    decode holding NaN or Inf raises `NonFiniteError` (every picture made, a hires pass's intermediate ones too)."""
    vae = bundle.vae
    factor = bundle.vae_config.downsample_factor
    z = bundle.to_vae_latents(latents)
    height, width = z.shape[-2] * factor, z.shape[-1] * factor
    tile = tiled if tiled is not None else should_tile(height, width)

    def decode() -> Tensor:     # one picture at a time (A1111's decode_latent_batch): memory does not grow with B
        return torch.cat([decode_tiled(vae.decode, row, factor=factor) if tile else vae.decode(row)
                          for row in z.to(vae.dtype).split(1)])

    images = in_safe_vae_precision(bundle, decode)                                        # (B, 3, H, W)
    if not torch.isfinite(images).all():
        raise NonFiniteError(
            "the VAE decoded NaN or Inf values (its weights or the latent scaling factor are broken); "
            "no picture was made"
        )
    return images
