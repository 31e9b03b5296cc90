"""The Python API's arguments as Python callers write them: `sdlab.load`'s real signature and documentation
(help(), IDEs), a prompt that is not text refused with a `RequestError` that says so, input pictures given as
file paths wherever a picture is taken, `loras` entries as files alone or (file, weight) pairs, and messages
that name Python's spelling rather than the command line's."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sdlab
import sdlab.api
from sdlab.pipeline.request import GenerationRequest, RequestError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

FAST = dict(steps=2, seed=3)


@pytest.fixture(scope="module")
def pipe():
    return sdlab.load()


def test_sdlab_load_shows_its_parameters_and_documentation():
    """`import sdlab` stays free of torch (tests/test_layering.py); `sdlab.load` is `sdlab.api.load` itself."""
    assert inspect.signature(sdlab.load) == inspect.signature(sdlab.api.load)
    assert "device" in inspect.signature(sdlab.load).parameters
    assert sdlab.load.__doc__ == sdlab.api.load.__doc__


@pytest.mark.parametrize(("prompt", "message"), [
    (["a cat", "a dog"], "the prompt must be text, got list; one prompt a request (batch_size draws several pictures of it)"),
    (None, "the prompt must be text, got NoneType"),
    (b"a cat", "the prompt must be text, got bytes"),
])
def test_a_prompt_that_is_not_text_is_a_request_error_saying_so(pipe, prompt, message):
    with pytest.raises(RequestError) as refused:
        pipe.txt2img(prompt, **FAST)
    assert str(refused.value) == message
    with pytest.raises(RequestError, match="the negative prompt must be text, got list"):
        pipe.txt2img("a cat", negative_prompt=["blurry"], **FAST)


def test_init_images_may_be_file_paths_as_init_image_may(pipe, tmp_path):
    """`init_images`, as `init_image`: a PIL image or a file path (str or Path), read the same way."""
    red, blue = Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("RGB", (64, 64), (30, 30, 200))
    red.save(tmp_path / "red.png")
    blue.save(tmp_path / "blue.png")
    options = dict(strength=0.5, batch_size=2, **FAST)
    by_path = pipe.img2img("an apple", tmp_path / "red.png", init_images=[str(tmp_path / "red.png"), tmp_path / "blue.png"],
                           **options)
    by_picture = pipe.img2img("an apple", red, init_images=[red, blue], **options)
    assert [np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(by_path.images, by_picture.images)] == [True, True]
    run = pipe.run(GenerationRequest("an apple", init_image=str(tmp_path / "red.png"), **options))
    assert np.array_equal(np.asarray(run.images[0]), np.asarray(by_picture.images[0]))
    with pytest.raises(RequestError, match=f"the init image '{tmp_path / 'gone.png'}' does not exist"):
        pipe.img2img("an apple", red, init_images=[tmp_path / "gone.png"], **options)
    with pytest.raises(RequestError, match="init_images must be a list of pictures, got str"):
        pipe.img2img("an apple", red, init_images=str(tmp_path / "red.png"), **options)


def test_a_lora_file_alone_merges_at_weight_one(tmp_path):
    """diffusers' `load_lora_weights(file)` merges at full strength: `loras=[file]` is `loras=[(file, 1.0)]`."""
    from bundle_fixtures import tiny_bundle, write_original
    from test_prompt_loras_cli import _write_lora

    model = write_original(tiny_bundle("sd1"), tmp_path / "tiny.safetensors", junk=False)
    lora = _write_lora(tmp_path / "style.safetensors", seed=6)
    plain = sdlab.load(model).bundle.unet.state_dict()
    paired = sdlab.load(model, loras=[(lora, 1.0)]).bundle.unet.state_dict()
    assert not all(torch.equal(plain[key], paired[key]) for key in paired)
    for alone in ([str(lora)], [lora], str(lora)):
        merged = sdlab.load(model, loras=alone).bundle.unet.state_dict()
        assert all(torch.equal(merged[key], paired[key]) for key in paired)
    for bad in ([(lora,)], [(lora, "0.5")], [3]):
        with pytest.raises(RequestError, match=r"loras takes LoRA files or \(file, weight\) pairs, got "):
            sdlab.load(model, loras=bad)


def test_a_device_this_machine_lacks_names_the_one_to_use_as_python_and_the_cli_both_spell_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RequestError) as refused:
        sdlab.load(device="cuda")
    assert str(refused.value).endswith("on this machine; use cpu") and "--device" not in str(refused.value)
