"""Issue 11, the server side: one client can never hurt another. One regression test per finding (each failed
before its fix), the slow-reader test and the engine fault test."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time

import httpx
import numpy as np
import pytest
from hardening_helpers import (
    RawNonReader,
    add_voice,
    captured_logs,
    connect,
    open_manual,
    pcm16_b64,
    probe,
    recv,
    user_text,
    wait_until,
)
from server_harness import chroma_server
from websockets.exceptions import ConnectionClosed, InvalidStatus

from openchroma.engine.engine import AsyncSession, Engine


@pytest.fixture(scope="module")
def server(tiny_chroma, tmp_path_factory):
    with chroma_server(tiny_chroma, tmp_path_factory.mktemp("data"), max_response_seconds=0.5, max_sessions=4,
                       max_ws_message_bytes=256 * 1024) as (url, state):
        add_voice(url)
        yield url, state


def sessions_free(state) -> bool:
    return not state.engine.sessions and not state.connections


# ----- 1 (server side): sampling parameters the engine refuses are a 400, never a failed batch --------------
@pytest.mark.parametrize("temperature", [1e39, 1e-45, "NaN", "Infinity"])
def test_absurd_sampling_parameters_are_refused_with_400(server, temperature):
    url, state = server
    body = f'{{"messages":[{{"role":"user","content":"Hi"}}],"temperature":{temperature}}}'
    r = httpx.post(f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "temperature"
    r = httpx.post(f"{url}/v1/audio/speech", content=f'{{"input":"Hi","seed":-1,"temperature":{temperature}}}',
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    assert sessions_free(state)


# ----- 2: every engine call answers: StopIteration and a stuck call become error events, the slot is freed ---
def test_engine_call_raising_stop_iteration_answers_with_an_error(server, monkeypatch):
    url, state = server

    def broken(self, *a, **k):
        raise StopIteration   # what a bare next() on an exhausted resampler raised

    monkeypatch.setattr(Engine, "_add_message", broken)   # on the engine's worker
    with open_manual(url) as ws:
        ws.send(user_text())
        ev = recv(ws, "error", limit=20)
        assert ev["error"]["type"] == "server_error"
        assert "StopIteration" in ev["error"]["message"]
        probe(ws, "after-stop-iteration")   # the connection still works
    assert wait_until(lambda: sessions_free(state), 5)


def test_stuck_engine_call_fails_loudly_and_frees_the_slot(tiny_chroma, tmp_path, monkeypatch):
    with chroma_server(tiny_chroma, tmp_path, engine_timeout=1.0) as (url, state):
        add_voice(url)
        release = threading.Event()

        def stuck(self, *a, **k):
            return asyncio.get_running_loop().create_future()   # an answer that never comes

        monkeypatch.setattr(AsyncSession, "add_message", stuck)
        try:
            with open_manual(url) as ws:
                t0 = time.monotonic()
                ws.send(user_text())
                ev = recv(ws, "error", limit=15)
                assert ev["error"]["code"] == "engine_timeout"
                with pytest.raises(ConnectionClosed) as closed:
                    recv(ws, limit=10)
                assert closed.value.rcvd.code == 1011
                assert time.monotonic() - t0 < 10
            assert wait_until(lambda: sessions_free(state), 5), "the slot stayed held"
        finally:
            release.set()


# ----- 3: bounded per-connection buffers ---------------------------------------------------------------------
@pytest.mark.slow   # load: floods a connection
def test_a_client_outrunning_the_engine_is_pushed_back_not_buffered(tiny_chroma, tmp_path, monkeypatch):
    limit = 2 * 2**20
    with chroma_server(tiny_chroma, tmp_path, max_pending_input_bytes=limit) as (url, state):
        add_voice(url)
        original = AsyncSession.append_audio

        async def slow_append(self, *args, **kw):
            await asyncio.sleep(0.05)   # the engine is busy: appends arrive faster than they are applied
            return await original(self, *args, **kw)

        monkeypatch.setattr(AsyncSession, "append_audio", slow_append)
        chunk = pcm16_b64(np.random.default_rng(0).uniform(-0.1, 0.1, 48000).astype(np.float32))   # 2 s, 192 kB
        peak = [0]
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                for conn in list(state.connections):
                    peak[0] = max(peak[0], conn.inbox.pending_bytes)
                time.sleep(0.005)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            with open_manual(url) as ws:
                t0 = time.monotonic()
                sent = 0
                while time.monotonic() - t0 < 3.0 and sent < 100:   # 200 s of audio, 20 MB decoded
                    ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
                    sent += 1
                probe(ws, "after-flood", limit=60)
        finally:
            stop.set()
            watcher.join()
        chunk_bytes = 48000 * 4
        assert peak[0] > 0, "the watcher saw no audio waiting"
        assert peak[0] <= limit + chunk_bytes, f"{peak[0] / 2**20:.1f} MiB queued behind the engine"


def test_a_client_that_stops_reading_is_dropped_and_its_slot_freed(tiny_chroma, tmp_path):
    """The slow reader: it sends events whose answers it never reads; the server drops it after --send-timeout,
    frees its session, and keeps serving everyone else."""
    with chroma_server(tiny_chroma, tmp_path, send_timeout=2.0, max_text_chars=16000) as (url, state):
        add_voice(url)
        client = RawNonReader(url)
        big = json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "x " * 7900}]}})
        sent = [0]

        def flood():   # each item is echoed three times (added, created, done): ~50 kB out per event in
            try:
                for _ in range(2000):
                    client.send(big)
                    sent[0] += 1
            except OSError:   # pushed back until the server dropped the connection
                pass

        sender = threading.Thread(target=flood, daemon=True)
        t0 = time.monotonic()
        sender.start()
        try:
            assert wait_until(lambda: state.connections, 5)
            assert wait_until(lambda: sessions_free(state), 30), "the non-reading client still holds its session"
            took = time.monotonic() - t0
        finally:
            client.close()
            sender.join(timeout=10)
        assert took < 30
        assert sent[0] < 2000, "the server kept reading from a client that reads nothing"
        # Everyone else is served.
        with open_manual(url) as other:
            probe(other, "after-slow-reader")


# ----- 4: text caps --------------------------------------------------------------------------------------------
def test_huge_texts_are_refused_before_they_reach_the_tokenizer(server):
    url, state = server
    huge = "word " * 20000   # 100k characters: over the 16k default
    with open_manual(url) as ws:
        ws.send(user_text(huge))
        ev = recv(ws, "error")
        assert ev["error"]["code"] == "string_above_max_length"
        ws.send(json.dumps({"type": "session.update", "session": {"instructions": huge}}))
        assert recv(ws, "error")["error"]["code"] == "string_above_max_length"
        ws.send(json.dumps({"type": "response.create", "response": {"instructions": huge}}))
        assert recv(ws, "error")["error"]["code"] == "string_above_max_length"
        probe(ws, "after-huge-text")
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": huge}]}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "string_above_max_length", r.text
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "system", "content": huge},
                                                                    {"role": "user", "content": "Hi"}]}, timeout=30)
    assert r.status_code == 400, r.text
    many = [{"role": "user", "content": "Hi"}] * 300
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": many}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "array_above_max_length", r.text
    r = httpx.post(f"{url}/v1/audio/speech", json={"input": "Hi", "instructions": huge}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "instructions", r.text
    assert sessions_free(state)


# ----- 5: parser failures ----------------------------------------------------------------------------------------
def test_parser_failures_get_error_events_and_the_socket_stays_up(server):
    url, state = server
    with captured_logs() as logs, open_manual(url) as ws:
        cases = [
            ("[" * 100000, "invalid_json"),
            ('{"type": "session.update", "x": ' + "[" * 5000 + "]" * 5000 + "}", None),
            ('{"type": "input_audio_buffer.commit", "n": ' + "9" * 5000 + "}", "invalid_json"),
            (json.dumps({"type": "x" * 200_000}), "invalid_event_type"),
            (json.dumps({"type": "input_audio_buffer.append", "audio": "A" * 300_000}), "message_too_large"),
        ]
        for i, (text, code) in enumerate(cases):
            ws.send(text)
            seen = probe(ws, f"p{i}")
            errors = [e for e in seen if e["type"] == "error"]
            assert errors, (i, [e["type"] for e in seen])
            if code is not None:
                assert errors[0]["error"]["code"] == code, (i, errors[0])
            assert errors[0]["error"]["code"] != "internal_error", (i, errors[0])
            assert len(errors[0]["error"]["message"]) < 500, (i, "an error message echoes the input back")
    assert not logs.errors(), logs.errors()


def test_an_event_over_the_protocol_cap_closes_with_1009(server):
    url, _ = server
    with open_manual(url) as ws:
        ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": "A" * 600_000}))   # over 2 x 256 KiB
        with pytest.raises(ConnectionClosed) as closed:
            recv(ws, limit=10)
        assert closed.value.rcvd.code == 1009


# ----- 6: fields that reached a 500 or an internal error ------------------------------------------------------
BAD_REALTIME_EVENTS = [
    {"type": "response.create", "response": {"max_output_tokens": {}}},
    {"type": "response.create", "response": {"max_output_tokens": [1]}},
    {"type": "response.create", "response": {"max_output_tokens": float("inf")}},
    {"type": "response.create", "response": {"max_output_tokens": -5}},
    {"type": "response.create", "response": {"max_output_tokens": True}},
    {"type": "response.create", "response": {"output_modalities": 5}},
    {"type": "response.create", "response": {"output_modalities": ["video"]}},
    {"type": "response.create", "response": {"audio": "x"}},
    {"type": "session.update", "session": {"audio": "x"}},
    {"type": "session.update", "session": {"audio": {"input": 3}}},
    {"type": "session.update", "session": {"max_output_tokens": True}},
    {"type": "session.update", "session": {"audio": {"input": {"turn_detection": {
        "type": "server_vad", "silence_duration_ms": float("inf")}}}}},
    {"type": "session.update", "session": {"audio": {"input": {"turn_detection": {
        "type": "server_vad", "prefix_padding_ms": 1e12}}}}},
    {"type": "session.update", "session": {"audio": {"input": {"turn_detection": {
        "type": "server_vad", "threshold": "high"}}}}},
    {"type": "session.update", "session": {"audio": {"input": {"turn_detection": {
        "type": "server_vad", "create_response": "yes"}}}}},
    {"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                  "content": [{"type": "input_audio", "audio": 5}]}},
    {"type": "conversation.item.truncate", "item_id": "x", "audio_end_ms": float("inf")},
]


def test_bad_realtime_fields_get_clear_error_events(server):
    url, state = server
    with open_manual(url) as ws:
        ws.send(user_text())
        recv(ws, "conversation.item.added")
        for i, event in enumerate(BAD_REALTIME_EVENTS):
            ws.send(json.dumps(event))   # json.dumps writes inf as Infinity, which JSON parsers accept
            seen = probe(ws, f"bad{i}")
            kinds = [e["type"] for e in seen]
            errors = [e for e in seen if e["type"] == "error"]
            assert errors, (event, kinds)
            assert errors[0]["error"]["type"] == "invalid_request_error", (event, errors[0])
            assert "response.created" not in kinds, (event, "a response started from a bad request")


@pytest.mark.parametrize("audio_part", [
    {"type": "input_audio", "input_audio": "AAAA"},
    {"type": "input_audio", "input_audio": [1, 2]},
    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": ["wav"]}},
    {"type": "text", "text": 5},
])
def test_bad_chat_parts_are_400_not_500(server, audio_part):
    url, _ = server
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": [audio_part]}]},
                   timeout=30)
    assert r.status_code == 400, r.text
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                       "audio": {"format": ["wav"], "voice": "lib"}}, timeout=30)
    assert r.status_code == 400, r.text
    r = httpx.post(f"{url}/v1/audio/speech", json={"input": "Hi", "voice": {"id": ["lib"]}}, timeout=30)
    assert r.status_code == 400, r.text


# ----- 7: browser-driven attacks, keys in logs, /docs behind the key, quiet refusals -------------------------
def test_cross_origin_websockets_and_posts_are_refused(tiny_chroma, tmp_path):
    with chroma_server(tiny_chroma, tmp_path, allow_origins=("https://app.example",)) as (url, state):
        add_voice(url)
        evil = {"Origin": "https://evil.example"}
        with pytest.raises(InvalidStatus) as refused:
            connect(url, additional_headers=evil)
        assert refused.value.response.status_code == 403
        with open("tests/data/speech.wav", "rb") as f:
            r = httpx.post(f"{url}/v1/voices", files={"file": ("s.wav", f, "audio/wav")},
                           data={"name": "evil", "transcript": "x"}, headers=evil, timeout=30)
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]},
                       headers=evil, timeout=30)
        assert r.status_code == 403
        assert httpx.delete(f"{url}/v1/voices/lib", headers=evil).status_code == 403
        assert httpx.get(f"{url}/v1/voices", headers=evil).status_code == 200   # reading needs CORS; none is sent
        # Same origin, a listed origin, and clients that send no Origin all work.
        host = url.removeprefix("http://")
        for headers in ({"Origin": f"http://{host}"}, {"Origin": "https://app.example"}, {}):
            with connect(url, additional_headers=headers) as ws:
                assert recv(ws)["type"] == "session.created"
        assert wait_until(lambda: sessions_free(state), 5)


def test_api_key_stays_out_of_logs_docs_need_it_and_refusals_are_quiet(tiny_chroma, tmp_path):
    with chroma_server(tiny_chroma, tmp_path, api_key="sekret-key", log_level="info") as (url, state), \
            captured_logs() as logs:
        assert httpx.get(f"{url}/v1/models?api_key=sekret-key").status_code == 200
        with _connect_query(url, "sekret-key") as ws:
            assert recv(ws)["type"] == "session.created"
        for path in ("/docs", "/openapi.json", "/redoc"):
            assert httpx.get(f"{url}{path}").status_code == 401, path
            assert httpx.get(f"{url}{path}", headers={"Authorization": "Bearer sekret-key"}).status_code == 200, path
        for _ in range(3):
            with pytest.raises(InvalidStatus):
                connect(url)
        time.sleep(0.3)
    text = logs.text()
    assert "/v1/models" in text, "the access log was not captured"
    assert "sekret-key" not in text
    assert not logs.errors(), logs.errors()


def _connect_query(url: str, key: str):
    import websockets.sync.client as ws_client

    return ws_client.connect(url.replace("http://", "ws://") + f"/v1/realtime?api_key={key}", open_timeout=30)


# ----- 8: idle sessions are reaped; a per-client cap --------------------------------------------------------------
@pytest.mark.slow   # over 3 s: left out of the fast subset
def test_idle_sessions_are_closed_and_a_client_cannot_hold_every_slot(tiny_chroma, tmp_path):
    with chroma_server(tiny_chroma, tmp_path, idle_timeout=1.5, max_sessions=4,
                       max_sessions_per_client=2) as (url, state):
        add_voice(url)
        a = connect(url)
        b = connect(url)
        assert recv(a)["type"] == "session.created" and recv(b)["type"] == "session.created"
        with connect(url) as c:   # the third from the same address
            ev = recv(c)
            assert ev["type"] == "error" and ev["error"]["code"] == "client_session_limit_reached"
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]},
                       timeout=30)
        assert r.status_code == 429 and r.json()["error"]["code"] == "client_session_limit_reached"
        probe(a, "last-event")   # a's last event: the idle clock starts once it is answered
        last = time.monotonic()
        ev = recv(a, "error", limit=10)
        assert ev["error"]["code"] == "idle_timeout"
        assert time.monotonic() - last >= 1.5 - 0.05, "closed before the idle timeout"
        with pytest.raises(ConnectionClosed) as closed:
            recv(a, limit=5)
        assert closed.value.rcvd.code == 4000
        b.close()
        a.close()
        assert wait_until(lambda: sessions_free(state) and not state.client_sessions, 5)
        # An active client is not idle: events keep it open, however long it stays (each is answered, and no
        # idle_timeout error comes between them).
        with open_manual(url) as ws:
            t0, i = time.monotonic(), 0
            while time.monotonic() - t0 < 2 * 1.5:
                with pytest.raises(TimeoutError):   # nothing comes between the client's events: no idle_timeout
                    ws.recv(timeout=0.3)
                probe(ws, f"alive{i}")
                i += 1


# ----- faults: the engine worker raising mid-step -----------------------------------------------------------------
class WorkerKilled(BaseException):
    """Not an ``Exception``: the engine's worker loop does not catch it, so its thread ends."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")   # the worker we kill
