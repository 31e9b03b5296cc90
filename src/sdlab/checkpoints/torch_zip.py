"""A weights-only torch checkpoint (`torch.save`'s zip format) of a state dict, written tensor by tensor.

`torch.save` pickles its object whole and then writes each storage it met as a record `data/<key>`. The pickle of a
dict of contiguous tensors, each of its own storage, needs only their dtypes, shapes and element counts: each
tensor is `torch._utils._rebuild_tensor_v2(storage, 0, shape, strides, False, OrderedDict())`, each storage the
persistent id `("storage", torch.<Type>Storage, key, "cpu", numel)`. `state_pickle` makes those bytes from a
`LazyMapping`'s shapes and dtypes (byte for byte the `data.pkl` torch.save writes for the same tensors); no pickle is
run. `write_torch_checkpoint` then writes the records torch's writer writes (`data.pkl`, `.format_version`,
`.storage_alignment`, `byteorder`, each storage, `version`), uncompressed, each record's bytes starting at a
multiple of 64 as torch aligns them (padding in its local header's extra field), so `torch.load(..., mmap=True)`
maps them. A tensor is made, written and dropped before the next: the file is never whole in memory.
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
"""Where every record's bytes start (torch's `_get_storage_alignment`, recorded in `.storage_alignment`)."""
ARCHIVE = "archive"
"""The folder the records are in (torch.save names it after the file, or `archive` for a buffer; torch.load
takes any)."""
_PICKLE_PROTOCOL = 2                                    # torch.serialization.DEFAULT_PROTOCOL
_ZIP64_EXTRA = 20                                       # the zip64 field `force_zip64` adds to a local header


class _Storage:
    """Stands for a tensor's storage in the pickle: its persistent id."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _Tensor:
    """Pickles as torch pickles a contiguous CPU tensor of `shape` over the whole of its own `storage`."""

    def __init__(self, storage: _Storage, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape

    def __reduce_ex__(self, protocol: int):
        strides = tuple(math.prod(self.shape[i + 1:]) for i in range(len(self.shape)))
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, tuple(self.shape), strides, False,
                                                 collections.OrderedDict())


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: object):
        if isinstance(obj, _Storage):
            storage_type = getattr(torch, torch.storage._dtype_to_storage_type_map()[obj.dtype])
            return "storage", storage_type, obj.key, "cpu", obj.numel
        return None


def state_pickle(state: LazyMapping) -> bytes:
    """The `data.pkl` of `torch.save(dict(state))` for contiguous tensors of their own storages (storage keys
    "0", "1", ... in `state`'s order), from the shapes and dtypes alone."""
    placeholders = {}
    for index, key in enumerate(state):
        shape = tuple(state.shape(key))
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
        _write_record(archive, ".format_version", b"1")
        _write_record(archive, ".storage_alignment", str(ALIGNMENT).encode())
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
