"""``/v1/realtime/calls``: the realtime protocol over WebRTC, as OpenAI defines it.

The client POSTs an SDP offer (``application/sdp``, or multipart with ``sdp`` and a ``session`` JSON config) and
gets ``201`` with the SDP answer and ``Location: /v1/realtime/calls/{call_id}``. Audio travels as Opus on the
media tracks (``webrtc_media``: resampled between 48 kHz and the engine's rates); the ``oai-events`` data channel
carries the same JSON client and server events as the WebSocket, except the audio deltas (the audio is on the
track) and with OpenAI's ``output_audio_buffer.*`` events. ``POST /v1/realtime/calls/{call_id}/hangup`` ends a call.

The API key and Origin rules are the middleware's (``guards``), as for every ``/v1`` route. Without aiortc (the
``webrtc`` extra) the routes answer 501 saying so.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from typing import Any

from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import Response

from . import realtime_events as ev
from .codecs import InputDecoder
from .errors import APIError, clip, shorten
from .guards import client_id
from .realtime import MAX_PENDING_EVENTS, load_event
from .realtime_core import Ending, Inbox, RealtimeCore
from .realtime_events import RealtimeError
from .realtime_input import new_id
from .state import ServerState

try:
    from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription

    from .webrtc_media import OutboundAudio, read_track
except ImportError:   # the webrtc extra is not installed: the routes say so
    RTCPeerConnection = None

log = logging.getLogger("openchroma.webrtc")
router = APIRouter()

DATA_CHANNEL = "oai-events"
MAX_OFFER_BYTES = 64 * 1024
CONNECT_TIMEOUT = 30.0   # seconds from the answer for the peer to connect
MAX_SIDEBAND_BACKLOG = 1024   # server events queued for a sideband WebSocket before it is dropped


class WebRTCCall:
    """One call: a peer connection whose data channel and audio tracks are the transport of one ``RealtimeCore``."""

    def __init__(self, state: ServerState, calls: dict[str, WebRTCCall]):
        self.state, self.cfg, self.calls = state, state.config, calls
        self.id = new_id("rtc")
        self.core = RealtimeCore(state, self)   # APIError while the model loads
        self.inbox = Inbox(self.core, MAX_PENDING_EVENTS, self.cfg.max_pending_input_bytes)
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[ice_server(s) for s in self.cfg.ice_servers]))
        self.outbound = OutboundAudio()
        self.outbound.on_started = lambda rid: self.emit({"type": "output_audio_buffer.started", "response_id": rid})
        self.outbound.on_stopped = lambda rid: self.emit({"type": "output_audio_buffer.stopped", "response_id": rid})
        self.channel = None
        self.pending: list[str] = []   # server events sent before the data channel opened
        self.response_id: str | None = None   # the response whose audio the track plays
        self.silenced: set[str] = set()        # responses whose audio was cleared: the rest of it is dropped
        self.stopping = asyncio.Event()
        self.connected = asyncio.Event()
        self.tasks: list[asyncio.Task] = []
        self.watchers: set[asyncio.Queue] = set()   # sideband WebSockets: every server event goes to them too
        self.closed = False

    # ----- the EventSink ------------------------------------------------------------------------------------
    async def send(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "response.output_audio.delta":   # the audio goes on the track, not the data channel
            self.play(event)
            return
        if kind == "response.output_audio.done" and self.response_id:
            self.outbound.end_response(self.response_id)
        elif kind == "input_audio_buffer.speech_started" and (self.core.settings.turn_detection or {}).get(
                "interrupt_response", True):
            self.clear_output()
        elif kind == "response.done" and event["response"].get("status") == "cancelled":
            self.clear_output()
        self.emit(event)

    def end(self, reason: Ending) -> None:
        self.stopping.set()

    def heard_ms(self, item_id: str) -> float | None:
        """What the listener heard of the current response (whose item is ``item_id``): the audio the outbound
        track sent."""
        return self.outbound.heard_ms(self.response_id) if self.response_id else None

    def emit(self, event: dict[str, Any]) -> None:
        event.setdefault("event_id", new_id("event"))
        data = json.dumps(event, separators=(",", ":"))
        if self.channel is not None and self.channel.readyState == "open":
            self.channel.send(data)
        elif not self.closed:
            self.pending.append(data)
        for queue in list(self.watchers):
            if queue.qsize() >= MAX_SIDEBAND_BACKLOG:   # a watcher that stopped reading is dropped, not waited on
                self.watchers.discard(queue)
                queue.put_nowait(None)
            else:
                queue.put_nowait(data)

    def play(self, event: dict[str, Any]) -> None:
        self.response_id = event.get("response_id") or self.response_id
        if self.response_id in self.silenced:   # deltas of a response cleared while it was being cancelled
            return
        decoder = InputDecoder(self.core.settings.output_format["type"])
        self.outbound.push(self.response_id or "", decoder.decode(base64.b64decode(event["delta"])), decoder.rate)

    def clear_output(self) -> None:
        """Stop playing the current response: drop what is queued and what of it still comes."""
        if self.response_id:
            self.silenced.add(self.response_id)
        if self.outbound.clear():
            self.emit({"type": "output_audio_buffer.cleared", "response_id": self.response_id})

    # ----- lifecycle ----------------------------------------------------------------------------------------
    async def start(self, offer_sdp: str, session: dict[str, Any] | None, client: str) -> str:
        """Open the engine session, apply ``session``, answer the offer; raises ``APIError``."""
        try:
            await self.core.open(client)
            if session is not None:
                event = {"type": "session.update", "session": session}
                await self.core.update_session(ev.parse_event(event, self.cfg.max_text_chars).session)
            self.pc.addTrack(self.outbound)
            self.pc.on("datachannel", self.on_datachannel)
            self.pc.on("track", self.on_track)
            self.pc.on("connectionstatechange", self.on_state)
            try:
                await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            except Exception as e:   # aiortc's parser raises ValueError and others on a bad offer
                raise APIError(400, f"the SDP offer could not be used: {type(e).__name__}: {shorten(str(e))}",
                               param="sdp", code="invalid_offer") from None
            await self.pc.setLocalDescription(await self.pc.createAnswer())   # gathers the ICE candidates
        except RealtimeError as e:
            await self.close()
            raise APIError(400, e.message, code=e.code, param=f"session{'.' + e.param if e.param else ''}") from None
        except BaseException:
            await self.close()
            raise
        self.calls[self.id] = self
        self.state.connections.add(self)
        self.tasks = [asyncio.create_task(c) for c in (self.inbox.run(self.stopping), self.watch(),
                                                         self.watch_connect())]
        return self.pc.localDescription.sdp

    def on_datachannel(self, channel) -> None:
        if channel.label != DATA_CHANNEL:
            return
        self.channel = channel
        channel.on("message", self.on_message)
        if channel.readyState == "open":
            self.flush_pending()
        else:
            channel.on("open", self.flush_pending)

    def flush_pending(self) -> None:
        pending, self.pending = self.pending, []
        for data in pending:
            self.channel.send(data)

    def on_track(self, track) -> None:
        if track.kind == "audio":
            self.tasks.append(asyncio.create_task(read_track(track, lambda: self.core.input.rate, self.put_audio)))

    async def put_audio(self, samples) -> None:
        await self.inbox.put_audio(samples, None)

    async def on_message(self, message: str | bytes) -> None:
        text = message.decode(errors="replace") if isinstance(message, bytes) else message
        try:
            event = load_event(text)
        except (ValueError, RecursionError):
            await self.core.send_error("the message is not valid JSON", "invalid_json")
            return
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            await self.core.send_error("an event must be a JSON object with a string 'type'", "invalid_event")
            return
        eid = event.get("event_id")
        eid = eid[:128] if isinstance(eid, str) else None
        if event["type"] == "output_audio_buffer.clear":   # WebRTC only: stop playing now
            self.clear_output()
            return
        if event["type"] == "input_audio_buffer.append":
            try:
                await self.inbox.put_audio(self.core.decode_append(event), eid)
            except RealtimeError as e:
                await self.core.send_error(e.message, e.code, e.param, e.type, event_id=eid)
            return
        await self.inbox.put_event(event, eid)

    async def on_state(self) -> None:
        if self.pc.connectionState == "connected":
            self.connected.set()
        if self.pc.connectionState in ("failed", "closed"):
            self.stopping.set()

    async def watch_connect(self) -> None:
        """A call whose peer never connects (ICE failed to find a path) must not hold its engine session."""
        try:
            await asyncio.wait_for(self.connected.wait(), CONNECT_TIMEOUT)
        except TimeoutError:
            log.info("webrtc call %s: the peer did not connect within %g s; closing", self.id, CONNECT_TIMEOUT)
            self.stopping.set()

    async def watch(self) -> None:
        """Close the call once it is told to stop, or on shutdown once the running response has finished."""
        drain = self.state.drain
        waits = [asyncio.create_task(self.stopping.wait()), asyncio.create_task(drain.begun.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if drain.draining and not self.stopping.is_set():
                await self.core.drain(drain.deadline)
        finally:
            for w in waits:
                w.cancel()
        await self.close()

    async def close(self) -> None:
        """Hang up (once): stop the session, free the engine, close the peer connection."""
        if self.closed:
            return
        self.closed = True
        self.stopping.set()
        self.calls.pop(self.id, None)
        self.state.connections.discard(self)
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        for queue in self.watchers:
            queue.put_nowait(None)
        await self.core.close()
        self.outbound.stop()
        with contextlib.suppress(Exception):
            await self.pc.close()


def ice_server(url: str) -> RTCIceServer:
    """``stun:HOST:PORT``, or ``turn:USER:PASSWORD@HOST:PORT`` (the credentials taken out of the URL)."""
    scheme, _, rest = url.partition(":")
    if "@" in rest:
        creds, _, host = rest.rpartition("@")
        user, _, password = creds.partition(":")
        return RTCIceServer(urls=f"{scheme}:{host}", username=user, credential=password)
    return RTCIceServer(urls=url)


def _calls(request: Request) -> dict[str, WebRTCCall]:
    if RTCPeerConnection is None:
        raise APIError(501, "WebRTC is not available on this server: install the 'webrtc' extra (pip install "
                            "'openchroma[webrtc]', which brings aiortc) or use the WebSocket at /v1/realtime",
                       "server_error", "webrtc_unavailable")
    app_state = request.app.state
    if not hasattr(app_state, "webrtc_calls"):
        app_state.webrtc_calls = {}
        app_state.realtime_sideband = sideband   # the WebSocket route hands /v1/realtime?call_id=... here
    return app_state.webrtc_calls


async def read_offer(request: Request) -> tuple[str, dict[str, Any] | None]:
    """The SDP offer and the optional session config, from an ``application/sdp`` or multipart body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    session = None
    if ctype == "multipart/form-data":
        form = await request.form()
        sdp, raw = form.get("sdp"), form.get("session")
        sdp = (await sdp.read()).decode(errors="replace") if hasattr(sdp, "read") else sdp
        raw = (await raw.read()).decode(errors="replace") if hasattr(raw, "read") else raw
        if raw:
            try:
                session = json.loads(raw)
            except ValueError as e:
                raise APIError(400, f"'session' is not valid JSON: {shorten(str(e), 120)}", param="session") from None
            if not isinstance(session, dict):
                raise APIError(400, "'session' must be a JSON object (the session config)", param="session")
            session = {k: v for k, v in session.items() if k not in ("model",)}
    else:
        body = await request.body()
        if len(body) > MAX_OFFER_BYTES:
            raise APIError(413, f"an SDP offer of {len(body)} bytes is over {MAX_OFFER_BYTES}", param="sdp")
        sdp = body.decode(errors="replace")
    if not isinstance(sdp, str) or not sdp.strip().startswith("v="):
        raise APIError(400, "the body must be an SDP offer (Content-Type: application/sdp), or multipart with an "
                            "'sdp' field and an optional 'session' JSON field", param="sdp", code="invalid_offer")
    return sdp, session


