"""Semantic end-of-turn detection (OpenAI Realtime ``semantic_vad``) with the Smart Turn v3.2 model.

``SemanticVAD`` has the shape of ``vad.StreamingVAD`` (``push(chunk) -> [VADEvent]``, ``speaking``, ``reset``,
``elapsed_ms``), so a realtime connection swaps one for the other in one line. Inside, silero finds the silences
(``vad.StreamingVAD`` with a short ``check_silence_ms``); after each one, Smart Turn reads the turn's last 8 s of
audio and gives the probability that the speaker has finished:

* ``speech_started``: the first speech of a turn, as ``server_vad`` reports it (prefix padding included);
* ``speech_stopped``: the turn is over, either because the model's probability reached the eagerness's threshold
  after a silence, or because the silence lasted the eagerness's longest wait (OpenAI: low 8 s, medium 4 s,
  high 2 s; auto is medium). ``audio_ms`` is where the final silence began, like ``server_vad``'s ``audio_end_ms``.

Speech resuming within the wait continues the same turn (no event): ``speaking`` stays true from
``speech_started`` to ``speech_stopped``, pauses included, so everything the user says in a turn reaches the
engine.

Smart Turn (pipecat-ai, BSD-2) is an 8.7 MB ONNX model run with onnxruntime: its input is the Whisper log-mel
spectrogram (80 bins, 10 ms hop) of 8 s of 16 kHz audio, the turn's end last, zero-padded in front and
normalised to zero mean and unit variance; its output is a sigmoid probability of "turn complete". A check costs
one model call (about 30 ms on an idle core of the project's VM, several times that on a busy one: see
docs/turn-detection.md), so ``push`` belongs off the event loop, as ``StreamingVAD.push`` already does
(``asyncio.to_thread``). One model session is shared by every stream of a process (onnxruntime sessions are safe to
run from several threads); a stream is not thread-safe.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from openchroma.audio import StreamResampler, mel_filter_bank

from .vad import VAD_SAMPLE_RATE, VAD_WINDOW, StreamingVAD, VADConfig, VADEvent

__all__ = ["EAGERNESS", "SMART_TURN_FILE", "SMART_TURN_REPO", "Eagerness", "EagernessSetting", "SemanticVAD",
           "SemanticVADConfig", "SmartTurnModel", "TurnCheck", "TurnModelError", "load_turn_model",
           "resolve_turn_model", "smart_turn_features", "turn_detector"]

SMART_TURN_FILE = "smart-turn-v3.2-cpu.onnx"
SMART_TURN_REPO = "pipecat-ai/smart-turn-v3"  # the model's hub repo, holding SMART_TURN_FILE
_PIPECAT_DATA = ("audio", "turn", "smart_turn", "data")  # where pipecat-ai's wheel keeps it
MODEL_SECONDS = 8
MODEL_SAMPLES = MODEL_SECONDS * VAD_SAMPLE_RATE
_N_MELS, _N_FFT, _HOP, _FRAMES = 80, 400, 160, 800
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")

Eagerness = Literal["low", "medium", "high", "auto"]


class TurnModelError(ValueError):
    """The end-of-turn model cannot be found or loaded; the message says where it looked and what to do."""


# ----- the model ----------------------------------------------------------------------------------------------


def _installed_copy() -> Path | None:
    """The copy in the installed pipecat-ai package, found without importing pipecat (its import is heavy)."""
    spec = importlib.util.find_spec("pipecat")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root).joinpath(*_PIPECAT_DATA, SMART_TURN_FILE)
        if path.is_file():
            return path
    return None


def _hub_download(repo_id: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id, SMART_TURN_FILE))
    except Exception as e:
        raise TurnModelError(
            f"{repo_id}: could not download {SMART_TURN_FILE} from the Hugging Face hub ({type(e).__name__}: "
            f"{e}). Pass the path of a local {SMART_TURN_FILE}, or install pipecat-ai, whose wheel ships it."
        ) from e


def resolve_turn_model(source: str | os.PathLike[str] | None = None) -> Path:
    """The ONNX file for ``source``: None for the installed pipecat-ai package's copy, a path to an ``.onnx``
    file (or a directory holding ``smart-turn-v3.2-cpu.onnx``), or a hub repo id like ``pipecat-ai/smart-turn-v3``
    (downloaded into the hub cache)."""
    if source is None:
        found = _installed_copy()
        if found is None:
            raise TurnModelError(
                f"no end-of-turn model given and none installed: pip install pipecat-ai (its wheel ships "
                f"{SMART_TURN_FILE}), or pass the path of a local {SMART_TURN_FILE} or the hub id {SMART_TURN_REPO}")
        return found
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / SMART_TURN_FILE).is_file():
            raise TurnModelError(f"{path}: the directory holds no {SMART_TURN_FILE}")
        return path / SMART_TURN_FILE
    if path.is_file():
        return path
    name = os.fspath(source)
    if _HUB_ID.match(name) and not name.endswith(".onnx") and not name.startswith("."):
        return _hub_download(name)
    raise TurnModelError(f"{name}: no such end-of-turn model file (give the path of {SMART_TURN_FILE}, a "
                         f"directory holding it, or a hub repo id like {SMART_TURN_REPO})")


def smart_turn_features(audio_16k: np.ndarray) -> np.ndarray:
    """Smart Turn's input ``[80, 800]`` float32 for mono 16 kHz audio, its last 8 s (zero-padded in front).

    Equal to ``WhisperFeatureExtractor(feature_size=80, chunk_length=8)`` on the padded 8 s with
    ``do_normalize=True``: the waveform normalised to zero mean and unit variance, a centred 400-point STFT with a
    160-sample hop, Slaney mel filters, log10, floored 80 dB below the maximum, ``(x + 4) / 4``, last frame dropped.
    """
    x = np.asarray(audio_16k, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"expected mono 1-D audio, got shape {x.shape}")
    x = x[-MODEL_SAMPLES:]
    if x.shape[0] < MODEL_SAMPLES:
        x = np.concatenate((np.zeros(MODEL_SAMPLES - x.shape[0], dtype=np.float32), x))
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    filters = torch.from_numpy(mel_filter_bank(_N_MELS, _N_FFT, VAD_SAMPLE_RATE).astype(np.float32)).T
    with torch.inference_mode():
        stft = torch.stft(torch.from_numpy(x), _N_FFT, _HOP, window=torch.hann_window(_N_FFT), center=True,
                          pad_mode="reflect", return_complex=True)[:, :_FRAMES]
        log_mel = torch.clamp(filters @ (stft.abs() ** 2), min=1e-10).log10()
        log_mel = (torch.maximum(log_mel, log_mel.max() - 8.0) + 4.0) / 4.0
    return log_mel.numpy()


class SmartTurnModel:
    """Smart Turn v3 in an onnxruntime session: ``probability(audio)`` that the turn in ``audio`` is complete."""

    def __init__(self, path: str | os.PathLike[str], threads: int = 1) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise TurnModelError("semantic_vad needs onnxruntime: pip install onnxruntime") from e
        self.path = Path(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # the server's CPUs belong to the engine and the sockets
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        try:
            self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise TurnModelError(f"{self.path}: not a loadable ONNX model ({type(e).__name__}: {e})") from e
        inputs = self._session.get_inputs()
        if len(inputs) != 1 or list(inputs[0].shape[1:]) != [_N_MELS, _FRAMES]:
            found = ", ".join(f"{i.name}{i.shape}" for i in inputs)
            raise TurnModelError(f"{self.path}: not a Smart Turn v3 model (inputs {found}; expected one "
                                 f"[batch, {_N_MELS}, {_FRAMES}] log-mel input)")
        self._input = inputs[0].name

    def probability(self, audio_16k: np.ndarray) -> float:
        """P(turn complete) for mono 16 kHz audio ending where the check is made (its last 8 s count)."""
        return self.predict(smart_turn_features(audio_16k))

    def predict(self, features: np.ndarray) -> float:
        """P(turn complete) for ``smart_turn_features``' output."""
        out = self._session.run(None, {self._input: np.asarray(features, dtype=np.float32)[None]})[0]
        return float(np.asarray(out).reshape(-1)[0])


