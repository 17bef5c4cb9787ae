"""The HTTP/WebSocket server: one FastAPI app around one engine.

This module only assembles the application: the routes live in their own modules (``realtime``, ``openai_http``,
``transcriptions``, ``voices``), what they share in ``state`` (configuration, the engine, the voice library),
``errors`` and ``sessions``, the checks every request passes in ``guards``, and how it runs (uvicorn settings,
the shutdown drain) in ``server``.
"""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Engine
from . import openai_http, realtime, transcriptions, twilio, voices, webrtc
from .errors import APIError, EngineTimeout, clip, pydantic_problem, shorten, wire_error
from .guards import BodyLimit, CheckOrigin, RefuseWhileDraining, RequireKey, install_log_redaction
from .server import run_server, uvicorn_options
from .state import ServerConfig, ServerState

__all__ = ["ServerConfig", "create_app", "run_server", "uvicorn_options"]

log = logging.getLogger("openchroma.serve")

STATIC_DIR = Path(__file__).parent / "static"


def create_app(config: ServerConfig, engine: Engine | None = None) -> FastAPI:
    """Build the app. With ``engine`` it serves at once; without, it loads ``config.model`` in the background."""
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
    _add_error_handlers(app, state)
    _add_info_routes(app, state)
    app.include_router(voices.router)
    app.include_router(openai_http.router)
    app.include_router(realtime.router)
    app.include_router(webrtc.router)   # answers 501 without the webrtc extra (aiortc)
    app.include_router(transcriptions.router)
    app.include_router(twilio.router)
    if STATIC_DIR.is_dir():
        app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="client")
    else:
        @app.get("/")
        async def no_client():
            return PlainTextResponse("OpenChroma server (the browser client's files are not installed)")

    app.add_middleware(BodyLimit, limit=config.max_upload_bytes)
    app.add_middleware(CheckOrigin, state=state)
    app.add_middleware(RequireKey, state=state)
    app.add_middleware(RefuseWhileDraining, state=state)   # outermost: nothing new starts once shutdown begins
    install_log_redaction()
    return app


def _add_error_handlers(app: FastAPI, state: ServerState) -> None:
    """Every error in OpenAI's shape, counted by type; no traceback ever reaches a client."""

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
            param, why, _ = pydantic_problem(errs)
            param = param or None
            msg = f"invalid request: {param + ': ' if param else ''}{why}"
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
        err = wire_error(exc) if isinstance(exc, EngineTimeout) else None
        err = err or APIError(500, f"internal error: {type(exc).__name__}: {shorten(str(exc))}", "server_error",
                              "internal_error")
        state.metrics.errors.labels(err.type).inc()
        return JSONResponse(err.body(), status_code=err.status)


def _add_info_routes(app: FastAPI, state: ServerState) -> None:
    """``/health``, ``/metrics`` and ``/v1/models``."""
    config = state.config

    @app.get("/health")
    async def health():
        if state.engine is not None:
            problem = await state.engine_problem()
            if problem is not None:
                return JSONResponse({"status": "error", "error": problem, "model": config.model_id}, status_code=503)
            return {"status": "ok", "model": config.model_id, "random_weights": state.random_weights,
                    "voices": len(state.engine.voices), **state.engine.step_mode,
                    "sessions": len(state.engine.sessions), "max_sessions": state.engine.max_sessions}
        if state.load_error:
            return JSONResponse({"status": "error", "error": state.load_error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        if state.engine is not None:
            state.metrics.voices.set(len(state.engine.voices))
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict[str, Any]:   # random_weights: ours, so clients can say the model speaks noise
        state.require_engine()   # 503 while loading or after a failed load: list no model that is not served
        return {"id": config.model_id, "object": "model", "created": int(state.started), "owned_by": "openchroma",
                "random_weights": state.random_weights}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        if model_id != config.model_id:
            raise APIError(404, f"unknown model {clip(model_id)}; this server serves {config.model_id!r}",
                           code="model_not_found", param="model")
        return model_card()
