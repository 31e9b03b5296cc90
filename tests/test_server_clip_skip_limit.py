"""A clip skip past the model's text encoder depth is refused at submit (422 naming the encoder's layer count), on
the native and the A1111 routes, whether the model is loaded (its text encoders) or not (the checkpoint's header
planned on the meta device: `model_shapes.planned_bundle`, no weight read); it was queued and failed when it ran.
In-process app (TestClient): the shipped model (CLIP-L of 4 layers) loaded, a reduced-width SD1 file beside it."""

from __future__ import annotations

import time

import pytest

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
