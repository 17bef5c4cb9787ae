"""A server whose model cannot be loaded says why in one line, exits non-zero, and lists no model meanwhile."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import httpx
from server_harness import running_server

from openchroma.serving.app import ServerConfig, create_app

DEMO = "openchroma init-random --preset small --out ./chroma-random && openchroma serve --model ./chroma-random"


def _serve(model: str, tmp_path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "openchroma.cli", "serve", "--model", model, "--port", "0",
                           "--data-dir", str(tmp_path / "data")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env}, cwd=tmp_path)


def _the_error_line(r: subprocess.CompletedProcess) -> str:
    """The one line that says what went wrong: the last one, and no other line (no traceback, no hub paragraph)."""
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    lines = r.stderr.strip().splitlines()
    errors = [line for line in lines if "error" in line.lower() or "Traceback" in line]
    assert errors == [lines[-1]], r.stderr[-3000:]
    assert lines[-1].startswith("openchroma serve: error: cannot load the model "), lines[-1]
    return lines[-1]


def test_an_unreachable_hub_model_exits_with_one_line_naming_cause_and_fix(tmp_path):
    line = _the_error_line(_serve("some/missing-id", tmp_path, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf")))
    assert "some/missing-id" in line and "not in the local Hugging Face cache" in line and "HF_HUB_OFFLINE" in line
    assert "--model DIR" in line and DEMO in line
    assert len(line) < 400, line


def test_a_checkpoint_missing_a_tensor_exits_with_one_line(tiny_random_dir, tmp_path):
    """The start-up check (config, a readable safetensors header) passes; the load itself fails."""
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_random_dir, ckpt)
    tensors = load_file(ckpt / "model.safetensors")
    dropped = sorted(k for k in tensors if k.startswith("backbone."))[0]
    del tensors[dropped]
    save_file(tensors, ckpt / "model.safetensors")
    line = _the_error_line(_serve(str(ckpt), tmp_path))
    assert str(ckpt) in line and "check or re-download that checkpoint" in line and DEMO in line


def test_models_are_listed_only_once_loaded(tmp_path):
    """While a model loads, and after its load failed, /v1/models answers 503 with the reason, not a model card."""
    missing = tmp_path / "no-such-checkpoint"
    app = create_app(ServerConfig(model=str(missing), data_dir=tmp_path))
    with running_server(app) as url:
        deadline = time.time() + 30
        while app.state.oc.load_error is None and time.time() < deadline:
            r = httpx.get(f"{url}/v1/models")
            assert r.status_code == 503 and r.json()["error"]["code"] in ("model_loading", "model_load_failed"), r.text
            time.sleep(0.05)
        assert app.state.oc.load_error is not None, "the load neither failed nor finished"
        for path in ("/v1/models", "/v1/models/chroma-4b"):
            r = httpx.get(f"{url}{path}")
            assert r.status_code == 503 and r.json()["error"]["code"] == "model_load_failed", r.text
            assert f"cannot load the model {missing}" in r.json()["error"]["message"]
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json()["error"] == app.state.oc.load_error
