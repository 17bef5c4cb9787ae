"""Audio front end: decoding, resampling and Whisper-style log-mel features.

``load_audio`` turns a file path, encoded file bytes, a numpy array or a torch tensor into a mono float32
tensor at the requested sample rate. ``log_mel_features`` computes the 128-bin log-mel features that the
Qwen2.5-Omni processor (``WhisperFeatureExtractor``) feeds the Reasoner's audio encoder, in torch, on any device.
``StreamingMelExtractor`` computes the same features incrementally while a turn's audio arrives.
"""

from __future__ import annotations

import functools
import io
import math
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr
import torch

from .constants import HOP_LENGTH, LOG_MEL_FLOOR, LOG_MEL_OFFSET, LOG_MEL_SCALE, N_FFT, N_MELS, REASONER_SAMPLE_RATE

__all__ = [
    "ACCEPTED_DTYPES", "AudioError", "AudioSource", "AudioTooLong", "MAX_CLIENT_RATE", "MAX_CLIENT_SAMPLE",
    "HOP_LENGTH", "N_FFT", "N_MELS", "QWEN_OMNI_N_SAMPLES", "SAMPLE_RATE", "WHISPER_N_SAMPLES",
    "StreamingMelExtractor", "decode_client_audio", "load_audio", "log_mel_features", "mel_filter_bank",
    "mel_frame_count", "normalize_log_mel", "resample", "StreamResampler", "float_to_pcm16", "pcm16_to_float",
]

SAMPLE_RATE = REASONER_SAMPLE_RATE  # the features' input rate
#: Samples ``WhisperFeatureExtractor`` pads every clip to by default (30 s).
WHISPER_N_SAMPLES = 30 * SAMPLE_RATE
#: Samples the Qwen2.5-Omni ``preprocessor_config.json`` pads every clip to (``chunk_length`` 300 s).
QWEN_OMNI_N_SAMPLES = 300 * SAMPLE_RATE

_PAD = N_FFT // 2  # torch.stft(center=True) reflect-pads this many samples at each end
_MAX_CHANNELS = 16

AudioSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO | np.ndarray | torch.Tensor

ACCEPTED_DTYPES = (
    "float16, bfloat16 (torch only), float32 and float64 (samples nominally in [-1, 1]); "
    "int8, int16 and int32 (full-scale PCM, divided by 2**7, 2**15 and 2**31); "
    "uint8 (8-bit PCM centred on 128)"
)


class AudioError(ValueError):
    """Audio that cannot be used: unreadable, empty, non-finite, of the wrong type or shape, or too long."""


class AudioTooLong(AudioError):
    """Audio over a length limit: ``seconds`` is its length, or None when it was refused while decoding a file
    whose header gives no length (it is then longer than ``limit``)."""

    def __init__(self, name: str, limit: float, seconds: float | None = None):
        said = f"{seconds:.2f} s long" if seconds is not None else f"longer than {limit:g} s"
        super().__init__(f"{name}: audio is {said}, more than the limit of {limit:g} s")
        self.limit, self.seconds = limit, seconds


#: Client audio: the highest sample rate (it bounds the samples ``max_seconds`` lets in) and sample magnitude
#: taken. Float audio is nominally in [-1, 1]; past 100 (40 dB over) it is mis-scaled (integer PCM stored as
#: float, garbage), and huge values overflow the features. Files are decoded ``_BLOCK_SAMPLES`` at a time.
MAX_CLIENT_RATE, MAX_CLIENT_SAMPLE, _BLOCK_SAMPLES = 192_000, 100.0, 1 << 18


# ----------------------------------------------------------------------------------------------------------
# Loading and resampling
# ----------------------------------------------------------------------------------------------------------