_models: dict[Path, SmartTurnModel] = {}
_models_lock = threading.Lock()


def load_turn_model(source: str | os.PathLike[str] | None = None) -> SmartTurnModel:
    """The process-wide model for ``source`` (see ``resolve_turn_model``), loaded on first use (~50 ms)."""
    path = resolve_turn_model(source).resolve()
    with _models_lock:
        model = _models.get(path)
        if model is None:
            model = _models[path] = SmartTurnModel(path)
            model.probability(np.zeros(VAD_SAMPLE_RATE, dtype=np.float32))  # first run allocates: do it now
        return model


# ----- the turn state machine -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EagernessSetting:
    threshold: float  # Smart Turn's probability at or above which a silence ends the turn
    max_wait_ms: int  # a silence this long ends the turn whatever the model said


# medium's threshold is Smart Turn's own decision boundary (0.5, pipecat's too); high accepts a less certain
# "complete", low needs a surer one. The waits are OpenAI's. docs/turn-detection.md measures what each does.
EAGERNESS: dict[str, EagernessSetting] = {
    "low": EagernessSetting(0.8, 8000),
    "medium": EagernessSetting(0.5, 4000),
    "high": EagernessSetting(0.3, 2000),
}
EAGERNESS["auto"] = EAGERNESS["medium"]


