"""Hostile and unusual audio files for the audio-intake tests (every route that takes client audio)."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf

from openchroma.tools.abuse import silent_flac

__all__ = ["float_wav", "silent_flac", "tagless_mp3", "tone", "without_length"]


def without_length(flac: bytes) -> bytes:
    """``flac`` with STREAMINFO's total-samples field zeroed ("unknown", legal for streamed FLAC)."""
    assert flac[:4] == b"fLaC" and flac[4] & 0x7F == 0  # STREAMINFO is the first metadata block
    data = bytearray(flac)
    at = 8 + 13  # 36-bit total samples: the low 4 bits of STREAMINFO's byte 13, then bytes 14..17
    data[at] &= 0xF0
    data[at + 1:at + 5] = b"\0\0\0\0"
    return bytes(data)


def tone(seconds: float, rate: int, freq: float = 220.0, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def float_wav(bad: float, seconds: float = 2.0, rate: int = 24000) -> bytes:
    """A 32-bit float WAV of a quiet tone with one sample set to ``bad`` (NaN, inf, 1e30, ...)."""
    x = tone(seconds, rate)
    x[rate // 10] = bad
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def tagless_mp3(seconds: float = 2.0, rate: int = 24000) -> bytes:
    """An mp3 without an ID3 tag: it starts with a frame sync (0xFF), so its base64 starts with '/'."""
    buf = io.BytesIO()
    sf.write(buf, tone(seconds, rate), rate, format="MP3")
    data = buf.getvalue()
    assert data[0] == 0xFF, data[:4]
    return data
