"""Jobs, the bounded queue, and the one worker thread that runs them.

A job goes queued -> running -> done | failed | cancelled, or `interrupted` when the server stops under
it (`JobQueue.stop_jobs`; on the next start when it could not record that, its pictures written until then
kept: its row is written as each batch's are). Its events (queued, started,
step, done, failed, cancelled) go to every subscriber (an asyncio queue of the server's event loop); a
subscriber that comes late gets the job's state first. Cancelling a queued job takes it out of the queue;
cancelling a running one raises from the sampler's progress callback at the next step, so nothing of the
batch it stops is decoded or written, and no later batch starts; the batches it finished (A1111's n_iter)
keep their pictures. An interrupt (A1111's) stops it at the same point, but the batch it stops ends with its
pictures as far as they got (the latest step's x0 estimate decoded, as A1111's sampler returns it); a skip
(A1111's) ends the running batch alone that way, and the job goes on with its next one.

A history write that fails (a full disk, the database locked by another program) is logged and the job
goes on: the worker keeps serving and every job still ends with its final event.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from sdlab.pipeline.hires import hires_steps
from sdlab.pipeline.plan import GenerationPlan
from sdlab.pipeline.request import GenerationRequest
from sdlab.server.inputs import JobSpec
from sdlab.server.previews import batch_preview
from sdlab.server.store import INTERRUPTED_ERROR, Store, StoreError

logger = logging.getLogger("sdlab.server")

FINAL_STATES = ("done", "failed", "cancelled", "interrupted")


class QueueFull(Exception):
    """More jobs are waiting than `--max-queue` allows (HTTP 429)."""


class Unavailable(Exception):
    """The server takes no job now: it is stopping, or its job history cannot be written (HTTP 503)."""


class JobCancelled(Exception):
    """Raised from the progress callback to stop a running job between steps."""


class ServerFault(Exception):
    """A job failed for the server's sake, not its request's (its pictures cannot be written): the message is the
    job's error as it stands (no server path in it), and an A1111 call answers 500."""