@dataclass
class SemanticVADConfig:
    """``turn_detection: {"type": "semantic_vad", "eagerness": ...}`` and the silero settings under it."""

    eagerness: Eagerness = "auto"
    threshold: float = 0.5  # silero's speech probability threshold, as in server_vad
    prefix_padding_ms: int = 300
    check_silence_ms: int = 200  # silence before the model is asked (pipecat recommends a 200 ms VAD stop)
    model: str | None = None  # see resolve_turn_model: None is the installed pipecat-ai package's copy

    def __post_init__(self) -> None:
        if self.eagerness not in EAGERNESS:
            raise ValueError(f"eagerness must be one of {', '.join(EAGERNESS)}, got {self.eagerness!r}")
        v = self.check_silence_ms
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"check_silence_ms must be a non-negative number of milliseconds, got {v!r}")
        self.vad_config()  # validates threshold and prefix_padding_ms

    @property
    def setting(self) -> EagernessSetting:
        return EAGERNESS[self.eagerness]

    def vad_config(self) -> VADConfig:
        return VADConfig(threshold=self.threshold, prefix_padding_ms=self.prefix_padding_ms,
                         silence_duration_ms=self.check_silence_ms)


@dataclass(frozen=True)
class TurnCheck:
    """One model call: where the silence began, the probability, whether it ended the turn, its cost."""

    silence_ms: int
    probability: float
    complete: bool
    seconds: float


class _Tail:
    """The last ``size`` samples of a stream (a ring buffer); ``end`` counts every sample written."""

    def __init__(self, size: int) -> None:
        self._buf = np.zeros(size, dtype=np.float32)
        self.end = 0

    def write(self, x: np.ndarray) -> None:
        size = self._buf.shape[0]
        self.end += x.shape[0]
        x = x[-size:]
        at = (self.end - x.shape[0]) % size
        first = min(x.shape[0], size - at)
        self._buf[at : at + first] = x[:first]
        self._buf[: x.shape[0] - first] = x[first:]

    def since(self, start: int) -> np.ndarray:
        """A copy of the samples from index ``start`` to the end (as many of them as are kept)."""
        size = self._buf.shape[0]
        n = min(self.end - max(start, 0), size)
        if n <= 0:
            return np.zeros(0, dtype=np.float32)
        at = (self.end - n) % size
        if at + n <= size:
            return self._buf[at : at + n].copy()
        return np.concatenate((self._buf[at:], self._buf[: at + n - size]))

    def clear(self) -> None:
        self._buf[:] = 0.0
        self.end = 0


