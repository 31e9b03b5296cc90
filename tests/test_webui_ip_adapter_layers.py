"""The web UI's IP-Adapter Layers select, in chromium: a preset goes out as the native `layer_scales`, the server's
refusal of one the model cannot take is shown, and Reuse of a job with other layer scales selects their text, which
the next job sends again."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from ip_adapter_fixtures import SAMPLE_PICTURE, ip_adapter_state, write_image_encoder, write_ip_adapter
from server_fixtures import start_server
from test_webui import (  # noqa: F401  (fixtures: browser, page)
    By, Select, browser, drop_file, http_json, open_page, page, set_value, text, value, wait, wait_job,
)

LAYERS = "mid=1 up.block_1=0/1"


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory):
    """A server with ip-adapter_tiny.safetensors in its ControlNet folder and the image encoder one folder up."""
    import sdlab
    from sdlab.models.ip_adapter import cross_attentions

    root = tmp_path_factory.mktemp("webui-ip-layers")
    models = root / "models"
    (models / "ControlNet").mkdir(parents=True)
    bundle = sdlab.load().bundle                    # the shipped model the server draws with
    write_image_encoder(models / "image_encoder", seed=2, projection=32)
    widths = [attn.to_q.weight.shape[0] for attn in cross_attentions(bundle.unet)]
    write_ip_adapter(models / "ControlNet" / "ip-adapter_tiny.safetensors",
                     ip_adapter_state(widths, bundle.unet_config.context_dim, 32, seed=3, std=0.3))
    server = start_server(root / "outputs", "--models-dir", str(models))
    yield server.url.rstrip("/")
    server.stop()


def _reference_png() -> bytes:
    buffer = io.BytesIO()
    Image.open(SAMPLE_PICTURE).convert("RGB").crop((0, 0, 200, 160)).save(buffer, "PNG")
    return buffer.getvalue()


def _reference_b64() -> str:
    import base64

    return base64.b64encode(_reference_png()).decode()


def _adapter_title(driver) -> str:
    titles = driver.execute_script("return [...document.getElementById('ipa_model').options].map((o) => o.value)")
    return next(title for title in titles if title.startswith("ip-adapter_tiny ["))


def test_layers_select_sends_shows_refusals_and_reuses(page, base_url):
    url = base_url
    page.find_element(By.ID, "ipa_enabled").click()
    wait(page, lambda d: d.execute_script("return document.getElementById('ipa_model').options.length > 1"), 30,
         "the IP-Adapter list did not load")
    Select(page.find_element(By.ID, "ipa_model")).select_by_value(_adapter_title(page))
    drop_file(page, _reference_png(), "reference.png", "ipa_drop")
    wait(page, lambda d: d.find_element(By.ID, "ipa_view").is_displayed(), 10, "the dropped picture is not shown")
    assert [o.get_attribute("value") for o in Select(page.find_element(By.ID, "ipa_layers")).options] == [
        "", "style", "style+layout"]
    sent = page.execute_script("return JSON.parse(JSON.stringify(collectRequest()))")["ip_adapters"][0]
    assert "layer_scales" not in sent                                   # All: every cross-attention
    Select(page.find_element(By.ID, "ipa_layers")).select_by_value("style+layout")
    sent = page.execute_script("return JSON.parse(JSON.stringify(collectRequest()))")["ip_adapters"][0]
    assert sent["layer_scales"] == "style+layout"
    # SDXL's presets on the shipped model (2 transformers in up_blocks.0, no down_blocks.2 second one): the 400
    Select(page.find_element(By.ID, "ipa_layers")).select_by_value("style")
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
    page.find_element(By.CSS_SELECTOR, f"{card} button.reuse").click()
    wait(page, lambda d: value(d, "ipa_layers") == LAYERS, 20, "Reuse did not select the job's layers")
    assert value(page, "ipa_scale") == "0.8"
    drop_file(page, _reference_png(), "reference.png", "ipa_drop")
    wait(page, lambda d: d.find_element(By.ID, "ipa_view").is_displayed(), 10, "the dropped picture is not shown")
    sent = page.execute_script("return JSON.parse(JSON.stringify(collectRequest()))")["ip_adapters"][0]
    assert sent["layer_scales"] == LAYERS and sent["scale"] == 0.8
