"""FreeU through the server: the native API's `freeu` object (drawn, recorded, its record drawing the same picture,
a bad one a 4xx), A1111's API through Forge's FreeU Integrated `alwayson_scripts` args (ComfyUI's FreeU_V2, as Forge
draws it), and `POST /api/parameters` of a picture giving the setting back."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from server_fixtures import sdlab_server  # noqa: F401  (a session fixture)

FINAL = {"done", "failed", "cancelled"}
BASE = {"prompt": "a freeu house", "steps": 3, "seed": 11, "width": 64, "height": 64, "sampler": "Euler"}


@pytest.fixture
def client(sdlab_server):
    with httpx.Client(base_url=sdlab_server.url, timeout=120) as c:
        yield c


def _drawn(client: httpx.Client, body: dict) -> dict:
    created = client.post("/api/jobs", json=body)
    assert created.status_code == 202, created.text
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{created.json()['id']}").json()
        if job["status"] in FINAL:
            assert job["status"] == "done", job
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {created.json()['id']} did not finish")


def _pixels(client: httpx.Client, job: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(client.get(job["images"][0]).content)).convert("RGB"), dtype=np.int16)


def test_a_native_job_draws_records_and_redraws_freeu(client):
    from sdlab.server.native import JobIn

    setting = {"b1": 1.3, "b2": 1.6, "s1": 0.9, "s2": 0.2, "version": 1, "convention": "comfyui"}
    plain = _drawn(client, BASE)
    job = _drawn(client, {**BASE, "freeu": setting})
    assert np.abs(_pixels(client, job) - _pixels(client, plain)).max() > 8
    assert job["request"]["freeu"] == setting
    assert "freeu_enabled: True, freeu_b1: 1.3, freeu_b2: 1.6, freeu_s1: 0.9, freeu_s2: 0.2, FreeU version: 1" in \
        job["infotexts"][0]
    body = {key: value for key, value in job["request"].items() if key in JobIn.model_fields and value is not None}
    again = _drawn(client, body)
    assert np.array_equal(_pixels(client, again), _pixels(client, job)) and again["infotexts"] == job["infotexts"]
    # the picture's parameters give the setting back as the job's
    image = base64.b64encode(client.get(job["images"][0]).content).decode()
    read = client.post("/api/parameters", json={"image": image})
    assert read.status_code == 200, read.text
    assert read.json()["settings"]["freeu"] == setting and read.json()["unread"] == []


@pytest.mark.parametrize("freeu, status, words", [
    ({"b1": 1.2, "b3": 1.0}, 422, "b3"),
    ({"version": 3}, 400, "FreeU version must be 1 or 2"),
    ({"s2": 99}, 400, "FreeU s2 must lie in [-10, 10]"),
    ({"convention": "forge"}, 400, "unknown FreeU convention 'forge'"),
])
def test_a_bad_native_setting_is_refused(client, freeu, status, words):
    refused = client.post("/api/jobs", json={**BASE, "freeu": freeu})
    assert refused.status_code == status and words in refused.text, refused.text


def test_forges_freeu_integrated_args_draw_freeu_v2(client):
    """alwayson_scripts {"FreeU Integrated": {"args": [enabled, b1, b2, s1, s2]}} draws ComfyUI's FreeU_V2 (Forge's
    `opFreeU_V2.patch`) and records Forge's labels; unticked it draws the plain picture; more args or a factor that
    is not a number is a 422."""
    a1111 = {"prompt": BASE["prompt"], "steps": 3, "seed": 11, "width": 64, "height": 64, "sampler_name": "Euler",
             "scheduler": "Automatic"}
    forge = client.post("/sdapi/v1/txt2img", json={
        **a1111, "alwayson_scripts": {"FreeU Integrated": {"args": [True, 1.3, 1.6, 0.9, 0.2]}}})
    assert forge.status_code == 200, forge.text
    info = json.loads(forge.json()["info"])["infotexts"][0]
    assert "freeu_enabled: True, freeu_b1: 1.3, freeu_b2: 1.6, freeu_s1: 0.9, freeu_s2: 0.2" in info
    assert "FreeU version" not in info
    off = client.post("/sdapi/v1/txt2img", json={
        **a1111, "alwayson_scripts": {"freeu integrated": {"args": [False, 1.3, 1.6, 0.9, 0.2]}}})
    plain = client.post("/sdapi/v1/txt2img", json=a1111)
    assert "freeu_enabled" not in json.loads(off.json()["info"])["infotexts"][0]

    def picture(answer):
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0]))).convert("RGB"),
                          dtype=np.int16)

    assert np.array_equal(picture(off), picture(plain))
    assert np.abs(picture(forge) - picture(plain)).max() > 8
    for args, words in (([True, 1.3, 1.6, 0.9, 0.2, 7], "takes 5 args"), ([True, "high"], "b1 must be a number")):
        refused = client.post("/sdapi/v1/txt2img", json={**a1111, "alwayson_scripts": {
            "FreeU Integrated": {"args": args}}})
        assert refused.status_code == 422 and words in refused.text, refused.text


def test_the_sd_webui_freeu_extensions_script_is_one_a1111_has_not_loaded(client):
    """sd-webui-freeu's own always-on script ("FreeU": schedule, per-stage offsets / widths / cutoffs) is not drawn:
    A1111's 422 for a script it has not loaded, not a picture without it."""
    refused = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64,
                                                     "alwayson_scripts": {"FreeU": {"args": [True, 0.0, 1.0, 0.0]}}})
    assert refused.status_code == 422 and "Script 'FreeU' not found" in refused.text, refused.text
