"""What a request passes before any route runs: the API key, the browser origin, the body size; and who the client
is (for per-client session caps). API keys never reach the logs."""

from __future__ import annotations

import hmac
import logging
import re
import urllib.parse

from fastapi.responses import JSONResponse

from .errors import APIError
from .state import ServerConfig, ServerState


def client_id(scope) -> str:
    """The address a connection comes from: what ``--max-sessions-per-client`` counts by."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def check_api_key(config: ServerConfig, headers, query_params, subprotocols: list[str] | None = None) -> bool:
    """Accept ``Authorization: Bearer KEY``, ``api-key: KEY``, ``?api_key=KEY`` or (browsers' WebSockets,
    which cannot set headers) the ``openai-insecure-api-key.KEY`` subprotocol."""
    if not config.api_key:
        return True
    offered = []
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        offered.append(auth[7:].strip())
    offered += [headers.get("api-key", ""), query_params.get("api_key", "")]
    for p in subprotocols or []:
        if p.startswith("openai-insecure-api-key."):
            offered.append(p.split(".", 1)[1])
    return any(o and hmac.compare_digest(o.encode(), config.api_key.encode()) for o in offered)


# Reachable without the key: the page itself holds nothing; it asks for the key and sends it on every call.
PUBLIC_PATHS = ("/health",)
# Behind the key like /v1: the API's own description.
KEYED_PATHS = ("/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


def _is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or not (path.startswith("/v1/") or path == "/v1" or path in KEYED_PATHS)


_API_KEY_IN_URL = re.compile(r"(?i)(api[_-]key=)[^&\s\"]*")


def redact(text: str) -> str:
    """``text`` with any ``api_key=...`` query value replaced, for logs."""
    return _API_KEY_IN_URL.sub(r"\1[redacted]", text)


class RedactKeys(logging.Filter):
    """Keeps ``?api_key=`` values out of uvicorn's access and WebSocket log lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.msg == "ASGI callable returned without completing handshake.":
            # uvicorn's sans-I/O WebSocket says this after every HTTP denial (a 401 for a missing key, a 403 for
            # a foreign origin) although the answer was sent: a refused client is not a server error.
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = "WebSocket refused with an HTTP answer"
            return True
        if isinstance(record.args, tuple) and any(isinstance(a, str) and "api" in a.lower() for a in record.args):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.msg, str) and "api" in record.msg.lower():
            record.msg = redact(record.msg)
        return True


def install_log_redaction() -> None:
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactKeys) for f in logger.filters):
            logger.addFilter(RedactKeys())


def origin_allowed(config: ServerConfig, headers) -> bool:
    """True when a request carries no ``Origin`` (not a browser), comes from the server's own origin, or from one
    that ``--allow-origin`` lists. ``headers`` is the ASGI scope's list of (name, value) byte pairs."""
    origin = host = None
    for name, value in headers:
        if name == b"origin":
            origin = value.decode("latin-1").strip()
        elif name == b"host":
            host = value.decode("latin-1").strip().lower()
    if origin is None:
        return True
    allowed = config.allow_origins
    if "*" in allowed or origin.rstrip("/") in {o.rstrip("/") for o in allowed}:
        return True
    parts = urllib.parse.urlsplit(origin)
    return parts.scheme in ("http", "https") and bool(host) and parts.netloc.lower() == host


UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class CheckOrigin:
    """ASGI middleware: a web page on another origin may not open the WebSocket nor POST/DELETE (a form post or
    ``fetch`` from any site the user visits would otherwise reach a keyless server on localhost)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if kind in ("http", "websocket") and not origin_allowed(self.state.config, scope.get("headers") or []):
            if kind == "websocket":
                self.state.metrics.errors.labels("origin_refused").inc()
                msg = await receive()
                if msg["type"] == "websocket.connect":
                    await send({"type": "websocket.close", "code": 1008, "reason": "origin not allowed"})  # HTTP 403
                return
            if scope.get("method") in UNSAFE_METHODS:
                self.state.metrics.errors.labels("origin_refused").inc()
                err = APIError(403, "cross-origin requests are refused: start the server with --allow-origin "
                                    "ORIGIN to let a web page on that origin call it", "permission_error",
                               "origin_not_allowed")
                return await JSONResponse(err.body(), status_code=403)(scope, receive, send)
        return await self.app(scope, receive, send)


class RequireKey:
    """ASGI middleware (not BaseHTTPMiddleware, which would buffer streamed bodies): 401 without the API key."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.state.config.api_key and not _is_public(scope["path"]):
            from starlette.requests import HTTPConnection

            conn = HTTPConnection(scope)
            if not check_api_key(self.state.config, conn.headers, conn.query_params):
                self.state.metrics.errors.labels("authentication_error").inc()
                err = APIError(401, "missing or wrong API key: send it as 'Authorization: Bearer KEY'",
                               "authentication_error", "invalid_api_key")
                return await JSONResponse(err.body(), status_code=401)(scope, receive, send)
        return await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: refuse HTTP bodies over the cap with 413, whether or not Content-Length is sent."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _too_large(self.limit, send)
        seen, over, started = 0, False, False

        async def limited_receive():
            nonlocal seen, over
            if over:
                return {"type": "http.disconnect"}
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    over = True   # the app sees the client leave; the 413 is answered below
                    return {"type": "http.disconnect"}
            return msg

        async def guarded_send(msg):
            nonlocal started
            if over and not started:
                return
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            await _too_large(self.limit, send)


def _human_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} bytes"


async def _too_large(limit: int, send) -> None:
    err = APIError(413, f"the request body is larger than the server's limit of {_human_bytes(limit)}",
                   code="request_too_large")
    await JSONResponse(err.body(), status_code=413)({"type": "http"}, None, send)


class RefuseWhileDraining:
    """ASGI middleware: once the server is shutting down, new HTTP requests get 503 (and the connection closes);
    what already runs finishes within the grace. WebSockets are told by the realtime route."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.state.drain.draining:
            err = APIError(503, "the server is shutting down; retry on another server or once it is back",
                           "server_error", "server_shutting_down")
            return await JSONResponse(err.body(), status_code=503, headers={"Connection": "close"})(scope, receive,
                                                                                                   send)
        return await self.app(scope, receive, send)
