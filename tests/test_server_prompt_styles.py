"""A1111's prompt styles on `sdlab serve --styles-file`: `GET /sdapi/v1/prompt-styles` lists them, a request's
`styles` draw exactly the picture of the styled prompts (txt2img, img2img, the hires prompts, Prompt matrix and
the X/Y/Z plot's Styles axis, the native API), and `png-info` / `infotext` find them again as A1111 1.10's
`parse_generation_parameters` (option `infotext_styles`)."""

from __future__ import annotations

import base64
import io
import json
import sqlite3
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from sdlab.pipeline.styles import StyleDatabase
from server_fixtures import start_server, wait_for_job

STYLES_CSV = ('name,prompt,negative_prompt\n'
              'cinematic,"{prompt}, film grain",blurry\n'
              'ink,"ink drawing, monochrome",\n'
              'sharp,sharp focus,"lowres, {prompt}"\n')
BASE = {"prompt": "a red apple", "negative_prompt": "ugly", "steps": 2, "seed": 7, "cfg_scale": 5.0,
        "sampler_name": "Euler"}
NATIVE_JOB = {"prompt": "a red apple", "negative_prompt": "ugly", "steps": 1, "seed": 7, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("styles")
    (folder / "styles.csv").write_text(STYLES_CSV, encoding="utf-8")
    server = start_server(folder / "out", "--styles-file", str(folder / "styles.csv"))
    yield server, StyleDatabase.load([folder / "styles.csv"])
    server.stop()


@pytest.fixture(scope="module")
def client(served):
    with httpx.Client(base_url=served[0].url + "/sdapi/v1", timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def styles(served) -> StyleDatabase:
    return served[1]


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def txt2img(client, **fields) -> dict:
    answer = client.post("/txt2img", json={**BASE, **fields})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_prompt_styles_lists_the_file(client) -> None:
    assert client.get("/prompt-styles").json() == [
        {"name": "cinematic", "prompt": "{prompt}, film grain", "negative_prompt": "blurry"},
        {"name": "ink", "prompt": "ink drawing, monochrome", "negative_prompt": ""},
        {"name": "sharp", "prompt": "sharp focus", "negative_prompt": "lowres, {prompt}"}]
    assert client.get("/cmd-flags").json()["styles_file"][0].endswith("styles.csv")


def test_styles_draw_the_styled_prompts(client, styles) -> None:
    names = ["cinematic", "ink", "unknown"]            # an unknown name: an empty style, as A1111's no_style
    styled = txt2img(client, styles=names)
    prompt, negative = styles.apply(BASE["prompt"], names), styles.apply_negative(BASE["negative_prompt"], names)
    assert prompt == "a red apple, film grain, ink drawing, monochrome" and negative == "ugly, blurry"
    plain = txt2img(client, prompt=prompt, negative_prompt=negative)
    assert np.array_equal(pixels(styled["images"][0]), pixels(plain["images"][0]))
    info = json.loads(styled["info"])
    assert (info["prompt"], info["negative_prompt"], info["styles"]) == (prompt, negative, names)
    assert info["infotexts"][0] == json.loads(plain["info"])["infotexts"][0]      # no label of its own: A1111's
    assert styled["parameters"]["prompt"] == BASE["prompt"] and styled["parameters"]["styles"] == names


def test_png_info_and_infotext_find_the_styles(client, styles) -> None:
    names = ["sharp", "cinematic"]
    styled = txt2img(client, styles=names)
    found = client.post("/png-info", json={"image": styled["images"][0]}).json()["parameters"]
    assert (found["Prompt"], found["Negative prompt"], found["Styles array"]) == ("a red apple", "ugly", names)
    text = json.loads(styled["info"])["infotexts"][0]
    again = client.post("/txt2img", json={"infotext": text})
    assert again.status_code == 200, again.text
    assert np.array_equal(pixels(again.json()["images"][0]), pixels(styled["images"][0]))
    assert json.loads(again.json()["info"])["styles"] == names
    client.post("/options", json={"infotext_styles": "Ignore"})
    try:
        kept = client.post("/png-info", json={"image": styled["images"][0]}).json()["parameters"]
        assert kept["Prompt"] == styles.apply("a red apple", names) and "Styles array" not in kept
    finally:
        client.post("/options", json={"infotext_styles": "Apply if any"})
    assert client.post("/options", json={"infotext_styles": "Sometimes"}).status_code == 422


def test_hires_prompts_are_styled(client, styles) -> None:
    hires = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "hr_second_pass_steps": 1,
             "hr_prompt": "a green pear"}
    styled = txt2img(client, styles=["ink"], **hires)
    plain = txt2img(client, prompt=styles.apply(BASE["prompt"], ["ink"]),
                    negative_prompt=styles.apply_negative(BASE["negative_prompt"], ["ink"]),
                    **{**hires, "hr_prompt": styles.apply("a green pear", ["ink"])})
    assert np.array_equal(pixels(styled["images"][0]), pixels(plain["images"][0]))
    assert "Hires prompt: \"a green pear, ink drawing, monochrome\"" in json.loads(styled["info"])["infotexts"][0]


def test_img2img_styles(client, styles) -> None:
    init = txt2img(client)["images"][0]
    body = {**BASE, "init_images": [init], "denoising_strength": 0.5}
    styled = client.post("/img2img", json={**body, "styles": ["sharp"]}).json()
    plain = client.post("/img2img", json={**body, "prompt": styles.apply(BASE["prompt"], ["sharp"]),
                                          "negative_prompt": styles.apply_negative("ugly", ["sharp"])}).json()
    assert np.array_equal(pixels(styled["images"][0]), pixels(plain["images"][0]))


def test_xyz_styles_axis_adds_to_the_requests_styles(client, styles) -> None:
    args = [30, "cinematic,sharp", [], 0, "", [], 0, "", [], True, True, False, False, False, False, False, 0, True]
    answer = txt2img(client, styles=["ink"], script_name="x/y/z plot", script_args=args)
    info = json.loads(answer["info"])
    assert info["all_prompts"] == [styles.apply("a red apple", ["ink", "cinematic"]),
                                       styles.apply("a red apple", ["ink", "sharp"])]
    cell = txt2img(client, styles=["ink", "sharp"])
    assert np.array_equal(pixels(answer["images"][2]), pixels(cell["images"][0]))
    assert "X Type: Styles" in info["infotexts"][0]


def test_prompt_matrix_styles_each_combination(client, styles) -> None:
    answer = txt2img(client, prompt="a red apple|at night", styles=["ink"], script_name="prompt matrix",
                     script_args=[False, False, "positive", "comma", 0])
    info = json.loads(answer["info"])
    assert info["all_prompts"] == [styles.apply(p, ["ink"]) for p in ("a red apple", "a red apple, at night")]


def test_prompts_from_file_lines_are_styled_and_a_styles_tag_replaces_the_styles(client, styles) -> None:
    """Each line is drawn with the request's styles; a line's `--styles ink` is A1111's `setattr(copy_p, "styles",
    "ink")`, whose characters its `apply_styles_to_prompt` takes for names (none here): the line draws unstyled.
    `info.prompt` is the first line's drawn prompt (A1111's `Processed.js()`: `all_prompts[0]`)."""
    answer = txt2img(client, styles=["cinematic"], script_name="prompts from file or textbox",
                     script_args=[False, False, "start", "a pear\n--prompt a cup --styles ink\n"])
    info = json.loads(answer["info"])
    drawn = [styles.apply("a pear a red apple", ["cinematic"]), styles.apply("a cup a red apple", "ink")]
    assert info["all_prompts"] == drawn == ["a pear a red apple, film grain", "a cup a red apple"]
    assert (info["prompt"], info["styles"]) == (drawn[0], ["cinematic"])
    plain = txt2img(client, prompt="a cup a red apple")
    assert np.array_equal(pixels(answer["images"][1]), pixels(plain["images"][0]))


def test_native_jobs_take_styles(served, styles) -> None:
    server, _ = served
    with httpx.Client(base_url=server.url + "/api", timeout=300) as api:
        job = api.post("/jobs", json={"prompt": "a red apple", "negative_prompt": "ugly", "steps": 2, "seed": 7,
                                      "styles": ["cinematic"]})
        assert job.status_code == 202, job.text
        unknown = api.post("/jobs", json={"prompt": "a", "styles": ["nope"]})
        assert unknown.status_code == 404 and "unknown style 'nope'" in unknown.text
        record = api.get(f"/jobs/{job.json()['id']}").json()
        while record["status"] in ("queued", "running"):
            time.sleep(0.2)
            record = api.get(f"/jobs/{job.json()['id']}").json()
    drawn = record["infotexts"][0].splitlines()
    assert drawn[0] == styles.apply("a red apple", ["cinematic"]) and drawn[1] == "Negative prompt: ugly, blurry"
    # the record: the prompts as sent and the styles, which draw the job again (a Reuse restores both)
    request = record["request"]
    assert (request["prompt"], request["negative_prompt"], request["styles"]) == ("a red apple", "ugly", ["cinematic"])


def test_a_styled_script_jobs_requests_record_their_cells_prompts_and_styles(served, styles) -> None:
    """Each request of a native script job on a styled job records the prompts its cell sent (Prompt S/R's) and
    its styles (a Styles axis's added), which style to the prompt its picture was drawn with."""
    server, _ = served
    args = [7, "apple,pear", [], 30, "sharp", [], 0, "", [], False, True, False, False, False, False, False, 0, True]
    with httpx.Client(base_url=server.url, timeout=300) as api:
        answer = api.post("/api/jobs", json={"prompt": "a red apple", "steps": 1, "seed": 7, "width": 64,
                                             "height": 64, "styles": ["ink"], "script_name": "X/Y/Z plot",
                                             "script_args": args})
        assert answer.status_code == 202, answer.text
        plot = wait_for_job(api, answer.json()["id"])
    assert plot["status"] == "done", plot
    with sqlite3.connect(server.output_dir / "sdlab-server.sqlite") as db:
        rows = db.execute("SELECT request FROM jobs WHERE json_extract(request, '$.script_job') = ? "
                          "ORDER BY created, rowid", (plot["id"],)).fetchall()
    records = [json.loads(row) for row, in rows]
    assert [(r["prompt"], r["styles"]) for r in records] == [("a red apple", ["ink", "sharp"]),
                                                             ("a red pear", ["ink", "sharp"])]
    assert [styles.apply(r["prompt"], r["styles"]) for r in records] == [
        text.splitlines()[0] for text in plot["infotexts"][1:]]


def test_native_parameters_take_the_styles_out_as_png_info(served, client, styles) -> None:
    """`POST /api/parameters` (the web UI's dropped PNG) takes the styles out of a picture's prompts and names
    them as `/sdapi/v1/png-info` does (the same `infotext_styles`, option `infotext_styles`): the settings draw the
    picture again, pixel-equal."""
    server, _ = served
    names = ["sharp", "cinematic"]
    styled = txt2img(client, styles=names)
    with httpx.Client(base_url=server.url, timeout=300) as api:
        read = api.post("/api/parameters", json={"image": styled["images"][0]})
        assert read.status_code == 200, read.text
        settings = read.json()["settings"]
        found = client.post("/png-info", json={"image": styled["images"][0]}).json()["parameters"]
        assert (settings["prompt"], settings["negative_prompt"], settings["styles"]) == (
            found["Prompt"], found["Negative prompt"], found["Styles array"]) == ("a red apple", "ugly", names)
        assert read.json()["unread"] == []
        job = api.post("/api/jobs", json=settings)
        assert job.status_code == 202, job.text
        record = wait_for_job(api, job.json()["id"])
        again = api.get(record["images"][0])
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(again.content)).convert("RGB"), dtype=np.int16),
                              pixels(styled["images"][0]))
        plain = txt2img(client)
        assert "styles" not in api.post("/api/parameters", json={"image": plain["images"][0]}).json()["settings"]
        for option, expected in (("Ignore", None), ("Apply", [])):  # Apply names none found; Ignore takes none out
            client.post("/options", json={"infotext_styles": option})
            try:
                kept = api.post("/api/parameters", json={"image": styled["images"][0] if option == "Ignore"
                                                     else plain["images"][0]}).json()["settings"]
            finally:
                client.post("/options", json={"infotext_styles": "Apply if any"})
            assert kept.get("styles") == expected
            if option == "Ignore":
                assert kept["prompt"] == styles.apply("a red apple", names)


