"""`sdlab serve` requests as A1111 clients send them, and the limits every pass of a job keeps: the steps
limit on the hires pass, huge scales refused with a 4xx, progress over both hires passes, MIME-wrapped
base64, null fields, a broken model or LoRA file chosen by a client, the `info` JSON's variation seeds,
masks of another size or with transparency, and png-info's A1111 keys. One real server process for the
module (`--max-steps 10`, a models folder with a broken checkpoint and a broken LoRA)."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from server_fixtures import b64_png, picture, start_server, wait_for_job

MAX_STEPS = 10


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("requests-server")
    models = root / "models"
    (models / "Lora").mkdir(parents=True)
    (models / "broken.safetensors").write_bytes(bytes(range(256)) * 16)
    (models / "Lora" / "badlora.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    server = start_server(root / "outputs", "--models-dir", str(models), "--max-steps", str(MAX_STEPS))
    yield server, models
    server.stop()


@pytest.fixture
def client(served):
    server, _ = served
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def png_bytes(image: Image.Image, **info: str) -> bytes:
    from PIL import PngImagePlugin

    chunk = PngImagePlugin.PngInfo()
    for key, value in info.items():
        chunk.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=chunk)
    return buffer.getvalue()


# ---------------------------------------------------------------- 1. --max-steps holds for the hires pass


def test_the_steps_limit_holds_for_the_hires_second_pass(client):
    a1111 = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "enable_hr": True,
                                                   "hr_second_pass_steps": 60, "denoising_strength": 1})
    assert a1111.status_code == 400, a1111.text
    assert "hr_second_pass_steps" in a1111.json()["errors"] and f"<= {MAX_STEPS}" in a1111.json()["errors"]
    native = client.post("/api/jobs", json={"prompt": "x", "steps": 2, "hr_scale": 2, "hr_steps": 1000})
    assert native.status_code == 400 and native.json()["detail"].startswith("hr_steps must be"), native.text
    assert client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0     # nothing was queued


# ---------------------------------------------------------------- 2. huge finite scales


@pytest.mark.parametrize("path,body", [
    ("/sdapi/v1/txt2img", {"prompt": "x", "steps": 2, "enable_hr": True, "hr_scale": 1e308}),
    ("/sdapi/v1/txt2img", {"prompt": "x", "steps": 2, "width": 64, "height": 64, "enable_hr": True, "hr_scale": 1e308}),
    ("/api/jobs", {"prompt": "x", "steps": 2, "hr_scale": 1e308}),
    ("/api/jobs", {"prompt": "x", "steps": 2, "hr_scale": 1e200}),
    ("/sdapi/v1/extra-single-image", {"upscaler_1": "Lanczos", "upscaling_resize": 1e308}),
    ("/sdapi/v1/extra-single-image", {"upscaler_1": "Lanczos", "resize_mode": 1, "upscaling_resize_w": 10**30,
                                      "upscaling_resize_h": 10**30}),
], ids=["a1111-hr", "a1111-hr-sized", "native-hr", "native-hr-1e200", "extras-scale", "extras-size"])
def test_huge_finite_scales_are_a_clean_4xx(client, path, body):
    if "extra" in path:
        body = {**body, "image": b64_png(Image.new("RGB", (64, 64), "red"))}
    response = client.post(path, json=body)
    assert response.status_code in (400, 413), response.text         # 413 past --max-pixels, 400 past MAX_SIDE
    text = response.json().get("errors") or response.json()["detail"]
    assert "limit" in text or "at most" in text or "must lie in" in text, text


def test_the_pixel_limit_holds_for_the_hires_pass_of_an_unset_size(client):
    """Width and height left to the model (64 px on the shipped one): hr_scale 40 asks for 2560 x 2560, past the
    default --max-pixels (2048 x 2048). Refused at submission when the model is loaded (413), else when the
    worker knows the model's size (the job fails naming the limit); never drawn."""
    response = client.post("/api/jobs", json={"prompt": "x", "steps": 2, "hr_scale": 40})
    if response.status_code == 202:
        job = wait_for_job(client, response.json()["id"])
        assert job["status"] == "failed" and "--max-pixels" in job["error"], job
    else:
        assert response.status_code == 413 and "--max-pixels" in response.json()["detail"], response.text
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "enable_hr": True, "hr_scale": 40})
    assert response.status_code in (400, 413) and "--max-pixels" in response.text, response.text


