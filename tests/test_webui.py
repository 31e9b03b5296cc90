"""The web UI of `sdlab serve` in a real headless browser (Debian's chromium through selenium).

Each test loads the page from a real `sdlab serve` process (the shipped 64 px model) and works the page as
a person would: typing, Ctrl+Enter, clicking, dropping a PNG, painting a mask with the pointer.

`python tests/test_webui.py --screenshots` starts a server and writes docs/webui.png (a finished
generation) and docs/webui-inpaint.png (the inpaint tab with a painted mask) with the same browser.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, PngImagePlugin
from server_fixtures import sdlab_server  # noqa: F401  (a session fixture: the real `sdlab serve`)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WINDOW = (1280, 900)
TIMEOUT = 90                      # seconds for one job on a busy 2-core machine
REPO = Path(__file__).resolve().parents[1]

if __name__ != "__main__":
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("Debian's chromium and chromedriver are not installed (apt-get install chromium "
                    "chromium-driver); .ci/run installs them", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import (  # noqa: E402
    NoSuchElementException, StaleElementReferenceException, TimeoutException)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


# ---------------------------------------------------------------- helpers


def start_browser() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={WINDOW[0]},{WINDOW[1]}", "--force-device-scale-factor=1"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def basic_auth(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def http_json(base: str, path: str, body: dict | None = None, method: str | None = None,
              headers: dict[str, str] | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    all_headers = {**(headers or {}), **({"Content-Type": "application/json"} if data else {})}
    request = urllib.request.Request(base + path, data=data, method=method, headers=all_headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def http_bytes(base: str, path: str, headers: dict[str, str] | None = None) -> bytes:
    with urllib.request.urlopen(urllib.request.Request(base + path, headers=headers or {}), timeout=30) as response:
        return response.read()


def wait_job(base: str, job_id: str, statuses=("done", "failed", "cancelled"), headers=None) -> dict:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        job = http_json(base, f"/api/jobs/{job_id}", headers=headers)
        if job["status"] in statuses:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not reach {statuses}: {job}")


def job_by_prompt(base: str, prompt: str, headers: dict[str, str] | None = None) -> dict:
    jobs = [job for job in http_json(base, "/api/jobs", headers=headers)["jobs"]
            if job["request"].get("prompt") == prompt]
    assert jobs, f"no job with the prompt {prompt!r}"
    return jobs[0]


def wait(driver, condition, timeout: float = TIMEOUT, message: str = ""):
    """Poll condition until it is truthy. An element the page replaced between finding and reading it (a list being
    refilled) makes that poll false, not the test failed: the next poll finds the new one."""
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05,
                             ignored_exceptions=(StaleElementReferenceException,)).until(condition, message)
    except TimeoutException:
        state = driver.execute_script(
            "const t = (id) => document.getElementById(id)?.textContent;"
            "return {progress: t('progress-text'), error: t('error'), notice: t('notice'), queue: t('queue')};")
        raise AssertionError(f"timed out after {timeout} s: {message}; page: {state}; "
                             f"console: {driver.get_log('browser')}") from None


def cancel_leftover_jobs(base: str, headers: dict[str, str] | None = None) -> None:
    """Jobs another test left queued or running would hold this test's jobs back: cancel them."""
    for job in http_json(base, "/api/jobs", headers=headers)["jobs"]:
        if job["status"] in ("queued", "running"):
            http_json(base, f"/api/jobs/{job['id']}", method="DELETE", headers=headers)


def option_values(driver, select_id: str, field: str = "value") -> list[str]:
    """The values (or another field, such as "text") of a select's options, read in one script: the page may be
    refilling the list, and option elements read one by one can go stale in between."""
    return driver.execute_script("return [...document.getElementById(arguments[0]).options].map((o) => o[arguments[1]])",
                                 select_id, field)


def selected(driver, select_id: str, field: str = "text"):
    """The text (or another field, such as "value") of a select's chosen option, read in one script: the list may
    be refilled between finding its option and reading it. None where nothing is chosen."""
    return driver.execute_script("const o = document.getElementById(arguments[0]).selectedOptions[0];"
                                 "return o ? o[arguments[1]] : null", select_id, field)


def choose(driver, select_id: str, *, value: str | None = None, text: str | None = None, index: int | None = None,
           timeout: float = 20) -> None:
    """Pick a select's option by its value, its text or its index, as a person would (Selenium's Select: the page
    sees the change), once the option is listed. The page fills its lists after a fetch and fills them again
    (fillSelect, replaceChildren): an option found can be gone by the click, so the pick is tried again on the list
    drawn next (`wait` takes a stale element as a false poll)."""
    def picked(d) -> bool:
        select = Select(d.find_element(By.ID, select_id))
        try:
            if value is not None:
                select.select_by_value(value)
            elif text is not None:
                select.select_by_visible_text(text)
            else:
                select.select_by_index(index)
        except NoSuchElementException:
            return False                     # not listed (yet)
        return True

    wait(driver, picked, timeout, f"#{select_id} does not list {value if value is not None else text or index!r}")


def result_srcs(driver) -> list[str]:
    """The addresses of the pictures the viewer shows (#results img.result), read in one script: the viewer is
    drawn again as the job's events come in."""
    return driver.execute_script("return [...document.querySelectorAll('#results img.result')].map((img) => img.src)")


def loaded_results(driver, count: int | None = None, timeout: float = TIMEOUT) -> list[str]:
    """Wait until the viewer shows its pictures (`count` of them, where given), each loaded: their addresses."""
    def loaded(d):
        shown = d.execute_script("return [...document.querySelectorAll('#results img.result')]"
                                 ".map((img) => img.complete && img.naturalWidth ? img.src : null)")
        return shown if shown and None not in shown and count in (None, len(shown)) else False

    return wait(driver, loaded, timeout, f"no result{'' if count is None else f' ({count} pictures)'}")


def open_page(driver, base: str) -> None:
    driver.get(base + "/")
    # the lists are loaded: a sampler and a model to pick, and the gallery drawn, which the page does once every
    # list has loaded (loadLists().then(refreshJobs)): the styles, scripts and ControlNet lists load beside these
    wait(driver, lambda d: len(option_values(d, "sampler")) > 1 and len(option_values(d, "model")) >= 1
         and d.execute_script("return document.getElementById('gallery').childElementCount > 0"), 30,
         "the lists did not load")


def set_value(driver, element_id: str, value) -> None:
    element = driver.find_element(By.ID, element_id)
    element.clear()
    element.send_keys(str(value))


def value(driver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).get_attribute("value")