@router.post("/v1/realtime/calls", status_code=201)
async def create_call(request: Request, model: str | None = None) -> Response:
    calls = _calls(request)
    state: ServerState = request.app.state.oc
    if model is not None and model != state.config.model_id:
        raise APIError(404, f"unknown model {clip(model)}; this server serves {state.config.model_id!r}",
                       code="model_not_found", param="model")
    sdp, session = await read_offer(request)
    call = WebRTCCall(state, calls)
    answer = await call.start(sdp, session, client_id(request.scope))
    log.info("webrtc call %s: session %s started", call.id, call.core.sid)
    return Response(answer, status_code=201, media_type="application/sdp",
                    headers={"Location": f"/v1/realtime/calls/{call.id}"})


@router.post("/v1/realtime/calls/{call_id}/hangup")
async def hangup(call_id: str, request: Request) -> Response:
    call = _calls(request).get(call_id)
    if call is None:
        raise APIError(404, f"no call {clip(call_id)} (it ended, or never existed)", code="call_not_found",
                       param="call_id")
    await call.close()
    return Response(status_code=200)


async def sideband(ws: WebSocket, call_id: str) -> None:
    """``/v1/realtime?call_id=...`` (the WebSocket route hands it here, key checked and accepted): a server watches a
    call's server events and sends client events into it, as its data channel does, until either side ends."""
    call = getattr(ws.app.state, "webrtc_calls", {}).get(call_id)
    if call is None or call.closed:
        event = {"type": "error", "event_id": new_id("event"), "error": {
            "type": "invalid_request_error", "code": "call_not_found", "param": "call_id",
            "message": f"no call {clip(call_id)} (it ended, or never existed)"}}
        with contextlib.suppress(Exception):
            await ws.send_text(json.dumps(event))
            await ws.close(code=1008, reason="no such call")
        return
    queue: asyncio.Queue = asyncio.Queue()
    call.watchers.add(queue)

    async def forward() -> None:
        while (data := await queue.get()) is not None:
            await ws.send_text(data)

    async def read() -> None:
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            await call.on_message(msg.get("text") or (msg.get("bytes") or b"").decode(errors="replace"))

    tasks = [asyncio.create_task(forward()), asyncio.create_task(read())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        call.watchers.discard(queue)
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await ws.close(code=1000, reason="call ended" if call.closed else "")
