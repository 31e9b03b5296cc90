"""Model families (SD1, SD2, SDXL, and sdlab's own sdlab-tiny) as Python constants: configs, prefixes, prediction, latent scaling.

`FAMILIES` is ordered from the oldest to the newest release; `get_family(name)` looks one up by name.
Imports `models`, `diffusion`, `utils`.
"""

from __future__ import annotations

from sdlab.families.base import FamilySpec, ScheduleSpec, TextEncoderSpec
from sdlab.families.sd1 import SD1, SD1_INPAINT
from sdlab.families.sd2 import SD2, SD2_INPAINT
from sdlab.families.sdlab_tiny import SDLAB_TINY
from sdlab.families.sdxl import SDXL, SDXL_INPAINT, SDXL_REFINER

__all__ = ["FAMILIES", "FamilySpec", "ScheduleSpec", "TextEncoderSpec", "family_names", "get_family"]

FAMILIES: tuple[FamilySpec, ...] = (SD1, SD1_INPAINT, SD2, SD2_INPAINT, SDXL, SDXL_REFINER, SDXL_INPAINT, SDLAB_TINY)

_BY_NAME = {f.name: f for f in FAMILIES}


def family_names() -> tuple[str, ...]:
    return tuple(_BY_NAME)


def get_family(name: str | FamilySpec) -> FamilySpec:
    """The family called `name` ("sd1", "sd1-inpaint", "sd2", "sd2-inpaint", "sdxl", "sdxl-refiner", "sdxl-inpaint", "sdlab-tiny")."""
    if isinstance(name, FamilySpec):
        return name
    key = name.strip().lower()
    if key not in _BY_NAME:
        raise ValueError(f"unknown model family {name!r}; expected one of {', '.join(_BY_NAME)}")
    return _BY_NAME[key]
