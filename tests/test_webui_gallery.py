"""The web UI's gallery in a real headless browser (the helpers and fixtures of test_webui.py): each card's Delete
(after a confirm) takes the job and its pictures from the server, its Download saves each picture with its
parameters under a name of its seed and prompt, and Load more shows the history past the newest 100 jobs."""

from __future__ import annotations

import io
import time
import urllib.error
import uuid

import pytest
from PIL import Image
from selenium.webdriver.support import expected_conditions
from test_webui import (  # noqa: F401  (fixtures: base_url, browser, page; the session's sdlab_server)
    By, base_url, browser, click_card_button, http_bytes, http_json, open_page, page, sdlab_server, text, wait,
    wait_job,
)

BODY = {"steps": 2, "width": 32, "height": 32}


def _finished(base: str, prompt: str, **fields) -> dict:
    job = http_json(base, "/api/jobs", {**BODY, "prompt": prompt, **fields})
    job = wait_job(base, job["id"])
    assert job["status"] == "done", job
    return job


def _card(job_id: str) -> str:
    return f'#gallery [data-job-id="{job_id}"]'


def _status(base: str, job_id: str) -> int:
    try:
        http_json(base, f"/api/jobs/{job_id}")
        return 200
    except urllib.error.HTTPError as err:
        return err.code


def test_delete_asks_first_then_takes_the_job_and_its_pictures(page, base_url):
    """Delete opens a confirm naming the pictures; Cancel keeps the job, OK deletes it on the server (its row and
    picture files: the job and its picture answer 404) and its card goes, the viewer emptied when it showed it."""
    job = _finished(base_url, "a card to delete", batch_size=2)
    open_page(page, base_url)
    click_card_button(page, _card(job["id"]) + " .thumbs", "thumb")
    wait(page, lambda d: text(d, "infotext").startswith("a card to delete"), 20, "the job is not shown")
    click_card_button(page, _card(job["id"]), "delete-job")
    alert = wait(page, expected_conditions.alert_is_present(), 20, "no confirm")
    assert alert.text == "Delete this job and its 2 pictures from the server? This cannot be undone."
    alert.dismiss()
    assert _status(base_url, job["id"]) == 200 and page.find_elements(By.CSS_SELECTOR, _card(job["id"]))
    click_card_button(page, _card(job["id"]), "delete-job")
    wait(page, expected_conditions.alert_is_present(), 20, "no confirm").accept()
    wait(page, lambda d: not d.find_elements(By.CSS_SELECTOR, _card(job["id"])), 20, "the card stays")
    assert _status(base_url, job["id"]) == 404
    with pytest.raises(urllib.error.HTTPError) as gone:
        http_bytes(base_url, job["images"][0])
    assert gone.value.code == 404
    assert text(page, "infotext") == "" and text(page, "progress-text") == "Idle"
    assert not page.find_elements(By.CSS_SELECTOR, "#results img") and not text(page, "error")


def test_a_delete_the_server_refuses_shows_why(page, base_url):
    """A job deleted meanwhile (another tab): the card's Delete shows the server's 404 in the error box."""
    job = _finished(base_url, "deleted by another tab")
    open_page(page, base_url)
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, _card(job["id"])), 20, "no card")
    http_json(base_url, f"/api/jobs/{job['id']}/delete", {}, method="POST")
    click_card_button(page, _card(job["id"]), "delete-job")
    wait(page, expected_conditions.alert_is_present(), 20, "no confirm").accept()
    wait(page, lambda d: text(d, "error") == f"Cannot delete the job: 404 Not Found: no job '{job['id']}'", 20,
         "no error shown")


def test_download_saves_each_picture_with_its_parameters(page, base_url, tmp_path):
    """Download saves the job's two pictures as the browser downloads a file: named '<seed>-<prompt>.png', each
    the server's PNG byte for byte, its parameters text the job's infotext."""
    job = _finished(base_url, "a lighthouse: at dusk", batch_size=2, seed=4321)
    page.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(tmp_path)})
    open_page(page, base_url)
    click_card_button(page, _card(job["id"]), "download")
    names = ["4321-a lighthouse at dusk.png", "4322-a lighthouse at dusk.png"]
    wait(page, lambda d: sorted(p.name for p in tmp_path.iterdir()) == names, 30,
         f"not downloaded: {list(tmp_path.iterdir())}")
    for name, url, infotext in zip(names, job["images"], job["infotexts"]):
        data = (tmp_path / name).read_bytes()
        assert data == http_bytes(base_url, url)
        assert Image.open(io.BytesIO(data)).text["parameters"] == infotext


@pytest.fixture(scope="module")
def long_history(tmp_path_factory):
    """A server whose history holds 130 finished jobs (rows written before it starts), the newest 'old job 129'."""
    from server_fixtures import start_server

    from sdlab.server.store import Store

    outputs = tmp_path_factory.mktemp("long-history") / "outputs"
    store = Store(outputs)
    now = time.time() - 1000
    for i in range(130):
        store.save_job({"id": uuid.uuid4().hex, "status": "done", "mode": "txt2img", "model": "tiny",
                        "request": {"prompt": f"old job {i}", "seed": i}, "images": [], "infotexts": [],
                        "error": None, "created": now + i, "started": now + i, "finished": now + i, "step": 2,
                        "steps": 2})
    store.close()
    server = start_server(outputs)
    yield server
    server.stop()


