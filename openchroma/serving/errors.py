"""Errors the server's routes share: OpenAI-shaped API errors, the engine not answering in time, and the one mapping
from the engine's refusals to wire errors (``wire_error``) that every route uses."""

from __future__ import annotations

from typing import Any

from .. import engine as _engine
from ..audio import AudioError
from ..engine import ContextFull, EngineError, SessionLimit
from .voice_library import VoiceError

# Raised by engines that cap a conversation's items (``Engine(max_conversation_items=...)``); older engines lack it.
ConversationLimit: type[Exception] | None = getattr(_engine, "ConversationLimit", None)


class EngineTimeout(RuntimeError):
    """An engine call did not return within ``engine_timeout``: the engine is stuck or overloaded."""


def shorten(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def clip(value: Any, limit: int = 60) -> str:
    """A client's value for an error message, cut to about ``limit`` characters: never echo huge input back."""
    if isinstance(value, str):
        text = repr(value[:limit])
        return text if len(value) <= limit else f"{text}... ({len(value)} characters)"
    if value is None or isinstance(value, (bool, float)):
        return repr(value)
    if isinstance(value, int):
        digits = value.bit_length() * 0.302
        return repr(value) if digits < limit else f"an integer of about {digits:.0f} digits"
    kind = "object" if isinstance(value, dict) else "array" if isinstance(value, list) else type(value).__name__
    return f"a JSON {kind}"


class APIError(Exception):
    """An error answered to the client in OpenAI's shape: ``{"error": {"message", "type", "code", "param"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


def pydantic_problem(errors: list[dict[str, Any]]) -> tuple[str, str, str]:
    """(dotted field path, message, error type) of the most specific of pydantic's errors: the deepest one, so that
    a value matching no branch of a union is reported where it went wrong, not at the union."""
    err = max(errors, key=lambda e: len(_path(e.get("loc", ()))))
    return ".".join(_path(err.get("loc", ()))).replace(".[", "["), err.get("msg", "bad value"), err.get("type", "")


def _path(loc) -> list[str]:
    out: list[str] = []
    for part in loc:
        if isinstance(part, int):
            out.append(f"[{part}]")
        elif part != "body" and not _is_branch(part):
            out.append(part)
    return out


def _is_branch(part: str) -> bool:
    """pydantic's names for a union's branch or a validator wrapping a field, not a field of the payload."""
    return any(c in part for c in "[]-'/") or part in ("str", "int", "float", "bool", "list", "dict", "none") or \
        part[:1].isupper()


VOICE_STATUS = {"invalid": 400, "not_found": 404, "exists": 409, "unavailable": 503, "storage": 500}


def wire_error(e: BaseException, param: str | None = None) -> APIError | None:
    """The API error a client gets for ``e``: the engine's refusals (a full context or conversation, no free
    session, a bad request or bad audio), its time-outs and the voice library's refusals; None for anything else
    (an internal error). Every route maps errors through here."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, VoiceError):   # the voice library's refusals carry their own kind and code
        status = VOICE_STATUS[e.kind]
        return APIError(status, e.message, "server_error" if status >= 500 else "invalid_request_error", e.code,
                        e.param or param)
    message = shorten(str(e), 300)
    if isinstance(e, EngineTimeout):
        return APIError(504, message, "server_error", "engine_timeout", param)
    if isinstance(e, SessionLimit):
        return APIError(503, message, "server_error", "session_limit_reached", param)
    if ConversationLimit is not None and isinstance(e, ConversationLimit):
        return APIError(400, message, code="conversation_item_limit_reached", param=param)
    if isinstance(e, ContextFull):
        return APIError(400, message, code="context_full", param=param)
    if isinstance(e, AudioError):
        return APIError(400, message, code="invalid_audio", param=param)
    if isinstance(e, EngineError):
        return APIError(400, message, param=param)
    return None
