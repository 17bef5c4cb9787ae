"""Intelligibility (WER): speech recognition of the output, scored against the reference text.

Backends, chosen with ``--asr-model``:

* ``whisper`` (the default when its weights load): Whisper-large-v3 (``openai/whisper-large-v3``) through
  ``transformers``, English, as seed-tts-eval does; any other Whisper model id or local directory can be named.
* ``pocketsphinx``: CMU PocketSphinx with the US-English acoustic and language models that ship inside its wheel,
  so it works offline. Much weaker than Whisper: its WER is only comparable with itself.
* ``auto``: ``whisper`` if its weights can be loaded, else ``pocketsphinx`` (the report names the one used).

Both the reference and the transcript go through Whisper's English text normaliser before ``jiwer`` counts
word errors, so punctuation, case and number spelling do not count as errors.
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import Protocol

import numpy as np

from ..audio import float_to_pcm16
from .models import ScoringModelUnavailable, load_pretrained, warn

ASR_RATE = 16000
DEFAULT_WHISPER = "openai/whisper-large-v3"
WHISPER_WINDOW_SECONDS = 30


class Recognizer(Protocol):
    name: str

    def transcribe(self, audio_16k: np.ndarray) -> str: ...


class WhisperRecognizer:
    def __init__(self, model_id: str = DEFAULT_WHISPER, device: str = "cpu"):
        import torch
        from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor

        self.torch = torch
        self.device = device
        self.processor = load_pretrained(AutoProcessor, model_id)
        self.model = load_pretrained(AutoModelForSpeechSeq2Seq, model_id).to(device).eval()
        self.spelling = getattr(getattr(self.processor, "tokenizer", None), "english_spelling_normalizer", None) or {}
        self.name = f"whisper ({model_id}, transformers)"

    def transcribe(self, audio_16k: np.ndarray) -> str:
        # Whisper hears 30 s at a time: longer outputs are transcribed in consecutive 30 s windows (a word cut at
        # a window edge may be misheard; seed-tts-eval's utterances are far shorter).
        audio = np.asarray(audio_16k, dtype=np.float32)
        window = WHISPER_WINDOW_SECONDS * ASR_RATE
        texts = []
        for start in range(0, max(1, audio.size), window):
            inputs = self.processor(audio[start:start + window], sampling_rate=ASR_RATE, return_tensors="pt")
            features = inputs.input_features.to(self.device, self.model.dtype)
            with self.torch.inference_mode():
                ids = self.model.generate(features, language="en", task="transcribe")
            texts.append(self.processor.batch_decode(ids, skip_special_tokens=True)[0].strip())
        return " ".join(t for t in texts if t)


class PocketSphinxRecognizer:
    def __init__(self) -> None:
        try:
            from pocketsphinx import Decoder
        except ImportError as e:
            raise ScoringModelUnavailable(f"pocketsphinx is not installed (pip install 'openchroma[eval]'): {e}") from e
        # The default configuration is the en-US model shipped in the wheel; logfn keeps its log off the terminal.
        self.decoder = Decoder(samprate=ASR_RATE, logfn=os.devnull)
        self.spelling: dict[str, str] = {}
        self.name = f"pocketsphinx {importlib.metadata.version('pocketsphinx')} (en-us model shipped in the package)"

    def transcribe(self, audio_16k: np.ndarray) -> str:
        pcm = float_to_pcm16(np.asarray(audio_16k, dtype=np.float32))
        self.decoder.start_utt()
        self.decoder.process_raw(pcm, full_utt=True)
        self.decoder.end_utt()
        hyp = self.decoder.hyp()
        return hyp.hypstr.strip() if hyp is not None else ""


def load_recognizer(name: str = "auto", device: str = "cpu") -> Recognizer:
    """``auto``, ``whisper``, ``pocketsphinx``, or a transformers Whisper model id / directory."""
    if name == "pocketsphinx":
        return PocketSphinxRecognizer()
    model_id = DEFAULT_WHISPER if name in ("auto", "whisper") else name
    try:
        return WhisperRecognizer(model_id, device)
    except ScoringModelUnavailable as e:
        if name != "auto":
            raise
        warn(f"ASR: {e}; falling back to pocketsphinx")
        return PocketSphinxRecognizer()


class WerScorer:
    """Whisper's English normaliser, then jiwer's word error rate."""

    def __init__(self, spelling: dict[str, str] | None = None):
        from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

        self.normalize = EnglishTextNormalizer(spelling or {})

    def __call__(self, reference: str, hypothesis: str) -> float | None:
        """Word error rate of ``hypothesis`` against ``reference``; None when the reference has no words."""
        import jiwer

        ref = self.normalize(reference).split()
        hyp = self.normalize(hypothesis).split()
        if not ref:
            return None
        if not hyp:
            return 1.0
        return float(jiwer.wer(" ".join(ref), " ".join(hyp)))
