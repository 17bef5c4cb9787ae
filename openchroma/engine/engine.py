"""The engine: one loaded model serving many conversations at once.

``Engine`` holds the model, its voices (``voices.py``) and sessions (``session.py``) and answers their
commands; one worker thread (``worker.py``) runs every command, the batched frame step (``stepper.py``) and
the background slices of responses being prepared (``responses.py``), of user audio (``turn_audio.py``) and of
transcriptions (``transcription.py``). A conversation's history and prompt are pure data
(``conversation.py``). A voice's Mimi encoding and backbone prompt, and whole-file transcription's audio
encoding, run in the caller's thread, off the loop.
"""

from __future__ import annotations

import asyncio
import itertools
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from ..audio import AudioError, load_audio, log_mel_features
from ..config import response_frame_limit
from ..constants import REASONER_SAMPLE_RATE
from ..loading import LoadedModel, load
from ..tokenizer import QWEN_OMNI_SYSTEM_PROMPT, ChatTokenizer, PromptBuilder, system_message
from ..voice import MAX_VOICE_SECONDS, VoicePrompt, encode_voice
from .events import (  # noqa: F401  (re-exported: the engine's public names live here too)
    AudioChunk,
    ContextFull,
    ConversationLimit,
    EngineError,
    Response,
    ResponseDone,
    SessionLimit,
    TextDelta,
    Transcription,
    TranscriptionDone,
    UnknownVoice,
    Usage,
)
from .responses import Responses
from .sampling import SamplingParams
from .schedule import DEFAULT_MAX_FRAMES, backbone_budget, frames_heard
from .session import AsyncSession, Overrides, Session
from .stepper import Stepper, default_threads, intra_op_threads
from .transcription import AUDIO_TOKENS_PER_SECOND, AsrJob, asr_max_tokens
from .turn_audio import warm_front_end
from .voices import Voice, VoiceRegistry, max_voice_length
from .worker import Later, Worker

DEFAULT_SYSTEM_PROMPT = QWEN_OMNI_SYSTEM_PROMPT
#: Items (messages after the system prompt) a conversation may hold by default. Every message costs at least
#: 5 tokens of chat-template framing, so the default 4096-token context holds at most about 800 of them:
#: 1000 never refuses a conversation that could be answered, and bounds the memory and work one client causes.
DEFAULT_MAX_CONVERSATION_ITEMS = 1000


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


