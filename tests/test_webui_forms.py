"""The web UI's form in a real headless browser (the helpers and fixtures of test_webui.py): a number box
holding text that is not a number is an error, never a silent default; "Reuse" of a hires job says the
hires fix is not in the form."""

from __future__ import annotations

from test_webui import (  # noqa: F401  (fixtures: base_url, browser, page; the session's sdlab_server)
    By, base_url, browser, http_json, open_page, page, sdlab_server, set_value, text, wait, wait_job,
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
