"""A realtime session's responses: create (the session's settings under ``response.create``'s), stream, finish,
cancel. One response at a time; it streams on its own task, and a cancel (or the user starting to speak) stops it
within a frame, the history keeping only what the listener heard."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from typing import Any

from ..constants import FRAME_SECONDS
from ..engine import AudioChunk, ResponseDone, TextDelta, frames_for_text
from ..engine import Response as EngineResponse
from . import realtime_events as ev
from . import realtime_server_events as out
from .codecs import OutputEncoder
from .errors import EngineTimeout, shorten, wire_error
from .metrics import response_status
from .realtime_events import RealtimeError
from .realtime_input import new_id
from .realtime_settings import audio_format
from .state import response_events

log = logging.getLogger("openchroma.realtime")


class Responses:
    def __init__(self, core: Any):
        self.core = core   # the owning RealtimeCore (Any: a part never imports its owner)
        self.task: asyncio.Task | None = None
        self.engine_response: EngineResponse | None = None
        self.response_id: str | None = None    # the response's id, as the client knows it
        self.cancel_reason: str | None = None
        self.played: float | None = None        # when the response's first audio delta was sent

    def active(self) -> bool:
        return self.engine_response is not None and self.engine_response.done is None

    # ----- create ------------------------------------------------------------------------------------------------
    async def start(self, p: ev.ResponseParams | None = None) -> None:
        core = self.core
        p = p or ev.ResponseParams()
        if self.active():
            raise RealtimeError("the conversation already has an active response; cancel it first",
                                "conversation_already_has_active_response")
        if core.closing:
            raise RealtimeError("the server is shutting down: no new responses", "server_shutting_down",
                                type="server_error")
        info, engine_args = self._plan(p)
        if info.conversation_id is not None:
            core.conversation.check_room()
        self.cancel_reason = None
        self.played = None
        await core.send(out.response_created(out.response(info, "in_progress")))
        try:
            resp = await core.call(core.session.respond(**engine_args))
        except Exception as e:
            # One answer, as OpenAI gives it: the failed response.done (an error event too would make some
            # clients, Pipecat's among them, treat the whole session as dead).
            err = wire_error(e)
            client_fault = err is not None and err.status < 500
            log.log(logging.INFO if client_fault else logging.ERROR, "realtime session %s: a response failed to "
                    "start: %s: %s", core.sid, type(e).__name__, e)
            code = err.code if client_fault and err.code else "response_failed"
            await core.send(out.response_done(out.response(info, "failed", details=out.failed(
                code, shorten(str(e), 300), "invalid_request_error" if client_fault else "server_error"))))
            core.state.metrics.responses.labels("realtime", "failed").inc()
            if isinstance(e, EngineTimeout):
                core.end("engine_failed")
            return
        self.engine_response = resp
        self.response_id = info.id
        item = out.message_item(info.item_id, "assistant", [], "in_progress")
        # The item joins the conversation now, so that events the client sends next find it there.
        await core.send(out.output_item_added(info.id, item))
        if info.conversation_id is not None:
            await core.conversation.add(item)
        self.task = asyncio.create_task(self._stream(resp, info, item))

    def _plan(self, p: ev.ResponseParams) -> tuple[out.ResponseInfo, dict[str, Any]]:
        """``response.create``'s settings over the session's: what the response reports, and the engine's args."""
        core, settings = self.core, self.core.settings
        voice = p.audio.output.voice or p.voice
        voice = core.resolve_voice(voice, "response.audio.output.voice") if voice is not None else None
        if (voice or core.session.voice) is None:
            raise RealtimeError("no voice is selected: set session.audio.output.voice to a library voice (GET "
                                "/v1/voices) first", "voice_required", "session.audio.output.voice")
        fmt = p.audio.output.format or p.output_audio_format
        fmt = audio_format(fmt, "response.audio.output.format", inputs=False) if fmt else dict(settings.output_format)
        modalities = settings.output_modalities if p.output_modalities is None else \
            (["audio"] if "audio" in p.output_modalities else ["text"])
        mot = settings.max_output_tokens if p.max_output_tokens is None else p.max_output_tokens
        out_of_band = p.conversation == "none"
        if p.input is not None and not out_of_band:
            raise RealtimeError("'input' gives an out-of-band response its own context: use it with conversation "
                                "'none'", "invalid_value", "response.input")
        info = out.ResponseInfo(new_id("resp"), new_id("item"), None if out_of_band else core.conversation_id,
                                modalities, fmt, voice or core.session.voice, mot, p.metadata)
        max_frames = core.cfg.max_response_frames
        if mot != "inf":
            max_frames = min(max_frames, frames_for_text(mot))
        args = {"max_frames": max_frames, "voice": voice, "instructions": p.instructions, "out_of_band": out_of_band,
                "messages": self._input_messages(p.input) if p.input is not None else None,
                "item_id": None if out_of_band else info.item_id}
        return info, args

    def _input_messages(self, items: list[ev.ItemReference | ev.MessageItem]) -> list[dict[str, str]]:
        """An out-of-band response's ``input``: text messages, or references to items of the conversation (audio
        ones by their transcript)."""
        messages = []
        for i, it in enumerate(items):
            param = f"response.input[{i}]"
            if isinstance(it, ev.ItemReference):
                ref = self.core.conversation.find(it.id, param + ".id")
                role, parts = ref["role"], ref["content"]
            else:
                role, parts = it.role, [part.model_dump() for part in it.content]
            words = [part.get("text") or part.get("transcript") for part in parts]
            if not all(isinstance(w, str) and w.strip() for w in words):
                raise RealtimeError(f"{param}: input items must be text (audio only by an item_reference to audio "
                                    "already transcribed)", "unsupported_content", param)
            messages.append({"role": role, "text": "\n".join(words)})
        return messages

    # ----- stream and finish -------------------------------------------------------------------------------------
    async def _stream(self, resp: EngineResponse, info: out.ResponseInfo, item: dict[str, Any]) -> None:
        try:
            done, text = await self._relay(resp, info)
            await self._finish(info, item, done, text)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("streaming a response failed")
            if resp.done is None:
                with contextlib.suppress(Exception):
                    resp.cancel()
            await self.core.send(out.response_done(out.response(info, "failed", details=out.failed(
                "response_failed", f"{type(e).__name__}: {shorten(str(e))}"))))
            if isinstance(e, EngineTimeout):
                self.core.end("engine_failed")

    async def _relay(self, resp: EngineResponse, info: out.ResponseInfo) -> tuple[ResponseDone, str]:
        """Send the response's audio and words as the engine makes them; its end, and the text the history keeps."""
        core, at = self.core, info.part
        await core.send(out.content_part_added(at, out.content_part(info.audio)))
        encoder = OutputEncoder(info.format["type"]) if info.audio else None
        sent_ms = 0.0
        done: ResponseDone | None = None
        async for e in response_events(core.cfg, resp):
            if isinstance(e, AudioChunk) and encoder is not None:
                data = encoder.encode(e.audio)
                if data:
                    await core.send(out.audio_delta(at, base64.b64encode(data).decode()))
                self.played = self.played or time.monotonic()
                sent_ms += 1000 * FRAME_SECONDS
            elif isinstance(e, TextDelta):
                await core.send(out.text_delta(at, e.text, info.audio))
            elif isinstance(e, ResponseDone):
                done = e
        tail = encoder.flush() if encoder is not None else b""
        if tail:
            await core.send(out.audio_delta(at, base64.b64encode(tail).decode()))
        text = done.text
        if response_status(done.stop_reason) == "cancelled" and info.audio and info.conversation_id is not None:
            # Barge-in or cancel: keep in the history what the listener can have heard by now (playback starts
            # with the first delta and runs in real time); a conversation.item.truncate can correct it later.
            heard = core.heard_ms(at.item_id, sent_ms, self.played)
            text = await core.call(core.session.truncate_response(heard))
        core.state.metrics.observe_response("realtime", done)
        return done, text

    async def _finish(self, info: out.ResponseInfo, item: dict[str, Any], done: ResponseDone, text: str) -> None:
        core, at = self.core, info.part
        status = response_status(done.stop_reason)
        if info.audio:
            await core.send(out.audio_done(at))
            await core.send(out.audio_transcript_done(at, text))
        else:
            await core.send(out.text_done(at, text))
        await core.send(out.content_part_done(at, out.content_part(info.audio, text)))
        # The conversation's copy of the item changes in place, so that a retrieve sees the final one.
        item.update(status="completed" if status == "completed" else "incomplete",
                    content=[out.output_content(info.audio, text)])
        await core.send(out.output_item_done(info.id, item))
        if info.conversation_id is not None and item in core.conversation.items:
            await core.send(out.item_done(item, core.conversation.previous_id(item)))
        details = None
        if status == "cancelled":
            details = out.ended_early("cancelled", self.cancel_reason or "client_cancelled")
        elif status == "incomplete":
            details = out.ended_early("incomplete", "max_output_tokens")
        elif status == "failed":
            details = out.failed("generation_failed", done.error)
        t = done.timings or {}
        timings = {k: round(t[k], 4) for k in ("ttft_ms", "rtf", "audio_seconds") if k in t and t[k] == t[k]}
        await core.send(out.response_done(out.response(info, status, [item], out.usage(done.usage), details,
                                                       timings)))

    # ----- cancel ------------------------------------------------------------------------------------------------
    async def cancel(self, eid: str | None, reason: str, response_id: str | None = None) -> None:
        if not self.active() or response_id not in (None, self.response_id):
            if reason == "client_cancelled":
                # OpenAI's words: clients (LiveKit's) recognise a cancel that came too late by them.
                await self.core.send_error("Cancellation failed: no active response found",
                                           "response_cancel_not_active", event_id=eid)
            return
        self.cancel_reason = reason
        self.engine_response.cancel()
        if self.task is not None and self.task is not asyncio.current_task():
            await asyncio.wait([self.task])   # response.done goes out before any later event

    async def wait(self) -> None:
        """Until the running response (if any) has ended and said so."""
        if self.task is not None and not self.task.done():
            await asyncio.wait([self.task])

    async def finish(self, deadline: float) -> None:
        """Let the running response end by itself until ``deadline`` (``time.monotonic()``), then cancel it."""
        task = self.task
        if task is None or task.done():
            return
        await asyncio.wait([task], timeout=max(0.0, deadline - time.monotonic()))
        if not task.done():
            await self.cancel(None, "server_shutdown")

    async def stop(self) -> None:
        """Stop generating at once (the connection is ending); let the task record how the response ended, briefly."""
        task = self.task
        if task is None or task.done():
            return
        if self.active():
            with contextlib.suppress(Exception):
                self.engine_response.cancel()
        await asyncio.wait([task], timeout=0.5)
        task.cancel()
