"""The sampler table: one row per sampler, under the names users know, with what a generate loop must know.

Names are AUTOMATIC1111's display names ("Euler a", "DPM++ 2M") and ComfyUI's snake-case names
("euler_ancestral", "dpmpp_2m"); ``get_sampler`` looks either up, ignoring case and surrounding space,
and raises ``UnknownSamplerError`` (a ValueError that lists the valid names) for any other. Where the two
programs give one word to two samplers, the exact spelling decides: "DDIM" is A1111's DDIM, "ddim" ComfyUI's
(Euler on the plain sigmas), "LCM" diffusers' LCMScheduler, "lcm" ComfyUI's (no boundary scalings), "PLMS"
A1111's PLMS (its timesteps on ``ddim_uniform``: ``runs_a1111_timesteps``), "plms" the same loop under ComfyUI's
conventions (on ``ddim_uniform`` too, that schedule's sigmas); any other case is A1111's. ComfyUI's ``_gpu``
names (``dpmpp_sde_gpu``, ``dpmpp_2m_sde_gpu``, ``dpmpp_2m_sde_heun_gpu``, ``dpmpp_3m_sde_gpu``) are aliases of
the plain ones: they differ only in the device ComfyUI draws the Brownian tree on, and sdlab draws every SDE
sampler's on the CPU (``BrownianTreeNoise``, one tree per image seed, as ComfyUI's plain names), so a seed draws
one picture on any device whichever name runs it. Each row (``SamplerSpec``) says

- which function runs it (``sampling_k`` for the sigma-space k-diffusion samplers, ``sampling_comfy`` for
  those ComfyUI adds, ``sampling_ldm`` for the timestep family; every one is
  ``fn(model, x, sigmas, *, noise, callback, **options) -> x``);
- which final sigma its reference ends at (``"zero"``, or ``"first_alpha"`` = sigma(t=0) for the
  original DDIM/PLMS code, CompVis and diffusers ``set_alpha_to_one=False``: the loop then divides the
  result by sqrt(1 + sigma_final^2), ``sampling_ldm.to_ddpm_latent``);
- which noise it consumes: none (deterministic), independent Gaussian steps drawn from each image's
  generator, or a Brownian tree seeded per image (``sdlab.diffusion.brownian.BrownianTreeNoise``: the
  SDE samplers, as AUTOMATIC1111 / ComfyUI / k-diffusion feed them; diffusers' DPMSolverSDEScheduler
  uses a Brownian tree too, its DPMSolverMultistep SDE variants do not). DDIM draws only when eta > 0;
  Euler / Heun / DPM2 draw only with churn (``s_churn > 0``) and count as deterministic;
- whether it wants the schedule's ``sigma_to_t`` (LCM's boundary scalings depend on the timestep) and
  ``t_to_sigma`` (TCD jumps to an integer training timestep, SA-Solver's SDE interval is one of timesteps);
- which diffusers scheduler family's timestep spacing it takes when a diffusers spacing (``leading``,
  ``trailing``, ``linspace``) is named (``spacing``, see ``discretization.diffusers_spacing_sigmas``):
  the family of the diffusers scheduler that implements it. diffusers' DPMSolverMultistep (2M, 2M SDE,
  3M SDE), DPMSolverSinglestep (2S: no spacing option, its grid is DPMSolverMultistep's linspace) and
  UniPCMultistep share one spacing (``"dpm_solver"``); DDIM, PNDM (PLMS) and DDPM another (``"ddim"``);
  Euler's serves the k-diffusion samplers diffusers lacks (DPM++ 2S a);
- how many steps it needs before its picture settles (``min_steps``, ``min_steps_karras`` with a Karras
  schedule; a warning below that);
- whether the schedule's next-to-last sigma is dropped (``discard_penultimate``): A1111 drops it for its DPM2,
  DPM2 a and DPM++ 3M SDE (the ``discard_next_to_last_sigma`` option of their rows), ComfyUI's KSampler for
  ``dpm_2``, ``dpm_2_ancestral``, ``uni_pc`` and ``uni_pc_bh2`` (``DISCARD_PENULTIMATE_SIGMA_SAMPLERS``), not
  for ``dpmpp_3m_sde``, which is therefore a row of its own;
- which schedule AUTOMATIC1111 (1.9+) runs it on when the schedule is "Automatic" (``a1111_automatic``, the
  ``scheduler`` option of its row in A1111's ``sd_samplers_kdiffusion``; for rows without one the model's
  uniform sigmas, ``uniform`` = ``normal``). ``a1111_schedule`` applies that rule and A1111's other ones:
  its timestep samplers (DDIM, DDIM CFG++, PLMS, UniPC: ``sd_samplers_timesteps``) ignore the schedule and step on
  ``range(0, 1000, 1000 // steps) + 1``: sdlab's ``ddim_uniform``, on which they run as A1111 runs them
  (``runs_a1111_timesteps``), and its LCM's uniform sigmas are those
  of its 50 LCM timesteps, ``a1111_lcm``. A request that names no schedule runs LCM and TCD on their own
  grid (``default_schedule``), any other sampler on the model's default;
- whether it steps with the unguided prediction as well as the guided one (``cfg_pp``, the CFG++ samplers:
  ``guidance.with_unguided``), so that the loop encodes the negative prompt at any CFG scale, and the factor its
  guidance takes the CFG scale by (``cfg_scale_factor``: A1111's DDIM CFG++ guides at CFG / 12.5);
- A1111 1.10's aliases of it (its ``samplers_map``: "k_euler_a", "k_dpmpp_2m", "ddim_cfgpp", ...), which name it
  here too; not A1111's "ddim" and "plms", which are written as ComfyUI writes samplers (the rows "ddim", "plms").

Minimum steps. LMS (Adams-Bashforth of order 4 in sigma), PLMS (order 4 in timestep index) and DPM++ 3M
SDE (third order) are exact copies of their references (k-diffusion, diffusers) and converge, but with
guidance their high order is unstable on coarse grids: classifier-free guidance at 5-7 multiplies the
denoiser's Jacobian, and the step leaves the small stability region of a 4-step Adams-Bashforth method
(|h lambda| < 0.3; order 2 has 1). On sdlab-tiny at CFG 5, 20 steps of LMS with the normal / simple
schedules give blotches (mean 17-36/255 from the converged picture; 0.4/255 without guidance; LMS of
order 2 or 3 at 20 steps: 3/255); 30 steps give 5-7/255 and 40 steps 1/255. Karras schedules hold
LMS at 20 steps; PLMS and DPM++ 3M SDE want 30 or more with any schedule.

Adding a sampler = writing its function and adding one row to ``SAMPLER_TABLE``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import cached_property, partial

from torch import Tensor

from sdlab.diffusion import sampling_comfy as C
from sdlab.diffusion import sampling_k as K
from sdlab.diffusion import sampling_ldm as L
from sdlab.diffusion.schedule_names import split_a1111_sampler

__all__ = [
    "SAMPLERS", "SAMPLER_TABLE", "SamplerSpec", "UnknownSamplerError", "a1111_run", "a1111_schedule", "also_discards",
    "comfyui_spelling", "get_sampler", "runs_a1111_timesteps",
    "sampler_names", "steps_warning",
]


class UnknownSamplerError(ValueError):
    """A sampler name that no row of the table carries; the message lists the valid names."""


@dataclass(frozen=True)
class SamplerSpec:
    """One row of the sampler table: ``fn(model, x, sigmas, *, noise, callback, **options) -> x``."""

    a1111: str | None                   # AUTOMATIC1111's display name (None: a ComfyUI-only variant)
    comfy: str | None                   # ComfyUI's snake-case name (None: not a ComfyUI sampler)
    fn: Callable[..., Tensor]
    noise: str = "none"                 # "none" | "gaussian" | "brownian"
    final_sigma: str = "zero"           # "zero" | "first_alpha"
    wants_sigma_to_t: bool = False
    wants_t_to_sigma: bool = False      # TCD steps to integer training timesteps
    max_eta: float | None = None        # the largest eta it takes (TCD's gamma: 1)
    spacing: str = "euler"              # "euler" | "dpm_solver" | "ddim" | "lcm" (discretization.SPACING_SCHEDULERS)
    min_steps: int = 1                  # fewer steps can give a broken picture with guidance (module docstring)
    min_steps_karras: int | None = None  # the minimum with a Karras schedule, where it differs
    a1111_automatic: str = "uniform"    # the schedule A1111 1.9+'s "Automatic" runs it on (its sampler options)
    discard_penultimate: bool = False   # the next-to-last sigma is dropped (A1111's row option, ComfyUI's KSampler)
    calls_per_step: int = 1             # model calls a step makes (A1111 schedules prompt edits over them)
    comfy_aliases: tuple[str, ...] = ()  # ComfyUI's other names of the row (its _gpu variants)
    cfg_pp: bool = False                # steps with the unguided prediction too (CFG++): an uncond pass at any CFG
    cfg_scale_factor: float = 1.0       # guidance at CFG times this (A1111's DDIM CFG++: its cond_scale_miltiplier)
    a1111_aliases: tuple[str, ...] = ()  # A1111's aliases of the row that are no ComfyUI name (its samplers_map)
    model_range: bool = False           # A1111's txt2img solves between the model's own sigmas, not the schedule's
    chooses_sigmas: bool = False        # calls the model at sigmas it picks, not the list's (DPM fast, DPM adaptive)
    adaptive: bool = False              # picks its number of model calls by the picture too (DPM adaptive)

    @property
    def name(self) -> str:
        """The canonical name: A1111's, else ComfyUI's."""
        return self.a1111 or self.comfy  # type: ignore[return-value]

    @property
    def aliases(self) -> tuple[str, ...]:
        """The row's names besides `name`: A1111's aliases (first, as A1111 lists them), ComfyUI's name of an A1111
        row, ComfyUI's aliases."""
        return tuple(n for n in (*self.a1111_aliases, self.comfy, *self.comfy_aliases) if n and n != self.name)

    @cached_property
    def parameters(self) -> Mapping[str, inspect.Parameter]:
        """Its function's parameters, the options it takes (`inspect.signature`, read once per row); a plain dict,
        not the signature's mappingproxy, so that a row that has read it still copies and pickles."""
        return dict(inspect.signature(self.fn).parameters)

    @property
    def stochastic(self) -> bool:
        return self.noise != "none"

    @property
    def default_eta(self) -> float | None:
        """The eta its function draws with when given none (None: it takes no eta)."""
        taken = self.parameters.get("eta")
        return None if taken is None else taken.default

    def draws_step_noise(self, eta: float | None = None, s_churn: float = 0.0) -> bool:
        """Whether it draws Gaussian step noise (the noise an ENSD reseeds) at ``eta`` (None: its function's
        default) and ``s_churn``: a row whose function takes an eta draws none at eta 0 (DDIM, ``res_multistep``,
        ``dpm_fast`` and ``dpm_adaptive`` by default); one that takes churn (Euler, Heun, DPM2) draws it with churn;
        the SDE rows' Brownian trees are seeded with the seeds themselves."""
        if s_churn > 0 and "s_churn" in self.parameters:
            return True
        if self.noise != "gaussian":
            return False
        default = self.default_eta
        return default is None or (default if eta is None else eta) > 0

    @property
    def default_schedule(self) -> str | None:
        """The schedule it runs on when a request names none: LCM's and TCD's own grid (``trailing``, which their
        ``lcm`` spacing reads as LCMScheduler's 50-step distillation grid), else None (the model's default)."""
        return "trailing" if self.spacing == "lcm" else None


