"""``/v1/realtime``: the OpenAI Realtime protocol (GA event names) over a WebSocket, one engine session each.

The connection reads client events as they come and keeps their order through one processor task:
user audio is decoded, run through the server VAD and fed to the engine as it arrives (consecutive
appends are merged into one engine call, so a busy engine never makes the socket fall behind), so the
Reasoner has encoded the turn by the time the user stops. Responses stream on their own task; a
``response.cancel`` or the user starting to speak (barge-in) stops one within a frame, and the history
keeps only what the listener heard (the client may say exactly how much with ``conversation.item.truncate``).
The engine session is an ``AsyncSession``: each command is awaited on the engine worker's answer, so nothing here
blocks the event loop. Events are checked against the schemas in ``realtime_events``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse

from ..audio import AudioError
from ..engine import (
    DEFAULT_SYSTEM_PROMPT,
    FRAME_SECONDS,
    AsyncSession,
    AudioChunk,
    ContextFull,
    EngineError,
    ResponseDone,
    SessionLimit,
    TextDelta,
    UnknownVoice,
    frames_for_text,
)
from ..engine import Response as EngineResponse
from . import realtime_events as ev
from .codecs import InputDecoder, OutputEncoder
from .errors import APIError, EngineTimeout, shorten
from .guards import check_api_key, client_id
from .metrics import response_status
from .realtime_events import RealtimeError
from .state import OPENAI_STOCK_VOICES, ServerState, engine_await, response_events
from .vad import StreamingVAD, VADConfig

log = logging.getLogger("openchroma.realtime")
router = APIRouter()

MIN_COMMIT_MS = 100
MAX_PENDING_EVENTS = 64          # client events read but not yet applied; past this the reader stops reading
# Close codes (README, "Serve"): what a client sees when the server ends its connection.
CLOSE_NOT_READING = 1008         # policy: the client stopped reading what it is sent
CLOSE_ENGINE_FAILED = 1011       # an engine call failed to answer; the session was freed
CLOSE_TRY_AGAIN = 1013           # session limits, model not ready
CLOSE_IDLE = 4000                # idle for --idle-timeout seconds
DEFAULT_VAD = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500,
               "create_response": True, "interrupt_response": True, "idle_timeout_ms": None}
SEMANTIC_SILENCE_MS = {"low": 1000, "medium": 600, "auto": 600, "high": 300}
INPUT_RATES = {"audio/pcm": None, "audio/pcmu": 8000, "audio/pcma": 8000}
PCM_INPUT_RATES = (8000, 16000, 24000, 44100, 48000)


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


def _format(fmt: ev.PCM | ev.G711, param: str, inputs: bool) -> dict[str, Any]:
    """An audio format as reported back; pcm input may come at other rates than 24 kHz, output may not."""
    if fmt.type != "audio/pcm":
        return {"type": fmt.type}
    if fmt.rate not in (PCM_INPUT_RATES if inputs else (24000,)):
        allowed = ", ".join(map(str, PCM_INPUT_RATES)) if inputs else "24000"
        raise RealtimeError(f"{param}.rate: audio/pcm at {fmt.rate} Hz is not supported here; use {allowed}",
                            "invalid_value", param + ".rate")
    return {"type": "audio/pcm", "rate": fmt.rate}


def _turn_detection(td: ev.TurnDetection | None) -> dict[str, Any] | None:
    if td is None:
        return None
    out = dict(DEFAULT_VAD)
    if td.type == "semantic_vad":  # approximated by the server VAD with a silence matching the eagerness
        out["silence_duration_ms"] = SEMANTIC_SILENCE_MS[td.eagerness or "auto"]
    out.update(td.model_dump(include={"threshold", "prefix_padding_ms", "silence_duration_ms", "idle_timeout_ms",
                                      "create_response", "interrupt_response"}, exclude_none=True))
    return out


@dataclass
class ResponseOut:
    """What one response sends: its ids and the settings it was created with."""

    id: str
    item_id: str
    modalities: list[str]
    format: dict[str, Any]
    voice: str
    max_output_tokens: int | str
    metadata: dict[str, str] | None
    out_of_band: bool
    item: dict[str, Any] = field(default_factory=dict)


class PendingBudget:
    """Bytes of decoded input audio waiting for the processor. The reader waits for room before it reads on (so a
    client that outruns the engine is pushed back through TCP) instead of queueing without bound."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self.freed = asyncio.Event()

    async def acquire(self, n: int) -> None:
        while self.used and self.used + n > self.limit:   # one item alone always fits
            self.freed.clear()
            await self.freed.wait()
        self.used += n

    def release(self, n: int) -> None:
        self.used -= n
        self.freed.set()


