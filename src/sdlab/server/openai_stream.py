"""OpenAI's images API streamed (`stream: true`): a job's Server-Sent Events as gpt-image-1 sends them.

    event: image_generation.partial_image   (image_edit.partial_image for an edit)
    data: {type, b64_json, partial_image_index, created_at, size, quality, background, output_format}
    ...                                     `partial_images` (0..3) of them, the job's step previews
    event: image_generation.completed       (image_edit.completed), one per picture, in order
    data: {type, b64_json, created_at, size, quality, background, output_format, usage}

A partial image is the job's live preview (`server/previews.py`, the native events' step preview) at a step
spread evenly over its steps, scaled up to the picture's size, in the request's `output_format`; a job too short
for them all sends fewer, as OpenAI may. A job that ends without a picture sends one `error` event
(`{type: "error", error: {message, type, param, code}}`, what the `openai` package raises as an `APIError`). The
client leaving before the end (it disconnects) cancels the job as `DELETE /api/jobs/ID` does
(`JobEventsResponse`).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from PIL import Image
from starlette.types import Receive, Scope, Send
from torch import Tensor

from sdlab.server.jobs import FINAL_STATES, Job
from sdlab.server.previews import preview_image
from sdlab.server.service import Service

PARTIAL_IMAGES = 3                          # OpenAI's bound of `partial_images`
DISCONNECT_POLL_S = 0.5                     # how often a waiting request asks whether its client is still there
KEEPALIVE_S = 15.0                          # a comment line this often keeps proxies from closing a long wait
ENDED = ("done", "failed", "cancelled")
NO_USAGE = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}, "output_tokens": 0,
            "total_tokens": 0}              # OpenAI's token counts: sdlab meters none


def partial_steps(total: int, count: int) -> list[int]:
    """The steps (from 1) after which `count` partial images are sent, spread evenly over a job's `total` steps
    and before its end: total * k / (count + 1), k = 1..count; one step taken twice is sent once."""
    return sorted({total * k // (count + 1) for k in range(1, count + 1)} - {0})


def partial_picture(preview: Tensor, size: tuple[int, int] | None, fields: dict[str, Any]) -> bytes:
    """A (h, w, 3) uint8 step preview as a file in the request's format, scaled (bilinear) to the picture's
    `size` (width, height) where it is known."""
    image = preview_image(preview)
    if size is not None and image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    options = {} if fields["pillow_format"] == "PNG" else {"quality": fields["compression"]}
    image.save(buffer, format=fields["pillow_format"], **options)
    return buffer.getvalue()


def picture_size(job: Job) -> tuple[int, int] | None:
    """The (width, height) the job draws, as its record holds it once resolved (None before)."""
    width, height = job.settings.get("width"), job.settings.get("height")
    return (width, height) if isinstance(width, int) and isinstance(height, int) else None


def sse(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def event(kind: str, name: str, raw: bytes, size: str, fields: dict[str, Any], **extra: Any) -> str:
    """One `kind`.`name` event (kind image_generation / image_edit, name partial_image / completed)."""
    data = {"type": f"{kind}.{name}", "b64_json": base64.b64encode(raw).decode("ascii"),
            "created_at": int(time.time()), "size": size, "quality": fields["quality"],
            "background": fields["background"], "output_format": fields["output_format"], **extra}
    return sse(data["type"], data)


class JobEventsResponse(StreamingResponse):
    """The `text/event-stream` answer of a job's events; when it ends before the job did (the client left, even
    before its first event, or the server stops), the job is cancelled: nobody waits for its pictures."""

    def __init__(self, service: Service, job: Job, events: AsyncIterator[str]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.service, self.job = service, job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.job.status not in FINAL_STATES:
                self.service.queue.cancel(self.job)     # no await: this may run cancelled


async def event_stream(request: Request, job: Job, kind: str, fields: dict[str, Any], partial_images: int,
                       completed: Callable[[], list[tuple[bytes, str]]],
                       error_of: Callable[[Job], dict[str, Any] | None]) -> AsyncIterator[str]:
    """The events of `job` from now to its end: partial images while it draws, then each `completed()` picture
    (file, "WxH"), or an `error` event of `error_of(job)` (OpenAI's error body) when it drew none."""
    queue = job.subscribe(asyncio.get_running_loop(), steps=partial_images > 0, previews=True)  # draws previews
    sent, quiet = 0, 0.0
    try:
        while True:
            try:
                name, data = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                quiet += DISCONNECT_POLL_S
                if quiet >= KEEPALIVE_S:
                    quiet = 0.0
                    yield ": keepalive\n\n"
                continue
            quiet = 0.0
            if name == "step":
                due = partial_steps(data["n"], partial_images)
                preview = data["preview"]           # (h, w, 3) uint8, this step's
                if sent < len(due) and data["i"] >= due[sent] and preview is not None:
                    size = picture_size(job)
                    raw = await asyncio.to_thread(partial_picture, preview, size, fields)
                    shown = f"{size[0]}x{size[1]}" if size else "auto"
                    yield event(kind, "partial_image", raw, shown, fields, partial_image_index=sent)
                    sent += 1
            elif name in ENDED:
                error = error_of(job)
                if error is not None:
                    yield sse("error", {"type": "error", **error})
                    return
                for raw, size in await asyncio.to_thread(completed):
                    yield event(kind, "completed", raw, size, fields, usage=NO_USAGE)
                return
    finally:
        job.unsubscribe(queue)
