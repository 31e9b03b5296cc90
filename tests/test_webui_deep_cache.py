"""The web UI's DeepCache box in a real headless browser (the helpers and fixtures of test_webui.py): unticked by
default, ticked it sends the native API's `deep_cache` object and the job draws with it; Reuse of the job and a
dropped PNG tick it and fill it; a picture without DeepCache unticks it."""

from __future__ import annotations

from test_webui import (  # noqa: F401  (fixtures: base_url, browser, page; the session's sdlab_server)
    By, base_url, browser, checked, job_by_prompt, page, read_dropped, reuse, sdlab_server, set_value, text,
    tick_option_box, value, wait, wait_job,
)


def test_the_deep_cache_box_reaches_the_job_and_reuse_fills_it(page, base_url):
    tick_option_box(page, "deep_cache")
    assert [value(page, "deep_cache_interval"), value(page, "deep_cache_branch")] == ["3", "0"]
    prompt = "a deepcache web house"
    set_value(page, "prompt", prompt)
    set_value(page, "steps", 4)
    set_value(page, "deep_cache_interval", 2)
    set_value(page, "deep_cache_branch", 1)
    page.find_element(By.ID, "generate").click()
    wait(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results img.result")) == 1, message="no result")
    job = wait_job(base_url, job_by_prompt(base_url, prompt)["id"])
    assert job["status"] == "done" and job["request"]["deep_cache"] == {"interval": 2, "branch": 1}, job
    assert "DeepCache interval: 2, DeepCache branch: 1" in job["infotexts"][0]
    # Reuse in a fresh page ticks the box and fills it: the form sends the job's setting again
    reuse(page, base_url, job["id"])
    wait(page, lambda d: checked(d, "deep_cache"), 10, "DeepCache is not ticked")
    assert page.execute_script("return collectRequest()")["deep_cache"] == {"interval": 2, "branch": 1}
    assert text(page, "notice") == ""


def test_a_dropped_png_ticks_deep_cache_and_one_without_unticks_it(page):
    read_dropped(page, "a dropped house\nSteps: 20, Sampler: Euler, Seed: 1, Size: 64x64, DeepCache interval: 5, "
                       "DeepCache branch: 2", "cached.png")
    assert checked(page, "deep_cache") and page.find_element(By.ID, "deep_cache-options").is_displayed()
    assert page.execute_script("return collectRequest()")["deep_cache"] == {"interval": 5, "branch": 2}
    read_dropped(page, "a plain house\nSteps: 20, Sampler: Euler, Seed: 1, Size: 64x64", "plain.png")
    assert not checked(page, "deep_cache") and "deep_cache" not in page.execute_script("return collectRequest()")
