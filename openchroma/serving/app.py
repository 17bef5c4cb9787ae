"""The HTTP/WebSocket server: one FastAPI app around one engine.

Routes live in their own modules (``realtime``, ``openai_http``, ``voices``); this module holds what they
share: the configuration, the loaded engine (loaded in the background so ``/health`` can say "loading"),
API-key checks, OpenAI-shaped errors and request size caps.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

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

    @property
    def max_response_frames(self) -> int:
        return max(1, int(self.max_response_seconds * 12.5))


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
        if name and name in engine.voices:
            return name
        fallback = self.config.default_voice
        library = [v for v in engine.voices if not v.startswith("_adhoc_")]   # not voices cloned per request
        if fallback is None and len(library) == 1:
            fallback = library[0]
        if name and name not in OPENAI_STOCK_VOICES:
            raise APIError(404, f"unknown voice {name!r}; voices in the library: "
                                f"{', '.join(sorted(engine.voices)) or 'none'} (add one with POST /v1/voices)",
                           code="voice_not_found", param="voice")
        if fallback is None or fallback not in engine.voices:
            raise APIError(400, "no voice to speak in: the library has "
                                f"{len(engine.voices)} voices and no default; name one (voices: "
                                f"{', '.join(sorted(engine.voices)) or 'none'}) or add one with POST /v1/voices",
                           code="voice_required", param="voice")
        return fallback


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


def _is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or not (path.startswith("/v1/") or path == "/metrics")


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

    @app.get("/health")
    async def health():
        if state.engine is not None:
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
            raise APIError(404, f"unknown model {model_id!r}; this server serves {config.model_id!r}",
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
    app.add_middleware(RequireKey, state=state)   # outermost: nothing runs for a request without the key
    return app


def get_state(request: Request) -> ServerState:
    return request.app.state.oc