_GAUSS, _BROWNIAN, _DPM, _DDIM = "gaussian", "brownian", "dpm_solver", "ddim"
_KARRAS, _EXP = "karras", "exponential"
COMFY_UNIPC_END = 0.001  # comfy/extra_samplers/uni_pc.py sample_unipc: `if sigmas[-1] < 0.001: timesteps[-1] = 0.001`

SAMPLER_TABLE: tuple[SamplerSpec, ...] = (
    # A1111 name, ComfyUI name, function, then what differs from the defaults (no noise, final sigma 0, ...)
    SamplerSpec("Euler", "euler", K.sample_euler, a1111_aliases=("k_euler",)),
    SamplerSpec("Euler a", "euler_ancestral", K.sample_euler_ancestral, noise=_GAUSS,
                a1111_aliases=("k_euler_a", "k_euler_ancestral")),
    SamplerSpec("Heun", "heun", K.sample_heun, calls_per_step=2, a1111_aliases=("k_heun",)),
    # A1111 and ComfyUI both drop the next-to-last sigma for DPM2 and DPM2 a
    SamplerSpec(
        "DPM2", "dpm_2", K.sample_dpm_2, a1111_automatic=_KARRAS, discard_penultimate=True, calls_per_step=2,
        a1111_aliases=("k_dpm_2",),
    ),
    SamplerSpec(
        "DPM2 a", "dpm_2_ancestral", K.sample_dpm_2_ancestral, noise=_GAUSS, a1111_automatic=_KARRAS,
        discard_penultimate=True, calls_per_step=2, a1111_aliases=("k_dpm_2_a",),
    ),
    SamplerSpec("LMS", "lms", K.sample_lms, min_steps=30, min_steps_karras=20, a1111_aliases=("k_lms",)),
    SamplerSpec("DPM++ 2M", "dpmpp_2m", K.sample_dpmpp_2m, spacing=_DPM, a1111_automatic=_KARRAS,
                a1111_aliases=("k_dpmpp_2m",)),
    SamplerSpec(
        "DPM++ 2M SDE", "dpmpp_2m_sde", K.sample_dpmpp_2m_sde, noise=_BROWNIAN, spacing=_DPM, a1111_automatic=_EXP,
        comfy_aliases=("dpmpp_2m_sde_gpu",), a1111_aliases=("k_dpmpp_2m_sde",),
    ),
    SamplerSpec(
        "DPM++ 2M SDE Heun", "dpmpp_2m_sde_heun", partial(K.sample_dpmpp_2m_sde, solver_type="heun"),
        noise=_BROWNIAN, spacing=_DPM, a1111_automatic=_EXP, comfy_aliases=("dpmpp_2m_sde_heun_gpu",),
        a1111_aliases=("k_dpmpp_2m_sde_heun",),
    ),
    SamplerSpec(
        "DPM++ SDE", "dpmpp_sde", K.sample_dpmpp_sde, noise=_BROWNIAN, a1111_automatic=_KARRAS, calls_per_step=2,
        comfy_aliases=("dpmpp_sde_gpu",), a1111_aliases=("k_dpmpp_sde",),
    ),
    SamplerSpec(
        "DPM++ 2S a", "dpmpp_2s_ancestral", K.sample_dpmpp_2s_ancestral, noise=_GAUSS, a1111_automatic=_KARRAS,
        calls_per_step=2, a1111_aliases=("k_dpmpp_2s_a",),
    ),
    # DPM-Solver-Fast on its own grid between the schedule's ends; A1111 runs it ancestral (its eta default 1), and in
    # txt2img between the model's ends (`KDiffusionSampler.sample`: model_wrap.sigmas[0] / [-1]; only x's scale is
    # the schedule's first sigma)
    SamplerSpec("DPM fast", None, partial(K.sample_dpm_fast, eta=1.0), noise=_GAUSS, model_range=True,
                a1111_aliases=("k_dpm_fast",), chooses_sigmas=True),
    SamplerSpec(None, "dpm_fast", K.sample_dpm_fast, noise=_GAUSS, chooses_sigmas=True),
    # DPM-Solver-12/23 with adaptive steps between the same ends, ancestral in A1111. Its model calls follow the
    # picture; A1111 schedules prompt edits over `steps` of them (calls_per_step 1), then falls back to the first prompt
    SamplerSpec("DPM adaptive", None, partial(K.sample_dpm_adaptive, eta=1.0), noise=_GAUSS, model_range=True,
                a1111_aliases=("k_dpm_ad",), chooses_sigmas=True, adaptive=True),
    SamplerSpec(None, "dpm_adaptive", K.sample_dpm_adaptive, noise=_GAUSS, chooses_sigmas=True, adaptive=True),
    # A1111's Restart (sd_samplers_extra): Heun's steps, from 20 steps on its own Karras list with restarts
    SamplerSpec("Restart", None, K.sample_restart, noise=_GAUSS, a1111_automatic=_KARRAS, calls_per_step=2,
                a1111_aliases=("restart",)),
    # deterministic DPM++ 2S, diffusers' DPMSolverSinglestep; not in A1111
    SamplerSpec("DPM++ 2S", "dpmpp_2s", K.sample_dpmpp_2s, spacing=_DPM),
    # A1111's DPM++ 3M SDE drops the next-to-last sigma, ComfyUI's does not: a row each
    SamplerSpec(
        "DPM++ 3M SDE", None, K.sample_dpmpp_3m_sde, noise=_BROWNIAN, spacing=_DPM, min_steps=30,
        a1111_automatic=_EXP, discard_penultimate=True, a1111_aliases=("k_dpmpp_3m_sde",),
    ),
    SamplerSpec(
        None, "dpmpp_3m_sde", K.sample_dpmpp_3m_sde, noise=_BROWNIAN, spacing=_DPM, min_steps=30,
        comfy_aliases=("dpmpp_3m_sde_gpu",),
    ),
    # CompVis, diffusers set_alpha_to_one=False: DDIM and PLMS end at alphas_cumprod[0]
    SamplerSpec("DDIM", None, L.sample_ddim, noise=_GAUSS, final_sigma="first_alpha", spacing=_DDIM),
    # A1111 1.10's DDIM CFG++ (sd_samplers_timesteps_impl.ddim_cfgpp): DDIM's step along the unguided eps, its
    # guidance at CFG / 12.5 (the CFGDenoiser's cond_scale_miltiplier the function sets)
    SamplerSpec("DDIM CFG++", None, partial(L.sample_ddim, cfg_pp=True), noise=_GAUSS, final_sigma="first_alpha",
                spacing=_DDIM, cfg_pp=True, cfg_scale_factor=1 / 12.5, a1111_aliases=("ddim_cfgpp",)),
    # ComfyUI's ddim (sampler_object("ddim")) is ksampler("euler"): Euler on the KSampler's sigmas, ending at 0
    SamplerSpec(None, "ddim", K.sample_euler, spacing=_DDIM),
    SamplerSpec("PLMS", None, L.sample_plms, final_sigma="first_alpha", spacing=_DDIM, min_steps=30),
    # "plms" (ComfyUI has none; the name is written its way): the same function, never A1111's timestep path
    SamplerSpec(None, "plms", L.sample_plms, final_sigma="first_alpha", spacing=_DDIM, min_steps=30),
    # DDPMScheduler: alpha_prod_t_prev = 1 after the last timestep
    SamplerSpec("DDPM", "ddpm", L.sample_ddpm, noise=_GAUSS, spacing=_DDIM),
    # LCMScheduler returns the denoised sample at the last step; "LCM" applies its boundary scalings of the timestep
    # (A1111's LCM too, on its 50-timestep table), ComfyUI's lcm takes the denoiser's x0 as it is (its sample_lcm)
    SamplerSpec("LCM", None, L.sample_lcm, noise=_GAUSS, wants_sigma_to_t=True, spacing="lcm",
                a1111_aliases=("k_lcm",)),
    SamplerSpec(None, "lcm", L.sample_lcm, noise=_GAUSS, spacing="lcm"),
    # TCDScheduler: LCM's grid (original_inference_steps=50), steps to integer timesteps, ends at alphas_cumprod[0]
    SamplerSpec("TCD", "tcd", L.sample_tcd, noise=_GAUSS, final_sigma="first_alpha", wants_sigma_to_t=True,
                wants_t_to_sigma=True, spacing="lcm", max_eta=1.0),
    # ComfyUI's own (sampling_comfy); res_multistep draws noise only with eta > 0, as DDIM
    SamplerSpec(None, "ipndm", C.sample_ipndm),
    SamplerSpec(None, "ipndm_v", C.sample_ipndm_v),
    SamplerSpec(None, "deis", C.sample_deis),
    SamplerSpec(None, "heunpp2", C.sample_heunpp2, calls_per_step=3),
    SamplerSpec(None, "res_multistep", C.sample_res_multistep, noise=_GAUSS),
    SamplerSpec(None, "res_multistep_ancestral", partial(C.sample_res_multistep, eta=1.0), noise=_GAUSS),
    SamplerSpec(None, "gradient_estimation", C.sample_gradient_estimation),
    # ComfyUI's SDE solvers (sampling_comfy), fresh Gaussian noise within each step; SA-Solver is an SDE between two
    # of the model's timesteps (t_to_sigma), an ODE elsewhere
    SamplerSpec(None, "er_sde", C.sample_er_sde, noise=_GAUSS),
    SamplerSpec(None, "seeds_2", C.sample_seeds_2, noise=_GAUSS, calls_per_step=2),
    SamplerSpec(None, "seeds_3", C.sample_seeds_3, noise=_GAUSS, calls_per_step=3),
    SamplerSpec(None, "sa_solver", C.sample_sa_solver, noise=_GAUSS, wants_t_to_sigma=True),
    SamplerSpec(None, "sa_solver_pece", partial(C.sample_sa_solver, use_pece=True), noise=_GAUSS,
                wants_t_to_sigma=True, calls_per_step=2),
    # CFG++ (sampling_comfy): ComfyUI's *_cfg_pp; Forge's "Euler CFG++", "Euler a CFG++", "DPM++ 2M CFG++" are the same
    SamplerSpec("Euler CFG++", "euler_cfg_pp", C.sample_euler_cfg_pp, cfg_pp=True),
    SamplerSpec("Euler a CFG++", "euler_ancestral_cfg_pp", C.sample_euler_ancestral_cfg_pp, noise=_GAUSS, cfg_pp=True),
    SamplerSpec("DPM++ 2M CFG++", "dpmpp_2m_cfg_pp", C.sample_dpmpp_2m_cfg_pp, spacing=_DPM, a1111_automatic=_KARRAS,
                cfg_pp=True),
    SamplerSpec(None, "dpmpp_2s_ancestral_cfg_pp", C.sample_dpmpp_2s_ancestral_cfg_pp, noise=_GAUSS, calls_per_step=2,
                cfg_pp=True),
    SamplerSpec(None, "res_multistep_cfg_pp", partial(C.sample_res_multistep, cfg_pp=True), noise=_GAUSS, cfg_pp=True),
    SamplerSpec(None, "res_multistep_ancestral_cfg_pp", partial(C.sample_res_multistep, eta=1.0, cfg_pp=True),
                noise=_GAUSS, cfg_pp=True),
    SamplerSpec(None, "gradient_estimation_cfg_pp", partial(C.sample_gradient_estimation, cfg_pp=True), cfg_pp=True),
    # UniPCMultistepScheduler (final_sigmas_type="zero"); ComfyUI's UniPC runs order 3 with bh1 or bh2, ends at
    # sigma 0.001 instead of 0, and its KSampler drops the next-to-last sigma for it
    SamplerSpec("UniPC", None, L.sample_unipc, spacing=_DPM, a1111_aliases=("unipc",)),
    SamplerSpec(
        None, "uni_pc", partial(L.sample_unipc, order=3, variant="bh1", min_last_sigma=COMFY_UNIPC_END),
        spacing=_DPM, discard_penultimate=True,
    ),
    SamplerSpec(
        None, "uni_pc_bh2", partial(L.sample_unipc, order=3, variant="bh2", min_last_sigma=COMFY_UNIPC_END),
        spacing=_DPM, discard_penultimate=True,
    ),
)
"""Every sampler, one row each."""

