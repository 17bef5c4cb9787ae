"""Phone calls over Twilio Media Streams: the TwiML webhook (and its signature check), and a simulated Twilio that
speaks Twilio's documented stream messages holding a spoken turn and a barge-in."""

from __future__ import annotations

import base64
import json
import shutil
import time
import xml.etree.ElementTree as ET

import httpx
import numpy as np
import pytest
import websockets.sync.client as ws_client
from server_harness import chroma_server
from test_serve_realtime import add_voice
from websockets.exceptions import ConnectionClosed, InvalidStatus

from openchroma.serving.codecs import ulaw_encode
from openchroma.serving.twilio import twilio_signature

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
SID = "MZ00000000000000000000000000000000"
FRAME = 160   # 20 ms of μ-law at 8 kHz, as Twilio sends it


def test_signature_matches_twilios_documented_example():
    params = {"CallSid": "CA1234567890ABCDE", "Caller": "+12349013030", "Digits": "1234", "From": "+12349013030",
              "To": "+18005551212"}
    assert twilio_signature("12345", "https://mycompany.com/myapp.php?foo=1&bar=2", params) == \
        "0/KCTR6DLpKmkAf8muzZqo1nDgQ="


def test_twiml_route_and_signature_check(tiny_chroma, tmp_path):
    with chroma_server(tiny_chroma, tmp_path, twilio_auth_token="secret", twilio_instructions="Be brief.") as (
            url, _):
        form = {"CallSid": "CA1", "From": "+15550001111", "voice": "lib"}
        headers = {"X-Forwarded-Proto": "https", "Host": "agent.example.com"}
        sign = twilio_signature("secret", "https://agent.example.com/twilio/voice", form)
        r = httpx.post(f"{url}/twilio/voice", data=form, headers={**headers, "X-Twilio-Signature": sign})
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/xml")
        stream = ET.fromstring(r.text).find("./Connect/Stream")
        assert stream.get("url") == "wss://agent.example.com/twilio/media-stream"
        params = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
        assert params == {"voice": "lib", "instructions": "Be brief."}
        # Query parameters are signed as part of the URL, and override the defaults.
        sign = twilio_signature("secret", "https://agent.example.com/twilio/voice?instructions=Hi", form)
        r = httpx.post(f"{url}/twilio/voice?instructions=Hi", data=form,
                       headers={**headers, "X-Twilio-Signature": sign})
        assert r.status_code == 200 and '<Parameter name="instructions" value="Hi"/>' in r.text
        for bad in ({}, {"X-Twilio-Signature": "AAAA"}, {"X-Twilio-Signature": sign}):
            r = httpx.post(f"{url}/twilio/voice", data=form, headers={**headers, **bad})
            assert r.status_code == 403, bad
        r = httpx.post(f"{url}/twilio/voice", data={**form, "From": "+1999"},
                       headers={**headers, "X-Twilio-Signature": twilio_signature(
                           "secret", "https://agent.example.com/twilio/voice", form)})
        assert r.status_code == 403   # a changed parameter

        # The media stream's handshake is signed too (its wss:// URL, no parameters).
        stream_url = url.replace("http", "ws") + "/twilio/media-stream"
        headers = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "agent.example.com"}   # as from a proxy
        with pytest.raises(InvalidStatus) as refused:
            ws_client.connect(stream_url, additional_headers=headers).close()
        assert refused.value.response.status_code == 403
        sign = twilio_signature("secret", "wss://agent.example.com/twilio/media-stream", {})
        with ws_client.connect(stream_url, additional_headers={**headers, "X-Twilio-Signature": sign}) as ws:
            ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
            ws.send(json.dumps({"event": "stop", "sequenceNumber": "2", "streamSid": SID}))
            with pytest.raises(ConnectionClosed):   # stopped before it started: the server just closes
                ws.recv(timeout=10)


