"""DeepCache through the server: the native API's `deep_cache` object (drawn, recorded, its record drawing the same
picture, a bad one a 4xx) and `POST /api/parameters` of a picture giving the setting back. A1111's API has no
DeepCache field: A1111 has none of its own, and its DeepCache extension (sd-webui-deepcache-standalone) reads its
settings from `shared.opts` keys that changed between its versions, with another caching rule than DeepCache's."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
from server_fixtures import drawn_job as _drawn, job_pixels as _pixels, sdlab_server  # noqa: F401

BASE = {"prompt": "a cached house", "steps": 4, "seed": 11, "width": 64, "height": 64, "sampler": "Euler"}


@pytest.fixture
def client(sdlab_server):
    with httpx.Client(base_url=sdlab_server.url, timeout=120) as c:
        yield c


def test_a_native_job_draws_records_and_redraws_deep_cache(client):
    from sdlab.server.native import JobIn

    plain = _drawn(client, BASE)
    job = _drawn(client, {**BASE, "deep_cache": {"interval": 2}})
    assert np.abs(_pixels(client, job) - _pixels(client, plain)).max() > 2
    assert job["request"]["deep_cache"] == {"interval": 2, "branch": 0}      # unset: DeepCache's default branch
    assert "DeepCache interval: 2, DeepCache branch: 0" in job["infotexts"][0]
    assert "DeepCache" not in plain["infotexts"][0]
    body = {key: value for key, value in job["request"].items() if key in JobIn.model_fields and value is not None}
    again = _drawn(client, body)
    assert np.array_equal(_pixels(client, again), _pixels(client, job))
    image = base64.b64encode(client.get(job["images"][0]).content).decode()
    read = client.post("/api/parameters", json={"image": image})
    assert read.status_code == 200, read.text
    assert read.json()["settings"]["deep_cache"] == {"interval": 2, "branch": 0} and read.json()["unread"] == []


@pytest.mark.parametrize("deep_cache, status, words", [
    ({"interval": 2, "depth": 1}, 422, "depth"),
    ({"interval": 2.5}, 422, "interval"),                    # no whole number (2.0 is 2)
    ({"interval": 0}, 400, "DeepCache interval must be a whole number 1..1000"),
    ({"interval": 3, "branch": 99}, 422, "DeepCache branch 99 (level 33, layer 0) is not in this U-Net"),
])
def test_a_bad_native_setting_is_refused(client, deep_cache, status, words):
    refused = client.post("/api/jobs", json={**BASE, "deep_cache": deep_cache})
    assert refused.status_code == status and words in refused.text, refused.text


def test_a_branch_a_model_not_yet_loaded_lacks_is_refused_at_submit(tmp_path_factory):
    """A model not loaded when the job is posted is checked against its U-Net as its checkpoint's header describes
    it (`model_shapes.planned_unet`): a branch it lacks is the same 422 as on a loaded model, nothing queued; a
    branch it has is taken (202) and drawn. The reduced SD1 U-Net has 2 levels of 2 decoder ResBlocks (3 branches a
    level): branch 6 (level 2) is past its last level, branch 4 (level 1, layer 1) its last branch."""
    from server_fixtures import run_job, start_server, write_preset_models

    root = tmp_path_factory.mktemp("deep-cache-server")
    loaded = write_preset_models(root / "models")
    server = start_server(root / "outputs", "--models-dir", str(root / "models"), "--model", str(loaded))
    body = {**BASE, "width": 32, "height": 32, "model": "plain.safetensors"}
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            refused = client.post("/api/jobs", json={**body, "deep_cache": {"interval": 3, "branch": 6}})
            jobs = client.get("/api/jobs").json()
            drawn = run_job(client, {**body, "deep_cache": {"interval": 3, "branch": 4}})
    finally:
        server.stop()
    assert refused.status_code == 422, refused.text
    assert "DeepCache branch 6 (level 2, layer 0) is not in this U-Net" in refused.json()["detail"], refused.text
    assert "Traceback" not in refused.text
    assert not jobs.get("jobs"), jobs
    assert drawn["status"] == "done", drawn
