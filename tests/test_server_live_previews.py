"""Live previews are drawn only where a client asks for them: `GET /sdapi/v1/progress` draws one as A1111 1.10's
`State.set_current_image` does (`live_previews_enable`, `show_progress_every_n_steps`, A1111's defaults), the native
events stream at each step while a client follows it, and a job nobody watches draws none. In process: the
worker on the shipped model, the preview projection counted by a spy."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from a1111_image_grid import a1111_image_grid
from sdlab.api import shipped_model_path
from sdlab.pipeline.request import GenerationRequest
from sdlab.server.a1111 import OPTION_DEFAULTS, _a1111_jobs
from sdlab.server.inputs import JobSpec
from sdlab.server.jobs import Job
from sdlab.server.previews import LatentPreviewer
from sdlab.server.registry import ModelRegistry
from sdlab.server.worker import ModelHost, Runner


class A1111State:
    """A1111 1.10 `modules/shared_state.State`, the lines that draw `current_image` (the preview is its
    `sampling_step` here), with `shared.opts` as arguments."""

    def __init__(self) -> None:
        self.sampling_step = 0
        self.current_image_sampling_step = 0
        self.current_image = None
        self.current_latent = None
        self.drawn = []                 # not A1111's: the latents it draws previews of

    def nextjob(self, live_previews_enable: bool, show_progress_every_n_steps: int) -> None:
        if live_previews_enable and show_progress_every_n_steps == -1:
            self.do_set_current_image()
        self.sampling_step = 0
        self.current_image_sampling_step = 0

    def set_current_image(self, live_previews_enable: bool, show_progress_every_n_steps: int) -> None:
        if (self.sampling_step - self.current_image_sampling_step >= show_progress_every_n_steps
                and live_previews_enable and show_progress_every_n_steps != -1):
            self.do_set_current_image()

    def do_set_current_image(self) -> None:
        if self.current_latent is None:
            return
        self.current_image = self.current_latent        # A1111's sample_to_image(self.current_latent)
        self.drawn.append(self.current_latent)
        self.current_image_sampling_step = self.sampling_step


def test_a1111_defaults():
    assert OPTION_DEFAULTS["show_progress_every_n_steps"] == 10 and OPTION_DEFAULTS["live_previews_enable"] is True


@pytest.mark.parametrize("every", [10, 3, 1, 0, -1])
@pytest.mark.parametrize("enabled", [True, False])
def test_progress_polls_draw_previews_as_a1111s_set_current_image(every, enabled):
    """Three batches of a hires job (passes of 12 and 6 steps: six of A1111's jobs), the second skipped after 5
    steps of its first pass (A1111 runs no step of its second pass; sdlab's worker counts on from the batch's end),
    polled at every step of a first pass and every other step of a second: the latent each preview shown was drawn
    from as A1111's, each drawn once (-1: the estimate each pass ended on, drawn by A1111's `nextjob`)."""
    job = Job(id="j", mode="txt2img", model="m", spec=JobSpec(GenerationRequest("x", hr_scale=2.0), batch_count=3),
              created=0.0, passes=(12, 6), steps=54)
    drawn = []
    job.previewer = lambda latent: drawn.append(int(latent)) or torch.tensor(int(latent))
    state = A1111State()
    shown_sdlab, shown_a1111 = [], []
    for job_no, steps_run in enumerate((12, 6, 5, 0, 12, 6)):
        if job_no:
            state.nextjob(enabled, every)
        if job_no == 3:
            job.step = 36               # `_batches` after the skip: the second batch's end
        for step in range(1, steps_run + 1):
            job.step += 1
            job.store_latent(torch.tensor([job.step]))     # a batch of one picture
            state.current_latent, state.sampling_step = job.step, step
            if step % (1 + job_no % 2):
                continue
            assert _a1111_jobs(job.spec, job.passes, job.step)[1:3] == (job_no, step)
            preview = job.a1111_preview((job_no, step), every, enabled)
            state.set_current_image(enabled, every)
            shown_sdlab.append(None if preview is None else int(preview))
            shown_a1111.append(state.current_image)
    assert shown_sdlab == shown_a1111 and drawn == list(dict.fromkeys(state.drawn))
    assert (drawn == []) == (not enabled)
    if every == -1 and enabled:
        assert drawn == [12, 18, 23, 48]       # each pass's last estimate, the skipped batch's at its 5th step


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    torch.set_num_threads(1)
    registry = ModelRegistry(shipped_model_path(), None)
    return Runner(ModelHost(registry, "cpu"), tmp_path_factory.mktemp("images")), registry


def _job(registry: ModelRegistry, steps: int = 6) -> Job:
    return Job(id=uuid.uuid4().hex, mode="txt2img", model=registry.default.title,
               spec=JobSpec(GenerationRequest(prompt="a red apple", steps=steps, seed=1, width=64, height=64)),
               created=0.0)


@pytest.fixture
def projections(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = LatentPreviewer.rgb

    def spy(self, latent):
        calls.append(1)
        return real(self, latent)

    monkeypatch.setattr(LatentPreviewer, "rgb", spy)
    return calls


def test_a_job_nobody_watches_draws_no_preview(runner, projections):
    runner, registry = runner
    job = _job(registry)
    runner.run(job)
    assert job.images and job.step == 6 and projections == []


def test_a_followed_job_draws_a_preview_at_each_step(runner, projections):
    runner, registry = runner
    job = _job(registry)
    loop = asyncio.new_event_loop()
    try:
        queue = job.subscribe(loop)
        runner.run(job)
        loop.run_until_complete(asyncio.sleep(0))
        events = [queue.get_nowait()[0] for _ in range(queue.qsize())]
    finally:
        loop.close()
    assert events.count("step") == 6 and len(projections) == 6


@pytest.mark.parametrize("batch", [1, 2, 3, 4])
def test_a_batchs_progress_preview_is_a1111s_grid_of_its_pictures(runner, batch):
    """A1111 1.10 previews a batch as one grid of its pictures' previews (`samples_to_image_grid`); before, the
    progress preview showed the first picture alone. The batch drawn in process, polled as /progress polls."""
    runner, registry = runner
    job = _job(registry, steps=2)
    job.spec = JobSpec(replace(job.spec.request, batch_size=batch))
    runner.run(job)
    latents = job.latent                                        # the last step's estimate, (batch, C, h, w)
    assert latents.shape[0] == batch
    shown = job.a1111_preview((0, 2), 1, True)
    expected = a1111_image_grid([Image.fromarray(job.previewer(latent).numpy()) for latent in latents])
    assert np.array_equal(shown.numpy(), np.asarray(expected))
    height, width, _ = job.previewer(latents[0]).shape
    rows, columns = (1, batch) if batch < 3 else (2, 2)         # round(sqrt(n)) rows, 3 leaving a white slot
    assert tuple(shown.shape) == (rows * height, columns * width, 3)
