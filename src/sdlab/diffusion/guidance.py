"""Guidance: wrappers that turn a conditional denoiser into the ``DenoiseFn`` a sampler runs.

``cfg`` is classifier-free guidance (Ho & Salimans 2022) with optional guidance rescale (Lin et al.
2023, sec. 3.4); ``masked`` keeps the known region of an image while a 4-channel model inpaints the rest;
``masked_input`` blends it into the model's input alone (A1111's timestep samplers);
``switch_at_calls`` changes the conditioning during sampling (A1111's prompt editing); ``composable_cfg``
guides toward several prompts at once (A1111's ``AND``). All only see ``denoise(x, sigma, **cond) -> x0``.
``with_unguided`` lets a sampler read the unguided prediction a guided call started from (the CFG++ samplers).
``skipping_uncond`` runs guidance without its unconditional pass at chosen calls (A1111's NGMS, Skip Early CFG).
``recording_effects`` collects the request options a drawing notes as changing it (``took_effect``).
``edit_cfg`` is ``cfg`` for an InstructPix2Pix edit model, with an image guidance scale.
``PerturbedGuidance`` adds perturbed-attention guidance (PAG, Ahn et al. 2024) to ``cfg``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import Tensor

from sdlab.diffusion.denoiser import DenoiseFn, Prediction, prediction_scalings

__all__ = [
    "IDENTITY_ROWS", "PerturbedGuidance", "a1111_skips", "blend_known", "cfg", "composable_cfg", "edit_cfg", "masked", "masked_input", "needs_uncond",
    "edit_guidance", "recording_effects", "rescale_guidance", "skipping_uncond", "switch_at_calls", "took_effect",
    "with_unguided",
]

NoiseScaling = Callable[..., Tensor]
"""``(sigma, noise, latent) -> latent noised to sigma``: the model's forward process (``ModelSampling.noise_scaling``)."""

_UNGUIDED: ContextVar[list[Tensor] | None] = ContextVar("sdlab_unguided", default=None)
"""Inside ``with_unguided``'s call: where guidance leaves its unguided prediction."""
_SKIP_UNCOND: ContextVar[str | None] = ContextVar("sdlab_skip_uncond", default=None)
"""Inside a call ``skipping_uncond`` skips at: the option that skips it; guidance runs its conditional pass alone."""
_EFFECTS: ContextVar[set[str] | None] = ContextVar("sdlab_effects", default=None)
"""Inside ``recording_effects``: the request options noted so far as changing the drawing."""


@contextmanager
def recording_effects() -> Iterator[set[str]]:
    """The request options (field names) that ``took_effect`` notes as changing what is drawn within the block, as
    A1111 sets a label while it samples where its option changed something (its ``extra_generation_params``: NGMS
    where a call skipped its negative prompt, Pad conds where it padded); a block within another one notes into the
    outer one's set (a hires fix's first pass is part of its run)."""
    outer = _EFFECTS.get()
    if outer is not None:
        yield outer
        return
    effects: set[str] = set()
    token = _EFFECTS.set(effects)
    try:
        yield effects
    finally:
        _EFFECTS.reset(token)


def took_effect(option: str) -> None:
    """Note that the request option `option` changed the drawing in progress (``recording_effects``; outside one,
    nothing)."""
    effects = _EFFECTS.get()
    if effects is not None:
        effects.add(option)


def with_unguided(model: DenoiseFn) -> Callable[..., tuple[Tensor, Tensor]]:
    """``model`` as ``(x, sigma, **cond) -> (x0, x0_u)``: its guided prediction and the unguided one the guidance
    started from, with no extra model call (the CFG++ samplers step with both; ComfyUI reads x0_u through a
    ``sampler_post_cfg_function``).

    During the call, guidance (``cfg``, ``composable_cfg``) runs its unconditional pass at every scale, 1 and below
    included, with ``x0 = x0_u + scale * (x0_c - x0_u)``: what ComfyUI's CFG++ samplers ask of it
    (``disable_cfg1_optimization``); ``masked`` pastes the known region into x0_u as into x0. Where no guidance runs
    (no negative conditioning, a guidance-embedded model, a bare denoiser) x0_u is x0.
    """
    def both(x: Tensor, sigma: Tensor, **cond: Any) -> tuple[Tensor, Tensor]:
        left: list[Tensor] = []
        token = _UNGUIDED.set(left)
        try:
            x0 = model(x, sigma, **cond)                                                 # (B, C, h, w)
        finally:
            _UNGUIDED.reset(token)
        return x0, (left[-1] if left else x0)

    return both


