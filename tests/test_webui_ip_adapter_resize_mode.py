"""The web UI's IP-Adapter Resize mode, in chromium: left at its default nothing is sent (Crop and Resize, the
extension's default unit's), a mode chosen goes out as the native `resize_mode`, and Reuse of a job with one sets
the box again (what an "Only masked" inpaint fits the picture by before cutting it: tests/
test_ip_adapter_only_masked_resize.py draws it)."""

from __future__ import annotations

import base64

import pytest

from ip_adapter_fixtures import reference_png, write_shipped_model_ip_adapter
from server_fixtures import start_server
from test_webui import (  # noqa: F401  (fixtures: browser, page)
    By, browser, choose, click_card_button, drop_file, http_json, open_page, page, value, wait, wait_job,
)


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory):
    """A server with ip-adapter_tiny.safetensors in its ControlNet folder and the image encoder one folder up."""
    root = tmp_path_factory.mktemp("webui-ip-resize")
    models = write_shipped_model_ip_adapter(root / "models")
    server = start_server(root / "outputs", "--models-dir", str(models))
    yield server.url.rstrip("/")
    server.stop()


def _sent(page) -> dict:
    return page.execute_script("return JSON.parse(JSON.stringify(collectRequest()))")["ip_adapters"][0]


def test_the_resize_mode_box_sends_and_reuse_sets_it(page, base_url):
    page.find_element(By.ID, "ipa_enabled").click()
    wait(page, lambda d: d.execute_script("return document.getElementById('ipa_model').options.length > 1"), 30,
         "the IP-Adapter list did not load")
    titles = page.execute_script("return [...document.getElementById('ipa_model').options].map((o) => o.value)")
    choose(page, "ipa_model", value=next(title for title in titles if title.startswith("ip-adapter_tiny [")))
    drop_file(page, reference_png(), "reference.png", "ipa_drop")
    wait(page, lambda d: d.find_element(By.ID, "ipa_view").is_displayed(), 10, "the dropped picture is not shown")
    assert value(page, "ipa_resize_mode") == "" and "resize_mode" not in _sent(page)     # the default: nothing sent
    choose(page, "ipa_resize_mode", value="fill")
    assert _sent(page)["resize_mode"] == "fill"
    job = http_json(base_url, "/api/jobs", {"prompt": "fitted", "steps": 2, "width": 64, "height": 64,
                                            "ip_adapters": [{"model": "ip-adapter_tiny", "scale": 0.8,
                                                             "resize_mode": "resize",
                                                             "image": base64.b64encode(reference_png()).decode()}]})
    done = wait_job(base_url, job["id"])
    assert done["status"] == "done", done
    assert done["request"]["ip_adapters"][0]["resize_mode"] == "resize"
    open_page(page, base_url)
    card = f'#gallery [data-job-id="{job["id"]}"]'
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, f"{card} img"), 30, "the job is not in the gallery")
    click_card_button(page, card, "reuse")
    wait(page, lambda d: value(d, "ipa_resize_mode") == "resize", 20, "Reuse did not set the Resize mode")
    drop_file(page, reference_png(), "reference.png", "ipa_drop")
    wait(page, lambda d: d.find_element(By.ID, "ipa_view").is_displayed(), 10, "the dropped picture is not shown")
    assert _sent(page)["resize_mode"] == "resize"
