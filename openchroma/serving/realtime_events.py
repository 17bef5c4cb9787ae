"""The Realtime client events this server takes, as pydantic models: the schema that checks them.

Shapes follow OpenAI's GA Realtime API, with the flat fields of the beta API as aliases (older clients still send
``voice`` or ``input_audio_format`` at the top of ``session``). Fields a client may send that do not apply here
(tools, noise reduction, tracing, speed, ...) are accepted and ignored. A bad event becomes one ``RealtimeError``
that names the field (``session.audio.input.turn_detection.threshold``) and what was wrong with it. The events the
server sends have their typed builders beside these, in ``realtime_server_events``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .errors import pydantic_problem

MAX_OUTPUT_TOKENS = 4096
MAX_VAD_MS = 10_000
MAX_ITEM_ID = 64


class RealtimeError(Exception):
    """A problem with one client event: answered with an ``error`` event; the connection stays up."""

    def __init__(self, message: str, code: str, param: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.code, self.param, self.type = message, code, param, type


def _not_bool(v: Any) -> Any:
    # JSON true is not a number, whatever Python thinks.
    if isinstance(v, bool):
        raise PydanticCustomError("invalid_value", "must be a number, not true or false")
    return v


def _text(v: Any, info: ValidationInfo) -> Any:
    """Text the model reads: at most the server's ``max_text_chars`` (a huge text would hold the tokenizer while
    every other session waits)."""
    limit = (info.context or {}).get("max_text_chars")
    if isinstance(v, str) and limit is not None and len(v) > limit:
        raise PydanticCustomError("string_above_max_length", "is {n} characters; the server's limit is {limit}",
                                  {"n": len(v), "limit": limit})
    return v


Number = Annotated[float, BeforeValidator(_not_bool)]
Text = Annotated[str, BeforeValidator(_text)]
ItemId = Annotated[str, Field(min_length=1, max_length=MAX_ITEM_ID)]


class Model(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class PCM(Model):
    type: Literal["audio/pcm"]
    rate: int = 24000


class G711(Model):
    type: Literal["audio/pcmu", "audio/pcma"]


BETA_FORMATS = {"pcm16": PCM(type="audio/pcm"), "g711_ulaw": G711(type="audio/pcmu"),
                "g711_alaw": G711(type="audio/pcma")}


def _beta_format(v: Any) -> Any:
    if isinstance(v, str):
        if v not in BETA_FORMATS:
            raise PydanticCustomError("invalid_value", "unknown audio format {v}; use one of {names}",
                                      {"v": v[:40], "names": ", ".join(BETA_FORMATS)})
        return BETA_FORMATS[v]
    return v


AudioFormat = Annotated[PCM | G711, Field(discriminator="type"), BeforeValidator(_beta_format)]


class TurnDetection(Model):
    type: Literal["server_vad", "semantic_vad"]
    threshold: Annotated[Number, Field(ge=0, le=1)] | None = None
    prefix_padding_ms: Annotated[Number, Field(ge=0, le=MAX_VAD_MS)] | None = None
    silence_duration_ms: Annotated[Number, Field(ge=0, le=MAX_VAD_MS)] | None = None
    idle_timeout_ms: Annotated[Number, Field(ge=0, le=3_600_000)] | None = None
    create_response: bool | None = Field(None, strict=True)
    interrupt_response: bool | None = Field(None, strict=True)
    eagerness: Literal["low", "medium", "high", "auto"] | None = None


class Transcription(Model):
    """The transcript always comes from the Reasoner, whatever ``model`` names; the settings are echoed."""

    model: str | None = None
    language: str | None = None
    prompt: str | None = None


def _voice_name(v: Any) -> Any:
    return v.get("id") if isinstance(v, dict) else v


Voice = Annotated[str, Field(min_length=1, max_length=256), BeforeValidator(_voice_name)]
Modalities = Annotated[list[Literal["audio", "text"]], Field(min_length=1)]
MaxTokens = Annotated[int, Field(ge=1, le=MAX_OUTPUT_TOKENS, strict=True)] | Literal["inf"]


class AudioInput(Model):
    format: AudioFormat | None = None
    turn_detection: TurnDetection | None = None
    transcription: Transcription | None = None


class AudioOutput(Model):
    format: AudioFormat | None = None
    voice: Voice | None = None


class SessionAudio(Model):
    input: AudioInput = Field(default_factory=AudioInput)
    output: AudioOutput = Field(default_factory=AudioOutput)


class SessionConfig(Model):
    """``session.update``'s ``session``. Which fields were sent matters (``turn_detection: null`` turns the VAD
    off; leaving it out keeps it): see ``given``."""

    type: Literal["realtime"] | None = None
    instructions: Text | None = None
    output_modalities: Modalities | None = Field(None, validation_alias=AliasChoices("output_modalities",
                                                                                    "modalities"))
    max_output_tokens: MaxTokens | None = Field(None, validation_alias=AliasChoices(
        "max_output_tokens", "max_response_output_tokens"))
    audio: SessionAudio = Field(default_factory=SessionAudio)
    # The beta API's flat fields.
    voice: Voice | None = None
    input_audio_format: AudioFormat | None = None
    output_audio_format: AudioFormat | None = None
    turn_detection: TurnDetection | None = None
    input_audio_transcription: Transcription | None = None

    def given(self, ga: str, beta: str) -> tuple[bool, Any]:
        """(was it sent, its value) for the GA field ``audio.input.X``/``audio.output.X`` or its beta twin."""
        part, name = ga.split(".")
        sub = getattr(self.audio, part)
        if name in sub.model_fields_set:
            return True, getattr(sub, name)
        return beta in self.model_fields_set, getattr(self, beta)


class ContentPart(Model):
    type: Literal["input_text", "text", "output_text", "input_audio", "audio", "output_audio"]
    text: Text | None = None
    audio: str | None = None
    transcript: Text | None = None


class MessageItem(Model):
    id: ItemId | None = None
    type: str = "message"
    role: Literal["user", "assistant", "system"]
    content: Annotated[list[ContentPart], Field(min_length=1)]

    @model_validator(mode="before")
    @classmethod
    def _only_messages(cls, v: Any) -> Any:
        if isinstance(v, dict) and v.get("type", "message") != "message":
            raise PydanticCustomError("unsupported_item", "items of type {t} are not supported: only messages",
                                      {"t": str(v.get("type"))[:40]})
        return v


class ItemReference(Model):
    type: Literal["item_reference"]
    id: ItemId


def _input_kind(v: Any) -> str:
    return "ItemReference" if isinstance(v, dict) and v.get("type") == "item_reference" else "MessageItem"


class ResponseAudioOutput(Model):
    format: AudioFormat | None = None
    voice: Voice | None = None


class ResponseAudio(Model):
    output: ResponseAudioOutput = Field(default_factory=ResponseAudioOutput)


def _metadata(v: Any) -> Any:
    if isinstance(v, dict) and len(v) > 16:
        raise PydanticCustomError("invalid_value", "has {n} keys; at most 16", {"n": len(v)})
    return v


Metadata = Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512, strict=True)]],
                     BeforeValidator(_metadata)]


class ResponseParams(Model):
    conversation: Literal["auto", "none"] = "auto"
    output_modalities: Modalities | None = Field(None, validation_alias=AliasChoices("output_modalities",
                                                                                    "modalities"))
    max_output_tokens: MaxTokens | None = Field(None, validation_alias=AliasChoices(
        "max_output_tokens", "max_response_output_tokens"))
    instructions: Text | None = None
    metadata: Metadata | None = None
    audio: ResponseAudio = Field(default_factory=ResponseAudio)
    input: list[Annotated[Annotated[ItemReference, Tag("ItemReference")] | Annotated[MessageItem, Tag("MessageItem")],
                          Discriminator(_input_kind)]] | None = None
    voice: Voice | None = None                     # beta
    output_audio_format: AudioFormat | None = None  # beta


class SessionUpdate(Model):
    type: Literal["session.update"]
    session: SessionConfig


class ItemCreate(Model):
    type: Literal["conversation.item.create"]
    item: MessageItem
    previous_item_id: str | None = None


class ItemDelete(Model):
    type: Literal["conversation.item.delete"]
    item_id: str


class ItemRetrieve(Model):
    type: Literal["conversation.item.retrieve"]
    item_id: str


class ItemTruncate(Model):
    type: Literal["conversation.item.truncate"]
    item_id: str
    content_index: Annotated[int, Field(ge=0, strict=True)] = 0
    audio_end_ms: Annotated[Number, Field(ge=0, le=86_400_000)]


class ResponseCreate(Model):
    type: Literal["response.create"]
    response: ResponseParams = Field(default_factory=ResponseParams)

    @model_validator(mode="before")
    @classmethod
    def _null_response(cls, v: Any) -> Any:
        if isinstance(v, dict) and v.get("response") is None:
            return {**v, "response": {}}
        return v


class ResponseCancel(Model):
    type: Literal["response.cancel"]
    response_id: str | None = None


class Simple(Model):
    """Events with nothing to check but their type."""

    type: Literal["input_audio_buffer.commit", "input_audio_buffer.clear"]


ClientEvent = (SessionUpdate | ItemCreate | ItemDelete | ItemRetrieve | ItemTruncate | ResponseCreate | ResponseCancel
               | Simple)
EVENT_TYPES = {m.model_fields["type"].annotation.__args__[0]: m for m in
               (SessionUpdate, ItemCreate, ItemDelete, ItemRetrieve, ItemTruncate, ResponseCreate, ResponseCancel)}
EVENT_TYPES.update({t: Simple for t in Simple.model_fields["type"].annotation.__args__})
UNSUPPORTED = ("output_audio_buffer.clear", "transcription_session.update")


def parse_event(event: dict[str, Any], max_text_chars: int) -> ClientEvent:
    """``event`` (a JSON object with a string ``type``) checked against its schema; raises ``RealtimeError``."""
    kind = event["type"]
    model = EVENT_TYPES.get(kind)
    if model is None:
        if kind in UNSUPPORTED:
            raise RealtimeError(f"{kind} is not supported by this server", "unsupported_event")
        raise RealtimeError(f"unknown event type {kind[:60]!r}", "invalid_event_type", "type")
    try:
        return model.model_validate(event, context={"max_text_chars": max_text_chars})
    except ValidationError as e:
        raise as_realtime_error(e) from None


def as_realtime_error(e: ValidationError) -> RealtimeError:
    """The most specific problem pydantic found, as an error event's fields: the field's dotted path is the param."""
    errors = e.errors(include_url=False)
    param, why, kind = pydantic_problem(errors)
    err = next(x for x in errors if x.get("msg") == why and x.get("type") == kind)
    code = kind if kind in ("unsupported_item", "string_above_max_length") else "invalid_value"
    got = "" if kind == "missing" else f", got {_clip(err.get('input'))}"
    return RealtimeError(f"{param or 'event'}: {why}{got}", code, param or None)


def _clip(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
