"""A model's native size: the shipped model's 64 px, `new-model --tiny`'s 64 px, a file's `modelspec.resolution`.

Drawing (and training) without a size uses the model's native size; a tiny model made by `sdlab new-model
--tiny` records its 64 px in the file instead of inheriting its family's 512 / 768 / 1024.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bundle_fixtures import tiny_bundle, write_original

import sdlab
from sdlab.checkpoints.create import TINY_SIZE, new_bundle
from sdlab.checkpoints.file_format import native_size
from sdlab.checkpoints.load import load_bundle
from sdlab.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_new_model_tiny_is_native_at_64_px(tmp_path, capsys, family):
    out = tmp_path / f"{family}.safetensors"
    assert main(["new-model", str(out), "--family", family, "--tiny"]) == 0
    capsys.readouterr()
    bundle = load_bundle(out)
    assert bundle.family.name == family and bundle.default_size == TINY_SIZE == 64
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["default_size"] == 64


def test_a_tiny_model_draws_at_its_native_size_without_a_size(tmp_path):
    path = tmp_path / "tiny.safetensors"
    from sdlab.checkpoints.save import save_bundle

    save_bundle(new_bundle("sd1", tiny=True, seed=1), path)
    image = sdlab.load(path).txt2img("a cube", steps=1, seed=0).images[0]
    assert image.size == (64, 64)


def test_released_files_keep_their_family_size_unless_the_file_states_one(tmp_path):
    plain = write_original(tiny_bundle("sd1"), tmp_path / "plain.safetensors", junk=False)
    assert load_bundle(plain).default_size == 512                              # nothing said: SD1's 512
    stated = write_original(tiny_bundle("sd1"), tmp_path / "stated.safetensors", junk=False,
                            metadata={"modelspec.resolution": "768x768"})
    assert load_bundle(stated).default_size == 768


@pytest.mark.parametrize(("text", "size"), [
    ("1024x1024", 1024), (" 64 x 64 ", 64), ("1024x768", None), ("0x0", None), ("99999x99999", None),
    ("big", None), ("", None),
])
def test_modelspec_resolution_is_read_strictly(text, size):
    assert native_size({"modelspec.resolution": text}) == size
    assert native_size({}) is None


def test_tiny_bundles_in_memory_are_native_at_64_px():
    assert new_bundle("sd1", tiny=True).default_size == 64
    assert new_bundle("sdlab-tiny", tiny=True).default_size == 64
