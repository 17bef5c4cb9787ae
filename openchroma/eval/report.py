"""Aggregates, report.md with the paper's figures side by side, and PNG plots."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from ..reporting import finite, fmt, markdown_table, mean, percentile, plot_cdf, pyplot, save_figure

# FlashLabs Chroma 1.0 (arXiv 2601.11141), as the paper reports them.
PAPER = {"sim": 0.817, "sim_human_baseline": 0.73, "ttft_ms": 146.87, "reasoner_ms": 119.12, "rtf": 0.43}


def _values(rows: list[dict[str, Any]], key: str) -> list[float]:
    return finite(r.get(key) for r in rows)


def _mean(xs: list[float]) -> float | None:
    return mean(xs, empty=None)


def _pct(xs: list[float], q: float) -> float | None:
    return percentile(xs, q, empty=None)


def summarize(rows: list[dict[str, Any]], settings, sim_model: str, asr_model: str,
              command: str | None = None, normalize=None) -> dict[str, Any]:
    """The run's aggregates; ``normalize`` is the WER text normaliser (corpus WER pools all utterances' words)."""
    import jiwer

    ok = [r for r in rows if "error" not in r]
    ttft = _values(ok, "ttft_ms")
    pairs = [(r["reference_text"], r["transcript"]) for r in ok if r.get("wer") is not None]
    corpus_wer = None
    if pairs:
        if normalize is None:
            from .asr import WerScorer

            normalize = WerScorer().normalize
        norm = normalize
        refs = [norm(a) for a, _ in pairs]
        hyps = [norm(b) for _, b in pairs]
        corpus_wer = float(jiwer.wer(refs, hyps)) if all(r.strip() for r in refs) else None
    breakdown: dict[str, float | None] = {}
    for stage in ("reasoner", "backbone", "decoder", "codec"):
        vals = [r["breakdown_ms"][stage] for r in ok if r.get("breakdown_ms") and r["breakdown_ms"][stage] is not None]
        breakdown[f"{stage}_ms_mean"] = _mean(vals)
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "task": settings.task,
        "model": settings.model,
        "audio_dir": str(settings.audio_dir) if settings.audio_dir else None,
        "device": settings.device,
        "dtype": settings.dtype if settings.model else None,
        "max_frames": settings.max_frames if settings.model else None,
        "sim_model": sim_model,
        "asr_model": asr_model,
        "utterances": len(rows),
        "failed": len(rows) - len(ok),
        "sim_mean": _mean(_values(ok, "sim")),
        "wer_mean": _mean(_values(ok, "wer")),
        "wer_corpus": corpus_wer,
        "ttft_ms_p50": _pct(ttft, 50),
        "ttft_ms_p90": _pct(ttft, 90),
        "ttft_ms_mean": _mean(ttft),
        "rtf_mean": _mean(_values(ok, "rtf")),
        "breakdown": breakdown,
        "paper": PAPER,
    }


def write_plots(rows: list[dict[str, Any]], out_dir: Path) -> dict[str, str]:
    """sim_hist.png, wer_per_utt.png and ttft_cdf.png (each only when there is something to plot)."""
    plt = pyplot()
    ok = [r for r in rows if "error" not in r]
    written: dict[str, str] = {}
    sims = _values(ok, "sim")
    if sims:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist(sims, bins=min(30, max(5, len(sims))), range=(min(0.0, min(sims)), 1.0), color="#4477aa")
        ax.axvline(PAPER["sim"], color="#cc3311", ls="--", label=f"paper: Chroma {PAPER['sim']}")
        ax.axvline(PAPER["sim_human_baseline"], color="#999933", ls=":",
                   label=f"paper: human {PAPER['sim_human_baseline']}")
        ax.set(xlabel="speaker similarity (cosine)", ylabel="utterances", title="SIM")
        ax.legend(fontsize=8)
        written["sim_hist"] = save_figure(fig, out_dir / "sim_hist.png")
    wer_rows = [r for r in ok if r.get("wer") is not None]
    if wer_rows:
        fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(wer_rows)), 3.5))
        ax.bar(range(len(wer_rows)), [r["wer"] for r in wer_rows], color="#228833")
        if len(wer_rows) <= 40:
            ax.set_xticks(range(len(wer_rows)), [r["utt"] for r in wer_rows], rotation=90, fontsize=7)
        ax.set(ylabel="WER", title="WER per utterance")
        written["wer_per_utt"] = save_figure(fig, out_dir / "wer_per_utt.png")
    ttft = _values(ok, "ttft_ms")
    if ttft:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        plot_cdf(ax, ttft, color="#4477aa", label="this run")
        ax.axvline(PAPER["ttft_ms"], color="#cc3311", ls="--", label=f"paper: {PAPER['ttft_ms']} ms")
        ax.set(xlabel="time to first audio (ms)", ylabel="fraction of responses", title="TTFT CDF", ylim=(0, 1.02))
        ax.legend(fontsize=8)
        written["ttft_cdf"] = save_figure(fig, out_dir / "ttft_cdf.png")
    return written


def _fmt(x: float | None, digits: int = 3, unit: str = "") -> str:
    return fmt(x, digits, unit=unit)


def write_report_md(results: dict[str, Any], plots: dict[str, str], path: Path) -> None:
    s = results["summary"]
    b = s["breakdown"]

    def _stage(ms: float | None) -> str:
        if not s["model"]:
            return "—"
        return "not reported by this engine" if ms is None else f"{ms:.1f} ms"

    lines = [
        "# OpenChroma evaluation",
        "",
        f"- created: {s['created']}",
        f"- task: {s['task']}; " + (f"model: `{s['model']}` ({s['dtype']}, at most {s['max_frames']} frames)"
                                     if s["model"] else f"scored existing audio in `{s['audio_dir']}`"),
        f"- speaker-similarity model: {s['sim_model']}",
        f"- speech recognition model: {s['asr_model']}",
        f"- utterances: {s['utterances']} ({s['failed']} failed)",
    ]
    if s.get("command"):
        lines.append(f"- command: `{s['command']}`")
    lines += [
        "",
        "SIM and WER depend on the scoring models: compare numbers only when both runs name the same ones. "
        "A random-weight checkpoint speaks noise, so its SIM and WER are meaningless.",
        "",
        markdown_table(["metric", "this run", "paper (Chroma 1.0)"], [
            ["SIM (mean cosine)", _fmt(s["sim_mean"]),
             f"{PAPER['sim']} (human baseline {PAPER['sim_human_baseline']})"],
            ["WER (mean per utterance)", _fmt(s["wer_mean"]), "—"],
            ["WER (corpus)", _fmt(s["wer_corpus"]), "—"],
            ["TTFT p50", _fmt(s["ttft_ms_p50"], 1, " ms"), f"{PAPER['ttft_ms']} ms"],
            ["TTFT p90", _fmt(s["ttft_ms_p90"], 1, " ms"), "—"],
            ["reasoner (prefill to first text token)", _stage(b["reasoner_ms_mean"]), f"{PAPER['reasoner_ms']} ms"],
            ["backbone first frame", _stage(b["backbone_ms_mean"]), "—"],
            ["decoder", _stage(b["decoder_ms_mean"]), "—"],
            ["codec", _stage(b["codec_ms_mean"]), "—"],
            ["RTF (mean)", _fmt(s["rtf_mean"]), PAPER["rtf"]],
        ]),
    ]
    for key, title in (("sim_hist", "SIM histogram"), ("wer_per_utt", "WER per utterance"),
                       ("ttft_cdf", "TTFT CDF")):
        if key in plots:
            lines += [f"![{title}]({plots[key]})", ""]
    failed = [r for r in results["utterances"] if "error" in r]
    if failed:
        rows = [[r["utt"], r["error"]] for r in failed]
        lines += ["## Failed utterances", "", markdown_table(["utt", "error"], rows)]
    lines += ["## Utterances", "", markdown_table(
        ["utt", "SIM", "WER", "TTFT ms", "RTF", "transcript"],
        [[r["utt"], _fmt(r.get("sim")), _fmt(r.get("wer")), _fmt(r.get("ttft_ms"), 1), _fmt(r.get("rtf")),
          (r.get("transcript") or "")[:80]] for r in results["utterances"] if "error" not in r])]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

