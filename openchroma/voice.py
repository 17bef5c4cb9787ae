"""A cloned voice: the reference recording's Mimi codes and its transcript's token ids."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .models.chroma import ChromaModel

MAX_VOICE_SECONDS = 30.0
#: The longest transcript a voice may have, in Reasoner tokens: what the engine reserves for it in its caches.
MAX_TRANSCRIPT_TOKENS = 256


def voice_prompt_length(transcript_tokens: int, frames: int) -> int:
    """Backbone positions of a voice prompt: text start, the transcript, text end, one per frame, the zero
    vector (``ChromaModel.voice_prompt_embeds``)."""
    return transcript_tokens + frames + 3


@dataclass
class VoicePrompt:
    """A cloned voice: the transcript's token ids and the reference audio's Mimi codes ``[frames, K]``."""

    text_ids: torch.Tensor
    codes: torch.Tensor

    @property
    def backbone_length(self) -> int:
        """Backbone positions of its prompt (``voice_prompt_length``)."""
        return voice_prompt_length(self.text_ids.numel(), self.codes.shape[0])


@torch.inference_mode()
def encode_voice(model: ChromaModel, audio_24k: torch.Tensor, text_ids: Sequence[int] | torch.Tensor) -> VoicePrompt:
    """Mimi-encode reference audio (24 kHz, 1-D) and keep the first K codebooks."""
    p = next(model.codec_model.parameters())
    codes = model.codec_model.encode(audio_24k.to(p.device, p.dtype).reshape(1, -1))
    codes = codes[0, : model.cfg.audio_num_codebooks].T
    return VoicePrompt(torch.as_tensor(text_ids, dtype=torch.long).reshape(-1).cpu(), codes.cpu())
