"""The HTTP/WebSocket server: one FastAPI app around one engine.

Routes live in their own modules (``realtime``, ``openai_http``, ``voices``); this module holds what they
share: the configuration, the loaded engine (loaded in the background so ``/health`` can say "loading"),
API-key checks, OpenAI-shaped errors and request size caps.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import threading
import time
import urllib.parse
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..constants import FRAME_RATE_HZ
from ..engine import Engine
from . import default_data_dir
from .metrics import Metrics

log = logging.getLogger("openchroma.serve")

STATIC_DIR = Path(__file__).parent / "static"


@dataclass
class ServerConfig:
    model: str = ""
    device: str | None = None
    dtype: str | None = None
    api_key: str | None = None
    data_dir: Path = field(default_factory=default_data_dir)
    max_sessions: int = 8
    max_context: int = 4096
    max_response_seconds: float = 60.0
    max_upload_bytes: int = 25 * 1024 * 1024      # HTTP bodies: voice uploads, chat requests with audio
    max_ws_message_bytes: int = 8 * 1024 * 1024    # one realtime event
    max_input_audio_seconds: float = 120.0         # one user turn
    default_voice: str | None = None
    allow_local_audio: bool = False                # let chat requests name audio files on the server's disk
    model_id: str = "chroma-4b"
    compile: bool = False                          # torch.compile the frame step at load
    cuda_graphs: bool | None = None                # capture the frame step as CUDA graphs (default: on CUDA)
    threads: int | None = None                     # the frame loop's intra-op CPU threads (default: by model size)
    # Abuse and fault limits: one client must never hurt another.
    allow_origins: tuple[str, ...] = ()            # browser origins besides the server's own ("*": any)
    idle_timeout: float = 300.0                    # close a realtime session idle this long (0: never)
    max_sessions_per_client: int = 0               # sessions one client address may hold at once (0: no cap)
    send_timeout: float = 15.0                     # a client that reads nothing for this long is dropped
    engine_timeout: float = 120.0                  # an engine call that takes longer fails with an error
    max_text_chars: int = 16000                    # one text item, message, instructions or speech input
    max_pending_input_bytes: int = 16 * 2**20      # decoded audio a realtime connection may queue unprocessed
    max_messages: int = 256                        # messages in one chat request

    @property
    def max_response_frames(self) -> int:
        return max(1, int(self.max_response_seconds * FRAME_RATE_HZ))

    @property
    def ws_protocol_max_bytes(self) -> int:
        """Messages up to this size are read and answered with an error event; larger ones close with 1009."""
        return 2 * self.max_ws_message_bytes


class EngineTimeout(RuntimeError):
    """An engine call did not return within ``engine_timeout``: the engine is stuck or overloaded."""


T = TypeVar("T")


def _guard(fn, *args):
    """Run ``fn`` turning exceptions that cannot cross a Future (``StopIteration``) or that are not ``Exception``s
    (``KeyboardInterrupt`` from a worker, ``GeneratorExit``) into ``RuntimeError``, so the caller always hears back."""
    try:
        return fn(*args)
    except (StopIteration, StopAsyncIteration) as e:   # Exceptions, but a Future refuses them: the caller hangs
        raise RuntimeError(f"engine call {getattr(fn, '__name__', fn)!s} raised {type(e).__name__}") from None
    except Exception:
        raise
    except BaseException as e:
        raise RuntimeError(f"engine call {getattr(fn, '__name__', fn)!s} raised {type(e).__name__}: {e}") from None


async def engine_call(config: ServerConfig, fn, *args, executor=None) -> Any:
    """Run a blocking engine call off the event loop; every failure comes back as an exception, and a call that
    does not return within ``config.engine_timeout`` raises ``EngineTimeout`` instead of hanging the caller."""
    loop = asyncio.get_running_loop()
    fut = loop.run_in_executor(executor, _guard, fn, *args)
    try:
        return await asyncio.wait_for(fut, timeout=config.engine_timeout if config.engine_timeout > 0 else None)
    except TimeoutError:
        raise EngineTimeout(f"the engine did not answer within {config.engine_timeout:g} s") from None


async def response_events(config: ServerConfig, resp) -> Any:
    """An engine response's events; raises ``EngineTimeout`` when none comes for ``engine_timeout`` seconds
    (a stopped engine worker would otherwise leave the stream, and its client, waiting forever)."""
    events = resp.__aiter__()
    timeout = config.engine_timeout if config.engine_timeout > 0 else None
    while True:
        try:
            ev = await asyncio.wait_for(events.__anext__(), timeout=timeout)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise EngineTimeout(f"the engine sent nothing for {config.engine_timeout:g} s") from None
        yield ev


def shorten(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def clip(value: Any, limit: int = 60) -> str:
    """A client's value for an error message, cut to about ``limit`` characters: never echo huge input back."""
    if isinstance(value, str):
        text = repr(value[:limit])
        return text if len(value) <= limit else f"{text}... ({len(value)} characters)"
    if value is None or isinstance(value, (bool, float)):
        return repr(value)
    if isinstance(value, int):
        digits = value.bit_length() * 0.302
        return repr(value) if digits < limit else f"an integer of about {digits:.0f} digits"
    kind = "object" if isinstance(value, dict) else "array" if isinstance(value, list) else type(value).__name__
    return f"a JSON {kind}"



