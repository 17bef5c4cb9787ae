"""Speaker similarity (SIM): cosine similarity of speaker-verification embeddings.

Backends, chosen with ``--sim-model``:

* ``wavlm`` (the default when its weights load): WavLM fine-tuned for speaker verification through
  ``transformers`` (``WavLMForXVector``), by default ``microsoft/wavlm-base-plus-sv``; any other x-vector model id or
  local directory can be named instead.
* ``resemblyzer``: the GE2E speaker encoder whose weights ship inside the ``resemblyzer`` package, so it works
  offline.
* ``auto``: ``wavlm`` if its weights can be loaded, else ``resemblyzer`` (the report names the one used).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
import types
from typing import Protocol

import numpy as np

from .models import ScoringModelUnavailable, load_pretrained, warn

SIM_RATE = 16000
DEFAULT_WAVLM = "microsoft/wavlm-base-plus-sv"


class SpeakerEmbedder(Protocol):
    name: str

    def embed(self, audio_16k: np.ndarray) -> np.ndarray: ...


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / max(1e-12, np.linalg.norm(a) * np.linalg.norm(b)))


class WavLMEmbedder:
    def __init__(self, model_id: str = DEFAULT_WAVLM, device: str = "cpu"):
        import torch
        from transformers import AutoFeatureExtractor, WavLMForXVector

        self.torch = torch
        self.device = device
        self.features = load_pretrained(AutoFeatureExtractor, model_id)
        self.model = load_pretrained(WavLMForXVector, model_id).to(device).eval()
        self.name = f"wavlm-sv ({model_id}, transformers)"

    def embed(self, audio_16k: np.ndarray) -> np.ndarray:
        inputs = self.features(audio_16k, sampling_rate=SIM_RATE, return_tensors="pt", padding=True)
        with self.torch.inference_mode():
            out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        return out.embeddings[0].float().cpu().numpy()


def _import_resemblyzer():
    """Import resemblyzer, tolerating webrtcvad's ``import pkg_resources`` on setuptools >= 81 (which dropped
    it): webrtcvad only asks it for its own version string, so a stand-in answering from importlib.metadata is
    enough, and it is removed again right after the import."""
    try:
        return importlib.import_module("resemblyzer")
    except ModuleNotFoundError as e:
        if e.name != "pkg_resources":
            raise
    stand_in = types.ModuleType("pkg_resources")
    stand_in.get_distribution = lambda dist: types.SimpleNamespace(version=importlib.metadata.version(dist))
    sys.modules["pkg_resources"] = stand_in
    try:
        for mod in [m for m in sys.modules if m == "resemblyzer" or m.startswith("resemblyzer.") or m == "webrtcvad"]:
            del sys.modules[mod]
        return importlib.import_module("resemblyzer")
    finally:
        if sys.modules.get("pkg_resources") is stand_in:
            del sys.modules["pkg_resources"]


class ResemblyzerEmbedder:
    def __init__(self, device: str = "cpu"):
        try:
            resemblyzer = _import_resemblyzer()
        except ImportError as e:
            raise ScoringModelUnavailable(f"resemblyzer is not installed (pip install 'openchroma[eval]'): {e}") from e
        self._preprocess = resemblyzer.preprocess_wav
        self.encoder = resemblyzer.VoiceEncoder(device, verbose=False)
        self.name = f"resemblyzer {importlib.metadata.version('resemblyzer')} (GE2E, weights shipped in the package)"

    def embed(self, audio_16k: np.ndarray) -> np.ndarray:
        # preprocess_wav normalises loudness and shortens long silences, as the encoder was trained with.
        audio = np.asarray(audio_16k, dtype=np.float32)
        if audio.size == 0:
            raise ValueError("empty audio")
        wav = self._preprocess(audio, source_sr=SIM_RATE)
        if wav.size < SIM_RATE // 10:
            # Its VAD found (almost) no speech, e.g. in a random-weight model's noise: embed the clip as it is.
            wav = audio
        return self.encoder.embed_utterance(wav)


def load_speaker_model(name: str = "auto", device: str = "cpu") -> SpeakerEmbedder:
    """``auto``, ``wavlm``, ``resemblyzer``, or a transformers x-vector model id / directory."""
    if name == "resemblyzer":
        return ResemblyzerEmbedder(device)
    model_id = DEFAULT_WAVLM if name in ("auto", "wavlm") else name
    try:
        return WavLMEmbedder(model_id, device)
    except ScoringModelUnavailable as e:
        if name != "auto":
            raise
        warn(f"SIM: {e}; falling back to resemblyzer")
        return ResemblyzerEmbedder(device)
