"""The job queue and its history without HTTP or a model (a stand-in `run`): a history write that fails
(another program holds the database's write lock) leaves the worker serving and every job ending with its
final event; stopping records the queued and the running jobs `interrupted`, apart from a client's cancel;
an A1111 call whose wait is cancelled (uvicorn giving up as the server stops) answers 503; a database that
cannot be opened is one `StoreError` naming the file."""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
import threading
import time
import types

import pytest

from sdlab.pipeline.request import GenerationRequest
from sdlab.server import a1111, store as store_module
from sdlab.server.inputs import JobSpec
from sdlab.server.jobs import Job, JobCancelled, JobQueue, QueueFull, Unavailable
from sdlab.server.store import DB_NAME, INTERRUPTED_ERROR, Store, StoreError
from sdlab.utils import files as files_module

WAIT_S = 60.0


def _spec() -> JobSpec:
    return JobSpec(GenerationRequest("a red apple", steps=2))


def _submit(queue: JobQueue) -> Job:
    return queue.submit(_spec(), "txt2img", "model", {})[0]


class OtherWriter:
    """Another connection to the database, which can hold its write lock (as a DB browser or another server
    can), from any thread."""

    def __init__(self, path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)

    def hold(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        self.db.execute("ROLLBACK")


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "REQUEST_BUSY_TIMEOUT_S", 0.05)     # a locked write fails at once
    monkeypatch.setattr(store_module, "WORKER_BUSY_TIMEOUT_S", 0.05)
    opened = Store(tmp_path)
    yield opened
    opened.close()


def test_a_failed_history_write_leaves_the_worker_serving(store):
    other = OtherWriter(store.path)
    jobs_run = []

    def run(job: Job) -> None:
        jobs_run.append(job)
        if len(jobs_run) == 1:
            other.hold()                        # the write of the first job's end fails

    queue = JobQueue(store, run, max_queue=4)
    queue.start()
    try:
        first = _submit(queue)
        assert first.finished_event.wait(WAIT_S) and first.status == "done"
        assert queue.get(first.id) is first                     # finished, its row not written yet
        other.release()
        second = _submit(queue)
        assert second.finished_event.wait(WAIT_S) and second.status == "done"
        assert store.job(first.id)["status"] == "done"          # written with the next write that succeeded
        assert queue.get(first.id) is None
    finally:
        queue.stop()


def test_a_job_submitted_while_the_history_is_locked_is_refused_as_unavailable(store):
    queue = JobQueue(store, lambda job: None, max_queue=4)
    other = OtherWriter(store.path)
    other.hold()
    with pytest.raises(Unavailable, match=f"cannot write the job history .*{DB_NAME}: database is locked"):
        _submit(queue)
    other.release()
    assert queue.counts() == (0, 0) and store.jobs(10) == []


def test_stopping_interrupts_the_running_and_the_queued_jobs_unlike_a_cancel(store):
    started = threading.Event()

    def run(job: Job) -> None:
        started.set()
        while not job.cancel.wait(0.01):
            pass
        raise JobCancelled

    queue = JobQueue(store, run, max_queue=4)
    queue.start()
    cancelled = _submit(queue)
    assert started.wait(WAIT_S)
    queue.cancel(cancelled)
    assert cancelled.finished_event.wait(WAIT_S) and cancelled.status == "cancelled"
    started.clear()
    running, queued = _submit(queue), _submit(queue)
    assert started.wait(WAIT_S)
    queue.stop()
    for job in (running, queued):
        assert job.finished_event.is_set()
        assert (job.status, job.error) == ("interrupted", INTERRUPTED_ERROR)
        assert job.final_event() == ("failed", {"error": INTERRUPTED_ERROR, "status": "interrupted"})
        assert store.job(job.id)["status"] == "interrupted"
    assert store.job(cancelled.id)["status"] == "cancelled"
    with pytest.raises(Unavailable, match="stopping"):
        _submit(queue)