def text(driver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def generate_and_finish(page, base_url: str, prompt: str) -> dict:
    """Click Generate, find the job the page queued (by its prompt) and wait for it to end done: its record."""
    page.find_element(By.ID, "generate").click()
    job_id = wait(page, lambda d: [j["id"] for j in http_json(base_url, "/api/jobs")["jobs"]
                                   if j["request"].get("prompt") == prompt], 30,
                  f"no job queued; error: {text(page, 'error')}")[0]
    job = wait_job(base_url, job_id)
    assert job["status"] == "done", job
    return job


def png_with_parameters(parameters: str | None, size=(64, 64), color=(40, 90, 200)) -> bytes:
    image = Image.new("RGB", size, color)
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


def drop_file(driver, data: bytes, name: str, target_id: str | None = None) -> None:
    """Drag a file onto the page (or onto the element `target_id`) as the browser would deliver it."""
    driver.execute_script(
        """
        const [b64, name, targetId] = arguments;
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type: "image/png"}));
        const target = targetId ? document.getElementById(targetId) : document.querySelector("main");
        for (const type of ["dragenter", "dragover", "drop"]) {
            target.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: transfer}));
        }
        """,
        base64.b64encode(data).decode(), name, target_id,
    )


def checked(driver, element_id: str) -> bool:
    return driver.find_element(By.ID, element_id).is_selected()


def click_card_button(driver, card: str, button: str, timeout: float = 20) -> None:
    """Click the button (its class, e.g. "reuse") of the gallery card `card` (a CSS selector) once it is there. The
    gallery is drawn again as jobs change, each card replaced: a button found may be gone by the click, so the click
    is tried again on the card drawn next (`wait` takes a stale element as a false poll)."""
    def clicked(d) -> bool:
        found = d.find_elements(By.CSS_SELECTOR, f"{card} button.{button}")
        if found:
            found[0].click()
        return bool(found)

    wait(driver, clicked, timeout, f"no {button} button on {card}")


def reuse(driver, base: str, job_id: str) -> None:
    """Click the gallery's Reuse button of the job."""
    open_page(driver, base)
    card = f'#gallery [data-job-id="{job_id}"]'
    click_card_button(driver, card, "reuse")


def read_dropped(driver, parameters: str, name: str) -> None:
    """Drop a PNG named `name` whose parameters are `parameters` and wait until the form has read it cleanly."""
    drop_file(driver, png_with_parameters(parameters), name)
    wait(driver, lambda d: text(d, "notice") == f"Settings read from {name}", 20, "the PNG was not read cleanly")


def tick_option_box(driver, box: str) -> None:
    """Tick an option box of the form (app.js OPTION_BOXES: freeu, deep_cache), checking that it starts unticked,
    folded and left out of the request, and that ticking it shows its settings."""
    assert not checked(driver, box) and not driver.find_element(By.ID, f"{box}-options").is_displayed()
    assert box not in driver.execute_script("return collectRequest()")
    driver.find_element(By.ID, box).click()
    assert driver.find_element(By.ID, f"{box}-options").is_displayed()


def painted_mask(driver) -> Image.Image:
    data_url = driver.execute_script("return maskDataUrl();")
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("L")


def paint_stroke(driver, dx_from: int, dx_to: int, dy: int = 0) -> None:
    """Drag the pointer across the mask canvas, offsets in CSS pixels from its centre."""
    canvas = driver.find_element(By.ID, "mask-canvas")
    # wholly in view: an element's offsets count from the centre of its visible part
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
    (ActionChains(driver).move_to_element_with_offset(canvas, dx_from, dy).click_and_hold()
     .move_by_offset((dx_to - dx_from) // 2, 0).move_by_offset((dx_to - dx_from) - (dx_to - dx_from) // 2, 0)
     .release().perform())


def severe_console_errors(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def base_url(sdlab_server) -> str:
    return sdlab_server.url.rstrip("/")


# Counts the page's open event streams (window.__streams.max: the most open at once).
COUNT_STREAMS = """
(() => {
  const Native = window.EventSource;
  const streams = window.__streams = {open: 0, max: 0};
  window.EventSource = class extends Native {
    constructor(...args) { super(...args); streams.open += 1; streams.max = Math.max(streams.max, streams.open); }
    close() { if (this.readyState !== Native.CLOSED) streams.open -= 1; super.close(); }
  };
})();
"""


@pytest.fixture(scope="module")
def browser():
    driver = start_browser()
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": COUNT_STREAMS})
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture()
def page(browser, base_url):
    cancel_leftover_jobs(base_url)
    open_page(browser, base_url)
    browser.get_log("browser")            # start each test with an empty console
    return browser


# ---------------------------------------------------------------- tests


def test_page_loads_with_labelled_controls_and_lists(page, base_url):
    for control in ("prompt", "negative_prompt", "model", "sampler", "schedule", "steps", "cfg_scale", "seed",
                    "width", "height", "batch_size", "clip_skip", "tiling", "subseed", "subseed_strength", "hr_upscaler",
                    "hr_scale", "hr_width", "hr_height", "hr_steps", "hr_denoise", "lora", "lora-weight", "strength",
                    "init-image", "brush-size", "refiner", "refiner_switch", "resize_mode", "mask_blur", "invert_mask",
                    "inpaint_fill", "inpaint_only_masked", "inpaint_padding"):
        label = page.find_elements(By.CSS_SELECTOR, f'label[for="{control}"]')
        assert label, f"#{control} has no <label for>"
    samplers = {s["name"] for s in http_json(base_url, "/sdapi/v1/samplers")}
    shown = set(option_values(page, "sampler"))
    assert samplers <= shown
    models = http_json(base_url, "/sdapi/v1/sd-models")
    assert selected(page, "model", "value") in {
        m["title"] for m in models}
    assert page.find_element(By.ID, "tab-txt2img").get_attribute("aria-selected") == "true"
    assert not page.find_element(By.ID, "image-section").is_displayed()
    page.find_element(By.ID, "tab-txt2img").send_keys(Keys.ARROW_RIGHT)        # the tabs follow the arrow keys
    assert page.find_element(By.ID, "tab-img2img").get_attribute("aria-selected") == "true"
    assert page.find_element(By.ID, "image-section").is_displayed()
    page.switch_to.active_element.send_keys(Keys.ARROW_RIGHT)
    assert page.find_element(By.ID, "tab-inpaint").get_attribute("aria-selected") == "true"
    assert page.find_element(By.ID, "mask-tools").is_displayed()
    assert severe_console_errors(page) == []
    # Enter in a number field queues nothing (Ctrl+Enter does, below)
    newest = lambda: [job["id"] for job in http_json(base_url, "/api/jobs?limit=1")["jobs"]]  # noqa: E731
    before = newest()
    page.find_element(By.ID, "steps").send_keys(Keys.ENTER)
    time.sleep(0.5)
    assert newest() == before and text(page, "progress-text") == "Idle"
    # nothing wider than the window, on a desktop and on a phone
    overflow = "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
    assert page.execute_script(overflow) == 0
    try:
        page.set_window_size(420, 860)
        wait(page, lambda d: d.execute_script("return innerWidth") < 430, 10)
        assert page.execute_script(overflow) == 0
    finally:
        page.set_window_size(*WINDOW)


def test_ctrl_enter_generates_with_previews_and_final_image(page, base_url):
    prompt = "a small red star in the centre on a light blue background"
    set_value(page, "steps", 20)
    set_value(page, "seed", 7)
    page.find_element(By.ID, "prompt").send_keys(prompt)
    page.find_element(By.ID, "prompt").send_keys(Keys.CONTROL, Keys.ENTER)

    result = loaded_results(page)[0]
    assert int(page.find_element(By.ID, "preview").get_attribute("data-count") or 0) >= 1, "no step preview shown"
    assert page.find_element(By.ID, "preview").get_attribute("src").startswith("data:image/")
    assert text(page, "progress-text").startswith("Done")

    image = Image.open(io.BytesIO(http_bytes(base_url, result.replace(base_url, ""))))
    assert image.size == (64, 64)
    assert image.info["parameters"].startswith(prompt)
    assert "Seed: 7" in image.info["parameters"] and "Steps: 20" in image.info["parameters"]
    assert prompt in text(page, "infotext")
    job = job_by_prompt(base_url, prompt)
    assert job["status"] == "done" and job["mode"] == "txt2img"
    # the finished job is in the gallery; the seed button takes its seed
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, f'#gallery [data-job-id="{job["id"]}"][data-status="done"] img'))
    page.find_element(By.ID, "seed-random").click()
    assert value(page, "seed") == "-1"
    page.find_element(By.ID, "seed-reuse").click()
    assert value(page, "seed") == "7"
    assert severe_console_errors(page) == []


def test_reuse_seed_takes_only_this_tabs_jobs(page, base_url):
    """A job another client queued and finished shows in the gallery, but the seed button never takes its seed."""
    other = http_json(base_url, "/api/jobs", {"prompt": "another tab's picture", "steps": 2, "seed": 4242})
    assert wait_job(base_url, other["id"])["status"] == "done"
    open_page(page, base_url)
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, f'#gallery [data-job-id="{other["id"]}"][data-status="done"]'))
    page.find_element(By.ID, "seed-random").click()
    page.find_element(By.ID, "seed-reuse").click()
    assert value(page, "seed") == "-1"
    assert text(page, "notice") == "No finished job yet to take a seed from"


