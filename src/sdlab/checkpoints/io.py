"""Reading and writing checkpoint files: `.safetensors` and weights-only pickles (`.ckpt`, `.pt`, `.pth`, `.bin`).

`read_checkpoint(path)` returns the tensors and the string metadata of a file:
  - `.safetensors` is opened with `safe_open` (memory-mapped); the returned `LazyStateDict` knows every
    shape and dtype from the header and reads a tensor only when it is looked up, so detection and
    architecture inference touch no weights and loading holds one tensor at a time beside the model;
  - pickled checkpoints go through `torch.load(..., weights_only=True)` and nothing else: that unpickler
    refuses every global outside tensors and plain containers, so a file that would run code on load is
    rejected before anything runs. The few other names that checkpoints people have carry beside their
    tensors (the Lightning callback of CompVis' `sd-v1-*.ckpt`, numpy scalars and arrays, the
    textual_inversion repo's ParameterDict) are unpickled as inert stand-ins (`INERT_GLOBALS`): nothing is
    imported or called, and only the ParameterDict's tensors are kept. The zip directory is checked first
    (`_check_torch_zip`): decompression bombs and big-endian files are refused before anything is unpacked;
    zip files whose records are all stored are memory-mapped (`MappedTensors`: a tensor read for a model is
    copied out and its pages given back), those with deflated records are read without mapping (a map would
    see the compressed bytes). A zip file's pickle is first unpickled by the same unpickler onto `meta`, each
    storage checked against its record: a stored record shorter than its storage is refused (the map would give
    the bytes after it, the zip's next header, as weights); the whole read unpickles it so once, onto its map, or
    for a file with deflated records onto storages read from its records (`zip_tensors.unpickle_onto_meta`, `into`
    "map" / "memory": the tensors torch.load(mmap=True) / torch.load gives). With `lazy=True` each tensor is then
    read from its record when looked up (`zip_tensors.ZipTensors`: nothing of the file held or mapped between
    reads; `sdlab merge` reads so). A top-level `state_dict` entry (PyTorch Lightning, CompVis) is unwrapped,
    and so is a file's only entry that is a dict (`{"module": {...}}`: ComfyUI's `load_torch_file` rule) where
    nested levels are not read anyway. A pickle's metadata is its top-level
    text and number entries, as strings (an A1111 embedding's `step`, `sd_checkpoint`, `sd_checkpoint_name`).
Every failure is a `CheckpointError` with a one-line message.

`write_safetensors_atomic(path, tensors, metadata)` writes a temporary file beside `path`, fsyncs it and
renames it over `path`; on failure nothing is left behind and an existing `path` is untouched. The bytes
depend only on the tensors and the metadata (both sorted), and the file's mode follows the umask.
"""

from __future__ import annotations

from abc import abstractmethod

import codecs
import json
import logging
import mmap
import os
import pickletools
import struct
import re
import threading
import unicodedata
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import torch
from safetensors import safe_open
from torch import Tensor

from sdlab.checkpoints.errors import CheckpointError
from sdlab.utils.allocator import release_pages
from sdlab.utils.files import atomic_write

if TYPE_CHECKING:
    from sdlab.checkpoints.zip_tensors import Record

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
MAX_SAFETENSORS_HEADER = 100_000_000           # the safetensors library's own limit on a header's length

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class KeyedEntries(Mapping[str, Tensor]):
    """A read-only state dict whose keys, in order, are those of one mapping, `_entries`: each key to what the
    tensor is made from (where it lies in a file, a mapped tensor, its name in another state dict, a tensor to
    convert); each reader says how (`__getitem__`)."""

    _entries: Mapping[str, Any]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries


class LazyMapping(Mapping[str, Tensor]):
    """A read-only state dict that knows each tensor's shape and dtype without reading its data."""

    @abstractmethod
    def shape(self, key: str) -> torch.Size: ...

    @abstractmethod
    def dtype(self, key: str) -> torch.dtype: ...

    def read_as(self, key: str, dtype: torch.dtype) -> Tensor:
        """The tensor at `key` converted to `dtype` (a new tensor where the dtypes differ)."""
        return self[key].to(dtype)


