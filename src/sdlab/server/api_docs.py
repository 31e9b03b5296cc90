"""The API's interactive documentation at `/docs` (Swagger UI), whole without internet.

FastAPI's own page loads Swagger UI's script and style sheet from a CDN, so it stays blank on a machine offline.
This one loads them from the server itself, at `/docs/assets/`: the copy of swagger-ui-dist (5.x) that the
`fastapi-offline` package ships (its `static` folder: swagger-ui-bundle.js, swagger-ui.css, favicon.png). The
schema it shows is the app's `/openapi.json`. The page and its assets sit behind the guard as every route (with
--auth, the browser's login covers them). ReDoc (`/redoc`) is off.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_URL = "/docs"
ASSETS_URL = "/docs/assets"
ASSETS = Path(fastapi_offline.__file__).parent / "static"     # swagger-ui-bundle.js, swagger-ui.css, favicon.png


def attach(app: FastAPI) -> None:
    """`/docs` and its assets on `app`, which was made with `docs_url=None` (no CDN page of FastAPI's)."""
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS), name="docs-assets")

    @app.get(DOCS_URL, include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - API",
                                   swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
                                   swagger_favicon_url=f"{ASSETS_URL}/favicon.png")
