"""`openchroma fidelity`: exact agreement for float32 against itself, and a clear alarm for broken quantization."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from openchroma.tools import fidelity
from openchroma.tools.quantize import quantize_checkpoint


def _fidelity(capsys, *argv: str) -> list[dict]:
    parser = argparse.ArgumentParser()
    fidelity.add_arguments(parser)
    assert fidelity.run(parser.parse_args([*argv, "--json"])) == 0
    return json.loads(capsys.readouterr().out)


def test_float32_against_itself_agrees_exactly(fixture_dir, capsys):
    cases = [str(fixture_dir / "case_speech_turn.safetensors"), str(fixture_dir / "case_forced_text.safetensors")]
    rows = _fidelity(capsys, "--model", str(fixture_dir), "--device", "cpu", "--no-yardstick", "--case", *cases)
    assert [r["case"] for r in rows] == cases
    for r in rows:
        assert set(fidelity.KEYS) <= set(r)
        assert r["text_top1"] == r["c0_top1"] == r["c1_7_top1"] == 1.0
        assert r["text_kl"] == r["c0_kl"] == r["c1_7_kl"] == r["logit_rel_err"] == 0.0


@pytest.mark.slow   # two quantized checkpoints, each run teacher-forced beside float32
def test_damaged_scales_are_caught(fixture_dir, tmp_path, capsys):
    """A pre-quantized checkpoint whose scales are off by random factors scores far below a sound one."""
    sound = quantize_checkpoint(fixture_dir, "int8", tmp_path / "sound", progress=False)
    damaged = tmp_path / "damaged"
    shutil.copytree(sound, damaged)
    tensors = load_file(damaged / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    for k, t in tensors.items():
        if k.endswith(".scales"):
            tensors[k] = t * torch.empty(t.shape).uniform_(-1.5, 1.5, generator=gen).exp()
    save_file(tensors, damaged / "model.safetensors")
    case = str(fixture_dir / "case_text_turn.safetensors")
    common = ["--reference", str(fixture_dir), "--device", "cpu", "--no-yardstick", "--case", case]
    good = _fidelity(capsys, "--model", str(sound), *common)[0]
    bad = _fidelity(capsys, "--model", str(damaged), *common)[0]
    assert good["quantize"] == bad["quantize"] == "int8"
    for k in ("text_top1", "c0_top1", "c1_7_top1"):
        assert bad[k] < 0.2 and good[k] > bad[k] + 0.5, (k, good, bad)
    assert bad["logit_rel_err"] > 1 and good["logit_rel_err"] < 0.2