def test_an_a1111_wait_cut_off_at_shutdown_is_a_503_error():
    job = Job(id="j", mode="txt2img", model="model", spec=_spec(), created=0.0)

    async def cut_off() -> None:
        waiting = asyncio.create_task(a1111._until_finished(job))
        await asyncio.sleep(0)
        waiting.cancel()
        await waiting

    with pytest.raises(Unavailable, match=INTERRUPTED_ERROR):
        asyncio.run(cut_off())
    assert job._subscribers == []


@pytest.mark.parametrize("make, reason", [
    (lambda path: path.write_bytes(b"not a database" * 512), "file is not a database; move the file away"),
    (lambda path: path.mkdir(), "unable to open database file"),
])
def test_an_unusable_history_is_one_error_naming_the_file(tmp_path, make, reason):
    make(tmp_path / DB_NAME)
    with pytest.raises(StoreError) as caught:
        Store(tmp_path)
    assert str(caught.value).startswith(f"cannot open the job history {tmp_path / DB_NAME}: {reason}")


def _answers_before(done: threading.Event, call) -> bool:
    """Whether `call()` returns before `done` is set."""
    answered = threading.Event()
    threading.Thread(target=lambda: (call(), answered.set()), daemon=True).start()
    return answered.wait(WAIT_S) and not done.is_set()


def test_a_submit_waiting_on_a_locked_history_holds_up_no_other_queue_call(store, monkeypatch):
    writing, let_go, written = threading.Event(), threading.Event(), threading.Event()
    save_job = store.save_job

    def slow_save(record, **kwargs):                    # a write waiting on another program's lock
        writing.set()
        let_go.wait(WAIT_S)
        written.set()
        save_job(record, **kwargs)

    queue = JobQueue(store, lambda job: None, max_queue=2)
    queued = _submit(queue)
    monkeypatch.setattr(store, "save_job", slow_save)
    submitting = threading.Thread(target=_submit, args=(queue,), daemon=True)
    submitting.start()
    assert writing.wait(WAIT_S)
    try:
        assert _answers_before(written, queue.counts)
        assert _answers_before(written, lambda: queue.get(queued.id))
        with pytest.raises(QueueFull):                  # the place kept for the job being written counts
            queue.submit(_spec(), "txt2img", "model", {})
    finally:
        let_go.set()
    submitting.join(WAIT_S)
    assert queue.counts() == (2, 0)


def test_a_job_queued_as_the_server_stops_is_recorded_interrupted(store, monkeypatch):
    save_job = store.save_job
    queue = JobQueue(store, lambda job: None, max_queue=4)

    def stop_meanwhile(record, **kwargs):
        save_job(record, **kwargs)
        if record["status"] == "queued":
            queue.stop_jobs()

    monkeypatch.setattr(store, "save_job", stop_meanwhile)
    with pytest.raises(Unavailable, match="stopping"):
        _submit(queue)
    (row,) = store.jobs(10)
    assert (row["status"], row["error"]) == ("interrupted", INTERRUPTED_ERROR)
    assert queue.counts() == (0, 0)


def test_the_worker_waits_longer_on_a_locked_history_than_a_request_and_holds_up_no_read(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "REQUEST_BUSY_TIMEOUT_S", 0.05)
    monkeypatch.setattr(store_module, "WORKER_BUSY_TIMEOUT_S", WAIT_S)
    store = Store(tmp_path)
    other = OtherWriter(store.path)
    row = Job(id="j", mode="txt2img", model="model", spec=_spec(), created=0.0).record()
    other.hold()
    written = threading.Event()
    threading.Thread(target=lambda: (store.save_job(row, by_worker=True), written.set()), daemon=True).start()
    try:
        with pytest.raises(StoreError, match="database is locked"):
            store.save_job(row)                         # a request's write gives up
        assert store.jobs(10) == [] and not written.is_set()    # reads answer while the worker's write waits
    finally:
        other.release()
    assert written.wait(WAIT_S) and store.job("j")["status"] == "queued"
    store.close()