def test_a_job_that_ended_while_the_page_was_away_comes_back_to_the_viewer(page, base_url):
    """The tab leaves the page while its jobs draw (a reload, another address) and comes back once they have ended:
    the viewer shows the newest one's picture, infotext and Done, as for a job seen to the end, and the seed button
    takes its seed. Before: 'Idle' and an empty viewer (the pictures in the gallery only), and the oldest one's
    seed."""
    for prompt, seed, steps in (("drawn first while the page was away", 11, 30), ("drawn last", 22, 2)):
        set_value(page, "prompt", prompt)
        set_value(page, "seed", seed)
        set_value(page, "steps", steps)
        page.find_element(By.ID, "generate").click()
        wait(page, lambda d: prompt in text(d, "queue"), 30, "the job was not queued")
    page.get("about:blank")
    for prompt in ("drawn first while the page was away", "drawn last"):
        job = wait_job(base_url, job_by_prompt(base_url, prompt)["id"])
    open_page(page, base_url)
    assert loaded_results(page, 1) == [base_url + job["images"][0]]
    assert text(page, "progress-text").startswith("Done")
    assert text(page, "infotext").startswith("drawn last")
    assert page.execute_script("return sessionStorage.getItem('sdlab-submitted')") == "[]"    # seen: forgotten
    page.find_element(By.ID, "seed-random").click()
    page.find_element(By.ID, "seed-reuse").click()
    assert value(page, "seed") == "22"


def test_the_keyboard_opens_a_gallery_picture_in_the_viewer(page, base_url):
    """A gallery card's picture is a button: Enter on it (Tab reaches it) shows that job in the viewer, as a click
    does. Before: a bare image with a click handler, out of the keyboard's reach."""
    older = http_json(base_url, "/api/jobs", {"prompt": "an older picture", "steps": 2, "seed": 5})
    assert wait_job(base_url, older["id"])["status"] == "done"
    set_value(page, "prompt", "the newest picture")
    set_value(page, "steps", 2)
    generate_and_finish(page, base_url, "the newest picture")
    wait(page, lambda d: text(d, "infotext").startswith("the newest picture"), 20, "the newest job is not shown")

    def pressed(d) -> bool:
        found = d.find_elements(By.CSS_SELECTOR, f'#gallery [data-job-id="{older["id"]}"] button.thumb')
        if found:
            found[0].send_keys(Keys.ENTER)
        return bool(found)

    wait(page, pressed, 20, "no picture button on the older job's card")
    wait(page, lambda d: text(d, "infotext").startswith("an older picture"), 20, "Enter did not show the job")
    assert result_srcs(page) == [base_url + http_json(base_url, f"/api/jobs/{older['id']}")["images"][0]]


def serve_on(port: int, output_dir: Path):
    """`sdlab serve` on this port (a restart keeps the address the page was loaded from), once it answers."""
    import subprocess

    from server_fixtures import ServerProcess, server_env

    output_dir.mkdir(parents=True, exist_ok=True)
    log = output_dir.parent / f"serve-{port}-{time.monotonic_ns()}.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen([sys.executable, "-m", "sdlab", "serve", "--port", str(port), "--output-dir",
                                    str(output_dir)], stdout=sink, stderr=subprocess.STDOUT, env=server_env())
    server = ServerProcess(f"http://127.0.0.1:{port}", output_dir, process, log)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and process.poll() is None:
        try:
            http_json(server.url, "/api/jobs")
            return server
        except OSError:
            time.sleep(0.2)
    server.stop()
    raise AssertionError(f"sdlab serve did not answer on port {port}:\n{server.output()}")


def test_a_job_the_server_stopped_shows_its_end_once_the_server_is_back(browser, tmp_path):
    """The server stops while the page's job draws (it ends the job as it goes: interrupted) and starts again: the
    page shows the job interrupted, its Interrupt button off and no "cannot reach the server" left. Before: 'Step
    i / n' and a live Interrupt for good, the job forgotten when its end could not be read; then the error stayed."""
    from server_fixtures import free_port

    port = free_port()
    server = serve_on(port, tmp_path / "outputs")
    try:
        open_page(browser, server.url)
        set_value(browser, "prompt", "cut off by a restart")
        set_value(browser, "steps", 150)
        browser.find_element(By.ID, "generate").click()
        wait(browser, lambda d: text(d, "progress-text").startswith("Step"), 60, "the job did not start")
        server.stop()
        server = serve_on(port, tmp_path / "outputs")
        wait(browser, lambda d: text(d, "progress-text") == "Interrupted", 30, "the job's end is not shown")
        assert not browser.find_element(By.ID, "interrupt").is_enabled()
        # the server answers again: the page's "cannot reach the server" is over
        wait(browser, lambda d: not d.find_element(By.ID, "error").is_displayed(), 30, "the error stays")
    finally:
        server.stop()


def test_cancel_a_second_job(page, base_url):
    first, second = "a green circle on a white background", "a yellow heart at the bottom (to be cancelled)"
    set_value(page, "steps", 6)
    page.find_element(By.ID, "prompt").send_keys(first)
    page.find_element(By.ID, "generate").click()
    wait(page, lambda d: any(j["request"].get("prompt") == first for j in http_json(base_url, "/api/jobs")["jobs"]),
         20, "first job not queued")
    set_value(page, "prompt", second)
    set_value(page, "steps", 150)
    page.find_element(By.ID, "generate").click()

    second_id = wait(page, lambda d: [j for j in http_json(base_url, "/api/jobs")["jobs"]
                                      if j["request"].get("prompt") == second], 20)[0]["id"]
    queued = f'#queue li[data-job-id="{second_id}"]'
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, queued), 20, "second job not in the queue view")
    # cancel it while it runs, once its first preview is on screen
    wait(page, lambda d: http_json(base_url, f"/api/jobs/{second_id}")["step"] >= 1, message="second job never ran")
    wait(page, lambda d: re.match(r"Step \d+ / 150 · \d+ s left$", text(d, "progress-text")), 30,
         "no step count with the time left")
    page.find_element(By.ID, "cancel").click()

    wait(page, lambda d: text(d, "progress-text") == "Cancelled", 30, "cancel not shown")
    job = wait_job(base_url, second_id)
    assert job["status"] == "cancelled" and job["images"] == []
    assert job["step"] < 150
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, f'#gallery [data-job-id="{second_id}"][data-status="cancelled"]'))
    assert not page.find_elements(By.CSS_SELECTOR, queued)
    assert job_by_prompt(base_url, first)["status"] == "done"
    # one event stream at a time (the running job's): a browser has six connections per server
    assert page.execute_script("return window.__streams.max") == 1