def _leave_unguided(x0_u: Tensor) -> None:
    """Hand ``x0_u`` to the ``with_unguided`` call in progress, if any."""
    left = _UNGUIDED.get()
    if left is not None:
        left.append(x0_u)


def skipping_uncond(model: DenoiseFn, skips: Callable[[int, Tensor], str | None], first_call: int = 0) -> DenoiseFn:
    """``model`` whose guidance (``cfg``, ``composable_cfg``) runs no unconditional pass at the calls where
    ``skips(call, sigma)`` names the option that skips them, calls counted from ``first_call`` (0); guidance that
    skips a pass notes the option (``took_effect``). At such a call ``cfg`` gives the conditional
    prediction x0_c, and ``composable_cfg`` takes its first part's prediction as the unconditional one at scale 1:
    A1111's ``CFGDenoiser.forward`` with ``skip_uncond`` (the first prompt's prediction as ``fake_uncond``,
    ``combine_denoised`` at cond_scale 1)."""
    calls = first_call

    def denoise(x: Tensor, sigma: Tensor, **extra: Any) -> Tensor:
        nonlocal calls
        token = _SKIP_UNCOND.set(skips(calls, sigma))
        calls += 1
        try:
            return model(x, sigma, **extra)
        finally:
            _SKIP_UNCOND.reset(token)

    return denoise


def a1111_skips(
    total_calls: int, skip_early: float = 0.0, s_min_uncond: float = 0.0, every_call: bool = False,
    level: Callable[[Tensor], float] | None = None,
) -> Callable[[int, Tensor], str | None]:
    """A1111 1.10's rule of the calls its ``CFGDenoiser`` runs without the negative prompt (``skips`` of
    ``skipping_uncond``): call k (from 0) of a run A1111 expects ``total_calls`` of (its ``total_steps``: the steps
    run, twice that for a second-order sampler) skips, by the option named, when

    - Skip Early CFG (``"skip_early_cond"``): ``skip_early != 0`` and ``k / total_calls <= skip_early``, else
    - NGMS (``"s_min_uncond"``): k is odd (every call with ``every_call``, NGMS all steps), ``s_min_uncond > 0`` and
      the call's level is below ``s_min_uncond``.

    The level is the call's sigma (of its first picture), or ``level(sigma)``: A1111's timestep samplers (DDIM,
    PLMS, UniPC) compare their timestep instead."""
    def skips(call: int, sigma: Tensor) -> str | None:
        if skip_early != 0 and call / total_calls <= skip_early:
            return "skip_early_cond"
        if not (call % 2 or every_call) or s_min_uncond <= 0:
            return None
        first = torch.as_tensor(sigma).reshape(-1)[:1]                                           # (1,)
        return "s_min_uncond" if (float(first[0]) if level is None else level(first)) < s_min_uncond else None

    return skips


def _batch_view(values: Tensor, like: Tensor) -> Tensor:
    return values.reshape(-1, *([1] * (like.ndim - 1)))  # (B, 1, 1, 1)


def rescale_guidance(guided: Tensor, positive: Tensor, rescale: float) -> Tensor:
    """Lin et al. 2023 eq. 15-16 (diffusers ``rescale_noise_cfg``), per image.

    ``guided * (phi * std(positive) / std(guided) + 1 - phi)``, std over every dim but the batch
    (unbiased, as ``torch.std``).
    """
    dims = list(range(1, guided.ndim))
    ratio = positive.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)  # (B, 1, 1, 1)
    return guided * (rescale * ratio + (1.0 - rescale))


