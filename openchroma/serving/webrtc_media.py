"""WebRTC audio for a realtime call (needs aiortc: the ``webrtc`` extra): the outbound track that plays the core's
audio to the listener in real time, and the reader that turns the caller's decoded Opus into the core's input.

Opus runs at 48 kHz both ways (aiortc encodes and decodes it); the engine speaks 24 kHz and listens at the session's
input rate, so both directions go through a streaming resampler. The outbound track counts the samples it actually
hands to the encoder, per response: that is what the listener heard, which truncation on barge-in needs.
"""

from __future__ import annotations

import asyncio
import collections
import fractions
import time
from collections.abc import Awaitable, Callable

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from ..audio import StreamResampler

RTC_RATE = 48000
FRAME_SAMPLES = 960   # 20 ms at 48 kHz: one Opus packet
TIME_BASE = fractions.Fraction(1, RTC_RATE)


class OutboundAudio(MediaStreamTrack):
    """The server's audio track: 20 ms frames at 48 kHz, paced in real time by ``recv`` (aiortc's sender pulls it);
    silence when nothing is queued."""

    kind = "audio"

    def __init__(self, source_rate: int = 24000):
        super().__init__()
        self.queue: collections.deque[list] = collections.deque()   # [response id, int16 samples, offset]
        self.resampler = StreamResampler(source_rate, RTC_RATE)
        self.source_rate = source_rate
        self.sent: dict[str, int] = {}          # samples of each response handed to the encoder
        self.on_started: Callable[[str], None] | None = None   # a response's first audio went out
        self.on_stopped: Callable[[str], None] | None = None   # the queue ran dry after a response's audio
        self.playing: str | None = None
        self.start: float | None = None
        self.pts = 0

    def push(self, response_id: str, x: np.ndarray, rate: int) -> None:
        """Queue float audio at ``rate`` (the core's output) for ``response_id``."""
        if rate != self.source_rate:   # the session's output format changed: a resampler for the new rate
            self.resampler, self.source_rate = StreamResampler(rate, RTC_RATE), rate
        y = self.resampler.process(np.asarray(x, dtype=np.float32))
        if len(y):
            self.queue.append([response_id, (np.clip(y, -1, 1) * 32767).astype(np.int16), 0])

    def end_response(self, response_id: str) -> None:
        """The response's audio is complete: queue the resampler's tail."""
        tail = self.resampler.flush()
        if len(tail):
            self.queue.append([response_id, (np.clip(tail, -1, 1) * 32767).astype(np.int16), 0])

    def clear(self) -> bool:
        """Drop what is queued (barge-in); True when something was."""
        had = bool(self.queue)
        self.queue.clear()
        return had

    def heard_ms(self, response_id: str) -> float:
        return 1000 * self.sent.get(response_id, 0) / RTC_RATE

    def take(self) -> np.ndarray:
        """The next 20 ms: queued audio, padded with silence."""
        frame = np.zeros(FRAME_SAMPLES, dtype=np.int16)
        filled = 0
        while filled < FRAME_SAMPLES and self.queue:
            piece = self.queue[0]
            rid, samples, off = piece
            n = min(FRAME_SAMPLES - filled, len(samples) - off)
            frame[filled:filled + n] = samples[off:off + n]
            filled += n
            piece[2] += n
            if rid not in self.sent:
                self.sent[rid] = 0
                self.playing = rid
                if self.on_started:
                    self.on_started(rid)
            self.sent[rid] += n
            if piece[2] >= len(samples):
                self.queue.popleft()
        if not self.queue and self.playing is not None and filled < FRAME_SAMPLES:
            rid, self.playing = self.playing, None
            if self.on_stopped:
                self.on_stopped(rid)
        return frame

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self.start is None:
            self.start = time.monotonic()
        wait = self.start + self.pts / RTC_RATE - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        frame = av.AudioFrame.from_ndarray(self.take().reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = RTC_RATE, self.pts, TIME_BASE
        self.pts += FRAME_SAMPLES
        return frame


def frame_to_float(frame: av.AudioFrame) -> np.ndarray:
    """A decoded frame as mono float32 samples (aiortc's Opus decoder gives packed s16, usually stereo)."""
    x = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if frame.format.is_planar:
        x = x.mean(axis=0)
    else:
        x = x.reshape(-1, channels).mean(axis=1)
    if x.dtype == np.int16 or frame.format.name.startswith("s16"):
        return (x / 32768.0).astype(np.float32)
    return x.astype(np.float32)


async def read_track(track: MediaStreamTrack, rate: Callable[[], int],
                     put: Callable[[np.ndarray], Awaitable[None]]) -> None:
    """Feed the caller's audio to ``put`` at ``rate()`` (the session's input rate) until the track ends."""
    resampler: StreamResampler | None = None
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        x = frame_to_float(frame)
        if resampler is None or resampler.in_rate != frame.sample_rate or resampler.out_rate != rate():
            resampler = StreamResampler(frame.sample_rate, rate())
        y = resampler.process(x)
        if len(y):
            await put(y)