def test_two_tabs_each_show_and_cancel_their_own_jobs(page, base_url):
    """Tab B's finished picture stays while tab A's job runs, B's Cancel stays off (and cancels nothing of
    A's), and A's Cancel stops A's job: another tab's job shows in the queue list only."""
    tab_b, tab_a = page, start_browser()
    try:
        open_page(tab_a, base_url)
        set_value(tab_b, "prompt", "tab B picture")
        set_value(tab_b, "steps", 3)
        tab_b.find_element(By.ID, "generate").click()
        wait(tab_b, lambda d: text(d, "infotext").startswith("tab B picture"), message="B's picture not shown")
        b_results = result_srcs(tab_b)
        assert b_results and text(tab_b, "progress-text").startswith("Done")

        set_value(tab_a, "prompt", "tab A picture")
        set_value(tab_a, "steps", 150)
        tab_a.find_element(By.ID, "generate").click()
        a_id = wait(tab_a, lambda d: [j["id"] for j in http_json(base_url, "/api/jobs")["jobs"]
                                      if j["request"].get("prompt") == "tab A picture"], 20)[0]
        wait(tab_a, lambda d: http_json(base_url, f"/api/jobs/{a_id}")["step"] >= 2, message="A's job never ran")
        wait(tab_a, lambda d: text(d, "progress-text").startswith("Step"), 30, "A does not show its progress")
        # B polls the job list every 10 s while it follows no job of its own: ask it now (what the poll does)
        wait(tab_b, lambda d: d.execute_script("refreshJobs()") or d.find_elements(
            By.CSS_SELECTOR, f'#queue li[data-job-id="{a_id}"]'), 20, "B's queue list does not show A's job")
        assert result_srcs(tab_b) == b_results
        assert text(tab_b, "infotext").startswith("tab B picture") and text(tab_b, "progress-text").startswith("Done")
        assert not tab_b.find_element(By.ID, "cancel").is_enabled()
        tab_b.execute_script("cancelShown()")                      # what B's Cancel button does
        time.sleep(1)
        assert http_json(base_url, f"/api/jobs/{a_id}")["status"] == "running"

        assert tab_a.find_element(By.ID, "cancel").is_enabled()
        tab_a.find_element(By.ID, "cancel").click()
        wait(tab_a, lambda d: text(d, "progress-text") == "Cancelled", 30, "A's cancel not shown")
        assert wait_job(base_url, a_id)["status"] == "cancelled"
        assert result_srcs(tab_b) == b_results
        assert text(tab_b, "infotext").startswith("tab B picture")
    finally:
        tab_a.quit()


def test_reuse_settings_from_the_gallery(page, base_url):
    settings = {"mode": "txt2img", "prompt": "a large purple square in the top left", "negative_prompt": "blurry",
                "steps": 5, "sampler": "Euler", "schedule": "normal", "cfg_scale": 4.5, "seed": 1234,
                "width": 64, "height": 48, "batch_size": 2}
    job = wait_job(base_url, http_json(base_url, "/api/jobs", settings)["id"])
    assert job["status"] == "done", job
    open_page(page, base_url)
    card = f'#gallery [data-job-id="{job["id"]}"]'
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, f"{card} img"), 20, "the job is not in the gallery")
    assert len(page.find_elements(By.CSS_SELECTOR, f"{card} img")) == 2
    click_card_button(page, card, "reuse")

    assert value(page, "prompt") == settings["prompt"]
    assert value(page, "negative_prompt") == "blurry"
    assert value(page, "steps") == "5"
    assert float(value(page, "cfg_scale")) == 4.5
    assert value(page, "seed") == "1234"
    assert (value(page, "width"), value(page, "height"), value(page, "batch_size")) == ("64", "48", "2")
    assert value(page, "sampler") == "Euler"
    assert value(page, "schedule") == "normal"
    assert text(page, "notice") == ""

    # its picture as the start of an img2img job
    click_card_button(page, card, "to-img2img")
    wait(page, lambda d: d.find_element(By.ID, "init-canvas").is_displayed(), 20, "no initial image")
    assert page.find_element(By.ID, "tab-img2img").get_attribute("aria-selected") == "true"
    assert not page.find_element(By.ID, "mask-tools").is_displayed()
    canvas = page.find_element(By.ID, "init-canvas")
    assert (canvas.get_attribute("width"), canvas.get_attribute("height")) == ("64", "48")
    page.execute_script("const s = document.getElementById('strength'); s.value = 0.5;"
                        "s.dispatchEvent(new Event('input'));")
    assert text(page, "strength-value") == "0.50"
    set_value(page, "prompt", "a large purple square, as a watercolour")
    set_value(page, "batch_size", 1)
    page.find_element(By.ID, "generate").click()
    wait(page, lambda d: text(d, "progress-text").startswith("Done"), message="img2img did not finish")
    job = job_by_prompt(base_url, "a large purple square, as a watercolour")
    assert job["status"] == "done" and job["mode"] == "img2img" and job["request"]["strength"] == 0.5
    assert Image.open(io.BytesIO(http_bytes(base_url, job["images"][0]))).size == (64, 48)


def test_the_card_img2img_sends_the_picture_opened_from_its_thumbnails(page, base_url):
    """A batch's card: its img2img sends the picture last opened from the card's thumbnails (A1111's Send to
    img2img takes the gallery's selected picture), outlined in the viewer; unopened, the first (before, always the
    first)."""
    job = wait_job(base_url, http_json(base_url, "/api/jobs", {"prompt": "two pictures to choose from", "steps": 2,
                                                              "seed": 8, "batch_size": 2})["id"])
    assert job["status"] == "done" and len(job["images"]) == 2, job
    pictures = [base64.b64encode(http_bytes(base_url, url)).decode() for url in job["images"]]
    assert pictures[0] != pictures[1]
    sent = "return state.initImage && state.initImage.split(',')[1]"
    card = f'#gallery [data-job-id="{job["id"]}"]'
    for opened in (None, 1, 0):
        open_page(page, base_url)
        wait(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, f"{card} button.thumb")) == 2, 20, "no thumbnails")
        if opened is not None:
            page.find_elements(By.CSS_SELECTOR, f"{card} button.thumb")[opened].click()
            chosen = page.find_elements(By.CSS_SELECTOR, "#results img.chosen")
            assert [img.get_attribute("src").endswith(job["images"][opened]) for img in chosen] == [True]
        click_card_button(page, card, "to-img2img")
        wait(page, lambda d: d.execute_script(sent) is not None, 20, "no initial image")
        assert page.execute_script(sent) == pictures[opened or 0], opened

    # each card keeps its own: another job's thumbnail opened after it leaves this card's choice as it was
    other = wait_job(base_url, http_json(base_url, "/api/jobs", {"prompt": "another job", "steps": 1, "seed": 9})["id"])
    open_page(page, base_url)
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, f'#gallery [data-job-id="{other["id"]}"] button.thumb'), 20,
         "no thumbnail of the other job")
    page.find_elements(By.CSS_SELECTOR, f"{card} button.thumb")[1].click()
    page.find_element(By.CSS_SELECTOR, f'#gallery [data-job-id="{other["id"]}"] button.thumb').click()
    click_card_button(page, card, "to-img2img")
    wait(page, lambda d: d.execute_script(sent) is not None, 20, "no initial image")
    assert page.execute_script(sent) == pictures[1]