IDENTITY_ROWS = "identity_rows"
"""The condition key of PAG's perturbed rows: (B,) bool, True on the rows whose chosen self-attentions are the
identity (the network's ``identity_rows``; the layers are its own option, ``identity_layers``)."""


@dataclass(frozen=True)
class PerturbedGuidance:
    """Perturbed-attention guidance (PAG, Ahn et al. 2024) on top of ``cfg``: one more pass of the prompt's
    conditioning whose chosen self-attentions are the identity (rows marked ``IDENTITY_ROWS``), guided away from:
    ``x0 + scale_t * (x0_c - x0_p)``, diffusers' ``_apply_perturbed_attention_guidance`` (the same in x0 as in eps:
    guidance is affine in the network output).

    ``adaptive_scale`` > 0 lowers the scale toward the end of sampling, as diffusers' ``_get_pag_scale``:
    ``scale_t = max(scale - adaptive_scale * (1000 - t), 0)``, t the call's timestep (``timestep(sigma)``); at a
    call where scale_t is 0 the perturbed pass does not run."""

    scale: float
    adaptive_scale: float = 0.0
    timestep: Callable[[Tensor], Tensor] | None = None

    def __post_init__(self) -> None:
        for name in ("scale", "adaptive_scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"PAG {name} must be finite and at least 0, got {value}")
        if self.adaptive_scale > 0 and self.timestep is None:
            raise ValueError("an adaptive PAG scale needs the timestep of a sigma")

    def scale_at(self, sigma: Tensor) -> float:
        """The scale at the call of ``sigma`` (its first image's)."""
        if self.adaptive_scale <= 0 or self.scale == 0:
            return self.scale
        first = torch.as_tensor(sigma).reshape(-1)[:1].to(torch.float32)                   # (1,)
        t = float(self.timestep(first)[0])
        return max(self.scale - self.adaptive_scale * (1000.0 - t), 0.0)


def _cat_conds(uncond: Mapping[str, Any], cond: Mapping[str, Any], *more: Mapping[str, Any]) -> dict[str, Any] | None:
    """Batch condition dicts as [uncond, cond, *more]; None when they cannot share one forward pass."""
    if uncond.keys() != cond.keys() or any(other.keys() != cond.keys() for other in more):
        raise ValueError(f"cond and uncond must hold the same keys, got {sorted(cond)} and {sorted(uncond)}")
    merged: dict[str, Any] = {}
    for key, c in cond.items():
        u = uncond[key]
        if isinstance(c, Tensor) and isinstance(u, Tensor):
            if c.shape[1:] != u.shape[1:]:
                return None  # e.g. prompts of different token lengths
            merged[key] = torch.cat([u, c, *(other[key] for other in more)])
        elif c is None and u is None:
            merged[key] = None
        elif not isinstance(c, Tensor) and not isinstance(u, Tensor) and c == u:
            merged[key] = c  # a shared non-tensor option
        else:
            kinds = f"{type(u).__name__} vs {type(c).__name__}"
            raise ValueError(f"cond[{key!r}] and uncond[{key!r}] cannot be batched: {kinds}")
    return merged


def needs_uncond(scale: float, cfg_pp: bool = False) -> bool:
    """Whether guidance at ``scale`` runs the unconditional pass: only above 1, or for a CFG++ sampler (``cfg_pp``:
    it steps with the unconditional prediction itself, at every scale, as ComfyUI runs it; ``with_unguided``).

    At or below 1 the denoiser is the conditional prediction alone, one network call per step, as in
    diffusers (``do_classifier_free_guidance = guidance_scale > 1``). That is what the few-step models
    (SDXL-Turbo, SDXL-Lightning, Hyper-SD, TCD, LCM-LoRA) are published with: ``guidance_scale=0`` in
    diffusers, CFG 1 in A1111 / ComfyUI; both give the same picture here. (A1111 and ComfyUI would
    extrapolate toward the unconditional picture below 1: at 0 they draw the negative prompt.)
    """
    return cfg_pp or float(scale) > 1.0


def cfg(
    denoiser: DenoiseFn,
    cond: Mapping[str, Any],
    uncond: Mapping[str, Any] | None,
    scale: float,
    rescale: float = 0.0,
    *,
    rescale_space: Prediction | str | None = None,
    perturbed: PerturbedGuidance | None = None,
) -> DenoiseFn:
    """Classifier-free guidance: ``x0 = x0_u + scale * (x0_c - x0_u)``.

    Guidance is affine in the network output, so combining x0 equals combining eps or v (what
    diffusers does). Cond and uncond run in ONE forward pass, concatenated along the batch as
    [uncond, cond] (every tensor in the dicts: ``context``, ``y``, ``concat``...); when a pair of tensors
    cannot be concatenated (different token lengths) they run as two passes. With ``scale <= 1``
    (``needs_uncond``) or ``uncond is None`` only the conditional pass runs: x0 = x0_c; inside a ``with_unguided``
    call (a CFG++ sampler) the unconditional pass runs at every scale and x0_u is handed to it. At a call
    ``skipping_uncond`` skips, only the conditional pass runs: x0 = x0_c (handed on as x0_u too).

    ``rescale`` (phi) applies guidance rescale in the space of ``rescale_space``: by default the wrapped
    denoiser's own (the scalings of its ``sampling``; eps when it has none), i.e. on the network's own
    output as diffusers' ``rescale_noise_cfg`` does. The std ratio is not affine-invariant, so the space matters:
    in the space where the network output is y, x0 = c_skip * x + c_out * y, so with d = x0 - c_skip * x
    the rescale multiplies d by ``phi * std(d_c) / std(d_cfg) + 1 - phi`` (c_out cancels in the ratio).

    ``perturbed``: PAG (``PerturbedGuidance``) on top, as diffusers' PAG pipelines run it: the batch is
    [uncond, cond, perturbed] (without the unconditional pass [cond, perturbed]) and
    ``x0 = x0_u + scale * (x0_c - x0_u) + scale_t * (x0_c - x0_p)``, rescaled after, toward x0_c; the conditioning
    dicts get ``IDENTITY_ROWS`` (False, True on the perturbed rows). Where the prompts cannot share a pass, the
    unconditional one runs alone and [cond, perturbed] together.
    """
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"guidance scale must be finite, got {scale}")
    if not (math.isfinite(rescale) and 0.0 <= rescale <= 1.0):
        raise ValueError(f"guidance rescale must lie in [0, 1], got {rescale}")
    scalings = _rescale_scalings(denoiser, rescale_space)
    cond = dict(cond)
    batched = cache(lambda: _cat_conds(uncond, cond))     # [uncond, cond] as one batch: at the first guided call
    marked = cache(lambda: _perturbation_marks(cond, uncond))   # PAG: the dicts with their rows marked
    three = cache(lambda: _cat_conds(*marked()))          # [uncond, cond, perturbed]
    pair = cache(lambda: _cat_conds(*marked()[1:]))       # [cond, perturbed]

    def conditional(x: Tensor, sigma: Tensor, pag: float, extra: Mapping[str, Any]) -> Tensor:
        """x0_c, with PAG's ``x0_c + pag * (x0_c - x0_p)`` where ``pag`` is not 0."""
        if not pag:
            return denoiser(x, sigma, **cond, **extra)
        x0_c, x0_p = _paired(denoiser, x, sigma, pair(), extra)
        return x0_c + pag * (x0_c - x0_p)

    def guided(x: Tensor, sigma: Tensor, **extra: Any) -> Tensor:
        pag = 0.0 if perturbed is None else perturbed.scale_at(sigma)
        if pag:
            took_effect("pag_scale")
        if uncond is None or not needs_uncond(scale, cfg_pp=_UNGUIDED.get() is not None):
            return conditional(x, sigma, pag, extra)
        if skipped_by := _SKIP_UNCOND.get():                      # `skipping_uncond`: x0_c stands for x0_u
            took_effect(skipped_by)
            x0_c = conditional(x, sigma, pag, extra)
            _leave_unguided(x0_c)
            return x0_c
        sigma_b = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])  # (B,)
        x0_p = None
        if pag and (all_conds := three()) is not None:
            x0_u, x0_c, x0_p = denoiser(torch.cat([x, x, x]), torch.cat([sigma_b, sigma_b, sigma_b]), **all_conds,
                                        **extra).chunk(3)                                    # 3 x (B, C, h, w)
        elif pag:
            x0_u = denoiser(x, sigma_b, **marked()[0], **extra)
            x0_c, x0_p = _paired(denoiser, x, sigma_b, pair(), extra)
        elif (both_conds := batched()) is not None:
            both = denoiser(torch.cat([x, x]), torch.cat([sigma_b, sigma_b]), **both_conds, **extra)  # (2B, C, h, w)
            x0_u, x0_c = both.chunk(2)
        else:
            x0_u = denoiser(x, sigma_b, **uncond, **extra)
            x0_c = denoiser(x, sigma_b, **cond, **extra)
        _leave_unguided(x0_u)
        x0 = x0_u + scale * (x0_c - x0_u)  # (B, C, h, w)
        if x0_p is not None:
            x0 = x0 + pag * (x0_c - x0_p)
        return _rescaled(x0, x0_c, x, sigma_b, scalings, rescale)

    return guided


