"""`sdlab serve`'s Extras (`/sdapi/v1/extra-single-image`, `extra-batch-images`) as A1111 1.10's: every picture
upscaled in RGB whatever its mode, its text items kept with A1111's `postprocessing` infotext (also the
html_info), the second upscaler blended in, face restoration refused (sdlab has none), and A1111's models
folder read as A1111 reads it (Real-ESRGAN files in `RealESRGAN/`, others in `ESRGAN/`). The reference is A1111's
code, transcribed below. One server for the module, `--models-dir` an A1111 `models` folder of tiny random
upscalers."""

from __future__ import annotations

import base64
import io
import json
import math

import httpx
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps, PngImagePlugin
from safetensors.torch import save_file

from sdlab.server.a1111 import ExtraSingleIn
from server_fixtures import start_server
from test_upscale_models import new_arch_state

LANCZOS, NEAREST = Image.Resampling.LANCZOS, Image.Resampling.NEAREST


# ---------------------------------------------------------------- A1111 1.10, transcribed

def a1111_upscale(img: Image.Image, scale: float, do_upscale) -> Image.Image:
    """modules/upscaler.py `Upscaler.upscale`."""
    dest_w = int((img.width * scale) // 8 * 8)
    dest_h = int((img.height * scale) // 8 * 8)
    for i in range(3):
        if img.width >= dest_w and img.height >= dest_h and (i > 0 or scale != 1):
            break
        shape = (img.width, img.height)
        img = do_upscale(img, scale)
        if shape == (img.width, img.height):
            break
    if img.width != dest_w or img.height != dest_h:
        img = img.resize((int(dest_w), int(dest_h)), resample=LANCZOS)
    return img


def a1111_plain(resample):
    """`UpscalerLanczos.do_upscale` / `UpscalerNearest.do_upscale`."""
    return lambda img, scale: img.resize((int(img.width * scale), int(img.height * scale)), resample=resample)


def a1111_fix_image(image: Image.Image) -> Image.Image:
    """modules/images.py `fix_image` (`decode_base64_to_image` reads every picture through it)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGB", "P") and isinstance(image.info.get("transparency"), bytes):
        image = image.convert("RGBA")
    return image


def a1111_extras(image: Image.Image, upscaler_1, upscaler_2=None, visibility: float = 0.0,
                 upscale_by: float = 2.0) -> Image.Image:
    """modules/postprocessing.py `run_postprocessing` (`image_data.convert("RGB")`) and
    scripts/postprocessing_upscale.py `ScriptPostprocessingUpscale.process` in "Scale by" mode."""
    image = a1111_fix_image(image).convert("RGB")
    if upscaler_1 is None:
        return image
    upscaled_image = a1111_upscale(image, upscale_by, upscaler_1)
    if upscaler_2 and visibility > 0:
        second_upscale = a1111_upscale(image, upscale_by, upscaler_2)
        if upscaled_image.mode != second_upscale.mode:
            second_upscale = second_upscale.convert(upscaled_image.mode)
        upscaled_image = Image.blend(upscaled_image, second_upscale, visibility)
    return upscaled_image


# ---------------------------------------------------------------- the server

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("extras")
    models = root / "models"                                   # A1111's layout, without Stable-diffusion/
    (models / "ESRGAN").mkdir(parents=True)
    (models / "RealESRGAN").mkdir()
    torch.save(new_arch_state(4, seed=7), models / "ESRGAN" / "4x-tiny.pth")
    torch.save(new_arch_state(4, seed=1), models / "RealESRGAN" / "RealESRGAN_x4plus.pth")
    save_file(new_arch_state(2, seed=3), str(models / "RealESRGAN" / "RealESRGAN_x2plus.safetensors"))
    torch.save(new_arch_state(4, seed=5), models / "RealESRGAN" / "not-a1111s.pth")   # A1111 does not list it
    server = start_server(root / "outputs", "--models-dir", str(models))
    server.models = models
    yield server
    server.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url + "/sdapi/v1", timeout=120) as c:
        yield c


def encoded(image: Image.Image, fmt: str = "PNG", **save) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return base64.b64encode(buffer.getvalue()).decode()


def decoded(data: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


def extras(client: httpx.Client, image: str, **fields) -> tuple[Image.Image, str]:
    answer = client.post("/extra-single-image", json={"image": image, **fields})
    assert answer.status_code == 200, answer.text
    return decoded(answer.json()["image"]), answer.json()["html_info"]


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.mode == b.mode and a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


def noise(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# ---------------------------------------------------------------- every picture in RGB

def _pictures() -> dict[str, tuple[str, Image.Image]]:
    """Pictures in other modes than RGB: (base64, the picture as A1111's `decode_base64_to_image` opens it)."""
    rgb = noise(48, 32, 0)
    palette = rgb.quantize(16)
    transparent = palette.copy()
    transparent.info["transparency"] = bytes([0] + [255] * 15)
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 48), dtype=np.uint8)))
    cmyk = encoded(rgb.convert("CMYK"), "JPEG", quality=95)
    wide = Image.fromarray(np.random.default_rng(2).uniform(0, 255, (32, 48)).astype(np.float32))
    pictures = {"P": palette, "1": rgb.convert("1"), "P + tRNS": transparent, "RGBA": rgba, "L": rgb.convert("L"),
                "LA": rgba.convert("LA")}
    encodings = {name: encoded(image) for name, image in pictures.items()}
    encodings["CMYK JPEG"] = cmyk
    encodings["F TIFF"] = encoded(wide, "TIFF")
    return {name: (data, decoded(data)) for name, data in encodings.items()}


