"""Authentication and the body-size limit, in front of every route (API, UI, images).

An ASGI middleware: HTTP Basic (`--auth user:pass`) or `Authorization: Bearer <token>` (`--token-file`; with
`--auth`, `Bearer user:pass` too: an OpenAI client's API key), compared in constant time; a request without valid credentials gets 401 with `WWW-Authenticate: Basic`
(browsers then ask for the password, so the UI works behind it), or with a token alone `Bearer` (RFC 6750:
a browser cannot send a token, so it shows the 401 rather than a password prompt no password satisfies).
Bodies longer than the limit get 413, whether they announce their length or stream it. A server on the loopback
without auth answers only requests whose Host is a loopback name or address (localhost, 127.0.0.1, [::1], any
port) or one of --allowed-hosts (`ServerConfig.host_names`): another gets 403, so that a web page on a name that
resolves to 127.0.0.1 (DNS rebinding) cannot drive it from the browser. A POST, PUT, PATCH or DELETE that a page of
another origin sends (an `Origin` header that is neither the server's own, scheme://its Host, nor on a name of
--allowed-hosts) gets 403 on a server without auth or with --auth (`ServerConfig.origin_names`), so that another
site cannot send it a form (cross-site request forgery); requests without an Origin (curl, A1111 clients) pass.
A WebSocket's handshake passes the same checks of its Host, Origin and credentials (`Guard._websocket`).
A refusal's JSON body is `{"detail": message}`, or what the `refusal` the app gives makes of (path, status,
message): OpenAI's error shape under `/v1/` (app.py's `refusal_body`).
"""

from __future__ import annotations

import base64
import binascii
import json
from secrets import compare_digest
from typing import Any, Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sdlab.server.config import bare_host, is_loopback

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})     # what a page may not send from another origin
NOT_AUTHENTICATED = "Not authenticated"
Refusal = Callable[[str, int, str], Any]                # (path, status, message) -> the JSON body answered


def detail_body(path: str, status: int, message: str) -> dict[str, str]:
    """The refusal body of a route without a shape of its own: `{"detail": message}`."""
    return {"detail": message}


def too_large(limit: int) -> str:
    return f"the request body is larger than this server's limit of {limit} bytes (--max-body-mb)"


def unknown_host(host: str) -> str:
    return (f"Host {host[:100]!r} refused: a server on the loopback without auth answers only localhost, 127.0.0.1 "
            "and [::1], so that no web page can reach it by DNS rebinding (another name you reach it by: "
            "sdlab serve --allowed-hosts NAME)")


def foreign_origin(origin: str, method: str) -> str:
    return (f"{method} from a page of {origin[:100]!r} refused: this server takes POST, PUT, PATCH and DELETE only "
            "from its own pages, so that no other web page can send it one from its visitor's browser (cross-site "
            "request forgery; pages of another name of yours: sdlab serve --allowed-hosts NAME)")


def host_name(header: str) -> str:
    """The name or address of a Host header, without its port or an IPv6 address's brackets, as `bare_host`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return bare_host(header.rpartition(":")[0] if header.count(":") == 1 else header)


class Guard:
    def __init__(self, app: ASGIApp, *, basic: tuple[str, str] | None, token: str | None, max_body: int,
                 hosts: frozenset[str] | None = None, origins: frozenset[str] | None = None,
                 refusal: Refusal = detail_body) -> None:
        self.app = app
        self.refusal = refusal              # the body of a refusal at a path, in that route's error shape
        self.basic = basic
        self.token = token
        self.max_body = max_body
        self.hosts = hosts                  # the names answered besides the loopback's; None: any
        self.origins = origins              # the names whose pages may post besides the server's own; None: any

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}

        async def refuse(status: int, message: str, extra: list[tuple[bytes, bytes]] = ()) -> None:
            await _respond(send, status, self.refusal(scope["path"], status, message), extra)

        host = headers.get("host")
        if self.hosts is not None and host is not None and not self._known_host(host_name(host)):
            await refuse(403, unknown_host(host))
            return
        origin, method = headers.get("origin"), scope["method"]
        if origin is not None and method in UNSAFE_METHODS and not self._known_origin(origin, host):
            await refuse(403, foreign_origin(origin, method))
            return
        if (self.basic or self.token) and not self._authorized(headers.get("authorization", "")):
            scheme = b"Basic" if self.basic else b"Bearer"
            await refuse(401, NOT_AUTHENTICATED, [(b"www-authenticate", scheme + b' realm="sdlab"')])
            return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            if length.isdigit():
                await refuse(413, too_large(self.max_body))
            else:
                await refuse(400, "invalid Content-Length")
            return
        if length is None and headers.get("transfer-encoding"):     # a streamed body: read it up to the limit
            body = await _read_body(receive, self.max_body)
            if body is None:
                await refuse(413, too_large(self.max_body))
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A WebSocket's handshake (ComfyUI's /ws) under the requests' rules: its Host, its credentials, and its
        Origin, which a browser sends with every handshake and which is checked as an unsafe method's (a page of
        another site must not read the server's messages); refused with close code 1008 (the handshake's 403)."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host, origin = headers.get("host"), headers.get("origin")
        refused = ((self.hosts is not None and host is not None and not self._known_host(host_name(host)))
                   or (origin is not None and not self._known_origin(origin, host))
                   or ((self.basic or self.token) and not self._authorized(headers.get("authorization", ""))))
        if refused:
            await receive()                     # websocket.connect
            await send({"type": "websocket.close", "code": 1008})
            return
        await self.app(scope, receive, send)

    def _known_host(self, name: str) -> bool:
        return is_loopback(name) or name in self.hosts

    def _known_origin(self, origin: str, host: str | None) -> bool:
        """Whether a page of `origin` may post: any without an origin rule (`origins` None), else the server's own
        (scheme://the Host asked for) or one on a name of `origins`, any port; "null" (a sandboxed frame, a file)
        is neither."""
        if self.origins is None:
            return True
        _, sep, netloc = origin.strip().lower().partition("://")
        return bool(sep) and (netloc == (host or "").strip().lower() or host_name(netloc) in self.origins)

    def _authorized(self, header: str) -> bool:
        """Basic credentials of --auth, or a Bearer token: --token-file's, or with --auth its `USER:PASS` (the API
        key an OpenAI client sends, which has no Basic auth)."""
        scheme, _, value = header.partition(" ")
        scheme, value = scheme.lower(), value.strip()
        if scheme == "bearer" and self.token is not None and compare_digest(value.encode(), self.token.encode()):
            return True
        if scheme == "bearer" and self.basic is not None:
            return compare_digest(value.encode(), ":".join(self.basic).encode())
        if scheme == "bearer":
            return False
        if scheme == "basic" and self.basic is not None:
            try:
                user, sep, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
            except (binascii.Error, ValueError):
                return False
            ok_user = compare_digest(user.encode(), self.basic[0].encode())
            ok_password = compare_digest(password.encode(), self.basic[1].encode())
            return bool(sep) and ok_user and ok_password
        return False


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None once it passes `limit` bytes."""
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(parts)
        parts.append(message.get("body", b""))
        size += len(parts[-1])
        if size > limit:
            return None
        if not message.get("more_body", False):
            return b"".join(parts)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if sent:
            return await receive()              # after the body: the disconnect, when it comes
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed


async def _respond(send: Send, status: int, body: Any, headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})