def load_audio(source: AudioSource, sample_rate: int, *, source_rate: int | None = None,
               max_seconds: float | None = None) -> torch.Tensor:
    """Decode ``source`` to a mono float32 1-D CPU tensor at ``sample_rate`` Hz.

    ``source`` is a path, the bytes of an encoded file (wav, flac, ogg/vorbis, mp3, anything libsndfile
    reads), a binary file object, or a numpy array / torch tensor of samples, in which case ``source_rate``
    gives their sample rate (for files it may be left out; if given it must match the file's rate). Arrays
    are 1-D or 2-D, with the channel axis the smaller one (``[channels, samples]`` or ``[samples,
    channels]``); channels are averaged. See ``ACCEPTED_DTYPES`` for array dtypes.
    Resampling uses soxr's high-quality filter. Raises ``AudioError`` naming the problem.
    """
    _check_rate(sample_rate, "sample_rate")
    if max_seconds is not None and not max_seconds > 0:
        raise AudioError(f"max_seconds must be positive, got {max_seconds!r}")

    if isinstance(source, np.generic):
        source = np.asarray(source)
    if isinstance(source, (np.ndarray, torch.Tensor)):
        if source_rate is None:
            raise AudioError(f"source_rate is required for a {type(source).__name__} input: "
                             "raw samples carry no sample rate of their own")
        _check_rate(source_rate, "source_rate")
        name = f"<{type(source).__name__} of shape {tuple(source.shape)}>"
        samples = _to_mono_float32(source, name)
        rate = source_rate
    else:
        if not isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)) and not hasattr(source, "read"):
            raise AudioError(f"unsupported audio source of type {type(source).__name__}: expected a path, bytes of "
                             "an encoded file, a binary file object, a numpy array or a torch tensor")
        samples, rate, name = _decode(source, max_seconds)
        if source_rate is not None and float(source_rate) != float(rate):
            raise AudioError(f"{name}: the file's sample rate is {rate} Hz but source_rate={source_rate!r} was "
                             "given (files carry their own rate; leave source_rate out)")
    return _to_rate(samples, rate, sample_rate, name, max_seconds)


def decode_client_audio(data: bytes | bytearray | memoryview, sample_rate: int, *, max_seconds: float,
                        pcm16_rate: int | None = None, name: str | None = None) -> torch.Tensor:
    """The one intake for audio a client sends (every server route that takes audio calls it): mono float32 at
    ``sample_rate`` Hz, or ``AudioError`` saying what is wrong (``AudioTooLong`` over ``max_seconds``).

    ``data`` is an encoded file (anything libsndfile reads), or raw little-endian 16-bit mono PCM at
    ``pcm16_rate`` Hz. The length is checked before decoding, from the byte count or the file's header; a file
    whose header gives no length (streamed FLAC) is decoded block by block and refused at the limit, so memory
    never exceeds what ``max_seconds`` allows. Sample rates over ``MAX_CLIENT_RATE`` and samples that are
    NaN, infinite or over ``MAX_CLIENT_SAMPLE`` in magnitude are refused. ``name`` prefixes the messages."""
    _check_rate(sample_rate, "sample_rate")
    if not max_seconds > 0:
        raise AudioError(f"max_seconds must be positive, got {max_seconds!r}")
    name = name or f"<{len(data)} bytes of {'16-bit PCM' if pcm16_rate else 'encoded'} audio>"
    if not len(data):
        raise AudioError(f"{name}: empty audio (no data)")
    if pcm16_rate is not None:
        _check_rate(pcm16_rate, "pcm16_rate")
        if len(data) / 2 / pcm16_rate > max_seconds:
            raise AudioTooLong(name, max_seconds, len(data) / 2 / pcm16_rate)
        try:
            samples, rate = pcm16_to_float(data), pcm16_rate
        except ValueError as e:
            raise AudioError(f"{name}: {e}") from None
    else:
        samples, rate, _ = _decode(bytes(data), max_seconds, name=name, max_rate=MAX_CLIENT_RATE)
    _check_samples(samples, name)
    peak = float(np.abs(samples).max())
    if peak > MAX_CLIENT_SAMPLE:
        raise AudioError(f"{name}: samples reach {peak:.3g}, over the limit of {MAX_CLIENT_SAMPLE:g} (float audio "
                         "is nominally in [-1, 1]: integer PCM stored as float?)")
    return _to_rate(samples, rate, sample_rate, name, max_seconds)


def _to_rate(samples: np.ndarray, rate: float, sample_rate: int, name: str, max_seconds: float | None
             ) -> torch.Tensor:
    _check_samples(samples, name)
    duration = samples.shape[0] / rate
    if max_seconds is not None and duration > max_seconds:
        raise AudioTooLong(name, max_seconds, duration)
    out = _resample_np(samples, rate, sample_rate)
    if out.shape[0] == 0:
        raise AudioError(f"{name}: audio of {samples.shape[0]} samples at {rate} Hz is too short to resample to "
                         f"{sample_rate} Hz")
    return torch.from_numpy(out)


