"""A native script job draws each of its requests as the plain native job with the script's changes
(`script_jobs.ScriptJob.job_of`): the model's default sampler and schedule, sdlab's hires denoise and conventions, its
LoRAs in the hires pass, none of the server's A1111 options; its script's requests stay out of `GET /api/jobs`'
count, a full queue is the plain job's 429, and a job cancelled while queued keeps no picture."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
from PIL import Image

from server_fixtures import b64_png, drawn_pictures, png_picture, start_server, wait_for_job
from server_fixtures import sdlab_server  # noqa: F401  (a session fixture)

BASE = {"prompt": "a red apple", "negative_prompt": "blurry", "steps": 3, "seed": 7, "width": 64, "height": 64}
NOTHING_PLOT = {"script_name": "X/Y/Z plot",      # Nothing axes, include sub images: the grid, then the one cell
                "script_args": [0, "", [], 0, "", [], 0, "", [], False, True]}
INIT = b64_png(Image.new("RGB", (64, 64), (200, 80, 40)))
MASK = Image.new("L", (64, 64), 0)
MASK.paste(255, (16, 16, 48, 48))
MASK = b64_png(MASK)
CASES = {
    "model default sampler and schedule": {},
    "sampler, model default schedule": {"sampler": "Euler"},
    "ancestral eta rng": {"sampler": "Euler a", "eta": 0.5, "rng": "NV", "eta_noise_seed_delta": 31337},
    "churn": {"sampler": "Euler", "s_churn": 0.5, "s_noise": 1.01, "schedule": "karras"},
    "clip skip under diffusers' rule": {"clip_skip": 2},
    "tiling ngms guidance rescale": {"tiling": True, "s_min_uncond": 5.0, "guidance_rescale": 0.5},
    "hires, its denoise unset": {"sampler": "Euler", "steps": 6, "hr_scale": 1.5},
    "hires with its own sampler": {"steps": 4, "hr_scale": 1.5, "hr_sampler": "Euler a", "hr_denoise": 0.6},
    "loras with a hires prompt": {"steps": 6, "hr_scale": 1.5, "hr_prompt": "a green apple",
                                  "loras": [{"name": "sdlab-tiny-lcm", "weight": 0.6}]},
    "img2img under diffusers' rule": {"mode": "img2img", "init_image": INIT, "strength": 0.5},
    "inpaint": {"mode": "inpaint", "init_image": INIT, "mask_image": MASK, "strength": 0.8, "mask_blur": 2.5,
                "inpaint_fill": "latent noise"},
}


@pytest.fixture
def client(sdlab_server):
    with httpx.Client(base_url=sdlab_server.url, timeout=300) as c:
        yield c



def _drawn(client: httpx.Client, body: dict) -> tuple[dict, list[np.ndarray]]:
    return drawn_pictures(client, body, lambda data: np.asarray(png_picture(data).convert("RGB")), timeout_s=300)


def _assert_cell_is_the_plain_job(client: httpx.Client, body: dict) -> None:
    plain, (picture,) = _drawn(client, body)
    plot, (_, cell) = _drawn(client, {**body, **NOTHING_PLOT})
    assert (cell == picture).all(), np.abs(cell.astype(int) - picture).max()
    assert plot["infotexts"][1] == plain["infotexts"][0]


@pytest.mark.parametrize("fields", CASES.values(), ids=CASES.keys())
def test_a_plots_cell_is_the_plain_job(client, fields) -> None:
    _assert_cell_is_the_plain_job(client, {**BASE, **fields})


def test_the_servers_a1111_options_change_no_cell(client) -> None:
    options = {"tiling": True, "eta_ancestral": 0.3, "s_churn": 0.9, "s_noise": 1.05, "s_min_uncond": 6.0,
               "initial_noise_multiplier": 0.8, "sdxl_crop_top": 8}
    before = client.get("/sdapi/v1/options").json()
    assert client.post("/sdapi/v1/options", json=options).status_code == 200
    try:
        for fields in ({"sampler": "Euler"}, {"sampler": "Euler a", "s_churn": 0.2},
                       {"mode": "img2img", "init_image": INIT, "strength": 0.6}):
            _assert_cell_is_the_plain_job(client, {**BASE, **fields})
    finally:
        client.post("/sdapi/v1/options", json={key: before[key] for key in options})


def test_a_steps_axis_cell_is_the_plain_job_with_those_steps(client) -> None:
    """A cell the axis changes: the plain job at the cell's steps, under the model's sampler and schedule."""
    _, (picture,) = _drawn(client, {**BASE, "steps": 2})
    _, pictures = _drawn(client, {**BASE, "script_name": "X/Y/Z plot", "script_args": [4, "2,3", [], 0, "", [], 0,
                                                                                       "", [], False, True]})
    assert (pictures[1] == picture).all()


AXIS_CASES = {     # the job's fields, its X axis (A1111 1.10's txt2img type) and value, the plain job's field of it
    "hires sampler, the hires schedule unset": ({"sampler": "DPM++ 2M", "hr_scale": 1.5}, 10, "Euler",
                                                {"hr_sampler": "Euler"}),
    "hires sampler the first pass's": ({"sampler": "DPM++ 2M", "hr_scale": 1.5}, 10, "DPM++ 2M",
                                       {"hr_sampler": "DPM++ 2M"}),
    "schedule of a hires job with its own sampler": ({"sampler": "DPM++ 2M", "hr_scale": 1.5, "hr_sampler": "Euler a"},
                                                     17, "Karras", {"schedule": "karras"}),
    "sampler of a preset's job": ({"preset": "tcd"}, 9, "Euler a", {"sampler": "Euler a"}),
    "the preset's sampler": ({"preset": "tcd"}, 9, "TCD", {"sampler": "TCD"}),
    "timestep sampler DDIM on a karras job": ({"sampler": "Euler", "schedule": "karras"}, 9, "DDIM",
                                              {"sampler": "DDIM"}),
    "timestep sampler UniPC on a karras job": ({"sampler": "Euler", "schedule": "karras"}, 9, "UniPC",
                                               {"sampler": "UniPC"}),
    "schedule of a DDIM job": ({"sampler": "DDIM"}, 17, "Karras", {"schedule": "karras"}),
}


@pytest.mark.parametrize("job, axis, value, plain", AXIS_CASES.values(), ids=AXIS_CASES.keys())
def test_an_axis_cell_is_the_plain_job_with_its_value(client, job, axis, value, plain) -> None:
    """A cell draws the plain job with the axis's value, what A1111's rules derive from it (a hires sampler's
    "Automatic" schedule, a timestep sampler's own schedule, a preset's eta only with its own sampler) derived by
    the job's own."""
    body = {**BASE, **job}
    plain_job, (picture,) = _drawn(client, {**body, **plain})
    plot, (_, cell) = _drawn(client, {**body, "script_name": "X/Y/Z plot", "script_args": [
        axis, value, [], 0, "", [], 0, "", [], False, True, False, False, False, False, False, 0, True]})  # csv mode
    assert (cell == picture).all(), np.abs(cell.astype(int) - picture).max()
    assert plot["infotexts"][1] == plain_job["infotexts"][0]


