"""Responses from request to last frame, and the order of the worker's background work.

A response starts as a job: its prompt is tokenized and fitted to the context in slices (``PromptPlan``; the
caller's ``respond`` is answered then), its user audio is encoded, the reasoner's prefill runs in chunks
batched across sessions, then the stepper takes its row; every frame's output is delivered to its
``Response``, and at the end the history keeps what was spoken.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from .conversation import PromptPlan
from .events import AudioChunk, Response, ResponseDone, TextDelta, Usage
from .sampling import SamplingParams
from .schedule import reasoner_budget, seconds_of_frames
from .session import Overrides, Session
from .stepper import StepOutput
from .transcription import Transcriber
from .turn_audio import PendingAudio, Window, encode_window
from .voices import Voice
from .worker import Later


@dataclass(eq=False)
class StartJob:
    """A response on its way to its first frame: ``plan`` until its prompt is fitted (then ``ready`` answers the
    caller), then ``ids[start + done:]`` is what the reasoner still has to read."""

    session: Session
    response: Response
    voice: Voice
    plan: PromptPlan | None
    ready: Later
    forced: list[int] | None
    max_frames: int
    sampling: SamplingParams
    ids: list[int] | None = None
    audio: list[PendingAudio] | None = None
    start: int = 0
    embeds: torch.Tensor | None = None
    done: int = 0


class Responses:
    """Every response in progress (by slot), the jobs before them, and the queues of background work."""

    def __init__(self, engine: Any):
        self.engine = engine   # the owning Engine (Any: a part never imports its owner)
        self.model, self.cfg, self.stepper = engine.model, engine.cfg, engine.stepper
        self.by_slot: dict[int, Response] = {}
        self.jobs: list[StartJob] = []                          # responses waiting to start, oldest first
        self.windows: deque[tuple[Session, Window]] = deque()   # user audio windows waiting to be encoded
        self.transcriber = Transcriber(engine.model, engine.prompts, engine.max_context, engine.stepper.device,
                                       engine.stepper.dtype, engine.prefill_chunk)
        self.frames_generated = 0

    # ----- starting -------------------------------------------------------------------------------------------
    def respond(self, s: Session, voice: Voice, max_frames: int, forced: list[int] | None,
                sampling: SamplingParams, over: Overrides) -> Later:
        resp = Response(self.engine, s)
        resp.out_of_band = over.out_of_band
        resp.t_start = over.t_start or resp.t_start
        resp.item_id = over.item_id
        resp.history_index = len(s.conversation.entries)
        self.by_slot[s.slot] = resp
        plan = s.conversation.plan(over.instructions, over.messages)
        job = StartJob(s, resp, voice, plan, Later(), forced, max_frames, sampling)
        self.jobs.append(job)
        return job.ready

    def _prompt_slice(self, job: StartJob) -> None:
        """Tokenize some of a job's prompt; once every message that can fit is, fit it (forgetting the oldest
        turns), keep what the reasoner's cache already holds, and answer the caller."""
        e, s = self.engine, job.session
        budget = e.max_context - reasoner_budget(0, job.max_frames, self.stepper.lookahead)
        plan = job.plan
        try:
            if not plan.tokenize_slice(e.prompts, budget, e.max_conversation_items):
                return
            start = plan.fit(budget, e.max_conversation_items, e.max_context)
        except BaseException as err:
            self.jobs.remove(job)
            self.by_slot.pop(s.slot, None)
            job.ready.future.set_exception(err)
            return
        if plan.forgettable and start > 1:
            s.conversation.forget(start - 1)
            job.response.history_index -= start - 1
        job.ids, job.audio = plan.ids(start)
        job.plan = None
        # Reuse what the reasoner's cache already holds (earlier turns, audio encoded while it arrived).
        common = 0
        for a, b in zip(s.ctx_ids, job.ids, strict=False):
            if a != b:
                break
            common += 1
        job.start = min(common, len(job.ids) - 1)
        s.ctx_ids = job.ids[:job.start]
        if not job.response.out_of_band:
            s.response = job.response
        self._answer(job)

    @staticmethod
    def _answer(job: StartJob) -> None:
        if not job.ready.future.done():
            job.ready.future.set_result(job.response)

    def _prefill_slice(self) -> None:
        """One chunk of the reasoner's prefill for every response waiting to start, in one batch."""
        ready = [j for j in self.jobs if j.plan is None and all(a.embeds is not None for a in j.audio)]
        chunks = []
        for job in ready:
            if job.embeds is None:
                job.embeds = self._embed_ids(job)
            n = min(self.engine.prefill_chunk, job.embeds.shape[0] - job.done)
            chunks.append((job.session.slot, job.embeds[job.done:job.done + n], job.start + job.done))
        try:
            hidden = self.stepper.reasoner_prefill(chunks)
        except Exception as e:
            for job in ready:
                self._guarded(job, _reraise, e)
            return
        for job, (_, chunk, _), h_last in zip(ready, chunks, hidden, strict=True):
            job.done += chunk.shape[0]
            job.session.ctx_ids = job.ids[:job.start + job.done]
            if job.done == job.embeds.shape[0]:
                self.jobs.remove(job)
                self._guarded(job, self._start, job, h_last)

    def _embed_ids(self, job: StartJob) -> torch.Tensor:
        """Reasoner input vectors for ``ids[start:]``; ``<|AUDIO|>`` tokens take the prompt's audio embeddings."""
        tail = torch.tensor(job.ids[job.start:], device=self.stepper.device)
        audio_id = self.cfg.audio_token_index
        first_audio = sum(1 for t in job.ids[:job.start] if t == audio_id)
        n_audio = int((tail == audio_id).sum())
        audio = None
        if n_audio:
            audio = torch.cat([a.embeds for a in job.audio], dim=0)[first_audio:first_audio + n_audio]
        return self.model.thinker.embed(tail[None], audio)[0]

    def _start(self, job: StartJob, h_last: torch.Tensor) -> None:
        s, voice = job.session, job.voice
        first = job.forced[0] if job.forced else int(self.model.reasoner_logits(h_last).argmax(-1))
        if voice.kv is not None:
            self.stepper.load_backbone_rows(s.slot, *voice.kv)
        else:
            self.stepper.backbone_prefill([(s.slot, voice.embeds, 0)])
        job.response.t_started = time.perf_counter()
        job.response.row = self.stepper.start(s.slot, voice.length, h_last, first, len(job.ids), job.sampling,
                                              job.max_frames, job.forced)

    # ----- background work (on the worker, between frames) ---------------------------------------------------
    def has_background(self) -> bool:
        return bool(self.jobs or self.windows or self.transcriber.jobs)

    def background_slice(self) -> bool:
        """Do one bounded piece of pending work; False when there is none."""
        tower = self.model.thinker.audio_tower
        for job in self.jobs:  # responses waiting to start come first: their first audio depends on it
            if job.plan is not None:
                self._prompt_slice(job)
                return True
            pending = next((a for a in job.audio if a.embeds is None), None)
            if pending is not None:
                self._guarded(job, pending.encode_slice, tower)
                return True
        while self.windows:  # audio of turns still being spoken
            s, window = self.windows.popleft()
            if not s.closed and window[1] is None:
                window[1] = encode_window(tower, window[0])
                return True
        if self.jobs:
            self._prefill_slice()
            return True
        if self.transcriber.jobs:
            self.transcriber.slice()
            return True
        return False

    # ----- frames ---------------------------------------------------------------------------------------------
    def deliver(self, out: StepOutput) -> None:
        resp = self.by_slot.get(out.slot)
        if resp is None:
            return
        if out.text_token is not None:
            resp.tokens.append(out.text_token)
            resp.token_frames.append(resp.frames)
            if out.text_token != self.cfg.im_end_token_id:
                delta = resp._detok.push(out.text_token)  # holds back incomplete UTF-8 sequences
                if delta:
                    resp._text += delta
                    resp._emit(TextDelta(delta, out.text_token))
        if out.audio is not None:
            if resp.t_first_audio is None:
                resp.t_first_audio = time.perf_counter()
            resp.codes.append(out.codes)
            resp._emit(AudioChunk(out.audio.numpy(), resp.frames, self.engine.sample_rate, time.perf_counter()))
            resp.frames += 1
            self.frames_generated += 1
        if out.finished:
            self.finish(resp, out.finished)

    def finish(self, resp: Response, reason: str) -> None:
        s = resp.session
        self.by_slot.pop(s.slot, None)
        row = getattr(resp, "row", None)
        # The reasoner's cache holds the prompt and the tokens it consumed; history keeps what was spoken.
        if row is not None:
            s.ctx_ids = s.ctx_ids[: row.prompt_len] + row.tokens[: row.reasoner_pos - row.prompt_len]
        text = self.engine.spoken_text(resp.tokens)
        if not resp.out_of_band:
            # At the place the response began: user messages added while it spoke come after it.
            resp.message = s.conversation.add_reply(resp.history_index, text, resp.item_id,
                                                    (list(resp.tokens), list(resp.token_frames)))
        codes = torch.stack(resp.codes) if resp.codes else torch.zeros(0, self.cfg.audio_num_codebooks,
                                                                     dtype=torch.long)
        prompt = s.ctx_ids[: row.prompt_len] if row is not None else []
        secs = seconds_of_frames(resp.frames)
        usage = Usage(len(prompt), sum(1 for t in prompt if t == self.cfg.audio_token_index), len(resp.tokens),
                      resp.frames, secs)
        resp.done = ResponseDone(text, list(resp.tokens), reason, resp.frames, _timings(resp, secs), codes,
                                 usage=usage)
        resp._emit(resp.done)

    # ----- ending early ---------------------------------------------------------------------------------------
    def cancel(self, s: Session) -> None:
        job = next((j for j in self.jobs if j.session is s), None)
        if job is not None:  # not started yet: it ends here, having said nothing
            self.jobs.remove(job)
            self.finish(job.response, "cancelled")
            self._answer(job)
        self.stepper.cancel(s.slot)

    def close_session(self, s: Session) -> None:
        self.cancel(s)
        self.stepper.rows.pop(s.slot, None)
        resp = self.by_slot.pop(s.slot, None)
        if resp is not None and resp.done is None:
            self.finish(resp, "cancelled")

    def _guarded(self, job: StartJob, fn, *args) -> None:
        """Run ``fn``; if it fails, only ``job``'s response fails (with the reason), and the engine goes on."""
        try:
            fn(*args)
        except Exception as e:
            if job in self.jobs:
                self.jobs.remove(job)
            self.by_slot.pop(job.session.slot, None)
            self._fail(job.response, f"{type(e).__name__}: {e}")

    def fail_all(self, message: str, keep_jobs: bool = False) -> None:
        if not keep_jobs:
            for job in self.jobs:
                self.by_slot.pop(job.session.slot, None)
                self._fail(job.response, message)
                self._answer(job)
            self.jobs.clear()
        for slot in list(self.stepper.rows):
            self.fail_row(slot, message)

    def fail_row(self, slot: int, message: str) -> None:
        self.stepper.rows.pop(slot, None)
        resp = self.by_slot.pop(slot, None)
        if resp is not None and resp.done is None:
            self._fail(resp, message)

    @staticmethod
    def _fail(resp: Response, message: str) -> None:
        resp.done = ResponseDone(resp._text, resp.tokens, "error", resp.frames, error=message)
        resp._emit(resp.done)


def _timings(resp: Response, secs: float) -> dict[str, float]:
    now = time.perf_counter()
    timings = {"ttft_ms": (resp.t_first_audio - resp.t_start) * 1000 if resp.t_first_audio else float("nan"),
               "seconds": now - resp.t_start, "audio_seconds": secs,
               "rtf": (now - resp.t_start) / secs if secs else float("nan")}
    if resp.t_started is not None and resp.t_first_audio is not None:
        # TTFT in two parts, as the paper reports it: up to the reasoner's first token (user audio encoding,
        # prefill, queueing), then the first frame (backbone, decoder, codec).
        timings["reasoner_prefill_ms"] = (resp.t_started - resp.t_start) * 1000
        timings["first_frame_ms"] = (resp.t_first_audio - resp.t_started) * 1000
    return timings


def _reraise(e: BaseException) -> None:
    raise e
