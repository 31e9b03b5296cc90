"""The tensors of a zip-format torch checkpoint (`torch.save`'s), each read from its record when it is looked up.

`io.read_checkpoint(path, lazy=True)` unpickles the file's `data.pkl` once (`unpickle_onto_meta`) as
`torch.load(path, weights_only=True, map_location="meta")` does: torch's zip reader, torch's weights-only unpickler
with the same allowed globals, so the same files are refused. Every tensor comes out on `meta` with its dtype,
shape, strides and storage offset, and its storage with `_checkpoint_offset`, where torch's reader finds the bytes
of the storage's record `data/<key>`. `ZipTensors.of` matches each storage to its record (the zip's directory and
local headers, read here) and `ZipTensors[key]` reads the bytes the tensor's strides cover from that record into a
fresh tensor: a stored record (torch.save stores every one) with `pread`, a deflated one unpacked whole (its CRC
checked). Nothing of the file is mapped, and nothing held between reads but the unpacked bytes of the last deflated
record that several tensors view (each view would unpack it again), so a merge of two large `.ckpt` files holds
about one tensor of each. Tensors that share a storage (views, a transpose, a slice) are each read from their own
span of it, with their own strides.

A file the lazy read does not take as torch.load would (a storage key named again with another dtype or size, a
record not of its storage's size, a span past its storage, a negative size or stride) is left to the whole read,
which gives its own answer. A stored record shorter than its storage is refused as the pickle names it
(`record_of`), by the lazy read and the whole read alike (`io` unpickles a zip first, onto `meta`, its map or
storages read from its records): torch.load(mmap=True), the whole read of a zip whose records are all stored, would
read it on into the zip's next header (or its central directory) and give those bytes as weights.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.io import KeyedEntries, LazyMapping, read_into

_LOCAL_HEADER = struct.Struct("<4s22xHH")      # signature, ..., file name length, extra field length (30 bytes)


@dataclass(frozen=True)
class Record:
    """One zip record: where its bytes start in the file, how many it holds unpacked, how they are packed."""

    name: str
    start: int
    size: int
    packed_size: int
    deflated: bool
    crc: int


@dataclass(frozen=True)
class Placed:
    """Where a tensor's elements are: `span` elements from byte `begin` of `record`, laid out by `stride`."""

    record: Record
    dtype: torch.dtype
    shape: torch.Size
    stride: tuple[int, ...]
    begin: int
    span: int


