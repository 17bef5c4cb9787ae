"""The streaming engine: sessions, voices, batched frame stepping."""

from .engine import (  # noqa: F401
    AudioChunk,
    ContextFull,
    Engine,
    EngineError,
    Response,
    ResponseDone,
    Session,
    SessionLimit,
    TextDelta,
    UnknownVoice,
    Voice,
)
from .stepper import BatchStepper  # noqa: F401
