"""The listening page on FastAPI and uvicorn, as the server runs (imported only when a test is served)."""

from __future__ import annotations

import asyncio
import json
import mimetypes
import random
import socket
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

MAX_ANSWER_BYTES = 4096


def create_app(store: Any, rng: random.Random, questions: dict[str, str], static: Path) -> FastAPI:
    """The listening page's FastAPI app: the page (files in ``static``), the next trial (``questions``: name ->
    the question's wording), the clips by token, and answers."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    rng_lock = threading.Lock()
    no_store = {"Cache-Control": "no-store"}

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=no_store)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, "not found" if exc.status_code == 404 else str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(400, "bad request")

    def static_file(name: str) -> Response:
        kind = {"html": "text/html", "js": "text/javascript", "css": "text/css"}[name.rsplit(".", 1)[1]]
        return Response((static / name).read_bytes(), media_type=kind + "; charset=utf-8", headers=no_store)

    @app.get("/")
    @app.get("/index.html")
    def page() -> Response:
        return static_file("listen.html")

    @app.get("/listen.js")
    def script() -> Response:
        return static_file("listen.js")

    @app.get("/listen.css")
    def style() -> Response:
        return static_file("listen.css")

    @app.get("/api/next")
    def next_trial(rater: str = "") -> JSONResponse:
        rater = rater.strip()
        if not rater:
            return error(400, "rater is required")
        with rng_lock:
            trial = store.present(rater, rng)
        done, total = store.progress(rater)
        if trial is None:
            return JSONResponse({"finished": True, "done": done, "total": total}, headers=no_store)
        t = trial["token"]
        return JSONResponse({
            "finished": False, "token": t, "question": trial["question"],
            "prompt": questions.get(trial["question"], trial["question"]), "done": done, "total": total,
            "reference": f"/audio/{t}/ref", "clips": [f"/audio/{t}/1", f"/audio/{t}/2"]}, headers=no_store)

    @app.get("/audio/{token}/{slot}")
    def clip(token: str, slot: str) -> Response:
        path = store.audio_path(token, slot)
        if path is None or not path.is_file():
            return error(404, "no such clip")
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=kind, headers=no_store)

    @app.post("/api/answer")
    async def answer(request: Request) -> JSONResponse:
        if int(request.headers.get("content-length") or 0) > MAX_ANSWER_BYTES:
            return error(413, "request too large")
        body = await request.body()
        if len(body) > MAX_ANSWER_BYTES:
            return error(413, "request too large")
        try:
            obj = json.loads(body or b"{}")
            await asyncio.to_thread(store.record, str(obj.get("token", "")), str(obj.get("choice", "")))
        except KeyError:
            return error(404, "unknown trial token")
        except (ValueError, AttributeError) as e:
            return error(400, str(e))
        return JSONResponse({"ok": True}, headers=no_store)

    return app


class ListeningServer:
    """The page served by uvicorn from a background thread; ``shutdown()`` stops it."""

    def __init__(self, address: tuple[str, int], store: Any, rng: random.Random, questions: dict[str, str],
                 static: Path):
        self.store = store
        # Bound here, so a taken port raises OSError in the caller rather than in the server's thread.
        self._socket = socket.create_server(address, reuse_port=False)
        self.server_address = self._socket.getsockname()
        config = uvicorn.Config(create_app(store, rng, questions, static), log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="openchroma-listen", daemon=True)
        self._thread.start()
        while not self._server.started and self._thread.is_alive():
            time.sleep(0.01)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def shutdown(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()
