"""A clip skip past the model's text encoder depth is refused at submit (422 naming the encoder's layer count), on
the native and the A1111 routes, whether the model is loaded (its text encoders) or not (the checkpoint's header
planned on the meta device: `model_shapes.planned_bundle`, no weight read); it was queued and failed when it ran.
In-process app (TestClient): the shipped model (CLIP-L of 4 layers) loaded, a reduced-width SD1 file beside it."""

from __future__ import annotations

import base64
import io
import json
import time

import pytest
from PIL import Image

from sdlab.pipeline.png_info import parse_parameters
from server_fixtures import tiny_models_client

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

BODY = {"prompt": "a harbour", "seed": 2, "steps": 2, "width": 32, "height": 32}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    from bundle_fixtures import tiny_bundle
    from fastapi.testclient import TestClient

    from sdlab.checkpoints.save import save_bundle
    from sdlab.server.app import create_app
    from sdlab.server.config import ServerConfig

    root = tmp_path_factory.mktemp("clip-skip")
    models = root / "models"
    models.mkdir()
    bundle = tiny_bundle("sd1", seed=4)
    save_bundle(bundle, models / "other.safetensors")
    app = create_app(ServerConfig(output_dir=root / "outputs", models_dir=models), preload=True)
    with TestClient(app) as client:
        service = app.state.service
        deadline = time.monotonic() + 60
        while service.host.loaded_bundle(service.host.selected) is None:    # the shipped model, preloaded
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield client, service, bundle.text_encoders[0].model.cfg.layers


def _too_large(skip: int, layers: int) -> str:
    return (f"clip skip {skip} is too large for this model: clip_skip={skip} leaves no layer of clip_l "
            f"({layers} layers, 'last' hidden state)")


def _done(client, body: dict) -> dict:
    answer = client.post("/api/jobs", json=body)
    assert answer.status_code == 202, answer.text
    while (job := client.get(f"/api/jobs/{answer.json()['id']}").json())["status"] in ("queued", "running"):
        time.sleep(0.02)
    return job


def test_the_loaded_models_depth_bounds_the_clip_skip(server):
    client, _, _ = server
    answer = client.post("/api/jobs", json={**BODY, "clip_skip": 99})
    assert answer.status_code == 422 and answer.json()["detail"] == _too_large(99, 4)
    assert client.post("/api/jobs", json={**BODY, "clip_skip": 5}).json()["detail"] == _too_large(5, 4)
    assert _done(client, {**BODY, "clip_skip": 4})["status"] == "done"        # the first layer alone: drawn


def test_a_model_not_loaded_is_checked_from_its_header(server):
    client, service, layers = server
    other = service.checkpoint("other")
    answer = client.post("/api/jobs", json={**BODY, "model": "other", "clip_skip": layers + 1})
    assert answer.status_code == 422 and answer.json()["detail"] == _too_large(layers + 1, layers)
    assert service.host.loaded_bundle(other) is None                        # refused without loading it


def test_the_a1111_routes_refuse_it_too(server):
    client, _, layers = server
    for model in (None, "other"):
        settings = {"CLIP_stop_at_last_layers": 99, **({"sd_model_checkpoint": model} if model else {})}
        answer = client.post("/sdapi/v1/txt2img", json={**BODY, "override_settings": settings})
        assert answer.status_code == 422, answer.text
        assert _too_large(99, 4 if model is None else layers) in answer.text


@pytest.fixture(scope="module")
def sd2_sdxl_server(tmp_path_factory: pytest.TempPathFactory):
    families = ("sd2", "sdxl", "sdxl-refiner")
    with tiny_models_client(tmp_path_factory.mktemp("clip-skip-a1111"), families, seed=5) as client:
        yield client, client.app.state.service


@pytest.mark.parametrize("model", ["sd2", "sdxl", "sdxl-refiner"])
def test_a1111s_clip_skip_is_ignored_on_sd2_sdxl_and_a_refiner_at_submit_as_when_drawn(sd2_sdxl_server, model):
    """A1111 moves only SD1's encoder back (`plan.encoder_clip_skips`): its clip skip on SD2 / SDXL / a refiner draws
    the clip skip 1 picture, so the submit check does not refuse it for the encoders' depth (checked against the
    header while the model is not loaded, against the loaded encoders after). A1111 still records it, in the
    pictures (`create_infotext`: "Clip skip": None if clip_skip <= 1 else clip_skip) and in `info.clip_skip`
    (`Processed.clip_skip = opts.CLIP_stop_at_last_layers`)."""
    client, service = sd2_sdxl_server
    depth = max(encoder.model.cfg.layers for encoder in service_bundle_encoders(model))
    body = {**BODY, "width": 64, "height": 64, "override_settings": {"sd_model_checkpoint": model}}
    reference = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {
        "sd_model_checkpoint": model, "CLIP_stop_at_last_layers": 1}})
    assert reference.status_code == 200, reference.text
    assert "Clip skip" not in json.loads(reference.json()["info"])["infotexts"][0]
    for skip in (2, 3, 12, depth + 1):
        settings = {"sd_model_checkpoint": model, "CLIP_stop_at_last_layers": skip}
        answer = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": settings})
        assert answer.status_code == 200, (skip, answer.text)
        assert _pixels(answer.json()["images"][0]) == _pixels(reference.json()["images"][0])
        info = json.loads(answer.json()["info"])
        assert info["clip_skip"] == skip
        assert f"Clip skip: {skip}, " in info["infotexts"][0]
        picture = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0])))
        assert parse_parameters(picture.info["parameters"])["Clip skip"] == skip      # the PNG's text
    other = "sd2" if model != "sd2" else "sdxl"
    client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_model_checkpoint": other}})
    assert service.host.loaded_bundle(service.checkpoint(model)) is None      # the header's check now
    native = {**BODY, "width": 64, "height": 64, "model": model, "clip_skip": 12, "clip_skip_convention": "a1111"}
    answer = client.post("/api/jobs", json=native)
    assert answer.status_code == 202, answer.text
    native_diffusers = client.post("/api/jobs", json={**native, "clip_skip_convention": "diffusers"})
    assert native_diffusers.status_code == 422                              # its own rule still checked


def _pixels(b64: str) -> bytes:
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB").tobytes()


def service_bundle_encoders(model: str):
    from bundle_fixtures import tiny_bundle

    return tiny_bundle(model, seed=5).text_encoders
