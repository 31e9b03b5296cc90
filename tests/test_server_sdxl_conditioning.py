"""SDXL's micro-conditioning on the native API: `original_size`, `crops_coords_top_left`, `target_size`, the
negative prompt's and the refiner's aesthetic scores reach the picture as the Python API's same fields do,
are recorded in the job's `request`, and a bad value is a 422 naming the field.

Tiny random SDXL base and refiner files in a --models-dir (tests/bundle_fixtures.py)."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image

import sdlab
from bundle_fixtures import tiny_bundle, write_original
from server_fixtures import run_job, start_server

SETTINGS = {"prompt": "a castle on a hill", "negative_prompt": "fog", "seed": 7, "steps": 4, "cfg_scale": 5.0,
            "sampler": "Euler", "width": 32, "height": 32}
SIZES = {"original_size": [64, 48], "crops_coords_top_left": [8, 4], "target_size": [40, 32],
         "negative_original_size": [24, 32], "negative_crops_coords_top_left": [2, 6], "negative_target_size": [16, 16]}
AESTHETICS = {"aesthetic_score": 9.0, "negative_aesthetic_score": 1.0}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("sdxl-conditioning") / "models"
    folder.mkdir()
    write_original(tiny_bundle("sdxl"), folder / "base.safetensors", junk=False)
    write_original(tiny_bundle("sdxl-refiner", seed=5), folder / "refiner.safetensors", junk=False)
    return folder


@pytest.fixture(scope="module")
def client(models):
    server = start_server(models.parent / "outputs", "--models-dir", str(models),
                          "--model", str(models / "base.safetensors"))
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c
    server.stop()


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _served(client: httpx.Client, body: dict) -> tuple[dict, np.ndarray]:
    job = run_job(client, body)
    assert job["status"] == "done", job
    return job, _pixels(Image.open(io.BytesIO(client.get(job["images"][0]).content)))


def _drawn(models, refiner: bool, **options) -> np.ndarray:
    """The Python API's picture: the base model, with the refiner from half the schedule on where asked."""
    handoff = {"refiner": models / "refiner.safetensors", "refiner_switch": 0.5} if refiner else {}
    pipe = sdlab.load(models / "base.safetensors", **handoff)
    settings = {**SETTINGS, **options}
    return _pixels(pipe.txt2img(settings.pop("prompt"), **settings).images[0])


@pytest.mark.parametrize("fields, refiner", [(SIZES, False), ({**SIZES, **AESTHETICS}, True)],
                         ids=["base", "refiner"])
def test_native_conditioning_equals_the_python_api(client, models, fields, refiner):
    handoff = {"refiner": "refiner", "refiner_switch": 0.5} if refiner else {}
    job, served = _served(client, {**SETTINGS, **handoff, **fields})
    as_tuples = {name: tuple(value) if isinstance(value, list) else value for name, value in fields.items()}
    assert np.abs(served - _drawn(models, refiner, **as_tuples)).max() <= 1
    _, plain = _served(client, {**SETTINGS, **handoff})
    assert not np.array_equal(served, plain)
    assert {name: job["request"][name] for name in fields} == fields, job["request"]


@pytest.mark.parametrize("field, value", [
    ("original_size", [0, 64]), ("crops_coords_top_left", [-1, 0]), ("target_size", [64]),
    ("negative_original_size", [64, 64, 64]), ("negative_crops_coords_top_left", [0, 1.5]),
    ("negative_target_size", [64, "wide"]), ("aesthetic_score", 1e308), ("negative_aesthetic_score", -1000),
    ("crops_coords_top_left", [10**400, 0]), ("original_size", [64, 10**400]),     # past a float: were 500s
    ("negative_target_size", [2**128, 64]),                                         # float32's infinity
])
def test_bad_conditioning_is_a_422_naming_the_field(client, field, value):
    refused = client.post("/api/jobs", json={**SETTINGS, field: value})
    assert refused.status_code == 422 and field in refused.json()["detail"], refused.text
    assert len(refused.json()["detail"]) < 300, refused.text                     # 10**400's digits cut


A1111_OPTIONS = {"sdxl_crop_top": 8, "sdxl_crop_left": 4, "sdxl_refiner_high_aesthetic_score": 9.0,
                 "sdxl_refiner_low_aesthetic_score": 1.0}


def test_a1111s_sdxl_options_condition_the_prompt_and_the_negative_as_a1111s(client):
    """A1111's SDXL options, in a request's `override_settings` (or `POST options`), condition every SDXL pass as
    its `sd_models_xl.get_learned_conditioning` does: `crop_coords_top_left` = [sdxl_crop_top, sdxl_crop_left]
    for the prompt and the negative, `aesthetic_score` = sdxl_refiner_high_aesthetic_score for the prompt and
    sdxl_refiner_low_aesthetic_score for the negative (`is_negative_prompt`); the picture records them."""
    import base64
    import json

    from sdlab.pipeline.infotext import from_parameters
    from sdlab.pipeline.png_info import parse_parameters

    body = {"prompt": SETTINGS["prompt"], "negative_prompt": "fog", "seed": 7, "steps": 4, "cfg_scale": 5.0,
            "sampler_name": "Euler", "width": 32, "height": 32, "refiner_checkpoint": "refiner",
            "refiner_switch_at": 0.5}
    answers = [client.post("/sdapi/v1/txt2img", json={**body, **extra})
               for extra in ({"override_settings": A1111_OPTIONS}, {})]
    assert all(answer.status_code == 200 for answer in answers), [answer.text for answer in answers]
    optioned, plain = (answer.json() for answer in answers)
    pictures = [_pixels(Image.open(io.BytesIO(base64.b64decode(answer["images"][0])))) for answer in (optioned, plain)]
    assert not np.array_equal(*pictures)
    fields = from_parameters(parse_parameters(json.loads(optioned["info"])["infotexts"][0]))
    corner = (A1111_OPTIONS["sdxl_crop_top"], A1111_OPTIONS["sdxl_crop_left"])
    assert (fields["crops_coords_top_left"], fields["negative_crops_coords_top_left"]) == (corner, corner)
    assert (fields["aesthetic_score"], fields["negative_aesthetic_score"]) == (9.0, 1.0)
    assert client.get("/sdapi/v1/options").json()["sdxl_crop_top"] == 0        # restored after the request


@pytest.mark.parametrize("option, value", [("sdxl_crop_top", -1), ("sdxl_crop_left", 1.5), ("sdxl_crop_left", 2**128),
                                           ("sdxl_refiner_high_aesthetic_score", "high"),
                                           ("sdxl_refiner_low_aesthetic_score", 1e308)])
def test_a_bad_a1111_sdxl_option_is_a_422_naming_it(client, option, value):
    refused = client.post("/sdapi/v1/options", json={option: value})
    assert refused.status_code == 422 and option in refused.text, refused.text
