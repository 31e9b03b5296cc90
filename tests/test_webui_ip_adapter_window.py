"""The web UI's IP-Adapter Starting / Ending step, in chromium: left at every step nothing is sent, a window goes out
as the native `start` / `end` and the job draws with it, and Reuse of a job with a window fills both boxes."""

from __future__ import annotations

import pytest

from ip_adapter_fixtures import reference_png, write_shipped_model_ip_adapter
from server_fixtures import start_server
from test_webui import (  # noqa: F401  (fixtures: browser, page)
    By, click_card_button, choose, browser, drop_file, http_json, open_page, page, set_value, value, wait, wait_job,
)


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory):
    """A server with ip-adapter_tiny.safetensors in its ControlNet folder and the image encoder one folder up."""
    root = tmp_path_factory.mktemp("webui-ip-window")
    models = write_shipped_model_ip_adapter(root / "models")
    server = start_server(root / "outputs", "--models-dir", str(models))
    yield server.url.rstrip("/")
    server.stop()


def _sent(page) -> dict:
    return page.execute_script("return JSON.parse(JSON.stringify(collectRequest()))")["ip_adapters"][0]


def test_the_window_boxes_send_draw_and_reuse(page, base_url):
    import base64

    page.find_element(By.ID, "ipa_enabled").click()
    wait(page, lambda d: d.execute_script("return document.getElementById('ipa_model').options.length > 1"), 30,
         "the IP-Adapter list did not load")
    titles = page.execute_script("return [...document.getElementById('ipa_model').options].map((o) => o.value)")
    choose(page, "ipa_model", value=next(title for title in titles if title.startswith("ip-adapter_tiny [")))
    drop_file(page, reference_png(), "reference.png", "ipa_drop")
    wait(page, lambda d: d.find_element(By.ID, "ipa_view").is_displayed(), 10, "the dropped picture is not shown")
    assert value(page, "ipa_start") == "0" and value(page, "ipa_end") == "1"
    assert "start" not in _sent(page) and "end" not in _sent(page)            # every step: nothing sent
    set_value(page, "ipa_start", "0.25")
    set_value(page, "ipa_end", "0.8")
    sent = _sent(page)
    assert sent["start"] == 0.25 and sent["end"] == 0.8
    # a job with a window (as the box sends it): recorded, and Reuse fills the boxes again
    job = http_json(base_url, "/api/jobs", {"prompt": "windowed", "steps": 4, "width": 64, "height": 64,
                                            "ip_adapters": [{"model": "ip-adapter_tiny", "scale": 0.8, "start": 0.5,
                                                             "end": 0.75,
                                                             "image": base64.b64encode(reference_png()).decode()}]})
    done = wait_job(base_url, job["id"])
    assert done["status"] == "done", done
    assert done["request"]["ip_adapters"][0]["start"] == 0.5 and done["request"]["ip_adapters"][0]["end"] == 0.75
    open_page(page, base_url)
    card = f'#gallery [data-job-id="{job["id"]}"]'
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, f"{card} img"), 30, "the job is not in the gallery")
    click_card_button(page, card, "reuse")
    wait(page, lambda d: value(d, "ipa_start") == "0.5", 20, "Reuse did not fill the Starting step")
    assert value(page, "ipa_end") == "0.75" and value(page, "ipa_scale") == "0.8"
    drop_file(page, reference_png(), "reference.png", "ipa_drop")
    wait(page, lambda d: d.find_element(By.ID, "ipa_view").is_displayed(), 10, "the dropped picture is not shown")
    sent = _sent(page)
    assert sent["start"] == 0.5 and sent["end"] == 0.75
