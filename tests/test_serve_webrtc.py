"""``/v1/realtime/calls`` (WebRTC) against an aiortc peer as the client, on loopback."""

from __future__ import annotations

import asyncio
import fractions
import json
import time

import httpx
import numpy as np
import pytest
from server_harness import SPEECH_WAV, chroma_server
from test_serve_realtime import add_voice, manual_session, vad_session

from openchroma.audio import load_audio

aiortc = pytest.importorskip("aiortc")
av = pytest.importorskip("av")
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription  # noqa: E402
from aiortc.mediastreams import MediaStreamError  # noqa: E402

RATE = 48000
FRAME = 960


class PlayedAudio(MediaStreamTrack):
    """The client's microphone: ``audio`` (float, 48 kHz) in real-time 20 ms frames, then silence."""

    kind = "audio"

    def __init__(self, audio: np.ndarray | None = None):
        super().__init__()
        self.audio = np.zeros(0, np.float32) if audio is None else audio
        self.offset = 0   # the pts at which ``audio`` starts
        self.pts, self.start = 0, None

    def say(self, audio: np.ndarray) -> None:
        """Speak ``audio`` from now on."""
        self.audio, self.offset = audio, self.pts

    async def recv(self):
        if self.readyState != "live":
            raise MediaStreamError
        self.start = self.start or time.monotonic()
        wait = self.start + self.pts / RATE - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        chunk = np.zeros(FRAME, np.float32)
        piece = self.audio[self.pts - self.offset:self.pts - self.offset + FRAME]
        chunk[:len(piece)] = piece
        frame = av.AudioFrame.from_ndarray((chunk * 32767).astype(np.int16).reshape(1, -1), format="s16",
                                           layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = RATE, self.pts, fractions.Fraction(1, RATE)
        self.pts += FRAME
        return frame


class Caller:
    """An aiortc peer that calls the server: the data channel's events and the audio it receives."""

    def __init__(self, mic: MediaStreamTrack | None = None):
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.events: asyncio.Queue = asyncio.Queue()
        self.seen: list[dict] = []
        self.channel = self.pc.createDataChannel("oai-events")
        self.channel.on("message", lambda m: self.events.put_nowait(json.loads(m)))
        self.received: list[np.ndarray] = []   # frames of the server's track, as 16-bit samples
        if mic is None:
            self.pc.addTransceiver("audio", direction="recvonly")
        else:
            self.pc.addTrack(mic)
        self.pc.on("track", self.on_track)
        self.reader: asyncio.Task | None = None

    def on_track(self, track) -> None:
        async def read():
            while True:
                try:
                    frame = await track.recv()
                except MediaStreamError:
                    return
                self.received.append(frame.to_ndarray().ravel())
        self.reader = asyncio.ensure_future(read())

    async def call(self, url: str, headers: dict | None = None, session: dict | None = None) -> httpx.Response:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        sdp = self.pc.localDescription.sdp
        async with httpx.AsyncClient(timeout=30) as client:
            if session is None:
                r = await client.post(f"{url}/v1/realtime/calls?model=chroma-tiny", content=sdp,
                                      headers={"Content-Type": "application/sdp", **(headers or {})})
            else:
                r = await client.post(f"{url}/v1/realtime/calls", headers=headers or {},
                                      files={"sdp": (None, sdp), "session": (None, json.dumps(session))})
        if r.status_code == 201:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=r.text, type="answer"))
        return r

    def send(self, event: dict) -> None:
        self.channel.send(json.dumps(event))

    async def until(self, kind: str, limit: float = 60) -> dict:
        deadline = time.monotonic() + limit
        while True:
            event = await asyncio.wait_for(self.events.get(), max(0.01, deadline - time.monotonic()))
            self.seen.append(event)
            if event["type"] == "error" and kind != "error":
                raise AssertionError(f"server error: {event['error']}")
            if event["type"] == kind:
                return event

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        await self.pc.close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def test_text_turn_over_webrtc_streams_audio_on_the_track_and_hangup_ends_the_call(tiny_chroma, tmp_path):
    with chroma_server(tiny_chroma, tmp_path, api_key="k") as (url, state):
        add_voice(url, headers={"Authorization": "Bearer k"})

        async def scenario():
            caller = Caller()
            r = await caller.call(url, {"Authorization": "Bearer k"}, session=manual_session())
            assert r.status_code == 201, r.text
            assert r.headers["content-type"].startswith("application/sdp")
            call_path = r.headers["location"]
            assert call_path.startswith("/v1/realtime/calls/rtc_")
            await caller.until("session.created")
            updated = await caller.until("session.updated")
            assert updated["session"]["audio"]["input"]["turn_detection"] is None
            caller.send({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello!"}]}})
            await caller.until("conversation.item.added")
            caller.send({"type": "response.create"})
            done = await caller.until("response.done")
            assert done["response"]["status"] in ("completed", "incomplete")   # random weights: capped at 2 s
            assert not any(e["type"] == "response.output_audio.delta" for e in caller.seen)   # audio is on the track
            if not any(e["type"] == "output_audio_buffer.started" for e in caller.seen):   # the track may lag
                await caller.until("output_audio_buffer.started")
            await caller.until("output_audio_buffer.stopped", limit=30)
            # The tiny random model's audio is (near) silence, so count it: the track carried at least the answer's
            # length (80 ms per audio token) by the time the server saw its track run dry.
            answer_s = 0.08 * done["response"]["usage"]["output_token_details"]["audio_tokens"]
            assert answer_s > 0.5
            deadline = time.monotonic() + 10
            while sum(len(f) for f in caller.received) / 2 / RATE < answer_s and time.monotonic() < deadline:
                await asyncio.sleep(0.1)   # stereo 48 kHz from the decoder; a loaded machine may lag behind
            assert sum(len(f) for f in caller.received) / 2 / RATE >= answer_s
            assert len(state.connections) == 1
            async with httpx.AsyncClient() as client:
                r = await client.post(f"{url}{call_path}/hangup", headers={"Authorization": "Bearer k"})
                assert r.status_code == 200
                assert len(state.connections) == 0
                r = await client.post(f"{url}{call_path}/hangup", headers={"Authorization": "Bearer k"})
                assert r.status_code == 404
            await caller.close()

        run(scenario())


@pytest.mark.slow   # over 3 s: left out of the fast subset
def test_spoken_turn_with_server_vad_over_the_audio_track(tiny_chroma, tmp_path):
    speech = load_audio(SPEECH_WAV, RATE).numpy().astype(np.float32)
    mic = PlayedAudio(np.concatenate([np.zeros(RATE // 2, np.float32), speech]))
    with chroma_server(tiny_chroma, tmp_path, max_response_seconds=60) as (url, state):
        add_voice(url)

        async def scenario():
            caller = Caller(mic)
            r = await caller.call(url, session=vad_session())
            assert r.status_code == 201, r.text
            await caller.until("session.created")
            started = await caller.until("input_audio_buffer.speech_started")
            assert 200 <= started["audio_start_ms"] <= 1200
            stopped = await caller.until("input_audio_buffer.speech_stopped")
            speech_end_ms = 500 + 1000 * len(speech) / RATE
            assert speech_end_ms - 500 <= stopped["audio_end_ms"] <= speech_end_ms + 1000
            await caller.until("input_audio_buffer.committed")
            await caller.until("response.created")
            playing = await caller.until("output_audio_buffer.started")

            # The caller talks over the answer: barge-in cancels it, and the queued audio is dropped from the track.
            mic.say(speech)
            await caller.until("input_audio_buffer.speech_started")
            cleared = await caller.until("output_audio_buffer.cleared")
            assert cleared["response_id"] == playing["response_id"]
            done = await caller.until("response.done")
            assert done["response"]["status"] == "cancelled"
            assert done["response"]["status_details"]["reason"] == "turn_detected"
            await caller.until("input_audio_buffer.committed")   # the interrupting turn gets its own answer
            second = await caller.until("response.created")
            assert second["response"]["id"] != done["response"]["id"]
            await caller.close()

        run(scenario())


def test_the_offer_route_wants_the_api_key_and_a_real_offer(tiny_chroma, tmp_path):
    with chroma_server(tiny_chroma, tmp_path, api_key="k") as (url, state):
        r = httpx.post(f"{url}/v1/realtime/calls", content="v=0\r\n", headers={"Content-Type": "application/sdp"})
        assert r.status_code == 401
        r = httpx.post(f"{url}/v1/realtime/calls", content="v=0\r\n", headers={
            "Content-Type": "application/sdp", "Authorization": "Bearer k", "Origin": "https://evil.example"})
        assert r.status_code == 403
        r = httpx.post(f"{url}/v1/realtime/calls", content="hello", headers={
            "Content-Type": "application/sdp", "Authorization": "Bearer k"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_offer"
        r = httpx.post(f"{url}/v1/realtime/calls?model=other", content="v=0\r\n", headers={
            "Content-Type": "application/sdp", "Authorization": "Bearer k"})
        assert r.status_code == 404
        r = httpx.post(f"{url}/v1/realtime/calls/rtc_nope/hangup", headers={"Authorization": "Bearer k"})
        assert r.status_code == 404
        assert len(state.connections) == 0


def test_the_outbound_track_survives_opus_and_counts_what_it_sent():
    """Audio the core pushes (24 kHz) comes out of aiortc's Opus encoder and decoder at 48 kHz, 20 ms a frame,
    paced in real time; the track counts what it sent of each response (what truncation takes as heard)."""
    from aiortc.codecs import get_decoder, get_encoder
    from aiortc.jitterbuffer import JitterFrame
    from aiortc.rtcrtpparameters import RTCRtpCodecParameters

    from openchroma.serving.webrtc_media import OutboundAudio

    opus = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2)
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(12000) / 24000).astype(np.float32)   # 500 ms

    async def scenario():
        track = OutboundAudio()
        track.push("resp_1", tone, 24000)
        track.end_response("resp_1")
        enc, dec = get_encoder(opus), get_decoder(opus)
        t0, peaks = time.monotonic(), []
        for _ in range(40):   # 800 ms
            frame = await track.recv()
            assert frame.samples == FRAME and frame.sample_rate == RATE
            packets, ts = enc.encode(frame)
            for p in packets:
                peaks += [np.abs(f.to_ndarray()).max() for f in dec.decode(JitterFrame(data=p, timestamp=ts))]
        assert time.monotonic() - t0 >= 0.75   # real time, not as fast as the sender asks
        assert min(peaks[2:20]) > 10000 and max(peaks[30:]) < 200   # the tone, then silence
        assert abs(track.heard_ms("resp_1") - 500) <= 1
        track.push("resp_2", tone, 24000)
        assert track.clear() and not track.clear()
        track.stop()

    run(scenario())


def test_without_aiortc_the_route_says_how_to_get_webrtc(tiny_chroma, tmp_path, monkeypatch):
    from openchroma.serving import webrtc

    monkeypatch.setattr(webrtc, "RTCPeerConnection", None)   # as when the webrtc extra is not installed
    with chroma_server(tiny_chroma, tmp_path) as (url, state):
        r = httpx.post(f"{url}/v1/realtime/calls", content="v=0\r\n", headers={"Content-Type": "application/sdp"})
        assert r.status_code == 501
        err = r.json()["error"]
        assert err["code"] == "webrtc_unavailable" and "openchroma[webrtc]" in err["message"]


def test_ice_servers_from_urls():
    from openchroma.serving.webrtc import ice_server

    assert ice_server("stun:stun.example.org:3478").urls == "stun:stun.example.org:3478"
    turn = ice_server("turn:alice:s3cret@turn.example.org:3478?transport=udp")
    assert (turn.urls, turn.username, turn.credential) == ("turn:turn.example.org:3478?transport=udp", "alice",
                                                           "s3cret")


def test_sideband_websocket_watches_and_controls_the_call(tiny_chroma, tmp_path):
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    auth = {"Authorization": "Bearer k"}
    with chroma_server(tiny_chroma, tmp_path, api_key="k") as (url, state):
        add_voice(url, headers=auth)
        ws_url = url.replace("http", "ws") + "/v1/realtime"

        async def recv_until(ws, kind: str) -> dict:
            while True:
                event = json.loads(await asyncio.wait_for(ws.recv(), 60))
                assert event["type"] != "error" or kind == "error", event
                if event["type"] == kind:
                    return event

        async def scenario():
            async with connect(ws_url + "?call_id=rtc_nope", additional_headers=auth) as ws:
                assert (await recv_until(ws, "error"))["error"]["code"] == "call_not_found"
            caller = Caller()
            r = await caller.call(url, auth, session=manual_session())
            assert r.status_code == 201, r.text
            call_id = r.headers["location"].rsplit("/", 1)[1]
            await caller.until("session.updated")
            async with connect(f"{ws_url}?call_id={call_id}", additional_headers=auth) as ws:
                await ws.send(json.dumps({"type": "conversation.item.create", "item": {
                    "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi!"}]}}))
                await ws.send(json.dumps({"type": "response.create"}))
                watched = await recv_until(ws, "response.done")
                heard = await caller.until("response.done")   # the call's own channel sees the same events
                assert watched["response"]["id"] == heard["response"]["id"]
                assert not any(e["type"] == "response.output_audio.delta" for e in caller.seen)
                async with httpx.AsyncClient() as client:
                    hangup = await client.post(f"{url}/v1/realtime/calls/{call_id}/hangup", headers=auth)
                assert hangup.status_code == 200
                with pytest.raises(ConnectionClosed):   # the call ended: the sideband is closed
                    while True:
                        await asyncio.wait_for(ws.recv(), 10)
            await caller.close()

        run(scenario())


def test_a_call_whose_peer_never_connects_frees_its_session(tiny_chroma, tmp_path, monkeypatch):
    from openchroma.serving import webrtc

    monkeypatch.setattr(webrtc, "CONNECT_TIMEOUT", 1.0)
    with chroma_server(tiny_chroma, tmp_path) as (url, state):
        add_voice(url)

        async def scenario():
            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            pc.createDataChannel("oai-events")
            pc.addTransceiver("audio", direction="recvonly")
            await pc.setLocalDescription(await pc.createOffer())
            await pc.close()   # the client goes away before it ever uses the answer
            async with httpx.AsyncClient() as client:
                r = await client.post(f"{url}/v1/realtime/calls", content=pc.localDescription.sdp,
                                      headers={"Content-Type": "application/sdp"})
            assert r.status_code == 201
            assert len(state.connections) == 1
            deadline = time.monotonic() + 10
            while state.connections and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert not state.connections
            assert not state.engine.sessions

        run(scenario())