@pytest.mark.parametrize("hires", [{"hr_resize_x": 4096}, {"hr_resize_y": 4096}, {"hr_width": 4096}],
                         ids=["a1111-x-alone", "a1111-y-alone", "native-width-alone"])
def test_the_pixel_limit_holds_for_one_hires_side_alone(client, hires):
    """One side alone keeps the aspect ratio: 4096 from 64 x 64 is a 4096 x 4096 pass, past the default
    --max-pixels (2048 x 2048); a 413 at submission on both APIs, never drawn."""
    body = {"prompt": "x", "steps": 2, "width": 64, "height": 64, **hires}
    if "hr_width" in hires:
        response = client.post("/api/jobs", json=body)
    else:
        response = client.post("/sdapi/v1/txt2img", json={**body, "enable_hr": True, "hr_upscaler": "Latent"})
    assert response.status_code == 413, response.text
    assert "the hires pass at 4096x4096 is 16777216 pixels" in response.text and "--max-pixels" in response.text


def test_huge_scales_in_the_pipeline_are_errors_not_overflows():
    from sdlab.pipeline.request import GenerationRequest, RequestError, resolve
    from sdlab.pipeline.upscale import UpscaleError, target_size

    with pytest.raises(RequestError, match="hr_scale 1e.308 would draw inf"):
        resolve(GenerationRequest("x", hr_scale=1e308), default_size=64, default_sampler="Euler",
                default_schedule="normal", factor=8)
    with pytest.raises(UpscaleError, match="beyond any picture size"):
        target_size(64, 64, 1e308)


# ---------------------------------------------------------------- 3. progress over both passes


@pytest.mark.parametrize("body,total", [
    ({"steps": 3, "hr_scale": 2, "hr_steps": 4}, 7),                                   # latent: one pass for the batch
    ({"steps": 3, "hr_scale": 1.5, "hr_upscaler": "Lanczos", "batch_size": 2}, 3 + 3),   # pixel: one pass too
], ids=["latent", "lanczos-batch"])
def test_progress_counts_both_hires_passes(client, body, total):
    created = client.post("/api/jobs", json={"prompt": "a slow one", "width": 64, "height": 64, **body})
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    seen, counted = [], set()
    while (job := client.get(f"/api/jobs/{job_id}").json())["status"] in ("queued", "running"):
        counted.add(job["steps"])                               # 0 until the worker has resolved the job
        progress = client.get("/sdapi/v1/progress").json()
        state = progress["state"]
        if state["sampling_steps"]:
            seen.append((progress["progress"], progress["eta_relative"], state))
    assert job["status"] == "done" and job["step"] == job["steps"] == total, job
    assert counted <= {0, total}, counted                       # while it runs, its whole count or none yet
    passes = (body["steps"], total - body["steps"])          # A1111 counts each pass as a job of its own
    for done, eta, state in seen:
        assert 0 <= done <= 1 and eta >= 0 and state["job_count"] == 2, seen
        assert state["sampling_step"] <= state["sampling_steps"] == passes[state["job_no"]], seen


def wait_until_idle(client: httpx.Client, timeout: float = 120) -> None:
    """Until the server runs and queues no job (A1111's idle /progress: job_count 0)."""
    deadline = time.monotonic() + timeout
    while client.get("/sdapi/v1/progress").json()["state"]["job_count"]:
        assert time.monotonic() < deadline, "the server never went idle"
        time.sleep(0.05)


def test_a1111_progress_during_the_hires_pass(client):
    result = {}
    body = {"prompt": "hires progress", "steps": 2, "enable_hr": True, "hr_second_pass_steps": MAX_STEPS,
            "denoising_strength": 1}
    wait_until_idle(client)                 # every /progress below is of this request's job
    worker = threading.Thread(target=lambda: result.update(r=client.post("/sdapi/v1/txt2img", json=body)))
    worker.start()
    samples = []
    while worker.is_alive():
        progress = client.get("/sdapi/v1/progress").json()
        if progress["state"]["sampling_steps"]:
            samples.append(progress)
    worker.join()
    assert result["r"].status_code == 200, result["r"].text
    assert samples, "the job was never seen running"
    for progress in samples:
        state = progress["state"]
        assert state["job_count"] == 2 and state["sampling_steps"] == (2, MAX_STEPS)[state["job_no"]]
        assert state["sampling_step"] <= state["sampling_steps"]
        assert 0 <= progress["progress"] <= 1 and progress["eta_relative"] >= 0
        done = state["job_no"] * 2 + state["sampling_step"]         # the whole job's steps, the first pass's 2 in
        assert progress["textinfo"] == f"step {done}/{2 + MAX_STEPS}"


