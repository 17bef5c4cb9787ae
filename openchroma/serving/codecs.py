"""Audio wire formats for the server: PCM16, G.711 μ-law / A-law, streaming resampling and WAV headers.

Everything here is pure numpy (plus ``soxr`` for resampling); nothing uses ``audioop``, which Python 3.13 removed.
Float audio is float32 nominally in [-1, 1]; 16-bit PCM maps ``x`` to ``round(x * 32768)`` clipped to the int16
range, so ``pcm16_to_float`` followed by ``float_to_pcm16`` gives back the same bytes.

The G.711 tables follow the ITU-T G.711 reference (Sun Microsystems' ``g711.c``, the code ``audioop`` and sox use):
μ-law works on the 14 most significant bits of the 16-bit sample, A-law on the 13 most significant bits.
"""

from __future__ import annotations

import functools
import struct

import numpy as np
import soxr

__all__ = [
    "FORMAT_RATES",
    "INPUT_FORMATS",
    "InputDecoder",
    "OutputEncoder",
    "StreamResampler",
    "alaw_decode",
    "alaw_encode",
    "encode_wav",
    "float_to_pcm16",
    "pcm16_to_float",
    "ulaw_decode",
    "ulaw_encode",
    "wav_header",
]

#: Sample rate of each realtime audio format (OpenAI Realtime names).
FORMAT_RATES = {"audio/pcm": 24000, "audio/pcmu": 8000, "audio/pcma": 8000}
INPUT_FORMATS = tuple(FORMAT_RATES)

_PCM_SCALE = 32768.0
_STREAMING_SIZE = 0xFFFFFFFF


# ----------------------------------------------------------------------------------------------------------
# 16-bit PCM
# ----------------------------------------------------------------------------------------------------------


def pcm16_to_float(data: bytes | bytearray | memoryview) -> np.ndarray:
    """Little-endian signed 16-bit PCM bytes to a float32 array in [-1, 1)."""
    n = len(data)
    if n % 2:
        raise ValueError(f"16-bit PCM needs an even number of bytes (2 per sample), got {n}")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / np.float32(_PCM_SCALE)


def _float_to_int16(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    y = np.rint(np.clip(x, -1.0, 1.0) * np.float32(_PCM_SCALE))
    return np.clip(y, -32768, 32767).astype(np.int16)


def float_to_pcm16(x: np.ndarray) -> bytes:
    """Float audio (clipped to [-1, 1]) to little-endian signed 16-bit PCM bytes."""
    return _float_to_int16(x).astype("<i2", copy=False).tobytes()


# ----------------------------------------------------------------------------------------------------------
# G.711
# ----------------------------------------------------------------------------------------------------------

_ULAW_BIAS = 0x84
_ULAW_CLIP = 8159  # 14-bit magnitude limit
_ULAW_SEG_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], dtype=np.int32)
_ALAW_SEG_END = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF], dtype=np.int32)


def _all_int16() -> np.ndarray:
    """Every int16 value, ordered so that entry ``i`` is the int16 whose bit pattern is the uint16 ``i``."""
    return np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.int16).astype(np.int32)


@functools.cache
def _ulaw_tables() -> tuple[np.ndarray, np.ndarray]:
    pcm = _all_int16() >> 2  # 14-bit
    mask = np.where(pcm < 0, 0x7F, 0xFF)
    mag = np.minimum(np.abs(pcm), _ULAW_CLIP) + (_ULAW_BIAS >> 2)
    seg = np.searchsorted(_ULAW_SEG_END, mag, side="left")  # 8 only for the clipped maximum, 8159 + 33 = 0x2000
    code = np.where(seg >= 8, 0x7F, (seg << 4) | ((mag >> (seg + 1)) & 0xF))
    encode = (code ^ mask).astype(np.uint8)

    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + _ULAW_BIAS) << ((u & 0x70) >> 4)
    linear = np.where(u & 0x80, _ULAW_BIAS - t, t - _ULAW_BIAS)
    decode = (linear / _PCM_SCALE).astype(np.float32)
    return encode, decode


