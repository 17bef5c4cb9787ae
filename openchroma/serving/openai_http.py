"""``POST /v1/chat/completions`` and ``POST /v1/audio/speech``: OpenAI's HTTP shapes (and the published Chroma
server's), streaming as server-sent events or chunked audio while the engine speaks.

Each request is a short-lived engine session: it holds a slot only while it runs and frees it when the
response ends or the client goes away.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import io
import re
import stat
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import soundfile as sf
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..audio import AudioError
from ..constants import REASONER_SAMPLE_RATE
from ..engine import (
    DEFAULT_SYSTEM_PROMPT,
    FRAMES_PER_TEXT_TOKEN,
    AudioChunk,
    ContextFull,
    Engine,
    EngineError,
    ResponseDone,
    SamplingParams,
    TextDelta,
    frames_for_text,
    seconds_of_frames,
)
from ..voice import MAX_VOICE_SECONDS
from .codecs import SPEECH_FORMATS, SpeechEncoder, client_audio, encode_wav, float_to_pcm16
from .errors import APIError, clip, shorten, wire_error
from .guards import client_id
from .sessions import close_session, open_session
from .sse import DONE, sse, until_drained
from .state import OPENAI_STOCK_VOICES, ServerState, engine_await, engine_call, get_state, response_events

router = APIRouter()

MAX_ADHOC_VOICES = 8
CHAT_AUDIO_FORMATS = {"wav", "pcm16", "flac"}
MAX_SPEECH_CHARS = 4096


class TextPart(BaseModel):
    type: Literal["text", "input_text", "output_text"]
    text: str


class InputAudio(BaseModel):
    data: str
    format: str | None = None


class InputAudioPart(BaseModel):            # OpenAI: {"input_audio": {"data": b64, "format": "wav"}}
    type: Literal["input_audio"]
    input_audio: InputAudio


class AudioRefPart(BaseModel):              # Chroma / Qwen-Omni: {"audio": path|b64|data URL} or {"audio_url": ...}
    type: Literal["audio", "audio_url"]
    audio: str | dict[str, Any] | None = None
    audio_url: str | dict[str, Any] | None = None

    def ref(self) -> Any:
        ref = self.audio or self.audio_url
        return ref.get("url") or ref.get("data") if isinstance(ref, dict) else ref


ContentPart = Annotated[TextPart | InputAudioPart | AudioRefPart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        """The message's text parts, joined (what system and assistant messages say)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content or () if isinstance(p, TextPart))


class ChatAudio(BaseModel):
    model_config = ConfigDict(extra="allow")
    voice: str | None = None
    format: str | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    audio: ChatAudio | None = None
    return_audio: bool | None = None          # the published Chroma server's shape
    prompt_text: str | None = None
    prompt_audio: str | None = None
    voice: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    n: int | None = None


class SpeechRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    input: str
    voice: str | dict[str, Any] | None = None
    response_format: str = "mp3"             # OpenAI's default
    speed: float | None = None
    stream_format: str | None = None
    stream: bool = True                      # ours: false sends the whole file at once (exact WAV sizes)
    instructions: str | None = None
    temperature: float | None = None
    seed: int | None = None


# ----- audio inputs -------------------------------------------------------------------------------------
DATA_URL = re.compile(r"^data:(?P<mime>[\w/+.-]*)(?:;[\w=.-]+)*;base64,(?P<data>.*)$", re.S)
FILE_URL = "file://"