# ---------------------------------------------------------------- 5. base64 with line breaks


def test_mime_wrapped_base64_decodes_and_garbage_is_refused(client):
    picture = png_bytes(Image.new("RGB", (64, 64), (200, 30, 30)), parameters="a cat\nSteps: 3, Seed: 1, Size: 64x64")
    wrapped = base64.encodebytes(picture).decode()
    assert "\n" in wrapped
    for image in (wrapped, "data:image/png;base64," + wrapped):
        info = client.post("/sdapi/v1/png-info", json={"image": image})
        assert info.status_code == 200 and info.json()["info"].startswith("a cat"), info.text
    img2img = client.post("/sdapi/v1/img2img", json={"prompt": "x", "steps": 2, "init_images": [wrapped]})
    assert img2img.status_code == 200, img2img.text
    for garbage in ("%%%", wrapped.replace("\n", "*\n", 3), "abc"):
        bad = client.post("/sdapi/v1/png-info", json={"image": garbage})
        assert bad.status_code == 400 and bad.json()["detail"] == "Invalid encoded image", bad.text


# ---------------------------------------------------------------- 6. broken files a client chose


def test_a_broken_model_or_lora_is_a_clean_4xx_without_server_paths(client, served):
    server, models = served
    titles = [m["title"] for m in client.get("/sdapi/v1/sd-models").json()]
    broken = next(t for t in titles if t.startswith("broken"))
    before = client.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
    refused = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "broken"})
    assert refused.status_code == 400, refused.text
    assert broken in refused.json()["errors"] and str(models) not in refused.text
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == before      # not switched

    per_request = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2,
                                                         "override_settings": {"sd_model_checkpoint": "broken"}})
    assert per_request.status_code == 400, per_request.text
    message = per_request.json()["errors"]
    assert "cannot be loaded" in message and broken in message and "internal error" not in message
    assert str(models) not in per_request.text

    lora = client.post("/sdapi/v1/txt2img", json={"prompt": "x <lora:badlora:1>", "steps": 2})
    assert lora.status_code == 400, lora.text
    assert "badlora" in lora.json()["errors"] and str(models) not in lora.text
    native = wait_for_job(client, client.post("/api/jobs", json={"prompt": "x", "steps": 2, "model": "broken"}).json()["id"])
    assert native["status"] == "failed" and "cannot be loaded" in native["error"] and str(models) not in native["error"]
    assert client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2}).status_code == 200   # still serving
    assert "Traceback" not in server.output()


# ---------------------------------------------------------------- 7. null means the default


def test_null_fields_take_their_defaults(client):
    nulls = dict.fromkeys(["seed", "batch_size", "n_iter", "override_settings", "alwayson_scripts", "subseed",
                           "subseed_strength", "enable_hr", "hr_scale", "hr_resize_x", "hr_resize_y",
                           "hr_second_pass_steps", "s_noise", "send_images", "negative_prompt", "sampler_name",
                           "styles"])
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, **nulls})
    assert response.status_code == 200, response.text
    assert len(response.json()["images"]) == 1
    assert client.post("/sdapi/v1/txt2img", json={"prompt": None, "steps": 2}).status_code == 200
    init = b64_png(Image.new("RGB", (64, 64), "blue"))
    img2img = client.post("/sdapi/v1/img2img", json={"prompt": "x", "steps": 2, "init_images": [init], "mask": None,
                                                     "mask_blur": None, "inpainting_mask_invert": None,
                                                     "include_init_images": None, "denoising_strength": None})
    assert img2img.status_code == 200, img2img.text
    extras = client.post("/sdapi/v1/extra-single-image", json={"image": init, "upscaler_1": None,
                                                               "upscaling_resize": None})
    assert extras.status_code == 200, extras.text
    native = client.post("/api/jobs", json={"prompt": "x", "steps": 2, "seed": None, "batch_size": None,
                                            "mask_blur": None, "clip_skip": None, "loras": None})
    assert native.status_code == 202, native.text
    assert wait_for_job(client, native.json()["id"])["status"] == "done"
    assert client.post("/api/jobs", json={"prompt": "x", "no_such_field": None}).status_code == 422