SAMPLERS: dict[str, SamplerSpec] = {spec.a1111: spec for spec in SAMPLER_TABLE if spec.a1111}
"""A1111 display name -> row (the samplers a user picks from a list)."""

_COMFY: dict[str, SamplerSpec] = {
    name: spec for spec in SAMPLER_TABLE for name in (spec.comfy, *spec.comfy_aliases) if name
}

_A1111_ALIASES: dict[str, SamplerSpec] = {name: spec for spec in SAMPLER_TABLE for name in spec.a1111_aliases}

A1111_SAMPLERS_MAP: dict[str, str] = {name.lower(): spec.a1111 for spec in SAMPLER_TABLE if spec.a1111
                                      for name in (spec.a1111, *spec.a1111_aliases)}
"""A1111's ``samplers_map``: every A1111 name and alias, lower-cased -> the A1111 name ("ddim" -> "DDIM",
"k_euler_a" -> "Euler a"). Only A1111's words: ComfyUI's spellings ("euler_ancestral") are not in it, and its
"ddim" / "plms" / "lcm" are A1111's samplers here, where `get_sampler` gives ComfyUI's rows."""

_BY_SPELLING: dict[str, SamplerSpec] = {**_COMFY, **_A1111_ALIASES, **SAMPLERS}
"""Every name as written: A1111's and ComfyUI's spellings of one word ("DDIM", "ddim") are two rows."""

