"""Server audio: wire codecs (PCM16, G.711, WAV), streaming resampling and server-side VAD."""

from __future__ import annotations

import importlib.util
import io
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from openchroma.serving import codecs, vad
from openchroma.serving.codecs import (
    InputDecoder,
    OutputEncoder,
    StreamResampler,
    alaw_decode,
    alaw_encode,
    encode_wav,
    float_to_pcm16,
    pcm16_to_float,
    ulaw_decode,
    ulaw_encode,
    wav_header,
)

SPEECH = Path(__file__).parent / "data" / "speech.wav"
LEAD_S, TAIL_S = 1.0, 1.5


def _sine(freq: float, rate: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# PCM16
# ----------------------------------------------------------------------------------------------------------


def test_pcm16_round_trip():
    data = np.arange(-32768, 32768, dtype="<i2").tobytes()
    x = pcm16_to_float(data)
    assert x.dtype == np.float32 and x.shape == (65536,)
    assert x.min() == -1.0 and x.max() < 1.0
    assert float_to_pcm16(x) == data


def test_float_to_pcm16_clips_and_rounds():
    out = np.frombuffer(float_to_pcm16(np.array([2.0, -2.0, 1.0, -1.0, 0.0, 0.5, 1.4 / 32768], np.float32)), "<i2")
    assert out.tolist() == [32767, -32768, 32767, -32768, 0, 16384, 1]


def test_pcm16_odd_length_is_an_error():
    with pytest.raises(ValueError, match="even number of bytes"):
        pcm16_to_float(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="even number of bytes"):
        InputDecoder("audio/pcm").decode(b"\x00")


# ----------------------------------------------------------------------------------------------------------
# G.711
# ----------------------------------------------------------------------------------------------------------


def _pcm(values) -> np.ndarray:
    return np.array(values, dtype=np.float32) / 32768


def test_g711_known_encodings():
    # ITU-T G.711 (Sun g711.c / audioop reference values)
    assert ulaw_encode(_pcm([0, 32767, -32768, 1000, -1000])) == bytes([0xFF, 0x80, 0x00, 0xCE, 0x4E])
    assert alaw_encode(_pcm([0, 32767, -32768, 1000, -1000])) == bytes([0xD5, 0xAA, 0x2A, 0xFA, 0x7A])


def test_g711_known_decodings():
    assert (ulaw_decode(bytes([0xFF, 0x7F, 0x80, 0x00])) * 32768).tolist() == [0, 0, 32124, -32124]
    assert (alaw_decode(bytes([0xD5, 0x55, 0xAA, 0x2A])) * 32768).tolist() == [8, -8, 32256, -32256]
    assert ulaw_decode(b"\x00").dtype == np.float32 and alaw_decode(b"\x00").dtype == np.float32


def test_g711_codes_round_trip():
    codes = bytes(range(256))
    # every code survives decode -> encode, except μ-law's "negative zero" 0x7F, which decodes to 0 -> 0xFF
    assert alaw_encode(alaw_decode(codes)) == codes
    expected = bytearray(codes)
    expected[0x7F] = 0xFF
    assert ulaw_encode(ulaw_decode(codes)) == bytes(expected)


@pytest.mark.parametrize("encode,decode", [(ulaw_encode, ulaw_decode), (alaw_encode, alaw_decode)])
def test_g711_error_bound(encode, decode):
    x = np.random.default_rng(0).uniform(-1, 1, 20000).astype(np.float32)
    y = decode(encode(x))
    assert y.shape == x.shape
    assert np.all(np.abs(y - x) <= np.abs(x) / 32 + 5e-4)  # 4-bit mantissa: half a step is at most |x| / 32
    s = _sine(440, 8000, 1.0)
    r = decode(encode(s))
    snr = 10 * np.log10(np.sum(s**2) / np.sum((r - s) ** 2))
    assert snr > 35


# ----------------------------------------------------------------------------------------------------------
# Resampling and realtime formats
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_rate,out_rate", [(24000, 8000), (24000, 16000), (8000, 24000), (16000, 24000)])
@pytest.mark.parametrize("chunk", [160, 480, 4800])
def test_stream_resampler_lengths(in_rate, out_rate, chunk):
    x = _sine(300, in_rate, 0.6)
    r = StreamResampler(in_rate, out_rate)
    outs = [r.process(x[i : i + chunk]) for i in range(0, len(x), chunk)]
    outs.append(r.flush())
    y = np.concatenate(outs)
    assert y.dtype == np.float32
    assert len(y) == round(len(x) * out_rate / in_rate)
    ref = soxr.resample(x, in_rate, out_rate, "HQ")
    assert np.max(np.abs(y[100:-100] - ref[100:-100])) < 1e-3
    # after flush the resampler takes a new signal
    z = np.concatenate([r.process(x), r.flush()])
    assert len(z) == len(y)


def test_stream_resampler_passthrough():
    r = StreamResampler(24000, 24000)
    x = _sine(300, 24000, 0.1)
    assert r.passthrough
    assert np.array_equal(r.process(x), x)
    assert r.flush().shape == (0,)


def test_output_encoder_pcm():
    enc = OutputEncoder("audio/pcm")
    assert enc.rate == 24000
    x = _sine(440, 24000, 0.1)
    data = enc.encode(x)
    assert data == float_to_pcm16(x)
    assert enc.flush() == b""


@pytest.mark.parametrize("fmt,decode", [("audio/pcmu", ulaw_decode), ("audio/pcma", alaw_decode)])
def test_output_encoder_g711(fmt, decode):
    enc = OutputEncoder(fmt, source_rate=24000)
    assert enc.rate == 8000
    x = _sine(440, 24000, 1.0)
    data = b"".join(enc.encode(x[i : i + 1920]) for i in range(0, len(x), 1920)) + enc.flush()
    assert len(data) == 8000  # one byte per 8 kHz sample
    y = decode(data)
    ref = _sine(440, 8000, 1.0)
    assert np.max(np.abs(y[50:-50] - ref[50:-50])) < 0.03
    # the encoder is reusable after a flush (next response)
    assert len(enc.encode(x[:2400]) + enc.flush()) == 800


@pytest.mark.parametrize(
    "fmt,rate,encode", [("audio/pcm", 24000, float_to_pcm16), ("audio/pcmu", 8000, ulaw_encode),
                        ("audio/pcma", 8000, alaw_encode)],
)  # fmt: skip
def test_input_decoder(fmt, rate, encode):
    dec = InputDecoder(fmt)
    assert dec.rate == rate
    x = _sine(300, rate, 0.1)
    y = dec.decode(encode(x))
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.max(np.abs(y - x)) < 0.02


@pytest.mark.parametrize("cls", [OutputEncoder, InputDecoder])
def test_unknown_format(cls):
    with pytest.raises(ValueError, match="audio/pcm, audio/pcmu, audio/pcma"):
        cls("audio/opus")
    assert codecs.FORMAT_RATES == {"audio/pcm": 24000, "audio/pcmu": 8000, "audio/pcma": 8000}


# ----------------------------------------------------------------------------------------------------------
# WAV
# ----------------------------------------------------------------------------------------------------------


def test_wav_header_known_length():
    h = wav_header(24000, num_samples=1000)
    assert len(h) == 44
    fields = struct.unpack("<4sI4s4sIHHIIHH4sI", h)
    assert fields == (b"RIFF", 36 + 2000, b"WAVE", b"fmt ", 16, 1, 1, 24000, 48000, 2, 16, b"data", 2000)
    x = _sine(440, 24000, 1000 / 24000)
    wav = h + float_to_pcm16(x)
    y, sr = sf.read(io.BytesIO(wav), dtype="float32")
    assert sr == 24000 and y.shape == (1000,)
    assert np.array_equal(y, pcm16_to_float(float_to_pcm16(x)))


def test_wav_header_streaming():
    h = wav_header(24000)
    assert len(h) == 44
    riff_size, data_size = struct.unpack_from("<I", h, 4)[0], struct.unpack_from("<I", h, 40)[0]
    assert riff_size == data_size == 0xFFFFFFFF
    info = sf.info(io.BytesIO(h + float_to_pcm16(np.zeros(480, np.float32))))
    assert info.samplerate == 24000 and info.channels == 1 and info.frames == 480


def test_encode_wav():
    x = _sine(440, 16000, 0.25)
    wav = encode_wav(x, 16000)
    assert len(wav) == 44 + 2 * len(x)
    y, sr = sf.read(io.BytesIO(wav), dtype="float32")
    assert sr == 16000 and np.max(np.abs(y - x)) < 1 / 32768
    stereo = encode_wav(np.stack([x, -x], axis=1), 16000)
    y, sr = sf.read(io.BytesIO(stereo), dtype="float32")
    assert y.shape == (len(x), 2)


def test_wav_header_validation():
    with pytest.raises(ValueError):
        wav_header(24000, bits=12)
    with pytest.raises(ValueError):
        wav_header(0)
    with pytest.raises(ValueError):
        wav_header(24000, num_samples=-1)


# ----------------------------------------------------------------------------------------------------------
# VAD
# ----------------------------------------------------------------------------------------------------------

needs_silero = pytest.mark.skipif(importlib.util.find_spec("silero_vad") is None, reason="silero-vad not installed")


@pytest.fixture(scope="module")
def speech():
    """(audio at 24 kHz with 1 s of silence before and 1.5 s after, onset ms, end ms) of tests/data/speech.wav."""
    y, sr = sf.read(SPEECH, dtype="float32")
    assert sr == 16000 and y.ndim == 1
    loud = np.nonzero(np.abs(y) > 0.01)[0]
    onset_ms = 1000 * (LEAD_S + loud[0] / sr)
    end_ms = 1000 * (LEAD_S + loud[-1] / sr)
    x = np.concatenate([np.zeros(int(LEAD_S * sr), np.float32), y, np.zeros(int(TAIL_S * sr), np.float32)])
    return soxr.resample(x, sr, 24000, "VHQ").astype(np.float32), onset_ms, end_ms


def _run(stream, x: np.ndarray, chunk: int) -> list:
    events = []
    for i in range(0, len(x), chunk):
        events += stream.push(x[i : i + chunk])
    return events


@needs_silero
def test_vad_detects_one_utterance(speech):
    x, onset_ms, end_ms = speech
    cfg = vad.VADConfig()
    stream = vad.StreamingVAD(cfg)
    events = _run(stream, x, 480)
    assert [e.kind for e in events] == ["speech_started", "speech_stopped"]
    start, stop = events[0].audio_ms, events[1].audio_ms
    assert abs(start - (onset_ms - cfg.prefix_padding_ms)) <= 300
    assert end_ms <= stop < end_ms + 1000 * TAIL_S - cfg.silence_duration_ms
    assert not stream.speaking
    assert stream.elapsed_ms == len(x) * 1000 // 24000


@pytest.mark.slow   # silero over many chunkings
@needs_silero
def test_vad_independent_of_chunk_size(speech):
    x, _, _ = speech
    ref = _run(vad.StreamingVAD(vad.VADConfig()), x, 480)
    for chunk in (4800, 333, 2400):
        assert _run(vad.StreamingVAD(vad.VADConfig()), x, chunk) == ref


@pytest.mark.slow   # silero at other rates
@needs_silero
@pytest.mark.parametrize("rate", [16000, 8000])
def test_vad_other_rates(speech, rate):
    x, _, _ = speech
    ref = _run(vad.StreamingVAD(vad.VADConfig()), x, 480)
    y = soxr.resample(x, 24000, rate, "VHQ").astype(np.float32)
    events = _run(vad.StreamingVAD(vad.VADConfig(), sample_rate=rate), y, rate // 50)
    assert [e.kind for e in events] == [e.kind for e in ref]
    assert all(abs(a.audio_ms - b.audio_ms) <= 64 for a, b in zip(events, ref, strict=True))


@needs_silero
def test_vad_speaking_and_padding(speech):
    x, _, _ = speech
    stream = vad.StreamingVAD(vad.VADConfig(prefix_padding_ms=0, silence_duration_ms=200))
    seen_speaking = False
    events = []
    for i in range(0, len(x), 2400):
        events += stream.push(x[i : i + 2400])
        seen_speaking |= stream.speaking
    assert seen_speaking and not stream.speaking
    ref = _run(vad.StreamingVAD(vad.VADConfig()), x, 2400)
    assert events[0].audio_ms == ref[0].audio_ms + 300  # same onset, no padding
    assert len(events) >= 2 and events[-1].kind == "speech_stopped"


@needs_silero
@pytest.mark.parametrize("noise", [0.0, pytest.param(0.003, marks=pytest.mark.slow)])
def test_vad_silence_gives_no_event(noise):
    x = (np.random.default_rng(0).standard_normal(3 * 24000) * noise).astype(np.float32)
    stream = vad.StreamingVAD(vad.VADConfig())
    assert _run(stream, x, 480) == []
    assert not stream.speaking


@pytest.mark.slow   # silero, several streams
@needs_silero
def test_vad_streams_are_independent(speech):
    x, _, _ = speech
    other = np.concatenate([np.zeros(12000, np.float32), x[: len(x) - 12000]])  # the same speech, 0.5 s later
    alone_a = _run(vad.StreamingVAD(vad.VADConfig()), x, 480)
    alone_b = _run(vad.StreamingVAD(vad.VADConfig()), other, 480)
    a, b = vad.StreamingVAD(vad.VADConfig()), vad.StreamingVAD(vad.VADConfig())
    ev_a, ev_b = [], []
    for i in range(0, len(x), 480):
        ev_a += a.push(x[i : i + 480])
        ev_b += b.push(other[i : i + 480])
    assert ev_a == alone_a and ev_b == alone_b
    assert [e.audio_ms - 500 for e in ev_b] == pytest.approx([e.audio_ms for e in ev_a], abs=40)


@pytest.mark.slow   # silero, twice over
@needs_silero
def test_vad_reset(speech):
    x, _, _ = speech
    ref = _run(vad.StreamingVAD(vad.VADConfig()), x, 480)
    stream = vad.StreamingVAD(vad.VADConfig())
    half = len(x) // 2  # in the middle of the speech
    assert [e.kind for e in _run(stream, x[:half], 480)] == ["speech_started"]
    assert stream.speaking
    stream.reset()  # the clock keeps running
    assert not stream.speaking and stream.elapsed_ms == half * 1000 // 24000
    again = _run(stream, x, 480)
    offset = half * 1000 // 24000
    assert [e.kind for e in again] == [e.kind for e in ref]
    assert [e.audio_ms - offset for e in again] == pytest.approx([e.audio_ms for e in ref], abs=40)
    stream.reset(restart_clock=True)
    assert stream.elapsed_ms == 0
    assert _run(stream, x, 480) == ref


@needs_silero
def test_vad_leaves_torch_threads_alone():
    # importing silero_vad calls torch.set_num_threads(1); check in a fresh process that StreamingVAD undoes it
    code = (
        "import torch; torch.set_num_threads(3); from openchroma.serving.vad import StreamingVAD; StreamingVAD(); "
        "import silero_vad; assert torch.get_num_threads() == 3, torch.get_num_threads()"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    n = torch.get_num_threads()
    vad.StreamingVAD(vad.VADConfig())
    assert torch.get_num_threads() == n


@needs_silero
def test_vad_rejects_bad_audio():
    stream = vad.StreamingVAD(vad.VADConfig())
    with pytest.raises(ValueError, match="mono"):
        stream.push(np.zeros((480, 2), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        stream.push(np.full(480, np.nan, np.float32))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": -0.1}, "threshold"),
        ({"threshold": "high"}, "threshold"),
        ({"prefix_padding_ms": -1}, "prefix_padding_ms"),
        ({"silence_duration_ms": -100}, "silence_duration_ms"),
        ({"silence_duration_ms": float("nan")}, "silence_duration_ms"),
    ],
)
def test_vad_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vad.VADConfig(**kwargs)


def test_vad_config_defaults():
    cfg = vad.VADConfig()
    assert (cfg.threshold, cfg.prefix_padding_ms, cfg.silence_duration_ms) == (0.5, 300, 500)
    vad.VADConfig(threshold=0.0, prefix_padding_ms=0, silence_duration_ms=0)


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "wav", "pcm"])
def test_speech_encoder_streams_before_the_end(fmt):
    """mp3, Ogg Opus, aac, wav and pcm leave while the answer is spoken, not only when it ends."""
    from openchroma.serving.codecs import SpeechEncoder

    enc = SpeechEncoder(fmt)
    x = (0.3 * np.sin(np.arange(1920 * 12) * 0.05)).astype(np.float32)
    early = b"".join(enc.encode(x[i:i + 1920]) for i in range(0, 1920 * 6, 1920))
    late = b"".join(enc.encode(x[i:i + 1920]) for i in range(1920 * 6, len(x), 1920)) + enc.finish()
    assert len(early) > 0.2 * len(early + late), (len(early), len(late))   # half the audio, a fifth of the bytes


def test_speech_encoder_refuses_unknown_formats():
    from openchroma.serving.codecs import SpeechEncoder

    with pytest.raises(ValueError, match="unsupported response_format 'ogg'"):
        SpeechEncoder("ogg")


def test_wav_header_sizes():
    """Streaming: 0xFFFFFFFF ("read to the end"); a whole file: its exact sizes."""
    import struct

    riff, data = struct.unpack_from("<I", wav_header(24000), 4)[0], struct.unpack_from("<I", wav_header(24000), 40)[0]
    assert riff == data == 0xFFFFFFFF
    whole = encode_wav(np.zeros(100, np.float32), 24000)
    assert struct.unpack_from("<I", whole, 4)[0] == 36 + 200 and struct.unpack_from("<I", whole, 40)[0] == 200
