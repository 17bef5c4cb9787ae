"""Sessions, voices and the frame loop: one loaded model serving many conversations at once.

All model work on the caches runs on one worker thread; callers talk to it through commands
(thread-safe, usable from asyncio) and receive each response as a stream of events:
``TextDelta`` (the words as they enter the speech), ``AudioChunk`` (one 80 ms frame of 24 kHz float
PCM, ready to play) and a final ``ResponseDone`` with the spoken text, the stop reason and timings.

The worker's loop protects live streams: each pass takes commands for about one frame step's time, runs
one batched frame step for every generating response, then one slice of background work — encoding one
window of a user's audio, or one chunk of the reasoner's prefill for the responses about to start (batched
across sessions). A voice's Mimi encoding and backbone prompt run in the caller's thread, off the loop.
So a long user turn or a new voice delays a live stream by about one step, not by its whole cost.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import soxr
import torch

from ..audio import HOP_LENGTH, AudioError, StreamingMelExtractor, load_audio, log_mel_features, normalize_log_mel
from ..constants import REASONER_SAMPLE_RATE as USER_RATE
from ..loading import LoadedModel, load
from ..models.audio_encoder import audio_token_count
from ..tokenizer import ENDOFTEXT_ID, QWEN_OMNI_SYSTEM_PROMPT, ChatTokenizer, build_chat_prompt
from ..voice import MAX_VOICE_SECONDS, VoicePrompt, encode_voice
from .sampling import SamplingParams
from .schedule import backbone_budget, reasoner_budget
from .stepper import ContextFull, StepOutput, Stepper, default_threads, intra_op_threads

DEFAULT_SYSTEM_PROMPT = QWEN_OMNI_SYSTEM_PROMPT
log = logging.getLogger("openchroma.engine")
# Between two frame steps, commands get about this fraction of a step's time and background work one slice, so
# a live stream's chunks stay evenly spaced while other sessions are being set up.
SLICE = 0.3
# User audio enters the worker in pieces of at most this many seconds (each piece is one short command).
APPEND_PIECE_SECONDS = 0.25


class EngineError(ValueError):
    """A request the engine cannot serve as given (the message says why); the engine stays usable."""


class UnknownVoice(EngineError):
    pass


class SessionLimit(EngineError):
    pass


@dataclass
class TextDelta:
    text: str
    token: int


@dataclass
class AudioChunk:
    audio: np.ndarray          # float32 [frame_samples], 24 kHz
    index: int
    sample_rate: int
    made_at: float = 0.0       # time.perf_counter() when the engine emitted it (before any consumer's delay)


@dataclass
class Usage:
    """What a response consumed and produced, so serving reports usage without reading engine internals."""

    prompt_tokens: int = 0          # the Reasoner's prompt, audio placeholders included
    prompt_audio_tokens: int = 0    # of which user-audio placeholders
    text_tokens: int = 0            # text tokens the response spoke
    frames: int = 0                 # 80 ms audio frames it produced
    audio_seconds: float = 0.0


@dataclass
class ResponseDone:
    text: str
    tokens: list[int]
    stop_reason: str           # eos | length | cancelled | error
    frames: int
    timings: dict[str, float] = field(default_factory=dict)
    codes: torch.Tensor | None = None
    error: str | None = None
    usage: Usage = field(default_factory=Usage)


Event = TextDelta | AudioChunk | ResponseDone


@dataclass
class Voice:
    name: str
    transcript: str
    prompt: VoicePrompt
    embeds: torch.Tensor                     # [P, H] backbone prompt vectors
    kv: tuple[torch.Tensor, torch.Tensor] | None = None   # cached backbone keys/values over the prompt

    @property
    def length(self) -> int:
        return self.embeds.shape[0]


@dataclass
class _Loaded:
    lm: LoadedModel
    tokenizer: ChatTokenizer

    @property
    def model(self):
        return self.lm.model

    @property
    def config(self):
        return self.lm.config


class _EventStream:
    """Events from the engine's worker to one consumer, iterated sync or async, ending with a final event."""

    _final: type = object

    def __init__(self) -> None:
        self._q: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aq: asyncio.Queue | None = None
        self.done = None

    def _emit(self, ev) -> None:
        with self._lock:
            if self._aq is not None:
                self._loop.call_soon_threadsafe(self._aq.put_nowait, ev)
            else:
                self._q.put(ev)

    def __iter__(self):
        while True:
            ev = self._q.get()
            yield ev
            if isinstance(ev, self._final):
                return

    async def __aiter__(self):
        with self._lock:
            self._loop = asyncio.get_running_loop()
            self._aq = asyncio.Queue()
            while not self._q.empty():
                self._aq.put_nowait(self._q.get_nowait())
        while True:
            ev = await self._aq.get()
            yield ev
            if isinstance(ev, self._final):
                return

    def result(self):
        """Block until the stream ends; return its final event."""
        for ev in self:
            if isinstance(ev, self._final):
                return ev
        raise RuntimeError("the stream ended without a final event")


class Response(_EventStream):
    """A response in progress: iterate (sync or async) for events; ``cancel()`` stops it within a frame."""

    _final = ResponseDone

    def __init__(self, engine: Engine, session: Session):
        super().__init__()
        self._engine = engine
        self.session = session
        self.done: ResponseDone | None = None
        self.t_start = time.perf_counter()
        self.t_started: float | None = None       # when its first frame step was planned (prefill done)
        self.t_first_audio: float | None = None
        self.frames = 0
        self.codes: list[torch.Tensor] = []
        self.tokens: list[int] = []
        self.token_frames: list[int] = []   # the audio frame each text token entered the speech at
        self.out_of_band = False            # not part of the conversation's history
        self.item_id: str | None = None     # the id its message gets in the history
        self.history_index = 0              # where its message goes in the history
        self.message: dict[str, Any] | None = None   # that message, once it is there (edits may move it)
        self._text = ""
        self._detok = engine.tokenizer.incremental_decoder()

    def cancel(self) -> None:
        self._engine._submit(self._engine._cancel, self.session)


@dataclass
class TranscriptionDone:
    text: str
    tokens: list[int]
    error: str | None = None


class Transcription(_EventStream):
    """The reasoner's transcript of some user audio: ``TextDelta`` events, then ``TranscriptionDone``."""

    _final = TranscriptionDone

    def __init__(self, engine: Engine):
        super().__init__()
        self.done: TranscriptionDone | None = None
        self.tokens: list[int] = []
        self.text = ""
        self._detok = engine.tokenizer.incremental_decoder()


