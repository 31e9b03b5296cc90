"""In real chromium: img2img's hires fix, ComfyUI's two-pass graph from a VAEEncode (hr_convention comfyui, the one
convention with an img2img hires pass). The Hires. fix box shows on the img2img tab; Reuse of an img2img two-pass
job there ticks and fills it, and Generate sends it (before, the box was txt2img's alone: the ticked, hidden hires
fix was dropped and a plain img2img drawn). A1111's upscalers there are one error before anything is sent; the
inpaint tab, which has no hires fix, names the one it drops in the Reuse notice."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from selenium.webdriver.common.by import By

from test_webui import (  # noqa: F401  (fixtures: base_url, browser, page; the session's sdlab_server)
    base_url, browser, checked, click_card_button, drop_file, generate_and_finish, http_bytes, http_json, page, reuse,
    sdlab_server, text, value, wait, wait_job,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _init_png() -> bytes:
    rng = np.random.default_rng(4)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_reuse_of_an_img2img_two_pass_job_draws_its_hires_pass_on_the_img2img_tab(page, base_url):
    init = _init_png()
    request = {"mode": "img2img", "prompt": "an img2img two-pass", "steps": 2, "seed": 3, "sampler": "euler",
               "init_image": base64.b64encode(init).decode(), "strength": 0.7, "hr_convention": "comfyui",
               "hr_scale": 1.5, "hr_upscaler": "bislerp", "hr_denoise": 0.5}
    first = wait_job(base_url, http_json(base_url, "/api/jobs", request)["id"])
    assert first["status"] == "done", first
    drawn = _pixels(http_bytes(base_url, first["images"][0]))
    assert drawn.shape == (96, 96, 3)

    reuse(page, base_url, first["id"])
    wait(page, lambda d: checked(d, "enable_hr"), 10, "the hires fix is not ticked")
    page.find_element(By.ID, "tab-img2img").click()
    drop_file(page, init, "init.png", "init-drop")
    wait(page, lambda d: d.execute_script("return state.initImage") is not None, 10, "no initial image")
    assert page.find_element(By.ID, "hires-section").is_displayed()
    assert page.find_element(By.ID, "enable_hr-img2img-hint").is_displayed()
    assert (value(page, "hr_upscaler"), value(page, "hr_scale"), value(page, "hr_denoise"), value(page, "strength")) \
        == ("bislerp", "1.5", "0.5", "0.7")
    assert text(page, "notice") == ""
    job = generate_and_finish(page, base_url, "an img2img two-pass")
    assert {name: job["request"].get(name) for name in ("mode", "strength", "hr_convention", "hr_scale",
                                                        "hr_upscaler", "hr_denoise")} == {
        "mode": "img2img", "strength": 0.7, "hr_convention": "comfyui", "hr_scale": 1.5, "hr_upscaler": "bislerp",
        "hr_denoise": 0.5}
    assert np.array_equal(_pixels(http_bytes(base_url, job["images"][0])), drawn)     # the job's picture again

    # A1111's upscaler: img2img has no A1111 hires fix; one message, nothing sent
    before = len(http_json(base_url, "/api/jobs")["jobs"])
    page.execute_script("const s = document.getElementById('hr_upscaler'); s.value = 'Latent';"
                        "s.dispatchEvent(new Event('change'));")
    page.find_element(By.ID, "generate").click()
    wait(page, lambda d: "img2img's hires fix is ComfyUI's two-pass graph" in text(d, "error"), 10,
         "no error for A1111's hires fix on img2img")
    assert len(http_json(base_url, "/api/jobs")["jobs"]) == before

    # the inpaint tab draws no hires fix: its box hidden, the Reuse notice names the one it drops
    page.find_element(By.ID, "tab-inpaint").click()
    assert not page.find_element(By.ID, "hires-section").is_displayed()
    click_card_button(page, f'#gallery [data-job-id="{first["id"]}"]', "reuse")
    wait(page, lambda d: "the hires fix (not on the inpaint tab)" in text(d, "notice"), 10,
         "the Reuse notice does not name the dropped hires fix")

    # the job's picture dropped on the img2img tab fills the box from its infotext (Hires denoising strength 0.5,
    # Denoising strength 0.7: the first pass's)
    page.find_element(By.ID, "tab-img2img").click()
    page.execute_script("document.getElementById('enable_hr').checked = false;")
    drop_file(page, http_bytes(base_url, first["images"][0]), "two-pass.png")
    wait(page, lambda d: text(d, "notice").startswith("Settings read from two-pass.png"), 20, "the PNG was not read")
    assert checked(page, "enable_hr") and page.find_element(By.ID, "hires-options").is_displayed()
    assert (value(page, "hr_upscaler"), value(page, "hr_scale"), value(page, "hr_denoise"), value(page, "strength")) \
        == ("bislerp", "1.5", "0.5", "0.7")
    assert page.execute_script("return collectRequest()")["hr_convention"] == "comfyui"


def test_reuse_of_an_a1111_hires_job_on_the_img2img_tab_leaves_the_hires_fix_unticked(page, base_url):
    """A1111's hires fix is txt2img's: Reused on the img2img tab, the box stays unticked and the notice names it,
    so Generate draws the img2img (before, the box was ticked with an A1111 upscaler and Generate was refused)."""
    request = {"prompt": "an A1111 hires job", "steps": 2, "seed": 5, "hr_scale": 1.5, "hr_upscaler": "Latent",
               "hr_denoise": 0.6}
    first = wait_job(base_url, http_json(base_url, "/api/jobs", request)["id"])
    assert first["status"] == "done", first

    reuse(page, base_url, first["id"])                      # opens the page: Reuse on the txt2img tab ticks it
    wait(page, lambda d: checked(d, "enable_hr"), 10, "the hires fix is not ticked on the txt2img tab")
    assert (value(page, "hr_upscaler"), value(page, "hr_scale")) == ("Latent", "1.5")

    page.find_element(By.ID, "tab-img2img").click()
    drop_file(page, _init_png(), "init.png", "init-drop")
    wait(page, lambda d: d.execute_script("return state.initImage") is not None, 10, "no initial image")
    click_card_button(page, f'#gallery [data-job-id="{first["id"]}"]', "reuse")
    wait(page, lambda d: "A1111's hires fix (txt2img's" in text(d, "notice"), 10,
         "the Reuse notice does not name the dropped hires fix")
    assert not checked(page, "enable_hr")
    job = generate_and_finish(page, base_url, "an A1111 hires job")
    assert job["request"]["mode"] == "img2img" and job["request"].get("hr_scale") is None, job["request"]
