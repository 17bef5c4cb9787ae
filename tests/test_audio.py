"""Tests for openchroma.audio: loading, resampling, log-mel features (vs transformers) and streaming."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import soundfile as sf
import torch
from audio_cases import float_wav, silent_flac, tagless_mp3, tone, without_length

from openchroma.audio import (
    HOP_LENGTH,
    QWEN_OMNI_N_SAMPLES,
    WHISPER_N_SAMPLES,
    AudioError,
    AudioTooLong,
    StreamingMelExtractor,
    decode_client_audio,
    load_audio,
    log_mel_features,
    mel_filter_bank,
    mel_frame_count,
    resample,
)

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def whisper_30s():
    return transformers.WhisperFeatureExtractor(feature_size=128)


@pytest.fixture(scope="module")
def whisper_300s():
    # Qwen2.5-Omni's preprocessor_config.json: chunk_length 300, n_samples 4_800_000.
    return transformers.WhisperFeatureExtractor(feature_size=128, chunk_length=300)


def _reference(extractor, audio: np.ndarray, **kwargs) -> np.ndarray:
    """WhisperFeatureExtractor as the Qwen2.5-Omni processor calls it, cut to the attention mask."""
    out = extractor(
        audio,
        sampling_rate=16000,
        padding="max_length",
        return_attention_mask=True,
        return_tensors="np",
        **kwargs,
    )
    valid = int(out["attention_mask"].sum())
    return out["input_features"][0][:, :valid]


def _noise(n: int, scale: float = 0.1, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


def _tone(n: int, freq: float = 440.0, rate: int = 16000, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(n) / rate)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Log-mel features vs transformers
# ---------------------------------------------------------------------------------------------------------


def test_mel_filter_bank_matches_transformers():
    from transformers.audio_utils import mel_filter_bank as hf_mel_filter_bank

    ref = hf_mel_filter_bank(
        num_frequency_bins=201,
        num_mel_filters=128,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=16000,
        norm="slaney",
        mel_scale="slaney",
    )
    np.testing.assert_allclose(mel_filter_bank(), ref, rtol=0, atol=1e-12)
    assert mel_filter_bank().shape == (201, 128)


@pytest.mark.parametrize(
    "n", [1, 100, 200, 201, 359, 360, 361, 1600, 16000, 16001, 123457, 479959, 479960, 479999, 480000]
)
def test_log_mel_matches_whisper_30s(whisper_30s, n):
    audio = _noise(n, seed=n)
    ref = _reference(whisper_30s, audio)
    ours = log_mel_features(torch.from_numpy(audio), n_samples=WHISPER_N_SAMPLES)
    assert ours.dtype == torch.float32
    assert tuple(ours.shape) == ref.shape == (128, mel_frame_count(n))
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("n", [37, 16000 * 3 + 11, 479999, 480000, 16000 * 31 + 7])
def test_log_mel_default_matches_qwen_omni_300s(whisper_300s, n):
    audio = _noise(n, seed=n + 1)
    ref = _reference(whisper_300s, audio)
    ours = log_mel_features(audio)  # numpy input is fine too; default n_samples is Qwen2.5-Omni's 300 s
    assert ours.shape[1] == mel_frame_count(n)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-4)


def test_default_and_30s_agree_below_30s():
    audio = torch.from_numpy(_noise(479959, seed=5))
    torch.testing.assert_close(
        log_mel_features(audio), log_mel_features(audio, n_samples=WHISPER_N_SAMPLES), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize(
    "name,signal",
    [
        ("silence", np.zeros(16000, np.float32)),
        ("quiet", _noise(20000, scale=1e-4, seed=1)),
        ("very_quiet_tone", _tone(9000, amp=1e-6)),
        ("loud_clipped", np.clip(_noise(24000, scale=3.0, seed=2), -1, 1)),
        ("full_scale_tone", _tone(16000 * 2, freq=3000.0, amp=1.0)),
        (
            "speechlike_gaps",
            np.concatenate(
                [
                    _tone(4000, 200.0),
                    np.zeros(6000, np.float32),
                    _noise(5000, 0.3, 3),
                    np.zeros(321, np.float32),
                ]
            ),
        ),
    ],
)
def test_log_mel_quiet_and_loud(whisper_30s, name, signal):
    ref = _reference(whisper_30s, signal)
    ours = log_mel_features(torch.from_numpy(signal))
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-4, err_msg=name)


def test_log_mel_longer_than_30s_is_not_truncated(whisper_30s):
    n = 16000 * 31 + 7
    audio = _noise(n, seed=9)
    ours = log_mel_features(torch.from_numpy(audio), n_samples=WHISPER_N_SAMPLES)
    assert ours.shape == (128, mel_frame_count(n))
    # Same formula over the whole turn: the extractor padded to the next hop multiple, without truncation.
    padded = mel_frame_count(n) * HOP_LENGTH
    ref = _reference(whisper_30s, audio, max_length=padded, truncation=False)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-4)


def test_log_mel_rejects_bad_input():
    with pytest.raises(AudioError, match="empty"):
        log_mel_features(torch.zeros(0))
    with pytest.raises(AudioError, match="1-D"):
        log_mel_features(torch.zeros(2, 100))
    with pytest.raises(AudioError, match="float"):
        log_mel_features(torch.zeros(100, dtype=torch.int16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_log_mel_cuda_matches_cpu():
    audio = torch.from_numpy(_noise(16000 * 5 + 3, seed=4))
    cpu = log_mel_features(audio)
    gpu = log_mel_features(audio.cuda())
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-4)
    stream = StreamingMelExtractor(device="cuda")
    for start in range(0, audio.shape[0], 777):
        stream.push(audio[start : start + 777].cuda())
    torch.testing.assert_close(stream.finalize().cpu(), cpu, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------------------


def _raw_log_mel(audio: torch.Tensor) -> torch.Tensor:
    """log10 mel of the centred STFT of the audio followed by plenty of zeros (no floor, no scaling)."""
    padded = torch.nn.functional.pad(audio, (0, 4000))
    stft = torch.stft(padded, 400, 160, window=torch.hann_window(400), return_complex=True)
    filters = torch.from_numpy(mel_filter_bank().astype(np.float32)).T
    return torch.clamp(filters @ (stft.abs() ** 2), min=1e-10).log10()


@pytest.mark.parametrize("chunk", [1, 160, 777, 16000])
@pytest.mark.parametrize("n", [150, 201, 360, 361, 2500, 40001])
def test_streaming_equals_batch(chunk, n):
    if chunk == 1 and n > 3000:
        pytest.skip("sample-by-sample pushing is covered on the shorter turns")
    audio = torch.from_numpy(_noise(n, seed=n))
    stream = StreamingMelExtractor()
    pushed = [stream.push(audio[start : start + chunk]) for start in range(0, n, chunk)]
    raw = torch.cat(pushed, dim=1)
    assert raw.shape[0] == 128 and stream.num_frames == raw.shape[1] == stream_ready_frames(n)
    assert stream.num_samples == n
    # Pushed frames are final raw log10-mel frames (reflect padding at the start, plain windows after).
    torch.testing.assert_close(raw, _raw_log_mel(audio)[:, : raw.shape[1]], rtol=0, atol=1e-5)
    torch.testing.assert_close(stream.finalize(), log_mel_features(audio), rtol=0, atol=1e-5)


def stream_ready_frames(n: int) -> int:
    return 0 if n <= 200 else (n - 200) // 160 + 1


def test_streaming_matches_transformers_at_the_30s_edge(whisper_30s):
    audio = _noise(479990, seed=11)
    stream = StreamingMelExtractor(n_samples=WHISPER_N_SAMPLES)
    for start in range(0, audio.shape[0], 16000):
        stream.push(audio[start : start + 16000])
    np.testing.assert_allclose(stream.finalize().numpy(), _reference(whisper_30s, audio), rtol=0, atol=1e-4)


def test_streaming_finalize_is_not_destructive_and_reset_works():
    audio = torch.from_numpy(_noise(9000, seed=3))
    stream = StreamingMelExtractor()
    stream.push(audio[:5000])
    torch.testing.assert_close(stream.finalize(), log_mel_features(audio[:5000]), rtol=0, atol=1e-5)
    stream.push(audio[5000:])
    torch.testing.assert_close(stream.finalize(), log_mel_features(audio), rtol=0, atol=1e-5)
    stream.reset()
    assert stream.num_samples == 0 and stream.num_frames == 0
    with pytest.raises(AudioError, match="empty"):
        stream.finalize()
    out = stream.push(np.zeros(0, np.float32))
    assert out.shape == (128, 0)
    with pytest.raises(AudioError, match="NaN"):
        stream.push(torch.tensor([0.0, float("nan")]))


def test_streaming_keeps_a_bounded_buffer():
    stream = StreamingMelExtractor()
    chunk = torch.from_numpy(_noise(1600, seed=8))
    for _ in range(50):
        stream.push(chunk)
    assert stream._buf.shape[0] < 1600 + 400  # only the STFT overlap is kept between pushes


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


def _encode(audio: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.mark.parametrize(
    "fmt,subtype,tol",
    [
        ("WAV", "PCM_16", 1e-3),
        ("WAV", "FLOAT", 1e-6),
        ("FLAC", "PCM_24", 1e-4),
        ("OGG", "VORBIS", 0.05),
        ("MP3", "MPEG_LAYER_III", 0.1),
    ],
)
def test_load_encoded_bytes_and_paths(tmp_path, fmt, subtype, tol):
    if fmt not in sf.available_formats():
        pytest.skip(f"libsndfile here cannot handle {fmt}")
    tone = _tone(16000, freq=440.0, amp=0.5)
    data = _encode(tone, 16000, fmt, subtype)
    from_bytes = load_audio(data, 16000)
    path = tmp_path / f"tone.{fmt.lower()}"
    path.write_bytes(data)
    from_path = load_audio(path, 16000)
    from_str = load_audio(str(path), 16000)
    with open(path, "rb") as handle:
        from_file = load_audio(handle, 16000)
    for out in (from_bytes, from_path, from_str, from_file):
        assert out.dtype == torch.float32 and out.dim() == 1
        assert abs(out.shape[0] - 16000) <= 1200  # lossy codecs may pad a frame
    torch.testing.assert_close(from_bytes, from_path)
    torch.testing.assert_close(from_bytes, from_file)
    n = min(from_bytes.shape[0], 16000)
    # Lossy codecs shift the signal slightly; compare energy and spectrum peak instead of samples.
    assert abs(float(from_bytes.pow(2).mean()) - float(np.mean(tone**2))) < max(tol, 0.02)
    spectrum = np.abs(np.fft.rfft(from_bytes[:n].numpy()))
    assert abs(np.argmax(spectrum) * 16000 / n - 440.0) < 5.0
    if fmt in ("WAV", "FLAC"):
        np.testing.assert_allclose(from_bytes.numpy(), tone, atol=tol)


def test_load_stereo_file_downmixes_and_resamples(tmp_path):
    left = _tone(44100, freq=1000.0, rate=44100, amp=0.4)
    right = -0.5 * left
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 44100, subtype="FLOAT")
    out = load_audio(path, 16000)
    assert out.shape[0] == 16000
    expected = resample(torch.from_numpy((left + right) / 2), 44100, 16000)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    spectrum = np.abs(np.fft.rfft(out.numpy()))
    assert abs(int(np.argmax(spectrum)) - 1000) <= 1  # 1 Hz bins over one second


@pytest.mark.parametrize("rate", [8000, 22050, 24000, 44100, 48000])
def test_load_array_resamples_to_target(rate):
    audio = _tone(rate // 2, freq=300.0, rate=rate, amp=0.3)  # half a second
    out = load_audio(audio, 16000, source_rate=rate)
    assert out.shape[0] == 8000
    reference = _tone(8000, freq=300.0, rate=16000, amp=0.3)
    # Away from the edges a high-quality resampler reproduces the band-limited tone closely.
    np.testing.assert_allclose(out[400:-400].numpy(), reference[400:-400], atol=2e-3)


def test_load_array_dtypes_are_scaled():
    ref = np.array([0.0, 0.5, -0.5, 0.25], dtype=np.float32)
    cases = {
        "int16": (ref * 32768).astype(np.int16),
        "int32": (ref * 2**31).astype(np.int32),
        "int8": (ref * 128).astype(np.int8),
        "uint8": (ref * 128 + 128).astype(np.uint8),
        "float64": ref.astype(np.float64),
        "float16": ref.astype(np.float16),
    }
    for name, arr in cases.items():
        out = load_audio(arr, 16000, source_rate=16000)
        np.testing.assert_allclose(out.numpy(), ref, atol=1e-6, err_msg=name)
    for tensor in (
        torch.from_numpy(cases["int16"]),
        torch.from_numpy(ref).to(torch.bfloat16),
        torch.from_numpy(ref).requires_grad_(),
    ):
        out = load_audio(tensor, 16000, source_rate=16000)
        np.testing.assert_allclose(out.numpy(), ref, atol=1e-6)
    full_scale = load_audio(np.array([-32768, 32767], np.int16), 16000, source_rate=16000)
    assert float(full_scale[0]) == -1.0 and float(full_scale[1]) < 1.0


def test_load_array_channel_layouts():
    mono = _tone(1000)
    other = _tone(1000, freq=700.0)
    expected = (mono + other) / 2
    for arr in (np.stack([mono, other]), np.stack([mono, other], axis=1)):
        np.testing.assert_allclose(load_audio(arr, 16000, source_rate=16000).numpy(), expected, atol=1e-7)
    np.testing.assert_allclose(load_audio(mono[None, :], 16000, source_rate=16000).numpy(), mono)
    np.testing.assert_allclose(
        load_audio(torch.from_numpy(mono[:, None]), 16000, source_rate=16000).numpy(), mono
    )


def test_load_max_seconds(tmp_path):
    audio = _tone(32000)
    assert load_audio(audio, 16000, source_rate=16000, max_seconds=2.0).shape[0] == 32000
    with pytest.raises(AudioError, match=r"2\.00 s long, more than the limit of 1\.5 s"):
        load_audio(audio, 16000, source_rate=16000, max_seconds=1.5)
    path = tmp_path / "long.wav"
    sf.write(path, audio, 16000)
    with pytest.raises(AudioError, match="long.wav: audio is 2.00 s long"):
        load_audio(path, 24000, max_seconds=1.0)
    with pytest.raises(AudioError, match="max_seconds"):
        load_audio(audio, 16000, source_rate=16000, max_seconds=0)


def test_load_errors_name_the_problem(tmp_path):
    bogus = tmp_path / "notes.txt"
    bogus.write_text("this is not audio at all\n" * 10)
    with pytest.raises(AudioError, match=r"notes\.txt: cannot decode audio"):
        load_audio(bogus, 16000)
    with pytest.raises(AudioError, match=r"missing\.wav: no such audio file"):
        load_audio(tmp_path / "missing.wav", 16000)
    with pytest.raises(AudioError, match="is a directory"):
        load_audio(tmp_path, 16000)
    with pytest.raises(AudioError, match="cannot decode audio"):
        load_audio(b"RIFF\x00\x00\x00\x00WAVEgarbage", 16000)
    truncated = _encode(_tone(16000), 16000, "FLAC")[:60]
    with pytest.raises(AudioError, match="cannot decode|empty"):
        load_audio(truncated, 16000)
    with pytest.raises(AudioError, match="empty"):
        load_audio(b"", 16000)
    with pytest.raises(AudioError, match="empty"):
        load_audio(_encode(np.zeros(0, np.float32), 16000, "WAV"), 16000)


def test_load_array_errors():
    with pytest.raises(AudioError, match="source_rate is required"):
        load_audio(np.zeros(10, np.float32), 16000)
    wav = _encode(_tone(100), 16000, "WAV")
    assert load_audio(wav, 16000, source_rate=16000).shape == (100,)  # a matching rate is accepted
    with pytest.raises(AudioError, match="file's sample rate is 16000 Hz but source_rate=8000"):
        load_audio(wav, 16000, source_rate=8000)
    with pytest.raises(AudioError, match=r"empty audio \(0 samples\)"):
        load_audio(np.zeros(0, np.float32), 16000, source_rate=16000)
    with pytest.raises(AudioError, match="1 NaN/inf sample.*index 3"):
        load_audio(np.array([0, 0, 0, np.nan], np.float32), 16000, source_rate=16000)
    with pytest.raises(AudioError, match="NaN/inf"):
        load_audio(torch.tensor([0.0, math.inf]), 16000, source_rate=16000)
    with pytest.raises(AudioError, match="unsupported dtype int64.*int16"):
        load_audio(np.zeros(10, np.int64), 16000, source_rate=16000)
    with pytest.raises(AudioError, match="unsupported dtype"):
        load_audio(np.zeros(10, np.complex64), 16000, source_rate=16000)
    with pytest.raises(AudioError, match="unsupported dtype"):
        load_audio(torch.zeros(10, dtype=torch.bool), 16000, source_rate=16000)
    with pytest.raises(AudioError, match="got 3 dimensions"):
        load_audio(np.zeros((2, 2, 10), np.float32), 16000, source_rate=16000)
    with pytest.raises(AudioError, match="cannot tell channels"):
        load_audio(np.zeros((100, 200), np.float32), 16000, source_rate=16000)
    with pytest.raises(AudioError, match="scalar"):
        load_audio(np.float32(1.0) * np.ones(()), 16000, source_rate=16000)
    with pytest.raises(AudioError, match="sample_rate"):
        load_audio(np.zeros(10, np.float32), 0, source_rate=16000)
    with pytest.raises(AudioError, match="source_rate must be"):
        load_audio(np.zeros(10, np.float32), 16000, source_rate=-1)
    with pytest.raises(AudioError, match="unsupported audio source"):
        load_audio(12345, 16000)  # type: ignore[arg-type]
    assert issubclass(AudioError, ValueError)


def test_resample_helper():
    audio = torch.from_numpy(_tone(48000, rate=48000))
    out = resample(audio, 48000, 16000)
    assert out.shape == (16000,) and out.dtype == torch.float32
    same = resample(audio, 16000, 16000)
    torch.testing.assert_close(same, audio)
    assert same.data_ptr() != audio.data_ptr()  # a copy, not a view of the caller's tensor
    samples = _tone(100)
    loaded = load_audio(samples, 16000, source_rate=16000)
    loaded[0] = 5.0
    assert samples[0] != 5.0
    stereo = torch.stack([audio, -audio])
    out2 = resample(stereo, 48000, 24000)
    assert out2.shape == (2, 24000)
    torch.testing.assert_close(out2[0], -out2[1])
    np_out = resample(audio.numpy(), 48000, 8000)
    assert isinstance(np_out, torch.Tensor) and np_out.shape == (8000,)
    with pytest.raises(AudioError, match="from_rate"):
        resample(audio, 0, 16000)


def test_load_then_features_end_to_end(tmp_path):
    path = tmp_path / "turn.flac"
    sf.write(path, _tone(24000 * 2, freq=500.0, rate=24000, amp=0.3), 24000)
    features = log_mel_features(load_audio(path, 16000))
    assert features.shape == (128, 200)
    assert QWEN_OMNI_N_SAMPLES == 4_800_000 and torch.isfinite(features).all()


# ----------------------------------------------------------------------------------------------------------
# The client-audio intake (decode_client_audio): every server route that takes audio goes through it
# ----------------------------------------------------------------------------------------------------------


def _peak_traced_mb(fn) -> float:
    """Peak of Python and numpy allocations while ``fn`` runs, in MB (numpy reports to tracemalloc)."""
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def test_intake_refuses_a_long_file_from_its_header_without_decoding_it():
    data = silent_flac(2 * 3600)   # 2 hours of silence in ~360 kB; decoded it would be 460 MB of float32

    def refuse():
        with pytest.raises(AudioTooLong, match=r"7200\.00 s long, more than the limit of 120 s") as e:
            decode_client_audio(data, 16000, max_seconds=120)
        assert e.value.seconds == pytest.approx(7200)

    assert _peak_traced_mb(refuse) < 5


def test_a_file_without_a_length_is_decoded_in_blocks_and_stopped_at_the_limit():
    """Streamed FLAC (STREAMINFO total samples 0): its length is unknown until decoded. It used to size one
    allocation from libsndfile's 'unknown' frame count (ValueError: array is too big)."""
    long = without_length(silent_flac(600))
    for decode in (lambda: decode_client_audio(long, 16000, max_seconds=60),
                   lambda: load_audio(long, 16000, max_seconds=60)):
        def refuse(decode=decode):
            with pytest.raises(AudioTooLong, match="longer than 60 s") as e:
                decode()
            assert e.value.seconds is None

        assert _peak_traced_mb(refuse) < 3 * 60 * 16000 * 4 / 2**20   # about what 60 s holds, not 600 s
    short = tone(3.0, 16000)
    buf = io.BytesIO()
    sf.write(buf, short, 16000, format="FLAC", subtype="PCM_16")
    got = decode_client_audio(without_length(buf.getvalue()), 16000, max_seconds=60)
    np.testing.assert_allclose(got.numpy(), short, atol=1 / 32768)


