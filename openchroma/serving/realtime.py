"""``/v1/realtime`` over a WebSocket: the thin transport around the protocol core (``realtime_core``).

It owns what is about the socket: the handshake (API key, subprotocol), JSON framing and the event size cap,
the budgets that push a client back through TCP when the engine is behind, the send time limit for a client that
stops reading, the idle timeout, the shutdown drain, and the close codes (docs/serving-limits.md lists them).
Large messages are parsed and their audio decoded in a helper thread, so one client's 8 MiB append never holds
the event loop (and every other client's audio) while it is decoded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse

from . import realtime_server_events as out
from .errors import APIError, shorten
from .guards import check_api_key, client_id
from .realtime_core import Ending, Inbox, RealtimeCore
from .realtime_events import RealtimeError
from .realtime_input import LARGE_CHARS, new_id
from .state import ServerState

log = logging.getLogger("openchroma.realtime")
router = APIRouter()

MAX_PENDING_EVENTS = 64          # client events read but not yet applied; past this the reader stops reading
KEY_SUBPROTOCOL = "openai-insecure-api-key."
# Close codes (docs/serving-limits.md): what a client sees when the server ends its connection.
CLOSE_GOING_AWAY = 1001          # the server is shutting down
CLOSE_NOT_READING = 1008         # policy: the client stopped reading what it is sent
CLOSE_ENGINE_FAILED = 1011       # an engine call failed to answer; the session was freed
CLOSE_TRY_AGAIN = 1013           # session limits, model not ready, or the server could not take the client's events
CLOSE_IDLE = 4000                # idle for --idle-timeout seconds
ENDINGS: dict[Ending, tuple[int, str]] = {"engine_failed": (CLOSE_ENGINE_FAILED, "engine did not answer")}


class WebSocketTransport:
    """One realtime connection over a WebSocket: reads and frames events for the core, sends the core's events."""

    def __init__(self, ws: WebSocket, state: ServerState):
        self.ws, self.state, self.cfg = ws, state, state.config
        self.core = RealtimeCore(state, self)   # APIError while the model loads
        self.inbox = Inbox(self.core, MAX_PENDING_EVENTS, self.cfg.max_pending_input_bytes)
        self.send_lock = asyncio.Lock()
        self.closed = False
        self.close_code: tuple[int, str] | None = None   # set when the server decides to end the connection
        self.stopping = asyncio.Event()
        self.activity = asyncio.Event()   # set by every client message (the idle watch clears it)

    @property
    def sid(self) -> str:
        return self.core.sid

    @property
    def session(self):
        """The engine session (``AsyncSession``), None once closed."""
        return self.core.session

    # ----- the EventSink ------------------------------------------------------------------------------------
    async def send(self, event: dict[str, Any]) -> None:
        event.setdefault("event_id", new_id("event"))
        data = json.dumps(event, separators=(",", ":"))
        async with self.send_lock:
            if self.closed:
                return
            try:
                # A client that stops reading fills the socket; the send then waits, at most this long.
                await asyncio.wait_for(self.ws.send_text(data), timeout=self.cfg.send_timeout or None)
            except TimeoutError:
                self.closed = True
                log.warning("realtime session %s: the client read nothing for %g s; closing", self.sid,
                            self.cfg.send_timeout)
                self.stop(CLOSE_NOT_READING, "client is not reading")
            except Exception:  # the client went away: the reader will notice and clean up
                self.closed = True
                self.stopping.set()

    def end(self, reason: Ending) -> None:
        self.stop(*ENDINGS[reason])

    def stop(self, code: int, reason: str) -> None:
        """End the connection from the server's side with ``code`` (the first reason given wins)."""
        if self.close_code is None:
            self.close_code = (code, reason)
        self.stopping.set()

    # ----- lifecycle ----------------------------------------------------------------------------------------
    async def serve(self) -> None:
        tasks = [asyncio.create_task(c) for c in (self.read(), self.inbox.run(self.stopping), self.stopping.wait(),
                                                   self.watch_idle(), self.watch_drain())]
        try:
            await asyncio.wait(tasks[:3], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await self.core.close()   # a response being stopped may still say how it ended, briefly
            self.closed = True
            if self.close_code is not None:
                code, reason = self.close_code
                with contextlib.suppress(Exception):   # a client that reads nothing never gets the close frame
                    await asyncio.wait_for(self.ws.close(code=code, reason=reason), timeout=1.0)

    async def watch_idle(self) -> None:
        """Close the session once neither the client nor a response has done anything for ``idle_timeout``."""
        timeout = self.cfg.idle_timeout
        if not timeout or timeout <= 0:
            return
        while True:
            self.activity.clear()
            try:
                await asyncio.wait_for(self.activity.wait(), timeout)
            except TimeoutError:
                if self.core.busy():   # a response is being generated: idle only from its end on
                    await self.core.responses.wait()
                    continue
                log.info("realtime session %s idle for %g s: closing", self.sid, timeout)
                await self.core.send_error(f"the session was idle for {timeout:g} s and is closed (the server's "
                                           "--idle-timeout)", "idle_timeout")
                self.stop(CLOSE_IDLE, "idle timeout")
                return

    async def watch_drain(self) -> None:
        """On shutdown: let a running response finish within the grace, send a last error event, close 1001."""
        drain = self.state.drain
        await drain.begun.wait()
        await self.core.drain(drain.deadline)
        self.stop(CLOSE_GOING_AWAY, "server shutting down")

    # ----- reading ------------------------------------------------------------------------------------------
    async def read(self) -> None:
        """Read client events until the client leaves; waits (pushing back on the client) while the core is behind
        by ``MAX_PENDING_EVENTS`` events or ``max_pending_input_bytes`` of audio, for at most
        ``backpressure_timeout`` seconds."""
        try:
            while not self.stopping.is_set():
                msg = await self.ws.receive()
                if msg["type"] == "websocket.disconnect":
                    return
                self.activity.set()
                text = msg.get("text")
                if text is None:
                    try:
                        text = (msg.get("bytes") or b"").decode()
                    except UnicodeDecodeError:
                        await self.core.send_error("binary WebSocket messages are not events: send JSON text",
                                                   "invalid_event")
                        continue
                if not await self.receive(text):
                    return
        except (WebSocketDisconnect, RuntimeError):   # RuntimeError: receive after the socket closed
            return

    async def receive(self, text: str) -> bool:
        """Frame one message for the core; False when the core could not take it in time (the connection ends)."""
        if len(text) > self.cfg.max_ws_message_bytes:
            await self.core.send_error(f"an event of {len(text)} bytes is over the limit of "
                                       f"{self.cfg.max_ws_message_bytes}; send audio in smaller appends (this event "
                                       "was dropped)", "message_too_large")
            return True
        try:
            if len(text) > LARGE_CHARS:
                kind, payload, eid = await asyncio.to_thread(self.parse, text)
            else:
                kind, payload, eid = self.parse(text)
        except RealtimeError as e:
            kind, payload, eid = "error", e, None
        if kind == "error":
            await self.core.send_error(payload.message, payload.code, payload.param, payload.type, event_id=eid)
            return True
        put = self.inbox.put_audio(payload, eid) if kind == "audio" else self.inbox.put_event(payload, eid)
        limit = self.cfg.backpressure_timeout
        try:
            await asyncio.wait_for(put, limit or None)
        except TimeoutError:
            log.warning("realtime session %s: its events could not be taken for %g s (the engine is behind); "
                        "closing", self.sid, limit)
            await self.core.send_error(f"the server could not take this client's events for {limit:g} s (back-"
                                       "pressure: the engine is behind); the session is closed", "backpressure_timeout",
                                       type="server_error")
            self.stop(CLOSE_TRY_AGAIN, f"back-pressure: events not taken for {limit:g} s")
            return False
        return True

    def parse(self, text: str) -> tuple[str, Any, str | None]:
        """One message as ("event", the JSON object, its event_id), ("audio", decoded samples, event_id) or ("error",
        the RealtimeError, event_id); raises ``RealtimeError`` for a message that is no event. Pure, so that large
        messages can be parsed in a helper thread."""
        try:
            event = load_event(text)
        except (ValueError, RecursionError) as e:   # JSONDecodeError, too many digits, nesting too deep
            why = "nested too deeply" if isinstance(e, RecursionError) else shorten(str(e), 120)
            raise RealtimeError(f"the message is not valid JSON: {why}", "invalid_json") from None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise RealtimeError("an event must be a JSON object with a string 'type'", "invalid_event")
        eid = event.get("event_id")
        eid = eid[:128] if isinstance(eid, str) else None
        if event["type"] != "input_audio_buffer.append":
            return "event", event, eid   # response.cancel too: it must find the response before it
        try:
            return "audio", self.core.decode_append(event), eid
        except RealtimeError as e:
            return "error", e, eid


_AUDIO_VALUE = re.compile(r'[{,]\s*"audio"\s*:\s*"')
_CUT = "\x00"   # what the audio string is replaced by, to find it again after parsing


def load_event(text: str) -> Any:
    """``json.loads(text)``, except that a large message's plain ``"audio"`` string (base64 has no quote or
    backslash) is cut out before the JSON parser runs: the parser copies a string in one call that holds the GIL, so
    a 15 MiB append would hold every other connection that long even from a helper thread. Anything not in that
    plain form (or where the cut could be mistaken for another value) is parsed whole."""
    if len(text) > LARGE_CHARS:
        m = _AUDIO_VALUE.search(text, 0, 4096)
        end = text.find('"', m.end()) if m else -1
        if end > 0 and text.find("\\", m.end(), end) < 0:
            cuts = []

            def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
                cuts.extend(1 for k, v in items if k == "audio" and v == _CUT)
                return dict(items)

            event = json.loads(text[:m.end()] + "\\u0000" + text[end:], object_pairs_hook=pairs)
            if len(cuts) == 1 and isinstance(event, dict) and event.get("audio") == _CUT:
                event["audio"] = text[m.end():end]
                return event
    return json.loads(text)


def accepted_subprotocol(offered: list[str]) -> str | None:
    """The subprotocol to answer with: "realtime" when offered, else the first that is not the API key (a key is
    never echoed back in ``Sec-WebSocket-Protocol``; a browser that offered only its key gets none)."""
    if "realtime" in offered:
        return "realtime"
    return next((p for p in offered if not p.startswith(KEY_SUBPROTOCOL)), None)


@router.websocket("/v1/realtime")
async def realtime_endpoint(ws: WebSocket) -> None:
    state: ServerState = ws.app.state.oc
    offered = list(ws.scope.get("subprotocols") or [])
    if not check_api_key(state.config, ws.headers, ws.query_params, offered):
        await _deny(ws, state)
        return
    try:
        await ws.accept(subprotocol=accepted_subprotocol(offered))
    except Exception:   # the client left during the handshake
        return
    if state.drain.draining:
        await _refuse(ws, APIError(503, "the server is shutting down", "server_error", "server_shutting_down"),
                      CLOSE_GOING_AWAY, "server shutting down")
        return
    if "call_id" in ws.query_params:   # the sideband of a WebRTC call (``webrtc`` registers it with its first call)
        sideband = getattr(ws.app.state, "realtime_sideband", None)
        if sideband is None:
            await _refuse(ws, APIError(404, "no such call", code="call_not_found"), 1008, "no such call")
        else:
            await sideband(ws, ws.query_params["call_id"])
        return
    try:
        conn = WebSocketTransport(ws, state)
        await conn.core.open(client_id(ws.scope))
    except APIError as e:  # still loading, failed to load, no free session
        reason = {"model_loading": "model not ready", "model_load_failed": "model not ready",
                  "client_session_limit_reached": "client session limit reached"}.get(e.code, "no session available")
        await _refuse(ws, e, CLOSE_TRY_AGAIN, reason)
        return
    state.connections.add(conn)
    try:
        await conn.serve()
    finally:
        state.connections.discard(conn)


async def _deny(ws: WebSocket, state: ServerState) -> None:
    state.metrics.errors.labels("authentication_error").inc()
    log.info("realtime: refused a connection without the API key")
    body = APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY' (or, from a browser, the "
                         f"'{KEY_SUBPROTOCOL}KEY' subprotocol)", "authentication_error", "invalid_api_key").body()
    try:
        await ws.send_denial_response(JSONResponse(body, status_code=401))
    except RuntimeError:  # the server cannot answer a WebSocket with HTTP: refuse with a policy close
        with contextlib.suppress(Exception):
            await ws.close(code=1008, reason="invalid API key")
    except Exception:   # the client left before hearing why
        pass


async def _refuse(ws: WebSocket, err: APIError, close_code: int, reason: str) -> None:
    with contextlib.suppress(Exception):
        event = out.error(err.message, err.code, None, err.type)
        event["event_id"] = new_id("event")
        await asyncio.wait_for(ws.send_text(json.dumps(event)), 1.0)
        await asyncio.wait_for(ws.close(code=close_code, reason=reason), 1.0)


async def close_all(state: ServerState) -> None:
    """The app is stopping: close what is still open (the drain has normally done it already)."""
    for conn in list(state.connections):
        with contextlib.suppress(Exception):
            await conn.ws.close(code=CLOSE_GOING_AWAY, reason="server shutting down")
        await conn.core.close()
