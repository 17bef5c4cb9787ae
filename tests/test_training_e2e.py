"""Issue 13 end to end: synth -> prepare -> train --lora -> load the output -> serve answers with it.

And `synth` against OpenAI-compatible endpoints (a stand-in server on loopback that fails once, to exercise the
openai SDK's retries).
"""

from __future__ import annotations

import io
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import soundfile as sf
from training_helpers import tone

import openchroma
from openchroma.cli import main

FIXTURE_CONFIG = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "chroma-tiny" / "config.json"
SPEECH_WAV = Path(__file__).resolve().parent / "data" / "speech.wav"
TRANSCRIPT = "Hello there. Could you tell me what the weather will be like tomorrow?"


def _voices(root: Path) -> Path:
    """Two voices: the test speech recording (the server's voice library wants real speech) and a tone."""
    voices = root / "voices"
    voices.mkdir(parents=True)
    shutil.copy(SPEECH_WAV, voices / "anna.wav")
    (voices / "anna.txt").write_text(TRANSCRIPT)
    sf.write(voices / "bob.wav", tone(1.0, 160.0), 24000)
    (voices / "bob.txt").write_text("good morning to you")
    return voices


def _missing_keys(reference: dict, config: dict, path: str = "") -> list[str]:
    out = []
    for k, v in reference.items():
        if k not in config:
            out.append(path + k)
        elif isinstance(v, dict) and isinstance(config[k], dict) and not k.endswith(("id2label", "label2id")):
            out += _missing_keys(v, config[k], f"{path}{k}.")
    return out