def resample(audio: torch.Tensor | np.ndarray, from_rate: int, to_rate: int) -> torch.Tensor:
    """Resample float audio ``[..., time]`` (1-D, or 2-D with time last) from ``from_rate`` to ``to_rate`` Hz.

    Uses soxr (high quality) on the CPU; the result is float32 on the input's device.
    """
    _check_rate(from_rate, "from_rate")
    _check_rate(to_rate, "to_rate")
    device = audio.device if isinstance(audio, torch.Tensor) else torch.device("cpu")
    if isinstance(audio, torch.Tensor):
        array = audio.detach().to("cpu", torch.float32).numpy()
    else:
        array = np.asarray(audio, dtype=np.float32)
    if array.ndim not in (1, 2):
        raise AudioError(f"resample expects a 1-D or 2-D [channels, time] array, got shape {array.shape}")
    if array.ndim == 1:
        out = _resample_np(array, from_rate, to_rate)
    else:
        out = np.ascontiguousarray(_resample_np(np.ascontiguousarray(array.T), from_rate, to_rate).T)
    return torch.from_numpy(out).to(device)


def _resample_np(samples: np.ndarray, from_rate: float, to_rate: float) -> np.ndarray:
    if from_rate == to_rate:
        return np.array(samples, dtype=np.float32, order="C", copy=True)  # never alias the caller's array
    out = soxr.resample(np.ascontiguousarray(samples, dtype=np.float32), from_rate, to_rate, quality="HQ")
    return np.ascontiguousarray(out, dtype=np.float32)


def _check_rate(rate: object, what: str) -> None:
    numeric = isinstance(rate, (int, float, np.integer, np.floating)) and not isinstance(rate, bool)
    if not (numeric and math.isfinite(float(rate)) and rate > 0):
        raise AudioError(f"{what} must be a positive number of Hz, got {rate!r}")