@pytest.mark.parametrize("upscaler, resample", [("None", None), ("Lanczos", LANCZOS), ("Nearest", NEAREST)])
def test_every_picture_is_upscaled_in_rgb_as_a1111s_run_postprocessing(client, upscaler, resample):
    """Before: a palette / 1-bit picture was resized in its own mode (Pillow's Nearest whatever the filter), an
    RGBA one premultiplied, a CMYK JPEG and a float TIFF were a 500, and "None" answered the picture's own mode."""
    for name, (data, opened) in _pictures().items():
        answer, _ = extras(client, data, upscaler_1=upscaler)
        expected = a1111_extras(opened, None if resample is None else a1111_plain(resample))
        assert same(answer, expected), name


def test_a_16_bit_grey_picture_is_scaled_to_8_bits_before_the_network_sees_it(client):
    """Before: the Extras model path converted it to RGB first, which Pillow clips to white (30000 -> 255)."""
    wide = Image.fromarray(np.full((32, 32), 30000, dtype=np.uint16))
    grey = Image.new("RGB", (32, 32), (117, 117, 117))                # round(30000 / 257)
    answers = [extras(client, encoded(image), upscaler_1="R-ESRGAN 4x+", upscaling_resize=4)[0]
               for image in (wide, grey, Image.new("RGB", (32, 32), "white"))]
    assert same(answers[0], answers[1]) and not same(answers[0], answers[2])


# ---------------------------------------------------------------- html_info and the picture's texts

def _texts(image: Image.Image) -> dict[str, str]:
    return {key: value for key, value in image.info.items() if isinstance(value, str)}