class LazyStateDict(KeyedEntries, LazyMapping):
    """A read-only mapping over a safetensors file: shapes and dtypes from the header, tensors on access.

    `safe_open` validates the file (header, offsets, coverage) and gives the metadata. Tensor data is then
    read with `pread` straight into a fresh tensor rather than through a map of the whole file: the result is
    owned, 64-byte aligned memory (CPU kernels take other paths on unaligned data, moving outputs by ~1e-6),
    and loading a model costs one copy of its weights, not that copy plus the mapped file pages. A tensor
    wanted in another dtype (`read_as`) is converted from a map of its own bytes alone, closed right after.
    """

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:                                      # says what a file of another kind is
            header, self._data_start = read_safetensors_header(f, path)
        with safe_open(str(path), framework="pt", device="cpu") as f:   # validates the whole layout
            self._metadata = dict(f.metadata() or {})
        header.pop("__metadata__", None)
        entries: dict[str, tuple[torch.Size, torch.dtype, int, int]] = {}
        for key, info in header.items():
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            entries[key] = (torch.Size(info["shape"]), dtype, begin, end)
        self._entries = dict(sorted(entries.items(), key=lambda entry: entry[1][2]))      # in file order

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def shape(self, key: str) -> torch.Size:
        return self._entries[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key][1]

    def _entry(self, key: str) -> tuple[torch.Size, torch.dtype, int, int]:
        """(shape, dtype, begin, end) of `key`, its byte count checked against its shape."""
        shape, dtype, begin, end = self._entries[key]
        if end - begin != shape.numel() * dtype.itemsize:
            raise CheckpointError(f"{self.path}: tensor {key} holds {end - begin} bytes, its shape needs "
                                  f"{shape.numel() * dtype.itemsize}")
        return shape, dtype, begin, end

    def __getitem__(self, key: str) -> Tensor:
        shape, dtype, begin, end = self._entry(key)
        tensor = torch.empty(shape, dtype=dtype)
        read_into(self.path, tensor, self._data_start + begin, key)
        return tensor

    def read_as(self, key: str, dtype: torch.dtype) -> Tensor:
        """The tensor at `key` as a fresh `dtype` tensor. In the file's own dtype it is read with pread (`[key]`);
        to another it is converted straight from the file's pages, mapped for this one tensor (and populated in
        one call where the system can), into a fresh, aligned tensor: no staging copy of the file's bytes
        (SD1.5's fp16 weights to bf16: 2.5 -> 1.3 s). The map is private and writable (copy on write, never
        written): `torch.frombuffer` takes it without its warning about read-only buffers, which would otherwise
        have to be silenced through the process-wide warning filters, shared by every thread."""
        shape, stored, begin, end = self._entry(key)
        if dtype == stored or begin == end or not hasattr(mmap, "MAP_SHARED"):
            return self[key].to(dtype)
        start = self._data_start + begin
        page = start - start % mmap.ALLOCATIONGRANULARITY
        with open(self.path, "rb") as f:
            if os.fstat(f.fileno()).st_size < self._data_start + end:
                raise CheckpointError(f"{self.path}: cannot read tensor {key}: file ended early")
            try:
                mapped = mmap.mmap(f.fileno(), self._data_start + end - page, flags=mmap.MAP_PRIVATE,
                                   prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=page)
            except OSError:   # a file system that cannot map files: read, then convert
                return self[key].to(dtype)
            with mapped:
                _populate(mapped)
                source = torch.frombuffer(mapped, dtype=stored, count=shape.numel(), offset=start - page)
                out = torch.empty(shape, dtype=dtype)
                out.copy_(source.view(shape))
                del source   # the map closes only once no tensor exports it
        return out


# Linux's madvise(MADV_POPULATE_READ) (5.14+; Python names it from 3.13): the map's page table filled by read faults
# in one call. MAP_POPULATE would not do on a private writable map: it faults for writing, copying every page.
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if hasattr(mmap, "MAP_POPULATE") else None)


def _populate(mapped: mmap.mmap) -> None:
    """Fill `mapped`'s page table from the file's pages in one call where the system can (else each page on its
    first read)."""
    if _MADV_POPULATE_READ is not None:
        try:
            mapped.madvise(_MADV_POPULATE_READ)
        except OSError:   # an older kernel: EINVAL
            pass


