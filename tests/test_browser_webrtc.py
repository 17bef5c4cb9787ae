"""The browser client over WebRTC (its default) in headless Chromium, and its fallback to the WebSocket.

Chromium's fake microphone (the espeak sample between silences) goes out on the call's Opus track; the server's
VAD hears it, answers on the remote track, and the events come on the ``oai-events`` data channel. With
``/v1/realtime/calls`` answering 501 (a server without aiortc), the page uses the WebSocket instead.
"""

from __future__ import annotations

import re
import time

import httpx
import pytest

pytest.importorskip("aiortc", reason="the webrtc extra is not installed (pip install 'openchroma[webrtc]')")

import test_browser  # noqa: E402
from test_browser import TURN_DONE, Page  # noqa: E402

# test_browser's fixtures (the server with a voice, Chromium with the fake microphone), module-scoped here too.
playwright, browser, server = test_browser.playwright, test_browser.browser, test_browser.server

pytestmark = pytest.mark.browser


@pytest.fixture
def rtc(browser, server):
    """The page as a person opens it (no ?transport=): WebRTC first."""
    p = Page(browser, server, transport=None)
    try:
        yield p
    finally:
        p.close()


@pytest.mark.slow   # over 3 s: left out of the fast subset
def test_hands_free_turn_over_webrtc(rtc):
    p = rtc
    p.page.click("#start")
    p.wait("() => window.__oc.transport === 'webrtc'", 20, "a WebRTC call")
    assert p.page.locator("#transport").text_content() == "WebRTC"
    p.wait(TURN_DONE, 60, "a hands-free turn over WebRTC")
    events = p.page.evaluate("() => window.__oc.events")
    # The server's VAD heard the microphone track; the events came on the data channel, in order.
    for kind in ("session.created", "session.updated", "input_audio_buffer.speech_started",
                 "input_audio_buffer.speech_stopped", "input_audio_buffer.committed", "response.created",
                 "output_audio_buffer.started", "response.output_audio_transcript.done", "response.done"):
        assert kind in events, f"no {kind}" + p.diagnostics()
    assert "response.output_audio.delta" not in events   # the audio is on the track
    # No WebSocket was opened, and no audio went out in events.
    assert not p.received and not p.sent
    sent = p.page.evaluate("() => window.__oc.sent")
    assert sent[0] == "session.update" and "input_audio_buffer.append" not in sent
    # The answer's audio arrived on the remote track (decoded by the browser) and plays in the <audio> element.
    # (The tiny random model's answers are digital silence, so what is checked is that the track carries
    # them: Opus packets decoded, and the server's started/stopped events counted as played time.)
    p.wait("() => window.__oc.rtc && window.__oc.rtc.totalSamplesReceived > 48000 && "
           "window.__oc.playedSamples > 0 && window.__oc.events.includes('output_audio_buffer.stopped')", 10,
           "audio on the remote track")
    assert p.page.locator("#stat-played").text_content() != "0 ms"
    assert p.page.evaluate("() => document.getElementById('remote-audio').srcObject !== null")
    # The bubble shows the server's transcript, with its timings.
    turn = p.page.evaluate("() => window.__oc.turns.find(t => t.status === 'completed' || t.status === 'incomplete')")
    bubble = p.page.locator(f'#log .msg.assistant[data-item-id="{turn["item_id"]}"]')
    assert bubble.locator(".text").text_content() == turn["transcript"]
    assert "TTFT" in bubble.locator(".meta").text_content()
    assert p.page.locator("#banner").is_hidden(), p.diagnostics()
    assert not p.errors, p.diagnostics()
    p.screenshot("browser-webrtc-turn.png")
    # Stop hangs up the call.
    with p.page.expect_request(lambda r: r.method == "POST" and r.url.endswith("/hangup")) as hangup:
        p.page.click("#start")
    assert hangup.value.response().status == 200
    p.wait("() => window.__oc.transport === null && !window.__oc.connected", 5, "hanging up")


