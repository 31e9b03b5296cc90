"""A1111's scheduler names and labels <-> sdlab's discretization names.

A1111 (`modules/sd_schedulers.py`) names a schedule twice: a key ("sgm_uniform") that its API takes and a
label ("SGM Uniform") that its infotext writes as `Schedule type`. sdlab accepts both everywhere and
writes the label, so a PNG made here reads back in A1111 as the same schedule; schedules A1111 lacks
("trailing", "diffusers_karras", ...) keep sdlab's name.

A1111 and ComfyUI give two words to other schedules than each other: "beta" and "kl_optimal". sdlab's
names are ComfyUI's (`beta`, `kl_optimal`); A1111's label, spelt as A1111 writes it ("Beta", "KL Optimal"),
picks A1111's (`a1111_beta`, `a1111_kl_optimal`), which sdlab's pictures record under that label.
"""

from __future__ import annotations

from sdlab.diffusion.discretization import DISCRETIZATIONS

__all__ = ["A1111_SCHEDULERS", "a1111_label", "a1111_name", "schedule_from_a1111", "schedule_key",
           "split_a1111_sampler"]

#: A1111 key -> (its label, the sdlab discretization; None for "automatic" = the model's default), in A1111's
#: order; "turbo" is Forge's
A1111_SCHEDULERS: dict[str, tuple[str, str | None]] = {
    "automatic": ("Automatic", None),
    "uniform": ("Uniform", "uniform"),
    "karras": ("Karras", "karras"),
    "exponential": ("Exponential", "exponential"),
    "polyexponential": ("Polyexponential", "polyexponential"),
    "sgm_uniform": ("SGM Uniform", "sgm_uniform"),
    "kl_optimal": ("KL Optimal", "a1111_kl_optimal"),
    "align_your_steps": ("Align Your Steps", "align_your_steps"),
    "simple": ("Simple", "simple"),
    "normal": ("Normal", "normal"),
    "ddim": ("DDIM", "ddim_uniform"),
    "beta": ("Beta", "a1111_beta"),
    "turbo": ("Turbo", "turbo"),
}

_SUFFIXES = sorted({**{spelling: key for key, (label, _) in A1111_SCHEDULERS.items() for spelling in (key, label)},
                    "SGMUniform": "sgm_uniform"}.items(), key=lambda item: -len(item[0]))
"""(spelling, A1111 key) of every A1111 scheduler's key, label and alias, the longest first."""

_LABELS = {target: label for label, target in A1111_SCHEDULERS.values() if target is not None}
_LABELS["align_your_steps_sdxl"] = "Align Your Steps"   # A1111's one label: its SDXL levels for an SDXL model


def schedule_key(name: str) -> str:
    """A schedule name as the tables key it: "SGM Uniform" -> "sgm_uniform"."""
    return name.strip().lower().replace(" ", "_")


def a1111_label(schedule: str | None) -> str | None:
    """The `Schedule type` A1111 writes for sdlab's `schedule` ("sgm_uniform" -> "SGM Uniform"); a schedule
    A1111 does not have keeps its sdlab name."""
    if schedule is None:
        return None
    return _LABELS.get(schedule_key(schedule), schedule)


def schedule_from_a1111(name: str) -> str | None:
    """An A1111 key or label, or an sdlab discretization name -> sdlab's name; None for "automatic" (the
    model's default). An A1111 label as A1111 spells it comes first, then sdlab's names, then A1111's keys and
    labels in any case (module docstring: "Beta" is A1111's, "beta" ComfyUI's). ValueError names the valid
    choices when it is none of these."""
    for label, target in A1111_SCHEDULERS.values():
        if name.strip() == label:
            return target
    key = schedule_key(name)
    if key in DISCRETIZATIONS:
        return key
    for a1111, (label, target) in A1111_SCHEDULERS.items():
        if key in (a1111, schedule_key(label)):
            return target
    valid = ", ".join([*A1111_SCHEDULERS, *sorted(set(DISCRETIZATIONS) - set(A1111_SCHEDULERS))])
    raise ValueError(f"unknown scheduler {name!r}; valid names: {valid}")


def a1111_name(key: str) -> str:
    """The name that picks A1111's scheduler `key` in sdlab (`schedule_from_a1111`): the key, or its label
    where the key is sdlab's name of another schedule ("beta", "kl_optimal": ComfyUI's)."""
    label, target = A1111_SCHEDULERS[key]
    return label if key in DISCRETIZATIONS and key != target else key


def split_a1111_sampler(name: str) -> tuple[str, str] | None:
    """An old A1111 sampler name that ends in a scheduler ("DPM++ 2M Karras", "Euler a sgm_uniform") -> (the
    sampler's name, the name of the A1111 scheduler, `a1111_name`), as A1111 1.9+'s `get_sampler_and_scheduler`
    splits it: the key, label or alias of any of its schedulers, in any case, the longest that ends the name
    ("SGM Uniform" before "Uniform"). None when no scheduler ends it."""
    lowered = name.lower()
    for spelling, key in _SUFFIXES:
        if lowered.endswith(" " + spelling.lower()):
            return name[: -len(spelling) - 1], a1111_name(key)
    return None
