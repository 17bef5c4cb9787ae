"""``/v1/realtime``: the OpenAI Realtime protocol (GA event names) over a WebSocket, one engine session each.

The connection reads client events as they come and keeps their order through one processor task:
user audio is decoded, run through the server VAD and fed to the engine as it arrives (consecutive
appends are merged into one engine call, so a busy engine never makes the socket fall behind), so the
reasoner has encoded the turn by the time the user stops. Responses stream on their own task; a
``response.cancel`` or the user starting to speak (barge-in) stops one within a frame, and the history
keeps only what the listener heard (the client may say exactly how much with ``conversation.item.truncate``).
Engine calls block, so each connection runs them on its own single thread, in order.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import functools
import json
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse

from ..audio import AudioError
from ..engine import AudioChunk, ContextFull, EngineError, ResponseDone, SessionLimit, TextDelta, UnknownVoice
from ..engine.engine import Response as EngineResponse
from .app import (
    APIError,
    EngineTimeout,
    ServerState,
    check_api_key,
    client_id,
    clip,
    engine_call,
    response_events,
    shorten,
)
from .codecs import InputDecoder, OutputEncoder
from .metrics import response_status
from .vad import StreamingVAD, VADConfig

log = logging.getLogger("openchroma.realtime")
router = APIRouter()

MIN_COMMIT_MS = 100
MAX_PENDING_EVENTS = 64          # client events read but not yet applied; past this the reader stops reading
MAX_VAD_MS = 10_000              # prefix padding and silence duration
MAX_OUTPUT_TOKENS = 4096
MAX_METADATA_KEYS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512   # OpenAI's limits on response.metadata
MAX_ITEM_ID = 64
# Close codes (README, "Serve"): what a client sees when the server ends its connection.
CLOSE_NOT_READING = 1008         # policy: the client stopped reading what it is sent
CLOSE_ENGINE_FAILED = 1011       # an engine call failed to answer; the session was freed
CLOSE_TRY_AGAIN = 1013           # session limits, model not ready
CLOSE_IDLE = 4000                # idle for --idle-timeout seconds
DEFAULT_VAD = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500,
               "create_response": True, "interrupt_response": True, "idle_timeout_ms": None}
SEMANTIC_SILENCE_MS = {"low": 1000, "medium": 600, "auto": 600, "high": 300}
INPUT_RATES = {"audio/pcm": None, "audio/pcmu": 8000, "audio/pcma": 8000}
BETA_FORMATS = {"pcm16": {"type": "audio/pcm", "rate": 24000}, "g711_ulaw": {"type": "audio/pcmu"},
                "g711_alaw": {"type": "audio/pcma"}}


def _object_or_empty(value: Any, param: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ClientError(f"{param} must be an object, got {clip(value)}", "invalid_value", param)
    return value


def _modalities(value: Any, param: str) -> list[str]:
    if not isinstance(value, list) or not value or any(m not in ("audio", "text") for m in value):
        raise ClientError(f"output_modalities must be ['audio'] or ['text'], got {clip(value)}", "invalid_value", param)
    return ["audio"] if "audio" in value else ["text"]


def _max_output_tokens(value: Any, param: str) -> int | str:
    if value == "inf" or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_OUTPUT_TOKENS):
        return value
    raise ClientError(f"max_output_tokens must be an integer from 1 to {MAX_OUTPUT_TOKENS} or 'inf', got {clip(value)}",
                      "invalid_value", param)


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


def _metadata(value: Any, param: str) -> dict[str, str] | None:
    """A response's ``metadata``: the client's own key/value strings, echoed back unchanged."""
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > MAX_METADATA_KEYS or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= MAX_METADATA_KEY and len(v) <= MAX_METADATA_VALUE
            for k, v in value.items()):
        raise ClientError(f"metadata must be an object of at most {MAX_METADATA_KEYS} string values (keys up to "
                          f"{MAX_METADATA_KEY} characters, values up to {MAX_METADATA_VALUE}), got {clip(value)}",
                          "invalid_value", param)
    return dict(value)


def _transcription(value: Any, param: str) -> dict[str, Any] | None:
    """``audio.input.transcription``: null (off) or ``{model, language, prompt}``. The transcript always comes from
    the Reasoner, whatever model is named; the settings are reported back as given."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ClientError(f"transcription must be null or an object, got {clip(value)}", "invalid_value", param)
    for k in ("model", "language", "prompt"):
        if value.get(k) is not None and not isinstance(value[k], str):
            raise ClientError(f"{k} must be a string, got {clip(value[k])}", "invalid_value", f"{param}.{k}")
    return {k: value.get(k) for k in ("model", "language", "prompt") if value.get(k) is not None}