class Session:
    """One conversation: a voice, a system prompt and a history, bound to one slot of the engine."""

    def __init__(self, engine: Engine, sid: int, slot: int, voice: str, system_prompt: str, sampling: SamplingParams):
        self.engine = engine
        self.id = sid
        self.slot = slot
        self.voice = voice
        self.system_prompt = system_prompt
        self.sampling = sampling
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}]
        self.audio_embeds: list[torch.Tensor] = []     # per audio part of the conversation, in order
        self.ctx_ids: list[int] = []                    # what the reasoner's cache row holds
        self.response: Response | None = None
        self.spoken: dict[str, tuple[list[int], list[int]]] = {}   # a reply's tokens and their frames, by item id
        self.closed = False
        # The user turn being received.
        self._turn_parts: list[dict] = []
        self._mel = StreamingMelExtractor()
        self._raw: list[torch.Tensor] = []
        self._raw_frames = 0
        self._windows: list[tuple[torch.Tensor, torch.Tensor]] = []   # (features used, encoded frames)
        self._resampler = None            # soxr stream, while the user's audio is not at 16 kHz
        self._resampler_rate = USER_RATE

    # ----- commands: each is checked here, then runs on the engine's worker ------------------------------
    def _do(self, fn, *args):
        """Run one command on the worker and wait for its result (``AsyncSession``: return an awaitable)."""
        return self.engine._call(fn, *args)

    def _do_all(self, calls: list[tuple]):
        """Commands in order, each its own turn of the worker's loop (so frames run between them)."""
        result = None
        for fn, *args in calls:
            result = self.engine._call(fn, *args)
        return result

    # ----- user input ---------------------------------------------------------------------------------
    def append_audio(self, audio: np.ndarray | torch.Tensor, sample_rate: int) -> None:
        """Add user audio as it arrives (mono or multi-channel, float or int PCM, any chunk size and rate)."""
        if not isinstance(sample_rate, int) or sample_rate <= 0:
            raise AudioError(f"sample_rate must be a positive integer, got {sample_rate!r}")
        wav = load_audio(audio, sample_rate, source_rate=sample_rate)
        # In short pieces, so that the frame loop runs between them.
        piece = max(1, int(sample_rate * APPEND_PIECE_SECONDS))
        return self._do_all([(self.engine._append_audio, self, wav[i:i + piece], sample_rate)
                             for i in range(0, wav.shape[0], piece)])

    def clear_audio(self) -> None:
        """Drop the user audio received since the last turn ended."""
        return self._do(self.engine._clear_audio, self)

    def commit_audio(self, item_id: str | None = None) -> float:
        """Close the user's current audio part (it becomes one audio message part); returns its seconds.

        With ``item_id``, the user's turn ends here too: its parts become one message with that id (see
        ``end_turn``)."""
        return self._do(self.engine._commit_audio, self, item_id)

    def end_turn(self, item_id: str | None = None) -> bool:
        """Make the user's pending parts (text, committed audio) one user message, tagged ``item_id`` so that a
        client can later delete it or insert after it. False if nothing was pending."""
        return self._do(self.engine._end_turn, self, item_id)

    @property
    def buffered_audio_seconds(self) -> float:
        """Seconds of user audio received since the last commit (at 16 kHz, after resampling)."""
        return self._mel.num_samples / USER_RATE

    def set_voice(self, voice: str) -> None:
        """Speak later responses in another registered voice."""
        return self._do(self.engine._set_voice, self, voice)

    def set_instructions(self, system_prompt: str) -> None:
        """Replace the system prompt; the reasoner re-reads the conversation from the first change."""
        if not isinstance(system_prompt, str):
            raise EngineError("instructions must be a string")
        self.engine._check_text_size(system_prompt, "the instructions")
        return self._do(self.engine._set_instructions, self, system_prompt)

    def add_message(self, role: str, text: str, item_id: str | None = None) -> None:
        """Add a whole text message from ``user``, ``assistant`` or ``system`` to the history.

        A user message without ``item_id`` joins the user's open turn (with any audio before the response); with
        one, it is a message of its own."""
        self.engine._check_message(role, text)
        if role == "user" and item_id is None:
            return self.add_text(text)
        return self._do(self.engine._add_message, self, role, text, item_id)

    def insert_message(self, index: int | str, role: str, text: str, item_id: str | None = None) -> None:
        """Put a whole text message at position ``index`` of the history (1 = right after the system prompt; a
        string: right after the message with that id): how a client edits its conversation. The reasoner re-reads
        the history from there."""
        self.engine._check_message(role, text)
        return self._do(self.engine._insert_message, self, index, role, text, item_id)

    def delete_message(self, index: int | str) -> None:
        """Remove message ``index`` (>= 1; the system prompt stays; a string: the message with that id) and its
        audio from the history."""
        return self._do(self.engine._delete_message, self, index)

    def truncate_response(self, audio_ms: float, item_id: str | None = None) -> str:
        """Keep in the history only the words of the last response (or the response whose message is ``item_id``)
        spoken in its first ``audio_ms`` ms.

        Used when the listener interrupted playback: the model should remember what was heard, not what was
        generated. Returns the kept text."""
        return self._do(self.engine._truncate_response, self, audio_ms, item_id)

    def add_text(self, text: str) -> None:
        """Add a user text message to the current turn."""
        if not isinstance(text, str) or not text.strip():
            raise EngineError("the user text is empty")
        self.engine._check_text_size(text, "the user text")
        return self._do(self.engine._add_text, self, text)

    def respond(self, max_frames: int | None = None, forced_text: str | None = None,
                sampling: SamplingParams | None = None, *, voice: str | None = None,
                instructions: str | None = None, out_of_band: bool = False,
                messages: list[dict[str, str]] | None = None, item_id: str | None = None) -> Response:
        """End the user's turn (if any) and start a response; with ``forced_text``, speak exactly that.

        For this response only: ``voice`` (a registered voice's name) and ``instructions`` (the system prompt).
        ``out_of_band``: the response reads the history (or ``messages``, ``[{"role": ..., "text": ...}]``,
        instead) but is not added to it, and the user's open turn stays open. ``item_id`` tags the response's
        message in the history."""
        if forced_text is not None and not forced_text.strip():
            raise EngineError("forced_text is empty: nothing to say")
        if forced_text is not None:
            self.engine._check_text_size(forced_text, "forced_text")
        if instructions is not None:
            if not isinstance(instructions, str):
                raise EngineError("instructions must be a string")
            self.engine._check_text_size(instructions, "the instructions")
        if messages is not None:
            if not out_of_band:
                raise EngineError("messages replace the history only for an out-of-band response")
            for m in messages:
                if not isinstance(m, dict):
                    raise EngineError(f"each message must be a dict with 'role' and 'text', got {m!r}")
                self.engine._check_message(m.get("role"), m.get("text"))
        # Timings count from the caller's request, queueing and prefill included.
        return self._do(self.engine._respond, self, max_frames, forced_text, sampling,
                        _Overrides(voice, instructions, out_of_band, messages, item_id, time.perf_counter()))

    def transcribe(self, part: int = -1, max_tokens: int | None = None) -> Transcription:
        """The reasoner's transcript of one committed audio part of this conversation (``-1``: the latest), made
        from the embeddings the response uses, in background slices that never delay a response's audio."""
        return self._do(self.engine._transcribe_part, self, part, max_tokens)

    def close(self) -> None:
        return self._do(self.engine._close_session, self)

    @property
    def history(self) -> list[dict[str, Any]]:
        return [dict(m) for m in self.messages]