class MappedTensors(KeyedEntries, LazyMapping):
    """The tensors of a memory-mapped zip checkpoint (`torch.load(mmap=True)`; `[key]` is the mapped tensor).
    `read_as` copies a tensor out, in any dtype, and gives its pages back (`release_pages`): loading a model
    holds one copy of its weights and about one tensor's file pages, not that copy plus the whole mapped
    file, and no loaded tensor aliases the map, so it goes with the state dict."""

    def __init__(self, tensors: Mapping[str, Tensor]):
        self._entries = dict(tensors)

    def shape(self, key: str) -> torch.Size:
        return self._entries[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key].dtype

    def read_as(self, key: str, dtype: torch.dtype) -> Tensor:
        mapped = self._entries[key]
        out = torch.empty(mapped.shape, dtype=dtype).copy_(mapped)
        if mapped.numel():
            span = 1 + sum((size - 1) * stride for size, stride in zip(mapped.shape, mapped.stride()))
            release_pages(mapped.data_ptr(), span * mapped.element_size())
        return out

    def __getitem__(self, key: str) -> Tensor:
        return self._entries[key]


def read_into(path: Path, tensor: Tensor, offset: int, key: str) -> None:
    """Fill the contiguous CPU `tensor` with the bytes of the file at `path` from `offset` on (`pread`: no file
    position shared, no staging copy); a file that ends first is a `CheckpointError` naming tensor `key`."""
    buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    done = 0
    with open(path, "rb") as f:
        while done < len(buffer):
            n = os.preadv(f.fileno(), [buffer[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(f"{path}: cannot read tensor {key}: file ended early")
            done += n


def shapes_of(state: Mapping[str, Tensor | torch.Size]) -> dict[str, torch.Size]:
    """Key -> shape, without reading tensor data from a `LazyMapping`."""
    if isinstance(state, LazyMapping):
        return {k: state.shape(k) for k in state}
    return {k: (v.shape if isinstance(v, Tensor) else torch.Size(v)) for k, v in state.items()}


def meta_tensor(state: Mapping[str, Tensor], key: str) -> Tensor:
    """`state[key]` on the meta device (its shape and dtype, no data), read from nothing in a `LazyMapping`."""
    if isinstance(state, LazyMapping):
        return torch.empty(state.shape(key), dtype=state.dtype(key), device="meta")
    return state[key].to("meta")


def read_as(state: Mapping[str, Tensor], key: str, dtype: torch.dtype) -> Tensor:
    """`state[key]` converted to `dtype`; a `LazyMapping` may convert straight from its file."""
    return state.read_as(key, dtype) if isinstance(state, LazyMapping) else state[key].to(dtype)


def dtypes_of(state: Mapping[str, Tensor]) -> dict[str, torch.dtype]:
    """Key -> dtype, without reading tensor data from a `LazyMapping`."""
    if isinstance(state, LazyMapping):
        return {k: state.dtype(k) for k in state}
    return {k: v.dtype for k, v in state.items()}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# how files people find under a .safetensors name begin -> what they are: binary formats by their magic bytes,
# text (`_text_start`) by its start
_OTHER_BINARY = (
    (b"PK\x03\x04", "a PyTorch checkpoint (a zip archive, as .ckpt / .pt files are); rename it to .ckpt"),
    (b"\x80\x02\x8a\x0a", "a PyTorch checkpoint (a legacy pickle); rename it to .ckpt"),
    (b"GGUF", "a GGUF file, which sdlab does not read"),
)
# pictures (a model page's preview saved under the model's name), said so under any checkpoint name
_PICTURES = (
    (b"\x89PNG\r\n\x1a\n", "a PNG picture, not the weights (download the file itself)"),
    (b"\xff\xd8\xff", "a JPEG picture, not the weights (download the file itself)"),
    (b"GIF8", "a GIF picture, not the weights (download the file itself)"),
)
_OTHER_TEXT = (
    (b"version https://git-lfs", "a Git LFS pointer, not the weights (fetch them with git lfs pull, or download "
                                 "the file itself)"),
    (b"<", "a web page (HTML / XML), not the weights (download the file itself)"),
    (b"{", "JSON text, not the weights"),
)
_HEAD_BYTES = 512                   # how much of a file's start is read to tell what kind of file it is
_TEXT_CONTROLS = "\t\n\v\f\r"      # the control characters text may hold: whitespace


def _text_start(head: bytes) -> str | None:
    """`head`, a file's first bytes, as text where it reads as text: UTF-8 (a byte order mark allowed, a
    character cut off at the end of `head` allowed) holding no control character but whitespace; else None.
    No checkpoint reads so: a zip begins b"PK\\x03\\x04", a legacy pickle with the protocol byte 0x80 (which no
    UTF-8 character begins with), a safetensors file with its header's length as 8 little-endian bytes, whose
    high ones are 0."""
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head.removeprefix(codecs.BOM_UTF8))
    except UnicodeDecodeError:
        return None
    if not text or any(unicodedata.category(char) == "Cc" and char not in _TEXT_CONTROLS for char in text):
        return None
    return text


def _content_kind(head: bytes, binary: bool = True, any_text: bool = False) -> str | None:
    """What a file that begins with `head` is, where it is one of `_PICTURES`, `_OTHER_TEXT` (or `_OTHER_BINARY`),
    or, with `any_text`, any other text (asked only once the file failed to load: a protocol-0 pickle is text
    too); else None."""
    text = _text_start(head)
    if (picture := next((kind for begins, kind in _PICTURES if head.startswith(begins)), None)) is not None:
        return picture
    starts = (_OTHER_BINARY if binary else ()) + (_OTHER_TEXT if text is not None else ())
    start = head.removeprefix(codecs.BOM_UTF8).lstrip()
    kind = next((kind for begins, kind in starts if start.startswith(begins)), None)
    if kind is None and text is not None and any_text:
        kind = f"text, not the weights (it begins {text[:20]!r})"
    return kind


def _begins_with_a_pickle(path: Path) -> bool:
    """Whether the file at `path` begins with a whole pickle: `pickletools` walks its opcodes to a STOP within
    the first MiB. A protocol-0 pickle is text too; text that is none fails torch's unpickler as a refused
    pickle does ("Unsupported operand"), and is then told apart by this."""
    with open(path, "rb") as file:
        data = file.read(1 << 20)
    try:
        opcodes = [opcode.name for opcode, _, _ in pickletools.genops(data)]
    except Exception:                             # any byte string is given: whatever stops the walk says no
        return False
    return opcodes[-1:] == ["STOP"]


def read_safetensors_header(file: BinaryIO, name: str | os.PathLike[str]) -> tuple[dict[str, Any], int]:
    """The JSON header of the safetensors data in the open binary `file`, and the offset where its tensor
    data starts. The header's length (the first 8 bytes) is checked against the file's size before it is
    read or sought past, so a file that is not safetensors is a `CheckpointError` naming `name`, never an
    `OSError` from a seek past the largest offset; one that begins as a file of another kind (a PyTorch
    checkpoint, a Git LFS pointer, a saved web page: `_content_kind`) says what it is."""
    size = file.seek(0, os.SEEK_END)
    file.seek(0)
    head = file.read(_HEAD_BYTES)
    (length,) = struct.unpack("<Q", head[:8].ljust(8, b"\0"))
    file.seek(8)

    def refuse(why: str) -> CheckpointError:
        kind = _content_kind(head, any_text=True)
        return CheckpointError(f"{name}: not a readable safetensors file" + (f": it is {kind}" if kind else f" ({why})"))

    if size < 8 or length > MAX_SAFETENSORS_HEADER or 8 + length > size:
        raise refuse(f"its first 8 bytes give a header of {length} bytes; the file holds {size}")
    try:
        header = json.loads(file.read(length))
    except ValueError as exc:                     # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise refuse(f"the header is not JSON: {_one_line(exc)}") from exc
    if not isinstance(header, dict):
        raise refuse("the header is not a JSON object")
    return header, 8 + length


def read_checkpoint(path: str | os.PathLike[str], *, nested: bool = False, shapes_only: bool = False,
                    lazy: bool = False) -> tuple[Mapping[str, Tensor], dict[str, str]]:
    """Tensors and string metadata of a `.safetensors` or weights-only pickle file (see module docstring):
    a safetensors header's `__metadata__`, a pickle's top-level text and number entries as strings (an A1111
    embedding's `name`, `step`, ...), so callers reading a pickle see them too; {} when there are none.

    `nested`: tensors inside nested dicts of a pickle are kept under dotted keys (an A1111 embedding's
    `string_to_param` -> `string_to_param.*`); by default only top-level tensors are read.
    `shapes_only`: a pickle's tensors on the meta device (names, shapes and dtypes; a zip checkpoint's weights
    are then not read, a legacy pickle's are read as they stream past); a safetensors file reads none anyway.
    `lazy`: a zip checkpoint's tensors are read from the file one at a time, when looked up, and nothing of the
    file is held or mapped between reads (`zip_tensors.ZipTensors`; the pickle is unpickled as without it); a
    legacy (non-zip) pickle is still read whole. A safetensors file is lazy anyway.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file (diffusers folders load with load_bundle)")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: file is empty")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _read_safetensors(path)
    if _begins_as_safetensors(path, size):   # unknown suffix, or a safetensors file renamed .ckpt / .pt / .bin
        return _read_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        return _read_pickle(path, nested, shapes_only, lazy)
    # Unknown suffix: decide by content; a torch zip checkpoint starts with "PK".
    if zipfile.is_zipfile(path):
        return _read_pickle(path, nested, shapes_only, lazy)
    raise CheckpointError(
        f"{path}: unknown checkpoint format (suffix {suffix or 'none'!r}); expected .safetensors, .ckpt, .pt, .pth or .bin"
    )


def _begins_as_safetensors(path: Path, size: int) -> bool:
    """Whether the file at `path` (`size` bytes) begins as safetensors data does: an 8-byte little-endian header
    length that fits in the file, then "{". No pickle begins so (a zip with "PK", a legacy pickle with 0x80)."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 8 + struct.unpack("<Q", head[:8])[0] <= size


def _read_safetensors(path: Path) -> tuple[LazyStateDict, dict[str, str]]:
    try:
        state = LazyStateDict(path)
        metadata = state.metadata()
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_one_line(exc)})") from exc
    if len(state) == 0:
        raise CheckpointError(f"{path}: safetensors file holds no tensors")
    return state, metadata


