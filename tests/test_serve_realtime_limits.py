"""Issue 18 on the realtime transport: items per conversation are capped (1), a huge append is decoded off the
event loop while other users' audio flows (5), back-pressure closes with a reason that says so, the API key
subprotocol is never echoed, and a connection that sends nothing is closed (7). Each failed before its fix."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time

import numpy as np
import pytest
import websockets.sync.client as ws_client
from hardening_helpers import add_voice, connect, open_manual, pcm16_b64, probe, recv, user_text, ws_url
from server_harness import chroma_server
from websockets.exceptions import ConnectionClosed

from openchroma.engine.engine import AsyncSession
from openchroma.serving import codecs


# ----- 1: a conversation holds at most max_conversation_items ------------------------------------------------
def test_items_past_the_cap_get_a_clear_error_and_deleting_makes_room(tiny_chroma, tmp_path):
    with chroma_server(tiny_chroma, tmp_path, max_conversation_items=3) as (url, state):
        add_voice(url)
        with open_manual(url) as ws:
            ids = []
            for i in range(3):
                ws.send(user_text(f"item {i}"))
                ids.append(recv(ws, "conversation.item.added")["item"]["id"])
            ws.send(user_text("one too many"))
            err = recv(ws, "error")["error"]
            assert err["code"] == "conversation_item_limit_reached"
            assert "--max-conversation-items" in err["message"]
            ws.send(json.dumps({"type": "response.create"}))   # its reply would be a fourth item
            done = recv(ws)
            assert done["type"] == "error" and done["error"]["code"] == "conversation_item_limit_reached"
            ws.send(json.dumps({"type": "conversation.item.delete", "item_id": ids[0]}))
            recv(ws, "conversation.item.deleted")
            ws.send(user_text("room again"))
            recv(ws, "conversation.item.added")
            probe(ws, "still-up")


# ----- 5: a 15 MiB append is decoded off the event loop -------------------------------------------------------
def test_another_users_audio_flows_while_a_15_mib_append_is_decoded_and_refused(tiny_chroma, tmp_path, monkeypatch):
    """B streams a response while A sends a 15 MiB append (an odd byte count, so the decoder refuses it at the end).
    The decoder is held until B has received more audio: that can only happen if the decoding runs off the event
    loop (before the fix it ran on it, B got nothing, and the hold timed out)."""
    deltas = []
    seen_while_decoding = []
    original = codecs.InputDecoder.decode

    def held_decode(self, data):
        if len(data) > 2**20:   # A's big append, not B's
            target = len(deltas) + 5
            seen_while_decoding.append(wait_for(lambda: len(deltas) >= target, 10))
        return original(self, data)

    monkeypatch.setattr(codecs.InputDecoder, "decode", held_decode)
    with chroma_server(tiny_chroma, tmp_path, max_response_seconds=30.0, max_ws_message_bytes=16 * 2**20,
                       max_input_audio_seconds=400) as (url, state):
        add_voice(url)
        with open_manual(url) as b, open_manual(url) as a:
            b.send(user_text("Tell me a long story."))
            b.send(json.dumps({"type": "response.create"}))

            def read_b():
                try:
                    while True:
                        ev = json.loads(b.recv(timeout=60))
                        if ev["type"] == "response.output_audio.delta":
                            deltas.append(time.monotonic())
                except (ConnectionClosed, TimeoutError):
                    pass

            reader = threading.Thread(target=read_b, daemon=True)
            reader.start()
            assert wait_for(lambda: len(deltas) >= 3, 60), "B's response never started"
            raw = bytes(15 * 2**20 * 3 // 4 - 1)   # an odd number of pcm16 bytes
            a.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(raw).decode(),
                               "event_id": "big"}))
            err = recv(a, "error", limit=60)["error"]
            assert err["code"] == "invalid_value" and err["event_id"] == "big"
            assert seen_while_decoding == [True], "B's audio stopped while A's append was decoded"
            probe(a, "a-still-up")
            b.send(json.dumps({"type": "response.cancel"}))
        reader.join(timeout=30)


def wait_for(cond, limit: float) -> bool:
    """Whether ``cond()`` came true within ``limit`` seconds (checked every few ms)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.005)
    return False


