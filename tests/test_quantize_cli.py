"""Issue 22 through the command line: every command that loads a model takes ``--quantize``; ``info --json``
reports the weights per part; ``quantize`` writes a checkpoint that ``fidelity`` measures exactly as it measures
quantizing at load; ``serve --quantize int8`` answers a realtime turn through the official SDK."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from hardening_helpers import add_voice
from server_harness import ROOT, server_process

from openchroma.cli import build_parser

ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
LOADING_COMMANDS = ["serve", "speak", "chat", "bench", "info", "conformance", "eval", "fidelity"]


def openchroma(*argv: str) -> str:
    out = subprocess.run([sys.executable, "-m", "openchroma", *argv], env=ENV, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.parametrize("command", LOADING_COMMANDS)
def test_every_command_that_loads_a_model_takes_quantize(command):
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    quantize = next(a for a in sub._actions if "--quantize" in a.option_strings)
    assert tuple(quantize.choices) == ("int8", "int4", "fp8")


@pytest.mark.slow   # over 3 s: left out of the fast subset
def test_info_json_reports_fewer_weight_bytes_per_part_for_int4(fixture_dir):
    full = json.loads(openchroma("info", "--model", str(fixture_dir), "--json"))
    int4 = json.loads(openchroma("info", "--model", str(fixture_dir), "--json", "--quantize", "int4"))
    assert full["quantize"] is None and int4["quantize"] == "int4"
    assert int4["parameters"] == full["parameters"]   # the same model, in fewer bytes
    assert int4["weight_bytes"] < full["weight_bytes"] / 2
    for part in ("reasoner", "backbone", "decoder"):
        assert int4["parts"][part]["weight_bytes"] < full["parts"][part]["weight_bytes"]
    assert int4["parts"]["codec"] == full["parts"]["codec"]   # the Codec stays in the load dtype
    assert int4["peak_rss_bytes"] > 0


@pytest.mark.slow   # over 3 s: left out of the fast subset
def test_a_prequantized_checkpoint_measures_as_quantizing_at_load(fixture_dir, tmp_path):
    case = str(next(Path(fixture_dir).glob("case_*.safetensors")))
    openchroma("quantize", "--model", str(fixture_dir), "--quantize", "int8", "--out", str(tmp_path / "q8"))
    at_load = json.loads(openchroma("fidelity", "--model", str(fixture_dir), "--quantize", "int8", "--case", case,
                                    "--no-yardstick", "--json"))
    saved = json.loads(openchroma("fidelity", "--model", str(tmp_path / "q8"), "--reference", str(fixture_dir),
                                  "--case", case, "--no-yardstick", "--json"))
    keys = ("text_top1", "c0_top1", "c1_7_top1", "text_kl", "c0_kl", "c1_7_kl", "logit_rel_err")
    for a, b in zip(at_load, saved, strict=True):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
        assert 0.0 <= a["c0_top1"] <= 1.0 and a["logit_rel_err"] >= 0


@pytest.mark.slow   # over 3 s: left out of the fast subset
def test_serve_quantize_int8_answers_a_realtime_turn_through_the_sdk(tiny_random_dir, tmp_path):
    from openai import AsyncOpenAI

    with server_process(tiny_random_dir, tmp_path, "--quantize", "int8", "--max-response-seconds", "1") as (url, _):
        health = httpx.get(url + "/health", timeout=10).json()
        assert health["quantize"] == "int8" and health["mode"] == "eager", health
        add_voice(url)

        async def turn() -> list[str]:
            client = AsyncOpenAI(base_url=url + "/v1", api_key="unused")
            kinds = []
            async with client.realtime.connect(model="chroma-tiny") as conn:
                await conn.session.update(session={"type": "realtime", "audio": {
                    "input": {"turn_detection": None}, "output": {"voice": "lib"}}})
                await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
                    {"type": "input_text", "text": "Hello!"}]})
                await conn.response.create()
                async for event in conn:
                    kinds.append(event.type)
                    if event.type == "response.done":
                        assert event.response.status in ("completed", "incomplete"), event.response
                        break
            return kinds

        kinds = asyncio.run(asyncio.wait_for(turn(), 120))
        assert "response.output_audio.delta" in kinds and kinds[-1] == "response.done"
