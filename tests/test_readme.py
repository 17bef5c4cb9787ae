"""The README's install, test and realtime instructions work as written."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import httpx
import pytest
from server_harness import ROOT, SPEECH_WAV, chroma_server

README = (ROOT / "README.md").read_text()


def code_block(after: str, lang: str = "bash") -> str:
    """The first ``lang`` code block after the line containing ``after``."""
    start = README.index(after)
    m = re.compile(rf"```{lang}\n(.*?)```", re.S).search(README, start)
    assert m, f"no {lang} block after {after!r}"
    return m.group(1)


def test_ci_runs_the_readmes_test_command_verbatim():
    command = code_block("One command installs everything and runs the tests").strip()
    assert command.startswith("SUDO=$( [ \"$(id -u)\" = 0 ] || echo sudo );") and "python -m pytest" in command
    assert "sudo apt-get" not in command   # root in containers has no sudo
    assert command in (ROOT / ".ci" / "run").read_text()


def test_the_install_and_run_command_starts_the_server_on_the_published_weights():
    command = code_block("command installs OpenChroma and starts the server").strip()
    assert command.endswith("openchroma serve") and 'pip install -e ".[serve]"' in command
    from openchroma.cli import PUBLISHED_MODEL, build_parser

    assert build_parser().parse_args(["serve"]).model == PUBLISHED_MODEL == "FlashLabs/Chroma-4B"


def test_the_readmes_fixture_location_is_where_the_tests_look():
    conftest = (ROOT / "tests" / "conftest.py").read_text()
    assert 'os.environ.get("OPENCHROMA_FIXTURE", ROOT.parent / "shared" / "fixtures" / "chroma-tiny")' in conftest
    assert "`../shared/fixtures/chroma-tiny`" in README and "OPENCHROMA_FIXTURE=/path/to/chroma-tiny" in README


REALTIME = code_block("**Realtime**, with the SDK", "python")


@pytest.fixture(scope="module")
def server(tiny_chroma, tmp_path_factory):
    with chroma_server(tiny_chroma, tmp_path_factory.mktemp("readme-data"), max_response_seconds=2.0) as (url, _):
        with open(SPEECH_WAV, "rb") as f:
            r = httpx.post(f"{url}/v1/voices", files={"file": ("speech.wav", f, "audio/wav")},
                           data={"name": "ana", "transcript": "Hello there."}, timeout=60)
        assert r.status_code == 201, r.text
        yield url


def run_example(code: str, url: str, tmp_path) -> None:
    assert "http://127.0.0.1:8000/v1" in code
    shutil.copy(SPEECH_WAV, tmp_path / "question.wav")   # speech with no trailing silence
    r = subprocess.run([sys.executable, "-c", code.replace("http://127.0.0.1:8000/v1", f"{url}/v1")], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    import soundfile as sf

    assert sf.info(tmp_path / "answer.wav").duration > 0.5   # the answer's audio came back


def test_the_readmes_realtime_example_runs_as_written(server, tmp_path):
    """Push-to-talk (commit + response.create): the turn ends even though the file has no trailing silence."""
    run_example(REALTIME, server, tmp_path)


def test_the_readmes_server_vad_variant_ends_the_turn_after_the_silence(server, tmp_path):
    """As the README says: without turn_detection None, commit and response.create, appending 1 s of silence after
    the speech lets server VAD end the turn."""
    silence = re.search(r"`(conn\.input_audio_buffer\.append\(audio=base64\.b64encode\(bytes\(48000\)\)"
                        r"\.decode\(\)\))`", README).group(1)
    code = REALTIME.replace('"input": {"turn_detection": None}, ', "")
    code = re.sub(r"    conn\.input_audio_buffer\.commit\(\).*\n    conn\.response\.create\(\).*\n",
                  f"    {silence}\n", code)
    assert "commit" not in code and "response.create" not in code and "turn_detection" not in code
    run_example(code, server, tmp_path)
