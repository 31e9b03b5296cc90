"""Small numeric arrays from NumPy .npy files (a FaceID face embedding: 512 numbers a face), read without
pickles and without trusting the header: its shape and dtype are checked before a byte of the data is read, so
a header that declares a huge shape, text, records, objects or a byte count the file does not hold is refused
with the reason, never allocated (`numpy.lib.format`'s `read_magic` / `read_array_header_1_0` / `_2_0`).

What comes back is native-endian: floats as float32 (a big-endian '>f4' embedding is a real one), integers as
int64 (the caller decides whether it takes them).
"""

from __future__ import annotations

import io
import math
from typing import BinaryIO

import numpy as np
from numpy.lib import format as npy_format

NPY_MAGIC = b"\x93NUMPY"
"""The first bytes of every .npy file (NumPy's format.MAGIC_PREFIX)."""
MAX_NUMBERS = 1 << 16
"""The most numbers a .npy face embedding may hold (128 faces of 512; one face is 512)."""
NUMBER_KINDS = {"f": "float", "i": "int", "u": "unsigned int"}
"""The dtype kinds read (`numpy.dtype.kind`); floats of 2, 4 or 8 bytes, integers of any size."""


class NpyError(ValueError):
    """A .npy file that is not a small numeric array; the message says why."""


def read_npy(file: BinaryIO, size: int) -> np.ndarray:
    """The array of the .npy file `file` holds (`size`: its length in bytes), checked from its header first:
    version 1.0 or 2.0, a float (2, 4, 8 bytes) or integer dtype, at most `MAX_NUMBERS` numbers, and the data
    bytes the shape declares present. An NpyError says what is wrong."""
    try:
        version = npy_format.read_magic(file)
        if version not in ((1, 0), (2, 0)):
            raise NpyError(f"NumPy .npy version {version[0]}.{version[1]} is not read (1.0 and 2.0 are)")
        read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        shape, fortran, dtype = read_header(file)
    except NpyError:
        raise
    except (ValueError, OSError, EOFError, SyntaxError) as err:
        raise NpyError(f"not a readable .npy header: {str(err).strip().splitlines()[0]}") from None
    kind = NUMBER_KINDS.get(dtype.kind)
    if dtype.fields is not None or kind is None or (kind == "float" and dtype.itemsize not in (2, 4, 8)):
        raise NpyError(f"its dtype {dtype.str!r} is not numbers (a float or integer .npy array is)")
    count = math.prod(shape)
    if count > MAX_NUMBERS:
        raise NpyError(f"its header declares shape {shape}, {count} numbers; a face embedding is a few hundred "
                       f"(at most {MAX_NUMBERS} are read)")
    wanted = count * dtype.itemsize
    if size - file.tell() < wanted:
        raise NpyError(f"its header declares shape {shape} ({wanted} bytes of {dtype.str}); the file holds "
                       f"{max(size - file.tell(), 0)} after it")
    array = np.frombuffer(file.read(wanted), dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return array.astype(np.float32 if kind == "float" else np.int64)                          # native order, a copy


def read_npy_bytes(raw: bytes) -> np.ndarray:
    """`read_npy` of a .npy file's bytes."""
    return read_npy(io.BytesIO(raw), len(raw))
