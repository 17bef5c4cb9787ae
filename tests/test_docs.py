"""The commands and code in docs/ work as written: every `openchroma` command parses, the cheap ones run on a
random-weight checkpoint or the fixture, the client code runs against a real server, and every link resolves."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import httpx
import pytest
import soundfile as sf
from doc_helpers import (
    DOCS,
    ROOT,
    block_after,
    blocks,
    missing_links,
    openchroma_commands,
    parse_cli,
    shell_commands,
)
from server_harness import SPEECH_WAV, chroma_server

PAGES = {page.name: page.read_text() for page in DOCS}
SERVING = PAGES["serving.md"]


def test_every_concern_has_its_page():
    for name in ("serving", "engine", "evaluation", "fine-tuning", "benchmarks", "scale-out", "architecture",
                 "commands", "testing", "status"):
        assert f"{name}.md" in PAGES, name
    assert "--replicas" in PAGES["scale-out.md"]   # built now: the page tells how to run it


@pytest.mark.parametrize("page", sorted(PAGES))
def test_links_resolve(page):
    assert missing_links(ROOT / "docs" / page) == []


@pytest.mark.parametrize("page", sorted(PAGES))
def test_every_openchroma_command_parses(page):
    for argv in openchroma_commands(PAGES[page]):
        parse_cli(argv)


@pytest.mark.parametrize("page", sorted(PAGES))
def test_python_code_compiles(page):
    for code in blocks(PAGES[page], "python"):
        compile(code.replace("await ", "").replace("async for", "for"), page, "exec")


def test_the_commands_pages_random_checkpoint_commands_run(tmp_path, monkeypatch):
    """init-random then speak, as written, at the tiny preset and with a real voice recording for ref.wav."""
    from openchroma.cli import main

    shutil.copy(SPEECH_WAV, tmp_path / "ref.wav")
    init, speak = shell_commands(block_after(PAGES["commands.md"], "## Without the real weights"))
    swap = lambda argv: [a.replace("/tmp/chroma-small", str(tmp_path / "chroma-small")) for a in argv]  # noqa: E731
    monkeypatch.chdir(tmp_path)
    assert main(["tiny" if a == "small" else a for a in swap(init[1:])]) == 0
    assert main(swap(speak[1:])) == 0
    assert sf.info(tmp_path / "noise.wav").duration > 0.5


def test_the_conformance_command_passes_on_the_fixture(fixture_dir):
    from openchroma.cli import main

    (argv,) = [c for c in openchroma_commands(PAGES["commands.md"]) if c[0] == "conformance"]
    assert main([a.replace("../shared/fixtures/chroma-tiny", str(fixture_dir)) for a in argv]) == 0


def test_the_load_failure_line_shown_is_the_servers(monkeypatch):
    from huggingface_hub import constants
    from huggingface_hub.utils import LocalEntryNotFoundError

    from openchroma.serving.state import load_failure_line

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    shown = block_after(SERVING, "naming the cause and the fix, e.g.", "").strip()
    line = load_failure_line("some/missing-id", LocalEntryNotFoundError("not cached"))
    assert shown == f"openchroma serve: error: {line}"


@pytest.fixture(scope="module")
def server(tiny_chroma, tmp_path_factory):
    with chroma_server(tiny_chroma, tmp_path_factory.mktemp("docs-data"), max_response_seconds=2.0) as (url, _):
        yield url


def _in_folder(tmp_path):
    shutil.copy(SPEECH_WAV, tmp_path / "question.wav")   # speech with no trailing silence
    shutil.copy(SPEECH_WAV, tmp_path / "ana.wav")


def test_the_curl_voice_upload_runs(server, tmp_path):
    _in_folder(tmp_path)
    (curl,) = shell_commands(block_after(SERVING, "## Voices"))
    curl = [f"{server}/v1/voices" if a.startswith("http://127.0.0.1:8000") else a for a in curl]
    r = subprocess.run([*curl, "-s", "-w", "\n%{http_code}"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.stdout.rstrip().endswith("201"), r.stdout
    assert "ana" in [v["name"] for v in httpx.get(f"{server}/v1/voices").json()["data"]]


def run_example(code: str, url: str, tmp_path) -> None:
    assert "http://127.0.0.1:8000/v1" in code
    _in_folder(tmp_path)
    r = subprocess.run([sys.executable, "-c", code.replace("http://127.0.0.1:8000/v1", f"{url}/v1")], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture
def voiced(server, tmp_path_factory):
    """The voice `ana` the examples answer in, in the server's library."""
    if "ana" not in [v["name"] for v in httpx.get(f"{server}/v1/voices").json()["data"]]:
        with open(SPEECH_WAV, "rb") as f:
            r = httpx.post(f"{server}/v1/voices", files={"file": ("speech.wav", f, "audio/wav")},
                           data={"name": "ana", "transcript": "Hello there."}, timeout=60)
        assert r.status_code == 201, r.text
    return server


def test_the_sdk_example_runs_as_written(voiced, tmp_path):
    run_example(block_after(SERVING, "## From the `openai` SDK", "python"), voiced, tmp_path)
    for name in ("hello.wav", "hi.ogg"):
        assert sf.info(tmp_path / name).duration > 0.1, name


REALTIME = block_after(SERVING, "**Realtime**, with the SDK", "python")


def test_the_realtime_example_runs_as_written(voiced, tmp_path):
    """Push-to-talk (commit + response.create): the turn ends even though the file has no trailing silence."""
    run_example(REALTIME, voiced, tmp_path)
    assert sf.info(tmp_path / "answer.wav").duration > 0.5   # the answer's audio came back


def test_the_server_vad_variant_ends_the_turn_after_the_silence(voiced, tmp_path):
    """As the page says: without turn_detection None, commit and response.create, appending 1 s of silence after
    the speech lets server VAD end the turn."""
    silence = re.search(r"`(conn\.input_audio_buffer\.append\(audio=base64\.b64encode\(bytes\(48000\)\)"
                        r"\.decode\(\)\))`", SERVING).group(1)
    code = REALTIME.replace('"input": {"turn_detection": None}, ', "")
    code = re.sub(r"    conn\.input_audio_buffer\.commit\(\).*\n    conn\.response\.create\(\).*\n",
                  f"    {silence}\n", code)
    assert "commit" not in code and "response.create" not in code and "turn_detection" not in code
    run_example(code, voiced, tmp_path)
    assert sf.info(tmp_path / "answer.wav").duration > 0.5


def test_the_engine_pages_python_example_runs(tmp_path, tiny_random_dir, monkeypatch):
    """The simple API on the tiny random checkpoint in place of the hub model, answers cut to 2 s."""
    shutil.copy(SPEECH_WAV, tmp_path / "ref.wav")
    shutil.copy(SPEECH_WAV, tmp_path / "question.wav")
    code = blocks(PAGES["engine.md"], "python")[0].replace('"FlashLabs/Chroma-4B"', repr(str(tiny_random_dir)))
    code = code.replace('reply = chroma.chat(voice, audio="question.wav")',
                        'reply = chroma.chat(voice, audio="question.wav", max_new_frames=25)')
    code = code.replace("seed=1))", "seed=1), max_new_frames=25)")
    assert code.count("max_new_frames=25") == 2
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "engine.md", "exec"), scope)
    assert scope["reply"].sample_rate == scope["tts"].sample_rate == 24000
