"""A realtime session's input audio: decoding it, the server VAD, the input buffer and its commit.

Audio reaches the engine as it arrives (so the Reasoner has encoded the turn by the time the user stops); under
server VAD only speech does, with its prefix padding kept from the audio before it started.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import secrets
from typing import Any

import numpy as np

from . import realtime_server_events as out
from .codecs import InputDecoder
from .errors import shorten
from .realtime_events import RealtimeError
from .turn_detection import SemanticVAD, SmartTurnModel, TurnModelError, load_turn_model, turn_detector
from .vad import StreamingVAD

MIN_COMMIT_MS = 100
LARGE_CHARS = 256 * 1024   # messages and audio this large are parsed and decoded in a helper thread
B64_SLICE = 1 << 18   # characters decoded per call (a multiple of 4): another thread gets the GIL between slices
BYTES_PER_SAMPLE = {"audio/pcm": 2, "audio/pcmu": 1, "audio/pcma": 1}


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


def b64decode_sliced(data: str) -> bytes:
    """Strict base64 (as ``base64.b64decode(data, validate=True)``), decoded a slice at a time so that a helper
    thread decoding megabytes never holds the GIL, and with it the event loop, for long."""
    if len(data) <= B64_SLICE:
        return base64.b64decode(data, validate=True)
    parts = []
    for i in range(0, len(data), B64_SLICE):
        piece = data[i:i + B64_SLICE]
        if i + B64_SLICE < len(data) and piece.endswith("="):
            raise binascii.Error("Discontinuous padding not allowed")
        parts.append(base64.b64decode(piece, validate=True))
    return b"".join(parts)


class InputAudio:
    """The input buffer of one session: decode, VAD, feed the engine, commit or clear."""

    def __init__(self, core: Any):
        self.core = core   # the owning RealtimeCore (Any: a part never imports its owner)
        self.vad: StreamingVAD | SemanticVAD | None = None
        self.turn_model: SmartTurnModel | None = None   # loaded by load_turn_model before semantic_vad is set
        self.vad_origin_ms = 0.0
        self.clock_ms = 0.0                     # ms of audio received since the connection opened
        self.buffer_ms = 0.0                    # ms in the input buffer since the last commit
        self.prefix: collections.deque = collections.deque()   # (start_ms, samples) kept before speech starts
        self.speech_item: str | None = None

    @property
    def rate(self) -> int:
        return self.core.settings.input_rate

    @property
    def limit_ms(self) -> float:
        return 1000 * self.core.cfg.max_input_audio_seconds

    # ----- decoding (pure: transports may run it in a helper thread) ----------------------------------------
    def decode(self, b64: str, param: str = "audio") -> np.ndarray:
        """Base64 audio in the session's input format as float32 samples at ``rate``; raises ``RealtimeError``.
        Audio longer than a whole turn may hold is refused from its length, before anything is decoded."""
        fmt = self.core.settings.input_format["type"]
        ms = 1000 * (len(b64) * 3 // 4 // BYTES_PER_SAMPLE[fmt]) / self.rate
        if ms > self.limit_ms + 1:
            raise RealtimeError(f"{ms / 1000:.0f} s of audio is over the server's {self.limit_ms / 1000:.0f} s per "
                                "turn (this audio was dropped)", "input_audio_buffer_too_long", param)
        try:
            return InputDecoder(fmt).decode(b64decode_sliced(b64))
        except (binascii.Error, ValueError) as e:
            raise RealtimeError(f"'audio' is not valid base64 {fmt}: {shorten(str(e), 120)}", "invalid_value",
                                param) from None

    async def decode_async(self, b64: str, param: str = "audio") -> np.ndarray:
        """``decode``, in a helper thread when the audio is large (the event loop serves everyone else meanwhile)."""
        if len(b64) > LARGE_CHARS:
            return await asyncio.to_thread(self.decode, b64, param)
        return self.decode(b64, param)

    # ----- the buffer ----------------------------------------------------------------------------------------
    async def load_turn_model(self, td: dict | None) -> None:
        """Load the end-of-turn model that ``td`` (a checked ``turn_detection``) needs, off the event loop (the first
        load reads an ONNX file and runs it once); raises ``RealtimeError`` when it cannot be had."""
        if not td or td.get("type") != "semantic_vad" or self.turn_model is not None:
            return
        try:
            self.turn_model = await asyncio.to_thread(load_turn_model, self.core.cfg.turn_model)
        except TurnModelError as e:
            raise RealtimeError(f"semantic_vad is not available on this server: {e}", "turn_model_unavailable",
                                "session.audio.input.turn_detection.type", "server_error") from None

    def new_vad(self) -> None:
        """A VAD for the current settings (silero's ``server_vad``, or ``semantic_vad`` with the model loaded by
        ``load_turn_model``); its clock starts now, so its times are offset by ``vad_origin_ms``."""
        td = self.core.settings.turn_detection
        self.vad = turn_detector(td, self.rate, self.turn_model) if td else None
        self.vad_origin_ms = self.clock_ms
        self.prefix.clear()

    async def ingest(self, x: np.ndarray) -> None:
        """Append decoded samples: to the engine at once without VAD, else through the VAD (which may start and
        end turns)."""
        core = self.core
        ms = 1000 * len(x) / self.rate
        if self.buffer_ms + ms > self.limit_ms:
            raise RealtimeError(f"the input audio buffer would exceed {self.limit_ms / 1000:.0f} s; commit or clear "
                                "it (this append was dropped)", "input_audio_buffer_too_long")
        start_ms = self.clock_ms
        self.clock_ms += ms
        if self.vad is None:
            self.buffer_ms += ms
            await core.call(core.session.append_audio(x, self.rate))
            return
        was_speaking = self.vad.speaking
        events = await asyncio.to_thread(self.vad.push, x)   # silero: off the event loop
        for chunk in self.speech_to_feed(x, start_ms, was_speaking, events):
            self.buffer_ms += 1000 * len(chunk) / self.rate
            await core.call(core.session.append_audio(chunk, self.rate))
        td = core.settings.turn_detection or {}
        for e in events:
            at_ms = int(e.audio_ms + self.vad_origin_ms)
            if e.kind == "speech_started":
                self.speech_item = new_id("item")
                await core.send(out.speech_started(at_ms, self.speech_item))
                if td.get("interrupt_response", True):
                    await core.responses.cancel(None, "turn_detected")
            else:
                item = self.speech_item or new_id("item")
                self.speech_item = None
                await core.send(out.speech_stopped(at_ms, item))
                await self.commit(item)
                if td.get("create_response", True):
                    await core.responses.start()

    def speech_to_feed(self, x: np.ndarray, start_ms: float, was_speaking: bool, events: list) -> list[np.ndarray]:
        """What of ``x`` the engine should hear under server VAD: speech only, with its prefix padding (kept from
        the audio before it started)."""
        if not was_speaking and not self.vad.speaking and not events:
            pad = self.core.settings.turn_detection.get("prefix_padding_ms", 300)
            self.prefix.append((start_ms, x))
            while self.prefix and self.prefix[0][0] + 1000 * len(self.prefix[0][1]) / self.rate < start_ms - pad:
                self.prefix.popleft()
            return []
        feed = []
        if not was_speaking:
            onset = next((e.audio_ms + self.vad_origin_ms for e in events if e.kind == "speech_started"), start_ms)
            for s_ms, chunk in self.prefix:
                skip = max(0, int((onset - s_ms) * self.rate / 1000))
                if skip < len(chunk):
                    feed.append(chunk[skip:])
            self.prefix.clear()
        return [*feed, x]

    async def commit(self, item_id: str | None = None) -> None:
        """The buffer becomes one user message of its own in the engine's history, under the item's id."""
        core = self.core
        if self.buffer_ms < MIN_COMMIT_MS:
            raise RealtimeError(f"buffer too small: expected at least {MIN_COMMIT_MS} ms of audio, but the buffer "
                                f"holds {self.buffer_ms:.0f} ms", "input_audio_buffer_commit_empty")
        core.conversation.check_room()
        item_id = item_id or self.speech_item or new_id("item")
        self.speech_item = None
        seconds = self.buffer_ms / 1000
        await core.call(core.session.commit_audio(item_id))
        self._reset()
        await core.send(out.buffer_committed(item_id, core.conversation.last_id()))
        item = out.message_item(item_id, "user", [out.input_audio_content()])
        await core.conversation.add(item)
        await core.conversation.transcribe(item, seconds)

    async def clear(self) -> None:
        await self.core.call(self.core.session.clear_audio())
        self._reset()
        await self.core.send(out.buffer_cleared())

    async def drop_buffer(self) -> None:
        """Empty the buffer silently (the input format changed)."""
        if self.buffer_ms:
            await self.core.call(self.core.session.clear_audio())
            self.buffer_ms = 0.0

    def _reset(self) -> None:
        self.buffer_ms = 0.0
        if self.vad is not None:
            self.vad.reset()
        self.prefix.clear()
