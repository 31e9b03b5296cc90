"""A torch checkpoint written tensor by tensor (`checkpoints.torch_zip`): its pickle byte for byte torch.save's,
its records where torch.load (mapped or not) and sdlab's weights-only reader find them, one tensor alive at a
time, and a tensor unlike its declaration refused before the file is whole."""

from __future__ import annotations

import weakref
import zipfile
from pathlib import Path

import pytest
import torch

from sdlab.checkpoints.io import LazyMapping, read_checkpoint
from sdlab.checkpoints.torch_zip import ALIGNMENT, write_torch_checkpoint


class Tensors(LazyMapping):
    """Tensors made on access from `make` (key -> function), shapes and dtypes declared beforehand; counts how
    many made tensors are alive at once."""

    def __init__(self, make: dict, declared: dict):
        self.make, self.declared = make, declared
        self.alive: list[weakref.ref] = []
        self.most_alive = 0

    def __getitem__(self, key: str) -> torch.Tensor:
        tensor = self.make[key]()
        self.alive = [ref for ref in self.alive if ref() is not None] + [weakref.ref(tensor)]
        self.most_alive = max(self.most_alive, len(self.alive))
        return tensor

    def __iter__(self):
        return iter(self.make)

    def __len__(self) -> int:
        return len(self.make)

    def shape(self, key: str) -> torch.Size:
        return self.declared[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return self.declared[key][1]


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"model.diffusion_model.out.2.weight": torch.randn(4, 8, 3, 3, generator=g),
            "first_stage_model.decoder.conv_in.bias": torch.randn(7, generator=g).half(),
            "cond_stage_model.proj": torch.randn(3, 5, generator=g).bfloat16(),
            "model_ema.decay": torch.tensor(0.9999), "empty": torch.zeros(0, 4),
            "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
            "mask": torch.tensor([True, False, True]), "double": torch.randn(2, generator=g, dtype=torch.float64)}


def _lazy(state: dict[str, torch.Tensor]) -> Tensors:
    return Tensors({k: (lambda v=v: v.clone()) for k, v in state.items()},
                   {k: (v.shape, v.dtype) for k, v in state.items()})


def _record(path: Path, suffix: str) -> bytes:
    with zipfile.ZipFile(path) as archive:
        return archive.read(next(name for name in archive.namelist() if name.endswith(suffix)))


def test_the_file_is_torch_saves_and_loads_as_it(tmp_path):
    state = _state()
    torch.save(state, tmp_path / "reference.ckpt")
    written = write_torch_checkpoint(tmp_path / "streamed.ckpt", _lazy(state))
    assert _record(written, "/data.pkl") == _record(tmp_path / "reference.ckpt", "/data.pkl")
    for suffix in ("/.format_version", "/.storage_alignment", "/byteorder", "/version"):
        assert _record(written, suffix) == _record(tmp_path / "reference.ckpt", suffix), suffix
    for mmap in (False, True):
        loaded = torch.load(written, weights_only=True, mmap=mmap)
        assert list(loaded) == list(state)
        for key, tensor in state.items():
            assert loaded[key].dtype == tensor.dtype and loaded[key].stride() == tensor.stride(), key
            assert torch.equal(loaded[key], tensor), key
    tensors, _ = read_checkpoint(written)                                       # sdlab's own weights-only reader
    assert all(torch.equal(tensors[k], v) for k, v in state.items())


def test_every_record_starts_aligned_as_torchs_writer_aligns_it(tmp_path):
    written = write_torch_checkpoint(tmp_path / "m.ckpt", _lazy(_state()))
    with zipfile.ZipFile(written) as archive, open(written, "rb") as file:
        for info in archive.infolist():
            file.seek(info.header_offset + 26)
            name_length, extra_length = (int.from_bytes(file.read(2), "little") for _ in range(2))
            assert (info.header_offset + 30 + name_length + extra_length) % ALIGNMENT == 0, info.filename
            assert info.compress_type == zipfile.ZIP_STORED


def test_one_tensor_is_alive_at_a_time(tmp_path):
    state = _lazy(_state())
    write_torch_checkpoint(tmp_path / "m.ckpt", state)
    assert state.most_alive == 1
    state = _lazy(_state())
    torch.save(dict(state.items()), tmp_path / "whole.ckpt")                   # what torch.save of a dict holds
    assert state.most_alive == len(_state())


def test_a_tensor_unlike_its_declaration_is_refused(tmp_path):
    state = _state()
    lazy = _lazy(state)
    lazy.declared["cond_stage_model.proj"] = (torch.Size([5, 3]), torch.bfloat16)
    with pytest.raises(ValueError, match=r"cond_stage_model.proj: made \(3, 5\) torch.bfloat16, declared \(5, 3\)"):
        write_torch_checkpoint(tmp_path / "m.ckpt", lazy)