_BY_NAME: dict[str, SamplerSpec] = {name.casefold(): spec for name, spec in _BY_SPELLING.items()}
"""Every name, case folded; a word both programs use is A1111's (its name comes later in `_BY_SPELLING`)."""


def sampler_names() -> list[str]:
    """Every accepted name: display names first, then A1111's aliases, then the ComfyUI names."""
    return list(SAMPLERS) + sorted(_A1111_ALIASES) + sorted(_COMFY)


def get_sampler(name: str) -> SamplerSpec:
    """Look a sampler up by A1111 or ComfyUI name: its exact spelling, else ignoring case (module docstring);
    the error (for anything but a string too) lists the valid names."""
    if not isinstance(name, str):
        raise UnknownSamplerError(f"a sampler is named by a string, got {name!r}; valid names: "
                                  f"{', '.join(sampler_names())}")
    spec = _BY_SPELLING.get(name.strip()) or _BY_NAME.get(name.strip().casefold())
    if spec is None:
        raise UnknownSamplerError(_joined_name_error(name) or
                                  f"unknown sampler {name!r}; valid names: {', '.join(sampler_names())}")
    return spec


def _joined_name_error(name: str) -> str | None:
    """The error for an old A1111 name that joins a sampler and its scheduler ("DPM++ 2M Karras", as A1111 before
    1.9 wrote it: `split_a1111_sampler`), naming the two; None for any other name."""
    split = split_a1111_sampler(name.strip())
    if split is None or (split[0].strip() not in _BY_SPELLING and split[0].strip().casefold() not in _BY_NAME):
        return None
    return (f"unknown sampler {name!r}: the sampler and its schedule are named apart here, sampler "
            f"{split[0].strip()!r} and schedule {split[1]!r} (A1111 before 1.9 joined them)")


