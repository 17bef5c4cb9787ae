"""The engine's hot path: every generating response advanced by one 80 ms frame per step, batched.

Each response owns a slot: a row of the Reasoner's, Backbone's and Decoder's KV caches, of the Codec's
streaming state and of a small ring of ready text pairs, all allocated once. A step is planned on the host
(which rows think, which feed a text pair, sampling settings, positions), written into persistent input
buffers, and run on the device by at most two functions whose shapes depend only on the batch bucket:

* ``think``: one reasoner token for every row of the bucket (rows that do not think write to scratch
  slots), its argmax, or the forced token, written into the row's ring. The text runs ahead of the audio
  by ``lookahead`` tokens, so a frame never waits for text;
* ``frame``: the backbone over 1 vector per row (``[A]``) or, when any row feeds a text pair, 3
  (``[A H E]``, right-aligned and padded into a scratch cache slot nobody attends to); codebook 0; the
  7-pass Decoder loop; one frame of audio from the Codec; end-of-audio flags.

Both can be compiled with ``torch.compile(fullgraph=True)`` and, on CUDA, captured as CUDA graphs per
bucket. The host reads codes, flags, tokens and audio once per step.
"""

from __future__ import annotations

import contextlib
import logging
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..models.chroma import ChromaModel
from ..models.transformer import KVCache
from .events import ContextFull
from .sampling import SamplingParams, sample_codes
from .schedule import backbone_vectors_at, frames_for_text, frames_within, pair_index_at

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

# Integer inputs, one row per slot.
THINK_ID, THINK_POS, RING_W, FORCE_TOK, FORCE, MODE, RING_R, BB_POS, BB_SLOT, SEED, COUNTER, TOP_K = (
    0, 1, 2, 3, 4, 5, 6, 7, 10, 13, 14, 15)
N_INT = 16
TEMPERATURE, TOP_P, N_FLOAT = 0, 1, 2
# Backbone input layouts (right-aligned in 3 entries): [pad pad A], [A H E], [pad H E].
MODE_A, MODE_PAIR, MODE_FIRST = 0, 1, 2


class RowCache:
    """A view of the first rows of a KVCache (shares its storage)."""

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
    seed: int
    max_frames: int
    forced: list[int] | None
    prompt_len: int               # reasoner positions before the response
    reasoner_pos: int             # next reasoner position
    bb_pos: int                   # next backbone position
    tokens: list[int] = field(default_factory=list)   # every token the reasoner emitted, in order
    fed: int = 0                  # text pairs that entered the backbone
    step: int = 0
    text_done: bool = False       # the reasoner has emitted im_end
    cancelled: bool = False
    # the step in flight
    thinking: bool = False
    pair: int | None = None

    @property
    def emitted(self) -> int:
        return len(self.tokens)

    @property
    def fed_done(self) -> bool:
        return self.text_done and self.fed >= len(self.tokens)


@dataclass
class StepOutput:
    slot: int
    codes: torch.Tensor | None     # [K] (cpu) or None when the row ended this step
    audio: torch.Tensor | None     # [frame_samples] float32 cpu
    text_token: int | None         # the text token that entered the backbone with this frame
    finished: str | None           # stop reason when the row ended


def default_threads(model: ChromaModel) -> int | None:
    """Intra-op CPU threads for stepping ``model``: 1 for models narrower than 1024, whose small ops lose more to
    thread hand-offs than they gain (measured on 2 cores: 1.3-2.4x slower per frame from a worker thread with 2,
    and far slower under load); torch's default (None) for wider ones, where 1 thread costs about 4%."""
    on_cpu = model.device.type == "cpu"
    return 1 if on_cpu and model.cfg.backbone.hidden_size < 1024 else None


@contextlib.contextmanager
def intra_op_threads(n: int | None):
    """Run the block with ``n`` intra-op threads in this thread (None: unchanged), restored after."""
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def buckets_for(slots: int) -> list[int]:
    return [b for b in BUCKETS if b < slots] + [slots]