def test_html_info_and_texts_are_a1111s_postprocessing_infotext(client):
    """A1111's `run_postprocessing`: infotext = ", ".join(f"{k}: {quote(v)}") of the upscale script's `pp.info`
    (`Postprocess upscale by` / `to`, `crop to`, `upscaler`, `upscaler 2`), the picture's text items kept, the
    infotext as its `postprocessing` item and `plaintext_to_html(infotext)` as the html_info."""
    chunks = PngImagePlugin.PngInfo()
    chunks.add_text("parameters", "a cat\nSteps: 3, Seed: 1")
    chunks.add_text("Comment", "kept, as A1111 keeps it")
    buffer = io.BytesIO()
    noise(40, 24, 3).save(buffer, format="PNG", pnginfo=chunks)
    source = base64.b64encode(buffer.getvalue()).decode()
    kept = {"parameters": "a cat\nSteps: 3, Seed: 1", "Comment": "kept, as A1111 keeps it"}
    cases = [
        ({"upscaler_1": "lanczos"}, "Postprocess upscale by: 2, Postprocess upscaler: Lanczos"),    # see below
        ({"upscaler_1": "lanczos", "upscaling_resize": 2}, "Postprocess upscale by: 2.0, Postprocess upscaler: Lanczos"),
        ({"upscaler_1": "RealESRGAN_x4plus", "upscaling_resize": 3},
         "Postprocess upscale by: 3.0, Postprocess upscaler: R-ESRGAN 4x+"),
        ({"upscaler_1": "Lanczos", "resize_mode": 1, "upscaling_resize_w": 96, "upscaling_resize_h": 64},
         "Postprocess upscale to: 96x64, Postprocess crop to: 96x64, Postprocess upscaler: Lanczos"),
        ({"upscaler_1": "Lanczos", "resize_mode": 1, "upscaling_resize_w": 96, "upscaling_resize_h": 64,
          "upscaling_crop": False}, "Postprocess upscale to: 96x64, Postprocess upscaler: Lanczos"),
        ({"upscaler_1": "Nearest", "upscaler_2": "4x-tiny", "extras_upscaler_2_visibility": 0.25},
         "Postprocess upscale by: 2, Postprocess upscaler: Nearest, Postprocess upscaler 2: 4x-tiny"),
        ({"upscaler_1": "Lanczos", "upscaler_2": "Nearest"},       # visibility 0: not blended, not named
         "Postprocess upscale by: 2, Postprocess upscaler: Lanczos"),
        ({}, ""),                                                   # "None"
    ]
    for fields, infotext in cases:
        answer, html_info = extras(client, source, **fields)
        assert html_info == f"<p>{infotext}</p>", fields
        assert _texts(answer) == {**kept, "postprocessing": infotext}, fields
    batch = client.post("/extra-batch-images", json={"upscaler_1": "Lanczos", "imageList": [
        {"data": source, "name": "a.png"}, {"data": encoded(noise(16, 16, 4)), "name": "b.png"}]})
    assert batch.status_code == 200, batch.text
    assert batch.json()["html_info"] == "<p>Postprocess upscale by: 2, Postprocess upscaler: Lanczos</p>"   # the last's


def test_an_unset_upscaling_resize_is_a1111s_int_default():
    """A1111 1.10's API runs on pydantic v1, which does not validate a default: `upscaling_resize: float =
    Field(default=2, ...)` left unset stays the int 2 (`quote(2)`: `upscale by: 2`), while a 2 sent is coerced
    to 2.0. sdlab answered 2.0 for both."""
    pydantic_v1_value = {"omitted": 2, "sent": float(2)}       # v1: defaults as written, values coerced to float
    assert repr(ExtraSingleIn(image="").upscaling_resize) == repr(pydantic_v1_value["omitted"])
    assert repr(ExtraSingleIn(image="", upscaling_resize=2).upscaling_resize) == repr(pydantic_v1_value["sent"])


# ---------------------------------------------------------------- the second upscaler, face restoration, ranges

def test_the_second_upscaler_is_blended_in_as_a1111s(client):
    picture = noise(40, 24, 5)
    for visibility in (0.5, 1.0, 0.0):
        answer, _ = extras(client, encoded(picture), upscaler_1="Lanczos", upscaler_2="Nearest",
                           extras_upscaler_2_visibility=visibility, upscaling_resize=2.5)
        expected = a1111_extras(picture, a1111_plain(LANCZOS), a1111_plain(NEAREST), visibility, upscale_by=2.5)
        assert same(answer, expected), visibility
    with_model, _ = extras(client, encoded(picture), upscaler_1="Lanczos", upscaler_2="R-ESRGAN 2x+",
                           extras_upscaler_2_visibility=0.5)
    model_alone, _ = extras(client, encoded(picture), upscaler_1="R-ESRGAN 2x+")
    lanczos = a1111_extras(picture, a1111_plain(LANCZOS))
    assert same(with_model, Image.blend(lanczos, model_alone, 0.5))