@functools.cache
def _alaw_tables() -> tuple[np.ndarray, np.ndarray]:
    pcm = _all_int16() >> 3  # 13-bit
    mask = np.where(pcm >= 0, 0xD5, 0x55)
    mag = np.where(pcm >= 0, pcm, -pcm - 1)
    seg = np.searchsorted(_ALAW_SEG_END, mag, side="left")  # mag <= 4095 = 0xFFF, so seg <= 7
    shift = np.where(seg < 2, 1, seg)
    code = (seg << 4) | ((mag >> shift) & 0xF)
    encode = (code ^ mask).astype(np.uint8)

    a = np.arange(256, dtype=np.int32) ^ 0x55
    seg = (a & 0x70) >> 4
    t = (a & 0x0F) << 4
    t = np.where(seg == 0, t + 8, (t + 0x108) << np.maximum(seg - 1, 0))
    linear = np.where(a & 0x80, t, -t)
    decode = (linear / _PCM_SCALE).astype(np.float32)
    return encode, decode


def _g711_encode(x: np.ndarray, table: np.ndarray) -> bytes:
    return table[_float_to_int16(x).view(np.uint16)].tobytes()


def _g711_decode(data: bytes | bytearray | memoryview, table: np.ndarray) -> np.ndarray:
    return table[np.frombuffer(data, dtype=np.uint8)]


def ulaw_encode(x: np.ndarray) -> bytes:
    """Float audio to G.711 μ-law bytes (one byte per sample)."""
    return _g711_encode(x, _ulaw_tables()[0])


def ulaw_decode(data: bytes | bytearray | memoryview) -> np.ndarray:
    """G.711 μ-law bytes to float32 audio."""
    return _g711_decode(data, _ulaw_tables()[1])


def alaw_encode(x: np.ndarray) -> bytes:
    """Float audio to G.711 A-law bytes (one byte per sample)."""
    return _g711_encode(x, _alaw_tables()[0])


def alaw_decode(data: bytes | bytearray | memoryview) -> np.ndarray:
    """G.711 A-law bytes to float32 audio."""
    return _g711_decode(data, _alaw_tables()[1])


# ----------------------------------------------------------------------------------------------------------
# Streaming resampling
# ----------------------------------------------------------------------------------------------------------


