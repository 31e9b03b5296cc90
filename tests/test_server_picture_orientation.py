"""Every picture `sdlab serve` receives is turned upright by its EXIF orientation before it is used, as A1111's
`decode_base64_to_image` (`images.read` -> `fix_image` -> `ImageOps.exif_transpose`) and sdlab's own picture
files: a phone photo stored sideways gives what the same picture stored upright gives, on every route kind
(Extras, img2img's init picture and mask, a ControlNet unit's picture, /controlnet/detect, the native API)."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image, ImageOps

from server_fixtures import picture, sdlab_server, wait_for_job  # noqa: F401  (sdlab_server: a session fixture)

ORIENTATION = 0x0112


def _b64(image: Image.Image, fmt: str = "PNG", **save) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return base64.b64encode(buffer.getvalue()).decode()


def _sideways_and_upright(seed: int, mode: str = "RGB") -> tuple[str, str]:
    """A JPEG stored 64 wide x 32 high with EXIF Orientation 6 (turn 90 degrees clockwise to view: 32 x 64
    upright), and the same pixels stored upright as a PNG (A1111's `exif_transpose` of the decoded JPEG)."""
    rng = np.random.default_rng(seed)
    stored = Image.fromarray(rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)).convert(mode)
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    sideways = _b64(stored, "JPEG", quality=95, exif=exif.tobytes())
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(base64.b64decode(sideways))))
    assert upright.size == (32, 64)
    return sideways, _b64(upright)


def _pixels(data: str) -> np.ndarray:
    return np.asarray(picture(data))


@pytest.fixture
def client(sdlab_server):
    with httpx.Client(base_url=sdlab_server.url, timeout=120) as c:
        yield c


def _answer(client: httpx.Client, route: str, body: dict) -> dict:
    answer = client.post(route, json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_extras_turns_the_picture_upright(client):
    sideways, upright = _sideways_and_upright(1)
    body = {"upscaler_1": "Lanczos", "upscaling_resize": 2}
    turned = _pixels(_answer(client, "/sdapi/v1/extra-single-image", {**body, "image": sideways})["image"])
    assert turned.shape == (128, 64, 3)
    stored = _pixels(_answer(client, "/sdapi/v1/extra-single-image", {**body, "image": upright})["image"])
    assert np.array_equal(turned, stored)


def test_img2img_init_picture_and_mask_are_turned_upright(client):
    sideways, upright = _sideways_and_upright(2)
    mask_sideways, mask_upright = _sideways_and_upright(3, mode="L")
    body = {"prompt": "a cat", "steps": 2, "seed": 5, "width": 32, "height": 64, "denoising_strength": 0.6}
    drawn = {}
    for name, init, mask in (("sideways", sideways, None), ("upright", upright, None),
                             ("mask sideways", upright, mask_sideways), ("mask upright", upright, mask_upright)):
        fields = {"init_images": [init], **({"mask": mask} if mask else {})}
        drawn[name] = _pixels(_answer(client, "/sdapi/v1/img2img", {**body, **fields})["images"][0])
    assert np.array_equal(drawn["sideways"], drawn["upright"])
    assert np.array_equal(drawn["mask sideways"], drawn["mask upright"])
    assert not np.array_equal(drawn["mask upright"], drawn["upright"])          # the mask was used


def test_a_controlnet_units_picture_is_turned_upright(tmp_path):
    from sdlab.server.config import Limits
    from sdlab.server.controls import a1111_controls
    from sdlab.server.model_folders import CONTROLNET_SUFFIXES, ModelFolder

    (tmp_path / "cn.safetensors").write_bytes(b"x")
    folder = ModelFolder(tmp_path, CONTROLNET_SUFFIXES, hashed=True)
    sideways, upright = _sideways_and_upright(4)
    units = [a1111_controls({"controlnet": {"args": [{"model": "cn", "image": data}]}}, folder, Limits())[0]
             for data in (sideways, upright)]
    assert units[0].image.size == (32, 64)
    assert np.array_equal(np.asarray(units[0].image), np.asarray(units[1].image))


def test_controlnet_detect_turns_the_picture_upright(client):
    sideways, upright = _sideways_and_upright(5)
    answer = _answer(client, "/controlnet/detect", {"controlnet_module": "canny",
                                                    "controlnet_input_images": [sideways, upright]})
    turned, stored = (_pixels(image) for image in answer["images"])
    # unset processor_res is the extension's 512: the upright 32x64 picture's short side scaled to 512
    assert turned.shape == (1024, 512, 3) and np.array_equal(turned, stored)


def test_the_native_apis_init_picture_is_turned_upright(client):
    sideways, upright = _sideways_and_upright(6)
    pictures = []
    for init in (sideways, upright):
        created = client.post("/api/jobs", json={"prompt": "a cat", "steps": 2, "seed": 5, "width": 32, "height": 64,
                                                 "mode": "img2img", "init_image": init, "strength": 0.6})
        assert created.status_code == 202, created.text
        job = wait_for_job(client, created.json()["id"])
        assert job["status"] == "done", job
        pictures.append(np.asarray(Image.open(io.BytesIO(client.get(job["images"][0]).content)).convert("RGB")))
    assert pictures[0].shape == (64, 32, 3) and np.array_equal(*pictures)
