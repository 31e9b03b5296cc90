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

    server = start_server(tmp_path_factory.mktemp("limits") / "outputs", "--max-batch", "3", "--max-steps", "40")
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