_REFUSAL = re.compile(r"(Unsupported[^\n]*|Trying to load unsupported[^\n]*)")


MAX_PICKLE_BYTES = 64 << 20        # data.pkl of a real checkpoint: well under 1 MiB (SDXL + EMA + optimizer: a few)
MAX_EXPANSION = 32                  # a deflated record may grow this much (plus 64 MiB) as it is unpacked


def _zip_entries(path: Path) -> list[zipfile.ZipInfo]:
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise CheckpointError(f"{path}: damaged zip archive ({_one_line(exc)})") from exc


def _read_small_record(path: Path, info: zipfile.ZipInfo) -> bytes:
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.read(info)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: damaged zip archive ({_one_line(exc)})") from exc


def _check_torch_zip(path: Path) -> bool:
    """Check a torch zip checkpoint's directory before unpacking anything; True if it can be memory-mapped.

    Refuses: a `data.pkl` larger than `MAX_PICKLE_BYTES` once unpacked (a decompression bomb: torch reads it
    whole into memory), deflated records that expand beyond `MAX_EXPANSION` times their packed size,
    compression methods PyTorch cannot read, and a `byteorder` record other than "little". Memory-mapping
    reads records as stored bytes, so a file with any compressed record is read without it.
    """
    entries = _zip_entries(path)
    for info in entries:
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise CheckpointError(f"{path}: record {info.filename} uses zip compression method {info.compress_type}, "
                                  "which PyTorch cannot read (only stored or deflated records)")
        if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            raise CheckpointError(f"{path}: damaged zip archive (stored record {info.filename} claims "
                                  f"{info.file_size} bytes in {info.compress_size})")
        name = info.filename.rsplit("/", 1)[-1]
        if name == "data.pkl" and info.file_size > MAX_PICKLE_BYTES:
            raise CheckpointError(f"{path}: refused: its pickle {info.filename} unpacks to {_mib(info.file_size)}, "
                                  f"more than any checkpoint needs (limit {_mib(MAX_PICKLE_BYTES)})")
        if name == "byteorder":
            order = _read_small_record(path, info) if info.file_size <= 16 else b"?"
            if order != b"little":
                raise CheckpointError(f"{path}: refused: its byteorder record says {order.decode(errors='replace')!r}; "
                                      "sdlab reads little-endian checkpoints only (re-save it with torch.save on a "
                                      "little-endian machine, or convert it to .safetensors)")
    deflated = [i for i in entries if i.compress_type == zipfile.ZIP_DEFLATED]
    unpacked = sum(i.file_size for i in deflated)
    packed = sum(i.compress_size for i in deflated)
    if unpacked > (64 << 20) + MAX_EXPANSION * packed:
        raise CheckpointError(f"{path}: refused: its compressed records unpack to {_mib(unpacked)} from "
                              f"{_mib(packed)} (a decompression bomb?)")
    return not deflated


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


