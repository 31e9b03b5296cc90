"""Model families as plug-ins: one folder per family, discovered at import, plus any registered at run time.

A family folder `sdlab/families/<name>/` is a package that exports
  - `FAMILIES`: its `FamilySpec`s, the base family first, then its variants (inpainting, refiner, v);
  - `RELEASED`: when its first model came out ("2022-08"), which orders the registry (oldest first).
Each spec owns its components, detection signature, conditioner, latent format and defaults (see
`families/base.py`), so adding a family is adding one folder (and its tests): detection, loading, saving,
conditioning and LoRA metadata read everything from the spec. `register(plugin)` adds an object with the same
two attributes at run time (a family that lives outside the package, or a test's toy family).

`FAMILIES` lists the packaged families; `family_names()`, `get_family(name)` and `registered_families()` also
see registered ones. Imports `models`, `diffusion`, `utils`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sdlab.families.base import (
    ComponentSpec,
    ConditionerSpec,
    EDMSpec,
    FamilySpec,
    ScheduleSpec,
    Signature,
    TextEncoderSpec,
)
from sdlab.families.latent_format import LatentFormat

__all__ = [
    "FAMILIES",
    "ComponentSpec",
    "ConditionerSpec",
    "EDMSpec",
    "FamilySpec",
    "LatentFormat",
    "ScheduleSpec",
    "Signature",
    "TextEncoderSpec",
    "family_names",
    "get_family",
    "register",
    "registered",
    "registered_families",
    "unregister",
]


def _plugin_families(plugin: Any) -> tuple[FamilySpec, ...]:
    families = tuple(getattr(plugin, "FAMILIES", ()))
    if not families or not all(isinstance(f, FamilySpec) for f in families):
        raise ValueError(f"family plug-in {getattr(plugin, '__name__', plugin)!r} must export FAMILIES, a tuple of FamilySpec")
    if not isinstance(getattr(plugin, "RELEASED", None), str):
        raise ValueError(f"family plug-in {getattr(plugin, '__name__', plugin)!r} must export RELEASED, a date string")
    return families


def _discover() -> list[Any]:
    """Every family folder of this package, oldest release first."""
    plugins = [importlib.import_module(f"{__name__}.{info.name}") for info in pkgutil.iter_modules(__path__) if info.ispkg]
    for plugin in plugins:
        _plugin_families(plugin)
    return sorted(plugins, key=lambda p: p.RELEASED)


_PLUGINS: list[Any] = _discover()
FAMILIES: tuple[FamilySpec, ...] = tuple(f for plugin in _PLUGINS for f in _plugin_families(plugin))
_BY_NAME: dict[str, FamilySpec] = {}


def _index() -> None:
    table: dict[str, FamilySpec] = {}
    for plugin in sorted(_PLUGINS, key=lambda p: p.RELEASED):
        for family in _plugin_families(plugin):
            if family.name in table:
                raise ValueError(f"two model families are called {family.name!r}")
            table[family.name] = family
    _BY_NAME.clear()
    _BY_NAME.update(table)


_index()


def register(plugin: Any) -> None:
    """Add a family plug-in (a module or any object with `FAMILIES` and `RELEASED`) to the registry."""
    _plugin_families(plugin)
    _PLUGINS.append(plugin)
    try:
        _index()
    except ValueError:
        _PLUGINS.remove(plugin)
        _index()
        raise


def unregister(plugin: Any) -> None:
    """Remove a plug-in added with `register`."""
    _PLUGINS.remove(plugin)
    _index()


@contextmanager
def registered(plugin: Any) -> Iterator[Any]:
    """`register(plugin)` for the duration of a `with` block."""
    register(plugin)
    try:
        yield plugin
    finally:
        unregister(plugin)


def registered_families() -> tuple[FamilySpec, ...]:
    """Every family sdlab knows now, packaged and registered, oldest release first."""
    return tuple(_BY_NAME.values())


def family_names() -> tuple[str, ...]:
    return tuple(_BY_NAME)


def get_family(name: str | FamilySpec) -> FamilySpec:
    """The family called `name` ("sd1", "sd1-inpaint", "sd2", "sd2-inpaint", "sdxl", "sdxl-refiner", "sdxl-inpaint",
    "sdlab-tiny", or a registered plug-in's)."""
    if isinstance(name, FamilySpec):
        return name
    key = name.strip().lower()
    if key not in _BY_NAME:
        raise ValueError(f"unknown model family {name!r}; expected one of {', '.join(_BY_NAME)}")
    return _BY_NAME[key]
