"""``openchroma bench`` end to end on a tiny random checkpoint: the reports exist and hold sane numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    assert res["finished"] is True
    for lv in res["levels"]:
        n = lv["sessions"]
        assert lv["responses"] == n  # one measured turn
        assert lv["frames"] == 6 * n or lv["stop_reasons"].get("eos")  # max_frames unless the model stopped
        for r in lv["per_response"]:
            # Frames counted are what was asked (random weights never say end of turn within 6 frames), each 80 ms
            # of audio; the first audio comes before the response ends; generation takes real time.
            assert r["frames"] == 6 and r["stop_reason"] == "length", r
            assert r["audio_seconds"] == pytest.approx(6 * 0.08)
            assert 0 < r["ttft_ms"] < r["seconds"] * 1000
            assert r["rtf"] == pytest.approx(r["seconds"] / r["audio_seconds"])
            assert r["chunk_gap_ms_max"] >= r["chunk_gap_ms_mean"] > 0
        (rnd,) = lv["rounds"]
        assert rnd["frames"] == rnd["engine_frames"] == 6 * n
        assert rnd["frames_per_second"] == pytest.approx(rnd["frames"] / rnd["wall_seconds"])
        # The round's wall time spans its slowest response.
        assert rnd["wall_seconds"] >= max(r["seconds"] for r in lv["per_response"]) - 1e-6
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
        assert r["long_frames"] == 10 and r["ms_per_frame"] > 0 and r["long_seconds"] > r["short_seconds"] > 0
        assert r["ms_per_frame"] == pytest.approx((r["long_seconds"] - r["short_seconds"]) * 1000 / 6)
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


def test_bench_writes_its_reports_after_each_level(tiny_random_dir, tmp_path, monkeypatch):
    """A run stopped after its first level keeps that level on disk, marked unfinished."""
    from openchroma.tools import bench as bench_module

    seen: list[list[int]] = []
    real = bench_module.write_report

    def write_then_stop(results, out_dir):
        paths = real(results, out_dir)
        seen.append([lv["sessions"] for lv in results.get("levels", [])])
        if len(seen) == 1:
            raise KeyboardInterrupt   # as Ctrl-C after the first level
        return paths

    monkeypatch.setattr(bench_module, "write_report", write_then_stop)
    out = tmp_path / "stopped"
    assert main(["bench", "--model", str(tiny_random_dir), "--sessions", "1,2", "--frames", "4", "--turns", "1",
                 "--warmup", "0", "--out", str(out)]) == 130
    assert seen == [[1]]
    res = json.loads((out / "bench.json").read_text())
    assert res["finished"] is False and [lv["sessions"] for lv in res["levels"]] == [1]
    assert "unfinished" in (out / "bench.md").read_text() and (out / "bench.png").is_file()


def test_bench_checks_matplotlib_before_loading(tiny_random_dir, tmp_path):
    """Without the bench extra, bench fails at once with the install command, before any model loads."""
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "import importlib.util as u; real = u.find_spec\n"
            "u.find_spec = lambda name, *a: None if name == 'matplotlib' else real(name, *a)\n"
            "from openchroma.pipeline import Chroma\n"
            "Chroma.from_pretrained = lambda *a, **k: sys.exit('the model loaded first')\n"
            "from openchroma.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "bench", "--model", str(tiny_random_dir), "--out",
                        str(tmp_path / "b")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip() == ("openchroma bench: error: openchroma bench needs matplotlib: "
                                "pip install 'openchroma[bench]'")
    assert not (tmp_path / "b").exists()


def test_bench_default_output_is_ignored_by_git():
    from openchroma.tools.bench import DEFAULT_OUT

    root = Path(__file__).resolve().parents[1]
    for path in (DEFAULT_OUT, "chroma-random"):
        r = subprocess.run(["git", "check-ignore", "-q", f"{path}/bench.json"], cwd=root)
        assert r.returncode == 0, f"{path} is not ignored"
    assert (root / "benchmarks" / "recorded" / "cpu-tiny" / "bench.json").is_file()


@pytest.mark.slow   # over 3 s: left out of the fast subset
def test_bench_shows_progress_while_compiling(tiny_chroma, capfd):
    """bench --compile printed nothing for 15+ minutes on a cold compile cache: now a line says what is happening
    and a bar counts the compiled variants (dynamo's eager backend here: the same path, without codegen)."""
    from openchroma.tools.bench import run_bench

    res = run_bench(tiny_chroma, sessions=[1], frames=4, turns=1, warmup=0, compile="eager", progress=True)
    out, err = capfd.readouterr()
    assert "compiling the frame step for 1 to 1 sessions" in out
    assert "Compiling the frame step" in err and "graph" in err
    assert res["levels"][0]["frames"] == 4
