"""The web UI's Token merging ratio box: it reaches the job (which records it as A1111 does), and a dropped PNG or a
reused job fills it; the hires pass's ratio, which has no control, is kept under Override settings and sent."""

from __future__ import annotations

from test_webui import (  # noqa: F401  (fixtures: base_url, browser, page; the session's sdlab_server)
    By, base_url, browser, drop_file, http_json, page, png_with_parameters, reuse, sdlab_server, set_value, value,
    wait, wait_job,
)


def test_the_ratio_reaches_the_job(page, base_url):
    assert value(page, "token_merging_ratio") == "0"
    assert page.execute_script("return collectRequest()")["token_merging_ratio"] == 0
    set_value(page, "token_merging_ratio", 0.5)
    sent = page.execute_script("return collectRequest()")
    assert sent["token_merging_ratio"] == 0.5
    job = wait_job(base_url, http_json(base_url, "/api/jobs", {**sent, "prompt": "a merged cat", "steps": 2,
                                                               "width": 64, "height": 64})["id"])
    assert job["status"] == "done" and "Token merging ratio: 0.5" in job["infotexts"][0], job


def test_a_dropped_png_and_a_reused_job_fill_it(page, base_url):
    a1111 = ("a cat\nSteps: 2, Sampler: Euler a, CFG scale: 5, Seed: 3, Size: 64x64, Token merging ratio: 0.3, "
             "Version: v1.10.1")
    drop_file(page, png_with_parameters(a1111), "a1111.png")
    wait(page, lambda d: value(d, "token_merging_ratio") == "0.3", 20, "the PNG was not read")
    drop_file(page, png_with_parameters("a dog\nSteps: 2, Seed: 3, Size: 64x64, Version: sdlab 0.1.0"), "sdlab.png")
    wait(page, lambda d: value(d, "prompt") == "a dog", 20, "the PNG was not read")
    assert value(page, "token_merging_ratio") == "0"                  # drawn without merging
    job = wait_job(base_url, http_json(base_url, "/api/jobs", {"prompt": "a merged reuse", "steps": 2, "seed": 3,
                                                               "width": 64, "height": 64, "hr_scale": 1.5,
                                                               "hr_denoise": 0.5, "token_merging_ratio": 0.5,
                                                               "token_merging_ratio_hr": 0.2})["id"])
    assert job["status"] == "done", job
    reuse(page, base_url, job["id"])
    wait(page, lambda d: value(d, "prompt") == "a merged reuse", 10, "the job was not reused")
    assert value(page, "token_merging_ratio") == "0.5"
    sent = page.execute_script("return collectRequest()")
    assert (sent["token_merging_ratio"], sent["token_merging_ratio_hr"]) == (0.5, 0.2)
    # without the hires fix the kept hires ratio is not sent (the server refuses it alone), and comes back with it
    page.execute_script('document.getElementById("enable_hr").checked = false')
    sent = page.execute_script("return collectRequest()")
    assert "token_merging_ratio_hr" not in sent and sent["token_merging_ratio"] == 0.5
    job = wait_job(base_url, http_json(base_url, "/api/jobs", {**sent, "prompt": "a merged cat", "steps": 2,
                                                               "width": 64, "height": 64})["id"])
    assert job["status"] == "done", job
    page.execute_script('document.getElementById("enable_hr").checked = true')
    assert page.execute_script("return collectRequest()")["token_merging_ratio_hr"] == 0.2
