"""A generation request <-> the A1111-style `parameters` text stored in sdlab's PNGs.

`to_parameters` writes A1111's labels (Steps, Sampler, Schedule type, CFG scale, Seed, Size, ...) plus
sdlab's own exactness settings under their own labels, so `--from-png` reproduces the picture;
`from_parameters` reads the fields back as `GenerationRequest` keyword arguments, and also reads
the common fields of files written by A1111.

LoRAs are recorded as A1111 records them: a `<lora:NAME:WEIGHT>` tag in the prompt (A1111's way of asking
for one) and `Lora hashes: "NAME: HASH12, ..."`. `split_lora_tags` takes the tags out of a prompt before
it is encoded, as A1111 does.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields as dataclass_fields
from pathlib import Path
from typing import Any

from sdlab.diffusion.discretization import DIFFUSERS_NAMES, UnknownDiscretizationError, schedule_overrides
from sdlab.diffusion.samplers import (
    A1111_TIMESTEP_SAMPLERS, UnknownSamplerError, a1111_schedule, also_discards, comfyui_spelling, get_sampler,
)
from sdlab.diffusion.schedule_names import a1111_label, schedule_from_a1111, schedule_key
from sdlab.families import FamilySpec
from sdlab.models.deep_cache import DEEP_CACHE_FIELDS, DeepCache
from sdlab.models.freeu import FREEU_FACTORS, FREEU_WINDOW, FreeU
from sdlab.pipeline.control import infotext_lines
from sdlab.pipeline.hires import is_latent_upscaler
from sdlab.pipeline.image_prompt import infotext_lines as image_prompt_lines
from sdlab.pipeline.perturbed_attention import DEFAULT_LAYERS
from sdlab.pipeline.png_info import NEGATIVE_PROMPT, PROMPT, version_label
from sdlab.pipeline.prompt_loras import resolve_prompt_loras, split_prompt_loras, without_merged_tags
from sdlab.pipeline.prompt_schedule import old_rule_differs
from sdlab.pipeline.prompt_syntax import strip_comments
from sdlab.pipeline.request import (
    NO_IMAGE_GUIDANCE, GenerationRequest, hires_base_size, runs_a1111_unipc, sampler_init_noise, sgm_noise_multiplied,
)
from sdlab.pipeline.upscale import a1111_upscaler_name

_REQUEST_DEFAULTS = {field.name: field.default for field in dataclass_fields(GenerationRequest)}

# A1111 label -> (request field, parser)
_FIELDS: dict[str, tuple[str, type]] = {
    "Prompt 2": ("prompt_2", str),           # sdlab's labels of SDXL's second prompts (A1111 has none)
    "Negative prompt 2": ("negative_prompt_2", str),
    "Steps": ("steps", int),
    "Sampler": ("sampler", str),
    "Schedule type": ("schedule", str),
    "Schedule min sigma": ("schedule_sigma_min", float),   # A1111's sigma_min / sigma_max / rho settings
    "Schedule max sigma": ("schedule_sigma_max", float),
    "Schedule rho": ("schedule_rho", float),
    "Discard penultimate sigma": ("discard_penultimate_sigma", bool),
    "UniPC variant": ("unipc_variant", str),      # A1111's uni_pc_* options' labels, which it reads (`_unipc_options`)
    "UniPC order": ("unipc_order", int),
    "UniPC lower order final": ("unipc_lower_order_final", bool),
    "Downcast alphas_cumprod": ("downcast_alphas_cumprod", bool),   # A1111's use_downcasted_alpha_bar
    "Emphasis": ("emphasis", str),
    "Old prompt editing timelines": ("old_prompt_editing", bool),   # A1111's use_old_scheduling
    "Beta schedule alpha": ("beta_alpha", float),          # A1111's beta_dist_alpha / beta_dist_beta
    "Beta schedule beta": ("beta_beta", float),
    "SGM noise multiplier": ("sgm_noise_multiplier", bool),
    "CFG scale": ("cfg_scale", float),
    "Image CFG scale": ("image_cfg_scale", float),   # an edit model's (A1111 writes it for those alone)
    "Seed": ("seed", int),
    "Variation seed": ("subseed", int),
    "Variation seed strength": ("subseed_strength", float),
    "Clip skip": ("clip_skip", int),
    "Clip skip rule": ("clip_skip_convention", str),
    "Clip skip SDXL": ("sdxl_clip_l_skip", bool),   # sdlab's label of A1111's sdxl_clip_l_skip (A1111 writes none)
    "Denoising strength": ("strength", float),
    "ENSD": ("eta_noise_seed_delta", int),
    "Token merging ratio": ("token_merging_ratio", float),
    "Token merging ratio hr": ("token_merging_ratio_hr", float),
    "RNG": ("rng", str),
    "Sigma churn": ("s_churn", float),     # A1111's labels of k-diffusion's churn and s_noise (`Sampler.initialize`)
    "Sigma tmin": ("s_tmin", float),
    "Sigma tmax": ("s_tmax", float),
    "Sigma noise": ("s_noise", float),
    "CFG rescale": ("guidance_rescale", float),
    "NGMS": ("s_min_uncond", float),       # A1111's guidance options (`CFGDenoiser.forward`, `add_infotext`)
    "NGMS all steps": ("s_min_uncond_all", bool),
    "Skip Early CFG": ("skip_early_cond", float),
    "Pad conds": ("pad_cond_uncond", bool),
    "Pad conds v0": ("pad_cond_uncond_v0", bool),
    "PerturbedAttentionGuidance_scale": ("pag_scale", float),   # Forge's built-in PAG script's label (`pag_parameters`)
    "PAG adaptive scale": ("pag_adaptive_scale", float),        # sdlab's labels of diffusers' options Forge lacks
    "Mask blur": ("mask_blur", float),
    "Mask blur x": ("mask_blur", float),   # sdlab's labels of unequal sigmas, where A1111 writes no Mask blur
    "Mask blur y": ("mask_blur_y", float),
    "Mask round": ("mask_round", bool),    # sdlab's label of A1111's mask_round off (A1111 writes none)
    "Mask grow": ("mask_grow", int),       # sdlab's label of ComfyUI's VAEEncodeForInpaint grow_mask_by
    "Noise multiplier": ("noise_multiplier", float),
    "Extra noise": ("extra_noise", float),                 # A1111's img2img_extra_noise
    "Conditional mask weight": ("inpainting_mask_weight", float),
    "Masked content": ("inpaint_fill", str),
    "Masked area padding": ("inpaint_padding", int),
    "Initial noise": ("init_noise", str),
    "Batch noise": ("batch_noise", str),
    "Img2img steps": ("img2img_convention", str),
    "Control steps": ("control_convention", str),
    "Timestep rounding": ("quantize_timesteps", bool),
    "Tiling": ("tiling", bool),
    "Hires upscale": ("hr_scale", float),
    "Hires steps": ("hr_steps", int),
    "Hires upscaler": ("hr_upscaler", str),
    "Hires sampler": ("hr_sampler", str),
    "Hires schedule type": ("hr_schedule", str),
    "Hires eta": ("hr_eta", float),         # sdlab's label of a hires eta that A1111's labels cannot hold (`_etas`)
    "Hires seed": ("hr_seed", int),
    "Hires CFG Scale": ("hr_cfg_scale", float),     # Forge's label of its hires CFG
    "Hires convention": ("hr_convention", str),     # sdlab's: "comfyui", ComfyUI's two-pass graph
    "Hires crop": ("hr_crop", str),
    "Hires denoising strength": ("hr_denoise", float),  # sdlab's: the second pass's where Denoising strength is
                                                        # img2img's (ComfyUI's two-pass graph from a VAEEncode)
    "Hires prompt": ("hr_prompt", str),
    "Hires negative prompt": ("hr_negative_prompt", str),
    "SDXL aesthetic score": ("aesthetic_score", float),
    "SDXL negative aesthetic score": ("negative_aesthetic_score", float),
}
# sdlab's labels of SDXL's size conditioning (A1111 records none: its sizes are the picture's, its crop corner an
# option): a size label -> its (height, width) field, written WIDTHxHEIGHT as Size is; a crop corner's (top, left)
# field -> its two labels
_SDXL_SIZES = {"SDXL original size": "original_size", "SDXL target size": "target_size",
               "SDXL negative original size": "negative_original_size",
               "SDXL negative target size": "negative_target_size"}
_SDXL_CROPS = {"crops_coords_top_left": ("SDXL crop top", "SDXL crop left"),
               "negative_crops_coords_top_left": ("SDXL negative crop top", "SDXL negative crop left")}
_SDXL_SCORES = ("SDXL aesthetic score", "SDXL negative aesthetic score")


@dataclass(frozen=True)
class LoraRef:
    """A LoRA as the parameters name it: A1111's name (the file's stem), its weight and its short hash."""

    name: str
    weight: float = 1.0
    hash: str | None = None


@dataclass(frozen=True)
class RefinerRef:
    """The SDXL refiner that finished a picture, as the parameters name it: its name and short hash (A1111's
    `Refiner: name [hash]`), the fraction of the schedule the base ran (`Refiner switch at`) and the rule
    that picked the handoff step from it (sdlab's `Refiner steps`: "diffusers", "a1111" or "a1111_steps",
    `plan.handoff_index`)."""

    name: str
    hash: str | None
    switch_at: float
    convention: str


def refiner_label(name: str, hash: str | None) -> str:
    """A1111's `Refiner` value: the refiner's name and, when known, its short hash (`name [hash]`)."""
    return name + (f" [{hash}]" if hash else "")


def _format_weight(weight: float) -> str:
    return f"{weight:g}"


def split_lora_tags(prompt: str) -> tuple[str, list[LoraRef]]:
    """(the prompt without its `<lora:...>` / `<lyco:...>` tags, the LoRAs they name at their text-encoder
    weight), read by `prompt_loras.split_prompt_loras`. A bad weight raises ValueError."""
    bare, tags = split_prompt_loras(prompt)
    return bare, [LoraRef(tag.name, tag.te_weight) for tag in tags]


def tag_loras(prompt: str, merged: Mapping[str, float], find: Callable[[str], Path | None],
              hash_of: Callable[[Path], str | None]) -> tuple[str, str, list[LoraRef]]:
    """A prompt's `<lora:...>` tags resolved once, as `sdlab txt2img` and the server both resolve them: (the
    prompt the pipeline draws, the prompt to record: `without_merged_tags` of the LoRAs `merged` at load,
    name -> weight; the LoRAs the drawn prompt's tags merge, as the parameters name them). Each tag's file is
    found by `find` and read (`resolve_prompt_loras`: a missing or unreadable one is a RequestError, a bad
    tag a ValueError); its ref carries the hash `hash_of` gives the file found, one ref per name as A1111's
    `Lora hashes` (a name tagged twice is merged twice, at its last tag's weight)."""
    drawn, recorded = without_merged_tags(prompt, merged)
    return drawn, recorded, tag_refs(drawn, find, hash_of)


def drawn_hires_prompt(hr_prompt: str | None, merged: Mapping[str, float]) -> str | None:
    """The hires prompt the second pass draws when the LoRAs `merged` (name -> weight) are merged at load: the
    first pass's rule (`without_merged_tags`), a tag of one of them left out, so the load's weight wins in both
    passes and the LoRA is not merged twice; " " where nothing else was in it (an empty one is the prompt's)."""
    if not hr_prompt or not any(tag.name in merged for tag in split_prompt_loras(hr_prompt)[1]):
        return hr_prompt
    return without_merged_tags(hr_prompt, merged)[0] or " "


def tag_refs(prompt: str, find: Callable[[str], Path | None],
             hash_of: Callable[[Path], str | None], field: str = "prompt") -> list[LoraRef]:
    """The LoRAs `prompt`'s tags merge, one ref per name in the order first tagged, each file found by `find`
    and hashed by `hash_of` (`resolve_prompt_loras`: a missing or unreadable one is a RequestError)."""
    refs: dict[str, LoraRef] = {}
    for use in resolve_prompt_loras(prompt, find, field)[1]:
        if use.name not in refs:
            refs[use.name] = LoraRef(use.name, use.te_weight, hash_of(use.path))
    return list(refs.values())


def hires_tag_refs(req: GenerationRequest, find: Callable[[str], Path | None],
                   hash_of: Callable[[Path], str | None]) -> list[LoraRef]:
    """`tag_refs` of a hires request's hires prompt (the LoRAs its second pass merges), none without one."""
    return tag_refs(req.hr_prompt, find, hash_of, "hires prompt") if req.hires else []


def with_lora_tags(prompt: str, loras: Sequence[LoraRef]) -> str:
    """`prompt` with a `<lora:NAME:WEIGHT>` tag for each LoRA it does not name yet (appended, A1111 style)."""
    named = {ref.name for ref in split_lora_tags(prompt)[1]}
    tags = [f"<lora:{ref.name}:{_format_weight(ref.weight)}>" for ref in loras if ref.name not in named]
    return " ".join([prompt, *tags]) if prompt and tags else prompt or " ".join(tags)


def format_hashes(pairs: Iterable[tuple[str, str | None]]) -> str | None:
    """A1111's `Lora hashes` / `TI hashes` value, `"name: hash, name: hash"` (names without ':' or ',')."""
    items = [f"{name.replace(':', '').replace(',', '')}: {hash_}" for name, hash_ in pairs if hash_]
    return ", ".join(items) or None


def parse_lora_hashes(value: Any) -> dict[str, str]:
    """`Lora hashes` text -> {name: hash}; malformed items are skipped."""
    result = {}
    for item in str(value or "").split(","):
        name, sep, hash_ = item.partition(":")
        if sep and name.strip() and hash_.strip():
            result[name.strip()] = hash_.strip()
    return result


def to_parameters(req: GenerationRequest, *, index: int = 0, model_name: str | None = None,
                  model_hash: str | None = None, loras: Sequence[LoraRef] = (),
                  prompt: str | None = None, embeddings: Sequence[tuple[str, str]] = (),
                  refiner: RefinerRef | None = None,
                  vae: tuple[str, str | None] | None = None,
                  hires_loras: Sequence[LoraRef] = (), family: FamilySpec | None = None) -> dict[str, Any]:
    """The labelled parameters of image `index` of a resolved request (its seed is seed + index).

    `loras` are the LoRAs merged into the model: each gets a `<lora:NAME:WEIGHT>` tag in the prompt
    (unless `prompt`, the text as the user wrote it, already has one) and its hash in `Lora hashes`. The
    prompts are recorded without their comments (`strip_comments`), as A1111 records them.
    `embeddings` are the (name, hash) of the textual-inversion embeddings the prompts use (`TI hashes`).
    `refiner` is the SDXL refiner that finished the schedule, written as A1111 writes it (`Refiner: name
    [hash]`, `Refiner switch at`) with the handoff rule (`Refiner steps`). `vae` is a standalone VAE that replaced the
    model's: (file name, short hash), A1111's `VAE hash` and `VAE`. `hires_loras` are the LoRAs the hires prompt's
    tags merge in the second pass (`tag_refs`): `Lora hashes` names those not in `loras` after them, as A1111's
    `lora_hashes` gathers both passes' networks. `family`: the drawing model's (None: unknown); an edit
    (InstructPix2Pix) model's img2img without image guidance (image scale None) is recorded as `Image guidance: none`
    (`no_image_guidance_label`), and Conditional mask weight is written where the model drew with inpainting
    conditioning (`uses_inpainting_conditioning`).
    """
    p: dict[str, Any] = {
        PROMPT: with_lora_tags(strip_comments(req.prompt if prompt is None else prompt), loras),
        NEGATIVE_PROMPT: strip_comments(req.negative_prompt),
        "Steps": req.steps,
        "Sampler": req.sampler,
        "Schedule type": a1111_label(req.schedule),
        **_schedule_overrides(req),
        "CFG scale": req.cfg_scale,
        "Image CFG scale": req.image_cfg_scale,     # None unless an edit model drew with it (`drawn_request`)
        "Image guidance": no_image_guidance_label(req, family is not None and family.is_edit),
        "Seed": req.seeds()[index],
        "Size": "{}x{}".format(*hires_base_size(req)) if req.hires else f"{req.width}x{req.height}",
        "Variation seed": req.subseeds()[index] if req.subseed_strength else None,
        "Variation seed strength": req.subseed_strength or None,
        "Seed resize from": f"{req.seed_resize_from_w}x{req.seed_resize_from_h}" if req.seed_resize_from_w else None,
        "Model hash": model_hash,
        "Model": model_name,
        "VAE hash": None if vae is None else vae[1],
        "VAE": None if vae is None else vae[0],
        "Clip skip": req.clip_skip if req.clip_skip != 1 else None,
        "Clip skip rule": "a1111" if (req.clip_skip != 1 or req.sdxl_clip_l_skip) and req.clip_skip_convention == "a1111"
        else "comfyui" if req.clip_skip_convention == "comfyui" else None,   # its 1 is not the usual layer
        "Clip skip SDXL": True if req.sdxl_clip_l_skip else None,
        "Prompt 2": strip_comments(req.prompt_2) or None,
        "Negative prompt 2": strip_comments(req.negative_prompt_2) or None,
        **prompt_option_parameters(req),
        "Empty negative": _empty_negative(req),
        "Denoising strength": None,      # its place in the text; the hires fix's or img2img's value below
        "Conditional mask weight": req.inpainting_mask_weight if uses_inpainting_conditioning(family, req) else None,
        **hires_parameters(req, merged_at_load(req, loras), index=index),
        **_eta_parameters(req),
        **_unipc_options(req),
        "ENSD": _ensd(req),
        # A1111's create_infotext: each where not 0, the hires one (its ratio, else the first pass's) with the hires fix
        "Token merging ratio": req.token_merging_ratio or None,
        "Token merging ratio hr": (req.token_merging_ratio_hr or req.token_merging_ratio or None) if req.hires else None,
        "RNG": req.rng,                  # A1111 leaves out its default, GPU; sdlab writes every source
        "Sigma churn": _taken(req, "s_churn", req.s_churn or None),
        "Sigma tmin": _taken(req, "s_tmin", req.s_tmin or None) if req.s_churn else None,
        "Sigma tmax": _taken(req, "s_tmax", req.s_tmax or None) if req.s_churn else None,
        "Sigma noise": _taken(req, "s_noise", req.s_noise if req.s_noise != 1.0 else None),
        "CFG rescale": req.guidance_rescale or None,
        **guidance_parameters(req),
        **pag_parameters(req),
        **img2img_parameters(req),
        "SGM noise multiplier": True if _sgm_noise_multiplied(req) else None,
        "Initial noise": _initial_noise(req),
        "Batch noise": req.batch_noise if req.batch_noise != "per_image" else None,   # sdlab's: ComfyUI's batch
        "Img2img steps": req.img2img_convention if req.init_image is not None else None,
        "Timestep rounding": "true" if req.quantize_timesteps else None,
        "Tiling": "True" if req.tiling else None,            # A1111's label and value (processing.py)
        **freeu_parameters(req.freeu),
        **deep_cache_parameters(req.deep_cache),
        "Downcast alphas_cumprod": True if req.downcast_alphas_cumprod else None,   # apply_alpha_schedule_override
        "Noise Schedule": _ZERO_SNR if req.zero_terminal_snr else None,
        **sdxl_parameters(req),
        **_unit_lines(req),
        "Control steps": req.control_convention if req.controls or _prompts_follow_convention(req) else None,
        **{label: line for label, line in image_prompt_lines(req.ip_adapters).items()
           if not label.startswith("ControlNet ")},                        # sdlab's own `IP-Adapter N` lines
        "Refiner": None if refiner is None else refiner_label(refiner.name, refiner.hash),
        "Refiner switch at": None if refiner is None else refiner.switch_at,
        "Refiner steps": None if refiner is None else refiner.convention,
        "Refiner switch by sampling steps": True if refiner and refiner.convention == "a1111_steps" else None,
        "Lora hashes": format_hashes(_both_passes(loras, hires_loras)),
        "TI hashes": format_hashes(embeddings),
        "Version": version_label(),
    }
    return p


def no_image_guidance_label(req: GenerationRequest, edit_model: bool) -> str | None:
    """sdlab's `Image guidance: none` where an edit model drew an img2img picture without image guidance (image scale
    None: A1111's unset field), which A1111 records by leaving `Image CFG scale` out; a picture without either label
    (any other model's, which never writes it) reads as the default image scale, as A1111's paste leaves its slider.
    A1111 passes over the label (its paste knows no such field and adds no setting for it)."""
    if edit_model and req.init_image is not None and req.image_cfg_scale is None:
        return NO_IMAGE_GUIDANCE
    return None


def merged_at_load(req: GenerationRequest, loras: Sequence[LoraRef]) -> list[LoraRef]:
    """The LoRAs of `loras` merged into the model when it loads (`--lora`, the native API's `loras`), which draw
    both passes: those the drawn prompt `req.prompt` does not tag (`tag_loras` leaves their tags out of it; the
    others its tags merge for the first pass alone)."""
    tagged = {ref.name for ref in split_lora_tags(req.prompt)[1]}
    return [ref for ref in loras if ref.name not in tagged]


def _both_passes(loras: Sequence[LoraRef], hires_loras: Sequence[LoraRef]) -> list[tuple[str, str | None]]:
    """(name, hash) of the first pass's LoRAs, then of the hires pass's not named yet (A1111's `p.lora_hashes`:
    one entry a name, kept through the hires pass's `activate`)."""
    named = {ref.name for ref in loras}
    return [(ref.name, ref.hash) for ref in [*loras, *(ref for ref in hires_loras if ref.name not in named)]]


def prompt_option_parameters(req: GenerationRequest) -> dict[str, Any]:
    """A1111's `Emphasis` (its mode, where not "Original" and a prompt has a bracket, as `sd_hijack_clip` writes
    it; for "None" a BREAK too, which that mode leaves as a word) and `Old prompt editing timelines` (where the old
    rule gives a prompt another schedule, as `get_conds_with_caching` writes it: over the first pass's calls, and
    the hires pass's)."""
    texts = [strip_comments(req.prompt), strip_comments(req.negative_prompt)]
    marks = ("(", "[", "BREAK") if req.emphasis == "None" else ("(", "[")
    emphasis = req.emphasis != "Original" and any(mark in text for text in texts for mark in marks)
    return {"Emphasis": req.emphasis if emphasis else None,
            "Old prompt editing timelines": True if req.old_prompt_editing and _old_rule_differs(req, texts) else None}


def _old_rule_differs(req: GenerationRequest, texts: list[str]) -> bool:
    """Whether A1111's old prompt-editing rule changes a schedule of `texts` in the request's passes (A1111 counts
    a second-order sampler's model calls: `SamplerSpec.calls_per_step`)."""
    try:
        calls = get_sampler(req.sampler).calls_per_step
    except UnknownSamplerError:
        calls = 1
    passes = [(req.steps * calls, None)]
    if req.hires:
        passes.append((req.steps * calls, (req.hr_steps or req.steps) * calls))
    return any(old_rule_differs(texts, steps, hires_steps) for steps, hires_steps in passes)


def guidance_parameters(req: GenerationRequest) -> dict[str, Any]:
    """A1111's labels of its guidance options where set: `NGMS` (with `NGMS all steps`), `Skip Early CFG`, and the Pad
    conds rule in use, v0's where both are set (A1111 writes each where it skipped or padded: the same picture)."""
    return {"NGMS": req.s_min_uncond or None,
            "NGMS all steps": True if req.s_min_uncond and req.s_min_uncond_all else None,
            "Skip Early CFG": req.skip_early_cond or None,
            "Pad conds": True if req.pad_cond_uncond and not req.pad_cond_uncond_v0 else None,
            "Pad conds v0": True if req.pad_cond_uncond_v0 else None}


def _unit_lines(req: GenerationRequest) -> dict[str, str]:
    """The `ControlNet N` lines of the request's ControlNets and of its A1111 IP-Adapter units, numbered as the
    ControlNet extension numbers its enabled units (`Infotext.write_infotext`): an IP-Adapter unit at its place
    (`IPAdapterInput.unit`), the ControlNets in order in the places left."""
    units = {label: line for label, line in image_prompt_lines(req.ip_adapters, first_unit=len(req.controls)).items()
             if label.startswith("ControlNet ")}
    number = lambda label: int(label.removeprefix("ControlNet "))            # noqa: E731
    free = (n for n in itertools.count() if f"ControlNet {n}" not in units)
    controls = {f"ControlNet {next(free)}": line for line in infotext_lines(req.controls, req.control_convention).values()}
    return dict(sorted({**controls, **units}.items(), key=lambda item: number(item[0])))


def _prompts_follow_convention(req: GenerationRequest) -> bool:
    """Whether `Control steps` decides how an image prompt of the request is drawn: one acts on part of the steps
    (which it then picks), or the convention is A1111's, which also prepares the pictures as A1111's ControlNet
    extension does (`image_prompt.picture_pixels`)."""
    return any(getattr(prompt, "windowed", False) for prompt in req.ip_adapters) \
        or bool(req.ip_adapters and req.control_convention == "a1111")


def pag_parameters(req: GenerationRequest) -> dict[str, Any]:
    """Perturbed-attention guidance where it guided: Forge's labels (its built-in PerturbedAttentionGuidance script:
    `PerturbedAttentionGuidance_enabled: True`, `PerturbedAttentionGuidance_scale`), whose picture is diffusers' at
    the default layers without an adaptive scale; sdlab's `PAG adaptive scale` and `PAG layers` (a JSON list of
    diffusers' pag_applied_layers) where they are not the defaults."""
    if not req.pag_scale:
        return {}
    return {"PerturbedAttentionGuidance_enabled": True, "PerturbedAttentionGuidance_scale": req.pag_scale,
            "PAG adaptive scale": req.pag_adaptive_scale or None,
            "PAG layers": None if tuple(req.pag_layers) == DEFAULT_LAYERS else json.dumps(list(req.pag_layers))}


def _pag_fields(p: dict[str, Any]) -> dict[str, Any]:
    """The PAG fields of parsed parameters (`pag_parameters`): Forge's `PerturbedAttentionGuidance_enabled: False`
    turns its scale off, `PAG layers` is a JSON list of layer entries."""
    fields: dict[str, Any] = {}
    if str(p.get("PerturbedAttentionGuidance_enabled", "true")).lower() in ("false", "0", "no"):
        fields["pag_scale"] = 0.0
    if "PAG layers" in p:
        try:
            layers = json.loads(str(p["PAG layers"]))
        except json.JSONDecodeError:
            layers = None
        if not (isinstance(layers, list) and layers and all(isinstance(entry, str) for entry in layers)):
            raise ValueError(f"the PNG's 'PAG layers' value {p['PAG layers']!r} is not a JSON list of layer names")
        fields["pag_layers"] = tuple(layers)
    return fields


def sdxl_parameters(req: GenerationRequest) -> dict[str, Any]:
    """sdlab's labels of SDXL's size and aesthetic conditioning (`_SDXL_SIZES`, `_SDXL_CROPS`, `_SDXL_SCORES`),
    each where the request sets a value other than the default (None values are left out of the text)."""
    p: dict[str, Any] = {label: None if getattr(req, name) is None else "{1}x{0}".format(*getattr(req, name))
                         for label, name in _SDXL_SIZES.items()}
    for name, labels in _SDXL_CROPS.items():
        corner = tuple(getattr(req, name))
        p.update(zip(labels, (None, None) if corner == _REQUEST_DEFAULTS[name] else corner))
    for label in _SDXL_SCORES:
        name = _FIELDS[label][0]
        p[label] = None if getattr(req, name) == _REQUEST_DEFAULTS[name] else getattr(req, name)
    return p


FREEU_LABELS = {f"freeu_{name}": name for name in (*FREEU_FACTORS, *FREEU_WINDOW)}
"""Forge's FreeU Integrated labels of the four factors and the step window (its `extra_generation_params`, with
`freeu_enabled: True`) and the `FreeU` field each holds."""


def freeu_parameters(freeu: FreeU | None) -> dict[str, Any]:
    """FreeU where it is on: Forge's labels (its built-in FreeU Integrated, which draws ComfyUI's FreeU_V2:
    `freeu_enabled: True`, `freeu_b1` .. `freeu_s2`, `freeu_start`, `freeu_end`), and sdlab's `FreeU version: 1`
    (v1) and `FreeU convention: diffusers` where they are not Forge's."""
    if freeu is None:
        return {}
    return {"freeu_enabled": True, **{label: getattr(freeu, name) for label, name in FREEU_LABELS.items()},
            "FreeU version": freeu.version if freeu.version != 2 else None,
            "FreeU convention": freeu.convention if freeu.convention != "comfyui" else None}


DEEP_CACHE_LABELS = {f"DeepCache {name}": name for name in DEEP_CACHE_FIELDS}
"""sdlab's labels of DeepCache's fields (`DeepCache interval: 3, DeepCache branch: 0`): A1111 has no DeepCache of its
own, and its DeepCache extension (sd-webui-deepcache-standalone) writes none."""


def deep_cache_parameters(deep_cache: DeepCache | None) -> dict[str, Any]:
    """DeepCache where it is on: its interval and branch under `DEEP_CACHE_LABELS`."""
    if deep_cache is None:
        return {}
    return {label: getattr(deep_cache, name) for label, name in DEEP_CACHE_LABELS.items()}


def _deep_cache_fields(p: dict[str, Any]) -> dict[str, Any]:
    """The `deep_cache` field of parsed parameters (`deep_cache_parameters`) as the native API's object: on where
    either label is there, the other one's value `DeepCache`'s default."""
    given = {name: p[label] for label, name in DEEP_CACHE_LABELS.items() if label in p}
    if not given:
        return {}
    try:
        return {"deep_cache": {name: int(str(value)) for name, value in given.items()}}
    except ValueError:
        raise ValueError(f"the PNG's DeepCache values {given!r} are not whole numbers") from None


def _freeu_fields(p: dict[str, Any]) -> dict[str, Any]:
    """The `freeu` field of parsed parameters (`freeu_parameters`) as the native API's object: on where
    `freeu_enabled` is true; a factor or window end the text leaves out (Forge before its PR #1689 wrote no
    freeu_start / freeu_end) is `FreeU`'s default."""
    if str(p.get("freeu_enabled", "false")).lower() not in ("true", "1", "yes"):
        return {}
    setting: dict[str, Any] = {"version": p.get("FreeU version", 2), "convention": p.get("FreeU convention", "comfyui")}
    for label, name in FREEU_LABELS.items():
        if label in p:
            setting[name] = p[label]
    try:
        setting = {**setting, **{name: float(setting[name]) for name in FREEU_LABELS.values() if name in setting},
                   "version": int(setting["version"]), "convention": str(setting["convention"])}
    except (TypeError, ValueError):
        raise ValueError(f"the PNG's FreeU values {setting!r} are not numbers") from None
    return {"freeu": setting}


def _empty_negative(req: GenerationRequest) -> str | None:
    """sdlab's `Empty negative` label (`_EMPTY_NEGATIVES`): the rule the request sets for its empty negative
    prompt, none where the negative is not empty or the model's rule holds."""
    if req.negative_prompt or req.zero_empty_negative is None:
        return None
    return next(word for word, zeros in _EMPTY_NEGATIVES.items() if zeros == req.zero_empty_negative)


def img2img_parameters(req: GenerationRequest) -> dict[str, Any]:
    """A1111's img2img labels, its `extra_generation_params` of an img2img run (None values are left out of
    the text): Denoising strength, the inpainting labels (`_inpaint_parameters`) and Noise multiplier when not
    1 (`StableDiffusionProcessingImg2Img.sample`); none for txt2img."""
    if req.init_image is None:
        return {}
    return {"Denoising strength": req.strength, **_inpaint_parameters(req),
            "Noise multiplier": req.noise_multiplier if req.noise_multiplier != 1.0 else None,
            "Extra noise": req.extra_noise or None}


def uses_inpainting_conditioning(family: FamilySpec | None, req: GenerationRequest) -> bool:
    """A1111's `is_using_inpainting_conditioning` of `req` drawn by a model of `family` (None: unknown, false), where
    its infotext writes Conditional mask weight, at 1 too (A1111 1.10 processing.py): `txt2img_image_conditioning`
    sets it where the model's `conditioning_key` is 'hybrid' or 'concat' (SD1's and SD2's 9-channel inpainting
    models; not SDXL's, whose key is 'crossattn'), `inpainting_image_conditioning` for any 9-channel model (SDXL's
    too, `is_sdxl_inpaint`), which img2img's `init` reaches and so does the hires pass of txt2img (`sample_hr_pass`)
    but for a latent upscale at a Conditional mask weight of 1, which takes txt2img's conditioning again. An edit
    (InstructPix2Pix) model's img2img is its `edit_image_conditioning`: false."""
    if family is None or not family.is_inpaint:
        return False
    if req.init_image is not None or not family.is_sdxl:
        return True
    latent_at_full_weight = is_latent_upscaler(req.hr_upscaler or "") and req.inpainting_mask_weight >= 1.0
    return req.hires and not latent_at_full_weight


def _inpaint_parameters(req: GenerationRequest) -> dict[str, Any]:
    """A1111's inpainting labels (`StableDiffusionProcessingImg2Img.init`): Mask mode "Inpaint not masked" for
    an inverted mask, Mask blur when it blurs (A1111 writes it only when x and y are equal: sdlab writes its own
    Mask blur x / y otherwise), Masked content unless it is "original", Inpaint area "Only masked" with its
    Masked area padding (A1111 writes no "Whole picture" and no resize mode); sdlab's Mask round: False for
    A1111's mask_round off, which changes the picture of a soft mask (and is on as drawn for another: `OFF_UNLESS_DRAWN`)
    and has no A1111 label; sdlab's Mask grow (ComfyUI's VAEEncodeForInpaint grow_mask_by) when it grows."""
    if req.mask_image is None:
        return {}
    uneven = req.mask_blur_y is not None and req.mask_blur_y != req.mask_blur
    return {
        "Mask mode": "Inpaint not masked" if req.invert_mask else None,
        "Mask blur": None if uneven else req.mask_blur or None,
        "Mask blur x": req.mask_blur if uneven else None,
        "Mask blur y": req.mask_blur_y if uneven else None,
        "Inpaint area": "Only masked" if req.inpaint_only_masked else None,
        "Masked area padding": req.inpaint_padding if req.inpaint_only_masked else None,
        "Masked content": None if req.inpaint_fill == "original" else req.inpaint_fill,
        "Mask round": None if req.mask_round else False,
        "Mask grow": req.mask_grow or None,
    }


def hires_parameters(req: GenerationRequest, merged: Sequence[LoraRef] = (), *, index: int = 0) -> dict[str, Any]:
    """A1111's hires fix labels, its `extra_generation_params` of a hires run (None values are left out of the
    text): the second pass's Denoising strength (an img2img's, whose Denoising strength is its own: Hires denoising
    strength), its own Hires sampler, Hires prompt, Hires negative prompt and Hires
    schedule type where they differ from the first pass's, Hires upscale (or Hires resize WxH, 0 = unset), Hires steps
    (when set), Hires upscaler (a model file by A1111's name of it: `a1111_upscaler_name`), Hires seed and Hires
    CFG Scale where set, Hires convention and Hires crop where not A1111's, Extra noise where the second pass
    added it; none without it. The Hires prompt carries a tag of
    each LoRA `merged` at load, as the prompt does: A1111 draws a hires prompt's own tags in the second pass. The
    Hires seed is image `index`'s: the second pass numbers its seeds from hr_seed as the first from seed
    (`hires.second_pass_request`'s `seeds()`: hr_seed + index, or hr_seed for each with a variation seed)."""
    if not req.hires:
        return {}
    sized = bool(req.hr_width or req.hr_height)
    hr_prompt = strip_comments(req.hr_prompt)
    upscaler = req.hr_upscaler
    if upscaler is not None and os.path.isfile(upscaler):
        upscaler = a1111_upscaler_name(os.path.splitext(os.path.basename(upscaler))[0])
    img2img = req.init_image is not None            # its Denoising strength the first pass's (`img2img_parameters`)
    return {
        "Denoising strength": None if img2img else req.hr_denoise,
        "Hires denoising strength": req.hr_denoise if img2img else None,
        "Hires sampler": req.hr_sampler,                # A1111's order: its `init`, then calculate_target_resolution
        "Hires prompt": with_lora_tags(hr_prompt, merged) if hr_prompt else None,
        "Hires negative prompt": strip_comments(req.hr_negative_prompt) or None,
        "Hires schedule type": a1111_label(req.hr_schedule) if req.hr_schedule else None,
        "Hires upscale": None if sized else req.hr_scale,
        "Hires resize": f"{req.hr_width or 0}x{req.hr_height or 0}" if sized else None,
        "Hires steps": req.hr_steps or None,
        "Hires upscaler": upscaler,
        "Hires seed": None if req.hr_seed is None else req.hr_seed + (0 if req.subseed_strength else index),
        "Hires CFG Scale": req.hr_cfg_scale,
        "Hires convention": None if req.hr_convention == "a1111" else req.hr_convention,
        "Hires crop": None if req.hr_crop == "disabled" else req.hr_crop,
        "Extra noise": req.extra_noise or None,        # A1111's `sample_img2img` of the second pass
    }


def _ensd(req: GenerationRequest) -> int | None:
    """A1111's ENSD label, where the sampler draws Gaussian step noise at the request's eta or churn (A1111's
    `is_sampler_using_eta_noise_seed_delta`, which leaves out churn's and its DDIM's at an eta above 0, though both
    draw from the same seed + ENSD generators; `SamplerSpec.draws_step_noise`): not 0 under an A1111 name (a
    ComfyUI-spelt sampler is recorded under its A1111 name where it has one), where an unset ENSD is 0, but 0 too
    under a ComfyUI-only name, where an unset one is 1 (`request.default_ensd`). A sampler sdlab does not know
    keeps any ENSD but 0."""
    ensd = req.eta_noise_seed_delta or 0
    try:
        spec = get_sampler(req.sampler)
    except UnknownSamplerError:
        return ensd or None
    if not spec.draws_step_noise(req.eta, req.s_churn):
        return None
    return ensd if ensd or comfyui_spelling(req.sampler) else None


def _schedule_overrides(req: GenerationRequest) -> dict[str, Any]:
    """A1111's `Schedule min sigma` / `max sigma` / `rho` where a pass's schedule took them and `Discard
    penultimate sigma` where it dropped a sigma a pass's sampler row keeps (`KDiffusionSampler.get_sigmas`, which
    each pass runs and which writes them into the one `extra_generation_params`): a hires pass's schedule or
    sampler of its own counts as the first pass's does, so a first pass that ignores the ends (Uniform) and a
    hires one that takes them (Karras) records the ends the hires pass drew. None for a request without a schedule
    or with a sampler or schedule sdlab does not know."""
    if req.schedule is None:
        return {}
    passes = [(req.sampler, req.schedule)]
    if req.hires:
        passes.append((req.hr_sampler or req.sampler, req.hr_schedule or req.schedule))
    taken: dict[str, float] = {}
    discards = False
    try:
        for sampler, schedule in passes:
            taken.update(schedule_overrides(schedule, sigma_min=req.schedule_sigma_min,
                                            sigma_max=req.schedule_sigma_max, rho=req.schedule_rho,
                                            alpha=req.beta_alpha, beta=req.beta_beta))
            discards = discards or also_discards(get_sampler(sampler), req.discard_penultimate_sigma)
    except (UnknownSamplerError, UnknownDiscretizationError):
        return {}
    beta = "alpha" in taken or "beta" in taken         # A1111 writes both with its Beta schedule
    return {"Schedule min sigma": taken.get("sigma_min"), "Schedule max sigma": taken.get("sigma_max"),
            "Schedule rho": taken.get("rho"),
            "Beta schedule alpha": req.beta_alpha if beta else None, "Beta schedule beta": req.beta_beta if beta else None,
            "Discard penultimate sigma": discards or None}


_UNIPC_OPTIONS = {"UniPC variant": "unipc_variant", "UniPC order": "unipc_order",
                  "UniPC lower order final": "unipc_lower_order_final"}


def _unipc_options(req: GenerationRequest) -> dict[str, Any]:
    """A1111's UniPC options under the labels it reads them from (its options' infotext names; it writes none),
    where one is not its default and A1111's UniPC draws either pass (`request.runs_a1111_unipc`)."""
    if not runs_a1111_unipc(req):
        return {}
    return {label: value for label, name in _UNIPC_OPTIONS.items()
            if (value := getattr(req, name)) != _REQUEST_DEFAULTS[name]}


def _sgm_noise_multiplied(req: GenerationRequest) -> bool:
    """A1111's `SGM noise multiplier` label: where it scaled the start noise (`request.sgm_noise_multiplied`)."""
    try:
        return sgm_noise_multiplied(req, get_sampler(req.sampler))
    except UnknownSamplerError:
        return req.sgm_noise_multiplier


def _initial_noise(req: GenerationRequest) -> str | None:
    """sdlab's `Initial noise` label: the start noise's convention where it is not A1111's (sigma_max) or the
    schedule's diffusers one, none where A1111's SGM noise multiplier set it; for a sampler that brings its own
    (`request.sampler_init_noise`, which an unset init_noise resolves to) where the request's is another."""
    implied = _sampler_init_noise(req)
    if implied is not None:
        return None if req.init_noise == implied else req.init_noise
    if _sgm_noise_multiplied(req) and req.init_noise == "vp":
        return None
    return req.init_noise if req.init_noise != "sigma_max" or req.schedule in DIFFUSERS_NAMES else None


def _sampler_init_noise(req: GenerationRequest) -> str | None:
    """The start noise the request's sampler brings with it (`request.sampler_init_noise`); None for one sdlab does
    not know."""
    try:
        return sampler_init_noise(get_sampler(req.sampler), req.schedule)
    except UnknownSamplerError:
        return None


def _taken(req: GenerationRequest, option: str, value: float | None) -> float | None:
    """A1111's `Sigma churn` / `tmin` / `tmax` / `noise` labels (`Sampler.initialize`): `value` (None where it is
    the function's default, or churn's range without churn) where the sampler's function takes `option`. A
    sampler sdlab does not know keeps it."""
    try:
        spec = get_sampler(req.sampler)
    except UnknownSamplerError:
        return value
    return value if option in spec.parameters else None


def _eta_parameters(req: GenerationRequest) -> dict[str, Any]:
    """A1111's eta labels (`Sampler.initialize`, which each pass runs with its sampler): a pass's eta under its
    sampler's label (`eta_label`) where it differs from the default of the sampler's function; an eta left unset
    is the default. A hires eta of its own under the first pass's label, which A1111 cannot draw (one option
    holds both), is sdlab's `Hires eta`."""
    first, first_default = eta_label(req.sampler)
    labels = {first: req.eta} if first and req.eta not in (None, first_default) else {}
    if not req.hires:
        return labels
    label, default = eta_label(req.hr_sampler or req.sampler)
    eta = req.eta if req.hr_eta is None else req.hr_eta
    if label not in (None, first) and eta not in (None, default):
        labels[label] = eta
    elif label == first and req.hr_eta is not None and _or(req.hr_eta, default) != _or(req.eta, first_default):
        labels["Hires eta"] = req.hr_eta
    return labels


def _or(eta: float | None, default: float | None) -> float | None:
    """`eta`, else `default` (what a sampler draws an unset eta with)."""
    return default if eta is None else eta


def eta_label(sampler: str | None) -> tuple[str | None, float | None]:
    """A1111's label of `sampler`'s eta and the eta its function draws by default: `Eta DDIM` for A1111's timestep
    samplers, `Eta` for the others (k-diffusion's), None for a function that takes no eta. A sampler sdlab does
    not know keeps its eta as `Eta`."""
    try:
        spec = get_sampler(sampler)
    except UnknownSamplerError:
        return "Eta", None
    if spec.default_eta is None:
        return None, None
    return "Eta DDIM" if spec.a1111 in A1111_TIMESTEP_SAMPLERS else "Eta", spec.default_eta


def _etas(p: dict[str, Any], fields: dict[str, Any]) -> dict[str, float]:
    """`eta` and a hires sampler's own `hr_eta` from A1111's eta labels (`_eta_parameters`): where the two passes'
    samplers take their etas under different labels (A1111's `eta_ddim` and `eta_ancestral` options), each pass
    reads its own, a missing one its sampler's default; else `Eta DDIM` where there is one, `Eta` otherwise."""
    etas = {label: _number(p, label) for label in ("Eta", "Eta DDIM") if label in p}
    first, _ = eta_label(fields.get("sampler"))
    second, default = eta_label(fields.get("hr_sampler")) if fields.get("hr_sampler") else (first, None)
    if first is None or second is None or first == second:
        eta = etas.get("Eta DDIM", etas.get("Eta"))
        return {} if eta is None else {"eta": eta}
    split = {"eta": etas.get(first), "hr_eta": etas.get(second, None if first not in etas else default)}
    return {name: eta for name, eta in split.items() if eta is not None}


def _number(p: dict[str, Any], label: str) -> float:
    """The float value of `p`'s `label`, or a ValueError that names it."""
    try:
        return float(p[label])
    except (TypeError, ValueError):
        raise ValueError(f"the PNG's {label!r} value {p[label]!r} is not a valid float") from None


def from_parameters(p: dict[str, Any]) -> dict[str, Any]:
    """`GenerationRequest` keyword arguments from parsed parameters (unknown labels are ignored)."""
    p = {**p, **a1111_backcompat(p)}        # what an A1111 version before a change always drew with
    fields: dict[str, Any] = {"prompt": str(p.get(PROMPT, "")), "negative_prompt": str(p.get(NEGATIVE_PROMPT, ""))}
    for label, (name, kind) in _FIELDS.items():
        if label not in p:
            continue
        value = p[label]
        if kind is bool:
            fields[name] = str(value).lower() in ("true", "1", "yes")
        else:
            try:
                fields[name] = kind(value)
            except (TypeError, ValueError):
                raise ValueError(f"the PNG's {label!r} value {value!r} is not a valid {kind.__name__}") from None
    if "Size" in p:
        width, height = _size_label(p, "Size")
        if min(width, height) <= 0:
            raise ValueError(f"the PNG's Size value {p['Size']!r} is not a positive WIDTHxHEIGHT")
        fields["width"], fields["height"] = width, height
    if "Inpaint area" in p:
        fields["inpaint_only_masked"] = _label_flag("Inpaint area", p["Inpaint area"], _INPAINT_AREAS)
    if "Mask mode" in p:
        fields["invert_mask"] = _label_flag("Mask mode", p["Mask mode"], _MASK_MODES)
    if "Empty negative" in p:
        fields["zero_empty_negative"] = _label_flag("Empty negative", p["Empty negative"], _EMPTY_NEGATIVES)
    if "Noise Schedule" in p:
        fields["zero_terminal_snr"] = _label_flag("Noise Schedule", p["Noise Schedule"], _NOISE_SCHEDULES)
    if "Seed resize from" in p:
        fields["seed_resize_from_w"], fields["seed_resize_from_h"] = _size_label(p, "Seed resize from")
    fields.update(_sdxl_fields(p))
    fields.update(_pag_fields(p))
    fields.update(_freeu_fields(p))
    fields.update(_deep_cache_fields(p))
    if "Hires resize" in p:
        fields["hr_width"], fields["hr_height"] = _size_label(p, "Hires resize")
    if "First pass size" in p:
        fields.update(_old_hires_fix(p, fields))
    _hires_as_pasted(fields)
    for sampler, schedule in (("sampler", "schedule"), ("hr_sampler", "hr_schedule")):
        _sampler_and_schedule(fields, sampler, schedule)
    fields.update(_etas(p, fields))
    if not drawn_by_sdlab(p):
        _as_a1111_ran(fields)
    if "Image guidance" in p and _label_flag("Image guidance", p["Image guidance"], {NO_IMAGE_GUIDANCE: True}):
        fields["image_cfg_scale"] = None    # sdlab's edit picture without image guidance; without either label the
                                            # default (A1111's paste leaves its Image CFG Scale slider as it is)
    for name in ("schedule", "hr_schedule", "hr_sampler"):
        if name in fields and fields[name] is None:         # "Automatic" in sdlab's files: the model's default
            del fields[name]
    return fields


_SAME_AS_FIRST = {"hr_sampler": "Use same sampler", "hr_schedule": "Use same scheduler"}   # A1111's defaults


def _sampler_and_schedule(fields: dict[str, Any], sampler: str, schedule: str) -> None:
    """The read sampler and schedule fields (`sampler` / `schedule`, or the hires pass's) as sdlab names them: an
    older A1111 file's schedule out of the sampler's name ("DPM++ 2M Karras"), A1111's "Use same ..." unset."""
    for name in (sampler, schedule):
        if name in _SAME_AS_FIRST and fields.get(name) == _SAME_AS_FIRST[name]:
            del fields[name]
    name = fields.get(sampler) or ""
    for suffix in (" Karras", " Exponential"):  # older A1111 files name the schedule in the sampler
        if name.endswith(suffix) and schedule not in fields:
            fields[sampler], fields[schedule] = name[: -len(suffix)], suffix.strip()
    if fields.get(schedule) is not None:
        try:
            fields[schedule] = schedule_from_a1111(fields[schedule])
        except ValueError:  # one sdlab lacks: the request's check names it
            fields[schedule] = schedule_key(fields[schedule])


HIRES_FIELDS = ("hr_scale", "hr_width", "hr_height", "hr_upscaler", "hr_steps", "hr_denoise", "hr_sampler",
                "hr_schedule", "hr_eta", "hr_prompt", "hr_negative_prompt", "token_merging_ratio_hr", "hr_seed",
                "hr_cfg_scale", "hr_convention", "hr_crop")
DEFAULT_HR_SCALE = 2.0                      # A1111's Upscale by slider


def _hires_as_pasted(fields: dict[str, Any]) -> None:
    """The hires fix of read fields as A1111 pastes a text (`ui.py`: `enable_hr` where there is a `Denoising
    strength` and a `Hires upscale`, `Hires upscaler` or `Hires resize`): on, the strength its second pass's (where
    sdlab's Hires denoising strength gives none: an img2img's), at its scale 2 where none is named (or a resize of
    0x0); off otherwise, its other labels dropped."""
    if "strength" in fields and any(name in fields for name in ("hr_scale", "hr_upscaler", "hr_width")):
        if "hr_denoise" not in fields:      # sdlab's Hires denoising strength: the strength stays img2img's
            fields["hr_denoise"] = fields.pop("strength")
        if not (fields.get("hr_scale") or fields.get("hr_width") or fields.get("hr_height")):
            fields.update(hr_scale=fields.get("hr_scale") or DEFAULT_HR_SCALE, hr_width=None, hr_height=None)
        return
    for name in HIRES_FIELDS:
        fields.pop(name, None)


def _old_hires_fix(p: dict[str, Any], fields: dict[str, Any]) -> dict[str, int]:
    """The hires fix of A1111's files from before January 2023 as A1111 reads it (`old_hires_sizes`): the first
    pass at `First pass size`, the hires pass at `Size` (A1111's 512 for a missing side)."""
    sizes = old_hires_sizes(_size_label(p, "First pass size"), (fields.get("width", 512), fields.get("height", 512)))
    if sizes is None:
        return {}
    (width, height), (hr_width, hr_height) = sizes
    return {"width": width, "height": height, "hr_width": hr_width, "hr_height": hr_height}


def old_hires_sizes(first: tuple[int, int], size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """A1111's `restore_old_hires_fix_params` of a hires fix from before January 2023: ((width, height) of the first
    pass, of the hires pass) from its `First pass size` and `Size` (a first pass with a 0 side:
    `old_first_pass_size` of Size). None where A1111 divides by zero: that first pass with a Size side of 0."""
    if 0 in first:
        if 0 in size:
            return None
        first = old_first_pass_size(*size)
    return first, size


def old_first_pass_size(width: int, height: int) -> tuple[int, int]:
    """A1111's first pass size of an old hires file with `First pass size: 0x0` (`processing.
    old_hires_fix_first_pass_dimensions`): `width` x `height` scaled to about 512 x 512 pixels, each side rounded
    up to a multiple of 64."""
    scale = math.sqrt(512 * 512 / (width * height))
    return math.ceil(scale * width / 64) * 64, math.ceil(scale * height / 64) * 64


def _size_label(p: dict[str, Any], label: str) -> tuple[int, int]:
    """A `WIDTHxHEIGHT` label's two numbers; a ValueError naming it when it is not that."""
    try:
        width, height = (int(v) for v in str(p[label]).lower().split("x"))
    except ValueError:
        raise ValueError(f"the PNG's {label} value {p[label]!r} is not WIDTHxHEIGHT") from None
    return width, height


def _sdxl_fields(p: dict[str, Any]) -> dict[str, Any]:
    """The SDXL sizes and crop corners of sdlab's labels (`sdxl_parameters`; a corner's missing label is 0); a
    value that is not WIDTHxHEIGHT or an integer is a ValueError naming its label."""
    fields: dict[str, Any] = {}
    for label, name in _SDXL_SIZES.items():
        if label in p:
            width, height = _size_label(p, label)
            fields[name] = (height, width)
    for name, labels in _SDXL_CROPS.items():
        if any(label in p for label in labels):
            try:
                fields[name] = tuple(int(p.get(label, 0)) for label in labels)
            except (TypeError, ValueError):
                raise ValueError(f"the PNG's {' / '.join(labels)} values are not integers") from None
    return fields


def drawn_by_sdlab(p: dict[str, Any]) -> bool:
    """Whether sdlab wrote the parameters (its `Version` label); else they are read as A1111 drew them."""
    return str(p.get("Version", "")).startswith("sdlab")


def refiner_handoff(p: dict[str, Any]) -> tuple[float | None, str]:
    """(`Refiner switch at`, or None when the parameters have none; the handoff rule): sdlab's files name the
    rule (`Refiner steps`; diffusers' in files older than the label), A1111's files follow A1111's: by sampling
    steps ("a1111_steps") where the text says so (`Refiner switch by sampling steps: True`) or its version always
    switched so (before 1.8: `a1111_backcompat`), else by timestep ("a1111"). A switch value that is not a number
    raises ValueError."""
    convention = str(p.get("Refiner steps") or ("diffusers" if drawn_by_sdlab(p) else _a1111_refiner_rule(p)))
    if "Refiner switch at" not in p:
        return None, convention
    try:
        return float(p["Refiner switch at"]), convention
    except (TypeError, ValueError):
        raise ValueError(f"the PNG's 'Refiner switch at' value {p['Refiner switch at']!r} is not a number") from None


def _a1111_refiner_rule(p: dict[str, Any]) -> str:
    """The handoff rule of a refiner file A1111 drew (`refiner_handoff`)."""
    by_steps = {**p, **a1111_backcompat(p)}.get("Refiner switch by sampling steps", False)
    return "a1111_steps" if str(by_steps).strip().lower() == "true" else "a1111"


_VERSION = re.compile(r"v?(\d+(?:\.\d+)*)(?:[-_.]?(alpha|a|beta|b|preview|pre|c|rc)[-_.]?(\d*))?"   # PEP 440's
                      r"(?:-(\d+)|[-_.]?(?:post|rev|r)[-_.]?(\d*))?(?:[-_.]?dev[-_.]?(\d*))?"        # (no epoch)
                      r"(?:\+[a-z0-9]+(?:[-_.][a-z0-9]+)*)?", re.IGNORECASE)
_PRE_RELEASES = {"alpha": 0, "a": 0, "beta": 1, "b": 1, "preview": 2, "pre": 2, "c": 2, "rc": 2}


def a1111_version(text: Any) -> tuple | None:
    """A `Version` value as A1111's `infotext_versions.parse_version` reads it, as a key that sorts as PEP 440
    versions do: the text up to a second '-' (v1.7.0-225-g1a2b3c4: v1.7.0-225, i.e. 1.7.0.post225) read as a
    version (release, pre-release, post-release, dev release); None where that is not one (sdlab's, Forge's
    f0.0.17v1.8.0rc-latest-276-g29be1da7)."""
    if text is None:
        return None
    text = str(text).strip()
    head = re.match(r"([^-]+-[^-]+)-.*", text)
    m = _VERSION.fullmatch(head.group(1) if head else text)
    if m is None:
        return None
    release, pre, pre_n, post_dash, post_n, dev_n = m.groups()
    numbers = [int(part) for part in release.split(".")]
    while len(numbers) > 1 and numbers[-1] == 0:
        numbers.pop()
    post = post_dash if post_dash is not None else post_n          # "" for a bare "post": 0
    if pre:
        pre_key = (_PRE_RELEASES[pre.lower()], int(pre_n or 0))
    else:
        pre_key = (-1, 0) if post is None and dev_n is not None else (3, 0)    # 1.0.dev1 < 1.0a1 < 1.0
    return (tuple(numbers), pre_key, -1 if post is None else int(post or 0),
            math.inf if dev_n is None else int(dev_n or 0))


_V160, _V170_TSNR, _V180 = a1111_version("1.6.0"), a1111_version("v1.7.0-225"), a1111_version("1.8.0")


def a1111_backcompat(p: dict[str, Any]) -> dict[str, bool]:
    """The labels A1111 (1.10, `infotext_versions.backcompat`) sets on reading a text by its `Version`: what the
    versions before each change always drew with. None for a text without an A1111 version (sdlab's)."""
    version = a1111_version(p.get("Version"))
    if version is None:
        return {}
    implied = {}
    if version < _V160 and "[" in str(p.get(PROMPT, "")):
        implied["Old prompt editing timelines"] = True
    if version < _V160 and p.get("Sampler", "") in ("DDIM", "PLMS"):
        implied["Pad conds v0"] = True
    if version < _V170_TSNR:
        implied["Downcast alphas_cumprod"] = True
    if version < _V180 and p.get("Refiner"):
        implied["Refiner switch by sampling steps"] = True
    return implied


# A1111's labels (its settings' and common extensions') of what changes the picture and sdlab does not draw, each
# with the value that changes nothing (None: every value changes it)
_UNDRAWN_A1111_LABELS: dict[str, Any] = {
    "Token merging ratio": 0.0, "Token merging ratio hr": 0.0,
    "VAE Encoder": "Full", "VAE Decoder": "Full", "FP8 weight": "Disable", "Soft inpainting enabled": False,
    "CFG Rescale phi": 0.0, "CFG Rescale": 0.0, "CFG Rescale \u03c6": 0.0,   # extensions' rescale of x0, not eps
    "Face restoration": None, "Hypernet": None, "Postprocess upscale by": 1.0, "ADetailer model": None,
}


def undrawn_labels(p: dict[str, Any]) -> list[str]:
    """The `Label: value` pairs of what a text's picture was drawn with that changes it and that sdlab does not
    draw (`_UNDRAWN_A1111_LABELS`), the labels its A1111 version implies (`a1111_backcompat`) among them."""
    implied = {label: value for label, value in a1111_backcompat(p).items() if label not in p}
    labels = {**p, **implied}
    return [f"{label}: {labels[label]}" + (f" (A1111 {p['Version']})" if label in implied else "")
            for label, none in _UNDRAWN_A1111_LABELS.items()
            if label in labels and not _changes_nothing(labels[label], none)]


def _changes_nothing(value: Any, none: Any) -> bool:
    """Whether a label's `value` is its value that changes nothing (`_UNDRAWN_A1111_LABELS`): by number, as a
    True / False word or as the text, by the kind of `none`."""
    if isinstance(none, bool):
        return str(value).strip().lower() == str(none).lower()
    if isinstance(none, float):
        try:
            return float(value) == none
        except (TypeError, ValueError):
            return False
    return none is not None and str(value).strip() == none


_INPAINT_AREAS = {"Only masked": True, "Whole picture": False}        # A1111's Inpaint area: inpaint_only_masked
_MASK_MODES = {"Inpaint masked": False, "Inpaint not masked": True}    # A1111's Mask mode: invert_mask
_EMPTY_NEGATIVES = {"zeros": True, "encoded": False}                    # sdlab's: zero_empty_negative
_ZERO_SNR = "Zero Terminal SNR"
_NOISE_SCHEDULES = {"Default": False, _ZERO_SNR: True}                  # A1111's Noise Schedule: sd_noise_schedule


def _label_flag(label: str, value: Any, flags: dict[str, bool]) -> bool:
    """An A1111 label's value (`flags`: its two spellings and what each sets; any case) as a bool."""
    by_key = {spelling.lower(): flag for spelling, flag in flags.items()}
    key = str(value).strip().lower()
    if key not in by_key:
        choices = " or ".join(f"'{spelling}'" for spelling in flags)
        raise ValueError(f"the PNG's '{label}' value {value!r} is not {choices}")
    return by_key[key]


def _as_a1111_ran(fields: dict[str, Any]) -> None:
    """Read a file AUTOMATIC1111 wrote as A1111 drew it: img2img steps, clip skip and the ControlNet steps
    by its rules, its noise from the random source it names (none: A1111's default "GPU"; sdlab's files
    without the label were drawn by sdlab's default, "CPU"), and the schedule it ran the sampler on. A missing
    `Schedule type` is the plain (uniform) one of the versions before 1.9, which named Karras in the sampler
    ("DPM++ 2M Karras"); 1.9 and later always write it, "Automatic" meaning the sampler's own default
    (`samplers.a1111_schedule`)."""
    fields.setdefault("img2img_convention", "a1111")
    fields.setdefault("clip_skip_convention", "a1111")
    fields.setdefault("control_convention", "a1111")
    fields.setdefault("rng", "GPU")
    asked = fields.get("schedule", "uniform")
    if "sampler" in fields:
        fields["schedule"] = a1111_schedule(fields["sampler"], asked)
    if fields.get("hr_sampler") or fields.get("hr_schedule"):    # A1111's `get_hr_sampler_and_scheduler`
        hr_sampler = fields.get("hr_sampler") or fields.get("sampler")
        if hr_sampler:
            fields["hr_schedule"] = a1111_schedule(hr_sampler, fields.get("hr_schedule") or asked)
