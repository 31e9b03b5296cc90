"""A history row whose JSON cannot be read (a damaged page, a hand edit) is listed as damaged by every query over
the history, not only by the plain read: the server's list (which leaves a script's requests out with SQLite's
`json_extract`), a script job's parts and the pictures rows hold (`json_each`) read the other rows. Before, SQLite's
"malformed JSON" failed the whole query: `GET /api/jobs` (the web UI's gallery) was a 503 for the whole history."""

from __future__ import annotations

import sqlite3

import pytest

from sdlab.server.store import Store


def _row(job_id: str, created: float, images: list[str], request: dict | None = None) -> dict:
    return {"id": job_id, "status": "done", "mode": "txt2img", "model": "m", "request": request or {"seed": 1},
            "images": images, "infotexts": [], "error": None, "created": created, "started": created,
            "finished": created, "step": 2, "steps": 2}


def _damage(path, job_id: str, column: str, text: str) -> None:
    other = sqlite3.connect(path, isolation_level=None)
    other.execute(f"UPDATE jobs SET {column} = ? WHERE id = ?", (text, job_id))
    other.close()


def test_every_query_reads_past_a_damaged_row(tmp_path):
    store = Store(tmp_path)
    store.save_job(_row("0", 0.0, ["0-0.png"]))
    store.save_job(_row("1", 1.0, ["1-0.png"]))
    store.save_job(_row("2", 2.0, ["2-0.png"], {"seed": 1, "script_job": "0"}))    # a script's request
    _damage(store.path, "1", "request", "{broken")
    _damage(store.path, "1", "images", "[1,")
    try:
        listed = store.jobs(10, without="script_job")
        assert [job["id"] for job in listed] == ["1", "0"]                  # the damaged one listed, the part not
        assert listed[0]["error"].startswith("this job's history row is damaged: its ")
        assert [job["id"] for job in store.parts("0", "script_job")] == ["2"]
        assert store.held_pictures(["0-0.png", "1-0.png", "2-0.png"]) == {"0-0.png", "2-0.png"}
    finally:
        store.close()


@pytest.fixture
def client(tmp_path):
    from fastapi.testclient import TestClient

    from sdlab.server.app import create_app
    from sdlab.server.config import ServerConfig

    app = create_app(ServerConfig(output_dir=tmp_path / "outputs"))
    with TestClient(app) as c:
        yield c, app.state.service.store


def test_the_list_and_a_delete_answer_with_a_damaged_row_in_the_history(client):
    c, store = client
    store.save_job(_row("a" * 32, 1.0, []))
    store.save_job(_row("b" * 32, 2.0, []))
    _damage(store.path, "b" * 32, "request", "{broken")
    answer = c.get("/api/jobs")
    assert answer.status_code == 200, answer.text
    assert [job["id"] for job in answer.json()["jobs"]] == ["b" * 32, "a" * 32]
    deleted = c.post(f"/api/jobs/{'a' * 32}/delete")
    assert deleted.status_code == 200, deleted.text
