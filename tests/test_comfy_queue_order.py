"""The queue's order and ComfyUI's POST /prompt `front` / `number` (comfyanonymous/ComfyUI server.py ``post_prompt``:
``number = self.number; if front: number = -number; self.number += 1; if "number" in json_data: number =
float(json_data["number"])``, its PromptQueue a heap of those numbers): the server's one queue (`jobs.Place`) draws
its jobs by number, lowest first, and among equal numbers in the order they came; every API's job is numbered in
turn. With the worker held on its first job: the positions, the draw order, GET /queue's pending list and the
numbers POST /prompt answers."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from sdlab.pipeline.request import GenerationRequest
from sdlab.server.inputs import JobSpec
from sdlab.server.jobs import IN_TURN, Job, JobQueue, Place
from sdlab.server.store import Store

WAIT_S = 60.0


@pytest.fixture
def held_queue(tmp_path):
    """A queue whose worker holds its first job until `let_go` is set; `drawn` lists the jobs in the order run."""
    store = Store(tmp_path)
    started, let_go, drawn = threading.Event(), threading.Event(), []

    def run(job: Job) -> None:
        drawn.append(job)
        started.set()
        assert let_go.wait(WAIT_S)

    queue = JobQueue(store, run, max_queue=16)
    queue.start()
    yield queue, started, let_go, drawn
    let_go.set()
    queue.stop()
    store.close()


def test_the_queue_draws_by_number_then_in_turn(held_queue):
    queue, started, let_go, drawn = held_queue

    def submit(place: Place = IN_TURN) -> tuple[Job, int]:
        return queue.submit(JobSpec(GenerationRequest("x", steps=2)), "txt2img", "model", {}, place)

    first, _ = submit()
    assert started.wait(WAIT_S)
    plain, at = submit()                                   # number 1
    assert at == 0 and plain.number == 1
    front, at = submit(Place(front=True))                 # -2: before every job pending
    assert at == 0 and front.number == -2
    half, at = submit(Place(number=0.5))                  # between the front and the plain one
    assert at == 1 and half.number == 0.5
    later_front, at = submit(Place(front=True))           # -4: the latest front first, as ComfyUI's heap has it
    assert at == 0 and later_front.number == -4
    tie, at = submit(Place(number=1))                     # number 1 again: after the plain job that came first
    assert at == 4 and tie.number == 1
    last, at = submit()                                   # number 6
    assert at == 5
    expected = [later_front, front, half, plain, tie, last]
    assert queue.queued() == expected
    assert [queue.position(job) for job in expected] == list(range(6))
    queue.cancel(half)                                    # a cancel takes it out; the others keep their order
    expected.remove(half)
    assert queue.queued() == expected
    let_go.set()
    for job in expected:
        assert job.finished_event.wait(WAIT_S)
    assert drawn == [first, *expected]


# -- the ComfyUI API -----------------------------------------------------------------------------------------------
from test_server_comfy_api import NATIVE, graph, server  # noqa: E402

__all__ = ["server"]


def _job_id(prompt_id: str) -> str:
    return uuid.UUID(prompt_id).hex


def test_front_and_number_place_a_prompt_in_the_one_queue(server, monkeypatch):
    """Behind a held prompt: a plain prompt, a `front` one, one of `number` -0.5, a second `front` one and a native
    job. GET /queue lists them pending in the order the worker then draws them (the latest front, the front, -0.5,
    the plain prompt, the native job, queued in turn after it); POST /prompt answers each one's number as ComfyUI
    does (a front one the negative of its turn)."""
    queue = server.app.state.comfy.service.queue
    started, let_go, drawn = threading.Event(), threading.Event(), []
    real_run = queue._run

    def held_run(job: Job) -> None:
        drawn.append(job.id)
        started.set()
        assert let_go.wait(WAIT_S)
        real_run(job)

    monkeypatch.setattr(queue, "_run", held_run)
    try:
        def post(**place) -> dict:
            answer = server.post("/prompt", json={"prompt": graph(), **place})
            assert answer.status_code == 200, answer.text
            return answer.json()

        held = post()
        assert started.wait(WAIT_S)
        plain, front, half, later_front = post(), post(front=True), post(number="-0.5"), post(front=True)
        native = server.post("/api/jobs", json=NATIVE).json()
        assert plain["number"] == held["number"] + 1
        assert front["number"] == -(held["number"] + 2) and half["number"] == -0.5
        assert later_front["number"] == -(held["number"] + 4)
        listed = server.get("/queue").json()
        assert [item[1] for item in listed["queue_running"]] == [held["prompt_id"]]
        order = [later_front, front, half, plain]
        assert [item[1] for item in listed["queue_pending"]] == [p["prompt_id"] for p in order]
        assert [item[0] for item in listed["queue_pending"]] == [p["number"] for p in order]
        for bad in ("many", "nan", [1]):
            answer = server.post("/prompt", json={"prompt": graph(), "number": bad})
            assert answer.status_code == 400 and "number must be a finite number" in answer.text, answer.text
    finally:
        let_go.set()
    deadline = time.monotonic() + WAIT_S
    while server.get(f"/api/jobs/{native['id']}").json()["status"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert drawn == [_job_id(p["prompt_id"]) for p in (held, *order)] + [native["id"]]


@pytest.mark.parametrize("number, shown", [
    ("1e400", "got inf"), ("-Infinity", "got -inf"), ('"inf"', "got inf"), ('"-1e999"', "got -inf"),
    ("9" * 400, "got 9999"),
], ids=["1e400", "-Infinity", "inf-text", "-1e999-text", "400-digits"])
def test_a_number_beyond_a_float_is_one_400_and_nothing_queued(server, monkeypatch, number, shown):
    """JSON has no infinity: a `number` that float() makes infinite (1e400, -Infinity, "inf") would be answered and
    listed by GET /queue as a number no JSON carries, and a 400-digit integer overflows float(). Each is one 400
    line, like a `number` that is no number, and no job is queued."""
    from sdlab.server import comfy_api

    submitted = []
    monkeypatch.setattr(comfy_api, "_submit", lambda *args: submitted.append(args) or pytest.fail("queued"))
    answer = server.post("/prompt", content='{"prompt": %s, "number": %s}' % (json.dumps(graph()), number),
                         headers={"content-type": "application/json"})
    assert answer.status_code == 400, answer.text
    message = answer.json()["error"]["message"]
    assert message.startswith("number must be a finite number, " + shown) and "\n" not in message, message
    assert len(message) < 80 and submitted == []
    assert server.get("/queue").json() == {"queue_running": [], "queue_pending": []}
