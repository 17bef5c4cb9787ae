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


@pytest.mark.slow   # writes and loads a 230 MB checkpoint
def test_random_small_checkpoint_passes_its_own_loader(tmp_path):
    from openchroma.loading import load
    from openchroma.tokenizer import ChatTokenizer

    d = tmp_path / "small"
    assert main(["init-random", "--preset", "small", "--out", str(d)]) == 0
    lm = load(d, device="cpu", progress=False)
    assert lm.config.reasoner.hidden_size == 256
    tok = ChatTokenizer.from_dir(d)
    assert tok.token_to_id("<|im_end|>") == 151645


def test_help_runs_as_a_console_command():
    out = subprocess.run([sys.executable, "-m", "openchroma.cli", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("chat", "speak", "conformance", "init-random", "info"):
        assert cmd in out.stdout


# ----- fail fast: every check that needs no model runs before it loads ---------------------------------------


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading the model fails the test: the checks under test must come first."""
    from openchroma.pipeline import Chroma

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(Chroma, "from_pretrained", refuse)


@pytest.mark.parametrize("out, message", [
    ("missing-folder/reply.wav", "missing-folder does not exist"),
    ("reply.txt", "cannot write .txt files; use one of .wav, .flac, .ogg, .mp3"),
    (".", "is a folder"),
])
def test_bad_out_fails_before_the_model_loads(tiny_random_dir, wavs, tmp_path, capsys, no_model_load, out, message):
    for cmd in (["speak", "--text", "hi"], ["chat", "--audio", str(wavs / "q.flac")]):
        status = main([*cmd, "--model", str(tiny_random_dir), "--voice-audio", str(wavs / "ref.wav"),
                       "--voice-text", "hi", "--out", str(tmp_path / out)])
        err = capsys.readouterr().err
        assert status == 1 and message in err and "Traceback" not in err, err


@pytest.mark.parametrize("flag", ["--voice-audio", "--audio"])
def test_bad_audio_fails_before_the_model_loads(tiny_random_dir, wavs, tmp_path, capsys, no_model_load, flag):
    bad = tmp_path / "notes.wav"
    bad.write_text("not audio")
    args = {"--voice-audio": str(wavs / "ref.wav"), "--audio": str(wavs / "q.flac"), flag: str(bad)}
    status = main(["chat", "--model", str(tiny_random_dir), "--voice-text", "hi", "--out", str(tmp_path / "a.wav"),
                   *[x for kv in args.items() for x in kv]])
    err = capsys.readouterr().err
    assert status == 1 and f"{flag} {bad}: cannot decode audio" in err, err
    missing = str(tmp_path / "nope.wav")
    status = main(["chat", "--model", str(tiny_random_dir), "--voice-text", "hi", "--out", str(tmp_path / "a.wav"),
                   *[x for kv in {**args, flag: missing}.items() for x in kv]])
    assert status == 1 and f"{flag} {missing}: no such audio file" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".flac", ".ogg", ".mp3"])
def test_speak_writes_the_format_its_extension_names(tiny_random_dir, wavs, tmp_path, suffix):
    out = tmp_path / f"hello{suffix}"
    assert main(["speak", "--model", str(tiny_random_dir), "--voice-audio", str(wavs / "ref.wav"),
                 "--voice-text", "hi", "--text", "Hello", "--out", str(out), "--max-frames", "10"]) == 0
    info = sf.info(out)
    assert info.samplerate == 24000 and abs(info.duration - 0.8) < 0.1, info


def test_random_checkpoints_answer_a_few_seconds_by_default(tiny_random_dir, wavs, tmp_path, capsys):
    from openchroma.config import RANDOM_DEMO_SECONDS, RANDOM_WEIGHTS_KEY, is_random_checkpoint

    assert json.loads((tiny_random_dir / "config.json").read_text())[RANDOM_WEIGHTS_KEY] is True
    assert is_random_checkpoint(tiny_random_dir) and not is_random_checkpoint("FlashLabs/Chroma-4B")
    out = tmp_path / "noise.wav"
    assert main(["chat", "--model", str(tiny_random_dir), "--voice-audio", str(wavs / "ref.wav"), "--voice-text", "hi",
                 "--text", "Tell me a long story.", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "random weights" in captured.err
    assert 0 < sf.info(out).duration <= RANDOM_DEMO_SECONDS


def test_the_fixture_is_not_taken_for_random_weights(fixture_dir):
    from openchroma.config import is_random_checkpoint

    assert not is_random_checkpoint(fixture_dir)


def _serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "openchroma.cli", "serve", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("model, message", [
    ("./no-such-checkpoint", "no such checkpoint directory"),
    ("{tmp}/ckpt.wav", "not a directory"),
    ("{tmp}", "config.json: no such config file"),
])
def test_serve_exits_at_once_on_a_missing_local_model(tmp_path, model, message):
    (tmp_path / "ckpt.wav").write_bytes(b"")
    r = _serve("--model", model.format(tmp=tmp_path), "--port", "0", "--data-dir", str(tmp_path / "data"))
    assert r.returncode == 1, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("openchroma serve: error:") and message in lines[0], r.stderr


def test_serve_exits_at_once_when_the_port_is_taken(tiny_random_dir, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = _serve("--model", str(tiny_random_dir), "--port", str(port), "--data-dir", str(tmp_path))
    assert r.returncode == 1, r
    assert r.stderr.strip() == (f"openchroma serve: error: cannot listen on 127.0.0.1:{port}: Address already in use "
                                "(is another server running there? pick another --port)")


# ----- issue 21: every path caps a random checkpoint, checks come first, --version ---------------------------


def test_the_python_api_caps_random_checkpoints_at_4_s(tiny_chroma, wavs):
    """Chroma.from_pretrained on an init-random checkpoint answers 4 s by default, max_frames overrides it."""
    from openchroma.config import RANDOM_DEMO_FRAMES
    from openchroma.pipeline import Chroma

    assert tiny_chroma.max_frames == RANDOM_DEMO_FRAMES == 50
    voice = tiny_chroma.voice(str(wavs / "ref.wav"), "hi")
    reply = tiny_chroma.chat(voice, text="Tell me a long story.")
    assert reply.result.stop_reason == "length" and len(reply.result.codes) == 50
    assert Chroma(tiny_chroma.lm, tiny_chroma.tokenizer, max_frames=7).speak("Hello there.", voice).audio.numel() \
        == 7 * 1920


def test_the_engine_caps_random_checkpoints_at_4_s(tiny_random_dir):
    from openchroma.engine import Engine

    engine = Engine.from_pretrained(str(tiny_random_dir), device="cpu", progress=False, max_sessions=1)
    try:
        assert engine.max_response_frames == 50
    finally:
        engine.close()
    engine = Engine.from_pretrained(str(tiny_random_dir), device="cpu", progress=False, max_sessions=1,
                                    max_response_frames=80)
    try:
        assert engine.max_response_frames == 80
    finally:
        engine.close()


def test_eval_caps_random_checkpoints_at_4_s(tiny_random_dir):
    from openchroma.eval.run import EvalSettings, max_frames_for

    assert max_frames_for(EvalSettings(model=str(tiny_random_dir))) == 50
    assert max_frames_for(EvalSettings(model=str(tiny_random_dir), max_frames=300)) == 300


def test_a_real_checkpoint_keeps_60_s(fixture_dir):
    from openchroma.config import response_frame_limit

    assert response_frame_limit(fixture_dir, None, 750) == 750


@pytest.mark.parametrize("cmd, message", [
    (["speak", "--text", "  "], "--text is empty"),
    (["speak", "--text", "hi", "--voice-text", " "], "--voice-text is empty"),
    (["chat", "--text", ""], "give --audio and/or --text"),
    (["speak", "--text", "hi", "--max-frames", "0"], "--max-frames must be at least 1"),
])
def test_empty_texts_fail_before_the_model_loads(tiny_random_dir, wavs, tmp_path, capsys, no_model_load, cmd, message):
    args = ["--model", str(tiny_random_dir), "--voice-audio", str(wavs / "ref.wav"), "--out", str(tmp_path / "a.wav")]
    if "--voice-text" not in cmd:
        args += ["--voice-text", "hi"]
    status = main([*cmd, *args])
    err = capsys.readouterr().err
    assert status in (1, 2) and message in err and "Traceback" not in err, err


def test_random_checkpoints_say_why_the_text_is_empty(tiny_random_dir, wavs, tmp_path, capsys):
    assert main(["chat", "--model", str(tiny_random_dir), "--voice-audio", str(wavs / "ref.wav"), "--voice-text", "hi",
                 "--text", "Hello?", "--out", str(tmp_path / "a.wav"), "--max-frames", "4"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["text"].strip() == "" and "random weights" in report["note"]


def test_version():
    import openchroma

    out = subprocess.run([sys.executable, "-m", "openchroma.cli", "--version"], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == f"openchroma {openchroma.__version__}"


def test_serve_has_a_flag_for_every_server_config_field():
    """serve's flags come from ServerConfig: each field is a flag whose default is the field's."""
    import dataclasses

    from openchroma.cli import build_parser
    from openchroma.serving.cli import config_from_args
    from openchroma.serving.config import ServerConfig

    parser = build_parser("serve")
    serve = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("serve"))
    flags = set(serve._option_string_actions)
    for f in dataclasses.fields(ServerConfig):
        assert "--" + f.metadata.get("name", f.name.replace("_", "-")) in flags, f.name
    args = parser.parse_args(["serve", "--max-sessions", "3", "--max-upload-mb", "2", "--allow-origin", "https://a",
                              "--allow-origin", "https://b", "--no-compile"])
    config = config_from_args(args, model="m")
    assert config.max_sessions == 3 and config.max_upload_bytes == 2 * 2**20
    assert config.allow_origins == ("https://a", "https://b") and config.compile is False
    assert config.idle_timeout == ServerConfig.idle_timeout and config.max_context == ServerConfig.max_context
    assert "(close code 4000; 0 = never) (default: 300)" in " ".join(serve.format_help().split())


def test_a_new_server_config_field_becomes_a_flag():
    import argparse
    import dataclasses

    from openchroma.serving.cli import add_config_arguments, config_from_args
    from openchroma.serving.config import ServerConfig, flag

    @dataclasses.dataclass
    class Extended(ServerConfig):
        shutdown_grace: float = dataclasses.field(default=5.0, metadata=flag("seconds to finish answers"))
        max_conversation_items: int = 100

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Extended)
    args = parser.parse_args(["--shutdown-grace", "2.5"])
    config = config_from_args(args, Extended)
    assert config.shutdown_grace == 2.5 and config.max_conversation_items == 100
    assert "seconds to finish answers (default: 5)" in " ".join(parser.format_help().split())


def test_help_lists_every_command_without_importing_them():
    code = ("import sys; from openchroma.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith(('torch', 'openchroma.tools', 'fastapi'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    from openchroma.cli import COMMANDS

    for name, _, _ in COMMANDS:
        assert name in out
    assert out.strip().splitlines()[-1] == "[]"


def test_undecodable_bytes_are_named_without_a_python_object_repr():
    """A bad upload's message (the voice library's 400) said '<_io.BytesIO object at 0x...>'."""
    from openchroma.audio import AudioError, load_audio

    with pytest.raises(AudioError) as e:
        load_audio(b"RIFF not really a wav file at all" * 10, 24000)
    assert "BytesIO" not in str(e.value) and "0x" not in str(e.value)
    assert "cannot decode audio" in str(e.value) and "Format not recognised" in str(e.value)