def _rescale_scalings(denoiser: DenoiseFn, rescale_space: Prediction | str | None) -> Callable[[Tensor], Any]:
    """The scalings guidance rescale works in (see ``cfg``): ``rescale_space``'s, else the denoiser's own."""
    sampling = getattr(denoiser, "sampling", None)
    if rescale_space is not None or sampling is None:
        space = Prediction.parse(rescale_space or Prediction.EPS)
        return lambda sigma: prediction_scalings(space, sigma)
    return sampling.scalings


def _rescaled(x0: Tensor, x0_c: Tensor, x: Tensor, sigma_b: Tensor, scalings: Callable[[Tensor], Any],
              rescale: float) -> Tensor:
    """The guided ``x0`` with guidance rescale ``rescale`` toward the conditional ``x0_c`` (``cfg``'s docstring)."""
    if rescale == 0.0:
        return x0
    took_effect("guidance_rescale")
    c_skip = _batch_view(scalings(sigma_b.to(torch.float32))[0], x)  # (B, 1, 1, 1)
    base = (c_skip * x.to(torch.float32)).to(x0.dtype)
    return base + rescale_guidance(x0 - base, x0_c - base, rescale)


def edit_guidance(scale: float, image_scale: float | None, convention: str = "a1111") -> str:
    """How an edit model's guidance at CFG ``scale`` and image scale ``image_scale`` runs (``edit_cfg``):

    - ``"plain"``: ``cfg`` with the picture in both passes: image scale None or 1, where the image formula is that
      (A1111's ``is_edit_model`` off; diffusers at image scale 1);
    - ``"image"``: the three-pass image formula. Under A1111's convention at every CFG scale (A1111's
      ``CFGDenoiser`` has no shortcut at CFG 1 for an edit model: u + 1 * (c - i) + s_img * (i - u));
    - ``"conditional"``: the conditional pass alone, under diffusers' convention where its edit pipelines turn
      guidance off (``do_classifier_free_guidance = guidance_scale > 1.0 and image_guidance_scale >= 1.0``).

    ``convention`` is the request's img2img convention: "diffusers", else A1111's rule (A1111's and ComfyUI's)."""
    if image_scale is None or float(image_scale) == 1.0:
        return "plain"
    if convention == "diffusers" and not (float(scale) > 1.0 and float(image_scale) >= 1.0):
        return "conditional"
    return "image"


