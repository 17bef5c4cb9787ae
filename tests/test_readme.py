"""The README's install, test and first-sound instructions work as written, and it stays a page."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest
import soundfile as sf
from doc_helpers import (
    block_after,
    blocks,
    missing_links,
    openchroma_commands,
    parse_cli,
    run_openchroma,
    shell_commands,
)
from server_harness import ROOT, SPEECH_WAV, free_port

README = (ROOT / "README.md").read_text()
DEMO = "**Demo without the real weights**"


def test_the_readme_is_a_page_and_its_links_resolve():
    assert len(README.splitlines()) <= 150
    assert max(len(line) for line in README.splitlines()) <= 130
    assert missing_links(ROOT / "README.md") == []
    for page in ("serving", "engine", "evaluation", "fine-tuning", "benchmarks", "low-memory", "scale-out",
                 "architecture", "testing"):
        assert f"(docs/{page}.md)" in README, page


def test_ci_runs_the_readmes_test_command_verbatim():
    command = block_after(README, "One command installs everything and runs the tests").strip()
    assert command.startswith("SUDO=$( [ \"$(id -u)\" = 0 ] || echo sudo );") and "python -m pytest" in command
    assert "sudo apt-get" not in command   # root in containers has no sudo
    assert command in (ROOT / ".ci" / "run").read_text()


def test_the_readme_names_the_fast_subset_and_the_markers_exist():
    assert block_after(README, "**While you work**").strip() == 'python -m pytest -m "not slow"'
    import tomllib

    markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    assert {m.split(":")[0] for m in markers} == {"slow", "browser", "clients", "gpu"}


def test_the_install_and_run_command_starts_the_server_on_the_published_weights():
    command = block_after(README, "command installs OpenChroma and starts the server").strip()
    assert command.endswith("openchroma serve") and 'pip install -e ".[serve]"' in command
    from openchroma.cli import PUBLISHED_MODEL, build_parser

    assert build_parser().parse_args(["serve"]).model == PUBLISHED_MODEL == "FlashLabs/Chroma-4B"


def test_the_readmes_fixture_location_is_where_the_tests_look():
    conftest = (ROOT / "tests" / "conftest.py").read_text()
    assert 'os.environ.get("OPENCHROMA_FIXTURE", ROOT.parent / "shared" / "fixtures" / "chroma-tiny")' in conftest
    assert "`../shared/fixtures/chroma-tiny`" in README and "OPENCHROMA_FIXTURE=/path/to/chroma-tiny" in README


def test_every_openchroma_command_in_the_readme_parses():
    commands = openchroma_commands(README)
    assert len(commands) >= 5
    for argv in commands:
        parse_cli(argv)


@pytest.fixture
def checkout_like(tmp_path):
    """A folder laid out as the README's commands expect: tests/data/speech.wav under the working directory."""
    (tmp_path / "tests" / "data").mkdir(parents=True)
    shutil.copy(SPEECH_WAV, tmp_path / "tests" / "data" / "speech.wav")
    return tmp_path


@pytest.mark.slow   # two fresh interpreters and a server
def test_the_demo_serves_random_weights_and_takes_the_readmes_voice(checkout_like):
    """The demo as written (at the tiny preset, on a free port): init-random, serve, then the curl voice upload."""
    init, serve = shell_commands(block_after(README, DEMO))
    assert init[:4] == ["openchroma", "init-random", "--preset", "small"]
    run_openchroma([*init[1:3], "tiny", *init[4:]], cwd=checkout_like)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "openchroma", *serve[1:], "--port", str(port),
                             "--data-dir", str(checkout_like / "data")],   # not the user's voice library
                            cwd=checkout_like, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "no start"
            try:
                if httpx.get(f"{url}/health").json().get("status") == "ok":
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert httpx.get(f"{url}/health").json()["random_weights"] is True
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["random_weights"] is True
        (curl,) = shell_commands(block_after(README, "Then add a voice"))
        curl = [url + "/v1/voices" if a.startswith("http://127.0.0.1:8000") else a for a in curl]
        r = subprocess.run([*curl, "-s", "-o", "-", "-w", "\n%{http_code}"], cwd=checkout_like, capture_output=True,
                           text=True, timeout=120)
        assert r.stdout.rstrip().endswith("201"), r.stdout
        assert [v["name"] for v in httpx.get(f"{url}/v1/voices").json()["data"]] == ["ana"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_readmes_speak_command_writes_a_file(checkout_like, tiny_random_dir, monkeypatch):
    """"Or write a file straight away", on the tiny random checkpoint in place of ./chroma-random (in this
    process: the console script's ``main``)."""
    from openchroma.cli import main

    os.symlink(tiny_random_dir, checkout_like / "chroma-random")
    (speak,) = shell_commands(block_after(README, "Or write a file straight away"))
    monkeypatch.chdir(checkout_like)
    assert main(speak[1:]) == 0
    assert sf.info(checkout_like / "hello.wav").duration > 0.5


def test_the_readmes_python_runs_in_a_folder_of_its_own(tmp_path, tiny_random_dir, monkeypatch):
    app = tmp_path / "my-app"
    app.mkdir()
    os.symlink(tiny_random_dir, app / "chroma-random")
    shutil.copy(SPEECH_WAV, app / "speech.wav")
    monkeypatch.chdir(app)
    scope: dict = {}
    exec(compile(blocks(README, "python")[0], "talk.py", "exec"), scope)
    assert scope["reply"].sample_rate == 24000 and scope["reply"].audio.numel() > 0


def test_a_script_beside_a_checkout_folder_imports_the_folder_as_the_readme_warns(tmp_path):
    """The failure the README describes, and the layout it gives that avoids it."""
    work = tmp_path / "work"
    (work / "my-app").mkdir(parents=True)
    os.symlink(ROOT, work / "openchroma")
    for script in (work / "talk.py", work / "my-app" / "talk.py"):
        script.write_text("from openchroma import Chroma\nprint(Chroma.__name__)\n")
    # As a user runs it: the package installed (`pip install -e`), found after the script's folder.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    own = subprocess.run([sys.executable, "talk.py"], cwd=work / "my-app", capture_output=True, text=True, env=env)
    if "No module named 'openchroma'" in own.stderr:
        pytest.skip("openchroma is not installed in this environment (pip install -e .)")
    assert own.returncode == 0 and own.stdout.strip() == "Chroma", own.stderr
    beside = subprocess.run([sys.executable, "talk.py"], cwd=work, capture_output=True, text=True, env=env)
    assert beside.returncode == 1
    assert "cannot import name 'Chroma' from 'openchroma' (unknown location)" in beside.stderr
    assert "cannot import name 'Chroma'" in README and "my-app/" in README
