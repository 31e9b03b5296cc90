"""`create_app(config)`: the FastAPI application of `sdlab serve`, and the uvicorn `Server` that runs it.

Routes: `/sdapi/v1/*` (a1111.py), the ControlNet extension's `/controlnet/*` (a1111_controlnet.py), `/api/*`
(native.py), ComfyUI's `/prompt`, `/ws`, `/history`, ... at `/` and under `/api` (comfy_api.py), the web UI at `/`
(static/index.html) and `/static/*`, the API's Swagger UI at `/docs` (api_docs.py: its assets served here, no CDN).
Every route sits behind `guard.Guard` (auth, Host names, Origins, body size; a WebSocket's handshake too). Errors:
`/sdapi` and the ControlNet extension's `/controlnet` answer in A1111's shape `{error, detail, body, errors}`,
everything else `{detail: "..."}`. OpenAI's images API, `/v1/*` (openai_images.py), answers errors in OpenAI's shape
`{error: {message, type, param, code}}`, the guard's refusals (401, 403, 413) too (`refusal_body`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from sdlab.server import a1111, a1111_controlnet, api_docs, comfy_api, native
from sdlab.server import openai_images
from sdlab.server.config import ServerConfig
from sdlab.server.guard import Guard, detail_body
from sdlab.server.inputs import BadRequest, unreadable_json_reason
from sdlab.server.jobs import QueueFull, Unavailable
from sdlab.server.service import Service
from sdlab.server.store import StoreError

STATIC = Path(__file__).parent / "static"
logger = logging.getLogger("sdlab.server")


def create_app(config: ServerConfig, *, preload: bool = False) -> Guard:
    """The ASGI app (FastAPI behind the guard). The first model loads now with `preload` (a broken file is
    an error before the server listens), else in the worker when the app starts."""
    service = Service(config)
    if preload:
        service.runner.warm()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        yield
        await asyncio.to_thread(service.stop)

    app = FastAPI(title="sdlab", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    app.include_router(openai_images.router)
    app.include_router(a1111.router)
    app.include_router(a1111_controlnet.router)
    app.include_router(native.router)
    comfy_api.attach(app, service)
    api_docs.attach(app)              # /docs: Swagger UI from local assets

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    STATIC.mkdir(exist_ok=True)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _error_handlers(app)
    guarded = Guard(app, basic=config.basic_auth, token=config.token, max_body=config.limits.max_body_bytes,
                    hosts=config.host_names, origins=config.origin_names, refusal=refusal_body)
    guarded.state = app.state           # tests and tools reach the service through either object
    return guarded


class Server(uvicorn.Server):
    """uvicorn's server, which ends the jobs first when it is told to stop (SIGTERM, Ctrl+C): the queued jobs
    become `interrupted` at once and the running one at its next step, so the clients waiting on them get
    their answers (an A1111 call a 503) while uvicorn still waits for open requests to finish
    (`timeout_graceful_shutdown`), rather than being cut off after that wait."""

    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await asyncio.to_thread(self.service.queue.stop_jobs)
        await super().shutdown(sockets=sockets)


A1111_PREFIXES = ("/sdapi/", "/controlnet/")
"""The routes that answer errors in A1111's shape (its API middleware's, which the ControlNet extension's share)."""


def refusal_body(path: str, status: int, message: str) -> dict:
    """The body of the guard's refusal at `path`: OpenAI's error shape under `/v1/` (a 401's code OpenAI's
    `invalid_api_key`, which its clients read), else `{"detail": message}`."""
    if path.startswith(openai_images.PREFIX):
        return openai_images.error_body(status, message, code="invalid_api_key" if status == 401 else None)
    return detail_body(path, status, message)