# ---------------------------------------------------------------- 7b. text that is not UTF-8

NOT_UTF8 = "caf\udce9"      # JSON's "caf\\udce9": a Latin-1 byte as Python's surrogateescape reads it


@pytest.mark.parametrize("path,body,named", [
    ("/sdapi/v1/txt2img", {"prompt": NOT_UTF8, "steps": 2}, "prompt"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "negative_prompt": NOT_UTF8, "steps": 2}, "negative_prompt"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "styles": ["ok", NOT_UTF8], "steps": 2}, "styles[1]"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "steps": 2, "alwayson_scripts": {"controlnet": {"args": [{"module": NOT_UTF8}]}}},
     "alwayson_scripts.controlnet.args[0].module"),
    ("/sdapi/v1/img2img", {"prompt": NOT_UTF8, "steps": 2, "init_images": ["iVBORw0KGgo="]}, "prompt"),
    ("/sdapi/v1/options", {"sd_vae": "Automatic", "my_note": NOT_UTF8}, "my_note"),
    ("/api/jobs", {"prompt": NOT_UTF8, "steps": 2}, "prompt"),
    ("/api/jobs", {"prompt": "x", "negative_prompt": NOT_UTF8, "steps": 2}, "negative_prompt"),
    ("/api/jobs", {"prompt": "x", "loras": [{"name": NOT_UTF8}], "steps": 2}, "loras[0].name"),
    ("/api/jobs", {"prompt": "x", "steps": 2, NOT_UTF8: 1}, "a field name in the request body"),
])
def test_text_that_is_not_utf8_is_a_422_naming_the_field_before_any_job(client, served, path, body, named):
    server, _ = served
    jobs = {job["id"] for job in client.get("/api/jobs").json()["jobs"]}
    response = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    message = response.json()["errors" if path.startswith("/sdapi/") else "detail"]
    assert message.startswith(f"{named} is not UTF-8 text: the byte 0xE9 at character 4"), message
    listed = client.get("/api/jobs")
    assert listed.status_code == 200 and {job["id"] for job in listed.json()["jobs"]} == jobs      # none queued
    assert "my_note" not in client.get("/sdapi/v1/options").json()
    assert "Traceback" not in server.output()


# ---------------------------------------------------------------- 8. info's seeds


def test_info_carries_the_variation_seed(client):
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "seed": 5, "subseed": 9,
                                                      "subseed_strength": 0.3, "batch_size": 2})
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert (info["seed"], info["all_seeds"]) == (5, [5, 5])             # A1111: the seed stays, subseeds count
    assert (info["subseed"], info["all_subseeds"], info["subseed_strength"]) == (9, [9, 10], 0.3)
    plain = json.loads(client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "seed": 5,
                                                               "batch_size": 2}).json()["info"])
    assert plain["all_seeds"] == [5, 6] and plain["subseed_strength"] == 0


def test_an_interrupted_batch_lists_every_seed_of_the_batch():
    from sdlab.server.a1111 import Txt2ImgIn, _info
    from sdlab.server.jobs import Job

    body = Txt2ImgIn(prompt="x", seed=7, batch_size=2, n_iter=2)
    job = Job(id="0" * 32, mode="txt2img", model="m [abc]", spec=None, created=time.time(), status="cancelled",
              settings={"prompt": "x", "seed": 7, "batch_size": 4, "subseed_strength": 0.0})
    info = _info(job, body, "m")
    assert info["all_seeds"] == [7, 8, 9, 10] and info["seed"] == 7 and info["interrupted"]
    assert info["all_prompts"] == ["x"] * 4 and len(info["all_negative_prompts"]) == 4
    subseed = info["subseed"]               # drawn for -1, as A1111's get_fixed_seed
    assert subseed >= 0 and info["all_subseeds"] == [subseed + i for i in range(4)]


# ---------------------------------------------------------------- 9. a mask of another size


