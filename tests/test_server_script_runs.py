"""A1111's selectable scripts run as one task (modules/api/api.py runs `scripts.run(p, *script_args)` between one
`state.begin()` and `state.end()`): every cell's / line's request checked before any is drawn, `/progress` rising
once over all of them (scripts/xyz_grid.py `state.job_count = list_size * p.n_iter`, scripts/prompts_from_file.py
`state.job_count = sum of each line's n_iter`, `state.job = "k out of N"`), `/interrupt` ending the rest
(xyz_grid.py `cell`: `if shared.state.interrupted: return Processed(p, [], p.seed, "")`, which `draw_xyz_grid`
draws as `Image.new(cell_mode, cell_size)`; prompts_from_file.py's later `process_images` stop at
`state.interrupted` before their first batch), and Prompts from file's info the request's (`Processed(p, images,
p.seed, "", all_prompts=..., infotexts=...)` of the request's own `p`)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from sdlab.server.a1111_scripts import RUNNABLE_SCRIPTS, axis_types
from server_fixtures import b64_png, picture, sdlab_server  # noqa: F401  (sdlab_server: a session fixture)

BASE = {"prompt": "a red apple", "negative_prompt": "blurry", "steps": 2, "seed": 7, "cfg_scale": 5.0,
        "sampler_name": "Euler"}
XYZ = "x/y/z plot"
FILE = "prompts from file or textbox"


def xyz_args(x_label: str, x_values: str, **given) -> list:
    """`script_args` in A1111 1.10's order (X type, X values, ..., include_lone_images 10th)."""
    x_type = [axis.label for axis in axis_types("txt2img")].index(x_label)
    args = [x_type, x_values, [], 0, "", [], 0, "", [], True, False, False, False, False, False, False, 0, False]
    if given.get("include_lone_images"):
        args[10] = True
    return args


@pytest.fixture
def server(sdlab_server):
    with httpx.Client(base_url=sdlab_server.url, timeout=300) as c:
        yield c


def job_count(server) -> int:
    return len(server.get("/api/jobs", params={"limit": 1000}).json()["jobs"])


def pixels(b64: str) -> np.ndarray:
    return np.asarray(picture(b64))


def posted(server, body: dict, answers: list) -> threading.Thread:
    """POST body to txt2img in a thread, its answer appended to `answers`."""
    thread = threading.Thread(target=lambda: answers.append(server.post("/sdapi/v1/txt2img", json=body)))
    thread.start()
    return thread


def progress_until_done(server, thread: threading.Thread) -> list[dict]:
    samples = []
    while thread.is_alive():
        samples.append(server.get("/sdapi/v1/progress", params={"skip_current_image": True}).json())
        time.sleep(0.02)
    return samples


def interrupted_at_first_step(server, body: dict) -> tuple[httpx.Response, int]:
    """The answer to `body` interrupted at its first job's third sampler step, and the jobs it queued."""
    before, answers = job_count(server), []
    thread = posted(server, body, answers)
    while thread.is_alive():
        state = server.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()["state"]
        if state["sampling_step"] >= 3:
            server.post("/sdapi/v1/interrupt")
            break
        time.sleep(0.01)
    thread.join()
    return answers[0], job_count(server) - before


@pytest.mark.parametrize("body, single, message", [
    ({"script_name": XYZ, "script_args": xyz_args("Steps", "1, 100000")}, {"steps": 100000},
     "x/y/z plot cell Steps: 100000: steps must be"),
    ({"script_name": XYZ, "script_args": xyz_args("Eta", "0, -5")}, {"eta": -5}, "x/y/z plot cell Eta: -5.0: eta must"),
    ({"script_name": FILE, "script_args": [False, False, "start", "a cat\n--prompt dog --width 7"]}, {"width": 7},
     "prompts from file or textbox line 2: "),
    ({"script_name": FILE, "script_args": [False, False, "start", "a cat\n--prompt dog --steps 100000"]},
     {"steps": 100000}, "prompts from file or textbox line 2: steps must be"),
])
def test_a_request_the_route_refuses_in_any_cell_is_refused_before_anything_is_drawn(server, body, single,
                                                                                      message) -> None:
    """Refused as the plain route refuses that request (its status), naming the cell / line, no job queued."""
    plain = server.post("/sdapi/v1/txt2img", json={**BASE, **single})
    assert plain.status_code >= 400
    before = job_count(server)
    answer = server.post("/sdapi/v1/txt2img", json={**BASE, **body})
    assert answer.status_code == plain.status_code, answer.text
    assert answer.json()["detail"].startswith(message), answer.text
    assert job_count(server) == before


