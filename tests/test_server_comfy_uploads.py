"""ComfyUI's upload routes on `sdlab serve` (server/comfy_api.py): POST /upload/image of type input, temp or output
(ComfyUI's server.py `image_upload` / `get_dir_by_type`: each type to its own folder), read back by /view and by
LoadImage's annotated names ("name [temp]"); POST /upload/mask (ComfyUI's `upload_mask`: the original_ref picture,
its alpha replaced by the mask's). Fixtures: tests/test_server_comfy_api.py's server and helpers."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from server_fixtures import b64_png
from test_server_comfy_api import NATIVE, drawn, graph, native_pixels, server, upload, viewed  # noqa: F401

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
    # ComfyUI's /view reads a filename's annotation before its type (folder_paths.annotated_filepath)
    annotated = viewed(server, {"filename": f"shared.png [{kind}]", "subfolder": "sub", "type": "input"})
    assert np.array_equal(annotated, np.asarray(picture, np.int16))
    assert server.get("/view", params={"filename": "shared.png", "type": "input"}).status_code == 404
    pixels = viewed(server, drawn(server, from_load_image(f"sub/shared.png [{kind}]"))[1]["outputs"]["9"]["images"][0])
    native = native_pixels(server, {**NATIVE, "mode": "img2img", "init_image": b64_png(picture), "strength": 0.6})
    assert np.array_equal(pixels, native)
    bad = server.post("/upload/image", files=files, data={"type": "models"})
    assert bad.status_code == 400 and "type must be input, temp or output" in bad.text
    leaving = server.post("/upload/image", files=files, data={"type": kind, "subfolder": ".."})
    assert leaving.status_code == 400 and f"leaves the {kind} folder" in leaving.text


def comfyui_masked(original: bytes, mask: bytes) -> Image.Image:
    """ComfyUI's server.py upload_mask `image_save_function`, its picture lines: the original's text kept, both made
    RGBA, the mask's alpha put on the original (comfyanonymous/ComfyUI server.py)."""
    with Image.open(io.BytesIO(original)) as original_pil:
        metadata = PngImagePlugin.PngInfo()
        if hasattr(original_pil, "text"):
            for key in original_pil.text:
                metadata.add_text(key, original_pil.text[key])
        original_pil = original_pil.convert("RGBA")
        mask_pil = Image.open(io.BytesIO(mask)).convert("RGBA")
        new_alpha = mask_pil.getchannel("A")
        original_pil.putalpha(new_alpha)
        data = io.BytesIO()
        original_pil.save(data, format="PNG", compress_level=4, pnginfo=metadata)
    return Image.open(io.BytesIO(data.getvalue()))


def test_upload_mask_puts_the_masks_alpha_on_the_original_as_comfyui(server):
    """POST /upload/mask (ComfyUI's mask editor): the original_ref picture (here a drawn one, type output, as
    /history names it; and an input upload) with the mask's alpha, its parameters text kept, equal to ComfyUI's
    upload_mask's picture (RGBA pixels and text); a SetLatentNoiseMask graph of it draws as one of the same
    picture uploaded whole. A mask of another size, an original_ref naming no picture or no original_ref: a 400."""
    drawn_image = drawn(server, graph(**{"3.seed": 12}))[1]["outputs"]["9"]["images"][0]
    original = server.get("/view", params=drawn_image).content
    alpha = np.full((64, 64), 255, np.uint8)
    alpha[10:40, 20:50] = 0
    mask = png(Image.fromarray(np.dstack([np.zeros((64, 64, 3), np.uint8), alpha]), "RGBA"))
    ref = json.dumps({"filename": drawn_image["filename"], "subfolder": "", "type": "output"})
    answer = server.post("/upload/mask", files={"image": ("clipspace-mask-1.png", mask, "image/png")},
                         data={"original_ref": ref, "subfolder": "clipspace", "type": "input"})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"name": "clipspace-mask-1.png", "subfolder": "clipspace", "type": "input"}
    stored = server.get("/view", params={"filename": "clipspace-mask-1.png", "subfolder": "clipspace",
                                         "type": "input"}).content
    expected = comfyui_masked(original, mask)
    with Image.open(io.BytesIO(stored)) as got:
        assert got.mode == "RGBA" and np.array_equal(np.asarray(got), np.asarray(expected))
        assert got.text == expected.text and "parameters" in got.text
    upload(server, "whole.png", Image.open(io.BytesIO(stored)))
    prompt = from_load_image("clipspace/clipspace-mask-1.png [input]", denoise=0.9)
    prompt["12"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["10", 0], "mask": ["11", 1]}}
    prompt["3"]["inputs"]["latent_image"] = ["12", 0]
    masked = viewed(server, drawn(server, prompt)[1]["outputs"]["9"]["images"][0])
    prompt["11"]["inputs"]["image"] = "whole.png"
    assert np.array_equal(masked, viewed(server, drawn(server, prompt)[1]["outputs"]["9"]["images"][0]))
    # an input picture as original_ref, by ComfyUI's annotated name (no type)
    again = server.post("/api/upload/mask", files={"image": ("m.png", mask, "image/png")},
                        data={"original_ref": json.dumps({"filename": "whole.png [input]"})})
    assert again.status_code == 200 and again.json()["type"] == "input", again.text
    for data, words in [
        ({"original_ref": ref}, "the mask is 32x32 px, the picture original_ref names 64x64"),
        ({"original_ref": json.dumps({"filename": "gone.png", "type": "input"})}, "names no picture"),
        ({"original_ref": json.dumps({"filename": "../x.png", "type": "input"})}, "names no picture"),
        ({}, "original_ref must be the JSON"),
        ({"original_ref": "{"}, "original_ref must be the JSON"),
    ]:
        small = png(Image.new("RGBA", (32, 32))) if "32x32" in words else mask
        bad = server.post("/upload/mask", files={"image": ("m.png", small, "image/png")}, data=data)
        assert bad.status_code == 400 and words in bad.text, bad.text


def test_an_upload_naming_a_folder_or_no_file_is_a_400_that_writes_nothing(server):
    """An upload whose file name, in its subfolder, is a folder there ("d" beside the subfolder "d", with or
    without overwrite), whose subfolder passes through a file ("d/x.png/e") or that names no file ("." in a
    subfolder: the subfolder itself) is one 400 and leaves the folder as it was; ComfyUI's makedirs / open() of such
    a path fails. Before: overwrite was a 500 (IsADirectoryError) leaving a ".d.part" file, a subfolder through a
    file a 500 (NotADirectoryError), and "." wrote the file "d" beside the subfolder "d" answering the name "d" in
    it."""
    picture = png(Image.fromarray(np.full((8, 8, 3), 7, np.uint8)))
    files = {"image": ("x.png", picture, "image/png")}
    assert server.post("/upload/image", files=files, data={"subfolder": "d", "type": "temp"}).status_code == 200
    folder = server.app.state.comfy.upload_dirs["temp"]
    before = sorted(p.name for p in folder.iterdir())
    for name, data, words in [("d", {"overwrite": "true"}, "'d' cannot be a file of the temp folder"),
                              ("d", {}, "'d' cannot be a file of the temp folder"),
                              ("x.png", {"subfolder": "d/x.png/e"}, "'d/x.png/e/x.png' cannot be a file"),
                              (".", {"subfolder": "d"}, "names no file")]:
        files = {"image": (name, picture, "image/png")}
        bad = server.post("/upload/image", files=files, data={"type": "temp", **data})
        assert bad.status_code == 400 and words in bad.text, (name, data, bad.text)
    assert sorted(p.name for p in folder.iterdir()) == before
