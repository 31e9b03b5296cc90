"""The web UI leaves the steps and the sampler to the model until the user sets them: on a model whose file
names a few-step preset (`sdlab.preset`), a job from the untouched form draws with the preset's sampler and
steps, not with 20 steps of DPM++ 2M; a plain model still gets its family's defaults; what the user types
wins; restoring a finished job fills in what it ran with. In Debian's chromium through selenium, on a real
`sdlab serve` (tiny models, 32 px). The native API takes `"steps": null` as unset too (no browser needed).
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest

from server_fixtures import start_server, write_preset_models

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
TIMEOUT = 90
needs_browser = pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                                   reason="Debian's chromium and chromedriver are not installed")
LCM = {"sampler": "LCM", "steps": 4, "cfg_scale": 1.0}          # presets.py's "lcm" row (its schedule: trailing)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("webui-preset")
    models = root / "models"
    distilled = write_preset_models(models)
    server = start_server(root / "outputs", "--models-dir", str(models), "--model", str(distilled))
    yield server
    server.stop()


def http_json(base: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data else {}
    request = urllib.request.Request(base + path, data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def finished(base: str, prompt: str) -> dict:
    """The newest job with `prompt`, once it has ended (it must have drawn)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        jobs = [j for j in http_json(base, "/api/jobs")["jobs"] if j["request"].get("prompt") == prompt]
        if jobs and jobs[0]["status"] not in ("queued", "running"):
            assert jobs[0]["status"] == "done", jobs[0]
            return jobs[0]
        time.sleep(0.2)
    raise AssertionError(f"no finished job for {prompt!r}")


def titles(base: str) -> dict[str, str]:
    return {m["model_name"]: m["title"] for m in http_json(base, "/sdapi/v1/sd-models")}


def test_native_steps_null_is_unset(served):
    base, small = served.url, {"seed": 7, "width": 32, "height": 32, "steps": None, "sampler": None}
    job = http_json(base, "/api/jobs", {**small, "prompt": "null steps, preset model"})
    assert job["status"] == "queued"
    ran = finished(base, "null steps, preset model")
    assert {k: ran["request"][k] for k in LCM} == LCM and ran["steps"] == 4
    http_json(base, "/api/jobs", {**small, "prompt": "null steps, plain model", "model": titles(base)["plain"]})
    plain = finished(base, "null steps, plain model")
    assert (plain["request"]["steps"], plain["request"]["sampler"]) == (20, "DPM++ 2M")      # SD1's defaults


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def wait(driver, condition, message: str, timeout: float = TIMEOUT):
    """Poll condition until it is truthy; an element the page replaced meanwhile makes that poll false."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05,
                         ignored_exceptions=(StaleElementReferenceException,)).until(condition, message)


def open_page(driver, base: str) -> None:
    driver.get(base + "/")
    wait(driver, lambda d: d.execute_script("return document.getElementById('sampler').options.length > 1 && "
                                            "document.getElementById('model').options.length > 1"),
         "the lists did not load", 30)


def value(driver, element_id: str) -> str:
    return driver.execute_script("return document.getElementById(arguments[0]).value", element_id)


def type_in(driver, element_id: str, text) -> None:
    from selenium.webdriver.common.by import By

    element = driver.find_element(By.ID, element_id)
    element.clear()
    element.send_keys(str(text))


def submit(driver, base: str, prompt: str, model: str, **fields) -> dict:
    """Fill the prompt, model, a small size and `fields` (id -> typed text, or a select's value), generate,
    and return the finished job."""
    from selenium.webdriver.common.by import By
    from test_webui import choose

    type_in(driver, "prompt", prompt)
    choose(driver, "model", value=model)
    for element_id, text in {"width": 32, "height": 32, "seed": 7, **fields}.items():
        if element_id == "sampler":
            choose(driver, "sampler", value=text)
        else:
            type_in(driver, element_id, text)
    driver.find_element(By.ID, "generate").click()
    job = finished(base, prompt)
    card = f'#gallery [data-job-id="{job["id"]}"][data-status="done"]'
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, card), "the finished job is not in the gallery")
    return job


@needs_browser
def test_untouched_form_draws_with_the_model_preset_and_typed_steps_win(browser, served):
    from selenium.webdriver.common.by import By
    from test_webui import click_card_button

    base, models = served.url, titles(served.url)
    open_page(browser, base)
    steps = browser.find_element(By.ID, "steps")
    assert (value(browser, "steps"), steps.get_attribute("placeholder")) == ("", "model default")
    assert value(browser, "sampler") == ""
    assert browser.execute_script("const s = document.getElementById('sampler');"
                                  "return s.options[s.selectedIndex].text") == "model default"

    job = submit(browser, base, "a fox, untouched", models["distilled"])
    assert {k: job["request"][k] for k in LCM} == LCM and job["request"]["schedule"] == "trailing"
    assert "Steps: 4, Sampler: LCM" in job["infotexts"][0]
    # the progress bar counts the steps that ran; the box stays empty for the next job
    wait(browser, lambda d: d.execute_script("const p = document.getElementById('progress');"
                                             "return [p.value, p.max]") == [4, 4], "the progress bar is not at 4 / 4")
    assert browser.find_element(By.ID, "progress-text").text.startswith("Done")
    assert value(browser, "steps") == "" and value(browser, "sampler") == ""

    # typed steps win (the sampler still from the preset); a chosen sampler wins (the steps from the preset)
    typed = submit(browser, base, "a fox, two steps", models["distilled"], steps=2)
    assert (typed["request"]["steps"], typed["request"]["sampler"]) == (2, "LCM") and typed["steps"] == 2
    type_in(browser, "steps", "")
    chosen = submit(browser, base, "a fox, Euler", models["distilled"], sampler="Euler")
    assert (chosen["request"]["steps"], chosen["request"]["sampler"]) == (4, "Euler")

    # a plain model from the untouched form: its family's defaults, as before (SD1: 20 steps of DPM++ 2M)
    open_page(browser, base)
    plain = submit(browser, base, "a fox, plain model", models["plain"])
    assert (plain["request"]["steps"], plain["request"]["sampler"]) == (20, "DPM++ 2M")

    # reusing the untouched job's settings fills in what it ran with
    click_card_button(browser, f'#gallery [data-job-id="{job["id"]}"]', "reuse")
    assert (value(browser, "steps"), value(browser, "sampler")) == ("4", "LCM")
    assert value(browser, "model") == models["distilled"]
