"""The reference cases, through the user-facing command: tokens and codes exactly, logits/audio to 1e-4."""

from __future__ import annotations

import json

import pytest

from openchroma.cli import main
from tests.conftest import CASES


@pytest.mark.parametrize("case", CASES)
def test_case_passes_conformance(fixture_dir, case, capsys):
    status = main(["conformance", "--model", str(fixture_dir), "--case", str(fixture_dir / f"case_{case}.safetensors"),
                   "--json", "--device", "cpu"])
    report = json.loads(capsys.readouterr().out)
    assert report["tokens_match"], report
    assert report["codes_match"], report
    assert report["prompt_codes_match"], report
    assert report["prefill_logits_max_abs_diff"] <= 1e-4
    assert report["audio_max_rel_diff"] <= 1e-4
    assert report["n_frames"] == report["expected_frames"] == 24
    assert status == 0


def test_conformance_reports_a_mismatch(fixture_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    case = load_file(str(fixture_dir / "case_text_turn.safetensors"))
    case["expected_codes"][5, 3] = (case["expected_codes"][5, 3] + 1) % 2048
    bad = tmp_path / "case_bad.safetensors"
    save_file(case, str(bad))
    status = main(["conformance", "--model", str(fixture_dir), "--case", str(bad), "--json", "--device", "cpu"])
    report = json.loads(capsys.readouterr().out)
    assert status == 1
    assert report["tokens_match"] and not report["codes_match"]
    assert report["first_code_mismatch"] == [5, 3]


def test_conformance_missing_case_file_is_a_clear_error(fixture_dir, tmp_path, capsys):
    status = main(["conformance", "--model", str(fixture_dir), "--case", str(tmp_path / "nope.safetensors")])
    assert status == 1
    assert "nope.safetensors: no such case file" in capsys.readouterr().err