class Stepper:
    def __init__(
        self,
        model: ChromaModel,
        slots: int,
        reasoner_len: int,
        backbone_len: int,
        lookahead: int = 2,
        compile: bool | str = False,
        cuda_graphs: bool | None = None,
    ):
        """``compile``: False (eager), True (``torch.compile`` with inductor) or a dynamo backend's name
        (``"eager"`` traces the step without generating code: it checks for graph breaks quickly).
        ``cuda_graphs``: capture each variant as a CUDA graph (default: on CUDA)."""
        self.model = model
        self.cfg = cfg = model.cfg
        self.slots = slots
        self.device, self.dtype = model.device, model.dtype
        self.K = k = cfg.audio_num_codebooks
        self.lookahead = lookahead
        self.ring_size = lookahead + 2          # tokens emitted but not yet fed never exceed lookahead + 1
        self.reasoner_len = reasoner_len
        self.backbone_len = backbone_len
        self.buckets = buckets_for(slots)
        self.compile = compile
        self.cuda_graphs = (self.device.type == "cuda") if cuda_graphs is None else cuda_graphs
        dev, dt = self.device, self.dtype
        # One extra cache slot at the end of each row: the scratch slot padding entries write to.
        self.reasoner_cache = model.thinker.model.new_cache(slots, reasoner_len + 1)
        self.backbone_cache = model.backbone.model.new_cache(slots, backbone_len + 1)
        self.decoder_cache = model.decoder.model.new_cache(slots, k)
        self.reasoner_scratch, self.backbone_scratch = reasoner_len, backbone_len
        self.codec_state = model.codec_model.stream_state(slots)
        self._codec_views = {b: self.codec_state.rows(b) for b in self.buckets}
        hidden = cfg.reasoner.hidden_size
        self.ring_h = torch.zeros(slots, self.ring_size + 1, hidden, device=dev, dtype=dt)   # last: scratch
        self.ring_tok = torch.zeros(slots, self.ring_size + 1, dtype=torch.long, device=dev)
        self.last_codes = torch.zeros(slots, k, dtype=torch.long, device=dev)
        self.frame_samples = cfg.audio_frame_freq
        # Persistent inputs and outputs. On CUDA the host writes pinned copies and sends them non-blocking.
        self.in_i = torch.zeros(slots, N_INT, dtype=torch.long, device=dev)
        self.in_f = torch.zeros(slots, N_FLOAT, dtype=torch.float32, device=dev)
        self.out_i = torch.zeros(slots, k + 2, dtype=torch.long, device=dev)      # codes, eos, token
        self.out_audio = torch.zeros(slots, self.frame_samples, dtype=torch.float32, device=dev)
        if dev.type == "cuda":
            pin = dict(pin_memory=True)
            self.host_in_i = torch.zeros(slots, N_INT, dtype=torch.long, **pin)
            self.host_in_f = torch.zeros(slots, N_FLOAT, dtype=torch.float32, **pin)
            self.host_out_i = torch.zeros(slots, k + 2, dtype=torch.long, **pin)
            self.host_out_audio = torch.zeros(slots, self.frame_samples, dtype=torch.float32, **pin)
            self._done = torch.cuda.Event()
        else:
            self.host_in_i, self.host_in_f = self.in_i, self.in_f
            self.host_out_i, self.host_out_audio = self.out_i, self.out_audio
        self._ni = self.host_in_i.numpy()
        self._nf = self.host_in_f.numpy()
        self._idle = np.zeros(N_INT, dtype=np.int64)
        self._idle[THINK_POS] = self.reasoner_scratch
        self._idle[RING_W] = self.ring_size
        self._idle[BB_SLOT:BB_SLOT + 3] = self.backbone_scratch
        self._ni[:] = self._idle
        self.rows: dict[int, Row] = {}
        self._fns: dict[tuple, Callable[[], None]] = {}
        self._graphs = GraphCapture(self.device)
        self.graph_error: str | None = None   # why CUDA graphs are off, when their capture failed
        # Per-stage seconds (reasoner, backbone, decoder, codec, host), summed over steps, when a benchmark sets
        # this to a dict. Stages inside the frame function are timed only in eager mode.
        self.timings: dict[str, float] | None = None
        self._t_mark = 0.0

    # ----- variants ---------------------------------------------------------------------------------------
    def variants(self) -> list[tuple]:
        """Every device function the step may call: ``("think", b)`` and ``("frame", b, width, greedy)``."""
        out: list[tuple] = []
        for b in self.buckets:
            out.append(("think", b))
            out += [("frame", b, t, g) for t in (1, 3) for g in (True, False)]
        return out

    def _fn(self, key: tuple) -> Callable[[], None]:
        fn = self._fns.get(key)
        if fn is None:
            if self.cuda_graphs and self.rows:
                raise RuntimeError(f"CUDA graph variant {key} was not captured at load (call warmup() first)")
            fn = self._fns[key] = self._build(key)
        return fn

    def _build(self, key: tuple) -> Callable[[], None]:
        method = self._think if key[0] == "think" else self._frame
        args = key[1:]

        def run() -> None:
            method(*args)

        fn = compiled(run, self.compile, self.device) if self.compile else run
        if not self.cuda_graphs:
            return fn
        try:
            return self._graphs.capture(fn)
        except Exception as e:  # serve without graphs rather than not at all; the reason is logged and kept
            self.cuda_graphs = False
            self.graph_error = f"{type(e).__name__}: {e}"
            log.warning("CUDA graph capture of %s failed, running without CUDA graphs: %s", key, self.graph_error)
            if torch.cuda.is_available():
                torch.cuda.synchronize(self.device)
            return fn

    @property
    def mode(self) -> str:
        """How the step runs: ``cuda-graphs``, ``compiled`` or ``eager`` (``graph_error`` says why graphs are off
        when their capture failed)."""
        return "cuda-graphs" if self.cuda_graphs else "compiled" if self.compile else "eager"

    @torch.inference_mode()
    def warmup(self, progress: bool = False, keys: Sequence[tuple] | None = None) -> None:
        """Compile (and capture) every variant (or ``keys``) now, with no response running, so none is built
        mid-stream; ``progress`` shows a bar."""
        from tqdm import tqdm

        if self.rows:
            raise RuntimeError("warmup() needs an idle stepper")
        keys = [k for k in (keys or self.variants()) if k not in self._fns]
        self._ni[:] = self._idle
        self._nf[:] = 0
        self._send_inputs()
        for key in tqdm(keys, desc="Compiling the frame step", unit="graph", disable=not progress):
            self._fns[key] = self._build(key)
            self._fns[key]()
        # Warm-up ran on idle rows: it wrote only scratch cache slots, but the Codec's state and the codes moved.
        self.codec_state.reset()
        self.last_codes.zero_()

    # ----- device functions (fixed shapes for a bucket) ---------------------------------------------------
    def _think(self, b: int) -> None:
        m = self.model
        tm = m.thinker.model
        ii = self.in_i[:b]
        h = tm(tm.embed_tokens(ii[:, THINK_ID])[:, None], ii[:, THINK_POS:THINK_POS + 1],
               RowCache(self.reasoner_cache, 0, b))[:, 0]
        tok = m.reasoner_logits(h).argmax(-1)
        tok = torch.where(ii[:, FORCE] > 0, ii[:, FORCE_TOK], tok)
        rows = torch.arange(b, device=h.device)
        self.ring_h[rows, ii[:, RING_W]] = h
        self.ring_tok[rows, ii[:, RING_W]] = tok
        self.out_i[:b, self.K + 1] = tok

    def _frame(self, b: int, width: int, greedy: bool) -> None:
        m, k = self.model, self.K
        ii, ff = self.in_i[:b], self.in_f[:b]
        a = m.frame_embedding(self.last_codes[:b])                      # A(last frame), [b, H]
        if width == 1:
            x = a[:, None]
        else:
            rows = torch.arange(b, device=a.device)
            r = ii[:, RING_R]
            h_text = self.ring_h[rows, r]
            e_text = m.text_embedding(self.ring_tok[rows, r])
            mode = ii[:, MODE, None]
            zero = torch.zeros_like(a)
            x = torch.stack([torch.where(mode == MODE_PAIR, a, zero),
                             torch.where(mode != MODE_A, h_text, zero),
                             torch.where(mode != MODE_A, e_text, a)], dim=1)
        cols = slice(3 - width, 3)
        pos = ii[:, BB_POS:BB_POS + 3][:, cols]
        slots = ii[:, BB_SLOT:BB_SLOT + 3][:, cols]
        hidden = m.backbone.model(x, pos, RowCache(self.backbone_cache, 0, b), slots)[:, -1]
        self._mark("backbone")
        temperature, top_p = ff[:, TEMPERATURE], ff[:, TOP_P]
        top_k, seed, counter = ii[:, TOP_K], ii[:, SEED], ii[:, COUNTER] * k
        cb = self.cfg.codebook_size   # codes >= the codec's codebook size cannot be decoded: never chosen

        def sample(logits: torch.Tensor, i: int) -> torch.Tensor:
            return sample_codes(logits[:, :cb], temperature, top_k, top_p, seed, counter + i, greedy)

        c0 = sample(m.codebook0_logits(hidden), 0)
        codes = m.decode_frame(hidden, c0, RowCache(self.decoder_cache, 0, b), sample)
        self.last_codes[:b] = codes
        self._mark("decoder")
        audio = m.codec_model.decode_step(codes[:, :, None], self._codec_views[b])
        self.out_i[:b, :k] = codes
        self.out_i[:b, k] = (codes[:, : k - 1] == self.cfg.codebook_eos_token_id).all(-1).long()
        self.out_audio[:b] = audio.float()
        self._mark("codec")

    def _mark(self, stage: str, always: bool = False) -> None:
        """Add the time since the last mark to ``stage`` (profiling runs only; inside compiled code, a no-op)."""
        if self.timings is None or (self.compile and not always):
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - self._t_mark
        self._t_mark = now

    # ----- prefills (eager; any length) -------------------------------------------------------------------
    @torch.inference_mode()
    def reasoner_prefill(self, chunks: Sequence[tuple[int, torch.Tensor, int]]) -> list[torch.Tensor]:
        """Run the reasoner over each ``(slot, embeds [T, H], start)`` at positions ``start..``, batched.

        Returns each row's last hidden state ``[H]``."""
        for _slot, embeds, start in chunks:
            if start + embeds.shape[0] > self.reasoner_len:
                raise ContextFull(f"the conversation needs {start + embeds.shape[0]} reasoner positions, "
                                  f"the limit is {self.reasoner_len}")
        out = self._prefill(self.model.thinker.model, self.reasoner_cache, self.reasoner_scratch, chunks)
        return out

    @torch.inference_mode()
    def backbone_prefill(self, chunks: Sequence[tuple[int, torch.Tensor, int]]) -> None:
        """Fill backbone cache rows with voice prompts (``(slot, embeds, start)``, positions ``start..``)."""
        self._prefill(self.model.backbone.model, self.backbone_cache, self.backbone_scratch, chunks)

    def _prefill(self, model, cache: KVCache, scratch: int, chunks) -> list[torch.Tensor]:
        if len(chunks) == 1:   # one row: its own cache row, no padding
            slot, embeds, start = chunks[0]
            n = embeds.shape[0]
            pos = torch.arange(start, start + n, device=self.device)[None]
            out = model(embeds[None].to(self.dtype), pos, RowCache(cache, slot, slot + 1), kv_len=start + n)
            return [out[0, -1]]
        b = max(c[0] for c in chunks) + 1
        t = max(c[1].shape[0] for c in chunks)
        x = torch.zeros(b, t, chunks[0][1].shape[-1], device=self.device, dtype=self.dtype)
        pos = torch.full((b, t), scratch, dtype=torch.long)
        for slot, embeds, start in chunks:
            n = embeds.shape[0]
            x[slot, :n] = embeds
            pos[slot, :n] = torch.arange(start, start + n)
        kv_len = max(start + e.shape[0] for _, e, start in chunks)
        out = model(x, pos.to(self.device), RowCache(cache, 0, b), kv_len=kv_len)
        return [out[slot, e.shape[0] - 1] for slot, e, _ in chunks]

    def load_backbone_rows(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Copy a cached voice prompt's keys/values ``[layers, kv_heads, P, head_dim]`` into ``slot``."""
        n = k.shape[2]
        self.backbone_cache.k[:, slot, :, :n].copy_(k)
        self.backbone_cache.v[:, slot, :, :n].copy_(v)

    # ----- responses ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def start(
        self,
        slot: int,
        voice_len: int,
        h_last: torch.Tensor,
        first_token: int,
        reasoner_pos: int,
        sampling: SamplingParams,
        max_frames: int,
        forced: list[int] | None,
    ) -> Row:
        """Begin a response in ``slot`` whose backbone cache holds the voice prompt (``voice_len`` positions)
        and whose reasoner has just produced ``first_token`` from hidden state ``h_last``."""
        # Never past the caches: the backbone's positions, and one reasoner position per text pair fed (plus the
        # lookahead) — the callers size their requests; this keeps a mistake from writing out of bounds.
        pairs = self.reasoner_len - reasoner_pos - self.lookahead
        if pairs < 1:
            raise ContextFull(f"no reasoner positions left to answer ({reasoner_pos} of {self.reasoner_len} used)")
        max_frames = max(1, min(max_frames, frames_within(self.backbone_len, voice_len), frames_for_text(pairs)))
        self.ring_h[slot, 0] = h_last.to(self.dtype)
        self.ring_tok[slot, 0] = first_token
        self.codec_state.reset([slot])
        row = Row(slot=slot, sampling=sampling, seed=sampling.row_seed(), max_frames=max_frames, forced=forced,
                  prompt_len=reasoner_pos, reasoner_pos=reasoner_pos, bb_pos=voice_len, tokens=[first_token],
                  text_done=first_token == self.cfg.im_end_token_id)
        self.rows[slot] = row
        return row

    def cancel(self, slot: int) -> None:
        row = self.rows.get(slot)
        if row is not None:
            row.cancelled = True

    @property
    def active(self) -> bool:
        return bool(self.rows)

    # ----- the batched step ------------------------------------------------------------------------------
    def _send_inputs(self) -> None:
        if self.host_in_i is not self.in_i:
            self.in_i.copy_(self.host_in_i, non_blocking=True)
            self.in_f.copy_(self.host_in_f, non_blocking=True)

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        for slot, row in list(self.rows.items()):
            if row.cancelled:
                del self.rows[slot]
                outputs.append(StepOutput(slot, None, None, None, "cancelled"))
        if not self.rows:
            return outputs
        rows = self.rows
        b = next(b for b in self.buckets if b > max(rows))
        t0 = time.perf_counter()
        think, wide, greedy = self._plan(b)
        self._send_inputs()
        self._t_mark = t_device = time.perf_counter()
        if think:
            self._fn(("think", b))()
            self._mark("reasoner", always=True)
        self._fn(("frame", b, 3 if wide else 1, greedy))()
        self._mark("frame", always=True)   # the compiled frame (in eager mode its stages are marked inside)
        out_i, audio = self._read_outputs(b)
        t_device = time.perf_counter() - t_device
        outputs += self._advance(out_i, audio)
        if self.timings is not None:
            self.timings["host"] = self.timings.get("host", 0.0) + time.perf_counter() - t0 - t_device
            self.timings["steps"] = self.timings.get("steps", 0.0) + 1
        return outputs

    def _plan(self, b: int) -> tuple[bool, bool, bool]:
        """Write this step's inputs for rows ``0..b-1``; returns (any row thinks, any row feeds a pair, all greedy)."""
        ni, nf = self._ni, self._nf
        ni[:b] = self._idle
        nf[:b] = 0
        think = wide = False
        greedy = True
        q, im_end = self.ring_size, self.cfg.im_end_token_id
        # The reasoner step reads its whole output projection whichever rows think, so it runs only when some
        # row's ready text runs low, and then every row with room in its ring thinks too: rows fall into step
        # and share one reasoner step instead of each paying for its own.
        think = any(not r.text_done and r.emitted - r.fed < max(1, self.lookahead) for r in self.rows.values())
        for r in self.rows.values():
            s = r.slot
            r.thinking = think and not r.text_done and r.emitted - r.fed <= self.lookahead
            if r.thinking:
                ni[s, THINK_ID] = r.tokens[-1]
                ni[s, THINK_POS] = r.reasoner_pos
                ni[s, RING_W] = r.emitted % q
                if r.forced is not None:
                    ni[s, FORCE] = 1
                    ni[s, FORCE_TOK] = r.forced[r.emitted] if r.emitted < len(r.forced) else im_end
            j = pair_index_at(r.step)
            r.pair = j if j is not None and not r.fed_done else None
            p = r.bb_pos
            if r.step == 0:
                mode, pos, slots = MODE_FIRST, (p, p, p + 1), (self.backbone_scratch, p, p + 1)
            elif r.pair is not None:
                mode, pos, slots = MODE_PAIR, (p, p + 1, p + 2), (p, p + 1, p + 2)
            else:
                mode, pos, slots = MODE_A, (p, p, p), (self.backbone_scratch, self.backbone_scratch, p)
            wide = wide or mode != MODE_A
            ni[s, MODE] = mode
            ni[s, RING_R] = (r.pair or 0) % q
            ni[s, BB_POS:BB_POS + 3] = pos
            ni[s, BB_SLOT:BB_SLOT + 3] = slots
            sp = r.sampling
            if not sp.greedy:
                greedy = False
                nf[s, TEMPERATURE] = sp.temperature
                nf[s, TOP_P] = sp.top_p
                ni[s, TOP_K] = sp.top_k
                ni[s, SEED] = r.seed
                ni[s, COUNTER] = r.step
        return think, wide, greedy

    def _read_outputs(self, b: int) -> tuple[np.ndarray, torch.Tensor]:
        """The step's one device-to-host transfer (codes, end flags, tokens, audio)."""
        if self.host_out_i is not self.out_i:
            self.host_out_i[:b].copy_(self.out_i[:b], non_blocking=True)
            self.host_out_audio[:b].copy_(self.out_audio[:b], non_blocking=True)
            self._done.record()
            self._done.synchronize()
        return self.host_out_i[:b].numpy(), self.host_out_audio[:b]

    def _advance(self, out_i: np.ndarray, audio: torch.Tensor) -> list[StepOutput]:
        k, im_end = self.K, self.cfg.im_end_token_id
        outputs: list[StepOutput] = []
        for slot in list(self.rows):
            r = self.rows[slot]
            if r.thinking:
                tok = int(out_i[slot, k + 1])
                r.tokens.append(tok)
                r.reasoner_pos += 1
                r.text_done = tok == im_end
            text_token = None
            if r.pair is not None:
                text_token = r.tokens[r.pair]
                r.fed += 1
            r.bb_pos += backbone_vectors_at(r.step, r.pair is not None)
            r.step += 1
            if out_i[slot, k]:
                outputs.append(StepOutput(slot, None, None, text_token, "eos"))
                del self.rows[slot]
                continue
            out = StepOutput(slot, torch.from_numpy(out_i[slot, :k].copy()), audio[slot].clone(), text_token, None)
            if r.step >= r.max_frames:
                out.finished = "length"
                del self.rows[slot]
            outputs.append(out)
        return outputs


def compiled(run: Callable[[], None], compile: bool | str, device: torch.device) -> Callable[[], None]:
    """``run`` compiled with ``torch.compile`` (fullgraph, static shapes; ``compile``: True for inductor, or a
    dynamo backend's name)."""
    # Each variant gets a code object of its own, so dynamo's cache for it holds exactly one graph and needs no
    # guards: the step reads only its stepper's persistent tensors and its own constants.
    run = types.FunctionType(run.__code__.replace(), run.__globals__, "frame_step", None, run.__closure__)
    backend = "inductor" if compile is True else compile
    options = None
    if backend == "inductor":
        options = {"guard_filter_fn": torch.compiler.skip_all_guards_unsafe}
        if device.type == "cpu":
            options["cpp_wrapper"] = True   # kernels called from C++, not one Python call each
    return torch.compile(run, fullgraph=True, dynamic=False, backend=backend, options=options)


class GraphCapture:
    """CUDA graphs of a stepper's variants, sharing one memory pool."""

    def __init__(self, device: torch.device):
        self.device = device
        self._pool = None

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Warm ``fn`` up (compiles) on a side stream, then capture it as one replayable CUDA graph."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            fn()
        self._pool = graph.pool()
        return graph.replay
