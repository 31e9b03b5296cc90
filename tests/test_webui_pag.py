"""Perturbed-attention guidance through the server and the web UI (real headless chromium, test_webui.py's fixtures):
the native API's pag_* fields, the form's PAG scale box, and a dropped PAG picture (sdlab's own labels, Forge's)
drawing what `sdlab txt2img --from-png` draws of it."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from test_webui import (  # noqa: F401  (fixtures: base_url, browser, page; the session's sdlab_server)
    By, base_url, browser, drop_file, http_bytes, http_json, page, png_with_parameters, sdlab_server, set_value, text,
    value, wait, wait_job,
)
from test_webui_from_png import _from_png

PICTURES = {
    "sdlab-pag.png": "a red cube\nSteps: 4, Sampler: Euler, Schedule type: Karras, CFG scale: 5, Seed: 3, Size: 64x64, "
                     "PerturbedAttentionGuidance_enabled: True, PerturbedAttentionGuidance_scale: 3, "
                     'PAG adaptive scale: 0.002, PAG layers: "[\\"mid\\", \\"up_blocks.0\\"]", Version: sdlab 0.1.0',
    # Forge's built-in PerturbedAttentionGuidance script: its middle block, no adaptive scale
    "forge-pag.png": "a blue ball\nSteps: 4, Sampler: Euler, Schedule type: Automatic, CFG scale: 4, Seed: 8, "
                     "Size: 64x64, PerturbedAttentionGuidance_enabled: True, PerturbedAttentionGuidance_scale: 2.5, "
                     "Version: f2.0.1v1.10.1-previous-313-g8a042934",
}


def _new_job(page, base_url) -> dict:
    before = {job["id"] for job in http_json(base_url, "/api/jobs")["jobs"]}
    page.find_element(By.ID, "generate").click()
    queued = wait(page, lambda d: [j for j in http_json(base_url, "/api/jobs")["jobs"] if j["id"] not in before]
                  or text(d, "error"), 20, "the form queued no job")
    assert isinstance(queued, list), queued
    return wait_job(base_url, queued[0]["id"])


@pytest.mark.parametrize("name", PICTURES)
def test_a_dropped_pag_picture_draws_what_from_png_draws(page, base_url, tmp_path, monkeypatch, name):
    picture = tmp_path / name
    picture.write_bytes(png_with_parameters(PICTURES[name]))
    drop_file(page, picture.read_bytes(), name)
    wait(page, lambda d: text(d, "notice") == f"Settings read from {name}", 20, "the PNG was not read cleanly")
    assert value(page, "pag_scale") == {"sdlab-pag.png": "3", "forge-pag.png": "2.5"}[name]
    job = _new_job(page, base_url)
    assert job["status"] == "done", job
    cli = _from_png(picture, tmp_path / "from-png.png", monkeypatch)
    web = {key: value for key, value in job["request"].items() if key not in ("mode", "model", "loras")}
    assert web == cli
    assert cli["pag_scale"] > 0
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(http_bytes(base_url, job["images"][0])))),
                          np.asarray(Image.open(tmp_path / "from-png.png")))


def test_the_pag_scale_box_draws_what_the_native_api_draws(page, base_url):
    set_value(page, "prompt", "a green tree")
    for box, number in (("steps", "3"), ("seed", "5"), ("width", "64"), ("height", "64"), ("pag_scale", "3")):
        set_value(page, box, number)
    job = _new_job(page, base_url)
    assert job["status"] == "done", job
    assert (job["request"]["pag_scale"], job["request"]["pag_layers"]) == (3.0, ["mid"])
    assert "PerturbedAttentionGuidance_scale: 3" in job["infotexts"][0]
    api = wait_job(base_url, http_json(base_url, "/api/jobs", {
        "prompt": "a green tree", "steps": 3, "seed": 5, "width": 64, "height": 64, "pag_scale": 3})["id"])
    plain = wait_job(base_url, http_json(base_url, "/api/jobs", {
        "prompt": "a green tree", "steps": 3, "seed": 5, "width": 64, "height": 64})["id"])
    drawn = [np.asarray(Image.open(io.BytesIO(http_bytes(base_url, j["images"][0]))), dtype=np.int16)
             for j in (job, api, plain)]
    assert np.array_equal(drawn[0], drawn[1])
    assert np.abs(drawn[0] - drawn[2]).max() > 0                    # PAG changed the picture


def test_the_native_api_refuses_a_bad_pag_layer(base_url):
    from urllib.error import HTTPError

    with pytest.raises(HTTPError) as refused:
        http_json(base_url, "/api/jobs", {"prompt": "x", "steps": 2, "pag_scale": 3, "pag_layers": ["mid("]})
    assert refused.value.code == 400
    assert "not a regular expression" in refused.value.read().decode()
