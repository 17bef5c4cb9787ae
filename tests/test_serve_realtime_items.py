"""/v1/realtime conversation management as voice-agent frameworks use it: per-response options and metadata,
greetings, out-of-band responses, user transcripts, and items deleted, retrieved or inserted by id."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from hardening_helpers import add_voice, connect, recv
from server_harness import SPEECH_WAV, chroma_server

from openchroma.audio import load_audio
from openchroma.serving.codecs import float_to_pcm16


@pytest.fixture(scope="module")
def server(tiny_chroma, tmp_path_factory):
    with chroma_server(tiny_chroma, tmp_path_factory.mktemp("items"), max_response_seconds=0.8,
                       max_context=512) as (url, state):
        add_voice(url)
        yield url, state


def send(ws, event: dict) -> None:
    ws.send(json.dumps(event))


def until(ws, kind: str, seen: list | None = None, limit: float = 60.0) -> dict:
    """Events up to the first of type ``kind`` (an error event fails the test unless it is what is awaited)."""
    while True:
        ev = recv(ws, limit=limit)
        if seen is not None:
            seen.append(ev)
        if ev["type"] == "error" and kind != "error":
            raise AssertionError(f"server error: {ev['error']}")
        if ev["type"] == kind:
            return ev


def start(ws, **audio_input) -> None:
    recv(ws, "session.created")
    send(ws, {"type": "session.update", "session": {"type": "realtime", "audio": {
        "input": {"turn_detection": None, **audio_input}, "output": {"voice": "lib"}}}})
    recv(ws, "session.updated")


def text_item(text: str, role: str = "user", item_id: str | None = None, previous: str | None = None) -> dict:
    ev = {"type": "conversation.item.create",
          "item": {"type": "message", "role": role,
                   "content": [{"type": "input_text" if role == "user" else "text", "text": text}]}}
    if item_id:
        ev["item"]["id"] = item_id
    if previous:
        ev["previous_item_id"] = previous
    return ev


def engine_session(state):
    return next(iter(state.connections)).session


def test_metadata_comes_back_and_the_server_timings_stay_apart(server):
    url, _ = server
    with connect(url) as ws:
        start(ws)
        send(ws, text_item("Hi"))
        meta = {"client_event_id": "ev_123", "topic": "greeting"}
        send(ws, {"type": "response.create", "response": {"metadata": meta}})
        created = until(ws, "response.created")
        done = until(ws, "response.done")
        assert created["response"]["metadata"] == meta and done["response"]["metadata"] == meta
        assert done["response"]["server_timings"]["ttft_ms"] > 0
        send(ws, {"type": "response.create", "response": {"metadata": {"k": 5}}})
        err = until(ws, "error")
        assert err["error"]["param"] == "response.metadata.k"   # the field, down to the key


def test_a_greeting_needs_no_user_input_and_a_failed_response_sends_no_error_event(server):
    url, state = server
    with connect(url) as ws:
        start(ws)
        send(ws, {"type": "response.create", "response": {"instructions": "Greet the user warmly."}})
        seen: list[dict] = []
        done = until(ws, "response.done", seen)
        assert done["response"]["status"] in ("completed", "incomplete")
        assert any(e["type"] == "response.output_audio.delta" for e in seen)
        # Per-response instructions are that response's only: the session's system prompt is unchanged.
        assert engine_session(state).history[0]["content"][0]["text"] != "Greet the user warmly."
        # A response that cannot start (its instructions overflow the context) fails with response.done alone.
        send(ws, {"type": "response.create", "response": {"instructions": "word " * 3000}})
        seen = []
        done = until(ws, "response.done", seen)
        assert done["response"]["status"] == "failed"
        assert done["response"]["status_details"]["error"]["code"] == "context_full"
        assert "error" not in [e["type"] for e in seen]
        send(ws, {"type": "probe.ping", "event_id": "p1"})
        assert recv(ws, "error")["error"]["event_id"] == "p1"   # nothing else was queued: no error came


def test_out_of_band_response_reads_its_input_and_leaves_the_conversation_alone(server):
    url, state = server
    with connect(url) as ws:
        start(ws)
        send(ws, text_item("Remember the word banana.", item_id="u1"))
        until(ws, "conversation.item.done")
        before = engine_session(state).history
        send(ws, {"type": "response.create", "response": {
            "conversation": "none", "output_modalities": ["text"], "metadata": {"purpose": "summary"},
            "input": [{"type": "item_reference", "id": "u1"},
                      {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Summarize."}]}]}})
        seen: list[dict] = []
        done = until(ws, "response.done", seen)
        assert done["response"]["conversation_id"] is None and done["response"]["metadata"] == {"purpose": "summary"}
        assert not [e for e in seen if e["type"] == "conversation.item.added"]
        assert engine_session(state).history == before
        send(ws, {"type": "response.create", "response": {"input": []}})
        assert until(ws, "error")["error"]["param"] == "response.input"
        send(ws, {"type": "response.create", "response": {"audio": {"output": {"voice": "nobody"}}}})
        assert until(ws, "error")["error"]["param"] == "response.audio.output.voice"


def test_items_are_deleted_retrieved_and_inserted_by_id(server):
    url, state = server
    with connect(url) as ws:
        start(ws)
        send(ws, text_item("first", item_id="a"))
        assert until(ws, "conversation.item.added")["previous_item_id"] is None
        send(ws, text_item("second", item_id="b"))
        assert until(ws, "conversation.item.added")["previous_item_id"] == "a"
        send(ws, text_item("zeroth", item_id="z", previous="root"))
        assert until(ws, "conversation.item.added")["previous_item_id"] is None
        send(ws, text_item("between", role="assistant", item_id="m", previous="a"))
        assert until(ws, "conversation.item.added")["previous_item_id"] == "a"
        history = engine_session(state).history
        assert [m.get("id") for m in history[1:]] == ["z", "a", "m", "b"]
        assert history[3] == {"role": "assistant", "content": [{"type": "text", "text": "between"}], "id": "m"}

        send(ws, text_item("again", item_id="a"))
        assert until(ws, "error")["error"]["code"] == "item_create_duplicate_item_id"   # OpenAI's
        send(ws, text_item("lost", previous="nope"))
        assert until(ws, "error")["error"]["param"] == "previous_item_id"

        send(ws, {"type": "conversation.item.retrieve", "item_id": "m"})
        item = until(ws, "conversation.item.retrieved")["item"]
        assert item["id"] == "m" and item["role"] == "assistant" and item["content"][0]["text"] == "between"
        send(ws, {"type": "conversation.item.delete", "item_id": "a"})
        assert until(ws, "conversation.item.deleted")["item_id"] == "a"
        assert [m.get("id") for m in engine_session(state).history[1:]] == ["z", "m", "b"]
        send(ws, {"type": "conversation.item.retrieve", "item_id": "a", "event_id": "rci_a"})
        err = until(ws, "error")["error"]
        assert err["code"] == "item_retrieve_invalid_item_id" and err["event_id"] == "rci_a"   # as Pipecat expects
        # A response after the edit reads the edited history; its item follows the last one.
        send(ws, {"type": "response.create"})
        added = until(ws, "conversation.item.added")
        assert added["previous_item_id"] == "b" and added["item"]["role"] == "assistant"
        until(ws, "response.done")
        assert engine_session(state).history[-1]["id"] == added["item"]["id"]


def test_user_audio_is_transcribed_when_the_client_asks(server, tiny_chroma):
    url, state = server
    wav = load_audio(SPEECH_WAV, 24000).numpy()[: 24000 * 2]
    with connect(url) as ws:
        start(ws, transcription={"model": "whisper-1", "language": "en"})
        send(ws, {"type": "input_audio_buffer.append", "audio": base64.b64encode(float_to_pcm16(wav)).decode()})
        send(ws, {"type": "input_audio_buffer.commit"})
        committed = until(ws, "input_audio_buffer.committed")
        send(ws, {"type": "response.create"})
        seen: list[dict] = []
        completed = until(ws, "conversation.item.input_audio_transcription.completed", seen)
        deltas = [e for e in seen if e["type"] == "conversation.item.input_audio_transcription.delta"]
        assert completed["item_id"] == committed["item_id"] and completed["content_index"] == 0
        assert completed["transcript"] == "".join(e["delta"] for e in deltas).strip()
        assert all(e["item_id"] == committed["item_id"] for e in deltas)
        assert completed["usage"] == {"type": "duration", "seconds": 2.0}
        # The transcript is the Reasoner's own, of the same audio.
        direct = state.engine.transcribe(np.asarray(wav), 24000).result()
        assert completed["transcript"] == direct.text.strip()
        if not any(e["type"] == "response.done" for e in seen):
            until(ws, "response.done")
        send(ws, {"type": "conversation.item.retrieve", "item_id": committed["item_id"]})
        item = until(ws, "conversation.item.retrieved")["item"]
        assert item["content"][0]["transcript"] == completed["transcript"]
        send(ws, {"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
            "transcription": None}}}})
        assert until(ws, "session.updated")["session"]["audio"]["input"]["transcription"] is None


def test_transcriptions_route_answers_like_openai(server):
    from openai import BadRequestError, OpenAI

    url, state = server
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    direct = state.engine.transcribe(str(SPEECH_WAV)).result().text.strip()
    with open(SPEECH_WAV, "rb") as f:
        out = client.audio.transcriptions.create(model="whisper-1", file=f)
    assert out.text == direct
    with open(SPEECH_WAV, "rb") as f:
        text = client.audio.transcriptions.create(model="gpt-4o-transcribe", file=f, response_format="text")
    assert text.strip() == direct
    with open(SPEECH_WAV, "rb") as f:
        events = list(client.audio.transcriptions.create(model="gpt-4o-transcribe", file=f, stream=True))
    assert events[-1].type == "transcript.text.done" and events[-1].text == direct
    assert "".join(e.delta for e in events[:-1]).strip() == direct
    with pytest.raises(BadRequestError, match="not a|audio"):
        client.audio.transcriptions.create(model="whisper-1", file=("x.wav", b"not audio at all"))
    with open(SPEECH_WAV, "rb") as f, pytest.raises(BadRequestError, match="response_format"):
        client.audio.transcriptions.create(model="whisper-1", file=f, response_format="srt")


def test_any_earlier_reply_can_be_truncated_and_a_late_cancel_is_named_as_openai_does(server):
    url, state = server
    with connect(url) as ws:
        start(ws)
        send(ws, text_item("one"))
        send(ws, {"type": "response.create"})
        first = until(ws, "response.done")["response"]
        item = first["output"][0]
        send(ws, text_item("two"))
        send(ws, {"type": "response.create"})
        until(ws, "response.created")
        # What Pipecat does on every barge-in: truncate the earlier reply, even while the next one runs.
        send(ws, {"type": "conversation.item.truncate", "item_id": item["id"], "content_index": 0, "audio_end_ms": 0})
        truncated = until(ws, "conversation.item.truncated")
        assert truncated["item_id"] == item["id"]
        until(ws, "response.done")
        history = engine_session(state).history
        assert next(m for m in history if m.get("id") == item["id"])["content"][0]["text"] == ""
        # A cancel for a response that already ended: OpenAI's words, which LiveKit recognises.
        send(ws, {"type": "response.cancel", "response_id": first["id"]})
        err = until(ws, "error")["error"]
        assert err["code"] == "response_cancel_not_active" and err["message"].startswith("Cancellation failed")
        send(ws, {"type": "conversation.item.truncate", "item_id": "nope", "audio_end_ms": 0})
        assert until(ws, "error")["error"]["param"] == "item_id"


@pytest.mark.parametrize("event,param", [
    ({"type": "session.update", "session": {"audio": {"output": {"format": {"type": "audio/pcm", "rate": "x"}}}}},
     "session.audio.output.format.rate"),
    ({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"type": "server_vad",
                                                                                   "threshold": 3}}}}},
     "session.audio.input.turn_detection.threshold"),
    ({"type": "response.create", "response": {"input": [{"type": "item_reference"}], "conversation": "none"}},
     "response.input[0].id"),
    ({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                   "content": [{"type": "input_text", "text": 5}]}},
     "item.content[0].text"),
])
def test_a_bad_event_is_answered_with_the_path_of_the_bad_field(server, event, param):
    url, _ = server
    with connect(url) as ws:
        start(ws)
        send(ws, event)
        err = until(ws, "error")["error"]
        assert err["param"] == param and err["message"].startswith(param + ": ")