class FakeTwilio:
    """Twilio's side of a media stream, as its docs describe the messages."""

    def __init__(self, ws, parameters: dict[str, str]):
        self.ws = ws
        self.seq = 0
        self.chunk = 0
        self.send("connected", protocol="Call", version="1.0.0")
        self.send("start", streamSid=SID, start={
            "accountSid": "AC0", "streamSid": SID, "callSid": "CA0", "tracks": ["inbound"],
            "customParameters": parameters,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}})

    def send(self, event: str, **fields) -> None:
        self.seq += 1
        self.ws.send(json.dumps({"event": event, "sequenceNumber": str(self.seq), **fields}))

    def speak(self, audio8k: np.ndarray) -> None:
        data = ulaw_encode(audio8k)
        for i in range(0, len(data), FRAME):
            self.chunk += 1
            self.send("media", streamSid=SID, media={"track": "inbound", "chunk": str(self.chunk),
                                                     "timestamp": str(20 * self.chunk),
                                                     "payload": base64.b64encode(data[i:i + FRAME]).decode()})

    def recv(self, limit: float = 60) -> dict:
        return json.loads(self.ws.recv(timeout=limit))


@needs_espeak
def test_a_call_holds_a_spoken_turn_and_a_barge_in_clears_twilios_buffer(tiny_chroma, tmp_path):
    from openchroma.serving.turn_eval import speak

    speech = speak("Thanks, that is all I needed.", rate=8000)
    quiet = np.zeros(8000, np.float32)
    with chroma_server(tiny_chroma, tmp_path, max_response_seconds=30) as (url, state):
        add_voice(url)
        with ws_client.connect(url.replace("http", "ws") + "/twilio/media-stream") as ws:
            call = FakeTwilio(ws, {"voice": "lib", "instructions": "You answer phone calls."})
            call.speak(np.concatenate([quiet[:4000], speech, quiet]))
            media: list[dict] = []
            marks: list[str] = []
            deadline = time.time() + 120
            while len(marks) < 4 and time.time() < deadline:   # the answer streams back: media, each with its mark
                msg = call.recv()
                assert msg["streamSid"] == SID
                if msg["event"] == "media":
                    media.append(msg)
                    assert base64.b64decode(msg["media"]["payload"])
                elif msg["event"] == "mark":
                    marks.append(msg["mark"]["name"])
                    assert media, "a mark follows the audio it marks"
            assert len(marks) == 4
            conn = next(iter(state.connections))
            assert conn.core.settings.voice == "lib"
            assert conn.core.settings.instructions == "You answer phone calls."

            # The caller heard the first two chunks (Twilio returns their marks), then talks over the rest.
            for name in marks[:2]:
                call.send("mark", streamSid=SID, mark={"name": name})
            heard_bytes = sum(len(base64.b64decode(m["media"]["payload"])) for m in media[:2])
            call.speak(speech)
            while (msg := call.recv())["event"] != "clear":
                assert msg["event"] in ("media", "mark")
            assert msg == {"event": "clear", "streamSid": SID}
            # What the caller heard of the answer is exactly the audio up to the last returned mark.
            deadline = time.time() + 10   # the cut answer is in the history once the barge-in is applied
            while not any(h["role"] == "assistant" for h in conn.core.session.history) and time.time() < deadline:
                time.sleep(0.05)
            item = next(h for h in reversed(conn.core.session.history) if h["role"] == "assistant")["id"]
            assert conn.heard_ms(item) == pytest.approx(heard_bytes / 8, abs=0.5)

            call.send("stop", streamSid=SID, stop={"accountSid": "AC0", "callSid": "CA0"})
            deadline = time.time() + 10
            while state.connections and time.time() < deadline:
                time.sleep(0.05)
            assert not state.connections   # the session is freed when Twilio stops the stream


def test_eagerness_parameter_turns_on_semantic_vad(tiny_chroma, tmp_path):
    pytest.importorskip("onnxruntime")
    with chroma_server(tiny_chroma, tmp_path) as (url, state):
        add_voice(url)
        r = httpx.post(f"{url}/twilio/voice?eagerness=low", data={"CallSid": "CA1"})
        assert '<Parameter name="eagerness" value="low"/>' in r.text
        with ws_client.connect(url.replace("http", "ws") + "/twilio/media-stream") as ws:
            FakeTwilio(ws, {"eagerness": "low"}).speak(np.zeros(800, np.float32))
            deadline = time.time() + 20
            while not state.connections and time.time() < deadline:
                time.sleep(0.05)
            conn = next(iter(state.connections))
            while conn.core.settings.input_format["type"] != "audio/pcmu" and time.time() < deadline:
                time.sleep(0.05)
            assert conn.core.settings.turn_detection["type"] == "semantic_vad"
            assert conn.core.settings.turn_detection["eagerness"] == "low"