def test_a_fault_mid_step_fails_the_response_and_the_server_keeps_serving(tiny_chroma, tmp_path):
    with chroma_server(tiny_chroma, tmp_path, max_response_seconds=60, engine_timeout=3.0) as (url, state):
        add_voice(url)
        engine = state.engine
        original = engine.stepper.step
        calls = {"n": 0}

        def faulty_step():
            calls["n"] += 1
            if calls["n"] == 5:
                raise RuntimeError("injected fault")
            return original()

        engine.stepper.step = faulty_step
        with open_manual(url) as ws:
            ws.send(user_text())
            ws.send(json.dumps({"type": "response.create"}))
            done = recv(ws, "response.done", limit=30)
            assert done["response"]["status"] == "failed"
            assert "injected fault" in json.dumps(done["response"]["status_details"])
            # The same connection answers the next turn; /health says the engine is fine.
            assert httpx.get(f"{url}/health").json()["status"] == "ok"
            ws.send(json.dumps({"type": "response.create"}))
            ws.send(json.dumps({"type": "response.cancel"}))
            assert recv(ws, "response.done", limit=30)["response"]["status"] in ("cancelled", "completed",
                                                                                  "incomplete")

        # Now a fault that kills the worker: /health reports it and clients get errors, not hangs.
        def fatal_step():
            raise WorkerKilled("injected fatal fault")

        engine.stepper.step = fatal_step
        try:
            with open_manual(url) as ws:
                ws.send(user_text())
                ws.send(json.dumps({"type": "response.create"}))
                seen = []
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    try:
                        seen.append(recv(ws, limit=deadline - time.monotonic()))
                    except ConnectionClosed:
                        break
                    if seen[-1]["type"] == "response.done":
                        break
                kinds = [e["type"] for e in seen]
                assert "error" in kinds or "response.done" in kinds, kinds
            assert wait_until(lambda: "stopped" in (engine.problem() or ""), 10)
            health = httpx.get(f"{url}/health", timeout=30)
            assert health.status_code == 503 and "stopped" in health.json()["error"]
        finally:   # the engine answers the commands still queued when its worker died: connections end
            assert wait_until(lambda: not state.connections, 15)


