"""What the chromium tests of the web UI's IP-Adapter box share (tests/test_webui_ip_adapter_layers.py, _window.py,
_resize_mode.py): a server whose ControlNet folder holds the shipped model's ip-adapter_tiny, the box opened on
that adapter with the reference picture dropped, the unit the page would send, a native job's unit, and Reuse of a
job from the gallery."""

from __future__ import annotations

import base64

import pytest

from ip_adapter_fixtures import reference_png, write_shipped_model_ip_adapter
from server_fixtures import start_server
from test_webui import By, choose, click_card_button, drop_file, open_page, wait


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory):
    """A server with ip-adapter_tiny.safetensors in its ControlNet folder and the image encoder one folder up."""
    root = tmp_path_factory.mktemp("webui-ip-adapter")
    models = write_shipped_model_ip_adapter(root / "models")
    server = start_server(root / "outputs", "--models-dir", str(models))
    yield server.url.rstrip("/")
    server.stop()


def drop_reference(page) -> None:
    """Drop the reference picture on the IP-Adapter box and wait until it is shown."""
    drop_file(page, reference_png(), "reference.png", "ipa_drop")
    wait(page, lambda d: d.find_element(By.ID, "ipa_view").is_displayed(), 10, "the dropped picture is not shown")


def open_ip_adapter_box(page) -> None:
    """Tick the IP-Adapter box, choose ip-adapter_tiny once the list has loaded, and drop the reference picture."""
    page.find_element(By.ID, "ipa_enabled").click()
    wait(page, lambda d: d.execute_script("return document.getElementById('ipa_model').options.length > 1"), 30,
         "the IP-Adapter list did not load")
    titles = page.execute_script("return [...document.getElementById('ipa_model').options].map((o) => o.value)")
    choose(page, "ipa_model", value=next(title for title in titles if title.startswith("ip-adapter_tiny [")))
    drop_reference(page)


def reuse_job(page, base_url: str, job_id: str) -> None:
    """Open the page again and click Reuse on the job's gallery card once its picture is there."""
    open_page(page, base_url)
    card = f'#gallery [data-job-id="{job_id}"]'
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, f"{card} img"), 30, "the job is not in the gallery")
    click_card_button(page, card, "reuse")


def sent_unit(page) -> dict:
    """The IP-Adapter unit the page would send now (`collectRequest().ip_adapters[0]`)."""
    return page.execute_script("return JSON.parse(JSON.stringify(collectRequest()))")["ip_adapters"][0]


def tiny_unit(**fields) -> dict:
    """A native `ip_adapters` entry of ip-adapter_tiny at scale 0.8 on the reference picture, with `fields`."""
    return {"model": "ip-adapter_tiny", "scale": 0.8, "image": base64.b64encode(reference_png()).decode(), **fields}
