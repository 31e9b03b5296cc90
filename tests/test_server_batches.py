"""A job of several batches on `sdlab serve` (A1111's `n_iter`, the job's `batch_count`), in process: every
batch's seeds are checked before the first is drawn, as `sdlab txt2img --batch-count` checks them; the
pictures of a request are bounded (`--max-images`) and each batch's are written as it is drawn; an interrupt
keeps the batches finished before it and a skip stops the running batch alone, as A1111's."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from cli_helpers import run
from sdlab.pipeline.generate import SamplingStopped
from sdlab.pipeline.request import MAX_SEED, GenerationRequest
from sdlab.server.config import ServerConfig
from sdlab.server.inputs import BadRequest, JobSpec
from sdlab.server.jobs import JobCancelled
from sdlab.server.service import Service

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

FAST = dict(steps=2, width=32, height=32, cfg_scale=5.0, sampler="Euler")


@pytest.fixture
def service(tmp_path):
    """The server's parts (the shipped model), not started: `runner.run(job)` runs a job here."""
    served = Service(ServerConfig(tmp_path / "served"))
    yield served
    served.store.close()


def test_every_batchs_seeds_are_checked_before_the_first_is_drawn(service, capsys):
    """seed (or, with a variation seed, subseed) + batch_count x batch_size - 1 past the seeds torch takes is a
    400 when the job is submitted, with the message `sdlab txt2img --batch-count` gives; a job whose last
    picture's seed is the largest is queued."""
    cases = [(dict(seed=MAX_SEED - 2), 4, f"seed {MAX_SEED - 2} + 3 is outside the seeds"),
             (dict(seed=5, subseed=MAX_SEED - 4, subseed_strength=0.5, batch_size=2), 3,
              f"subseed {MAX_SEED - 4} + 5 is outside the seeds")]
    for fields, count, message in cases:
        with pytest.raises(BadRequest, match=message.replace("+", r"\+")) as refused:
            service.submit(JobSpec(GenerationRequest("a castle", **FAST, **fields), batch_count=count), "txt2img", None)
        assert refused.value.status == 400
    assert service.queue.counts() == (0, 0)
    service.submit(JobSpec(GenerationRequest("a castle", **FAST, seed=MAX_SEED - 2), batch_count=3), "txt2img", None)
    assert service.queue.counts() == (1, 0)
    code, _, err = run(["txt2img", "a castle", "--seed", str(MAX_SEED - 2), "--batch-count", "4", "--steps", "2",
                        "--no-progress", "--out", str(service.config.output_dir / "cli.png")], capsys)
    assert code == 2 and cases[0][2] in err, err


def test_the_pictures_of_a_request_are_bounded_by_max_images(tmp_path):
    """`--max-images` bounds batch_size x n_iter (the job's batch_count), not only each batch (`--max-batch`):
    past it a 400 naming the limit, A1111's fields named as sent."""
    from sdlab.server.a1111 import _a1111_named
    from sdlab.server.config import Limits

    service = Service(ServerConfig(tmp_path / "served", limits=Limits(max_batch=4, max_images=6)))
    try:
        with pytest.raises(BadRequest) as refused:
            service.submit(JobSpec(GenerationRequest("a castle", **FAST, batch_size=4), batch_count=2), "txt2img", None)
        assert refused.value.status == 400 and _a1111_named(str(refused.value)) == (
            "at most 6 images per request on this server (--max-images), got batch_size 4 x n_iter 2")
        service.submit(JobSpec(GenerationRequest("a castle", **FAST, batch_size=3), batch_count=2), "txt2img", None)
        assert service.queue.counts() == (1, 0)
    finally:
        service.store.close()