def test_health_probe_reports_a_worker_that_does_not_answer(server, monkeypatch):
    url, state = server
    monkeypatch.setattr("openchroma.serving.state.HEALTH_PROBE_SECONDS", 0.5)
    gate = threading.Event()
    state.engine.submit(lambda: gate.wait(10))   # the worker is stuck on one command
    try:
        r = httpx.get(f"{url}/health", timeout=30)
        assert r.status_code == 503 and "did not answer" in r.json()["error"]
    finally:
        gate.set()
    assert wait_until(lambda: httpx.get(f"{url}/health", timeout=30).status_code == 200, 10)


def test_realtime_audio_then_clear_then_text_still_answers(server):
    """Finding 2's reproduction from the outside: clear (and a format change) then a text turn never hangs."""
    url, state = server
    with open_manual(url) as ws:
        noise = pcm16_b64(np.random.default_rng(1).uniform(-0.2, 0.2, 7000).astype(np.float32))
        ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": noise}))
        ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        recv(ws, "input_audio_buffer.cleared")
        ws.send(json.dumps({"type": "session.update", "session": {"audio": {"input": {"format": {
            "type": "audio/pcm", "rate": 16000}}}}}))
        recv(ws, "session.updated")
        ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": noise}))
        ws.send(user_text())
        ws.send(json.dumps({"type": "response.create"}))
        seen = probe(ws, "after-clear", limit=60)
        kinds = [e["type"] for e in seen]
        assert "response.created" in kinds or any(e["type"] == "error" for e in seen), kinds
        done = recv(ws, "response.done", limit=60) if "response.done" not in kinds else None
        assert done is None or done["response"]["status"] in ("completed", "incomplete", "failed")
    assert wait_until(lambda: sessions_free(state), 5)


def test_binary_and_base64_garbage_never_reach_an_internal_error(server):
    url, _ = server
    with open_manual(url) as ws:
        ws.send(b"\xff\xfe\x00")
        ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\x01").decode()}))
        seen = probe(ws, "garbage")
        assert all(e["error"]["code"] != "internal_error" for e in seen if e["type"] == "error")