class AsyncSession(Session):
    """A ``Session`` for asyncio code: every command returns an awaitable of the worker's answer (``await
    s.respond()``), so an event loop never blocks on the engine and needs no thread pool. Checks of the arguments
    still raise at once, before anything is sent."""

    def _do(self, fn, *args) -> asyncio.Future:
        return asyncio.wrap_future(self.engine._submit(fn, *args))

    def _do_all(self, calls: list[tuple]) -> asyncio.Future:
        futures = [self.engine._submit(fn, *args) for fn, *args in calls]   # the worker keeps their order
        if not futures:
            return asyncio.ensure_future(asyncio.sleep(0))

        async def last():
            for f in futures[:-1]:
                await asyncio.wrap_future(f)
            return await asyncio.wrap_future(futures[-1])
        return asyncio.ensure_future(last())


class Engine:
    """Holds one loaded model, its voices and sessions, and runs the batched frame loop."""

    def __init__(
        self,
        chroma,
        max_sessions: int = 8,
        max_context: int = 4096,
        max_response_frames: int = 750,
        max_voice_seconds: float = MAX_VOICE_SECONDS,
        lookahead: int = 2,
        cache_voices: bool = True,
        compile: bool | str = False,
        cuda_graphs: bool | None = None,
        progress: bool = False,
        threads: int | None = None,
    ):
        """``chroma``: a loaded model with its tokenizer (``openchroma.Chroma``, or anything with ``model``,
        ``config`` and ``tokenizer``). ``compile``: compile the frame step with ``torch.compile`` (inductor;
        or a dynamo backend's name). ``cuda_graphs``: capture each variant of the step as a CUDA graph (default:
        on CUDA). Both happen here, before the first session, with a progress bar when ``progress``.
        ``threads``: intra-op CPU threads of the frame loop (default: 1 for models narrower than 1024, whose
        small ops lose more to thread hand-offs than they gain; torch's default for wider ones)."""
        self.chroma = chroma
        self.model = chroma.model
        self.cfg = chroma.config
        self.tokenizer = chroma.tokenizer
        self.max_sessions = max_sessions
        self.max_context = max_context
        self.max_response_frames = max_response_frames
        self.cache_voices = cache_voices
        voice_len = int(max_voice_seconds * self.cfg.frame_rate) + 3 + 256  # frames + transcript tokens
        self.stepper = Stepper(self.model, max_sessions, max_context, backbone_budget(voice_len, max_response_frames),
                               lookahead, compile=compile, cuda_graphs=cuda_graphs)
        self.voices: dict[str, Voice] = {}
        self.sessions: dict[int, Session] = {}
        self._slot_session: dict[int, Session] = {}
        self._responses: dict[int, Response] = {}
        self._ids = itertools.count(1)
        self._jobs: list[_StartJob] = []                  # responses being prefilled, oldest first
        self._windows: deque[tuple[Session, int]] = deque()  # user audio windows waiting to be encoded
        self._asr_jobs: list[_AsrJob] = []                # transcriptions, lowest priority
        self._asr_cache = None                            # the reasoner's cache row for transcription
        self.prefill_chunk = 64                           # reasoner positions per background slice
        self._cmds: queue.Queue = queue.Queue()
        self._closed = False
        self.frames_generated = 0
        self.step_failures = 0            # frame steps failed in a row
        self.last_error: str | None = None
        self.threads = threads if threads is not None else default_threads(self.model)
        self._thread = threading.Thread(target=self._loop, name="openchroma-engine", daemon=True)
        self._thread.start()
        # Every variant of the step runs once now, on the worker with its own thread settings (compiled and
        # captured if asked), so no response pays for a first use (compilation, graph capture, or the CPU's
        # kernel set-up for new shapes) mid-stream.
        self._call(self.stepper.warmup, progress and bool(compile or self.stepper.cuda_graphs))
        self._call(self._warm_front_end)

    def _warm_front_end(self) -> None:
        """Pay the first-call costs of the chat template and the audio front end now, not in a live stream."""
        messages = [{"role": "system", "content": [{"type": "text", "text": DEFAULT_SYSTEM_PROMPT}]},
                    {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "hello"}]}]
        build_chat_prompt(self.tokenizer, messages, [8])
        mel = StreamingMelExtractor()
        mel.push(torch.zeros(USER_RATE))
        mel.finalize()

    @classmethod
    def from_pretrained(cls, model: str, device=None, dtype="float32", progress: bool = True,
                        quantize: str | None = None, **kw) -> Engine:
        lm = load(model, device=device, dtype=dtype, progress=progress, quantize=quantize)
        return cls(_Loaded(lm, ChatTokenizer.from_dir(lm.path)), progress=progress, **kw)

    @property
    def sample_rate(self) -> int:
        return self.cfg.sample_rate

    # ----- public API -------------------------------------------------------------------------------
    def register_voice(self, name: str, audio, transcript: str, sample_rate: int | None = None) -> Voice:
        """Clone a voice once: its codes and the backbone's cache over its prompt are reused by every response."""
        if not name:
            raise EngineError("a voice needs a name")
        if not transcript or not transcript.strip():
            raise EngineError("the voice's transcript is empty")
        wav = load_audio(audio, self.sample_rate, source_rate=sample_rate, max_seconds=MAX_VOICE_SECONDS)
        # Encoding runs here, in the caller's thread, so the frame loop keeps streaming meanwhile.
        with torch.inference_mode(), self._beside_live_streams():
            prompt = encode_voice(self.model, wav, self.tokenizer.encode(transcript))
        return self.add_voice(name, prompt, transcript)

    def add_voice(self, name: str, prompt: VoicePrompt, transcript: str = "") -> Voice:
        """Register a voice from precomputed codes (e.g. loaded from a voice library)."""
        with self._beside_live_streams():
            voice = self._build_voice(name, prompt, transcript)
        return self._call(self._insert_voice, voice)

    def remove_voice(self, name: str) -> None:
        self._call(self.voices.pop, name, None)

    def encode_voice(self, audio, transcript: str, sample_rate: int | None = None) -> VoicePrompt:
        """Mimi-encode reference audio and tokenize its transcript (to store, then ``add_voice`` later)."""
        if not transcript or not transcript.strip():
            raise EngineError("the voice's transcript is empty")
        wav = load_audio(audio, self.sample_rate, source_rate=sample_rate, max_seconds=MAX_VOICE_SECONDS)
        with torch.inference_mode(), self._beside_live_streams():
            return encode_voice(self.model, wav, self.tokenizer.encode(transcript))

    def _beside_live_streams(self):
        """Work done in a caller's thread while responses stream: on the CPU, one intra-op thread, so it takes
        one core and leaves the other to the frame loop (torch's setting is per thread; restored after)."""
        return intra_op_threads(1 if self.stepper.device.type == "cpu" and self.stepper.active else None)

    def transcribe(self, audio, sample_rate: int | None = None, max_tokens: int | None = None) -> Transcription:
        """Transcribe user audio (path, bytes or array) with the reasoner; returns a stream of ``TextDelta``
        events ending with ``TranscriptionDone``. The audio is encoded in the caller's thread."""
        wav = load_audio(audio, USER_RATE, source_rate=sample_rate)
        with torch.inference_mode(), self._beside_live_streams():
            feats = log_mel_features(wav)
            enc = self.model.thinker.audio_tower
            embeds = enc(feats.to(enc.conv1.weight.device, enc.conv1.weight.dtype))
        out = Transcription(self)
        self._call(self._add_transcription, _AsrJob(out, None, embeds, _asr_max_tokens(wav.shape[0] / USER_RATE,
                                                                                         max_tokens)))
        return out

    def create_session(self, voice: str | None, system_prompt: str | None = None,
                       sampling: SamplingParams | None = None) -> Session:
        return self._call(self._create_session, voice, system_prompt or DEFAULT_SYSTEM_PROMPT,
                          sampling or SamplingParams())

    async def create_async_session(self, voice: str | None, system_prompt: str | None = None,
                                   sampling: SamplingParams | None = None) -> AsyncSession:
        """``create_session`` for asyncio code: the session's commands are awaited (see ``AsyncSession``)."""
        return await asyncio.wrap_future(self._submit(
            self._create_session, voice, system_prompt or DEFAULT_SYSTEM_PROMPT, sampling or SamplingParams(),
            AsyncSession))

    @property
    def closed(self) -> bool:
        return self._closed

    def problem(self) -> str | None:
        """Why the engine cannot serve now (closed, its worker stopped, its frame steps keep failing), or None."""
        if self._closed:
            return "the engine is closed"
        if not self._thread.is_alive():
            return "the engine's worker thread has stopped"
        if not self.healthy:
            return f"the engine's frame steps keep failing ({self.last_error})"
        return None

    async def run(self, fn, *args):
        """Await ``fn(*args)`` run on the worker, between frames (for changes to tables the worker reads)."""
        return await asyncio.wrap_future(self._submit(fn, *args))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._cmds.put(None)
            self._thread.join(timeout=10)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----- worker plumbing ----------------------------------------------------------------------------
    def _submit(self, fn, *args) -> Future:
        if self._closed:
            raise EngineError("the engine is closed")
        fut: Future = Future()
        self._cmds.put((fn, args, fut))
        return fut

    def _call(self, fn, *args):
        if threading.current_thread() is self._thread:
            return fn(*args)
        return self._submit(fn, *args).result()

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        if self.threads:
            torch.set_num_threads(self.threads)   # this thread's own setting
        step_seconds = 0.0   # how long the last frame step took: the slice every other kind of work gets
        while True:
            live = self.stepper.active
            # 1. Commands: all of them when nothing streams; about one step's worth when something does.
            t0 = time.perf_counter()
            block = not live and not self._jobs and not self._windows and not self._asr_jobs
            while True:
                try:
                    item = self._cmds.get(block=block)
                except queue.Empty:
                    break
                block = False
                if item is None:
                    self._fail_all("the engine was closed")
                    return
                fn, args, fut = item
                if not fut.set_running_or_notify_cancel():
                    continue  # the caller gave up on it (a cancelled future must not be answered)
                try:
                    with torch.inference_mode():
                        fut.set_result(fn(*args))
                except (StopIteration, StopAsyncIteration) as e:   # an asyncio future refuses these: say it plainly
                    fut.set_exception(RuntimeError(f"{getattr(fn, '__name__', fn)!s} raised {type(e).__name__}"))
                except BaseException as e:  # reported to the caller; the engine goes on
                    fut.set_exception(e)
                if live and time.perf_counter() - t0 > step_seconds * SLICE:
                    break
            # 2. One frame for every generating response.
            if self.stepper.active:
                t1 = time.perf_counter()
                try:
                    outs = self.stepper.step()
                except Exception as e:  # the whole batch's step failed: never leave callers hanging
                    self.step_failures += 1
                    self.last_error = f"generation failed: {type(e).__name__}: {e}"
                    self._fail_all(self.last_error, keep_jobs=True)
                    continue
                self.step_failures = 0
                step_seconds = time.perf_counter() - t1
                for out in outs:
                    try:
                        self._deliver(out)
                    except Exception as e:  # this response's own failure: it ends, its neighbours go on
                        self._fail_row(out.slot, f"{type(e).__name__}: {e}")
            # 3. Background work in slices: one between frames while streams are live, back to back otherwise.
            with torch.inference_mode():
                try:
                    while self._background_slice():
                        if self._cmds.qsize() or self.stepper.active:
                            break
                except Exception as e:  # a bug outside any one job's guard: never let it stop the worker
                    log.exception("background work failed")
                    self.last_error = f"background work failed: {type(e).__name__}: {e}"
                    self._fail_all(self.last_error)

    @property
    def healthy(self) -> bool:
        """False once frame steps keep failing (three in a row): the engine cannot serve; see ``last_error``."""
        return not self._closed and self.step_failures < 3

    def _fail_all(self, message: str, keep_jobs: bool = False) -> None:
        if not keep_jobs:
            for job in self._jobs:
                self._responses.pop(job.session.slot, None)
                self._fail(job.response, message)
            self._jobs.clear()
        for slot in list(self.stepper.rows):
            self._fail_row(slot, message)

    def _fail_row(self, slot: int, message: str) -> None:
        self.stepper.rows.pop(slot, None)
        resp = self._responses.pop(slot, None)
        if resp is not None and resp.done is None:
            self._fail(resp, message)

    @staticmethod
    def _fail(resp: Response, message: str) -> None:
        resp.done = ResponseDone(resp._text, resp.tokens, "error", resp.frames, error=message)
        resp._emit(resp.done)

    # ----- background work (on the worker, between frames) ---------------------------------------------
    def _background_slice(self) -> bool:
        """Do one bounded piece of pending work; False when there is none."""
        for job in self._jobs:  # responses waiting to start come first: their first audio depends on it
            pending = next((a for a in job.session.audio_embeds if isinstance(a, _PendingAudio)), None)
            if pending is not None:
                self._guarded(job, self._encode_pending_audio, job.session, pending)
                return True
        while self._windows:  # audio of turns still being spoken
            s, i = self._windows.popleft()
            if not s.closed and i < len(s._windows) and s._windows[i][1] is None:
                feats = s._windows[i][0]
                s._windows[i] = (feats, self._encode_window(feats))
                return True
        if self._jobs:
            self._prefill_slice()
            return True
        if self._asr_jobs:
            self._transcribe_slice(self._asr_jobs[0])
            return True
        return False

    def _guarded(self, job: _StartJob, fn, *args) -> None:
        """Run ``fn``; if it fails, only ``job``'s response fails (with the reason), and the engine goes on."""
        try:
            fn(*args)
        except Exception as e:
            if job in self._jobs:
                self._jobs.remove(job)
            self._responses.pop(job.session.slot, None)
            self._fail(job.response, f"{type(e).__name__}: {e}")

    def _encode_window(self, feats: torch.Tensor) -> torch.Tensor:
        enc = self.model.thinker.audio_tower
        p = enc.conv1.weight
        return enc.encode_windows(feats.to(p.device, p.dtype))

    def _encode_pending_audio(self, s: Session | None, pending: _PendingAudio) -> None:
        """One slice of a finished audio part: first its exact whole-turn features (windows encoded while the
        user spoke are kept where the final features equal theirs), then one window at a time."""
        w = self.model.thinker.audio_tower.window
        if pending.feats is None:
            feats = pending.feats = pending.mel.finalize()
            assert audio_token_count(feats.shape[1]) == pending.tokens
            outs: list[torch.Tensor | None] = []
            for i, (used, out) in enumerate(pending.windows):
                final = feats[:, i * w:(i + 1) * w]
                if out is None or final.shape != used.shape or not torch.equal(final, used):
                    break  # the turn's loudest frame moved the floor: this window and the rest are redone
                outs.append(out)
            pending.outs = outs + [None] * (-(-feats.shape[1] // w) - len(outs))
            pending.mel = pending.windows = None
        else:
            i = pending.outs.index(None)
            pending.outs[i] = self._encode_window(pending.feats[:, i * w:(i + 1) * w])
        if None not in pending.outs:
            embeds = self.model.thinker.audio_tower.pool_project(torch.cat(pending.outs, dim=0))
            assert embeds.shape[0] == pending.tokens
            pending.embeds = embeds
            if s is not None and any(a is pending for a in s.audio_embeds):
                s.audio_embeds[next(i for i, a in enumerate(s.audio_embeds) if a is pending)] = embeds

    def _prefill_slice(self) -> None:
        """One chunk of the reasoner's prefill for every response waiting to start, in one batch."""
        ready = [j for j in self._jobs if not any(isinstance(a, _PendingAudio) for a in j.session.audio_embeds)]
        chunks = []
        for job in ready:
            if job.embeds is None:
                job.embeds = self._embed_ids(job.session, job.ids, job.start)
            n = min(self.prefill_chunk, job.embeds.shape[0] - job.done)
            chunks.append((job.session.slot, job.embeds[job.done:job.done + n], job.start + job.done))
        try:
            hidden = self.stepper.thinker_prefill(chunks)
        except Exception as e:
            for job in ready:
                self._guarded(job, _reraise, e)
            return
        for job, (_, chunk, _), h_last in zip(ready, chunks, hidden, strict=True):
            job.done += chunk.shape[0]
            job.session.ctx_ids = job.ids[:job.start + job.done]
            if job.done == job.embeds.shape[0]:
                self._jobs.remove(job)
                self._guarded(job, self._start_response, job, h_last)

    # ----- transcription (background slices, lowest priority) ----------------------------------------------
    def _transcribe_part(self, s: Session, part: int, max_tokens: int | None) -> Transcription:
        self._check_open(s)
        if not s.audio_embeds:
            raise EngineError("no committed user audio to transcribe: commit the audio buffer first")
        try:
            audio = s.audio_embeds[part]
        except IndexError:
            raise EngineError(f"no audio part {part}: this conversation has {len(s.audio_embeds)}") from None
        tokens = audio.tokens if isinstance(audio, _PendingAudio) else audio.shape[0]
        out = Transcription(self)
        self._add_transcription(_AsrJob(out, s, audio, _asr_max_tokens(tokens / 25.0, max_tokens)))
        return out

    def _add_transcription(self, job: _AsrJob) -> None:
        self._asr_jobs.append(job)

    def _transcribe_slice(self, job: _AsrJob) -> None:
        """One piece of a transcription: an audio window, a prefill chunk, or one token."""
        try:
            if isinstance(job.audio, _PendingAudio):
                if job.audio.embeds is None:
                    self._encode_pending_audio(job.session, job.audio)
                    return
                job.audio = job.audio.embeds
            tm = self.model.thinker.model
            if job.embeds is None:
                job.ids = build_chat_prompt(self.tokenizer, ASR_MESSAGES, [job.audio.shape[0]])
                if len(job.ids) + 1 > self.max_context:
                    raise ContextFull(f"the audio is too long to transcribe within the {self.max_context}-token "
                                      "context")
                job.max_tokens = min(job.max_tokens, self.max_context - len(job.ids))
                ids = torch.tensor(job.ids, device=self.stepper.device)[None]
                job.embeds = self.model.thinker.embed(ids, job.audio.to(self.stepper.dtype))[0]
                if self._asr_cache is None:
                    self._asr_cache = tm.new_cache(1, self.max_context)
            dev = self.stepper.device
            if job.done < job.embeds.shape[0]:
                n = min(self.prefill_chunk, job.embeds.shape[0] - job.done)
                pos = torch.arange(job.done, job.done + n, device=dev)[None]
                h = tm(job.embeds[None, job.done:job.done + n], pos, self._asr_cache, kv_len=job.done + n)[0, -1]
                job.done += n
                if job.done < job.embeds.shape[0]:
                    return
            else:
                pos = len(job.ids) + len(job.out.tokens) - 1
                x = tm.embed_tokens(torch.tensor([[job.out.tokens[-1]]], device=dev))
                h = tm(x, torch.tensor([[pos]], device=dev), self._asr_cache, kv_len=pos + 1)[0, -1]
            token = int(self.model.thinker_logits(h).argmax(-1))
            out = job.out
            if token in (self.cfg.im_end_token_id, ENDOFTEXT_ID):
                return self._end_transcription(job)
            out.tokens.append(token)
            delta = out._detok.push(token)
            if delta:
                out.text += delta
                out._emit(TextDelta(delta, token))
            if len(out.tokens) >= job.max_tokens:
                self._end_transcription(job)
        except Exception as e:
            self._end_transcription(job, f"{type(e).__name__}: {e}")

    def _end_transcription(self, job: _AsrJob, error: str | None = None) -> None:
        self._asr_jobs.remove(job)
        out = job.out
        rest = out._detok.flush()
        if rest:
            out.text += rest
            out._emit(TextDelta(rest, out.tokens[-1] if out.tokens else -1))
        out.done = TranscriptionDone(out.text.strip(), list(out.tokens), error)
        out._emit(out.done)

    def _start_response(self, job: _StartJob, h_last: torch.Tensor) -> None:
        s, voice = job.session, job.voice
        first = job.forced[0] if job.forced else int(self.model.thinker_logits(h_last).argmax(-1))
        if voice.kv is not None:
            self.stepper.load_backbone_rows(s.slot, *voice.kv)
        else:
            self.stepper.backbone_prefill([(s.slot, voice.embeds, 0)])
        job.response.t_started = time.perf_counter()
        job.response.row = self.stepper.start(s.slot, voice.length, h_last, first, len(job.ids), job.sampling,
                                              job.max_frames, job.forced)

    # ----- commands (run on the worker) ---------------------------------------------------------------
    def _voice_embeds(self, prompt: VoicePrompt) -> torch.Tensor:
        return self.model.voice_prompt_embeds(prompt.text_ids, prompt.codes).to(self.stepper.dtype)

    @torch.inference_mode()
    def _build_voice(self, name: str, prompt: VoicePrompt, transcript: str) -> Voice:
        """The voice's backbone prompt and, cached, its keys/values: computed in the caller's thread on a cache
        of its own, so registering a voice never stalls the frame loop."""
        embeds = self._voice_embeds(prompt)
        voice = Voice(name, transcript, prompt, embeds)
        if self.cache_voices:
            bb = self.model.backbone.model
            cache = bb.new_cache(1, embeds.shape[0])
            bb(embeds[None], torch.arange(embeds.shape[0], device=embeds.device)[None], cache)
            voice.kv = (cache.k[:, 0], cache.v[:, 0])
        return voice

    def _insert_voice(self, voice: Voice) -> Voice:
        self.voices[voice.name] = voice
        return voice

    def _check_message(self, role: str, text: str) -> None:
        if role not in ("user", "assistant", "system"):
            raise EngineError(f"unknown role {role!r}: expected user, assistant or system")
        if not isinstance(text, str) or not text.strip():
            raise EngineError(f"the {role} text is empty")
        self._check_text_size(text, f"the {role} text")

    def _check_text_size(self, text: str, what: str) -> None:
        """Refuse text that cannot fit the context before anyone tokenizes it (a token is at least a byte of
        UTF-8 for all but a few characters, so this bound is loose but cheap)."""
        limit = self.max_context * 8
        if len(text) > limit:
            raise ContextFull(f"{what} is {len(text)} characters; at most {limit} fit this engine's "
                              f"{self.max_context}-token context")

    def _unknown_voice(self, voice: str) -> UnknownVoice:
        return UnknownVoice(f"unknown voice {voice!r} (registered: {', '.join(sorted(self.voices)) or 'none'})")

    def _create_session(self, voice: str | None, system_prompt: str, sampling: SamplingParams,
                        kind: type[Session] = Session) -> Session:
        if voice is not None and voice not in self.voices:
            raise self._unknown_voice(voice)
        free = [s for s in range(self.max_sessions) if s not in self._slot_session]
        if not free:
            raise SessionLimit(f"all {self.max_sessions} sessions are in use; try again later")
        s = kind(self, next(self._ids), free[0], voice, system_prompt, sampling)
        self.sessions[s.id] = s
        self._slot_session[s.slot] = s
        return s

    def _close_session(self, s: Session) -> None:
        self._cancel(s)
        self.stepper.rows.pop(s.slot, None)
        self._jobs = [j for j in self._jobs if j.session is not s]
        resp = self._responses.pop(s.slot, None)
        if resp is not None and resp.done is None:
            self._finish(resp, "cancelled")
        s.closed = True
        self.sessions.pop(s.id, None)
        self._slot_session.pop(s.slot, None)

    def _check_open(self, s: Session) -> None:
        if s.closed:
            raise EngineError(f"session {s.id} is closed")

    def _append_audio(self, s: Session, wav: torch.Tensor, rate: int) -> None:
        self._check_open(s)
        if not s._turn_parts or s._turn_parts[-1]["type"] != "audio":
            s._turn_parts.append({"type": "audio"})
        if rate != s._resampler_rate:
            self._flush_resampler(s)
            s._resampler_rate = rate
            s._resampler = None if rate == USER_RATE else soxr.ResampleStream(rate, USER_RATE, 1, dtype="float32",
                                                                               quality="HQ")
        if s._resampler is not None:
            wav = torch.from_numpy(s._resampler.resample_chunk(wav.numpy()))
        self._push_mel(s, wav)

    def _flush_resampler(self, s: Session) -> None:
        if s._resampler is not None:
            self._push_mel(s, torch.from_numpy(s._resampler.resample_chunk(np.zeros(0, np.float32), last=True)))
            s._resampler = None
            s._resampler_rate = USER_RATE

    def _push_mel(self, s: Session, wav16: torch.Tensor) -> None:
        if not wav16.numel():
            return
        if not s._turn_parts or s._turn_parts[-1]["type"] != "audio" or s._turn_parts[-1].get("done"):
            s._turn_parts.append({"type": "audio"})
        raw = s._mel.push(wav16)
        if raw.shape[1]:
            s._raw.append(raw)
            s._raw_frames += raw.shape[1]
        self._encode_ready_windows(s)

    def _clear_audio(self, s: Session) -> None:
        s._turn_parts = [p for p in s._turn_parts if p["type"] != "audio" or p.get("done")]
        # The resampler's buffered tail belongs to the cleared audio: drop it, never flush it into the next turn.
        s._resampler, s._resampler_rate = None, USER_RATE
        self._reset_audio(s)

    def _reset_audio(self, s: Session) -> None:
        s._mel.reset()
        s._raw, s._raw_frames, s._windows = [], 0, []

    def _encode_ready_windows(self, s: Session) -> None:
        """Queue every completed attention window of the user's audio, to be encoded between frames while
        they are still speaking."""
        w = self.model.thinker.audio_tower.window
        if s._raw_frames < (len(s._windows) + 1) * w:
            return
        raw = torch.cat(s._raw, dim=1)
        s._raw = [raw]
        peak = raw.max()
        while s._raw_frames >= (len(s._windows) + 1) * w:
            i = len(s._windows)
            s._windows.append((normalize_log_mel(raw[:, i * w:(i + 1) * w], peak), None))
            self._windows.append((s, i))

    def _finish_audio_part(self, s: Session) -> None:
        """The user's audio part is complete. Its exact whole-turn features and the windows they change are
        computed later, in background slices (see ``_encode_pending_audio``); its token count is known now."""
        self._flush_resampler(s)
        if s._mel.num_samples == 0:
            return
        frames = -(-s._mel.num_samples // HOP_LENGTH)
        pending = _PendingAudio(audio_token_count(frames), s._mel, s._windows)
        part = next(pt for pt in reversed(s._turn_parts) if pt["type"] == "audio")
        part["done"] = True
        part["tokens"] = pending.tokens
        s.audio_embeds.append(pending)
        s._mel = StreamingMelExtractor()   # the finished part keeps its extractor; the next one starts afresh
        s._raw, s._raw_frames, s._windows = [], 0, []

    def _commit_audio(self, s: Session, item_id: str | None = None) -> float:
        self._check_open(s)
        if s._mel.num_samples == 0 and s._resampler is None:
            raise EngineError("the input audio buffer is empty: nothing to commit")
        self._flush_resampler(s)
        secs = s._mel.num_samples / USER_RATE
        self._finish_audio_part(s)
        if item_id is not None:
            self._end_turn(s, item_id)
        return secs

    def _end_turn(self, s: Session, item_id: str | None) -> bool:
        self._check_open(s)
        self._check_new_id(s, item_id)
        n = len(s.messages)
        self._close_turn(s)
        if len(s.messages) == n:
            return False
        if item_id is not None:
            s.messages[-1]["id"] = item_id
        return True

    @staticmethod
    def _check_new_id(s: Session, item_id: str | None) -> None:
        if item_id is not None and any(m.get("id") == item_id for m in s.messages):
            raise EngineError(f"the conversation already has a message with id {item_id!r}")

    @staticmethod
    def _message_index(s: Session, index: int | str) -> int:
        if isinstance(index, str):
            found = next((i for i, m in enumerate(s.messages) if m.get("id") == index), None)
            if found is None:
                raise EngineError(f"no message with id {index!r} in this conversation")
            return found
        return index

    def _set_voice(self, s: Session, voice: str) -> None:
        self._check_open(s)
        if voice not in self.voices:
            raise self._unknown_voice(voice)
        s.voice = voice

    def _set_instructions(self, s: Session, text: str) -> None:
        self._check_open(s)
        s.system_prompt = text
        s.messages[0] = {"role": "system", "content": [{"type": "text", "text": text}]}

    def _close_turn(self, s: Session) -> None:
        """Move the user's pending parts into a user message."""
        self._finish_audio_part(s)
        if s._turn_parts:
            s.messages.append({"role": "user", "content": [
                {"type": p["type"], **({"text": p["text"]} if p["type"] == "text" else {})} for p in s._turn_parts]})
            s._turn_parts = []

    def _add_message(self, s: Session, role: str, text: str, item_id: str | None = None) -> None:
        self._check_open(s)
        if s.slot in self._responses and role != "user":
            raise EngineError(f"session {s.id} is responding; wait for the response or cancel it first")
        self._check_new_id(s, item_id)
        if item_id is None:
            self._close_turn(s)   # a message with an id stands alone; the user's open turn stays open
        s.messages.append(_message(role, text, item_id))

    def _editable(self, s: Session, index: int, end: int) -> None:
        self._check_open(s)
        if s.slot in self._responses:
            raise EngineError(f"session {s.id} is responding; wait for the response or cancel it first")
        if not isinstance(index, int) or isinstance(index, bool) or not 1 <= index <= end:
            raise EngineError(f"message index must be between 1 and {end} (0 is the system prompt), got {index!r}")

    def _insert_message(self, s: Session, index: int | str, role: str, text: str, item_id: str | None = None) -> None:
        self._check_open(s)
        self._check_new_id(s, item_id)
        # The user's open turn (audio still arriving) is not in the history yet; edits leave it as it is.
        index = self._message_index(s, index) + 1 if isinstance(index, str) else index
        self._editable(s, index, len(s.messages))
        s.messages.insert(index, _message(role, text, item_id))

    def _delete_message(self, s: Session, index: int | str) -> None:
        self._check_open(s)
        index = self._message_index(s, index)
        self._editable(s, index, len(s.messages) - 1)
        before = sum(1 for m in s.messages[:index] for part in m["content"] if part.get("type") == "audio")
        n = sum(1 for part in s.messages[index]["content"] if part.get("type") == "audio")
        del s.audio_embeds[before:before + n]
        s.spoken.pop(s.messages[index].get("id"), None)
        del s.messages[index]

    def _truncate_response(self, s: Session, audio_ms: float, item_id: str | None = None) -> str:
        self._check_open(s)
        if item_id is None:
            resp = s.response
            if resp is None or resp.done is None:
                raise EngineError("no finished response to truncate")
            at = next((i for i, m in enumerate(s.messages) if m is resp.message), None)
            if at is None:
                raise EngineError("the response's message is no longer in the history: nothing to truncate")
            spoken = (resp.tokens, resp.token_frames)
        else:
            at = self._message_index(s, item_id)
            spoken = s.spoken.get(item_id)
            if spoken is None:   # a message the client wrote: no audio to cut
                return s.messages[at]["content"][0].get("text", "")
        frame_ms = 1000 * self.cfg.audio_frame_freq / self.sample_rate
        frames = max(0, int(audio_ms // frame_ms))
        text = self._spoken_text([t for t, f in zip(*spoken, strict=True) if f < frames])
        old = s.messages[at]
        s.messages[at] = _message("assistant", text, old.get("id"))
        if s.response is not None and s.response.message is old:
            s.response.message = s.messages[at]
        return text

    def _add_text(self, s: Session, text: str) -> None:
        self._check_open(s)
        self._finish_audio_part(s)
        s._turn_parts.append({"type": "text", "text": text})

    def _prompt(self, s: Session, messages: list[dict[str, Any]] | None = None) -> list[int]:
        """The reasoner's input for ``messages`` (default: the history); their audio parts are the first of the
        session's audio embeddings (parts of an open turn come after the history's)."""
        messages = s.messages if messages is None else messages
        n_audio = sum(1 for m in messages for part in m["content"] if part.get("type") == "audio")
        counts = [e.tokens if isinstance(e, _PendingAudio) else e.shape[0] for e in s.audio_embeds[:n_audio]]
        return build_chat_prompt(self.tokenizer, messages, counts)

    def _embed_ids(self, s: Session, ids: list[int], start: int) -> torch.Tensor:
        """Reasoner input vectors for ``ids[start:]``; ``<|AUDIO|>`` tokens take the session's audio embeddings."""
        dev = self.stepper.device
        tail = torch.tensor(ids[start:], device=dev)
        audio_id = self.cfg.audio_token_index
        first_audio = sum(1 for t in ids[:start] if t == audio_id)
        n_audio = int((tail == audio_id).sum())
        audio = None
        if n_audio:
            audio = torch.cat(s.audio_embeds, dim=0)[first_audio:first_audio + n_audio]
        return self.model.thinker.embed(tail[None], audio)[0]

    def _respond(self, s: Session, max_frames: int | None, forced_text: str | None,
                 sampling: SamplingParams | None, over: _Overrides | None = None) -> Response:
        over = over or _Overrides()
        self._check_open(s)
        if s.slot in self._responses:
            raise EngineError(f"session {s.id} is already responding; cancel it first")
        name = over.voice or s.voice
        voice = self.voices.get(name) if name is not None else None
        if voice is None:
            raise self._unknown_voice(name) if name is not None else UnknownVoice(
                "no voice chosen for this session: register one and select it first")
        if not over.out_of_band:
            self._close_turn(s)  # with no user input at all, the model answers the instructions alone (a greeting)
        system = s.messages[0] if over.instructions is None else {
            "role": "system", "content": [{"type": "text", "text": over.instructions}]}
        if over.messages is not None:
            conversation = [system] + [{"role": m["role"], "content": [{"type": "text", "text": m["text"]}]}
                                       for m in over.messages]
        else:
            conversation = [system] + s.messages[1:]
        ids = self._prompt(s, conversation)
        forced = None
        if forced_text is not None:
            forced = self.tokenizer.encode(forced_text) + [self.cfg.im_end_token_id]
        max_frames = min(max_frames or self.max_response_frames, self.max_response_frames)
        answer = reasoner_budget(0, max_frames, self.stepper.lookahead)
        # A full context forgets the oldest turns (the system prompt and the voice stay), as a person would.
        while len(ids) + answer > self.max_context and over.messages is None and self._forget_oldest_turn(s):
            conversation = [system] + s.messages[1:]
            ids = self._prompt(s, conversation)
        if len(ids) + answer > self.max_context:
            raise ContextFull(f"this turn ({len(ids)} tokens with the instructions) leaves no room to answer within "
                              f"the {self.max_context}-token context")
        # Reuse what the reasoner's cache already holds (earlier turns, audio encoded while it arrived).
        common = 0
        for a, b in zip(s.ctx_ids, ids, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)
        s.ctx_ids = ids[:common]
        # The prefill runs in slices between frames (see _loop); the response starts when it is done.
        resp = Response(self, s)
        resp.out_of_band = over.out_of_band
        resp.t_start = over.t_start or resp.t_start
        resp.item_id = over.item_id
        resp.history_index = len(s.messages)
        self._responses[s.slot] = resp
        if not over.out_of_band:
            s.response = resp
        self._jobs.append(_StartJob(s, resp, voice, ids, common, forced, max_frames, sampling or s.sampling))
        return resp

    @staticmethod
    def _forget_oldest_turn(s: Session) -> bool:
        """Drop the oldest user turn and what followed it up to the next one; False if only the current turn is
        left. Its audio parts' embeddings go with it."""
        if len(s.messages) < 3:
            return False
        end = next((i for i in range(2, len(s.messages)) if s.messages[i]["role"] == "user"), len(s.messages) - 1)
        end = max(end, 2)
        dropped = s.messages[1:end]
        n_audio = sum(1 for m in dropped for part in m["content"] if part.get("type") == "audio")
        del s.messages[1:end]
        del s.audio_embeds[:n_audio]
        for m in dropped:
            s.spoken.pop(m.get("id"), None)
        return True

    def _cancel(self, s: Session) -> None:
        job = next((j for j in self._jobs if j.session is s), None)
        if job is not None:  # not started yet: it ends here, having said nothing
            self._jobs.remove(job)
            self._finish(job.response, "cancelled")
        self.stepper.cancel(s.slot)

    def _deliver(self, out: StepOutput) -> None:
        resp = self._responses.get(out.slot)
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
            resp._emit(AudioChunk(out.audio.numpy(), resp.frames, self.sample_rate, time.perf_counter()))
            resp.frames += 1
            self.frames_generated += 1
        if out.finished:
            self._finish(resp, out.finished)

    def _spoken_text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode([t for t in tokens if t != self.cfg.im_end_token_id])

    def _finish(self, resp: Response, reason: str) -> None:
        s = resp.session
        self._responses.pop(s.slot, None)
        row = getattr(resp, "row", None)
        # The reasoner's cache holds the prompt and the tokens it consumed; history keeps what was spoken.
        if row is not None:
            s.ctx_ids = s.ctx_ids[: row.prompt_len] + row.tokens[: row.thinker_pos - row.prompt_len]
        text = self._spoken_text(resp.tokens)
        if not resp.out_of_band:
            # At the place the response began: user messages added while it spoke come after it.
            resp.message = _message("assistant", text, resp.item_id)
            s.messages.insert(min(resp.history_index, len(s.messages)), resp.message)
            if resp.item_id is not None:
                s.spoken[resp.item_id] = (list(resp.tokens), list(resp.token_frames))
        now = time.perf_counter()
        secs = resp.frames * self.cfg.audio_frame_freq / self.sample_rate
        timings = {"ttft_ms": (resp.t_first_audio - resp.t_start) * 1000 if resp.t_first_audio else float("nan"),
                   "seconds": now - resp.t_start, "audio_seconds": secs,
                   "rtf": (now - resp.t_start) / secs if secs else float("nan")}
        if resp.t_started is not None and resp.t_first_audio is not None:
            # TTFT in two parts, as the paper reports it: up to the reasoner's first token (user audio encoding,
            # prefill, queueing), then the first frame (backbone, decoder, codec).
            timings["reasoner_prefill_ms"] = (resp.t_started - resp.t_start) * 1000
            timings["first_frame_ms"] = (resp.t_first_audio - resp.t_started) * 1000
        codes = torch.stack(resp.codes) if resp.codes else torch.zeros(0, self.cfg.audio_num_codebooks,
                                                                     dtype=torch.long)
        prompt = s.ctx_ids[: row.prompt_len] if row is not None else []
        usage = Usage(len(prompt), sum(1 for t in prompt if t == self.cfg.audio_token_index), len(resp.tokens),
                      resp.frames, secs)
        resp.done = ResponseDone(text, list(resp.tokens), reason, resp.frames, timings, codes, usage=usage)
        resp._emit(resp.done)


def _message(role: str, text: str, item_id: str | None = None) -> dict[str, Any]:
    """A text message of the history; ``id`` is the client's name for it (realtime conversation items)."""
    m: dict[str, Any] = {"role": role, "content": [{"type": "text", "text": text}]}
    if item_id is not None:
        m["id"] = item_id
    return m


@dataclass
class _Overrides:
    """What one response changes for itself only (``Session.respond``'s keyword arguments)."""

    voice: str | None = None
    instructions: str | None = None
    out_of_band: bool = False
    messages: list[dict[str, str]] | None = None
    item_id: str | None = None
    t_start: float | None = None          # when the caller asked


@dataclass(eq=False)
class _PendingAudio:
    """A finished user audio part on its way to embeddings: its mel extractor and the windows encoded while
    the user spoke, then its final features and windows (``None`` entries still to encode), then ``embeds``."""

    tokens: int
    mel: StreamingMelExtractor | None
    windows: list | None
    feats: torch.Tensor | None = None
    outs: list[torch.Tensor | None] | None = None
    embeds: torch.Tensor | None = None


# What the reasoner is asked to transcribe user audio (Qwen2.5-Omni transcribes when asked like this).
ASR_MESSAGES = [
    {"role": "system", "content": [{"type": "text", "text": "You are a speech recognition model."}]},
    {"role": "user", "content": [{"type": "audio"},
                                 {"type": "text", "text": "Transcribe the audio into text, exactly as spoken."}]},
]


def _asr_max_tokens(seconds: float, asked: int | None) -> int:
    if asked is not None:
        if asked < 1:
            raise EngineError(f"max_tokens must be >= 1, got {asked}")
        return asked
    return int(seconds * 8) + 16   # speech is about 3 words a second; generous for tokens and languages


@dataclass(eq=False)
class _AsrJob:
    out: Transcription
    session: Session | None
    audio: torch.Tensor | _PendingAudio
    max_tokens: int
    ids: list[int] | None = None
    embeds: torch.Tensor | None = None
    done: int = 0


@dataclass(eq=False)
class _StartJob:
    """A response waiting for its prefill: ``ids[start + done:]`` is what the reasoner still has to read."""

    session: Session
    response: Response
    voice: Voice
    ids: list[int]
    start: int
    forced: list[int] | None
    max_frames: int
    sampling: SamplingParams
    embeds: torch.Tensor | None = None
    done: int = 0


def _reraise(e: BaseException) -> None:
    raise e


__all__ = ["Engine", "Session", "Response", "Transcription", "TranscriptionDone", "TextDelta", "AudioChunk",
           "ResponseDone", "Voice", "EngineError", "UnknownVoice", "SessionLimit", "ContextFull"]