class StreamResampler:
    """Mono float32 streaming resampler (``soxr.ResampleStream``); a pass-through when the rates are equal.

    Output is time-aligned with the input (soxr drops its filter delay), so after ``flush`` the total output length
    is ``round(total_input * out_rate / in_rate)``. ``flush`` ends the current signal and readies the resampler for
    a new one.
    """

    def __init__(self, in_rate: int, out_rate: int, quality: str = "HQ") -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {in_rate} -> {out_rate}")
        self.in_rate = int(in_rate)
        self.out_rate = int(out_rate)
        self._stream = (
            None
            if self.in_rate == self.out_rate
            else soxr.ResampleStream(self.in_rate, self.out_rate, 1, dtype="float32", quality=quality)
        )

    @property
    def passthrough(self) -> bool:
        return self._stream is None

    def process(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 1:
            raise ValueError(f"expected mono 1-D audio, got shape {x.shape}")
        if self._stream is None:
            return x
        return self._stream.resample_chunk(x)

    def flush(self) -> np.ndarray:
        """The samples still held back by the filter; the next ``process`` starts a fresh signal."""
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        out = self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        self._stream.clear()
        return out

    def reset(self) -> None:
        """Drop anything buffered without returning it."""
        if self._stream is not None:
            self._stream.clear()


# ----------------------------------------------------------------------------------------------------------
# Realtime formats
# ----------------------------------------------------------------------------------------------------------


def _check_format(fmt: str) -> int:
    try:
        return FORMAT_RATES[fmt]
    except (KeyError, TypeError):
        raise ValueError(f"unsupported audio format {fmt!r}; accepted: {', '.join(INPUT_FORMATS)}") from None


_ENCODERS = {"audio/pcm": float_to_pcm16, "audio/pcmu": ulaw_encode, "audio/pcma": alaw_encode}
_DECODERS = {"audio/pcm": pcm16_to_float, "audio/pcmu": ulaw_decode, "audio/pcma": alaw_decode}


class OutputEncoder:
    """Encode generated float audio (at ``source_rate``) into a realtime output format, chunk by chunk.

    ``audio/pcm`` is 16-bit PCM at 24 kHz; ``audio/pcmu`` and ``audio/pcma`` are G.711 at 8 kHz (resampled with a
    streaming resampler, so call ``flush`` at the end of each response to get the filter's tail).
    """

    def __init__(self, fmt: str, source_rate: int = 24000) -> None:
        self.format = fmt
        self._rate = _check_format(fmt)
        self._encode = _ENCODERS[fmt]
        self._resampler = StreamResampler(source_rate, self._rate)

    @property
    def rate(self) -> int:
        """Sample rate of the encoded audio."""
        return self._rate

    def encode(self, x: np.ndarray) -> bytes:
        return self._encode(self._resampler.process(x))

    def flush(self) -> bytes:
        return self._encode(self._resampler.flush())


class InputDecoder:
    """Decode realtime input audio bytes to float32 at the format's own rate (``rate``): no resampling here.

    Each chunk must hold whole samples: an odd byte count for ``audio/pcm`` raises ``ValueError``.
    """

    def __init__(self, fmt: str) -> None:
        self.format = fmt
        self._rate = _check_format(fmt)
        self._decode = _DECODERS[fmt]

    @property
    def rate(self) -> int:
        return self._rate

    def decode(self, data: bytes | bytearray | memoryview) -> np.ndarray:
        return self._decode(data)


# ----------------------------------------------------------------------------------------------------------
# WAV
# ----------------------------------------------------------------------------------------------------------


def wav_header(sample_rate: int, num_channels: int = 1, bits: int = 16, num_samples: int | None = None) -> bytes:
    """A 44-byte RIFF/WAVE header for integer PCM.

    ``num_samples`` counts sample frames (one per channel). With ``None`` (a stream of unknown length) the RIFF and
    data chunk sizes are 0xFFFFFFFF, as in OpenAI's streaming wav responses.
    """
    if sample_rate <= 0 or num_channels <= 0:
        raise ValueError(f"sample_rate and num_channels must be positive, got {sample_rate} and {num_channels}")
    if bits not in (8, 16, 24, 32):
        raise ValueError(f"bits must be 8, 16, 24 or 32, got {bits}")
    block_align = num_channels * bits // 8
    if num_samples is None:
        riff_size = data_size = _STREAMING_SIZE
    else:
        if num_samples < 0:
            raise ValueError(f"num_samples must be non-negative, got {num_samples}")
        data_size = num_samples * block_align
        riff_size = 36 + data_size
        if riff_size > _STREAMING_SIZE - 1:
            raise ValueError(f"{num_samples} samples do not fit in a WAV file (4 GiB limit)")
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF", riff_size, b"WAVE",
        b"fmt ", 16, 1, num_channels, sample_rate, sample_rate * block_align, block_align, bits,
        b"data", data_size,
    )  # fmt: skip


def encode_wav(x: np.ndarray, rate: int) -> bytes:
    """A whole 16-bit PCM WAV file: ``x`` is mono ``(samples,)`` or ``(samples, channels)`` float audio."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim not in (1, 2):
        raise ValueError(f"expected (samples,) or (samples, channels) audio, got shape {x.shape}")
    channels = 1 if x.ndim == 1 else x.shape[1]
    return wav_header(rate, channels, 16, x.shape[0]) + float_to_pcm16(x)
