"""The engine's voices: each cloned once into its backbone prompt and, cached, the backbone's keys and values
over it, which every response in that voice copies instead of recomputing."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..voice import MAX_TRANSCRIPT_TOKENS, VoicePrompt, voice_prompt_length
from .events import EngineError, UnknownVoice
from .schedule import frames_for_seconds


@dataclass
class Voice:
    name: str
    transcript: str
    prompt: VoicePrompt
    embeds: torch.Tensor                     # [P, H] backbone prompt vectors
    kv: tuple[torch.Tensor, torch.Tensor] | None = None   # cached backbone keys/values over the prompt

    @property
    def length(self) -> int:
        return self.prompt.backbone_length


def max_voice_length(max_voice_seconds: float) -> int:
    """Backbone positions the longest voice prompt the engine accepts takes (its caches reserve them)."""
    return voice_prompt_length(MAX_TRANSCRIPT_TOKENS, frames_for_seconds(max_voice_seconds))


class VoiceRegistry(dict[str, Voice]):
    """Voices by name (a dict the worker changes between frames), and building them off the worker."""

    def __init__(self, model, dtype: torch.dtype, max_seconds: float, cache: bool = True):
        super().__init__()
        self.model, self.dtype, self.cache = model, dtype, cache
        self.max_frames = frames_for_seconds(max_seconds)

    def unknown(self, name: str | None) -> UnknownVoice:
        if name is None:
            return UnknownVoice("no voice chosen for this session: register one and select it first")
        return UnknownVoice(f"unknown voice {name!r} (registered: {', '.join(sorted(self)) or 'none'})")

    def require(self, name: str | None) -> Voice:
        voice = self.get(name) if name is not None else None
        if voice is None:
            raise self.unknown(name)
        return voice

    def check(self, prompt: VoicePrompt) -> None:
        """Refuse a prompt longer than the caches reserve for a voice."""
        n = prompt.text_ids.numel()
        if n > MAX_TRANSCRIPT_TOKENS:
            raise EngineError(f"the voice's transcript is {n} tokens long; the limit is {MAX_TRANSCRIPT_TOKENS} "
                              "(use a shorter reference and what it says)")
        if prompt.codes.shape[0] > self.max_frames:
            raise EngineError(f"the voice's reference is {prompt.codes.shape[0]} frames long; the limit is "
                              f"{self.max_frames}")

    @torch.inference_mode()
    def build(self, name: str, prompt: VoicePrompt, transcript: str) -> Voice:
        """The voice's backbone prompt and, cached, its keys/values: computed in the caller's thread on a cache
        of its own, so registering a voice never stalls the frame loop."""
        self.check(prompt)
        embeds = self.model.voice_prompt_embeds(prompt.text_ids, prompt.codes).to(self.dtype)
        assert embeds.shape[0] == prompt.backbone_length
        voice = Voice(name, transcript, prompt, embeds)
        if self.cache:
            bb = self.model.backbone.model
            cache = bb.new_cache(1, embeds.shape[0])
            bb(embeds[None], torch.arange(embeds.shape[0], device=embeds.device)[None], cache)
            voice.kv = (cache.k[:, 0], cache.v[:, 0])
        return voice

    def insert(self, voice: Voice) -> Voice:
        self[voice.name] = voice
        return voice
