"""The `openchroma` command on a random-weight checkpoint: speak, chat, info, init-random, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from openchroma.cli import main


@pytest.fixture(scope="module")
def wavs(tmp_path_factory):
    d = tmp_path_factory.mktemp("wavs")
    rng = np.random.default_rng(0)
    sf.write(d / "ref.wav", (rng.standard_normal(48000) * 0.1).astype("float32"), 48000)
    sf.write(d / "q.flac", (rng.standard_normal(24000) * 0.1).astype("float32"), 16000)
    return d


def test_speak_writes_a_wav_with_the_forced_text(tiny_random_dir, wavs, tmp_path, capsys):
    out = tmp_path / "hello.wav"
    status = main(["speak", "--model", str(tiny_random_dir), "--device", "cpu", "--voice-audio", str(wavs / "ref.wav"),
                   "--voice-text", "hello there", "--text", "Hello world", "--out", str(out), "--max-frames", "12"])
    assert status == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["text"] == "Hello world"
    audio, rate = sf.read(out)
    assert rate == 24000 and len(audio) == round(report["seconds"] * 24000) > 0


def test_chat_answers_audio(tiny_random_dir, wavs, tmp_path, capsys):
    out = tmp_path / "answer.wav"
    status = main(["chat", "--model", str(tiny_random_dir), "--device", "cpu", "--voice-audio", str(wavs / "ref.wav"),
                   "--voice-text", "hi", "--audio", str(wavs / "q.flac"), "--out", str(out), "--max-frames", "8"])
    assert status == 0
    assert sf.info(out).frames == 8 * 1920


def test_missing_audio_file_is_a_clear_error(tiny_random_dir, tmp_path, capsys):
    status = main(["chat", "--model", str(tiny_random_dir), "--voice-audio", str(tmp_path / "nope.wav"),
                   "--voice-text", "hi", "--text", "hi"])
    assert status == 1
    assert "nope.wav: no such audio file" in capsys.readouterr().err


def test_info_prints_parameters(tiny_random_dir, capsys):
    assert main(["info", "--model", str(tiny_random_dir), "--device", "cpu", "--dtype", "bfloat16"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] > 0 and info["dtype"] == "bfloat16"


def test_random_small_checkpoint_passes_its_own_loader(tmp_path):
    from openchroma.loading import load
    from openchroma.tokenizer import ChatTokenizer

    d = tmp_path / "small"
    assert main(["init-random", "--preset", "small", "--out", str(d)]) == 0
    lm = load(d, device="cpu", progress=False)
    assert lm.config.thinker.hidden_size == 256
    tok = ChatTokenizer.from_dir(d)
    assert tok.token_to_id("<|im_end|>") == 151645


def test_help_runs_as_a_console_command():
    out = subprocess.run([sys.executable, "-m", "openchroma.cli", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("chat", "speak", "conformance", "init-random", "info"):
        assert cmd in out.stdout
