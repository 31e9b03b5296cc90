"""The CPU thread count a model gets when the user has not chosen one (`sdlab.utils.threads`)."""

from __future__ import annotations

import threading

import torch
from torch import nn

from cli_helpers import run
from sdlab.utils import threads


def _runnable(monkeypatch, tmp_path, runnable: int, own: str = "R") -> None:
    """Make `/proc/loadavg` say `runnable` tasks are runnable (this process's included) and `/proc/self/task`
    list this process's threads in the states `own` (one letter each)."""
    loadavg = tmp_path / "loadavg"
    loadavg.write_text(f"0.50 0.40 0.30 {runnable}/120 4242\n")
    monkeypatch.setattr(threads, "LOADAVG", loadavg)
    tasks = tmp_path / "task"
    if tasks.exists():
        for old in tasks.iterdir():
            (old / "stat").unlink()
            old.rmdir()
    for i, state in enumerate(own):
        (tasks / str(100 + i)).mkdir(parents=True)
        (tasks / str(100 + i) / "stat").write_text(f"{100 + i} (python (main)) {state} 1 2 3 4\n")
    monkeypatch.setattr(threads, "OWN_TASKS", tasks)


def test_small_models_get_the_free_cores_large_ones_the_default(monkeypatch, tmp_path):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "SMALL_MODEL_PARAMETERS", 1000)
    monkeypatch.setattr(threads, "DEFAULT_THREADS", 6)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    small, large = nn.Linear(10, 10), nn.Linear(100, 100)             # 110 and 10,100 parameters
    _runnable(monkeypatch, tmp_path, 1)                                # only this process: 4 cores free
    assert threads.free_cores() == 4
    assert threads.threads_for(small) == threads.SMALL_MODEL_THREADS == 2
    assert threads.threads_for(large) == 6
    _runnable(monkeypatch, tmp_path, 4)                                # three others: one core free
    assert threads.free_cores() == 1 and threads.threads_for(small) == 1 and threads.threads_for(large) == 6
    _runnable(monkeypatch, tmp_path, 3, own="RSR")                     # two of them this process's own threads
    assert threads.free_cores() == 3                                   # (an OpenMP worker still spinning)
    _runnable(monkeypatch, tmp_path, 9)                                # more runnable tasks than cores
    assert threads.threads_for(small) == 1
    monkeypatch.setattr(threads, "LOADAVG", tmp_path / "missing")      # no /proc: one thread, as before
    assert threads.free_cores() is None and threads.threads_for(small) == 1
    assert threads.threads_for(small, explicit=3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert threads.threads_for(small) == 6                             # the user's setting stands


def test_free_cores_reads_this_machine():
    free = threads.free_cores()
    assert free is None or free <= len(threads.os.sched_getaffinity(0))


def test_cli_sets_threads_and_checks_the_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1})
    _runnable(monkeypatch, tmp_path, 2)                                # another task runs: one core free
    before = torch.get_num_threads()
    try:
        code, _, err = run(["txt2img", "a red apple", "--steps", "2", "--no-progress", "--out", str(tmp_path / "a.png")],
                           capsys)
        assert code == 0, err
        assert torch.get_num_threads() == 1                             # the shipped model is small, one core free
        code, _, err = run(["txt2img", "a red apple", "--steps", "2", "--threads", "2", "--no-progress",
                            "--out", str(tmp_path / "b.png")], capsys)
        assert code == 0 and torch.get_num_threads() == 2
        code, _, err = run(["txt2img", "x", "--threads", "0", "--out", str(tmp_path / "c.png")], capsys)
        assert code == 2 and "--threads" in err and not (tmp_path / "c.png").exists()
    finally:
        torch.set_num_threads(before)


def test_server_worker_chooses_threads_before_every_job(monkeypatch, tmp_path):
    from sdlab.api import shipped_model_path
    from sdlab.pipeline.request import GenerationRequest
    from sdlab.server.inputs import JobSpec
    from sdlab.server.jobs import Job
    from sdlab.server.registry import ModelRegistry
    from sdlab.server.worker import ModelHost, Runner

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1})
    registry = ModelRegistry(shipped_model_path(), None)
    runner = Runner(ModelHost(registry, "cpu"), tmp_path / "images")
    before = torch.get_num_threads()
    try:
        for runnable, expected in ((2, 1), (1, 2), (3, 1)):               # one core busy, both free, both busy
            _runnable(monkeypatch, tmp_path, runnable)
            request = GenerationRequest(prompt="a red apple", steps=2, seed=runnable)
            job = Job(id=f"job{runnable}", mode="txt2img", model=registry.default.title, spec=JobSpec(request),
                      created=0.0)
            runner.run(job)
            assert job.images and torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(before)


def test_a_large_model_gets_torchs_default_back_after_a_small_one(monkeypatch, tmp_path):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "SMALL_MODEL_PARAMETERS", 1000)
    _runnable(monkeypatch, tmp_path, 9)
    before = torch.get_num_threads()
    try:
        threads.use_threads_for(nn.Linear(10, 10), torch.device("cpu"))
        assert torch.get_num_threads() == 1
        threads.use_threads_for(nn.Linear(100, 100), torch.device("cpu"))
        assert torch.get_num_threads() == threads.DEFAULT_THREADS
    finally:
        torch.set_num_threads(before)


def test_a_count_set_for_one_thread_is_not_the_one_later_threads_start_with():
    """The server's worker sets the count before each job; a thread started afterwards (an `asyncio.to_thread`
    model load or upscale) starts with torch's default, not the job's count, while the worker keeps its own."""
    before = torch.get_num_threads()
    chosen = threads.DEFAULT_THREADS + 1
    seen: dict[str, int] = {}

    def worker() -> None:
        threads.use_threads_for(nn.Linear(10, 10), torch.device("cpu"), chosen)
        seen["worker"] = torch.get_num_threads()
        later = threading.Thread(target=lambda: seen.setdefault("later", torch.get_num_threads()))
        later.start()
        later.join()
        seen["worker after"] = torch.get_num_threads()

    try:
        job = threading.Thread(target=worker)
        job.start()
        job.join()
    finally:
        torch.set_num_threads(before)
    assert seen == {"worker": chosen, "later": threads.DEFAULT_THREADS, "worker after": chosen}
    assert before == torch.get_num_threads()
