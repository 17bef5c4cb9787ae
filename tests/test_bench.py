"""``openchroma bench`` end to end on a tiny random checkpoint: the reports exist and hold sane numbers."""

from __future__ import annotations

import json

import pytest

from openchroma.cli import main


def test_bench_writes_json_markdown_and_plot(tiny_random_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    rc = main(["bench", "--model", str(tiny_random_dir), "--device", "cpu", "--sessions", "1,2", "--frames", "6",
               "--turns", "1", "--out", str(out)])
    assert rc == 0
    for name in ("bench.json", "bench.md", "bench.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    res = json.loads((out / "bench.json").read_text())
    for key in ("date", "command", "machine", "torch", "device", "dtype", "model", "settings", "levels"):
        assert key in res, key
    assert res["device"] == "cpu" and res["dtype"] == "float32"
    assert res["model"]["parameters"] > 0
    assert res["machine"]["cpu_cores"] >= 1 and res["machine"]["cpu"]
    assert res["command"].startswith("openchroma bench --model")
    assert [lv["sessions"] for lv in res["levels"]] == [1, 2]
    for lv in res["levels"]:
        n = lv["sessions"]
        assert lv["responses"] == n  # one measured turn
        assert lv["frames"] == 6 * n or lv["stop_reasons"].get("eos")  # max_frames unless the model stopped
        for q in ("p50", "p90", "p99", "mean"):
            assert lv["ttft_ms"][q] > 0
        for q in ("mean", "p90", "max"):
            assert lv["rtf"][q] > 0
        assert lv["ttft_ms"]["p50"] <= lv["ttft_ms"]["p90"] <= lv["ttft_ms"]["p99"]
        assert lv["frames_per_second"] > 0
        assert isinstance(lv["all_faster_than_real_time"], bool)
        assert len(lv["per_response"]) == n

    md = (out / "bench.md").read_text()
    assert "| sessions | TTFT p50" in md and "\n| 2 |" in md
    printed = capsys.readouterr().out
    assert "| sessions | TTFT p50" in printed
    # where each step's time goes, per level
    for lv in res["levels"]:
        stages = lv["stages_ms"]
        assert {"reasoner", "backbone", "decoder", "codec", "host"} <= set(stages)
        assert all(v >= 0 for v in stages.values())
    assert "Where a step's time goes" in md


@pytest.mark.slow   # compile
def test_bench_per_frame_alone_eager_and_compiled(tiny_random_dir, tmp_path):
    """The one-response per-frame time (long minus short), eager and traced through dynamo (no codegen here:
    the inductor path is covered by the compiled conformance test)."""
    from openchroma.pipeline import Chroma
    from openchroma.tools.bench import per_frame

    chroma = Chroma.from_pretrained(tiny_random_dir, device="cpu", progress=False)
    for compile in (False, "eager"):
        r = per_frame(chroma, 4, 10, compile=compile)
        assert r["long_frames"] == 10 and r["ms_per_frame"] > 0 and r["long_seconds"] > 0
        assert set(r["stages_ms_long_run"]) >= {"reasoner", "host"}
    out = tmp_path / "pf"
    assert main(["bench", "--model", str(tiny_random_dir), "--sessions", "0", "--per-frame", "4,8",
                 "--out", str(out)]) == 0
    res = json.loads((out / "bench.json").read_text())
    assert "levels" not in res and res["per_frame"][0]["compile"] is False
    assert "ms per frame" in (out / "bench.md").read_text()
    assert main(["bench", "--model", str(tiny_random_dir), "--per-frame", "8,4", "--out", str(out)]) == 2


def test_init_random_takes_sizes_from_a_config_file(fixture_dir, tmp_path, capsys):
    out = tmp_path / "from-config"
    assert main(["init-random", "--config", str(fixture_dir / "config.json"), "--out", str(out)]) == 0
    from openchroma.loading import load

    lm = load(out, device="cpu", progress=False)
    ref = load(fixture_dir, device="cpu", progress=False)
    assert lm.num_parameters == ref.num_parameters
    assert main(["init-random", "--config", str(tmp_path / "missing.json"), "--out", str(out)]) == 1
    assert "no such config file" in capsys.readouterr().err
