"""The server refuses at submit what its loaded model cannot draw in the memory free now: both APIs call the same
check (`Service.submit` -> `inputs.check_request` -> `plan.check_passes_fit`, the memory estimate `make_plan` uses),
so the native job and the A1111 request decide alike, one 422 line, nothing queued. The estimate counts a ControlNet
(its file's tensors and the residuals held through the U-Net's call): with the free memory read between the plain
job's estimate and the ControlNet job's, the plain job is taken and the ControlNet one refused. In-process app
(TestClient), the free memory reading replaced."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

BODY = {"prompt": "a red cube", "negative_prompt": "blurry", "steps": 2, "seed": 7, "width": 64, "height": 64,
        "cfg_scale": 5.0}


def _b64_picture() -> str:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    from controlnet_fixtures import diffusers_controlnet, write_layout
    from fastapi.testclient import TestClient
    from server_fixtures import write_preset_models

    from sdlab.server.app import create_app
    from sdlab.server.config import ServerConfig

    root = tmp_path_factory.mktemp("admission-memory")
    models = root / "models"
    write_preset_models(models)
    (models / "ControlNet").mkdir()
    from bundle_fixtures import tiny_bundle

    bundle = tiny_bundle("sd1", seed=3)
    factor = bundle.vae_config.downsample_factor
    net = write_layout(diffusers_controlnet(bundle.unet_config, 3, hint_widths=(16, 32, 96, 256)[: factor.bit_length()],
                                            std=0.05), "diffusers-file", models / "ControlNet")
    net = net.rename(models / "ControlNet" / "tiny_canny.safetensors")
    app = create_app(ServerConfig(output_dir=root / "outputs", model=models / "plain.safetensors",
                                  models_dir=models, controlnet_dir=models / "ControlNet"), preload=True)
    with TestClient(app) as client:
        yield {"client": client, "bundle": bundle, "controlnet": net}


def _estimates(bundle, controlnet) -> tuple[int, int]:
    from sdlab.pipeline.control import ControlInput
    from sdlab.pipeline.memory import estimate_bytes
    from sdlab.pipeline.plan import resolve_for
    from sdlab.pipeline.request import GenerationRequest

    plain = GenerationRequest(BODY["prompt"], BODY["negative_prompt"], steps=2, seed=7, width=64, height=64,
                              cfg_scale=5.0, sampler="Euler")
    picture = Image.new("RGB", (64, 64), "white")
    controlled = GenerationRequest(**{**plain.__dict__, "controls": (ControlInput(str(controlnet), picture),)})
    return (estimate_bytes(bundle, resolve_for(bundle, plain)),
            estimate_bytes(bundle, resolve_for(bundle, controlled)))


def test_both_apis_refuse_at_submit_what_the_memory_estimate_says_cannot_fit(server, monkeypatch):
    from sdlab.pipeline import plan

    client = server["client"]
    plain, controlled = _estimates(server["bundle"], server["controlnet"])
    assert controlled > plain
    monkeypatch.setattr(plan, "available_bytes", lambda device: (plain + controlled) // 2)
    jobs = len(client.get("/api/jobs").json()["jobs"])
    picture = _b64_picture()
    native = client.post("/api/jobs", json={**BODY, "sampler": "Euler", "controls": [
        {"model": "tiny_canny", "image": picture}]})
    a1111 = client.post("/sdapi/v1/txt2img", json={**BODY, "sampler_name": "Euler", "alwayson_scripts": {
        "controlnet": {"args": [{"enabled": True, "module": "none", "model": "tiny_canny", "image": picture}]}}})
    for refused in (native, a1111):
        assert refused.status_code == 422, refused.text
        detail = refused.json()["detail"]
        assert "64x64 x 1 image(s) needs about" in detail and "is free" in detail and "Traceback" not in detail
    assert native.json()["detail"] == a1111.json()["detail"]
    assert len(client.get("/api/jobs").json()["jobs"]) == jobs                  # nothing queued
    taken = client.post("/api/jobs", json={**BODY, "sampler": "Euler"})
    assert taken.status_code == 202, taken.text
    drawn = client.post("/sdapi/v1/txt2img", json={**BODY, "sampler_name": "Euler"})
    assert drawn.status_code == 200, drawn.text
