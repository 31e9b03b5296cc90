"""The native API's `batch_count` (A1111's Batch count, its API's `n_iter`) on a real `sdlab serve`: batches of
`batch_size` drawn one after another, the seeds continuing as A1111 numbers them, the same pictures as A1111's
route draws for `n_iter`; the count bounded as A1111's route bounds `n_iter`."""

from __future__ import annotations

import base64
import io
import json
import re

import httpx
import numpy as np
import pytest
from PIL import Image

from server_fixtures import sdlab_server, wait_for_job  # noqa: F401  (fixture)

SETTINGS = dict(prompt="a blue circle", steps=3, cfg_scale=5, width=64, height=64, batch_size=2, seed=4242)


def a1111_seeds(seed: int, subseed: int, subseed_strength: float, count: int) -> tuple[list[int], list[int]]:
    """A1111's seeds of a job's `count` = batch_size x n_iter pictures, transcribed from AUTOMATIC1111/
    stable-diffusion-webui modules/processing.py, `process_images_inner`:
        p.all_seeds = [int(seed) + (x if p.subseed_strength == 0 else 0) for x in range(len(p.all_prompts))]
        p.all_subseeds = [int(subseed) + x for x in range(len(p.all_prompts))]
    and iteration n draws p.all_seeds[n * p.batch_size:(n + 1) * p.batch_size] (likewise the subseeds)."""
    all_seeds = [int(seed) + (x if subseed_strength == 0 else 0) for x in range(count)]
    all_subseeds = [int(subseed) + x for x in range(count)]
    return all_seeds, all_subseeds


def _label(infotext: str, label: str) -> int | None:
    found = re.search(rf"(?:^|, ){label}: (-?\d+)", infotext.split("\n")[-1])
    return None if found is None else int(found.group(1))


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _native(client: httpx.Client, body: dict) -> tuple[dict, list[np.ndarray]]:
    response = client.post("/api/jobs", json=body)
    assert response.status_code == 202, response.text
    job = wait_for_job(client, response.json()["id"])
    assert job["status"] == "done", job
    return job, [_pixels(client.get(url).content) for url in job["images"]]


@pytest.mark.parametrize("variation", [{}, {"subseed": 900, "subseed_strength": 0.4}], ids=["seeds", "subseeds"])
def test_native_batch_count_draws_a1111s_n_iter_pictures_and_seeds(sdlab_server, variation):
    """batch_count 2 x batch_size 2 on `POST /api/jobs` draws the 4 pictures (pixel-equal) and the seeds of
    A1111's route with n_iter 2 / batch_size 2: seed + i, or with a variation seed the seed for every picture
    and subseed + i (A1111's `all_seeds` / `all_subseeds`, `a1111_seeds`)."""
    with httpx.Client(base_url=sdlab_server.url, timeout=180) as client:
        job, native = _native(client, {**SETTINGS, **variation, "sampler": "Euler", "schedule": "karras",
                                       "batch_count": 2})
        response = client.post("/sdapi/v1/txt2img", json={**SETTINGS, **variation, "sampler_name": "Euler",
                                                          "scheduler": "Karras", "n_iter": 2})
    assert response.status_code == 200, response.text
    answer = response.json()
    info = json.loads(answer["info"])
    a1111 = [_pixels(base64.b64decode(image)) for image in answer["images"]]
    assert len(native) == len(a1111) == 4 and job["request"]["batch_count"] == 2
    for mine, theirs in zip(native, a1111):
        assert np.array_equal(mine, theirs)
    assert not np.array_equal(native[0], native[2]), "the second batch draws other seeds"
    seeds, subseeds = a1111_seeds(SETTINGS["seed"], variation.get("subseed", -1), variation.get("subseed_strength", 0),
                                  4)
    assert info["all_seeds"] == seeds and [_label(t, "Seed") for t in job["infotexts"]] == seeds
    if variation:
        assert info["all_subseeds"] == subseeds
        assert [_label(t, "Variation seed") for t in job["infotexts"]] == subseeds
    assert job["infotexts"] == info["infotexts"]
    assert job["steps"] == 2 * SETTINGS["steps"] and job["step"] == job["steps"]


def test_batch_count_is_bounded_as_n_iter(sdlab_server):
    """0 and past 1000 batches are a 422 naming batch_count, as n_iter's on A1111's route; batch_size x
    batch_count past --max-images (100) a 400 naming both, before any job is queued."""
    with httpx.Client(base_url=sdlab_server.url, timeout=60) as client:
        before = len(client.get("/api/jobs").json()["jobs"])
        for count in (0, -1, 1001):
            response = client.post("/api/jobs", json={**SETTINGS, "batch_count": count})
            assert response.status_code == 422 and f"batch_count must be 1..1000, got {count}" in response.text
        response = client.post("/api/jobs", json={**SETTINGS, "batch_size": 2, "batch_count": 51})
        assert response.status_code == 400 and "batch_size 2 x batch_count 51" in response.text, response.text
        assert len(client.get("/api/jobs").json()["jobs"]) == before
