"""A realtime session's settings: the values ``session.update`` may change, checked whole before any is applied,
and the session object they are reported in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..engine import DEFAULT_SYSTEM_PROMPT
from . import realtime_events as ev
from .realtime_events import RealtimeError

DEFAULT_VAD = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500,
               "create_response": True, "interrupt_response": True, "idle_timeout_ms": None}
DEFAULT_SEMANTIC_VAD = {"type": "semantic_vad", "eagerness": "auto", "create_response": True,
                        "interrupt_response": True}
INPUT_RATES = {"audio/pcm": None, "audio/pcmu": 8000, "audio/pcma": 8000}
PCM_INPUT_RATES = (8000, 16000, 24000, 44100, 48000)
# A voice name to a library voice; None keeps the current one (raises RealtimeError when it names none).
VoiceResolver = Callable[[str, str], str | None]


def audio_format(fmt: ev.PCM | ev.G711, param: str, inputs: bool) -> dict[str, Any]:
    """An audio format as reported back; pcm input may come at other rates than 24 kHz, output may not."""
    if fmt.type != "audio/pcm":
        return {"type": fmt.type}
    if fmt.rate not in (PCM_INPUT_RATES if inputs else (24000,)):
        allowed = ", ".join(map(str, PCM_INPUT_RATES)) if inputs else "24000"
        raise RealtimeError(f"{param}.rate: audio/pcm at {fmt.rate} Hz is not supported here; use {allowed}",
                            "invalid_value", param + ".rate")
    return {"type": "audio/pcm", "rate": fmt.rate}


def turn_detection(td: ev.TurnDetection | None) -> dict[str, Any] | None:
    if td is None:
        return None
    if td.type == "semantic_vad":   # the end-of-turn model decides (turn_detection.SemanticVAD); silero's settings
        out = dict(DEFAULT_SEMANTIC_VAD)   # may be given too, but OpenAI's object has no silence length
        out.update(td.model_dump(include={"eagerness", "threshold", "prefix_padding_ms", "create_response",
                                          "interrupt_response"}, exclude_none=True))
        return out
    out = dict(DEFAULT_VAD)
    out.update(td.model_dump(include={"threshold", "prefix_padding_ms", "silence_duration_ms", "idle_timeout_ms",
                                      "create_response", "interrupt_response"}, exclude_none=True))
    return out


@dataclass
class SessionChange:
    """A checked ``session.update``: None (or ``has_*`` False) leaves a setting as it is."""

    instructions: str | None = None
    voice: str | None = None
    input_format: dict[str, Any] | None = None
    output_format: dict[str, Any] | None = None
    has_turn_detection: bool = False
    turn_detection: dict[str, Any] | None = None
    has_transcription: bool = False
    transcription: dict[str, Any] | None = None
    output_modalities: list[str] | None = None
    max_output_tokens: int | str | None = None

    @property
    def resets_vad(self) -> bool:
        return self.has_turn_detection or self.input_format is not None


@dataclass
class SessionSettings:
    """The session's settings, in the GA shape they are reported in."""

    instructions: str = DEFAULT_SYSTEM_PROMPT
    voice: str | None = None
    output_modalities: list[str] = field(default_factory=lambda: ["audio"])
    max_output_tokens: int | str = "inf"
    input_format: dict[str, Any] = field(default_factory=lambda: {"type": "audio/pcm", "rate": 24000})
    output_format: dict[str, Any] = field(default_factory=lambda: {"type": "audio/pcm", "rate": 24000})
    turn_detection: dict[str, Any] | None = field(default_factory=lambda: dict(DEFAULT_VAD))
    transcription: dict[str, Any] | None = None   # user transcripts: off until the client asks

    @property
    def input_rate(self) -> int:
        return self.input_format.get("rate") or INPUT_RATES[self.input_format["type"]]

    @staticmethod
    def check(s: ev.SessionConfig, resolve_voice: VoiceResolver) -> SessionChange:
        """``session.update``'s ``session`` checked whole (raises ``RealtimeError``), nothing applied yet."""
        _, voice = s.given("output.voice", "voice")
        _, in_fmt = s.given("input.format", "input_audio_format")
        _, out_fmt = s.given("output.format", "output_audio_format")
        has_td, td = s.given("input.turn_detection", "turn_detection")
        has_tr, tr = s.given("input.transcription", "input_audio_transcription")
        modalities = None
        if s.output_modalities is not None:
            modalities = ["audio"] if "audio" in s.output_modalities else ["text"]
        return SessionChange(
            instructions=s.instructions,
            voice=resolve_voice(voice, "session.audio.output.voice") if voice is not None else None,
            input_format=audio_format(in_fmt, "session.audio.input.format", True) if in_fmt is not None else None,
            output_format=audio_format(out_fmt, "session.audio.output.format", False) if out_fmt is not None
            else None,
            has_turn_detection=has_td, turn_detection=turn_detection(td) if has_td else None,
            has_transcription=has_tr, transcription=tr.model_dump(exclude_none=True) if tr is not None else None,
            output_modalities=modalities, max_output_tokens=s.max_output_tokens)

    def apply(self, c: SessionChange) -> None:
        for name in ("instructions", "voice", "input_format", "output_format", "output_modalities",
                     "max_output_tokens"):
            if getattr(c, name) is not None:
                setattr(self, name, getattr(c, name))
        if c.has_turn_detection:
            self.turn_detection = c.turn_detection
        if c.has_transcription:
            self.transcription = c.transcription

    def session_object(self, session_id: str, model_id: str) -> dict[str, Any]:
        return {
            "type": "realtime", "object": "realtime.session", "id": session_id, "model": model_id,
            "output_modalities": list(self.output_modalities), "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens, "tools": [], "tool_choice": "auto",
            "audio": {
                "input": {"format": dict(self.input_format), "noise_reduction": None,
                          "transcription": dict(self.transcription) if self.transcription is not None else None,
                          "turn_detection": dict(self.turn_detection) if self.turn_detection else None},
                "output": {"format": dict(self.output_format), "voice": self.voice, "speed": 1.0},
            },
        }
