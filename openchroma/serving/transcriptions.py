"""``POST /v1/audio/transcriptions``: OpenAI's speech-to-text route, answered by the Reasoner (Qwen2.5-Omni's thinker
transcribes well when asked), in the engine's background slices so that it never delays a live response's audio."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import PlainTextResponse, StreamingResponse

from ..audio import AudioError
from ..constants import REASONER_SAMPLE_RATE
from ..engine import ContextFull, EngineError, TextDelta
from .codecs import client_audio
from .errors import APIError, wire_error
from .sse import DONE, sse, until_drained
from .state import engine_call, get_state, response_events

router = APIRouter()

RESPONSE_FORMATS = ("json", "text", "verbose_json")


@router.post("/v1/audio/transcriptions")
async def transcriptions(request: Request, file: Annotated[UploadFile | None, File()] = None,
                         model: Annotated[str | None, Form()] = None, language: Annotated[str | None, Form()] = None,
                         prompt: Annotated[str | None, Form()] = None,
                         response_format: Annotated[str, Form()] = "json",
                         stream: Annotated[bool, Form()] = False):
    """Multipart ``file`` (any audio soundfile/ffmpeg reads); ``model``, ``language`` and ``prompt`` are accepted
    as OpenAI's clients send them (the Reasoner does the work whatever they name). ``stream=true`` answers with
    server-sent ``transcript.text.delta`` events and a final ``transcript.text.done``."""
    state = get_state(request)
    engine = state.require_engine()
    if file is None:
        raise APIError(400, "missing form field 'file' (the audio to transcribe); send multipart/form-data",
                       code="missing_required_parameter", param="file")
    if response_format not in RESPONSE_FORMATS:
        raise APIError(400, f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, got {response_format!r}",
                       code="invalid_value", param="response_format")
    data = await file.read()
    if not data:
        raise APIError(400, "file: the audio is empty", code="invalid_audio", param="file")
    limit = state.config.max_input_audio_seconds
    wav = await engine_call(state.config, client_audio, data, "file", REASONER_SAMPLE_RATE, limit)
    seconds = wav.shape[0] / REASONER_SAMPLE_RATE
    try:
        job = await engine_call(state.config, engine.transcribe, wav, REASONER_SAMPLE_RATE)
    except (EngineError, ContextFull, AudioError) as e:   # AudioError: samples the engine cannot take (NaN, huge)
        raise wire_error(e, "file") from None
    usage = {"type": "duration", "seconds": round(seconds, 3)}
    if stream:
        return StreamingResponse(until_drained(state, _stream(state, job, usage)), media_type="text/event-stream")
    done = None
    async for ev in response_events(state.config, job):
        if not isinstance(ev, TextDelta):
            done = ev
    if done is None or done.error:
        raise APIError(500, f"the transcription failed: {done.error if done else 'it ended early'}",
                       type="server_error", code="transcription_failed")
    text = done.text.strip()
    if response_format == "text":
        return PlainTextResponse(text + "\n")
    if response_format == "verbose_json":
        return {"task": "transcribe", "language": language or "", "duration": round(seconds, 3), "text": text,
                "segments": [], "usage": usage}
    return {"text": text, "usage": usage}


async def _stream(state, job, usage: dict) -> AsyncIterator[bytes]:
    async for ev in response_events(state.config, job):
        if isinstance(ev, TextDelta):
            if ev.text:
                yield sse({"type": "transcript.text.delta", "delta": ev.text})
        elif ev.error:
            yield sse({"type": "error", "error": {"type": "server_error", "code": "transcription_failed",
                                                  "message": ev.error}})
        else:
            yield sse({"type": "transcript.text.done", "text": ev.text.strip(), "usage": usage})
    yield DONE
