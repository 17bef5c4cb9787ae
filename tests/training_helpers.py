"""Shared pieces of the training tests: the reference loop, tiny datasets."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import numpy as np
import soundfile as sf


def reference_generation_module():
    """The literal frame-by-frame reference loop (``Generation``): the test oracle in tests/."""
    return importlib.import_module("tests.reference_generation")


def tone(seconds: float, freq: float, rate: int = 24000, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * math.pi * freq * t) * (1 + 0.3 * np.sin(2 * math.pi * 3 * t))).astype(np.float32)


def write_dataset(root: Path, rows: int = 2, response_seconds: float = 1.2) -> Path:
    """A manifest of ``rows`` examples with synthetic audio (tones), text questions."""
    import json

    root.mkdir(parents=True, exist_ok=True)
    (root / "audio").mkdir(exist_ok=True)
    sf.write(root / "audio" / "voice.wav", tone(1.0, 220.0), 24000)
    lines = []
    for i in range(rows):
        sf.write(root / "audio" / f"resp{i}.wav", tone(response_seconds, 300.0 + 90 * i), 24000)
        lines.append({"voice_audio": "audio/voice.wav", "voice_text": "hello there",
                      "user_text": f"question number {i}?", "response_text": f"answer {i}",
                      "response_audio": f"audio/resp{i}.wav"})
    manifest = root / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return manifest