@pytest.mark.slow   # synth, prepare, train and serve end to end
def test_synth_prepare_train_lora_load_serve(tmp_path, tiny_random_dir):
    voices = _voices(tmp_path)
    questions = tmp_path / "questions.txt"
    questions.write_text("What time is it?\nHow are you today?\nTell me a joke.\n")
    syn = tmp_path / "synth"
    assert main(["synth", "--questions", str(questions), "--voices", str(voices), "--out", str(syn),
                 "--model", str(tiny_random_dir), "--max-answer-tokens", "4", "--max-seconds", "2"]) == 0
    rows = [json.loads(line) for line in (syn / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all((syn / r["response_audio"]).is_file() and (syn / r["user_audio"]).is_file()
                                  for r in rows)
    assert rows[0]["voice_audio"] == "voices/anna.wav" and rows[1]["voice_audio"] == "voices/bob.wav"
    # Resumable: a second run reuses everything.
    before = {p.name: p.stat().st_mtime_ns for p in (syn / "audio").iterdir()}
    assert main(["synth", "--questions", str(questions), "--voices", str(voices), "--out", str(syn),
                 "--model", str(tiny_random_dir), "--max-answer-tokens", "4", "--max-seconds", "2"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (syn / "audio").iterdir()} == before

    prepared = tmp_path / "prepared"
    assert main(["prepare", "--model", str(tiny_random_dir), "--data", str(syn / "manifest.jsonl"),
                 "--out", str(prepared)]) == 0
    out = tmp_path / "tuned"
    assert main(["train", "--model", str(tiny_random_dir), "--data", str(prepared), "--out", str(out), "--lora",
                 "--steps", "3", "--batch-size", "3", "--no-progress"]) == 0
    assert (out / "tb").is_dir() and len((out / "metrics.jsonl").read_text().splitlines()) == 3

    # A complete checkpoint: every key the published config carries, strict loading, `info`, generation.
    config = json.loads((out / "config.json").read_text())
    if FIXTURE_CONFIG.is_file():
        assert _missing_keys(json.loads(FIXTURE_CONFIG.read_text()), config) == []
    assert "vision_config" in config["thinker_config"]
    # As transformers' Qwen2.5-Omni thinker config reads it (the published code builds its thinker from it):
    # without vision_config it would default to a 3584-wide vision tower and lack the vision token ids.
    from transformers import Qwen2_5OmniThinkerConfig

    thinker = Qwen2_5OmniThinkerConfig(**config["thinker_config"])
    assert thinker.vision_config.out_hidden_size == config["thinker_config"]["text_config"]["hidden_size"]
    assert thinker.vision_start_token_id == 151652 and thinker.vision_token_id == 151654
    assert main(["info", "--model", str(out), "--device", "cpu"]) == 0
    chroma = openchroma.Chroma.from_pretrained(out, device="cpu", progress=False)
    voice = chroma.voice(voices / "anna.wav", TRANSCRIPT)
    reply = chroma.speak("Hi.", voice, max_new_frames=4)
    assert reply.audio.numel() == 4 * 1920

    # Served: /v1/audio/speech answers with the fine-tuned model.
    from server_harness import chroma_server

    with chroma_server(chroma, tmp_path / "serve-data", max_response_seconds=4.0) as (url, _):
        with open(voices / "anna.wav", "rb") as f:
            r = httpx.post(f"{url}/v1/voices", files={"file": ("anna.wav", f, "audio/wav")},
                           data={"name": "anna", "transcript": TRANSCRIPT}, timeout=60)
        assert r.status_code == 201, r.text
        r = httpx.post(f"{url}/v1/audio/speech", json={"model": "chroma-tiny", "voice": "anna", "input": "Hi.",
                                                       "response_format": "wav"}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.content[:4] == b"RIFF" and len(r.content) > 44


class _Endpoints(BaseHTTPRequestHandler):
    """OpenAI-compatible /v1/chat/completions and /v1/audio/speech stand-ins; the first call of each fails."""

    calls: dict[str, int] = {}
    lock = threading.Lock()

    def log_message(self, *args):  # quiet
        pass

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            n = self.calls[self.path] = self.calls.get(self.path, 0) + 1
        if n == 1:
            self.send_response(503)
            self.end_headers()
            return
        if self.path == "/v1/chat/completions":
            q = body["messages"][-1]["content"]
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": f"An answer to: {q}"}}]})
            payload, ctype = data.encode(), "application/json"
        elif self.path == "/v1/audio/speech":
            assert body["voice"] in ("anna", "bob") and body["response_format"] == "wav"
            buf = io.BytesIO()
            sf.write(buf, tone(0.1 * len(body["input"]), 200.0), 24000, format="WAV", subtype="PCM_16")
            payload, ctype = buf.getvalue(), "audio/wav"
        else:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def test_synth_with_openai_compatible_endpoints(tmp_path, capsys):
    voices = _voices(tmp_path)
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"id": "a", "question": "Why is the sky blue?"}) + "\n"
                         + json.dumps({"id": "b", "question": "What is rain?"}) + "\n")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Endpoints)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/v1"
        out = tmp_path / "syn"
        assert main(["synth", "--questions", str(questions), "--voices", str(voices), "--out", str(out),
                     "--llm-base-url", base, "--llm-model", "any", "--tts-base-url", base, "--concurrency", "2",
                     "--text-questions"]) == 0
    finally:
        server.shutdown()
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"]
    assert rows[0]["response_text"] == "An answer to: Why is the sky blue?"
    assert rows[1]["user_text"] == "What is rain?" and "user_audio" not in rows[1]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["failed"] == 0
    # Each service failed its first call (503) and the client retried it: two answers and two speeches after it.
    assert _Endpoints.calls == {"/v1/chat/completions": 3, "/v1/audio/speech": 3}


def test_init_random_writes_the_complete_config(tiny_random_dir):
    """init-random's config carries every key of the published layout (the reference fixture's config)."""
    import pytest

    if not FIXTURE_CONFIG.is_file():
        pytest.skip("reference fixture not found")
    reference = json.loads(FIXTURE_CONFIG.read_text())
    config = json.loads((tiny_random_dir / "config.json").read_text())
    assert _missing_keys(reference, config) == []
    assert config["thinker_config"]["vision_config"] == reference["thinker_config"]["vision_config"]
    for key in ("vision_start_token_id", "vision_end_token_id", "vision_token_id", "image_token_index",
                "video_token_index"):
        assert config["thinker_config"][key] == reference["thinker_config"][key]
