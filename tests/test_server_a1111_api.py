"""`sdlab serve`'s A1111 API where it follows A1111 in the small things clients read: old sampler names with
any scheduler, the routes A1111 clients call besides txt2img, the `info` JSON of a hires job, options a
request leaves in place, drawn subseeds, png-info's defaults, the eta label, the Extras defaults and the
error messages and answers of the control routes. The session server runs the shipped model."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
from PIL import Image

from server_fixtures import sdlab_server  # noqa: F401  (a session fixture)
from sdlab.server.inputs import BadRequest, sampler_and_schedule


@pytest.fixture
def client(sdlab_server):
    with httpx.Client(base_url=sdlab_server.url + "/sdapi/v1", timeout=120) as c:
        yield c


def txt2img(client: httpx.Client, **fields) -> tuple[dict, dict]:
    answer = client.post("/txt2img", json={"prompt": "a cat", "steps": 2, "seed": 3, **fields})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    return body, json.loads(body["info"])


# ---------------------------------------------------------------- 1. old sampler names with any scheduler


@pytest.mark.parametrize("name, split", [
    ("DPM++ 2M Karras", ("DPM++ 2M", "karras")),
    ("Euler SGM Uniform", ("Euler", "sgm_uniform")),        # the longest suffix, not "Uniform"
    ("Euler a sgm_uniform", ("Euler a", "sgm_uniform")),
    ("euler a simple", ("Euler a", "simple")),              # any case
    ("DPM++ 2M Uniform", ("DPM++ 2M", "uniform")),
    ("Euler Normal", ("Euler", "normal")),
    ("DPM++ 2M DDIM", ("DPM++ 2M", "ddim_uniform")),
    ("Euler SGMUniform", ("Euler", "sgm_uniform")),         # A1111's alias
    ("DPM++ 2M SDE Exponential", ("DPM++ 2M SDE", "exponential")),
    ("DPM++ 2M SDE", ("DPM++ 2M SDE", None)),               # a sampler's own name is never split
])
def test_old_sampler_names_take_any_a1111_scheduler(name, split):
    assert sampler_and_schedule(name, None) == split


def test_an_explicit_scheduler_wins_over_the_names_suffix():
    assert sampler_and_schedule("Euler SGM Uniform", "karras") == ("Euler", "karras")
    assert sampler_and_schedule("Euler Karras", "Automatic") == ("Euler", None)    # A1111 keeps "Automatic" too
    with pytest.raises(BadRequest) as err:          # an A1111 scheduler sdlab lacks: named as the scheduler
        sampler_and_schedule("Euler Beta", None)
    assert err.value.status == 404 and err.value.detail == "Scheduler not found"
    with pytest.raises(BadRequest) as err:
        sampler_and_schedule("Nope SGM Uniform", None)
    assert err.value.status == 404 and err.value.detail == "Sampler not found"


def test_a_suffixed_sampler_draws_as_sampler_and_scheduler(client):
    joined, info = txt2img(client, sampler_name="Euler a SGM Uniform")
    split, _ = txt2img(client, sampler_name="Euler a", scheduler="sgm_uniform")
    assert joined["images"] == split["images"]
    assert info["sampler_name"] == "Euler a" and info["extra_generation_params"]["Schedule type"] == "SGM Uniform"
