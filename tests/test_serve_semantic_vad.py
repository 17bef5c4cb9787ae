"""semantic_vad over /v1/realtime: the real end-of-turn model (Smart Turn v3.2, pipecat-ai's wheel copy, offline)
decides a spoken turn's end; a server without the model says so in an error event."""

from __future__ import annotations

import base64
import json
import shutil
import time

import numpy as np
import pytest
import websockets.sync.client as ws_client
from server_harness import chroma_server
from test_serve_realtime import add_voice

from openchroma.serving.codecs import float_to_pcm16

pytest.importorskip("onnxruntime")
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
CHUNK = 480  # 20 ms at 24 kHz


def connect(url: str):
    return ws_client.connect(url.replace("http", "ws") + "/v1/realtime?model=chroma-tiny")


def recv(ws, kind: str, seen: list | None = None, limit: float = 60) -> dict:
    deadline = time.time() + limit
    while time.time() < deadline:
        ev = json.loads(ws.recv(timeout=deadline - time.time()))
        if seen is not None:
            seen.append(ev)
        if ev["type"] == kind:
            return ev
        assert ev["type"] != "error" or kind == "error", ev
    raise AssertionError(f"no {kind} within {limit} s")


def update(ws, turn_detection: dict) -> None:
    ws.send(json.dumps({"type": "session.update", "session": {
        "type": "realtime", "audio": {"input": {"turn_detection": turn_detection}, "output": {"voice": "lib"}}}}))


def test_semantic_vad_is_accepted_and_echoed(tiny_chroma, tmp_path):
    with chroma_server(tiny_chroma, tmp_path) as (url, _):
        add_voice(url)
        with connect(url) as ws:
            recv(ws, "session.created")
            for eagerness in ("low", "medium", "high", "auto"):
                update(ws, {"type": "semantic_vad", "eagerness": eagerness})
                td = recv(ws, "session.updated")["session"]["audio"]["input"]["turn_detection"]
                assert td == {"type": "semantic_vad", "eagerness": eagerness, "create_response": True,
                              "interrupt_response": True}
            update(ws, {"type": "semantic_vad"})
            td = recv(ws, "session.updated")["session"]["audio"]["input"]["turn_detection"]
            assert td["eagerness"] == "auto" and "silence_duration_ms" not in td


def test_missing_turn_model_is_an_error_event_and_nothing_changes(tiny_chroma, tmp_path):
    with chroma_server(tiny_chroma, tmp_path, turn_model=str(tmp_path / "none.onnx")) as (url, _):
        add_voice(url)
        with connect(url) as ws:
            recv(ws, "session.created")
            update(ws, {"type": "semantic_vad", "eagerness": "low"})
            err = recv(ws, "error")["error"]
            assert err["code"] == "turn_model_unavailable" and "none.onnx" in err["message"]
            update(ws, {"type": "server_vad"})   # the session is still there and still server_vad
            td = recv(ws, "session.updated")["session"]["audio"]["input"]["turn_detection"]
            assert td["type"] == "server_vad"


@needs_espeak
def test_spoken_turn_completes_with_semantic_vad(tiny_chroma, tmp_path):
    from openchroma.serving.turn_eval import speak

    speech = speak("Thanks, that is all I needed.", rate=24000)
    # high: the turn ends at the model's "finished" or after 2 s of silence at the latest.
    audio = np.concatenate([np.zeros(12000, np.float32), speech, np.zeros(24000 * 3, np.float32)])
    with chroma_server(tiny_chroma, tmp_path) as (url, _):
        add_voice(url)
        with connect(url) as ws:
            recv(ws, "session.created")
            update(ws, {"type": "semantic_vad", "eagerness": "high"})
            recv(ws, "session.updated")
            for i in range(0, len(audio), CHUNK):
                ws.send(json.dumps({"type": "input_audio_buffer.append",
                                    "audio": base64.b64encode(float_to_pcm16(audio[i:i + CHUNK])).decode()}))
            seen: list = []
            started = recv(ws, "input_audio_buffer.speech_started", seen)
            stopped = recv(ws, "input_audio_buffer.speech_stopped", seen)
            speech_end_ms = 500 + 1000 * len(speech) / 24000
            assert 200 <= started["audio_start_ms"] <= 900
            assert speech_end_ms - 400 <= stopped["audio_end_ms"] <= speech_end_ms + 500
            assert recv(ws, "input_audio_buffer.committed", seen)["item_id"] == stopped["item_id"]
            done = recv(ws, "response.done", seen)
            assert done["response"]["status"] in ("completed", "incomplete")   # incomplete: the 2 s cap
            assert any(e["type"] == "response.output_audio.delta" for e in seen)
