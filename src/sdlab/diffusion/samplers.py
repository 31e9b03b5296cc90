"""The sampler registry: every sampler under the names users know, with what a generate loop must know.

Names are AUTOMATIC1111's display names ("Euler a", "DPM++ 2M") and ComfyUI's snake-case names
("euler_ancestral", "dpmpp_2m"); lookup ignores case and surrounding space. Each entry says

- which final sigma its reference ends at (``"zero"``, or ``"first_alpha"`` = sigma(t=0) for the
  original DDIM/PLMS code: the loop then divides the result by sqrt(1 + sigma_final^2),
  ``sampling_ldm.to_ddpm_latent``);
- which noise it consumes: none (deterministic), independent Gaussian steps drawn from each image's
  generator, or a Brownian tree seeded per image (SDE samplers, as k-diffusion / A1111 / ComfyUI);
- whether it wants the schedule's ``sigma_to_t`` (LCM's boundary scalings depend on the timestep);
- which diffusers scheduler family's timestep spacing it takes when a diffusers spacing (``leading``,
  ``trailing``, ``linspace``) is named (``spacing``, see ``discretization.diffusers_spacing_sigmas``):
  the family of the diffusers scheduler that implements it, Euler's for the k-diffusion samplers
  diffusers lacks (DPM++ 2S a).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from sdlab.diffusion import sampling_k, sampling_ldm

__all__ = ["SAMPLERS", "SamplerSpec", "get_sampler", "sampler_names"]

NOISE_KINDS = ("none", "gaussian", "brownian")


@dataclass(frozen=True)
class SamplerSpec:
    """One registered sampler: ``fn(model, x, sigmas, *, noise, callback, **options) -> x``."""

    name: str                           # canonical (A1111 display) name
    fn: Callable[..., Tensor]
    noise: str = "none"                 # "none" | "gaussian" | "brownian"
    final_sigma: str = "zero"           # "zero" | "first_alpha"
    wants_sigma_to_t: bool = False
    spacing: str = "euler"              # "euler" | "dpm_solver" | "ddim" | "lcm" (discretization.SPACING_SCHEDULERS)

    @property
    def stochastic(self) -> bool:
        return self.noise != "none"


_STOCHASTIC_K = {"Euler a", "DPM2 a", "DPM++ 2S a"}

# diffusers' DPMSolverMultistep (2M, 2M SDE, 3M SDE), DPMSolverSinglestep (2S: no spacing option, its grid
# is DPMSolverMultistep's linspace) and UniPCMultistep share one spacing; DDIM, PNDM (PLMS) and DDPM another.
_DPM_SOLVER_SPACING = {"DPM++ 2M", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE", "DPM++ 2S"}
_LDM_SPACING = {"DDIM": "ddim", "PLMS": "ddim", "DDPM": "ddim", "LCM": "lcm"}  # others: UniPC's, dpm_solver


def _k_spec(name: str, fn: Callable[..., Tensor]) -> SamplerSpec:
    if fn in sampling_k.BROWNIAN_NOISE_SAMPLERS:
        noise = "brownian"
    elif name in _STOCHASTIC_K:
        noise = "gaussian"
    else:
        noise = "none"
    spacing = "dpm_solver" if name in _DPM_SOLVER_SPACING else "euler"
    return SamplerSpec(name=name, fn=fn, noise=noise, spacing=spacing)


def _ldm_spec(name: str, fn: Callable[..., Tensor]) -> SamplerSpec:
    return SamplerSpec(
        name=name,
        fn=fn,
        noise="gaussian" if name in ("DDIM", "DDPM", "LCM") else "none",  # DDIM draws only when eta > 0
        final_sigma=sampling_ldm.FINAL_SIGMA[name],
        wants_sigma_to_t=name == "LCM",
        spacing=_LDM_SPACING.get(name, "dpm_solver"),
    )


SAMPLERS: dict[str, SamplerSpec] = {
    **{name: _k_spec(name, fn) for name, fn in sampling_k.K_SAMPLERS.items()},
    **{name: _ldm_spec(name, fn) for name, fn in sampling_ldm.LDM_SAMPLERS.items()},
}
"""Canonical name -> spec."""


def _alias_table() -> dict[str, SamplerSpec]:
    table: dict[str, SamplerSpec] = {name.casefold(): spec for name, spec in SAMPLERS.items()}
    by_fn = {spec.fn: spec for spec in SAMPLERS.values()}
    for aliases in (sampling_k.K_SAMPLER_ALIASES, sampling_ldm.LDM_SAMPLER_ALIASES):
        for alias, fn in aliases.items():
            # an alias either names a registered sampler or carries its own options (ComfyUI's uni_pc)
            spec = by_fn.get(fn) or SamplerSpec(
                alias, fn, final_sigma=sampling_ldm.FINAL_SIGMA.get(alias, "zero"), spacing="dpm_solver"
            )
            table[alias.casefold()] = spec
    return table


_BY_NAME = _alias_table()


def sampler_names() -> list[str]:
    """Every accepted name: display names first, then the snake-case aliases."""
    aliases = sorted(set(sampling_k.K_SAMPLER_ALIASES) | set(sampling_ldm.LDM_SAMPLER_ALIASES))
    return list(SAMPLERS) + aliases


def get_sampler(name: str) -> SamplerSpec:
    """Look a sampler up by A1111 or ComfyUI name, ignoring case; the error lists the valid names."""
    spec = _BY_NAME.get(name.strip().casefold())
    if spec is None:
        raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(sampler_names())}")
    return spec