def edit_cfg(
    denoiser: DenoiseFn,
    cond: Mapping[str, Any],
    uncond: Mapping[str, Any] | None,
    image: Tensor,
    scale: float,
    image_scale: float | None,
    rescale: float = 0.0,
    convention: str = "a1111",
) -> DenoiseFn:
    """Guidance of an InstructPix2Pix edit model (Brooks et al. 2023, eq. 3), whose U-Net reads the latent of the
    picture it edits, ``image`` (B, 4, h, w), as its ``concat`` channels:

        x0 = x0_u + scale * (x0_c - x0_i) + image_scale * (x0_i - x0_u)

    with x0_c the prompt and the picture, x0_i the negative prompt and the picture, x0_u the negative prompt and a
    zero picture; one forward pass of the batch [prompt, image, uncond] (diffusers'
    ``StableDiffusionInstructPix2PixPipeline``; A1111's ``combine_denoised_for_edit_model``). Affine in the
    network output, so the same in x0 as in eps. Which passes run is ``edit_guidance``'s rule under
    ``convention``: with ``image_scale`` 1 or None ``cfg`` with the picture in both passes, x0_i + scale *
    (x0_c - x0_i), which is what A1111 runs then (two passes); under diffusers' convention at CFG <= 1 or an image
    scale below 1 the conditional pass alone; with no ``uncond`` the conditional pass alone.
    Guidance rescale moves toward x0_c as in ``cfg`` (diffusers' SDXL edit pipeline). A call ``skipping_uncond``
    skips by Skip Early CFG runs the conditional pass alone; NGMS skips none of the formula's calls (A1111's
    rule: ``and not is_edit_model``). The image scale is noted as drawn (``took_effect``)."""
    with_image = {**cond, "concat": image}
    if image_scale is not None:
        took_effect("image_cfg_scale")
    how = edit_guidance(scale, image_scale, convention)
    if uncond is None or how == "conditional":
        return cfg(denoiser, with_image, None, scale, rescale)
    if how == "plain":
        return cfg(denoiser, with_image, {**uncond, "concat": image}, scale, rescale)
    scale, image_scale = float(scale), float(image_scale)
    if not (math.isfinite(scale) and math.isfinite(image_scale)):
        raise ValueError(f"guidance scales must be finite, got {scale} and {image_scale}")
    scalings = _rescale_scalings(denoiser, None)
    image_only = {**uncond, "concat": image}
    neither = {**uncond, "concat": torch.zeros_like(image)}

    @cache
    def batched() -> dict[str, Any] | None:               # [prompt, image, uncond] as one batch, or None
        pair = _cat_conds(with_image, image_only)
        return None if pair is None else _cat_conds(pair, neither)

    def guided(x: Tensor, sigma: Tensor, **extra: Any) -> Tensor:
        if (skipped_by := _SKIP_UNCOND.get()) and skipped_by != "s_min_uncond":
            took_effect(skipped_by)
            x0_c = denoiser(x, sigma, **with_image, **extra)
            _leave_unguided(x0_c)
            return x0_c
        sigma_b = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])  # (B,)
        if (rows := batched()) is not None:
            three = denoiser(torch.cat([x, x, x]), torch.cat([sigma_b] * 3), **rows, **extra)  # (3B, C, h, w)
            x0_c, x0_i, x0_u = three.chunk(3)
        else:
            x0_c, x0_i, x0_u = (denoiser(x, sigma_b, **conds, **extra) for conds in (with_image, image_only, neither))
        _leave_unguided(x0_u)
        x0 = x0_u + scale * (x0_c - x0_i) + image_scale * (x0_i - x0_u)                      # (B, C, h, w)
        return _rescaled(x0, x0_c, x, sigma_b, scalings, rescale)

    return guided


