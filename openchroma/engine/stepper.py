"""The engine's hot path: every generating session advanced by one 80 ms frame per step, batched.

Each session owns a slot: a row of the reasoner's, backbone's and decoder's KV caches and of the
Mimi decoder state, all allocated once. A step runs, for all slots at once: one reasoner forward
(the text runs ahead of the audio by ``lookahead`` tokens, so a frame never waits for text), one
backbone forward (1 to 3 new vectors per row; shorter rows write their padding to a scratch cache
slot nobody attends to), the decoder loop, and one Mimi frame decode. The host reads everything it
needs in a single transfer at the end of the step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from ..generation import SamplingParams
from ..models.chroma import ChromaModel, mask_undecodable, sample_logits
from ..models.transformer import KVCache


class RowCache:
    """A view of some rows of a KVCache (shares its storage)."""

    def __init__(self, cache: KVCache, start: int, stop: int):
        self.k = cache.k[:, start:stop]
        self.v = cache.v[:, start:stop]
        self.max_len = cache.max_len
        self.batch_size = stop - start


@dataclass
class Row:
    """Host-side state of one response in progress."""

    slot: int
    sampling: SamplingParams
    max_frames: int
    forced: list[int] | None
    thinker_pos: int              # next reasoner position (its cache holds the context before it)
    bb_pos: int                   # next backbone position
    pending: list                 # backbone vectors to feed at the next step (device tensors [H])
    pending_token: int | None     # the text token of the pair in `pending` (emitted with the frame)
    last_token: int               # the reasoner's last emitted token, not yet consumed by it
    text_done: bool               # the reasoner has emitted im_end
    fed_done: bool                # the im_end pair has entered the backbone
    emitted: int = 0              # tokens emitted by the reasoner so far
    queue: deque = field(default_factory=deque)   # (hidden [H] tensor, token tensor or int) ready pairs
    spoken_tokens: list[int] = field(default_factory=list)
    step: int = 0
    prompt_len: int = 0           # reasoner positions before the response
    tokens: list[int] = field(default_factory=list)   # every token the reasoner emitted, in order (host)
    cancelled: bool = False
    finished: str | None = None
    generator: torch.Generator | None = None


@dataclass
class StepOutput:
    slot: int
    codes: torch.Tensor | None     # [K] (cpu) or None when the row ended this step
    audio: torch.Tensor | None     # [frame_samples] float32 cpu
    text_token: int | None         # the text token that entered the backbone with this frame
    finished: str | None           # stop reason when the row ended


class BatchStepper:
    def __init__(
        self,
        model: ChromaModel,
        slots: int,
        thinker_len: int,
        backbone_len: int,
        lookahead: int = 2,
    ):
        self.model = model
        self.cfg = model.cfg
        self.slots = slots
        p = model.audio_embedding.weight
        self.device, self.dtype = p.device, p.dtype
        k = self.cfg.audio_num_codebooks
        # One extra cache slot at the end of each row: the scratch slot padding entries write to.
        self.thinker_cache = model.thinker.model.new_cache(slots, thinker_len + 1)
        self.backbone_cache = model.backbone.model.new_cache(slots, backbone_len + 1)
        self.decoder_cache = model.decoder.model.new_cache(slots, k)
        self.thinker_scratch = thinker_len
        self.backbone_scratch = backbone_len
        self.thinker_len = thinker_len
        self.backbone_len = backbone_len
        codec = model.codec_model
        self.mimi_state = codec.decoder_state(slots)
        self.lookahead = lookahead
        self.rows: dict[int, Row] = {}
        self.last_codes = torch.zeros(slots, k, dtype=torch.long, device=self.device)
        self.frame_samples = self.cfg.audio_frame_freq

    # ----- single-row operations (prefills) -------------------------------------------------------------
    def thinker_prefill(self, slot: int, embeds: torch.Tensor, start: int) -> torch.Tensor:
        """Run the reasoner over ``embeds`` ``[T, H]`` at positions ``start..`` of ``slot``; last hidden ``[H]``."""
        n = embeds.shape[0]
        if start + n > self.thinker_len:
            raise ContextFull(f"the conversation needs {start + n} reasoner positions, the limit is {self.thinker_len}")
        pos = torch.arange(start, start + n, device=self.device)[None]
        out = self.model.thinker.model(embeds[None].to(self.dtype), pos, RowCache(self.thinker_cache, slot, slot + 1),
                                       kv_len=start + n)
        return out[0, -1]

    def backbone_prefill(self, slot: int, embeds: torch.Tensor) -> None:
        """Fill ``slot``'s backbone cache with a voice prompt (positions ``0..P-1``)."""
        n = embeds.shape[0]
        pos = torch.arange(n, device=self.device)[None]
        self.model.backbone.model(embeds[None].to(self.dtype), pos, RowCache(self.backbone_cache, slot, slot + 1),
                                  kv_len=n)

    def load_backbone_rows(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Copy a cached voice prompt's keys/values ``[layers, kv_heads, P, head_dim]`` into ``slot``."""
        n = k.shape[2]
        self.backbone_cache.k[:, slot, :, :n].copy_(k)
        self.backbone_cache.v[:, slot, :, :n].copy_(v)

    def backbone_rows(self, slot: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.backbone_cache.k[:, slot, :, :n].clone(), self.backbone_cache.v[:, slot, :, :n].clone())

    # ----- responses ---------------------------------------------------------------------------------------
    def start(
        self,
        slot: int,
        voice_len: int,
        h_last: torch.Tensor,
        first_token: int,
        thinker_pos: int,
        sampling: SamplingParams,
        max_frames: int,
        forced: list[int] | None,
    ) -> Row:
        """Begin a response in ``slot`` whose backbone cache holds the voice prompt (``voice_len`` positions)
        and whose reasoner has just produced ``first_token`` from hidden state ``h_last``."""
        if voice_len + 3 * max_frames + 2 > self.backbone_len:
            max_frames = max(1, (self.backbone_len - voice_len - 2) // 3)
        m = self.model
        im_end = self.cfg.im_end_token_id
        gen = None
        if sampling.temperature > 0 and sampling.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(sampling.seed)
        e = m.text_embedding(torch.tensor([first_token], device=self.device))[0]
        row = Row(slot=slot, sampling=sampling, max_frames=max_frames, forced=forced, thinker_pos=thinker_pos,
                  bb_pos=voice_len, pending=[h_last.to(self.dtype), e], pending_token=first_token,
                  last_token=first_token, text_done=first_token == im_end, fed_done=first_token == im_end,
                  emitted=1, generator=gen, prompt_len=thinker_pos, tokens=[first_token])
        self.rows[slot] = row
        self.mimi_state.reset([slot])
        return row

    def cancel(self, slot: int) -> None:
        row = self.rows.get(slot)
        if row is not None:
            row.cancelled = True

    @property
    def active(self) -> bool:
        return bool(self.rows)

    # ----- the batched step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        for slot, row in list(self.rows.items()):
            if row.cancelled:
                del self.rows[slot]
                outputs.append(StepOutput(slot, None, None, None, "cancelled"))
        if not self.rows:
            return outputs
        m, cfg, dev = self.model, self.cfg, self.device
        n = max(self.rows) + 1  # rows 0..n-1 take part; idle ones in that range compute into scratch
        rows = self.rows

        # 1. The reasoner runs ahead: rows whose ready text is short get one more token.
        think = [r for r in rows.values() if not r.text_done and len(r.queue) < self.lookahead]
        new_tokens: dict[int, torch.Tensor] = {}
        if think:
            ids = torch.zeros(n, 1, dtype=torch.long)
            pos = torch.full((n, 1), self.thinker_scratch, dtype=torch.long)
            for r in think:
                ids[r.slot, 0] = r.last_token
                pos[r.slot, 0] = r.thinker_pos
            ids, pos = ids.to(dev), pos.to(dev)
            kv_len = max(r.thinker_pos for r in think) + 1
            # Idle rows write to the scratch slot; real queries never attend past their own position.
            h = m.thinker.model(m.thinker.model.embed_tokens(ids), pos, RowCache(self.thinker_cache, 0, n),
                                kv_len=kv_len)[:, 0]
            greedy = m.thinker_logits(h).argmax(-1)
            for r in think:
                r.thinker_pos += 1
                if r.forced is not None:
                    tok = r.forced[r.emitted]
                    r.queue.append((h[r.slot], tok))
                    r.text_done = tok == cfg.im_end_token_id
                    r.last_token = tok
                    r.tokens.append(tok)
                else:
                    tok_t = greedy[r.slot]
                    r.queue.append((h[r.slot], tok_t))
                    new_tokens[r.slot] = tok_t
                r.emitted += 1

        # 2. The backbone: A(last frame) for every row past step 0, then the text pair on even steps.
        feeds: dict[int, list[torch.Tensor]] = {}
        for r in rows.values():
            vecs = list(r.pending)
            r.pending = []
            if r.step > 0:
                vecs.insert(0, None)  # A(last frame), filled in batched below
                if r.step % 2 == 0 and not r.fed_done:
                    h_t, tok = r.queue.popleft()
                    tok = int(tok)  # known on the host: produced at least one step ago
                    r.pending_token = tok
                    vecs += [h_t.to(self.dtype), m.text_embedding(torch.tensor([tok], device=dev))[0]]
                    r.fed_done = tok == cfg.im_end_token_id
            feeds[r.slot] = vecs
        t = max(len(v) for v in feeds.values())
        frame_emb = m.frame_embedding(self.last_codes[:n])  # [n, H]
        x = torch.zeros(n, t, cfg.backbone.hidden_size, device=dev, dtype=self.dtype)
        pos = torch.full((n, t), self.backbone_scratch, dtype=torch.long)
        last_idx = torch.zeros(n, dtype=torch.long)
        for slot, vecs in feeds.items():
            r = rows[slot]
            for j, v in enumerate(vecs):
                x[slot, j] = frame_emb[slot] if v is None else v
                pos[slot, j] = r.bb_pos + j
            last_idx[slot] = len(vecs) - 1
            r.bb_pos += len(vecs)
        pos = pos.to(dev)
        kv_len = max(r.bb_pos for r in rows.values())
        hidden = m.backbone.model(x, pos, RowCache(self.backbone_cache, 0, n), kv_len=kv_len)
        hidden = hidden[torch.arange(n, device=dev), last_idx.to(dev)]  # [n, H]

        # 3. Codebook 0, then the decoder fills the rest of the frame.
        sample = self._sampler(n)
        c0 = sample(m.codebook0_logits(hidden), 0)
        codes = m.decode_frame(hidden, c0, RowCache(self.decoder_cache, 0, n), sample)  # [n, K]
        self.last_codes[:n].copy_(codes)

        # 4. Mimi: one frame of audio for every slot (idle slots decode into state that is reset on reuse).
        all_codes = self.last_codes
        audio = m.codec_model.decode_step(all_codes[:, :, None], self.mimi_state)  # [slots, frame]

        # 5. One transfer to the host: codes, audio, and the reasoner's new tokens.
        eos = (codes[:, : cfg.audio_num_codebooks - 1] == cfg.codebook_eos_token_id).all(-1)
        tok_slots = sorted(new_tokens)
        packed_tokens = torch.stack([new_tokens[s] for s in tok_slots]) if tok_slots else None
        host = _to_host(codes, eos, audio[:n].float(), packed_tokens)
        codes_h, eos_h, audio_h, toks_h = host
        for i, s in enumerate(tok_slots):
            r = rows[s]
            tok = int(toks_h[i])
            r.queue[-1] = (r.queue[-1][0], tok)
            r.last_token = tok
            r.tokens.append(tok)
            r.text_done = tok == cfg.im_end_token_id

        for slot in list(rows):
            r = rows[slot]
            text_token = r.pending_token
            r.pending_token = None
            if text_token is not None:
                r.spoken_tokens.append(text_token)
            r.step += 1
            if bool(eos_h[slot]):
                outputs.append(StepOutput(slot, None, None, text_token, "eos"))
                del rows[slot]
                continue
            out = StepOutput(slot, codes_h[slot], audio_h[slot], text_token, None)
            if r.step >= r.max_frames:
                out.finished = "length"
                del rows[slot]
            outputs.append(out)
        return outputs

    def _sampler(self, n: int):
        rows = self.rows
        cb = self.cfg.codebook_size
        if all(r.sampling.temperature <= 0 for r in rows.values()):
            return lambda logits, _i: mask_undecodable(logits.float(), cb).argmax(-1)

        def sample(logits: torch.Tensor, _i: int) -> torch.Tensor:
            logits = mask_undecodable(logits.float(), cb)
            out = logits.argmax(-1)
            for slot, r in rows.items():
                s = r.sampling
                if s.temperature > 0:
                    out[slot] = sample_logits(logits[slot:slot + 1], s.temperature, s.top_k, s.top_p, r.generator)[0]
            return out

        return sample


class ContextFull(ValueError):
    """The conversation no longer fits the context the engine was configured with."""


def _to_host(*tensors):
    return [None if t is None else t.cpu() for t in tensors]
