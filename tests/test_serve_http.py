"""/v1/chat/completions and /v1/audio/speech through the official ``openai`` SDK and raw HTTP."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import re
import shutil
import subprocess
import time
import tracemalloc

import httpx
import numpy as np
import pytest
import soundfile as sf
from audio_cases import float_wav, silent_flac, tagless_mp3, without_length
from openai import APIStatusError, OpenAI
from server_harness import SPEECH_WAV, chroma_server

from openchroma.engine import AudioChunk, Engine
from openchroma.serving.codecs import float_to_pcm16

TRANSCRIPT = "Hello there. Could you tell me what the weather will be like tomorrow?"
FRAME_BYTES = 1920 * 2


@pytest.fixture(scope="module")
def server(tiny_chroma, tmp_path_factory):
    with chroma_server(tiny_chroma, tmp_path_factory.mktemp("data"), max_response_seconds=4.0,
                       max_sessions=2) as (url, state):
        add_voice(url)
        yield url, state


def add_voice(url: str) -> None:
    with open(SPEECH_WAV, "rb") as f:
        r = httpx.post(f"{url}/v1/voices", files={"file": ("speech.wav", f, "audio/wav")},
                       data={"name": "lib", "transcript": TRANSCRIPT}, timeout=60)
    assert r.status_code == 201, r.text


@pytest.fixture
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0)


def speech_b64() -> str:
    return base64.b64encode(SPEECH_WAV.read_bytes()).decode()


def engine_reference(tiny_chroma, state, *, user_text=None, forced=None) -> bytes:
    frames = state.engine.max_response_frames
    engine = Engine(tiny_chroma, max_sessions=1, max_response_frames=frames)
    try:
        engine.add_voice("lib", state.engine.voices["lib"].prompt)
        s = engine.create_session("lib", None)
        if user_text:
            s.add_text(user_text)
        return b"".join(float_to_pcm16(e.audio) for e in s.respond(frames, forced) if isinstance(e, AudioChunk))
    finally:
        engine.close()


def test_chat_completion_with_audio_output(client, server, tiny_chroma):
    r = client.chat.completions.create(model="chroma-tiny", modalities=["text", "audio"],
                                       audio={"voice": "lib", "format": "wav"},
                                       messages=[{"role": "user", "content": "Tell me a joke."}])
    msg = r.choices[0].message
    assert msg.audio.transcript == msg.content
    wav, rate = sf.read(io.BytesIO(base64.b64decode(msg.audio.data)), dtype="int16")
    assert rate == 24000 and len(wav) > 0
    assert wav.tobytes() == engine_reference(tiny_chroma, server[1], user_text="Tell me a joke.")
    assert r.usage.completion_tokens_details.audio_tokens == len(wav) // 1920


def test_chat_completion_streams_audio_and_transcript(client, server, tiny_chroma):
    stream = client.chat.completions.create(
        model="chroma-tiny", modalities=["text", "audio"], audio={"voice": "lib", "format": "pcm16"}, stream=True,
        stream_options={"include_usage": True}, messages=[{"role": "user", "content": "Tell me a joke."}])
    audio, transcript, finish, usage = b"", "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        extra = getattr(delta, "audio", None) or (delta.model_extra or {}).get("audio")
        if extra is not None and not isinstance(extra, dict):
            extra = extra.model_dump(exclude_none=True)
        if extra:
            audio += base64.b64decode(extra.get("data", "")) if extra.get("data") else b""
            transcript += extra.get("transcript", "")
        finish = chunk.choices[0].finish_reason or finish
    assert finish in ("stop", "length")
    assert audio == engine_reference(tiny_chroma, server[1], user_text="Tell me a joke.")
    assert usage.completion_tokens_details.audio_tokens == len(audio) // FRAME_BYTES
    assert isinstance(transcript, str)


def test_chat_completion_text_only_streams_content(client):
    stream = client.chat.completions.create(model="chroma-tiny", stream=True,
                                            messages=[{"role": "user", "content": "Hi"}])
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_chat_completion_with_openai_input_audio(client):
    r = client.chat.completions.create(
        model="chroma-tiny", modalities=["text", "audio"], audio={"voice": "lib", "format": "wav"},
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "input_audio",
                                                "input_audio": {"data": speech_b64(), "format": "wav"}}]}])
    assert r.choices[0].message.audio.data
    assert r.usage.prompt_tokens > 30


def test_published_chroma_request_shape(server, tmp_path):
    url, state = server
    body = {
        "model": "chroma-tiny",
        "messages": [{"role": "system", "content": [{"type": "text", "text": "You are Chroma."}]},
                     {"role": "user", "content": [{"type": "audio",
                                                   "audio": "data:audio/wav;base64," + speech_b64()}]}],
        "prompt_text": TRANSCRIPT, "prompt_audio": speech_b64(), "return_audio": True,
    }
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    wav, rate = sf.read(io.BytesIO(base64.b64decode(out["choices"][0]["message"]["audio"]["data"])))
    assert rate == 24000 and len(wav)
    # The reference given in the request is cloned once and reused.
    n_voices = len(state.engine.voices)
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200 and len(state.engine.voices) == n_voices
    # Files on the server (file:// URLs) only with --allow-local-audio.
    body["messages"][1]["content"][0]["audio"] = SPEECH_WAV.as_uri()
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 400 and "allow-local-audio" in r.json()["error"]["message"]


def test_speech_streams_wav_and_pcm_of_the_forced_text(client, server, tiny_chroma):
    text = "Hello from OpenChroma."
    with client.audio.speech.with_streaming_response.create(model="chroma-tiny", voice="lib", input=text,
                                                            response_format="wav") as r:
        data = b"".join(r.iter_bytes())
    assert data[:4] == b"RIFF" and data[36:40] == b"data"
    ref = engine_reference(tiny_chroma, server[1], forced=text)
    assert data[44:] == ref
    pcm = client.audio.speech.create(model="chroma-tiny", voice="alloy", input=text, response_format="pcm").content
    assert pcm == ref   # 'alloy' falls back to the library's only voice
    r = httpx.post(f"{server[0]}/v1/audio/speech", json={"model": "chroma-tiny", "voice": "lib", "input": text,
                                                         "stream_format": "sse"}, timeout=60)
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done"
    assert b"".join(base64.b64decode(e["audio"]) for e in events[:-1]) == ref


SPEECH_TEXT = "Hello from OpenChroma."


@pytest.fixture(scope="module")
def speech_ref(tiny_chroma, server) -> bytes:
    return engine_reference(tiny_chroma, server[1], forced=SPEECH_TEXT)


def decode_all(data: bytes) -> tuple[np.ndarray, int, str]:
    """Any of the speech formats, decoded with PyAV (FFmpeg): (mono samples, rate, codec name)."""
    import av

    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.audio[0]
        x = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(stream)])
        return x, stream.rate, stream.codec_context.name


@pytest.mark.parametrize("fmt, codec, rate, media_type", [
    ("mp3", "mp3float", 24000, "audio/mpeg"), ("opus", "opus", 48000, "audio/ogg"),
    ("aac", "aac", 24000, "audio/aac"), ("flac", "flac", 24000, "audio/flac"),
    ("wav", "pcm_s16le", 24000, "audio/wav"),
])
def test_speech_formats_decode_to_the_right_audio(client, speech_ref, fmt, codec, rate, media_type):
    """Each of OpenAI's response formats, asked for through the SDK, decodes to the answer's length."""
    r = client.audio.speech.with_raw_response.create(model="chroma-tiny", voice="lib", input=SPEECH_TEXT,
                                                     response_format=fmt)
    assert r.headers["content-type"] == media_type and r.headers["x-sample-rate"] == str(rate)
    x, got_rate, got_codec = decode_all(r.content)
    seconds = len(speech_ref) / 2 / 24000
    assert (got_codec, got_rate) == (codec, rate)
    assert abs(len(x) / got_rate - seconds) < 0.1, (len(x) / got_rate, seconds)   # mp3/aac add encoder priming
    if fmt in ("flac", "wav"):   # lossless: the very samples (FFmpeg decodes both to int16)
        assert x.dtype == np.int16 and x.astype("<i2").tobytes() == speech_ref
    if fmt == "opus":
        assert r.content[:4] == b"OggS" and b"OpusHead" in r.content[:100]


def test_speech_defaults_to_mp3_as_openai_does(server, speech_ref):
    r = httpx.post(f"{server[0]}/v1/audio/speech", json={"voice": "lib", "input": SPEECH_TEXT}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "audio/mpeg"
    x, rate, codec = decode_all(r.content)
    assert codec == "mp3float" and abs(len(x) / rate - len(speech_ref) / 2 / 24000) < 0.1


def test_speech_pcm_is_raw_24khz_pcm16(client, speech_ref):
    r = client.audio.speech.with_raw_response.create(model="chroma-tiny", voice="lib", input=SPEECH_TEXT,
                                                     response_format="pcm")
    assert r.headers["content-type"] == "audio/pcm" and r.headers["x-sample-rate"] == "24000"
    assert r.content == speech_ref


def riff_sizes(data: bytes) -> tuple[int, int]:
    """(RIFF chunk size, data chunk size) of a 44-byte-header PCM WAV."""
    assert data[:4] == b"RIFF" and data[8:16] == b"WAVEfmt " and data[36:40] == b"data"
    return int.from_bytes(data[4:8], "little"), int.from_bytes(data[40:44], "little")


def test_streamed_wav_says_unknown_length_and_whole_wav_exact(server, speech_ref, tmp_path):
    """A streamed WAV cannot know its length: its sizes are 0xFFFFFFFF, which sox, libsndfile and FFmpeg read to the
    end of the file (a size of 0 would make sox and libsndfile read no samples at all). ``stream: false`` sends the
    whole file with exact sizes."""
    url = server[0]
    streamed = httpx.post(f"{url}/v1/audio/speech", json={"voice": "lib", "input": SPEECH_TEXT,
                                                          "response_format": "wav"}, timeout=60)
    assert riff_sizes(streamed.content) == (0xFFFFFFFF, 0xFFFFFFFF)
    assert streamed.headers.get("transfer-encoding") == "chunked"
    whole = httpx.post(f"{url}/v1/audio/speech", json={"voice": "lib", "input": SPEECH_TEXT, "response_format": "wav",
                                                       "stream": False}, timeout=60)
    assert riff_sizes(whole.content) == (36 + len(speech_ref), len(speech_ref))
    assert whole.headers["content-length"] == str(44 + len(speech_ref)) and whole.content[44:] == speech_ref
    for name, data in (("streamed", streamed.content), ("whole", whole.content)):
        (tmp_path / f"{name}.wav").write_bytes(data)
        assert sf.info(tmp_path / f"{name}.wav").frames == len(speech_ref) // 2, name
    if shutil.which("sox") is None:
        pytest.skip("sox is not installed (apt-get install sox): the libsndfile checks passed")
    samples = len(speech_ref) // 2
    for name in ("streamed", "whole"):
        stat = subprocess.run(["sox", str(tmp_path / f"{name}.wav"), "-n", "stat"], capture_output=True, text=True)
        assert re.search(rf"Samples read:\s+{samples}\n", stat.stderr), (name, stat.stderr)
    soxi = subprocess.run(["soxi", "-s", str(tmp_path / "whole.wav")], capture_output=True, text=True, check=True)
    assert int(soxi.stdout) == samples


@pytest.mark.parametrize("body,status,needle", [
    ({"model": "m", "input": "", "voice": "lib"}, 400, "input is empty"),
    ({"model": "m", "input": "hi", "voice": "nobody"}, 404, "unknown voice"),
    ({"model": "m", "input": "hi", "voice": "lib", "response_format": "ogg"}, 400,
     "response_format 'ogg' is not supported; use one of mp3, opus, aac, flac, wav, pcm"),
    ({"model": "m", "input": "hi", "voice": "lib", "speed": 2.0}, 400, "speed"),
    ({"model": "m", "input": "x" * 5000, "voice": "lib"}, 400, "limit"),
    ({"model": "m", "voice": "lib"}, 400, "input"),
])
def test_speech_bad_requests(server, body, status, needle):
    r = httpx.post(f"{server[0]}/v1/audio/speech", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


@pytest.mark.parametrize("body,needle", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "last message"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "@@"}}]}]},
     "base64"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {
        "data": base64.b64encode(b"not audio at all").decode(), "format": "wav"}}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]: Input tag 'image_url'"),   # the schema names the field and what it takes
    ({"messages": [{"role": "user", "content": "hi"}], "modalities": ["audio"], "audio": {"voice": "lib",
                                                                                         "format": "mp3"}},
     "audio.format"),
    ({"messages": [{"role": "user", "content": "hi"}], "prompt_text": "only half"}, "prompt_audio"),
])
def test_chat_bad_requests(server, body, needle):
    r = httpx.post(f"{server[0]}/v1/chat/completions", json={"model": "chroma-tiny", **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]


def test_malformed_json_and_wrong_types(server):
    r = httpx.post(f"{server[0]}/v1/chat/completions", content=b"{oops", timeout=10,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{server[0]}/v1/chat/completions", json={"messages": "nope"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_session_limit_answers_503_and_a_dropped_stream_frees_its_slot(tiny_chroma, tmp_path):
    body = {"model": "chroma-tiny", "stream": True, "modalities": ["text", "audio"],
            "audio": {"voice": "lib", "format": "pcm16"}, "messages": [{"role": "user", "content": "hi"}]}
    with chroma_server(tiny_chroma, tmp_path, max_sessions=2, max_response_seconds=60) as (url, state):
        add_voice(url)
        # Fill both slots with streams that run long, then ask for a third.
        with httpx.Client(timeout=30) as c1, httpx.Client(timeout=30) as c2:
            with c1.stream("POST", f"{url}/v1/chat/completions", json=body) as r1, \
                    c2.stream("POST", f"{url}/v1/chat/completions", json=body) as r2:
                lines1, lines2 = r1.iter_lines(), r2.iter_lines()   # (a dropped iterator closes the stream)
                next(lines1)
                next(lines2)
                r3 = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False}, timeout=30)
                assert r3.status_code == 503
                assert r3.json()["error"]["code"] == "session_limit_reached"
                assert len(state.engine.sessions) == 2
                t0 = time.time()
        while state.engine.sessions and time.time() - t0 < 1.0:
            time.sleep(0.01)
        assert not state.engine.sessions, "dropped streams did not free their slots within 1 s"


def test_api_key_guards_every_route(tiny_chroma, tmp_path):
    with chroma_server(tiny_chroma, tmp_path, api_key="sekret") as (url, _):
        for method, path in [("GET", "/v1/models"), ("GET", "/v1/voices"), ("GET", "/metrics"),
                             ("POST", "/v1/chat/completions"), ("POST", "/v1/audio/speech")]:
            r = httpx.request(method, f"{url}{path}", json={})
            assert r.status_code == 401, path
            assert r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/").status_code == 200     # the page itself asks for the key
        bad = OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(APIStatusError) as err:
            bad.models.list()
        assert err.value.status_code == 401
        assert OpenAI(base_url=f"{url}/v1", api_key="sekret").models.list().data[0].id == "chroma-tiny"


def test_request_body_cap(tiny_chroma, tmp_path):
    with chroma_server(tiny_chroma, tmp_path, max_upload_bytes=10_000) as (url, _):
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 20_000}]})
        assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


def test_health_says_loading_until_ready(tmp_path):
    from fastapi.testclient import TestClient

    from openchroma.serving.app import ServerConfig, create_app

    app = create_app(ServerConfig(model=str(tmp_path / "missing"), data_dir=tmp_path))
    with TestClient(app) as c:
        deadline = time.time() + 10
        while c.get("/health").json()["status"] == "loading" and time.time() < deadline:
            time.sleep(0.05)
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "error"
        r = c.post("/v1/audio/speech", json={"model": "m", "input": "hi", "voice": "x"})
        assert r.status_code == 503 and "failed to load" in r.json()["error"]["message"]


def test_models_and_health_say_when_the_weights_are_random(server, fixture_dir, tmp_path):
    """init-random checkpoints are labelled (the browser client shows a badge); the reference fixture is not."""
    from openchroma.serving.app import ServerConfig, ServerState

    url = server[0]
    assert httpx.get(f"{url}/v1/models").json()["data"][0]["random_weights"] is True
    assert httpx.get(f"{url}/v1/models/chroma-tiny").json()["random_weights"] is True
    assert httpx.get(f"{url}/health").json()["random_weights"] is True
    assert ServerState(ServerConfig(model=str(fixture_dir), data_dir=tmp_path)).random_weights is False


# ----- hostile audio: every route that takes audio goes through one intake (same checks, same errors) ---------
AUDIO_ROUTES = ["chat input_audio", "chat audio part", "chat prompt_audio", "voices", "transcriptions"]


def post_audio(url: str, route: str, data: bytes, fmt: str = "wav") -> httpx.Response:
    b64 = base64.b64encode(data).decode()
    chat = {"model": "chroma-tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    if route == "chat input_audio":
        chat["messages"][0]["content"] = [{"type": "input_audio", "input_audio": {"data": b64, "format": fmt}}]
    elif route == "chat audio part":
        chat["messages"][0]["content"] = [{"type": "audio", "audio": f"data:audio/{fmt};base64,{b64}"}]
    elif route == "chat prompt_audio":
        chat.update(prompt_audio=b64, prompt_text=TRANSCRIPT)
    elif route == "voices":
        return httpx.post(f"{url}/v1/voices", files={"file": (f"ref.{fmt}", data)},
                          data={"name": "hostile", "transcript": TRANSCRIPT}, timeout=60)
    else:
        return httpx.post(f"{url}/v1/audio/transcriptions", files={"file": (f"a.{fmt}", data)}, timeout=60)
    return httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60)


def traced_peak_mb(fn):
    """(fn's result, peak of Python and numpy allocations meanwhile in MB), the server's threads included."""
    tracemalloc.start()
    try:
        return fn(), tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("route", AUDIO_ROUTES)
def test_long_audio_is_refused_from_its_header_on_every_route(server, route):
    """Issue 18: chat input_audio decoded a 2-hour FLAC (364 kB) whole before checking its length (4.1 s and
    +867 MB); every route now refuses it from the header, allocating next to nothing."""
    r, peak = traced_peak_mb(lambda: post_audio(server[0], route, silent_flac(2 * 3600), "flac"))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "audio_too_long" and "7200.00 s long" in err["message"], err
    assert peak < 30, f"{peak:.0f} MB allocated to refuse a 2-hour file"


@pytest.mark.parametrize("route", AUDIO_ROUTES)
def test_audio_without_a_length_is_refused_at_the_limit_on_every_route(server, route):
    """A FLAC whose header gives no length (streamed FLAC) was a 500 'array is too big' on /v1/voices and chat
    prompt_audio: it is decoded in blocks and refused once over the route's limit."""
    r = post_audio(server[0], route, without_length(silent_flac(600)), "flac")
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "audio_too_long" and "longer than" in err["message"], err


@pytest.mark.parametrize("bad", [float("nan"), 1e30, 3.3e38], ids=["nan", "huge", "near-float-max"])
@pytest.mark.parametrize("route", AUDIO_ROUTES)
def test_non_finite_or_absurd_samples_are_a_400_on_every_route(server, route, bad):
    """Float WAVs with NaN or huge samples: transcriptions answered garbage (or a 500 from the engine), chat a 500
    'Out of range float values are not JSON compliant'. Now the same 400 everywhere."""
    r = post_audio(server[0], route, float_wav(bad))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_audio" and ("NaN/inf" in err["message"] or "samples reach" in err["message"]), err
    assert "hostile" not in server[1].engine.voices


@pytest.mark.parametrize("route", ["chat input_audio", "chat audio part", "transcriptions"])
def test_an_mp3_without_an_id3_tag_is_audio_not_a_path(server, route):
    """Its base64 starts with '/': it was taken for a server path (400 'audio paths on the server are
    disabled')."""
    mp3 = tagless_mp3()
    assert base64.b64encode(mp3).startswith(b"/")
    r = post_audio(server[0], route, mp3, "mp3")
    assert r.status_code == 200, r.text


@contextlib.contextmanager
def captured_logs():
    """Everything the server logs meanwhile (its own loggers and uvicorn's, tracebacks included)."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    loggers = [logging.getLogger(), logging.getLogger("uvicorn")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield out
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def test_local_audio_takes_only_file_urls_and_logs_stay_small(tiny_chroma, tmp_path):
    """With --allow-local-audio a tagless mp3's base64 was a 500 'OSError: File name too long', and the whole
    base64 went to the log twice. Files on the server are now named by file:// URLs only."""
    mp3 = tagless_mp3(60.0)
    b64 = base64.b64encode(mp3).decode()
    with chroma_server(tiny_chroma, tmp_path, allow_local_audio=True) as (url, _):
        add_voice(url)
        with captured_logs() as log:
            for route in ("chat input_audio", "chat audio part", "chat prompt_audio"):
                r = post_audio(url, route, mp3, "mp3")
                assert r.status_code == 200 if route != "chat prompt_audio" else 400, r.text  # prompt: 60 s > 30
        assert len(log.getvalue()) < 2000, f"{len(log.getvalue())} characters logged for a {len(b64)}-character value"

        def chat(ref: str) -> httpx.Response:
            return httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
                "model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": [{"type": "audio",
                                                                                          "audio": ref}]}]})
        assert chat(SPEECH_WAV.as_uri()).status_code == 200
        r = chat(str(SPEECH_WAV))   # a bare path is not base64, and no longer a path
        assert r.status_code == 400 and "file:// URL" in r.json()["error"]["message"]
        long_name = "file:///" + "x" * 5000 + ".wav"
        with captured_logs() as log:
            r = chat(long_name)
        assert r.status_code == 400 and len(r.json()["error"]["message"]) < 300, r.text
        assert len(log.getvalue()) < 2000
        for ref, why in [("file://host/a.wav", "not a file:// URL of an absolute path"),
                         ((tmp_path / "missing.wav").as_uri(), "No such file"),
                         (tmp_path.as_uri(), "not a file")]:
            r = chat(ref)
            assert r.status_code == 400 and why in r.json()["error"]["message"], r.text