class RealtimeConnection:
    def __init__(self, ws: WebSocket, state: ServerState):
        self.ws = ws
        self.state = state
        self.engine = state.require_engine()
        self.cfg = state.config
        self.session: AsyncSession | None = None
        self.sid = _id("sess")
        self.conversation_id = _id("conv")
        self.send_lock = asyncio.Lock()
        self.closed = False
        self.close_code: tuple[int, str] | None = None   # set when the server decides to end the connection
        self.stopping = asyncio.Event()
        self.last_activity = time.monotonic()
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=MAX_PENDING_EVENTS)
        self.pending = PendingBudget(self.cfg.max_pending_input_bytes)
        self.items: list[dict[str, Any]] = []   # the conversation's items, in order (as last reported)
        self.transcribing: set[asyncio.Task] = set()
        self.response_task: asyncio.Task | None = None
        self.engine_response: EngineResponse | None = None
        self.response_id: str | None = None    # the response's id, as the client knows it
        self.cancel_reason: str | None = None
        self.played: float | None = None        # when the response's first audio delta was sent
        # Session settings, in the GA shape they are reported in.
        self.instructions = DEFAULT_SYSTEM_PROMPT
        self.voice: str | None = None
        self.output_modalities = ["audio"]
        self.max_output_tokens: int | str = "inf"
        self.input_format: dict[str, Any] = {"type": "audio/pcm", "rate": 24000}
        self.output_format: dict[str, Any] = {"type": "audio/pcm", "rate": 24000}
        self.turn_detection: dict[str, Any] | None = dict(DEFAULT_VAD)
        self.transcription: dict[str, Any] | None = None   # user transcripts: off until the client asks
        # Input audio state.
        self.vad: StreamingVAD | None = None
        self.in_rate = 24000
        self.clock_ms = 0.0                     # ms of audio received since the connection opened
        self.buffer_ms = 0.0                    # ms in the input buffer since the last commit
        self.prefix: collections.deque = collections.deque()   # (start_ms, samples) kept before speech starts
        self.speech_item: str | None = None

    # ----- plumbing --------------------------------------------------------------------------------------
    async def call(self, awaitable):
        """Await an engine command; one that does not answer within ``engine_timeout`` raises ``EngineTimeout``."""
        return await engine_await(self.cfg, awaitable)

    def stop(self, code: int, reason: str) -> None:
        """End the connection from the server's side with ``code`` (the first reason given wins)."""
        if self.close_code is None:
            self.close_code = (code, reason)
        self.stopping.set()

    async def send(self, event: dict[str, Any]) -> None:
        event.setdefault("event_id", _id("event"))
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

    async def send_error(self, message: str, code: str, param: str | None = None,
                         type: str = "invalid_request_error", event_id: str | None = None) -> None:
        self.state.metrics.errors.labels(type).inc()
        await self.send({"type": "error", "error": {"type": type, "code": code, "message": message, "param": param,
                                                     "event_id": event_id}})

    def session_object(self) -> dict[str, Any]:
        return {
            "type": "realtime", "object": "realtime.session", "id": self.sid, "model": self.cfg.model_id,
            "output_modalities": list(self.output_modalities), "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens, "tools": [], "tool_choice": "auto",
            "audio": {
                "input": {"format": dict(self.input_format), "noise_reduction": None,
                          "transcription": dict(self.transcription) if self.transcription is not None else None,
                          "turn_detection": dict(self.turn_detection) if self.turn_detection else None},
                "output": {"format": dict(self.output_format), "voice": self.voice, "speed": 1.0},
            },
        }

    # ----- lifecycle -------------------------------------------------------------------------------------
    async def open(self) -> bool:
        try:
            voice = None
            with contextlib.suppress(APIError):   # no default voice: the client must choose one first
                voice = self.state.resolve_voice(None)
            self.session = await self.call(self.engine.create_async_session(voice, self.instructions))
            self.voice = voice
        except SessionLimit as e:
            self.state.metrics.sessions_rejected.inc()
            await self.send_error(str(e), "session_limit_reached", type="server_error")
            return False
        except Exception as e:   # the engine is closed, stuck or failing: say so rather than drop the socket
            log.error("realtime: creating a session failed: %s: %s", type(e).__name__, e)
            await self.send_error(f"the engine could not open a session: {type(e).__name__}: {shorten(str(e))}",
                                  "engine_timeout" if isinstance(e, EngineTimeout) else "session_failed",
                                  type="server_error")
            return False
        self.new_vad()
        self.state.metrics.sessions_total.labels("realtime").inc()
        self.state.metrics.sessions_active.labels("realtime").inc()
        await self.send({"type": "session.created", "session": self.session_object()})
        return True

    async def close(self) -> None:
        if self.session is None:
            return
        self.closed = True
        if self.engine_response is not None and self.engine_response.done is None:
            self.engine_response.cancel()
        for task in self.transcribing:
            task.cancel()
        session, self.session = self.session, None
        try:
            await self.call(session.close())
        except Exception as e:  # the engine may be closing too, or stuck
            log.warning("realtime session %s: closing the engine session failed: %s: %s", self.sid,
                        type(e).__name__, e)
        self.state.metrics.sessions_active.labels("realtime").dec()

    async def serve(self) -> None:
        processor = asyncio.create_task(self.process())
        reader = asyncio.create_task(self.read())
        idle = asyncio.create_task(self.watch_idle())
        stopping = asyncio.create_task(self.stopping.wait())
        try:
            await asyncio.wait([reader, processor, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, processor, idle, stopping):
                task.cancel()
            task = self.response_task
            if task is not None and not task.done():
                # Stop generating at once; let the task record how the response ended, briefly.
                if self.engine_response is not None and self.engine_response.done is None:
                    with contextlib.suppress(Exception):
                        self.engine_response.cancel()
                await asyncio.wait([task], timeout=0.5)
                task.cancel()
            await self.close()
            if self.close_code is not None:
                code, reason = self.close_code
                with contextlib.suppress(Exception):   # a client that reads nothing never gets the close frame
                    await asyncio.wait_for(self.ws.close(code=code, reason=reason), timeout=1.0)

    async def read(self) -> None:
        """Read client events until the client leaves; waits (pushing back on the client) while the processor
        is behind by ``MAX_PENDING_EVENTS`` events or ``max_pending_input_bytes`` of audio."""
        try:
            while not self.stopping.is_set():
                msg = await self.ws.receive()
                if msg["type"] == "websocket.disconnect":
                    return
                self.last_activity = time.monotonic()
                text = msg.get("text")
                if text is None:
                    try:
                        text = (msg.get("bytes") or b"").decode()
                    except UnicodeDecodeError:
                        await self.send_error("binary WebSocket messages are not events: send JSON text",
                                              "invalid_event")
                        continue
                await self.receive_event(text)
        except (WebSocketDisconnect, RuntimeError):   # RuntimeError: receive after the socket closed
            return

    async def watch_idle(self) -> None:
        """Close the session once neither the client nor a response has done anything for ``idle_timeout``."""
        timeout = self.cfg.idle_timeout
        if not timeout or timeout <= 0:
            return
        while True:
            if self.engine_response is not None and self.engine_response.done is None:
                self.last_activity = time.monotonic()
            left = self.last_activity + timeout - time.monotonic()
            if left <= 0:
                log.info("realtime session %s idle for %g s: closing", self.sid, timeout)
                await self.send_error(f"the session was idle for {timeout:g} s and is closed (the server's "
                                      "--idle-timeout)", "idle_timeout", type="invalid_request_error")
                self.stop(CLOSE_IDLE, "idle timeout")
                return
            await asyncio.sleep(min(left, 1.0))

    async def receive_event(self, text: str) -> None:
        """Parse one message; audio is decoded here (so its size counts against the pending budget), the rest is
        queued for the processor as it came."""
        if len(text) > self.cfg.max_ws_message_bytes:
            await self.send_error(f"an event of {len(text)} bytes is over the limit of {self.cfg.max_ws_message_bytes}"
                                  "; send audio in smaller appends (this event was dropped)", "message_too_large")
            return
        try:
            event = json.loads(text)
        except (ValueError, RecursionError) as e:   # JSONDecodeError, too many digits, nesting too deep
            why = "nested too deeply" if isinstance(e, RecursionError) else shorten(str(e), 120)
            await self.send_error(f"the message is not valid JSON: {why}", "invalid_json")
            return
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            await self.send_error("an event must be a JSON object with a string 'type'", "invalid_event")
            return
        eid = event.get("event_id")
        eid = eid[:128] if isinstance(eid, str) else None
        if event["type"] != "input_audio_buffer.append":
            await self.queue.put(("event", event, eid))   # response.cancel too: it must find the response before it
            return
        audio = event.get("audio")
        if not isinstance(audio, str):
            await self.send_error("input_audio_buffer.append needs 'audio': base64 audio in the input format",
                                  "invalid_value", "audio", event_id=eid)
            return
        try:
            samples = self.decode_input(base64.b64decode(audio, validate=True))
        except (binascii.Error, ValueError) as e:
            await self.send_error(f"'audio' is not valid base64 {self.input_format['type']}: {shorten(str(e), 120)}",
                                  "invalid_value", "audio", event_id=eid)
            return
        await self.pending.acquire(samples.nbytes)
        await self.queue.put(("audio", samples, eid))

    async def process(self) -> None:
        """Apply client events in order; merge runs of audio appends into one engine call."""
        held = None   # an event read while merging audio, applied next
        while True:
            kind, payload, eid = held or await self.queue.get()
            held = None
            if self.session is None or self.stopping.is_set():   # closing: nothing more is applied
                return
            try:
                if kind == "audio":
                    chunks = [payload]
                    while not self.queue.empty():
                        nxt = self.queue.get_nowait()
                        if nxt[0] != "audio":
                            held = nxt
                            break
                        chunks.append(nxt[1])
                    try:
                        await self.ingest(np.concatenate(chunks), eid)
                    finally:
                        self.pending.release(sum(c.nbytes for c in chunks))
                else:
                    await self.handle(ev.parse_event(payload, self.cfg.max_text_chars), eid)
            except RealtimeError as e:
                await self.send_error(e.message, e.code, e.param, e.type, event_id=eid)
            except APIError as e:
                await self.send_error(e.message, e.code or "invalid_request", e.param, e.type, event_id=eid)
            except EngineTimeout as e:
                # The engine is stuck: say so and free the slot rather than leave the client waiting forever.
                log.error("realtime session %s: %s", self.sid, e)
                await self.send_error(str(e), "engine_timeout", type="server_error", event_id=eid)
                self.stop(CLOSE_ENGINE_FAILED, "engine did not answer")
                return
            except (EngineError, AudioError, ValueError, TypeError) as e:
                await self.send_error(shorten(str(e), 300), "invalid_request", event_id=eid)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # never drop the connection over one event
                log.exception("realtime event failed")
                await self.send_error(f"internal error: {type(e).__name__}: {shorten(str(e))}", "internal_error",
                                      type="server_error", event_id=eid)

    async def handle(self, event: ev.ClientEvent, eid: str | None) -> None:
        match event:
            case ev.SessionUpdate():
                await self.update_session(event.session)
            case ev.ItemCreate():
                await self.create_item(event.item, event.previous_item_id)
            case ev.ItemDelete():
                await self.delete_item(event.item_id)
            case ev.ItemRetrieve():
                item = self.find_item(event.item_id, code="item_retrieve_invalid_item_id")   # OpenAI's codes
                await self.send({"type": "conversation.item.retrieved", "item": item})
            case ev.ItemTruncate():
                await self.truncate(event)
            case ev.ResponseCreate():
                await self.start_response(event.response)
            case ev.Simple(type="input_audio_buffer.commit"):
                await self.commit()
            case ev.Simple(type="input_audio_buffer.clear"):
                await self.clear_input()
            case ev.ResponseCancel():
                await self.cancel_response(eid, "client_cancelled", event.response_id)

    # ----- session settings ------------------------------------------------------------------------------
    async def update_session(self, s: ev.SessionConfig) -> None:
        # Check everything before changing anything.
        has_voice, voice = s.given("output.voice", "voice")
        voice = self._voice(voice, "session.audio.output.voice") if voice is not None else None
        has_in, in_fmt = s.given("input.format", "input_audio_format")
        new_in = _format(in_fmt, "session.audio.input.format", inputs=True) if in_fmt is not None else None
        has_out, out_fmt = s.given("output.format", "output_audio_format")
        new_out = _format(out_fmt, "session.audio.output.format", inputs=False) if out_fmt is not None else None
        has_td, td = s.given("input.turn_detection", "turn_detection")
        has_tr, tr = s.given("input.transcription", "input_audio_transcription")

        if s.instructions is not None:
            await self.call(self.session.set_instructions(s.instructions))
            self.instructions = s.instructions
        if voice is not None:
            await self.call(self.session.set_voice(voice))
            self.voice = voice
        if new_in is not None:
            if self.buffer_ms:
                await self.call(self.session.clear_audio())
                self.buffer_ms = 0.0
            self.input_format = new_in
            self.in_rate = new_in.get("rate") or INPUT_RATES[new_in["type"]]
        if new_out is not None:
            self.output_format = new_out
        if has_td or new_in is not None:
            if has_td:
                self.turn_detection = _turn_detection(td)
            self.new_vad()
            self.prefix.clear()
        if has_tr:
            self.transcription = tr.model_dump(exclude_none=True) if tr is not None else None
        if s.output_modalities is not None:
            self.output_modalities = ["audio"] if "audio" in s.output_modalities else ["text"]
        if s.max_output_tokens is not None:
            self.max_output_tokens = s.max_output_tokens
        await self.send({"type": "session.updated", "session": self.session_object()})

    def _voice(self, name: str, param: str) -> str | None:
        """A library voice for ``name``; None keeps the current one when ``name`` is one of OpenAI's stock voices
        that the server cannot map (frameworks send their default, e.g. "marin", whatever the server has)."""
        try:
            return self.state.resolve_voice(name)
        except APIError as e:
            if name in OPENAI_STOCK_VOICES and e.code == "voice_required":
                return None
            raise RealtimeError(e.message, e.code or "invalid_value", param) from None

    # ----- input audio -----------------------------------------------------------------------------------
    def decode_input(self, raw: bytes) -> np.ndarray:
        # pcm16 decodes the same at any rate; the rate is kept in ``in_rate``.
        return InputDecoder(self.input_format["type"]).decode(raw)

    def new_vad(self) -> None:
        """A VAD for the current settings; its clock starts now, so its times are offset by ``vad_origin_ms``."""
        td = self.turn_detection
        self.vad = StreamingVAD(VADConfig(threshold=float(td["threshold"]),
                                          prefix_padding_ms=int(td["prefix_padding_ms"]),
                                          silence_duration_ms=int(td["silence_duration_ms"])),
                                self.in_rate) if td else None
        self.vad_origin_ms = self.clock_ms

    async def ingest(self, x: np.ndarray, eid: str | None) -> None:
        ms = 1000 * len(x) / self.in_rate
        if self.buffer_ms + ms > 1000 * self.cfg.max_input_audio_seconds:
            raise RealtimeError(f"the input audio buffer would exceed {self.cfg.max_input_audio_seconds:.0f} s; "
                                "commit or clear it (this append was dropped)", "input_audio_buffer_too_long")
        start_ms = self.clock_ms
        self.clock_ms += ms
        if self.vad is None:
            self.buffer_ms += ms
            await self.call(self.session.append_audio(x, self.in_rate))
            return
        was_speaking = self.vad.speaking
        events = await asyncio.to_thread(self.vad.push, x)   # silero: off the event loop
        for chunk in self.speech_to_feed(x, start_ms, was_speaking, events):
            self.buffer_ms += 1000 * len(chunk) / self.in_rate
            await self.call(self.session.append_audio(chunk, self.in_rate))
        for e in events:
            at_ms = int(e.audio_ms + self.vad_origin_ms)
            if e.kind == "speech_started":
                self.speech_item = _id("item")
                await self.send({"type": "input_audio_buffer.speech_started", "audio_start_ms": at_ms,
                                 "item_id": self.speech_item})
                if self.turn_detection.get("interrupt_response", True):
                    await self.cancel_response(None, "turn_detected")
            else:
                item = self.speech_item or _id("item")
                self.speech_item = None
                await self.send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": at_ms,
                                 "item_id": item})
                await self.commit(item)
                if self.turn_detection.get("create_response", True):
                    await self.start_response(ev.ResponseParams())

    def speech_to_feed(self, x: np.ndarray, start_ms: float, was_speaking: bool, events: list) -> list[np.ndarray]:
        """What of ``x`` the engine should hear under server VAD: speech only, with its prefix padding (kept from
        the audio before it started)."""
        if not was_speaking and not self.vad.speaking and not events:
            pad = self.turn_detection["prefix_padding_ms"]
            self.prefix.append((start_ms, x))
            while self.prefix and self.prefix[0][0] + 1000 * len(self.prefix[0][1]) / self.in_rate < start_ms - pad:
                self.prefix.popleft()
            return []
        feed = []
        if not was_speaking:
            onset = next((e.audio_ms + self.vad_origin_ms for e in events if e.kind == "speech_started"), start_ms)
            for s_ms, chunk in self.prefix:
                skip = max(0, int((onset - s_ms) * self.in_rate / 1000))
                if skip < len(chunk):
                    feed.append(chunk[skip:])
            self.prefix.clear()
        return [*feed, x]

    async def commit(self, item_id: str | None = None) -> None:
        if self.buffer_ms < MIN_COMMIT_MS:
            raise RealtimeError(f"buffer too small: expected at least {MIN_COMMIT_MS} ms of audio, but the buffer "
                                f"holds {self.buffer_ms:.0f} ms", "input_audio_buffer_commit_empty")
        item_id = item_id or self.speech_item or _id("item")
        self.speech_item = None
        seconds = self.buffer_ms / 1000
        # The committed audio is one user message of its own in the engine's history, under the item's id.
        await self.call(self.session.commit_audio(item_id))
        self.buffer_ms = 0.0
        if self.vad is not None:
            self.vad.reset()
        self.prefix.clear()
        prev = self.items[-1]["id"] if self.items else None
        await self.send({"type": "input_audio_buffer.committed", "item_id": item_id, "previous_item_id": prev})
        item = {"id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
                "content": [{"type": "input_audio", "transcript": None}]}
        await self.item_added(item)
        await self.transcribe_audio(item, seconds)

    async def clear_input(self) -> None:
        await self.call(self.session.clear_audio())
        self.buffer_ms = 0.0
        if self.vad is not None:
            self.vad.reset()
        self.prefix.clear()
        await self.send({"type": "input_audio_buffer.cleared"})

    # ----- conversation items ------------------------------------------------------------------------------
    async def item_added(self, item: dict[str, Any], after: str | None = None) -> None:
        """Put ``item`` in the conversation after item ``after`` ("root": first; None: last) and announce it."""
        if after is None:
            at = len(self.items)
        elif after == "root":
            at = 0
        else:
            at = next(i for i, it in enumerate(self.items) if it["id"] == after) + 1
        prev = self.items[at - 1]["id"] if at else None
        self.items.insert(at, item)
        # GA clients listen for conversation.item.added, beta clients for conversation.item.created.
        await self.send({"type": "conversation.item.added", "previous_item_id": prev, "item": item})
        await self.send({"type": "conversation.item.created", "previous_item_id": prev, "item": item})
        if item.get("status") == "completed":
            await self.send({"type": "conversation.item.done", "previous_item_id": prev, "item": item})

    def find_item(self, item_id: str, param: str = "item_id", code: str = "item_not_found") -> dict[str, Any]:
        found = next((it for it in self.items if it["id"] == item_id), None)
        if found is None:
            raise RealtimeError(f"the conversation has no item with id {item_id[:64]!r}", code, param)
        return found

    def responding(self) -> bool:
        return self.engine_response is not None and self.engine_response.done is None

    async def create_item(self, item: ev.MessageItem, previous_item_id: str | None) -> None:
        item_id = item.id or _id("item")
        if any(it["id"] == item_id for it in self.items):
            raise RealtimeError(f"the conversation already has an item with id {item_id!r}",
                                "item_create_duplicate_item_id", "item.id")
        if previous_item_id not in (None, "root"):
            self.find_item(previous_item_id, "previous_item_id")
        at_end = previous_item_id in (None, self.items[-1]["id"] if self.items else "root")
        if self.responding() and (item.role != "user" or not at_end):
            raise RealtimeError("a response is in progress: cancel it before adding assistant or system messages or "
                                "inserting into the history", "conversation_already_has_active_response")
        texts, audio, content = self._item_content(item)
        if audio:
            if not at_end:
                raise RealtimeError("an item with audio can only be added at the end of the conversation",
                                    "invalid_value", "previous_item_id")
            if self.buffer_ms:
                raise RealtimeError(f"the input audio buffer holds {self.buffer_ms:.0f} ms of audio: commit or clear "
                                    "it before adding an audio item", "input_audio_buffer_not_empty", "item")
            # Parts in order; the engine's turn collects them and ends as one message under the item's id.
            for i, part in enumerate(content):
                if i in audio:
                    await self.call(self.session.append_audio(audio[i], self.in_rate))
                    await self.call(self.session.commit_audio())
                else:
                    await self.call(self.session.add_text(part["text"]))
            await self.call(self.session.end_turn(item_id))
        elif at_end:
            await self.call(self.session.add_message(item.role, "\n".join(texts), item_id))
        else:
            where = 1 if previous_item_id == "root" else previous_item_id
            await self.call(self.session.insert_message(where, item.role, "\n".join(texts), item_id))
        new = {"id": item_id, "object": "realtime.item", "type": "message", "role": item.role,
               "status": "completed", "content": content}
        await self.item_added(new, None if at_end else previous_item_id)
        if audio:
            await self.transcribe_audio(new, sum(len(x) for x in audio.values()) / self.in_rate)

    def _item_content(self, item: ev.MessageItem) -> tuple[list[str], dict[int, np.ndarray], list[dict[str, Any]]]:
        """An item's texts, its audio parts (decoded, by index) and its content as reported back."""
        texts: list[str] = []
        audio: dict[int, np.ndarray] = {}
        content: list[dict[str, Any]] = []
        for i, part in enumerate(item.content):
            where = f"item.content[{i}]"
            if part.type in ("input_text", "text", "output_text") and part.text and part.text.strip():
                texts.append(part.text)
                content.append({"type": part.type, "text": part.text})
            elif part.type in ("audio", "output_audio") and item.role == "assistant" and part.transcript:
                # An assistant's earlier audio, as its transcript (how clients replay a conversation's history).
                texts.append(part.transcript)
                content.append({"type": part.type, "transcript": part.transcript})
            elif part.type == "input_audio" and item.role == "user":
                audio[i] = self._item_audio(part.audio, where + ".audio")
                content.append({"type": "input_audio", "transcript": None})
            elif part.type in ("input_text", "text", "output_text"):
                raise RealtimeError(f"{where}.text must be a non-empty string", "invalid_value", where + ".text")
            else:
                raise RealtimeError(f"content part type {part.type!r} is not supported for a {item.role} message",
                                    "unsupported_content", where + ".type")
        return texts, audio, content

    def _item_audio(self, data: str | None, param: str) -> np.ndarray:
        if data is None:
            raise RealtimeError("an audio part needs 'audio': base64 audio in the input format", "invalid_value", param)
        try:
            samples = self.decode_input(base64.b64decode(data, validate=True))
        except (binascii.Error, ValueError) as e:
            raise RealtimeError(f"'audio' is not valid base64 audio: {shorten(str(e), 120)}", "invalid_value",
                                param) from None
        if len(samples) > self.in_rate * self.cfg.max_input_audio_seconds:
            raise RealtimeError(f"the audio is over the server's {self.cfg.max_input_audio_seconds:.0f} s per turn",
                                "input_audio_buffer_too_long", param)
        if len(samples) < self.in_rate * MIN_COMMIT_MS / 1000:
            raise RealtimeError(f"an audio part needs at least {MIN_COMMIT_MS} ms of audio", "invalid_value", param)
        return samples

    async def delete_item(self, item_id: str) -> None:
        item = self.find_item(item_id, code="item_delete_invalid_item_id")
        if self.responding():
            raise RealtimeError("a response is in progress: cancel it before deleting items",
                                "conversation_already_has_active_response", "item_id")
        with contextlib.suppress(EngineError):   # the engine forgot it already (a full context drops old turns)
            await self.call(self.session.delete_message(item_id))
        self.items.remove(item)
        await self.send({"type": "conversation.item.deleted", "item_id": item_id})

    async def truncate(self, event: ev.ItemTruncate) -> None:
        item = self.find_item(event.item_id)
        if item["role"] != "assistant":
            raise RealtimeError("only assistant items can be truncated", "invalid_value", "item_id")
        if self.responding() and item["status"] == "in_progress":
            raise RealtimeError("the response is still in progress: cancel it first", "invalid_value", "item_id")
        text = await self.call(self.session.truncate_response(event.audio_end_ms, item["id"]))
        if item["content"] and "transcript" in item["content"][0]:
            item["content"][0]["transcript"] = text
        await self.send({"type": "conversation.item.truncated", "item_id": event.item_id,
                         "content_index": event.content_index, "audio_end_ms": int(event.audio_end_ms)})

    # ----- user transcripts --------------------------------------------------------------------------------
    async def transcribe_audio(self, item: dict[str, Any], seconds: float) -> None:
        """When the client asked for transcripts, have the Reasoner transcribe the item's newest audio part (already
        encoded for the response) in the engine's background slices, and stream it as it comes."""
        if self.transcription is None:
            return
        index = max(i for i, part in enumerate(item["content"]) if part["type"] == "input_audio")
        stream = await self.call(self.session.transcribe(-1))
        task = asyncio.create_task(self.stream_transcript(stream, item, index, seconds))
        self.transcribing.add(task)
        task.add_done_callback(self.transcribing.discard)

    async def stream_transcript(self, stream, item: dict[str, Any], index: int, seconds: float) -> None:
        base = {"item_id": item["id"], "content_index": index}
        done = None
        try:
            async for e in response_events(self.cfg, stream):
                if isinstance(e, TextDelta):
                    if e.text:
                        await self.send({"type": "conversation.item.input_audio_transcription.delta", **base,
                                         "delta": e.text})
                else:
                    done = e
            if done is None or done.error:
                raise RuntimeError(done.error if done is not None else "the transcription ended early")
        except Exception as e:
            log.warning("realtime session %s: transcribing %s failed: %s", self.sid, item["id"], e)
            await self.send({"type": "conversation.item.input_audio_transcription.failed", **base, "error": {
                "type": "server_error", "code": "transcription_failed", "message": shorten(str(e)), "param": None}})
            return
        text = done.text.strip()
        item["content"][index]["transcript"] = text
        await self.send({"type": "conversation.item.input_audio_transcription.completed", **base, "transcript": text,
                         "usage": {"type": "duration", "seconds": round(seconds, 3)}})

    # ----- responses -------------------------------------------------------------------------------------
    async def cancel_response(self, eid: str | None, reason: str, response_id: str | None = None) -> None:
        if not self.responding() or response_id not in (None, self.response_id):
            if reason == "client_cancelled":
                # OpenAI's words: clients (LiveKit's) recognise a cancel that came too late by them.
                await self.send_error("Cancellation failed: no active response found", "response_cancel_not_active",
                                      event_id=eid)
            return
        self.cancel_reason = reason
        self.engine_response.cancel()
        if self.response_task is not None and self.response_task is not asyncio.current_task():
            await asyncio.wait([self.response_task])   # response.done goes out before any later event

    async def start_response(self, p: ev.ResponseParams) -> None:
        if self.responding():
            raise RealtimeError("the conversation already has an active response; cancel it first",
                                "conversation_already_has_active_response")
        out, engine_args = self._response_plan(p)
        self.cancel_reason = None
        self.played = None
        await self.send({"type": "response.created", "response": self._response_obj(out, "in_progress")})
        try:
            resp = await self.call(self.session.respond(**engine_args))
        except Exception as e:
            # One answer, as OpenAI gives it: the failed response.done (an error event too would make some
            # clients, Pipecat's among them, treat the whole session as dead).
            client_fault = isinstance(e, (EngineError, UnknownVoice, ContextFull))
            log.log(logging.INFO if client_fault else logging.ERROR, "realtime session %s: a response failed to "
                    "start: %s: %s", self.sid, type(e).__name__, e)
            await self.send({"type": "response.done", "response": self._response_obj(out, "failed", details={
                "type": "failed", "error": {"type": "invalid_request_error" if client_fault else "server_error",
                                            "code": "context_full" if isinstance(e, ContextFull) else "response_failed",
                                            "message": shorten(str(e), 300)}})})
            self.state.metrics.responses.labels("realtime", "failed").inc()
            if isinstance(e, EngineTimeout):
                self.stop(CLOSE_ENGINE_FAILED, "engine did not answer")
            return
        self.engine_response = resp
        self.response_id = out.id
        out.item = {"id": out.item_id, "object": "realtime.item", "type": "message", "role": "assistant",
                    "status": "in_progress", "content": []}
        # The item joins the conversation now, so that events the client sends next find it there.
        await self.send({"type": "response.output_item.added", "response_id": out.id, "output_index": 0,
                         "item": out.item})
        if not out.out_of_band:
            await self.item_added(out.item)
        self.response_task = asyncio.create_task(self.stream_response(resp, out))

    def _response_plan(self, p: ev.ResponseParams) -> tuple[ResponseOut, dict[str, Any]]:
        """``response.create``'s settings over the session's: what the response reports, and the engine's args."""
        voice = p.audio.output.voice or p.voice
        voice = self._voice(voice, "response.audio.output.voice") if voice is not None else None
        if (voice or self.session.voice) is None:
            raise RealtimeError("no voice is selected: set session.audio.output.voice to a library voice (GET "
                                "/v1/voices) first", "voice_required", "session.audio.output.voice")
        fmt = p.audio.output.format or p.output_audio_format
        fmt = _format(fmt, "response.audio.output.format", inputs=False) if fmt else dict(self.output_format)
        modalities = self.output_modalities if p.output_modalities is None else \
            (["audio"] if "audio" in p.output_modalities else ["text"])
        mot = self.max_output_tokens if p.max_output_tokens is None else p.max_output_tokens
        out_of_band = p.conversation == "none"
        if p.input is not None and not out_of_band:
            raise RealtimeError("'input' gives an out-of-band response its own context: use it with conversation "
                                "'none'", "invalid_value", "response.input")
        rid, item_id = _id("resp"), _id("item")
        out = ResponseOut(rid, item_id, modalities, fmt, voice or self.session.voice, mot, p.metadata, out_of_band)
        max_frames = self.cfg.max_response_frames
        if mot != "inf":
            max_frames = min(max_frames, frames_for_text(mot))
        args = {"max_frames": max_frames, "voice": voice, "instructions": p.instructions, "out_of_band": out_of_band,
                "messages": self._input_messages(p.input) if p.input is not None else None,
                "item_id": None if out_of_band else item_id}
        return out, args

    def _input_messages(self, items: list[ev.ItemReference | ev.MessageItem]) -> list[dict[str, str]]:
        """An out-of-band response's ``input``: text messages, or references to items of the conversation (audio
        ones by their transcript)."""
        out = []
        for i, it in enumerate(items):
            param = f"response.input[{i}]"
            if isinstance(it, ev.ItemReference):
                ref = self.find_item(it.id, param + ".id")
                role, parts = ref["role"], ref["content"]
            else:
                role, parts = it.role, [part.model_dump() for part in it.content]
            words = [part.get("text") or part.get("transcript") for part in parts]
            if not all(isinstance(w, str) and w.strip() for w in words):
                raise RealtimeError(f"{param}: input items must be text (audio only by an item_reference to audio "
                                    "already transcribed)", "unsupported_content", param)
            out.append({"role": role, "text": "\n".join(words)})
        return out

    def _response_obj(self, out: ResponseOut, status: str, output: list | None = None, usage=None,
                      details: dict | None = None, timings: dict | None = None) -> dict[str, Any]:
        obj = {"id": out.id, "object": "realtime.response", "status": status, "status_details": details,
               "conversation_id": None if out.out_of_band else self.conversation_id,
               "output_modalities": out.modalities, "output": output or [], "max_output_tokens": out.max_output_tokens,
               "usage": usage, "metadata": out.metadata,
               "audio": {"output": {"format": dict(out.format), "voice": out.voice}}}
        if timings is not None:
            obj["server_timings"] = timings   # the server's own figures; metadata is the client's
        return obj

    async def stream_response(self, resp: EngineResponse, out: ResponseOut) -> None:
        try:
            await self._stream_response(resp, out)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("streaming a response failed")
            if resp.done is None:
                with contextlib.suppress(Exception):
                    resp.cancel()
            await self.send({"type": "response.done", "response": self._response_obj(out, "failed", details={
                "type": "failed", "error": {"type": "server_error", "code": "response_failed",
                                            "message": f"{type(e).__name__}: {shorten(str(e))}"}})})
            if isinstance(e, EngineTimeout):
                self.stop(CLOSE_ENGINE_FAILED, "engine did not answer")

    async def _stream_response(self, resp: EngineResponse, out: ResponseOut) -> None:
        audio_out = "audio" in out.modalities
        base = {"response_id": out.id, "item_id": out.item_id, "output_index": 0, "content_index": 0}
        await self.send({"type": "response.content_part.added", **base,
                         "part": {"type": "audio", "transcript": ""} if audio_out else {"type": "text", "text": ""}})
        encoder = OutputEncoder(out.format["type"]) if audio_out else None
        ms_per_frame = 1000 * FRAME_SECONDS
        sent_ms = 0.0
        done: ResponseDone | None = None
        async for e in response_events(self.cfg, resp):
            if isinstance(e, AudioChunk) and encoder is not None:
                data = encoder.encode(e.audio)
                if data:
                    await self.send({"type": "response.output_audio.delta", **base,
                                     "delta": base64.b64encode(data).decode()})
                self.played = self.played or time.monotonic()
                sent_ms += ms_per_frame
            elif isinstance(e, TextDelta):
                kind = "response.output_audio_transcript.delta" if audio_out else "response.output_text.delta"
                await self.send({"type": kind, **base, "delta": e.text})
            elif isinstance(e, ResponseDone):
                done = e
        tail = encoder.flush() if encoder is not None else b""
        if tail:
            await self.send({"type": "response.output_audio.delta", **base, "delta": base64.b64encode(tail).decode()})
        status = response_status(done.stop_reason)
        text = done.text
        if status == "cancelled" and audio_out and not out.out_of_band:
            # Barge-in or cancel: keep in the history what the listener can have heard by now (playback starts
            # with the first delta and runs in real time); a conversation.item.truncate can correct it later.
            heard = 0.0 if self.played is None else min(sent_ms, 1000 * (time.monotonic() - self.played))
            text = await self.call(self.session.truncate_response(heard))
        self.state.metrics.observe_response("realtime", done)
        await self._finish_response(resp, out, done, status, text)

    async def _finish_response(self, resp: EngineResponse, out: ResponseOut, done: ResponseDone, status: str,
                               text: str) -> None:
        audio_out = "audio" in out.modalities
        base = {"response_id": out.id, "item_id": out.item_id, "output_index": 0, "content_index": 0}
        if audio_out:
            await self.send({"type": "response.output_audio.done", **base})
            await self.send({"type": "response.output_audio_transcript.done", **base, "transcript": text})
            part = {"type": "audio", "transcript": text}
        else:
            await self.send({"type": "response.output_text.done", **base, "text": text})
            part = {"type": "text", "text": text}
        await self.send({"type": "response.content_part.done", **base, "part": part})
        # The conversation's copy of the item changes in place, so that a retrieve sees the final one.
        item = out.item
        item.update(status="completed" if status == "completed" else "incomplete",
                    content=[{"type": "output_audio" if audio_out else "output_text",
                              **({"transcript": text} if audio_out else {"text": text})}])
        await self.send({"type": "response.output_item.done", "response_id": out.id, "output_index": 0, "item": item})
        if not out.out_of_band and item in self.items:
            at = self.items.index(item)
            prev = self.items[at - 1]["id"] if at else None
            await self.send({"type": "conversation.item.done", "previous_item_id": prev, "item": item})
        details = None
        if status == "cancelled":
            details = {"type": "cancelled", "reason": self.cancel_reason or "client_cancelled"}
        elif status == "incomplete":
            details = {"type": "incomplete", "reason": "max_output_tokens"}
        elif status == "failed":
            details = {"type": "failed", "error": {"type": "server_error", "code": "generation_failed",
                                                   "message": done.error}}
        t = done.timings or {}
        timings = {k: round(t[k], 4) for k in ("ttft_ms", "rtf", "audio_seconds") if k in t and t[k] == t[k]}
        await self.send({"type": "response.done", "response": self._response_obj(
            out, status, [item], self._usage(resp, done), details, timings)})

    def _usage(self, resp: EngineResponse, done: ResponseDone) -> dict[str, Any]:
        u = done.usage
        prompt_len, audio_in, out_text = u.prompt_tokens, u.prompt_audio_tokens, u.text_tokens
        return {"total_tokens": prompt_len + out_text + done.frames, "input_tokens": prompt_len,
                "output_tokens": out_text + done.frames,
                "input_token_details": {"text_tokens": prompt_len - audio_in, "audio_tokens": audio_in,
                                        "cached_tokens": 0, "image_tokens": 0},
                "output_token_details": {"text_tokens": out_text, "audio_tokens": done.frames}}