def test_dropped_png_fills_the_form_from_its_parameters(page, base_url, tmp_path):
    parameters = ("a tiny cat face in the bottom right\nNegative prompt: lowres, (text:1.2)\n"
                  "Steps: 17, Sampler: Euler a, Schedule type: Karras, CFG scale: 6.5, Seed: 424242, "
                  "Size: 64x32, Model: sdlab-tiny, Tiling: True, Version: v1.10.0")
    drop_file(page, png_with_parameters(parameters), "from-a1111.png")
    wait(page, lambda d: value(d, "seed") == "424242", 20, "the dropped PNG did not fill the form")
    assert page.find_element(By.ID, "tiling").is_selected()
    assert page.execute_script("return collectRequest().tiling") is True
    assert "Tiling" not in text(page, "notice")                         # it found its control
    assert value(page, "prompt") == "a tiny cat face in the bottom right"
    assert value(page, "negative_prompt") == "lowres, (text:1.2)"
    assert value(page, "steps") == "17"
    assert value(page, "sampler") == "Euler a"
    assert value(page, "schedule") == "karras"
    assert float(value(page, "cfg_scale")) == 6.5
    assert (value(page, "width"), value(page, "height")) == ("64", "32")
    assert page.find_element(By.ID, "error").is_displayed() is False

    # the same through the file input, with an older A1111 sampler name carrying the schedule
    path = tmp_path / "old.png"
    path.write_bytes(png_with_parameters("a blue moon\nSteps: 9, Sampler: DPM++ 2M Karras, CFG scale: 7, "
                                         "Seed: 5, Size: 64x64"))
    page.find_element(By.ID, "png-info-file").send_keys(str(path))
    wait(page, lambda d: value(d, "seed") == "5", 20)
    assert (value(page, "prompt"), value(page, "sampler"), value(page, "schedule")) == ("a blue moon", "DPM++ 2M", "karras")
    assert not page.find_element(By.ID, "tiling").is_selected()       # drawn without Tiling
    assert value(page, "negative_prompt") == ""

    # a PNG without parameters: a clear message, the form unchanged
    drop_file(page, png_with_parameters(None), "plain.png")
    wait(page, lambda d: d.find_element(By.ID, "error").is_displayed(), 20)
    assert "no generation parameters" in text(page, "error")
    assert value(page, "seed") == "5"


def test_hires_pass_settings_fill_from_a_png_and_are_sent(page, base_url):
    """A1111's Hires sampler / schedule type / prompt / negative prompt have their controls in the Hires. fix box:
    a dropped PNG fills them, and the request sends them (blank: the first pass's, left out)."""
    for control in ("hr_sampler", "hr_schedule", "hr_prompt", "hr_negative_prompt"):
        assert page.find_elements(By.CSS_SELECTOR, f'label[for="{control}"]'), f"#{control} has no <label for>"
    parameters = ("a castle\nSteps: 5, Sampler: Euler, Schedule type: Automatic, CFG scale: 7, Seed: 77, Size: 64x64, "
                  "Denoising strength: 0.5, Hires sampler: DPM++ 2M, Hires prompt: \"a castle, snow\", "
                  "Hires negative prompt: blurry, Hires schedule type: Exponential, Hires upscale: 1.5, "
                  "Hires upscaler: Latent, Version: v1.10.1")
    drop_file(page, png_with_parameters(parameters), "hires.png")
    wait(page, lambda d: value(d, "seed") == "77", 20, "the dropped PNG did not fill the form")
    assert (value(page, "hr_sampler"), value(page, "hr_schedule")) == ("DPM++ 2M", "exponential")
    assert (value(page, "hr_prompt"), value(page, "hr_negative_prompt")) == ("a castle, snow", "blurry")
    sent = page.execute_script("return collectRequest()")
    assert {k: sent.get(k) for k in ("hr_sampler", "hr_schedule", "hr_prompt", "hr_negative_prompt")} == {
        "hr_sampler": "DPM++ 2M", "hr_schedule": "exponential", "hr_prompt": "a castle, snow",
        "hr_negative_prompt": "blurry"}
    assert "Hires" not in text(page, "notice")                           # each found its control


def test_a_picture_that_loads_ends_the_error_of_one_that_did_not(page, base_url, tmp_path):
    """img2img's Initial image: a file the browser cannot read is the page's error; the next picture, chosen or
    sent by a gallery card's img2img button, loads and the error goes. Before: the error stayed beside the
    loaded picture."""
    page.find_element(By.ID, "prompt").send_keys("a card to send")
    set_value(page, "steps", 2)
    job = generate_and_finish(page, base_url, "a card to send")            # a 64 x 64 picture
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    (tmp_path / "good.png").write_bytes(png_with_parameters(None, size=(48, 40)))
    page.find_element(By.ID, "tab-img2img").click()
    page.find_element(By.ID, "init-image").send_keys(str(tmp_path / "broken.png"))
    wait(page, lambda d: text(d, "error") == "the file is not an image the browser can read", 20, "no error")
    page.find_element(By.ID, "init-image").send_keys(str(tmp_path / "good.png"))
    wait(page, lambda d: d.find_element(By.ID, "init-canvas").get_attribute("width") == "48", 20, "not loaded")
    assert not page.find_element(By.ID, "error").is_displayed()

    drop_file(page, b"not a picture", "broken.png", "init-drop")
    wait(page, lambda d: d.find_element(By.ID, "error").is_displayed(), 20, "no error for the dropped file")
    click_card_button(page, f'#gallery [data-job-id="{job["id"]}"]', "to-img2img")
    wait(page, lambda d: d.find_element(By.ID, "init-canvas").get_attribute("width") == "64", 20, "not sent")
    assert not page.find_element(By.ID, "error").is_displayed()


# The form's controls whose right edge lies past the form's (a control the window cuts off or scrolls to)
CONTROLS_PAST_THE_FORM = """
const form = document.getElementById("settings").getBoundingClientRect();
return [...document.querySelectorAll("#settings *")]
  .filter((e) => { const r = e.getBoundingClientRect(); return r.width > 0 && r.right > form.right + 0.5; })
  .map((e) => `${e.tagName.toLowerCase()}#${e.id}.${e.className}`);
"""


