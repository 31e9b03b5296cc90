"""ComfyUI's upload routes on `sdlab serve` (server/comfy_api.py): POST /upload/image of type input, temp or output
(ComfyUI's server.py `image_upload` / `get_dir_by_type`: each type to its own folder), read back by /view and by
LoadImage's annotated names ("name [temp]"). Fixtures: tests/test_server_comfy_api.py's server and helpers."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from server_fixtures import b64_png
from test_server_comfy_api import NATIVE, drawn, graph, native_pixels, server, viewed  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def png(picture: Image.Image, **save) -> bytes:
    data = io.BytesIO()
    picture.save(data, format="PNG", **save)
    return data.getvalue()


def from_load_image(name: str, denoise: float = 0.6) -> dict:
    """The basic graph started from LoadImage `name` -> VAEEncode at `denoise` (img2img)."""
    prompt = graph(**{"3.denoise": denoise, "3.latent_image": ["10", 0]})
    prompt["10"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["11", 0], "vae": ["4", 2]}}
    prompt["11"] = {"class_type": "LoadImage", "inputs": {"image": name}}
    del prompt["5"]
    return prompt


@pytest.mark.parametrize("kind", ["temp", "output"])
def test_an_upload_of_type_temp_or_output_goes_to_that_folder(server, kind):
    """ComfyUI stores an upload of type temp / output in its temp / output folder: answered with that type, /view of
    that type serves it (and the input folder has no such file), LoadImage "name [type]" draws it as the native
    img2img of that picture; a name taken is renamed there as in the input folder; another type is a 400."""
    picture = Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    files = {"image": ("shared.png", png(picture), "image/png")}
    answer = server.post("/upload/image", files=files, data={"type": kind, "subfolder": "sub", "overwrite": "1"})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"name": "shared.png", "subfolder": "sub", "type": kind}
    assert server.post("/api/upload/image", files=files, data={"type": kind}).json() == {
        "name": "shared.png", "subfolder": "", "type": kind}
    other = Image.fromarray(np.zeros((64, 64, 3), np.uint8))
    renamed = server.post("/upload/image", files={"image": ("shared.png", png(other), "image/png")},
                          data={"type": kind})
    assert renamed.json() == {"name": "shared (1).png", "subfolder": "", "type": kind}
    for subfolder in ("sub", ""):
        shown = viewed(server, {"filename": "shared.png", "subfolder": subfolder, "type": kind})
        assert np.array_equal(shown, np.asarray(picture, np.int16))
    assert server.get("/view", params={"filename": "shared.png", "type": "input"}).status_code == 404
    pixels = viewed(server, drawn(server, from_load_image(f"sub/shared.png [{kind}]"))[1]["outputs"]["9"]["images"][0])
    native = native_pixels(server, {**NATIVE, "mode": "img2img", "init_image": b64_png(picture), "strength": 0.6})
    assert np.array_equal(pixels, native)
    bad = server.post("/upload/image", files=files, data={"type": "models"})
    assert bad.status_code == 400 and "type must be input, temp or output" in bad.text
    leaving = server.post("/upload/image", files=files, data={"type": kind, "subfolder": ".."})
    assert leaving.status_code == 400 and f"leaves the {kind} folder" in leaving.text
