"""The job history's Delete and paging on the native API: `POST /api/jobs/{id}/delete` takes a finished job's row and
pictures, all or nothing (a failed picture rename or row delete leaves the job whole), refuses a queued or running
job (409) and an unknown one (404), and a page of another origin (403); `GET /api/jobs?before=ID` lists the next
page. In-process app (TestClient) on the shipped model; the guard on a real `sdlab serve`."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from server_fixtures import sdlab_server  # noqa: F401  (a session fixture: the real `sdlab serve`)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

BODY = {"prompt": "a lighthouse", "seed": 3, "steps": 2, "width": 32, "height": 32}
FINAL = ("done", "failed", "cancelled", "interrupted")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    from fastapi.testclient import TestClient

    from sdlab.server.app import create_app
    from sdlab.server.config import ServerConfig

    app = create_app(ServerConfig(output_dir=tmp_path_factory.mktemp("history") / "outputs"))
    with TestClient(app) as client:
        yield client, app.state.service


def _done(client, body: dict) -> dict:
    answer = client.post("/api/jobs", json=body)
    assert answer.status_code == 202, answer.text
    deadline = time.monotonic() + 120
    while (job := client.get(f"/api/jobs/{answer.json()['id']}").json())["status"] not in FINAL:
        assert time.monotonic() < deadline, job
        time.sleep(0.02)
    assert job["status"] == "done", job
    return job


def _files(service, job: dict) -> list[Path]:
    return [service.images_dir / url.rsplit("/", 1)[1] for url in job["images"]]


def test_delete_takes_the_row_and_its_pictures(server):
    client, service = server
    job = _done(client, {**BODY, "batch_size": 2})
    files = _files(service, job)
    assert len(files) == 2 and all(f.is_file() for f in files)
    answer = client.post(f"/api/jobs/{job['id']}/delete")
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"id": job["id"], "deleted": [job["id"]], "images": 2}
    assert client.get(f"/api/jobs/{job['id']}").status_code == 404
    assert job["id"] not in [j["id"] for j in client.get("/api/jobs").json()["jobs"]]
    assert not any(f.exists() for f in files) and not list(service.images_dir.glob(".deleting-*"))
    assert client.get(job["images"][0]).status_code == 404
    again = client.post(f"/api/jobs/{job['id']}/delete")
    assert again.status_code == 404 and job["id"] in again.json()["detail"]


def test_an_unknown_job_is_a_404(server):
    client, _ = server
    answer = client.post("/api/jobs/0123456789abcdef/delete")
    assert answer.status_code == 404 and answer.json()["detail"] == "no job '0123456789abcdef'"


def test_a_queued_or_running_job_is_refused_and_kept(server):
    client, _ = server
    running = client.post("/api/jobs", json={**BODY, "steps": 150}).json()["id"]
    queued = client.post("/api/jobs", json=BODY).json()["id"]
    try:
        while client.get(f"/api/jobs/{running}").json()["status"] != "running":
            time.sleep(0.02)
        for job_id, status in ((running, "running"), (queued, "queued")):
            answer = client.post(f"/api/jobs/{job_id}/delete")
            assert answer.status_code == 409, answer.text
            assert answer.json()["detail"] == (f"job {job_id} is {status}: only a finished job can be deleted "
                                               f"(cancel it first: DELETE /api/jobs/{job_id})")
            assert client.get(f"/api/jobs/{job_id}").json()["status"] in ("queued", "running")
    finally:
        for job_id in (queued, running):
            client.delete(f"/api/jobs/{job_id}")


def test_a_row_delete_that_fails_leaves_the_job_whole(server, monkeypatch):
    from sdlab.server.store import StoreError

    client, service = server
    job = _done(client, {**BODY, "batch_size": 2})

    def locked(job_ids):
        raise StoreError("cannot write the job history sdlab-server.sqlite: database is locked")

    monkeypatch.setattr(service.store, "delete_jobs", locked)
    answer = client.post(f"/api/jobs/{job['id']}/delete")
    assert answer.status_code == 503 and "database is locked" in answer.json()["detail"]
    assert client.get(f"/api/jobs/{job['id']}").json()["images"] == job["images"]
    assert all(f.is_file() for f in _files(service, job)) and not list(service.images_dir.glob(".deleting-*"))
    monkeypatch.undo()
    assert client.post(f"/api/jobs/{job['id']}/delete").status_code == 200


def test_a_picture_that_cannot_be_moved_leaves_the_job_whole(server, monkeypatch):
    client, service = server
    job = _done(client, {**BODY, "batch_size": 2})
    second = _files(service, job)[1]
    rename = Path.rename

    def refuse_second(path, target):
        if path == second:
            raise PermissionError(13, "Permission denied")
        return rename(path, target)

    monkeypatch.setattr(Path, "rename", refuse_second)
    answer = client.post(f"/api/jobs/{job['id']}/delete")
    assert answer.status_code == 503
    assert answer.json()["detail"] == (f"cannot delete the picture {second.name} of the output folder's images "
                                       "folder (Permission denied); nothing was deleted")
    monkeypatch.undo()
    assert client.get(f"/api/jobs/{job['id']}").json()["images"] == job["images"]
    assert all(f.is_file() for f in _files(service, job)) and not list(service.images_dir.glob(".deleting-*"))


def test_before_lists_the_next_page(server):
    client, _ = server
    made = [_done(client, {**BODY, "prompt": f"page {i}"})["id"] for i in range(3)]
    newest = client.get("/api/jobs", params={"limit": 2}).json()["jobs"]
    assert [j["id"] for j in newest] == made[:0:-1]
    rest = client.get("/api/jobs", params={"limit": 2, "before": made[1]}).json()["jobs"]
    assert rest[0]["id"] == made[0]
    everything = [j["id"] for j in client.get("/api/jobs", params={"limit": 1000}).json()["jobs"]]
    paged, before = [], None
    while page := client.get("/api/jobs", params={"limit": 2, **({"before": before} if before else {})}).json()["jobs"]:
        paged += [j["id"] for j in page]
        before = page[-1]["id"]
    assert paged == everything
    unknown = client.get("/api/jobs", params={"before": "nosuchjob"})
    assert unknown.status_code == 404 and unknown.json()["detail"] == "no job 'nosuchjob' (before)"


def test_another_origins_page_cannot_delete(sdlab_server):  # noqa: F811
    with httpx.Client(base_url=sdlab_server.url, timeout=120) as client:
        job_id = client.post("/api/jobs", json=BODY).json()["id"]
        while client.get(f"/api/jobs/{job_id}").json()["status"] not in FINAL:
            time.sleep(0.02)
        foreign = client.post(f"/api/jobs/{job_id}/delete", headers={"Origin": "http://evil.example"})
        assert foreign.status_code == 403 and "cross-site request forgery" in foreign.json()["detail"]
        assert client.get(f"/api/jobs/{job_id}").status_code == 200
        own = client.post(f"/api/jobs/{job_id}/delete", headers={"Origin": sdlab_server.url})
        assert own.status_code == 200 and client.get(f"/api/jobs/{job_id}").status_code == 404


def test_a_script_job_goes_with_its_requests_and_their_pictures(server):
    """An X/Y/Z plot job (Steps 1, 2: two requests, each a hidden row with its picture, and the job's grid and cells):
    deleting it deletes its requests' rows and every picture file of them all."""
    client, service = server
    args = [4, "1,2", [], 0, "", [], 0, "", [], True, True]     # x_type 4: A1111 1.10's Steps axis
    answer = client.post("/api/jobs", json={**BODY, "script_name": "X/Y/Z plot", "script_args": args})
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    deadline = time.monotonic() + 120
    while (job := client.get(f"/api/jobs/{job_id}").json())["status"] not in FINAL:
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert job["status"] == "done", job
    parts = service.store.parts(job_id, "script_job")
    names = {*(url.rsplit("/", 1)[1] for url in job["images"]), *(name for row in parts for name in row["images"])}
    assert len(parts) == 2 and all((service.images_dir / name).is_file() for name in names)
    deleted = client.post(f"/api/jobs/{job_id}/delete").json()
    assert sorted(deleted["deleted"]) == sorted([job_id, *(row["id"] for row in parts)])
    assert deleted["images"] == len(names)
    assert service.store.parts(job_id, "script_job") == [] and client.get(f"/api/jobs/{job_id}").status_code == 404
    assert not any((service.images_dir / name).exists() for name in names)


def test_a_picture_deleted_while_it_is_asked_for_is_a_404_or_whole(server, monkeypatch):
    """GET /api/images/NAME opens the file before answering: a delete just before (the file there when a check
    looked, gone when sent) is a 404, not a 500; a delete after it opened the file leaves the answer whole."""
    import anyio

    from sdlab.server.native import opened_file

    client, service = server
    job = _done(client, {**BODY, "batch_size": 2})
    first, second = _files(service, job)
    whole = first.read_bytes()
    opened = opened_file(first, "image/png")
    monkeypatch.setattr(Path, "is_file", lambda self: True)      # a check made before the delete: still there
    assert client.post(f"/api/jobs/{job['id']}/delete").status_code == 200
    answer = client.get(job["images"][1])
    assert answer.status_code == 404 and answer.json() == {"detail": "Not Found"}
    comfy = client.get("/view", params={"filename": second.name, "type": "output"})
    assert comfy.status_code == 404

    async def body() -> bytes:
        return b"".join([chunk async for chunk in opened.body_iterator])

    assert opened.headers["content-length"] == str(len(whole)) and anyio.run(body) == whole


def test_a_deletion_stopped_midway_is_undone_or_finished_at_startup(tmp_path):
    """A server stopped between a deletion's renames and its row delete leaves a row listing hidden pictures: the
    next start puts them back (the job whole, its pictures served); one stopped after the row delete leaves hidden
    pictures no row lists: the next start removes them (the job gone)."""
    from fastapi.testclient import TestClient

    from sdlab.server.app import create_app
    from sdlab.server.config import ServerConfig
    from sdlab.server.job_deletion import DELETING_PREFIX

    config = ServerConfig(output_dir=tmp_path / "outputs")
    app = create_app(config)
    with TestClient(app) as client:
        service = app.state.service
        kept, gone = (_done(client, {**BODY, "batch_size": 2, "seed": seed}) for seed in (5, 6))
        kept_files, gone_files = _files(service, kept), _files(service, gone)
        pictures = [client.get(url).content for url in kept["images"]]
        kept_files[0].rename(kept_files[0].with_name(DELETING_PREFIX + kept_files[0].name))   # one renamed, crash
        for path in gone_files:                                     # all renamed, rows deleted, crash
            path.rename(path.with_name(DELETING_PREFIX + path.name))
        service.store.delete_jobs([gone["id"]])
        assert client.get(kept["images"][0]).status_code == 404      # the state a crash leaves
    app = create_app(config)
    with TestClient(app) as client:
        assert [client.get(url).content for url in kept["images"]] == pictures
        assert client.get(f"/api/jobs/{kept['id']}").json()["images"] == kept["images"]
        assert client.get(f"/api/jobs/{gone['id']}").status_code == 404
        assert not list(app.state.service.images_dir.glob(DELETING_PREFIX + "*"))
        assert not any(path.exists() for path in gone_files)
