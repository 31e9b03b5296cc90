"""Textual-inversion embeddings stored in a picture, as A1111's training writes them beside its `.pt` files
(`modules/textual_inversion/image_embedding.py`) and its embeddings folder loads them (`.png`, `.webp`, `.avif`,
`.jxl`: each where this Pillow reads it, `image_embedding_suffixes`; a lossless AVIF keeps the pixels' data).

The picture carries the embedding's data (A1111's `.pt` dict: `string_to_param`, `name`, `step`, ...) as JSON
in which each tensor is ``{"TORCHTENSOR": nested lists}``, in one of two ways:

- a PNG text chunk ``sd-ti-embedding`` holding that JSON in base64;
- the pixels themselves, where the text is gone: the zlib-compressed JSON split into low and high nibbles,
  each laid out as an (H, w, 3) block beside the picture (low on the left, high on the right, each parted
  from the picture by one black column), drawn in the low nibble of each byte (the high nibble is a
  decorative pattern) and xor-ed with the low nibble of an LCG stream (m = 2**32, a = 1664525,
  c = 1013904223, seed 0, each value mod 255).

Only JSON is decoded: nothing in the picture is executed. A picture with neither (a preview image in the
folder) is `NoEmbeddingInPicture`, which an embeddings folder skips quietly as A1111 does.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sdlab.checkpoints.errors import CheckpointError

__all__ = ["A1111_PICTURE_SUFFIXES", "NoEmbeddingInPicture", "image_embedding_suffixes", "is_preview_picture",
           "read_image_embedding"]

A1111_PICTURE_SUFFIXES = (".png", ".webp", ".avif", ".jxl")     # textual_inversion.py `load_from_file`
TEXT_CHUNK = "sd-ti-embedding"
MAX_JSON_BYTES = 64 * 2**20          # 75 vectors of 1280 + 768 floats are a few MB of JSON; a zlib bomb is refused


class NoEmbeddingInPicture(CheckpointError):
    """A picture that holds no embedding (a preview image beside the embeddings)."""


@functools.cache
def image_embedding_suffixes() -> tuple[str, ...]:
    """The suffixes of A1111's embedding pictures that this Pillow opens: `.png`, `.webp`, `.avif` from Pillow
    11.3 (where it is built with libavif), `.jxl` where Pillow reads JPEG XL (Pillow 13 does not). Asked once:
    importing Pillow's plugins costs a fraction of a second."""
    from PIL import Image

    readable = {suffix for suffix, kind in Image.registered_extensions().items() if kind in Image.OPEN}
    return tuple(suffix for suffix in A1111_PICTURE_SUFFIXES if suffix in readable)


def is_preview_picture(path: Path) -> bool:
    """`<name>.preview.png`: the preview picture A1111 and its extensions keep beside an embedding, never read."""
    return path.suffix.lower() in A1111_PICTURE_SUFFIXES and Path(path.stem).suffix.lower() == ".preview"


def read_image_embedding(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors under dotted keys, e.g. ``string_to_param.*``; the text and number entries as strings, e.g.
    ``name``, ``step``) of the embedding in the picture at `path`, as `io.read_checkpoint(nested=True)` gives
    a `.pt` file's."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            text = getattr(image, "text", {}).get(TEXT_CHUNK)
            data = _from_text(path, text) if text is not None else _from_pixels(path, image)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise CheckpointError(f"{path}: not a readable picture ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: the embedding in the picture is not an A1111 embedding's dict")
    tensors: dict[str, Tensor] = {}
    metadata: dict[str, str] = {}
    _flatten(data, "", tensors, metadata)
    return tensors, metadata


def _from_text(path: Path, text: str) -> Any:
    try:
        raw = base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise CheckpointError(f"{path}: its {TEXT_CHUNK} text is not base64 ({exc})") from None
    return _decode_json(path, raw)


