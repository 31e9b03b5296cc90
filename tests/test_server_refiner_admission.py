"""The submit-time memory check counts as free the refiner a job lets go: after a job with an SDXL refiner the
worker holds it, and a plain job for the same base lets it go before its run-time check (`make_plan`) reads the
free memory; the submit-time check read the memory with the refiner still held and refused (a false 422) a job
that runs. Now `WorkerHost.refiner_let_go` adds the held refiner's bytes where the job draws without it (or with
another), so both checks decide alike, on both APIs. In-process app (TestClient); the free memory reading replaced
by a machine of a fixed size on which the held refiner takes its share."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

BODY = {"prompt": "a castle", "seed": 7, "steps": 2, "cfg_scale": 5.0, "width": 32, "height": 32}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    from bundle_fixtures import tiny_bundle, write_original
    from fastapi.testclient import TestClient

    from sdlab.server.app import create_app
    from sdlab.server.config import ServerConfig

    root = tmp_path_factory.mktemp("refiner-admission")
    models = root / "models"
    models.mkdir()
    write_original(tiny_bundle("sdxl"), models / "base.safetensors", junk=False)
    write_original(tiny_bundle("sdxl-refiner", seed=5), models / "refiner.safetensors", junk=False)
    app = create_app(ServerConfig(output_dir=root / "outputs", model=models / "base.safetensors", models_dir=models),
                     preload=True)
    with TestClient(app) as client:
        yield {"client": client, "host": app.state.service.host, "refiner": models / "refiner.safetensors"}


def _done(client, answer) -> str:
    assert answer.status_code == 202, answer.text
    while (job := client.get(f"/api/jobs/{answer.json()['id']}").json())["status"] in ("queued", "running"):
        time.sleep(0.02)
    return job["status"]


def _held(host) -> int:
    from sdlab.server.worker import bundle_bytes

    return 0 if host._refiner is None else bundle_bytes(host._refiner)


def _plain_need(host) -> int:
    from sdlab.pipeline.memory import estimate_bytes
    from sdlab.pipeline.plan import resolve_for
    from sdlab.pipeline.request import GenerationRequest

    bundle = host.pipe.bundle
    return estimate_bytes(bundle, resolve_for(bundle, GenerationRequest(
        BODY["prompt"], steps=2, seed=7, width=32, height=32, cfg_scale=5.0, sampler="Euler")))


def test_a_job_that_lets_the_held_refiner_go_is_not_refused_for_its_memory(server, monkeypatch):
    from sdlab.pipeline import plan

    client, host = server["client"], server["host"]
    refined = {**BODY, "sampler": "Euler", "refiner": "refiner", "refiner_switch": 0.5}
    for post in (lambda: client.post("/api/jobs", json={**BODY, "sampler": "Euler"}),
                 lambda: client.post("/sdapi/v1/txt2img", json={**BODY, "sampler_name": "Euler"})):
        monkeypatch.setattr(plan, "available_bytes", lambda device: 1 << 40)
        assert _done(client, client.post("/api/jobs", json=refined)) == "done"
        held = _held(host)
        assert held > 0 and host.refiner_let_go(None) == held and host.refiner_let_go(server["refiner"]) == 0
        budget = _plain_need(host) + held - 1       # fits once the refiner is let go, not while it is held
        monkeypatch.setattr(plan, "available_bytes", lambda device: budget - _held(host))
        answer = post()
        assert answer.status_code in (200, 202), answer.text
        if answer.status_code == 202:
            assert _done(client, answer) == "done"
        assert _held(host) == 0


def test_a_job_that_keeps_the_held_refiner_counts_it_as_held(server, monkeypatch):
    """A job drawing with the held refiner frees nothing: the submit-time check reads the memory as it is."""
    from sdlab.pipeline import plan

    client, host = server["client"], server["host"]
    refined = {**BODY, "sampler": "Euler", "refiner": "refiner", "refiner_switch": 0.5}
    monkeypatch.setattr(plan, "available_bytes", lambda device: 1 << 40)
    assert _done(client, client.post("/api/jobs", json=refined)) == "done"
    need = _plain_need(host)
    monkeypatch.setattr(plan, "available_bytes", lambda device: need - 1)
    jobs = len(client.get("/api/jobs").json()["jobs"])
    answer = client.post("/api/jobs", json=refined)
    assert answer.status_code == 422 and "\n" not in answer.json()["detail"], answer.text
    assert len(client.get("/api/jobs").json()["jobs"]) == jobs


def test_the_refiner_let_go_is_handed_back_to_the_system(server, monkeypatch):
    """On CPU the refiner's memory is free for the run-time check only once the C library hands it back: letting
    it go trims the heap (`allocator.trim`), as letting a model go does."""
    from sdlab.pipeline import plan
    from sdlab.server import worker

    client = server["client"]
    monkeypatch.setattr(plan, "available_bytes", lambda device: 1 << 40)
    assert _done(client, client.post("/api/jobs", json={**BODY, "sampler": "Euler", "refiner": "refiner",
                                                         "refiner_switch": 0.5})) == "done"
    trims = []
    monkeypatch.setattr(worker, "trim", lambda: trims.append(_held(server["host"])) or True)
    assert _done(client, client.post("/api/jobs", json={**BODY, "sampler": "Euler"})) == "done"
    assert trims == [0]             # trimmed once, with the refiner already let go
