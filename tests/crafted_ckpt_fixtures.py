"""Zip `.ckpt` files as torch.save lays them out but with a pickle written by hand: any storage key, type and
size per persistent id, any offset, shape and strides per tensor, any record bytes (what a damaged or hostile file
may say, which torch.save never writes)."""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path

import torch


class Storage:
    """A persistent id ("storage", storage type, key, location, numel), as torch.save pickles a storage."""

    def __init__(self, storage_type: type, key: str, numel: object):
        self.pid = ("storage", storage_type, key, "cpu", numel)


class Tensor:
    """A tensor rebuilt by torch's `_rebuild_tensor_v2` from `storage` at `offset` (elements) with `shape`, `stride`."""

    def __init__(self, storage: Storage, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]):
        self.args = (storage, offset, shape, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, Storage) else None


def crafted_ckpt(path: Path, obj: object, records: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    """A zip checkpoint at `path` pickling `obj` (its `Tensor`s and `Storage`s as written), a record
    `archive/data/<key>` for each of `records`."""
    body = io.BytesIO()
    _Pickler(body, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w", compression) as archive:
        archive.writestr("archive/data.pkl", body.getvalue())
        for key, data in records.items():
            archive.writestr(f"archive/data/{key}", data)
        archive.writestr("archive/version", b"3\n")
    return path


STORAGE_TYPES = {torch.float32: torch.FloatStorage, torch.float16: torch.HalfStorage,
                 torch.bfloat16: torch.BFloat16Storage, torch.int64: torch.LongStorage, torch.int32: torch.IntStorage}


def crafted_state_dict(path: Path, state: dict[str, torch.Tensor], strides: dict[str, tuple[int, ...]]) -> Path:
    """`state` as a `state_dict` ckpt, each tensor in its own record, those named in `strides` given those strides."""
    obj, records = {}, {}
    for i, (key, tensor) in enumerate(state.items()):
        tensor = tensor.contiguous()
        records[str(i)] = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        storage = Storage(STORAGE_TYPES[tensor.dtype], str(i), tensor.numel())
        obj[key] = Tensor(storage, 0, tuple(tensor.shape), strides.get(key, tuple(tensor.stride())))
    return crafted_ckpt(path, {"state_dict": obj}, records)
