"""The Realtime server events this server sends, one typed builder each (the client events' schemas are in
``realtime_events``). Shapes follow OpenAI's GA Realtime API; transports add the ``event_id`` when they send."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..engine import Usage

Event = dict[str, Any]
ItemStatus = Literal["completed", "incomplete", "in_progress"]


# ----- errors ------------------------------------------------------------------------------------------------
def error(message: str, code: str | None, param: str | None = None, type: str = "invalid_request_error",
          event_id: str | None = None) -> Event:
    """The error envelope: a problem with one client event (the connection stays up) or the session's end."""
    return {"type": "error", "error": {"type": type, "code": code, "message": message, "param": param,
                                       "event_id": event_id}}


# ----- session -----------------------------------------------------------------------------------------------
def session_created(session: dict[str, Any]) -> Event:
    return {"type": "session.created", "session": session}


def session_updated(session: dict[str, Any]) -> Event:
    return {"type": "session.updated", "session": session}


# ----- conversation items ------------------------------------------------------------------------------------
def message_item(item_id: str, role: str, content: list[dict[str, Any]], status: ItemStatus = "completed") -> Event:
    """A conversation item (a message): what item events carry and ``conversation.item.retrieve`` answers."""
    return {"id": item_id, "object": "realtime.item", "type": "message", "role": role, "status": status,
            "content": content}


def input_audio_content() -> dict[str, Any]:
    """A user item's audio part, its transcript to come (when the client asked for transcripts)."""
    return {"type": "input_audio", "transcript": None}


def item_added(item: Event, previous_item_id: str | None) -> list[Event]:
    """An item joined the conversation: GA clients listen for ``added``, beta clients for ``created``, and a
    finished item is ``done`` at once."""
    out = [{"type": kind, "previous_item_id": previous_item_id, "item": item}
           for kind in ("conversation.item.added", "conversation.item.created")]
    if item.get("status") == "completed":
        out.append(item_done(item, previous_item_id))
    return out


def item_done(item: Event, previous_item_id: str | None) -> Event:
    return {"type": "conversation.item.done", "previous_item_id": previous_item_id, "item": item}


def item_retrieved(item: Event) -> Event:
    return {"type": "conversation.item.retrieved", "item": item}


def item_deleted(item_id: str) -> Event:
    return {"type": "conversation.item.deleted", "item_id": item_id}


def item_truncated(item_id: str, content_index: int, audio_end_ms: int) -> Event:
    return {"type": "conversation.item.truncated", "item_id": item_id, "content_index": content_index,
            "audio_end_ms": audio_end_ms}


def transcription_delta(item_id: str, content_index: int, delta: str) -> Event:
    return {"type": "conversation.item.input_audio_transcription.delta", "item_id": item_id,
            "content_index": content_index, "delta": delta}


def transcription_completed(item_id: str, content_index: int, transcript: str, seconds: float) -> Event:
    return {"type": "conversation.item.input_audio_transcription.completed", "item_id": item_id,
            "content_index": content_index, "transcript": transcript,
            "usage": {"type": "duration", "seconds": round(seconds, 3)}}


def transcription_failed(item_id: str, content_index: int, message: str) -> Event:
    return {"type": "conversation.item.input_audio_transcription.failed", "item_id": item_id,
            "content_index": content_index, "error": {"type": "server_error", "code": "transcription_failed",
                                                      "message": message, "param": None}}


# ----- input audio buffer ------------------------------------------------------------------------------------
def speech_started(audio_start_ms: int, item_id: str) -> Event:
    return {"type": "input_audio_buffer.speech_started", "audio_start_ms": audio_start_ms, "item_id": item_id}


def speech_stopped(audio_end_ms: int, item_id: str) -> Event:
    return {"type": "input_audio_buffer.speech_stopped", "audio_end_ms": audio_end_ms, "item_id": item_id}


def buffer_committed(item_id: str, previous_item_id: str | None) -> Event:
    return {"type": "input_audio_buffer.committed", "item_id": item_id, "previous_item_id": previous_item_id}


def buffer_cleared() -> Event:
    return {"type": "input_audio_buffer.cleared"}


# ----- responses ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Part:
    """Where a response's content goes: its id, its item, and the (only) output and content index."""

    response_id: str
    item_id: str

    def fields(self) -> dict[str, Any]:
        return {"response_id": self.response_id, "item_id": self.item_id, "output_index": 0, "content_index": 0}