def test_a_phones_window_fits_every_control_of_the_form(page, base_url, tmp_path):
    """A phone's width (390 px): with X/Y/Z plot, the inpaint tab's picture and mask tools, and every box open,
    each control lies inside the form and the page does not scroll sideways, a face embedding of a long file name
    chosen too. Before: the X/Y/Z values boxes (a text box's default width) and the mask tools' Load mask ran 11
    and 2 px past it, and the face embedding's name (one word of 154 letters) far past it."""
    (tmp_path / "picture.png").write_bytes(png_with_parameters(None, size=(640, 480)))
    try:
        page.set_window_size(390, 844)
        choose(page, "script", text="X/Y/Z plot")
        choose(page, "xyz_x_type", text="Sampler")                   # its value list and Fill button shown too
        for box in ("seed-extra", "enable_hr", "ipa_enabled", "cn0_summary"):
            page.find_element(By.ID, box).click()
        page.find_element(By.ID, "tab-inpaint").click()
        page.find_element(By.ID, "init-image").send_keys(str(tmp_path / "picture.png"))
        wait(page, lambda d: d.find_element(By.ID, "mask-tools").is_displayed(), 20, "the picture did not load")
        import numpy as np

        face = tmp_path / f"{'insightface_normed_embedding_of_a_long_named_face_' * 3}.npy"  # one word: no spaces
        np.save(face, np.zeros((1, 512), np.float32))
        page.find_element(By.ID, "ipa_face_file").send_keys(str(face))
        wait(page, lambda d: face.name in text(d, "ipa_face_name"), 10, "the chosen face embedding is not named")
        assert page.execute_script(CONTROLS_PAST_THE_FORM) == []
        assert page.execute_script("return document.documentElement.scrollWidth <= innerWidth")
    finally:
        page.find_element(By.ID, "ipa_face_clear").click()
        page.set_window_size(*WINDOW)


def test_the_top_bars_labels_stay_beside_their_lists_in_a_narrow_window(page):
    """The top bar wraps in a narrow window: before, the VAE label ended the Model list's line (beside the Model
    list, at 390 and at 700 px) and its list began the next; each label and its list now wrap together."""
    try:
        for width in (390, 700, 1280):
            page.set_window_size(width, 844)
            apart = page.execute_script("""
                const lists = [...document.querySelectorAll('.topbar label[for]')]
                  .filter((label) => label.control.tagName === 'SELECT');
                return lists.filter((label) => {
                  const l = label.getBoundingClientRect(), c = label.control.getBoundingClientRect();
                  const middle = (l.top + l.bottom) / 2;
                  return middle < c.top || middle > c.bottom || l.right > c.left;
                }).map((label) => label.textContent);""")
            assert apart == [], width
    finally:
        page.set_window_size(*WINDOW)


def test_inpaint_mask_painted_on_the_image_is_accepted(page, base_url, tmp_path):
    init = Image.new("RGB", (64, 64), (30, 60, 160))
    ImageDraw.Draw(init).rectangle([20, 20, 43, 43], fill=(240, 220, 40))
    path = tmp_path / "init.png"
    init.save(path)

    page.find_element(By.ID, "tab-inpaint").click()
    assert page.find_element(By.ID, "tab-inpaint").get_attribute("aria-selected") == "true"
    page.find_element(By.ID, "init-image").send_keys(str(path))
    wait(page, lambda d: d.find_element(By.ID, "mask-canvas").is_displayed(), 20)
    canvas = page.find_element(By.ID, "mask-canvas")
    assert (canvas.get_attribute("width"), canvas.get_attribute("height")) == ("64", "64")

    # no mask yet: the page says so instead of sending a job
    page.find_element(By.ID, "prompt").send_keys("a red flower")
    set_value(page, "steps", 6)
    page.find_element(By.ID, "generate").click()
    assert "mask" in text(page, "error")

    page.execute_script(  # a range input: set it as the end of a drag does
        "const b = document.getElementById('brush-size'); b.value = 30;"
                        "b.dispatchEvent(new Event('input'));")
    paint_stroke(page, -100, 100)
    mask = painted_mask(page)
    assert mask.size == (64, 64)
    assert mask.getpixel((32, 32)) == 255 and mask.getpixel((32, 2)) == 0 and mask.getpixel((32, 61)) == 0
    page.find_element(By.ID, "mask-clear").click()
    assert painted_mask(page).getextrema() == (0, 0)

    paint_stroke(page, -60, 60)
    mask = painted_mask(page)
    page.find_element(By.ID, "generate").click()
    result = loaded_results(page)[0]
    job = job_by_prompt(base_url, "a red flower")
    assert job["status"] == "done" and job["mode"] == "inpaint", job
    image = Image.open(io.BytesIO(http_bytes(base_url, result.replace(base_url, "")))).convert("RGB")
    assert image.size == (64, 64)
    # the picture is kept where the mask is black (A1111's paste-back) and repainted where it is white
    import numpy as np
    out, original, repaint = (np.asarray(x, dtype=np.float32) for x in (image, init, mask))
    keep = repaint == 0
    assert np.abs(out - original)[keep].mean() < 8, "the unmasked area changed"
    assert np.abs(out - original)[repaint == 255].mean() > np.abs(out - original)[keep].mean()

    # a picture dropped on the image area replaces the image (its parameters are not read) and the mask
    seed = value(page, "seed")
    drop_file(page, png_with_parameters("a dog\nSteps: 3, Seed: 99, Size: 48x48", size=(48, 40)), "new.png", "init-drop")
    wait(page, lambda d: d.find_element(By.ID, "init-canvas").get_attribute("width") == "48", 20)
    assert page.find_element(By.ID, "init-canvas").get_attribute("height") == "40"
    assert painted_mask(page).getextrema() == (0, 0)
    assert value(page, "seed") == seed and value(page, "prompt") == "a red flower"


def test_bad_input_shows_the_servers_detail(page, base_url):
    page.find_element(By.ID, "prompt").send_keys("a star")
    set_value(page, "steps", 100000)
    page.find_element(By.ID, "generate").click()
    wait(page, lambda d: d.find_element(By.ID, "error").is_displayed(), 20, "no error shown")
    message = text(page, "error")
    assert message.startswith("4") and "steps" in message.lower(), message

    # a `<lora:NAME:W>` tag stays in the prompt, as typed; the server names what is wrong
    page.find_element(By.ID, "prompt").send_keys(" <lora:no-such-lora:0.5>")
    set_value(page, "steps", 4)
    page.find_element(By.ID, "generate").click()
    wait(page, lambda d: "no-such-lora" in text(d, "error"), 20, "unknown LoRA not reported")
    assert text(page, "error").startswith("4")
    assert page.find_elements(By.CSS_SELECTOR, "#lora-list li") == []
    assert value(page, "prompt") == "a star <lora:no-such-lora:0.5>"


