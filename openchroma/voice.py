"""A cloned voice: the reference recording's Mimi codes and its transcript's token ids."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .models.chroma import ChromaModel

MAX_VOICE_SECONDS = 30.0


@dataclass
class VoicePrompt:
    """A cloned voice: the transcript's token ids and the reference audio's Mimi codes ``[frames, K]``."""

    text_ids: torch.Tensor
    codes: torch.Tensor

    @property
    def backbone_length(self) -> int:
        """Backbone positions of its prompt: text start, transcript, text end, one per frame, the zero vector."""
        return self.text_ids.numel() + self.codes.shape[0] + 3


@torch.inference_mode()
def encode_voice(model: ChromaModel, audio_24k: torch.Tensor, text_ids: Sequence[int] | torch.Tensor) -> VoicePrompt:
    """Mimi-encode reference audio (24 kHz, 1-D) and keep the first K codebooks."""
    p = next(model.codec_model.parameters())
    codes = model.codec_model.encode(audio_24k.to(p.device, p.dtype).reshape(1, -1))
    codes = codes[0, : model.cfg.audio_num_codebooks].T
    return VoicePrompt(torch.as_tensor(text_ids, dtype=torch.long).reshape(-1).cpu(), codes.cpu())
