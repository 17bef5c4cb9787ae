"""Streaming server-side voice activity detection with silero-vad (OpenAI Realtime ``server_vad`` semantics).

``StreamingVAD.push`` takes audio chunks of any size, resamples them to 16 kHz, runs silero-vad on every
512-sample (32 ms) window and reports ``speech_started`` / ``speech_stopped`` events:

* speech starts on the first window whose speech probability is ``>= threshold``; the event's ``audio_ms`` is that
  window's start minus ``prefix_padding_ms`` (clamped to the start of the buffer), like OpenAI's ``audio_start_ms``;
* speech stops once ``silence_duration_ms`` have passed since the probability fell below ``threshold - 0.15``
  without coming back to ``threshold`` (silero's own hysteresis: probabilities in between neither start nor cancel
  the silence timer); the event's ``audio_ms`` is where that silence began, like OpenAI's ``audio_end_ms``.

All times are milliseconds since the start of the audio pushed to the stream (see ``StreamingVAD.reset``).

The silero JIT model is loaded once per process and deep-copied for each stream (a copy costs ~5 ms, a load
~50 ms), so streams never share recurrent state. A stream is not thread-safe; use each from one thread at a time.
"""

from __future__ import annotations

import copy
import math
import threading
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from openchroma.audio import StreamResampler

__all__ = ["VAD_SAMPLE_RATE", "VAD_WINDOW", "StreamingVAD", "VADConfig", "VADEvent", "load_vad_model"]

VAD_SAMPLE_RATE = 16000
VAD_WINDOW = 512  # samples per silero window at 16 kHz (32 ms)
_HYSTERESIS = 0.15

_model_lock = threading.Lock()
_template: torch.jit.ScriptModule | None = None


def _load_template() -> torch.jit.ScriptModule:
    # Importing silero_vad calls torch.set_num_threads(1) for the whole process: undo that.
    threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings():  # importlib.resources.path and torch.jit.load deprecations inside silero
            warnings.simplefilter("ignore", DeprecationWarning)
            from silero_vad import load_silero_vad

            model = load_silero_vad()
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    model.eval()
    # The first two calls of a TorchScript function in a process profile and optimise it (~80 ms): do that now, on a
    # throwaway copy, rather than inside the first conversation's event loop.
    warm = copy.deepcopy(model)
    with torch.inference_mode():
        for _ in range(3):
            warm(torch.zeros(VAD_WINDOW), VAD_SAMPLE_RATE)
    return model


def load_vad_model() -> torch.jit.ScriptModule:
    """A fresh silero-vad model with its own recurrent state (the process-wide copy is loaded on first use)."""
    global _template
    with _model_lock:
        if _template is None:
            _template = _load_template()
        model = copy.deepcopy(_template)
    model.reset_states()
    return model