def decode_audio_ref(ref: Any, where: str, state: ServerState) -> bytes:
    """Audio given as base64 or a base64 data URL, or (with --allow-local-audio) a ``file://`` URL naming a file
    on the server. Base64's alphabet has no ':', so base64 is never taken for a URL (an mp3 without an ID3 tag
    starts with 0xFF: its base64 starts with '/')."""
    if not isinstance(ref, str) or not ref:
        raise APIError(400, f"{where}: expected audio as base64 or a data URL", param=where)
    if ref.startswith(FILE_URL):
        return read_local_audio(ref, where, state)
    m = DATA_URL.match(ref)
    try:
        return base64.b64decode(m.group("data") if m else ref, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{where}: not valid base64 audio (send base64 or a data URL; a file on the server is "
                            "named by a file:// URL, with --allow-local-audio)", param=where) from None


def read_local_audio(url: str, where: str, state: ServerState) -> bytes:
    """The file a ``file://`` URL names on the server (only with --allow-local-audio), as large as a request
    body may be at most. Errors quote the path clipped, never whole."""
    if not state.config.allow_local_audio:
        raise APIError(400, f"{where}: audio files on the server (file:// URLs) are disabled; send the audio as "
                            "base64 or a data URL (or start the server with --allow-local-audio)", param=where)
    try:
        parts = urllib.parse.urlsplit(url)
        path = Path(urllib.parse.unquote(parts.path))
        if parts.netloc not in ("", "localhost") or not path.is_absolute():
            raise APIError(400, f"{where}: {clip(url, 80)} is not a file:// URL of an absolute path on the server "
                                "(write file:///path/to/audio.wav)", param=where)
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise APIError(400, f"{where}: {clip(str(path), 80)} is not a file on the server", param=where)
        if info.st_size > state.config.max_upload_bytes:
            raise APIError(400, f"{where}: {clip(str(path), 80)} is {info.st_size} bytes, over the limit of "
                                f"{state.config.max_upload_bytes}", param=where)
        return path.read_bytes()
    except (OSError, ValueError) as e:
        why = getattr(e, "strerror", None) or type(e).__name__
        raise APIError(400, f"{where}: cannot read {clip(url, 80)} on the server ({why})", param=where) from None


def read_part_audio(ref: Any, where: str, state: ServerState, fmt: str | None = None) -> np.ndarray:
    """A chat message's audio part -> 16 kHz mono float32 (blocking: run it off the event loop)."""
    data = decode_audio_ref(ref, where, state)
    return client_audio(data, where, REASONER_SAMPLE_RATE, state.config.max_input_audio_seconds, fmt).numpy()


# ----- voices ---------------------------------------------------------------------------------------------
class AdhocVoices:
    """Voices cloned from a request's own reference (``prompt_audio`` + ``prompt_text``), kept for reuse."""

    def __init__(self) -> None:
        self.names: OrderedDict[str, None] = OrderedDict()
        self.lock = asyncio.Lock()

    async def get(self, state: ServerState, engine: Engine, audio: bytes, transcript: str) -> str:
        name = "_adhoc_" + hashlib.sha256(audio + b"\0" + transcript.encode()).hexdigest()[:16]
        async with self.lock:
            if name in engine.voices:
                self.names.move_to_end(name)
                return name
            wav = await engine_call(state.config, client_audio, audio, "prompt_audio", engine.sample_rate,
                                    MAX_VOICE_SECONDS)
            try:
                await engine_call(state.config, engine.register_voice, name, wav, transcript, engine.sample_rate)
            except (AudioError, EngineError) as e:
                err = wire_error(e, "prompt_audio")
                raise APIError(400, f"prompt_audio: {err.message}", code=err.code or "invalid_audio",
                               param="prompt_audio") from None
            self.names[name] = None
            while len(self.names) > MAX_ADHOC_VOICES:
                await engine_call(state.config, engine.remove_voice, self.names.popitem(last=False)[0])
            return name


def adhoc(state: ServerState) -> AdhocVoices:
    if not hasattr(state, "adhoc_voices"):
        state.adhoc_voices = AdhocVoices()
    return state.adhoc_voices


# ----- sessions -------------------------------------------------------------------------------------------
async def call(state: ServerState, command, *args):
    """Await ``command(*args)``, an ``AsyncSession`` method: the engine's refusals (``EngineError``, ``ValueError``,
    raised by its argument checks or by the worker) become 400s."""
    try:
        return await engine_await(state.config, command(*args))
    except (EngineError, ContextFull, AudioError) as e:
        raise wire_error(e) from None


async def respond(state: ServerState, route: str, session, *args):
    """Start the session's response; on any failure free the session (engine errors become 400s)."""
    try:
        return await call(state, session.respond, *args)
    except BaseException:
        await close_session(state, session)
        raise


async def end(state: ServerState, route: str, session, resp) -> None:
    """Stop the response if it still runs (the client left) and free the slot, even while being cancelled."""
    if resp.done is None:
        with contextlib.suppress(Exception):
            resp.cancel()
    await asyncio.shield(close_session(state, session))


def sampling_from(req: ChatRequest | SpeechRequest) -> SamplingParams | None:
    t = getattr(req, "temperature", None)
    if t is None and getattr(req, "seed", None) is None:
        return None
    try:
        return SamplingParams(temperature=float(t or 0.0), top_k=int(getattr(req, "top_k", None) or 0),
                              top_p=float(getattr(req, "top_p", None) or 1.0), seed=getattr(req, "seed", None))
    except (ValueError, TypeError, OverflowError) as e:
        param = next((k for k in ("temperature", "top_k", "top_p", "seed") if str(e).startswith(k)), "temperature")
        raise APIError(400, shorten(str(e), 200), param=param) from None


async def feed_messages(state: ServerState, session, messages: list[ChatMessage]) -> None:
    """Replay the request's conversation into the session; the last message must be the user's."""
    rest = [m for m in messages if m.role not in ("system", "developer")]
    if not rest or rest[-1].role != "user":
        raise APIError(400, "messages: the last message must be the user's (what should be answered)",
                       param="messages")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if m.role == "assistant" and m.text().strip():
            await call(state, session.add_message, "assistant", m.text())
        if m.role != "user":
            continue
        parts = [TextPart(type="text", text=m.content)] if isinstance(m.content, str) else m.content or []
        if not parts:
            raise APIError(400, f"{where}: empty user message", param=where + ".content")
        for j, p in enumerate(parts):
            pw = f"{where}.content[{j}]"
            if isinstance(p, TextPart):
                if not p.text.strip():
                    raise APIError(400, f"{pw}: empty text", param=pw)
                await call(state, session.add_text, p.text)
                continue
            if isinstance(p, InputAudioPart):   # decoded off the event loop
                wav = await engine_call(state.config, read_part_audio, p.input_audio.data, pw, state,
                                        p.input_audio.format)
            else:
                wav = await engine_call(state.config, read_part_audio, p.ref(), pw, state)
            await call(state, session.append_audio, wav, REASONER_SAMPLE_RATE)
            await call(state, session.commit_audio)


def check_chat_limits(state: ServerState, req: ChatRequest) -> None:
    """Refuse a request whose texts would hold the tokenizer (and with it every live stream) for long: a cap per
    message text and on all texts together, and on the number of messages."""
    cfg = state.config
    if len(req.messages) > cfg.max_messages:
        raise APIError(400, f"messages holds {len(req.messages)} messages; the server's limit is {cfg.max_messages}",
                       code="array_above_max_length", param="messages")
    total = 0
    for i, m in enumerate(req.messages):
        texts = [m.content] if isinstance(m.content, str) else [p.text for p in m.content or ()
                                                                 if isinstance(p, TextPart)]
        for t in texts:
            if len(t) > cfg.max_text_chars:
                raise APIError(400, f"messages[{i}]: a text of {len(t)} characters is over the server's limit of "
                                    f"{cfg.max_text_chars}", code="string_above_max_length", param=f"messages[{i}]")
            total += len(t)
    if total > 4 * cfg.max_text_chars:
        raise APIError(400, f"the messages' texts hold {total} characters together; the server's limit is "
                            f"{4 * cfg.max_text_chars}", code="string_above_max_length", param="messages")
    for name in ("prompt_text",):
        value = getattr(req, name)
        if value is not None and len(value) > cfg.max_text_chars:
            raise APIError(400, f"{name} is {len(value)} characters; the server's limit is {cfg.max_text_chars}",
                           code="string_above_max_length", param=name)


# ----- chat completions -----------------------------------------------------------------------------------
@router.post("/v1/chat/completions")
async def chat_completions(req: ChatRequest, request: Request):
    state = get_state(request)
    engine = state.require_engine()
    check_chat_limits(state, req)
    if req.n not in (None, 1):
        raise APIError(400, "n must be 1", param="n")
    audio_opts = req.audio or ChatAudio()
    fmt = audio_opts.format or ("pcm16" if req.stream else "wav")
    want_audio = bool(req.return_audio) or "audio" in (req.modalities or []) or (
        req.return_audio is None and req.modalities is None and req.prompt_audio is not None)
    if want_audio and fmt not in CHAT_AUDIO_FORMATS:
        raise APIError(400, f"audio.format {clip(fmt)} is not supported; use one of "
                            f"{', '.join(sorted(CHAT_AUDIO_FORMATS))}", param="audio.format")
    if want_audio and req.stream and fmt != "pcm16":
        raise APIError(400, "streamed audio is pcm16 (24 kHz, mono); set audio.format to 'pcm16'",
                       param="audio.format")
    if (req.prompt_audio is None) != (req.prompt_text is None):
        raise APIError(400, "prompt_audio and prompt_text go together: the reference audio and its transcript",
                       param="prompt_audio" if req.prompt_audio is None else "prompt_text")
    if req.prompt_audio is not None:
        if not req.prompt_text.strip():
            raise APIError(400, "prompt_text is empty", param="prompt_text")
        ref = await engine_call(state.config, decode_audio_ref, req.prompt_audio, "prompt_audio", state)
        voice = await adhoc(state).get(state, engine, ref, req.prompt_text)
    else:
        voice = state.resolve_voice(audio_opts.voice or req.voice)
    system = "\n".join(m.text() for m in req.messages if m.role in ("system", "developer")).strip() \
        or DEFAULT_SYSTEM_PROMPT
    sampling = sampling_from(req)
    limit = req.max_completion_tokens or req.max_tokens
    if limit is not None and limit < 1:
        raise APIError(400, "max_tokens must be at least 1", param="max_tokens")
    max_frames = engine.max_response_frames
    if limit is not None:
        max_frames = min(max_frames, frames_for_text(limit))

    session = await open_session(state, "chat", client_id(request.scope), voice, system)
    try:
        await feed_messages(state, session, req.messages)
    except BaseException:
        await close_session(state, session)
        raise
    resp = await respond(state, "chat", session, max_frames, None, sampling)
    cid = "chatcmpl-" + hashlib.sha1(f"{time.time_ns()}{id(resp)}".encode()).hexdigest()[:24]
    created = int(time.time())
    model = req.model or state.config.model_id
    if req.stream:
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        chunks = stream_chat(state, session, resp, cid, created, model, want_audio, include_usage)
        return StreamingResponse(until_drained(state, chunks), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    try:
        text, audio, done = "", [], None
        async for ev in response_events(state.config, resp):
            if isinstance(ev, AudioChunk):
                audio.append(ev.audio)
            elif isinstance(ev, ResponseDone):
                done = ev
        state.metrics.observe_response("chat", done)
        if done.stop_reason == "error":
            raise APIError(500, f"generation failed: {done.error}", "server_error", "generation_failed")
        text = done.text
    finally:
        await end(state, "chat", session, resp)
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if want_audio:
        pcm = np.concatenate(audio) if audio else np.zeros(0, np.float32)
        message["audio"] = {"id": "audio_" + cid[9:], "data": base64.b64encode(encode_audio(pcm, fmt,
                            engine.sample_rate)).decode(), "expires_at": created + 3600, "transcript": text}
    return JSONResponse({
        "id": cid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": "length" if done.stop_reason == "length" else "stop"}],
        "usage": usage(resp, done), "timings": done.timings,
    })


def usage(resp, done: ResponseDone) -> dict[str, Any]:
    prompt = done.usage.prompt_tokens
    out = done.usage.text_tokens + done.usage.frames
    return {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out,
            "completion_tokens_details": {"text_tokens": len(done.tokens), "audio_tokens": done.frames}}


def encode_audio(pcm: np.ndarray, fmt: str, rate: int) -> bytes:
    if fmt == "pcm16":
        return float_to_pcm16(pcm)
    if fmt == "flac":
        buf = io.BytesIO()
        sf.write(buf, pcm, rate, format="FLAC", subtype="PCM_16")
        return buf.getvalue()
    return encode_wav(pcm, rate)


async def stream_chat(state: ServerState, session, resp, cid: str, created: int, model: str, want_audio: bool,
                      include_usage: bool) -> AsyncIterator[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    audio_id = "audio_" + cid[9:]
    done = None
    try:
        yield chunk({"role": "assistant", "content": ""})
        async for ev in response_events(state.config, resp):
            if isinstance(ev, TextDelta):
                # As OpenAI streams audio: the words go in audio.transcript; text-only output uses content.
                yield chunk({"audio": {"id": audio_id, "transcript": ev.text}} if want_audio else {"content": ev.text})
            elif isinstance(ev, AudioChunk) and want_audio:
                yield chunk({"audio": {"id": audio_id, "data": base64.b64encode(float_to_pcm16(ev.audio)).decode()}})
            elif isinstance(ev, ResponseDone):
                done = ev
        state.metrics.observe_response("chat", done)
        if done.stop_reason == "error":
            yield sse({"error": {"message": f"generation failed: {done.error}", "type": "server_error",
                                 "code": "generation_failed"}})
        else:
            last = {"audio": {"id": audio_id, "expires_at": created + 3600}} if want_audio else {}
            yield chunk(last, "length" if done.stop_reason == "length" else "stop")
            if include_usage:
                yield sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [], "usage": usage(resp, done)})
        yield DONE
    finally:  # also when the client disconnects
        await end(state, "chat", session, resp)


# ----- speech ---------------------------------------------------------------------------------------------
@router.post("/v1/audio/speech")
async def audio_speech(req: SpeechRequest, request: Request):
    state = get_state(request)
    engine = state.require_engine()
    fmt = req.response_format
    if fmt not in SPEECH_FORMATS:
        raise APIError(400, f"response_format {clip(fmt)} is not supported; use one of {', '.join(SPEECH_FORMATS)}",
                       param="response_format")
    if req.stream_format not in (None, "audio", "sse"):
        raise APIError(400, "stream_format must be 'audio' or 'sse'", param="stream_format")
    if req.speed not in (None, 1, 1.0):
        raise APIError(400, "speed other than 1.0 is not supported: Chroma speaks at its own pace", param="speed")
    text = req.input
    if not text.strip():
        raise APIError(400, "input is empty: nothing to say", param="input")
    if req.instructions is not None and len(req.instructions) > state.config.max_text_chars:
        raise APIError(400, f"instructions is {len(req.instructions)} characters; the server's limit is "
                            f"{state.config.max_text_chars}", code="string_above_max_length", param="instructions")
    if len(text) > MAX_SPEECH_CHARS:
        raise APIError(400, f"input is {len(text)} characters; the limit is {MAX_SPEECH_CHARS}", param="input")
    n_tokens = len(engine.tokenizer.encode(text))
    if frames_for_text(n_tokens) + 8 > engine.max_response_frames:
        raise APIError(400, f"input is {n_tokens} tokens; at {FRAMES_PER_TEXT_TOKEN} audio frames per token it needs "
                            f"more than the server's {seconds_of_frames(engine.max_response_frames):.0f} s per "
                            "response: split it", param="input")
    voice = state.resolve_voice(req.voice)
    sampling = sampling_from(req)
    rate = engine.sample_rate
    encoder = None if req.stream_format == "sse" else SpeechEncoder(fmt, rate, streaming=req.stream)
    session = await open_session(state, "speech", client_id(request.scope), voice, req.instructions)
    resp = await respond(state, "speech", session, None, text, sampling)
    if encoder is None:
        return StreamingResponse(stream_speech_sse(state, session, resp, n_tokens), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    headers = {"X-Sample-Rate": str(encoder.sample_rate)}
    if not req.stream or fmt == "flac":  # the whole file, with its exact length (FLAC's header needs it)
        async with contextlib.aclosing(stream_speech(state, session, resp, encoder)) as chunks:
            data = b"".join([chunk async for chunk in chunks])
        return Response(data, media_type=encoder.media_type, headers=headers)
    return StreamingResponse(stream_speech(state, session, resp, encoder), media_type=encoder.media_type,
                             headers=headers)


async def stream_speech(state: ServerState, session, resp, encoder: SpeechEncoder) -> AsyncIterator[bytes]:
    """The response's audio in ``encoder``'s format, as it is made; the engine session ends however this ends."""
    finished = False
    try:
        async for ev in response_events(state.config, resp):
            if isinstance(ev, AudioChunk):
                data = encoder.encode(ev.audio)
                if data:
                    yield data
            elif isinstance(ev, ResponseDone):
                state.metrics.observe_response("speech", ev)
        finished = True
        yield encoder.finish()
    finally:
        if not finished:
            encoder.close()
        await end(state, "speech", session, resp)


async def stream_speech_sse(state: ServerState, session, resp, n_tokens: int) -> AsyncIterator[bytes]:
    try:
        async for ev in response_events(state.config, resp):
            if isinstance(ev, AudioChunk):
                yield sse({"type": "speech.audio.delta", "audio": base64.b64encode(float_to_pcm16(ev.audio)).decode()})
            elif isinstance(ev, ResponseDone):
                state.metrics.observe_response("speech", ev)
                yield sse({"type": "speech.audio.done", "usage": {
                    "input_tokens": n_tokens, "output_tokens": ev.frames, "total_tokens": n_tokens + ev.frames}})
    finally:
        await end(state, "speech", session, resp)


__all__ = ["router", "OPENAI_STOCK_VOICES"]
