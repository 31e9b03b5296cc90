"""A1111 `parameters` PNG metadata: layout, quoting, round trip through a file, atomic writes, model hash."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
from PIL import Image

from sdlab.pipeline import png_info
from sdlab.pipeline.png_info import (
    format_parameters,
    model_hash,
    parse_parameters,
    read_parameters,
    save_png_atomic,
    version_label,
)


def _params(**overrides):
    p = {
        "Prompt": "a photograph of an astronaut riding a horse",
        "Negative prompt": "blurry, lowres",
        "Steps": 20,
        "Sampler": "Euler a",
        "Schedule type": "Karras",
        "CFG scale": 7.0,
        "Seed": 1,
        "Size": "512x512",
        "Model hash": "abcdef1234",
        "Model": "name",
        "Version": "sdlab 0.1.0",
    }
    p.update(overrides)
    return p


def _image(width=16, height=8):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_format_is_exactly_the_a1111_layout():
    assert format_parameters(_params()) == (
        "a photograph of an astronaut riding a horse\n"
        "Negative prompt: blurry, lowres\n"
        "Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, "
        "Model hash: abcdef1234, Model: name, Version: sdlab 0.1.0"
    )


def test_format_omits_empty_negative_prompt_and_none_values_and_quotes_like_a1111():
    text = format_parameters(_params(**{"Negative prompt": "", "Model": "my, model: v2", "Seed": None,
                                        "CFG scale": 7.5, "Lora hashes": 'a: "b"'}))
    assert text.split("\n") == [
        "a photograph of an astronaut riding a horse",
        "Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7.5, Size: 512x512, "
        'Model hash: abcdef1234, Model: "my, model: v2", Version: sdlab 0.1.0, Lora hashes: "a: \\"b\\""',
    ]


def test_flag_whose_value_is_its_name_is_written_alone():
    params = {"Prompt": "p", "Steps": 1, "Tiling": "Tiling", "Seed": 2}
    assert format_parameters(params) == "p\nSteps: 1, Tiling, Seed: 2"


def test_bad_key_is_rejected():
    with pytest.raises(ValueError):
        format_parameters({"Prompt": "p", "bad:key": 1})


ROUND_TRIP_CASES = [
    _params(),
    _params(**{"Negative prompt": ""}),
    _params(Prompt="", **{"Negative prompt": "only negative"}),
    _params(Prompt="line one\nline two, (with emphasis:1.2)\n\"quoted\" words",
            **{"Negative prompt": "neg one\nneg two, [x]"}),
    _params(Prompt="日本語のプロンプト, émigré café, 🐱", Model="モデル: v1, β", **{"CFG scale": 4.5}),
    _params(Model='"starts with a quote"', Sampler="DPM++ 2M SDE", **{"Denoising strength": 0.75, "Clip skip": 2}),
    _params(Model="", Seed=4294967295, Prompt="BREAK (a) [b] \\(c\\)"),
]


@pytest.mark.parametrize("params", ROUND_TRIP_CASES)
def test_round_trip_format_save_read_parse(tmp_path, params):
    path = tmp_path / "out.png"
    save_png_atomic(_image(), path, format_parameters(params))
    text = read_parameters(path)
    assert text == format_parameters(params)
    assert parse_parameters(text) == params
    with Image.open(path) as reread:
        assert np.array_equal(np.asarray(reread), np.asarray(_image()))
    assert os.listdir(tmp_path) == ["out.png"]


def test_parse_a1111_written_text():
    text = (
        "masterpiece, best quality, 1girl, (blue eyes:1.2)\n"
        "standing in a field\n"
        "Negative prompt: lowres, bad anatomy, ((blurry))\n"
        "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 3735928559, "
        "Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, "
        'Clip skip: 2, Hires upscale: 2, Hires upscaler: Latent, Lora hashes: "add_detail: 7c6bad76eb54", '
        "Version: v1.10.1"
    )
    assert parse_parameters(text) == {
        "Prompt": "masterpiece, best quality, 1girl, (blue eyes:1.2)\nstanding in a field",
        "Negative prompt": "lowres, bad anatomy, ((blurry))",
        "Steps": 28,
        "Sampler": "DPM++ 2M",
        "Schedule type": "Karras",
        "CFG scale": 7.5,
        "Seed": 3735928559,
        "Size": "512x768",
        "Model hash": "6ce0161689",
        "Model": "v1-5-pruned-emaonly",
        "Denoising strength": 0.45,
        "Clip skip": 2,
        "Hires upscale": 2.0,
        "Hires upscaler": "Latent",
        "Lora hashes": "add_detail: 7c6bad76eb54",
        "Version": "v1.10.1",
    }


def test_parse_text_without_a_parameter_line_is_all_prompt():
    assert parse_parameters("just a prompt\nsecond line: not, params") == {
        "Prompt": "just a prompt\nsecond line: not, params",
        "Negative prompt": "",
    }


def _a1111_prompts(text: str) -> tuple[str, str]:
    """A1111 1.10 `infotext_utils.parse_generation_parameters`'s prompt loop, transcribed: a line joins its
    prompt with a newline only once that prompt holds text."""
    prompt = negative_prompt = ""
    done_with_prompt = False
    *lines, lastline = text.strip().split("\n")
    if len(png_info._pairs(lastline)) < 3:
        lines.append(lastline)
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    return prompt, negative_prompt


@pytest.mark.parametrize("text", [
    "a cat\nNegative prompt:\nblurry\nSteps: 2, Sampler: Euler, Seed: 1",          # the negative on the next line
    "a cat\nNegative prompt:\n\nblurry\n\nlowres\nSteps: 2, Sampler: Euler, Seed: 1",
    "a cat\n\n  \nwith a hat\nNegative prompt: x\n\nSteps: 2, Sampler: Euler, Seed: 1",
    "Negative prompt: only a negative\nSteps: 2, Sampler: Euler, Seed: 1",
])
def test_prompt_lines_join_as_a1111_joins_them(text):
    parsed = parse_parameters(text)
    assert (parsed["Prompt"], parsed["Negative prompt"]) == _a1111_prompts(text)


def test_parse_keeps_a_malformed_number_as_text():
    assert parse_parameters("p\nSteps: many, Sampler: Euler, Seed: 3")["Steps"] == "many"


def test_read_parameters_of_png_without_chunk_is_none(tmp_path):
    path = tmp_path / "plain.png"
    _image().save(path)
    assert read_parameters(path) is None
    save_png_atomic(_image(), tmp_path / "none.png", None)
    assert read_parameters(tmp_path / "none.png") is None


def test_save_replaces_an_existing_file(tmp_path):
    path = tmp_path / "x.png"
    save_png_atomic(_image(), path, "first")
    save_png_atomic(_image(8, 8), path, "second")
    assert read_parameters(path) == "second"
    assert sorted(os.listdir(tmp_path)) == ["x.png"]


def test_failing_image_leaves_nothing_behind(tmp_path):
    cmyk = Image.new("CMYK", (4, 4))                     # PNG cannot hold CMYK: the encoder raises
    with pytest.raises(OSError):
        save_png_atomic(cmyk, tmp_path / "bad.png", "p")
    assert os.listdir(tmp_path) == []


def test_failing_image_keeps_the_old_file(tmp_path):
    path = tmp_path / "keep.png"
    save_png_atomic(_image(), path, "old")
    with pytest.raises(OSError):
        save_png_atomic(Image.new("CMYK", (4, 4)), path, "new")
    assert read_parameters(path) == "old"
    assert os.listdir(tmp_path) == ["keep.png"]


def test_failing_rename_leaves_nothing_behind(tmp_path, monkeypatch):
    def refuse(src, dst):
        raise PermissionError("read-only destination")

    monkeypatch.setattr(png_info.os, "replace", refuse)
    with pytest.raises(PermissionError):
        save_png_atomic(_image(), tmp_path / "x.png", "p")
    assert os.listdir(tmp_path) == []


def test_missing_directory_raises_and_creates_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        save_png_atomic(_image(), tmp_path / "missing" / "x.png", "p")
    assert os.listdir(tmp_path) == []


def test_model_hash_is_first_ten_hex_of_sha256(tmp_path):
    data = os.urandom(3 * 1024 + 17)
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()[:10]
    assert model_hash(path) == expected
    with open(path, "rb") as file:                           # reading in blocks changes nothing
        assert png_info._sha256_rest(file, 1000)[:10] == expected


def test_version_label():
    assert version_label().startswith("sdlab")


def test_a_checkpoint_title_loses_its_checksum_as_a1111_strips_it() -> None:
    """`without_checksum`, the one rule of A1111's `re_strip_checksum` (`sdlab grid`'s Checkpoint name values, the
    A1111 API's checkpoint lookup, the server's registry): the title's ending ' [hash]' goes, nothing else."""
    from sdlab.pipeline.png_info import without_checksum

    assert without_checksum("v1-5.safetensors [6ce0161689]") == "v1-5.safetensors"
    assert without_checksum("sub/model [abc] ") == "sub/model"
    assert without_checksum("a [b] c.safetensors") == "a [b] c.safetensors"
    assert without_checksum("plain.ckpt") == "plain.ckpt"


def test_a_pictures_other_text_items_are_its_strings_but_the_parameters() -> None:
    """`other_text_items`, the one rule of what A1111's Extras and PNG Info keep besides the parameters (`sdlab
    upscale`'s output, the A1111 API's extra-single-image and png-info): string items, not the parameters, not
    Pillow's other info (dpi, gamma)."""
    import io

    from PIL import Image, PngImagePlugin

    from sdlab.pipeline.png_info import other_text_items

    info = PngImagePlugin.PngInfo()
    for key, value in (("parameters", "a cat\nSteps: 2"), ("workflow", "{}"), ("Software", "x")):
        info.add_text(key, value)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG", pnginfo=info, dpi=(72, 72))
    assert other_text_items(Image.open(buffer)) == {"workflow": "{}", "Software": "x"}