def comfyui_spelling(name: str) -> bool:
    """Whether ``name`` is written as ComfyUI writes one of its samplers (``euler_ancestral``, ``dpmpp_2m``, ``lcm``;
    not "Euler a", "EULER" or "DPM++ 2M"): a request naming a sampler so runs under ComfyUI's conventions
    (``pipeline.request.resolve``)."""
    return name.strip() in _COMFY


A1111_TIMESTEP_SAMPLERS = frozenset({"DDIM", "DDIM CFG++", "PLMS", "UniPC"})
"""A1111's CompVis timestep samplers (`sd_samplers_timesteps.py`): fixed timesteps, eta labelled `Eta DDIM`."""

A1111_TIMESTEP_SCHEDULE = "ddim_uniform"
"""The schedule `a1111_schedule` gives A1111's timestep samplers: on it they run as A1111 runs them
(`runs_a1111_timesteps`)."""


def runs_a1111_timesteps(spec: SamplerSpec, schedule: str | None) -> bool:
    """Whether `spec` on `schedule` is one of A1111's timestep samplers as A1111 runs it (`sd_samplers_timesteps`):
    DDIM, DDIM CFG++, PLMS or UniPC on `A1111_TIMESTEP_SCHEDULE`, which A1111's API and texts give them. They then
    step on A1111's timesteps (`discretization.a1111_timestep_sigmas`), from unit noise in VP scaling, by
    `a1111_run`'s function; on another schedule DDIM (and DDIM CFG++) and PLMS are diffusers', UniPC diffusers'
    UniPCMultistepScheduler."""
    return spec.a1111 in A1111_TIMESTEP_SAMPLERS and (schedule or "").strip().lower() == A1111_TIMESTEP_SCHEDULE


