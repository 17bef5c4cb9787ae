"""The streaming engine: sessions, voices, batched frame stepping. Serving imports the engine from here only.

Map: ``engine.py`` (``Engine``: the public API and the sessions' commands), ``session.py`` (``Session``,
``AsyncSession``), ``worker.py`` (the worker thread: commands, the frame loop, background slices, failures),
``responses.py`` (a response from request to last frame; the order of background work), ``conversation.py``
(history, item ids, edits, prompt ids and context fitting: pure), ``turn_audio.py`` (the user's audio part:
resampling, log-mel, windows, pending encodes), ``transcription.py``, ``voices.py``, ``events.py`` (errors and
the event streams), ``stepper.py`` (the batched frame step), ``schedule.py`` (the 1:2 schedule's arithmetic),
``sampling.py``, ``generate.py`` (whole responses through a one-slot stepper).
"""

from .engine import (  # noqa: F401
    DEFAULT_MAX_CONVERSATION_ITEMS,
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
