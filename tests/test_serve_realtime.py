"""/v1/realtime against the official ``openai`` SDK (and raw WebSockets for what the SDK won't send)."""

from __future__ import annotations

import base64
import json
import time

import httpx
import numpy as np
import pytest
import websockets.sync.client as ws_client
from openai import OpenAI
from server_harness import SPEECH_WAV, chroma_server
from websockets.exceptions import InvalidStatus

from openchroma.audio import load_audio
from openchroma.engine import AudioChunk, Engine, ResponseDone
from openchroma.serving.codecs import float_to_pcm16, pcm16_to_float

TRANSCRIPT = "Hello there. Could you tell me what the weather will be like tomorrow?"
CHUNK = 2400  # 100 ms at 24 kHz


@pytest.fixture(scope="module")
def speech24() -> np.ndarray:
    """The speech sample at 24 kHz, quantized to pcm16 as a client sends it."""
    wav = load_audio(SPEECH_WAV, 24000).numpy()
    return pcm16_to_float(float_to_pcm16(wav))


def add_voice(url: str, name: str = "lib", headers=None) -> None:
    with open(SPEECH_WAV, "rb") as f:
        r = httpx.post(f"{url}/v1/voices", files={"file": ("speech.wav", f, "audio/wav")},
                       data={"name": name, "transcript": TRANSCRIPT}, headers=headers or {}, timeout=60)
    assert r.status_code == 201, r.text


def b64(x: np.ndarray) -> str:
    return base64.b64encode(float_to_pcm16(x)).decode()


def until(conn, kind: str, seen: list | None = None, limit: float = 60):
    """Receive events until one of type ``kind``; returns it (everything received goes to ``seen``)."""
    deadline = time.time() + limit
    while time.time() < deadline:
        ev = conn.recv()
        if seen is not None:
            seen.append(ev)
        if ev.type == "error" and kind != "error":
            raise AssertionError(f"server error: {ev.error}")
        if ev.type == kind:
            return ev
    raise AssertionError(f"no {kind} within {limit} s")


def manual_session(voice: str = "lib") -> dict:
    return {"type": "realtime", "instructions": "You are a helpful assistant.",
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": None},
                      "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": voice}}}


def test_sdk_runs_a_whole_turn_and_streams_exactly_what_the_engine_says(tiny_chroma, tmp_path, speech24):
    with chroma_server(tiny_chroma, tmp_path, max_response_seconds=1.6) as (url, state):
        add_voice(url)
        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        with client.realtime.connect(model="chroma-tiny") as conn:
            created = until(conn, "session.created")
            assert created.session.type == "realtime"
            conn.session.update(session=manual_session())
            updated = until(conn, "session.updated")
            assert updated.session.audio.output.voice == "lib"
            assert updated.session.audio.input.turn_detection is None
            for i in range(0, len(speech24), CHUNK):
                conn.input_audio_buffer.append(audio=b64(speech24[i:i + CHUNK]))
            conn.input_audio_buffer.commit()
            committed = until(conn, "input_audio_buffer.committed")
            item = until(conn, "conversation.item.added")
            assert item.item.id == committed.item_id and item.item.role == "user"
            conn.response.create()
            events: list = []
            done = until(conn, "response.done", events)

        types = [e.type for e in events]
        for kind in ("response.created", "response.output_item.added", "response.content_part.added",
                     "response.output_audio.delta", "response.output_audio.done",
                     "response.output_audio_transcript.done", "response.content_part.done",
                     "response.output_item.done"):
            assert kind in types, kind
        assert types.index("response.created") < types.index("response.output_audio.delta") \
            < types.index("response.output_audio.done") < types.index("response.output_item.done")
        audio = b"".join(base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta")
        deltas = "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta")
        transcript = next(e for e in events if e.type == "response.output_audio_transcript.done").transcript
        assert deltas == transcript
        assert done.response.status in ("completed", "incomplete")
        assert done.response.output[0].content[0].transcript == transcript
        assert done.response.usage.output_token_details.audio_tokens == len(audio) // 3840
        assert done.response.usage.input_token_details.audio_tokens > 0
        timings = done.response.model_extra["server_timings"]   # the client's metadata stays the client's
        assert done.response.metadata is None and timings["ttft_ms"] > 0 and timings["rtf"] > 0

        # The same turn straight through the engine gives the same bytes: the plumbing is exact.
        engine = Engine(tiny_chroma, max_sessions=1, max_response_frames=20)
        try:
            engine.add_voice("lib", state.engine.voices["lib"].prompt)
            s = engine.create_session("lib", "You are a helpful assistant.")
            for i in range(0, len(speech24), CHUNK):
                s.append_audio(speech24[i:i + CHUNK], 24000)
            s.commit_audio()
            ref = [ev for ev in s.respond(20)]
        finally:
            engine.close()
        ref_audio = b"".join(float_to_pcm16(e.audio) for e in ref if isinstance(e, AudioChunk))
        assert audio == ref_audio
        assert transcript == next(e for e in ref if isinstance(e, ResponseDone)).text


