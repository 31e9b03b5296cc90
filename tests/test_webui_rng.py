"""The web UI's RNG select and Seed resize from: they reach the job, and a dropped PNG or a reused job fills
them (an A1111 text without RNG: A1111's default GPU; an sdlab text without it: CPU)."""

from __future__ import annotations

from test_webui import (  # noqa: F401  (fixtures: base_url, browser, page; the session's sdlab_server)
    By, choose, base_url, browser, checked, drop_file, http_json, page, png_with_parameters, reuse, sdlab_server,
    set_value, value, wait, wait_job,
)


def test_rng_and_seed_resize_reach_the_job(page):
    assert value(page, "rng") == "CPU"
    choose(page, "rng", value="NV")
    page.find_element(By.ID, "seed-extra").click()
    set_value(page, "seed_resize_from_w", 48)
    set_value(page, "seed_resize_from_h", 80)
    sent = page.execute_script("return collectRequest()")
    assert sent["rng"] == "NV" and (sent["seed_resize_from_w"], sent["seed_resize_from_h"]) == (48, 80)


def test_a_dropped_png_and_a_reused_job_fill_them(page, base_url):
    a1111 = "a cat\nSteps: 2, Sampler: Euler a, CFG scale: 5, Seed: 3, Size: 64x64, Seed resize from: 32x96"
    drop_file(page, png_with_parameters(a1111 + ", Version: v1.10.1"), "a1111.png")
    wait(page, lambda d: value(d, "seed_resize_from_w") == "32", 20, "the PNG was not read")
    assert (value(page, "rng"), value(page, "seed_resize_from_h"), checked(page, "seed-extra")) == ("GPU", "96", True)
    drop_file(page, png_with_parameters("a dog\nSteps: 2, Seed: 3, Size: 64x64, Version: sdlab 0.1.0"), "sdlab.png")
    wait(page, lambda d: value(d, "prompt") == "a dog", 20, "the PNG was not read")
    assert value(page, "rng") == "CPU" and not checked(page, "seed-extra")
    job = wait_job(base_url, http_json(base_url, "/api/jobs", {"prompt": "an nv reuse", "steps": 2, "seed": 3,
                                                               "rng": "NV", "seed_resize_from_w": 64,
                                                               "seed_resize_from_h": 32})["id"])
    assert job["status"] == "done", job
    reuse(page, base_url, job["id"])
    wait(page, lambda d: value(d, "prompt") == "an nv reuse", 10, "the job was not reused")
    assert (value(page, "rng"), value(page, "seed_resize_from_w"), value(page, "seed_resize_from_h")) == ("NV", "64", "32")