OUTPAINTINGS = {"Outpainting mk2": [None, 16, 0, ["left"], 1.0, 0.05], "Poor man's outpainting": [16, 0, 1, ["right"]]}


@pytest.mark.parametrize("script, args", OUTPAINTINGS.items(), ids=OUTPAINTINGS.keys())
def test_an_img2img_jobs_unused_mask_fields_change_no_outpainting(client, script, args) -> None:
    """An img2img job draws no mask: its mask fields do not change the mask an outpainting script draws."""
    body = {**BASE, "mode": "img2img", "init_image": INIT, "strength": 0.6, "script_name": script, "script_args": args}
    _, (plain,) = _drawn(client, body)
    _, (masked,) = _drawn(client, {**body, "mask_blur": 6, "inpaint_fill": "latent noise", "inpaint_padding": 4,
                                   "inpaint_only_masked": True, "invert_mask": True})
    assert (masked == plain).all(), np.abs(masked.astype(int) - plain).max()


def test_a_waiting_script_jobs_requests_are_not_listed(client) -> None:
    """A script's request's row is tagged as it is written: while the request waits, its script job alone is
    listed."""
    long = _running(client, {**BASE, "steps": 60})
    plot = client.post("/api/jobs", json={**BASE, "steps": 1, "script_name": "X/Y/Z plot", "script_args": [4, "1,1"]})
    try:
        assert [job["id"] for job in client.get("/api/jobs", params={"limit": 3}).json()["jobs"][:2]] == [
            plot.json()["id"], long]
    finally:
        client.delete(f"/api/jobs/{long}")
        wait_for_job(client, plot.json()["id"], 300)


def test_the_job_list_counts_only_listed_jobs(client) -> None:
    plain, _ = _drawn(client, {**BASE, "steps": 1})
    plot, _ = _drawn(client, {**BASE, "steps": 1, "script_name": "X/Y/Z plot", "script_args": [4, "1,1,1"]})
    assert [job["id"] for job in client.get("/api/jobs", params={"limit": 2}).json()["jobs"]] == [plot["id"],
                                                                                                  plain["id"]]


def _running(client: httpx.Client, body: dict) -> str:
    job_id = client.post("/api/jobs", json=body).json()["id"]
    deadline = time.monotonic() + 60
    while client.get(f"/api/jobs/{job_id}").json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return job_id


def test_a_script_job_cancelled_while_queued_keeps_no_picture(client) -> None:
    long = _running(client, {**BASE, "steps": 150})    # holds the worker; cancelled below
    queued = client.post("/api/jobs", json={**BASE, "script_name": "X/Y/Z plot", "script_args": [4, "1,2,3"]}).json()
    assert client.delete(f"/api/jobs/{queued['id']}").json()["status"] == "cancelled"   # at once, as a plain job's
    job = wait_for_job(client, queued["id"], 300)
    assert (job["status"], job["images"], job["error"]) == ("cancelled", [], None)
    client.delete(f"/api/jobs/{long}")
    wait_for_job(client, long, 300)


def test_a_script_job_past_max_queue_is_the_plain_jobs_429(tmp_path) -> None:
    server = start_server(tmp_path / "outputs", "--max-queue", "1")
    try:
        with httpx.Client(base_url=server.url, timeout=300) as c:
            running = _running(c, {**BASE, "steps": 60})
            waiting = c.post("/api/jobs", json={**BASE, "steps": 60}).json()["id"]
            plain = c.post("/api/jobs", json=BASE)
            script = c.post("/api/jobs", json={**BASE, "script_name": "X/Y/Z plot", "script_args": [4, "1,2"]})
            assert (script.status_code, script.json()) == (plain.status_code, plain.json()) == (429, plain.json())
            assert [job["id"] for job in c.get("/api/jobs").json()["jobs"]] == [waiting, running]   # no row
            for job_id in (waiting, running):
                c.delete(f"/api/jobs/{job_id}")
    finally:
        server.stop()
    assert "Traceback" not in server.log.read_text()
