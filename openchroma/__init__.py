"""OpenChroma: real-time streaming spoken dialogue with voice cloning, for FlashLabs Chroma 1.0 weights."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .engine.generate import GenerationResult, generate  # noqa: F401
    from .engine.sampling import SamplingParams  # noqa: F401
    from .loading import CheckpointError, LoadedModel, load  # noqa: F401
    from .pipeline import Chroma  # noqa: F401
    from .voice import VoicePrompt  # noqa: F401

_EXPORTS = {
    "load": "loading", "LoadedModel": "loading", "CheckpointError": "loading",
    "generate": "engine.generate", "GenerationResult": "engine.generate",
    "SamplingParams": "engine.sampling", "VoicePrompt": "voice", "Chroma": "pipeline",
}


def __getattr__(name: str):
    # Lazy, so `openchroma --help` and light imports don't pay for torch and friends.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)


__all__ = sorted(_EXPORTS)