def test_each_batch_is_written_as_it_is_drawn(service):
    """The worker writes a batch's pictures (all or nothing) once it is drawn and keeps none of them: while
    batch k draws, the files of batches 0..k-1 are on disk; the job lists every picture, seeds continuing."""
    request = GenerationRequest("a castle", **FAST, seed=40, batch_size=2)
    job, _ = service.submit(JobSpec(request, batch_count=3), "txt2img", None)
    on_disk = []
    job.publish = lambda name, data: on_disk.append(len(list(service.images_dir.iterdir()))) if name == "step" else None
    service.runner.run(job)
    assert on_disk == [0, 0, 2, 2, 4, 4]                                 # 2 steps a batch
    assert job.images == [f"{job.id}-{i}.png" for i in range(6)] and job.seeds == list(range(40, 46))
    assert [text.count("Seed: ") for text in job.infotexts] == [1] * 6
    assert [int(text.split("Seed: ")[1].split(",")[0]) for text in job.infotexts] == job.seeds


def _job(service: Service, count: int = 3, steps: int = 2):
    """A queued job of `count` batches of 2 pictures (`steps` steps each, seeds from 40), made the running one as
    the worker makes it (`JobQueue.current`), so that interrupt and skip reach it; `runner.run(job)` runs it."""
    request = GenerationRequest("a castle", **{**FAST, "steps": steps}, seed=40, batch_size=2)
    job, _ = service.submit(JobSpec(request, batch_count=count), "txt2img", None)
    service.queue.current = job
    return job


def _at_step(job, step: int, action) -> list[int]:
    """The steps the job reports (a list filled as it runs); `action()` once it has reported `step`."""
    steps: list[int] = []

    def publish(name: str, data: dict) -> None:
        if name == "step":
            steps.append(data["i"])
            if data["i"] == step:
                action()

    job.publish = publish
    return steps


def _stopped(service: Service, seed: int, steps: int, at: int) -> list[np.ndarray]:
    """The pixels of a batch of 2 at `seed` drawn with `steps` steps and stopped after its step `at`
    (`SamplingStopped` from the progress callback): the pictures of that step's x0 estimate."""
    def progress(info) -> None:
        if info.i + 1 == at:
            raise SamplingStopped

    request = GenerationRequest("a castle", **{**FAST, "steps": steps}, seed=seed, batch_size=2)
    with pytest.raises(SamplingStopped) as stopped:
        service.host.pipeline(service.host.selected).run(request, progress=progress)
    return [np.asarray(image) for image in stopped.value.result.images]


def _pixels(service: Service, names: list[str]) -> list[np.ndarray]:
    return [np.asarray(Image.open(service.images_dir / name).convert("RGB")) for name in names]


def test_an_interrupt_keeps_the_batches_before_it_and_the_one_it_stops_as_far_as_it_got(service):
    """An interrupt in batch 1 of 3 stops the job there, as A1111's n_iter loop stops at `interrupted`: batch 0
    keeps its pictures, and batch 1 ends with its pictures as far as they got, as A1111's sampler returns its
    latest x0 estimate (`launch_sampling`: `except InterruptedException: return self.last_latent`), decoded
    and written as any batch's; batch 2 is not drawn."""
    job = _job(service, steps=4)
    steps = _at_step(job, 5, service.queue.interrupt)                      # batch 1's first step
    with pytest.raises(JobCancelled):
        service.runner.run(job)
    assert steps == [1, 2, 3, 4, 5] and job.seeds == [40, 41, 42, 43] and len(job.infotexts) == 4
    assert (job.step, job.steps) == (5, 12)                 # the steps drawn, not the stopped batch's end
    assert job.images == [f"{job.id}-{i}.png" for i in range(4)]
    assert sorted(path.name for path in service.images_dir.iterdir()) == job.images
    reference = _stopped(service, 42, steps=4, at=2)                    # the callback after the interrupt stops it
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(service, job.images[2:]), reference))
    assert "Seed: 42," in job.infotexts[2] and "Steps: 4," in job.infotexts[2]


def test_an_interrupt_seen_before_its_cancel_stops_the_job_all_the_same(service):
    """`JobQueue.interrupt` sets the job's interrupt, then its cancel: a worker that ends the stopped batch between
    the two still stops the job there, and draws no next batch (which would stop at its first step again)."""
    job = _job(service, steps=4)
    _at_step(job, 5, job.interrupt.set)                     # the interrupt alone, its cancel not set yet
    with pytest.raises(JobCancelled):
        service.runner.run(job)
    assert job.images == [f"{job.id}-{i}.png" for i in range(4)] and job.seeds == [40, 41, 42, 43]