@pytest.mark.parametrize("fields, field", [
    ({"upscaler_2": "no such upscaler"}, "upscaler_2"),
    ({"upscaler_2": "R-ESRGAN General 4xV3"}, "realesr-general-x4v3.pth"),     # A1111's name, its file not here
    ({"extras_upscaler_2_visibility": 7}, "extras_upscaler_2_visibility"),
    ({"extras_upscaler_2_visibility": -0.1}, "extras_upscaler_2_visibility"),
    ({"gfpgan_visibility": 3}, "gfpgan_visibility"),
    ({"codeformer_weight": 1.5}, "codeformer_weight"),
    ({"gfpgan_visibility": 1}, "gfpgan_visibility"),              # in range, but sdlab has no face restorer
    ({"codeformer_visibility": 0.3}, "codeformer_visibility"),
])
def test_what_sdlab_cannot_do_is_a_422_naming_the_field(client, fields, field):
    answer = client.post("/extra-single-image", json={"image": encoded(noise(16, 16, 6)), "upscaler_1": "Lanczos",
                                                      **fields})
    assert answer.status_code == 422 and field in json.dumps(answer.json()), answer.text


def test_no_face_restoration_asked_is_accepted(client):
    extras(client, encoded(noise(16, 16, 7)), upscaler_1="Lanczos", gfpgan_visibility=0, codeformer_visibility=0,
           codeformer_weight=0.5, upscaler_2="None", extras_upscaler_2_visibility=1)


# ---------------------------------------------------------------- A1111's models folder

def test_upscalers_are_found_where_a1111_keeps_them(server, client):
    """A1111 1.10: `UpscalerESRGAN` lists every .pt / .pth of models/ESRGAN by stem, `UpscalerRealESRGAN` the files
    of its own R-ESRGAN names in models/RealESRGAN (`get_realesrgan_models`), no other file there. Before: only
    ESRGAN/ was read, "R-ESRGAN 4x+" was a 404."""
    names = [row["name"] for row in client.get("/upscalers").json()]
    assert names == ["None", "Lanczos", "Nearest", "4x-tiny", "R-ESRGAN 2x+", "R-ESRGAN 4x+"]
    answer, _ = extras(client, encoded(noise(16, 16, 8)), upscaler_1="R-ESRGAN 4x+")
    assert answer.size == (32, 32)
    checkpoints = [row["model_name"] for row in client.get("/sd-models").json()]
    assert not any("RealESRGAN" in name for name in checkpoints), checkpoints


def test_the_r_esrgan_files_found_are_listed_as_a1111s_realesrgan_models(server, client):
    """A1111 1.10's `get_realesrgan_models` answers `{name, path, scale}` of its R-ESRGAN upscalers; cmd-flags
    names the folder they are read from. Before: `[]`, and no folder."""
    folder = server.models / "RealESRGAN"
    assert client.get("/realesrgan-models").json() == [
        {"name": "R-ESRGAN 2x+", "path": str(folder / "RealESRGAN_x2plus.safetensors"), "scale": 2},
        {"name": "R-ESRGAN 4x+", "path": str(folder / "RealESRGAN_x4plus.pth"), "scale": 4}]
    assert client.get("/cmd-flags").json()["realesrgan_dir"] == str(folder)


# ---------------------------------------------------------------- A1111's ESRGAN_tile options

def test_the_esrgan_tile_options_set_the_upscalers_tiles(server, client):
    """A1111's upscalers run in tiles of `opts.ESRGAN_tile` overlapping by `opts.ESRGAN_tile_overlap` (0: none).
    Before: the options were stored and echoed, the tiles stayed 192 / 32."""
    from sdlab.checkpoints.upscaler import load_upscaler
    from sdlab.pipeline.upscale import upscale_by

    network = load_upscaler(server.models / "RealESRGAN" / "RealESRGAN_x2plus.safetensors")
    picture = noise(200, 72, 9)
    options = client.get("/options").json()
    assert (options["ESRGAN_tile"], options["ESRGAN_tile_overlap"]) == (192, 32)
    try:
        for tile, overlap in ((192, 32), (48, 8), (0, 0)):
            assert client.post("/options", json={"ESRGAN_tile": tile, "ESRGAN_tile_overlap": overlap}).status_code == 200
            answer, _ = extras(client, encoded(picture), upscaler_1="R-ESRGAN 2x+")
            assert same(answer, upscale_by(picture, network, 2, tile=tile, overlap=overlap)), (tile, overlap)
        assert not same(answer, upscale_by(picture, network, 2, tile=48, overlap=8))
        for bad in ({"ESRGAN_tile": -1}, {"ESRGAN_tile_overlap": 1.5}):
            assert client.post("/options", json=bad).status_code == 422
    finally:
        client.post("/options", json={"ESRGAN_tile": 192, "ESRGAN_tile_overlap": 32})