def _perturbation_marks(cond: Mapping[str, Any], uncond: Mapping[str, Any] | None) -> tuple[dict[str, Any], ...]:
    """(uncond, cond, perturbed) condition dicts for PAG: each with ``IDENTITY_ROWS`` (B,), True on the perturbed
    one's rows alone (B from the prompt's context); uncond None stays None."""
    context = cond.get("context")
    batch = len(context) if isinstance(context, Tensor) else 1
    device = context.device if isinstance(context, Tensor) else None
    off = torch.zeros(batch, dtype=torch.bool, device=device)                               # (B,)
    return (None if uncond is None else {**uncond, IDENTITY_ROWS: off}, {**cond, IDENTITY_ROWS: off},
            {**cond, IDENTITY_ROWS: ~off})


def _paired(denoiser: DenoiseFn, x: Tensor, sigma: Tensor, conds: Mapping[str, Any] | None,
            extra: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
    """(x0_c, x0_p): the prompt's prediction and PAG's perturbed one in one pass of the batched ``conds``
    ([cond, perturbed])."""
    sigma_b = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])         # (B,)
    x0_c, x0_p = denoiser(torch.cat([x, x]), torch.cat([sigma_b, sigma_b]), **conds, **extra).chunk(2)
    return x0_c, x0_p


