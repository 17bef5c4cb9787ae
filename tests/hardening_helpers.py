"""Shared by the hardening, fuzz and soak tests: a raw realtime client, log capture, process memory."""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import logging
import time
from collections.abc import Iterator

import httpx
import numpy as np
import websockets.sync.client as ws_client
from server_harness import SPEECH_WAV

TRANSCRIPT = "Hello there. Could you tell me what the weather will be like tomorrow?"
PROBE_TYPE = "probe.ping"   # an unknown event type: always answered with an error event carrying its event_id


def add_voice(url: str, name: str = "lib") -> None:
    with open(SPEECH_WAV, "rb") as f:
        r = httpx.post(f"{url}/v1/voices", files={"file": ("speech.wav", f, "audio/wav")},
                       data={"name": name, "transcript": TRANSCRIPT}, timeout=60)
    assert r.status_code == 201, r.text


def ws_url(url: str) -> str:
    return url.replace("http://", "ws://") + "/v1/realtime"


def connect(url: str, **kw):
    kw.setdefault("max_size", None)
    kw.setdefault("open_timeout", 30)
    return ws_client.connect(ws_url(url), **kw)


def recv(ws, kind: str | None = None, limit: float = 30.0) -> dict:
    """The next event (of type ``kind`` if given), waiting at most ``limit`` seconds in all."""
    deadline = time.monotonic() + limit
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {kind or 'event'} within {limit} s")
        ev = json.loads(ws.recv(timeout=left))
        if kind is None or ev["type"] == kind:
            return ev


def probe(ws, tag: str, limit: float = 30.0) -> list[dict]:
    """Send a probe and return every event received up to its answer: proves the socket is up and the
    connection's processor is not stuck."""
    ws.send(json.dumps({"type": PROBE_TYPE, "event_id": tag}))
    seen = []
    deadline = time.monotonic() + limit
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"probe {tag} unanswered within {limit} s; got {[e['type'] for e in seen][-10:]}")
        ev = json.loads(ws.recv(timeout=left))
        if ev["type"] == "error" and ev["error"].get("event_id") == tag:
            return seen
        seen.append(ev)


def pcm16_b64(x: np.ndarray) -> str:
    return base64.b64encode((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()).decode()


class LogRecords(logging.Handler):
    """Collects records from the server's loggers (uvicorn's access and error logs, openchroma's)."""

    NAMES = ("uvicorn.access", "uvicorn.error", "uvicorn", "openchroma", "openchroma.realtime", "openchroma.serve",
             "fastapi", "starlette", "")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def text(self) -> str:
        return "\n".join(r.getMessage() for r in self.records)

    def errors(self) -> list[str]:
        """Records at ERROR or above, or with a traceback attached."""
        return [f"{r.name} {r.levelname}: {r.getMessage()[:300]}" for r in self.records
                if r.levelno >= logging.ERROR or r.exc_info]


@contextlib.contextmanager
def captured_logs() -> Iterator[LogRecords]:
    handler = LogRecords()
    loggers = [logging.getLogger(n) for n in LogRecords.NAMES]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield handler
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def rss_bytes() -> int:
    """This process's resident memory (the in-process test server included), after glibc hands its free heap back
    (a burst of large requests leaves freed arenas resident; they are reused, not leaked)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def wait_until(cond, limit: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


class RawNonReader:
    """A WebSocket client on a bare socket that sends events and never reads what it is sent (a small receive
    window, set before connecting, so the server's sends back up quickly)."""

    def __init__(self, url: str, rcvbuf: int = 4096):
        import os
        import socket

        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(30)
        self.sock.connect((host, int(port)))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(f"GET /v1/realtime HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                          f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                          .encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head

    def send(self, text: str) -> None:
        import os
        import struct

        payload = text.encode()
        n = len(payload)
        header = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n)
                                  if n < 65536 else bytes([0x80 | 127]) + struct.pack(">Q", n))
        mask = os.urandom(4)
        data = np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), n)
        self.sock.sendall(header + mask + data.tobytes())

    def close(self) -> None:
        import socket

        try:
            self.sock.shutdown(socket.SHUT_RDWR)   # wakes a thread blocked sending
        except OSError:
            pass
        self.sock.close()


#: A realtime session without turn detection, answering in the library voice ``lib``.
MANUAL = {"type": "realtime", "audio": {"input": {"turn_detection": None}, "output": {"voice": "lib"}}}


def open_manual(url: str, **kw):
    ws = connect(url, **kw)
    assert recv(ws)["type"] == "session.created"
    ws.send(json.dumps({"type": "session.update", "session": MANUAL}))
    recv(ws, "session.updated")
    return ws


def user_text(text: str = "Hello there.") -> str:
    return json.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})