class _Inert(dict):
    """Stands for an object a checkpoint carries beside its tensors: made, filled and "built" without running
    any code of its class, then dropped with the other non-tensor entries."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def __setstate__(self, state):
        pass


class _ParameterDict(dict):
    """A pickled `torch.nn.ParameterDict` (the textual_inversion repo's `string_to_param`): its parameters
    as a plain dict, taken from the pickled module state without running the module's code."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def __setstate__(self, state):
        parameters = state.get("_parameters") if isinstance(state, dict) else None
        if isinstance(parameters, dict):
            self.update((k, v) for k, v in parameters.items() if isinstance(v, Tensor))


# global name -> stand-in for names torch's weights-only unpickler refuses that pickled checkpoints carry
INERT_GLOBALS: dict[str, type] = {
    **{name: _Inert for name in (
        "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",   # CompVis sd-v1-*.ckpt "callbacks"
        "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
        "pytorch_lightning.utilities.parsing.AttributeDict",              # Lightning "hyper_parameters"
        "pytorch_lightning.utilities.argparse.AttributeDict",
        "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",  # numpy scalars ("global_step")
        "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",   # and arrays
        "numpy.dtype", "numpy.ndarray",
    )},
    "torch.nn.modules.container.ParameterDict": _ParameterDict,
}


_STAND_INS = threading.Lock()   # torch's allowlist is one set: one load at a time adds and removes them


def _read_pickle(path: Path, nested: bool = False, shapes_only: bool = False,
                 lazy: bool = False) -> tuple[Mapping[str, Tensor], dict[str, str]]:
    with open(path, "rb") as f:
        head = f.read(_HEAD_BYTES)
    is_zip = head.startswith(b"PK\x03\x04")          # what torch.load takes for its zip format
    if (kind := _content_kind(head, binary=False)) is not None:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint: it is {kind}")
    mmap = _check_torch_zip(path) if is_zip else False
    whole = not shapes_only and not lazy                # the whole read of a zip: unpickled once, here
    into = ("map" if mmap else "memory") if whole else "meta"
    unpickled = _unpickle_zip_onto_meta(path, into) if is_zip else None   # refuses a record shorter than its storage
    if unpickled is not None and whole:               # as torch.load(mmap=mmap) unpickles it
        tensors = _unwrap_state_dict(unpickled[0], path, nested)
        return MappedTensors(tensors) if mmap else tensors, _plain_entries(unpickled[0])
    if unpickled is not None and shapes_only:         # as torch.load(map_location="meta") unpickles it
        return _unwrap_state_dict(unpickled[0], path, nested), _plain_entries(unpickled[0])
    if unpickled is not None and lazy and (read := _zip_tensors(path, *unpickled, nested)) is not None:
        return read
    try:
        obj = _weights_only_load(path, map_location="meta" if shapes_only else "cpu", mmap=mmap and not shapes_only)
    except Exception as exc:
        kind = _content_kind(head, binary=False, any_text=True)
        if kind is not None and not _begins_with_a_pickle(path):    # text, and no protocol-0 pickle
            raise CheckpointError(f"{path}: not a PyTorch checkpoint: it is {kind}") from exc
        message = str(exc)
        refusal = _REFUSAL.search(message)
        if "Weights only load failed" in message or refusal:
            reason = " ".join(refusal.group(1).split()).rstrip(".") if refusal else "it is not a weights-only pickle"
            raise CheckpointError(
                f"{path}: refused to unpickle: {reason}. sdlab only loads weights-only pickles (code in a pickle "
                "would run on load); convert the file to .safetensors with a tool you trust"
            ) from exc
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_one_line(exc)})") from exc
    tensors = _unwrap_state_dict(obj, path, nested)
    return MappedTensors(tensors) if mmap and not shapes_only else tensors, _plain_entries(obj)


