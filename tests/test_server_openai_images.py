"""OpenAI's images API on `sdlab serve` (`server/openai_images.py`), driven by the `openai` Python package itself
against a real server with the shipped tiny model: its pictures are the native route's for the same seed, pixel
for pixel and infotext for infotext; an edit's mask repaints where it is transparent; refusals answer in OpenAI's
error shape; with --auth the API key `USER:PASS` is taken as a Bearer token."""

from __future__ import annotations

import base64
import io
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from server_fixtures import (  # noqa: F401
    b64_png, drawn_job, png_picture, sdlab_server, start_server, wait_for_job)

SIDE = 64


def client_of(server, api_key: str = "not-needed") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0, timeout=120)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def b64_picture(data: str) -> Image.Image:
    return png_picture(base64.b64decode(data))


def native_pictures(server, body: dict) -> tuple[dict, list[Image.Image]]:
    with httpx.Client(base_url=server.url, timeout=120) as http:
        job = drawn_job(http, body)
        return job, [png_picture(http.get(url).content) for url in job["images"]]


def init_picture() -> Image.Image:
    """A 64 px picture with structure (a gradient and a square), so img2img has something to keep."""
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    rgb = np.stack([x * 4, y * 4, 255 - x * 2], axis=-1).astype(np.uint8)
    rgb[16:48, 16:48] = (30, 200, 60)
    return Image.fromarray(rgb)


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def openai_mask() -> Image.Image:
    """OpenAI's mask: transparent (alpha 0) in the middle 32 px square, the part to repaint; opaque elsewhere."""
    alpha = np.full((SIDE, SIDE), 255, np.uint8)
    alpha[16:48, 16:48] = 0
    return Image.fromarray(np.dstack([np.zeros((SIDE, SIDE, 3), np.uint8), alpha]), "RGBA")


def test_generations_are_the_native_jobs_pictures_with_their_infotext(sdlab_server):
    answer = client_of(sdlab_server).images.generate(
        prompt="a red fox in the snow", n=2, size=f"{SIDE}x{SIDE}", response_format="b64_json",
        extra_body={"seed": 1234, "negative_prompt": "blurry"})
    assert len(answer.data) == 2 and answer.created > 0
    drawn = [b64_picture(item.b64_json) for item in answer.data]
    job, native = native_pictures(sdlab_server, {"prompt": "a red fox in the snow", "negative_prompt": "blurry",
                                                 "seed": 1234, "width": SIDE, "height": SIDE, "batch_size": 2})
    for ours, theirs, infotext in zip(drawn, native, job["infotexts"]):
        assert ours.size == (SIDE, SIDE)
        assert np.abs(pixels(ours) - pixels(theirs)).max() == 0
        assert ours.info["parameters"] == infotext          # the PNG carries sdlab's infotext
    assert "Seed: 1234" in drawn[0].info["parameters"] and "Seed: 1235" in drawn[1].info["parameters"]
    assert np.abs(pixels(drawn[0]) - pixels(drawn[1])).max() > 0


def test_n_past_max_batch_is_drawn_as_several_batches(sdlab_server):
    """n = 10 at the default --max-batch 8: two batches of 5, the native job of batch_count 2, seeds 50..59."""
    answer = client_of(sdlab_server).images.generate(prompt="a row of houses", n=10, size=f"{SIDE}x{SIDE}",
                                                     extra_body={"seed": 50})
    drawn = [b64_picture(item.b64_json) for item in answer.data]
    job, native = native_pictures(sdlab_server, {"prompt": "a row of houses", "seed": 50, "width": SIDE,
                                                 "height": SIDE, "batch_size": 5, "batch_count": 2})
    assert len(drawn) == len(native) == 10
    for i, (ours, theirs, infotext) in enumerate(zip(drawn, native, job["infotexts"])):
        assert np.abs(pixels(ours) - pixels(theirs)).max() == 0
        assert ours.info["parameters"] == infotext and f"Seed: {50 + i}," in infotext


