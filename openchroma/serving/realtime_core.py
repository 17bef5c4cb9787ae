"""The OpenAI Realtime protocol (GA event names), independent of how events travel.

A transport (the WebSocket one in ``realtime``; WebRTC's data channel or a telephony stream next) reads client
events and audio in its own framing, hands them to a ``RealtimeCore`` (parsed JSON events, and audio decoded with
``RealtimeCore.decode_append`` or taken from its own media), and gives the core an ``EventSink`` through which the
core's server events go out (typed builders in ``realtime_server_events``). ``Inbox`` keeps client events in order
and merges runs of audio into one engine call, within the transport's budgets.

The core holds one engine session (an ``AsyncSession``: every command is awaited on the engine worker's answer, so
nothing here blocks the event loop) and its parts: the settings (``realtime_settings``), the input audio and VAD
(``realtime_input``), the conversation's items (``realtime_items``) and the responses (``realtime_responses``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Literal, Protocol

import numpy as np

from ..engine import AsyncSession
from . import realtime_events as ev
from . import realtime_server_events as out
from .errors import APIError, EngineTimeout, shorten, wire_error
from .realtime_events import RealtimeError
from .realtime_input import InputAudio, new_id
from .realtime_items import Conversation
from .realtime_responses import Responses
from .realtime_settings import SessionSettings
from .sessions import close_session, open_session
from .state import OPENAI_STOCK_VOICES, ServerState, engine_await

log = logging.getLogger("openchroma.realtime")

# Why the core asks its transport to end the connection.
Ending = Literal["engine_failed"]


class EventSink(Protocol):
    """What a transport gives the core: a way to send server events, and to end the connection."""

    async def send(self, event: dict[str, Any]) -> None: ...

    def end(self, reason: Ending) -> None: ...


class RealtimeCore:
    """One realtime session: settings, input audio, conversation items and responses, over one engine session."""

    def __init__(self, state: ServerState, sink: EventSink):
        self.state, self.sink = state, sink
        self.engine = state.require_engine()   # APIError while the model loads
        self.cfg = state.config
        self.session: AsyncSession | None = None
        self.sid = new_id("sess")
        self.conversation_id = new_id("conv")
        self.settings = SessionSettings()
        self.input = InputAudio(self)
        self.conversation = Conversation(self)
        self.responses = Responses(self)
        self.closing = False   # the server is shutting down: no new responses

    # ----- plumbing -----------------------------------------------------------------------------------------
    async def call(self, awaitable):
        """Await an engine command; one that does not answer within ``engine_timeout`` raises ``EngineTimeout``."""
        return await engine_await(self.cfg, awaitable)

    async def send(self, event: dict[str, Any]) -> None:
        await self.sink.send(event)

    async def send_error(self, message: str, code: str | None, param: str | None = None,
                         type: str = "invalid_request_error", event_id: str | None = None) -> None:
        self.state.metrics.errors.labels(type).inc()
        await self.send(out.error(message, code, param, type, event_id))

    def end(self, reason: Ending) -> None:
        self.sink.end(reason)

    def heard_ms(self, item_id: str, sent_ms: float, first_sent: float | None) -> float:
        """How much of an answer item's audio the listener has heard: the transport's own measure when its sink has
        one (``heard_ms(item_id)``: Twilio's acknowledged marks, what WebRTC's track sent), else playback in real
        time from ``first_sent`` (``time.monotonic()`` of the first delta; None: nothing sent yet); never more than
        ``sent_ms``."""
        measure = getattr(self.sink, "heard_ms", None)
        heard = measure(item_id) if measure is not None else None
        if heard is None:
            heard = 0.0 if first_sent is None else 1000 * (time.monotonic() - first_sent)
        return min(sent_ms, heard)

    def resolve_voice(self, name: str, param: str) -> str | None:
        """A library voice for ``name``; None keeps the current one when ``name`` is one of OpenAI's stock voices
        that the server cannot map (frameworks send their default, e.g. "marin", whatever the server has)."""
        try:
            return self.state.resolve_voice(name)
        except APIError as e:
            if name in OPENAI_STOCK_VOICES and e.code == "voice_required":
                return None
            raise RealtimeError(e.message, e.code or "invalid_value", param) from None

    def session_object(self) -> dict[str, Any]:
        return self.settings.session_object(self.sid, self.cfg.model_id)

    # ----- lifecycle ----------------------------------------------------------------------------------------
    async def open(self, client: str) -> None:
        """Open the engine session for ``client`` and announce it; raises ``APIError`` when none can be had."""
        voice = None
        with contextlib.suppress(APIError):   # no default voice: the client must choose one first
            voice = self.state.resolve_voice(None)
        try:
            self.session = await open_session(self.state, "realtime", client, voice, self.settings.instructions)
        except APIError:
            raise
        except Exception as e:   # the engine is closed or failing: say so rather than drop the connection
            log.error("realtime: creating a session failed: %s: %s", type(e).__name__, e)
            raise APIError(503, f"the engine could not open a session: {type(e).__name__}: {shorten(str(e))}",
                           "server_error", "session_failed") from None
        self.settings.voice = voice
        self.input.new_vad()
        await self.send(out.session_created(self.session_object()))

    async def close(self) -> None:
        """Stop what runs and free the engine session (once)."""
        await self.responses.stop()
        self.conversation.stop()
        session, self.session = self.session, None
        if session is None:
            return
        try:
            await close_session(self.state, session)
        except Exception as e:  # the engine may be closing too, or stuck
            log.warning("realtime session %s: closing the engine session failed: %s: %s", self.sid,
                        type(e).__name__, e)

    async def drain(self, deadline: float) -> None:
        """The server is shutting down: start nothing new, let a running response finish until ``deadline``
        (``time.monotonic()``), then tell the client (the transport closes the connection next)."""
        self.closing = True
        await self.responses.finish(deadline)
        await self.send_error("the server is shutting down; this session ends now (reconnect to another server, or "
                              "to this one once it is back)", "server_shutting_down", type="server_error")

    def busy(self) -> bool:
        """Whether a response is being generated (the session is not idle, whatever the client does)."""
        return self.responses.active()

    # ----- client events ------------------------------------------------------------------------------------
    def decode_append(self, event: dict[str, Any]) -> np.ndarray:
        """An ``input_audio_buffer.append``'s audio, decoded (pure: may run in a helper thread); raises
        ``RealtimeError``."""
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise RealtimeError("input_audio_buffer.append needs 'audio': base64 audio in the input format",
                                "invalid_value", "audio")
        return self.input.decode(audio)

    async def apply(self, event: dict[str, Any], eid: str | None) -> None:
        """Apply one client event (a JSON object with a string ``type``); problems become error events."""
        async def work() -> None:
            await self.handle(ev.parse_event(event, self.cfg.max_text_chars), eid)

        await self.guarded(work(), eid)

    async def append_audio(self, samples: np.ndarray, eid: str | None) -> None:
        """Append decoded input audio (any number of appends merged); problems become error events."""
        await self.guarded(self.input.ingest(samples), eid)

    async def guarded(self, work, eid: str | None) -> None:
        """Run ``work`` (a coroutine applying a client event); its failure is one error event for that event, and an
        engine that does not answer ends the session (its slot is freed rather than held forever)."""
        try:
            await work
        except RealtimeError as e:
            await self.send_error(e.message, e.code, e.param, e.type, event_id=eid)
        except asyncio.CancelledError:
            raise
        except EngineTimeout as e:
            log.error("realtime session %s: %s", self.sid, e)
            await self.send_error(str(e), "engine_timeout", type="server_error", event_id=eid)
            self.end("engine_failed")
        except Exception as e:
            err = wire_error(e)
            if err is None and isinstance(e, (ValueError, TypeError)):
                err = APIError(400, shorten(str(e), 300))
            if err is None:  # never drop the connection over one event
                log.exception("realtime event failed")
                err = APIError(500, f"internal error: {type(e).__name__}: {shorten(str(e))}", "server_error",
                               "internal_error")
            await self.send_error(err.message, err.code or "invalid_request", err.param, err.type, event_id=eid)

    async def handle(self, event: ev.ClientEvent, eid: str | None) -> None:
        match event:
            case ev.SessionUpdate():
                await self.update_session(event.session)
            case ev.ItemCreate():
                await self.conversation.create(event.item, event.previous_item_id)
            case ev.ItemDelete():
                await self.conversation.delete(event.item_id)
            case ev.ItemRetrieve():
                await self.conversation.retrieve(event.item_id)
            case ev.ItemTruncate():
                await self.conversation.truncate(event)
            case ev.ResponseCreate():
                await self.responses.start(event.response)
            case ev.Simple(type="input_audio_buffer.commit"):
                await self.input.commit()
            case ev.Simple(type="input_audio_buffer.clear"):
                await self.input.clear()
            case ev.ResponseCancel():
                await self.responses.cancel(eid, "client_cancelled", event.response_id)

    async def update_session(self, s: ev.SessionConfig) -> None:
        change = SessionSettings.check(s, self.resolve_voice)   # everything checked before anything changes
        await self.input.load_turn_model(change.turn_detection)   # semantic_vad's model, off the loop
        if change.instructions is not None:
            await self.call(self.session.set_instructions(change.instructions))
        if change.voice is not None:
            await self.call(self.session.set_voice(change.voice))
        if change.input_format is not None:
            await self.input.drop_buffer()
        self.settings.apply(change)
        if change.resets_vad:
            self.input.new_vad()
        await self.send(out.session_updated(self.session_object()))


class PendingBudget:
    """Bytes of decoded input audio waiting for the core. A transport waits for room before it reads on (so a
    client that outruns the engine is pushed back) instead of queueing without bound."""

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


class Inbox:
    """Client events and decoded audio waiting for the core, applied in the order they came by ``run``; runs of
    audio are merged into one engine call, so a busy engine never makes the transport fall behind. Puts wait while
    ``max_events`` events or ``max_bytes`` of audio are waiting."""

    def __init__(self, core: RealtimeCore, max_events: int, max_bytes: int):
        self.core = core
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=max_events)
        self.budget = PendingBudget(max_bytes)

    @property
    def pending_bytes(self) -> int:
        """Decoded audio accepted but not yet handed to the engine."""
        return self.budget.used

    async def put_event(self, event: dict[str, Any], eid: str | None) -> None:
        await self.queue.put(("event", event, eid))

    async def put_audio(self, samples: np.ndarray, eid: str | None) -> None:
        await self.budget.acquire(samples.nbytes)
        try:
            await self.queue.put(("audio", samples, eid))
        except BaseException:
            self.budget.release(samples.nbytes)
            raise

    async def run(self, stopping: asyncio.Event) -> None:
        """Apply what comes until ``stopping`` is set (or the core's session is gone)."""
        held = None   # an event read while merging audio, applied next
        while True:
            kind, payload, eid = held or await self.queue.get()
            held = None
            if self.core.session is None or stopping.is_set():   # closing: nothing more is applied
                return
            if kind == "event":
                await self.core.apply(payload, eid)
                continue
            chunks = [payload]
            while not self.queue.empty():
                nxt = self.queue.get_nowait()
                if nxt[0] != "audio":
                    held = nxt
                    break
                chunks.append(nxt[1])
            try:
                await self.core.append_audio(np.concatenate(chunks), eid)
            finally:
                self.budget.release(sum(c.nbytes for c in chunks))
