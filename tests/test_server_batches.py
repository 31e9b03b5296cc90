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
