"""The web UI's output panel beside the form, in a real headless browser (the helpers and fixtures of test_webui.py):
the form is far taller than a window, its Generate button at its foot; the progress and the pictures of the job it
queues must be in view there, not at the top of a page scrolled away from them."""

from __future__ import annotations

from test_webui import (  # noqa: F401  (fixtures: base_url, browser, page; the session's sdlab_server)
    By, base_url, browser, loaded_results, open_page, page, sdlab_server, set_value,
)

IN_VIEW = """
const box = document.getElementById(arguments[0]).getBoundingClientRect();
return box.height > 0 && box.top >= 0 && box.bottom <= window.innerHeight;
"""
FOCUSED = "return document.activeElement && document.activeElement.id"


def test_generate_at_the_forms_foot_shows_the_progress_and_pictures_in_view(page, base_url):
    """Before: at 1280x900 the form is about 2100 px tall; scrolled to Generate, the output panel (progress, pictures)
    was 1300 px above the window, the column beside the button empty."""
    assert page.execute_script("return document.documentElement.scrollHeight > 1.5 * window.innerHeight")
    set_value(page, "prompt", "a yellow square (in view)")
    set_value(page, "steps", 2)
    page.execute_script("window.scrollTo(0, document.documentElement.scrollHeight)")     # the form's foot
    page.find_element(By.ID, "generate").click()
    loaded_results(page, 1)
    assert page.execute_script("return window.scrollY") > 1000        # the page is at the form's foot
    assert page.execute_script(IN_VIEW, "progress") and page.execute_script(IN_VIEW, "results")
    # the gallery goes on within the panel: its cards are reached by scrolling it
    card = page.find_element(By.CSS_SELECTOR, "#gallery .card")
    page.execute_script("arguments[0].scrollIntoView({block: 'nearest'})", card)
    assert page.execute_script("const b = arguments[0].getBoundingClientRect(); "
                               "return b.top >= 0 && b.bottom <= window.innerHeight", card)


def test_a_phones_window_keeps_the_panel_under_the_form(browser, base_url):
    """One column (860 px and narrower): the output panel follows the form as before, the page scrolling to it."""
    browser.set_window_size(390, 844)
    try:
        open_page(browser, base_url)
        assert browser.execute_script(
            "return getComputedStyle(document.querySelector('.output')).position") == "static"
    finally:
        from test_webui import WINDOW
        browser.set_window_size(*WINDOW)


def test_a_cards_status_and_seed_stay_within_a_phones_card(browser, base_url):
    """Two cards a row at 390 px: 'interrupted' beside a ten-digit seed ran 8 px past the card's edge, a seed near
    2^64 further; the line wraps (and the seed breaks) within the card."""
    browser.set_window_size(390, 844)
    try:
        open_page(browser, base_url)
        overflowing = browser.execute_script("""
            const jobs = [["interrupted", 1450357496], ["failed", "18446744073709551615"], ["done", 123]].map(
              ([status, seed], i) => ({id: `${i}`.repeat(32), status, request: {prompt: "a card", seed},
                                       images: [], infotexts: [], error: status === "done" ? null : "stopped"}));
            renderGallery(jobs);
            return [...document.querySelectorAll("#gallery .card .meta")]
              .filter((meta) => meta.scrollWidth > meta.clientWidth || meta.getBoundingClientRect().right
                                > meta.closest(".card").getBoundingClientRect().right)
              .map((meta) => meta.textContent);""")
        assert overflowing == []
    finally:
        from test_webui import WINDOW
        browser.set_window_size(*WINDOW)


def test_a_phones_window_brings_the_progress_into_view_after_generate(browser, base_url):
    """One column: Ctrl+Enter in the prompt (or Generate at the form's foot) queued the job with the progress bar
    and the pictures 2000 px below the window, out of sight; now the page scrolls to the output panel. Side by side
    the page does not move (the panel is in view beside the form)."""
    from test_webui import WINDOW, Keys, cancel_leftover_jobs, text, wait

    cancel_leftover_jobs(base_url)
    browser.set_window_size(390, 844)
    try:
        open_page(browser, base_url)
        assert not browser.execute_script(IN_VIEW, "progress")
        set_value(browser, "steps", 2)
        set_value(browser, "prompt", "a phone's square (in view)")
        browser.find_element(By.ID, "prompt").send_keys(Keys.CONTROL, Keys.ENTER)
        wait(browser, lambda d: d.execute_script(IN_VIEW, "progress"), 20,
             f"the progress stays out of view; error: {text(browser, 'error')}")
        loaded_results(browser, 1)
        assert browser.execute_script(IN_VIEW, "progress")
        assert browser.execute_script("return document.getElementById('results').getBoundingClientRect().top"
                                      " < window.innerHeight")
    finally:
        browser.set_window_size(*WINDOW)
    open_page(browser, base_url)
    set_value(browser, "steps", 2)
    set_value(browser, "prompt", "a wide square (in view)")
    browser.find_element(By.ID, "prompt").send_keys(Keys.CONTROL, Keys.ENTER)
    loaded_results(browser, 1)
    assert browser.execute_script("return window.scrollY") == 0


