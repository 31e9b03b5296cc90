"""The web UI's IP-Adapter Resize mode, in chromium: left at its default nothing is sent (Crop and Resize, the
extension's default unit's), a mode chosen goes out as the native `resize_mode`, and Reuse of a job with one sets
the box again (what an "Only masked" inpaint fits the picture by before cutting it: tests/
test_ip_adapter_only_masked_resize.py draws it)."""

from __future__ import annotations

from test_webui import (  # noqa: F401  (fixtures: browser, page)
    browser, choose, http_json, page, value, wait, wait_job,
)
from webui_ip_adapter_fixtures import (  # noqa: F401  (fixture: base_url)
    base_url, drop_reference, open_ip_adapter_box, reuse_job, sent_unit, tiny_unit,
)


def test_the_resize_mode_box_sends_and_reuse_sets_it(page, base_url):
    open_ip_adapter_box(page)
    assert value(page, "ipa_resize_mode") == "" and "resize_mode" not in sent_unit(page)   # the default: nothing sent
    choose(page, "ipa_resize_mode", value="fill")
    assert sent_unit(page)["resize_mode"] == "fill"
    job = http_json(base_url, "/api/jobs", {"prompt": "fitted", "steps": 2, "width": 64, "height": 64,
                                            "ip_adapters": [tiny_unit(resize_mode="resize")]})
    done = wait_job(base_url, job["id"])
    assert done["status"] == "done", done
    assert done["request"]["ip_adapters"][0]["resize_mode"] == "resize"
    reuse_job(page, base_url, job["id"])
    wait(page, lambda d: value(d, "ipa_resize_mode") == "resize", 20, "Reuse did not set the Resize mode")
    drop_reference(page)
    assert sent_unit(page)["resize_mode"] == "resize"