def error_response(request: Request, status: int, detail, message: str = "", error: str = "HTTPException",
                   headers: dict | None = None, param: str | None = None, code: str | None = None) -> JSONResponse:
    if request.url.path.startswith(openai_images.PREFIX):
        body = openai_images.error_body(status, message or str(detail), param, code)
        status = openai_images.error_status(status)
    elif request.url.path.startswith(A1111_PREFIXES):
        body = {"error": error, "detail": detail, "body": "", "errors": message or str(detail)}
    else:
        body = {"detail": message or detail}
    return JSONResponse(body, status_code=status, headers=headers)


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, err: BadRequest) -> JSONResponse:
        return error_response(request, err.status, err.detail, err.message, param=getattr(err, "param", None),
                              code=getattr(err, "code", None))

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, err: QueueFull) -> JSONResponse:
        return error_response(request, 429, "Too Many Requests", str(err), headers={"Retry-After": "5"})

    async def unavailable(request: Request, err: Unavailable | StoreError) -> JSONResponse:
        return error_response(request, 503, "Service Unavailable", str(err))

    app.add_exception_handler(Unavailable, unavailable)
    app.add_exception_handler(StoreError, unavailable)      # the job history could not be read

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        if request.url.path.startswith(openai_images.PREFIX):
            message, param = openai_images.validation_message(list(err.errors()))
            return JSONResponse(openai_images.error_body(400, message, param), status_code=400)
        if request.url.path.startswith(A1111_PREFIXES):
            return JSONResponse({"detail": _jsonable(err.errors())}, status_code=422)
        return JSONResponse({"detail": _validation_text(err)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        unreadable = unreadable_json(err)
        if unreadable is not None:                      # a body that is no JSON, as FastAPI's own json_invalid
            return await invalid(request, unreadable)
        return error_response(request, err.status_code, err.detail, headers=getattr(err, "headers", None))


def unreadable_json(err: StarletteHTTPException) -> RequestValidationError | None:
    """FastAPI's bare 400 "There was an error parsing the body" for a JSON body Python's reader stops on without a
    JSONDecodeError, as the json_invalid error a body that is not JSON gets, its reason said: bytes that are not
    UTF-8 (JSON's encoding, RFC 8259; a UnicodeDecodeError) or arrays and objects nested past the reader's depth
    (a RecursionError). None for any other error."""
    reason = unreadable_json_reason(err.__cause__)
    if reason is None:
        return None
    return RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": f"JSON decode error: {reason}",
                                    "input": {}, "ctx": {"error": reason}}])


NUMBER_ERRORS = frozenset({"int_type", "float_type", "finite_number", "int_parsing", "float_parsing",
                           "int_from_float", "bool_type"})
"""Pydantic's errors of a value that is no number of the field's kind: its line says what was sent."""


def _validation_text(err: RequestValidationError) -> str:
    """Pydantic's errors as one line: `steps: Input should be a valid integer, got true; ...`; a body that is not
    JSON: `the body is not valid JSON: Expecting value at character 10`."""
    parts = []
    for item in err.errors():
        if item.get("type") == "json_invalid":          # loc: ("body", the character where parsing stopped)
            loc = item.get("loc", ())
            reason = (item.get("ctx") or {}).get("error", "JSON decode error")
            at = f" at character {loc[-1]}" if len(loc) > 1 else ""
            parts.append(f"the body is not valid JSON: {reason}{at}")
            continue
        where = ".".join(str(p) for p in item.get("loc", ()) if p != "body") or "body"
        sent = f", got {_shown(item['input'])}" if item.get("type") in NUMBER_ERRORS and "input" in item else ""
        parts.append(f"{where}: {item.get('msg', 'invalid')}{sent}")
    return "; ".join(parts) or "invalid request"


def _shown(value: object, limit: int = 40) -> str:
    """A value sent, as JSON writes it, cut to `limit` characters."""
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _jsonable(errors: list) -> list:
    """Pydantic error dicts without the raw input or exception objects (they can be large or unserialisable)."""
    return [{k: (str(v) if k == "ctx" else v) for k, v in e.items() if k not in ("input", "url")} for e in errors]