@dataclass
class VADConfig:
    """Server VAD settings, as in OpenAI's ``turn_detection: {"type": "server_vad", ...}``."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500

    def __post_init__(self) -> None:
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0.0 <= t <= 1.0):
            raise ValueError(f"VAD threshold must be a number between 0 and 1, got {t!r}")
        for name in ("prefix_padding_ms", "silence_duration_ms"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"VAD {name} must be a non-negative number of milliseconds, got {v!r}")


@dataclass
class VADEvent:
    kind: Literal["speech_started", "speech_stopped"]
    audio_ms: int


class StreamingVAD:
    """Incremental speech start / stop detection on a mono float32 stream at ``sample_rate`` Hz."""

    def __init__(self, config: VADConfig | None = None, sample_rate: int = 24000) -> None:
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        self.sample_rate = int(sample_rate)
        self.config = config if config is not None else VADConfig()
        self._apply_config()
        self._model = load_vad_model()
        self._resampler = StreamResampler(self.sample_rate, VAD_SAMPLE_RATE)
        self._pending = np.zeros(0, dtype=np.float32)
        self._in_samples = 0  # input samples pushed since the clock started
        self._start16 = 0  # 16 kHz sample index at which the current buffer began
        self._pos16 = 0  # 16 kHz sample index of the next window
        self._speaking = False
        self._silence16: int | None = None  # where the current silence began, while speaking
        self.last_probability = 0.0

    def _apply_config(self) -> None:
        # Read at every push, so that changing ``self.config`` (or its fields) mid-stream, e.g. on an OpenAI
        # ``session.update``, applies from the next push.
        config = self.config
        self._threshold = float(config.threshold)
        self._neg_threshold = max(self._threshold - _HYSTERESIS, 0.01)
        self._pad16 = round(config.prefix_padding_ms * VAD_SAMPLE_RATE / 1000)
        self._min_silence16 = round(config.silence_duration_ms * VAD_SAMPLE_RATE / 1000)

    # -- state -----------------------------------------------------------------------------------------------

    @property
    def speaking(self) -> bool:
        """Whether speech has started and not yet stopped."""
        return self._speaking

    @property
    def elapsed_ms(self) -> int:
        """Milliseconds of audio pushed since the clock started."""
        return self._in_samples * 1000 // self.sample_rate

    def reset(self, *, restart_clock: bool = False) -> None:
        """Start a new buffer: drop buffered audio, the model's recurrent state and any speech in progress.

        No ``speech_stopped`` is reported for speech cut off by a reset. By default the clock keeps running, so
        later events stay measured from the first audio ever pushed (speech_started's padding is clamped to the
        reset point); ``restart_clock=True`` makes the next audio time 0 again.
        """
        self._model.reset_states()
        self._resampler.reset()
        self._pending = np.zeros(0, dtype=np.float32)
        if restart_clock:
            self._in_samples = 0
        self._start16 = self._pos16 = self._in_samples * VAD_SAMPLE_RATE // self.sample_rate
        self._speaking = False
        self._silence16 = None
        self.last_probability = 0.0

    # -- processing --------------------------------------------------------------------------------------------

    def push(self, audio: np.ndarray) -> list[VADEvent]:
        """Feed the next chunk (float32 at ``sample_rate``, any length); returns the events it completed."""
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1:
            raise ValueError(f"expected mono 1-D audio, got shape {audio.shape}")
        if not np.isfinite(audio).all():
            raise ValueError("audio contains NaN or infinite samples")
        self._in_samples += audio.shape[0]
        x = self._resampler.process(audio)
        if self._pending.shape[0]:
            x = np.concatenate((self._pending, x))
        used = x.shape[0] - x.shape[0] % VAD_WINDOW
        self._pending = x[used:].copy()  # < 512 samples; never a view of the caller's array
        if not used:
            return []
        if not x.flags.writeable:  # torch.from_numpy warns on read-only arrays (e.g. np.frombuffer)
            x = x.copy()
        self._apply_config()
        events: list[VADEvent] = []
        model = self._model
        with torch.inference_mode():
            for i in range(0, used, VAD_WINDOW):
                p = model(torch.from_numpy(x[i : i + VAD_WINDOW]), VAD_SAMPLE_RATE).item()
                self._step(p, events)
        return events

    # Not silero's own VADIterator: it starts the silence timer a window late, reports the end shifted by its padding
    # and cannot change settings mid-stream, so its events differ from OpenAI's server_vad timing kept here.
    def _step(self, p: float, events: list[VADEvent]) -> None:
        start = self._pos16
        self._pos16 += VAD_WINDOW
        self.last_probability = p
        if p >= self._threshold:
            self._silence16 = None
            if not self._speaking:
                self._speaking = True
                events.append(VADEvent("speech_started", self._ms(max(start - self._pad16, self._start16))))
        elif self._speaking and p < self._neg_threshold:
            if self._silence16 is None:
                self._silence16 = start
            if self._pos16 - self._silence16 >= self._min_silence16:
                events.append(VADEvent("speech_stopped", self._ms(self._silence16)))
                self._speaking = False
                self._silence16 = None

    @staticmethod
    def _ms(samples16: int) -> int:
        return samples16 * 1000 // VAD_SAMPLE_RATE
