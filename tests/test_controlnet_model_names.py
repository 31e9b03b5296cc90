"""A ControlNet unit's `model` is found as the sd-webui-controlnet extension finds it (`find_closest_lora_model_name`)
after sdlab's exact names: the stem in any case, then the shortest stem holding the name."""

from __future__ import annotations

import pytest


def extension_closest_name(search: str, models: dict[str, str], names: dict[str, str]) -> str | None:
    """The extension's `find_closest_lora_model_name` (scripts/controlnet.py), transcribed: `models` titles ->
    files, `names` lowercased stems -> titles."""
    if not search:
        return None
    if search in models:
        return search
    search = search.lower()
    if search in names:
        return names.get(search)
    applicable = [name for name in names.keys() if search in name.lower()]
    if not applicable:
        return None
    applicable = sorted(applicable, key=lambda name: len(name))
    return names[applicable[0]]


@pytest.mark.parametrize("search", ["Tiny_Canny", "canny", "CANNY", "v11p", "depth", "Depth_Big", "nothing"])
def test_a_unit_model_is_found_as_the_extension_finds_it(tmp_path, search):
    """After the title, stem and file name, a ControlNet is matched as the extension matches it: the stem in any
    case, then the shortest stem holding the name; before, `Tiny_Canny` and `canny` were 404s."""
    from sdlab.server.model_folders import CONTROLNET_SUFFIXES, ModelFolder

    for stem in ("tiny_canny", "control_v11p_sd15_canny", "depth_big"):
        (tmp_path / f"{stem}.safetensors").write_bytes(b"\0" * 4096)
    folder = ModelFolder(tmp_path, CONTROLNET_SUFFIXES, hashed=True)
    titles = {f.title: f for f in folder.files}
    expected = extension_closest_name(search, titles, {f.path.stem.lower(): f.title for f in folder.files})
    found = folder.find(search)
    assert (found.title if found else None) == expected
