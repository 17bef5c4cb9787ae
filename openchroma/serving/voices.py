"""``/v1/voices``: the voice library over HTTP (storage in ``voice_library``; its refusals become API errors).

``POST/GET /v1/voices``, ``GET/DELETE /v1/voices/{name}``, ``GET /v1/voices/{name}/audio``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from .errors import APIError, wire_error
from .state import get_state
from .voice_library import VoiceError


async def library_call(fn, *args):
    """A library operation off the event loop (it reads files, and ``add`` waits for the engine's encoder)."""
    try:
        return await run_in_threadpool(fn, *args)
    except VoiceError as e:
        raise wire_error(e) from None


router = APIRouter()

_FIELDS = {"file": "the reference audio, a file upload", "transcript": "the exact words the audio says",
           "name": "the voice's name"}


@router.post("/v1/voices", status_code=201)
async def create_voice(request: Request, file: Annotated[UploadFile | None, File()] = None,
                       audio: Annotated[UploadFile | None, File()] = None,
                       transcript: Annotated[str | None, Form()] = None, name: Annotated[str | None, Form()] = None):
    """Clone a voice from a multipart form: ``file`` (or ``audio``), ``transcript`` and ``name``."""
    state = get_state(request)
    state.require_engine()
    upload = file if file is not None else audio
    if name is None or transcript is None:  # FastAPI reads an empty field as absent: tell "empty" from "missing"
        raw = await request.form()
        name = name if name is not None or not isinstance(raw.get("name"), str) else raw["name"]
        if transcript is None and isinstance(raw.get("transcript"), str):
            transcript = raw["transcript"]
    given = {"file": upload is not None, "transcript": transcript is not None, "name": name is not None}
    missing = [f for f, ok in given.items() if not ok]
    if missing:
        raise APIError(400, "missing form field" + ("s " if len(missing) > 1 else " ")
                       + ", ".join(f"'{f}' ({_FIELDS[f]})" for f in missing)
                       + "; send multipart/form-data with file, transcript and name", code="missing_required_parameter",
                       param=missing[0])
    data = await upload.read()
    record = await library_call(state.voices.add, name, data, transcript, upload.filename, upload.content_type)
    return JSONResponse(record, status_code=201)


@router.get("/v1/voices")
async def list_voices(request: Request):
    return {"object": "list", "data": await library_call(get_state(request).voices.list)}


@router.get("/v1/voices/{name}")
async def get_voice(request: Request, name: str):
    return await library_call(get_state(request).voices.get, name)


@router.get("/v1/voices/{name}/audio")
async def get_voice_audio(request: Request, name: str):
    """The reference audio as uploaded, for clients to play."""
    path, media_type = await library_call(get_state(request).voices.audio_file, name)
    return FileResponse(path, media_type=media_type, filename=f"{name}{path.suffix}", content_disposition_type="inline")


@router.delete("/v1/voices/{name}")
async def delete_voice(request: Request, name: str):
    await library_call(get_state(request).voices.delete, name)
    return {"id": name, "object": "voice", "deleted": True}
