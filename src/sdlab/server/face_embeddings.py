"""Face embeddings sent to the server for IP-Adapter FaceID (InsightFace's `normed_embedding`, 512 numbers a face,
which sdlab does not compute), decoded to an array; its shape and values are checked against the adapter by the
pipeline (`image_prompt.face_embeds`, a 422 naming the entry).

- the native `ip_adapters[].face_embedding`: the numbers as JSON (one face: 512 numbers; several: a list of
  lists), or base64 of a .npy file (NumPy's `np.save` of the (512,) or (faces, 512) array, read without pickles);
- an A1111 ControlNet unit's `ipadapter_input` (sd-webui-controlnet `ControlNetUnit.ipadapter_input`, API only:
  base64 of what `torch.save` wrote, one string or a list, each the output of the unit's preprocessor, which for
  ip-adapter_face_id is ``torch.from_numpy(face.normed_embedding).unsqueeze(0)``, a (1, 512) tensor): read as
  tensors alone (`torch.load(weights_only=True)`, as the extension's later versions read it), the list's faces
  one after another.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch

from sdlab.pipeline.image_prompt import NPY_MAGIC
from sdlab.server.inputs import BadRequest, decode_base64


def native_face_embedding(value: Any, what: str) -> np.ndarray:
    """A native entry's `face_embedding` (module docstring) as an array; anything else is a 422 naming `what`."""
    if isinstance(value, list):
        try:
            return np.asarray(value, dtype=np.float32)                                    # (E,) or (N, E)
        except (TypeError, ValueError):
            raise BadRequest(f"{what}: face_embedding must be numbers (512 a face, a list of lists for several "
                             "faces) or base64 of a .npy file", 422) from None
    raw = decode_base64(value, f"{what} face_embedding")
    if not raw.startswith(NPY_MAGIC):
        raise BadRequest(f"{what}: face_embedding is not a .npy file (NumPy's np.save format) nor a list of "
                         "numbers", 422)
    try:
        return np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise BadRequest(f"{what}: face_embedding is not a readable .npy array: {err}", 422) from None


def unit_face_embedding(value: Any, what: str) -> torch.Tensor:
    """An A1111 unit's `ipadapter_input` (module docstring) as one (faces, E) tensor, or a 422 naming `what`."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise BadRequest(f"{what}: ipadapter_input must be base64 of a tensor torch.save wrote (the face embedding), "
                         "or a list of them", 422)
    faces = []
    for item in items:
        raw = decode_base64(item, f"{what} ipadapter_input")
        try:
            loaded = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as err:        # whatever the unpickler raises on bytes that are no torch.save of tensors
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise BadRequest(f"{what}: ipadapter_input is not a tensor torch.save wrote (read as tensors alone): "
                             f"{reason}", 422) from None
        if not isinstance(loaded, torch.Tensor) or loaded.ndim == 0:
            raise BadRequest(f"{what}: ipadapter_input holds {type(loaded).__name__}, not the face embedding's tensor "
                             "((1, 512): the extension's ip-adapter_face_id output)", 422)
        faces.append(loaded)
    widths = {face.shape[-1] for face in faces}
    if len(widths) != 1:
        raise BadRequest(f"{what}: ipadapter_input's tensors are not all as wide: "
                         f"{', '.join(str(tuple(face.shape)) for face in faces)}", 422)
    return faces[0] if len(faces) == 1 else torch.cat([face.reshape(-1, face.shape[-1]) for face in faces])
