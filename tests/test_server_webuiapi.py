"""The `webuiapi` client (PyPI, unmodified) against `sdlab serve`: txt2img, img2img with and without a
mask, progress, interrupt, options and the lists, as scripts written for AUTOMATIC1111 call them."""

from __future__ import annotations

import threading
import time

import pytest
from PIL import Image

from server_fixtures import sdlab_server  # noqa: F401  (fixture)

webuiapi = pytest.importorskip("webuiapi")


@pytest.fixture
def api(sdlab_server):
    return webuiapi.WebUIApi(baseurl=sdlab_server.url + "/sdapi/v1", steps=3)


def test_txt2img_and_png_info(api):
    result = api.txt2img(prompt="a red apple", negative_prompt="blurry", seed=42, width=64, height=64, cfg_scale=5,
                         batch_size=2)
    assert len(result.images) == 2 and result.image.size == (64, 64)
    assert result.info["all_seeds"] == [42, 43] and result.info["sampler_name"] == "Euler a"
    assert result.parameters["prompt"] == "a red apple"
    assert "Seed: 42" in result.image.info["parameters"]
    assert "Negative prompt: blurry" in api.png_info(result.image).info


def test_img2img_with_and_without_mask(api):
    init = Image.new("RGB", (64, 64), (30, 90, 200))
    result = api.img2img(images=[init], prompt="a lake", denoising_strength=0.5, seed=3, width=64, height=64)
    assert result.image.size == (64, 64) and result.info["denoising_strength"] == 0.5
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))
    painted = api.img2img(images=[init], mask_image=mask, mask_blur=0, prompt="a boat", seed=3, width=64, height=64)
    assert painted.image.getpixel((0, 0)) == (30, 90, 200)


def test_progress_and_interrupt(api):
    outcome = {}

    def long_call():
        outcome["result"] = api.txt2img(prompt="slow", steps=150, width=64, height=64, seed=1)

    thread = threading.Thread(target=long_call)
    thread.start()
    deadline = time.monotonic() + 120
    progress = api.get_progress()
    # A1111 1.10 draws the live preview every show_progress_every_n_steps (10) steps
    while progress["state"]["sampling_step"] < 11 and time.monotonic() < deadline:
        time.sleep(0.02)
        progress = api.get_progress()
    assert progress["state"]["sampling_steps"] == 150 and progress["state"]["job_count"] >= 1
    assert 0 < progress["progress"] < 1 and progress["current_image"]
    api.interrupt()
    thread.join(120)
    assert not thread.is_alive()
    assert len(outcome["result"].images) == 1 and outcome["result"].info["interrupted"] is True   # as far as it got
    assert api.get_progress()["state"]["job_count"] == 0


def test_options_and_lists(api):
    options = api.get_options()
    models = api.util_get_model_names()
    assert options["sd_model_checkpoint"] in models and api.util_get_current_model() == models[0]
    api.set_options({"sd_model_checkpoint": models[0], "jpeg_quality": 80})
    assert api.get_options()["jpeg_quality"] == 80
    assert "Euler a" in api.util_get_sampler_names() and "karras" in api.util_get_scheduler_names()
    assert [lora["name"] for lora in api.get_loras()] == ["sdlab-tiny-lcm"]      # the shipped four-step adapter
    assert isinstance(api.get_sd_models(), list)
    api.util_set_model(models[0])
    assert api.get_options()["sd_model_checkpoint"] == models[0]