def _from_pixels(path: Path, image) -> Any:
    """A1111's `extract_image_data_embed`: the data blocks left and right of the picture (module docstring)."""
    pixels = _crop_black(np.asarray(image.convert("RGB"), dtype=np.uint8)) & 0x0F        # (H, W, 3)
    black = np.flatnonzero(pixels.sum(axis=(0, 2)) == 0)
    if black.size < 2:
        raise NoEmbeddingInPicture(f"{path}: a picture without an embedding in it")
    low = _unmask(pixels[:, : black.min()])
    high = _unmask(pixels[:, black.max() + 1:])
    if low.shape != high.shape:
        raise CheckpointError(f"{path}: the picture's embedding blocks differ in size ({low.shape}, {high.shape})")
    stream = zlib.decompressobj()
    try:
        raw = stream.decompress(((high << 4) | low).tobytes(), MAX_JSON_BYTES)
    except zlib.error as exc:
        raise CheckpointError(f"{path}: the picture's embedding data is damaged ({exc})") from None
    if stream.unconsumed_tail:
        raise CheckpointError(f"{path}: the picture's embedding data unpacks to over {MAX_JSON_BYTES} bytes")
    return _decode_json(path, raw)


def _crop_black(pixels: np.ndarray) -> np.ndarray:
    """`pixels` (H, W, 3) without the rows and columns at the edges whose pixels all have a zero channel."""
    lit = (pixels > 0).all(axis=2)                                                       # (H, W)
    cols, rows = np.flatnonzero(lit.any(axis=0)), np.flatnonzero(lit.any(axis=1))
    if cols.size == 0:
        return pixels[:0, :0]
    return pixels[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]


_LCG_A, _LCG_C, _LCG_M = 1664525, 1013904223, 2**32
_LCG_RUN = 4096                     # values made one by one; each later run of as many follows from the one before


def _lcg_stream(n: int) -> np.ndarray:
    """The first `n` values of A1111's `lcg()` (seed 0, each state mod 255), as uint8. A run of `_LCG_RUN` states
    follows from the run before it in one step, x[i + K] = A x[i] + C (mod 2**32) with A = a**K and
    C = c (a**(K-1) + ... + 1), in uint64 arithmetic (its wrap at 2**64 keeps the value mod 2**32)."""
    states = np.empty(n, dtype=np.uint64)
    seed = 0
    for i in range(min(n, _LCG_RUN)):
        seed = (_LCG_A * seed + _LCG_C) % _LCG_M
        states[i] = seed
    jump_a = np.uint64(pow(_LCG_A, _LCG_RUN, _LCG_M))
    jump_c = np.uint64(_LCG_C * sum(pow(_LCG_A, j, _LCG_M) for j in range(_LCG_RUN)) % _LCG_M)
    for start in range(_LCG_RUN, n, _LCG_RUN):
        count = min(_LCG_RUN, n - start)
        states[start: start + count] = (states[start - _LCG_RUN: start - _LCG_RUN + count] * jump_a + jump_c) \
            & np.uint64(_LCG_M - 1)
    return (states % np.uint64(255)).astype(np.uint8)


def _unmask(block: np.ndarray) -> np.ndarray:
    """`block` xor the low nibble of A1111's LCG stream (`xor_block`), element by element in C order."""
    return block.astype(np.uint8) ^ (_lcg_stream(block.size).reshape(block.shape) & 0x0F)


def _decode_json(path: Path, raw: bytes) -> Any:
    if len(raw) > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: the picture's embedding text is over {MAX_JSON_BYTES} bytes")
    try:
        return json.loads(raw, object_hook=_tensor_hook)
    except (ValueError, TypeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: the picture's embedding text is not A1111's embedding JSON ({exc})") from None


def _tensor_hook(entry: dict) -> Any:
    """A1111's `EmbeddingDecoder`: ``{"TORCHTENSOR": lists}`` is a tensor (float64, as numpy reads the lists)."""
    if "TORCHTENSOR" in entry:
        return torch.tensor(entry["TORCHTENSOR"], dtype=torch.float64)
    return entry


def _flatten(data: dict, prefix: str, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Tensor):
            tensors[name] = value
        elif isinstance(value, dict):
            _flatten(value, f"{name}.", tensors, metadata)
        elif not prefix and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            metadata[name] = str(value)
