"""Audio wire formats for the server: PCM16, G.711 μ-law / A-law, streaming resampling, WAV headers, the
``/v1/audio/speech`` response formats (mp3, opus, aac, flac, wav, pcm), and ``client_audio``: the audio intake as
the HTTP routes answer it.

Float audio is float32 nominally in [-1, 1]; 16-bit PCM maps ``x`` to ``round(x * 32768)`` clipped to the int16
range, so ``pcm16_to_float`` followed by ``float_to_pcm16`` gives back the same bytes.

G.711 is ``audioop``'s (Sun's ``g711.c``, the ITU-T reference sox uses too): the standard library's up to Python 3.12,
the maintained ``audioop-lts`` backport from 3.13 (a dependency there). mp3, aac and Ogg Opus are encoded with PyAV
(FFmpeg's libmp3lame, aac and libopus), imported only when a speech request asks for them.
"""

from __future__ import annotations

import struct
import warnings

import numpy as np
import torch

from openchroma.audio import (
    AudioError,
    AudioTooLong,
    StreamResampler,
    decode_client_audio,
    float_to_pcm16,
    pcm16_to_float,
)
from openchroma.constants import REASONER_SAMPLE_RATE

from .errors import APIError

with warnings.catch_warnings():  # 3.11/3.12 warn that audioop leaves the standard library; 3.13+ has audioop-lts
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

__all__ = [
    "FORMAT_RATES",
    "client_audio",
    "INPUT_FORMATS",
    "InputDecoder",
    "OutputEncoder",
    "SPEECH_FORMATS",
    "SpeechEncoder",
    "StreamResampler",
    "alaw_decode",
    "alaw_encode",
    "encode_speech",
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

_STREAMING_SIZE = 0xFFFFFFFF


# ----------------------------------------------------------------------------------------------------------
# Client audio (HTTP routes)
# ----------------------------------------------------------------------------------------------------------


def client_audio(data: bytes, where: str, rate: int, max_seconds: float, fmt: str | None = None) -> torch.Tensor:
    """Audio a request carries, through the one audio intake (``openchroma.audio.decode_client_audio``), mono at
    ``rate``; its refusals are 400s naming ``where``. ``fmt`` 'pcm16' (or 'pcm') is raw 16-bit mono PCM at 16 kHz
    (the chat routes' form); anything else is an encoded file. Blocking: run it off the event loop."""
    try:
        return decode_client_audio(data, rate, max_seconds=max_seconds, name=where,
                                   pcm16_rate=REASONER_SAMPLE_RATE if fmt in ("pcm16", "pcm") else None)
    except AudioError as e:
        raise APIError(400, str(e), code="audio_too_long" if isinstance(e, AudioTooLong) else "invalid_audio",
                       param=where) from None


# ----------------------------------------------------------------------------------------------------------
# G.711
# ----------------------------------------------------------------------------------------------------------

# Hand-written tables used to live here; audioop (audioop-lts on 3.13+) gives byte-identical results, so it is used.


def ulaw_encode(x: np.ndarray) -> bytes:
    """Float audio to G.711 μ-law bytes (one byte per sample)."""
    return audioop.lin2ulaw(float_to_pcm16(x), 2)


def ulaw_decode(data: bytes | bytearray | memoryview) -> np.ndarray:
    """G.711 μ-law bytes to float32 audio."""
    return pcm16_to_float(audioop.ulaw2lin(bytes(data), 2))


def alaw_encode(x: np.ndarray) -> bytes:
    """Float audio to G.711 A-law bytes (one byte per sample)."""
    return audioop.lin2alaw(float_to_pcm16(x), 2)


def alaw_decode(data: bytes | bytearray | memoryview) -> np.ndarray:
    """G.711 A-law bytes to float32 audio."""
    return pcm16_to_float(audioop.alaw2lin(bytes(data), 2))


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


# ----------------------------------------------------------------------------------------------------------
# /v1/audio/speech response formats
# ----------------------------------------------------------------------------------------------------------

#: OpenAI's speech ``response_format`` values and the media type each is sent with (OpenAI's default is mp3).
SPEECH_FORMATS = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac",
                  "wav": "audio/wav", "pcm": "audio/pcm"}
#: Formats PyAV encodes: (FFmpeg muxer, codec, sample rate, bit rate, muxer options). Opus is Ogg Opus at 48 kHz
#: (what OpenAI sends; Opus has no 24 kHz mode); the Ogg muxer writes a page per 80 ms so pages leave as spoken.
_AV_FORMATS = {
    "mp3": ("mp3", "libmp3lame", 24000, 64000, {}),
    "aac": ("adts", "aac", 24000, 64000, {}),
    "opus": ("ogg", "libopus", 48000, 32000, {"page_duration": "80000"}),
}


