"""A torch checkpoint written tensor by tensor (`checkpoints.torch_zip`): its pickle byte for byte torch.save's,
its records where torch.load (mapped or not) and sdlab's weights-only reader find them, one tensor alive at a
time, and a tensor unlike its declaration refused before the file is whole."""

from __future__ import annotations

import re
import sys
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
            "model_ema.decay": torch.tensor(0.9999), "empty": torch.zeros(0, 4), "empty_columns": torch.zeros(3, 0),
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
    assert _record(written, "/version") == _record(tmp_path / "reference.ckpt", "/version")
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


def _newer_dtypes() -> dict[str, torch.Tensor]:
    """Tensors of the dtypes torch.save pickles over an UntypedStorage (no typed storage class of their own)."""
    g = torch.Generator().manual_seed(1)
    return {"e4m3": torch.randn(3, 4, generator=g).to(torch.float8_e4m3fn),
            "e5m2": torch.randn(5, generator=g).to(torch.float8_e5m2),
            "u16": torch.tensor([[1, 65535], [300, 0]], dtype=torch.uint16),
            "u32": torch.tensor([4_000_000_000], dtype=torch.uint32),
            "u64": torch.tensor([2 ** 63 + 5, 1], dtype=torch.uint64),
            "c32": torch.randn(2, 3, generator=g, dtype=torch.complex64).to(torch.complex32),
            "e4m3_empty": torch.zeros(3, 0).to(torch.float8_e4m3fn), "u16_scalar": torch.tensor(9, dtype=torch.uint16),
            "f32": torch.randn(2, generator=g)}


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)                              # equal bits, any dtype


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_fp8_uint16_and_complex32_tensors_are_written_as_torch_save_writes_them(tmp_path):
    state = _newer_dtypes()
    torch.save(state, tmp_path / "reference.ckpt")
    written = write_torch_checkpoint(tmp_path / "streamed.ckpt", _lazy(state))
    assert _record(written, "/data.pkl") == _record(tmp_path / "reference.ckpt", "/data.pkl")
    for mmap in (False, True):
        loaded = torch.load(written, weights_only=True, mmap=mmap)
        for key, tensor in state.items():
            assert loaded[key].dtype == tensor.dtype and loaded[key].shape == tensor.shape, key
            assert loaded[key].stride() == tensor.stride(), key
            assert torch.equal(_bytes(loaded[key]), _bytes(tensor)), key
    tensors, _ = read_checkpoint(written)
    assert all(tensors[k].dtype == v.dtype and torch.equal(_bytes(tensors[k]), _bytes(v)) for k, v in state.items())


def test_a_quantized_tensor_is_refused_naming_it(tmp_path):
    lazy = _lazy({"w": torch.zeros(2)})
    lazy.declared["w"] = (torch.Size([2]), torch.qint8)
    with pytest.raises(ValueError, match=r"w: a quantized tensor \(torch.qint8\)"):
        write_torch_checkpoint(tmp_path / "m.ckpt", lazy)


# A1111's restricted unpickler's record check, AUTOMATIC1111/stable-diffusion-webui modules/safe.py
# (check_zip_filenames, allowed_zip_names_re; as of commit 05933840): a zip checkpoint with any other record is
# "bad file inside ...", not loaded without --disable-safe-unpickle. Later versions add byteorder and
# .data/serialization_id to the alternatives.
A1111_ALLOWED_ZIP_NAMES = re.compile(r"^([^/]+)/((data/\d+)|version|(data\.pkl))$")


def test_a1111s_safe_unpickler_accepts_every_record_name(tmp_path):
    written = write_torch_checkpoint(tmp_path / "m.ckpt", _lazy(_state()))
    with zipfile.ZipFile(written) as archive:
        names = archive.namelist()
    if sys.byteorder == "little":
        assert [n for n in names if not A1111_ALLOWED_ZIP_NAMES.match(n)] == []
    torch.save(_state(), tmp_path / "reference.ckpt")                           # what torch.save writes is refused
    with zipfile.ZipFile(tmp_path / "reference.ckpt") as archive:
        assert any(not A1111_ALLOWED_ZIP_NAMES.match(n) for n in archive.namelist())


# ... and its RestrictedUnpickler.find_class (same file): the globals it lets a pickle name.
A1111_ALLOWED_GLOBALS = {("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
                         *(("torch", name) for name in ("FloatStorage", "HalfStorage", "IntStorage", "LongStorage",
                                                         "DoubleStorage", "ByteStorage", "float32", "BFloat16Storage"))}


def test_a1111s_safe_unpickler_accepts_the_pickle_of_a_checkpoints_dtypes(tmp_path):
    import pickletools

    kept = (torch.float32, torch.float16, torch.bfloat16, torch.int64)         # an SD checkpoint's
    state = {k: v for k, v in _state().items() if v.dtype in kept}
    written = write_torch_checkpoint(tmp_path / "m.ckpt", _lazy(state))
    named = {tuple(arg.split(" ")) for op, arg, _ in pickletools.genops(_record(written, "/data.pkl"))
             if op.name == "GLOBAL"}
    assert named <= A1111_ALLOWED_GLOBALS, named - A1111_ALLOWED_GLOBALS
