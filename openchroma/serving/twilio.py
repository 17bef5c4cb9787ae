"""Phone calls through Twilio Media Streams: a second transport around the realtime protocol core.

``POST /twilio/voice`` is the webhook a Twilio number calls: it answers TwiML that connects the call to
``/twilio/media-stream``, with the voice and instructions as ``<Parameter>``s (Twilio hands them back in the
stream's ``start`` message). With ``--twilio-auth-token`` the webhook checks ``X-Twilio-Signature`` (HMAC-SHA1 of
the URL Twilio requested followed by the sorted POST parameters, base64; 403 when wrong).

``/twilio/media-stream`` speaks Twilio's messages (docs/telephony.md): from Twilio ``connected``, ``start``,
``media`` (base64 μ-law at 8 kHz, 20 ms each), ``mark``, ``stop``; to Twilio ``media``, a ``mark`` after each
answer chunk, and ``clear`` when the caller talks over the answer. The core runs with G.711 μ-law in and out (its
encoder resamples the engine's 24 kHz), server VAD and barge-in on. Twilio buffers what it is sent and plays it in
real time, returning each mark once the audio before it has played: the last returned mark is exactly what the
caller heard, and that is where a barged-in answer is truncated (``heard_ms``, asked by the core).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
from typing import Any
from xml.sax.saxutils import quoteattr

from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response
from starlette.requests import HTTPConnection

from .errors import APIError
from .guards import client_id
from .realtime_core import Ending, Inbox, RealtimeCore
from .realtime_events import RealtimeError
from .realtime_settings import DEFAULT_VAD
from .state import ServerState, get_state

log = logging.getLogger("openchroma.twilio")
router = APIRouter()

MEDIA_PATH = "/twilio/media-stream"
MAX_PENDING_EVENTS = 64
START_TIMEOUT = 10.0   # seconds for Twilio's ``start`` after the socket opens


# ----- the webhook ----------------------------------------------------------------------------------------------
def twilio_signature(token: str, url: str, params: dict[str, str]) -> str:
    """Twilio's ``X-Twilio-Signature`` for a request to ``url`` with POST ``params``."""
    data = url + "".join(k + params[k] for k in sorted(params))
    return base64.b64encode(hmac.new(token.encode(), data.encode(), hashlib.sha1).digest()).decode()


def public_url(conn: HTTPConnection) -> tuple[str, str]:
    """(scheme, host) as the caller (Twilio, through a tunnel or proxy) saw them."""
    proto = conn.headers.get("x-forwarded-proto", conn.url.scheme).split(",")[0].strip().lower()
    host = conn.headers.get("x-forwarded-host") or conn.headers.get("host") or conn.url.netloc
    return proto, host.split(",")[0].strip()


def signature_ok(token: str, conn: HTTPConnection, params: dict[str, str]) -> bool:
    """Whether ``X-Twilio-Signature`` matches the URL Twilio requested (with or without a default port, which
    Twilio may or may not have signed; a WebSocket's as wss:// or https://) and ``params``."""
    given = conn.headers.get("x-twilio-signature", "")
    proto, host = public_url(conn)
    path = conn.url.path + (f"?{conn.url.query}" if conn.url.query else "")
    secure = proto in ("https", "wss")
    schemes = {"https"} if secure else {"http"}
    if conn.scope["type"] == "websocket":
        schemes.add("wss" if secure else "ws")
    port = "443" if secure else "80"
    hosts = {host, host.removesuffix(f":{port}") if host.endswith(f":{port}") else f"{host}:{port}"}
    return any(hmac.compare_digest(twilio_signature(token, f"{s}://{h}{path}", params), given)
               for s in schemes for h in hosts)


def twiml(stream_url: str, parameters: dict[str, str]) -> str:
    params = "".join(f"<Parameter name={quoteattr(k)} value={quoteattr(v)}/>" for k, v in parameters.items() if v)
    return ('<?xml version="1.0" encoding="UTF-8"?>'
            f"<Response><Connect><Stream url={quoteattr(stream_url)}>"
            f"{params}</Stream></Connect></Response>")