@dataclass
class Job:
    id: str
    mode: str
    model: str                                  # the checkpoint's title
    spec: JobSpec
    created: float
    status: str = "queued"
    started: float | None = None
    finished: float | None = None
    step: int = 0
    steps: int = 0                              # every sampler step of the job; 0 until it is resolved (`count_steps`)
    passes: tuple[int, ...] = ()                # the sampler steps of each pass of one batch (`pass_steps`)
    number: float = 0                           # its place in the queue's order (`Place`), lowest drawn first
    images: list[str] = field(default_factory=list)      # file names in the output folder
    infotexts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    error: str | None = None
    server_fault: bool = False                  # failed for the server's sake: not a `ValueError` of its request
    settings: dict[str, Any] = field(default_factory=dict)
    cancel: threading.Event = field(default_factory=threading.Event)
    skip: threading.Event = field(default_factory=threading.Event)      # its running batch only (`JobQueue.skip`)
    interrupt: threading.Event = field(default_factory=threading.Event)  # a cancel keeping that batch's pictures
    finished_event: threading.Event = field(default_factory=threading.Event)
    latent: Tensor | None = None                # the latest step's x0 estimate of its batch (B, C, h, w)
    previewer: Callable[[Tensor], Tensor] | None = None     # a latent -> its preview, (h, w, 3) uint8
    preview: Tensor | None = None               # the latest step's preview, drawn while a client follows its steps
    current_image: Tensor | None = None         # A1111's `State.current_image`: drawn as /progress asks (`a1111_preview`)
    _current_at: tuple[int, int] = (0, 0)       # A1111's (job_no, sampling_step) it was drawn at
    _latent_pass: int = 0                       # A1111's job_no of `latent`
    _pass_end: Tensor | None = None             # the x0 estimate the last pass ended on, until drawn (A1111's `nextjob`)
    saved: Callable[[], None] | None = None     # writes its row while it runs (`JobQueue`): a batch's pictures on disk
    _subscribers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue, bool, bool]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self) -> dict[str, Any]:
        """The row the store keeps."""
        return {"id": self.id, "status": self.status, "mode": self.mode, "model": self.model,
                "request": self.settings, "images": self.images, "infotexts": self.infotexts,
                "error": self.error, "created": self.created, "started": self.started,
                "finished": self.finished, "step": self.step, "steps": self.steps}

    def count_steps(self, plan: GenerationPlan) -> None:
        """The job's step counts from the resolved `plan` of its first batch (the worker's, before the first
        step): each pass's of a batch, and all its batches' steps, both passes of the hires fix counted in each
        (as A1111's progress counts them)."""
        passes = pass_steps(plan)
        self.steps = sum(passes) * self.spec.batch_count
        self.passes = passes        # last: a reader that reads `passes` first and sees them sees the total

    def followed(self) -> bool:
        """Whether a client follows its step events (the native events stream, the web UI)."""
        with self._lock:
            return any(steps for _, _, steps, _ in self._subscribers)

    def store_latent(self, latent: Tensor) -> None:
        """A1111's `store_latent`: `latent` is the x0 estimate of the step just counted (`step`); when that step
        starts a new pass, the estimate the pass before ended on is kept for `a1111_preview`'s -1."""
        at = self._pass_of(self.step)
        with self._lock:
            if self.latent is not None and at != self._latent_pass:
                self._pass_end = self.latent
            self.latent, self._latent_pass = latent, at

    def _pass_of(self, step: int) -> int:
        """A1111's job_no of the job's `step`-th sampler step (from 1): each pass of each batch is one."""
        if not self.passes:
            return 0
        batch, within = divmod(step - 1, sum(self.passes))
        return batch * len(self.passes) + sum(within >= end for end in itertools.accumulate(self.passes))

    def a1111_preview(self, at: tuple[int, int], every: int, enabled: bool) -> Tensor | None:
        """A1111's `State.set_current_image`, which its progress API calls: the preview drawn anew where live
        previews are `enabled`, from the latest x0 estimate where, in A1111's pass `at` = (job_no, sampling_step),
        `every` steps have run since the last one (show_progress_every_n_steps), or with `every` -1 from the
        estimate a pass ended on, once (as A1111's `nextjob` draws it at the end of each pass); else the preview
        drawn last (or None)."""
        with self._lock:
            if every == -1:
                latent, self._pass_end = self._pass_end, None
            else:
                since = at[1] - (self._current_at[1] if self._current_at[0] == at[0] else 0)
                latent = self.latent if since >= every else None
            previewer = self.previewer
            if not (enabled and latent is not None and previewer is not None):
                return self.current_image
            if every != -1:
                self._current_at = at
        image = batch_preview([previewer(picture) for picture in latent])     # a batch's in one grid, as A1111's
        self.current_image = image
        return image

    def final_event(self) -> tuple[str, dict[str, Any]] | None:
        return final_event(self.record()) if self.status in FINAL_STATES else None

    def subscribe(self, loop: asyncio.AbstractEventLoop, steps: bool = True, previews: bool = False) -> asyncio.Queue:
        """An asyncio queue of this job's events from now on, starting with its current state (without the
        step events when `steps` is False: a waiter for the end does not wake the event loop every step; with
        `previews` each step event's data holds that step's `preview` as published, which a reader of
        `Job.preview` may miss where the job moves on, or ends, before it reads)."""
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            final = self.final_event()
            if final is not None:
                queue.put_nowait(final)
            else:
                queue.put_nowait(("started", self._started_data()) if self.status == "running"
                                 else ("queued", {"id": self.id}))
                self._subscribers.append((loop, queue, steps, previews))
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        with self._lock:
            self._subscribers = [entry for entry in self._subscribers if entry[1] is not queue]

    def publish(self, name: str, data: dict[str, Any]) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
            if name in ("done", "failed", "cancelled"):
                self._subscribers.clear()
        for loop, queue, steps, previews in subscribers:
            if name == "step" and not steps:
                continue
            event = (name, {**data, "preview": self.preview}) if name == "step" and previews else (name, data)
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:        # the loop closed (server shutting down)
                pass

    def _started_data(self) -> dict[str, Any]:
        return {"id": self.id, "steps": self.steps, "request": self.settings}


