"""FreeU through the server: the native API's `freeu` object (drawn, recorded, its record drawing the same picture,
a bad one a 4xx), A1111's API through Forge's FreeU Integrated `alwayson_scripts` args (ComfyUI's FreeU_V2, as Forge
draws it), and `POST /api/parameters` of a picture giving the setting back."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image
from server_fixtures import drawn_job as _drawn, job_pixels as _pixels, sdlab_server  # noqa: F401

BASE = {"prompt": "a freeu house", "steps": 3, "seed": 11, "width": 64, "height": 64, "sampler": "Euler"}


@pytest.fixture
def client(sdlab_server):
    with httpx.Client(base_url=sdlab_server.url, timeout=120) as c:
        yield c


def test_a_native_job_draws_records_and_redraws_freeu(client):
    from sdlab.server.native import JobIn

    setting = {"b1": 1.3, "b2": 1.6, "s1": 0.9, "s2": 0.2, "version": 1, "convention": "comfyui"}
    plain = _drawn(client, BASE)
    job = _drawn(client, {**BASE, "freeu": setting})
    assert np.abs(_pixels(client, job) - _pixels(client, plain)).max() > 8
    assert job["request"]["freeu"] == {**setting, "start": 0.0, "end": 1.0}     # unset: FreeU's defaults
    assert ("freeu_enabled: True, freeu_b1: 1.3, freeu_b2: 1.6, freeu_s1: 0.9, freeu_s2: 0.2, freeu_start: 0, "
            "freeu_end: 1, FreeU version: 1") in job["infotexts"][0]
    # a step window (Forge's start / end): FreeU on the third of 3 steps only, recorded, its record redrawing it
    windowed = _drawn(client, {**BASE, "freeu": {**setting, "start": 0.5}})
    assert np.abs(_pixels(client, windowed) - _pixels(client, job)).max() > 4
    assert "freeu_start: 0.5, freeu_end: 1" in windowed["infotexts"][0]
    for drawn in (job, windowed):
        body = {key: value for key, value in drawn["request"].items()
                if key in JobIn.model_fields and value is not None}
        again = _drawn(client, body)
        assert np.array_equal(_pixels(client, again), _pixels(client, drawn))
        assert again["infotexts"] == drawn["infotexts"]
        # the picture's parameters give the setting back as the job's
        image = base64.b64encode(client.get(drawn["images"][0]).content).decode()
        read = client.post("/api/parameters", json={"image": image})
        assert read.status_code == 200, read.text
        assert read.json()["settings"]["freeu"] == drawn["request"]["freeu"] and read.json()["unread"] == []


@pytest.mark.parametrize("freeu, status, words", [
    ({"b1": 1.2, "b3": 1.0}, 422, "b3"),
    ({"version": 3}, 400, "FreeU version must be 1 or 2"),
    ({"s2": 99}, 400, "FreeU s2 must lie in [-10, 10]"),
    ({"convention": "forge"}, 400, "unknown FreeU convention 'forge'"),
    ({"version": True}, 422, "version"),                     # not drawn as version 1
    ({"b1": True}, 422, "b1"),
    ({"start": 2}, 400, "FreeU start must lie in [0, 1]"),
    ({"start": 0.9, "end": 0.1}, 400, "FreeU start (0.9) must not come after its end (0.1)"),
])
def test_a_bad_native_setting_is_refused(client, freeu, status, words):
    refused = client.post("/api/jobs", json={**BASE, "freeu": freeu})
    assert refused.status_code == status and words in refused.text, refused.text


def test_forges_freeu_integrated_args_draw_freeu_v2(client):
    """alwayson_scripts {"FreeU Integrated": {"args": [enabled, b1, b2, s1, s2]}} (the script before Forge PR #1689)
    draws ComfyUI's FreeU_V2 (Forge's `opFreeU_V2.patch`) and records Forge's labels; unticked it draws the plain
    picture; today's title with 7 args [enabled, b1, b2, s1, s2, start, end] draws the step window; more args, a
    factor that is not a number or out of range is a 422, as A1111's other script-arg errors."""
    a1111 = {"prompt": BASE["prompt"], "steps": 3, "seed": 11, "width": 64, "height": 64, "sampler_name": "Euler",
             "scheduler": "Automatic"}
    forge = client.post("/sdapi/v1/txt2img", json={
        **a1111, "alwayson_scripts": {"FreeU Integrated": {"args": [True, 1.3, 1.6, 0.9, 0.2]}}})
    assert forge.status_code == 200, forge.text
    info = json.loads(forge.json()["info"])["infotexts"][0]
    assert "freeu_enabled: True, freeu_b1: 1.3, freeu_b2: 1.6, freeu_s1: 0.9, freeu_s2: 0.2, freeu_start: 0, " \
        "freeu_end: 1" in info
    assert "FreeU version" not in info
    today = "FreeU Integrated (SD 1.x, SD 2.x, SDXL)"
    full = client.post("/sdapi/v1/txt2img", json={
        **a1111, "alwayson_scripts": {today: {"args": [True, 1.3, 1.6, 0.9, 0.2, 0.0, 1.0]}}})
    windowed = client.post("/sdapi/v1/txt2img", json={
        **a1111, "alwayson_scripts": {today.lower(): {"args": [True, 1.3, 1.6, 0.9, 0.2, 0.5, 1.0]}}})
    assert full.status_code == 200 and windowed.status_code == 200, (full.text, windowed.text)
    assert "freeu_start: 0.5, freeu_end: 1" in json.loads(windowed.json()["info"])["infotexts"][0]
    off = client.post("/sdapi/v1/txt2img", json={
        **a1111, "alwayson_scripts": {"freeu integrated": {"args": [False, 1.3, 1.6, 0.9, 0.2]}}})
    plain = client.post("/sdapi/v1/txt2img", json=a1111)
    assert "freeu_enabled" not in json.loads(off.json()["info"])["infotexts"][0]

    def picture(answer):
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0]))).convert("RGB"),
                          dtype=np.int16)

    assert np.array_equal(picture(off), picture(plain))
    assert np.abs(picture(forge) - picture(plain)).max() > 8
    assert np.array_equal(picture(full), picture(forge))             # 5 args: the window is every step
    assert np.abs(picture(windowed) - picture(forge)).max() > 4
    for args, words in (([True, 1.3, 1.6, 0.9, 0.2, 0, 1, 7], "takes 7 args"),
                        ([True, "high"], "FreeU b1 must be a finite number"),
                        ([True, 1.3, 1.6, 0.9, 99], "FreeU s2 must lie in [-10, 10]"),
                        ([True, 1.3, 1.6, 0.9, float("nan")], "FreeU s2 must be a finite number"),
                        ([True, 1.3, 1.6, 0.9, 0.2, 0.5, 1.5], "FreeU end must lie in [0, 1]")):
        body = json.dumps({**a1111, "alwayson_scripts": {"FreeU Integrated": {"args": args}}})   # NaN as JSON's NaN
        refused = client.post("/sdapi/v1/txt2img", content=body, headers={"content-type": "application/json"})
        assert refused.status_code == 422 and words in refused.text, refused.text


def test_the_sd_webui_freeu_extensions_settings_sdlab_does_not_draw_are_a_422_naming_them(client):
    """sd-webui-freeu's own always-on script ("FreeU") draws as FreeU's "sd-webui-freeu" convention
    (tests/test_sd_webui_freeu.py); its settings sdlab does not draw (a schedule that leaves steps out, per-stage
    offsets / widths / cutoffs / high-end factors, a third stage) are one 422 naming the setting, not a picture
    without them."""
    body = {"prompt": "x", "steps": 1, "width": 64, "height": 64}
    for args, words in (([True, 1.0, 1.0, 0.0], "start_ratio 1.0"),          # int(1.0 x 1 step): call 1
                        ([True, 0.0, 1.0, 0.0, 1.2, 0.9, 0.25], "stage 1's backbone window (backbone_offset 0.25"),
                        ([{"stage_infos": [{}, {}, {"skip_factor": 0.5}]}], "stage 3's factors")):
        refused = client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"FreeU": {"args": args}}})
        assert refused.status_code == 422 and words in refused.text, refused.text
