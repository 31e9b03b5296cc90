"""`sdlab serve` over HTTP: every route's status codes and shapes, the job lifecycle with its events,
cancellation between steps, the bounded queue, and bad input that gets a clean 4xx while the server
keeps serving. One real server process for the module (server_fixtures.sdlab_server)."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from sdlab.api import shipped_model_path
from sdlab.pipeline.png_info import model_hash
from server_fixtures import b64_png, picture, sdlab_server  # noqa: F401  (sdlab_server: a fixture)

FINAL = ("done", "failed", "cancelled", "interrupted")
LONG = {"prompt": "a slow one", "steps": 150, "width": 64, "height": 64}


@pytest.fixture
def client(sdlab_server):
    with httpx.Client(base_url=sdlab_server.url, timeout=120) as c:
        yield c


def wait(client: httpx.Client, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["status"] in FINAL:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def wait_running(client: httpx.Client, job_id: str, min_step: int = 1) -> dict:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["status"] == "running" and job["step"] >= min_step or job["status"] in FINAL:
            return job
        time.sleep(0.02)
    raise AssertionError("the job never started")


def events(client: httpx.Client, job_id: str) -> list[tuple[str, dict]]:
    out, name = [], None
    with client.stream("GET", f"/api/jobs/{job_id}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                out.append((name, json.loads(line[6:])))
    return out


def test_index_and_static_files(client):
    index = client.get("/")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert client.get("/static/index.html").status_code == 200
    assert client.get("/static/../../../etc/passwd").status_code == 404
    assert client.get("/static/%2e%2e/%2e%2e/app.py").status_code == 404


def test_model_and_name_lists(client):
    models = client.get("/sdapi/v1/sd-models").json()
    shipped = shipped_model_path()
    entry = models[0]
    assert set(entry) >= {"title", "model_name", "hash", "sha256", "filename"}
    assert entry["hash"] == model_hash(shipped) and entry["sha256"].startswith(entry["hash"]) and len(entry["sha256"]) == 64
    assert entry["title"] == f"{shipped.name} [{entry['hash']}]" and entry["model_name"] == shipped.stem
    samplers = client.get("/sdapi/v1/samplers").json()
    assert {"Euler a", "DPM++ 2M", "DDIM"} <= {s["name"] for s in samplers}
    assert all(set(s) == {"name", "aliases", "options"} for s in samplers)
    schedulers = client.get("/sdapi/v1/schedulers").json()
    assert {"automatic", "karras", "exponential", "sgm_uniform"} <= {s["name"] for s in schedulers}
    assert all(set(s) >= {"name", "label", "aliases"} for s in schedulers)
    for path in ("loras", "sd-vae", "upscalers", "latent-upscale-modes"):
        response = client.get(f"/sdapi/v1/{path}")
        assert response.status_code == 200 and isinstance(response.json(), list)
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == entry["title"] and options["sd_checkpoint_hash"] == entry["sha256"]
    assert client.post("/sdapi/v1/refresh-checkpoints").status_code == 200
    assert client.post("/sdapi/v1/refresh-loras").status_code == 200
    assert client.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
    assert "x/y/z plot" in client.get("/sdapi/v1/scripts").json()["txt2img"]
    assert client.get("/sdapi/v1/progress").json()["state"]["job_count"] >= 0


def test_a1111_txt2img_shape_and_parameters_chunk(client):
    body = {"prompt": "a red heart", "steps": 3, "seed": 5, "width": 64, "height": 64, "batch_size": 2,
            "sampler_name": "Euler a", "scheduler": "karras", "restore_faces": False, "styles": []}
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert set(result) == {"images", "parameters", "info"} and len(result["images"]) == 2
    info = json.loads(result["info"])
    assert info["seed"] == 5 and info["all_seeds"] == [5, 6] and info["sampler_name"] == "Euler a"
    assert result["parameters"]["prompt"] == "a red heart"
    image = Image.open(io.BytesIO(base64.b64decode(result["images"][1])))
    assert image.size == (64, 64)
    text = image.info["parameters"]
    assert text == info["infotexts"][1]
    assert "Seed: 6" in text and "Sampler: Euler a" in text and "Schedule type: Karras" in text
    assert "Model hash: " + model_hash(shipped_model_path()) in text
    info_back = client.post("/sdapi/v1/png-info", json={"image": result["images"][0]}).json()
    assert info_back["info"] == info["infotexts"][0] and info_back["parameters"]["Seed"] == 5


def test_a1111_img2img_and_inpaint(client):
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    common = {"prompt": "a pear", "steps": 4, "seed": 1, "denoising_strength": 0.6, "init_images": [b64_png(init)]}
    plain = client.post("/sdapi/v1/img2img", json=common)
    assert plain.status_code == 200, plain.text
    assert json.loads(plain.json()["info"])["denoising_strength"] == 0.6
    painted = client.post("/sdapi/v1/img2img", json={**common, "mask": b64_png(mask), "mask_blur": 0})
    assert painted.status_code == 200, painted.text
    drawn = np.asarray(picture(painted.json()["images"][0]))
    assert (drawn[:8, :8] == (200, 30, 30)).all()          # outside the mask: the original, pasted back
    assert client.post("/sdapi/v1/img2img", json={"prompt": "x"}).status_code == 422


@pytest.mark.parametrize("body, label", [
    ({}, "Uniform"),                                                    # A1111's default sampler, Euler
    ({"sampler_name": "DPM++ 2M SDE"}, "Exponential"),
    ({"sampler_name": "DPM++ 2M", "scheduler": "Automatic"}, "Karras"),
    ({"sampler_name": "Euler", "scheduler": "sgm_uniform"}, "SGM Uniform"),
    ({"sampler_name": "DDIM", "scheduler": "karras"}, "DDIM"),          # A1111's timestep samplers ignore it
])
def test_a1111_automatic_scheduler_is_the_samplers_own(client, body, label):
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, **body})
    assert response.status_code == 200, response.text
    assert f"Schedule type: {label}," in json.loads(response.json()["info"])["infotexts"][0]


def test_a1111_unknown_sampler_and_scheduler(client):
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "Nope"})
    assert response.status_code == 404
    assert response.json()["detail"] == "Sampler not found" and "valid names" in response.json()["errors"]
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "scheduler": "karras_exponential"})
    assert response.status_code == 404 and response.json()["detail"] == "Scheduler not found"
    response = client.post("/api/jobs", json={"prompt": "x", "sampler": "Nope"})
    assert response.status_code == 400 and "unknown sampler" in response.json()["detail"]
    response = client.post("/api/jobs", json={"prompt": "x", "schedule": "nope"})
    assert response.status_code == 400 and "unknown scheduler 'nope'" in response.json()["detail"]


def test_native_api_takes_the_names_the_lists_give(client):
    """The UI fills its pickers from /sdapi/v1/samplers and /schedulers: every name there works in a job."""
    for schedule, resolved in (("Karras", "karras"), ("automatic", "sgm_uniform"), ("DDIM", "ddim_uniform")):
        job = wait(client, client.post("/api/jobs", json={"prompt": "x", "steps": 2, "schedule": schedule,
                                                          "sampler": "euler_ancestral"}).json()["id"])
        assert job["status"] == "done" and job["request"]["schedule"] == resolved
        assert job["request"]["sampler"] == "Euler a"


def test_native_job_lifecycle_and_events(client, sdlab_server):
    created = client.post("/api/jobs", json={"prompt": "a blue square", "steps": 5, "seed": 11, "batch_size": 2,
                                             "sampler": "Euler", "schedule": "normal"})
    assert created.status_code == 202, created.text
    body = created.json()
    assert body["status"] == "queued" and isinstance(body["position"], int)
    stream = events(client, body["id"])
    names = [name for name, _ in stream]
    assert names[0] in ("queued", "started") and names[-1] == "done"
    steps = [data for name, data in stream if name == "step"]
    assert steps and steps[-1]["n"] == 5
    preview = Image.open(io.BytesIO(base64.b64decode(steps[-1]["preview"].split(",", 1)[1])))
    assert preview.format == "JPEG"
    done = stream[-1][1]
    assert done["seeds"] == [11, 12] and done["subseeds"] == [] and len(done["images"]) == 2 and len(done["infotexts"]) == 2

    job = client.get(f"/api/jobs/{body['id']}").json()
    assert set(job) >= {"id", "status", "mode", "request", "images", "infotexts", "error", "created", "started",
                        "finished", "step", "steps"}
    assert job["status"] == "done" and job["mode"] == "txt2img" and job["step"] == job["steps"] == 5
    assert job["request"]["seed"] == 11 and job["request"]["sampler"] == "Euler" and job["request"]["width"] == 64
    assert job["created"] <= job["started"] <= job["finished"]
    picture = client.get(job["images"][0])
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(picture.content)).info["parameters"] == job["infotexts"][0]
    assert client.get("/api/jobs").json()["jobs"][0]["id"] == body["id"]
    replay = events(client, body["id"])                          # a finished job: its last event, then the end
    assert [name for name, _ in replay] == ["done"]


def test_done_event_lists_the_seeds_a_variation_batch_drew_with(client):
    """With a variation seed every picture keeps `seed` and the subseeds count up (GenerationRequest.seeds),
    in the live event and in the one a finished job's stream replays from the store."""
    body = {"prompt": "v", "steps": 2, "seed": 40, "batch_size": 3, "subseed": 7, "subseed_strength": 0.3}
    job_id = client.post("/api/jobs", json=body).json()["id"]
    live = events(client, job_id)[-1]
    replayed = events(client, job_id)[-1]
    assert live == replayed and live[0] == "done"
    done = live[1]
    assert done["seeds"] == [40, 40, 40] and done["subseeds"] == [7, 8, 9]
    assert all("Seed: 40," in text and f"Variation seed: {7 + i}," in text for i, text in enumerate(done["infotexts"]))