# torch's weights-only unpickler asks to "file an issue" about every pickle protocol but 2 (what most tools wrote)
_PROTOCOL_NOTICE = "Detected pickle protocol"
_A_PROTOCOL_NOTICE = ("Detected pickle protocol 4 in the checkpoint, which was not the default pickle protocol used "
                      "by `torch.load` (2).")
"""The start of the notice as torch words it (`_weights_only_unpickler.Unpickler.load`), for matching filters."""


def _quiet_protocol_notice() -> None:
    """Filter out torch's pickle-protocol notice for the process, where that filter is not in effect: the first
    filter that matches the notice (its text, a UserWarning, from any module and line) is not it, as after a
    later `warnings.simplefilter("default")` or ``python -W default``, or it is missing. Then it is put at the
    front (`filterwarnings` moves it there, once): added, never taken away. Not each unpickling's
    `warnings.catch_warnings()`, which saves and puts back the filter list all threads share: overlapping another
    thread's hold, it put that thread's filter back for good, or took it away during the hold."""
    ours = ("ignore", re.compile(_PROTOCOL_NOTICE, re.I), UserWarning, None, 0)
    for item in warnings.filters:
        if item == ours:
            return
        _, message, category, _, _ = item
        if (message is None or message.match(_A_PROTOCOL_NOTICE)) and issubclass(UserWarning, category):
            break                                       # the notice stops at this filter, before ours
    warnings.filterwarnings("ignore", message=_PROTOCOL_NOTICE, category=UserWarning)