def test_llamaedges_extension_fields_are_the_native_jobs(sdlab_server):
    """LlamaEdge's sd-api-server fields: cfg_scale, steps, sample_method (sd.cpp's names), width / height,
    negative_prompt, seed; an edit's strength."""
    answer = httpx.post(sdlab_server.url + "/v1/images/generations", timeout=120, json={
        "prompt": "a sea otter", "negative_prompt": "blurry", "cfg_scale": 3.5, "sample_method": "euler_a",
        "steps": 6, "width": 48, "height": 64, "seed": 42}).json()
    ours = b64_picture(answer["data"][0]["b64_json"])
    job, native = native_pictures(sdlab_server, {"prompt": "a sea otter", "negative_prompt": "blurry",
                                                 "cfg_scale": 3.5, "sampler": "euler_ancestral", "steps": 6,
                                                 "width": 48, "height": 64, "seed": 42})
    assert ours.size == (48, 64) and np.abs(pixels(ours) - pixels(native[0])).max() == 0
    assert ours.info["parameters"] == job["infotexts"][0] and "Steps: 6," in job["infotexts"][0]
    init = init_picture()
    answer = httpx.post(sdlab_server.url + "/v1/images/edits", timeout=120, files={
        "image": ("init.png", png_bytes(init), "image/png")}, data={
        "prompt": "a tile", "strength": "0.4", "steps": "10", "cfg_scale": "5.0", "sample_method": "heun",
        "seed": "7"}).json()
    job, native = native_pictures(sdlab_server, {"mode": "img2img", "init_image": b64_png(init), "prompt": "a tile",
                                                 "strength": 0.4, "steps": 10, "cfg_scale": 5.0, "sampler": "heun",
                                                 "seed": 7})
    assert np.abs(pixels(b64_picture(answer["data"][0]["b64_json"])) - pixels(native[0])).max() == 0
    assert "Denoising strength: 0.4" in job["infotexts"][0]


def test_a_url_answer_is_a_picture_this_server_serves(sdlab_server):
    client = client_of(sdlab_server)
    answer = client.images.generate(prompt="a lighthouse", n=1, size=f"{SIDE}x{SIDE}", response_format="url",
                                    extra_body={"seed": 77})
    url = answer.data[0].url
    assert url.startswith(sdlab_server.url + "/api/images/") and answer.data[0].b64_json is None
    fetched = png_picture(httpx.get(url, timeout=30).content)
    again = client.images.generate(prompt="a lighthouse", size=f"{SIDE}x{SIDE}", extra_body={"seed": 77})
    assert np.abs(pixels(fetched) - pixels(b64_picture(again.data[0].b64_json))).max() == 0
    assert "Seed: 77" in fetched.info["parameters"]


def test_output_format_jpeg_and_webp_are_answered_in_that_format(sdlab_server):
    client = client_of(sdlab_server)
    for fmt, pillow in (("jpeg", "JPEG"), ("webp", "WEBP")):
        answer = client.images.generate(prompt="a boat", size=f"{SIDE}x{SIDE}", output_format=fmt,
                                        output_compression=90, extra_body={"seed": 5})
        image = Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json)))
        assert image.format == pillow and image.size == (SIDE, SIDE)
        assert answer.output_format == fmt


def test_models_lists_the_checkpoints_and_a_listed_id_draws(sdlab_server):
    client = client_of(sdlab_server)
    listed = client.models.list().data
    titles = httpx.get(sdlab_server.url + "/sdapi/v1/sd-models", timeout=30).json()
    assert [m.id for m in listed] == [t["title"].split(" [")[0] for t in titles]      # the title's name
    assert all(m.object == "model" and m.owned_by == "sdlab" and m.created > 0 for m in listed)
    assert client.models.retrieve(listed[0].id).id == listed[0].id
    answer = client.images.generate(model=listed[0].id, prompt="a hill", size=f"{SIDE}x{SIDE}",
                                    extra_body={"seed": 9})
    assert b64_picture(answer.data[0].b64_json).size == (SIDE, SIDE)


def test_openais_model_names_draw_with_the_selected_model(sdlab_server):
    drawn = [pixels(b64_picture(client_of(sdlab_server).images.generate(
        model=name, prompt="a hill", size=f"{SIDE}x{SIDE}", extra_body={"seed": 9}).data[0].b64_json))
        for name in ("dall-e-2", "dall-e-3", "gpt-image-1")]
    native = native_pictures(sdlab_server, {"prompt": "a hill", "seed": 9, "width": SIDE, "height": SIDE})[1][0]
    assert all(np.abs(picture - pixels(native)).max() == 0 for picture in drawn)


def test_dall_e_3s_pictures_carry_the_prompt_as_their_revised_prompt(sdlab_server):
    """OpenAI answers `revised_prompt` for dall-e-3 only (the prompt it rewrote and drew); sdlab draws the
    prompt as given."""
    client = client_of(sdlab_server)
    answer = client.images.generate(model="dall-e-3", prompt="a hill at dawn", n=2, size=f"{SIDE}x{SIDE}",
                                    extra_body={"seed": 9})
    assert [item.revised_prompt for item in answer.data] == ["a hill at dawn"] * 2
    for model in ("dall-e-2", "gpt-image-1", None):
        answer = httpx.post(sdlab_server.url + "/v1/images/generations", timeout=120, json={
            "prompt": "a hill at dawn", "size": f"{SIDE}x{SIDE}", "seed": 9, **({"model": model} if model else {})})
        assert "revised_prompt" not in answer.json()["data"][0]


