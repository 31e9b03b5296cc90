"""`sdlab serve` draws a model with the few-step preset its file names (`sdlab.preset`), as `sdlab txt2img`
and `Pipeline.txt2img` do: the settings a client leaves unset come from it, on the native API and on
`/sdapi/v1/txt2img`; the fields given win, and a `preset` in the native body wins over the model's."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import replace

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from bundle_fixtures import tiny_bundle
from sdlab.checkpoints.save import save_bundle
from sdlab.models.unet import UNet
from sdlab.pipeline.request import GenerationRequest
from sdlab.server.inputs import unset_preset_fields, with_preset
from server_fixtures import b64_png, run_job, start_server, write_preset_models

SMALL = {"prompt": "a fox", "seed": 7, "width": 32, "height": 32}
LCM = {"sampler": "LCM", "schedule": "trailing", "steps": 4, "cfg_scale": 1.0}     # presets.py's "lcm" row


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("preset-server")
    models = root / "models"
    distilled = write_preset_models(models)
    save_bundle(_lcm_model(), models / "lcm.safetensors")
    server = start_server(root / "outputs", "--models-dir", str(models), "--model", str(distilled))
    yield server
    server.stop()


def _lcm_model():
    """A tiny LCM-distilled model: a U-Net with a guidance embedding and no preset in its file, which
    loads with the preset "lcm-model"."""
    bundle = tiny_bundle("sd1", seed=3)
    config = replace(bundle.unet_config, time_cond_proj_dim=32)
    unet = UNet(config)
    unet.load_state_dict(bundle.unet.state_dict(), strict=False)
    torch.nn.init.normal_(unet.time_embed.cond_proj.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    return replace(bundle, unet=unet, unet_config=config)


@pytest.fixture
def client(served):
    with httpx.Client(base_url=served.url, timeout=120) as c:
        yield c


def _run(client: httpx.Client, body: dict) -> dict:
    job = run_job(client, body)
    assert job["status"] == "done", job
    return job


def _pixels(client: httpx.Client, job: dict) -> np.ndarray:
    with Image.open(io.BytesIO(client.get(job["images"][0]).content)) as image:
        return np.asarray(image.convert("RGB"))


def _settings(job: dict) -> dict:
    return {key: job["request"][key] for key in LCM}


def test_native_job_takes_the_model_preset_for_what_it_leaves_unset(client):
    job = _run(client, SMALL)
    assert _settings(job) == LCM and job["steps"] == 4
    assert "Steps: 4, Sampler: LCM" in job["infotexts"][0] and "CFG scale: 1," in job["infotexts"][0]
    explicit = _run(client, {**SMALL, **LCM})
    assert np.array_equal(_pixels(client, job), _pixels(client, explicit))

    given = _run(client, {**SMALL, "steps": 2, "cfg_scale": 3.0})         # the fields given win, the rest: preset
    assert _settings(given) == {**LCM, "steps": 2, "cfg_scale": 3.0} and given["steps"] == 2
    assert "Steps: 2, Sampler: LCM" in given["infotexts"][0]
    euler = _run(client, {**SMALL, "sampler": "Euler", "schedule": "automatic"})    # automatic: the model's
    assert _settings(euler) == {**LCM, "sampler": "Euler"}
    karras = _run(client, {**SMALL, "schedule": "Karras"})
    assert _settings(karras) == {**LCM, "schedule": "karras"}


def test_the_preset_of_the_request_wins_over_the_models(client):
    job = _run(client, {**SMALL, "preset": "turbo"})
    assert _settings(job) == {"sampler": "Euler a", "schedule": "trailing", "steps": 1, "cfg_scale": 1.0}
    assert client.post("/api/jobs", json={**SMALL, "preset": "nope"}).status_code == 422


def test_a_model_without_a_preset_keeps_the_defaults(client):
    job = _run(client, {**SMALL, "model": "plain"})
    assert job["request"]["steps"] == 20 and job["request"]["sampler"] != "LCM"


def test_an_lcm_model_draws_with_the_lcm_model_preset(client):
    job = _run(client, {**SMALL, "model": "lcm"})
    assert _settings(job) == {**LCM, "cfg_scale": 8.5}
    explicit = _run(client, {**SMALL, "model": "lcm", **LCM, "cfg_scale": 8.5})
    assert np.array_equal(_pixels(client, job), _pixels(client, explicit))
    assert _run(client, {**SMALL, "model": "lcm", "cfg_scale": 3.0})["request"]["cfg_scale"] == 3.0


def test_img2img_on_an_lcm_model_counts_the_steps_it_runs(client):
    """A full LCM model's img2img is LatentConsistencyModelImg2ImgPipeline's, whose every step runs: the job
    counts (progress, step events) the steps its resolved plan runs, 4, not diffusers' int(4 x 0.5)."""
    job = _run(client, {**SMALL, "model": "lcm", "mode": "img2img", "strength": 0.5,
                        "init_image": b64_png(Image.new("RGB", (32, 32), (90, 20, 200)))})
    assert (job["request"]["img2img_convention"], job["request"]["steps"]) == ("lcm", 4)
    assert job["step"] == job["steps"] == 4


