"""``openchroma bench``'s reports: bench.json, bench.md and bench.png, rewritten after every measured level so a
stopped run keeps what it measured."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..reporting import fmt, jsonable, markdown_table, pyplot, save_figure

STAGES = ("reasoner", "backbone", "decoder", "codec", "frame", "host")


def _fmt(x: float | None, digits: int = 1) -> str:
    return fmt(x, digits, missing="n/a")


def stage_table(rows: list[tuple[str, dict[str, float]]]) -> str:
    """Per-stage milliseconds per step; ``frame`` is the compiled frame function when stages are not split."""
    shown = [s for s in STAGES if any(r.get(s) for _, r in rows)]
    return markdown_table(["run", *shown, "total"],
                          [[name, *(_fmt(r.get(s, 0.0), 2) for s in shown), _fmt(sum(r.get(s, 0.0) for s in shown), 2)]
                           for name, r in rows])


def per_frame_table(runs: list[dict[str, Any]]) -> str:
    return markdown_table(
        ["mode", "frames (short, long)", "seconds (short, long)", "ms per frame"],
        [["compiled" if r["compile"] else "eager", f"{r['short_frames']}, {r['long_frames']}",
          f"{r['short_seconds']:.2f}, {r['long_seconds']:.2f}", f"{r['ms_per_frame']:.2f}"] for r in runs],
        align=["---", "---", "---", "---:"])


def levels_table(results: dict[str, Any]) -> str:
    rows = []
    for lv in results.get("levels", []):
        ok = "yes" if lv["all_faster_than_real_time"] else (
            f"no ({lv['faster_than_real_time']} of {lv['responses']} responses)")
        rows.append([lv["sessions"], _fmt(lv["ttft_ms"]["p50"]), _fmt(lv["ttft_ms"]["p90"]), _fmt(lv["rtf"]["mean"], 2),
                     _fmt(lv["rtf"]["max"], 2), _fmt(lv["frames_per_second"]), ok])
    return markdown_table(["sessions", "TTFT p50 (ms)", "TTFT p90 (ms)", "RTF mean", "RTF max", "frames/s",
                           "all faster than real time?"], rows, align=["---:"] * 6 + [":---"])


def _title(results: dict[str, Any]) -> str:
    m = results.get("machine", {})
    where = m.get("gpu") or f"{m.get('cpu', '?')} ({m.get('cpu_cores', '?')} cores)"
    model = Path(str(results.get("model", {}).get("path", "model"))).name
    return f"{model}, {results.get('device', '?')} {results.get('dtype', '')}, {where}"


def markdown(results: dict[str, Any]) -> str:
    s = results.get("settings")
    md = [f"# openchroma bench: {_title(results)}", "",
          f"- date: {results.get('date', '?')}",
          f"- command: `{results.get('command', '?')}`"]
    if s:
        md.append(f"- {s['frames']} frames ({s['frames'] * s['frame_seconds']:.2f} s of audio) per response, "
                  f"{s['user_seconds']} s of user audio per turn, {s['turns']} measured turn(s) after "
                  f"{s['warmup']} warm-up round(s); frame step {'compiled' if results.get('compile') else 'eager'}")
    if not results.get("finished", True):
        md.append("- **unfinished**: the run stopped (or is still running); what it measured so far is below")
    md.append("")
    if results.get("levels"):
        md += [levels_table(results), "Where a step's time goes (ms per step):", "",
               stage_table([(f"{lv['sessions']} session(s)", lv.get("stages_ms", {})) for lv in results["levels"]])]
    if results.get("per_frame"):
        md += ["One response alone (the one-slot stepper, as `openchroma conformance` runs it):", "",
               per_frame_table(results["per_frame"]), "Stages of the long run (ms per frame):", "",
               stage_table([("compiled" if r["compile"] else "eager", r["stages_ms_long_run"])
                            for r in results["per_frame"]])]
    return "\n".join(md)


def write_report(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``bench.json``, ``bench.md`` and ``bench.png`` into ``out_dir`` (each replaced whole, so a reader
    never sees half a file); their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "md": out / "bench.md", "png": out / "bench.png"}
    _replace(paths["json"], json.dumps(jsonable(results), indent=2, allow_nan=False) + "\n")
    _replace(paths["md"], markdown(results))
    tmp = paths["png"].with_suffix(".tmp.png")
    plot(results, tmp)
    tmp.replace(paths["png"])
    return paths


def _replace(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def plot(results: dict[str, Any], path: str | Path) -> None:
    plt = pyplot()
    levels = results.get("levels", [])
    if levels:
        fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.2))
        _plot_levels(ax1, ax2, levels)
    else:  # only the one-response runs: the stage breakdown alone
        fig, ax3 = plt.subplots(1, 1, figsize=(6, 4.2))
    bars = [(f"{lv['sessions']} sess.", lv.get("stages_ms", {})) for lv in levels]
    bars += [("1 alone, " + ("compiled" if r["compile"] else "eager"), r["stages_ms_long_run"])
             for r in results.get("per_frame", [])]
    bottom = np.zeros(len(bars))
    for stage in STAGES:
        vals = np.array([b.get(stage, 0.0) for _, b in bars])
        if vals.any():
            ax3.bar(range(len(bars)), vals, bottom=bottom, label=stage)
            bottom += vals
    ax3.set_xticks(range(len(bars)), [name for name, _ in bars], rotation=20, fontsize=8)
    ax3.set_ylabel("ms per frame step")
    ax3.set_title("Where a step's time goes")
    if bars:
        ax3.legend(fontsize=8)
    fig.suptitle(_title(results), fontsize=10)
    save_figure(fig, path)


def _plot_levels(ax1, ax2, levels: list[dict[str, Any]]) -> None:
    n = [lv["sessions"] for lv in levels]
    for q, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
        ax1.plot(n, [lv["ttft_ms"][q] for lv in levels], style, label=f"TTFT {q}")
    ax1.set_xlabel("concurrent sessions")
    ax1.set_ylabel("time to first audio (ms)")
    ax1.set_title("TTFT")
    ax1.set_ylim(bottom=0)
    ax2.plot(n, [lv["rtf"]["mean"] for lv in levels], "o-", label="RTF mean")
    ax2.plot(n, [lv["rtf"]["max"] for lv in levels], "s--", label="RTF max")
    ax2.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="real time (RTF = 1)")
    ax2.set_xlabel("concurrent sessions")
    ax2.set_ylabel("generation time / audio time")
    ax2.set_title("Real-time factor (below 1 = faster than real time)")
    ax2.set_ylim(bottom=0)
    for ax in (ax1, ax2):
        ax.set_xticks(n)
        ax.grid(alpha=0.3)
        ax.legend()