def test_without_a_mask_the_images_transparency_is_the_mask(sdlab_server):
    rgba = np.dstack([np.asarray(init_picture()), np.asarray(openai_mask())[..., 3]])    # transparent middle
    init = Image.fromarray(rgba, "RGBA")
    answer = client_of(sdlab_server).images.edit(
        image=("init.png", png_bytes(init), "image/png"), prompt="a yellow flower", extra_body={"seed": 41})
    ours = b64_picture(answer.data[0].b64_json)
    white_hole = np.zeros((SIDE, SIDE), np.uint8)
    white_hole[16:48, 16:48] = 255
    job, native = native_pictures(sdlab_server, {
        "mode": "inpaint", "init_image": b64_png(init), "mask_image": b64_png(Image.fromarray(white_hole)),
        "seed": 41, "prompt": "a yellow flower", "batch_size": 1})
    assert np.abs(pixels(ours) - pixels(native[0])).max() == 0
    assert ours.info["parameters"] == job["infotexts"][0]
    assert np.abs(pixels(ours) - pixels(init_picture()))[:16].max() == 0        # the opaque part is kept


def test_an_edit_without_mask_is_the_native_img2img(sdlab_server):
    init = init_picture()
    answer = client_of(sdlab_server).images.edit(
        image=("init.png", png_bytes(init), "image/png"), prompt="a green square on a gradient", n=1,
        extra_body={"seed": 21})
    ours = b64_picture(answer.data[0].b64_json)
    job, native = native_pictures(sdlab_server, {"mode": "img2img", "init_image": b64_png(init), "seed": 21,
                                                 "prompt": "a green square on a gradient", "batch_size": 1})
    assert ours.size == init.size
    assert np.abs(pixels(ours) - pixels(native[0])).max() == 0
    assert ours.info["parameters"] == job["infotexts"][0] and "Denoising strength: 0.75" in job["infotexts"][0]


def test_an_edits_mask_repaints_where_it_is_transparent(sdlab_server):
    init = init_picture()
    answer = client_of(sdlab_server).images.edit(
        image=("init.png", png_bytes(init), "image/png"), mask=("mask.png", png_bytes(openai_mask()), "image/png"),
        prompt="a yellow flower", n=2, response_format="b64_json", extra_body={"seed": 40})
    drawn = [b64_picture(item.b64_json) for item in answer.data]
    white_hole = np.zeros((SIDE, SIDE), np.uint8)            # the native mask: white = repaint
    white_hole[16:48, 16:48] = 255
    job, native = native_pictures(sdlab_server, {
        "mode": "inpaint", "init_image": b64_png(init), "mask_image": b64_png(Image.fromarray(white_hole)),
        "seed": 40, "prompt": "a yellow flower", "batch_size": 2})
    for ours, theirs, infotext in zip(drawn, native, job["infotexts"]):
        assert np.abs(pixels(ours) - pixels(theirs)).max() == 0
        assert ours.info["parameters"] == infotext
        change = np.abs(pixels(ours) - pixels(init)).mean(axis=-1)
        hole, kept = change[16:48, 16:48].mean(), change[:8].mean()
        assert hole > 3 * kept, (hole, kept)
        assert change[:16].max() == 0 and change[48:].max() == 0     # the opaque part: the init's pixels


def test_several_images_start_the_pictures_in_turn(sdlab_server):
    first, second = init_picture(), Image.fromarray(255 - np.asarray(init_picture()))
    answer = client_of(sdlab_server).images.edit(
        image=[("a.png", png_bytes(first), "image/png"), ("b.png", png_bytes(second), "image/png")],
        prompt="a tile", n=2, extra_body={"seed": 3})
    drawn = [pixels(b64_picture(item.b64_json)) for item in answer.data]
    from_first = native_pictures(sdlab_server, {"mode": "img2img", "init_image": b64_png(first), "seed": 3,
                                                "prompt": "a tile", "batch_size": 2})[1]
    from_second = native_pictures(sdlab_server, {"mode": "img2img", "init_image": b64_png(second), "seed": 3,
                                                 "prompt": "a tile", "batch_size": 2})[1]
    assert np.abs(drawn[0] - pixels(from_first[0])).max() <= 1      # picture 0 from image 0, seed 3
    assert np.abs(drawn[1] - pixels(from_second[1])).max() <= 1     # picture 1 from image 1, seed 4
    assert np.abs(drawn[1] - pixels(from_first[1])).mean() > 20


