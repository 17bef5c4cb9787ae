"""Sessions: one conversation each, bound to one slot of the engine; every command is checked in the caller's
thread, then runs on the engine's worker (``AsyncSession``: awaited, for asyncio code)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..audio import AudioError, load_audio
from .conversation import Conversation
from .events import EngineError, Response, Transcription
from .sampling import SamplingParams
from .turn_audio import TurnAudio

# User audio enters the worker in pieces of at most this many seconds (each piece is one short command).
APPEND_PIECE_SECONDS = 0.25


@dataclass
class Overrides:
    """What one response changes for itself only (``Session.respond``'s keyword arguments)."""

    voice: str | None = None
    instructions: str | None = None
    out_of_band: bool = False
    messages: list[dict[str, str]] | None = None
    item_id: str | None = None
    t_start: float | None = None          # when the caller asked


class Session:
    """One conversation: a voice, a system prompt and a history, bound to one slot of the engine."""

    def __init__(self, engine: Any, sid: int, slot: int, voice: str | None, system_prompt: str,
                 sampling: SamplingParams):
        self.engine = engine   # the owning Engine (Any: a part never imports its owner)
        self.id = sid
        self.slot = slot
        self.voice = voice
        self.system_prompt = system_prompt
        self.sampling = sampling
        self.conversation = Conversation(system_prompt, engine.max_conversation_items)
        self.turn_audio = TurnAudio(engine.model.thinker.audio_tower.window)   # the user's part being spoken
        self.ctx_ids: list[int] = []                    # what the reasoner's cache row holds
        self.response: Response | None = None
        self.closed = False

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.conversation.messages

    @property
    def audio_embeds(self) -> list:
        """The embeddings of each committed audio part, in order (a part not encoded yet: its pending state)."""
        return [a.embeds if a.embeds is not None else a for a in self.conversation.audio]

    @property
    def spoken(self) -> dict[str, tuple[list[int], list[int]]]:
        return self.conversation.spoken

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
        return self.turn_audio.seconds

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
        message in the history.

        Answered once the prompt is built (new messages tokenized and the context fitted, in slices between other
        users' frames): ``ContextFull`` when even the latest turn leaves no room to answer."""
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
                        Overrides(voice, instructions, out_of_band, messages, item_id, time.perf_counter()))

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
        return asyncio.wrap_future(self.engine.submit(fn, *args))

    def _do_all(self, calls: list[tuple]) -> asyncio.Future:
        futures = [self.engine.submit(fn, *args) for fn, *args in calls]   # the worker keeps their order
        if not futures:
            return asyncio.ensure_future(asyncio.sleep(0))

        async def last():
            for f in futures[:-1]:
                await asyncio.wrap_future(f)
            return await asyncio.wrap_future(futures[-1])
        return asyncio.ensure_future(last())