def test_jobs_without_steps_take_the_model_familys_default(client):
    """An unset step count is the loaded model's (sdlab-tiny: 14), on both APIs, and the job reports it."""
    from sdlab.families.sdlab_tiny import SDLAB_TINY

    native = wait(client, client.post("/api/jobs", json={"prompt": "a red circle", "seed": 3}).json()["id"])
    assert native["status"] == "done" and native["step"] == native["steps"] == SDLAB_TINY.default_steps
    assert native["request"]["steps"] == SDLAB_TINY.default_steps
    assert f"Steps: {SDLAB_TINY.default_steps}," in native["infotexts"][0]
    a1111 = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "seed": 3})
    assert a1111.status_code == 200 and json.loads(a1111.json()["info"])["steps"] == SDLAB_TINY.default_steps


def test_native_img2img_and_inpaint(client):
    init = Image.new("RGB", (64, 64), (20, 160, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    for mode, extra in (("img2img", {}), ("inpaint", {"mask_image": "data:image/png;base64," + b64_png(mask)})):
        created = client.post("/api/jobs", json={"mode": mode, "prompt": "grass", "steps": 4, "strength": 0.5,
                                                 "init_image": b64_png(init), **extra})
        assert created.status_code == 202, created.text
        job = wait(client, created.json()["id"])
        assert job["status"] == "done" and job["mode"] == mode and job["request"]["strength"] == 0.5
    assert client.post("/api/jobs", json={"mode": "img2img", "prompt": "x"}).status_code == 422


@pytest.mark.parametrize("mode", ["txt2img", "img2img"])
def test_a_jobs_record_draws_it_again_a_comfyui_spelt_one_too(client, mode):
    """A ComfyUI-spelt sampler draws under ComfyUI's conventions and is recorded under A1111's name with them
    (ENSD 1, ComfyUI's initial noise and img2img steps); the native API takes them back, so the record alone
    (every field of it the API has, the init picture aside) draws the same picture."""
    from sdlab.server.native import JobIn

    extra = {"mode": "img2img", "strength": 0.5, "init_image": b64_png(Image.new("RGB", (64, 64), (20, 160, 40)))}
    first = wait(client, client.post("/api/jobs", json={"prompt": "a redraw", "steps": 3, "seed": 5,
                                                        "sampler": "euler_ancestral",
                                                        **(extra if mode == "img2img" else {})}).json()["id"])
    record = first["request"]
    assert (record["sampler"], record["eta_noise_seed_delta"], record["init_noise"], record["img2img_convention"]) == \
        ("Euler a", 1, "comfyui", "comfyui")
    body = {key: value for key, value in record.items() if key in JobIn.model_fields and value is not None}
    body.update(extra if mode == "img2img" else {})
    created = client.post("/api/jobs", json=body)
    assert created.status_code == 202, created.text
    again = wait(client, created.json()["id"])
    pictures = [np.asarray(Image.open(io.BytesIO(client.get(job["images"][0]).content))) for job in (first, again)]
    assert np.array_equal(*pictures) and again["infotexts"] == first["infotexts"]
    for field, bad in (("eta_noise_seed_delta", -1), ("init_noise", "loud"), ("img2img_convention", "sideways")):
        refused = client.post("/api/jobs", json={**body, field: bad})
        assert refused.status_code == 400 and ("ENSD" if field == "eta_noise_seed_delta" else repr(bad)) in \
            refused.json()["detail"], refused.text


def test_a_jobs_record_of_churn_and_schedule_overrides_draws_it_again(client):
    """The native API takes k-diffusion's churn and noise scale and A1111's schedule overrides, draws with them
    and records them, so the record alone draws the same picture; bad values are a 400 naming the field."""
    from sdlab.server.native import JobIn

    sigma = {"s_churn": 0.8, "s_tmin": 0.2, "s_tmax": 9.0, "s_noise": 0.9, "schedule_sigma_min": 0.1,
             "schedule_sigma_max": 8.0, "schedule_rho": 3.0, "discard_penultimate_sigma": True}
    asked = {"prompt": "a churned one", "steps": 4, "seed": 8, "sampler": "Euler", "schedule": "karras"}
    first = wait(client, client.post("/api/jobs", json={**asked, **sigma}).json()["id"])
    plain = wait(client, client.post("/api/jobs", json=asked).json()["id"])
    assert first["status"] == "done" and {key: first["request"][key] for key in sigma} == sigma
    for label in ("Sigma churn: 0.8", "Sigma tmin: 0.2", "Sigma tmax: 9", "Sigma noise: 0.9",
                  "Schedule min sigma: 0.1", "Schedule max sigma: 8", "Schedule rho: 3",
                  "Discard penultimate sigma: True"):
        assert label in first["infotexts"][0], (label, first["infotexts"][0])
    body = {key: value for key, value in first["request"].items() if key in JobIn.model_fields and value is not None}
    again = wait(client, client.post("/api/jobs", json=body).json()["id"])
    pictures = [np.asarray(Image.open(io.BytesIO(client.get(job["images"][0]).content)), dtype=np.int16)
                for job in (first, again, plain)]
    assert np.array_equal(pictures[0], pictures[1]) and again["infotexts"] == first["infotexts"]
    assert np.abs(pictures[0] - pictures[2]).max() > 0
    for field, bad in (("s_churn", -1), ("s_tmax", -2), ("schedule_rho", -3)):
        refused = client.post("/api/jobs", json={**body, field: bad})
        assert refused.status_code == 400 and field in refused.json()["detail"], refused.text


def test_cancel_running_job_stops_within_a_step_and_writes_nothing(client, sdlab_server):
    job_id = client.post("/api/jobs", json=LONG).json()["id"]
    running = wait_running(client, job_id, min_step=2)
    assert client.delete(f"/api/jobs/{job_id}").json()["id"] == job_id
    step_at_cancel = client.get(f"/api/jobs/{job_id}").json()["step"]
    job = wait(client, job_id)
    assert running["status"] == "running" and job["status"] == "cancelled"
    assert job["step"] <= step_at_cancel + 1 and job["step"] < job["steps"] and job["images"] == []
    assert not list((sdlab_server.output_dir / "images").glob(f"{job_id}*"))
    assert [name for name, _ in events(client, job_id)] == ["cancelled"]


def test_cancel_queued_job_and_full_queue_429(client):
    running = client.post("/api/jobs", json=LONG).json()["id"]
    wait_running(client, running)
    queued = [client.post("/api/jobs", json=LONG) for _ in range(4)]           # --max-queue 4
    assert [r.status_code for r in queued] == [202] * 4
    assert [r.json()["position"] for r in queued] == [0, 1, 2, 3]
    full = client.post("/api/jobs", json=LONG)
    assert full.status_code == 429 and "max-queue" in full.json()["detail"]
    assert client.post("/sdapi/v1/txt2img", json={"prompt": "x"}).status_code == 429
    progress = client.get("/sdapi/v1/progress").json()
    assert progress["state"]["job_count"] == 1 and progress["state"]["sampling_steps"] == 150   # the running job's batch
    assert 0 < progress["progress"] <= 1
    cancelled = client.delete(f"/api/jobs/{queued[0].json()['id']}").json()
    assert cancelled["status"] == "cancelled"
    for job_id in [running] + [r.json()["id"] for r in queued[1:]]:
        client.delete(f"/api/jobs/{job_id}")
    assert all(wait(client, r.json()["id"])["status"] == "cancelled" for r in queued)
    assert client.get(f"/api/jobs/{queued[0].json()['id']}").json()["started"] is None


def test_progress_preview_and_interrupt(client):
    job_id = client.post("/api/jobs", json=LONG).json()["id"]
    wait_running(client, job_id, min_step=10)       # A1111's show_progress_every_n_steps: a preview from step 10
    progress = client.get("/sdapi/v1/progress").json()
    assert set(progress) >= {"progress", "eta_relative", "state", "current_image", "textinfo"}
    assert set(progress["state"]) >= {"job_count", "sampling_step", "sampling_steps", "interrupted", "skipped"}
    preview = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
    assert preview.size[0] >= 8 and preview.format == "PNG"          # A1111's samples_format, png by default
    assert client.post("/sdapi/v1/interrupt").status_code == 200
    interrupted = wait(client, job_id)                                      # its picture as far as it got
    assert interrupted["status"] == "cancelled" and len(interrupted["images"]) == 1, interrupted
    assert client.post("/sdapi/v1/interrupt").status_code == 200            # nothing running: still fine
    job_id = client.post("/api/jobs", json=LONG).json()["id"]
    wait_running(client, job_id)
    assert client.post("/sdapi/v1/skip").status_code == 200                 # its one batch ends as far as it got
    skipped = wait(client, job_id)
    assert skipped["status"] == "done" and len(skipped["images"]) == 1, skipped


BAD_REQUESTS = [
    ("POST", "/api/jobs", {"content": b"{not json", "headers": {"content-type": "application/json"}}),
    ("POST", "/api/jobs", {"json": {"prompt": "x", "steps": "many"}}),
    ("POST", "/api/jobs", {"json": {"prompt": 5}}),
    ("POST", "/api/jobs", {"json": {"prompt": "x", "width": 100000, "height": 100000}}),
    ("POST", "/api/jobs", {"json": {"prompt": "x", "steps": 100000}}),
    ("POST", "/api/jobs", {"json": {"prompt": "x", "batch_size": 1000}}),
    ("POST", "/api/jobs", {"json": {"prompt": "x", "cfg_scale": 1e308}}),
    ("POST", "/api/jobs", {"json": {"prompt": "x", "width": 3}}),
    ("POST", "/api/jobs", {"json": {"mode": "img2img", "prompt": "x", "init_image": "!!not base64!!"}}),
    ("POST", "/api/jobs", {"json": {"mode": "img2img", "prompt": "x", "init_image": base64.b64encode(b"no image").decode()}}),
    ("POST", "/api/jobs", {"json": {"prompt": "x", "model": "../../etc/passwd"}}),
    ("POST", "/api/jobs", {"json": {"prompt": "x <lora:../../secret:1>"}}),
    ("POST", "/api/jobs", {"json": {"prompt": "x", "mode": "video"}}),
    ("POST", "/api/jobs", {"json": {"prompt": "x", "unknown_field": 1}}),
    ("POST", "/api/jobs", {"json": ["a", "list"]}),
    ("GET", "/api/images/..%2F..%2Fsdlab-server.sqlite", {}),
    ("GET", "/api/images/../sdlab-server.sqlite", {}),
    ("GET", "/api/images/%2Fetc%2Fpasswd", {}),
    ("GET", "/api/jobs/not-a-job", {}),
    ("DELETE", "/api/jobs/not-a-job", {}),
    ("GET", "/api/jobs?limit=-5", {}),
    ("POST", "/sdapi/v1/txt2img", {"json": {"prompt": "x", "steps": -1}}),
    ("POST", "/sdapi/v1/txt2img", {"json": {"prompt": "x", "n_iter": 0}}),
    ("POST", "/sdapi/v1/txt2img", {"content": b"\xff\xfe garbage", "headers": {"content-type": "application/json"}}),
    ("POST", "/sdapi/v1/img2img", {"json": {"prompt": "x", "init_images": ["data:image/png;base64,AAAA"]}}),
    ("POST", "/sdapi/v1/png-info", {"json": {"image": "%%%"}}),
    ("POST", "/sdapi/v1/options", {"json": {"sd_model_checkpoint": "no-such-model"}}),
    ("POST", "/sdapi/v1/options", {"content": b"[1, 2", "headers": {"content-type": "application/json"}}),
]


@pytest.mark.parametrize("method,path,kwargs", BAD_REQUESTS, ids=[f"{m} {p} {i}" for i, (m, p, _) in enumerate(BAD_REQUESTS)])
def test_bad_request_gets_clean_4xx(client, method, path, kwargs):
    response = client.request(method, path, **kwargs)
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    body = response.json()
    assert "detail" in body
    if path.startswith("/api/") and response.status_code != 404:
        assert isinstance(body["detail"], str) and body["detail"]
    if path.startswith("/sdapi/") and response.status_code != 422:
        assert set(body) == {"error", "detail", "body", "errors"}


def test_thousand_bad_requests_then_a_good_one(client):
    for i in range(1000):
        method, path, kwargs = BAD_REQUESTS[i % len(BAD_REQUESTS)]
        assert 400 <= client.request(method, path, **kwargs).status_code < 500
    created = client.post("/api/jobs", json={"prompt": "still here", "steps": 2})
    assert created.status_code == 202
    assert wait(client, created.json()["id"])["status"] == "done"


def test_hires_fix_and_variation_seed_as_a1111_sends_them(client):
    response = client.post("/sdapi/v1/txt2img", json={
        "prompt": "a red heart", "steps": 3, "seed": 2, "width": 64, "height": 64, "enable_hr": True,
        "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 2, "denoising_strength": 0.6,
        "subseed": 9, "subseed_strength": 0.3})
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
    assert image.size == (128, 128)
    text = image.info["parameters"]
    assert "Hires upscale: 2" in text and "Hires steps: 2" in text and "Variation seed: 9" in text
    job = wait(client, client.post("/api/jobs", json={"prompt": "x", "steps": 2, "hr_scale": 1.5,
                                                      "hr_denoise": 0.5}).json()["id"])
    assert job["status"] == "done" and job["request"]["hr_scale"] == 1.5
    assert client.get(job["images"][0]).status_code == 200
    too_big = client.post("/api/jobs", json={"prompt": "x", "width": 1024, "height": 1024, "hr_scale": 4})
    assert too_big.status_code == 413 and "hires" in too_big.json()["detail"]
    assert {"Latent", "Latent (bicubic)"} <= {m["name"] for m in client.get("/sdapi/v1/latent-upscale-modes").json()}
    assert {"None", "Lanczos", "Nearest"} <= {u["name"] for u in client.get("/sdapi/v1/upscalers").json()}


@pytest.mark.parametrize("upscaler", ["/etc/passwd", "../../model.safetensors", str(shipped_model_path())])
def test_hires_upscaler_is_never_a_path(client, upscaler):
    """The pipeline opens any upscaler file a path names; clients choose from the server's lists only."""
    native = client.post("/api/jobs", json={"prompt": "x", "hr_scale": 2, "hr_upscaler": upscaler})
    assert native.status_code == 400 and "unknown hires upscaler" in native.json()["detail"]
    a1111 = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "enable_hr": True, "hr_upscaler": upscaler})
    assert a1111.status_code == 400 and "unknown hires upscaler" in a1111.json()["errors"]
