"""`sdlab serve` requests as A1111 clients send them, and the limits every pass of a job keeps: the steps
limit on the hires pass, huge scales refused with a 4xx, progress over both hires passes, MIME-wrapped
base64, null fields, a broken model or LoRA file chosen by a client, the `info` JSON's variation seeds,
masks of another size or with transparency, and png-info's A1111 keys. One real server process for the
module (`--max-steps 10`, a models folder with a broken checkpoint and a broken LoRA)."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import pytest
from PIL import Image

from server_fixtures import start_server

MAX_STEPS = 10


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("requests-server")
    models = root / "models"
    (models / "Lora").mkdir(parents=True)
    (models / "broken.safetensors").write_bytes(bytes(range(256)) * 16)
    (models / "Lora" / "badlora.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    server = start_server(root / "outputs", "--models-dir", str(models), "--max-steps", str(MAX_STEPS))
    yield server, models
    server.stop()


@pytest.fixture
def client(served):
    server, _ = served
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def png_bytes(image: Image.Image, **info: str) -> bytes:
    from PIL import PngImagePlugin

    chunk = PngImagePlugin.PngInfo()
    for key, value in info.items():
        chunk.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=chunk)
    return buffer.getvalue()


def b64(image: Image.Image) -> str:
    return base64.b64encode(png_bytes(image)).decode()


def wait(client: httpx.Client, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish")


# ---------------------------------------------------------------- 1. --max-steps holds for the hires pass


def test_the_steps_limit_holds_for_the_hires_second_pass(client):
    a1111 = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "enable_hr": True,
                                                   "hr_second_pass_steps": 60, "denoising_strength": 1})
    assert a1111.status_code == 400, a1111.text
    assert "hr_second_pass_steps" in a1111.json()["errors"] and f"<= {MAX_STEPS}" in a1111.json()["errors"]
    native = client.post("/api/jobs", json={"prompt": "x", "steps": 2, "hr_scale": 2, "hr_steps": 1000})
    assert native.status_code == 400 and native.json()["detail"].startswith("hr_steps must be"), native.text
    assert client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0     # nothing was queued