class _Sink:
    """A write-only, unseekable file for PyAV's muxers: what they write is taken out after every chunk."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def seekable(self) -> bool:  # muxers then never go back to patch a header: everything streams
        return False

    def take(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        return out


class SpeechEncoder:
    """Encode generated float audio (mono, ``source_rate``) into a speech ``response_format``, chunk by chunk.

    ``encode`` returns the bytes ready to send so far, ``finish`` the rest; joined they are a complete file. pcm is
    raw 16-bit little-endian mono at 24 kHz; wav is that behind a header whose sizes say "unknown length"
    (0xFFFFFFFF: see ``wav_header``), unless ``streaming=False``, when the whole file comes from ``finish`` with
    exact sizes; flac always comes whole from ``finish`` (its header holds the length); mp3, aac (ADTS) and Ogg
    Opus stream as encoded.
    """

    def __init__(self, fmt: str, source_rate: int = 24000, streaming: bool = True) -> None:
        if fmt not in SPEECH_FORMATS:
            raise ValueError(f"unsupported response_format {fmt!r}; use one of {', '.join(SPEECH_FORMATS)}")
        self.format = fmt
        self.media_type = SPEECH_FORMATS[fmt]
        self._source_rate = int(source_rate)
        self.sample_rate = _AV_FORMATS[fmt][2] if fmt in _AV_FORMATS else self._source_rate   # of the encoded audio
        self._whole = fmt == "flac" or (fmt == "wav" and not streaming)
        self._held: list[np.ndarray] = []
        self._started = False
        self._container = None
        if fmt in _AV_FORMATS:
            self._open_av(*_AV_FORMATS[fmt])

    def _open_av(self, muxer: str, codec: str, rate: int, bit_rate: int, options: dict[str, str]) -> None:
        import av  # the `serve` extra

        self._av = av
        self._sink = _Sink()
        self._container = av.open(self._sink, mode="w", format=muxer, container_options=options)
        self._stream = self._container.add_stream(codec, rate=rate)
        self._stream.layout = "mono"
        self._stream.bit_rate = bit_rate
        self._resampler = StreamResampler(self._source_rate, rate)
        self._pts = 0

    def _mux(self, x: np.ndarray | None) -> bytes:
        frame = None
        if x is not None:
            if not x.shape[0]:
                return self._sink.take()
            frame = self._av.AudioFrame.from_ndarray(np.clip(x, -1.0, 1.0)[None, :], format="flt", layout="mono")
            frame.sample_rate = self._stream.rate
            frame.pts, self._pts = self._pts, self._pts + x.shape[0]
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        return self._sink.take()

    def encode(self, x: np.ndarray) -> bytes:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 1:
            raise ValueError(f"expected mono 1-D audio, got shape {x.shape}")
        if self._whole:
            self._held.append(x)
            return b""
        if self._container is not None:
            return self._mux(self._resampler.process(x))
        head = b""
        if self.format == "wav" and not self._started:
            head = wav_header(self._source_rate)  # length unknown while streaming
        self._started = True
        return head + float_to_pcm16(x)

    def finish(self) -> bytes:
        """The rest of the file (all of it for flac and non-streamed wav); the encoder is done afterwards."""
        if self._whole:
            x = np.concatenate(self._held) if self._held else np.zeros(0, np.float32)
            self._held = []
            if self.format == "wav":
                return encode_wav(x, self._source_rate)
            import io

            import soundfile as sf

            buf = io.BytesIO()
            sf.write(buf, x, self._source_rate, format="FLAC", subtype="PCM_16")
            return buf.getvalue()
        if self._container is not None:
            out = self._mux(self._resampler.flush()) + self._mux(None)
            self._container.close()
            self._container = None
            return out + self._sink.take()
        if self.format == "wav" and not self._started:  # nothing was said: still a valid (empty) file
            self._started = True
            return wav_header(self._source_rate)
        return b""

    def close(self) -> None:
        """Drop an unfinished encoder (the client left): frees FFmpeg's state without writing more."""
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # a muxer that had nothing yet may refuse to write its trailer; nothing to keep
                pass
            self._container = None


def encode_speech(x: np.ndarray, fmt: str, rate: int = 24000) -> bytes:
    """A whole file of ``x`` in speech format ``fmt`` (wav with exact sizes)."""
    enc = SpeechEncoder(fmt, rate, streaming=False)
    return enc.encode(x) + enc.finish()