class Engine:
    """Holds one loaded model, its voices and sessions, and runs the batched frame loop."""

    def __init__(
        self,
        chroma,
        max_sessions: int = 8,
        max_context: int = 4096,
        max_response_frames: int = DEFAULT_MAX_FRAMES,
        max_voice_seconds: float = MAX_VOICE_SECONDS,
        lookahead: int = 2,
        cache_voices: bool = True,
        compile: bool | str = False,
        cuda_graphs: bool | None = None,
        progress: bool = False,
        threads: int | None = None,
        max_conversation_items: int | None = DEFAULT_MAX_CONVERSATION_ITEMS,
    ):
        """``chroma``: a loaded model with its tokenizer (``openchroma.Chroma``, or anything with ``model``,
        ``config`` and ``tokenizer``). ``compile``: compile the frame step with ``torch.compile`` (inductor;
        or a dynamo backend's name). ``cuda_graphs``: capture each variant of the step as a CUDA graph (default:
        on CUDA). Both happen here, before the first session, with a progress bar when ``progress``.
        ``threads``: intra-op CPU threads of the frame loop (default: 1 for models narrower than 1024, whose
        small ops lose more to thread hand-offs than they gain; torch's default for wider ones).
        ``max_conversation_items``: the most messages a conversation holds (None: no limit); adding more raises
        ``ConversationLimit``."""
        if max_conversation_items is not None and max_conversation_items < 1:
            raise ValueError(f"max_conversation_items must be >= 1, got {max_conversation_items}")
        self.chroma = chroma
        self.model = chroma.model
        self.cfg = chroma.config
        self.tokenizer = chroma.tokenizer
        self.prompts = PromptBuilder(self.tokenizer)
        self.max_sessions = max_sessions
        self.max_context = max_context
        self.max_response_frames = max_response_frames
        self.max_conversation_items = max_conversation_items
        self.cache_voices = cache_voices
        self.stepper = Stepper(self.model, max_sessions, max_context,
                               backbone_budget(max_voice_length(max_voice_seconds), max_response_frames),
                               lookahead, compile=compile, cuda_graphs=cuda_graphs)
        self.voices = VoiceRegistry(self.model, self.stepper.dtype, max_voice_seconds, cache_voices)
        self.sessions: dict[int, Session] = {}
        self._slot_session: dict[int, Session] = {}
        self._ids = itertools.count(1)
        self.prefill_chunk = 64                           # reasoner positions per background slice
        self.responses = Responses(self)
        self.threads = threads if threads is not None else default_threads(self.model)
        self.worker = Worker(self.responses, self.threads)
        # Every variant of the step runs once now, on the worker with its own thread settings (compiled and
        # captured if asked), so no response pays for a first use (compilation, graph capture, or the CPU's
        # kernel set-up for new shapes) mid-stream.
        self._call(self.stepper.warmup, progress and bool(compile or self.stepper.cuda_graphs))
        self._call(self._warm_front_end)

    def _warm_front_end(self) -> None:
        """Pay the first-call costs of the chat template and the audio front end now, not in a live stream."""
        self.prompts.build([system_message(), {"role": "user", "content": [{"type": "audio"},
                                                                           {"type": "text", "text": "hello"}]}], [8])
        warm_front_end()

    @classmethod
    def from_pretrained(cls, model: str, device=None, dtype="float32", progress: bool = True,
                        quantize: str | None = None, **kw) -> Engine:
        # A random-weight checkpoint's responses stop after 4 s unless max_response_frames says otherwise.
        kw["max_response_frames"] = response_frame_limit(model, kw.get("max_response_frames"), DEFAULT_MAX_FRAMES)
        lm = load(model, device=device, dtype=dtype, progress=progress, quantize=quantize)
        return cls(_Loaded(lm, ChatTokenizer.from_dir(lm.path)), progress=progress, **kw)

    @property
    def sample_rate(self) -> int:
        return self.cfg.sample_rate

    @property
    def frames_generated(self) -> int:
        return self.responses.frames_generated

    @property
    def step_failures(self) -> int:
        return self.worker.step_failures

    @property
    def last_error(self) -> str | None:
        return self.worker.last_error

    @property
    def step_mode(self) -> dict[str, str | None]:
        """How frames are computed: ``mode`` (``cuda-graphs``, ``compiled`` or ``eager``), why CUDA graphs are off
        when their capture failed (``graph_error``), and the weights' quantization scheme (``quantize``)."""
        lm = getattr(self.chroma, "lm", None)
        return {"mode": self.stepper.mode, "graph_error": self.stepper.graph_error,
                "quantize": getattr(lm, "quantize", None)}

    # ----- voices ---------------------------------------------------------------------------------------------
    def register_voice(self, name: str, audio, transcript: str, sample_rate: int | None = None) -> Voice:
        """Clone a voice once: its codes and the backbone's cache over its prompt are reused by every response."""
        if not name:
            raise EngineError("a voice needs a name")
        return self.add_voice(name, self.encode_voice(audio, transcript, sample_rate), transcript)

    def add_voice(self, name: str, prompt: VoicePrompt, transcript: str = "") -> Voice:
        """Register a voice from precomputed codes (e.g. loaded from a voice library)."""
        with self._beside_live_streams():
            voice = self.voices.build(name, prompt, transcript)
        return self._call(self.voices.insert, voice)

    def remove_voice(self, name: str) -> None:
        self._call(self.voices.pop, name, None)

    def encode_voice(self, audio, transcript: str, sample_rate: int | None = None) -> VoicePrompt:
        """Mimi-encode reference audio and tokenize its transcript (to store, then ``add_voice`` later)."""
        if not transcript or not transcript.strip():
            raise EngineError("the voice's transcript is empty")
        ids = self.tokenizer.encode(transcript)
        self.voices.check(VoicePrompt(torch.tensor(ids, dtype=torch.long), torch.zeros(0, 1, dtype=torch.long)))
        wav = load_audio(audio, self.sample_rate, source_rate=sample_rate, max_seconds=MAX_VOICE_SECONDS)
        # Encoding runs here, in the caller's thread, so the frame loop keeps streaming meanwhile.
        with torch.inference_mode(), self._beside_live_streams():
            return encode_voice(self.model, wav, ids)

    def _beside_live_streams(self):
        """Work done in a caller's thread while responses stream: on the CPU, one intra-op thread, so it takes
        one core and leaves the other to the frame loop (torch's setting is per thread; restored after)."""
        return intra_op_threads(1 if self.stepper.device.type == "cpu" and self.stepper.active else None)

    # ----- transcription ----------------------------------------------------------------------------------------
    def transcribe(self, audio, sample_rate: int | None = None, max_tokens: int | None = None) -> Transcription:
        """Transcribe user audio (path, bytes or array) with the reasoner; returns a stream of ``TextDelta``
        events ending with ``TranscriptionDone``. The audio is encoded in the caller's thread."""
        wav = load_audio(audio, REASONER_SAMPLE_RATE, source_rate=sample_rate)
        limit = asr_max_tokens(wav.shape[0] / REASONER_SAMPLE_RATE, max_tokens)
        with torch.inference_mode(), self._beside_live_streams():
            feats = log_mel_features(wav)
            enc = self.model.thinker.audio_tower
            embeds = enc(feats.to(enc.conv1.weight.device, enc.conv1.weight.dtype))
        return self._call(self.responses.transcriber.add, AsrJob(Transcription(self.tokenizer), embeds, limit))

    def _transcribe_part(self, s: Session, part: int, max_tokens: int | None) -> Transcription:
        self._check_open(s)
        parts = s.conversation.audio
        if not parts:
            raise EngineError("no committed user audio to transcribe: commit the audio buffer first")
        try:
            audio = parts[part]
        except IndexError:
            raise EngineError(f"no audio part {part}: this conversation has {len(parts)}") from None
        limit = asr_max_tokens(audio.tokens / AUDIO_TOKENS_PER_SECOND, max_tokens)
        return self.responses.transcriber.add(AsrJob(Transcription(self.tokenizer), audio, limit))

    # ----- sessions ---------------------------------------------------------------------------------------------
    def create_session(self, voice: str | None, system_prompt: str | None = None,
                       sampling: SamplingParams | None = None) -> Session:
        return self._call(self._create_session, voice, system_prompt or DEFAULT_SYSTEM_PROMPT,
                          sampling or SamplingParams())

    async def create_async_session(self, voice: str | None, system_prompt: str | None = None,
                                   sampling: SamplingParams | None = None) -> AsyncSession:
        """``create_session`` for asyncio code: the session's commands are awaited (see ``AsyncSession``)."""
        return await asyncio.wrap_future(self.submit(
            self._create_session, voice, system_prompt or DEFAULT_SYSTEM_PROMPT, sampling or SamplingParams(),
            AsyncSession))

    def _create_session(self, voice: str | None, system_prompt: str, sampling: SamplingParams,
                        kind: type[Session] = Session) -> Session:
        if voice is not None and voice not in self.voices:
            raise self.voices.unknown(voice)
        free = [s for s in range(self.max_sessions) if s not in self._slot_session]
        if not free:
            raise SessionLimit(f"all {self.max_sessions} sessions are in use; try again later")
        s = kind(self, next(self._ids), free[0], voice, system_prompt, sampling)
        self.sessions[s.id] = s
        self._slot_session[s.slot] = s
        return s

    def _close_session(self, s: Session) -> None:
        self.responses.close_session(s)
        s.closed = True
        self.sessions.pop(s.id, None)
        self._slot_session.pop(s.slot, None)

    # ----- the worker -------------------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self.worker.closed

    @property
    def healthy(self) -> bool:
        """False once frame steps keep failing (three in a row): the engine cannot serve; see ``last_error``."""
        return not self.closed and self.worker.step_failures < 3

    def problem(self) -> str | None:
        """Why the engine cannot serve now (closed, its worker stopped, its frame steps keep failing), or None."""
        if self.closed:
            return "the engine is closed"
        if not self.worker.alive:
            return "the engine's worker thread has stopped"
        if not self.healthy:
            return f"the engine's frame steps keep failing ({self.last_error})"
        return None

    def submit(self, fn, *args) -> Future:
        """Run ``fn(*args)`` on the worker, between frames (for changes to tables the worker reads); returns a
        future of its result."""
        return self.worker.submit(fn, *args)

    async def run(self, fn, *args):
        """Await ``fn(*args)`` run on the worker, between frames (for changes to tables the worker reads)."""
        return await asyncio.wrap_future(self.submit(fn, *args))

    def _call(self, fn, *args):
        return self.worker.call(fn, *args)

    def close(self) -> None:
        self.worker.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----- checks (in the caller's thread) --------------------------------------------------------------------
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

    # ----- session commands (run on the worker) ---------------------------------------------------------------
    def _check_open(self, s: Session) -> None:
        if s.closed:
            raise EngineError(f"session {s.id} is closed")

    def _check_idle(self, s: Session) -> None:
        if s.slot in self.responses.by_slot:
            raise EngineError(f"session {s.id} is responding; wait for the response or cancel it first")

    def _append_audio(self, s: Session, wav: torch.Tensor, rate: int) -> None:
        self._check_open(s)
        self.responses.windows.extend((s, w) for w in s.turn_audio.push(wav, rate))

    def _clear_audio(self, s: Session) -> None:
        s.turn_audio.clear()

    def _finish_audio_part(self, s: Session) -> None:
        """The user's audio part is complete: its token count is known now, its exact whole-turn features and
        the windows they change are computed later, in background slices."""
        self.responses.windows.extend((s, w) for w in s.turn_audio.flush())
        s.conversation.add_audio_part(s.turn_audio.finish())

    def _commit_audio(self, s: Session, item_id: str | None = None) -> float:
        self._check_open(s)
        if s.turn_audio.empty:
            raise EngineError("the input audio buffer is empty: nothing to commit")
        if item_id is not None:
            s.conversation.check_new_id(item_id)
            s.conversation.check_room()
        self.responses.windows.extend((s, w) for w in s.turn_audio.flush())
        secs = s.turn_audio.seconds
        self._finish_audio_part(s)
        if item_id is not None:
            self._end_turn(s, item_id)
        return secs

    def _end_turn(self, s: Session, item_id: str | None) -> bool:
        self._check_open(s)
        s.conversation.check_new_id(item_id)
        self._finish_audio_part(s)
        return s.conversation.close_turn(item_id)

    def _add_text(self, s: Session, text: str) -> None:
        self._check_open(s)
        self._finish_audio_part(s)
        s.conversation.add_text_part(text)

    def _set_voice(self, s: Session, voice: str) -> None:
        self._check_open(s)
        self.voices.require(voice)
        s.voice = voice

    def _set_instructions(self, s: Session, text: str) -> None:
        self._check_open(s)
        s.system_prompt = text
        s.conversation.set_system(text)

    def _add_message(self, s: Session, role: str, text: str, item_id: str | None = None) -> None:
        self._check_open(s)
        if role != "user":
            self._check_idle(s)
        if item_id is None:
            self._finish_audio_part(s)   # a message with an id stands alone; the user's open turn stays open
        s.conversation.add_message(role, text, item_id)

    def _insert_message(self, s: Session, index: int | str, role: str, text: str, item_id: str | None = None) -> None:
        self._check_open(s)
        self._check_idle(s)
        # The user's open turn (audio still arriving) is not in the history yet; edits leave it as it is.
        s.conversation.insert_message(index, role, text, item_id)

    def _delete_message(self, s: Session, index: int | str) -> None:
        self._check_open(s)
        self._check_idle(s)
        s.conversation.delete_message(index)

    def _truncate_response(self, s: Session, audio_ms: float, item_id: str | None = None) -> str:
        self._check_open(s)
        conv = s.conversation
        if item_id is None:
            resp = s.response
            if resp is None or resp.done is None:
                raise EngineError("no finished response to truncate")
            at = next((i for i, m in enumerate(conv.messages) if m is resp.message), None)
            if at is None:
                raise EngineError("the response's message is no longer in the history: nothing to truncate")
            spoken = (resp.tokens, resp.token_frames)
        else:
            at = conv.index_of(item_id)
            spoken = conv.spoken.get(item_id)
            if spoken is None:   # a message the client wrote: no audio to cut
                return conv.messages[at]["content"][0].get("text", "")
        frames = frames_heard(audio_ms)
        text = self.spoken_text([t for t, f in zip(*spoken, strict=True) if f < frames])
        old = conv.messages[at]
        new = conv.replace_text(at, text)
        if s.response is not None and s.response.message is old:
            s.response.message = new
        return text

    def spoken_text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode([t for t in tokens if t != self.cfg.im_end_token_id])

    def _respond(self, s: Session, max_frames: int | None, forced_text: str | None,
                 sampling: SamplingParams | None, over: Overrides | None = None) -> Later:
        over = over or Overrides()
        self._check_open(s)
        if s.slot in self.responses.by_slot:
            raise EngineError(f"session {s.id} is already responding; cancel it first")
        voice = self.voices.require(over.voice or s.voice)
        if not over.out_of_band:
            self._finish_audio_part(s)
            s.conversation.close_turn()   # with no user input at all, the model answers the instructions alone
        forced = None
        if forced_text is not None:
            forced = self.tokenizer.encode(forced_text) + [self.cfg.im_end_token_id]
        max_frames = min(max_frames or self.max_response_frames, self.max_response_frames)
        # The prompt is tokenized and fitted in background slices; the caller is answered then.
        return self.responses.respond(s, voice, max_frames, forced, sampling or s.sampling, over)

    def _cancel(self, s: Session) -> None:
        self.responses.cancel(s)


__all__ = ["Engine", "Session", "AsyncSession", "Response", "Transcription", "TranscriptionDone", "TextDelta",
           "AudioChunk", "ResponseDone", "Usage", "Voice", "EngineError", "UnknownVoice", "SessionLimit",
           "ContextFull", "ConversationLimit", "DEFAULT_SYSTEM_PROMPT", "AudioError"]
