"""A1111's selectable scripts on the native job API (`POST /api/jobs` with `script_name` + `script_args`,
`sdlab.server.script_jobs`): the job's pictures are those `POST /sdapi/v1/txt2img` / `img2img` answer for the same
request and script (the same runner draws them), its script's requests stay out of the job list, a bad script
argument is a 422 at submission, and a cancel stops the script."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from server_fixtures import b64_png, sdlab_server, wait_for_job  # noqa: F401  (a session fixture)

NATIVE = {"prompt": "a red apple", "negative_prompt": "blurry", "steps": 2, "seed": 7, "cfg_scale": 5.0,
          "sampler": "Euler", "schedule": "Uniform", "img2img_convention": "a1111", "width": 64, "height": 64}
A1111 = {"prompt": "a red apple", "negative_prompt": "blurry", "steps": 2, "seed": 7, "cfg_scale": 5.0,
         "sampler_name": "Euler", "scheduler": "Uniform", "width": 64, "height": 64}   # the same job: A1111's rules
XYZ_STEPS = [4, "1,3"]          # x_type 4: A1111 1.10's Steps axis in both tabs; the rest: the UI's defaults


@pytest.fixture
def client(sdlab_server):
    with httpx.Client(base_url=sdlab_server.url, timeout=300) as c:
        yield c



def _job_pictures(client: httpx.Client, job: dict) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(client.get(url).content)).convert("RGB")) for url in job["images"]]


def _a1111_pictures(answer: httpx.Response) -> list[np.ndarray]:
    assert answer.status_code == 200, answer.text
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB")) for b in answer.json()["images"]]


def _submitted(client: httpx.Client, body: dict) -> dict:
    answer = client.post("/api/jobs", json=body)
    assert answer.status_code == 202, answer.text
    return answer.json()


def test_xyz_plot_job_draws_the_a1111_routes_grid_and_lists_as_one_job(client) -> None:
    args = XYZ_STEPS + [[], 0, "", [], 0, "", [], True, True]      # draw legend, include sub images
    submitted = _submitted(client, {**NATIVE, "script_name": "X/Y/Z plot", "script_args": args})
    job = wait_for_job(client, submitted["id"], 300)
    assert job["status"] == "done", job
    reference = _a1111_pictures(client.post("/sdapi/v1/txt2img", json={**A1111, "script_name": "x/y/z plot",
                                                                       "script_args": args}))
    pictures = _job_pictures(client, job)
    assert len(pictures) == len(reference) == 3                     # the grid, then each cell
    for ours, theirs in zip(pictures, reference):
        assert ours.shape == theirs.shape and (ours == theirs).all()
    assert "X Type: Steps" in job["infotexts"][0] and "Steps: 3" in job["infotexts"][2]
    assert job["request"]["script_name"] == "X/Y/Z plot" and job["request"]["script_args"] == args
    assert job["request"]["seed"] == 7 and job["steps"] == job["step"] == 4
    listed = client.get("/api/jobs").json()["jobs"]
    assert job["id"] in [j["id"] for j in listed]
    assert not any("script_job" in j["request"] for j in listed)    # its cells' jobs are not listed


def test_loopback_job_draws_the_a1111_routes_pictures(client) -> None:
    init = b64_png(Image.new("RGB", (64, 64), (200, 80, 40)))
    args = [2, 0.5, "Linear", "None"]
    job = wait_for_job(client, _submitted(client, {**NATIVE, "mode": "img2img", "init_image": init, "strength": 0.6,
                                                   "script_name": "Loopback", "script_args": args})["id"], 300)
    assert job["status"] == "done", job
    reference = _a1111_pictures(client.post("/sdapi/v1/img2img", json={
        **A1111, "init_images": [init], "denoising_strength": 0.6, "script_name": "loopback", "script_args": args}))
    pictures = _job_pictures(client, job)
    assert len(pictures) == len(reference) == 3                     # the loops' grid, then each loop's picture
    for ours, theirs in zip(pictures, reference):
        assert (ours == theirs).all()


def test_an_sd_upscale_jobs_picture_carries_the_first_batchs_text_and_names_its_script(client) -> None:
    """A native SD upscale job's picture is a file with the first batch's text and the script's fields, as A1111
    saves it (`initial_info`; the API answer's picture has none): dropped, it selects SD upscale again."""
    init = b64_png(Image.new("RGB", (48, 48), (200, 80, 40)))
    args = [None, 16, "Lanczos", 2]
    job = wait_for_job(client, _submitted(client, {**NATIVE, "mode": "img2img", "init_image": init, "strength": 0.3,
                                                   "script_name": "SD upscale", "script_args": args})["id"], 300)
    assert job["status"] == "done", job
    answer = client.post("/sdapi/v1/img2img", json={**A1111, "init_images": [init], "denoising_strength": 0.3,
                                                    "script_name": "sd upscale", "script_args": args})
    (ours,), (theirs,) = _job_pictures(client, job), _a1111_pictures(answer)
    assert (ours == theirs).all()
    assert job["infotexts"] == json.loads(answer.json()["info"])["infotexts"]
    read = _read(client, base64.b64encode(client.get(job["images"][0]).content).decode())
    assert (read["settings"]["script_name"], read["settings"]["script_args"]) == ("SD upscale",
                                                                                 [None, 16, "Lanczos", None])


@pytest.mark.parametrize("body, said", [
    ({"script_name": "X/Y/Z plot", "script_args": [999, "1,2"]}, "x_type must be 0.."),
    ({"script_name": "X/Y/Z plot", "script_args": [4, "a,b"]}, "Steps axis"),
    ({"script_name": "Loopback", "script_args": [2]}, "Script 'Loopback' not found"),   # img2img's only
    ({"script_name": "no such script"}, "Script 'no such script' not found"),
])
def test_bad_script_requests_are_422_at_submission(client, body, said) -> None:
    before = len(client.get("/api/jobs").json()["jobs"])
    answer = client.post("/api/jobs", json={**NATIVE, **body})
    assert answer.status_code == 422, answer.text
    assert said in answer.text
    assert len(client.get("/api/jobs").json()["jobs"]) == before


def test_cancel_stops_the_script(client) -> None:
    args = [4, ",".join(["40"] * 6)]                # six cells of 40 steps: cancelled long before the end
    job_id = _submitted(client, {**NATIVE, "script_name": "X/Y/Z plot", "script_args": args})["id"]
    deadline = time.monotonic() + 120
    while client.get(f"/api/jobs/{job_id}").json()["step"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert client.delete(f"/api/jobs/{job_id}").json()["status"] == "running"
    job = wait_for_job(client, job_id, 120)
    assert job["status"] == "cancelled" and job["step"] < 40, job
    assert client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0     # nothing left queued


def _read(client: httpx.Client, picture_b64: str) -> dict:
    """`POST /api/parameters` of a picture (base64)."""
    answer = client.post("/api/parameters", json={"image": picture_b64})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_a_scripts_picture_names_its_script_and_arguments(client):
    """`POST /api/parameters` reads a script's fields as the job's script_name / script_args (A1111's order; null:
    not recorded): an X/Y/Z plot's grid by its Script, X Type (its label) and X Values (an axis it does not name:
    Nothing), Loopback's and SD upscale's by their own labels; a picture without them names no script."""
    grid = client.post("/sdapi/v1/txt2img", json={**A1111, "script_name": "x/y/z plot",
                                                   "script_args": [4, "1,2", [], 1, "3, 4"]})
    read = _read(client, grid.json()["images"][0])
    assert read["settings"]["script_name"] == "X/Y/Z plot"
    assert read["settings"]["script_args"] == ["Steps", "1,2", [], "Seed", "3, 4", [], "Nothing", "", [],
                                               None, None, None, None, None, None, None, None, True]
    assert read["unread"] == ["Fixed Y Values: 3, 4"]       # A1111 pastes the values as typed too
    text = "a cat\nSteps: 2, Sampler: Euler, CFG scale: 5, Seed: 1, Size: 64x64, Denoising strength: 0.5"
    for fields, name, args in (
            (", Final denoising strength: 0.25, Denoising curve: Aggressive", "Loopback",
             [None, 0.25, "Aggressive", None]),
            (", SD upscale overlap: 16, SD upscale upscaler: Lanczos", "SD upscale", [None, 16, "Lanczos", None]),
            ("", None, None)):
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", text + fields)
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64)).save(buffer, "PNG", pnginfo=info)
        read = _read(client, base64.b64encode(buffer.getvalue()).decode())
        assert (read["settings"].get("script_name"), read["settings"].get("script_args")) == (name, args)
        assert read["unread"] == []


