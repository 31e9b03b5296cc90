"""The web UI's form in a real headless browser (the helpers and fixtures of test_webui.py): a number box
holding text that is not a number is an error, never a silent default; "Reuse" of a job and a dropped
PNG fill the form alike and name each setting the form has no control for (the hires fix, clip skip, ...)."""

from __future__ import annotations

from test_webui import (  # noqa: F401  (fixtures: base_url, browser, page; the session's sdlab_server)
    By, base_url, browser, drop_file, http_bytes, http_json, open_page, page, png_with_parameters, sdlab_server,
    set_value, text, value, wait, wait_job,
)


def _jobs(base: str) -> int:
    return len(http_json(base, "/api/jobs")["jobs"])


def test_text_that_is_not_a_number_is_an_error(page, base_url):
    page.find_element(By.ID, "prompt").send_keys("a number box with text")
    before = _jobs(base_url)
    for field, typed in (("steps", "e"), ("cfg_scale", "1e400")):
        set_value(page, "steps", "")
        set_value(page, "cfg_scale", "")
        set_value(page, field, typed)
        assert page.execute_script("return document.getElementById(arguments[0]).validity.badInput", field)
        page.find_element(By.ID, "generate").click()
        wait(page, lambda d: d.find_element(By.ID, "error").is_displayed(), 10, f"{field} {typed!r}: no error")
        assert "not a number" in text(page, "error"), text(page, "error")
    assert _jobs(base_url) == before                                    # nothing was sent


def test_reuse_of_a_hires_job_says_the_hires_fix_is_left_out(page, base_url):
    job = wait_job(base_url, http_json(base_url, "/api/jobs", {"prompt": "a hires reuse", "steps": 2, "seed": 3,
                                                               "hr_scale": 1.5, "hr_steps": 2})["id"])
    assert job["status"] == "done", job
    open_page(page, base_url)
    card = f'#gallery [data-job-id="{job["id"]}"]'
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, f"{card} button.reuse"), 20, "the job is not in the gallery")
    page.find_element(By.CSS_SELECTOR, f"{card} button.reuse").click()
    wait(page, lambda d: "hires fix" in text(d, "notice"), 10, "no notice about the hires fix")
    assert "x1.5" in text(page, "notice") and page.find_element(By.ID, "prompt").get_attribute("value") == "a hires reuse"


def test_a_dropped_png_names_every_setting_the_form_cannot_apply(page, base_url):
    parameters = ("a red apple\nSteps: 4, Sampler: Euler, Schedule type: Uniform, CFG scale: 5, Seed: 3, Size: 64x48, "
                  "Model hash: 0123456789, Clip skip: 2, Variation seed: 9, Variation seed strength: 0.4, "
                  "Denoising strength: 0.5, Hires upscale: 2, Hires steps: 2, Hires upscaler: Latent, ENSD: 31337, "
                  "Mask blur: 3, Emphasis: No norm, Hires sampler: Use same sampler, RNG: GPU, "
                  'ControlNet 0: "Module: canny, Model: control_canny [abc]", Version: v1.10.0')
    drop_file(page, png_with_parameters(parameters), "apple.png")
    wait(page, lambda d: text(d, "notice").startswith("Settings read from apple.png"), 20, "the PNG was not read")
    notice = text(page, "notice")
    for note in ("hires fix (x2, 2 steps, denoise 0.5, Latent)", "clip skip 2", "variation seed 9 at strength 0.4",
                 "ENSD 31337", "Emphasis: No norm", "ControlNet 0: Module: canny"):
        assert note in notice, (note, notice)
    for applied_or_no_op in ("Model hash", "Version", "RNG", "Hires sampler", "Mask blur", "Steps", "Seed"):
        assert applied_or_no_op not in notice, (applied_or_no_op, notice)
    assert (value(page, "steps"), value(page, "seed"), value(page, "width"), value(page, "height")) == ("4", "3", "64", "48")
    assert value(page, "mask_blur") == "3" and value(page, "sampler") == "Euler" and value(page, "schedule") == "uniform"

    # the form's own picture: everything applies, nothing to report
    job = wait_job(base_url, http_json(base_url, "/api/jobs", {"prompt": "a plain one", "steps": 2, "seed": 5})["id"])
    drop_file(page, http_bytes(base_url, job["images"][0]), "plain.png")
    wait(page, lambda d: text(d, "notice").startswith("Settings read from plain.png"), 20, "the PNG was not read")
    assert text(page, "notice") == "Settings read from plain.png" and value(page, "prompt") == "a plain one"


def test_reuse_names_the_clip_skip_and_variation_seed_it_leaves_out(page, base_url):
    job = wait_job(base_url, http_json(base_url, "/api/jobs", {"prompt": "a varied one", "steps": 2, "seed": 3,
                                                               "clip_skip": 2, "subseed": 8, "subseed_strength": 0.25})["id"])
    assert job["status"] == "done", job
    open_page(page, base_url)
    card = f'#gallery [data-job-id="{job["id"]}"]'
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, f"{card} button.reuse"), 20, "the job is not in the gallery")
    page.find_element(By.CSS_SELECTOR, f"{card} button.reuse").click()
    wait(page, lambda d: "clip skip 2" in text(d, "notice"), 10, "no notice about clip skip")
    assert "variation seed 8 at strength 0.25" in text(page, "notice") and value(page, "seed") == "3"
