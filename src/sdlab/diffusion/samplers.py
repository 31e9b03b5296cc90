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
  diffusers lacks (DPM++ 2S a);
- how many steps it needs before its picture settles (``MIN_STEPS``, a warning below that).

Minimum steps. LMS (Adams-Bashforth of order 4 in sigma), PLMS (order 4 in timestep index) and DPM++ 3M
SDE (third order) are exact copies of their references (k-diffusion, diffusers) and converge, but with
guidance their high order is unstable on coarse grids: classifier-free guidance at 5-7 multiplies the
denoiser's Jacobian, and the step leaves the small stability region of a 4-step Adams-Bashforth method
(|h lambda| < 0.3; order 2 has 1). On sdlab-tiny at CFG 5, 20 steps of LMS with the normal / simple
schedules give blotches (mean 17-36/255 from the converged picture; 0.4/255 without guidance; LMS of
order 2 or 3 at 20 steps: 3/255); 30 steps give 5-7/255 and 40 steps 1/255. Karras schedules hold
LMS at 20 steps; PLMS and DPM++ 3M SDE want 30 or more with any schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from sdlab.diffusion import sampling_k, sampling_ldm

__all__ = ["MIN_STEPS", "SAMPLERS", "SamplerSpec", "get_sampler", "sampler_names", "steps_warning"]

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
    min_steps: int = 1                  # fewer steps can give a broken picture with guidance (module docstring)

    @property
    def stochastic(self) -> bool:
        return self.noise != "none"


_STOCHASTIC_K = {"Euler a", "DPM2 a", "DPM++ 2S a"}
MIN_STEPS = {"LMS": 30, "PLMS": 30, "DPM++ 3M SDE": 30}  # measured on sdlab-tiny at CFG 5 (module docstring)
MIN_STEPS_KARRAS = {"LMS": 20}                          # a Karras schedule holds LMS with fewer

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
    return SamplerSpec(name=name, fn=fn, noise=noise, spacing=spacing, min_steps=MIN_STEPS.get(name, 1))


def _ldm_spec(name: str, fn: Callable[..., Tensor]) -> SamplerSpec:
    return SamplerSpec(
        name=name,
        fn=fn,
        noise="gaussian" if name in ("DDIM", "DDPM", "LCM") else "none",  # DDIM draws only when eta > 0
        final_sigma=sampling_ldm.FINAL_SIGMA[name],
        wants_sigma_to_t=name == "LCM",
        spacing=_LDM_SPACING.get(name, "dpm_solver"),
        min_steps=MIN_STEPS.get(name, 1),
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


def steps_warning(spec: SamplerSpec, steps: int, schedule: str) -> str | None:
    """A warning when ``steps`` of ``spec`` on ``schedule`` are likely to give a broken picture, else None."""
    needed = MIN_STEPS_KARRAS.get(spec.name, spec.min_steps) if schedule == "karras" else spec.min_steps
    if steps >= needed:
        return None
    return (
        f"{spec.name} needs about {needed} steps with the {schedule} schedule (got {steps}); with guidance "
        "its high order is unstable on coarser grids and the picture can break up: raise --steps or use DPM++ 2M"
    )


def get_sampler(name: str) -> SamplerSpec:
    """Look a sampler up by A1111 or ComfyUI name, ignoring case; the error lists the valid names."""
    spec = _BY_NAME.get(name.strip().casefold())
    if spec is None:
        raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(sampler_names())}")
    return spec
