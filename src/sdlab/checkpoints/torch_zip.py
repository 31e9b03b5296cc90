"""A weights-only torch checkpoint (`torch.save`'s zip format) of a state dict, written tensor by tensor.

`torch.save` pickles its object whole and then writes each storage it met as a record `data/<key>`. The pickle of a
dict of contiguous tensors, each of its own storage, needs only their dtypes, shapes and element counts. A tensor
of a classic dtype (float32, float16, bfloat16, int64, bool, ...) is `torch._utils._rebuild_tensor_v2(storage, 0,
shape, strides, False, OrderedDict())`, its storage the persistent id `("storage", torch.<Type>Storage, key, "cpu",
numel)`; a newer dtype (float8, uint16/32/64, complex32, ...) has no such class and is `_rebuild_tensor_v3(...,
dtype)` over `("storage", torch.UntypedStorage, key, "cpu", nbytes)`, as torch's `Tensor._reduce_ex_internal`
makes them. `state_pickle` makes those bytes from a `LazyMapping`'s shapes and dtypes (byte for byte the `data.pkl`
torch.save writes for the same tensors); no pickle is run. `write_torch_checkpoint` then writes `data.pkl`, each
storage and `version`, uncompressed, each record's bytes starting at a multiple of 64 as torch aligns them (padding
in its local header's extra field), so `torch.load(..., mmap=True)` maps them. It leaves out the records
torch.save adds that torch.load does not need (`.format_version`, `.storage_alignment`, `.data/serialization_id`,
and `byteorder` on a little-endian machine, which torch.load assumes without it): A1111's restricted unpickler
(modules/safe.py) refuses a file with any record but `data.pkl`, `data/N` and `version` (newer versions also
`byteorder`). A tensor is made, written and dropped before the next: the file is never whole in memory.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import struct
import sys
import zipfile
from pathlib import Path

import torch

from sdlab.checkpoints.io import LazyMapping

ALIGNMENT = 64
"""Where every record's bytes start (torch's writer's default `_get_storage_alignment`)."""
ARCHIVE = "archive"
"""The folder the records are in (torch.save names it after the file, or `archive` for a buffer; torch.load
takes any)."""
_PICKLE_PROTOCOL = 2                                    # torch.serialization.DEFAULT_PROTOCOL
_ZIP64_EXTRA = 20                                       # the zip64 field `force_zip64` adds to a local header
TYPED_STORAGES = {
    torch.float64: "DoubleStorage", torch.float32: "FloatStorage", torch.float16: "HalfStorage",
    torch.bfloat16: "BFloat16Storage", torch.int64: "LongStorage", torch.int32: "IntStorage",
    torch.int16: "ShortStorage", torch.int8: "CharStorage", torch.uint8: "ByteStorage", torch.bool: "BoolStorage",
    torch.complex128: "ComplexDoubleStorage", torch.complex64: "ComplexFloatStorage",
}
"""dtype -> the typed storage class torch.save names for it; any other dtype is pickled over an UntypedStorage."""
_QUANTIZED = (torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4)


class _Storage:
    """Stands for a tensor's storage in the pickle: its persistent id."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _Tensor:
    """Pickles as torch pickles a contiguous CPU tensor of `shape` over the whole of its own `storage`."""

    def __init__(self, storage: _Storage, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape

    def __reduce_ex__(self, protocol: int):
        strides = torch.empty(self.shape, device="meta").stride()            # torch's own: (3, 0) -> (1, 1)
        args = (self.storage, 0, tuple(self.shape), strides, False, collections.OrderedDict())
        if self.storage.dtype in TYPED_STORAGES:
            return torch._utils._rebuild_tensor_v2, args
        return torch._utils._rebuild_tensor_v3, (*args, self.storage.dtype)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: object):
        if isinstance(obj, _Storage):
            if obj.dtype in TYPED_STORAGES:
                return "storage", getattr(torch, TYPED_STORAGES[obj.dtype]), obj.key, "cpu", obj.numel
            return "storage", torch.UntypedStorage, obj.key, "cpu", obj.numel * obj.dtype.itemsize
        return None


def state_pickle(state: LazyMapping) -> bytes:
    """The `data.pkl` of `torch.save(dict(state))` for contiguous tensors of their own storages (storage keys
    "0", "1", ... in `state`'s order), from the shapes and dtypes alone."""
    placeholders = {}
    for index, key in enumerate(state):
        shape = tuple(state.shape(key))
        if state.dtype(key) in _QUANTIZED:
            raise ValueError(f"{key}: a quantized tensor ({state.dtype(key)}) cannot be written as plain weights")
        placeholders[key] = _Tensor(_Storage(str(index), state.dtype(key), math.prod(shape)), shape)
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=_PICKLE_PROTOCOL).dump(placeholders)
    return buffer.getvalue()


def _open_record(archive: zipfile.ZipFile, name: str, size: int):
    """A stream for record `name` of `size` bytes, stored, its bytes starting at a multiple of `ALIGNMENT`."""
    info = zipfile.ZipInfo(f"{ARCHIVE}/{name}")
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = size
    header = 30 + len(info.filename.encode()) + 4 + _ZIP64_EXTRA
    padding = -(archive.fp.tell() + header) % ALIGNMENT
    info.extra = b"FB" + struct.pack("<H", padding) + b"Z" * padding    # torch's writer's padding field
    stream = archive.open(info, "w", force_zip64=True)
    if archive.fp.tell() % ALIGNMENT:
        raise RuntimeError(f"record {name} of the torch checkpoint would start unaligned")
    return stream


def _write_record(archive: zipfile.ZipFile, name: str, data: bytes | memoryview) -> None:
    with _open_record(archive, name, len(data)) as stream:
        stream.write(data)


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes in the machine's order (as torch.save writes a storage)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def write_torch_checkpoint(path: Path, state: LazyMapping) -> Path:
    """Write `state` to `path` as `torch.save(dict(state), path)` would (weights-only loadable), one tensor in
    memory at a time; a tensor whose shape or dtype is not what `state` declared is a ValueError."""
    with zipfile.ZipFile(path, "w", allowZip64=True) as archive:
        _write_record(archive, "data.pkl", state_pickle(state))
        if sys.byteorder != "little":                                        # torch.load assumes little without it
            _write_record(archive, "byteorder", sys.byteorder.encode())
        for index, key in enumerate(state):
            tensor = state[key]
            if tensor.shape != state.shape(key) or tensor.dtype != state.dtype(key):
                raise ValueError(f"{key}: made {tuple(tensor.shape)} {tensor.dtype}, declared "
                                 f"{tuple(state.shape(key))} {state.dtype(key)}")
            _write_record(archive, f"data/{index}", _tensor_bytes(tensor))
            del tensor
        _write_record(archive, "version", b"3\n")
    return path
