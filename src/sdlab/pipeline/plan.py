"""Resolve once: a request becomes a `GenerationPlan`, everything a run needs that does not run a network.

    plan = make_plan(bundle, request)        # or Pipeline.resolve(request)
    plan.request      the resolved request (family defaults filled in, every value checked)
    plan.sampler      the sampler table's row
    plan.sampling     the model's noise parameterisation (`ModelSampling`)
    plan.sigmas       the noise levels the run visits, on the model's device (the img2img tail for an init image)
    plan.latent_shape (B, C, h, w) of the sampled latent
    plan.pictures     img2img / inpainting: each init picture at the size drawn, its mask and what the result
                      is pasted onto (`pipeline/init_picture.py`: A1111's resize modes, Masked content "fill",
                      Inpaint area); plan.picture the first, or None
    plan.mask         the blurred inpainting mask (1, 1, H, W) in [0, 1], or None
    plan.refiner_split / refiner_sampling   with an SDXL refiner: steps the base runs, the refiner's sampling

Making a plan checks the request against the model(s) (clip skip within each text encoder's layers, memory
for the base and the refiner against one reading of the free memory, a refiner whose latent space fits the
base's), warns once (far from the native size, too few steps for the sampler) and builds the schedule once.
The generate loop (`pipeline/generate.py`) only reads the plan.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from sdlab.diffusion.discretization import (
    A1111_IMG2IMG, DIFFUSERS_NAMES, a1111_timestep_sigmas, a1111_timesteps, comfyui_options, discretize,
    img2img_sigmas, schedule_overrides, steps_run,
)
from sdlab.diffusion.model_sampling import DiscreteModelSampling, ModelSampling
from sdlab.diffusion.schedules import a1111_schedule_override
from sdlab.diffusion.samplers import (
    SamplerSpec, a1111_run, also_discards, get_sampler, runs_a1111_timesteps, steps_warning,
)
from sdlab.families import FamilySpec, TextEncoderSpec
from sdlab.families.loaded import ModelBundle
from sdlab.models.deep_cache import DeepCache
from sdlab.models.unet import UNet
from sdlab.pipeline.conditioning import ClipSkip, encoder_skip, hidden_state_layers, prompt_chunks
from sdlab.pipeline.control import controls_on_init
from sdlab.pipeline.image_prompt import prompts_on_init
from sdlab.pipeline.memory import available_bytes, check_memory
from sdlab.pipeline.init_picture import InitPicture, init_pictures
from sdlab.pipeline.perturbed_attention import PagLayerError, pag_layer_names
from sdlab.pipeline.prompt_loras import without_extra_networks
from sdlab.pipeline.prompt_schedule import composable_parts, prompt_schedule
from sdlab.pipeline.prompt_syntax import PromptError, is_break, strip_comments, weighted_runs
from sdlab.pipeline.request import (
    HIRES_IMG2IMG,
    SIZE_MULTIPLE,
    GenerationRequest,
    RequestError,
    check_refiner_switch,
    hires_base_size,
    hires_sizes,
    resolve,
)

logger = logging.getLogger(__name__)

__all__ = [
    "FAR_FROM_NATIVE",
    "GenerationPlan",
    "REFINER_CONVENTIONS",
    "check_pag_layers",
    "check_refiner_convention",
    "comfyui_arithmetic",
    "comfyui_timestep_sigma",
    "encoder_clip_skips",
    "handoff_index",
    "make_plan",
    "pass_timestep_sigma",
    "prompt_parts",
    "prompt_schedule_steps",
    "refiner_split",
    "request_sigmas",
    "resolve_for",
    "run_sampler",
    "warn_if_far_from_native",
]

FAR_FROM_NATIVE = 2.0       # warn when a side is more than this factor above or below the model's size
REFINER_CONVENTIONS = ("diffusers", "a1111", "a1111_steps")   # how a refiner switch fraction picks the handoff step


@dataclass(frozen=True, eq=False)
class GenerationPlan:
    """A resolved request and what follows from it for one model (module docstring)."""

    request: GenerationRequest
    sampler: SamplerSpec
    sampling: ModelSampling
    sigmas: Tensor                                  # (steps run + 1,) on the model's device
    latent_shape: tuple[int, int, int, int]         # (B, C, h, w)
    pictures: tuple[InitPicture, ...] = ()          # img2img / inpainting: what is encoded and pasted onto,
                                                    # one per init picture (picture i of the batch: i % len)
    refiner_split: int | None = None                # with a refiner: how many steps the base takes
    refiner_sampling: ModelSampling | None = None
    refiner_switch_at: float | None = None          # the fraction the split came from
    refiner_convention: str = "diffusers"           # "a1111": one sampler run, the model swapped at a call
    from_latent: bool = False                       # starts from a given latent (hires fix), not an init image
    noised_at: float | None = None                  # A1111's timestep samplers' img2img: the sigma the init latent
                                                    # is noised to, a timestep above sigmas[0] (`_a1111_noised_at`)
    steps_offset: int = 1                           # the model's, for diffusers-spaced schedules

    @property
    def picture(self) -> InitPicture | None:
        """The first init picture's inputs (the only one's but for several `init_images`); None for txt2img."""
        return self.pictures[0] if self.pictures else None

    @property
    def mask(self) -> Tensor | None:
        """(1, 1, H, W) the blurred inpainting mask at the size drawn, in [0, 1], 1 = repaint; None without one."""
        return None if self.picture is None else self.picture.mask

    @property
    def solver_span(self) -> tuple[float, float] | None:
        """(sigma_max, sigma_min) a txt2img sampler whose row has `model_range` (A1111's DPM fast / adaptive) solves
        between: the model's largest and smallest training sigma (float32, `a1111_training_sigmas`), as A1111's
        `KDiffusionSampler.sample` passes them whatever the schedule, its ends or Discard penultimate sigma; only x's
        scale is ``sigmas[0]``. img2img and a hires pass solve between the ends of `sigmas` (None), but for A1111's
        on a list that ends above 0 (KL Optimal): its `sample_img2img` passes sigma_min = ``sigma_sched[-2]``, the
        next-to-last sigma, then (sigmas[0], sigmas[-2]). None for any other sampler."""
        if not self.sampler.model_range:
            return None
        if self.from_latent or self.request.init_image is not None:
            ends_above_0 = len(self.sigmas) > 2 and float(self.sigmas[-1]) > 0
            if self.request.img2img_convention in A1111_IMG2IMG and ends_above_0:
                return float(self.sigmas[0]), float(self.sigmas[-2])
            return None
        training = a1111_training_sigmas(self.sampling)                              # (T,) ascending
        return float(training[-1]), float(training[0])

    @property
    def solver_calls(self) -> int | None:
        """The model calls of a txt2img `solver_span` sampler whose function takes k-diffusion's ``n`` (DPM fast):
        the request's steps, as A1111's `KDiffusionSampler.sample` passes ``n = steps`` whatever the list's length
        (its DDIM schedule is longer than steps + 1 where 1000 % steps != 0); None elsewhere (``len(sigmas) - 1``,
        as its `sample_img2img` passes)."""
        if self.solver_span is None or self.from_latent or self.request.init_image is not None:
            return None
        return self.request.steps

    @property
    def steps_run(self) -> int:
        """Sampler steps this run takes (fewer than `request.steps` for img2img; `solver_calls` where set)."""
        return len(self.sigmas) - 1 if self.solver_calls is None else self.solver_calls

    @property
    def a1111_total_steps(self) -> int:
        """A1111's `total_steps` over this run (`a1111_total_steps`)."""
        img2img = self.from_latent or self.request.init_image is not None
        return a1111_total_steps(self.sampler, self.request, self.sigmas, img2img)


def a1111_total_steps(sampler: SamplerSpec, req: GenerationRequest, sigmas: Tensor, img2img: bool) -> int:
    """A1111's `total_steps` (`launch_sampling`) over a run on `sigmas`, which its Skip Early CFG and refiner switch by
    sampling steps count model calls against: the steps, `calls_per_step` a step; its timestep samplers'
    (`runs_a1111_timesteps`, one call fewer than their timesteps) the request's steps, an img2img's t_enc + 1."""
    if not runs_a1111_timesteps(sampler, req.schedule):
        return (len(sigmas) - 1) * sampler.calls_per_step
    _, encoded = _a1111_timesteps_run(sampler, req, img2img)
    return req.steps if encoded is None else encoded + 1


def _calls_before(sampler: SamplerSpec | None, step: int) -> int:
    """Model calls a run makes before its step `step`: `calls_per_step` a step, PLMS's first step two (its
    improved-Euler start); one a step without a `sampler`."""
    if sampler is None:
        return step
    return step * sampler.calls_per_step + (sampler.a1111 == "PLMS" and step > 0)


def a1111_model_calls(sampler: SamplerSpec, req: GenerationRequest, img2img: bool) -> float:
    """Model calls a resolved request's pass makes, without the model loaded: `_calls_before` the end of the steps
    it runs (txt2img the request's, img2img `steps_run`'s); A1111's timestep samplers (`runs_a1111_timesteps`) run
    one step between each two of A1111's timesteps (`a1111_timestep_sigmas`; its UniPC one a timestep), which are
    more than the steps where 1000 is no multiple of them (7 for 6 steps). A1111's two-call samplers (Heun, DPM2,
    DPM2 a, DPM++ SDE, DPM++ 2S a, Restart) make one on their last step, an Euler step to sigma 0. Infinite for a
    sampler that picks its number of calls (`adaptive`: DPM adaptive)."""
    if sampler.adaptive:
        return math.inf
    if runs_a1111_timesteps(sampler, req.schedule):
        steps, encoded = _a1111_timesteps_run(sampler, req, img2img)
        timesteps = len(a1111_timesteps(1000, steps))                # SD's 1000 training timesteps
        timesteps = timesteps if encoded is None else min(timesteps, encoded)     # img2img: timesteps[:t_enc]
        run = timesteps if sampler.a1111 == "UniPC" else timesteps - 1
    elif img2img:
        run = steps_run(req.steps, req.strength, req.img2img_convention)[1]
    else:
        run = req.steps
    last_is_euler = sampler.a1111 is not None and sampler.calls_per_step == 2 and run > 0
    return _calls_before(sampler, run) - last_is_euler


def _check_model(bundle: ModelBundle, req: GenerationRequest, free: int | None, which: str = "") -> None:
    """The checks that need the model: clip skip within its text encoders' layers, PAG layers, memory."""
    check_clip_skip(bundle, req, which)
    check_pag_layers(bundle, req, which)
    if free is not None:                                           # None: the device cannot tell
        check_memory(bundle, req, free)


def check_clip_skip(bundle: ModelBundle, req: GenerationRequest, which: str = "") -> None:
    """A `RequestError` where the request's clip skip leaves no layer of one of the text encoders of `bundle` (a
    loaded one, or one built on the meta device from the checkpoint's header: `model_shapes.planned_bundle`), naming
    the encoder's layer count."""
    skips = encoder_clip_skips(bundle, req)
    for i, encoder in enumerate(bundle.text_encoders):
        try:
            hidden_state_layers(encoder, encoder_skip(skips, i))
        except ValueError as err:
            raise RequestError(f"clip skip {req.clip_skip} is too large for {which or 'this model'}: {err}") from None


def check_pag_layers(bundle: ModelBundle, req: GenerationRequest, which: str = "") -> None:
    """Each PAG layer entry of a request with perturbed-attention guidance selects a self-attention of `bundle` (an
    edit model draws without PAG: not checked); else a RequestError naming `which` model ("the refiner"), so a
    layer that a base has and its refiner lacks is refused before either samples."""
    if not req.pag_scale or bundle.family.is_edit:
        return
    try:
        pag_layer_names(bundle.unet_config, req.pag_layers, which or "this model")
    except PagLayerError as err:
        raise RequestError(str(err)) from None


def resolve_for(bundle: ModelBundle, request: GenerationRequest) -> GenerationRequest:
    """`resolve` with the bundle's family defaults, then the checks that need the model: clip skip, memory."""
    return _resolve(bundle, request, available_bytes(bundle.device))


def _resolve(bundle: ModelBundle, request: GenerationRequest, free: int | None) -> GenerationRequest:
    """`resolve_for` against `free` bytes (None: the device cannot tell). The prompts lose their comments
    (`strip_comments`), as A1111 draws and records them; an empty negative encoded as "" on a family that encodes it
    anyway is the family's rule (None: no `Empty negative` label to write). A control or IP-Adapter without a
    picture of its own is drawn on the init picture (`control.controls_on_init`, `image_prompt.prompts_on_init`), a
    txt2img request's refused."""
    family = bundle.family
    req = resolve(
        request,
        default_size=bundle.default_size,
        default_sampler=family.default_sampler,
        default_schedule=family.default_sigma_schedule,
        factor=bundle.vae_config.downsample_factor,
        default_cfg=family.default_cfg,
        default_steps=family.default_steps,
        guidance_embedding=bundle.unet_config.time_cond_proj_dim is not None,
    )
    req = replace(req, prompt=strip_comments(req.prompt), negative_prompt=strip_comments(req.negative_prompt),
                  prompt_2=strip_comments(req.prompt_2), negative_prompt_2=strip_comments(req.negative_prompt_2))
    check_second_prompts(bundle, req)
    if req.schedule == "align_your_steps" and family.is_sdxl:     # A1111 takes the SDXL levels for SDXL
        req = replace(req, schedule="align_your_steps_sdxl")
    req = clip_skip_as_drawn(family, req)
    if req.clip_skip != 1 and req.clip_skip_convention == "a1111" and encoder_clip_skips(bundle, req) == 1:
        logger.info("clip skip %d has no effect on %s: A1111 moves only SD1's text encoder (its last layer) back",
                    req.clip_skip, family.name)
    if req.zero_empty_negative is False and not family.conditioner.zero_empty_negative:
        req = replace(req, zero_empty_negative=None)    # the family's own rule, which no model of it changes
    if family.is_edit:
        req = _for_edit_model(family, req)
    req = replace(req, controls=controls_on_init(req.controls, req.init_image, req.resize_mode),
                  ip_adapters=prompts_on_init(req.ip_adapters, req.init_image))
    _check_model(bundle, req, free)
    return req


def _for_edit_model(family: FamilySpec, req: GenerationRequest) -> GenerationRequest:
    """An edit (InstructPix2Pix) model's request: it edits a picture, so txt2img is refused (A1111 feeds it txt2img's
    5-channel inpainting conditioning, which its 8-channel U-Net cannot take; diffusers' edit pipelines need an
    image). Under diffusers' img2img convention it draws as diffusers' edit pipelines, from pure noise over the whole
    schedule: strength 1 (`generate._edits_from_noise`); under A1111's and ComfyUI's the strength is img2img's."""
    if req.init_image is None:
        raise RequestError(f"{family.name} is an edit (InstructPix2Pix) model: it edits a picture by an instruction "
                           "and draws nothing from text alone; give it an init image (img2img)")
    if req.img2img_convention == "diffusers" and req.strength != 1.0:
        logger.info("an edit model under diffusers' img2img convention draws from pure noise over all %d steps "
                    "(strength 1, as diffusers' InstructPix2Pix pipelines); strength %g unused", req.steps, req.strength)
        req = replace(req, strength=1.0)
    return req


def check_second_prompts(bundle: ModelBundle, req: GenerationRequest) -> None:
    """prompt_2 / negative_prompt_2 need a second text encoder and take no extra-network tags (a `<lora:...>` tag is
    the prompt's: its network changes every encoder); prompt_2 takes no AND or trailing :WEIGHT where A1111's split
    (`prompt_parts`) finds one, named in the error (composable diffusion splits the prompt alone, every part's
    second encoder reading the whole prompt_2); else a RequestError."""
    family = bundle.family
    for name in ("prompt_2", "negative_prompt_2"):
        text = getattr(req, name)
        if text and len(family.text_encoders) < 2:
            raise RequestError(f"{name} is the second text encoder's text (SDXL's bigG); {family.name} has one text "
                               "encoder: put the text in the prompt")
        if without_extra_networks(text) != text:
            raise RequestError(f"{name} holds a <lora:...> or other <kind:...> tag; put it in the prompt, whose tags "
                               "apply to every text encoder")
    parts = prompt_parts(bundle, req.prompt_2) if req.prompt_2 else []
    if len(parts) > 1:
        raise RequestError("prompt_2 holds AND: composable diffusion splits the prompt only (leave prompt_2 unset "
                           "for each part's second encoder to read that part)")
    if parts and parts != [(req.prompt_2.rstrip(), 1.0)]:
        weight = req.prompt_2[len(parts[0][0]):].strip()
        raise RequestError(f"prompt_2 ends in {weight!r}, which A1111's syntax reads as a composable-diffusion "
                           "weight (a trailing :NUMBER), the prompt's only: weight the prompt, or end prompt_2 "
                           "with another character (e.g. '16:9,')")


def clip_skip_as_drawn(family: FamilySpec, req: GenerationRequest) -> GenerationRequest:
    """`req` with A1111's Clip skip SDXL (`sdxl_clip_l_skip`) off where `family` has no SDXL CLIP-L (A1111: "no
    effect on SD 1.5 or SD 2.0/2.1", nor a refiner). Its clip skip stays the one asked for, recorded as A1111 records
    it (`Clip skip: N` over 1, whatever the model: `create_infotext`); which encoders it moves is
    `encoder_clip_skips`'. Both the plan and the server's submit check draw on it."""
    if req.sdxl_clip_l_skip and not any(_is_sdxl_clip_l(family, spec) for spec in family.text_encoders):
        req = replace(req, sdxl_clip_l_skip=False)
    return req


def _is_sdxl_clip_l(family: FamilySpec, spec: TextEncoderSpec) -> bool:
    """Whether `spec` is the encoder A1111's Clip skip SDXL moves: SDXL's CLIP-L, a transformers CLIP tower (A1111's
    `FrozenCLIPEmbedderForSDXLWithCustomWords`) read at its penultimate layer."""
    return family.is_sdxl and spec.layout == "hf" and spec.hidden_state == "penultimate"


def encoder_clip_skips(bundle: ModelBundle, req: GenerationRequest) -> ClipSkip:
    """The clip skip each text encoder of `bundle` reads its hidden state at (`hidden_state_layers`; one number where
    all read alike): the request's, but under A1111's rule (``clip_skip_convention="a1111"``) only an encoder whose
    family reads its last layer (SD1's CLIP-L) moves back, the others (SD2's OpenCLIP, SDXL's CLIP-L and bigG, a
    refiner's bigG) read their usual layer (1): A1111's `FrozenOpenCLIPEmbedderWithCustomWords` and
    `FrozenOpenCLIPEmbedder2WithCustomWords` ignore clip skip, `FrozenCLIPEmbedderForSDXLWithCustomWords` reads its
    `layer_idx`. The family's usual layers, not the loaded towers' (a diffusers-layout SD2 tower is read at its last
    layer). Under A1111's Clip skip SDXL (`sdxl_clip_l_skip`) SDXL's CLIP-L reads A1111's ``hidden_states[-clip_skip]``
    (its rule's clip skip - 1; `FrozenCLIPEmbedderForSDXLWithCustomWords.encode_with_transformers`). Under
    ComfyUI's rule (``clip_skip_convention="comfyui"``) the clip skip n is CLIPSetLastLayer's -n for every encoder
    (comfy/sd1_clip.py ``SDClipModel.set_clip_options``: layer "hidden", ``layer_idx`` -n, the final LayerNorm where
    the encoder's rule applies it; comfy/sdxl_clip.py ``SDXLClipModel`` sets clip_l and clip_g alike): n for an
    encoder whose usual layer is its last, n - 1 (0: its last layer) for SD2's and SDXL's, usually the
    penultimate."""
    if req.clip_skip_convention == "comfyui":
        return tuple(req.clip_skip if encoder.spec.hidden_state == "last" else req.clip_skip - 1
                     for encoder in bundle.text_encoders)
    if req.clip_skip_convention != "a1111":
        return req.clip_skip
    family = bundle.family
    skips = tuple(req.clip_skip if spec.hidden_state == "last"
                  else req.clip_skip - 1 if req.sdxl_clip_l_skip and _is_sdxl_clip_l(family, spec)
                  else 1 for spec in family.text_encoders)
    return skips[0] if len(set(skips)) == 1 else skips


def warn_of_unloaded_embeddings(bundle: ModelBundle, req: GenerationRequest) -> None:
    """One warning for each `embedding:NAME` of the prompts that names no loaded embedding (it is left out)."""
    tokenizer = bundle.text_encoders[0].tokenizer
    names = (name for run in _tokenized_runs(bundle, req) for name in tokenizer.unloaded_names(run))
    for name in dict.fromkeys(names):
        logger.warning("embedding:%s is not loaded; it is left out of the prompt", name)


def _tokenized_runs(bundle: ModelBundle, req: GenerationRequest) -> list[str]:
    """The texts of the prompts the tokenizer reads one by one, where a word such as `embedding:NAME` may
    begin: the emphasis runs (`weighted_runs`, the request's emphasis mode) of each text the request encodes
    (`_edited_texts`). A text that does not parse has none (encoding it is a `PromptError`)."""
    runs: list[str] = []
    for text in _edited_texts(bundle, req):
        try:
            runs += [run for run, weight in weighted_runs(text, req.emphasis) if not is_break((run, weight))]
        except PromptError:
            continue
    return runs


def prompt_parts(bundle: ModelBundle, prompt: str) -> list[tuple[str, float]]:
    """The parts of `prompt` the drawing encodes apart, with their weights: A1111's AND parts (`composable_parts`),
    or the whole prompt for a U-Net with a guidance embedding (which runs on the prompt alone)."""
    if bundle.unet_config.time_cond_proj_dim is not None:
        return [(prompt, 1.0)]
    return composable_parts(prompt)


def prompt_schedule_steps(req: GenerationRequest, calls: int) -> tuple[int, int | None]:
    """The (steps, hires_steps) a pass of `req`, whose sampler makes `calls` model calls a step, schedules its
    prompt edits over (`prompt_schedule`): model calls, as A1111 counts them (its step_multiplier); a hires second
    pass (`first_pass_steps` set: the first pass's calls, counted by its own sampler) counts on from its first."""
    if req.first_pass_steps is None:
        return req.steps * calls, None
    return req.first_pass_steps, req.steps * calls


def _passes(bundle: ModelBundle, req: GenerationRequest) -> list[GenerationRequest]:
    """The requests of the passes `req` draws: itself, then a hires request's second pass (`second_pass_request`)."""
    from sdlab.pipeline.hires import second_pass_request             # hires plans its passes with make_plan
    return [req, second_pass_request(req, bundle.vae_config.downsample_factor)] if req.hires else [req]


def _edited_texts(bundle: ModelBundle, req: GenerationRequest) -> dict[str, str]:
    """The texts the request encodes, each with the request field it first comes from (`_prompt_fields`): in each
    pass it draws (`_passes`), each edited text (`prompt_schedule` over `prompt_schedule_steps`, as the drawing
    schedules them) of each part (`prompt_parts`) of the prompt, of the negative prompt and, on a model with two
    text encoders, of the second texts set (`prompt_2` / `negative_prompt_2`)."""
    texts: dict[str, str] = {}
    for run, (prompt, negative) in zip(_passes(bundle, req), _prompt_fields(req)):
        steps = prompt_schedule_steps(run, get_sampler(run.sampler).calls_per_step)
        fields = [(prompt, part) for part, _ in prompt_parts(bundle, run.prompt)] + [(negative, run.negative_prompt)]
        if len(bundle.text_encoders) > 1:
            fields += [(name, getattr(run, name)) for name in ("prompt_2", "negative_prompt_2") if getattr(run, name)]
        for field, text in fields:
            for _, text_at in prompt_schedule(text, *steps, old=run.old_prompt_editing):
                texts.setdefault(text_at, field)
    return texts


def _prompt_fields(req: GenerationRequest) -> list[tuple[str, str]]:
    """The request fields of the (prompt, negative prompt) of each pass: a hires second pass's own where set."""
    return [("prompt", "negative_prompt"), ("hr_prompt" if req.hr_prompt else "prompt",
                                            "hr_negative_prompt" if req.hr_negative_prompt else "negative_prompt")]


def check_prompt_chunks(bundle: ModelBundle, req: GenerationRequest) -> None:
    """A `PromptError` when the request is resolved, not when it is drawn, for a text of `req` (resolved) that
    the model's tokenizers make more than `MAX_CHUNKS` chunks of (its embeddings' vectors counted): the texts
    it encodes (`_edited_texts`), the prompts without their comments and extra-network tags; the error names the
    field of the text (the prompt's own reads "prompt '...'")."""
    encoded = replace(req, prompt=without_extra_networks(req.prompt), negative_prompt=strip_comments(req.negative_prompt),
                      hr_prompt=without_extra_networks(req.hr_prompt),
                      hr_negative_prompt=strip_comments(req.hr_negative_prompt),
                      prompt_2=strip_comments(req.prompt_2), negative_prompt_2=strip_comments(req.negative_prompt_2))
    tokenizers = {id(encoder.tokenizer): encoder.tokenizer for encoder in bundle.text_encoders}.values()
    for text, field in _edited_texts(bundle, encoded).items():
        for tokenizer in tokenizers:
            try:
                prompt_chunks(text, tokenizer, req.emphasis)
            except PromptError as err:
                if field == "prompt":
                    raise
                raise PromptError(f"{field}: {err}") from None


def warn_if_far_from_native(bundle: ModelBundle, req: GenerationRequest) -> None:
    """Log a warning when a side is more than `FAR_FROM_NATIVE` times off the model's native size: a model
    draws well near the size it was trained at (repeated subjects above it, mush below it)."""
    native = bundle.default_size
    if any(not native / FAR_FROM_NATIVE <= side <= native * FAR_FROM_NATIVE for side in (req.width, req.height)):
        of_init = req.init_image is not None and req.size_convention == "diffusers"     # unset: the init's size
        logger.warning(
            "%dx%d is far from this model's native %dx%d px; expect repeated or broken subjects (%s)",
            req.width, req.height, native, native,
            "set width and height near it: unset, they are the init picture's" if of_init
            else "leave width and height unset for the native size",
        )


def request_sigmas(
    sampling: ModelSampling, sampler: SamplerSpec, req: GenerationRequest, device: torch.device | str = "cpu",
    *, img2img: bool | None = None, steps_offset: int = 1,
) -> Tensor:
    """The sigmas a resolved request visits (the img2img tail for an init image, or when `img2img` says so), on
    `device`: the request's named discretization of the model sampling's training levels (`sampling.schedule`);
    a diffusers-spaced one counts from the model's `steps_offset` (`ModelBundle.steps_offset`), its ends as A1111
    takes them (`a1111_schedule_ends`). A1111's timestep samplers step on its timesteps (`runs_a1111_timesteps`,
    `_a1111_timesteps_run`). Under ComfyUI's KSampler (`comfyui_arithmetic`) `normal` and `sgm_uniform` are
    computed in ComfyUI's float32 arithmetic (`discretization.comfyui_options`)."""
    img2img = req.init_image is not None if img2img is None else img2img
    req = a1111_schedule_ends(sampling, req)
    if runs_a1111_timesteps(sampler, req.schedule):
        sigmas = _a1111_sigmas(sampling, sampler, req, img2img)
        _check_a1111_timestep_steps(sampler, req, sigmas, img2img)
        return sigmas.to(device)
    options = dict(final=sampler.final_sigma, scheduler=sampler.spacing,  # a diffusers spacing: the sampler's
                   discard_penultimate=(sampler.discard_penultimate
                                        or also_discards(sampler, req.discard_penultimate_sigma)),
                   **schedule_overrides(req.schedule, sigma_min=req.schedule_sigma_min,
                                        sigma_max=req.schedule_sigma_max, rho=req.schedule_rho,
                                        alpha=req.beta_alpha, beta=req.beta_beta))
    if comfyui_arithmetic(sampling, req):
        options.update(comfyui_options(req.schedule))
    if req.schedule.strip().lower() in DIFFUSERS_NAMES:
        options["steps_offset"] = steps_offset
    try:
        if not img2img:
            sigmas = discretize(req.schedule, sampling.schedule, req.steps, **options)
        else:
            sigmas = img2img_sigmas(req.schedule, sampling.schedule, req.steps, req.strength, req.img2img_convention,
                                    **options)
    except ValueError as err:   # e.g. a strength so low that no step runs, LCM past its 50 steps
        raise RequestError(str(err)) from None
    _check_overridden_sigmas_fall(req, sigmas)
    return sigmas.to(device)


def _check_overridden_sigmas_fall(req: GenerationRequest, sigmas: Tensor) -> None:
    """A `RequestError` where A1111's Schedule min / max sigma or rho (`schedule_overrides`) make a schedule whose
    sigmas (steps + 1,) do not fall step by step: one rises (a minimum past the maximum, the model's where unset) or
    all are one (a minimum at the maximum, a rho so large every step lands on one sigma); two equal neighbours of a
    float32 ramp (polyexponential at rho 7, as A1111's) draw. A multistep sampler divides by the step before's size (a
    ZeroDivisionError in DPM++ 2M mid-job); no sampler draws such a schedule."""
    if not (req.schedule_sigma_min or req.schedule_sigma_max or req.schedule_rho):
        return
    drawn = sigmas[:-1] if sigmas[-1] == 0 else sigmas            # the final 0 a schedule appends
    rises = bool((drawn[1:] > drawn[:-1]).any())                 # two equal neighbours of a float32 ramp draw
    if len(drawn) > 1 and (rises or drawn[-1] >= drawn[0]):
        raise RequestError(
            f"schedule_sigma_min {req.schedule_sigma_min:g}, schedule_sigma_max {req.schedule_sigma_max:g} and "
            f"schedule_rho {req.schedule_rho:g} (0: the model's / the schedule's) make {req.schedule!r} sigmas "
            f"that do not fall step by step (from {float(drawn[0]):g} to {float(drawn[-1]):g}); set the minimum "
            "below the maximum and a smaller rho")


def comfyui_arithmetic(sampling: ModelSampling, req: GenerationRequest) -> bool:
    """Whether a pass follows ComfyUI's KSampler in its float32 arithmetic (`comfy_sigmas`): its `normal` /
    `sgm_uniform` sigmas (`request_sigmas`), its ControlNet windows under control_convention "comfyui" and
    SA-Solver's SDE interval (`pass_timestep_sigma`) all ask here. So it does where the pass's start noise is ComfyUI's
    KSampler rule, init_noise "comfyui": a sampler spelt as ComfyUI spells it on a schedule not named the diffusers
    way brings it (every KSampler of the ComfyUI API), and so does a hires fix's second pass under hr_convention
    "comfyui", ComfyUI's second KSampler (`hires.second_pass_request`); on a discrete model (ComfyUI's
    `ModelSamplingDiscrete`; an EDM or flow model keeps sdlab's arithmetic). A pass with another start noise (a
    sampler spelt as A1111 or diffusers spell it, init_noise "comfyui" not asked for) keeps sdlab's float64
    arithmetic in all three."""
    return req.init_noise == "comfyui" and isinstance(sampling, DiscreteModelSampling)


def comfyui_timestep_sigma(sampling: ModelSampling) -> Callable[[Tensor], Tensor]:
    """The timestep -> sigma map ComfyUI's percent_to_sigma reads: a discrete model's ``ModelSamplingDiscrete.sigma``,
    float32 on ComfyUI's float32 log-sigma table (``NoiseSchedule.t_to_sigma(t, dtype=torch.float32)``), so an edge
    is ComfyUI's bit for bit and falls on a step's sigma exactly where ComfyUI's does (the KSampler's `normal` /
    `sgm_uniform` sigmas are the same function's under `comfyui_arithmetic`); an EDM or flow model's own
    `t_to_sigma`."""
    if isinstance(sampling, DiscreteModelSampling):
        schedule = sampling.schedule
        return lambda t: schedule.t_to_sigma(torch.as_tensor(t).float(), dtype=torch.float32)
    return sampling.t_to_sigma


def pass_timestep_sigma(sampling: ModelSampling, req: GenerationRequest) -> Callable[[Tensor], Tensor]:
    """The timestep -> sigma map a pass's percent_to_sigma reads (a ControlNet's window under ComfyUI's convention,
    `control.comfyui_sigma_window`; SA-Solver's SDE interval): ComfyUI's float32 one (`comfyui_timestep_sigma`)
    where the pass follows ComfyUI's arithmetic (`comfyui_arithmetic`), else the model's own `t_to_sigma`."""
    return comfyui_timestep_sigma(sampling) if comfyui_arithmetic(sampling, req) else sampling.t_to_sigma


def _a1111_timesteps_run(sampler: SamplerSpec, req: GenerationRequest, img2img: bool) -> tuple[int, int | None]:
    """(steps, t_enc) of A1111's timestep sampler `sampler` (`runs_a1111_timesteps`) for a resolved request: the
    steps whose timesteps it builds (`a1111_timesteps`; one more with Discard penultimate sigma, as its
    `get_timesteps`) and, for img2img (`sample_img2img`), t_enc, the number of them it samples on: one less than
    the steps `steps_run` runs under the request's convention (A1111's `setup_img2img_steps`: k-diffusion's samplers
    run t_enc + 1); None for txt2img."""
    steps, encoded = req.steps, None
    if img2img:
        try:
            steps, run = steps_run(req.steps, req.strength, req.img2img_convention)
        except ValueError as err:
            raise RequestError(str(err)) from None
        encoded = run - 1
    return steps + also_discards(sampler, req.discard_penultimate_sigma), encoded


def _a1111_sigmas(sampling: ModelSampling, sampler: SamplerSpec, req: GenerationRequest, img2img: bool) -> Tensor:
    """The sigmas A1111's timestep sampler `sampler` (`runs_a1111_timesteps`) visits for a resolved request."""
    timesteps, encoded = _a1111_timesteps_run(sampler, req, img2img)
    return a1111_timestep_sigmas(sampling.schedule, timesteps, encoded=encoded, unipc=sampler.a1111 == "UniPC")


def _check_a1111_timestep_steps(sampler: SamplerSpec, req: GenerationRequest, sigmas: Tensor, img2img: bool,
                                field: str = "steps") -> None:
    """A RequestError where A1111's timestep sampler takes no step on `sigmas` (one timestep: its loop runs
    `len(timesteps) - 1` times), or its UniPC fewer than its order (`unipc_order`: A1111's fails there); it names
    `field`, the request's steps (`hr_steps` for a hires second pass), and the strength where a higher one runs
    more steps."""
    steps, needed = max(len(sigmas) - 1, 0), req.unipc_order if sampler.a1111 == "UniPC" else 1   # none: 0 steps
    if steps < needed:
        convention = req.img2img_convention
        strength_acts = img2img and steps_run(req.steps, 1.0, convention)[1] > steps_run(req.steps, req.strength,
                                                                                           convention)[1]
        what = f"{field} {req.steps}" + (f" at strength {req.strength}" if strength_acts else "")
        least = f"its order {needed} (unipc_order)" if sampler.a1111 == "UniPC" else needed
        raise RequestError(f"A1111's {sampler.a1111} at {what} takes {steps} step(s) on its timesteps, fewer than "
                           f"{least}: raise {field}" + (" (or the strength)" if strength_acts else ""))


def _check_second_pass_steps(sampling: ModelSampling, req: GenerationRequest) -> None:
    """`_check_a1111_timestep_steps` for the second pass of a resolved hires request (`hires.second_pass_request`:
    `hr_steps` or the first pass's steps, A1111's hires img2img steps), before the first pass is drawn."""
    sampler = get_sampler(req.hr_sampler or req.sampler)
    second = replace(req, steps=req.hr_steps or req.steps, strength=req.hr_denoise,
                     schedule=req.hr_schedule or req.schedule, img2img_convention=HIRES_IMG2IMG)
    if runs_a1111_timesteps(sampler, second.schedule):
        _check_a1111_timestep_steps(sampler, second, _a1111_sigmas(sampling, sampler, second, True), True, "hr_steps")


def _a1111_noised_at(sampling: ModelSampling, sampler: SamplerSpec, req: GenerationRequest,
                    img2img: bool) -> float | None:
    """The sigma A1111's timestep samplers noise an img2img's init latent to (`sample_img2img`: its t_enc-th timestep,
    the one above those it samples on, `_a1111_timesteps_run`), which they then read as a VP latent at the first
    they sample on (`generate._start`); None for another sampler or txt2img."""
    if not (img2img and runs_a1111_timesteps(sampler, req.schedule)):
        return None
    steps, encoded = _a1111_timesteps_run(sampler, req, True)
    timestep = a1111_timesteps(sampling.schedule.num_timesteps, steps)[encoded]
    return float(sampling.schedule.sigmas[timestep])


def request_sampling(sampling: ModelSampling, req: GenerationRequest) -> ModelSampling:
    """`sampling` on the alphas_cumprod A1111's Downcast alphas_cumprod / Zero Terminal SNR options of the request
    make (`a1111_schedule_override`); a model without a discrete DDPM schedule as it is, as A1111 applies them only
    to models with alphas_cumprod (`apply_alpha_schedule_override`)."""
    if not (req.downcast_alphas_cumprod or req.zero_terminal_snr) or not isinstance(sampling, DiscreteModelSampling):
        return sampling
    schedule = a1111_schedule_override(sampling.schedule, downcast=req.downcast_alphas_cumprod,
                                       zero_terminal_snr=req.zero_terminal_snr)
    return DiscreteModelSampling(schedule, sampling.prediction)


def _without_unusable_schedule_options(sampling: ModelSampling, req: GenerationRequest) -> GenerationRequest:
    """`req` without A1111's Downcast alphas_cumprod / Zero Terminal SNR where `sampling` has no DDPM schedule to
    apply them to (an EDM or flow model), with a warning: A1111 leaves them out there (`request_sampling`), so they
    change nothing and their labels are not written."""
    asked = [label for label, on in (("Downcast alphas_cumprod", req.downcast_alphas_cumprod),
                                     ("Noise Schedule: Zero Terminal SNR", req.zero_terminal_snr)) if on]
    if not asked or isinstance(sampling, DiscreteModelSampling):
        return req
    logger.warning("%s applies to a model with a DDPM schedule (alphas_cumprod) only, not to this EDM / flow "
                   "model: left out", " and ".join(asked))
    return replace(req, downcast_alphas_cumprod=False, zero_terminal_snr=False)


OLD_KARRAS_SIGMAS = (0.1, 10.0)
"""The ends A1111's `get_sigmas` gives its schedule functions with `use_old_karras_scheduler_sigmas` on."""


def a1111_schedule_ends(sampling: ModelSampling, req: GenerationRequest) -> GenerationRequest:
    """`req` with the schedule's ends A1111's `KDiffusionSampler.get_sigmas` (1.10) takes, its `old_karras_sigmas`
    resolved into them (off): it starts from ``(0.1, 10) if opts.use_old_karras_scheduler_sigmas else (m_sigma_min,
    m_sigma_max)`` and puts its sigma_min / sigma_max option in their place only where ``opts.sigma_min != 0 and
    opts.sigma_min != m_sigma_min`` (sigma_max alike), writing "Schedule min sigma" / "max sigma" only then. So
    Schedule min / max sigma equal to the model's own end (k-diffusion's float32 training sigma,
    `a1111_training_sigmas`) is 0, the model's, and with the old Karras sigmas 0.1 / 10, as an unset one is; an EDM
    or flow model has no such table and keeps them. Resolving an already resolved request changes nothing."""
    if not (req.old_karras_sigmas or req.schedule_sigma_min or req.schedule_sigma_max):
        return req
    ends = {"schedule_sigma_min": req.schedule_sigma_min, "schedule_sigma_max": req.schedule_sigma_max}
    if isinstance(sampling, DiscreteModelSampling):
        training = a1111_training_sigmas(sampling)                               # (T,) ascending
        own = {"schedule_sigma_min": float(training[0]), "schedule_sigma_max": float(training[-1])}
        ends = {name: 0.0 if value == own[name] else value for name, value in ends.items()}
    if req.old_karras_sigmas:
        ends = {name: value or old for (name, value), old in zip(ends.items(), OLD_KARRAS_SIGMAS)}
    return replace(req, **ends, old_karras_sigmas=False)


def handoff_index(sigmas: Tensor, sampling: ModelSampling, switch_at: float, convention: str = "diffusers", *,
                  sampler: SamplerSpec | None = None, total_steps: int | None = None) -> int:
    """How many steps of `sigmas` the base model takes before the refiner takes over at ``sigmas[index]``,
    by `convention` (`REFINER_CONVENTIONS`).

    "diffusers": the ``denoising_end`` / ``denoising_start`` rule: with T training timesteps the cut-off is
    ``round(T * (1 - switch_at))``; the base takes every step whose timestep is >= the cut-off and the
    refiner every step below it (``StableDiffusionXLPipeline`` / ``StableDiffusionXLImg2ImgPipeline``,
    ``discrete_timestep_cutoff``). A step's timestep is that of its starting sigma (``sigma_to_t``,
    fractional for Karras-like lists, as diffusers' Euler uses it). sdlab samplers count steps, not model
    calls, so second-order samplers never split inside a step (diffusers' "+1 for order 2" fix-up).
    "a1111": ``apply_refiner`` (modules/sd_samplers_common.py), which A1111 checks at every model call: the
    refiner takes over at the first call whose sigma's nearest training sigma (an integer timestep t) has
    ``(T - 1 - t) / T >= switch_at``, in float32 as A1111 computes it (`_a1111_handoff`). A second-order
    sampler's call inside a step never switches here: that step ends on the base.
    "a1111_steps": ``apply_refiner`` switching by sampling steps (A1111 before 1.8 always, later with its
    ``refiner_switch_by_sample_steps`` option): the first step whose first model call's share of A1111's
    `total_steps` (`a1111_total_steps`; the steps run when not given), ``calls / total_steps``, is not below
    `switch_at`, counting `sampler`'s calls (`_calls_before`). A1111 counts a second-order sampler's calls over twice
    the steps, so its handoff falls on that step's first call or on the second call of the step before
    (`generate._a1111_switch`).
    `sampling` is a `ModelSampling` (or a `NoiseSchedule`); `switch_at` lies strictly between 0 and 1.
    """
    if convention == "a1111":
        return _a1111_handoff(sigmas, sampling, switch_at)
    if convention == "a1111_steps":
        steps = len(sigmas) - 1
        total = total_steps or steps
        return next((step for step in range(steps) if _calls_before(sampler, step) / total >= switch_at), steps)
    cutoff = round(sampling.num_timesteps * (1.0 - float(switch_at)))
    steps = sigmas[:-1].to(torch.float64).cpu()                                 # each step's starting sigma
    timesteps = sampling.sigma_to_t(steps)                                      # (steps,)
    return int((timesteps >= cutoff - 1e-3).sum())   # integer timesteps come back from sigma_to_t within ~1e-5


def run_sampler(req: GenerationRequest) -> SamplerSpec:
    """The sampler a resolved request runs: its named one, on A1111's timesteps where it runs them (`a1111_run`)."""
    sampler = get_sampler(req.sampler)
    if runs_a1111_timesteps(sampler, req.schedule):
        sampler = a1111_run(sampler, unipc_order=req.unipc_order, unipc_variant=req.unipc_variant,
                            unipc_lower_order_final=req.unipc_lower_order_final)
    return sampler


def refiner_split(model_sampling: ModelSampling, req: GenerationRequest, switch_at: float, convention: str, *,
                  steps_offset: int = 1) -> int:
    """The steps of a resolved request the base model takes before an SDXL refiner takes over, split as `make_plan`
    splits them (`handoff_index` over the request's sigmas), without the model loaded: `model_sampling` and
    `steps_offset` are the base's. The ControlNets run on these steps only (`generate`'s refiner run)."""
    sampler = run_sampler(req)
    sampling = request_sampling(model_sampling, req)
    img2img = req.init_image is not None
    sigmas = request_sigmas(sampling, sampler, req, img2img=img2img, steps_offset=steps_offset)
    return handoff_index(sigmas, sampling, switch_at, convention, sampler=sampler,
                         total_steps=a1111_total_steps(sampler, req, sigmas, img2img))


def check_refiner_convention(convention: str) -> str:
    """`convention` when it is one of `REFINER_CONVENTIONS`, else a `RequestError` listing them."""
    if convention not in REFINER_CONVENTIONS:
        raise RequestError(f"unknown refiner switch convention {convention!r}; valid: "
                           f"{', '.join(REFINER_CONVENTIONS)}")
    return convention


def _a1111_handoff(sigmas: Tensor, sampling: ModelSampling, switch_at: float) -> int:
    """A1111's handoff step (`handoff_index`): the first step whose starting sigma switches (`a1111_switches`)."""
    switched = a1111_switches(sigmas[:-1], a1111_training_sigmas(sampling), switch_at).nonzero()
    return int(switched[0]) if len(switched) else len(sigmas) - 1


def a1111_training_sigmas(sampling: ModelSampling) -> Tensor:
    """k-diffusion's training sigmas from float32 alphas_cumprod (``DiscreteSchedule.sigmas``): (T,) float32 on
    the CPU, ascending with t."""
    schedule = getattr(sampling, "schedule", sampling)                       # a NoiseSchedule as it is
    alphas_cumprod = schedule.alphas_cumprod.to(torch.float32).cpu()         # (T,)
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5                    # (T,)


def a1111_switches(sigmas: Tensor, training: Tensor, switch_at: float) -> Tensor:
    """Whether A1111's ``apply_refiner`` hands over at a model call at each of `sigmas` (bool, same shape):
    the `training` sigma (`a1111_training_sigmas`) nearest to the float32 sigma by absolute difference (an
    integer timestep t), then ``(T - 1 - t) / T >= switch_at`` in float32."""
    flat = sigmas.to(torch.float32).cpu().reshape(-1)                        # (n,)
    nearest = (training[None, :] - flat[:, None]).abs().argmin(dim=1)        # (n,) integer timesteps
    T = len(training)
    completed = (T - 1 - nearest) / T                                        # (n,) float32, as A1111's ratio
    return (completed >= float(switch_at)).reshape(sigmas.shape)           # a Python float: compared in float32


def _check_refiner_fits(base: ModelBundle, refiner: ModelBundle) -> None:
    if refiner.unet_config.out_channels != base.unet_config.out_channels or (
        refiner.vae_config.downsample_factor != base.vae_config.downsample_factor
    ):
        raise RequestError("the refiner's latent space (channels, VAE factor) differs from the base model's")
    if refiner.scaling_factor != base.scaling_factor:
        raise RequestError(
            f"the base scales latents by {base.scaling_factor} and the refiner by {refiner.scaling_factor}; "
            "a latent handoff needs the same latent space"
        )
    if refiner.latent_stats != base.latent_stats:
        raise RequestError("the base and the refiner normalise latents by different per-channel statistics "
                           "(latents_mean / latents_std); a latent handoff needs the same latent space")


def check_deep_cache_branch(bundle: ModelBundle, req: GenerationRequest) -> DeepCache | None:
    """The request's DeepCache (None: off) where the bundle's U-Net has its branch, else a RequestError (also for a
    network other than sdlab's U-Net: a plug-in family's own)."""
    return check_deep_cache_unet(bundle.unet, req)


def check_deep_cache_unet(unet: torch.nn.Module, req: GenerationRequest) -> DeepCache | None:
    """`check_deep_cache_branch` against a U-Net: a loaded one, or one built on the meta device from a checkpoint's
    names and shapes (the server's check of a job whose model is not loaded yet)."""
    if req.deep_cache is None:
        return None
    if not isinstance(unet, UNet):
        raise RequestError(f"DeepCache needs sdlab's U-Net; this model's network ({type(unet).__name__}) "
                           "has no cached branch")
    cfg = unet.cfg
    try:
        req.deep_cache.skip_block(cfg.num_res_blocks, len(cfg.channel_mult))
    except ValueError as exc:
        raise RequestError(str(exc)) from None
    return req.deep_cache


def check_hires_memory(bundle: ModelBundle, req: GenerationRequest, free: int | None) -> None:
    """`check_memory` of a resolved request's hires pass, at the size it upscales to (none without the hires fix)."""
    if not req.hires:
        return
    multiple = math.lcm(SIZE_MULTIPLE, bundle.vae_config.downsample_factor)
    (width, height), _ = hires_sizes(*hires_base_size(req), req.hr_scale, req.hr_width, req.hr_height, multiple)
    check_memory(bundle, replace(req, width=width, height=height), free)


def check_passes_fit(bundle: ModelBundle, req: GenerationRequest, let_go: int = 0) -> None:
    """The memory check `make_plan` makes, of each pass of a resolved request (`check_memory`: the estimate against
    the memory free on the bundle's device now), for a caller that has not planned it yet: the server, as a job is
    posted for the loaded model, so that both its APIs refuse what cannot fit before it queues. `let_go`: bytes
    held now that the run lets go before its own check (a refiner it does not draw with), counted as free."""
    free = available_bytes(bundle.device)
    if free is None:
        return
    free += let_go
    check_memory(bundle, req, free)
    check_hires_memory(bundle, req, free)


def make_plan(
    bundle: ModelBundle,
    request: GenerationRequest,
    *,
    refiner: ModelBundle | None = None,
    switch_at: float = 0.8,
    refiner_convention: str = "diffusers",
    from_latent: bool = False,
) -> GenerationPlan:
    """Resolve `request` for `bundle` (and an SDXL `refiner` taking over after `switch_at` of the schedule,
    the step picked by `refiner_convention`: `handoff_index`) into the plan the generate loop runs; a
    `RequestError` names the first bad value.

    `from_latent`: the run starts from a latent the caller gives (`sample_latents(..., init_latent=z)`), noised
    at the img2img level of `request.strength` (the hires fix's second pass after a latent upscale)."""
    free = available_bytes(bundle.device)                         # one reading for every model's check
    req = _resolve(bundle, request, free)
    check_prompt_chunks(bundle, req)
    check_deep_cache_branch(bundle, req)
    if free is not None:                                          # the second pass, at the upscaled size
        check_hires_memory(bundle, req, free)
    if refiner is not None:
        check_refiner_switch(switch_at, "switch_at")
        check_refiner_convention(refiner_convention)
        _check_refiner_fits(bundle, refiner)
        _check_model(refiner, req, free, "the refiner")
    warn_if_far_from_native(bundle, req)
    warn_of_unloaded_embeddings(bundle, req)

    sampler = run_sampler(req)
    guided = bundle.runs_uncond(req.cfg_scale, sampler.cfg_pp)
    advice = steps_warning(sampler, req.steps, req.schedule) if guided else None
    if advice:
        logger.warning(advice)
    if bundle.unet_config.time_cond_proj_dim is not None and req.cfg_scale <= 1.0:
        logger.warning("CFG %g on a model that takes its guidance as an input (LCM-distilled) embeds w = %g: "
                       "no guidance; its own preset draws at CFG 8.5 (--preset lcm-model)",
                       req.cfg_scale, req.cfg_scale - 1.0)
    model_sampling = bundle.model_sampling                       # built on each read: once here
    req = _without_unusable_schedule_options(model_sampling, req)
    sampling = request_sampling(model_sampling, req)
    req = a1111_schedule_ends(sampling, req)
    img2img = from_latent or req.init_image is not None
    sigmas = request_sigmas(sampling, sampler, req, bundle.device, img2img=img2img, steps_offset=bundle.steps_offset)
    if req.hires:
        _check_second_pass_steps(sampling, req)
    factor = bundle.vae_config.downsample_factor
    shape = (req.batch_size, bundle.unet_config.out_channels, req.height // factor, req.width // factor)
    pictures = init_pictures(req)
    if req.mask_image is not None and pictures[0].mask is None:   # "Only masked" with a blank mask: img2img
        req = replace(req, mask_image=None)
    split = refiner_sampling = None
    if refiner is not None:
        split = handoff_index(sigmas, sampling, switch_at, refiner_convention, sampler=sampler,
                              total_steps=a1111_total_steps(sampler, req, sigmas, img2img))
        refiner_sampling = request_sampling(refiner.model_sampling, req)
    return GenerationPlan(request=req, sampler=sampler, sampling=sampling, sigmas=sigmas, latent_shape=shape,
                          pictures=pictures, refiner_split=split, refiner_sampling=refiner_sampling,
                          refiner_switch_at=None if refiner is None else switch_at,
                          refiner_convention=refiner_convention, from_latent=from_latent,
                          noised_at=_a1111_noised_at(sampling, sampler, req, img2img), steps_offset=bundle.steps_offset)
