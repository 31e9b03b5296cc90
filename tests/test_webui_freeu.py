"""The web UI's FreeU box in a real headless browser (the helpers and fixtures of test_webui.py): unticked by
default, ticked it sends the native API's `freeu` object and the job draws with it; Reuse of the job and a dropped
PNG (sdlab's, and Forge's FreeU Integrated labels, with or without its step window) tick it and fill it; a picture
without FreeU unticks it."""

from __future__ import annotations

from test_webui import (  # noqa: F401  (fixtures: base_url, browser, page; the session's sdlab_server)
    By, choose, base_url, browser, checked, job_by_prompt, page, read_dropped, reuse, sdlab_server, set_value, text,
    tick_option_box, value, wait, wait_job,
)


def test_the_freeu_box_reaches_the_job_and_reuse_fills_it(page, base_url):
    tick_option_box(page, "freeu")
    assert [value(page, f"freeu_{name}") for name in ("b1", "b2", "s1", "s2", "version", "convention", "start",
                                                      "end")] == ["1.3", "1.4", "0.9", "0.2", "2", "comfyui", "0", "1"]
    prompt = "a freeu web house"
    set_value(page, "prompt", prompt)
    set_value(page, "steps", 2)
    set_value(page, "freeu_b1", 1.3)
    set_value(page, "freeu_b2", 1.6)
    set_value(page, "freeu_end", 0.5)
    choose(page, "freeu_version", value="1")
    page.find_element(By.ID, "generate").click()
    wait(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results img.result")) == 1, message="no result")
    job = wait_job(base_url, job_by_prompt(base_url, prompt)["id"])
    setting = {"b1": 1.3, "b2": 1.6, "s1": 0.9, "s2": 0.2, "version": 1, "convention": "comfyui", "start": 0,
               "end": 0.5}
    assert job["status"] == "done" and job["request"]["freeu"] == setting, job
    assert "freeu_enabled: True, freeu_b1: 1.3, freeu_b2: 1.6" in job["infotexts"][0]
    assert "freeu_start: 0, freeu_end: 0.5" in job["infotexts"][0]
    # Reuse in a fresh page ticks the box and fills it: the form sends the job's setting again
    reuse(page, base_url, job["id"])
    wait(page, lambda d: checked(d, "freeu"), 10, "FreeU is not ticked")
    assert page.execute_script("return collectRequest()")["freeu"] == setting and text(page, "notice") == ""


def test_a_dropped_png_ticks_freeu_from_forges_labels_and_one_without_unticks_it(page):
    forge = ("a dropped house\nSteps: 20, Sampler: Euler, Seed: 1, Size: 64x64, freeu_enabled: True, "
             "freeu_b1: 1.01, freeu_b2: 1.02, freeu_s1: 0.99, freeu_s2: 0.95")
    read_dropped(page, forge, "forge.png")
    assert checked(page, "freeu") and page.find_element(By.ID, "freeu-options").is_displayed()
    assert page.execute_script("return collectRequest()")["freeu"] == {
        "b1": 1.01, "b2": 1.02, "s1": 0.99, "s2": 0.95, "version": 2, "convention": "comfyui", "start": 0, "end": 1}
    read_dropped(page, forge + ", freeu_start: 0.25, freeu_end: 0.75", "today.png")   # Forge since its PR #1689
    assert [value(page, "freeu_start"), value(page, "freeu_end")] == ["0.25", "0.75"]
    read_dropped(page, "a plain house\nSteps: 20, Sampler: Euler, Seed: 1, Size: 64x64", "plain.png")
    assert not checked(page, "freeu") and "freeu" not in page.execute_script("return collectRequest()")


def test_a_dropped_png_of_the_sd_webui_freeu_convention_fills_its_stages_choice(page):
    """A picture drawn through A1111's API with sd-webui-freeu's script records `FreeU convention: sd-webui-freeu`;
    dropped, it ticks FreeU and picks that choice of Stages, which the form sends again."""
    text_ = ("an extension house\nSteps: 20, Sampler: Euler, Seed: 1, Size: 64x64, freeu_enabled: True, "
             "freeu_b1: 1.3, freeu_b2: 1.6, freeu_s1: 0.9, freeu_s2: 0.2, freeu_start: 0, freeu_end: 1, "
             "FreeU version: 1, FreeU convention: sd-webui-freeu")
    read_dropped(page, text_, "extension.png")
    assert checked(page, "freeu") and value(page, "freeu_convention") == "sd-webui-freeu"
    assert page.execute_script("return collectRequest()")["freeu"] == {
        "b1": 1.3, "b2": 1.6, "s1": 0.9, "s2": 0.2, "version": 1, "convention": "sd-webui-freeu", "start": 0, "end": 1}
