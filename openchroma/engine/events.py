"""What the engine hands its callers: errors, the events of a response or a transcription, and their streams.

A ``Response`` is iterated (sync or async) for ``TextDelta`` (the words as they enter the speech), ``AudioChunk``
(one 80 ms frame of 24 kHz float PCM, ready to play) and a final ``ResponseDone`` with the spoken text, the stop
reason, timings and usage. A ``Transcription`` streams ``TextDelta`` events and ends with ``TranscriptionDone``.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..tokenizer import ChatTokenizer


class EngineError(ValueError):
    """A request the engine cannot serve as given (the message says why); the engine stays usable."""


class UnknownVoice(EngineError):
    pass


class SessionLimit(EngineError):
    pass


class ContextFull(ValueError):
    """The conversation no longer fits the context the engine was configured with."""


class ConversationLimit(EngineError):
    """The conversation already holds the engine's ``max_conversation_items`` items: delete some first."""


@dataclass
class TextDelta:
    text: str
    token: int


@dataclass
class AudioChunk:
    audio: np.ndarray          # float32 [frame_samples], 24 kHz
    index: int
    sample_rate: int
    made_at: float = 0.0       # time.perf_counter() when the engine emitted it (before any consumer's delay)


@dataclass
class Usage:
    """What a response consumed and produced, so serving reports usage without reading engine internals."""

    prompt_tokens: int = 0          # the Reasoner's prompt, audio placeholders included
    prompt_audio_tokens: int = 0    # of which user-audio placeholders
    text_tokens: int = 0            # text tokens the response spoke
    frames: int = 0                 # 80 ms audio frames it produced
    audio_seconds: float = 0.0


@dataclass
class ResponseDone:
    text: str
    tokens: list[int]
    stop_reason: str           # eos | length | cancelled | error
    frames: int
    timings: dict[str, float] = field(default_factory=dict)
    codes: torch.Tensor | None = None
    error: str | None = None
    usage: Usage = field(default_factory=Usage)


@dataclass
class TranscriptionDone:
    text: str
    tokens: list[int]
    error: str | None = None


Event = TextDelta | AudioChunk | ResponseDone


class EventStream:
    """Events from the engine's worker to one consumer, iterated sync or async, ending with a final event."""

    _final: type = object

    def __init__(self) -> None:
        self._q: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aq: asyncio.Queue | None = None
        self.done = None

    def _emit(self, ev) -> None:
        with self._lock:
            if self._aq is not None:
                self._loop.call_soon_threadsafe(self._aq.put_nowait, ev)
            else:
                self._q.put(ev)

    def __iter__(self):
        while True:
            ev = self._q.get()
            yield ev
            if isinstance(ev, self._final):
                return

    async def __aiter__(self):
        with self._lock:
            self._loop = asyncio.get_running_loop()
            self._aq = asyncio.Queue()
            while not self._q.empty():
                self._aq.put_nowait(self._q.get_nowait())
        while True:
            ev = await self._aq.get()
            yield ev
            if isinstance(ev, self._final):
                return

    def result(self):
        """Block until the stream ends; return its final event."""
        for ev in self:
            if isinstance(ev, self._final):
                return ev
        raise RuntimeError("the stream ended without a final event")


class Response(EventStream):
    """A response in progress: iterate (sync or async) for events; ``cancel()`` stops it within a frame."""

    _final = ResponseDone

    def __init__(self, engine: Any, session: Any):
        super().__init__()
        self._engine = engine   # the owning Engine (Any: a part never imports its owner)
        self.session = session
        self.done: ResponseDone | None = None
        self.t_start = time.perf_counter()
        self.t_started: float | None = None       # when its first frame step was planned (prefill done)
        self.t_first_audio: float | None = None
        self.frames = 0
        self.codes: list[torch.Tensor] = []
        self.tokens: list[int] = []
        self.token_frames: list[int] = []   # the audio frame each text token entered the speech at
        self.out_of_band = False            # not part of the conversation's history
        self.item_id: str | None = None     # the id its message gets in the history
        self.history_index = 0              # where its message goes in the history
        self.message: dict[str, Any] | None = None   # that message, once it is there (edits may move it)
        self._text = ""
        self._detok = engine.tokenizer.incremental_decoder()

    def cancel(self) -> None:
        self._engine.submit(self._engine._cancel, self.session)


class Transcription(EventStream):
    """The reasoner's transcript of some user audio: ``TextDelta`` events, then ``TranscriptionDone``."""

    _final = TranscriptionDone

    def __init__(self, tokenizer: ChatTokenizer):
        super().__init__()
        self.done: TranscriptionDone | None = None
        self.tokens: list[int] = []
        self.text = ""
        self._detok = tokenizer.incremental_decoder()

    def push(self, token: int) -> None:
        self.tokens.append(token)
        delta = self._detok.push(token)
        if delta:
            self.text += delta
            self._emit(TextDelta(delta, token))

    def finish(self, error: str | None = None) -> None:
        rest = self._detok.flush()
        if rest:
            self.text += rest
            self._emit(TextDelta(rest, self.tokens[-1] if self.tokens else -1))
        self.done = TranscriptionDone(self.text.strip(), list(self.tokens), error)
        self._emit(self.done)
