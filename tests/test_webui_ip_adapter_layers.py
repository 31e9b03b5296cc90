"""The web UI's IP-Adapter Layers select, in chromium: a preset goes out as the native `layer_scales`, the server's
refusal of one the model cannot take is shown, and Reuse of a job with other layer scales selects their text, which
the next job sends again."""

from __future__ import annotations

from test_webui import (  # noqa: F401  (fixtures: browser, page)
    By, browser, choose, http_json, option_values, page, set_value, text, value, wait, wait_job,
)
from webui_ip_adapter_fixtures import (  # noqa: F401  (fixture: base_url)
    base_url, drop_reference, open_ip_adapter_box, reuse_job, sent_unit, tiny_unit,
)

LAYERS = "mid=1 up.block_1=0/1"


def test_layers_select_sends_shows_refusals_and_reuses(page, base_url):
    open_ip_adapter_box(page)
    assert option_values(page, "ipa_layers") == [
        "", "style", "style+layout"]
    assert "layer_scales" not in sent_unit(page)                        # All: every cross-attention
    choose(page, "ipa_layers", value="style+layout")
    assert sent_unit(page)["layer_scales"] == "style+layout"
    # SDXL's presets on the shipped model (2 transformers in up_blocks.0, no down_blocks.2 second one): the 400
    choose(page, "ipa_layers", value="style")
    set_value(page, "prompt", "a refused preset")
    page.find_element(By.ID, "generate").click()
    wait(page, lambda d: text(d, "error").startswith("400") and "up.block_0 takes 2 numbers" in text(d, "error"), 30,
         "the server's refusal is not shown")
    # Reuse of a job drawn with other layer scales: its text selected, and sent again
    job = http_json(base_url, "/api/jobs", {"prompt": "layered", "steps": 2, "width": 64, "height": 64,
                                            "ip_adapters": [tiny_unit(layer_scales=LAYERS)]})
    done = wait_job(base_url, job["id"])
    assert done["status"] == "done", done
    reuse_job(page, base_url, job["id"])
    wait(page, lambda d: value(d, "ipa_layers") == LAYERS, 20, "Reuse did not select the job's layers")
    assert value(page, "ipa_scale") == "0.8"
    drop_reference(page)
    sent = sent_unit(page)
    assert sent["layer_scales"] == LAYERS and sent["scale"] == 0.8