def test_a_cancel_writes_nothing_of_the_batch_it_stops(service):
    """The native API's cancel (DELETE: `JobQueue.cancel` of the running job) is not A1111's interrupt: the batch
    it stops writes nothing."""
    job = _job(service, steps=4)
    _at_step(job, 5, job.cancel.set)
    with pytest.raises(JobCancelled):
        service.runner.run(job)
    assert job.images == [f"{job.id}-0.png", f"{job.id}-1.png"] and job.seeds == [40, 41]


def test_skip_ends_the_running_batch_as_far_as_it_got_and_goes_on(service):
    """A1111's skip ends the current iteration of n_iter with its pictures as far as they got and the next goes
    on: skipped in batch 1, batch 1 keeps its stopped pictures and batch 2 is drawn whole (the pictures of a
    request at seed 44); the progress counts batch 1's steps as run. A skip after a batch's last step skips
    nothing (A1111 clears `skipped` as an iteration starts)."""
    job = _job(service, steps=4)
    steps = _at_step(job, 5, service.queue.skip)
    service.runner.run(job)
    assert steps == [1, 2, 3, 4, 5, 9, 10, 11, 12] and job.step == job.steps == 12
    assert job.seeds == list(range(40, 46)) and len(job.images) == 6
    reference = _stopped(service, 42, steps=4, at=2)
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(service, job.images[2:4]), reference))
    alone = _job(service, count=1, steps=4)
    alone.spec = replace(alone.spec, request=replace(alone.spec.request, seed=44))
    alone.settings = {**alone.settings, "seed": 44}
    service.runner.run(alone)
    pictures = [(service.images_dir / name).read_bytes() for name in job.images[4:]]
    assert pictures == [(service.images_dir / name).read_bytes() for name in alone.images]   # parameters too
    late = _job(service, steps=4)
    _at_step(late, 4, service.queue.skip)                                   # batch 0's last step
    service.runner.run(late)
    assert late.seeds == list(range(40, 46))
    whole = _pixels(service, late.images[:4])
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(service, job.images[:2]), whole[:2]))
    assert not np.array_equal(_pixels(service, job.images[2:3])[0], whole[2])           # batch 1 stopped


def test_a_skipped_a1111_request_of_one_batch_answers_with_its_picture_as_far_as_it_got(tmp_path, monkeypatch):
    """A1111 answers a skip in a one-iteration request with the picture of its latest x0 estimate, not with no
    picture: so does sdlab, the job `done`, not interrupted."""
    from sdlab.server.a1111 import Txt2ImgIn, _generate, _request
    from sdlab.server.jobs import Job

    service = Service(ServerConfig(tmp_path / "served"))
    publish = Job.publish

    def skip_at_step_2(job, name: str, data: dict) -> None:
        publish(job, name, data)
        if name == "step" and data["i"] == 2:
            service.queue.skip()

    monkeypatch.setattr(Job, "publish", skip_at_step_2)
    service.start()
    try:
        body = Txt2ImgIn(prompt="a castle", steps=6, width=32, height=32, cfg_scale=5, sampler_name="Euler", seed=40)
        answer = asyncio.run(_generate(service, body, "txt2img", _request(body)))
        (job,) = service.store.jobs(1)
    finally:
        service.stop()
    info = json.loads(answer["info"])
    assert len(answer["images"]) == 1 and not info["interrupted"] and job["status"] == "done"
    assert "Steps: 6," in info["infotexts"][0] and len(job["images"]) == 1


def test_an_interrupted_a1111_request_answers_with_the_batches_drawn(tmp_path, monkeypatch):
    """The A1111 answer to an n_iter request interrupted between batches: the pictures of the batches drawn,
    `interrupted`, their infotexts, and (as A1111's) every seed of the request in `all_seeds`."""
    from sdlab.server.a1111 import Txt2ImgIn, _generate, _request

    service = Service(ServerConfig(tmp_path / "served"))
    write = service.runner._write_batch

    def write_then_interrupt(job, result, texts) -> None:
        write(job, result, texts)
        service.queue.interrupt()

    monkeypatch.setattr(service.runner, "_write_batch", write_then_interrupt)
    service.start()
    try:
        body = Txt2ImgIn(prompt="a castle", steps=2, width=32, height=32, cfg_scale=5, sampler_name="Euler", seed=40,
                         batch_size=2, n_iter=3)
        answer = asyncio.run(_generate(service, body, "txt2img", _request(body)))
    finally:
        service.stop()
    info = json.loads(answer["info"])
    assert len(answer["images"]) == 2 and info["interrupted"] and len(info["infotexts"]) == 2
    assert info["all_seeds"] == list(range(40, 46)) and "Seed: 41," in info["infotexts"][1]


