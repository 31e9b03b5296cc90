"""The model listings (`/sdapi/v1/upscalers`, `/sdapi/v1/loras`, `/controlnet/model_list`) read what they show of
each file once per version of the file (`file_hashes.read_per_version`, by path, size and modification time), as
A1111 keeps such reads in its `cache.json`. Reading them on every call cost 0.4 s per 4x ESRGAN `.pth` (its pickle
and network): 38 s for a `/upscalers` call over 100 of them."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

from sdlab.server import a1111, a1111_controlnet, model_folders, registry
from sdlab.server.model_folders import CONTROLNET_SUFFIXES, UPSCALER_SUFFIXES, ModelFolder
from sdlab.server.registry import Lora
from sdlab.utils.file_hashes import read_per_version
from test_upscale_models import new_arch_state


def _counting(monkeypatch, module, name: str) -> list[Path]:
    """Every path `module.name` is called with, from now on."""
    calls, real = [], getattr(module, name)

    def counted(path, *args, **kwargs):
        calls.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def _request(**service) -> SimpleNamespace:
    return SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(service=SimpleNamespace(**service))))


def _content(path: Path) -> bytes:
    return path.read_bytes()


def _rewrite(path: Path, state: dict[str, torch.Tensor]) -> None:
    """`state` into `path` with a modification time of its own (coarse file-system clocks)."""
    before = path.stat().st_mtime_ns
    save_file(state, str(path))
    os.utime(path, ns=(before + 10**9, before + 10**9))


def test_a_value_is_read_again_only_when_its_file_changes(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"one")
    reads = []

    def size(p: Path) -> int:
        reads.append(p)
        return len(p.read_bytes())

    assert [read_per_version(path, size) for _ in range(3)] == [3, 3, 3] and len(reads) == 1
    path.write_bytes(b"three")
    assert read_per_version(path, size) == 5 and len(reads) == 2
    assert read_per_version(tmp_path / "gone.bin", lambda p: "uncached") == "uncached"


def test_a_copy_that_keeps_size_and_modification_time_is_read_again(tmp_path):
    """`cp -p` / `rsync -t` / an unzip put another file of the same size and modification time in place: its
    inode and change time tell it from the file before."""
    path, incoming = tmp_path / "ink.bin", tmp_path / "incoming.bin"
    path.write_bytes(b"v1")
    incoming.write_bytes(b"v2")
    stat = path.stat()
    os.utime(incoming, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert read_per_version(path, _content) == b"v1"
    os.replace(incoming, path)
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    assert read_per_version(path, _content) == b"v2"


def test_the_reads_of_deleted_files_are_dropped(tmp_path, monkeypatch):
    """A folder whose files come and go (training runs rotating LoRAs through it) keeps at most about twice its
    files' reads in memory, not every file it ever held."""
    from sdlab.utils import file_hashes

    monkeypatch.setattr(file_hashes, "_READS", {})
    monkeypatch.setattr(file_hashes, "_sweep_at", file_hashes._FIRST_SWEEP)
    live = tmp_path / "live.bin"
    live.write_bytes(b"live")
    read_per_version(live, _content)
    for n in range(1000):
        path = tmp_path / f"run-{n}.bin"
        path.write_bytes(b"x" * n)
        assert read_per_version(path, _content) == b"x" * n
        path.unlink()
    kept = [Path(name) for name, _ in file_hashes._READS]
    assert live in kept and len(kept) <= file_hashes._FIRST_SWEEP


def test_the_upscalers_list_reads_each_file_once_per_version(tmp_path, monkeypatch):
    for n in range(3):
        save_file(new_arch_state(2), str(tmp_path / f"x2_{n}.safetensors"))
    reads = _counting(monkeypatch, a1111, "read_upscaler")
    request = _request(upscalers=ModelFolder(tmp_path, UPSCALER_SUFFIXES, hashed=False))
    first = a1111.upscalers(request)
    assert a1111.upscalers(request) == first and len(reads) == 3
    _rewrite(tmp_path / "x2_1.safetensors", new_arch_state(4))
    scales = {row["name"]: row["scale"] for row in a1111.upscalers(request)}
    assert scales["x2_1"] == 4 and scales["x2_0"] == 2 and [path.name for path in reads[3:]] == ["x2_1.safetensors"]


def test_the_loras_list_reads_each_header_once_per_version(tmp_path, monkeypatch):
    paths = [tmp_path / f"lora{n}.safetensors" for n in range(3)]
    for path in paths:
        save_file({"w": torch.zeros(2)}, str(path), metadata={"ss_output_name": path.stem})
    reads = _counting(monkeypatch, registry, "safetensors_metadata")
    request = _request(registry=SimpleNamespace(loras=[Lora(path, "0" * 12) for path in paths]))
    first = a1111.loras(request)
    assert a1111.loras(request) == first and len(reads) == 3
    _rewrite(paths[0], {"w": torch.zeros(3)})
    assert a1111.loras(request)[0]["metadata"] == {} and len(reads) == 4


def test_the_controlnet_list_hashes_each_file_once_per_version(tmp_path, monkeypatch):
    for n in range(3):
        save_file({"w": torch.full((4,), float(n))}, str(tmp_path / f"cn{n}.safetensors"))
    reads = _counting(monkeypatch, model_folders, "legacy_hash")
    folder = ModelFolder(tmp_path, CONTROLNET_SUFFIXES, hashed=True)
    request = _request(controlnets=folder)
    first = a1111_controlnet.controlnet_models(request)
    assert a1111_controlnet.controlnet_models(request) == first and len(reads) == 3
