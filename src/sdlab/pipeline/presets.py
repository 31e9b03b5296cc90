"""Few-step presets: the sampler, schedule, steps, CFG and eta that a distilled model or LoRA is published with.

    sdlab txt2img "a fox" --model sdxl_turbo.safetensors --preset turbo
    sdlab txt2img "a fox" --model sd15.safetensors --lora lcm-lora-sdv1-5.safetensors --preset lcm

A preset only fills settings: every option the user gives wins over it (``apply_preset``), and its eta
belongs to its sampler (TCD's gamma): a request naming another sampler runs that one with its own eta. The
values follow the model cards' diffusers examples (``guidance_scale=0`` there is CFG 1 here: at or below 1
sdlab runs the conditional prediction alone, ``sdlab.diffusion.guidance.needs_uncond``); each preset draws
the picture of the diffusers scheduler named in its row (tests/test_presets_parity.py, at 1, 2 and 4 steps):

=========  ==========================================================  =========  ===========================
preset     published for (diffusers scheduler)                        sampler    steps / CFG / eta
=========  ==========================================================  =========  ===========================
turbo      SD-Turbo, SDXL-Turbo (EulerAncestral, trailing)             Euler a    1 (img2img 2) / 1
lcm        LCM-LoRA SD1.5 / SDXL / SSD-1B (LCMScheduler)               LCM        4 / 1 (1-2 also published)
lightning  SDXL-Lightning 2/4/8-step (Euler, trailing)                 Euler      4 / 1
hyper      Hyper-SD N-step LoRAs (DDIM, trailing)                      DDIM       4 / 1
tcd        TCD-LoRA SD1.5 / SDXL, Hyper-SD unified LoRA (TCDScheduler)  TCD        4 / 1 / eta (gamma) 0.3
lcm-model  full LCM models, guidance embedding (LCMScheduler)         LCM        4 / 8.5 (w + 1, embedded)
=========  ==========================================================  =========  ===========================

Every preset uses the ``trailing`` schedule: the grid starts at the last training timestep (999) as the
distillation did; LCM and TCD take their own grid from it (LCMScheduler's ``original_inference_steps=50``).
A model distilled for a given step count (Lightning 2-step, Hyper-SD 8-step, ...) wants ``--steps`` set to
that count. ``lcm-model`` is the preset a full LCM-distilled model (a U-Net with a guidance embedding, e.g.
LCM_Dreamshaper_v7, lcm-sdxl) is drawn with when its file names none: the CFG scale is then the network's
input (w = cfg - 1 embedded, diffusers' LatentConsistencyModelPipeline default 8.5), not a second pass.
Turbo img2img runs 2 steps: with strength s, ``int(steps * s)`` steps run and one step at 0.75 would run none.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sdlab.diffusion.samplers import UnknownSamplerError, get_sampler
from sdlab.pipeline.request import RequestError

__all__ = ["PRESETS", "Preset", "apply_preset", "get_preset", "preset_names"]


@dataclass(frozen=True)
class Preset:
    """One row: the request settings a few-step model wants."""

    name: str
    sampler: str
    schedule: str
    steps: int
    cfg_scale: float
    eta: float | None = None            # None: the sampler's default
    img2img_steps: int | None = None    # img2img / inpaint steps where they differ from `steps`
    published_for: str = ""

    def options(self, mode: str = "txt2img", sampler: str | None = None) -> dict[str, Any]:
        """The `GenerationRequest` keyword arguments this preset sets in ``mode`` (txt2img, img2img, inpaint)
        for a request that names ``sampler`` (None: none). The eta is its sampler's setting (TCD's gamma): a
        request that runs another sampler gets none, so that sampler runs with its own default."""
        steps = self.img2img_steps if mode != "txt2img" and self.img2img_steps is not None else self.steps
        options: dict[str, Any] = dict(sampler=self.sampler, schedule=self.schedule, steps=steps, cfg_scale=self.cfg_scale)
        if self.eta is not None and self.runs_own_sampler(sampler):
            options["eta"] = self.eta
        return options

    def runs_own_sampler(self, sampler: str | None) -> bool:
        """Whether a request that names ``sampler`` (None: none, the preset's) runs the preset's sampler; a name
        no sampler has is another sampler (the request's check reports it)."""
        if sampler is None:
            return True
        try:
            return get_sampler(sampler) is get_sampler(self.sampler)
        except UnknownSamplerError:
            return False


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset("turbo", "Euler a", "trailing", 1, 1.0, img2img_steps=2, published_for="SD-Turbo, SDXL-Turbo"),
        Preset("lcm", "LCM", "trailing", 4, 1.0, published_for="LCM-LoRA (SD1.5, SDXL, SSD-1B), LCM models"),
        Preset("lightning", "Euler", "trailing", 4, 1.0, published_for="SDXL-Lightning"),
        Preset("hyper", "DDIM", "trailing", 4, 1.0, published_for="Hyper-SD N-step LoRAs"),
        Preset("tcd", "TCD", "trailing", 4, 1.0, eta=0.3, published_for="TCD-LoRA, Hyper-SD unified LoRA"),
        Preset("lcm-model", "LCM", "trailing", 4, 8.5, published_for="LCM-distilled models (guidance embedding)"),
    )
}
"""Every preset, by name."""


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (case and surrounding space ignored); a `RequestError` lists the valid names."""
    preset = PRESETS.get(str(name).strip().lower())
    if preset is None:
        raise RequestError(f"unknown preset {name!r}; valid names: {', '.join(PRESETS)}")
    return preset


def apply_preset(name: str | None, given: Mapping[str, Any], mode: str = "txt2img") -> dict[str, Any]:
    """``given`` (request keyword arguments) over the preset's settings: what the user sets wins.

    ``None`` values in ``given`` count as unset; without a preset (``name`` None or "") ``given`` is returned
    as a dict, unchanged. A sampler given other than the preset's runs without the preset's eta (`Preset.options`).
    """
    if not name:
        return dict(given)
    options = get_preset(name).options(mode, given.get("sampler"))
    options.update({key: value for key, value in given.items() if value is not None})
    return options