def write_lora(path: Path) -> Path:
    """A kohya-format LoRA over the shipped model's U-Net with random weights (it visibly changes pictures)."""
    import sdlab
    import torch
    from sdlab.train.lora import LoRANetwork, save_lora_networks

    bundle = sdlab.load().bundle
    network = LoRANetwork.for_unet(bundle.unet, 4, 4.0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return save_lora_networks(path, [network], bundle.family, bundle.prediction)


@pytest.fixture(scope="module")
def folder_server(tmp_path_factory):
    """A server with --models-dir (a second checkpoint and a LoRA) behind HTTP Basic authentication."""
    from sdlab.api import shipped_model_path
    from server_fixtures import start_server

    root = tmp_path_factory.mktemp("webui-models")
    models = root / "models"
    (models / "Lora").mkdir(parents=True)
    shutil.copyfile(shipped_model_path(), models / "tiny-copy.safetensors")
    write_lora(models / "Lora" / "wobble.safetensors")
    server = start_server(root / "outputs", "--models-dir", str(models), "--auth", "ada:lovelace",
                          auth=("ada", "lovelace"))
    yield server
    server.stop()


def test_model_and_lora_pickers_behind_basic_auth(browser, folder_server):
    base, auth = folder_server.url, basic_auth("ada", "lovelace")
    with pytest.raises(urllib.error.HTTPError) as refused:
        http_bytes(base, "/")
    assert refused.value.code == 401
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": auth})   # as after the login prompt
    try:
        open_page(browser, base)
        browser.get_log("browser")
        models = {m["model_name"]: m["title"] for m in http_json(base, "/sdapi/v1/sd-models", headers=auth)}
        assert len(models) == 2
        assert set(option_values(browser, "model")) == set(models.values())
        choose(browser, "model", value=models["tiny-copy"])
        # a LoRA added to the folder shows up after Refresh
        lora_dir = folder_server.output_dir.parent / "models" / "Lora"
        shutil.copyfile(lora_dir / "wobble.safetensors", lora_dir / "wobble-2.safetensors")
        assert "wobble-2" not in option_values(browser, "lora")
        browser.find_element(By.ID, "model-refresh").click()
        wait(browser, lambda d: "wobble-2" in option_values(d, "lora"),
             20, "the new LoRA is not listed after Refresh")
        assert value(browser, "model") == models["tiny-copy"]
        choose(browser, "lora", value="wobble")
        set_value(browser, "lora-weight", 0.8)
        browser.find_element(By.ID, "lora-add").click()
        assert [e.get_attribute("data-name") for e in browser.find_elements(By.CSS_SELECTOR, "#lora-list li")] == ["wobble"]
        browser.find_element(By.ID, "prompt").send_keys("a blue square")
        set_value(browser, "steps", 12)
        set_value(browser, "seed", 3)
        browser.find_element(By.ID, "generate").click()
        loaded_results(browser)
        assert int(browser.find_element(By.ID, "preview").get_attribute("data-count") or 0) >= 1

        job = job_by_prompt(base, "a blue square", headers=auth)
        hashed = {m["model_name"]: m["title"] for m in http_json(base, "/sdapi/v1/sd-models", headers=auth)}
        assert job["model"] == hashed["tiny-copy"] == f'{models["tiny-copy"]} [{job["model"][-11:-1]}]'  # hashed when used
        assert job["request"]["loras"] == [{"name": "wobble", "weight": 0.8}]
        with_lora = http_bytes(base, job["images"][0], headers=auth)
        assert "<lora:wobble:0.8>" in Image.open(io.BytesIO(with_lora)).info["parameters"]
        plain = wait_job(base, http_json(base, "/api/jobs", {"prompt": "a blue square", "steps": 12, "seed": 3,
                                                             "model": models["tiny-copy"]}, headers=auth)["id"],
                         headers=auth)
        without = Image.open(io.BytesIO(http_bytes(base, plain["images"][0], headers=auth)))
        assert Image.open(io.BytesIO(with_lora)).tobytes() != without.tobytes(), "the LoRA changed nothing"
        assert severe_console_errors(browser) == []
    finally:
        browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {}})


@pytest.fixture(scope="module")
def refiner_server(tmp_path_factory):
    """A server on a tiny random SDXL model with a tiny refiner beside it in --models-dir."""
    from bundle_fixtures import tiny_bundle, write_original
    from server_fixtures import start_server

    models = tmp_path_factory.mktemp("webui-refiner") / "models"
    models.mkdir()
    write_original(tiny_bundle("sdxl"), models / "base.safetensors", junk=False)
    write_original(tiny_bundle("sdxl-refiner", seed=5), models / "refiner.safetensors", junk=False)
    server = start_server(models.parent / "outputs", "--models-dir", str(models), "--model", str(models / "base.safetensors"))
    yield server
    server.stop()


def test_refiner_picker_draws_with_the_refiner_and_reuse_fills_it(browser, refiner_server):
    base = refiner_server.url
    open_page(browser, base)
    browser.get_log("browser")
    titles = {m["model_name"]: m["title"] for m in http_json(base, "/sdapi/v1/sd-models")}
    assert set(option_values(browser, "refiner")) == set(titles.values())
    assert not browser.find_element(By.ID, "refiner").is_displayed()          # until "Refiner" is ticked
    browser.find_element(By.ID, "enable_refiner").click()
    choose(browser, "refiner", value=titles["refiner"])
    set_value(browser, "refiner_switch", 0.5)
    browser.find_element(By.ID, "prompt").send_keys("a refined castle")
    for field, number in (("steps", 4), ("seed", 3), ("width", 32), ("height", 32)):
        set_value(browser, field, number)
    browser.find_element(By.ID, "generate").click()
    loaded_results(browser)
    job = job_by_prompt(base, "a refined castle")
    hashed = {m["model_name"]: m["title"] for m in http_json(base, "/sdapi/v1/sd-models")}   # hashed when used
    assert (job["request"]["refiner"], job["request"]["refiner_switch"]) == (hashed["refiner"], 0.5)
    assert hashed["refiner"].startswith(f'{titles["refiner"]} [')
    assert "Refiner: refiner [" in Image.open(io.BytesIO(http_bytes(base, job["images"][0]))).info["parameters"]

    browser.find_element(By.ID, "enable_refiner").click()                   # off: nothing sent
    assert "refiner" not in browser.execute_script("return collectRequest()")
    assert browser.execute_script("return fillForm(arguments[0])", job["request"]) == []
    assert browser.find_element(By.ID, "enable_refiner").is_selected()
    assert (value(browser, "refiner"), value(browser, "refiner_switch")) == (titles["refiner"], "0.5")
    assert severe_console_errors(browser) == []


def _dropped(browser, base: str, settings_line: str) -> dict:
    """The request the form sends once filled from a PNG of "a castle" with `settings_line` (`POST /api/parameters`)."""
    png = png_with_parameters(f"a castle\nSteps: 4, {settings_line}")
    read = http_json(base, "/api/parameters", {"image": base64.b64encode(png).decode()})
    return browser.execute_script("fillForm(arguments[0]); return collectRequest()", read["settings"])


def test_reuse_keeps_the_refiners_handoff_rule(browser, refiner_server):
    """A job of A1111's API hands over by A1111's rule: reusing it sends that rule again, a native job's
    diffusers' rule; a dropped PNG's refiner takes the rule its parameters imply."""
    base = refiner_server.url
    open_page(browser, base)
    browser.get_log("browser")
    title = next(m["title"] for m in http_json(base, "/sdapi/v1/sd-models") if m["model_name"] == "refiner")
    http_json(base, "/sdapi/v1/txt2img", {"prompt": "an a1111 castle", "steps": 4, "seed": 3, "width": 32,
                                          "height": 32, "refiner_checkpoint": "refiner", "refiner_switch_at": 0.6})
    job = job_by_prompt(base, "an a1111 castle")
    assert job["request"]["refiner_convention"] == "a1111"
    sent = "fillForm(arguments[0]); return collectRequest()"
    assert browser.execute_script(sent, job["request"])["refiner_convention"] == "a1111"
    native = {**job["request"], "refiner_convention": "diffusers"}
    assert browser.execute_script(sent, native)["refiner_convention"] == "diffusers"
    dropped = _dropped(browser, base, "Refiner: refiner [0123abcd], Refiner switch at: 0.6, Version: v1.10.1")
    assert (dropped["refiner"], dropped["refiner_switch"], dropped["refiner_convention"]) == (title, 0.6, "a1111")
    by_steps = _dropped(browser, base, "Refiner: refiner [0123abcd], Refiner switch at: 0.6, Version: v1.6.0")
    assert by_steps["refiner_convention"] == "a1111_steps"               # A1111 before 1.8 switched by steps
    assert severe_console_errors(browser) == []


