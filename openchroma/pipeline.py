"""The simple, whole-response Python API: load once, clone a voice, chat or speak.

    from openchroma import Chroma
    chroma = Chroma.from_pretrained("FlashLabs/Chroma-4B")          # or a local directory
    voice = chroma.voice("reference.wav", "What the reference says.")
    reply = chroma.chat(audio="question.wav", voice=voice)
    reply.text, reply.audio                                           # str, 24 kHz float tensor

The streaming, multi-session engine (``openchroma.engine``) is built on the same pieces.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .audio import load_audio, log_mel_features
from .config import response_frame_limit
from .constants import REASONER_SAMPLE_RATE
from .engine.generate import GenerationResult, ResponseRunner
from .engine.sampling import SamplingParams
from .engine.schedule import DEFAULT_MAX_FRAMES
from .loading import LoadedModel, load
from .models.audio_encoder import audio_token_count
from .tokenizer import QWEN_OMNI_SYSTEM_PROMPT, ChatTokenizer, build_chat_prompt, system_message, text_message
from .voice import MAX_VOICE_SECONDS, VoicePrompt, encode_voice

DEFAULT_SYSTEM_PROMPT = QWEN_OMNI_SYSTEM_PROMPT

__all__ = ["Chroma", "Reply", "save_wav", "DEFAULT_SYSTEM_PROMPT", "MAX_VOICE_SECONDS"]


@dataclass
class Reply:
    text: str
    audio: torch.Tensor
    sample_rate: int
    result: GenerationResult


class Chroma:
    """A loaded Chroma model with its tokenizer."""

    def __init__(self, lm: LoadedModel, tokenizer: ChatTokenizer, max_frames: int | None = None):
        """``max_frames``: the default limit of a reply (80 ms frames): 750 (60 s), or 50 (4 s) for a random-weight
        checkpoint from init-random, which speaks noise."""
        self.lm = lm
        self.model = lm.model
        self.config = lm.config
        self.tokenizer = tokenizer
        self.max_frames = response_frame_limit(lm.path, max_frames, DEFAULT_MAX_FRAMES)
        self._runner: ResponseRunner | None = None

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str = "float32",
        progress: bool = True,
        max_frames: int | None = None,
        quantize: str | None = None,
    ) -> Chroma:
        """Load a checkpoint (a directory or a hub id). ``max_frames``: the default reply limit (see ``Chroma``);
        ``quantize``: ``int8``, ``int4`` or ``fp8`` weights (see :func:`openchroma.loading.load`)."""
        lm = load(model, device=device, dtype=dtype, progress=progress, quantize=quantize)
        return cls(lm, ChatTokenizer.from_dir(lm.path), max_frames=max_frames)

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    def voice(self, audio, transcript: str, sample_rate: int | None = None) -> VoicePrompt:
        """Clone a voice from reference audio (path, bytes or array) and its transcript."""
        if not transcript or not transcript.strip():
            raise ValueError("the voice's transcript is empty: give the words spoken in the reference audio")
        wav = load_audio(audio, self.sample_rate, source_rate=sample_rate, max_seconds=MAX_VOICE_SECONDS)
        return encode_voice(self.model, wav, self.tokenizer.encode(transcript))

    def prompt_ids(
        self, messages: list[dict], audio_features: Sequence[torch.Tensor] = ()
    ) -> list[int]:
        counts = [audio_token_count(f.shape[-1]) for f in audio_features]
        return build_chat_prompt(self.tokenizer, messages, counts)

    def user_features(self, audio, sample_rate: int | None = None) -> torch.Tensor:
        """128-bin log-mel features of the user's audio (16 kHz Whisper features)."""
        wav = load_audio(audio, REASONER_SAMPLE_RATE, source_rate=sample_rate)
        return log_mel_features(wav)

    def chat(
        self,
        voice: VoicePrompt,
        audio=None,
        text: str | None = None,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        sample_rate: int | None = None,
        max_new_frames: int | None = None,
        sampling: SamplingParams | None = None,
    ) -> Reply:
        """Answer one user turn (audio and/or text) in the given voice; at most ``max_new_frames`` frames
        (default: ``self.max_frames``)."""
        if audio is None and not text:
            raise ValueError("give the user's audio or text")
        content: list[dict] = []
        feats = None
        if audio is not None:
            feats = self.user_features(audio, sample_rate)
            content.append({"type": "audio"})
        if text:
            content.append({"type": "text", "text": text})
        messages = [system_message(system_prompt), {"role": "user", "content": content}]
        ids = self.prompt_ids(messages, [feats] if feats is not None else [])
        dev, dtype = self.lm.device, self.lm.dtype
        result = self._run(ids, voice, None if feats is None else feats.to(dev, dtype), max_new_frames, sampling)
        return self._reply(result)

    def speak(
        self,
        text: str,
        voice: VoicePrompt,
        max_new_frames: int | None = None,
        sampling: SamplingParams | None = None,
    ) -> Reply:
        """Say ``text`` in the given voice (the forced-text path: the reasoner's tokens are these)."""
        if not text or not text.strip():
            raise ValueError("nothing to say: the text is empty")
        tokens = self.tokenizer.encode(text)
        messages = [system_message(), text_message("user", text)]
        ids = self.prompt_ids(messages)
        result = self._run(ids, voice, None, max_new_frames, sampling, forced=tokens)
        return self._reply(result)

    def _run(self, ids: list[int], voice: VoicePrompt, feats: torch.Tensor | None, max_new_frames: int | None,
             sampling: SamplingParams | None, forced: list[int] | None = None) -> GenerationResult:
        """One response through the engine's one-slot stepper, kept while it is large enough (its graphs too)."""
        max_new_frames = self.max_frames if max_new_frames is None else max_new_frames
        voice_len = voice.backbone_length
        if self._runner is None or not self._runner.fits(len(ids), voice_len, max_new_frames):
            self._runner = ResponseRunner.for_call(self.model, max(len(ids), 512), max(voice_len, 400),
                                                   max(max_new_frames, DEFAULT_MAX_FRAMES))
        return self._runner.run(ids, voice, feats, max_new_frames, sampling, forced)

    def _reply(self, result: GenerationResult) -> Reply:
        tokens = [t for t in result.text_tokens if t != self.config.im_end_token_id]
        return Reply(self.tokenizer.decode(tokens), result.audio, self.sample_rate, result)


def save_wav(path: str | Path, audio: torch.Tensor, sample_rate: int) -> None:
    import soundfile as sf

    sf.write(str(path), audio.detach().float().cpu().numpy(), sample_rate, subtype="PCM_16")