def _decode(source: object, max_seconds: float | None, name: str | None = None,
            max_rate: float | None = None) -> tuple[np.ndarray, int, str]:
    """Decode a path, bytes or file object with libsndfile -> (mono float32 samples, rate, display name)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = name or str(path)
        if not path.exists():
            raise AudioError(f"{name}: no such audio file")
        if path.is_dir():
            raise AudioError(f"{name}: is a directory, not an audio file")
        opened: object = path
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = name or f"<{len(data)} bytes of encoded audio>"
        if not data:
            raise AudioError(f"{name}: empty audio (no data)")
        opened = io.BytesIO(data)
    else:
        name = name or f"<{getattr(source, 'name', type(source).__name__)}>"
        opened = source

    try:
        with _ForwardOnly(opened) as f:  # type: ignore[arg-type]
            rate = int(f.samplerate)
            if max_rate is not None and not 0 < rate <= max_rate:
                raise AudioError(f"{name}: a sample rate of {rate} Hz is not supported (at most {max_rate:g} Hz)")
            frames = f.frames  # 2**63 - 1 when the header does not say (streamed FLAC)
            if max_seconds is not None and rate > 0 and 0 < frames < 2**62 and frames / rate > max_seconds:
                raise AudioTooLong(name, max_seconds, frames / rate)
            limit = None if max_seconds is None or rate <= 0 else int(max_seconds * rate)
            mono = _read_mono(f, name, limit, max_seconds)
    except AudioError:
        raise
    except (sf.SoundFileError, RuntimeError, TypeError, EOFError, OSError) as exc:
        # libsndfile's own words, without "Error opening <_io.BytesIO object at 0x...>" (it names no file here).
        detail = (getattr(exc, "error_string", None) or str(exc)).strip() or type(exc).__name__
        raise AudioError(f"{name}: cannot decode audio (corrupt data or a format libsndfile does not read: "
                         f"{detail})") from exc
    if mono.shape[0] == 0:
        raise AudioError(f"{name}: empty audio (the file holds no samples)")
    return mono, rate, name


class _ForwardOnly(sf.SoundFile):
    """Read front to back: soundfile then never seeks around a read (libsndfile cannot on a FLAC without a length)."""

    def seekable(self) -> bool:
        return False


def _read_mono(f: sf.SoundFile, name: str, limit: int | None, max_seconds: float | None) -> np.ndarray:
    """All of ``f``'s frames downmixed to mono float32, read in blocks (a header's length never sizes an
    allocation); ``AudioTooLong`` as soon as more than ``limit`` frames came out."""
    buf = np.empty((max(1, _BLOCK_SAMPLES // max(1, f.channels)), f.channels), np.float32)
    parts, total = [], 0
    while True:
        data2d = f.read(out=buf)
        if data2d.shape[0] == 0:
            break
        total += data2d.shape[0]
        if limit is not None and total > limit:
            raise AudioTooLong(name, float(max_seconds))
        parts.append(data2d[:, 0].copy() if data2d.shape[1] == 1
                     else data2d.mean(axis=1, dtype=np.float64).astype(np.float32))
    return np.ascontiguousarray(np.concatenate(parts) if parts else np.zeros(0, np.float32), dtype=np.float32)


def _to_mono_float32(source: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """Convert an array/tensor of samples to mono float32 numpy, scaling integer PCM to [-1, 1]."""
    if isinstance(source, torch.Tensor):
        tensor = source.detach()
        if tensor.is_complex() or tensor.dtype == torch.bool:
            raise AudioError(f"{name}: unsupported dtype {tensor.dtype}; accepted: {ACCEPTED_DTYPES}")
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        array = tensor.cpu().numpy()
    else:
        array = source
    if array.ndim == 0:
        raise AudioError(f"{name}: expected audio samples, got a scalar")
    if array.ndim > 2:
        raise AudioError(
            f"{name}: expected 1-D mono or 2-D [channels, samples] / [samples, channels] audio, "
            f"got {array.ndim} dimensions"
        )
    if array.size == 0:
        raise AudioError(f"{name}: empty audio (0 samples)")

    kind, itemsize = array.dtype.kind, array.dtype.itemsize
    if kind == "f":
        floats = array.astype(np.float32, copy=False)
    elif kind == "i" and itemsize in (1, 2, 4):
        floats = array.astype(np.float32) / np.float32(2 ** (8 * itemsize - 1))
    elif kind == "u" and itemsize == 1:
        floats = (array.astype(np.float32) - 128.0) / 128.0
    else:
        raise AudioError(f"{name}: unsupported dtype {array.dtype}; accepted: {ACCEPTED_DTYPES}")

    if floats.ndim == 2:
        rows, cols = floats.shape
        channel_axis = 0 if rows <= cols else 1
        channels = floats.shape[channel_axis]
        if channels > _MAX_CHANNELS:
            raise AudioError(
                f"{name}: cannot tell channels from samples in a 2-D array of shape {floats.shape}; "
                f"expected [channels, samples] or [samples, channels] with at most {_MAX_CHANNELS} channels"
            )
        floats = floats.mean(axis=channel_axis, dtype=np.float64).astype(np.float32)
    return np.ascontiguousarray(floats, dtype=np.float32)


def _check_samples(samples: np.ndarray, name: str) -> None:
    if samples.shape[0] == 0:
        raise AudioError(f"{name}: empty audio (0 samples)")
    finite = np.isfinite(samples)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise AudioError(
            f"{name}: audio contains {bad.size} NaN/inf sample(s) (first at index {int(bad[0])}, after "
            "downmixing to mono)"
        )


# ----------------------------------------------------------------------------------------------------------
# Log-mel features
# ----------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def mel_filter_bank(
    n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE, f_max: float = 8000.0
) -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular mel filters ``[n_fft // 2 + 1, n_mels]`` (float64), as
    ``WhisperFeatureExtractor`` builds them (f_min 0 Hz, f_max 8 kHz)."""
    from transformers.audio_utils import mel_filter_bank as hf_mel_filter_bank  # imported late: ~0.5 s

    filters = hf_mel_filter_bank(
        num_frequency_bins=n_fft // 2 + 1,
        num_mel_filters=n_mels,
        min_frequency=0.0,
        max_frequency=f_max,
        sampling_rate=sample_rate,
        norm="slaney",
        mel_scale="slaney",
    )
    filters.setflags(write=False)
    return filters