def test_an_interrupt_ends_the_plot_with_black_cells(server) -> None:
    body = {**BASE, "steps": 150, "script_name": XYZ,
            "script_args": xyz_args("Seed", "1, 2, 3, 4", include_lone_images=True)}
    answer, jobs = interrupted_at_first_step(server, body)
    assert answer.status_code == 200, answer.text
    assert jobs == 1                    # cells 2..4 never queued
    images, info = answer.json()["images"], json.loads(answer.json()["info"])
    assert len(images) == 1 + 4
    assert pixels(images[1]).any() and not any(pixels(image).any() for image in images[2:])
    assert info["infotexts"][1] is not None and info["infotexts"][2:] == [None, None, None]
    assert info["all_seeds"][1:] == [None, None, None]


def test_an_interrupt_ends_the_prompts_file_after_the_line_it_stops(server) -> None:
    body = {**BASE, "steps": 150, "script_name": FILE, "script_args": [False, False, "start", "a\nb\nc"]}
    answer, jobs = interrupted_at_first_step(server, body)
    assert answer.status_code == 200, answer.text
    assert jobs == 1
    info = json.loads(answer.json()["info"])
    assert len(answer.json()["images"]) == len(info["infotexts"]) == 1
    assert info["all_prompts"] == ["a a red apple", "b a red apple", "c a red apple"]   # A1111 lists every line's


def test_progress_rises_once_over_the_whole_plot(server) -> None:
    """3 cells of 2 batches: A1111's job_count 6, job_no counting up over the cells, job "k out of 3"."""
    answers = []
    thread = posted(server, {**BASE, "steps": 40, "n_iter": 2, "script_name": XYZ,
                             "script_args": xyz_args("Seed", "1, 2, 3")}, answers)
    samples = [s for s in progress_until_done(server, thread) if s["state"]["job"]]
    assert answers[0].status_code == 200, answers[0].text
    running = [s for s in samples if s["state"]["sampling_steps"]]
    assert running and {s["state"]["job_count"] for s in running} == {6}
    assert [s["state"]["job_no"] for s in running] == sorted(s["state"]["job_no"] for s in running)
    assert max(s["state"]["job_no"] for s in running) >= 4
    values = [s["progress"] for s in running]
    assert values == sorted(values)
    assert {s["state"]["job"] for s in running} <= {"1 out of 3", "2 out of 3", "3 out of 3"}


def test_progress_of_the_prompts_file_counts_every_lines_batches(server) -> None:
    answers = []
    thread = posted(server, {**BASE, "steps": 40, "script_name": FILE,
                             "script_args": [False, False, "start", "--prompt a --n_iter 2\n--prompt b --n_iter 2\nc"]}, answers)
    samples = [s for s in progress_until_done(server, thread) if s["state"]["sampling_steps"]]
    assert answers[0].status_code == 200, answers[0].text
    assert samples and {s["state"]["job_count"] for s in samples} == {5}
    assert max(s["state"]["job_no"] for s in samples) >= 3


def test_prompts_file_info_is_the_requests(server) -> None:
    """A1111's `Processed(p, ...)` of the request: its steps, CFG; a size it leaves unset as a line leaving it
    unset drew it; `prompt` the first line's drawn one (`Processed.js()`: `all_prompts[0]`)."""
    text = "--prompt dog --steps 3 --width 72 --cfg_scale 9\ncat"
    answer = server.post("/sdapi/v1/txt2img", json={**BASE, "prompt": "base", "script_name": FILE,
                                                     "script_args": [False, False, "start", text]})
    assert answer.status_code == 200, answer.text
    info = json.loads(answer.json()["info"])
    cat = json.loads(server.post("/sdapi/v1/txt2img", json={**BASE, "prompt": "cat base"}).json()["info"])
    assert (info["prompt"], info["steps"], info["cfg_scale"], info["width"]) == ("dog base", 2, 5.0, cat["width"])
    assert info["all_prompts"] == ["dog base", "cat base"]