def test_an_a1111_call_submits_off_the_event_loop():
    submitting, let_go = threading.Event(), threading.Event()

    class LockedHistory:
        options: dict = {}                              # the server's A1111 options: none set

        def submit(self, *args, **kwargs):
            submitting.set()
            let_go.wait(WAIT_S)
            raise Unavailable("cannot write the job history")

    async def call_and_poll() -> bool:
        call = asyncio.create_task(a1111._generate(LockedHistory(), a1111.Txt2ImgIn(), "txt2img",
                                                   GenerationRequest("a red apple", sampler="Euler")))
        await asyncio.to_thread(submitting.wait, WAIT_S)
        loop_free = not let_go.is_set()                 # this coroutine ran while the submit waited
        let_go.set()
        with pytest.raises(Unavailable):
            await call
        return loop_free

    timer = threading.Timer(WAIT_S, let_go.set)         # a submit on the loop ends the test instead of hanging it
    timer.start()
    try:
        assert asyncio.run(call_and_poll())
    finally:
        timer.cancel()


def test_on_queued_runs_before_the_worker_can_start_the_job(store):
    seen = []

    def on_queued(job: Job) -> None:
        time.sleep(0.2)                                 # a worker free to start the job would start it meanwhile
        seen.append(job.status)

    queue = JobQueue(store, lambda job: None, max_queue=4)
    queue.start()
    try:
        job, _ = queue.submit(_spec(), "txt2img", "model", {}, on_queued=on_queued)
        assert job.finished_event.wait(WAIT_S) and job.status == "done"
        assert seen == ["queued"]
    finally:
        queue.stop()


def test_a_script_request_is_its_runs_job_before_it_can_run():
    """`/progress` finds a running script request's run by `run.job` (`_script_run`): linked as the job is queued,
    not after the submit returns, when the worker may already be drawing it and a poll would count it alone."""
    run = a1111.ScriptRun([1, 1])
    linked_as_submitted = []

    class Host:
        options: dict = {}

        def submit(self, spec, mode, model, on_queued=None):
            job = Job(id="j", mode=mode, model="m", spec=spec, created=0.0, settings={})
            if on_queued is not None:
                on_queued(job)
            linked_as_submitted.append(run.job is job)     # the worker may start the job from here on
            raise Unavailable("stop here")

    with pytest.raises(Unavailable):
        asyncio.run(a1111._drawn_job(Host(), a1111.Txt2ImgIn(), "txt2img",
                                     GenerationRequest("a red apple", sampler="Euler"), run))
    assert linked_as_submitted == [True]


def _row(job_id: str, status: str, created: float, **fields) -> dict:
    return {"id": job_id, "status": status, "mode": "txt2img", "model": "m", "request": {"seed": 1}, "images": [],
            "infotexts": [], "error": None, "created": created, "started": None, "finished": None, "step": 0,
            "steps": 4, **fields}


