"""Run the real server (uvicorn) on a free loopback port in a background thread, for tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import uvicorn

from openchroma.engine import Engine
from openchroma.pipeline import Chroma
from openchroma.serving.app import ServerConfig, create_app, uvicorn_options
from openchroma.serving.server import DrainingServer
from openchroma.serving.state import engine_limits

ROOT = Path(__file__).resolve().parents[1]
SPEECH_WAV = ROOT / "tests" / "data" / "speech.wav"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(app, log_level: str = "warning") -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 until the block ends; yields the base URL (``http://127.0.0.1:PORT``)."""
    port = free_port()
    server = DrainingServer(uvicorn.Config(app, host="127.0.0.1", port=port, log_level=log_level, lifespan="on",
                                           **uvicorn_options(app.state.oc.config)), app.state.oc)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def chroma_server(chroma: Chroma, data_dir: Path, log_level: str = "warning", **config) -> Iterator[tuple[str, object]]:
    """A fresh engine over ``chroma`` behind a fresh app (as after a restart); yields (base URL, app state)."""
    config.setdefault("max_response_seconds", 2.0)
    cfg = ServerConfig(model="tiny-random", data_dir=data_dir, model_id="chroma-tiny", **config)
    engine = Engine(chroma, max_sessions=cfg.max_sessions, max_context=cfg.max_context,
                    max_response_frames=cfg.max_response_frames, **engine_limits(cfg))
    app = create_app(cfg, engine)
    try:
        with running_server(app, log_level) as url:
            yield url, app.state.oc
    finally:
        engine.close()


@contextlib.contextmanager
def server_process(model: Path, data_dir: Path, *flags: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """``openchroma serve`` as a subprocess on a free loopback port (as it runs in production: signals, uvicorn's
    own loop); yields (base URL, the process) once ``/health`` says ready. Killed at the end if still running."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = open(Path(data_dir) / "server.log", "w")   # a file, not a pipe: a chatty server never blocks on it
    proc = subprocess.Popen([sys.executable, "-m", "openchroma", "serve", "--model", str(model), "--port", str(port),
                             "--data-dir", str(data_dir), "--log-level", "warning", *flags], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}: "
                                   f"{(Path(data_dir) / 'server.log').read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not get ready within 120 s")
            time.sleep(0.1)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()