def vad_session(voice: str = "lib", silence_ms: int = 300) -> dict:
    return {"type": "realtime", "audio": {"input": {"turn_detection": {
        "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 200, "silence_duration_ms": silence_ms}},
        "output": {"voice": voice}}}


def test_sdk_server_vad_turn_then_barge_in(tiny_chroma, tmp_path, speech24):
    silence = np.zeros(24000, np.float32)
    with chroma_server(tiny_chroma, tmp_path, max_response_seconds=60) as (url, state):
        add_voice(url)
        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        with client.realtime.connect(model="chroma-tiny") as conn:
            until(conn, "session.created")
            conn.session.update(session=vad_session())
            until(conn, "session.updated")
            turn = np.concatenate([silence, speech24, silence])
            for i in range(0, len(turn), CHUNK):
                conn.input_audio_buffer.append(audio=b64(turn[i:i + CHUNK]))
            events: list = []
            started = until(conn, "input_audio_buffer.speech_started", events)
            stopped = until(conn, "input_audio_buffer.speech_stopped", events)
            assert 500 <= started.audio_start_ms <= 1200
            speech_end_ms = 1000 + 1000 * len(speech24) / 24000
            assert speech_end_ms - 400 <= stopped.audio_end_ms <= speech_end_ms + 700
            assert until(conn, "input_audio_buffer.committed", events).item_id == stopped.item_id
            until(conn, "response.created", events)
            first = until(conn, "response.output_audio.delta", events)

            # The user talks over the answer: the server cancels it (barge-in) and keeps only what was heard.
            for i in range(0, len(speech24), CHUNK):
                conn.input_audio_buffer.append(audio=b64(speech24[i:i + CHUNK]))
            until(conn, "input_audio_buffer.speech_started", events)
            done = until(conn, "response.done", events)
            assert done.response.status == "cancelled"
            assert done.response.status_details.reason == "turn_detected"
            frames = sum(1 for e in events if e.type == "response.output_audio.delta"
                         and e.response_id == first.response_id)
            assert frames < 750
            heard = done.response.output[0].content[0].transcript
            conn.conversation.item.truncate(item_id=first.item_id, content_index=0, audio_end_ms=0)
            truncated = until(conn, "conversation.item.truncated")
            assert truncated.audio_end_ms == 0
            session = next(iter(state.connections)).session
            assert session.history[-1] == {"role": "assistant", "content": [{"type": "text", "text": ""}],
                                           "id": first.item_id}
            assert isinstance(heard, str)

            # The interrupting turn ends in silence and gets its own answer.
            for i in range(0, len(silence), CHUNK):
                conn.input_audio_buffer.append(audio=b64(silence[i:i + CHUNK]))
            until(conn, "input_audio_buffer.committed")
            conn.response.cancel()   # no need to hear it all
            second = until(conn, "response.done")
            assert second.response.id != done.response.id


def raw_connect(url: str, **kw):
    return ws_client.connect(url.replace("http", "ws") + "/v1/realtime?model=chroma-tiny", **kw)


def recv_json(ws, kind: str | None = None, limit: float = 30) -> dict:
    deadline = time.time() + limit
    while time.time() < deadline:
        ev = json.loads(ws.recv(timeout=limit))
        if kind is None or ev["type"] == kind:
            return ev
    raise AssertionError(f"no {kind}")


def test_bad_events_get_error_events_and_the_connection_stays_up(tiny_chroma, tmp_path):
    with chroma_server(tiny_chroma, tmp_path, max_ws_message_bytes=64 * 1024) as (url, state):
        add_voice(url)
        with raw_connect(url) as ws:
            assert recv_json(ws)["type"] == "session.created"
            cases = [
                ("{not json", "invalid_json"),
                (json.dumps([1, 2]), "invalid_event"),
                (json.dumps({"type": "no.such.event"}), "invalid_event_type"),
                (json.dumps({"type": "input_audio_buffer.commit"}), "input_audio_buffer_commit_empty"),
                (json.dumps({"type": "response.cancel"}), "response_cancel_not_active"),
                (json.dumps({"type": "input_audio_buffer.append", "audio": "###"}), "invalid_value"),
                (json.dumps({"type": "input_audio_buffer.append", "audio": "AA=="}), "invalid_value"),  # 1 byte
                (json.dumps({"type": "session.update", "session": {"audio": {"output": {"voice": "nobody"}}}}),
                 "voice_not_found"),
                (json.dumps({"type": "session.update", "session": {"audio": {"output": {"format": {
                    "type": "audio/pcm", "rate": 16000}}}}}), "invalid_value"),
                (json.dumps({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {
                    "type": "server_vad", "threshold": 3}}}}}), "invalid_value"),
                (json.dumps({"type": "conversation.item.create", "item": {"type": "function_call"}}),
                 "unsupported_item"),
                (json.dumps({"type": "input_audio_buffer.append", "audio": "A" * 70000}), "message_too_large"),
            ]
            for text, code in cases:
                ws.send(text)
                ev = recv_json(ws)
                assert ev["type"] == "error", (text[:60], ev)
                assert ev["error"]["code"] == code, (text[:60], ev)
                assert ev["error"]["message"]
            # Still usable: a text turn answered in text only.
            ws.send(json.dumps({"type": "session.update", "session": {"output_modalities": ["text"]}}))
            assert recv_json(ws, "session.updated")["session"]["output_modalities"] == ["text"]
            ws.send(json.dumps({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi!"}]}}))
            recv_json(ws, "conversation.item.added")
            ws.send(json.dumps({"type": "response.create", "event_id": "evt_1"}))
            done = recv_json(ws, "response.done")
            assert done["response"]["status"] in ("completed", "incomplete")
            assert done["response"]["output"][0]["content"][0]["type"] == "output_text"


def test_session_limit_api_key_and_disconnect_frees_the_session(tiny_chroma, tmp_path, speech24):
    with chroma_server(tiny_chroma, tmp_path, max_sessions=1, api_key="sekret",
                       max_response_seconds=60) as (url, state):
        add_voice(url, headers={"Authorization": "Bearer sekret"})
        with pytest.raises(InvalidStatus) as err:
            with raw_connect(url):
                pass
        assert err.value.response.status_code == 401
        with pytest.raises(InvalidStatus):
            with raw_connect(url, additional_headers={"Authorization": "Bearer wrong"}):
                pass
        # Browsers pass the key as a subprotocol.
        with raw_connect(url, subprotocols=["realtime", "openai-insecure-api-key.sekret"]) as ws:
            assert recv_json(ws)["type"] == "session.created"
        deadline = time.time() + 2
        while state.engine.sessions and time.time() < deadline:
            time.sleep(0.02)

        client = OpenAI(base_url=f"{url}/v1", api_key="sekret")
        with client.realtime.connect(model="chroma-tiny") as conn:
            until(conn, "session.created")
            with raw_connect(url, additional_headers={"Authorization": "Bearer sekret"}) as ws2:
                ev = recv_json(ws2)
                assert ev["type"] == "error" and ev["error"]["code"] == "session_limit_reached"
            conn.session.update(session=manual_session())
            until(conn, "session.updated")
            conn.input_audio_buffer.append(audio=b64(speech24))
            conn.input_audio_buffer.commit()
            conn.response.create()
            until(conn, "response.output_audio.delta")
            assert len(state.engine.sessions) == 1
            t0 = time.time()
        # The client vanished mid-response: its slot is free within a second.
        while state.engine.sessions and time.time() - t0 < 1.0:
            time.sleep(0.01)
        assert not state.engine.sessions, "the session was not freed within 1 s"
        metrics = httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer sekret"}).text
        assert "openchroma_sessions_rejected_total 1.0" in metrics
        assert 'openchroma_responses_total{route="realtime",status="cancelled"} 1.0' in metrics


def test_health_models_metrics(tiny_chroma, tmp_path):
    with chroma_server(tiny_chroma, tmp_path) as (url, _):
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
        client = OpenAI(base_url=f"{url}/v1", api_key="x")
        assert [m.id for m in client.models.list()] == ["chroma-tiny"]
        text = httpx.get(f"{url}/metrics").text
        for name in ("openchroma_sessions_active", "openchroma_ttft_seconds", "openchroma_rtf",
                     "openchroma_frames_generated_total", "openchroma_errors_total"):
            assert name in text
