"""A1111's prompt comments (1.8+, option `enable_prompt_comments`, on by default): a `#` hides the rest of its
line from the generation (`prompt_syntax.strip_comments`).

Reference: A1111's `modules/processing_scripts/comments.py`, transcribed below. Its `process` strips the
prompt and the negative prompt before `parse_extra_network_prompts` (so a `<lora:...>` tag in a comment is
never applied) and before the infotext is written (`create_infotext` reads the stripped `all_prompts` /
`main_prompt`). Checked here in every interface: the Python API, `sdlab txt2img` (and `--from-png`), and the
server's native and A1111 APIs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

import sdlab
from bundle_fixtures import tiny_bundle, write_original
from server_fixtures import run_job, sdlab_server  # noqa: F401  (a session fixture)
from sdlab.cli import main
from sdlab.pipeline.png_info import parse_parameters, read_parameters
from sdlab.pipeline.prompt_loras import split_prompt_loras
from sdlab.pipeline.prompt_syntax import strip_comments

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

OPTIONS = dict(steps=2, width=32, height=32, seed=3, cfg_scale=5.0)
FAST = ["--steps", "2", "--width", "32", "--height", "32", "--seed", "3", "--cfg", "5", "--no-progress"]
COMMENTED = "a red apple # <lora:nothere:1> try a green one\n# on a blue background\n(masterpiece)"
NEGATIVE = "ugly # blurry"


def a1111_strip_comments(text: str) -> str:
    """A1111 `modules/processing_scripts/comments.py::strip_comments`, verbatim."""
    text = re.sub('(^|\n)#[^\n]*(\n|$)', '\n', text)  # while line comment
    text = re.sub('#[^\n]*(\n|$)', '\n', text)  # in the middle of the line comment
    return text


CASES = [COMMENTED, NEGATIVE, "a red apple # TODO: try a green one", "# only a comment", "#a\n#b\n#c", "a # b # c\nd",
         "a\n\n# x\n\nb", "no comment", "", "a#b\n#c\nd#", "#\n", "x\r\n# y\r\nz", "(red:1.2) [cat:dog:0.5] # AND x",
         "a castle <lora:ink:1> # <lora:watercolor:0.6>", "\n\n#\n\n#x", "a ## b"]


@pytest.mark.parametrize("text", CASES)
def test_strip_comments_is_a1111s(text):
    assert strip_comments(text) == a1111_strip_comments(text)
    assert strip_comments(strip_comments(text)) == strip_comments(text)


def test_a_lora_tag_in_a_comment_is_not_applied():
    bare, tags = split_prompt_loras("a castle <lora:ink:1> # <lora:watercolor:0.6>")
    assert bare == "a castle  \n" and [tag.name for tag in tags] == ["ink"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    write_original(tiny_bundle("sd1"), path, junk=False)
    return path


def _pixels(result) -> np.ndarray:
    return np.stack([np.asarray(image) for image in result.images])


def _png_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_python_api_draws_and_records_the_prompts_without_comments(model):
    """The comment is not encoded (the picture is the stripped prompt's), its tag names no LoRA that must
    exist, and the result's request holds the stripped prompts."""
    pipe = sdlab.load(model)
    commented = pipe.txt2img(COMMENTED, negative_prompt=NEGATIVE, **OPTIONS)
    stripped = pipe.txt2img(a1111_strip_comments(COMMENTED), negative_prompt=a1111_strip_comments(NEGATIVE), **OPTIONS)
    encoded = pipe.txt2img(COMMENTED.replace("<lora:nothere:1>", ""), negative_prompt=NEGATIVE.replace("#", ""),
                           **OPTIONS)
    assert np.array_equal(_pixels(commented), _pixels(stripped))
    assert not np.array_equal(_pixels(commented), _pixels(encoded))
    assert commented.request.prompt == a1111_strip_comments(COMMENTED)
    assert commented.request.negative_prompt == a1111_strip_comments(NEGATIVE)


def _run(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def test_cli_and_from_png_draw_and_record_the_prompts_without_comments(model, tmp_path, capsys):
    out, again = tmp_path / "a.png", tmp_path / "again.png"
    code, err = _run(["txt2img", COMMENTED, "--negative", NEGATIVE, "--model", str(model), *FAST,
                      "--out", str(out)], capsys)
    assert code == 0, err
    params = parse_parameters(read_parameters(out))
    expected = parse_parameters(f"{a1111_strip_comments(COMMENTED)}\nNegative prompt: {a1111_strip_comments(NEGATIVE)}"
                                "\nSteps: 2, Sampler: Euler, CFG scale: 5")
    assert (params["Prompt"], params["Negative prompt"]) == (expected["Prompt"], expected["Negative prompt"])
    reference = sdlab.load(model).txt2img(a1111_strip_comments(COMMENTED),
                                          negative_prompt=a1111_strip_comments(NEGATIVE), **OPTIONS)
    assert np.array_equal(_png_pixels(out), _pixels(reference)[0])

    # a picture whose parameters carry comments (written by a tool that keeps them): drawn as A1111 would
    text = read_parameters(out).replace(params["Prompt"], COMMENTED, 1)
    text = text.replace(f"Negative prompt: {params['Negative prompt']}", f"Negative prompt: {NEGATIVE}", 1)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    commented_png = tmp_path / "commented.png"
    Image.open(out).save(commented_png, pnginfo=info)
    code, err = _run(["txt2img", "--from-png", str(commented_png), "--model", str(model), "--no-progress",
                      "--out", str(again)], capsys)
    assert code == 0, err
    assert np.array_equal(_png_pixels(again), _png_pixels(out))
    assert "#" not in read_parameters(again)


def test_server_apis_draw_and_record_the_prompts_without_comments(sdlab_server):
    """Both APIs: the tag in the comment names no LoRA of the server (no 404), the infotext has no comment,
    and the picture is the stripped prompt's."""
    with httpx.Client(base_url=sdlab_server.url, timeout=120) as client:
        fields = {"steps": 2, "seed": 3, "width": 64, "height": 64}
        native = run_job(client, {"prompt": COMMENTED, "negative_prompt": NEGATIVE, **fields})
        assert native["status"] == "done", native
        assert "#" not in native["infotexts"][0] and "nothere" not in native["infotexts"][0]
        answers = {}
        for prompt, negative in ((COMMENTED, NEGATIVE), (strip_comments(COMMENTED), strip_comments(NEGATIVE))):
            answer = client.post("/sdapi/v1/txt2img", json={"prompt": prompt, "negative_prompt": negative, **fields})
            assert answer.status_code == 200, answer.text
            answers[prompt] = answer.json()
        commented, stripped = answers[COMMENTED], answers[strip_comments(COMMENTED)]
        assert commented["images"] == stripped["images"]
        infotext = json.loads(commented["info"])["infotexts"][0]
        assert infotext.startswith("a red apple \n(masterpiece)\nNegative prompt: ugly") and "#" not in infotext