def test_a_mask_of_another_size_is_resized_to_the_picture(client):
    init = Image.new("RGB", (64, 64), "red")
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (32, 32, 96, 96))
    response = client.post("/sdapi/v1/img2img", json={"prompt": "x", "steps": 2, "seed": 1,
                                                      "init_images": [b64_png(init)], "mask": b64_png(mask),
                                                      "mask_blur": 0, "denoising_strength": 1})
    assert response.status_code == 200, response.text
    out = picture(response.json()["images"][0])
    assert out.size == (64, 64)
    assert out.getpixel((2, 2)) == (255, 0, 0) and out.getpixel((32, 32)) != (255, 0, 0)   # the corner kept
    native = client.post("/api/jobs", json={"mode": "inpaint", "prompt": "x", "steps": 2, "init_image": b64_png(init),
                                            "mask_image": b64_png(mask.resize((40, 24)))})
    assert native.status_code == 202 and wait_for_job(client, native.json()["id"])["status"] == "done", native.text


# ---------------------------------------------------------------- 4. RGBA masks over HTTP


def test_a_transparent_mask_repaints_where_it_is_opaque(client):
    init = Image.new("RGB", (64, 64), "red")
    mask = Image.new("RGBA", (64, 64), (255, 255, 255, 0))              # white everywhere, transparent...
    mask.paste((255, 255, 255, 255), (16, 16, 48, 48))                  # ...but the painted centre
    body = {"prompt": "x", "steps": 2, "seed": 1, "init_images": [b64_png(init)], "mask": b64_png(mask), "mask_blur": 0,
            "denoising_strength": 1}
    out = Image.open(io.BytesIO(base64.b64decode(client.post("/sdapi/v1/img2img", json=body).json()["images"][0])))
    assert out.convert("RGB").getpixel((2, 2)) == (255, 0, 0)
    inverted = client.post("/sdapi/v1/img2img", json={**body, "inpainting_mask_invert": 1}).json()
    out = picture(inverted["images"][0])
    assert out.getpixel((32, 32)) == (255, 0, 0) and out.getpixel((2, 2)) != (255, 0, 0)


# ---------------------------------------------------------------- 10. png-info's keys


def test_png_info_answers_with_a1111s_keys(client):
    text = "a cat\nNegative prompt: dog\nSteps: 3, Sampler: Euler, CFG scale: 5, Seed: 1, Size: 64x48, Hires resize: 128x96"
    image = base64.b64encode(png_bytes(Image.new("RGB", (64, 48)), parameters=text)).decode()
    parameters = client.post("/sdapi/v1/png-info", json={"image": image}).json()["parameters"]
    assert "Size" not in parameters and (parameters["Size-1"], parameters["Size-2"]) == ("64", "48")
    assert (parameters["Hires resize-1"], parameters["Hires resize-2"]) == ("128", "96")
    assert parameters["Clip skip"] == "1" and parameters["Schedule type"] == "Automatic"
    assert parameters["Prompt"] == "a cat" and parameters["Negative prompt"] == "dog" and parameters["Seed"] == 1


# ---------------------------------------------------------------- A1111's img2img at denoising strength 0


def test_a1111_img2img_takes_denoising_strength_0(client):
    """A1111 runs one step at the lowest sigma (t_enc = 0) rather than refusing it."""
    init = Image.new("RGB", (64, 64), (200, 40, 40))
    response = client.post("/sdapi/v1/img2img", json={"prompt": "x", "steps": 4, "seed": 1,
                                                      "init_images": [b64_png(init)], "denoising_strength": 0})
    assert response.status_code == 200, response.text
    assert json.loads(response.json()["info"])["denoising_strength"] == 0
    assert "Denoising strength: 0" in json.loads(response.json()["info"])["infotexts"][0]


# ---------------------------------------------------------------- options set with POST options