def test_a_queued_job_shows_the_preset_of_the_loaded_model(client):
    """Once the model is loaded its preset is known: a job waiting for it shows the settings it will run with."""
    _run(client, {**SMALL, "model": "lcm"})                                   # the lcm model is loaded now
    busy = client.post("/api/jobs", json={**SMALL, "model": "lcm", "sampler": "Euler", "steps": 150, "width": 128,
                                         "height": 128})
    waiting = client.post("/api/jobs", json={**SMALL, "model": "lcm"})
    assert busy.status_code == waiting.status_code == 202, (busy.text, waiting.text)
    try:
        job = client.get(f"/api/jobs/{waiting.json()['id']}").json()
        assert job["status"] == "queued", job
        assert _settings(job) == {**LCM, "cfg_scale": 8.5}, job
    finally:
        for created in (busy, waiting):
            client.delete(f"/api/jobs/{created.json()['id']}")


def test_a1111_txt2img_takes_the_model_preset_for_what_it_leaves_unset(client):
    def txt2img(body: dict) -> tuple[dict, np.ndarray]:
        answer = client.post("/sdapi/v1/txt2img", json={**SMALL, **body})
        assert answer.status_code == 200, answer.text
        out = answer.json()
        with Image.open(io.BytesIO(base64.b64decode(out["images"][0]))) as image:
            return json.loads(out["info"]), np.asarray(image.convert("RGB"))

    info, pixels = txt2img({})
    assert (info["sampler_name"], info["steps"], info["cfg_scale"]) == ("LCM", 4, 1.0)
    assert info["extra_generation_params"]["Schedule type"] == "trailing"
    assert "Steps: 4, Sampler: LCM" in info["infotexts"][0]
    _, explicit = txt2img({"sampler_name": "LCM", "scheduler": "trailing", "steps": 4, "cfg_scale": 1})
    assert np.array_equal(pixels, explicit)

    info, _ = txt2img({"steps": 2})
    assert (info["sampler_name"], info["steps"], info["cfg_scale"]) == ("LCM", 2, 1.0)
    info, _ = txt2img({"sampler_name": "Euler", "cfg_scale": 2.5})
    assert (info["sampler_name"], info["steps"], info["cfg_scale"]) == ("Euler", 4, 2.5)
    assert info["extra_generation_params"]["Schedule type"] == "trailing"      # unset: the preset's, as in the CLI
    info, _ = txt2img({"sampler_name": "DPM++ 2M Karras"})      # an old combined name gives its schedule
    assert (info["sampler_name"], info["extra_generation_params"]["Schedule type"]) == ("DPM++ 2M", "Karras")


def test_unset_fields_and_filling_them():
    request = GenerationRequest("x", steps=20, sampler="Euler", schedule=None)
    unset = unset_preset_fields({"prompt", "sampler", "schedule"}, request)
    assert unset == {"schedule", "steps", "cfg_scale", "eta"}                # a None counts as unset
    filled = with_preset(request, "tcd", "txt2img", unset)
    # the given sampler keeps its own eta: TCD's (its gamma) is no other sampler's
    assert (filled.sampler, filled.schedule, filled.steps, filled.cfg_scale, filled.eta) == ("Euler", "trailing", 4, 1.0, None)
    assert with_preset(replace(request, sampler=None), "tcd", "txt2img", unset | {"sampler"}).eta == 0.3
    assert with_preset(request, "turbo", "img2img", {"steps"}).steps == 2