def unpickle_onto_meta(path: Path, records: Mapping[int, Record], into: str = "meta") -> object:
    """The object pickled in the zip checkpoint at `path` (whose `records_by_start` are `records`), its tensors on
    `meta`, as `torch.load(path, weights_only=True, map_location="meta")` unpickles it (torch.serialization `_load`:
    torch's zip reader, its weights-only unpickler, each storage a `meta` storage of the bytes its persistent id
    names, one per key, its bytes kept as `_checkpoint_nbytes`; a key named again with another dtype or size, which
    torch.load would read as the first, or a negative size, is a ValueError, left to the whole read); but each
    storage's `_checkpoint_offset` is always the offset torch's reader reads from the record's local header
    (torch.load computes it from the layout of its own writer where the file has a `.format_version` record, which
    a zip written by another tool does not follow). Each storage is checked against its record where the pickle
    first names it, at the size torch.load reads (`record_of`: a stored record shorter than it is a
    CheckpointError). Unpickle with the allowed globals set (`io._weights_only_unpickling`). A TorchScript archive,
    which torch.load refuses with weights_only, is refused here too (a ValueError).

    `into` says where the storages go once each record is checked: "meta" as above; "map" (a file whose records
    are all stored) the span of its record in a private map of the whole file, as `torch.load(path,
    weights_only=True, mmap=True)` gives it (its `overall_storage` sliced at the record's offset,
    `map_location="cpu"`); "memory" its record read into a storage of its own (a stored one by torch's zip reader,
    a deflated one unpacked by zlib and its CRC checked), as `torch.load(path, weights_only=True, map_location="cpu")` reads it
    (`get_storage_from_record`), where the record holds exactly the storage's bytes (else a ValueError: the
    whole read by torch.load gives its own answer). So the whole read of a file unpickles its pickle once.
    torch's reader checks no CRC and gives a damaged deflate stream as whatever memory it unpacked into, which may
    even be the right bytes left from an earlier read: a deflated record (the pickle's, a storage's) is unpacked by
    zlib instead (`unpack_record`), a damaged one a CheckpointError."""
    reader = torch._C.PyTorchFileReader(str(path))
    if reader.has_record("constants.pkl"):
        raise ValueError(f"{path}: a TorchScript archive")
    # torch.load(mmap=True)'s map: shared=False (MAP_PRIVATE, torch's default mmap option), the file's whole size
    whole_file = torch.UntypedStorage.from_file(str(path), False, os.path.getsize(path)) if into == "map" else None

    storages: dict[object, torch.storage.TypedStorage] = {}    # torch.load's `loaded_storages`: one per key
    named: dict[object, tuple[torch.dtype, int]] = {}          # each key's dtype and bytes as the pickle first names it

    def persistent_load(saved_id: tuple) -> torch.storage.TypedStorage:
        _, storage_type, key, _, numel = saved_id          # ("storage", type, key, location, numel), checked by torch
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        if type(numel) is not int or numel < 0:
            raise ValueError(f"storage {key!r} of {numel!r} elements")
        nbytes = numel * torch._utils._element_size(dtype)
        if key in storages:     # torch.load gives the first reference's storage, whatever a later one says
            if named[key] != (dtype, nbytes):
                raise ValueError(f"storage {key!r} named again as {numel} {dtype}")
            return storages[key]
        name = f"data/{torch.serialization._maybe_decode_ascii(key)}"
        untyped = torch.UntypedStorage(nbytes, device="meta")
        untyped._checkpoint_offset = reader.get_record_offset(name)
        untyped._checkpoint_nbytes = nbytes     # a meta storage grows to fit a `set_` past its end: torch.load's refuses
        record = record_of(untyped, records, path)
        if whole_file is not None:
            untyped = whole_file[untyped._checkpoint_offset:untyped._checkpoint_offset + nbytes]    # [nbytes] bytes
        elif into == "memory":
            if record is None:
                raise ValueError(f"storage {key!r}: no record of its {nbytes} bytes")
            if record.deflated:         # unpacked by zlib: torch's reader gives a damaged stream as stale memory
                untyped = torch.UntypedStorage(nbytes)                                      # [nbytes]
                torch.empty(0, dtype=torch.uint8).set_(untyped).numpy()[:] = memoryview(unpack_record(path, record))
            else:
                read = reader.get_storage_from_record(name, nbytes, torch.UntypedStorage)   # torch.load's load_tensor
                untyped = read._typed_storage()._untyped_storage
        storages[key] = torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
        named[key] = (dtype, nbytes)
        return storages[key]

    pickle_record = records.get(reader.get_record_offset("data.pkl"))
    pickled = (unpack_record(path, pickle_record) if pickle_record is not None and pickle_record.deflated
               else reader.get_record("data.pkl"))
    unpickler = torch._weights_only_unpickler.Unpickler(io.BytesIO(pickled), encoding="utf-8")
    unpickler.persistent_load = persistent_load
    obj = unpickler.load()
    torch._utils._validate_loaded_sparse_tensors()         # as torch.load does (and empties torch's list of them)
    return obj


