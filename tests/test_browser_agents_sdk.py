"""OpenAI's Agents SDK for JavaScript (``@openai/agents-realtime``) with its WebRTC transport
(``OpenAIRealtimeWebRTC``) in headless Chromium, pointed at the server with ``baseUrl``: a typed turn.

The SDK comes from npm and is bundled for the page with esbuild, in a temporary directory; without npm (or the
registry) the test is skipped and says why. Its page is served by a small static route on the server's origin,
so the SDK's fetch of ``/v1/realtime/calls`` is same-origin.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

pytest.importorskip("aiortc", reason="the webrtc extra is not installed (pip install 'openchroma[webrtc]')")

import test_browser  # noqa: E402
from test_browser import VOICE, Page  # noqa: E402

playwright, browser, server = test_browser.playwright, test_browser.browser, test_browser.server

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SDK = "@openai/agents-realtime@0.20.0"   # pinned: the test checks this SDK's behaviour, not whatever is newest
ESBUILD = "esbuild@0.28.2"

ENTRY = """
import { OpenAIRealtimeWebRTC, RealtimeAgent, RealtimeSession } from "@openai/agents-realtime";

// One typed turn through the SDK's own session: connect over WebRTC, send a message, wait for response.done.
window.textTurn = async (baseUrl, voice, text) => {
  const seen = [];
  const transport = new OpenAIRealtimeWebRTC({ baseUrl, useInsecureApiKey: true });
  transport.on("*", (ev) => seen.push(ev.type));
  const agent = new RealtimeAgent({ name: "Assistant", instructions: "Answer briefly.", voice });
  const session = new RealtimeSession(agent, { transport });
  const done = new Promise((resolve) => transport.on("*", (ev) => { if (ev.type === "response.done") resolve(ev); }));
  await session.connect({ apiKey: "not-checked" });
  session.sendMessage(text);
  const late = new Promise((_, no) => setTimeout(() => no(new Error("no response.done in 40 s")), 40000));
  const ev = await Promise.race([done, late]);
  const result = { seen, status: ev.response.status, callId: transport.callId ?? null,
                   history: JSON.parse(JSON.stringify(session.history)) };
  session.close();
  return result;
};
"""


@pytest.fixture(scope="module")
def sdk_bundle(tmp_path_factory) -> str:
    """The SDK bundled into one browser script (an ES module turned IIFE), built with esbuild from npm."""
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed: cannot fetch @openai/agents-realtime")
    work = tmp_path_factory.mktemp("agents-sdk")
    (work / "package.json").write_text('{"private": true}')
    (work / "entry.mjs").write_text(ENTRY)
    try:
        subprocess.run([npm, "install", "--no-audit", "--no-fund", "--loglevel=error", SDK, ESBUILD], cwd=work,
                       check=True, capture_output=True, text=True, timeout=180)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"npm could not install {SDK} and {ESBUILD} (no registry?): {str(e.stderr or e)[-500:]}")
    subprocess.run([str(work / "node_modules/.bin/esbuild"), "entry.mjs", "--bundle", "--format=iife",
                    "--platform=browser", "--outfile=sdk.js"], cwd=work, check=True, timeout=120)
    return (work / "sdk.js").read_text()


def test_agents_sdk_webrtc_transport_holds_a_text_turn(browser, server, sdk_bundle):
    p = Page(browser, server, voice=None, transport="websocket")   # the server's origin; its page is not used
    offers = []
    try:
        p.page.on("request", lambda r: offers.append(r.headers) if r.url.endswith("/v1/realtime/calls") else None)
        p.page.add_script_tag(content=sdk_bundle)
        result = p.page.evaluate("([url, voice]) => window.textTurn(url, voice, 'Hello there!')",
                                 [server + "/v1/realtime/calls", VOICE])
        assert result["status"] in ("completed", "incomplete"), json.dumps(result)[:2000]
        assert len(offers) == 1 and offers[0]["content-type"] == "application/sdp"
        assert "x-openai-agents-sdk" in offers[0]   # it was the SDK that placed the call
        for kind in ("session.created", "session.updated", "response.created", "output_audio_buffer.started",
                     "response.output_audio_transcript.done", "response.done"):
            assert kind in result["seen"], f"no {kind}: {result['seen']}"
        assert "response.output_audio.delta" not in result["seen"]   # the audio came on the track
        roles = [item.get("role") for item in result["history"] if item.get("type") == "message"]
        assert roles[:2] == ["user", "assistant"], result["history"]
        assert not p.errors, p.errors
    finally:
        p.close()
