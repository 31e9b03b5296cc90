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