def test_typed_turn_over_webrtc_without_a_microphone(rtc):
    """A typed message places a receive-only call (no Start, so no microphone): the answer still plays."""
    p = rtc
    p.page.fill("#text-input", "Hello there!")
    p.page.press("#text-input", "Enter")
    p.wait(TURN_DONE, 45, "a typed turn over WebRTC")
    assert p.page.evaluate("() => window.__oc.transport") == "webrtc"
    sent = p.page.evaluate("() => window.__oc.sent")
    assert sent[:3] == ["session.update", "conversation.item.create", "response.create"], sent
    p.wait("() => window.__oc.rtc && window.__oc.rtc.totalSamplesReceived > 0 && window.__oc.playedSamples > 0", 10,
           "audio on the remote track")
    assert not p.received and not p.errors, p.diagnostics()


@pytest.mark.slow   # over 3 s: left out of the fast subset
def test_falls_back_to_the_websocket_when_the_server_has_no_webrtc(rtc):
    p = rtc
    offers = []
    def no_webrtc(route):
        offers.append(route.request.method)
        route.fulfill(status=501, content_type="application/json",
                      body='{"error": {"message": "WebRTC needs aiortc", "code": "webrtc_unavailable"}}')

    p.page.route("**/v1/realtime/calls*", no_webrtc)
    p.page.click("#start")
    p.wait(TURN_DONE, 60, "a hands-free turn on the fallback WebSocket")
    assert offers == ["POST"]
    assert p.page.evaluate("() => window.__oc.transport") == "websocket"
    assert "501" in p.page.evaluate("() => window.__oc.fallback")
    assert p.page.locator("#transport").text_content() == "WebSocket"
    # The WebSocket carries the conversation as before: the microphone in appends, the answer in deltas.
    assert p.sent_of("input_audio_buffer.append") and p.received_of("response.output_audio.delta")
    p.wait("() => window.__oc.playedSamples > 0", 10, "playback")
    assert p.page.locator("#banner").is_hidden(), p.diagnostics()
    assert not p.errors, p.diagnostics()


@pytest.mark.slow   # over 3 s: left out of the fast subset
def test_falls_back_to_the_websocket_when_ice_does_not_connect(rtc):
    """The server answers the offer, but the answer's ICE credentials and candidates are not the server's (as an
    unreachable network would leave it): ICE cannot connect, and after a few seconds the page hangs the call up and
    uses the WebSocket."""
    p = rtc
    hangups = []
    def unreachable(route):
        answer = route.fetch()
        sdp = re.sub(r"^a=candidate:(\S+) (\d) (\S+) (\d+) \S+ \d+ (.*)$",
                     r"a=candidate:\1 \2 \3 \4 192.0.2.1 9 \5", answer.text(), flags=re.M)   # TEST-NET-1
        sdp = re.sub(r"^a=ice-ufrag:.*$", "a=ice-ufrag:wrongufrag", sdp, flags=re.M)
        sdp = re.sub(r"^a=ice-pwd:.*$", "a=ice-pwd:wrongpasswordwrongpassword", sdp, flags=re.M)
        route.fulfill(response=answer, body=sdp)

    p.page.route("**/v1/realtime/calls", unreachable)
    p.page.on("request", lambda r: hangups.append(r.url) if r.url.endswith("/hangup") else None)
    t0 = time.monotonic()
    p.page.click("#start")
    p.wait("() => window.__oc.transport === 'websocket'", 30, "the fallback")
    assert 5 < time.monotonic() - t0 < 25
    assert "ICE did not connect" in p.page.evaluate("() => window.__oc.fallback")
    assert len(hangups) == 1   # the failed call was hung up, freeing its session on the server
    p.wait("() => window.__oc.events.includes('session.updated')", 10, "the WebSocket session")
    assert p.page.locator("#transport").text_content() == "WebSocket"
    assert not p.errors, p.diagnostics()