@router.post("/twilio/voice")
async def twilio_voice(request: Request) -> Response:
    """TwiML connecting the call to the media stream; ``voice`` and ``instructions`` from the query, the form, or
    the server's ``--twilio-voice`` / ``--twilio-instructions``; ``eagerness`` (query or form) for semantic_vad."""
    cfg = get_state(request).config
    form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
    if cfg.twilio_auth_token and not signature_ok(cfg.twilio_auth_token, request, form):
        log.warning("twilio: refused a webhook request with a missing or wrong X-Twilio-Signature")
        err = APIError(403, "missing or wrong X-Twilio-Signature", "authentication_error", "invalid_signature")
        return JSONResponse(err.body(), status_code=403)
    proto, host = public_url(request)
    defaults = {"voice": cfg.twilio_voice or cfg.default_voice, "instructions": cfg.twilio_instructions,
                "eagerness": None}
    given = {name: request.query_params.get(name) or form.get(name) or default or ""
             for name, default in defaults.items()}
    url = f"{'wss' if proto == 'https' else 'ws'}://{host}{MEDIA_PATH}"
    return Response(twiml(url, given), media_type="application/xml")


# ----- the media stream -----------------------------------------------------------------------------------------
class TwilioTransport:
    """One call's media stream: Twilio's messages in and out of a ``RealtimeCore`` (this is its ``EventSink``)."""

    def __init__(self, ws: WebSocket, state: ServerState, stream_sid: str):
        self.ws, self.state, self.cfg = ws, state, state.config
        self.stream_sid = stream_sid
        self.core = RealtimeCore(state, self)   # APIError while the model loads
        self.inbox = Inbox(self.core, MAX_PENDING_EVENTS, self.cfg.max_pending_input_bytes)
        self.send_lock = asyncio.Lock()
        self.stopping = asyncio.Event()
        self.closed = False
        self.marks = 0
        self.pending: dict[str, tuple[str, float]] = {}   # mark sent, not yet returned -> (item id, audio end ms)
        self.sent_ms: dict[str, float] = {}   # per answer item: μ-law audio sent so far
        self.heard: dict[str, float] = {}     # per answer item: audio played to the caller (the last returned mark)
        self.tasks: set[asyncio.Task] = set()

    async def start(self, client: str, parameters: dict[str, Any]) -> None:
        """Open the core's session and set it up for the call: μ-law both ways, server VAD with barge-in (or
        ``semantic_vad`` when the TwiML passed an ``eagerness``), the voice and instructions the TwiML passed
        (problems are logged: the call goes on with the defaults)."""
        await self.core.open(client)
        eagerness = parameters.get("eagerness")   # given: semantic_vad with it, else server VAD
        td = {"type": "semantic_vad", "eagerness": eagerness} if eagerness else dict(DEFAULT_VAD)
        session: dict[str, Any] = {"type": "realtime", "audio": {
            "input": {"format": {"type": "audio/pcmu"}, "turn_detection": td},
            "output": {"format": {"type": "audio/pcmu"}}}}
        if parameters.get("instructions"):
            session["instructions"] = str(parameters["instructions"])
        if parameters.get("voice"):
            session["audio"]["output"]["voice"] = str(parameters["voice"])
        await self.core.apply({"type": "session.update", "session": session}, None)

    # ----- the EventSink ------------------------------------------------------------------------------------
    async def send(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "response.output_audio.delta":
            item, data = event["item_id"], event["delta"]
            end_ms = self.sent_ms.get(item, 0.0) + 1000 * (len(data) * 3 // 4 - data.count("=")) / 8000
            self.sent_ms[item] = end_ms
            self.marks += 1
            name = f"m{self.marks}"
            self.pending[name] = (item, end_ms)
            await self.to_twilio({"event": "media", "streamSid": self.stream_sid, "media": {"payload": data}})
            await self.to_twilio({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}})
        elif kind == "input_audio_buffer.speech_started":
            await self.barge_in()
        elif kind == "error":
            log.warning("twilio stream %s: %s", self.stream_sid, event.get("error"))

    def end(self, reason: Ending) -> None:
        self.stopping.set()

    def heard_ms(self, item_id: str) -> float:
        """What the caller heard of an answer item: up to its last mark that Twilio returned."""
        return self.heard.get(item_id, 0.0)

    async def barge_in(self) -> None:
        """The caller speaks while an answer is still queued at Twilio: have Twilio drop it (``clear``), and cut
        each answer item the caller had not heard whole back to what was heard."""
        if not self.pending or not (self.core.settings.turn_detection or {}).get("interrupt_response", True):
            return
        items = list(dict.fromkeys(item for item, _ in self.pending.values()))
        self.pending.clear()   # marks Twilio returns after the clear were not played: ignored
        await self.to_twilio({"event": "clear", "streamSid": self.stream_sid})
        for item in items:   # queued behind the barge-in's cancel, which the core is applying now
            truncate = {"type": "conversation.item.truncate", "item_id": item, "content_index": 0,
                        "audio_end_ms": int(self.heard_ms(item))}
            task = asyncio.create_task(self.inbox.put_event(truncate, None))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def to_twilio(self, message: dict[str, Any]) -> None:
        async with self.send_lock:
            if self.closed:
                return
            try:
                await asyncio.wait_for(self.ws.send_text(json.dumps(message)), timeout=self.cfg.send_timeout or None)
            except Exception:   # Twilio went away or stopped reading: the reader notices and cleans up
                self.closed = True
                self.stopping.set()

    # ----- lifecycle ----------------------------------------------------------------------------------------
    async def serve(self) -> None:
        tasks = [asyncio.create_task(c) for c in (self.read(), self.inbox.run(self.stopping), self.stopping.wait(),
                                                   self.watch_drain())]
        try:
            await asyncio.wait(tasks[:3], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in [*tasks, *self.tasks]:
                task.cancel()
            await self.core.close()
            self.closed = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(), timeout=1.0)

    async def watch_drain(self) -> None:
        drain = self.state.drain
        await drain.begun.wait()
        await self.core.drain(drain.deadline)
        self.stopping.set()

    async def read(self) -> None:
        """Twilio's messages until ``stop`` or the socket closes: media to the core, marks to ``heard``."""
        try:
            while not self.stopping.is_set():
                msg = json.loads(await self.ws.receive_text())
                event = msg.get("event")
                if event == "media":
                    if (msg.get("media") or {}).get("track", "inbound") != "inbound":
                        continue
                    try:
                        samples = self.core.decode_append({"audio": msg["media"]["payload"]})
                    except (RealtimeError, KeyError, TypeError):
                        log.warning("twilio stream %s: a media message without valid μ-law audio", self.stream_sid)
                        continue
                    await asyncio.wait_for(self.inbox.put_audio(samples, None), self.cfg.backpressure_timeout or None)
                elif event == "mark":
                    sent = self.pending.pop(str((msg.get("mark") or {}).get("name")), None)
                    if sent is not None:
                        self.heard[sent[0]] = max(self.heard.get(sent[0], 0.0), sent[1])
                elif event == "stop":
                    return
        except TimeoutError:
            log.warning("twilio stream %s: the engine is behind; ending the call", self.stream_sid)
        except (WebSocketDisconnect, RuntimeError, ValueError, KeyError, AttributeError):   # gone, or not JSON text
            return


async def wait_for_start(ws: WebSocket) -> dict[str, Any] | None:
    """Twilio's ``start`` message (``connected`` comes before it), or None if the stream ends or it never comes."""
    try:
        async with asyncio.timeout(START_TIMEOUT):
            while True:
                msg = json.loads(await ws.receive_text())
                if isinstance(msg, dict) and msg.get("event") == "start" and isinstance(msg.get("start"), dict):
                    return msg
                if isinstance(msg, dict) and msg.get("event") == "stop":
                    return None
    except (TimeoutError, WebSocketDisconnect, RuntimeError, ValueError, KeyError):
        return None


@router.websocket(MEDIA_PATH)
async def media_stream(ws: WebSocket) -> None:
    state: ServerState = ws.app.state.oc
    token = state.config.twilio_auth_token
    if token and not signature_ok(token, ws, {}):   # Twilio signs the stream's handshake too (no parameters)
        log.warning("twilio: refused a media stream with a missing or wrong X-Twilio-Signature")
        with contextlib.suppress(Exception):
            await ws.close(code=1008)   # before accept: the client gets HTTP 403
        return
    try:
        await ws.accept()
    except Exception:   # Twilio left during the handshake
        return
    start = None if state.drain.draining else await wait_for_start(ws)
    if start is None:
        with contextlib.suppress(Exception):
            await ws.close()
        return
    info = start["start"]
    sid = str(start.get("streamSid") or info.get("streamSid") or "")
    fmt = info.get("mediaFormat") or {}
    if fmt and (fmt.get("encoding"), int(fmt.get("sampleRate") or 8000)) != ("audio/x-mulaw", 8000):
        log.warning("twilio stream %s: media format %s is not audio/x-mulaw at 8000 Hz; closing", sid, fmt)
        with contextlib.suppress(Exception):
            await ws.close(code=1003)
        return
    try:
        conn = TwilioTransport(ws, state, sid)
        await conn.start(client_id(ws.scope), info.get("customParameters") or {})
    except APIError as e:   # still loading, no free session
        log.warning("twilio stream %s: no session: %s", sid, e.message)
        with contextlib.suppress(Exception):
            await ws.close(code=1013)
        return
    log.info("twilio stream %s: call %s connected", sid, info.get("callSid"))
    state.connections.add(conn)
    try:
        await conn.serve()
    finally:
        state.connections.discard(conn)