A1111_TILE_SLIDERS = {"ESRGAN_tile": {"minimum": 0, "maximum": 512, "step": 16},        # A1111 1.10's
                      "ESRGAN_tile_overlap": {"minimum": 0, "maximum": 48, "step": 1}}  # modules/shared_options.py


def test_the_esrgan_tile_options_stay_within_a1111s_sliders(client):
    """Any integer >= 0 was taken: `ESRGAN_tile` 1 made a 64x64 x4 upscale 11 s (one network call a pixel), 4 with
    an overlap of 100 14 s, hours at 2048² with the device held. Now: `ESRGAN_tile` 0 (no tiles) or 16..512,
    `ESRGAN_tile_overlap` 0..48, A1111's sliders; another value is a 422 that sets nothing."""
    tile, overlap = A1111_TILE_SLIDERS["ESRGAN_tile"], A1111_TILE_SLIDERS["ESRGAN_tile_overlap"]
    try:
        for good in ({"ESRGAN_tile": 0}, {"ESRGAN_tile": tile["step"], "ESRGAN_tile_overlap": 8},
                     {"ESRGAN_tile": tile["maximum"]}, {"ESRGAN_tile_overlap": overlap["minimum"]},
                     {"ESRGAN_tile_overlap": overlap["maximum"]}):
            assert client.post("/options", json=good).status_code == 200, good
        for bad in ({"ESRGAN_tile": 1}, {"ESRGAN_tile": 8}, {"ESRGAN_tile": tile["maximum"] + 1},
                    {"ESRGAN_tile": True}, {"ESRGAN_tile_overlap": overlap["maximum"] + 1},
                    {"ESRGAN_tile_overlap": 100}, {"ESRGAN_tile_overlap": -1}, {"ESRGAN_tile_overlap": False}):
            answer = client.post("/options", json={"ESRGAN_tile": 64, **bad})
            assert answer.status_code == 422 and next(iter(bad)) in answer.text, (bad, answer.text)
            assert client.get("/options").json()["ESRGAN_tile"] == 512          # nothing set
    finally:
        client.post("/options", json={"ESRGAN_tile": 192, "ESRGAN_tile_overlap": 32})


def a1111_tile_count(width: int, tile: int, overlap: int) -> int:
    """modules/images.py `split_grid`'s columns (A1111 1.10): `cols = math.ceil((w - overlap) / non_overlap_width)`;
    0 or less cuts no tile, and `upscale_with_model` then fails (its `scale_factor` is never set)."""
    return math.ceil((width - overlap) / (tile - overlap))


def test_the_esrgan_tile_overlap_is_at_most_half_the_tile(server, client):
    """Both options within their sliders, an `ESRGAN_tile` 16 with an `ESRGAN_tile_overlap` 48 was taken and cut
    tiles 1 px apart (the overlap clamped to 15): 2401 network calls for a 64x64 picture, 58,081 at 256², where A1111
    cuts no tile and fails. Now an overlap above half the tile is a 422 naming both options that sets nothing,
    whichever option the request sets (the other one kept), in `POST options` or a request's `override_settings`;
    the tiles then advance by at least half a tile."""
    assert a1111_tile_count(256, 16, 48) <= 0 and a1111_tile_count(256, 16, 15) == 241     # A1111: fails / 1 px
    try:
        for bad, kept in (({"ESRGAN_tile": 16, "ESRGAN_tile_overlap": 48}, None),
                          ({"ESRGAN_tile": 32, "ESRGAN_tile_overlap": 17}, None),
                          ({"ESRGAN_tile": 16}, {"ESRGAN_tile": 192, "ESRGAN_tile_overlap": 32}),
                          ({"ESRGAN_tile_overlap": 9}, {"ESRGAN_tile": 16, "ESRGAN_tile_overlap": 8})):
            if kept:
                assert client.post("/options", json=kept).status_code == 200
            answer = client.post("/options", json=bad)
            assert answer.status_code == 422, (bad, answer.text)
            assert "ESRGAN_tile_overlap must be at most half of ESRGAN_tile" in answer.text, answer.text
            options = client.get("/options").json()
            assert (options["ESRGAN_tile"], options["ESRGAN_tile_overlap"]) == (
                (kept or {}).get("ESRGAN_tile", 192), (kept or {}).get("ESRGAN_tile_overlap", 32))
        answer = client.post("/txt2img", json={"prompt": "a", "override_settings": {"ESRGAN_tile_overlap": 9}})
        assert answer.status_code == 422 and "override_settings.ESRGAN_tile_overlap must be at most half" in \
            answer.text, answer.text
    finally:
        client.post("/options", json={"ESRGAN_tile": 192, "ESRGAN_tile_overlap": 32})


