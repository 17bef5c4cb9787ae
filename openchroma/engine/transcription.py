"""Transcription jobs: the Reasoner's greedy transcript of user audio, made in background slices of the lowest
priority (one audio window, one prefill chunk or one token each) on a cache row of its own."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..tokenizer import ENDOFTEXT_ID, PromptBuilder, system_message
from .events import ContextFull, EngineError, Transcription
from .turn_audio import PendingAudio

# What the reasoner is asked to transcribe user audio (Qwen2.5-Omni transcribes when asked like this).
ASR_MESSAGES = [
    system_message("You are a speech recognition model."),
    {"role": "user", "content": [{"type": "audio"},
                                 {"type": "text", "text": "Transcribe the audio into text, exactly as spoken."}]},
]
#: Audio tokens per second of user audio (the audio tower's 25 Hz output).
AUDIO_TOKENS_PER_SECOND = 25.0


def asr_max_tokens(seconds: float, asked: int | None) -> int:
    if asked is not None:
        if asked < 1:
            raise EngineError(f"max_tokens must be >= 1, got {asked}")
        return asked
    return int(seconds * 8) + 16   # speech is about 3 words a second; generous for tokens and languages


@dataclass(eq=False)
class AsrJob:
    out: Transcription
    audio: torch.Tensor | PendingAudio
    max_tokens: int
    ids: list[int] | None = None
    embeds: torch.Tensor | None = None
    done: int = 0


class Transcriber:
    """The queue of transcriptions and the cache row they share; ``slice`` does one piece of the oldest."""

    def __init__(self, model, builder: PromptBuilder, max_context: int, device: torch.device, dtype: torch.dtype,
                 prefill_chunk: int):
        self.model, self.builder, self.max_context = model, builder, max_context
        self.device, self.dtype, self.prefill_chunk = device, dtype, prefill_chunk
        self.jobs: list[AsrJob] = []
        self._cache = None

    def add(self, job: AsrJob) -> Transcription:
        self.jobs.append(job)
        return job.out

    def slice(self) -> None:
        """One piece of the oldest transcription: an audio window, a prefill chunk, or one token."""
        job = self.jobs[0]
        try:
            if isinstance(job.audio, PendingAudio):
                if job.audio.embeds is None:
                    job.audio.encode_slice(self.model.thinker.audio_tower)
                    return
                job.audio = job.audio.embeds
            if job.embeds is None:
                self._prepare(job)
            tm = self.model.thinker.model
            if job.done < job.embeds.shape[0]:
                n = min(self.prefill_chunk, job.embeds.shape[0] - job.done)
                pos = torch.arange(job.done, job.done + n, device=self.device)[None]
                h = tm(job.embeds[None, job.done:job.done + n], pos, self._cache, kv_len=job.done + n)[0, -1]
                job.done += n
                if job.done < job.embeds.shape[0]:
                    return
            else:
                pos = len(job.ids) + len(job.out.tokens) - 1
                x = tm.embed_tokens(torch.tensor([[job.out.tokens[-1]]], device=self.device))
                h = tm(x, torch.tensor([[pos]], device=self.device), self._cache, kv_len=pos + 1)[0, -1]
            token = int(self.model.reasoner_logits(h).argmax(-1))
            if token in (self.model.cfg.im_end_token_id, ENDOFTEXT_ID):
                return self.end(job)
            job.out.push(token)
            if len(job.out.tokens) >= job.max_tokens:
                self.end(job)
        except Exception as e:
            self.end(job, f"{type(e).__name__}: {e}")

    def _prepare(self, job: AsrJob) -> None:
        job.ids = self.builder.build(ASR_MESSAGES, [job.audio.shape[0]])
        if len(job.ids) + 1 > self.max_context:
            raise ContextFull(f"the audio is too long to transcribe within the {self.max_context}-token context")
        job.max_tokens = min(job.max_tokens, self.max_context - len(job.ids))
        ids = torch.tensor(job.ids, device=self.device)[None]
        job.embeds = self.model.thinker.embed(ids, job.audio.to(self.dtype))[0]
        if self._cache is None:
            self._cache = self.model.thinker.model.new_cache(1, self.max_context)

    def end(self, job: AsrJob, error: str | None = None) -> None:
        self.jobs.remove(job)
        job.out.finish(error)
