"""OpenAI's images API streamed (`server/openai_stream.py`) and its JSON edits, against a real server with the
shipped tiny model: `stream: true` sends `partial_images` step previews then the native job's pictures, pixel for
pixel, as the `openai` package reads them and as a raw SSE read sees them; a client leaving mid-stream cancels
its job; a JSON edit's data: URL pictures draw what the multipart edit draws, and no remote URL is fetched."""

from __future__ import annotations

import base64
import io
import json
import time

import asyncio

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image

from sdlab.pipeline.request import GenerationRequest
from sdlab.server.inputs import JobSpec
from sdlab.server.jobs import Job
from sdlab.server.openai_images import ImagesError, data_url_bytes
from sdlab.server.openai_stream import partial_steps
from server_fixtures import b64_png, sdlab_server  # noqa: F401
from test_server_openai_images import (
    SIDE, b64_picture, client_of, ended, init_picture, jobs_of_prompt, native_pictures, openai_mask, pixels,
    png_bytes)

STEPS = 8                       # partial images 2: after steps 2 and 5 (8 * k // 3); 3: after 2, 4 and 6


def data_url(raw: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(raw).decode("ascii")


def sse_events(lines) -> list[tuple[str, dict]]:
    """(event name, data) of each event of an SSE body's lines; comment lines skipped."""
    events, name, data = [], None, []
    for line in lines:
        if line.startswith(":"):
            continue
        if not line:
            if name is not None or data:
                events.append((name, json.loads("\n".join(data))))
            name, data = None, []
        elif line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            data.append(line[len("data: "):])
    return events


@pytest.mark.parametrize("total, count, steps", [
    (8, 2, [2, 5]), (8, 3, [2, 4, 6]), (20, 3, [5, 10, 15]), (20, 1, [10]), (2, 3, [1]), (1, 2, []), (8, 0, []),
])
def test_partial_images_are_spread_evenly_over_the_steps(total, count, steps):
    assert partial_steps(total, count) == steps


def test_a_step_event_holds_the_preview_it_was_published_with():
    """A stream reads the preview of the step its event is of, though the job has moved on (or ended, which
    clears `Job.preview`) before the event loop reads the event."""
    job = Job(id="j", mode="txt2img", model="model", created=0.0,
              spec=JobSpec(GenerationRequest("x", steps=2)))

    async def read() -> tuple[dict, dict]:
        previews = job.subscribe(asyncio.get_running_loop(), previews=True)
        plain = job.subscribe(asyncio.get_running_loop())
        first = torch.zeros(8, 8, 3, dtype=torch.uint8)
        job.preview = first
        job.publish("step", {"i": 1, "n": 2})
        job.preview = None                      # the job ended meanwhile
        await asyncio.sleep(0)
        events = [previews.get_nowait(), previews.get_nowait()]
        assert events[1][1]["preview"] is first
        return events[1][1], [plain.get_nowait(), plain.get_nowait()][1][1]

    with_preview, without = asyncio.run(read())
    assert with_preview["i"] == 1 and without == {"i": 1, "n": 2}       # other readers' events as they were


@pytest.mark.parametrize("ref, param, words", [
    ({"image_url": "https://example.com/a.png"}, "images", "does not fetch remote URLs"),
    ({"image_url": "DATA:image/png;base64,QUJD"}, "images", ("PNG",)),
    ({"image_url": "data:IMAGE/JPEG;name=a.jpg;base64,QU\nJD"}, "images", ("JPEG",)),
    ({"image_url": "data:image/webp;base64,QUJD"}, "images", ("WEBP",)),
    ({"image_url": "data:image/png;base64,QUJD"}, "mask", ("PNG",)),
    ({"image_url": "data:;base64,QUJD"}, "images", "has no type; it must be image/png, image/jpeg or image/webp"),
    ({"image_url": "data:text/plain;base64,QUJD"}, "images", "has the type 'text/plain'"),
    ({"image_url": "data:image/gif;base64,QUJD"}, "images", "has the type 'image/gif'"),
    ({"image_url": "data:image/jpeg;base64,QUJD"}, "mask", r"it must be a PNG \(image/png\)"),
    ({"image_url": {"url": "data:image/png;base64,QUJD"}}, "images",
     r"its 'image_url' is a string, the data: URL itself .*, not an object"),
    ({"file_id": "file-1"}, "images", "Files API"),
    ({"image_url": "data:image/png;base64,QUJD", "file_id": "f"}, "images", "an image reference is"),
])
def test_data_url_bytes(ref, param, words):
    """A data: URL's bytes and the Pillow format of its type: image/png, image/jpeg or image/webp (what the
    multipart edit takes; a mask's image/png); another type, none, an object for the URL: a refusal naming it."""
    if isinstance(words, tuple):
        assert data_url_bytes(ref, "images[0]", param) == (b"ABC", *words)
    else:
        with pytest.raises(ImagesError, match=words):
            data_url_bytes(ref, "images[0]", param)


def test_a_stream_sends_partial_images_then_the_native_jobs_picture(sdlab_server):
    stream = client_of(sdlab_server).images.generate(
        prompt="a red fox in the snow", size=f"{SIDE}x{SIDE}", stream=True, partial_images=2,
        extra_body={"seed": 1234, "steps": STEPS})
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    job, native = native_pictures(sdlab_server, {"prompt": "a red fox in the snow", "seed": 1234, "steps": STEPS,
                                                 "width": SIDE, "height": SIDE})
    final = b64_picture(events[-1].b64_json)
    assert np.abs(pixels(final) - pixels(native[0])).max() == 0
    assert final.info["parameters"] == job["infotexts"][0]
    for e in events:
        assert (e.size, e.quality, e.background, e.output_format) == (f"{SIDE}x{SIDE}", "auto", "auto", "png")
        assert e.created_at > 0
    assert events[-1].usage.total_tokens == 0
    partials = [b64_picture(e.b64_json) for e in events[:2]]
    assert all(p.size == (SIDE, SIDE) and "parameters" not in p.info for p in partials)
    # previews of the x0 estimate: the later one nearer the final picture than the earlier one
    error = [np.abs(pixels(p) - pixels(final)).mean() for p in partials]
    assert error[1] < error[0], error


def test_a_stream_of_n_pictures_completes_each_in_turn(sdlab_server):
    stream = client_of(sdlab_server).images.generate(
        prompt="a row of houses", n=2, size=f"{SIDE}x{SIDE}", stream=True, partial_images=1, output_format="webp",
        extra_body={"seed": 50, "steps": STEPS})
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image"] + ["image_generation.completed"] * 2
    native = native_pictures(sdlab_server, {"prompt": "a row of houses", "seed": 50, "steps": STEPS, "width": SIDE,
                                            "height": SIDE, "batch_size": 2})[1]
    webp = [Image.open(io.BytesIO(base64.b64decode(e.b64_json))) for e in events]
    assert all(image.format == "WEBP" for image in webp)
    answer = client_of(sdlab_server).images.generate(prompt="a row of houses", n=2, size=f"{SIDE}x{SIDE}",
                                                     output_format="webp", extra_body={"seed": 50, "steps": STEPS})
    for e, item in zip(events[1:], answer.data):
        assert e.b64_json == item.b64_json      # the non-streamed answer's WebP, byte for byte
    assert np.abs(pixels(webp[1]) - pixels(webp[2])).mean() > 0
    lossless = client_of(sdlab_server).images.generate(
        prompt="a row of houses", n=2, size=f"{SIDE}x{SIDE}", stream=True, extra_body={"seed": 50, "steps": STEPS})
    drawn = [b64_picture(e.b64_json) for e in lossless]
    assert len(drawn) == 2 and all(np.abs(pixels(o) - pixels(t)).max() == 0 for o, t in zip(drawn, native))


def test_a_raw_read_of_a_json_edit_stream(sdlab_server):
    """The wire format as OpenAI sends it: `event: NAME` and `data: JSON` of the same `type`; here a JSON edit
    (data: URL image and mask) streamed with 3 partial images, its picture the native inpaint's."""
    init = init_picture()
    body = {"images": [{"image_url": data_url(png_bytes(init))}], "mask": {"image_url": data_url(
        png_bytes(openai_mask()))}, "prompt": "a yellow flower", "stream": True, "partial_images": 3, "seed": 40,
        "steps": STEPS}
    with httpx.stream("POST", sdlab_server.url + "/v1/images/edits", json=body, timeout=120) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        events = sse_events(answer.iter_lines())
    assert [name for name, _ in events] == ["image_edit.partial_image"] * 3 + ["image_edit.completed"]
    assert all(data["type"] == name for name, data in events)
    assert [data["partial_image_index"] for _, data in events[:3]] == [0, 1, 2]
    assert set(events[-1][1]) == {"type", "b64_json", "created_at", "size", "quality", "background",
                                  "output_format", "usage"}
    assert set(events[0][1]) == {"type", "b64_json", "created_at", "size", "quality", "background",
                                 "output_format", "partial_image_index"}
    white_hole = np.zeros((SIDE, SIDE), np.uint8)
    white_hole[16:48, 16:48] = 255
    job, native = native_pictures(sdlab_server, {
        "mode": "inpaint", "init_image": b64_png(init), "mask_image": b64_png(Image.fromarray(white_hole)),
        "seed": 40, "steps": STEPS, "prompt": "a yellow flower"})
    ours = b64_picture(events[-1][1]["b64_json"])
    assert np.abs(pixels(ours) - pixels(native[0])).max() == 0 and ours.info["parameters"] == job["infotexts"][0]


def test_an_edit_stream_through_the_openai_package(sdlab_server):
    init = init_picture()
    events = list(client_of(sdlab_server).images.edit(
        image=("init.png", png_bytes(init), "image/png"), prompt="a tile", stream=True, partial_images=1,
        extra_body={"seed": 21, "steps": STEPS}))
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    native = native_pictures(sdlab_server, {"mode": "img2img", "init_image": b64_png(init), "seed": 21,
                                            "steps": STEPS, "prompt": "a tile"})[1]
    assert np.abs(pixels(b64_picture(events[-1].b64_json)) - pixels(native[0])).max() == 0


def test_a_stream_without_partial_images_is_the_completed_event_alone(sdlab_server):
    events = list(client_of(sdlab_server).images.generate(prompt="a hill", size=f"{SIDE}x{SIDE}", stream=True,
                                                          extra_body={"seed": 9}))
    assert [e.type for e in events] == ["image_generation.completed"]


def test_a_client_leaving_mid_stream_cancels_its_job(sdlab_server):
    """Queued (behind a long native job) or running, the job of a stream its client closes is cancelled."""
    body = {"prompt": "a streamed otter", "size": "512x512", "stream": True, "partial_images": 3, "steps": 60,
            "seed": 1}
    with httpx.Client(base_url=sdlab_server.url, timeout=60) as http:
        blocker = http.post("/api/jobs", json={"prompt": "a long one", "width": 512, "height": 512, "steps": 60,
                                               "batch_count": 4, "seed": 1}).json()["id"]
        with http.stream("POST", "/v1/images/generations", json={**body, "prompt": "a queued otter"}) as answer:
            assert answer.status_code == 200
            assert [j["status"] for j in jobs_of_prompt(http, "a queued otter")] == ["queued"]
        assert ended(http, "a queued otter", 1, timeout_s=10) == ["cancelled"]
        assert http.get(f"/api/jobs/{blocker}").json()["status"] == "running"
        http.delete(f"/api/jobs/{blocker}")
        with http.stream("POST", "/v1/images/generations", json=body) as answer:
            assert answer.status_code == 200
            deadline = time.monotonic() + 30
            while not [j for j in jobs_of_prompt(http, "a streamed otter") if j["status"] == "running"]:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert ended(http, "a streamed otter", 1) == ["cancelled"]


def test_a_job_ending_without_a_picture_is_an_error_event(sdlab_server):
    """Cancelled by another client (the native DELETE) while streamed: the stream's `error` event, which the
    `openai` package raises as an APIError."""
    stream = client_of(sdlab_server).images.generate(
        prompt="a cancelled otter", size="512x512", stream=True, partial_images=1,
        extra_body={"seed": 1, "steps": 60})
    with httpx.Client(base_url=sdlab_server.url, timeout=60) as http:
        deadline = time.monotonic() + 30
        while not (running := [j for j in jobs_of_prompt(http, "a cancelled otter") if j["status"] == "running"]):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        http.delete(f"/api/jobs/{running[0]['id']}")
    with pytest.raises(openai.APIError) as caught:
        list(stream)
    assert "cancelled before it drew a picture" in caught.value.message
    assert caught.value.body["type"] == "server_error"          # a 503: the job drew nothing


def test_json_edits_take_data_urls_as_the_multipart_edit_takes_files(sdlab_server):
    first, second = init_picture(), Image.fromarray(255 - np.asarray(init_picture()))
    answer = httpx.post(sdlab_server.url + "/v1/images/edits", timeout=120, json={
        "images": [{"image_url": data_url(png_bytes(first))}, {"image_url": data_url(png_bytes(second, "JPEG"),
                                                                                      "image/jpeg")}],
        "prompt": "a tile", "n": 2, "seed": 3, "model": "gpt-image-1"}).json()
    multipart = client_of(sdlab_server).images.edit(
        image=[("a.png", png_bytes(first), "image/png"), ("b.jpg", png_bytes(second, "JPEG"), "image/jpeg")],
        prompt="a tile", n=2, extra_body={"seed": 3})
    assert len(answer["data"]) == 2
    for ours, theirs in zip(answer["data"], multipart.data):
        assert np.abs(pixels(b64_picture(ours["b64_json"])) - pixels(b64_picture(theirs.b64_json))).max() == 0
    assert "revised_prompt" not in answer["data"][0]


@pytest.mark.parametrize("change, param, words", [
    ({"images": [{"image_url": "https://example.com/cat.png"}]}, "images", "only data: URLs"),
    ({"images": [{"image_url": "http://127.0.0.1:1/cat.png"}]}, "images", "does not fetch remote URLs"),
    ({"images": [{"file_id": "file-abc"}]}, "images", "Files API"),
    ({"images": [{"image_url": "data:image/png,notbase64"}]}, "images", "not base64"),
    ({"images": [{"image_url": "data:image/png;base64,@@@"}]}, "images", "malformed"),
    ({"images": []}, "images", "a list of image references"),
    ({"images": ["data:image/png;base64,AAAA"]}, "images", "an image reference is"),
    ({"images": None}, "images", "Missing required parameter"),
    ({"mask": {"image_url": "https://example.com/mask.png"}}, "mask", "only data: URLs"),
    ({"image": "x"}, "image", "'images'"),
    ({"colour": "red"}, "colour", "Unrecognized request argument"),
    ({"images": [{"image_url": data_url(b"GIF89a not a picture", "image/gif")}]}, "images", "images[0]"),
    ({"images": [{"image_url": data_url(png_bytes(init_picture()), "text/plain")}]}, "images",
     "images[0]': its data: URL has the type 'text/plain'"),
    ({"images": [{"image_url": data_url(png_bytes(init_picture()), "image/gif")}]}, "images",
     "images[0]': its data: URL has the type 'image/gif'"),
    ({"images": [{"image_url": data_url(png_bytes(init_picture()), "")}]}, "images", "its data: URL has no type"),
    ({"images": [{"image_url": data_url(png_bytes(init_picture()), "image/jpeg")}]}, "images",
     "images[0] is a PNG file (its data: URL says JPEG); it must be a JPEG"),
    ({"images": [{"image_url": data_url(png_bytes(init_picture(), "JPEG"))}]}, "images",
     "images[0] is a JPEG file (its data: URL says PNG)"),
    ({"images": [{"image_url": {"url": data_url(png_bytes(init_picture()))}}]}, "images",
     "its 'image_url' is a string, the data: URL itself"),
    ({"images": [{"image_url": data_url(png_bytes(init_picture()))}] * 2, "n": 1}, "images", "at most n images"),
    ({"mask": {"image_url": data_url(png_bytes(init_picture(), "JPEG"), "image/jpeg")}}, "mask", "must be a PNG"),
])
def test_json_edit_refusals_answer_in_openais_error_shape(sdlab_server, change, param, words):
    body = {"images": [{"image_url": data_url(png_bytes(init_picture()))}], "prompt": "a tile", **change}
    body = {key: value for key, value in body.items() if value is not None}
    answer = httpx.post(sdlab_server.url + "/v1/images/edits", json=body, timeout=30)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"


def test_a_json_edit_is_parsed_and_decoded_off_the_event_loop(tmp_path, monkeypatch):
    """`json_edit` (json.loads of the body, each data: URL's base64 decode) runs in a worker thread, as the
    multipart edit's pictures are read: a large body does not hold up the server's other requests. In-process
    app, no model loaded: the parse is stopped once it has been seen."""
    from fastapi.testclient import TestClient

    from sdlab.server import openai_images
    from sdlab.server.app import create_app
    from sdlab.server.config import ServerConfig

    seen, json_edit = [], openai_images.json_edit

    def watched(raw: bytes):
        try:
            asyncio.get_running_loop()
            seen.append("on the event loop")
        except RuntimeError:
            seen.append("off the event loop")
        json_edit(raw)
        raise ImagesError("parsed", param="images")

    monkeypatch.setattr(openai_images, "json_edit", watched)
    http = TestClient(create_app(ServerConfig(output_dir=tmp_path / "outputs")))
    answer = http.post("/v1/images/edits", json={"images": [{"image_url": data_url(png_bytes(init_picture()))}],
                                                 "prompt": "a tile"})
    assert answer.status_code == 400 and answer.json()["error"]["message"] == "parsed"
    assert seen == ["off the event loop"]
