"""The streaming engine: sessions, voices, batched frame stepping."""

from .engine import (  # noqa: F401
    DEFAULT_SYSTEM_PROMPT,
    AsyncSession,
    AudioChunk,
    ContextFull,
    ConversationLimit,
    Engine,
    EngineError,
    Response,
    ResponseDone,
    Session,
    SessionLimit,
    TextDelta,
    Transcription,
    TranscriptionDone,
    UnknownVoice,
    Usage,
    Voice,
)
from .sampling import SamplingParams  # noqa: F401
from .stepper import Stepper  # noqa: F401
