"""semantic_vad: Smart Turn v3.2 (the copy in pipecat-ai's wheel, offline) deciding after silero's silences."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys

import numpy as np
import pytest

from openchroma.serving.turn_detection import (
    SMART_TURN_FILE,
    SemanticVAD,
    SemanticVADConfig,
    TurnModelError,
    load_turn_model,
    resolve_turn_model,
    smart_turn_features,
    turn_detector,
)
from openchroma.serving.vad import StreamingVAD

pytestmark = pytest.mark.skipif(importlib.util.find_spec("pipecat") is None or
                                importlib.util.find_spec("onnxruntime") is None,
                                reason="needs pipecat-ai (it ships the Smart Turn model) and onnxruntime")
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")

RATE = 24000
COMPLETE = "Thanks, that is all I needed."
CUT = "So what I would really like is"


@pytest.fixture(scope="module")
def speech():
    from openchroma.serving.turn_eval import speak

    return {text: speak(text, "en-us", RATE) for text in (COMPLETE, CUT, "to go to the beach this weekend.")}


def play(detector, *parts: np.ndarray, chunk_ms: int = 20) -> list[tuple[float, object]]:
    """Stream the parts in chunks as a realtime client does; -> [(ms pushed when the event came, event)]."""
    audio = np.concatenate(parts)
    step = RATE * chunk_ms // 1000
    out = []
    for i in range(0, len(audio), step):
        for e in detector.push(audio[i : i + step]):
            out.append((1000 * min(i + step, len(audio)) / RATE, e))
    return out


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), dtype=np.float32)


def test_model_loads_from_the_installed_package_without_importing_pipecat():
    code = ("import sys\nfrom openchroma.serving.turn_detection import load_turn_model\n"
            "m = load_turn_model()\nprint(m.path)\nassert 'pipecat' not in sys.modules, 'pipecat was imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    path = out.stdout.strip().splitlines()[-1]
    assert path.endswith(f"pipecat/audio/turn/smart_turn/data/{SMART_TURN_FILE}")
    assert resolve_turn_model(path) == resolve_turn_model()


def test_features_match_whisper_feature_extractor():
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=80, chunk_length=8)
    rng = np.random.default_rng(0)
    for seconds in (3.3, 11.0):  # zero-padded in front; only the last 8 s
        audio = (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)
        eight = np.concatenate((np.zeros(max(0, 128000 - len(audio)), np.float32), audio))[-128000:]
        ref = extractor(eight, sampling_rate=16000, padding="max_length", max_length=128000, truncation=True,
                        do_normalize=True, return_tensors="np").input_features[0]
        np.testing.assert_allclose(smart_turn_features(audio), ref, atol=1e-4)


@needs_espeak
def test_complete_sentence_then_silence_ends_the_turn_at_the_first_check(speech):
    vad = SemanticVAD(SemanticVADConfig(eagerness="medium"), RATE)
    events = play(vad, silence(0.5), speech[COMPLETE], silence(2.0))
    assert [e.kind for _, e in events] == ["speech_started", "speech_stopped"]
    speech_end_ms = 500 + 1000 * len(speech[COMPLETE]) / RATE
    at_ms, stopped = events[1]
    assert at_ms - speech_end_ms < 600  # the model's word, not the 4 s wait
    assert abs(stopped.audio_ms - speech_end_ms) < 150  # audio_end_ms: where the silence began
    assert vad.last_check is not None and vad.last_check.complete and vad.last_check.probability >= 0.5
    assert not vad.speaking


@needs_espeak
def test_cut_sentence_with_low_eagerness_waits_longer_than_a_complete_one(speech):
    ends = {}
    for text in (COMPLETE, CUT):
        vad = SemanticVAD(SemanticVADConfig(eagerness="low"), RATE)
        events = play(vad, silence(0.5), speech[text], silence(9.0))
        assert [e.kind for _, e in events] == ["speech_started", "speech_stopped"], text
        ends[text] = events[1][0] - (500 + 1000 * len(speech[text]) / RATE)
    assert ends[COMPLETE] < 600
    assert 7800 <= ends[CUT] <= 8500  # low's longest wait, 8 s from the start of the silence


@needs_espeak
def test_speech_after_a_pause_continues_the_same_turn(speech):
    vad = SemanticVAD(SemanticVADConfig(eagerness="medium"), RATE)
    rest = speech["to go to the beach this weekend."]
    events = play(vad, silence(0.5), speech[CUT], silence(1.5), rest, silence(5.0))
    assert [e.kind for _, e in events] == ["speech_started", "speech_stopped"]
    resumed_ms = 500 + 1000 * (len(speech[CUT]) / RATE + 1.5)
    assert events[1][1].audio_ms > resumed_ms  # the turn ended after the second part, not in the pause


@needs_espeak
def test_reset_drops_an_open_turn(speech):
    vad = SemanticVAD(SemanticVADConfig(), RATE)
    assert [e.kind for _, e in play(vad, silence(0.3), speech[CUT][: RATE // 2])] == ["speech_started"]
    assert vad.speaking
    vad.reset()
    assert not vad.speaking and play(vad, silence(5.0)) == []


def test_silence_asks_the_model_nothing():
    vad = SemanticVAD(SemanticVADConfig(eagerness="high"), 16000)
    assert play(vad, silence(3.0)) == [] and vad.last_check is None and not vad.speaking


def test_turn_detector_follows_the_session_settings():
    server = turn_detector({"type": "server_vad", "threshold": 0.6, "silence_duration_ms": 700}, RATE)
    assert isinstance(server, StreamingVAD) and server.config.silence_duration_ms == 700
    semantic = turn_detector({"type": "semantic_vad", "eagerness": "low", "prefix_padding_ms": 100}, RATE)
    assert isinstance(semantic, SemanticVAD) and semantic.config.setting.max_wait_ms == 8000
    assert semantic.config.prefix_padding_ms == 100
    assert turn_detector({"type": "semantic_vad", "eagerness": None}, RATE).config.eagerness == "auto"
    with pytest.raises(ValueError, match="eagerness"):
        SemanticVADConfig(eagerness="eager")  # type: ignore[arg-type]


def test_a_bad_model_path_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(TurnModelError, match="no such end-of-turn model file"):
        SemanticVAD(SemanticVADConfig(model=str(tmp_path / "missing.onnx")))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(TurnModelError, match="junk.onnx: not a loadable ONNX model"):
        load_turn_model(junk)
    with pytest.raises(TurnModelError, match=f"the directory holds no {SMART_TURN_FILE}"):
        resolve_turn_model(tmp_path)
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    with pytest.raises(TurnModelError, match="nobody/nothing: could not download"):
        load_turn_model("nobody/nothing")
