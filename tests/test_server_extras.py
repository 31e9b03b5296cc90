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

import httpx
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps, PngImagePlugin
from safetensors.torch import save_file

from server_fixtures import start_server
from test_upscale_models import new_arch_state

LANCZOS, NEAREST = Image.Resampling.LANCZOS, Image.Resampling.NEAREST


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