@dataclass
class ResponseInfo:
    """What a response reports about itself whatever its status: its ids and the settings it was created with."""

    id: str
    item_id: str
    conversation_id: str | None       # None: out of band
    modalities: list[str]
    format: dict[str, Any]
    voice: str
    max_output_tokens: int | str
    metadata: dict[str, str] | None

    @property
    def audio(self) -> bool:
        return "audio" in self.modalities

    @property
    def part(self) -> Part:
        return Part(self.id, self.item_id)


def response(info: ResponseInfo, status: str, output: list[Event] | None = None, usage: dict[str, Any] | None = None,
             details: dict[str, Any] | None = None, timings: dict[str, float] | None = None) -> Event:
    """The response object of ``response.created`` and ``response.done``; ``server_timings`` are the server's own
    figures (``metadata`` is the client's)."""
    obj = {"id": info.id, "object": "realtime.response", "status": status, "status_details": details,
           "conversation_id": info.conversation_id, "output_modalities": info.modalities, "output": output or [],
           "max_output_tokens": info.max_output_tokens, "usage": usage, "metadata": info.metadata,
           "audio": {"output": {"format": dict(info.format), "voice": info.voice}}}
    if timings is not None:
        obj["server_timings"] = timings
    return obj


def response_created(response: Event) -> Event:
    return {"type": "response.created", "response": response}


def response_done(response: Event) -> Event:
    return {"type": "response.done", "response": response}


def failed(code: str, message: str, type: str = "server_error") -> dict[str, Any]:
    """A failed response's ``status_details``."""
    return {"type": "failed", "error": {"type": type, "code": code, "message": message}}


def ended_early(status: Literal["cancelled", "incomplete"], reason: str) -> dict[str, Any]:
    """A cancelled (``client_cancelled``, ``turn_detected``, ``server_shutdown``) or incomplete
    (``max_output_tokens``) response's ``status_details``."""
    return {"type": status, "reason": reason}


def output_item_added(response_id: str, item: Event) -> Event:
    return {"type": "response.output_item.added", "response_id": response_id, "output_index": 0, "item": item}


def output_item_done(response_id: str, item: Event) -> Event:
    return {"type": "response.output_item.done", "response_id": response_id, "output_index": 0, "item": item}


def content_part(audio: bool, text: str = "") -> dict[str, Any]:
    return {"type": "audio", "transcript": text} if audio else {"type": "text", "text": text}


def content_part_added(at: Part, part: dict[str, Any]) -> Event:
    return {"type": "response.content_part.added", **at.fields(), "part": part}


def content_part_done(at: Part, part: dict[str, Any]) -> Event:
    return {"type": "response.content_part.done", **at.fields(), "part": part}


def audio_delta(at: Part, b64: str) -> Event:
    return {"type": "response.output_audio.delta", **at.fields(), "delta": b64}


def audio_done(at: Part) -> Event:
    return {"type": "response.output_audio.done", **at.fields()}


def text_delta(at: Part, text: str, audio: bool) -> Event:
    """Words as they come: the audio's transcript, or the text of a text-only response."""
    kind = "response.output_audio_transcript.delta" if audio else "response.output_text.delta"
    return {"type": kind, **at.fields(), "delta": text}


def audio_transcript_done(at: Part, transcript: str) -> Event:
    return {"type": "response.output_audio_transcript.done", **at.fields(), "transcript": transcript}


def text_done(at: Part, text: str) -> Event:
    return {"type": "response.output_text.done", **at.fields(), "text": text}


def output_content(audio: bool, text: str) -> dict[str, Any]:
    """A finished assistant item's content part."""
    return {"type": "output_audio", "transcript": text} if audio else {"type": "output_text", "text": text}


def usage(u: Usage) -> dict[str, Any]:
    """A response's usage in OpenAI's shape: prompt tokens (user audio apart), and text tokens and audio frames
    out."""
    out = u.text_tokens + u.frames
    return {"total_tokens": u.prompt_tokens + out, "input_tokens": u.prompt_tokens, "output_tokens": out,
            "input_token_details": {"text_tokens": u.prompt_tokens - u.prompt_audio_tokens,
                                    "audio_tokens": u.prompt_audio_tokens, "cached_tokens": 0, "image_tokens": 0},
            "output_token_details": {"text_tokens": u.text_tokens, "audio_tokens": u.frames}}