def test_the_history_lists_each_batch_as_it_is_written(tmp_path, monkeypatch):
    """A job's row is written once each batch's pictures are on disk, so a crash (which leaves the row
    `running`, marked `interrupted` on the next start) keeps the pictures drawn before it in the history."""
    service = Service(ServerConfig(tmp_path / "served"))
    write, rows = service.runner._write_batch, []

    def write_then_read_the_row(job, result, texts) -> None:
        write(job, result, texts)
        rows.append(service.store.job(job.id))

    monkeypatch.setattr(service.runner, "_write_batch", write_then_read_the_row)
    service.start()
    try:
        job, _ = service.submit(JobSpec(GenerationRequest("a castle", **FAST, seed=40, batch_size=2), batch_count=2),
                                "txt2img", None)
        assert job.finished_event.wait(120) and job.status == "done"
    finally:
        service.stop()
    assert [(row["status"], row["images"]) for row in rows] == [("running", job.images[:2]), ("running", job.images)]
    assert rows[0]["infotexts"] == job.infotexts[:2] and rows[0]["request"]["seed"] == 40


def test_pictures_that_cannot_be_written_fail_the_job_naming_the_folder_not_its_path(tmp_path):
    """A full disk or a read-only images folder: the job fails with the OS's reason and the folder as the client
    knows it (no server path), an A1111 call with a 500 (the server's fault, as A1111 answers its own errors);
    nothing is left behind and the next job draws once the folder can be written again."""
    from sdlab.server.a1111 import Txt2ImgIn, _generate, _request

    service = Service(ServerConfig(tmp_path / "served"))
    service.images_dir.rmdir()
    service.images_dir.write_bytes(b"")             # every file in it fails to open, as on a read-only mount
    body = Txt2ImgIn(prompt="a castle", steps=2, width=32, height=32, cfg_scale=5, sampler_name="Euler", seed=40)
    service.start()
    try:
        with pytest.raises(BadRequest) as failed:
            asyncio.run(_generate(service, body, "txt2img", _request(body)))
        (job,) = service.store.jobs(1)
        service.images_dir.unlink()
        service.images_dir.mkdir()
        answer = asyncio.run(_generate(service, body, "txt2img", _request(body)))
    finally:
        service.stop()
    message = "cannot write the pictures into images/ of the server's output folder: Not a directory"
    assert (failed.value.status, failed.value.message, job["status"], job["error"]) == (500, message, "failed", message)
    assert len(answer["images"]) == 1 and len(list(service.images_dir.iterdir())) == 1


@pytest.mark.parametrize("stop", ["interrupt", "skip"])
def test_a_stop_after_the_hires_first_pass_ends_as_a1111s(service, stop):
    """Reported after the first pass's last step (the upscaler not yet run), an interrupt ends the job with the
    first pass's pictures at their size (A1111's `sample_hr_pass` returns them) and a skip with the upscaled ones
    at the final size, no second-pass step run (A1111 checks for no skip before its upscaler)."""
    request = GenerationRequest("a castle", **{**FAST, "steps": 2}, seed=40, hr_scale=2, hr_upscaler="Latent")
    job, _ = service.submit(JobSpec(request), "txt2img", None)
    service.queue.current = job
    steps = _at_step(job, 2, getattr(service.queue, stop))
    try:
        service.runner.run(job)
    except JobCancelled:
        assert stop == "interrupt"
    side = request.width * (1 if stop == "interrupt" else 2)
    assert steps == [1, 2] and Image.open(service.images_dir / job.images[0]).size == (side, side)