@contextmanager
def _weights_only_unpickling() -> Iterator[None]:
    """torch's weights-only unpickler allowing the stand-ins of `INERT_GLOBALS` (one unpickling at a time)."""
    with _STAND_INS, torch.serialization.safe_globals(
            [(stand_in, name) for name, stand_in in INERT_GLOBALS.items()]):
        _quiet_protocol_notice()
        yield


def _weights_only_load(path: Path, map_location: str, mmap: bool) -> object:
    """`torch.load` with its weights-only unpickler, the stand-ins of `INERT_GLOBALS` allowed."""
    with _weights_only_unpickling():
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def _unpickle_zip_onto_meta(path: Path, into: str = "meta") -> tuple[object, dict[int, Record]] | None:
    """A zip checkpoint's pickle unpickled onto `meta` by the same weights-only unpickler, and its records
    (`zip_tensors.unpickle_onto_meta`, `records_by_start`); each storage is checked against its record as it is
    named, so a stored record shorter than its storage is a CheckpointError naming the file and the record, before
    the whole read (torch.load(mmap=True) would read it on into the zip's next header) or the lazy one. `into`
    "map" / "memory": its tensors are instead on a private map of the file, or read from their records, as
    torch.load(mmap=True) / torch.load gives them (that whole read then unpickles nothing again). None where the
    pickle fails to unpickle here (refused, damaged, TorchScript, a record of another size): the whole read
    unpickles it again by torch.load and says why it cannot."""
    from sdlab.checkpoints.zip_tensors import records_by_start, unpickle_onto_meta

    records = records_by_start(path)
    try:
        with _weights_only_unpickling():
            return unpickle_onto_meta(path, records, into), records
    except CheckpointError:
        raise
    except Exception:
        return None


def _zip_tensors(path: Path, obj: object, records: Mapping[int, Record],
                 nested: bool) -> tuple[Mapping[str, Tensor], dict[str, str]] | None:
    """A zip checkpoint's tensors as `ZipTensors` (each read from its record when looked up), from its pickle
    unpickled onto `meta`; None where a tensor is not a plain view of one record: the whole read then gives its
    result or its error, the same as without `lazy`."""
    from sdlab.checkpoints.zip_tensors import ZipTensors

    tensors = ZipTensors.of(path, _unwrap_state_dict(obj, path, nested), records)
    return None if tensors is None else (tensors, _plain_entries(obj))


def _plain_entries(obj: Mapping) -> dict[str, str]:
    """The top-level text and number entries of an unpickled dict, as strings: the pickle's metadata."""
    return {key: str(value) for key, value in obj.items()
            if isinstance(key, str) and isinstance(value, (str, int, float)) and not isinstance(value, bool)}


def _run_checkpoint_error(obj: Mapping, path: Path) -> CheckpointError:
    """What an ``sdlab train`` run checkpoint (the state of a run, not a model, LoRA or embedding) says when it
    is loaded as weights: how to write its weights."""
    step = obj["step"]
    return CheckpointError(f"{path}: an sdlab train run checkpoint (the training state at step {step}), not "
                           f"weights; write its weights with: sdlab train --resume {path} --output-dir NEW_FOLDER "
                           f"--max-steps {step}")


