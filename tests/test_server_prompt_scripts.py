"""A1111 1.10's Prompt matrix and Prompts from file or textbox on /sdapi/v1 (`script_name` "prompt matrix" /
"prompts from file or textbox", `script_args` in their `Script.run` order): every picture is exactly that of the
single request it stands for, the matrix's grid is `sdlab.pipeline.prompt_matrix`'s, and the answer is A1111's
(`images`, `info`'s all_prompts / all_seeds / infotexts / index_of_first_image)."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from PIL import Image

from sdlab.pipeline.prompt_matrix import prompt_matrix
from server_fixtures import picture, sdlab_server  # noqa: F401  (sdlab_server: a session fixture)

BASE = {"prompt": "a red apple", "negative_prompt": "blurry", "steps": 2, "seed": 7, "cfg_scale": 5.0,
        "sampler_name": "Euler"}


@pytest.fixture
def client(sdlab_server):
    with httpx.Client(base_url=sdlab_server.url + "/sdapi/v1", timeout=300) as c:
        yield c


def pixels(b64: str) -> np.ndarray:
    return np.asarray(picture(b64))


def _single(client, **fields) -> dict:
    answer = client.post("/txt2img", json={**BASE, **fields})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_scripts_and_script_info_list_both(client) -> None:
    names = client.get("/scripts").json()["txt2img"]
    assert "prompt matrix" in names and "prompts from file or textbox" in names
    infos = {(i["name"], i["is_img2img"]): i["args"] for i in client.get("/script-info").json()}
    matrix = infos[("prompt matrix", False)]
    assert [a["label"] for a in matrix] == ["Set at prompt start", "Random seeds", "Prompt type", "Joining char",
                                            "Grid margins"]
    assert matrix[2]["choices"] == ["positive", "negative"] and matrix[3]["choices"] == ["comma", "space"]
    assert (matrix[4]["minimum"], matrix[4]["maximum"], matrix[4]["step"]) == (0, 500, 2)
    assert [a["label"] for a in infos[("prompts from file or textbox", True)]] == [
        "Iterate seed every line", "Use same random seed for all lines", "Insert prompts at the",
        "List of prompt inputs"]


def test_prompt_matrix_pictures_are_single_requests(client) -> None:
    prompt = "a red apple|on a table|at night"
    args = [False, True, "positive", "space", 4]          # put_at_start, different_seeds, ..., margin_size
    answer = client.post("/txt2img", json={**BASE, "prompt": prompt, "script_name": "Prompt matrix",
                                           "script_args": args})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    images, info = body["images"], json.loads(body["info"])
    prompts = ["a red apple", "a red apple on a table", "a red apple at night", "a red apple on a table at night"]
    assert len(images) == 5 and info["index_of_first_image"] == 1
    assert info["all_prompts"] == prompts and info["all_seeds"] == [7, 8, 9, 10]
    assert info["all_subseeds"] == [info["subseed"] + n for n in range(4)]
    cells = {}
    for n, text in enumerate(prompts):
        single = _single(client, prompt=text, seed=7 + n)
        assert np.array_equal(pixels(images[1 + n]), pixels(single["images"][0])), text
        assert info["infotexts"][1 + n] == json.loads(single["info"])["infotexts"][0]
        cells[(n % 2, n // 2, 0)] = Image.fromarray(pixels(images[1 + n]))
    matrix = prompt_matrix({"prompt": prompt}, variations_delimiter="space", margin=4)
    assert np.array_equal(pixels(images[0]), np.asarray(matrix.sheet(cells)))
    assert info["infotexts"][0] == info["infotexts"][1]


def test_prompt_matrix_of_the_negative_prompt(client) -> None:
    answer = client.post("/txt2img", json={**BASE, "negative_prompt": "blurry|dark", "script_name": "prompt matrix",
                                           "script_args": [False, False, "negative"]})
    assert answer.status_code == 200, answer.text
    info = json.loads(answer.json()["info"])
    assert info["all_negative_prompts"] == ["blurry", "blurry, dark"] and info["all_seeds"] == [7, 7]
    single = _single(client, negative_prompt="blurry, dark")
    assert np.array_equal(pixels(answer.json()["images"][2]), pixels(single["images"][0]))


def test_prompts_from_file_pictures_are_single_requests(client) -> None:
    text = 'a pear\n\n--prompt "a cup" --negative_prompt dark --steps 3 --n_iter 2\n--prompt a --step 3\n'
    answer = client.post("/txt2img", json={**BASE, "prompt": "still life", "script_name": "Prompts from file or textbox",
                                           "script_args": [True, False, "end", text]})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    images, info = body["images"], json.loads(body["info"])
    singles = [dict(prompt="still life a pear", seed=7), dict(prompt="still life a cup", negative_prompt="blurry dark",
                                                              steps=3, n_iter=2, seed=8),
               dict(prompt="still life --prompt a --step 3", seed=9)]    # A1111 draws a line it cannot read as is
    want = [image for fields in singles for image in _single(client, **fields)["images"]]
    assert len(images) == len(want) == 4
    for got, expected in zip(images, want):
        assert np.array_equal(pixels(got), pixels(expected))
    assert info["all_prompts"] == ["still life a pear", "still life a cup", "still life a cup",
                                   "still life --prompt a --step 3"]
    assert (info["seed"], info["all_seeds"], info["subseed"], info["index_of_first_image"]) == (10, [10], -1, 0)
    assert info["negative_prompt"] == "blurry" and len(info["infotexts"]) == 4
    assert info["prompt"] == "still life a pear"           # A1111's Processed.js(): all_prompts[0]


@pytest.mark.parametrize("name, args, status, message", [
    ("prompt matrix", [False, False, "both"], 422, "prompt_type must be 'positive' or 'negative'"),
    ("prompt matrix", [False, False, "positive", "comma", 501], 422, "margin_size must be 0..500"),
    ("prompt matrix", [False] * 6, 422, "at most 5 values"),
    ("prompts from file or textbox", [False, False, "start", "\n \n"], 422, "no line to draw"),
    ("prompts from file or textbox", [False, False, "middle", "a"], 422, "prompt_position must be 'start' or 'end'"),
    ("prompts from file or textbox", [False, False, "start", "--prompt a --sampler_name nope"], 404,
     "Sampler not found"),
])
def test_what_the_scripts_cannot_draw_is_refused_before_anything_is_drawn(client, name, args, status,
                                                                           message) -> None:
    answer = client.post("/txt2img", json={**BASE, "script_name": name, "script_args": args})
    assert answer.status_code == status, answer.text
    assert message in answer.json()["detail"]
