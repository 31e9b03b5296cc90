"""The web UI when its server is gone, in a real headless browser (the helpers and fixtures of test_webui.py)."""

from __future__ import annotations

from test_webui import (  # noqa: F401  (fixtures: browser)
    By, browser, open_page, serve_on, set_value, text, wait,
)


def test_a_server_that_dies_under_a_running_job_is_named_and_its_return_clears_it(browser, tmp_path):
    """The server is killed while the page's job draws (nothing ends the job) and stays down: the page says it
    cannot reach the server within a poll or two; once the server is back the error goes. Before: 'Step i / n'
    and a live Cancel for good, the failing polls silent, no word of the server being gone."""
    from server_fixtures import free_port

    port = free_port()
    server = serve_on(port, tmp_path / "outputs")
    try:
        open_page(browser, server.url)
        set_value(browser, "prompt", "cut off by a crash")
        set_value(browser, "steps", 150)
        browser.find_element(By.ID, "generate").click()
        wait(browser, lambda d: text(d, "progress-text").startswith("Step"), 60, "the job did not start")
        server.kill()
        wait(browser, lambda d: d.find_element(By.ID, "error").is_displayed()
             and text(d, "error").startswith("cannot reach the server"), 20, "the page does not say the server is gone")
        server = serve_on(port, tmp_path / "outputs")
        wait(browser, lambda d: not d.find_element(By.ID, "error").is_displayed(), 30, "the error stays")
    finally:
        server.stop()
