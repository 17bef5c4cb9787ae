"""``openchroma bench`` end to end on a tiny random checkpoint: the reports exist and hold sane numbers."""

from __future__ import annotations

import json

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
