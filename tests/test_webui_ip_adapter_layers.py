"""The web UI's IP-Adapter Layers select, in chromium: a preset goes out as the native `layer_scales`, the server's
refusal of one the model cannot take is shown, and Reuse of a job with other layer scales selects their text, which
the next job sends again."""

from __future__ import annotations

import pytest

from ip_adapter_fixtures import reference_png, write_shipped_model_ip_adapter
from server_fixtures import start_server
from test_webui import (  # noqa: F401  (fixtures: browser, page)
    By, click_card_button, choose, option_values, browser, drop_file, http_json, open_page, page, set_value, text,
    value, wait, wait_job,
)

LAYERS = "mid=1 up.block_1=0/1"


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory):
    """A server with ip-adapter_tiny.safetensors in its ControlNet folder and the image encoder one folder up."""
    root = tmp_path_factory.mktemp("webui-ip-layers")
    models = write_shipped_model_ip_adapter(root / "models")
    server = start_server(root / "outputs", "--models-dir", str(models))
    yield server.url.rstrip("/")
    server.stop()


def _reference_b64() -> str:
    import base64

    return base64.b64encode(reference_png()).decode()


def _adapter_title(driver) -> str:
    titles = driver.execute_script("return [...document.getElementById('ipa_model').options].map((o) => o.value)")
    return next(title for title in titles if title.startswith("ip-adapter_tiny ["))


def test_layers_select_sends_shows_refusals_and_reuses(page, base_url):
    url = base_url
    page.find_element(By.ID, "ipa_enabled").click()
    wait(page, lambda d: d.execute_script("return document.getElementById('ipa_model').options.length > 1"), 30,
         "the IP-Adapter list did not load")
    choose(page, "ipa_model", value=_adapter_title(page))
    drop_file(page, reference_png(), "reference.png", "ipa_drop")
    wait(page, lambda d: d.find_element(By.ID, "ipa_view").is_displayed(), 10, "the dropped picture is not shown")
    assert option_values(page, "ipa_layers") == [
        "", "style", "style+layout"]
    sent = page.execute_script("return JSON.parse(JSON.stringify(collectRequest()))")["ip_adapters"][0]
    assert "layer_scales" not in sent                                   # All: every cross-attention
    choose(page, "ipa_layers", value="style+layout")
    sent = page.execute_script("return JSON.parse(JSON.stringify(collectRequest()))")["ip_adapters"][0]
    assert sent["layer_scales"] == "style+layout"
    # SDXL's presets on the shipped model (2 transformers in up_blocks.0, no down_blocks.2 second one): the 400
    choose(page, "ipa_layers", value="style")
    set_value(page, "prompt", "a refused preset")
    page.find_element(By.ID, "generate").click()
    wait(page, lambda d: text(d, "error").startswith("400") and "up.block_0 takes 2 numbers" in text(d, "error"), 30,
         "the server's refusal is not shown")
    # Reuse of a job drawn with other layer scales: its text selected, and sent again
    job = http_json(url, "/api/jobs", {"prompt": "layered", "steps": 2, "width": 64, "height": 64, "ip_adapters": [
        {"model": "ip-adapter_tiny", "image": _reference_b64(), "scale": 0.8, "layer_scales": LAYERS}]})
    done = wait_job(url, job["id"])
    assert done["status"] == "done", done
    open_page(page, url)
    card = f'#gallery [data-job-id="{job["id"]}"]'
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, f"{card} img"), 30, "the job is not in the gallery")
    click_card_button(page, card, "reuse")
    wait(page, lambda d: value(d, "ipa_layers") == LAYERS, 20, "Reuse did not select the job's layers")
    assert value(page, "ipa_scale") == "0.8"
    drop_file(page, reference_png(), "reference.png", "ipa_drop")
    wait(page, lambda d: d.find_element(By.ID, "ipa_view").is_displayed(), 10, "the dropped picture is not shown")
    sent = page.execute_script("return JSON.parse(JSON.stringify(collectRequest()))")["ip_adapters"][0]
    assert sent["layer_scales"] == LAYERS and sent["scale"] == 0.8
