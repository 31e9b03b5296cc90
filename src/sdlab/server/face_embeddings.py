"""Face embeddings sent to the server for IP-Adapter FaceID (InsightFace's `normed_embedding`, 512 numbers a face,
which sdlab does not compute), decoded to an array; its shape and values are checked against the adapter by the
pipeline (`image_prompt.face_embeds`, a 422 naming the entry).

- the native `ip_adapters[].face_embedding`: the numbers as JSON (one face: 512 numbers; several: a list of
  lists), or base64 of a .npy file (NumPy's `np.save` of the (512,) or (faces, 512) array, read without pickles);
- an A1111 ControlNet unit's `ipadapter_input` (sd-webui-controlnet `ControlNetUnit.ipadapter_input`, API only:
  base64 of what `torch.save` wrote, one string or a list, each the output of the unit's preprocessor, which for
  ip-adapter_face_id is ``torch.from_numpy(face.normed_embedding).unsqueeze(0)``, a (1, 512) tensor): read as
  tensors alone (`torch.load(weights_only=True)`, as the extension's later versions read it), the list's faces
  one after another (the pipeline averages their tokens under the extension's convention, as the extension does).

Both are a few KB: a .npy file's header is checked before its data is read (`npy_arrays.read_npy`: a small
float or integer array), a torch.save zip's records before it is unpacked (at most `MAX_UNPACKED` bytes in all,
which a deflated record cannot exceed as it unpacks), and only dense tensors are taken. sdlab's checkpoint reader
(`checkpoints.io.read_checkpoint`) is not used here: it reads files of dicts of tensors, and its limits are those
of a checkpoint of GBs.
"""

from __future__ import annotations

import io
import zipfile
from typing import Any

import numpy as np
import torch

from sdlab.pipeline.npy_arrays import NPY_MAGIC, NpyError, read_npy_bytes
from sdlab.server.inputs import BadRequest, decode_base64


MAX_UNPACKED = 1 << 20
"""The most bytes a torch.save zip of an `ipadapter_input` may unpack to (its (1, 512) float32 tensor: about 3 KB)."""
NUMBERS = "face_embedding must be numbers (512 a face, a list of lists for several faces) or base64 of a .npy file"


def native_face_embedding(value: Any, what: str) -> np.ndarray:
    """A native entry's `face_embedding` (module docstring) as an array; anything else is a 422 naming `what`."""
    if isinstance(value, list):
        rows = value if value and all(isinstance(row, list) for row in value) else [value]
        if not all(_is_number(number) for row in rows for number in row):
            raise BadRequest(f"{what}: {NUMBERS}", 422)
        try:
            with np.errstate(over="ignore"):                    # a number beyond float32: inf, refused as such
                return np.asarray(value, dtype=np.float32)                                # (E,) or (N, E)
        except ValueError:                                      # rows of different lengths
            raise BadRequest(f"{what}: {NUMBERS}", 422) from None
    raw = decode_base64(value, f"{what} face_embedding")
    if not raw.startswith(NPY_MAGIC):
        raise BadRequest(f"{what}: face_embedding is not a .npy file (NumPy's np.save format) nor a list of "
                         "numbers", 422)
    try:
        return read_npy_bytes(raw)
    except NpyError as err:
        raise BadRequest(f"{what}: face_embedding is not a small numeric .npy array: {err}", 422) from None


def _is_number(value: Any) -> bool:
    """A JSON number: an int or float, not a boolean (JSON's true / false are no numbers of an embedding)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def unit_face_embedding(value: Any, what: str) -> torch.Tensor:
    """An A1111 unit's `ipadapter_input` (module docstring) as one (faces, E) tensor, or a 422 naming `what`."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise BadRequest(f"{what}: ipadapter_input must be base64 of a tensor torch.save wrote (the face embedding), "
                         "or a list of them", 422)
    faces = []
    for item in items:
        raw = decode_base64(item, f"{what} ipadapter_input")
        _check_torch_zip(raw, what)
        try:
            loaded = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as err:        # whatever the unpickler raises on bytes that are no torch.save of tensors
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise BadRequest(f"{what}: ipadapter_input is not a tensor torch.save wrote (read as tensors alone): "
                             f"{reason}", 422) from None
        if isinstance(loaded, torch.Tensor) and loaded.layout != torch.strided:
            raise BadRequest(f"{what}: ipadapter_input holds a {loaded.layout} tensor; the face embedding's is a "
                             "dense (1, 512) tensor", 422)
        if not isinstance(loaded, torch.Tensor) or loaded.ndim == 0:
            raise BadRequest(f"{what}: ipadapter_input holds {type(loaded).__name__}, not the face embedding's tensor "
                             "((1, 512): the extension's ip-adapter_face_id output)", 422)
        faces.append(loaded)
    widths = {face.shape[-1] for face in faces}
    if len(widths) != 1:
        raise BadRequest(f"{what}: ipadapter_input's tensors are not all as wide: "
                         f"{', '.join(str(tuple(face.shape)) for face in faces)}", 422)
    return faces[0] if len(faces) == 1 else torch.cat([face.reshape(-1, face.shape[-1]) for face in faces])


def _check_torch_zip(raw: bytes, what: str) -> None:
    """A 422 unless `raw` is a torch.save zip (PyTorch's format since 1.6, what the extension's clients write)
    whose records unpack to at most `MAX_UNPACKED` bytes, read from its directory before anything is unpacked:
    a deflated record may declare GBs in a few KB. (The older format is refused: its pickle sizes each storage,
    which torch allocates before reading it.)"""
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            unpacked = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, ValueError, EOFError, OSError):
        raise BadRequest(f"{what}: ipadapter_input is not a tensor torch.save wrote (read as tensors alone): not "
                         "the zip file torch.save writes", 422) from None
    if unpacked > MAX_UNPACKED:
        raise BadRequest(f"{what}: ipadapter_input unpacks to {unpacked} bytes; a face embedding's torch.save is "
                         f"a few KB (at most {MAX_UNPACKED} bytes are read)", 422)
