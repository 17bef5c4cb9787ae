"""The test oracle: one response of Chroma 1.0, frame by frame, written literally from the spec.

A plain, unbatched, uncompiled implementation of the published loop (reasoner prefill, the 1:2 schedule,
the decoder once per frame, end of text, end of audio). The engine's stepper is checked against it; it is
not used by the package. Sampling here draws with a ``torch.Generator`` (the engine's counter-based sampler
draws differently), so compare it with the engine on greedy decoding.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from openchroma.engine.sampling import SamplingParams
from openchroma.models.chroma import ChromaModel
from openchroma.voice import VoicePrompt


@dataclass
class Frame:
    """One generated 80 ms frame: its codes and the text token that entered the backbone with it (if any)."""

    index: int
    codes: torch.Tensor
    text_token: int | None = None


@dataclass
class GenerationResult:
    text_tokens: list[int]
    codes: torch.Tensor
    prefill_logits: torch.Tensor
    stop_reason: str
    audio: torch.Tensor | None = None
    timings: dict[str, float] = field(default_factory=dict)


class Generation:
    """A response in progress. Iterate to get frames; ``text_tokens`` and ``stop_reason`` fill as it goes.

    ``stop_reason``: ``"eos"`` (the model ended the audio), ``"length"`` (frame limit) or
    ``"cancelled"`` (``cancel()`` was called).
    """

    def __init__(
        self,
        model: ChromaModel,
        input_ids: torch.Tensor | Sequence[int],
        voice: VoicePrompt,
        input_features: torch.Tensor | None = None,
        max_new_frames: int = 750,
        sampling: SamplingParams | None = None,
        forced_text_tokens: Sequence[int] | None = None,
        audio_embeds: torch.Tensor | None = None,
    ):
        if max_new_frames < 1:
            raise ValueError(f"max_new_frames must be >= 1, got {max_new_frames}")
        self.model = model
        self.cfg = model.cfg
        self.sampling = sampling or SamplingParams()
        self.max_new_frames = max_new_frames
        p = model.audio_embedding.weight
        self.device, self.dtype = p.device, p.dtype
        self.input_ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device).reshape(1, -1)
        self.voice = voice
        self.input_features = input_features
        self.audio_embeds = audio_embeds
        self.forced = None
        if forced_text_tokens is not None:
            forced = [int(t) for t in forced_text_tokens]
            if not forced or forced[-1] != self.cfg.im_end_token_id:
                forced.append(self.cfg.im_end_token_id)
            self.forced = forced
        self.text_tokens: list[int] = []
        self.codes: list[torch.Tensor] = []
        self.prefill_logits: torch.Tensor | None = None
        self.stop_reason: str | None = None
        self._cancelled = False
        self._gen = None
        if self.sampling.temperature > 0 and self.sampling.seed is not None:
            self._gen = torch.Generator(device=self.device).manual_seed(self.sampling.seed)

    def cancel(self) -> None:
        """Stop before the next frame."""
        self._cancelled = True

    # ----- pieces ----------------------------------------------------------------------------------
    def _sample_code(self, logits: torch.Tensor, codebook: int) -> torch.Tensor:
        logits = mask_undecodable(logits.float(), self.cfg.codebook_size)
        s = self.sampling
        return sample_logits(logits, s.temperature, s.top_k, s.top_p, self._gen)

    def _next_text(self, hidden: torch.Tensor) -> int:
        if self.forced is not None:
            return self.forced[len(self.text_tokens)]
        return int(self.model.reasoner_logits(hidden).argmax(-1))

    def __iter__(self) -> Iterator[Frame]:
        with torch.inference_mode():
            yield from self._run()

    def _run(self) -> Iterator[Frame]:
        m, cfg, dev = self.model, self.cfg, self.device
        n_prompt = self.input_ids.shape[1]
        max_text = self.max_new_frames // 2 + 2
        audio_embeds = self.audio_embeds
        if audio_embeds is None and self.input_features is not None:
            mel = self.input_features.to(dev).reshape(self.input_features.shape[-2], -1)
            audio_embeds = m.thinker.audio_tower(mel)

        # Reasoner prefill.
        thinker_cache = m.thinker.model.new_cache(1, n_prompt + max_text)
        x = m.thinker.embed(self.input_ids, audio_embeds)
        pos = torch.arange(n_prompt, device=dev)[None]
        h_last = m.thinker.model(x, pos, thinker_cache, kv_len=n_prompt)[:, -1]
        self.prefill_logits = m.reasoner_logits(h_last)[0].float()
        thinker_pos = n_prompt
        token = self._next_text(h_last)
        self.text_tokens.append(token)
        text_done = token == cfg.im_end_token_id

        # Backbone prompt: voice, then the first text pair.
        voice = m.voice_prompt_embeds(self.voice.text_ids.to(dev), self.voice.codes.to(dev)).to(self.dtype)
        first = torch.cat([voice, h_last.to(self.dtype), m.text_embedding(torch.tensor([token], device=dev))])
        n_first = first.shape[0]
        bb_len = n_first + self.max_new_frames * 3
        bb_cache = m.backbone.model.new_cache(1, bb_len)
        dec_cache = m.decoder.model.new_cache(1, cfg.audio_num_codebooks)
        bb_pos = 0

        def backbone_step(inp: torch.Tensor) -> torch.Tensor:
            nonlocal bb_pos
            n = inp.shape[0]
            p = torch.arange(bb_pos, bb_pos + n, device=dev)[None]
            bb_pos += n
            return m.backbone.model(inp[None], p, bb_cache, kv_len=bb_pos)[:, -1]

        hidden = backbone_step(first)
        new_text: int | None = token
        for step in range(self.max_new_frames):
            if self._cancelled:
                self.stop_reason = "cancelled"
                return
            if step > 0:
                inp = [m.frame_embedding(self.codes[-1].to(dev))[None]]
                if step % 2 == 0 and not text_done:
                    # The reasoner consumes its last token; its new hidden state and next token form the pair.
                    e = m.thinker.model.embed_tokens(torch.tensor([[token]], device=dev))
                    h_last = m.thinker.model(e, torch.tensor([[thinker_pos]], device=dev), thinker_cache,
                                             kv_len=thinker_pos + 1)[:, -1]
                    thinker_pos += 1
                    token = self._next_text(h_last)
                    self.text_tokens.append(token)
                    text_done = token == cfg.im_end_token_id
                    new_text = token
                    inp += [h_last.to(self.dtype), m.text_embedding(torch.tensor([token], device=dev))]
                hidden = backbone_step(torch.cat(inp))
            c0 = self._sample_code(m.codebook0_logits(hidden), 0)
            codes = m.decode_frame(hidden, c0, dec_cache, self._sample_code)[0]
            if bool((codes[: cfg.audio_num_codebooks - 1] == cfg.codebook_eos_token_id).all()):
                self.stop_reason = "eos"
                return
            self.codes.append(codes)
            yield Frame(step, codes, new_text)
            new_text = None
        self.stop_reason = "length"

    def result(self) -> GenerationResult:
        codes = torch.stack(self.codes).cpu() if self.codes else torch.zeros(0, self.cfg.audio_num_codebooks,
                                                                             dtype=torch.long)
        return GenerationResult(list(self.text_tokens), codes, self.prefill_logits, self.stop_reason or "")


def mask_undecodable(logits: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Codes at or above the codec's codebook size cannot be decoded: never produce them."""
    logits[..., codebook_size:] = float("-inf")
    return logits


def sample_logits(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Greedy when ``temperature <= 0``; else temperature, top-k and top-p (nucleus) sampling. ``[B, V] -> [B]``."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
