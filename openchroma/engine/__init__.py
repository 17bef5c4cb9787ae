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
from .schedule import (  # noqa: F401
    DEFAULT_MAX_FRAMES,
    FRAME_SECONDS,
    FRAMES_PER_TEXT_TOKEN,
    frames_for_seconds,
    frames_for_text,
    frames_heard,
    seconds_of_frames,
)
from .stepper import Stepper  # noqa: F401
