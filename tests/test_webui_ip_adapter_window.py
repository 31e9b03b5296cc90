"""The web UI's IP-Adapter Starting / Ending step, in chromium: left at every step nothing is sent, a window goes out
as the native `start` / `end` and the job draws with it, and Reuse of a job with a window fills both boxes."""

from __future__ import annotations

from test_webui import (  # noqa: F401  (fixtures: browser, page)
    browser, http_json, page, set_value, value, wait, wait_job,
)
from webui_ip_adapter_fixtures import (  # noqa: F401  (fixture: base_url)
    base_url, drop_reference, open_ip_adapter_box, reuse_job, sent_unit, tiny_unit,
)


def test_the_window_boxes_send_draw_and_reuse(page, base_url):
    open_ip_adapter_box(page)
    assert value(page, "ipa_start") == "0" and value(page, "ipa_end") == "1"
    assert "start" not in sent_unit(page) and "end" not in sent_unit(page)      # every step: nothing sent
    set_value(page, "ipa_start", "0.25")
    set_value(page, "ipa_end", "0.8")
    sent = sent_unit(page)
    assert sent["start"] == 0.25 and sent["end"] == 0.8
    # a job with a window (as the box sends it): recorded, and Reuse fills the boxes again
    job = http_json(base_url, "/api/jobs", {"prompt": "windowed", "steps": 4, "width": 64, "height": 64,
                                            "ip_adapters": [tiny_unit(start=0.5, end=0.75)]})
    done = wait_job(base_url, job["id"])
    assert done["status"] == "done", done
    assert done["request"]["ip_adapters"][0]["start"] == 0.5 and done["request"]["ip_adapters"][0]["end"] == 0.75
    reuse_job(page, base_url, job["id"])
    wait(page, lambda d: value(d, "ipa_start") == "0.5", 20, "Reuse did not fill the Starting step")
    assert value(page, "ipa_end") == "0.75" and value(page, "ipa_scale") == "0.8"
    drop_reference(page)
    sent = sent_unit(page)
    assert sent["start"] == 0.5 and sent["end"] == 0.75
