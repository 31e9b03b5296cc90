"""Perturbed-attention guidance through A1111's API: Forge's PerturbedAttentionGuidance Integrated `alwayson_scripts`
args [enabled, scale] draw PAG at that scale (Forge's middle block, no adaptive scale) and record Forge's labels,
which read back as the native API's pag_scale draw the same picture; unticked, the plain picture; bad args a 422."""

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

A1111 = {"prompt": "a pag lighthouse", "steps": 3, "seed": 21, "width": 64, "height": 64, "sampler_name": "Euler",
         "scheduler": "Karras"}


@pytest.fixture
def client(sdlab_server):  # noqa: F811
    with httpx.Client(base_url=sdlab_server.url, timeout=120) as c:
        yield c


def _picture(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"), dtype=np.int16)


def _native(client: httpx.Client, body: dict) -> np.ndarray:
    created = client.post("/api/jobs", json=body)
    assert created.status_code == 202, created.text
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{created.json()['id']}").json()
        if job["status"] in ("done", "failed", "cancelled"):
            assert job["status"] == "done", job
            image = client.get(job["images"][0]).content
            return np.asarray(Image.open(io.BytesIO(image)).convert("RGB"), dtype=np.int16)
        time.sleep(0.05)
    raise AssertionError("the native job did not finish")


def test_forges_pag_integrated_args_draw_the_native_apis_pag(client):
    forge = client.post("/sdapi/v1/txt2img", json={
        **A1111, "alwayson_scripts": {"PerturbedAttentionGuidance Integrated": {"args": [True, 2.5]}}})
    assert forge.status_code == 200, forge.text
    info = json.loads(forge.json()["info"])["infotexts"][0]
    assert "PerturbedAttentionGuidance_enabled: True, PerturbedAttentionGuidance_scale: 2.5" in info
    off = client.post("/sdapi/v1/txt2img", json={
        **A1111, "alwayson_scripts": {"perturbedattentionguidance integrated": {"args": [False, 2.5]}}})
    plain = client.post("/sdapi/v1/txt2img", json=A1111)
    assert "PerturbedAttentionGuidance" not in json.loads(off.json()["info"])["infotexts"][0]
    assert np.array_equal(_picture(off.json()["images"][0]), _picture(plain.json()["images"][0]))
    # the picture's parameters read back (the web UI's Reuse / PNG drop) as a native job draw it again
    settings = client.post("/api/parameters", json={"image": forge.json()["images"][0]}).json()["settings"]
    assert settings["pag_scale"] == 2.5
    from sdlab.server.native import JobIn
    native = _native(client, {key: v for key, v in settings.items() if v is not None and key in JobIn.model_fields
                              and key != "model"})
    drawn = _picture(forge.json()["images"][0])
    assert np.abs(drawn - _picture(plain.json()["images"][0])).max() > 0
    assert np.array_equal(drawn, native)
    for args, words in (([True, 3.0, 1], "takes 2 args"), ([True, "high"], "scale must be a number")):
        refused = client.post("/sdapi/v1/txt2img", json={**A1111, "alwayson_scripts": {
            "PerturbedAttentionGuidance Integrated": {"args": args}}})
        assert refused.status_code == 422 and words in refused.text, refused.text


def test_a_pag_layer_the_loaded_model_lacks_is_a_400_at_submit(client):
    """With the job's model loaded (a job has drawn on it), a PAG layer that selects none of its self-attentions is
    refused when the job is posted (400, naming the layer and the model's transformers), not queued to fail."""
    _native(client, {"prompt": "a pag lighthouse", "steps": 1, "width": 64, "height": 64})    # loads the model
    for layers in (["down_blocks.7"], ["mid", "up_blocks.3"]):
        refused = client.post("/api/jobs", json={"prompt": "x", "steps": 2, "width": 64, "height": 64,
                                                 "pag_scale": 3, "pag_layers": layers})
        assert refused.status_code == 400, refused.text
        assert f"PAG layer {layers[-1]!r} selects no self-attention" in refused.text and "its transformers" in \
            refused.text
    _native(client, {"prompt": "x", "steps": 2, "width": 64, "height": 64, "pag_layers": ["down_blocks.7"]})  # PAG off


@pytest.mark.parametrize("scale", [10**400, float("nan"), float("inf")])
def test_a_pag_scale_no_float_holds_is_a_422(scale):
    """A scale past a float's range (JSON's 10**400) was a 500 (OverflowError), NaN / Infinity a pag_scale the job
    then refused; each is a 422 naming the scale as the request is read."""
    from sdlab.server.alwayson import alwayson_pag
    from sdlab.server.inputs import BadRequest

    with pytest.raises(BadRequest) as refused:
        alwayson_pag({"PerturbedAttentionGuidance Integrated": {"args": [True, scale]}})
    assert refused.value.status == 422 and "scale must be a finite number" in str(refused.value), str(refused.value)
