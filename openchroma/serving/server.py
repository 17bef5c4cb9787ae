"""How the app runs under uvicorn: the WebSocket and HTTP settings, a deadline for request headers, and the
shutdown drain (SIGTERM: stop accepting, let running responses finish within ``shutdown_grace``, tell the clients,
then exit)."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .state import ServerConfig, ServerState

log = logging.getLogger("openchroma.serve")

LAST_WORDS_SECONDS = 2.0   # after the grace: time for ended streams and sessions to send their last events


class HeaderDeadlineH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for a new connection's request headers (uvicorn's keep-alive timeout
    only starts after a first response): a connection that sends nothing, or never finishes its headers, is closed
    after ``header_timeout`` seconds."""

    header_timeout = 5.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.header_deadline = self.loop.call_later(self.header_timeout, self._headers_too_late)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.header_deadline is not None and self.conn.their_state is not h11.IDLE:   # the headers are in
            self.header_deadline.cancel()
            self.header_deadline = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
            self.header_deadline = None
        super().connection_lost(exc)

    def _headers_too_late(self) -> None:
        self.header_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.info("closing a connection that sent no request within %g s", self.header_timeout)
            self.transport.close()


def uvicorn_options(config: ServerConfig) -> dict[str, Any]:
    """What ``uvicorn.run``/``uvicorn.Config`` need besides host and port: the sans-I/O WebSocket implementation
    (it reads one message at a time, so a connection that stops reading pushes back on its client, and its sends
    wait while the client does not read), the protocol's message cap (twice the event cap: events between the two
    get an ``error`` event, larger messages close the connection with 1009), the keepalive pings, and the h11
    protocol with a header deadline."""
    http = type("HeaderDeadlineH11", (HeaderDeadlineH11,), {"header_timeout": config.header_timeout})
    return {"ws": "websockets-sansio", "ws_max_size": config.ws_protocol_max_bytes,
            "ws_ping_interval": config.ws_ping_interval or None, "ws_ping_timeout": config.ws_ping_timeout or None,
            "http": http}


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose shutdown drains first: see ``drain``."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.oc_state = state

    async def shutdown(self, sockets=None) -> None:
        for server in self.servers:   # stop accepting
            server.close()
        await drain(self.oc_state)
        await super().shutdown(sockets)


async def drain(state: ServerState) -> None:
    """Refuse new requests and responses; let what runs finish until ``shutdown_grace`` has passed; then end the
    rest: realtime sessions get a final ``error`` event (``server_shutting_down``) and close 1001, SSE streams an
    error event and ``[DONE]``."""
    d = state.drain
    d.begin(state.config.shutdown_grace)
    busy = lambda: bool(state.connections) or d.streams > 0   # noqa: E731
    if busy():
        log.info("shutting down: %d realtime sessions and %d streams get up to %g s to finish",
                 len(state.connections), d.streams, state.config.shutdown_grace)
    while busy() and time.monotonic() < d.deadline:
        await asyncio.sleep(0.05)
    d.expired.set()
    until = time.monotonic() + LAST_WORDS_SECONDS
    while busy() and time.monotonic() < until:
        await asyncio.sleep(0.05)


def run_server(app, host: str, port: int, log_level: str = "info", timeout_graceful_shutdown: float = 5) -> int:
    """Serve ``app`` (from ``create_app``) until SIGINT or SIGTERM, then drain and exit: 0. When the model cannot
    be loaded the server stops at once, prints one line naming the cause and the fix, and returns 1 (a server with
    no model must not keep running)."""
    state: ServerState = app.state.oc
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=timeout_graceful_shutdown, **uvicorn_options(state.config))
    server = DrainingServer(config, state)
    state.on_load_failure = lambda: setattr(server, "should_exit", True)   # read by uvicorn's loop
    server.run()
    if state.load_error is not None:
        print(f"openchroma serve: error: {state.load_error}", file=sys.stderr)
        return 1
    return 0 if server.started else 3   # 3: uvicorn's "startup failed", as uvicorn.run exits