def test_prompt_matrix_info_keeps_the_requests_batch_size(server) -> None:
    answer = server.post("/sdapi/v1/txt2img", json={**BASE, "prompt": "a|b", "batch_size": 2,
                                                     "script_name": "prompt matrix", "script_args": []})
    assert answer.status_code == 200, answer.text
    assert json.loads(answer.json()["info"])["batch_size"] == 2


def init_picture() -> str:
    return b64_png(Image.new("RGB", (64, 64), (90, 20, 200)))


def assert_same_answer(answer: httpx.Response, expected: httpx.Response) -> None:
    assert answer.status_code == expected.status_code, answer.text
    if expected.status_code != 200:
        assert answer.json()["detail"] == expected.json()["detail"]
        return
    for image, wanted in zip(answer.json()["images"], expected.json()["images"], strict=True):
        assert np.array_equal(pixels(image), pixels(wanted))


@pytest.mark.parametrize("script, mode", [(script.title, mode) for script in RUNNABLE_SCRIPTS for mode in script.modes])
def test_a_script_without_script_args_runs_as_with_an_empty_list(server, script, mode) -> None:
    """A1111's request models declare `script_args` a list defaulting to [] (modules/api/models.py: `{"key":
    "script_args", "type": list, "default": []}`), so a script named without them runs on the UI's defaults, as
    with [] (null is unset too). Their answer: pictures, or a 422 where the 64 px request is too small for them."""
    body = {**BASE, "prompt": "a red | apple", "steps": 1, "width": 64, "height": 64, "script_name": script}
    if mode == "img2img":
        body["init_images"] = [init_picture()]
    empty = server.post(f"/sdapi/v1/{mode}", json={**body, "script_args": []})
    assert empty.status_code in (200, 422), empty.text
    assert_same_answer(server.post(f"/sdapi/v1/{mode}", json=body), empty)
    assert_same_answer(server.post(f"/sdapi/v1/{mode}", json={**body, "script_args": None}), empty)


def test_a_plot_whose_every_cell_fails_is_a_grid_of_black_cells(tmp_path, caplog) -> None:
    """Every cell's job failing (an images folder that cannot be written: the job fails, a 500 without a script),
    A1111 1.10's plot still answers: xyz_grid.py `cell` catches `process_images`' exception and returns
    `Processed(p, [], p.seed, "")`, `process_cell` puts `Image.new(cell_mode, (width, height))` in its place, and
    its `not any(processed_result.images)` never holds (a PIL picture is never false), so the grid of black cells
    is drawn with its legend: 200, the grid, black sub-images at the request's size, every cell's text, prompt and
    seed null. Before, the answer was the first cell's error."""
    import asyncio

    from sdlab.server.a1111 import Txt2ImgIn, _script_host, _txt2img_request
    from sdlab.server.a1111_scripts import run_xyz_plot
    from sdlab.server.config import ServerConfig
    from sdlab.server.service import Service

    service = Service(ServerConfig(tmp_path / "served"))
    service.images_dir.rmdir()
    service.images_dir.write_bytes(b"")             # every job fails writing its pictures
    body = Txt2ImgIn(**{**BASE, "width": 32, "height": 48, "script_name": XYZ,
                        "script_args": xyz_args("Seed", "1, 2, 3", include_lone_images=True)})
    service.start()
    try:
        answer = asyncio.run(run_xyz_plot(_script_host(service, _txt2img_request), body, "txt2img"))
        jobs = service.store.jobs(10)
    finally:
        service.stop()
        service.store.close()
    assert [job["status"] for job in jobs] == ["failed"] * 3
    assert caplog.text.count("a script's request failed, left blank") == 3
    images, info = answer["images"], json.loads(answer["info"])
    assert len(images) == 1 + 3
    grid = pixels(images[0])
    assert grid.shape[0] > 48 and grid.shape[1] >= 3 * 32 and (grid[-48:, -32:] == 0).all()   # legend, black cells
    for cell in images[1:]:
        assert pixels(cell).shape == (48, 32, 3) and not pixels(cell).any()
    assert info["infotexts"][1:] == [None] * 3 and info["all_seeds"] == [None] * 3
    assert info["all_prompts"] == [None] * 3 and info["index_of_first_image"] == 1
    assert (info["width"], info["height"]) == (32, 48)