class APIError(Exception):
    """An error answered to the client in OpenAI's shape: ``{"error": {"message", "type", "code", "param"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


class ServerState:
    """What the routes share: config, engine (once loaded), voice library, metrics."""

    def __init__(self, config: ServerConfig, engine: Engine | None = None):
        from .voices import VoiceLibrary

        self.config = config
        self.metrics = Metrics()
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.ready = threading.Event()
        self.started = time.time()
        self.connections: set = set()   # open realtime connections
        self.client_sessions: Counter[str] = Counter()   # sessions held per client address
        self.http_session_clients: dict = {}   # an HTTP route's engine session -> the client address holding it
        self.voices = VoiceLibrary(Path(config.data_dir), self.metrics)
        if engine is not None:
            self._attach(engine)

    def _attach(self, engine: Engine) -> None:
        self.voices.attach(engine)
        self.engine = engine
        self.ready.set()

    def load(self) -> None:
        """Load the model (with progress bars) and the voice library; run in a background thread."""
        try:
            engine = Engine.from_pretrained(
                self.config.model, device=self.config.device, dtype=self.config.dtype, progress=True,
                max_sessions=self.config.max_sessions, max_context=self.config.max_context,
                max_response_frames=self.config.max_response_frames, compile=self.config.compile,
                cuda_graphs=self.config.cuda_graphs, threads=self.config.threads)
            self._attach(engine)
            log.info("model %s loaded; %d voices in the library", self.config.model, len(self.voices.list()))
        except BaseException as e:  # reported by /health and every route
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("loading %s failed: %s", self.config.model, self.load_error)

    def claim_client_session(self, client: str) -> bool:
        """Count one more session for ``client``; False (nothing counted) when it already holds its cap."""
        cap = self.config.max_sessions_per_client
        if cap > 0 and self.client_sessions[client] >= cap:
            return False
        self.client_sessions[client] += 1
        return True

    def release_client_session(self, client: str) -> None:
        self.client_sessions[client] -= 1
        if self.client_sessions[client] <= 0:
            del self.client_sessions[client]

    def client_limit_error(self) -> APIError:
        self.metrics.sessions_rejected.inc()
        return APIError(429, f"this client already holds {self.config.max_sessions_per_client} sessions (the "
                             "server's --max-sessions-per-client); close one first", "rate_limit_error",
                        "client_session_limit_reached")

    async def engine_problem(self) -> str | None:
        """Why the loaded engine cannot serve (its worker stopped or does not answer), or None when it can."""
        engine = self.engine
        if engine is None:
            return None
        if getattr(engine, "_closed", False):
            return "the engine is closed"
        worker = getattr(engine, "_thread", None)
        if worker is not None and not worker.is_alive():
            return "the engine's worker thread has stopped"
        if not getattr(engine, "healthy", True):
            return f"the engine's frame steps keep failing ({engine.last_error})"
        submit = getattr(engine, "_submit", None)
        if submit is None:
            return None
        try:   # a no-op command: the worker answers it between two frames
            done = submit(lambda: None)
        except Exception as e:
            return f"the engine refuses commands: {type(e).__name__}: {e}"
        # Polled, never cancelled: the worker's set_result on a cancelled future would raise inside it.
        deadline = time.monotonic() + HEALTH_PROBE_SECONDS
        while not done.done():
            if time.monotonic() > deadline:
                return f"the engine's worker did not answer within {HEALTH_PROBE_SECONDS:g} s"
            await asyncio.sleep(0.01)
        return None

    def require_engine(self) -> Engine:
        if self.engine is not None:
            return self.engine
        if self.load_error:
            raise APIError(503, f"the model failed to load: {self.load_error}", "server_error", "model_load_failed")
        raise APIError(503, "the model is still loading; retry when GET /health says ready", "server_error",
                       "model_loading")

    def resolve_voice(self, name: str | None) -> str:
        """The library voice to speak in: the one named, else the server's default, else the only one."""
        engine = self.require_engine()
        if isinstance(name, dict):  # OpenAI's {"id": "..."} form
            name = name.get("id")
        if name is not None and not isinstance(name, str):
            raise APIError(400, f"voice must be a voice name, got {clip(name)}", code="invalid_value", param="voice")
        if name is not None and len(name) > 256:
            raise APIError(404, f"unknown voice {clip(name)}", code="voice_not_found", param="voice")
        if name and name in engine.voices:
            return name
        fallback = self.config.default_voice
        library = [v for v in engine.voices if not v.startswith("_adhoc_")]   # not voices cloned per request
        if fallback is None and len(library) == 1:
            fallback = library[0]
        if name and name not in OPENAI_STOCK_VOICES:
            raise APIError(404, f"unknown voice {clip(name)}; voices in the library: "
                                f"{', '.join(sorted(engine.voices)) or 'none'} (add one with POST /v1/voices)",
                           code="voice_not_found", param="voice")
        if fallback is None or fallback not in engine.voices:
            raise APIError(400, "no voice to speak in: the library has "
                                f"{len(engine.voices)} voices and no default; name one (voices: "
                                f"{', '.join(sorted(engine.voices)) or 'none'}) or add one with POST /v1/voices",
                           code="voice_required", param="voice")
        return fallback