def records_by_start(path: Path) -> dict[int, Record]:
    """The records of the zip file at `path`, by the file offset their bytes start at (after each local header,
    whose own name and extra field lengths place them)."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise CheckpointError(f"{path}: damaged zip archive ({' '.join(str(exc).split())})") from exc
    records = {}
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for info in infos:
            header = os.pread(f.fileno(), _LOCAL_HEADER.size, info.header_offset)
            if len(header) < _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
                raise CheckpointError(f"{path}: damaged zip archive (no local header for {info.filename})")
            _, name_length, extra_length = _LOCAL_HEADER.unpack(header)
            start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
            if start + info.compress_size > size:
                raise CheckpointError(f"{path}: damaged zip archive ({info.filename} runs past the end of the file)")
            records[start] = Record(info.filename, start, info.file_size, info.compress_size,
                                    info.compress_type == zipfile.ZIP_DEFLATED, info.CRC)
    return records


def unpack_record(path: Path, record: Record) -> bytes:
    """The bytes of the deflated `record` of the file at `path`, unpacked and checked against its size and CRC
    (zlib.crc32, as zipfile checks a record it reads); a damaged one is a CheckpointError naming the record."""
    with open(path, "rb") as f:
        packed = os.pread(f.fileno(), record.packed_size, record.start)
    try:
        data = zlib.decompressobj(-zlib.MAX_WBITS).decompress(packed, record.size)
    except zlib.error as exc:
        raise CheckpointError(f"{path}: damaged zip archive ({record.name}: {exc})") from exc
    if len(data) != record.size or zlib.crc32(data) != record.crc:
        raise CheckpointError(f"{path}: damaged zip archive ({record.name} does not unpack to its "
                              f"{record.size} bytes and CRC)")
    return data


def element_span(shape: torch.Size, stride: tuple[int, ...]) -> int | None:
    """How many elements of its storage, from its first, a tensor of `shape` and `stride` covers:
    1 + sum((size - 1) * stride), in Python ints (no overflow), 0 for an empty tensor; None for a negative stride."""
    if any(s < 0 for s in stride):
        return None
    if 0 in shape:
        return 0
    return 1 + sum((n - 1) * s for n, s in zip(shape, stride))


def record_of(storage: torch.UntypedStorage, records: Mapping[int, Record], path: Path) -> Record | None:
    """The record of the file at `path` that `storage`, unpickled onto `meta`, is read from, where it holds exactly
    the storage's bytes; else None (the whole read gives its answer: torch.load refuses a deflated record of
    another size, and reads the first bytes of a longer one). A stored record shorter than the storage is a
    CheckpointError naming the file and the record: torch.load(mmap=True) would read on past its end."""
    record = records.get(getattr(storage, "_checkpoint_offset", None))
    if record is None:
        return None
    nbytes = storage._checkpoint_nbytes                 # as the pickle names it (`storage.nbytes()` may have grown)
    if nbytes != record.size:
        if record.deflated or nbytes < record.size:
            return None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (its record {record.name} holds "
                              f"{record.size} bytes, fewer than the {nbytes} of its storage)")
    return record


def place(tensor: Tensor, records: Mapping[int, Record], path: Path) -> Placed | None:
    """Where the elements of `tensor`, unpickled onto `meta`, are in the file; None where it is not a plain
    (strided, unquantized) view lying within a storage whose record holds exactly the storage's bytes (the whole
    read then gives its answer)."""
    if tensor.device.type != "meta" or tensor.layout != torch.strided or tensor.is_quantized:
        return None
    record = record_of(tensor.untyped_storage(), records, path)
    if record is None:
        return None
    # `Tensor.set_` on meta grows the storage to fit, or overflows unseen: torch.load's refuses a span past its end
    span, begin = element_span(tensor.shape, tensor.stride()), tensor.storage_offset() * tensor.element_size()
    if span is None or begin < 0 or (span and begin + span * tensor.element_size() > record.size):
        return None
    return Placed(record, tensor.dtype, tensor.shape, tensor.stride(), begin, span)


class ZipTensors(KeyedEntries, LazyMapping):
    """A read-only state dict over a zip torch checkpoint: shapes and dtypes from its pickle, each tensor read
    from its record on access (a fresh, owned tensor with the strides torch.load gives it)."""

    def __init__(self, path: Path, placed: Mapping[str, Placed]):
        self.path, self._entries = path, dict(placed)
        views = Counter(p.record for p in self._entries.values())
        self._shared = {record for record, n in views.items() if record.deflated and n > 1}
        self._last_unpacked: tuple[Record, bytes] | None = None       # of a record in `_shared`

    @classmethod
    def of(cls, path: Path, tensors: Mapping[str, Tensor], records: Mapping[int, Record]) -> ZipTensors | None:
        """The tensors of the checkpoint at `path` (its `records_by_start`), given unpickled onto `meta`; None where
        one cannot be `place`d."""
        placed = {key: place(tensor, records, path) for key, tensor in tensors.items()}
        return None if any(p is None for p in placed.values()) else cls(path, placed)

    def shape(self, key: str) -> torch.Size:
        return self._entries[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key].dtype

    def __getitem__(self, key: str) -> Tensor:
        placed = self._entries[key]
        elements = torch.empty(placed.span, dtype=placed.dtype)                     # [span]
        if placed.span:
            if placed.record.deflated:
                data = self._unpacked(placed.record)
                nbytes = placed.span * placed.dtype.itemsize
                elements.view(torch.uint8).numpy()[:] = memoryview(data)[placed.begin:placed.begin + nbytes]
            else:
                read_into(self.path, elements, placed.record.start + placed.begin, key)
        return elements.as_strided(placed.shape, placed.stride)                     # shape, torch.load's strides

    def _unpacked(self, record: Record) -> bytes:
        """The bytes of a deflated record, unpacked and checked against its CRC; those of a record several tensors
        view are kept until another is unpacked, so that reading each view costs one copy, not an unpacking."""
        last = self._last_unpacked
        if last is not None and last[0] == record:
            return last[1]
        data = unpack_record(self.path, record)
        if record in self._shared:
            self._last_unpacked = (record, data)
        return data