def test_load_more_shows_the_jobs_past_the_newest_hundred(browser, long_history):
    """The gallery shows the newest 100 jobs and a Load more button; Load more adds the other 30 (oldest last)
    and goes, as the history holds no more."""
    base = long_history.url
    open_page(browser, base)

    def captions(d) -> list[str]:
        return d.execute_script("return [...document.querySelectorAll('#gallery .card .caption')]"
                                ".map((c) => c.textContent)")

    wait(browser, lambda d: len(captions(d)) == 100, 30, "the newest 100 are not shown")
    assert captions(browser)[0] == "old job 129" and captions(browser)[-1] == "old job 30"
    browser.find_element(By.CSS_SELECTOR, "#gallery button.load-more").click()
    wait(browser, lambda d: len(captions(d)) == 130, 30, "Load more added nothing")
    assert captions(browser) == [f"old job {i}" for i in range(129, -1, -1)]
    assert not browser.find_elements(By.CSS_SELECTOR, "#gallery button.load-more")


@pytest.fixture
def history_of_250(tmp_path):
    """A server whose history holds 250 finished jobs 'old job 0' .. 'old job 249' (their ids in `ids`)."""
    from server_fixtures import start_server

    from sdlab.server.store import Store

    outputs = tmp_path / "outputs"
    store = Store(outputs)
    now = time.time() - 1000
    ids = [uuid.uuid4().hex for _ in range(250)]
    for i, job_id in enumerate(ids):
        store.save_job({"id": job_id, "status": "done", "mode": "txt2img", "model": "tiny",
                        "request": {"prompt": f"old job {i}", "seed": i}, "images": [], "infotexts": [],
                        "error": None, "created": now + i, "started": now + i, "finished": now + i, "step": 2,
                        "steps": 2})
    store.close()
    server = start_server(outputs)
    yield server, ids
    server.stop()


def test_jobs_deleted_elsewhere_after_load_more_leave_and_paging_goes_on(browser, history_of_250):
    """After Load more, another client deletes the newest job (the polled page's) and the oldest shown (Load
    more's): the next poll drops the newest's card (before: kept as an older job, a ghost), and Load more pages on
    past the deleted one (before: 'Cannot load older jobs: 404 ...' at every click)."""
    server, ids = history_of_250
    base = server.url
    open_page(browser, base)

    def captions(d) -> list[str]:
        return d.execute_script("return [...document.querySelectorAll('#gallery .card .caption')]"
                                ".map((c) => c.textContent)")

    wait(browser, lambda d: len(captions(d)) == 100, 30, "the newest 100 are not shown")
    browser.find_element(By.CSS_SELECTOR, "#gallery button.load-more").click()
    wait(browser, lambda d: len(captions(d)) == 200, 30, "Load more added nothing")
    for i in (249, 50):
        http_json(base, f"/api/jobs/{ids[i]}/delete", {}, method="POST")
    browser.execute_script("refreshJobs(true)")                 # the poll that comes every 10 s
    wait(browser, lambda d: captions(d)[0] == "old job 248", 30, "the poll did not run")
    assert "old job 249" not in captions(browser)
    browser.find_element(By.CSS_SELECTOR, "#gallery button.load-more").click()
    wait(browser, lambda d: len(captions(d)) == 248 or text(d, "error"), 30, "Load more added nothing")
    assert text(browser, "error") == ""
    assert captions(browser) == [f"old job {i}" for i in range(248, -1, -1) if i != 50]
    assert not browser.find_elements(By.CSS_SELECTOR, "#gallery button.load-more")


def test_a_job_deleted_elsewhere_leaves_load_mores_page_at_the_next_poll(browser, history_of_250):
    """After Load more, other clients delete jobs in the middle of the Load more page: one through the API, one
    with its card's Delete in a second tab. The first tab's next poll takes both cards away (before: ghosts until a
    reload), keeps every other card in order, and Load more then pages on from the oldest shown."""
    server, ids = history_of_250
    base = server.url

    def captions(d) -> list[str]:
        return d.execute_script("return [...document.querySelectorAll('#gallery .card .caption')]"
                                ".map((c) => c.textContent)")

    def load_more(d) -> None:
        shown = len(captions(d))
        d.find_element(By.CSS_SELECTOR, "#gallery button.load-more").click()
        wait(d, lambda d: len(captions(d)) > shown, 30, "Load more added nothing")

    open_page(browser, base)
    wait(browser, lambda d: len(captions(d)) == 100, 30, "the newest 100 are not shown")
    load_more(browser)
    first = browser.current_window_handle
    browser.switch_to.new_window("tab")
    try:
        open_page(browser, base)
        wait(browser, lambda d: len(captions(d)) == 100, 30, "the second tab shows not the newest 100")
        load_more(browser)
        click_card_button(browser, _card(ids[100]), "delete-job")
        wait(browser, expected_conditions.alert_is_present(), 20, "no confirm").accept()
        wait(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, _card(ids[100])), 20, "the card stays")
    finally:
        browser.close()
        browser.switch_to.window(first)
    http_json(base, f"/api/jobs/{ids[120]}/delete", {}, method="POST")
    assert browser.find_elements(By.CSS_SELECTOR, _card(ids[120]))       # shown until the next poll
    browser.execute_script("refreshJobs()")                     # the poll that comes every 10 s
    gone = [f"old job {i}" for i in (100, 120)]
    wait(browser, lambda d: not set(gone) & set(captions(d)), 30, "the deleted jobs stay in the gallery")
    assert captions(browser) == [f"old job {i}" for i in range(249, 49, -1) if i not in (100, 120)]
    load_more(browser)
    assert captions(browser) == [f"old job {i}" for i in range(249, -1, -1) if i not in (100, 120)]
    assert text(browser, "error") == ""
