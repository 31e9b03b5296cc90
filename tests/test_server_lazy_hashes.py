"""The server lists checkpoints and LoRAs as A1111 1.10 does: from the hash cache, reading no file whole but the
startup model's, which it loads at once; a model is hashed as it is loaded or named by a job
(`Checkpoint.calculate_hash`, A1111's `calculate_shorthash`), a LoRA as a job uses it (`Lora.read_hash`, A1111's
`NetworkOnDisk.read_hash`). Whole-file reads are counted by a spy on png_info's hash functions."""

from __future__ import annotations

import hashlib
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdlab.pipeline import png_info
from sdlab.server.registry import ModelRegistry
from sdlab.utils import file_hashes


def _a1111_title(name: str, sha256: str | None) -> str:
    """A1111 1.10 `CheckpointInfo.__init__`: `self.sha256 = hashes.sha256_from_cache(...)`, `self.shorthash =
    self.sha256[0:10] if self.sha256 else None`, `self.title = name if self.shorthash is None else
    f'{name} [{self.shorthash}]'`."""
    shorthash = sha256[0:10] if sha256 else None
    return name if shorthash is None else f"{name} [{shorthash}]"


@pytest.fixture
def hashed(monkeypatch, tmp_path) -> list[str]:
    """The files read whole for a hash (their names), with an empty hash cache of this test's own."""
    monkeypatch.setenv("SDLAB_CACHE_DIR", str(tmp_path / "cache"))
    names: list[str] = []
    for module, function in ((file_hashes, "_file_sha256"), (png_info, "_addnet_hash")):
        real = getattr(module, function)

        def spy(path, real=real):
            names.append(Path(path).name)
            return real(path)

        monkeypatch.setattr(module, function, spy)
    return names


@pytest.fixture
def models(tmp_path) -> Path:
    folder = tmp_path / "models"
    (folder / "Lora").mkdir(parents=True)
    for index in range(3):
        (folder / f"m{index}.safetensors").write_bytes(bytes([index]) * 4096)
    for index in range(4):
        save_file({"w": torch.full((2, 2), float(index))}, str(folder / "Lora" / f"l{index}.safetensors"))
    (folder / "Lora" / "broken.safetensors").write_bytes(b"not a safetensors file")
    return folder


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_listing_hashes_only_the_startup_model(models, hashed, caplog):
    with caplog.at_level(logging.WARNING):
        registry = ModelRegistry(models / "m0.safetensors", models)
    assert hashed == ["m0.safetensors"]
    rows = {row["model_name"]: row for row in (c.as_a1111() for c in registry.checkpoints)}
    assert rows["m0"]["title"] == _a1111_title("m0.safetensors", _sha256(models / "m0.safetensors"))
    assert rows["m0"]["sha256"] == _sha256(models / "m0.safetensors") and rows["m0"]["hash"] == rows["m0"]["sha256"][:10]
    for name in ("m1", "m2"):
        assert rows[name]["title"] == _a1111_title(f"{name}.safetensors", None) == f"{name}.safetensors"
        assert rows[name]["hash"] is None and rows[name]["sha256"] is None
    assert sorted(lora.name for lora in registry.loras) == ["l0", "l1", "l2", "l3"]     # the broken one skipped
    assert all(lora.hash is None for lora in registry.loras) and "broken.safetensors" in caplog.text


def test_a_model_is_hashed_once_when_needed_and_later_listings_read_the_cache(models, hashed):
    registry = ModelRegistry(models / "m0.safetensors", models)
    model = registry.find("m1.safetensors")
    assert model.calculate_hash() == _sha256(models / "m1.safetensors")[:10]
    assert registry.find("m1").title == f"m1.safetensors [{model.hash}]" and registry.find(model.hash) is model
    lora = registry.lora("l2")
    blob = lora.path.read_bytes()                               # A1111's addnet hash: the data past the header
    assert lora.read_hash() == hashlib.sha256(blob[8 + int.from_bytes(blob[:8], "little"):]).hexdigest()[:12]
    del hashed[:]
    registry.refresh()
    assert hashed == []                                         # every hash known now comes from the cache
    assert registry.find("m1").title == f"m1.safetensors [{model.hash}]" and registry.lora("l2").hash == lora.hash
    assert registry.find("m2").hash is None and registry.lora("l1").hash is None


def _a1111_closest_match(titles: list[str], search: str) -> str | None:
    """A1111 1.10 `sd_models.get_closet_checkpoint_match` (aliases aside): the shortest title containing `search`,
    else the shortest containing it without its checksum (`re_strip_checksum = r"\\s*\\[[^]]+]\\s*$"`)."""
    for wanted in (search, re.sub(r"\s*\[[^]]+]\s*$", "", search)):
        found = sorted([title for title in titles if wanted in title], key=len)
        if found:
            return found[0]
    return None


def test_a_model_named_by_a_title_with_a_hash_is_found_before_it_is_hashed(models, hashed):
    registry = ModelRegistry(models / "m0.safetensors", models)
    titles = [checkpoint.title for checkpoint in registry.checkpoints]
    m1 = registry.find("m1.safetensors")
    for title in (f"m1.safetensors [{_sha256(models / 'm1.safetensors')[:10]}]", "m1.safetensors [0123456789]"):
        assert _a1111_closest_match(titles, title) == m1.title
        assert registry.find(title) is m1
    assert registry.find("m0.safetensors [0123456789]") is registry.default
    assert registry.find("m9.safetensors [0123456789]") is None
    assert hashed == ["m0.safetensors"]


def test_requests_hashing_a_model_at_once_read_it_once(models, hashed, monkeypatch):
    registry = ModelRegistry(models / "m0.safetensors", models)
    model, spy = registry.find("m1"), file_hashes._file_sha256

    def slow(path):
        time.sleep(0.2)
        return spy(path)

    monkeypatch.setattr(file_hashes, "_file_sha256", slow)
    with ThreadPoolExecutor(3) as pool:
        hashes = list(pool.map(lambda _: model.calculate_hash(), range(3)))
    assert hashes == [_sha256(models / "m1.safetensors")[:10]] * 3
    assert hashed == ["m0.safetensors", "m1.safetensors"]


def test_a_refresh_without_a_usable_hash_cache_keeps_the_hashes_computed(models, hashed, monkeypatch, tmp_path):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("SDLAB_CACHE_DIR", str(tmp_path / "a_file"))        # the cache cannot be opened
    registry = ModelRegistry(models / "m0.safetensors", models)
    title = f"m1.safetensors [{registry.find('m1').calculate_hash()}]"       # a queued job's model
    del hashed[:]
    registry.refresh()
    assert hashed == [] and registry.find("m1").title == title and registry.default.hash is not None
    (models / "m1.safetensors").write_bytes(b"another version")
    registry.refresh()
    assert registry.find("m1").hash is None and registry.find(title) is registry.find("m1")


def test_checkpoints_and_loras_are_hashable(models, hashed):
    registry = ModelRegistry(models / "m0.safetensors", models)
    checkpoint, lora = registry.find("m1"), registry.lora("l1")
    assert {checkpoint: 1}[registry.find("m1.safetensors")] == 1 and lora in {registry.lora("l1")}
    checkpoint.calculate_hash()
    assert checkpoint in set(registry.checkpoints) and len(set(registry.checkpoints)) == 3