def _unwrap_state_dict(obj: object, path: Path, nested: bool = False) -> dict[str, Tensor]:
    if isinstance(obj, Mapping) and {"format", "step", "config", "modules", "optimizer"} <= obj.keys():
        raise _run_checkpoint_error(obj, path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    elif isinstance(obj, Mapping) and len(obj) == 1 and not nested and isinstance(only := [*obj.values()][0], Mapping):
        obj = only          # {"module": {...}}, {"model": {...}}: the file's one entry, as ComfyUI unwraps it
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    if nested:
        obj = _flatten(obj)
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    dropped = [k for k in obj if k not in tensors]
    if dropped:
        logger.info("%s: ignoring %d non-tensor entries: %s", path.name, len(dropped), ", ".join(map(str, dropped[:8])))
    if not tensors:
        where = "" if nested else " at the top level"              # nested dicts are read only where asked
        kind = next((kind for key, kind in _A1111_PICKLES.items() if key in obj), "")
        raise CheckpointError(f"{path}: {kind}no tensors{where} (its keys: {', '.join(map(str, list(obj)[:10]))})")
    return tensors


# a key of A1111's own pickles (textual_inversion.py / hypernetwork.py save them) -> what the file is, said where
# such a file is read as a dict of tensors (given as a LoRA or a model)
_A1111_PICKLES = {
    "string_to_param": "an A1111 textual-inversion embedding, not a model or a LoRA (its name in a prompt uses it, "
                       "from an embeddings folder: --embeddings-dir): ",
    "layer_structure": "an A1111 hypernetwork, which sdlab does not apply: ",
}


def _flatten(obj: Mapping, prefix: str = "", depth: int = 0) -> dict[object, object]:
    """Nested dicts as one dict with dotted string keys (4 levels at most)."""
    flat: dict[object, object] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}" if isinstance(key, str) else key
        if isinstance(value, Mapping) and isinstance(key, str) and depth < 4:
            flat.update(_flatten(value, f"{name}.", depth + 1))
        else:
            flat[name] = value
    return flat


_DTYPE_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


def _safetensors_header(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> tuple[bytes, list[str]]:
    """The length-prefixed JSON header and the order the tensors' bytes follow it in.

    Everything is sorted (tensors by element size, largest first, so each stays aligned, then by name;
    metadata by key), so the same tensors and metadata always give the same bytes.
    """
    described = {key: _shape_and_dtype(tensors, key) for key in tensors}
    order = sorted(described, key=lambda k: (-described[k][1].itemsize, k))
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for key in order:
        shape, dtype = described[key]
        size = shape.numel() * dtype.itemsize
        header[key] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)                                    # data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text, order


def _shape_and_dtype(tensors: Mapping[str, Tensor], key: str) -> tuple[torch.Size, torch.dtype]:
    """`tensors[key]`'s shape and dtype; a `LazyMapping`'s from its description, its tensor not made."""
    if isinstance(tensors, LazyMapping):
        return tensors.shape(key), tensors.dtype(key)
    return tensors[key].shape, tensors[key].dtype


def _check_savable(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> None:
    for key in tensors:
        if not isinstance(tensors, LazyMapping) and tensors[key].device.type == "meta":
            raise CheckpointError(f"cannot save {key}: tensor has no data (meta device)")
        if (dtype := _shape_and_dtype(tensors, key)[1]) not in _DTYPE_NAMES:
            raise CheckpointError(f"cannot save {key}: safetensors has no dtype {dtype}")
    bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise TypeError(f"safetensors metadata must map str to str; not so for {bad[:5]}")


def save_safetensors(tensors: Mapping[str, Tensor], path: str | os.PathLike[str],
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write a `.safetensors` file, one tensor at a time (no second copy of the weights in memory).

    The bytes depend only on the tensors and metadata (see `_safetensors_header`); the file is opened like
    any other, so its mode follows the umask. A `LazyMapping`'s tensors are made one at a time as they are
    written (its shapes and dtypes make the header), each checked against its description.
    """
    metadata = dict(metadata or {})
    _check_savable(tensors, metadata)
    header, order = _safetensors_header(tensors, metadata)
    with open(path, "wb") as f:
        f.write(header)
        for key in order:
            t = tensors[key].detach().to("cpu").contiguous()
            if (t.shape, t.dtype) != _shape_and_dtype(tensors, key):
                raise CheckpointError(f"cannot save {key}: made {t.dtype} {tuple(t.shape)}, described otherwise")
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))   # raw little-endian bytes


def write_safetensors_atomic(
    path: str | os.PathLike[str], tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None,
    *, fsync: bool = True,
) -> Path:
    """Write `tensors` (+ string `metadata`) to `path` atomically: temp file in the same folder, fsync
    (unless ``fsync=False``, for files that can be rebuilt), rename. Same inputs, same bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _check_savable(tensors, dict(metadata or {}))
    atomic_write(path, lambda tmp: save_safetensors(tensors, tmp, metadata), fsync=fsync)
    logger.info("wrote %s (%d tensors)", path, len(tensors))
    return path