@pytest.mark.parametrize("bad,match", [(float("nan"), "NaN/inf"), (float("inf"), "NaN/inf"),
                                       (1e30, "samples reach 1e[+]30, over the limit of 100"),
                                       (3.3e38, "samples reach 3.3e[+]38")])
def test_intake_refuses_non_finite_and_absurd_samples(bad, match):
    with pytest.raises(AudioError, match=match):
        decode_client_audio(float_wav(bad), 16000, max_seconds=120)


def test_intake_accepts_samples_somewhat_over_full_scale():
    x = decode_client_audio(float_wav(1.7), 24000, max_seconds=120).numpy()
    assert x.max() == pytest.approx(1.7)


def test_intake_raw_pcm16_length_is_checked_from_the_byte_count():
    pcm = np.zeros(16000 * 3, "<i2").tobytes()
    assert decode_client_audio(pcm, 16000, max_seconds=5, pcm16_rate=16000).shape[0] == 48000
    with pytest.raises(AudioTooLong, match=r"3\.00 s long, more than the limit of 2 s"):
        decode_client_audio(pcm, 16000, max_seconds=2, pcm16_rate=16000)
    with pytest.raises(AudioError, match="even number of bytes"):
        decode_client_audio(pcm[:-1], 16000, max_seconds=5, pcm16_rate=16000)
    with pytest.raises(AudioError, match="part: empty audio"):
        decode_client_audio(b"", 16000, max_seconds=5, name="part")


def test_intake_refuses_sample_rates_over_its_limit():
    buf = io.BytesIO()
    sf.write(buf, tone(0.1, 384000), 384000, format="WAV")
    with pytest.raises(AudioError, match="384000 Hz is not supported"):
        decode_client_audio(buf.getvalue(), 16000, max_seconds=120)


def test_intake_decodes_a_tagless_mp3():
    x = decode_client_audio(tagless_mp3(), 24000, max_seconds=120).numpy()
    assert abs(x.shape[0] - 48000) < 2400 and 0.2 < np.abs(x).max() < 0.4