def test_hires_fix_and_refiner_cannot_be_ticked_together(browser, refiner_server):
    """The server draws the hires fix without a refiner: while one box is ticked the other is disabled with a
    hint, and settings with both fill the hires fix and name the refiner as left out."""
    open_page(browser, refiner_server.url)
    browser.get_log("browser")
    hires, refiner = browser.find_element(By.ID, "enable_hr"), browser.find_element(By.ID, "enable_refiner")
    hires.click()
    assert not refiner.is_enabled() and browser.find_element(By.ID, "enable_refiner-hint").is_displayed()
    hires.click()
    assert refiner.is_enabled() and not browser.find_element(By.ID, "enable_refiner-hint").is_displayed()
    refiner.click()
    assert not hires.is_enabled() and browser.find_element(By.ID, "enable_hr-hint").is_displayed()
    refiner.click()
    request = {"prompt": "a castle", "hr_scale": 2, "refiner": "refiner", "refiner_switch": 0.5}
    assert browser.execute_script("return fillForm(arguments[0])", request) == [
        'refiner "refiner" (not with the hires fix)']
    assert hires.is_selected() and not refiner.is_selected() and not refiner.is_enabled()
    sent = browser.execute_script("return collectRequest()")
    assert sent["hr_scale"] == 2 and "refiner" not in sent
    assert severe_console_errors(browser) == []


# ---------------------------------------------------------------- screenshots


def take_screenshots(base: str, out_dir: Path) -> None:
    """docs/webui.png: a finished generation; docs/webui-inpaint.png: the inpaint tab with a painted mask."""
    driver = start_browser()
    driver.set_window_size(1360, 1240)
    try:
        for prompt, seed in (("a large green star in the centre on a white background", 3),
                             ("a small cat face in the top left on a dark blue background", 11)):
            job = http_json(base, "/api/jobs", {"mode": "txt2img", "prompt": prompt, "steps": 20, "seed": seed,
                                                "batch_size": 2})
            wait_job(base, job["id"])
        open_page(driver, base)
        driver.find_element(By.ID, "prompt").send_keys("a red heart in the centre on a light blue background")
        set_value(driver, "seed", 5)
        set_value(driver, "batch_size", 4)
        driver.find_element(By.ID, "prompt").send_keys(Keys.CONTROL, Keys.ENTER)
        loaded_results(driver, 4)
        time.sleep(1.0)
        driver.save_screenshot(str(out_dir / "webui.png"))

        click_card_button(driver, "#gallery .card", "to-img2img")
        wait(driver, lambda d: d.find_element(By.ID, "init-canvas").is_displayed(), 20)
        driver.find_element(By.ID, "tab-inpaint").click()
        driver.execute_script("const b = document.getElementById('brush-size'); b.value = 60;"
                              "b.dispatchEvent(new Event('input'));")
        for dy in (60, 80, 100, 120):           # over the heart in the lower right of the first picture
            paint_stroke(driver, 60, 170, dy=dy)
        driver.execute_script("window.scrollTo(0, 0)")
        time.sleep(0.5)
        driver.save_screenshot(str(out_dir / "webui-inpaint.png"))
    finally:
        driver.quit()


if __name__ == "__main__":
    if "--screenshots" not in sys.argv[1:]:
        sys.exit(f"usage: python {Path(__file__).name} --screenshots")
    import tempfile

    from server_fixtures import start_server

    with tempfile.TemporaryDirectory() as folder:
        server = start_server(Path(folder) / "outputs")
        try:
            take_screenshots(server.url, REPO / "docs")
        finally:
            server.stop()
    print("wrote docs/webui.png and docs/webui-inpaint.png")


def _run_until_step(page, base: str, prompt: str, steps: int, batch: int) -> str:
    """Queue `prompt` from the form; its id once it has drawn a step or two and Interrupt / Skip are enabled."""
    set_value(page, "prompt", prompt)
    set_value(page, "steps", steps)
    set_value(page, "batch_size", batch)
    page.find_element(By.ID, "generate").click()
    job_id = wait(page, lambda d: [j["id"] for j in http_json(base, "/api/jobs")["jobs"]
                                   if j["request"].get("prompt") == prompt], 20, "no job queued")[0]
    wait(page, lambda d: http_json(base, f"/api/jobs/{job_id}")["step"] >= 2
         and d.find_element(By.ID, "interrupt").is_enabled(), 30, "the job never ran")
    return job_id


def test_interrupt_keeps_the_pictures_drawn_so_far_and_skip_ends_the_batch(page, base_url):
    """A1111's Interrupt: the running job stops, its batch's pictures as far as they got kept, shown as
    "Interrupted" at the steps drawn; Skip ends the batch being drawn so and the job goes on (here: ends done)."""
    job_id = _run_until_step(page, base_url, "a pink square (interrupted)", 150, 2)
    page.find_element(By.ID, "interrupt").click()
    job = wait_job(base_url, job_id)
    assert job["status"] == "cancelled" and len(job["images"]) == 2 and 2 <= job["step"] < job["steps"] == 150, job
    wait(page, lambda d: text(d, "progress-text") == "Interrupted", 20, "the interrupt is not shown")
    assert page.execute_script("return [document.getElementById('progress').value, document.getElementById("
                               "'progress').max]") == [job["step"], 150]
    assert len(page.find_elements(By.CSS_SELECTOR, "#results img")) == 2
    badge = wait(page, lambda d: d.execute_script("return document.querySelector(arguments[0])?.textContent",
                                                  f'#gallery [data-job-id="{job_id}"] .badge'), 20)
    assert badge == "interrupted" and not page.find_element(By.ID, "interrupt").is_enabled()

    job_id = _run_until_step(page, base_url, "a pink square (skipped)", 150, 1)
    drawn = http_json(base_url, f"/api/jobs/{job_id}")["step"]
    page.find_element(By.ID, "skip").click()
    job = wait_job(base_url, job_id)
    assert job["status"] == "done" and len(job["images"]) == 1, job
    assert "Steps: 150" in job["infotexts"][0]
    assert drawn < 150
    wait(page, lambda d: text(d, "progress-text").startswith("Done"), 20, "the finished job is not shown as done")
    from sdlab.server.native import JobIn

    again = {k: v for k, v in job["request"].items() if v is not None and k in JobIn.model_fields}
    full = wait_job(base_url, http_json(base_url, "/api/jobs", again)["id"])
    pixels = [Image.open(io.BytesIO(http_bytes(base_url, j["images"][0]))).tobytes() for j in (job, full)]
    assert full["status"] == "done" and pixels[0] != pixels[1], "the skipped picture is the one drawn to the end"