_DEVICE_CACHE: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(Hann window [N_FFT], mel filters [N_MELS, N_FFT//2+1]) as float32 on ``device``, cached."""
    key = (device.type, str(device.index))
    cached = _DEVICE_CACHE.get(key)
    if cached is None:
        window = torch.hann_window(N_FFT, device=device)
        filters = torch.from_numpy(mel_filter_bank().astype(np.float32)).to(device).T.contiguous()
        cached = (window, filters)
        _DEVICE_CACHE[key] = cached
    return cached


def mel_frame_count(num_samples: int) -> int:
    """Number of valid mel frames for ``num_samples`` of 16 kHz audio (the feature attention mask's sum)."""
    return -(-int(num_samples) // HOP_LENGTH)


def _power_to_log_mel(stft: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    magnitudes = (stft.abs() ** 2).contiguous()
    return torch.clamp(filters @ magnitudes, min=1e-10).log10()


def normalize_log_mel(raw: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
    """Whisper's scaling of raw log10-mel frames: floored at ``peak - 8`` (80 dB below the clip's maximum
    ``peak``), then ``(x + 4) / 4``."""
    return (torch.maximum(raw, peak - LOG_MEL_FLOOR) + LOG_MEL_OFFSET) / LOG_MEL_SCALE


def _normalize(raw: torch.Tensor, valid_frames: int) -> torch.Tensor:
    """Normalised features of a whole turn's raw frames; keep the valid frames."""
    return normalize_log_mel(raw, raw.max())[:, :valid_frames]


def _plan(num_samples: int, n_samples: int) -> tuple[int, int, int]:
    """-> (padded length P, valid frames L, frames T that can influence the maximum).

    The reference extractor zero-pads the clip to ``P = n_samples`` samples, runs a centred STFT (reflect
    padding at both ends of the padded array), drops the last frame and keeps ``ceil(n / hop)`` frames.
    Longer clips are padded to the next multiple of the hop instead (the same computation without
    truncation). Frames past ``L + 1`` only see zeros: they are exactly log10(1e-10) and never raise the max.
    """
    valid = mel_frame_count(num_samples)
    padded = max(int(n_samples), valid * HOP_LENGTH)
    return padded, valid, min(padded // HOP_LENGTH, valid + 2)


def _as_float_tensor(audio: torch.Tensor | np.ndarray, what: str) -> torch.Tensor:
    if isinstance(audio, np.ndarray):
        audio = torch.from_numpy(np.ascontiguousarray(audio))
    if not isinstance(audio, torch.Tensor):
        raise AudioError(f"{what} expects a 1-D torch tensor or numpy array, got {type(audio).__name__}")
    if audio.dim() != 1:
        raise AudioError(f"{what} expects 1-D mono 16 kHz audio, got shape {tuple(audio.shape)}")
    if not (audio.is_floating_point()):
        raise AudioError(f"{what} expects float audio (use load_audio for integer PCM), got {audio.dtype}")
    return audio.detach().to(torch.float32)


def log_mel_features(
    audio_16k: torch.Tensor | np.ndarray, *, n_samples: int = QWEN_OMNI_N_SAMPLES
) -> torch.Tensor:
    """128-bin log-mel features ``[128, L]`` of one 16 kHz mono turn, ``L = ceil(len / 160)``.

    Equal to ``WhisperFeatureExtractor(feature_size=128)`` called the way the Qwen2.5-Omni processor calls it
    (``padding="max_length"``, ``return_attention_mask=True``), cut to the frames its attention mask marks
    valid. ``n_samples`` is the length the reference extractor pads to: Qwen2.5-Omni's preprocessor config
    uses 300 s (the default here); ``WHISPER_N_SAMPLES`` (30 s) is the class default. The two give the same
    values for turns shorter than 30 s minus 41 samples. Turns longer than ``n_samples`` are not truncated:
    they are padded to the next multiple of the hop and go through the same formula (equal to the extractor
    with ``max_length`` set to that padded length and ``truncation=False``). Computed on the input's device.
    """
    audio = _as_float_tensor(audio_16k, "log_mel_features")
    n = audio.shape[0]
    if n == 0:
        raise AudioError("log_mel_features: empty audio (0 samples)")
    padded, valid, frames = _plan(n, n_samples)
    # Zero-pad only as far as the frames we need; when that stops short of ``padded``, the right-hand reflect
    # padding of torch.stft mirrors zeros, exactly like the zeros of the full-length padded array would.
    length = min(padded, frames * HOP_LENGTH + 2 * _PAD)
    signal = torch.nn.functional.pad(audio, (0, length - n))
    window, filters = _constants(audio.device)
    stft = torch.stft(
        signal, N_FFT, HOP_LENGTH, window=window, center=True, pad_mode="reflect", return_complex=True
    )
    raw = _power_to_log_mel(stft[:, :frames], filters)
    return _normalize(raw, valid)


class StreamingMelExtractor:
    """Incremental log-mel features for one turn of 16 kHz audio arriving in chunks of any size.

    ``push`` returns the raw ``log10`` mel frames ``[128, n_new]`` that became computable (every frame whose
    STFT window is complete; the first two use the reflect padding at the turn's start, exactly like the
    centred STFT). The Whisper floor/normalisation depends on the whole turn's maximum, so ``finalize``
    returns the normalised ``[128, L]`` features of everything pushed so far, equal to ``log_mel_features``
    on the concatenated audio. ``finalize`` does not change the state: more audio can be pushed afterwards.
    """

    def __init__(self, *, device: torch.device | str | None = None, n_samples: int = QWEN_OMNI_N_SAMPLES):
        self._device = torch.device(device) if device is not None else None
        self._n_samples = int(n_samples)
        self.reset()

    def reset(self) -> None:
        """Forget all audio and frames (start a new turn)."""
        self._buf = torch.zeros(0, dtype=torch.float32, device=self._device)
        self._buf_start = 0  # absolute index of self._buf[0]
        self._num_samples = 0
        self._frames: list[torch.Tensor] = []
        self._num_frames = 0

    @property
    def num_samples(self) -> int:
        """Samples pushed so far."""
        return self._num_samples

    @property
    def num_frames(self) -> int:
        """Raw frames returned by ``push`` so far."""
        return self._num_frames

    def push(self, chunk: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Add 16 kHz mono float samples; return the new raw log10-mel frames ``[128, n_new]``."""
        chunk = _as_float_tensor(chunk, "StreamingMelExtractor.push")
        if self._device is None:
            self._device = chunk.device
            self._buf = self._buf.to(self._device)
        chunk = chunk.to(self._device)
        if chunk.numel() and not torch.isfinite(chunk).all():
            raise AudioError("StreamingMelExtractor.push: chunk contains NaN/inf samples")
        self._buf = torch.cat([self._buf, chunk])
        self._num_samples += chunk.shape[0]

        n = self._num_samples
        ready = (
            0 if n <= _PAD else (n - _PAD) // HOP_LENGTH + 1
        )  # frame t needs samples < t*hop + N_FFT/2 (+1)
        if ready <= self._num_frames:
            return torch.zeros(N_MELS, 0, dtype=torch.float32, device=self._device)
        # Windows of frames < ready end inside the audio, so no right-hand padding is involved (P = n).
        new = self._raw_frames(self._num_frames, ready, padded=n)
        self._frames.append(new)
        self._num_frames = ready
        keep_from = max(0, self._num_frames * HOP_LENGTH - _PAD)
        if keep_from > self._buf_start:
            self._buf = self._buf[keep_from - self._buf_start :].clone()
            self._buf_start = keep_from
        return new

    def finalize(self) -> torch.Tensor:
        """Normalised features ``[128, L]`` of all audio pushed so far (equal to ``log_mel_features``)."""
        n = self._num_samples
        if n == 0:
            raise AudioError("StreamingMelExtractor.finalize: empty audio (no samples pushed)")
        padded, valid, frames = _plan(n, self._n_samples)
        parts = list(self._frames)
        if frames > self._num_frames:
            parts.append(self._raw_frames(self._num_frames, frames, padded=padded))
        raw = torch.cat(parts, dim=1)
        return _normalize(raw, valid)

    def _raw_frames(self, first: int, stop: int, *, padded: int) -> torch.Tensor:
        """Raw log10-mel frames ``first..stop-1`` of the centred STFT of the turn, zero-padded to ``padded``.

        Gathers the reflect-padded signal those frames need from the buffer and runs an uncentred STFT.
        """
        # Positions in the reflect-padded signal (offset by _PAD) -> positions in the zero-padded turn.
        pos = torch.arange(first * HOP_LENGTH - _PAD, (stop - 1) * HOP_LENGTH + _PAD, device=self._device)
        pos = torch.where(pos < 0, -pos, pos)
        pos = torch.where(pos >= padded, 2 * (padded - 1) - pos, pos)
        inside = pos < self._num_samples
        local = (pos - self._buf_start).clamp(0, max(self._buf.shape[0] - 1, 0))
        if bool((inside & (pos < self._buf_start)).any()):  # pragma: no cover - internal invariant
            raise RuntimeError("StreamingMelExtractor dropped samples it still needs")
        values = self._buf[local] if self._buf.shape[0] else torch.zeros_like(pos, dtype=torch.float32)
        signal = torch.where(inside, values, torch.zeros((), dtype=torch.float32, device=self._device))
        window, filters = _constants(signal.device)
        stft = torch.stft(signal, N_FFT, HOP_LENGTH, window=window, center=False, return_complex=True)
        return _power_to_log_mel(stft, filters)


#: 16-bit PCM full scale: ``x`` maps to ``round(x * 32768)`` clipped to int16, so a PCM round trip is exact.
_PCM_SCALE = 32768.0


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