def test_a_bad_styles_file_stops_the_server_with_one_line(tmp_path) -> None:
    import subprocess
    import sys

    from server_fixtures import server_env

    (tmp_path / "bad.csv").write_text("title,prompt\nx,y\n", encoding="utf-8")
    run = subprocess.run([sys.executable, "-m", "sdlab", "serve", "--port", "0", "--output-dir", str(tmp_path / "o"),
                          "--styles-file", str(tmp_path / "bad.csv")], capture_output=True, text=True, timeout=120,
                         env=server_env())
    assert run.returncode != 0 and "no 'name' column" in run.stderr and "Traceback" not in run.stderr


def _styles_axis_values(api: httpx.Client) -> list[str]:
    axes = api.get("/api/scripts").json()["txt2img"]["axes"]
    return next(axis["values"] for axis in axes if axis["label"] == "Styles")


def test_a_styles_file_edited_while_the_server_runs_is_read_again(tmp_path) -> None:
    """No restart: after styles.csv is edited, `GET /sdapi/v1/prompt-styles`, the native job's style names (its 404
    lists the styles), A1111 requests and native script jobs that apply styles all take the file as it now is."""
    import os

    path = tmp_path / "styles.csv"
    path.write_text("name,prompt\nink,ink drawing\n", encoding="utf-8")
    server = start_server(tmp_path / "out", "--styles-file", str(path))
    try:
        with httpx.Client(base_url=server.url, timeout=300) as api:
            assert [s["name"] for s in api.get("/sdapi/v1/prompt-styles").json()] == ["ink"]
            assert _styles_axis_values(api) == ["ink"]
            refused = api.post("/api/jobs", json={**NATIVE_JOB, "styles": ["neon"]})
            assert refused.status_code == 404 and "'ink'" in refused.text and "neon" not in refused.text.split(":")[-1]
            stamp = path.stat().st_mtime_ns + 10**9               # a coarse file system's clock moves on too
            path.write_text('name,prompt,negative_prompt\nink,"{prompt}, chalk drawing",\nneon,neon lights,dark\n',
                            encoding="utf-8")
            os.utime(path, ns=(stamp, stamp))
            assert api.get("/sdapi/v1/prompt-styles").json() == [
                {"name": "ink", "prompt": "{prompt}, chalk drawing", "negative_prompt": ""},
                {"name": "neon", "prompt": "neon lights", "negative_prompt": "dark"}]
            assert _styles_axis_values(api) == ["ink", "neon"]        # the X/Y/Z Styles axis's choices
            job = api.post("/api/jobs", json={**NATIVE_JOB, "styles": ["neon"]})
            assert job.status_code == 202, job.text
            drawn = wait_for_job(api, job.json()["id"])["infotexts"][0].splitlines()
            assert drawn[:2] == ["a red apple, neon lights", "Negative prompt: ugly, dark"]
            answer = api.post("/sdapi/v1/txt2img", json={**BASE, "width": 64, "height": 64, "styles": ["ink"]})
            assert json.loads(answer.json()["info"])["prompt"] == "a red apple, chalk drawing"
            args = [30, "neon", [], 0, "", [], 0, "", [], False, True, False, False, False, False, False, 0, True]
            plot = api.post("/api/jobs", json={**NATIVE_JOB, "styles": ["ink"], "script_name": "X/Y/Z plot",
                                               "script_args": args})
            assert plot.status_code == 202, plot.text
            cell = wait_for_job(api, plot.json()["id"])["infotexts"][1].splitlines()
            assert cell[:2] == ["a red apple, chalk drawing, neon lights", "Negative prompt: ugly, dark"]
    finally:
        server.stop()


