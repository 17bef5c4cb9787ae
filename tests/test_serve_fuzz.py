"""Property-based fuzzing (hypothesis) of every realtime client event and every HTTP body: each input gets an
``error`` event or a 4xx (or a proper answer), never a 500, a traceback in the log, a hang or a dead socket.

Bounded to well under a minute: ``OPENCHROMA_FUZZ_EXAMPLES`` (default 1500 realtime events),
``OPENCHROMA_FUZZ_HTTP_EXAMPLES`` (default 800 HTTP bodies), ``OPENCHROMA_FUZZ_FLOOD_EXAMPLES`` (default 6
conversation-item floods) and ``OPENCHROMA_FUZZ_AUDIO_EXAMPLES`` (default 30 chat requests with hostile or long
audio parts) raise it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import string
import time

import httpx
import numpy as np
import pytest
import soundfile as sf
from audio_cases import float_wav, silent_flac, tagless_mp3, tone, without_length
from hardening_helpers import add_voice, captured_logs, connect, pcm16_b64, probe, recv, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_harness import chroma_server
from websockets.exceptions import ConnectionClosed

pytestmark = pytest.mark.slow   # thousands of hypothesis inputs against a live server

EXAMPLES = int(os.environ.get("OPENCHROMA_FUZZ_EXAMPLES", "1500"))
HTTP_EXAMPLES = int(os.environ.get("OPENCHROMA_FUZZ_HTTP_EXAMPLES", "800"))

# Values a client can put anywhere: JSON scalars at the edges, nested containers, base64-ish strings.
scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**31, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e39, 1e-45, -0.0, 1e308]),
    st.text(max_size=40),
    st.sampled_from(["", "inf", "audio", "text", "lib", "alloy", "AAAA", "####", "audio/pcm", "audio/pcmu",
                     "pcm16", "g711_ulaw", "server_vad", "semantic_vad", "user", "assistant", "system", "input_text",
                     "input_audio", "message", "realtime", "none", "auto", "x" * 3000]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                      max_leaves=12)

EVENT_TYPES = ["session.update", "input_audio_buffer.append", "input_audio_buffer.commit", "input_audio_buffer.clear",
               "conversation.item.create", "conversation.item.truncate", "conversation.item.delete",
               "conversation.item.retrieve", "response.create", "response.cancel", "output_audio_buffer.clear",
               "transcription_session.update"]
KEYS = {
    "session": ["type", "instructions", "voice", "output_modalities", "modalities", "max_output_tokens", "audio",
                "input_audio_format", "output_audio_format", "turn_detection", "tools", "temperature"],
    "audio": ["input", "output"],
    "input": ["format", "turn_detection", "transcription", "noise_reduction"],
    "output": ["format", "voice", "speed"],
    "format": ["type", "rate"],
    "turn_detection": ["type", "threshold", "prefix_padding_ms", "silence_duration_ms", "create_response",
                       "interrupt_response", "idle_timeout_ms", "eagerness"],
    "item": ["type", "role", "content", "id", "status"],
    "part": ["type", "text", "audio", "transcript"],
    "response": ["output_modalities", "modalities", "max_output_tokens", "instructions", "voice", "audio",
                 "conversation", "input", "metadata"],
}


def shaped(kind: str, depth: int = 0) -> st.SearchStrategy:
    """Objects with the keys a real event has at this place, each holding a shaped or random value."""
    def value_for(key: str) -> st.SearchStrategy:
        if depth < 3 and key in KEYS:
            return st.one_of(shaped(key, depth + 1), values)
        if key == "content" and depth < 3:
            return st.one_of(st.lists(shaped("part", depth + 1), max_size=3), values)
        return values
    keys = KEYS[kind]
    return st.lists(st.sampled_from(keys), max_size=len(keys), unique=True).flatmap(
        lambda ks: st.fixed_dictionaries({k: value_for(k) for k in ks}))


def event_strategy() -> st.SearchStrategy:
    top = ["session", "item", "response", "audio", "item_id", "audio_end_ms", "content_index", "event_id"]
    typed = st.tuples(st.sampled_from(EVENT_TYPES), st.lists(st.sampled_from(top), max_size=3, unique=True)).flatmap(
        lambda t: st.fixed_dictionaries({"type": st.just(t[0]), **{k: (shaped(k) if k in KEYS else values)
                                                                    for k in t[1]}}))
    as_text = typed.map(lambda e: json.dumps(e))
    raw = st.one_of(values.map(lambda v: json.dumps(v)),
                    st.text(alphabet=string.printable, max_size=60),
                    st.sampled_from(["[" * 50000, '{"type": 1e999}', '{"type": "' + "9" * 6000 + '"}',
                                     '{"type": "response.create", "response": {"max_output_tokens": ' + "9" * 5000
                                     + "}}", "\x00", "{}", "null"]))
    return st.one_of(as_text, as_text, as_text, raw)


@pytest.fixture(scope="module")
def server(tiny_chroma, tmp_path_factory):
    with chroma_server(tiny_chroma, tmp_path_factory.mktemp("data"), max_response_seconds=0.4, max_sessions=3,
                       max_ws_message_bytes=128 * 1024, engine_timeout=30.0) as (url, state):
        add_voice(url)
        yield url, state


class Socket:
    """One realtime connection reused across examples; reopened only when the server closed it on purpose."""

    def __init__(self, url: str):
        self.url, self.ws, self.n = url, None, 0

    def get(self):
        if self.ws is None:
            self.ws = connect(self.url)
            assert recv(self.ws)["type"] == "session.created"
        return self.ws

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()
            self.ws = None


def test_fuzz_realtime_events(server):
    url, state = server
    sock = Socket(url)
    stats = {"inputs": 0, "errors": 0, "responses": 0}
    with captured_logs() as logs:
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(event_strategy())
        def check(text: str) -> None:
            ws = sock.get()
            sock.n += 1
            ws.send(text)
            try:
                seen = probe(ws, f"probe-{sock.n}", limit=30)
            except ConnectionClosed as e:   # only the documented closes are allowed
                sock.ws = None
                assert e.rcvd is not None and e.rcvd.code in (1009,), f"socket died on {text[:200]!r}: {e}"
                return
            stats["inputs"] += 1
            for ev in seen:
                if ev["type"] == "error":
                    stats["errors"] += 1
                    err = ev["error"]
                    assert err["code"] != "internal_error" and err["type"] != "server_error", (text[:300], err)
                    assert len(err["message"]) < 600, (text[:100], "the error echoes the input")
                elif ev["type"] == "response.created":
                    stats["responses"] += 1
            # Leave no response running into the next example.
            if any(ev["type"] == "response.created" for ev in seen) and \
                    not any(ev["type"] == "response.done" for ev in seen):
                ws.send(json.dumps({"type": "response.cancel"}))
                recv(ws, "response.done", limit=30)

        try:
            check()
        finally:
            sock.close()
    print(f"\nrealtime fuzz: {stats['inputs']} inputs, {stats['errors']} error events, "
          f"{stats['responses']} responses, 0 internal errors")
    assert stats["inputs"] >= EXAMPLES // 2
    assert not logs.errors(), logs.errors()[:5]
    assert wait_until(lambda: not state.engine.sessions and not state.connections, 5)
    with connect(url) as ws:   # still serving
        assert recv(ws)["type"] == "session.created"


ROUTES = {
    "/v1/chat/completions": ["model", "messages", "stream", "stream_options", "modalities", "audio", "return_audio",
                             "prompt_text", "prompt_audio", "voice", "max_tokens", "max_completion_tokens",
                             "temperature", "top_p", "top_k", "seed", "n"],
    "/v1/audio/speech": ["model", "input", "voice", "response_format", "speed", "stream_format", "instructions",
                         "temperature", "seed"],
}
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "developer", "tool", 5]),
                                 "content": st.one_of(st.sampled_from(["Hi", "Hello there."]), values,
                                                      st.lists(shaped("part"), max_size=3))})


def body_strategy() -> st.SearchStrategy:
    def field(key: str) -> st.SearchStrategy:
        if key == "messages":
            return st.one_of(st.lists(message, min_size=1, max_size=3), values)
        if key == "input":
            return st.one_of(st.text(max_size=30), values)
        if key in ("max_tokens", "max_completion_tokens"):
            return st.one_of(st.integers(min_value=-3, max_value=3), values)
        return values
    shaped_body = st.tuples(st.sampled_from(sorted(ROUTES)), st.data()).flatmap(
        lambda t: st.tuples(st.just(t[0]), st.lists(st.sampled_from(ROUTES[t[0]]), max_size=6, unique=True).flatmap(
            lambda ks: st.fixed_dictionaries({k: field(k) for k in ks})).map(json.dumps)))
    raw = st.tuples(st.sampled_from(sorted(ROUTES) + ["/v1/voices"]),
                    st.one_of(values.map(json.dumps), st.text(max_size=40),
                              st.sampled_from(["[" * 50000, '{"input": ' + "9" * 6000 + "}", "{", ""])))
    return st.one_of(shaped_body, shaped_body, raw)


def test_fuzz_http_bodies(server):
    url, state = server
    stats = {"inputs": 0, "4xx": 0, "2xx": 0}
    with captured_logs() as logs, httpx.Client(base_url=url, timeout=60) as client:
        @settings(max_examples=HTTP_EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(body_strategy())
        def check(case) -> None:
            path, body = case
            r = client.post(path, content=body, headers={"content-type": "application/json"})
            stats["inputs"] += 1
            assert r.status_code < 500, (path, body[:300], r.status_code, r.text[:300])
            if r.status_code >= 400:
                stats["4xx"] += 1
                err = r.json()["error"]
                assert err["message"] and len(err["message"]) < 600, (body[:100], err)
            else:
                stats["2xx"] += 1
                r.read()

        check()
    print(f"\nHTTP fuzz: {stats['inputs']} bodies, {stats['4xx']} answered 4xx, {stats['2xx']} answered 2xx, 0 5xx")
    assert not logs.errors(), logs.errors()[:5]
    assert wait_until(lambda: not state.engine.sessions, 10)


# ----- conversation-item floods and long-audio parts (issue 18), bounded in count and time ------------------
FLOOD_EXAMPLES = int(os.environ.get("OPENCHROMA_FUZZ_FLOOD_EXAMPLES", "6"))
AUDIO_EXAMPLES = int(os.environ.get("OPENCHROMA_FUZZ_AUDIO_EXAMPLES", "30"))


@st.composite
def floods(draw) -> list[str]:
    """A burst of conversation.item.create events (up to 150 items of up to 150 characters: far past the
    context, so old turns get dropped; some items carry a second of audio) and then response.create."""
    n = draw(st.one_of(st.sampled_from([150, 120]), st.integers(min_value=1, max_value=150)))
    chars = draw(st.one_of(st.sampled_from([150, 100]), st.integers(min_value=1, max_value=150)))
    audio_every = draw(st.sampled_from([0, 5, 40]))
    roles = draw(st.lists(st.sampled_from(["user", "assistant", "system"]), min_size=1, max_size=3))
    second = pcm16_b64(0.1 * np.sin(np.arange(24000) / 7.0))
    events = []
    for i in range(n):
        role = roles[i % len(roles)]
        text = (f"item{i} " * chars)[:chars]
        part = {"type": "output_text" if role == "assistant" else "input_text", "text": text}
        content = [part]
        if role == "user" and audio_every and i % audio_every == 0:
            content.append({"type": "input_audio", "audio": second})
        events.append(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": role, "content": content}}))
    return events + [json.dumps({"type": "response.create"})]


def test_fuzz_conversation_item_floods(server):
    url, state = server
    stats = {"floods": 0, "items": 0, "errors": 0, "slowest_s": 0.0}
    with captured_logs() as logs:
        @settings(max_examples=FLOOD_EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(floods())
        def check(events: list[str]) -> None:
            with connect(url) as ws:
                recv(ws, "session.created")
                ws.send(json.dumps({"type": "session.update", "session": {
                    "type": "realtime", "max_output_tokens": 3, "audio": {"input": {"turn_detection": None}}}}))
                recv(ws, "session.updated")
                t0 = time.monotonic()
                for text in events:
                    ws.send(text)
                while (ev := recv(ws, limit=120))["type"] != "response.done":
                    if ev["type"] == "error":
                        stats["errors"] += 1
                        assert ev["error"]["code"] != "internal_error", ev["error"]
                        assert ev["error"]["type"] != "server_error", ev["error"]
                probe(ws, "after-flood", limit=60)
                stats["slowest_s"] = max(stats["slowest_s"], time.monotonic() - t0)
            stats["floods"] += 1
            stats["items"] += len(events) - 1

        check()
    print(f"\nitem floods: {stats['floods']} floods, {stats['items']} items, {stats['errors']} error events, "
          f"slowest {stats['slowest_s']:.1f} s")
    assert not logs.errors(), logs.errors()[:5]
    assert wait_until(lambda: not state.engine.sessions and not state.connections, 10)


_AUDIO: dict[str, bytes] = {}


def audio_case(name: str) -> bytes:
    """Hostile and long audio files, made once (by name)."""
    if name not in _AUDIO:
        buf = io.BytesIO()
        sf.write(buf, tone(3.0, 16000), 16000, format="FLAC")
        make = {
            "2 h flac": lambda: silent_flac(2 * 3600),
            "flac without a length": lambda: without_length(silent_flac(600)),
            "115 s wav": lambda: _wav(tone(115.0, 16000), 16000),
            "3 s flac": buf.getvalue,
            "truncated flac": lambda: buf.getvalue()[:200],
            "nan wav": lambda: float_wav(float("nan")),
            "huge wav": lambda: float_wav(1e30),
            "tagless mp3": tagless_mp3,
            "odd pcm16": lambda: b"\x01\x02\x03",
            "random bytes": lambda: bytes(range(256)) * 40,
        }
        _AUDIO[name] = make[name]()
    return _AUDIO[name]


def _wav(x: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


AUDIO_NAMES = ["2 h flac", "flac without a length", "115 s wav", "3 s flac", "truncated flac", "nan wav", "huge wav",
               "tagless mp3", "odd pcm16", "random bytes"]


@st.composite
def audio_bodies(draw) -> dict:
    """A chat request whose audio parts are hostile or long, in every form a part can take."""
    parts = []
    for _ in range(draw(st.integers(min_value=1, max_value=2))):
        data = base64.b64encode(audio_case(draw(st.sampled_from(AUDIO_NAMES)))).decode()
        form = draw(st.sampled_from(["input_audio", "audio", "audio_url", "data url", "file url", "bare path"]))
        fmt = draw(st.sampled_from([None, "wav", "mp3", "flac", "pcm16", "ogg"]))
        if form == "input_audio":
            parts.append({"type": "input_audio", "input_audio": {"data": data, "format": fmt}})
        elif form in ("audio", "audio_url"):
            parts.append({"type": form, form: data})
        elif form == "data url":
            parts.append({"type": "audio", "audio": f"data:audio/{fmt or 'wav'};base64,{data}"})
        else:
            parts.append({"type": "audio", "audio": ("file:///" if form == "file url" else "/") + "tmp/a.wav"})
    body: dict = {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": parts}]}
    if draw(st.booleans()):
        body.update(prompt_audio=base64.b64encode(audio_case(draw(st.sampled_from(AUDIO_NAMES)))).decode(),
                    prompt_text="Hello there.")
    return body


def test_fuzz_long_and_hostile_audio_parts(server):
    url, state = server
    stats = {"bodies": 0, "4xx": 0, "2xx": 0, "slowest_s": 0.0}
    with captured_logs() as logs, httpx.Client(base_url=url, timeout=120) as client:
        @settings(max_examples=AUDIO_EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(audio_bodies())
        def check(body: dict) -> None:
            t0 = time.monotonic()
            r = client.post("/v1/chat/completions", json=body)
            stats["slowest_s"] = max(stats["slowest_s"], time.monotonic() - t0)
            stats["bodies"] += 1
            assert r.status_code < 500, (r.status_code, r.text[:300])
            if r.status_code >= 400:
                stats["4xx"] += 1
                assert len(r.json()["error"]["message"]) < 600, r.text[:700]
            else:
                stats["2xx"] += 1

        check()
    print(f"\naudio parts: {stats['bodies']} bodies, {stats['4xx']} answered 4xx, {stats['2xx']} 2xx, 0 5xx; "
          f"slowest {stats['slowest_s']:.1f} s")
    assert not logs.errors(), logs.errors()[:5]
    assert wait_until(lambda: not state.engine.sessions, 10)
