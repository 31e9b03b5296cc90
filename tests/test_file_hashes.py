"""Hashes of big files are computed once per version of the file (`sdlab.utils.file_hashes`)."""

from __future__ import annotations

import hashlib
import os

import pytest

from sdlab.pipeline import png_info
from sdlab.utils import file_hashes
from sdlab.utils.file_hashes import cache_dir, cached_hash


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDLAB_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _counting(calls):
    def compute(path):
        calls.append(path)
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return compute


def test_a_file_is_hashed_once_until_it_changes(tmp_path, cache):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"x" * 1000)
    calls = []
    first = cached_hash(model, "sha256", _counting(calls))
    assert cached_hash(model, "sha256", _counting(calls)) == first and len(calls) == 1
    assert cache_dir() == cache and (cache / "file-hashes.sqlite").is_file()
    model.write_bytes(b"y" * 1000)                                  # same size, new mtime
    os.utime(model, ns=(1, 1))
    assert cached_hash(model, "sha256", _counting(calls)) == hashlib.sha256(b"y" * 1000).hexdigest()
    assert len(calls) == 2
    assert cached_hash(model, "other", _counting(calls)) and len(calls) == 3   # kinds are kept apart


def test_model_lora_and_embedding_hashes_go_through_the_cache(tmp_path, cache, monkeypatch):
    model = tmp_path / "m.ckpt"
    model.write_bytes(b"weights" * 100)
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    assert png_info.model_hash(model) == digest[:10] and png_info.embedding_hash(model) == digest[:12]
    monkeypatch.setattr(file_hashes, "_file_sha256", lambda *a: pytest.fail("re-read a cached file"))
    assert png_info.model_hash(model) == digest[:10] and png_info.file_sha256(model) == digest


def test_an_unusable_cache_still_gives_the_right_hash(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("SDLAB_CACHE_DIR", str(blocker))
    model = tmp_path / "m.bin"
    model.write_bytes(b"abc")
    assert png_info.model_hash(model) == hashlib.sha256(b"abc").hexdigest()[:10]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "file-hashes.sqlite").write_bytes(b"not a database at all" * 100)
    monkeypatch.setenv("SDLAB_CACHE_DIR", str(broken))
    assert png_info.model_hash(model) == hashlib.sha256(b"abc").hexdigest()[:10]
