"""The persistent voice library over HTTP: /v1/voices upload, list, get, audio, delete, restarts and bad input."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch
from audio_cases import float_wav, silent_flac, without_length
from safetensors.torch import load_file
from server_harness import ROOT, SPEECH_WAV, chroma_server, free_port

from openchroma.engine import AudioChunk, ResponseDone

TRANSCRIPT = "Hello there. Could you tell me what the weather will be like tomorrow?"


def encode(samples: np.ndarray, rate: int, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def speech() -> tuple[np.ndarray, int]:
    samples, rate = sf.read(SPEECH_WAV, dtype="float32")
    return samples, rate


def upload(url: str, name: str | None, data: bytes | None = None, transcript: str | None = TRANSCRIPT,
           filename: str = "ref.wav", content_type: str = "audio/wav", field: str = "file", **kw) -> httpx.Response:
    if data is None:
        data = SPEECH_WAV.read_bytes()
    form = {k: v for k, v in (("name", name), ("transcript", transcript)) if v is not None}
    files = {field: (filename, data, content_type)} if data is not False else None
    return httpx.post(f"{url}/v1/voices", data=form, files=files, timeout=60, **kw)


def stored_files(data_dir) -> list[str]:
    return sorted(p.name for p in (data_dir / "voices").iterdir() if not p.name.startswith("index.sqlite3"))


def assert_only_lib(server) -> None:
    """Nothing but the module server's own voice is stored or registered (failed uploads leave no trace)."""
    url, state, data_dir = server
    assert [v["name"] for v in httpx.get(f"{url}/v1/voices").json()["data"]] == ["lib"]
    assert sorted(state.engine.voices) == ["lib"]
    files = stored_files(data_dir)
    assert len(files) == 3 and all(n.startswith("lib-") for n in files), files


def error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert body["code"] == code, body
    return body["message"]


