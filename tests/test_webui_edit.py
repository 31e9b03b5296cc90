"""The web UI's Image CFG Scale slider (A1111's, in its img2img tab; read by edit / InstructPix2Pix models), in real
headless chromium (test_webui.py's fixtures): its default 1.5 reaches the native API's image_cfg_scale, a moved
slider sends its value, and a dropped picture's `Image CFG scale` sets it; its None sends "none" (no image
guidance), ticked by a picture drawn without the label."""

from __future__ import annotations

import numpy as np
from PIL import Image

from test_webui import (  # noqa: F401  (fixtures: base_url, browser, page; the session's sdlab_server)
    By, base_url, browser, drop_file, page, png_with_parameters, sdlab_server, text, value, wait,
)
from test_webui_forms import set_slider


def _png() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_the_image_cfg_scale_slider_is_sent_and_filled(page, base_url):
    page.find_element(By.ID, "tab-img2img").click()
    assert page.find_element(By.ID, "image_cfg_scale").is_displayed()
    assert (value(page, "image_cfg_scale"), text(page, "image_cfg_scale-value")) == ("1.5", "1.50")
    drop_file(page, _png(), "init.png", "init-drop")
    wait(page, lambda d: d.execute_script("return state.initImage !== null"), 20, "the init picture was not read")
    assert page.execute_script("return collectRequest()")["image_cfg_scale"] == 1.5
    set_slider(page, "image_cfg_scale", 1.2)
    assert text(page, "image_cfg_scale-value") == "1.20"
    assert page.execute_script("return collectRequest()")["image_cfg_scale"] == 1.2
    page.find_element(By.ID, "tab-txt2img").click()
    assert "image_cfg_scale" not in page.execute_script("return collectRequest()")

    parameters = ("make it winter\nSteps: 3, Sampler: Euler, CFG scale: 7.5, Image CFG scale: 1.25, Seed: 3, "
                  "Size: 64x64, Denoising strength: 1")
    drop_file(page, png_with_parameters(parameters), "edit.png")
    wait(page, lambda d: text(d, "notice") == "Settings read from edit.png", 20, "the PNG was not read cleanly")
    page.find_element(By.ID, "tab-img2img").click()
    assert (value(page, "image_cfg_scale"), text(page, "image_cfg_scale-value")) == ("1.25", "1.25")


def test_a_picture_drawn_without_image_guidance_ticks_none(page, base_url):
    """An img2img picture an edit model drew without image guidance (`Image guidance: none`) ticks the slider's
    None, which sends image_cfg_scale "none" (the native API's no image guidance) and greys the slider; a picture
    with neither label (another model's, or A1111's) leaves both as they are (A1111's paste); a picture with
    `Image CFG scale` unticks it and sets the slider; unticked by hand the slider's value is sent again."""
    page.find_element(By.ID, "tab-img2img").click()
    drop_file(page, _png(), "init.png", "init-drop")
    wait(page, lambda d: d.execute_script("return state.initImage !== null"), 20, "the init picture was not read")
    set_slider(page, "image_cfg_scale", 1.2)
    parameters = ("make it winter\nSteps: 3, Sampler: Euler, CFG scale: 7.5, Seed: 3, Size: 64x64, "
                  "Denoising strength: 0.75")
    drop_file(page, png_with_parameters(parameters), "plain.png")
    wait(page, lambda d: text(d, "notice") == "Settings read from plain.png", 20, "the PNG was not read cleanly")
    page.find_element(By.ID, "tab-img2img").click()
    none = page.find_element(By.ID, "image_cfg_none")
    assert not none.is_selected() and page.execute_script("return collectRequest()")["image_cfg_scale"] == 1.2
    drop_file(page, png_with_parameters(parameters + ", Image guidance: none"), "none.png")
    wait(page, lambda d: text(d, "notice") == "Settings read from none.png", 20, "the PNG was not read cleanly")
    page.find_element(By.ID, "tab-img2img").click()
    assert none.is_selected() and not page.find_element(By.ID, "image_cfg_scale").is_enabled()
    assert page.execute_script("return collectRequest()")["image_cfg_scale"] == "none"
    none.click()
    assert page.find_element(By.ID, "image_cfg_scale").is_enabled()
    assert page.execute_script("return collectRequest()")["image_cfg_scale"] == 1.2
    none.click()
    drop_file(page, png_with_parameters(parameters), "plain.png")      # stays ticked
    wait(page, lambda d: text(d, "notice") == "Settings read from plain.png", 20, "the PNG was not read cleanly")
    page.find_element(By.ID, "tab-img2img").click()
    assert none.is_selected() and page.execute_script("return collectRequest()")["image_cfg_scale"] == "none"
    drop_file(page, png_with_parameters(parameters.replace("Seed: 3", "Image CFG scale: 1.75, Seed: 3")), "edit.png")
    wait(page, lambda d: text(d, "notice") == "Settings read from edit.png", 20, "the PNG was not read cleanly")
    page.find_element(By.ID, "tab-img2img").click()
    assert not none.is_selected() and (value(page, "image_cfg_scale"), text(page, "image_cfg_scale-value")) == \
        ("1.75", "1.75")
    assert page.execute_script("return collectRequest()")["image_cfg_scale"] == 1.75