# ---------------------------------------------------------------- SD upscale's upscaler

SD_UPSCALE = {"prompt": "a red apple", "steps": 2, "seed": 3, "sampler_name": "Euler", "width": 64, "height": 64,
              "denoising_strength": 0.3, "script_name": "SD upscale"}


def sd_upscale(client: httpx.Client, upscaler: object, **fields) -> httpx.Response:
    """SD upscale of a 16x16 picture by 4 with `upscaler` as its `upscaler_index`: one 64x64 tile."""
    return client.post("/img2img", json={**SD_UPSCALE, "init_images": [encoded(noise(16, 16, 4))],
                                         "script_args": ["", 0, upscaler, 4], **fields})


@pytest.mark.parametrize("name, listed", [("4x-tiny", "4x-tiny"), ("4x-tiny.pth", "4x-tiny"), ("lanczos", "Lanczos"),
                                          ("R-ESRGAN 2x+", "R-ESRGAN 2x+")])
def test_sd_upscale_takes_the_upscaler_names_extras_takes(client, name, listed):
    """SD upscale's upscaler_index given a name finds what Extras finds (`upscaler_file`: a listed name, a file
    name, a plain resize in any case) and writes its listed name. Before: its own case-insensitive match of the
    listed names, so a file name was a 422."""
    extras(client, encoded(noise(16, 16, 4)), upscaler_1=name)
    answer = sd_upscale(client, name)
    assert answer.status_code == 200, answer.text
    assert f"SD upscale upscaler: {listed}" in json.loads(answer.json()["info"])["infotexts"][0]


@pytest.mark.parametrize("name, message", [
    ("4X-TINY", "unknown sd upscale upscaler '4X-TINY'; this server offers: None, Lanczos, Nearest, 4x-tiny"),
    ("R-ESRGAN 4x+ Anime6B", "is A1111's name of the file RealESRGAN_x4plus_anime_6B.pth, which was not found"),
])
def test_sd_upscale_refuses_the_upscaler_names_extras_refuses(client, name, message):
    """A name Extras does not find (404) is SD upscale's 422 with the same reason. Before: '4X-TINY' drew with
    4x-tiny (Extras: 404), an A1111 name without its file got no hint where to place the file."""
    assert client.post("/extra-single-image", json={"image": encoded(noise(16, 16, 4)),
                                                    "upscaler_1": name}).status_code == 404
    answer = sd_upscale(client, name)
    assert answer.status_code == 422 and message in answer.json()["detail"], answer.text


def test_sd_upscale_refused_by_the_tiles_checks_runs_no_upscale(tmp_path):
    """The tiles' requests are checked (here --max-images over n_iter x tiles) before the upscaler runs: a refused
    request pays for no upscale. The upscaler file is broken, so an upscale would answer that instead. Before:
    the upscale ran first and its 'cannot be loaded' was the answer."""
    (tmp_path / "models" / "ESRGAN").mkdir(parents=True)
    (tmp_path / "models" / "ESRGAN" / "broken.pth").write_bytes(b"not a network")
    server = start_server(tmp_path / "outputs", "--models-dir", str(tmp_path / "models"), "--max-images", "2")
    try:
        with httpx.Client(base_url=server.url + "/sdapi/v1", timeout=120) as client:
            refused = sd_upscale(client, "broken", n_iter=3)
            assert refused.status_code == 400 and "at most 2 images" in refused.text, refused.text
            upscaled = sd_upscale(client, "broken", n_iter=2)
            assert upscaled.status_code == 400 and "cannot be loaded" in upscaled.text, upscaled.text
    finally:
        server.stop()