def test_options_echo_what_was_set_and_clip_skip_applies_to_later_generations(client):
    """A1111's `opts.CLIP_stop_at_last_layers` is the clip skip of every later generation, under a request's
    override_settings; an sd_vae that is not a name is refused naming the key."""
    sent = {"CLIP_stop_at_last_layers": 2, "sd_vae": "None", "live_previews_enable": False,
            "show_progress_every_n_steps": 5, "jpeg_quality": 80}
    try:
        assert client.post("/sdapi/v1/options", json=sent).status_code == 200
        options = client.get("/sdapi/v1/options").json()
        assert {key: options[key] for key in sent} == sent
        body = {"prompt": "x", "steps": 2, "seed": 1}
        info = json.loads(client.post("/sdapi/v1/txt2img", json=body).json()["info"])
        assert info["clip_skip"] == 2 and "Clip skip: 2" in info["infotexts"][0]
        overridden = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"CLIP_stop_at_last_layers": 1}})
        assert json.loads(overridden.json()["info"])["clip_skip"] == 1

        for bad, status in (({"sd_vae": 5}, 422), ({"CLIP_stop_at_last_layers": "2"}, 422),
                            ({"CLIP_stop_at_last_layers": 0, "jpeg_quality": 90}, 422)):
            refused = client.post("/sdapi/v1/options", json=bad)
            assert refused.status_code == status and next(iter(bad)) in refused.text, refused.text
        assert client.get("/sdapi/v1/options").json() == options                 # nothing set
        per_request = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_vae": ["other.pt"]}})
        assert per_request.status_code == 422 and "override_settings.sd_vae" in per_request.text, per_request.text
    finally:
        client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic"})


def test_tiling_reaches_the_picture_from_both_apis_and_the_option(client):
    """A1111's `tiling` field, its `tiling` option (`POST options`, under the field) and the native field all
    draw a tiling picture, recorded as A1111 records it (`Tiling: True`)."""
    body = {"prompt": "a wall", "steps": 2, "seed": 3}

    def a1111_infotext(**changes) -> str:
        response = client.post("/sdapi/v1/txt2img", json={**body, **changes})
        assert response.status_code == 200, response.text
        return json.loads(response.json()["info"])["infotexts"][0]

    assert "Tiling: True" in a1111_infotext(tiling=True) and "Tiling" not in a1111_infotext()
    try:
        assert client.post("/sdapi/v1/options", json={"tiling": True}).status_code == 200
        assert "Tiling: True" in a1111_infotext() and "Tiling" not in a1111_infotext(tiling=False)
        assert client.post("/sdapi/v1/options", json={"tiling": "yes"}).status_code == 422
    finally:
        client.post("/sdapi/v1/options", json={"tiling": False})
    native = client.post("/api/jobs", json={**body, "tiling": True})
    assert native.status_code == 202, native.text
    job = wait_for_job(client, native.json()["id"])
    assert job["status"] == "done" and "Tiling: True" in job["infotexts"][0] and job["request"]["tiling"] is True


# ---------------------------------------------------------------- extras: A1111's Extras upscale


def test_extras_upscale_sizes_and_none_are_a1111s(client):
    """`ScriptPostprocessingUpscale`: "None" (the default) returns the picture; `Upscaler.upscale` rounds the
    size down to 8 after its pass (Lanczos / Nearest by the scale), "Scale to" keeps the aspect (max scale)
    and with crop pastes the result centred on a w x h canvas."""
    source = Image.fromarray(np.random.default_rng(0).integers(0, 256, (75, 100, 3), dtype=np.uint8))

    def extras(**body) -> Image.Image:
        response = client.post("/sdapi/v1/extra-single-image", json={"image": b64_png(source), **body})
        assert response.status_code == 200, response.text
        return picture(response.json()["image"])

    def same(a: Image.Image, b: Image.Image) -> bool:
        return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))

    lanczos, nearest = Image.Resampling.LANCZOS, Image.Resampling.NEAREST
    assert same(extras(), source) and same(extras(upscaler_1="None", upscaling_resize=3), source)
    by_2 = source.resize((200, 150), lanczos).resize((200, 144), lanczos)
    assert same(extras(upscaler_1="Lanczos"), by_2)
    assert same(extras(upscaler_1="Nearest", upscaling_resize=1.5),
                source.resize((150, 112), nearest).resize((144, 112), lanczos))
    to = dict(upscaler_1="Lanczos", resize_mode=1, upscaling_resize_w=200, upscaling_resize_h=100)
    assert same(extras(**to, upscaling_crop=False), by_2)                          # max(200/100, 100/75) = 2
    assert same(extras(**to, upscaling_crop=True), by_2.crop((0, 22, 200, 122)))   # pasted at (0, 50 - 72)