class ClientError(Exception):
    """A problem with one client event: answered with an ``error`` event; the connection stays up."""

    def __init__(self, message: str, code: str, param: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.code, self.param, self.type = message, code, param, type


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
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="realtime-conn")
        self.session = None
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
        self.last_assistant_item: str | None = None
        self.transcribing: set[asyncio.Task] = set()
        self.response_task: asyncio.Task | None = None
        self.engine_response: EngineResponse | None = None
        self.cancel_reason: str | None = None
        self.played: tuple[float, int] | None = None   # (time the first audio delta was sent, ms sent)
        # Session settings, in the GA shape they are reported in.
        self.instructions: str | None = None
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
    async def run_blocking(self, fn, *args):
        """An engine call on the connection's own thread, in order; it always answers (an exception at worst)."""
        return await engine_call(self.cfg, fn, *args, executor=self.pool)

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
            "output_modalities": list(self.output_modalities), "instructions": self.instructions or "",
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
            try:
                voice = self.state.resolve_voice(None)
            except APIError:
                pass  # no default voice: the client must choose one before the first response
            from ..engine import DEFAULT_SYSTEM_PROMPT

            self.instructions = DEFAULT_SYSTEM_PROMPT
            self.session = await self.run_blocking(self.engine.create_session, voice, self.instructions)
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
            # Not on the connection's own thread: a stuck engine call there must not keep the slot held.
            await engine_call(self.cfg, session.close)
        except Exception as e:  # the engine may be closing too, or stuck
            log.warning("realtime session %s: closing the engine session failed: %s: %s", self.sid,
                        type(e).__name__, e)
        self.state.metrics.sessions_active.labels("realtime").dec()
        self.pool.shutdown(wait=False)

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
                    data = msg.get("bytes") or b""
                    try:
                        text = data.decode()
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
            busy = self.engine_response is not None and self.engine_response.done is None
            if busy:
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
        kind = event["type"]
        eid = event.get("event_id")
        if eid is not None and not isinstance(eid, str):
            eid = None
        elif eid is not None and len(eid) > 128:
            eid = eid[:128]
        if kind == "input_audio_buffer.append":
            audio = event.get("audio")
            if not isinstance(audio, str):
                await self.send_error("input_audio_buffer.append needs 'audio': base64 audio in the input format",
                                      "invalid_value", "audio", event_id=eid)
                return
            try:
                raw = base64.b64decode(audio, validate=True)
                samples = self.decode_input(raw)
            except (binascii.Error, ValueError) as e:
                fmt = self.input_format["type"]
                await self.send_error(f"'audio' is not valid base64 {fmt}: {shorten(str(e), 120)}",
                                      "invalid_value", "audio", event_id=eid)
                return
            await self.pending.acquire(samples.nbytes)
            await self.queue.put(("audio", samples, eid))
        else:  # response.cancel too: a cancel right after response.create must find that response
            await self.queue.put(("event", event, eid))

    async def process(self) -> None:
        """Apply client events in order; merge runs of audio appends into one engine call."""
        while True:
            kind, payload, eid = await self.queue.get()
            if self.session is None or self.stopping.is_set():   # closing: nothing more is applied
                return
            try:
                if kind == "audio":
                    chunks = [payload]
                    while not self.queue.empty() and self.queue._queue[0][0] == "audio":  # type: ignore[attr-defined]
                        chunks.append(self.queue.get_nowait()[1])
                    try:
                        await self.ingest(np.concatenate(chunks), eid)
                    finally:
                        self.pending.release(sum(c.nbytes for c in chunks))
                else:
                    await self.handle(payload, eid)
            except ClientError as e:
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

    # ----- input audio -----------------------------------------------------------------------------------
    def decode_input(self, raw: bytes) -> np.ndarray:
        # pcm16 decodes the same at any rate; the rate is kept in ``in_rate``.
        return InputDecoder(self.input_format["type"]).decode(raw)

    def new_vad(self) -> None:
        """A VAD for the current settings; its clock starts now, so its times are offset by ``vad_origin_ms``."""
        td = self.turn_detection
        self.vad = StreamingVAD(self._vad_config(td), self.in_rate) if td else None
        self.vad_origin_ms = self.clock_ms

    async def ingest(self, x: np.ndarray, eid: str | None) -> None:
        ms = 1000 * len(x) / self.in_rate
        if self.buffer_ms + ms > 1000 * self.cfg.max_input_audio_seconds:
            raise ClientError(f"the input audio buffer would exceed {self.cfg.max_input_audio_seconds:.0f} s; "
                              "commit or clear it (this append was dropped)", "input_audio_buffer_too_long")
        start_ms = self.clock_ms
        self.clock_ms += ms
        if self.vad is None or not self.turn_detection:
            self.buffer_ms += ms
            await self.run_blocking(self.session.append_audio, x, self.in_rate)
            return
        events, fed = await self.run_blocking(self._vad_step, x, start_ms)
        self.buffer_ms += fed
        for ev in events:
            at_ms = int(ev.audio_ms + self.vad_origin_ms)
            if ev.kind == "speech_started":
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
                await self.commit(eid, item)
                if self.turn_detection.get("create_response", True):
                    await self.start_response({}, None)

    def _vad_step(self, x: np.ndarray, start_ms: float) -> tuple[list, float]:
        """On the connection's thread: VAD, then feed the engine the speech (with its prefix padding) only."""
        was_speaking = self.vad.speaking
        events = self.vad.push(x)
        fed = 0.0
        pad = self.turn_detection.get("prefix_padding_ms", 300)
        if not was_speaking and not self.vad.speaking and not events:
            self.prefix.append((start_ms, x))
            while self.prefix and self.prefix[0][0] + 1000 * len(self.prefix[0][1]) / self.in_rate < \
                    start_ms - pad:
                self.prefix.popleft()
            return events, fed
        if not was_speaking:
            # Speech began in this chunk: feed the padding before it, from the kept audio.
            onset = next((e.audio_ms + self.vad_origin_ms for e in events if e.kind == "speech_started"), start_ms)
            for s_ms, chunk in self.prefix:
                skip = max(0, int((onset - s_ms) * self.in_rate / 1000))
                if skip < len(chunk):
                    self.session.append_audio(chunk[skip:], self.in_rate)
                    fed += 1000 * (len(chunk) - skip) / self.in_rate
            self.prefix.clear()
        self.session.append_audio(x, self.in_rate)
        fed += 1000 * len(x) / self.in_rate
        return events, fed

    async def commit(self, eid: str | None, item_id: str | None = None) -> None:
        if self.buffer_ms < MIN_COMMIT_MS:
            raise ClientError(f"buffer too small: expected at least {MIN_COMMIT_MS} ms of audio, but the buffer "
                              f"holds {self.buffer_ms:.0f} ms", "input_audio_buffer_commit_empty")
        item_id = item_id or self.speech_item or _id("item")
        self.speech_item = None
        ms = self.buffer_ms
        # The committed audio is one user message of its own in the engine's history, under the item's id.
        await self.run_blocking(self.session.commit_audio, item_id)
        self.buffer_ms = 0.0
        if self.vad is not None:
            await self.run_blocking(self.vad.reset)
        self.prefix.clear()
        prev = self.items[-1]["id"] if self.items else None
        await self.send({"type": "input_audio_buffer.committed", "item_id": item_id, "previous_item_id": prev})
        item = {"id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
                "content": [{"type": "input_audio", "transcript": None}]}
        await self.item_added(item)
        await self.transcribe_audio(item, ms / 1000)

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

    def find_item(self, item_id: Any, param: str = "item_id", code: str = "item_not_found") -> dict[str, Any]:
        found = next((it for it in self.items if it["id"] == item_id), None) if isinstance(item_id, str) else None
        if found is None:
            raise ClientError(f"the conversation has no item with id {clip(item_id)}", code, param)
        return found

    # ----- user transcripts --------------------------------------------------------------------------------
    async def transcribe_audio(self, item: dict[str, Any], seconds: float) -> None:
        """When the client asked for transcripts, have the Reasoner transcribe the item's newest audio part (already
        encoded for the response) in the engine's background slices, and stream it as it comes."""
        if self.transcription is None:
            return
        index = max(i for i, part in enumerate(item["content"]) if part["type"] == "input_audio")
        stream = await self.run_blocking(self.session.transcribe, -1)
        task = asyncio.create_task(self.stream_transcript(stream, item, index, seconds))
        self.transcribing.add(task)
        task.add_done_callback(self.transcribing.discard)

    async def stream_transcript(self, stream, item: dict[str, Any], index: int, seconds: float) -> None:
        base = {"item_id": item["id"], "content_index": index}
        try:
            done = None
            async for ev in stream:
                if isinstance(ev, TextDelta):
                    if ev.text:
                        await self.send({"type": "conversation.item.input_audio_transcription.delta", **base,
                                         "delta": ev.text})
                else:
                    done = ev
            if done is None or done.error:
                raise RuntimeError(done.error if done is not None else "the transcription ended early")
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("realtime session %s: transcribing %s failed: %s", self.sid, item["id"], e)
            await self.send({"type": "conversation.item.input_audio_transcription.failed", **base, "error": {
                "type": "server_error", "code": "transcription_failed", "message": shorten(str(e)), "param": None}})
            return
        text = done.text.strip()
        item["content"][index]["transcript"] = text
        await self.send({"type": "conversation.item.input_audio_transcription.completed", **base, "transcript": text,
                         "usage": {"type": "duration", "seconds": round(seconds, 3)}})
    # ----- client events ---------------------------------------------------------------------------------
    async def handle(self, event: dict[str, Any], eid: str | None) -> None:
        kind = event["type"]
        if kind == "session.update":
            await self.update_session(event.get("session"))
        elif kind == "input_audio_buffer.commit":
            await self.commit(eid)
        elif kind == "input_audio_buffer.clear":
            await self.run_blocking(self.session.clear_audio)
            self.buffer_ms = 0.0
            if self.vad is not None:
                await self.run_blocking(self.vad.reset)
            self.prefix.clear()
            await self.send({"type": "input_audio_buffer.cleared"})
        elif kind == "conversation.item.create":
            await self.create_item(event.get("item"), event.get("previous_item_id"))
        elif kind == "conversation.item.delete":
            await self.delete_item(event.get("item_id"))
        elif kind == "conversation.item.retrieve":
            item = self.find_item(event.get("item_id"), code="item_retrieve_invalid_item_id")   # OpenAI's codes
            await self.send({"type": "conversation.item.retrieved", "item": item})
        elif kind == "conversation.item.truncate":
            await self.truncate(event)
        elif kind == "response.create":
            await self.start_response(event.get("response") or {}, eid)
        elif kind == "response.cancel":
            await self.cancel_response(eid, "client_cancelled")
        elif kind in ("output_audio_buffer.clear", "transcription_session.update"):
            raise ClientError(f"{kind} is not supported by this server", "unsupported_event")
        else:
            raise ClientError(f"unknown event type {clip(kind)}", "invalid_event_type", "type")

    @staticmethod
    def _vad_config(td: dict[str, Any] | None) -> VADConfig:
        td = td or DEFAULT_VAD
        return VADConfig(threshold=float(td.get("threshold", 0.5)),
                         prefix_padding_ms=int(td.get("prefix_padding_ms", 300)),
                         silence_duration_ms=int(td.get("silence_duration_ms", 500)))

    async def update_session(self, s: Any) -> None:
        if not isinstance(s, dict):
            raise ClientError("session.update needs a 'session' object", "invalid_value", "session")
        if s.get("type") not in (None, "realtime"):
            raise ClientError(f"session type {clip(s.get('type'))} is not supported: only 'realtime'", "invalid_value",
                              "session.type")
        audio = _object_or_empty(s.get("audio"), "session.audio")
        a_in = _object_or_empty(audio.get("input"), "session.audio.input")
        a_out = _object_or_empty(audio.get("output"), "session.audio.output")
        # Older (beta) clients send flat fields; accept both.
        voice = a_out.get("voice", s.get("voice"))
        in_fmt = a_in.get("format", s.get("input_audio_format"))
        out_fmt = a_out.get("format", s.get("output_audio_format"))
        has_td = "turn_detection" in a_in or "turn_detection" in s
        td = a_in.get("turn_detection", s.get("turn_detection"))
        modalities = s.get("output_modalities", s.get("modalities"))
        has_tr = "transcription" in a_in or "input_audio_transcription" in s
        transcription = _transcription(a_in.get("transcription", s.get("input_audio_transcription")),
                                       "session.audio.input.transcription") if has_tr else None

        # Validate everything before changing anything.
        new_voice = self._voice(voice, "session.audio.output.voice") if voice is not None else None
        new_in = self._format(in_fmt, "session.audio.input.format", inputs=True) if in_fmt is not None else None
        new_out = self._format(out_fmt, "session.audio.output.format", inputs=False) if out_fmt is not None else None
        new_td = self.turn_detection
        if has_td:
            new_td = self._turn_detection(td)
        if modalities is not None:
            modalities = _modalities(modalities, "session.output_modalities")
        mot = s.get("max_output_tokens", s.get("max_response_output_tokens"))
        if mot is not None:
            mot = _max_output_tokens(mot, "session.max_output_tokens")
        instructions = s.get("instructions")
        if instructions is not None:
            self._check_text(instructions, "session.instructions", allow_empty=True)

        if instructions is not None:
            await self.run_blocking(self.session.set_instructions, instructions)
            self.instructions = instructions
        if new_voice is not None:
            await self.run_blocking(self.session.set_voice, new_voice)
            self.voice = new_voice
        if new_in is not None:
            if self.buffer_ms:
                await self.run_blocking(self.session.clear_audio)
                self.buffer_ms = 0.0
            self.input_format = new_in
            self.in_rate = new_in.get("rate") or INPUT_RATES[new_in["type"]]
        if new_out is not None:
            self.output_format = new_out
        if has_td or new_in is not None:
            self.turn_detection = new_td
            self.new_vad()
            self.prefix.clear()
        if modalities is not None:
            self.output_modalities = modalities
        if has_tr:
            self.transcription = transcription
        if mot is not None:
            self.max_output_tokens = mot
        await self.send({"type": "session.updated", "session": self.session_object()})

    @staticmethod
    def _format(fmt: Any, param: str, inputs: bool) -> dict[str, Any]:
        if isinstance(fmt, str):
            if fmt not in BETA_FORMATS:
                raise ClientError(f"unknown audio format {clip(fmt)}; use one of {', '.join(BETA_FORMATS)}",
                                  "invalid_value", param)
            fmt = dict(BETA_FORMATS[fmt])
        if not isinstance(fmt, dict) or fmt.get("type") not in INPUT_RATES:
            raise ClientError(f"audio format must be one of {', '.join(INPUT_RATES)}", "invalid_value", param)
        if fmt["type"] == "audio/pcm":
            rate = fmt.get("rate", 24000)
            ok = rate in (8000, 16000, 24000, 44100, 48000) if inputs else rate == 24000
            if not ok:
                allowed = "8000, 16000, 24000, 44100 or 48000" if inputs else "24000"
                raise ClientError(f"audio/pcm rate {clip(rate)} is not supported here; use {allowed}", "invalid_value",
                                  param + ".rate")
            return {"type": "audio/pcm", "rate": rate}
        return {"type": fmt["type"]}

    @staticmethod
    def _turn_detection(td: Any) -> dict[str, Any] | None:
        if td is None:
            return None
        if not isinstance(td, dict) or td.get("type") not in ("server_vad", "semantic_vad"):
            raise ClientError("turn_detection must be null or {'type': 'server_vad', ...}", "invalid_value",
                              "session.audio.input.turn_detection")
        out = dict(DEFAULT_VAD)
        if td["type"] == "semantic_vad":  # approximated by the server VAD with a silence matching the eagerness
            out["silence_duration_ms"] = SEMANTIC_SILENCE_MS.get(td.get("eagerness") or "auto", 600)
        if td["type"] == "semantic_vad" and td.get("eagerness") not in (None, *SEMANTIC_SILENCE_MS):
            raise ClientError(f"eagerness must be one of {', '.join(SEMANTIC_SILENCE_MS)}", "invalid_value",
                              "session.audio.input.turn_detection.eagerness")
        where = "session.audio.input.turn_detection."
        for k, lo, hi in (("threshold", 0.0, 1.0), ("prefix_padding_ms", 0, MAX_VAD_MS),
                          ("silence_duration_ms", 0, MAX_VAD_MS), ("idle_timeout_ms", 0, 3_600_000)):
            v = td.get(k)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo <= v <= hi):
                raise ClientError(f"{k} must be a number from {lo} to {hi}, got {clip(v)}", "invalid_value", where + k)
            out[k] = v
        for k in ("create_response", "interrupt_response"):
            v = td.get(k)
            if v is not None and not isinstance(v, bool):
                raise ClientError(f"{k} must be true or false, got {clip(v)}", "invalid_value", where + k)
            if v is not None:
                out[k] = v
        return out

    def _check_text(self, text: Any, param: str, allow_empty: bool = False) -> str:
        """A client's text, refused when it is not a string, empty, or over ``max_text_chars`` (a huge text would
        hold the tokenizer, and the interpreter, while every other session waits)."""
        if not isinstance(text, str) or (not allow_empty and not text.strip()):
            raise ClientError(f"{param} must be a non-empty string", "invalid_value", param)
        if len(text) > self.cfg.max_text_chars:
            raise ClientError(f"{param} is {len(text)} characters; the server's limit is {self.cfg.max_text_chars}",
                              "string_above_max_length", param)
        return text

    async def create_item(self, item: Any, previous_item_id: Any = None) -> None:
        if not isinstance(item, dict):
            raise ClientError("conversation.item.create needs an 'item' object", "invalid_value", "item")
        if item.get("type", "message") != "message":
            raise ClientError(f"items of type {clip(item.get('type'))} are not supported: only messages",
                              "unsupported_item", "item.type")
        role = item.get("role")
        content = item.get("content")
        if role not in ("user", "assistant", "system") or not isinstance(content, list) or not content:
            raise ClientError("a message item needs a role (user, assistant or system) and a non-empty content list",
                              "invalid_value", "item")
        item_id = item.get("id")
        if item_id is None:
            item_id = _id("item")
        elif not isinstance(item_id, str) or not 0 < len(item_id) <= MAX_ITEM_ID:
            raise ClientError(f"item.id must be a string of 1 to {MAX_ITEM_ID} characters", "invalid_value", "item.id")
        elif any(it["id"] == item_id for it in self.items):
            raise ClientError(f"the conversation already has an item with id {clip(item_id)}", "item_already_exists",
                              "item.id")
        if previous_item_id is not None and previous_item_id != "root":
            self.find_item(previous_item_id, "previous_item_id")
        at_end = previous_item_id is None or previous_item_id == (self.items[-1]["id"] if self.items else "root")
        responding = self.engine_response is not None and self.engine_response.done is None
        if responding and (role != "user" or not at_end):
            raise ClientError("a response is in progress: cancel it before adding assistant or system messages or "
                              "inserting into the history", "conversation_already_has_active_response")
        texts: list[str] = []
        audio: dict[int, np.ndarray] = {}
        out_content = []
        for i, part in enumerate(content):
            ptype = part.get("type") if isinstance(part, dict) else None
            if ptype in ("input_text", "text", "output_text"):
                texts.append(self._check_text(part.get("text"), f"item.content[{i}].text"))
                out_content.append({"type": ptype, "text": texts[-1]})
            elif ptype in ("audio", "output_audio") and role == "assistant" and isinstance(part.get("transcript"), str):
                # An assistant's earlier audio, as its transcript (how clients replay a conversation's history).
                texts.append(self._check_text(part["transcript"], f"item.content[{i}].transcript"))
                out_content.append({"type": ptype, "transcript": texts[-1]})
            elif ptype == "input_audio" and role == "user":
                audio[i] = self._item_audio(part, i)
                out_content.append({"type": "input_audio", "transcript": None})
            else:
                raise ClientError(f"content part type {clip(ptype)} is not supported for a {role} message",
                                  "unsupported_content", f"item.content[{i}].type")
        if audio:
            if not at_end:
                raise ClientError("an item with audio can only be added at the end of the conversation",
                                  "invalid_value", "previous_item_id")
            if self.buffer_ms:
                raise ClientError(f"the input audio buffer holds {self.buffer_ms:.0f} ms of audio: commit or clear it "
                                  "before adding an audio item", "input_audio_buffer_not_empty", "item")
            # Parts in order; the engine's turn collects them and ends as one message under the item's id.
            for i in range(len(content)):
                if i in audio:
                    await self.run_blocking(self.session.append_audio, audio[i], self.in_rate)
                    await self.run_blocking(self.session.commit_audio)
                else:
                    await self.run_blocking(self.session.add_text, out_content[i]["text"])
            await self.run_blocking(self.session.end_turn, item_id)
        elif at_end:
            await self.run_blocking(self.session.add_message, role, "\n".join(texts), item_id)
        else:
            where = 1 if previous_item_id == "root" else previous_item_id
            await self.run_blocking(self.session.insert_message, where, role, "\n".join(texts), item_id)
        new = {"id": item_id, "object": "realtime.item", "type": "message", "role": role, "status": "completed",
               "content": out_content}
        await self.item_added(new, None if at_end else previous_item_id)
        if audio:
            await self.transcribe_audio(new, sum(len(x) for x in audio.values()) / self.in_rate)

    def _item_audio(self, part: dict[str, Any], i: int) -> np.ndarray:
        audio = part.get("audio")
        if not isinstance(audio, str):
            raise ClientError("an audio part needs 'audio': base64 audio in the input format", "invalid_value",
                              f"item.content[{i}].audio")
        try:
            samples = self.decode_input(base64.b64decode(audio, validate=True))
        except (binascii.Error, ValueError) as e:
            raise ClientError(f"'audio' is not valid base64 audio: {shorten(str(e), 120)}", "invalid_value",
                              f"item.content[{i}].audio") from None
        if 1000 * len(samples) / self.in_rate > 1000 * self.cfg.max_input_audio_seconds:
            raise ClientError(f"the audio is over the server's {self.cfg.max_input_audio_seconds:.0f} s per turn",
                              "input_audio_buffer_too_long", f"item.content[{i}].audio")
        if len(samples) < self.in_rate * MIN_COMMIT_MS / 1000:
            raise ClientError(f"an audio part needs at least {MIN_COMMIT_MS} ms of audio", "invalid_value",
                              f"item.content[{i}].audio")
        return samples

    async def delete_item(self, item_id: Any) -> None:
        item = self.find_item(item_id, code="item_delete_invalid_item_id")
        if self.engine_response is not None and self.engine_response.done is None:
            raise ClientError("a response is in progress: cancel it before deleting items",
                              "conversation_already_has_active_response", "item_id")
        try:
            await self.run_blocking(self.session.delete_message, item["id"])
        except EngineError:
            pass   # the engine had already forgotten it (a full context drops the oldest turns)
        self.items.remove(item)
        if self.last_assistant_item == item["id"]:
            self.last_assistant_item = None
        await self.send({"type": "conversation.item.deleted", "item_id": item["id"]})

    async def truncate(self, event: dict[str, Any]) -> None:
        item_id, ms = event.get("item_id"), event.get("audio_end_ms")
        if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not 0 <= ms <= 86_400_000:
            raise ClientError("audio_end_ms must be a non-negative number", "invalid_value", "audio_end_ms")
        if item_id != self.last_assistant_item or item_id is None:
            raise ClientError(f"only the last assistant item ({self.last_assistant_item}) can be truncated",
                              "invalid_value", "item_id")
        if self.engine_response is None or self.engine_response.done is None:
            raise ClientError("the response is still in progress: cancel it first", "invalid_value", "item_id")
        await self.run_blocking(self.session.truncate_response, float(ms))
        await self.send({"type": "conversation.item.truncated", "item_id": item_id,
                         "content_index": event.get("content_index", 0), "audio_end_ms": int(ms)})

    # ----- responses -------------------------------------------------------------------------------------
    async def cancel_response(self, eid: str | None, reason: str) -> None:
        resp = self.engine_response
        if resp is None or resp.done is not None:
            if reason == "client_cancelled":
                await self.send_error("there is no response in progress to cancel", "response_cancel_not_active",
                                      event_id=eid)
            return
        self.cancel_reason = reason
        resp.cancel()
        if self.response_task is not None and self.response_task is not asyncio.current_task():
            await asyncio.wait([self.response_task])   # response.done goes out before any later event

    async def start_response(self, params: dict[str, Any], eid: str | None) -> None:
        if not isinstance(params, dict):
            raise ClientError("'response' must be an object", "invalid_value", "response")
        if self.engine_response is not None and self.engine_response.done is None:
            raise ClientError("the conversation already has an active response; cancel it first",
                              "conversation_already_has_active_response")
        opts = self._response_options(params)
        voice = opts["voice"] or self.session.voice
        if voice is None:
            raise ClientError("no voice is selected: set session.audio.output.voice to a library voice (GET "
                              "/v1/voices) first", "voice_required", "session.audio.output.voice")
        mot = opts["max_output_tokens"]
        max_frames = self.cfg.max_response_frames if mot == "inf" else min(self.cfg.max_response_frames, 2 * int(mot))
        rid = _id("resp")
        item_id = _id("item")
        out = ResponseOut(rid, item_id, opts["modalities"], opts["format"], voice, mot, opts["metadata"],
                          opts["out_of_band"])
        self.cancel_reason = None
        self.played = None
        await self.send({"type": "response.created", "response": self._response_obj(out, "in_progress")})
        try:
            engine_resp = await self.run_blocking(functools.partial(
                self.session.respond, max_frames, voice=opts["voice"], instructions=opts["instructions"],
                out_of_band=out.out_of_band, messages=opts["messages"],
                item_id=None if out.out_of_band else item_id))
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
        self.engine_response = engine_resp
        item = {"id": item_id, "object": "realtime.item", "type": "message", "role": "assistant",
                "status": "in_progress", "content": []}
        out.item = item
        # The item joins the conversation now, so that events the client sends next find it there.
        await self.send({"type": "response.output_item.added", "response_id": rid, "output_index": 0, "item": item})
        if not out.out_of_band:
            self.last_assistant_item = item_id
            await self.item_added(item)
        self.response_task = asyncio.create_task(self.stream_response(engine_resp, out))

    def _response_options(self, p: dict[str, Any]) -> dict[str, Any]:
        """``response.create``'s per-response settings, checked; what it leaves out comes from the session."""
        conversation = p.get("conversation", "auto")
        if conversation not in ("auto", "none"):
            raise ClientError(f"conversation must be 'auto' or 'none', got {clip(conversation)}", "invalid_value",
                              "response.conversation")
        modalities = p.get("output_modalities", p.get("modalities"))
        modalities = self.output_modalities if modalities is None else _modalities(modalities,
                                                                                  "response.output_modalities")
        mot = p.get("max_output_tokens", p.get("max_response_output_tokens"))
        mot = self.max_output_tokens if mot is None else _max_output_tokens(mot, "response.max_output_tokens")
        audio_out = _object_or_empty(_object_or_empty(p.get("audio"), "response.audio").get("output"),
                                     "response.audio.output")
        fmt = audio_out.get("format", p.get("output_audio_format"))
        fmt = dict(self.output_format) if fmt is None else self._format(fmt, "response.audio.output.format", False)
        voice = audio_out.get("voice", p.get("voice"))
        if voice is not None:
            voice = self._voice(voice, "response.audio.output.voice")
        instructions = p.get("instructions")
        if instructions is not None:
            self._check_text(instructions, "response.instructions", allow_empty=True)
        messages = None
        if p.get("input") is not None:
            if conversation != "none":
                raise ClientError("'input' gives an out-of-band response its own context: use it with conversation "
                                  "'none'", "invalid_value", "response.input")
            messages = self._input_messages(p["input"])
        return {"modalities": modalities, "max_output_tokens": mot, "format": fmt, "voice": voice,
                "instructions": instructions, "metadata": _metadata(p.get("metadata"), "response.metadata"),
                "out_of_band": conversation == "none", "messages": messages}

    def _input_messages(self, items: Any) -> list[dict[str, str]]:
        """An out-of-band response's ``input``: text messages, or references to items of the conversation (audio
        ones by their transcript)."""
        if not isinstance(items, list):
            raise ClientError("response.input must be a list of items", "invalid_value", "response.input")
        out = []
        for i, it in enumerate(items):
            param = f"response.input[{i}]"
            if isinstance(it, dict) and it.get("type") == "item_reference":
                it = self.find_item(it.get("id"), param + ".id")
            if not isinstance(it, dict) or it.get("type", "message") != "message" or \
                    it.get("role") not in ("user", "assistant", "system") or not isinstance(it.get("content"), list):
                raise ClientError("each input must be a message item (role and content) or an item_reference",
                                  "invalid_value", param)
            words = []
            for part in it["content"]:
                text = part.get("text", part.get("transcript")) if isinstance(part, dict) else None
                if not isinstance(text, str) or not text.strip():
                    raise ClientError("input items must be text (audio only by an item_reference to audio already "
                                      "transcribed)", "unsupported_content", param + ".content")
                words.append(self._check_text(text, param + ".content"))
            out.append({"role": it["role"], "text": "\n".join(words)})
        return out

    def _voice(self, voice: Any, param: str) -> str:
        name = voice.get("id") if isinstance(voice, dict) else voice
        if not isinstance(name, str) or not name:
            raise ClientError("voice must be a voice name", "invalid_value", param)
        try:
            return self.state.resolve_voice(name)
        except APIError as e:
            raise ClientError(e.message, e.code or "invalid_value", param) from None

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
        rid, item_id, item = out.id, out.item_id, out.item
        base = {"response_id": rid, "item_id": item_id, "output_index": 0, "content_index": 0}
        part_type = "audio" if audio_out else "text"
        await self.send({"type": "response.content_part.added", **base,
                         "part": {"type": part_type, "transcript": ""} if audio_out else {"type": "text", "text": ""}})
        encoder = OutputEncoder(out.format["type"]) if audio_out else None
        ms_per_frame = 1000 * self.engine.cfg.audio_frame_freq / self.engine.sample_rate
        sent_ms = 0.0
        done: ResponseDone | None = None
        async for ev in response_events(self.cfg, resp):
            if isinstance(ev, AudioChunk):
                if encoder is not None:
                    data = encoder.encode(ev.audio)
                    if data:
                        await self.send({"type": "response.output_audio.delta", **base,
                                         "delta": base64.b64encode(data).decode()})
                    if self.played is None:
                        self.played = (time.monotonic(), 0)
                    sent_ms += ms_per_frame
            elif isinstance(ev, TextDelta):
                kind = "response.output_audio_transcript.delta" if audio_out else "response.output_text.delta"
                await self.send({"type": kind, **base, "delta": ev.text})
            elif isinstance(ev, ResponseDone):
                done = ev
        assert done is not None
        if encoder is not None:
            tail = encoder.flush()
            if tail:
                await self.send({"type": "response.output_audio.delta", **base,
                                 "delta": base64.b64encode(tail).decode()})
        status = response_status(done.stop_reason)
        text = done.text
        if status == "cancelled" and audio_out and not out.out_of_band:
            # Barge-in or cancel: keep in the history what the listener can have heard by now (playback starts
            # with the first delta and runs in real time); a conversation.item.truncate can correct it later.
            heard = 0.0 if self.played is None else min(sent_ms, 1000 * (time.monotonic() - self.played[0]))
            text = await self.run_blocking(self.session.truncate_response, heard)
        self.state.metrics.observe_response("realtime", done)
        if audio_out:
            await self.send({"type": "response.output_audio.done", **base})
            await self.send({"type": "response.output_audio_transcript.done", **base, "transcript": text})
            part = {"type": "audio", "transcript": text}
        else:
            await self.send({"type": "response.output_text.done", **base, "text": text})
            part = {"type": "text", "text": text}
        await self.send({"type": "response.content_part.done", **base, "part": part})
        # The conversation's copy of the item changes in place, so that a retrieve sees the final one.
        item.update(status="completed" if status == "completed" else "incomplete",
                    content=[{"type": "output_audio" if audio_out else "output_text",
                              **({"transcript": text} if audio_out else {"text": text})}])
        await self.send({"type": "response.output_item.done", "response_id": rid, "output_index": 0, "item": item})
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
        row = getattr(resp, "row", None)
        prompt_len = row.prompt_len if row is not None else 0
        ctx = self.session.ctx_ids[:prompt_len] if self.session is not None else []
        audio_in = sum(1 for t in ctx if t == self.engine.cfg.audio_token_index)
        out_text = len(done.tokens)
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
        try:
            await conn.ws.close(code=1001, reason="server shutting down")
        except Exception:
            pass
        await conn.close()