def final_event(record: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The last event of a finished job, from its record (live or from the store)."""
    status = record["status"]
    if status == "done":
        seeds, subseeds = image_seeds(record["request"], len(record["images"]))
        return "done", {"images": [image_url(name) for name in record["images"]], "seeds": seeds,
                        "subseeds": subseeds, "infotexts": record["infotexts"]}
    if status == "cancelled":
        return "cancelled", {"id": record["id"]}
    return "failed", {"error": record["error"] or status, "status": status}


def image_seeds(settings: dict[str, Any], count: int) -> tuple[list[int], list[int]]:
    """(seeds, subseeds) of `count` pictures drawn with the resolved `settings`, as the request numbers them
    (`GenerationRequest.seeds` / `subseeds`): seed + i; with a variation seed, `seed` for every picture and
    subseed + i. No subseeds without a variation seed."""
    request = GenerationRequest("", seed=settings.get("seed", 0), subseed=settings.get("subseed"),
                                subseed_strength=settings.get("subseed_strength") or 0.0, batch_size=count)
    return request.seeds(), request.subseeds() if request.subseed_strength else []


def image_url(name: str) -> str:
    return f"/api/images/{name}"


def pass_steps(plan: GenerationPlan) -> tuple[int, ...]:
    """The sampler steps (progress callbacks) of each pass of one batch of a resolved `plan`: the steps its
    sigmas run, then with the hires fix the second pass's (`hires_steps`, every one of which runs)."""
    return (plan.steps_run, hires_steps(plan.request)) if plan.request.hires else (plan.steps_run,)


RunFn = Callable[[Job], None]


@dataclass(frozen=True)
class Place:
    """Where a job joins the queue, as ComfyUI's POST /prompt places a prompt (server.py ``post_prompt``): the
    queue draws its jobs by number, lowest first (its heap), and among equal numbers in the order they came. A job's
    number is the count of jobs queued before it (every API's), its negative with `front` (before every job
    pending, the latest front first), or `number` where given."""

    front: bool = False
    number: float | None = None

    def number_of(self, arrival: int) -> float:
        """The number of the job that is the queue's `arrival`-th (from 0)."""
        if self.number is not None:
            return self.number
        return -arrival if self.front else arrival


IN_TURN = Place()           # a job queued after every one queued before it


class JobQueue:
    """A bounded queue of jobs, drawn by their numbers (`Place`: first in, first out unless a job asks for another
    place), and the worker thread that runs them one at a time with `run(job)`.

    `run` sets the job's results (or raises: `JobCancelled`, or any error, which fails the job)."""

    def __init__(self, store: Store, run: RunFn, max_queue: int, on_start: Callable[[], None] | None = None,
                 on_idle: Callable[[], None] | None = None) -> None:
        self.store = store
        self.max_queue = max_queue
        self._run = run
        self._on_start = on_start
        self._on_idle = on_idle             # called whenever a job's end, a cancel or a refused submit leaves the
                                            # queue idle (`release_if_idle`)
        self._queue: collections.deque[Job] = collections.deque()
        self._jobs: dict[str, Job] = {}     # queued and running jobs by id, and finished ones the store lacks
        self._condition = threading.Condition()
        self._stopping = False
        self._places_kept = 0               # jobs being submitted: their rows are being written
        self._arrivals = itertools.count()  # the jobs queued so far, which number them in turn (`Place`)
        self.current: Job | None = None
        self._thread = threading.Thread(target=self._work, name="sdlab-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """`stop_jobs`, then wait up to `timeout` seconds for the worker to end."""
        self.stop_jobs()
        self._thread.join(timeout)

    def stop_jobs(self) -> None:
        """Take no more jobs and end those there are as `interrupted`: the queued ones at once, the running
        one at its next step. Their clients get their final events."""
        with self._condition:
            self._stopping = True
            queued = list(self._queue)
            self._queue.clear()
            if self.current is not None:
                self.current.cancel.set()
            self._condition.notify_all()
        for job in queued:
            self._finish(job, "interrupted", INTERRUPTED_ERROR)

    def submit(self, spec: JobSpec, mode: str, model: str, settings: dict[str, Any],
               place: Place = IN_TURN, on_queued: Callable[[Job], None] | None = None) -> tuple[Job, int]:
        """Queue a job at its `place`; returns it and its position (0 = next). `QueueFull` past `max_queue` waiting
        jobs. `on_queued(job)` runs under the queue's lock as the job is queued, before the worker can start it
        (what follows the job, such as a script's run, is linked to it before any `/progress` can see it run); it
        must not call the queue.

        The job's row is written outside the queue's lock (a locked history holds up no other caller), in a
        place in the queue kept for it meanwhile."""
        job = Job(id=uuid.uuid4().hex, mode=mode, model=model, spec=spec, created=time.time(), settings=settings)
        self._keep_place()
        try:
            self.store.save_job(job.record())
        except StoreError as err:
            self._leave_place()
            raise Unavailable(str(err)) from None
        position = self._take_place(job, place, on_queued)
        if position is None:                # `stop_jobs` ran while the row was written
            self._finish(job, "interrupted", INTERRUPTED_ERROR)
            raise Unavailable("the server is stopping")
        return job, position

    def _keep_place(self) -> None:
        """Keep a place in the queue for a job being submitted; `Unavailable` while stopping, `QueueFull`."""
        with self._condition:
            if self._stopping:
                raise Unavailable("the server is stopping")
            waiting = len(self._queue) + self._places_kept
            if waiting >= self.max_queue:
                raise QueueFull(f"{waiting} jobs are waiting, the most this server queues (--max-queue)")
            self._places_kept += 1

    def _leave_place(self) -> None:
        with self._condition:
            self._places_kept -= 1

    def _take_place(self, job: Job, place: Place, on_queued: Callable[[Job], None] | None = None) -> int | None:
        """Queue `job` in its kept place, after every job of a number up to its own (`Place`); its position, or None
        when the server stopped meanwhile."""
        with self._condition:
            self._places_kept -= 1
            if self._stopping:
                return None
            job.number = place.number_of(next(self._arrivals))
            position = next((i for i, other in enumerate(self._queue) if other.number > job.number),
                            len(self._queue))
            self._queue.insert(position, job)
            self._jobs[job.id] = job
            if on_queued is not None:
                on_queued(job)
            self._condition.notify_all()
            return position

    def get(self, job_id: str) -> Job | None:
        with self._condition:
            return self._jobs.get(job_id)

    def position(self, job: Job) -> int | None:
        with self._condition:
            return self._queue.index(job) if job in self._queue else None

    def queued(self) -> list[Job]:
        """The jobs waiting, in the order the worker draws them."""
        with self._condition:
            return list(self._queue)

    def release_if_idle(self) -> None:
        """Call `on_idle` when no job runs, waits or is being queued: the one rule after a job ends, after a
        cancel and after a refused submit (`Service.submit`), so that what jobs were checked or run with (their
        tags' LoRA files) is held only while one of them is queued or running."""
        with self._condition:
            idle = self.current is None and not self._queue and not self._places_kept
        if idle and self._on_idle is not None:
            self._on_idle()

    def counts(self) -> tuple[int, int]:
        """(queued, running) job counts."""
        with self._condition:
            return len(self._queue), int(self.current is not None)

    def cancel(self, job: Job) -> str:
        """Cancel a queued job at once, a running one at its next step; returns the status after."""
        with self._condition:
            queued = job in self._queue
            if queued:
                self._queue.remove(job)
            elif job.status == "running":
                job.cancel.set()
        if queued:
            self._finish(job, "cancelled", None)
            self.release_if_idle()
        return job.status

    def interrupt(self, only: Job | None = None) -> bool:
        """Cancel the running job as A1111's interrupt does, its running batch ending with its pictures as far as
        they got (its steps counted as run); False when nothing runs, or when it is not `only`."""
        with self._condition:
            job = self.current
            if job is None or only not in (None, job):
                return False
            job.interrupt.set()
            job.cancel.set()
            return True

    def skip(self, only: Job | None = None) -> bool:
        """Stop the running job's current batch, the job going on with its next (A1111's skip, which ends the
        current iteration of its n_iter); False when nothing runs, or when it is not `only`."""
        with self._condition:
            job = self.current
            if job is None or only not in (None, job):
                return False
            job.skip.set()
            return True

    def _finish(self, job: Job, status: str, error: str | None, by_worker: bool = False) -> None:
        job.status, job.error, job.finished = status, error, time.time()
        job.latent = job.preview = job.current_image = job._pass_end = None
        self._save(job, by_worker)
        name, data = job.final_event() or ("failed", {"error": status})
        job.publish(name, data)
        job.finished_event.set()

    def _save(self, job: Job, by_worker: bool = False) -> None:
        """Write the job's row, then those of finished jobs an earlier write failed to store; a finished job
        leaves memory once its row is written. A write that fails is logged, nothing more: the job goes on
        (a finished one stays in memory for `get`), and a row left `queued` or `running` is marked
        `interrupted` on the next start. Never called under the queue's lock; `by_worker`: the worker's
        write, which waits longer on a locked history (`Store.save_job`)."""
        with self._condition:
            held = [other for other in self._jobs.values() if other is not job and other.status in FINAL_STATES]
        for row in (job, *held):
            try:
                self.store.save_job(row.record(), by_worker=by_worker)
            except StoreError as err:
                logger.error("job %s goes on without its history row: %s", row.id, err)
                return
            if row.status in FINAL_STATES:
                with self._condition:
                    self._jobs.pop(row.id, None)

    def _work(self) -> None:
        if self._on_start is not None:
            try:
                self._on_start()
            except Exception:          # the first job reports the same error in its own record
                logger.exception("loading the startup model failed")
        while True:
            with self._condition:
                while not self._queue and not self._stopping:
                    self._condition.wait()
                if self._stopping:
                    return
                job = self._queue.popleft()
                self.current = job
                job.status, job.started = "running", time.time()
            job.saved = lambda job=job: self._save(job, by_worker=True)
            job.saved()
            job.publish("started", job._started_data())
            status, error = "done", None
            try:
                self._run(job)
            except JobCancelled:                # by a client, or by `stop_jobs`
                status, error = ("interrupted", INTERRUPTED_ERROR) if self._stopping else ("cancelled", None)
            except Exception as err:            # reported in the job, the worker keeps serving
                status, error = "failed", _message(err)
                job.server_fault = not isinstance(err, ValueError)
                if not isinstance(err, (ValueError, ServerFault)):
                    logger.exception("job %s failed", job.id)
            with self._condition:
                self.current = None
            self.release_if_idle()
            self._finish(job, status, error, by_worker=True)


def _message(err: Exception) -> str:
    text = str(err) or type(err).__name__
    return text if isinstance(err, (ValueError, ServerFault)) else f"internal error: {type(err).__name__}: {text}"
