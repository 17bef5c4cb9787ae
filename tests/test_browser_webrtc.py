"""The browser client over WebRTC (its default) in headless Chromium, and its fallback to the WebSocket.

Chromium's fake microphone (the espeak sample between silences) goes out on the call's Opus track; the server's
VAD hears it, answers on the remote track, and the events come on the ``oai-events`` data channel. With
``/v1/realtime/calls`` answering 501 (a server without aiortc), the page uses the WebSocket instead.
"""

from __future__ import annotations

import pytest

pytest.importorskip("aiortc", reason="the webrtc extra is not installed (pip install 'openchroma[webrtc]')")

from test_browser import TURN_DONE, Page, browser, playwright, server  # noqa: E402,F401  (fixtures)

pytestmark = pytest.mark.browser


def rtc_page(browser, server) -> Page:
    return Page(browser, server, transport=None)   # the page as a person opens it: WebRTC first


def test_hands_free_turn_over_webrtc(browser, server):
    p = rtc_page(browser, server)
    try:
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
        p.page.click("#start")
        p.wait("() => window.__oc.transport === null && !window.__oc.connected", 5, "hanging up")
    finally:
        p.close()


def test_typed_turn_over_webrtc_without_a_microphone(browser, server):
    """A typed message places a receive-only call (no Start, so no microphone): the answer still plays."""
    p = rtc_page(browser, server)
    try:
        p.page.fill("#text-input", "Hello there!")
        p.page.press("#text-input", "Enter")
        p.wait(TURN_DONE, 45, "a typed turn over WebRTC")
        assert p.page.evaluate("() => window.__oc.transport") == "webrtc"
        sent = p.page.evaluate("() => window.__oc.sent")
        assert sent[:3] == ["session.update", "conversation.item.create", "response.create"], sent
        p.wait("() => window.__oc.rtc && window.__oc.rtc.totalSamplesReceived > 0 && window.__oc.playedSamples > 0", 10,
               "audio on the remote track")
        assert not p.received and not p.errors, p.diagnostics()
    finally:
        p.close()


def test_falls_back_to_the_websocket_when_the_server_has_no_webrtc(browser, server):
    p = rtc_page(browser, server)
    offers = []
    try:
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
    finally:
        p.close()