def blend_known(
    x: Tensor,
    sigma: Tensor | float,
    x0_known: Tensor,
    mask: Tensor,
    noise: Tensor,
    noise_scaling: NoiseScaling | None = None,
) -> Tensor:
    """Replace the known region of x by the known image noised to ``sigma`` (``noise_scaling(sigma, noise,
    x0_known)``, by default VE: x0 + sigma * noise).

    ``mask`` is 1 where the model generates and 0 where ``x0_known`` is kept (diffusers' and ComfyUI's
    convention), broadcastable to x. This is diffusers' ``(1 - mask) * add_noise(init, noise, t) +
    mask * latents`` written in VE scaling.
    """
    sigma_v = _batch_view(torch.as_tensor(sigma, device=x.device, dtype=x.dtype).reshape(-1), x)
    if noise_scaling is None:
        noised = x0_known + noise * sigma_v  # (B, C, h, w)
    else:
        noised = noise_scaling(sigma_v.reshape(-1), noise, x0_known)  # (B, C, h, w)
    return mask * x + (1 - mask) * noised


def masked(
    inner: DenoiseFn, x0_known: Tensor, mask: Tensor, noise: Tensor, noise_scaling: NoiseScaling | None = None,
    *, blend_from_call: int | None = 0,
) -> DenoiseFn:
    """Inpainting with an ordinary 4-channel model (latent blend), as a denoiser wrapper.

    Before every model call the known region of x is replaced by ``x0_known`` noised to the current
    sigma with the fixed ``noise`` (the noise that made the initial x), and the known region of the
    returned x0 is ``x0_known``. Blending inside the denoiser, not after the sampler step, keeps the
    generate loop sampler-agnostic and blends at every model call (Heun's and DPM++ 2S's inner calls too).
    This is ComfyUI's ``KSamplerX0Inpaint``. Relation to diffusers' StableDiffusionInpaintPipeline,
    which blends the sample after each step at the next sigma: the model sees the same input from the
    second call on (the blended sample), pixels outside the known region are updated identically by
    any per-pixel sampler, and with the known x0 pasted, a first-order or multistep step leaves the
    known region at x0_known + noise * sigma_next, which is diffusers' blend. The one difference is
    the first call: diffusers feeds its initial latents unblended (``blend_from_call=1`` does the same); by
    default (0) ``masked`` blends them (ComfyUI). (diffusers' KDPM2 also departs from its own method: before
    its midpoint call it noises the known region to the next full sigma, not the call's; README.) After the last
    step diffusers sets the known region to the clean x0_known; a sampler that ends at sigma 0 already has
    it there, and the pipeline sets it for those that end above 0 (DDIM, PLMS, TCD).
    ``noise_scaling`` is the model's forward process (``ModelSampling.noise_scaling``; default VE).

    ``blend_from_call``: the first model call (counted from 0) whose input is blended; None: none is. None is
    A1111's default (``CFGDenoiser``, ``mask_before_denoising`` off): only the
    returned x0 is blended, the model sees x as the sampler has it (for ancestral and SDE samplers the known
    region then carries their fresh noise; for deterministic ones nothing changes).

    Inside a ``with_unguided`` call the unguided prediction gets ``x0_known`` in the known region too, so a CFG++
    sampler moves that region as any sampler does (ComfyUI pastes into the guided x0 only; in the region drawn the
    two agree at every call whose input is blended).
    """

    calls = 0

    def inpaint(x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        nonlocal calls
        blend = blend_from_call is not None and calls >= blend_from_call
        calls += 1
        seen = blend_known(x, sigma, x0_known, mask, noise, noise_scaling) if blend else x
        left = _UNGUIDED.get()
        x0 = inner(seen, sigma, **cond)                                                           # (B, C, h, w)
        if left:                                                                  # with_unguided's x0_u
            left[-1] = mask * left[-1] + (1 - mask) * x0_known
        return mask * x0 + (1 - mask) * x0_known

    return inpaint


def masked_input(inner: DenoiseFn, x0_known: Tensor, mask: Tensor) -> DenoiseFn:
    """Inpainting as A1111's timestep samplers (DDIM, DDIM CFG++, PLMS, UniPC) blend, as a denoiser wrapper.

    Their ``CFGDenoiserTimesteps`` sets ``mask_before_denoising``: the model's VP input is
    ``z * nmask + init_latent * mask`` with the clean ``init_latent``, and its eps is not blended. In VE scaling
    the known region of x becomes ``x0_known * sqrt(1 + sigma^2)`` (the model reads ``x0_known`` there). The
    samplers step the sample they hold with that eps, so the x0 handed back is ``x0 + (x - x_in)``: the eps
    ``(x - x0') / sigma`` a sampler derives from it is the model's ``(x_in - x0) / sigma``; the same for the
    unguided x0_u of a ``with_unguided`` call (A1111's ``last_noise_uncond``). ``mask`` as in ``blend_known``.
    """

    def inpaint(x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        sigma_v = _batch_view(torch.as_tensor(sigma, device=x.device, dtype=x.dtype).reshape(-1), x)
        seen = mask * x + (1 - mask) * x0_known * (1 + sigma_v ** 2).sqrt()                    # (B, C, h, w)
        unblend = x - seen
        left = _UNGUIDED.get()
        x0 = inner(seen, sigma, **cond)
        if left:                                                                  # with_unguided's x0_u
            left[-1] = left[-1] + unblend
        return x0 + unblend

    return inpaint


def switch_at_calls(models: Sequence[tuple[int, DenoiseFn]], first_call: int = 0) -> DenoiseFn:
    """A denoiser that runs ``models[i][1]`` at its calls up to and including call ``models[i][0]``.

    Calls are counted from ``first_call`` (0; an SDXL refiner's from the base's calls, as A1111 swaps the
    model under the same counter), every call of the sampler (a second-order step makes two), and call ``k`` goes
    to the first model whose end is at least ``k``; past the last end, to the first model. This is A1111's
    ``CFGDenoiser.step`` with ``reconstruct_cond_batch`` (a prompt schedule ``[(end_at_step, cond), ...]``).
    One model is returned as it is.
    """
    if not models:
        raise ValueError("switch_at_calls needs at least one model")
    if len(models) == 1:
        return models[0][1]
    ends = [end for end, _ in models]
    calls = first_call

    def scheduled(x: Tensor, sigma: Tensor, **extra: Any) -> Tensor:
        nonlocal calls
        index = next((i for i, end in enumerate(ends) if calls <= end), 0)
        calls += 1
        return models[index][1](x, sigma, **extra)

    return scheduled


def composable_cfg(parts: Sequence[tuple[DenoiseFn, float]], uncond: DenoiseFn, scale: float) -> DenoiseFn:
    """Composable diffusion (Liu et al. 2022; A1111's ``prompt AND prompt :w``): with ``x0_i`` the prediction
    of part i (its conditional denoiser) and ``x0_u`` the unconditional one,
    ``x0 = x0_u + scale * sum_i w_i (x0_i - x0_u)``, summed in the parts' order (A1111
    ``CFGDenoiser.combine_denoised``). One part at weight 1 is plain classifier-free guidance."""
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"guidance scale must be finite, got {scale}")

    def guided(x: Tensor, sigma: Tensor, **extra: Any) -> Tensor:
        skip = _SKIP_UNCOND.get()                     # `skipping_uncond`: the first part's x0 for x0_u, at scale 1
        if skip:
            took_effect(skip)
        x0_u = (parts[0][0] if skip else uncond)(x, sigma, **extra)               # (B, C, h, w)
        _leave_unguided(x0_u)
        x0 = x0_u
        for i, (part, weight) in enumerate(parts):
            x0_i = x0_u if skip and i == 0 else part(x, sigma, **extra)
            x0 = x0 + (x0_i - x0_u) * (weight * (1.0 if skip else scale))
        return x0

    return guided