def test_a_models_dirs_styles_file_made_after_start_is_listed_and_one_removed_is_dropped(tmp_path) -> None:
    """`sdlab serve --models-dir` started with no styles.csv watches the path it would read: the file made while
    the server runs is listed; removed, its styles are gone from the list (as A1111's reload)."""
    models = tmp_path / "models"
    models.mkdir()
    server = start_server(tmp_path / "out", "--models-dir", str(models))
    try:
        with httpx.Client(base_url=server.url, timeout=300) as api:
            assert api.get("/sdapi/v1/prompt-styles").json() == []
            (models / "styles.csv").write_text("name,prompt\nink,ink drawing\n", encoding="utf-8")
            assert [s["name"] for s in api.get("/sdapi/v1/prompt-styles").json()] == ["ink"]
            job = api.post("/api/jobs", json={**NATIVE_JOB, "styles": ["ink"]})
            assert job.status_code == 202, job.text
            (models / "styles.csv").unlink()
            assert api.get("/sdapi/v1/prompt-styles").json() == []
    finally:
        server.stop()


def test_a_native_job_reads_the_styles_once(tmp_path) -> None:
    """The job's style names are checked and applied on one reading of the files: an edit between the two
    cannot apply a style the check did not see, or leave out one it saw."""
    from types import SimpleNamespace

    from sdlab.pipeline.styles import PromptStyle
    from sdlab.server.native import JobIn, _styled_texts

    readings = iter([StyleDatabase([PromptStyle("ink", "{prompt}, ink drawing", "")]), StyleDatabase()])

    class EditedService(SimpleNamespace):
        @property
        def styles(self) -> StyleDatabase:        # the file as it is at each look: edited after the first
            return next(readings, StyleDatabase())

    texts = _styled_texts(EditedService(), JobIn(**NATIVE_JOB, styles=["ink"]))
    assert texts["prompt"] == "a red apple, ink drawing"