HEALTH_PROBE_SECONDS = 5.0


def client_id(scope) -> str:
    """The address a connection comes from: what ``--max-sessions-per-client`` counts by."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


# OpenAI's built-in voice names: clients send them by default, so they map to the server's default voice.
OPENAI_STOCK_VOICES = frozenset({"alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage",
                                 "shimmer", "verse", "marin", "cedar"})


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


def create_app(config: ServerConfig, engine: Engine | None = None) -> FastAPI:
    """Build the app. With ``engine`` it serves at once; without, it loads ``config.model`` in the background."""
    from . import openai_http, realtime, voices

    state = ServerState(config, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.engine is None:
            threading.Thread(target=state.load, name="openchroma-load", daemon=True).start()
        install_log_redaction()   # again: uvicorn configures its loggers after the app is built
        yield
        await realtime.close_all(state)
        state.voices.close()

    app = FastAPI(title="OpenChroma", version="0.1.0", lifespan=lifespan,
                  description="Real-time spoken dialogue with voice cloning (Chroma 1.0): OpenAI-compatible "
                              "Realtime, chat completions and speech APIs, and a voice library.")
    app.state.oc = state

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        state.metrics.errors.labels(exc.type).inc()
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            msg = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}"
            param = None
        else:
            loc = [str(x) for x in first.get("loc", ()) if x != "body"]
            param = ".".join(loc) or None
            msg = f"invalid request: {param + ': ' if param else ''}{first.get('msg', 'bad value')}"
        err = APIError(400, msg, param=param)
        state.metrics.errors.labels(err.type).inc()
        return JSONResponse(err.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        err = APIError(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500
                       else "server_error")
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        # Any failure without a better answer: OpenAI's error shape, no traceback sent to the client.
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        status, code = (504, "engine_timeout") if isinstance(exc, EngineTimeout) else (500, "internal_error")
        err = APIError(status, f"internal error: {type(exc).__name__}: {shorten(str(exc))}", "server_error", code)
        state.metrics.errors.labels(err.type).inc()
        return JSONResponse(err.body(), status_code=status)

    @app.get("/health")
    async def health():
        if state.engine is not None:
            problem = await state.engine_problem()
            if problem is not None:
                return JSONResponse({"status": "error", "error": problem, "model": config.model_id}, status_code=503)
            return {"status": "ok", "model": config.model_id, "voices": len(state.engine.voices),
                    "sessions": len(state.engine.sessions), "max_sessions": state.engine.max_sessions}
        if state.load_error:
            return JSONResponse({"status": "error", "error": state.load_error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        if state.engine is not None:
            state.metrics.voices.set(len(state.engine.voices))
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_id, "object": "model", "created": int(state.started),
                                            "owned_by": "openchroma"}]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        if model_id != config.model_id:
            raise APIError(404, f"unknown model {clip(model_id)}; this server serves {config.model_id!r}",
                           code="model_not_found", param="model")
        return {"id": config.model_id, "object": "model", "created": int(state.started), "owned_by": "openchroma"}

    app.include_router(voices.router)
    app.include_router(openai_http.router)
    app.include_router(realtime.router)
    if STATIC_DIR.is_dir():
        app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="client")
    else:
        @app.get("/")
        async def no_client():
            return PlainTextResponse("OpenChroma server (the browser client's files are not installed)")

    app.add_middleware(BodyLimit, limit=config.max_upload_bytes)
    app.add_middleware(CheckOrigin, state=state)
    app.add_middleware(RequireKey, state=state)   # outermost: nothing runs for a request without the key
    install_log_redaction()
    return app


def uvicorn_options(config: ServerConfig) -> dict[str, Any]:
    """What ``uvicorn.run``/``uvicorn.Config`` need besides host and port: the sans-I/O WebSocket implementation
    (it reads one message at a time, so a connection that stops reading pushes back on its client, and its sends
    wait while the client does not read) and the protocol's message cap (twice the event cap: events between
    the two get an ``error`` event, larger messages close the connection with 1009)."""
    return {"ws": "websockets-sansio", "ws_max_size": config.ws_protocol_max_bytes}


def get_state(request: Request) -> ServerState:
    return request.app.state.oc