def test_jpeg_and_webp_images_are_edited_as_their_pictures(sdlab_server):
    """gpt-image-1 takes png, jpg and webp images: a JPEG / WebP image is the native img2img of its decoded
    picture; several images with n unset draw one picture per image."""
    for fmt, kind in (("JPEG", "image/jpeg"), ("WEBP", "image/webp")):
        raw = png_bytes(init_picture(), fmt)
        answer = client_of(sdlab_server).images.edit(image=("init", raw, kind), prompt="a tile",
                                                     extra_body={"seed": 8})
        native = native_pictures(sdlab_server, {"mode": "img2img", "seed": 8, "prompt": "a tile",
                                                "init_image": b64_png(Image.open(io.BytesIO(raw)))})[1]
        assert np.abs(pixels(b64_picture(answer.data[0].b64_json)) - pixels(native[0])).max() == 0
    first, second = init_picture(), Image.fromarray(255 - np.asarray(init_picture()))
    answer = client_of(sdlab_server).images.edit(
        image=[("a.jpg", png_bytes(first, "JPEG"), "image/jpeg"), ("b.png", png_bytes(second), "image/png")],
        prompt="a tile", extra_body={"seed": 3})
    assert len(answer.data) == 2


def error_of(call) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    return caught.value.status_code, caught.value.body


@pytest.mark.parametrize("fields, status, param", [
    ({"size": "100x64"}, 400, "size"),
    ({"size": "big"}, 400, "size"),
    ({"n": 0}, 400, "n"),
    ({"n": 11}, 400, "n"),
    ({"prompt": "  "}, 400, "prompt"),
    ({"model": "no-such-model"}, 404, "model"),
    ({"response_format": "svg"}, 400, "response_format"),
    ({"response_format": "url", "output_format": "jpeg"}, 400, "output_format"),
    ({"background": "transparent"}, 400, "background"),
    ({"size": "auto", "width": 100}, 400, "width"),
    ({"sample_method": "dpm++2mv2"}, 400, "sample_method"),
    ({"stream": True, "partial_images": 4}, 400, "partial_images"),
    ({"partial_images": 2}, 400, "partial_images"),
    ({"stream": True, "response_format": "url"}, 400, "response_format"),
])
def test_generation_refusals_answer_in_openais_error_shape(sdlab_server, fields, status, param):
    body = {"prompt": "a cat", "size": f"{SIDE}x{SIDE}", **fields}
    extra = {key: body.pop(key) for key in ("width", "sample_method") if key in body}
    code, error = error_of(lambda: client_of(sdlab_server).images.generate(**body, extra_body=extra))
    assert code == status
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"]
    if param == "model":
        assert error["code"] == "model_not_found" and "no-such-model" in error["message"]


def test_unknown_and_missing_fields_answer_in_openais_error_shape(sdlab_server):
    answer = httpx.post(sdlab_server.url + "/v1/images/generations", json={"prompt": "x", "control_strength": 0.9},
                        timeout=30)
    assert answer.status_code == 400
    assert answer.json() == {"error": {"message": "Unrecognized request argument supplied: control_strength",
                                       "type": "invalid_request_error", "param": "control_strength", "code": None}}
    answer = httpx.post(sdlab_server.url + "/v1/images/generations", json={"n": 1}, timeout=30)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "prompt"
    answer = httpx.post(sdlab_server.url + "/v1/images/generations", content=b"{not json",
                        headers={"content-type": "application/json"}, timeout=30)
    assert answer.status_code == 400 and answer.json()["error"]["type"] == "invalid_request_error"