@router.websocket("/v1/realtime")
async def realtime_endpoint(ws: WebSocket) -> None:
    state: ServerState = ws.app.state.oc
    offered = list(ws.scope.get("subprotocols") or [])
    if not check_api_key(state.config, ws.headers, ws.query_params, offered):
        state.metrics.errors.labels("authentication_error").inc()
        log.info("realtime: refused a connection without the API key")
        body = APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY' (or, from a browser, the "
                             "'openai-insecure-api-key.KEY' subprotocol)", "authentication_error",
                        "invalid_api_key").body()
        try:
            await ws.send_denial_response(JSONResponse(body, status_code=401))
        except RuntimeError:  # the server cannot answer a WebSocket with HTTP: refuse with a policy close
            with contextlib.suppress(Exception):
                await ws.close(code=1008, reason="invalid API key")
        except Exception:   # the client left before hearing why
            pass
        return
    try:
        await ws.accept(subprotocol="realtime" if "realtime" in offered else (offered[0] if offered else None))
    except Exception:   # the client left during the handshake
        return
    client = client_id(ws.scope)
    if not state.claim_client_session(client):
        err = state.client_limit_error()
        await _refuse(ws, err.type, err.code, err.message, CLOSE_TRY_AGAIN, "client session limit reached")
        return
    try:
        try:
            conn = RealtimeConnection(ws, state)
        except APIError as e:  # still loading, or failed to load
            await _refuse(ws, e.type, e.code, e.message, CLOSE_TRY_AGAIN, "model not ready")
            return
        if not await conn.open():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(code=CLOSE_TRY_AGAIN, reason="no session available"), 1.0)
            return
        state.connections.add(conn)
        try:
            await conn.serve()
        finally:
            state.connections.discard(conn)
    finally:
        state.release_client_session(client)


async def _refuse(ws: WebSocket, type: str, code: str | None, message: str, close_code: int, reason: str) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(ws.send_text(json.dumps({"type": "error", "event_id": _id("event"), "error": {
            "type": type, "code": code, "message": message, "param": None, "event_id": None}})), 1.0)
        await asyncio.wait_for(ws.close(code=close_code, reason=reason), 1.0)


async def close_all(state: ServerState) -> None:
    for conn in list(getattr(state, "connections", ())):
        with contextlib.suppress(Exception):
            await conn.ws.close(code=1001, reason="server shutting down")
        await conn.close()