def test_the_axes_with_choices_list_the_servers_values(client) -> None:
    """`GET /api/scripts` gives each X/Y/Z axis with choices the values A1111 1.10's `AxisOption.choices` list
    (scripts/xyz_grid.py): the samplers, the schedule types' labels, the checkpoints' titles (any case order), the
    VAEs after Automatic and None, the styles, the hires upscalers after the latent modes; an axis without choices
    has none. Each offered value draws: a plot over two of each is accepted."""
    scripts = client.get("/api/scripts").json()
    axes = {axis["label"]: axis for axis in scripts["txt2img"]["axes"]}
    samplers = [s["name"] for s in client.get("/sdapi/v1/samplers").json()]
    titles = sorted((m["title"] for m in client.get("/sdapi/v1/sd-models").json()), key=str.casefold)
    assert axes["Sampler"]["values"] == axes["Hires sampler"]["values"] == samplers
    assert axes["Schedule type"]["values"] == [s["label"] for s in client.get("/sdapi/v1/schedulers").json()]
    assert axes["Checkpoint name"]["values"] == titles and axes["Refiner checkpoint"]["values"] == ["None", *titles]
    assert axes["VAE"]["values"] == ["Automatic", "None", *(v["model_name"] for v in client.get("/sdapi/v1/sd-vae").json())]
    assert axes["Styles"]["values"] == [s["name"] for s in client.get("/sdapi/v1/prompt-styles").json()]
    latent = [m["name"] for m in client.get("/sdapi/v1/latent-upscale-modes").json()]
    assert axes["Hires upscaler"]["values"][:len(latent)] == latent
    assert "values" not in axes["Steps"] and all(("values" in a) == a["choices"] for a in axes.values())
    # sd-webui-freeu's lib_free_u/xyz_grid.py: choices_bool() returns ["False", "True"]; A1111 1.10's xyz_grid.py:
    # boolean_choice(reverse=True) is ["False", "True"] too, and RNG source's choices ["GPU", "CPU", "NV"]
    assert axes["[FreeU] Enabled"]["values"] == axes["SGM noise multiplier"]["values"] == ["False", "True"]
    assert axes["RNG source"]["values"] == ["GPU", "CPU", "NV"]
    img2img = {axis["label"]: axis for axis in scripts["img2img"]["axes"]}
    assert img2img["Sampler"]["values"] == samplers and img2img["VAE"]["values"] == axes["VAE"]["values"]
    for label in ("Sampler", "Schedule type", "Checkpoint name", "VAE", "RNG source"):
        values = axes[label]["values"][:2]
        answer = client.post("/api/jobs", json={**NATIVE, "steps": 1, "width": 32, "height": 32,
                                                "script_name": "X/Y/Z plot", "script_args": [
            axes[label]["index"], ",".join(values), [], 0, "", [], 0, "", [], False, False, False, False, False,
            False, False, 0, True]})
        assert answer.status_code == 202, (label, answer.text)
        assert wait_for_job(client, answer.json()["id"], 300)["status"] == "done", label