def test_edit_refusals_answer_in_openais_error_shape(sdlab_server):
    client = client_of(sdlab_server)
    png = png_bytes(init_picture())
    cases = [
        (lambda: client.images.edit(image=("x.gif", png_bytes(init_picture(), "GIF"), "image/gif"), prompt="x"),
         "image", "GIF"),
        (lambda: client.images.edit(image=("x.png", png, "image/png"), prompt="x",
                                    mask=("m.webp", png_bytes(openai_mask(), "WEBP"), "image/webp")), "mask", "PNG"),
        (lambda: client.images.edit(image=("x.png", b"not a picture", "image/png"), prompt="x"), "image", "readable"),
        (lambda: client.images.edit(image=("x.png", png, "image/png"), prompt="x",
                                    mask=("m.png", png, "image/png")), "mask", "alpha"),
        (lambda: client.images.edit(image=("x.png", png, "image/png"), prompt="x",
                                    mask=("m.png", png_bytes(openai_mask().resize((32, 32))), "image/png")),
         "mask", "same size"),
        (lambda: client.images.edit(image=[("a.png", png, "image/png")] * 3, prompt="x", n=2), "image", "at most n"),
        (lambda: client.images.edit(image=("x.png", png, "image/png"), prompt="x", model="no-such-model"),
         "model", "does not exist"),
    ]
    for call, param, words in cases:
        status, error = error_of(call)
        assert status in (400, 404) and error["param"] == param and words in error["message"], error
    answer = httpx.post(sdlab_server.url + "/v1/images/edits", data={"prompt": "x"},
                        files={"other": ("a.txt", b"x")}, timeout=30)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "other"
    answer = httpx.post(sdlab_server.url + "/v1/images/edits", data={"prompt": "x"},
                        files={"mask": ("m.png", png_bytes(openai_mask()), "image/png")}, timeout=30)
    assert answer.status_code == 400
    assert answer.json()["error"] == {"message": "Missing required parameter: 'image' (a PNG, JPEG or WebP file).",
                                      "type": "invalid_request_error", "param": "image", "code": None}
    answer = httpx.post(sdlab_server.url + "/v1/images/edits", content=b"prompt=x",
                        headers={"content-type": "application/x-www-form-urlencoded"}, timeout=30)
    assert answer.status_code == 400 and "multipart" in answer.json()["error"]["message"]
    answer = httpx.post(sdlab_server.url + "/v1/images/edits", json={"prompt": "x"}, timeout=30)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "images"     # a JSON edit's


def test_with_auth_the_api_key_is_user_colon_password(tmp_path):
    server = start_server(tmp_path / "outputs", "--auth", "me:s3cret", auth=("me", "s3cret"))
    try:
        assert [m.object for m in client_of(server, "me:s3cret").models.list().data] == ["model"]
        answer = client_of(server, "me:s3cret").images.generate(prompt="a key", size=f"{SIDE}x{SIDE}",
                                                                extra_body={"seed": 2})
        assert b64_picture(answer.data[0].b64_json).size == (SIDE, SIDE)
        with pytest.raises(openai.AuthenticationError):
            client_of(server, "me:wrong").models.list()
        with pytest.raises(openai.AuthenticationError):
            client_of(server, "s3cret").models.list()
        assert httpx.get(server.url + "/api/jobs", headers={"authorization": "Bearer me:s3cret"},
                         timeout=30).status_code == 200          # the key opens every route, as the password
    finally:
        server.stop()


def jobs_of_prompt(http: httpx.Client, prompt: str) -> list[dict]:
    return [job for job in http.get("/api/jobs").json()["jobs"] if job["request"]["prompt"] == prompt]


def ended(http: httpx.Client, prompt: str, count: int, timeout_s: float = 60) -> list[str]:
    """The statuses of the `count` jobs of `prompt` once none is queued or running (or the timeout passed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        statuses = [job["status"] for job in jobs_of_prompt(http, prompt)]
        if (len(statuses) >= count and not {"queued", "running"} & set(statuses)) or time.monotonic() > deadline:
            return statuses
        time.sleep(0.1)


def test_a_client_that_gives_up_cancels_its_queued_and_running_jobs(sdlab_server):
    """The `openai` package's timeout closes the connection and retries: each try's job is cancelled, queued
    (behind a long native job) or running, instead of drawing on for nobody."""
    with httpx.Client(base_url=sdlab_server.url, timeout=60) as http:
        blocker = http.post("/api/jobs", json={"prompt": "a long one", "width": 512, "height": 512, "steps": 60,
                                               "batch_count": 4, "seed": 1})
        assert blocker.status_code == 202
        impatient = openai.OpenAI(base_url=sdlab_server.url + "/v1", api_key="x", max_retries=1, timeout=1.5)
        with pytest.raises(openai.APITimeoutError):
            impatient.images.generate(prompt="a queued otter", size=f"{SIDE}x{SIDE}", extra_body={"seed": 1})
        assert ended(http, "a queued otter", 2, timeout_s=10) == ["cancelled", "cancelled"]   # two tries, none left
        assert http.get(f"/api/jobs/{blocker.json()['id']}").json()["status"] == "running"
        http.delete(f"/api/jobs/{blocker.json()['id']}")
        assert wait_for_job(http, blocker.json()["id"])["status"] == "cancelled"
        gone = openai.OpenAI(base_url=sdlab_server.url + "/v1", api_key="x", max_retries=0, timeout=1.5)
        with pytest.raises(openai.APITimeoutError):
            gone.images.generate(prompt="a running otter", size="512x512", extra_body={"seed": 1})
        assert ended(http, "a running otter", 1) == ["cancelled"]