# ----- 7: back-pressure, the key subprotocol, a header deadline ---------------------------------------------
@pytest.mark.slow   # over 3 s: left out of the fast subset
def test_a_client_held_in_back_pressure_is_closed_with_a_reason_naming_it(tiny_chroma, tmp_path, monkeypatch):
    """The engine takes none of A's audio: A's events back up, the server stops reading them (and with them the
    keepalive's pongs). Before the keepalive can fail with 1011 "keepalive ping timeout", the server closes with
    1013 and a reason (and an error event) that name back-pressure."""
    stuck = threading.Event()

    async def never_taken(self, *args, **kw):
        stuck.set()
        await asyncio_forever()

    monkeypatch.setattr(AsyncSession, "append_audio", never_taken)
    with chroma_server(tiny_chroma, tmp_path, ws_ping_interval=1.0, ws_ping_timeout=4.0, engine_timeout=60,
                       max_pending_input_bytes=2**20) as (url, state):
        add_voice(url)
        with open_manual(url) as ws:
            chunk = json.dumps({"type": "input_audio_buffer.append", "audio": pcm16_b64(np.zeros(12000, np.float32))})

            def flood():
                try:
                    for _ in range(400):
                        ws.send(chunk)
                except ConnectionClosed:
                    pass

            sender = threading.Thread(target=flood, daemon=True)
            sender.start()
            err = recv(ws, "error", limit=30)["error"]
            assert err["code"] == "backpressure_timeout", err
            with pytest.raises(ConnectionClosed) as closed:
                recv(ws, limit=10)
            assert closed.value.rcvd.code == 1013
            assert "back-pressure" in closed.value.rcvd.reason
            sender.join(timeout=10)
        assert stuck.is_set()


async def asyncio_forever() -> None:
    import asyncio

    await asyncio.Event().wait()


def test_the_api_key_subprotocol_is_never_echoed(tiny_chroma, tmp_path):
    with chroma_server(tiny_chroma, tmp_path, api_key="sekret-key") as (url, state):
        with ws_client.connect(ws_url(url), subprotocols=["openai-insecure-api-key.sekret-key"],
                               open_timeout=30) as ws:
            assert recv(ws)["type"] == "session.created"
            assert ws.subprotocol is None
            assert "sekret-key" not in str(ws.response.headers)
        with ws_client.connect(ws_url(url), subprotocols=["realtime", "openai-insecure-api-key.sekret-key"],
                               open_timeout=30) as ws:
            assert recv(ws)["type"] == "session.created"
            assert ws.subprotocol == "realtime"
            assert "sekret-key" not in str(ws.response.headers)


def test_a_connection_that_sends_nothing_is_closed_within_the_header_timeout(tiny_chroma, tmp_path):
    with chroma_server(tiny_chroma, tmp_path, header_timeout=1.0) as (url, state):
        host, port = url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=15) as silent:
            t0 = time.monotonic()
            assert silent.recv(1) == b"", "the server sent something to a client that sent nothing"
            assert time.monotonic() - t0 < 10
        # A client that sends its request in time is served as before.
        with connect(url) as ws:
            assert recv(ws)["type"] == "session.created"
            probe(ws, "served")


@pytest.mark.parametrize("make", [
    lambda big: {"type": "input_audio_buffer.append", "audio": big},
    lambda big: {"audio": big, "type": "input_audio_buffer.append", "event_id": "e1"},
    lambda big: {"type": "input_audio_buffer.append", "event_id": 'a","audio":"x', "audio": big},
    lambda big: {"type": "input_audio_buffer.append", "audio": "A", "audio2": big},
    lambda big: {"type": "conversation.item.create", "item": {"content": [{"type": "input_audio", "audio": big}]}},
    lambda big: {"type": "input_audio_buffer.append", "audio": big[:-4] + "\\/AA"},
])
def test_large_events_parse_exactly_as_json_does(make):
    """The large-message fast path (the audio string cut out before the JSON parser) gives what json.loads gives."""
    from openchroma.serving.realtime import load_event

    event = make("QUJD" * 100_000)
    text = json.dumps(event)
    assert load_event(text) == json.loads(text)
    duplicate = text[:-1] + ', "audio": "\\u0000"}'   # a client's own NUL audio after the real one
    assert load_event(duplicate) == json.loads(duplicate) or "audio" not in event
    with pytest.raises(ValueError):
        load_event(text[:-1])