def test_push_to_talk_turn_over_webrtc(rtc):
    """Push-to-talk over WebRTC: the track always carries the microphone; a press clears the server's buffer, the
    release commits it and asks for the answer."""
    p = rtc
    p.page.check('input[name="mode"][value="ptt"]')
    p.page.click("#start")
    p.wait("() => window.__oc.transport === 'webrtc' && window.__oc.events.includes('session.updated')", 20,
           "a WebRTC call")
    box = p.page.locator("#ptt").bounding_box()
    p.page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    p.page.mouse.down()
    p.page.wait_for_timeout(2500)
    p.page.mouse.up()
    p.wait(TURN_DONE, 45, "a push-to-talk turn over WebRTC")
    sent = p.page.evaluate("() => window.__oc.sent")
    commit = sent.index("input_audio_buffer.commit")
    assert sent[commit - 1] == "input_audio_buffer.clear" and sent[commit + 1] == "response.create", sent
    events = p.page.evaluate("() => window.__oc.events")
    assert "input_audio_buffer.committed" in events and "input_audio_buffer.speech_started" not in events
    assert not p.errors, p.diagnostics()


@pytest.mark.slow   # over 3 s: left out of the fast subset
def test_barge_in_over_webrtc_stops_the_answer_on_the_track(playwright, server, tmp_path):
    """The sample comes back ~1.2 s into the 2 s answer: the server hears it on the microphone track, cancels the
    answer and drops its queued audio from the track (output_audio_buffer.cleared); the page marks it interrupted."""
    b = test_browser.launch(playwright, test_browser.fake_mic(tmp_path / "mic.wav", 0.5, 1.2))
    p = Page(b, server, transport=None)
    try:
        p.page.click("#start")
        p.wait("() => window.__oc.events.includes('output_audio_buffer.cleared')", 60, "a barge-in over WebRTC")
        assert p.page.evaluate("() => window.__oc.transport") == "webrtc"
        events = p.page.evaluate("() => window.__oc.events")
        cleared = events.index("output_audio_buffer.cleared")
        # The user spoke while the answer was still on the track (the server clears it as it reports the speech),
        # and it was dropped before it had all played.
        assert "input_audio_buffer.speech_started" in events[cleared - 1:cleared + 2], events[cleared - 5:cleared + 3]
        before = events[:cleared]
        on_track = len(before) - before[::-1].index("output_audio_buffer.started") - 1
        assert "output_audio_buffer.stopped" not in before[on_track:], before[on_track:]
        p.wait("() => document.querySelector('#log .msg.assistant.interrupted')", 10, "the interrupted bubble")
        assert p.page.evaluate("() => window.__oc.sent.includes('conversation.item.truncate')") is False
        assert not p.errors, p.diagnostics()
    finally:
        p.close()
        b.close()


def test_webrtc_call_carries_the_api_key(browser, tiny_chroma, tmp_path):
    """A server with an API key: the page's offer and hangup carry it (Authorization), and the call holds a turn."""
    key = "webrtc-browser-key"
    with test_browser.chroma_server(tiny_chroma, tmp_path / "data", api_key=key, max_response_seconds=1.0) as (url, _):
        with open(test_browser.SPEECH_WAV, "rb") as f:
            r = httpx.post(f"{url}/v1/voices", files={"file": ("speech.wav", f, "audio/wav")},
                           data={"name": test_browser.VOICE, "transcript": test_browser.TRANSCRIPT},
                           headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert r.status_code == 201, r.text
        p = Page(browser, url, voice=None, transport=None)
        try:
            calls = []
            p.page.on("request", lambda r: calls.append((r.url, r.headers.get("authorization")))
                      if "/v1/realtime/calls" in r.url else None)
            p.page.locator("#key-panel").wait_for(state="visible", timeout=10_000)
            p.page.fill("#api-key", key)
            p.page.click('#key-form button[type="submit"]')
            p.page.locator(f'#voice-list li.voice.selected[data-voice="{test_browser.VOICE}"]').wait_for(timeout=10_000)
            p.page.fill("#text-input", "Hello!")
            p.page.press("#text-input", "Enter")
            p.wait(TURN_DONE, 45, "a typed turn over WebRTC with an API key")
            assert p.page.evaluate("() => window.__oc.transport") == "webrtc"
            with p.page.expect_response(lambda r: r.url.endswith("/hangup")) as hangup:
                p.page.click("#start")   # Start, then Stop: hangs up
                p.page.click("#start")
            assert hangup.value.status == 200
            assert [auth for _, auth in calls] == [f"Bearer {key}"] * 2, calls
            assert not p.errors, p.diagnostics()
        finally:
            p.close()
