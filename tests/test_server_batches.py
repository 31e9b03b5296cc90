"""A job of several batches on `sdlab serve` (A1111's `n_iter`, the job's `batch_count`), in process: every
batch's seeds are checked before the first is drawn, as `sdlab txt2img --batch-count` checks them."""

from __future__ import annotations

import pytest

from cli_helpers import run
from sdlab.pipeline.request import MAX_SEED, GenerationRequest
from sdlab.server.config import ServerConfig
from sdlab.server.inputs import BadRequest, JobSpec
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