def test_a_second_server_on_the_output_folder_is_refused_and_leaves_the_first_ones_jobs_live(tmp_path):
    """Opening the history marks the unfinished jobs interrupted: a second server on a folder whose server
    still runs them would mark them so under it. It is refused, naming the folder and the server holding it."""
    first = Store(tmp_path)
    first.save_job(_row("r", "running", 1.0, started=2.0))
    with pytest.raises(StoreError) as refused:
        Store(tmp_path)
    assert str(refused.value) == (f"the output folder {tmp_path} is in use by another sdlab serve (process "
                                  f"{os.getpid()}); stop it, or give this server another --output-dir")
    assert first.job("r")["status"] == "running"
    first.close()
    second = Store(tmp_path)                            # the first server ended: its jobs were cut off
    assert second.job("r")["status"] == "interrupted"
    second.close()


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP])
def test_a_file_system_without_locks_is_served_unlocked_with_one_warning(tmp_path, monkeypatch, caplog, code):
    """flock failing as it does where the file system has no locks (NFS without its lock daemon, some FUSE and
    network mounts) is no second server: one warning line, and the server runs without the lock."""
    def no_locks(file, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(files_module.fcntl, "flock", no_locks)
    with caplog.at_level("WARNING", logger="sdlab.server.store"):
        first = Store(tmp_path)
    assert [r.getMessage() for r in caplog.records] == [
        f"the file system of {tmp_path} has no file locks ({os.strerror(code)}): a second sdlab serve on the folder "
        "is not detected"]
    first.save_job(_row("r", "queued", 1.0))
    assert first.job("r")["status"] == "queued"
    assert (tmp_path / store_module.LOCK_NAME).read_text() == str(os.getpid())
    first.close()


def test_a_lock_that_fails_otherwise_is_one_error_naming_the_file(tmp_path, monkeypatch):
    def failing(file, operation):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(files_module.fcntl, "flock", failing)
    with pytest.raises(StoreError, match=f"cannot lock {tmp_path / store_module.LOCK_NAME}: "):
        Store(tmp_path)


def test_on_windows_the_folder_is_locked_with_msvcrt_past_the_process_id(tmp_path, monkeypatch):
    """Without fcntl (Windows) the lock is msvcrt's on byte WINDOWS_LOCK_BYTE, past the process id a second server
    reads (Windows locks are mandatory); a second server's failed lock (EACCES) is the in-use error."""
    held: list[tuple[int, int, int]] = []

    def locking(fd, mode, nbytes):
        if held:
            raise PermissionError(errno.EACCES, "Permission denied")
        held.append((os.lseek(fd, 0, os.SEEK_CUR), mode, nbytes))

    monkeypatch.setattr(files_module, "fcntl", None)
    monkeypatch.setattr(files_module, "msvcrt", types.SimpleNamespace(LK_NBLCK=2, locking=locking))
    first = Store(tmp_path)
    assert held == [(files_module.WINDOWS_LOCK_BYTE, 2, 1)]
    assert len(str(os.getpid())) < files_module.WINDOWS_LOCK_BYTE
    with pytest.raises(StoreError) as refused:
        Store(tmp_path)
    assert str(refused.value) == (f"the output folder {tmp_path} is in use by another sdlab serve (process "
                                  f"{os.getpid()}); stop it, or give this server another --output-dir")
    first.close()


def test_a_job_found_unfinished_at_start_keeps_its_pictures_and_gets_an_end_time(tmp_path):
    first = Store(tmp_path)
    first.save_job(_row("r", "running", 4.0, started=5.0, images=["r-0.png"], infotexts=["a red apple"]))
    first.save_job(_row("q", "queued", 6.0))
    first.close()
    reopened = Store(tmp_path)
    running, queued = reopened.job("r"), reopened.job("q")
    reopened.close()
    assert (running["status"], running["images"], running["infotexts"]) == ("interrupted", ["r-0.png"], ["a red apple"])
    assert (running["finished"], queued["finished"]) == (5.0, 6.0)      # the last time known of each


def test_a_damaged_history_row_is_listed_as_damaged_and_the_others_read(tmp_path):
    store = Store(tmp_path)
    for i in range(3):
        store.save_job(_row(str(i), "done", float(i), images=[f"{i}-0.png"]))
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("UPDATE jobs SET request = '{' WHERE id = '1'")          # a damaged page, a hand edit
    other.execute("UPDATE jobs SET images = '\"2-0.png\"' WHERE id = '2'")
    other.close()
    jobs = {job["id"]: job for job in store.jobs(10)}
    assert store.job("1") == jobs["1"]
    store.close()
    assert jobs["0"]["request"] == {"seed": 1} and jobs["0"]["error"] is None
    assert (jobs["1"]["request"], jobs["1"]["images"]) == ({}, ["1-0.png"])
    assert jobs["1"]["error"].startswith("this job's history row is damaged: its request cannot be read (")
    assert (jobs["2"]["images"], jobs["2"]["error"]) == (
        [], "this job's history row is damaged: its images cannot be read (not a JSON list)")