def a1111_run(spec: SamplerSpec, *, unipc_order: int = 3, unipc_variant: str = "bh1",
              unipc_lower_order_final: bool = True) -> SamplerSpec:
    """The row of A1111's timestep sampler `spec` (`runs_a1111_timesteps`) as A1111 runs it: its UniPC with its
    `uni_pc_order`, `uni_pc_variant` and `uni_pc_lower_order_final` options (defaults: order 3, B(h) = h, lowered at
    the end), its PLMS with the improved-Euler start on a single step too (its `plms` evaluates the model at the
    step's end there); DDIM as it is."""
    if spec.a1111 == "UniPC":
        return replace(spec, fn=partial(L.sample_unipc, order=unipc_order, variant=unipc_variant,
                                        lower_order_final=unipc_lower_order_final))
    if spec.a1111 == "PLMS":
        return replace(spec, fn=partial(L.sample_plms, euler_start_alone=True))
    return spec

A1111_LCM = "LCM"
"""A1111's LCM sampler (`sd_samplers_lcm.py`): its denoiser's table holds LCM's 50 distillation timesteps, so its
"Automatic" (the denoiser's own grid), "Uniform" and "Normal" are sdlab's ``a1111_lcm``, ending at t = 19."""


def a1111_schedule(sampler: str, schedule: str | None) -> str | None:
    """The schedule AUTOMATIC1111 runs ``sampler`` on when asked for ``schedule`` (None: "Automatic"); the
    schedule as given for a sampler sdlab does not know (the request's check names it)."""
    try:
        spec = get_sampler(sampler)
    except UnknownSamplerError:
        return schedule
    if spec.a1111 in A1111_TIMESTEP_SAMPLERS:
        return "ddim_uniform"
    schedule = spec.a1111_automatic if schedule is None else schedule
    if spec.a1111 == A1111_LCM and schedule in ("uniform", "normal"):
        return "a1111_lcm"
    return schedule


def also_discards(spec: SamplerSpec, always: bool) -> bool:
    """Whether A1111's `Discard penultimate sigma` (its always_discard_next_to_last_sigma, `always`) drops the
    next-to-last sigma of a sampler whose row keeps it (`KDiffusionSampler.get_sigmas`); A1111's timestep samplers
    (DDIM, DDIM CFG++, PLMS, UniPC) take the timesteps of one step more instead (`CompVisSampler.get_timesteps`)."""
    return always and not spec.discard_penultimate


def steps_warning(spec: SamplerSpec, steps: int, schedule: str) -> str | None:
    """A warning when ``steps`` of ``spec`` on ``schedule`` are likely to give a broken picture, else None."""
    needed = spec.min_steps
    if schedule.strip().lower() == "karras" and spec.min_steps_karras is not None:
        needed = spec.min_steps_karras
    if steps >= needed:
        return None
    return (
        f"{spec.name} needs about {needed} steps with the {schedule} schedule (got {steps}); with guidance "
        "its high order is unstable on coarser grids and the picture can break up: raise --steps or use DPM++ 2M"
    )
