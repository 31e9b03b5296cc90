"""The web UI's number boxes take the server's limits, and a clip skip past the model's depth is refused as it is
posted, in a real headless browser (the helpers of test_webui.py): the Batch size box's maximum is the server's
--max-batch (it was 16 on a server that draws at most 8), Steps' and Hires steps' its --max-steps; Clip skip 99
shows the server's 422 naming the text encoder's layers, and no job is queued."""

from __future__ import annotations

import pytest
from test_webui import (  # noqa: F401  (fixtures: base_url, browser, page; the session's sdlab_server)
    By, Keys, base_url, browser, http_json, open_page, page, sdlab_server, set_value, text, value, wait,
)


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    from server_fixtures import start_server

    server = start_server(tmp_path_factory.mktemp("limits") / "outputs", "--max-batch", "3", "--max-steps", "40",
                          "--max-pixels", str(128 * 128))
    yield server
    server.stop()


def test_the_boxes_stop_at_the_servers_limits(browser, small_server):
    open_page(browser, small_server.url)
    wait(browser, lambda d: d.find_element(By.ID, "batch_size").get_attribute("max") == "3", 20,
         "the Batch size box does not take --max-batch")
    assert [browser.find_element(By.ID, box).get_attribute("max") for box in ("steps", "hr_steps")] == ["40", "40"]
    set_value(browser, "batch_size", 2)
    for _ in range(3):                          # the box's arrow stops at the server's limit
        browser.find_element(By.ID, "batch_size").send_keys(Keys.ARROW_UP)
    assert value(browser, "batch_size") == "3"
    set_value(browser, "prompt", "four at once")
    set_value(browser, "batch_size", 4)         # typed past it: the server's message, nothing queued
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda d: "at most 3 images per batch on this server" in text(d, "error"), 20, "no error shown")
    assert not [j for j in http_json(small_server.url, "/api/jobs")["jobs"] if j["request"].get("prompt") == "four at once"]


def test_a_clip_skip_past_the_models_layers_is_refused_as_it_is_posted(page, base_url):
    set_value(page, "prompt", "too deep a skip")
    set_value(page, "clip_skip", 99)
    page.find_element(By.ID, "generate").click()
    wait(page, lambda d: "clip skip 99 is too large for this model" in text(d, "error"), 20, "no error shown")
    assert "(4 layers, 'last' hidden state)" in text(page, "error")
    assert not [j for j in http_json(base_url, "/api/jobs")["jobs"] if j["request"].get("prompt") == "too deep a skip"]
    assert page.find_element(By.ID, "generate").is_enabled()


def test_an_img2img_picture_past_the_pixel_limit_says_to_give_a_size(browser, small_server, tmp_path):
    """img2img with Width / Height empty draws at the initial image's own size (the boxes say so on that tab): a
    picture past --max-pixels is refused with what to do, and the size typed draws it. Before: '200x120 is 24000
    pixels; this server draws at most 16384 (--max-pixels)' under boxes that said 'model default'."""
    from PIL import Image

    path = tmp_path / "photo.png"
    Image.new("RGB", (200, 120), (90, 140, 200)).save(path)
    open_page(browser, small_server.url)
    assert browser.find_element(By.ID, "width").get_attribute("placeholder") == "model default"
    browser.find_element(By.ID, "tab-img2img").click()
    assert [browser.find_element(By.ID, side).get_attribute("placeholder") for side in ("width", "height")] == [
        "image's size", "image's size"]
    browser.find_element(By.ID, "init-image").send_keys(str(path))
    wait(browser, lambda d: d.find_element(By.ID, "init-canvas").get_attribute("width") == "200", 20)
    set_value(browser, "prompt", "a photo too large")
    set_value(browser, "steps", 2)
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda d: "(--max-pixels)" in text(d, "error"), 20, "no error shown")
    assert text(browser, "error") == (
        "413 Request Entity Too Large: 200x120 is 24000 pixels; this server draws at most 16384 (--max-pixels): the "
        "initial image's own size (width / height unset); give the width and height to draw at")
    set_value(browser, "width", 64)             # one side given, the other still the picture's: 64x120 is taken
    browser.find_element(By.ID, "generate").click()
    jobs = wait(browser, lambda d: [j for j in http_json(small_server.url, "/api/jobs")["jobs"]
                                    if j["request"].get("prompt") == "a photo too large"], 20, "no job queued")
    assert len(jobs) == 1 and jobs[0]["request"]["width"] == 64 and text(browser, "error") == "", jobs
    browser.find_element(By.ID, "tab-txt2img").click()
    assert browser.find_element(By.ID, "height").get_attribute("placeholder") == "model default"