class SemanticVAD:
    """Semantic end-of-turn on a mono float32 stream at ``sample_rate`` Hz, with ``StreamingVAD``'s interface.

    ``push`` calls the model once per silence of ``check_silence_ms`` inside a turn, so run it off the event loop.
    """

    def __init__(self, config: SemanticVADConfig | None = None, sample_rate: int = 24000,
                 model: SmartTurnModel | None = None) -> None:
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        self.sample_rate = int(sample_rate)
        self.config = config if config is not None else SemanticVADConfig()
        self.model = model if model is not None else load_turn_model(self.config.model)
        # silero on our own 16 kHz copy: the model reads the same samples, on the same clock as the events.
        self._vad = StreamingVAD(self.config.vad_config(), VAD_SAMPLE_RATE)
        self._resampler = StreamResampler(self.sample_rate, VAD_SAMPLE_RATE)
        self._tail = _Tail(MODEL_SAMPLES)
        self._in_samples = 0
        self._turn16: int | None = None  # where the open turn's audio begins (its prefix padding included)
        self._silence16: int | None = None  # while the open turn is paused after a check: where the silence began
        self.last_check: TurnCheck | None = None

    # -- state -----------------------------------------------------------------------------------------------

    @property
    def speaking(self) -> bool:
        """Whether a turn has started and not yet ended (its pauses included)."""
        return self._turn16 is not None

    @property
    def elapsed_ms(self) -> int:
        """Milliseconds of audio pushed since the clock started."""
        return self._in_samples * 1000 // self.sample_rate

    @property
    def last_probability(self) -> float:
        """silero's speech probability for the last 32 ms window."""
        return self._vad.last_probability

    def reset(self, *, restart_clock: bool = False) -> None:
        """Start a new buffer, as ``StreamingVAD.reset``: an open turn is dropped without ``speech_stopped``."""
        self._vad.reset(restart_clock=restart_clock)
        self._resampler.reset()
        if restart_clock:
            self._in_samples = 0
            self._tail.clear()
        self._turn16 = self._silence16 = None

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
        self._vad.config = self.config.vad_config()  # settings changed mid-stream apply from this push
        events: list[VADEvent] = []
        # Window by window, so that a check reads the audio up to its silence, not what the chunk holds after it.
        for i in range(0, x.shape[0], VAD_WINDOW):
            piece = x[i : i + VAD_WINDOW]
            self._tail.write(piece)
            for event in self._vad.push(piece):
                self._on_vad(event, events)
            wait16 = self.config.setting.max_wait_ms * VAD_SAMPLE_RATE // 1000
            if self._silence16 is not None and self._tail.end - self._silence16 >= wait16:
                self._end_turn(self._silence16, events)
        return events

    def _on_vad(self, event: VADEvent, events: list[VADEvent]) -> None:
        at16 = event.audio_ms * VAD_SAMPLE_RATE // 1000
        if event.kind == "speech_started":
            if self._turn16 is None:
                self._turn16 = at16
                events.append(event)
            self._silence16 = None  # speech again within the wait: the same turn goes on
            return
        if self._turn16 is None:  # cannot happen: silero stops only speech it started
            return
        started = time.perf_counter()
        p = self.model.probability(self._tail.since(self._turn16))
        complete = p >= self.config.setting.threshold
        self.last_check = TurnCheck(event.audio_ms, p, complete, time.perf_counter() - started)
        if complete:
            self._end_turn(at16, events)
        else:
            self._silence16 = at16

    def _end_turn(self, silence16: int, events: list[VADEvent]) -> None:
        events.append(VADEvent("speech_stopped", silence16 * 1000 // VAD_SAMPLE_RATE))
        self._turn16 = self._silence16 = None


def turn_detector(td: dict, sample_rate: int, model: SmartTurnModel | None = None) -> StreamingVAD | SemanticVAD:
    """The detector for a session's ``turn_detection`` (OpenAI's object, ``type`` and its settings; missing
    settings take their defaults): ``StreamingVAD`` for ``server_vad``, ``SemanticVAD`` for ``semantic_vad``."""
    silero = {k: td[k] for k in ("threshold", "prefix_padding_ms") if td.get(k) is not None}
    if td.get("type") == "semantic_vad":
        return SemanticVAD(SemanticVADConfig(eagerness=td.get("eagerness") or "auto", **silero), sample_rate, model)
    if td.get("silence_duration_ms") is not None:
        silero["silence_duration_ms"] = td["silence_duration_ms"]
    return StreamingVAD(VADConfig(**silero), sample_rate)
