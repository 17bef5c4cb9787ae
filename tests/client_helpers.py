"""Shared pieces for the tests that drive third-party voice-agent frameworks (Pipecat, LiveKit Agents) against a
real ``openchroma`` server on loopback, pointed at it the way a user would: a custom base URL and any API key.

Everything here is bounded: a test that waits for something the server never sends fails within seconds, naming
what did not arrive, rather than hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
from server_harness import SPEECH_WAV, chroma_server

from openchroma.audio import load_audio
from openchroma.serving.codecs import float_to_pcm16

VOICE = "lib"
VOICE_TRANSCRIPT = "Hello there. Could you tell me what the weather will be like tomorrow?"
RATE = 24000            # the OpenAI Realtime protocol's pcm16 rate
WAIT = 15.0             # seconds one expected event may take here, on a busy 2-core machine (fail fast, never hang)

T = TypeVar("T")


def quiet_framework_logs() -> None:
    """The frameworks log every event at INFO/DEBUG; keep the test output readable (errors still show)."""
    for name in ("livekit", "livekit.agents", "livekit.plugins.openai", "pipecat", "websockets", "aiohttp"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with contextlib.suppress(ImportError):
        from loguru import logger  # Pipecat logs through loguru

        logger.remove()
        logger.add(sys.stderr, level="WARNING")


@contextlib.contextmanager
def openchroma_server(chroma, data_dir: Path, **config) -> Iterator[tuple[str, Any]]:
    """A fresh server over ``chroma`` with one library voice (so OpenAI's stock voice names fall back to it);
    yields (base URL ``http://127.0.0.1:PORT``, app state)."""
    config.setdefault("max_response_seconds", 2.0)
    config.setdefault("idle_timeout", 60.0)
    with chroma_server(chroma, data_dir, **config) as (url, state):
        with open(SPEECH_WAV, "rb") as f:
            r = httpx.post(f"{url}/v1/voices", files={"file": ("speech.wav", f, "audio/wav")},
                           data={"name": VOICE, "transcript": VOICE_TRANSCRIPT}, timeout=60)
        assert r.status_code == 201, r.text
        yield url, state


def ws_url(http_url: str) -> str:
    return http_url.replace("http://", "ws://", 1) + "/v1/realtime"


def speech_pcm16(rate: int = RATE) -> bytes:
    """``tests/data/speech.wav`` (3 s of speech) as mono pcm16 at ``rate``."""
    return float_to_pcm16(load_audio(SPEECH_WAV, rate).numpy())


def silence_pcm16(seconds: float, rate: int = RATE) -> bytes:
    return float_to_pcm16(np.zeros(int(seconds * rate), np.float32))


def chunks(pcm: bytes, rate: int = RATE, ms: int = 100) -> Iterator[bytes]:
    """``pcm`` (mono pcm16) in ``ms`` pieces, as a microphone delivers it."""
    step = 2 * rate * ms // 1000
    for i in range(0, len(pcm), step):
        yield pcm[i:i + step]


async def within(aw: Awaitable[T], what: str, timeout: float = WAIT) -> T:
    """``await aw``, failing with a message that names what did not arrive when it takes over ``timeout`` s."""
    try:
        return await asyncio.wait_for(aw, timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"not received within {timeout:g} s: {what}") from None


async def until(predicate: Callable[[], Any], what: str, timeout: float = WAIT, step: float = 0.01) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned), failing after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not received within {timeout:g} s: {what}")
        await asyncio.sleep(step)


def connection(state, session_id: str):
    """The server's realtime connection whose ``session.created`` carried ``session_id``."""
    for conn in list(state.connections):
        if conn.sid == session_id:
            return conn
    raise AssertionError(f"no live realtime connection for session {session_id}")


def history_text(state, session_id: str) -> list[tuple[str, str]]:
    """The server engine's history for one connection as (role, text) pairs, the system prompt left out."""
    session = connection(state, session_id).session
    return [(m["role"], " ".join(str(p.get("text", "<" + p.get("type", "?") + ">")) for p in m["content"]))
            for m in session.history[1:]]


class EventLog:
    """Raw protocol events as a framework sent or received them (dicts), searchable with a bounded wait."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def add(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def of(self, kind: str, since: int = 0) -> list[dict[str, Any]]:
        return [e for e in self.events[since:] if e.get("type") == kind]

    def types(self, since: int = 0) -> list[str]:
        return [e.get("type", "?") for e in self.events[since:]]

    def mark(self) -> int:
        return len(self.events)

    async def wait(self, kind: str, what: str | None = None, since: int = 0,
                   where: Callable[[dict[str, Any]], bool] | None = None, timeout: float = WAIT) -> dict[str, Any]:
        def found():
            return next((e for e in self.of(kind, since) if where is None or where(e)), None)

        try:
            return await until(found, what or kind, timeout)
        except AssertionError as e:
            seen = [t for t in self.types(since) if not t.endswith(".delta")]
            raise AssertionError(f"{e}; server events since: {seen[-25:]}") from None


# ----- Pipecat -----------------------------------------------------------------------------------------------------
class PipecatRig:
    """Pipecat's ``OpenAIRealtimeLLMService`` in a transport-less pipeline ``[up-recorder, llm, down-recorder]``.

    Frames go in with ``push``; every frame that comes out either way is recorded in ``frames`` as
    ``(direction, frame)``. The client events the service sends are recorded in ``sent`` and the server events it
    receives in ``received`` (raw JSON dicts)."""

    def __init__(self, url: str, session_properties=None, **settings):
        self.url = url
        self.session_properties = session_properties
        self.settings = settings
        self.frames: list[tuple[str, Any]] = []
        self.sent = EventLog()
        self.received = EventLog()

    async def __aenter__(self) -> PipecatRig:
        import json

        from pipecat.frames.frames import Frame
        from pipecat.pipeline.pipeline import Pipeline
        from pipecat.pipeline.worker import PipelineParams, PipelineWorker
        from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
        from pipecat.services.openai.realtime import events
        from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService
        from pipecat.workers.runner import WorkerRunner

        rig = self

        class Recorder(FrameProcessor):
            def __init__(self, direction):
                super().__init__()
                self.direction = direction

            async def process_frame(self, frame: Frame, direction: FrameDirection):
                await super().process_frame(frame, direction)
                if direction == self.direction:
                    rig.frames.append((direction.name.lower(), frame))
                await self.push_frame(frame, direction)

        settings = OpenAIRealtimeLLMService.Settings(model="chroma-tiny", **self.settings)
        if self.session_properties is not None:
            settings.session_properties = self.session_properties
        self.llm = llm = OpenAIRealtimeLLMService(api_key="unused", base_url=ws_url(self.url), settings=settings)

        send = llm.send_client_event

        async def send_client_event(event):   # what goes on the wire: event.model_dump(exclude_none=True)
            self.sent.add(event.model_dump(exclude_none=True))
            await send(event)

        llm.send_client_event = send_client_event
        parse = events.parse_server_event
        self._restore = lambda: setattr(events, "parse_server_event", parse)

        def parse_server_event(text):
            with contextlib.suppress(ValueError):
                self.received.add(json.loads(text))
            return parse(text)

        events.parse_server_event = parse_server_event

        self.worker = PipelineWorker(
            Pipeline([Recorder(FrameDirection.UPSTREAM), llm, Recorder(FrameDirection.DOWNSTREAM)]),
            cancel_on_idle_timeout=False, enable_rtvi=False, idle_timeout_secs=None,
            params=PipelineParams(audio_in_sample_rate=RATE, audio_out_sample_rate=RATE))
        started = asyncio.Event()

        @self.worker.event_handler("on_pipeline_started")
        async def _started(worker, frame):
            started.set()

        self.runner = WorkerRunner(handle_sigint=False)
        await self.runner.add_workers(self.worker)
        self.run_task = asyncio.create_task(self.runner.run())
        await within(started.wait(), "Pipecat pipeline start")
        # The service configures the session on session.created and is ready on session.updated.
        await self.received.wait("session.updated", "session.updated after Pipecat's session.update")
        await until(lambda: llm._api_session_ready, "Pipecat service ready")
        return self

    async def __aexit__(self, *exc) -> None:
        from pipecat.frames.frames import EndFrame

        try:
            await self.worker.queue_frame(EndFrame())
            await asyncio.wait_for(asyncio.shield(self.run_task), 5)
        except (asyncio.TimeoutError, Exception):
            self.run_task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self.run_task, 5)
        finally:
            self._restore()

    async def push(self, frame) -> None:
        await self.worker.queue_frame(frame)

    async def push_audio(self, pcm: bytes, realtime_until: Callable[[], Any] | None = None) -> None:
        """Push ``pcm`` in 100 ms frames: as fast as possible, or, with ``realtime_until``, at the pace of a
        microphone until that returns something truthy (then the rest at once)."""
        from pipecat.frames.frames import InputAudioRawFrame

        for c in chunks(pcm):
            await self.push(InputAudioRawFrame(audio=c, sample_rate=RATE, num_channels=1))
            if realtime_until is not None and not realtime_until():
                await asyncio.sleep(0.1)

    def of(self, kind: type, since: int = 0, direction: str | None = None) -> list:
        return [f for d, f in self.frames[since:] if isinstance(f, kind) and (direction is None or d == direction)]

    def mark(self) -> int:
        return len(self.frames)

    def index(self, frame) -> int:
        return next(i for i, (_, f) in enumerate(self.frames) if f is frame)

    def errors(self) -> list[str]:
        from pipecat.frames.frames import ErrorFrame

        return [f.error for f in self.of(ErrorFrame)]

    async def wait(self, kind: type, what: str, since: int = 0, direction: str | None = None,
                   timeout: float = WAIT):
        def found():
            if self.errors():
                raise AssertionError(f"Pipecat reported an error while waiting for {what}: {self.errors()}")
            got = self.of(kind, since, direction)
            return got[0] if got else None

        try:
            return await until(found, what, timeout)
        except AssertionError as e:
            seen = [t for t in self.received.types() if not t.endswith(".delta")]
            raise AssertionError(f"{e}; server events: {seen[-25:]}") from None


# ----- LiveKit Agents ----------------------------------------------------------------------------------------------
class LiveKitRig:
    """``livekit.plugins.openai.realtime.RealtimeModel`` pointed at the server, and one ``RealtimeSession`` used
    directly (no room). Records the raw events it sends (``sent``) and receives (``received``), and the events it
    emits: ``errors``, ``generations``, ``transcripts`` (final user transcripts) and speech start/stop."""

    def __init__(self, url: str, **model_kw):
        self.url = url
        self.model_kw = model_kw
        self.sent = EventLog()
        self.received = EventLog()
        self.errors: list[Any] = []
        self.generations: list[Any] = []
        self.transcripts: list[Any] = []
        self.speech_started = 0
        self.speech_stopped = 0

    async def __aenter__(self) -> LiveKitRig:
        from livekit.plugins.openai.realtime import RealtimeModel

        self.model = RealtimeModel(base_url=self.url + "/v1", api_key="unused", model="chroma-tiny", **self.model_kw)
        self.session = s = self.model.session()
        s.on("openai_client_event_queued", self.sent.add)
        s.on("openai_server_event_received", self.received.add)
        s.on("error", self.errors.append)
        s.on("generation_created", self.generations.append)
        s.on("input_audio_transcription_completed", lambda ev: ev.is_final and self.transcripts.append(ev))
        s.on("input_speech_started", lambda ev: setattr(self, "speech_started", self.speech_started + 1))
        s.on("input_speech_stopped", lambda ev: setattr(self, "speech_stopped", self.speech_stopped + 1))
        created = await self.received.wait("session.created")
        self.session_id = created["session"]["id"]
        await self.received.wait("session.updated", "session.updated after LiveKit's session.update")
        return self

    async def __aexit__(self, *exc) -> None:
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(self.session.aclose(), 5)
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(self.model.aclose(), 5)

    async def push_audio(self, pcm: bytes, realtime_until: Callable[[], Any] | None = None) -> None:
        """``push_audio`` ``pcm`` in 100 ms ``rtc.AudioFrame``s: as fast as possible, or, with ``realtime_until``,
        at the pace of a microphone until that returns something truthy (then the rest at once)."""
        from livekit import rtc

        for c in chunks(pcm):
            self.session.push_audio(rtc.AudioFrame(data=c, sample_rate=RATE, num_channels=1,
                                                   samples_per_channel=len(c) // 2))
            if realtime_until is not None and not realtime_until():
                await asyncio.sleep(0.1)

    def error_messages(self) -> list[str]:
        return [str(getattr(e.error, "body", None) or e.error) for e in self.errors]

    async def reply(self, what: str, **kw):
        """``generate_reply(**kw)`` and its ``GenerationCreatedEvent`` (LiveKit resolves it on the
        ``response.created`` whose ``response.metadata.client_event_id`` is the ``response.create``'s event id)."""
        mark = self.received.mark()
        fut = self.session.generate_reply(**kw)
        try:
            return await asyncio.wait_for(fut, WAIT)
        except asyncio.TimeoutError:
            created = self.received.of("response.created", mark)
            sent = self.sent.of("response.create")[-1:]
            raise AssertionError(
                f"generate_reply ({what}) never returned: LiveKit waits for a response.created whose "
                f"response.metadata echoes {{'client_event_id': <the response.create's event_id>}}; it sent "
                f"{sent} and got response.created with metadata "
                f"{[e['response'].get('metadata') for e in created]}; errors: {self.error_messages()}") from None


async def drain_generation(gen, timeout: float = WAIT) -> list[tuple[str, str, list]]:
    """Read a LiveKit ``GenerationCreatedEvent`` to its end: [(message_id, text, audio frames)] per message."""

    async def read():
        out = []
        async for msg in gen.message_stream:
            async def text(stream):
                return "".join([t async for t in stream])

            async def audio(stream):
                return [f async for f in stream]

            t, a = await asyncio.gather(text(msg.text_stream), audio(msg.audio_stream))
            out.append((msg.message_id, t, a))
        return out

    return await within(read(), f"end of generation {gen.response_id}", timeout)