@pytest.fixture(scope="module")
def server(tiny_chroma, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("voices-data")
    with chroma_server(tiny_chroma, data_dir) as (url, state):
        r = upload(url, "lib")
        assert r.status_code == 201, r.text
        yield url, state, data_dir


def test_upload_list_get_audio_and_use(tiny_chroma, tmp_path):
    with chroma_server(tiny_chroma, tmp_path) as (url, state):
        assert httpx.get(f"{url}/v1/voices").json() == {"object": "list", "data": []}
        assert not (tmp_path / "voices").exists()       # created on demand
        t0 = int(time.time())
        r = upload(url, "Alice_1.v2", filename="alice.wav")
        assert r.status_code == 201, r.text
        rec = r.json()
        duration = sf.info(SPEECH_WAV).duration
        assert rec == {"id": "Alice_1.v2", "object": "voice", "name": "Alice_1.v2", "transcript": TRANSCRIPT,
                       "duration_seconds": pytest.approx(duration, abs=0.01), "created_at": rec["created_at"],
                       "sample_rate": 24000}
        assert isinstance(rec["created_at"], int) and t0 - 1 <= rec["created_at"] <= time.time() + 1

        # The other accepted field name, and a second voice for the listing's order.
        r = upload(url, "aaron", field="audio")
        assert r.status_code == 201, r.text
        listing = httpx.get(f"{url}/v1/voices").json()
        assert listing["object"] == "list"
        assert [v["name"] for v in listing["data"]] == ["Alice_1.v2", "aaron"]
        assert listing["data"][0] == rec
        assert httpx.get(f"{url}/v1/voices/Alice_1.v2").json() == rec

        audio = httpx.get(f"{url}/v1/voices/Alice_1.v2/audio")
        assert audio.status_code == 200
        assert audio.headers["content-type"].startswith("audio/wav")
        assert audio.content == SPEECH_WAV.read_bytes()

        # Stored on disk: the index, the upload as-is, a 24 kHz wav and the codes.
        names = stored_files(tmp_path)
        assert (tmp_path / "voices" / "index.sqlite3").is_file()
        assert len(names) == 6 and all(n.startswith(("Alice_1.v2-", "aaron-")) for n in names), names
        codes_file = next(tmp_path / "voices" / n for n in names if n.startswith("Alice") and
                          n.endswith(".safetensors"))
        wav_file = next(tmp_path / "voices" / n for n in names if n.startswith("Alice") and n.endswith(".24k.wav"))
        assert sf.info(wav_file).samplerate == 24000

        # Registered with the engine, with the stored codes, and usable.
        voice = state.engine.voices["Alice_1.v2"]
        assert voice.transcript == TRANSCRIPT
        stored = load_file(codes_file)
        assert torch.equal(stored["codes"], voice.prompt.codes)
        assert torch.equal(stored["text_ids"], voice.prompt.text_ids)
        assert voice.prompt.codes.shape == (round(duration * 12.5), state.engine.cfg.audio_num_codebooks)
        session = state.engine.create_session("Alice_1.v2")
        try:
            events = list(session.respond(3, "Hi."))
        finally:
            session.close()
        assert sum(isinstance(e, AudioChunk) for e in events) >= 1 and isinstance(events[-1], ResponseDone)
        assert "openchroma_voices 2.0" in httpx.get(f"{url}/metrics").text


def test_voices_survive_a_restart_and_deletion_sticks(tiny_chroma, tmp_path):
    samples, rate = speech()
    flac = encode(samples, rate, "FLAC")
    with chroma_server(tiny_chroma, tmp_path) as (url, state):
        assert upload(url, "alice").status_code == 201
        r = upload(url, "bob", flac, filename="bob.flac", content_type="application/octet-stream")
        assert r.status_code == 201, r.text
        before = {n: (v.prompt.codes.clone(), v.prompt.text_ids.clone()) for n, v in state.engine.voices.items()}
        records = httpx.get(f"{url}/v1/voices").json()["data"]

    with chroma_server(tiny_chroma, tmp_path) as (url, state):
        assert httpx.get(f"{url}/v1/voices").json()["data"] == records
        assert sorted(state.engine.voices) == ["alice", "bob"]
        for name, (codes, text_ids) in before.items():
            assert torch.equal(state.engine.voices[name].prompt.codes, codes)
            assert torch.equal(state.engine.voices[name].prompt.text_ids, text_ids)
            assert state.engine.voices[name].transcript == TRANSCRIPT
        audio = httpx.get(f"{url}/v1/voices/bob/audio")
        assert audio.headers["content-type"] == "audio/flac" and audio.content == flac
        assert httpx.get(f"{url}/health").json()["voices"] == 2

        r = httpx.delete(f"{url}/v1/voices/alice")
        assert r.status_code == 200 and r.json() == {"id": "alice", "object": "voice", "deleted": True}
        assert "alice" not in state.engine.voices
        assert [v["name"] for v in httpx.get(f"{url}/v1/voices").json()["data"]] == ["bob"]
        error(httpx.get(f"{url}/v1/voices/alice"), 404, "voice_not_found")
        error(httpx.get(f"{url}/v1/voices/alice/audio"), 404, "voice_not_found")
        error(httpx.delete(f"{url}/v1/voices/alice"), 404, "voice_not_found")
        assert all(n.startswith("bob-") for n in stored_files(tmp_path))

    with chroma_server(tiny_chroma, tmp_path) as (url, state):
        assert [v["name"] for v in httpx.get(f"{url}/v1/voices").json()["data"]] == ["bob"]
        assert sorted(state.engine.voices) == ["bob"]
        assert upload(url, "alice").status_code == 201      # the name is free again


def test_damaged_voice_is_skipped_at_restart(tiny_chroma, tmp_path):
    with chroma_server(tiny_chroma, tmp_path) as (url, state):
        for name in ("good", "bad", "gone"):
            assert upload(url, name).status_code == 201
    files = {n.split("-")[0]: tmp_path / "voices" / n for n in stored_files(tmp_path) if n.endswith(".safetensors")}
    files["bad"].write_bytes(b"\x00garbage, not safetensors" * 10)
    files["gone"].unlink()

    with chroma_server(tiny_chroma, tmp_path) as (url, state):
        health = httpx.get(f"{url}/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert sorted(state.engine.voices) == ["good"]
        listing = {v["name"]: v for v in httpx.get(f"{url}/v1/voices").json()["data"]}
        assert "status" not in listing["good"]
        assert listing["bad"]["status"] == "unavailable" and "unreadable" in listing["bad"]["error"]
        assert listing["gone"]["status"] == "unavailable" and "missing" in listing["gone"]["error"]
        assert "openchroma_voices 1.0" in httpx.get(f"{url}/metrics").text
        # A damaged voice can be deleted and added again.
        assert httpx.delete(f"{url}/v1/voices/bad").status_code == 200
        assert upload(url, "bad").status_code == 201
        assert sorted(state.engine.voices) == ["bad", "good"]


@pytest.mark.parametrize("missing", ["file", "transcript", "name"])
def test_missing_field(server, missing):
    url, state, _ = server
    r = upload(url, None if missing == "name" else "x1", False if missing == "file" else None,
               None if missing == "transcript" else TRANSCRIPT)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == missing and f"'{missing}'" in err["message"]


def test_not_a_form(server):
    url, _, _ = server
    r = httpx.post(f"{url}/v1/voices", json={"name": "x", "transcript": "y"})
    msg = error(r, 400, "missing_required_parameter")
    assert "'file'" in msg


@pytest.mark.parametrize("name", ["", " ", ".hidden", "a b", "x" * 65, "émile", "../etc", "a/b", "_adhoc_x"])
def test_bad_name(server, name):
    url, state, _ = server
    msg = error(upload(url, name), 400, "invalid_voice_name")
    assert "64" in msg


def test_duplicate_name(server):
    url, state, _ = server
    msg = error(upload(url, "lib"), 409, "voice_exists")
    assert "lib" in msg


def test_concurrent_uploads_of_one_name(server):
    url, state, _ = server
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(upload(url, "race").status_code)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert sorted(results) == [201, 409]
    finally:
        httpx.delete(f"{url}/v1/voices/race")


def _bad_audio():
    samples, rate = speech()
    rng = np.random.default_rng(0)
    noise = (rng.standard_normal(3 * rate) * 10 ** (-40 / 20)).astype(np.float32)   # -40 dBFS white noise
    return [
        ("empty", b"", "audio_empty", "empty"),
        ("corrupt", b"this is not audio at all " * 40, "invalid_audio", "bad.wav"),
        ("truncated-header", SPEECH_WAV.read_bytes()[:30], "invalid_audio", "bad.wav"),
        ("short", encode(samples[: rate // 2], rate), "audio_too_short", "0.50 s long; a voice needs between 1 and 30"),
        ("long", encode(np.tile(samples, 11)[: 31 * rate], rate), "audio_too_long", "31.00 s long"),
        ("silence", encode(np.zeros(3 * rate, np.float32), rate), "voice_silent", "dBFS"),
        ("quiet-hum", encode(np.full(3 * rate, 1e-4, np.float32), rate), "voice_silent", "dBFS"),
        ("noise", encode(noise, rate), "voice_silent", "no speech"),
        # A FLAC whose header gives no length (streamed FLAC) was a 500 'array is too big'.
        ("no-length", without_length(silent_flac(600)), "audio_too_long", "longer than 30 s"),
        ("huge-samples", float_wav(1e30), "invalid_audio", "samples reach 1e+30"),
    ]


@pytest.mark.parametrize("case", _bad_audio(), ids=lambda c: c[0])
def test_bad_audio(server, case):
    url, state, data_dir = server
    _, data, code, text = case
    msg = error(upload(url, "bad1", data, filename="bad.wav"), 400, code)
    assert text in msg, msg
    assert_only_lib(server)


@pytest.mark.parametrize("transcript,code", [("", "transcript_empty"), ("  \n ", "transcript_empty"),
                                             ("word " * 201, "transcript_too_long"),
                                             ("\U0001f642" * 300, "transcript_too_long")])
def test_bad_transcript(server, transcript, code):
    """Empty, over 1000 characters, or over the 256 tokens the engine keeps for a voice's transcript."""
    url, state, _ = server
    msg = error(upload(url, "bad2", transcript=transcript), 400, code)
    assert ("tokens" in msg) == (len(transcript) == 300)
    assert_only_lib(server)


@pytest.mark.parametrize("where", ["codes file", "index row"])
def test_storage_failure_leaves_nothing_behind(server, monkeypatch, where):
    """A write failing midway (disk full) answers 500 and undoes the files and the engine registration."""
    import sqlite3

    import openchroma.serving.voice_store_sqlite as voices

    url, state, _ = server
    if where == "codes file":
        def save_file(*a, **k):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(voices, "save_file", save_file)
    else:
        connect = state.voices.store._connect

        def failing_connect(create):
            if create:
                raise sqlite3.OperationalError("database or disk is full")
            return connect(create)
        monkeypatch.setattr(state.voices.store, "_connect", failing_connect)
    msg = error(upload(url, "full"), 500, "storage_error")
    assert "full" in msg or "space" in msg.lower()
    monkeypatch.undo()
    assert_only_lib(server)


def test_library_is_readable_while_the_model_is_not(server, tmp_path):
    """Before the engine is ready (here: it never loads) the library lists, and uploads answer 503."""
    from fastapi.testclient import TestClient

    from openchroma.serving.app import ServerConfig, create_app

    app = create_app(ServerConfig(model=str(tmp_path / "missing"), data_dir=server[2]))
    with TestClient(app) as c:
        assert [v["name"] for v in c.get("/v1/voices").json()["data"]] == ["lib"]
        assert c.get("/v1/voices/lib").json()["transcript"] == TRANSCRIPT
        r = c.post("/v1/voices", data={"name": "x", "transcript": TRANSCRIPT},
                   files={"file": ("ref.wav", SPEECH_WAV.read_bytes(), "audio/wav")})
        assert r.status_code == 503 and r.json()["error"]["code"] in ("model_loading", "model_load_failed")
    assert_only_lib(server)


def test_api_key(tiny_chroma, tmp_path):
    with chroma_server(tiny_chroma, tmp_path, api_key="k") as (url, state):
        for r in (upload(url, "keyed"), httpx.get(f"{url}/v1/voices"), httpx.get(f"{url}/v1/voices/keyed"),
                  httpx.get(f"{url}/v1/voices/keyed/audio"), httpx.delete(f"{url}/v1/voices/keyed"),
                  upload(url, "keyed", headers={"Authorization": "Bearer wrong"})):
            assert error(r, 401, "invalid_api_key")
        assert "keyed" not in state.engine.voices
        auth = {"Authorization": "Bearer k"}
        assert upload(url, "keyed", headers=auth).status_code == 201
        assert [v["name"] for v in httpx.get(f"{url}/v1/voices", headers=auth).json()["data"]] == ["keyed"]
        assert httpx.get(f"{url}/v1/voices/keyed/audio", headers=auth).content == SPEECH_WAV.read_bytes()
        assert httpx.delete(f"{url}/v1/voices/keyed", headers=auth).status_code == 200


def test_upload_over_the_body_cap(tiny_chroma, tmp_path):
    with chroma_server(tiny_chroma, tmp_path, max_upload_bytes=20_000) as (url, state):
        assert SPEECH_WAV.stat().st_size > 20_000
        msg = error(upload(url, "big"), 413, "request_too_large")
        assert "limit" in msg
        assert "big" not in state.engine.voices
        assert httpx.get(f"{url}/v1/voices").json()["data"] == []


def test_streamed_upload_over_the_body_cap(tiny_chroma, tmp_path):
    """Without a Content-Length (a chunked body) the cap applies too."""
    with chroma_server(tiny_chroma, tmp_path, max_upload_bytes=20_000) as (url, state):
        req = httpx.Request("POST", f"{url}/v1/voices", data={"name": "big", "transcript": TRANSCRIPT},
                            files={"file": ("ref.wav", SPEECH_WAV.read_bytes(), "audio/wav")})
        body = req.read()
        chunks = (body[i:i + 8192] for i in range(0, len(body), 8192))
        r = httpx.post(f"{url}/v1/voices", content=chunks, headers={"content-type": req.headers["content-type"]})
        assert "content-length" not in r.request.headers
        assert "big" not in state.engine.voices
        error(r, 413, "request_too_large")


def _serve(model, data_dir, port: int) -> subprocess.Popen:
    """``openchroma serve`` in a process of its own (so that it can be killed with SIGKILL)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "openchroma", "serve", "--model", str(model), "--port", str(port),
                             "--data-dir", str(data_dir), "--max-response-seconds", "1"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, "the server exited at start-up"
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not start")


@pytest.mark.slow   # over 3 s: left out of the fast subset
def test_kill_9_during_uploads_leaves_no_half_written_voice(tiny_random_dir, tmp_path):
    """SIGKILL while voices are being added, twice: after each restart every listed voice is complete (registered,
    its audio served), whatever the add was doing when the process died."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    def uploads(prefix: str, stop: threading.Event) -> None:
        for i in range(1000):
            if stop.is_set():
                return
            try:
                upload(url, f"{prefix}{i}")
            except httpx.HTTPError:
                return

    for kill in range(2):
        proc = _serve(tiny_random_dir, tmp_path, port)
        stop = threading.Event()
        threads = [threading.Thread(target=uploads, args=(f"k{kill}{t}x", stop)) for t in range(2)]
        for t in threads:
            t.start()
        time.sleep(1.0 + 0.7 * kill)   # some uploads finished, some in flight
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        stop.set()
        for t in threads:
            t.join()
    proc = _serve(tiny_random_dir, tmp_path, port)
    try:
        voices = httpx.get(f"{url}/v1/voices").json()["data"]
        assert voices, "no upload finished before the kills"
        for v in voices:
            assert v.get("status") != "unavailable", v
            assert httpx.get(f"{url}/v1/voices/{v['name']}/audio").content == SPEECH_WAV.read_bytes()
        stored = {p.name for p in (tmp_path / "voices").iterdir()}
        for v in voices:   # each listed voice has its three files
            assert sum(n.startswith(v["name"] + "-") and not n.startswith(".") for n in stored) >= 3, (v, stored)
    finally:
        proc.kill()
        proc.wait()