def test_a_phones_window_shows_the_form_a_gallery_card_filled(browser, base_url):
    """One column: a card's Reuse and img2img fill the form 2000 px above the card, and nothing in view changed;
    now the page scrolls to the form's top (Reuse) or its initial image (img2img), the keyboard there (the prompt, the
    initial image's file field). Side by side the form is beside
    the gallery: the page stays where it is."""
    from test_webui import WINDOW, click_card_button, http_json, text, value, wait, wait_job

    job = wait_job(base_url, http_json(base_url, "/api/jobs", {"prompt": "a card to reuse (in view)", "steps": 2,
                                                               "seed": 5})["id"])
    card = f'#gallery [data-job-id="{job["id"]}"]'
    browser.set_window_size(390, 844)
    try:
        open_page(browser, base_url)
        browser.execute_script("document.querySelector(arguments[0]).scrollIntoView()", card)
        assert not browser.execute_script(IN_VIEW, "prompt")
        click_card_button(browser, card, "reuse")
        assert value(browser, "prompt") == "a card to reuse (in view)"
        assert browser.execute_script(IN_VIEW, "prompt")
        assert browser.execute_script(FOCUSED) == "prompt"       # Tab goes on in the form, not back at the card
        browser.execute_script("document.querySelector(arguments[0]).scrollIntoView()", card)
        click_card_button(browser, card, "to-img2img")
        wait(browser, lambda d: d.execute_script(IN_VIEW, "init-canvas"), 20,
             f"the initial image is not in view; error: {text(browser, 'error')}")
        wait(browser, lambda d: d.execute_script(FOCUSED) == "init-image", 10, "the keyboard is not at the image")
        assert browser.execute_script(IN_VIEW, "init-canvas")
    finally:
        browser.set_window_size(*WINDOW)
    open_page(browser, base_url)
    browser.execute_script("window.scrollTo(0, document.documentElement.scrollHeight)")   # the form's foot
    assert browser.execute_script("return window.scrollY") > 1000
    browser.execute_script("""window.__scrolled = [];               // the page's own scrolls, by element id
        const own = Element.prototype.scrollIntoView;
        Element.prototype.scrollIntoView = function (...args) { __scrolled.push(this.id); return own.apply(this, args); };""")
    click_card_button(browser, card, "reuse")
    assert value(browser, "seed") == "5"
    assert browser.execute_script(FOCUSED) != "prompt"
    click_card_button(browser, card, "to-img2img")
    wait(browser, lambda d: d.find_element(By.ID, "init-canvas").is_displayed(), 20, "no initial image")
    assert browser.execute_script("return window.__scrolled") == []


def test_a_wide_windows_form_shows_its_message_in_view(browser, base_url):
    """Side by side (1920x1080, 1280x800) an error or notice at the form's foot is scrolled into view: a notice (Reuse
    seed before any job, a button mid-form) stayed 1000 px below the window."""
    from test_webui import WINDOW, Keys, text, wait

    try:
        for size in ((1920, 1080), (1280, 800)):
            browser.set_window_size(*size)
            open_page(browser, base_url)
            browser.execute_script("document.getElementById('width').value = 100000")   # past --max-pixels
            browser.find_element(By.ID, "prompt").send_keys("a refused size", Keys.CONTROL, Keys.ENTER)
            wait(browser, lambda d: d.find_element(By.ID, "error").is_displayed(), 20, "no error")
            assert "max-pixels" in text(browser, "error") and browser.execute_script(IN_VIEW, "error"), size
            open_page(browser, base_url)
            browser.execute_script("document.getElementById('seed-reuse').scrollIntoView({block: 'center'})")
            browser.find_element(By.ID, "seed-reuse").click()          # mid-form
            assert "No finished job yet" in text(browser, "notice") and browser.execute_script(IN_VIEW, "notice")
    finally:
        browser.set_window_size(*WINDOW)


def test_the_queue_says_starting_or_the_place_not_an_unknown_step_count(page):
    """A running job whose model is still loading (its steps not yet counted) read "0 / ?" in the queue, a queued one
    nothing; now "starting", "next", "1 ahead", and the row follows when the steps are counted (the step still 0)."""
    rows = page.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const job = (id, status, steps) => ({id: id.repeat(32), status, step: 0, steps, request: {prompt: id},
                                              images: [], infotexts: []});
        const rows = () => [...document.querySelectorAll('#queue li')].map((li) => li.textContent);
        let steps = 0;
        window.api = async () => ({jobs: [job("c", "queued", 0), job("b", "queued", 0), job("a", "running", steps)]});
        (async () => {
          await refreshJobs(true);
          const first = rows();
          steps = 20;
          await refreshJobs();
          done([first, rows()]);
        })();""")
    assert rows == [["runningastartingCancel", "queuedbnextCancel", "queuedc1 aheadCancel"],
                    ["runninga0 / 20Cancel", "queuedbnextCancel", "queuedc1 aheadCancel"]]


def test_an_empty_gallerys_note_is_one_line_across_the_panel(browser, base_url):
    """At 1920x1080 "Finished jobs appear here" was wrapped in one card's 150 px column of a 1100 px gallery."""
    from test_webui import WINDOW

    browser.set_window_size(1920, 1080)
    try:
        open_page(browser, base_url)
        lines, fits = browser.execute_script("""
            renderGallery([]);
            const note = document.querySelector('#gallery .empty'), box = note.getBoundingClientRect();
            return [box.height / parseFloat(getComputedStyle(note).lineHeight),
                    box.right <= document.getElementById('gallery').getBoundingClientRect().right];""")
        assert lines < 1.5 and fits
    finally:
        browser.set_window_size(*WINDOW)
