"""The API's Swagger UI at /docs in a real headless browser (the helpers and fixtures of test_webui.py): its script
and style sheet come from the server itself (api_docs.py), so the page lists the API's operations with no
internet, and behind --auth once the browser has the credentials."""

from __future__ import annotations

import urllib.error

import pytest
from test_webui import (  # noqa: F401  (fixtures: base_url, browser; the session's sdlab_server)
    By, base_url, basic_auth, browser, http_bytes, sdlab_server, severe_console_errors, wait,
)

# Where FastAPI's own /docs page loads Swagger UI and its favicon from: blocked, as on a machine offline
CDNS = ["*cdn.jsdelivr.net*", "*unpkg.com*", "*fastapi.tiangolo.com*"]
# Operations of each API the page must list (Swagger UI's data-path of an operation's summary)
PATHS = ["/api/jobs", "/sdapi/v1/txt2img", "/v1/images/generations", "/prompt"]


def shows_the_operations(driver, base: str) -> None:
    """Open /docs with the CDNs blocked: the page lists PATHS' operations, every resource it loaded came from
    `base` and the console has no error."""
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": CDNS})
    try:
        driver.get(base + "/docs")
        driver.get_log("browser")

        def listed(d) -> set[str]:
            return set(d.execute_script("return [...document.querySelectorAll('.opblock-summary-path')]"
                                        ".map((e) => e.dataset.path)"))

        wait(driver, lambda d: set(PATHS) <= listed(d), 30, f"/docs lists not {PATHS}")
        assert len(listed(driver)) > 50
        loaded = driver.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)")
        assert any(url.endswith("/docs/assets/swagger-ui-bundle.js") for url in loaded)
        assert [url for url in loaded if not url.startswith(base + "/")] == []
        assert severe_console_errors(driver) == []
    finally:
        driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": []})


def test_docs_list_the_operations_from_local_assets(browser, base_url):
    shows_the_operations(browser, base_url)
    assert http_bytes(base_url, "/docs/assets/swagger-ui.css").startswith(b".swagger-ui")


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    from server_fixtures import start_server

    server = start_server(tmp_path_factory.mktemp("docs-auth") / "outputs", "--auth", "ada:lovelace",
                          auth=("ada", "lovelace"))
    yield server
    server.stop()


def test_docs_behind_basic_auth(browser, auth_server):
    """Without credentials /docs and its assets are a 401; with them (as after the browser's login prompt) the page
    lists the operations, its schema read with the same credentials."""
    base = auth_server.url
    for path in ("/docs", "/docs/assets/swagger-ui-bundle.js", "/openapi.json"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            http_bytes(base, path)
        assert refused.value.code == 401, path
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": basic_auth("ada", "lovelace")})
    try:
        shows_the_operations(browser, base)
        assert browser.find_elements(By.CSS_SELECTOR, "#swagger-ui .information-container")
    finally:
        browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {}})
