"""``openchroma bench``: time to first audio and real-time factor of the streaming engine under concurrency.

For each concurrency level N, N sessions each receive a user turn of synthetic 16 kHz audio (streamed in
100 ms chunks, as a client would), then all N call ``respond()`` at the same moment from N client threads
and read their responses to the end. Per response:

* TTFT: wall time from the client's ``respond()`` call to its first ``AudioChunk`` (queueing, the
  reasoner's prefill over the turn, and the first batched frame step all count);
* RTF: wall time from ``respond()`` to the final event, divided by the seconds of audio received
  (below 1: the audio arrives faster than it plays);

and per round, frames/s: every session's frames over the round's wall time (first ``respond()`` call to
last final event). A warm-up round per level precedes the measured ones and is not recorded. The engine's
stepper also reports where each step's time goes (reasoner, backbone, decoder, Codec, host).

``per_frame`` measures one response alone through the engine's one-slot stepper, as ``openchroma
conformance`` runs it: the time per frame is the difference between a long and a short response divided by
the difference in frames, so loading, prefill and compilation cancel out; eager and compiled.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..constants import REASONER_SAMPLE_RATE
from ..engine import AudioChunk, Engine, ResponseDone
from ..engine.generate import ResponseRunner
from ..models.audio_encoder import audio_token_count
from ..pipeline import Chroma
from ..voice import VoicePrompt, encode_voice

USER_RATE = REASONER_SAMPLE_RATE
CHUNK_SECONDS = 0.1
VOICE_SECONDS = 2.0
VOICE_TRANSCRIPT = "This is a synthetic reference voice for benchmarking the engine."


# ----- synthetic audio ---------------------------------------------------------------------------------
def synthetic_audio(seconds: float, sample_rate: int, seed: int) -> np.ndarray:
    """Seeded speech-like noise: a few voiced harmonics under a syllable-rate envelope, plus breath noise."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    f0 = rng.uniform(100.0, 220.0) * (1 + 0.05 * np.sin(2 * np.pi * 0.7 * t))
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * rng.uniform(3.0, 5.0) * t + rng.uniform(0, 2 * np.pi)))
    wav = 0.15 * envelope * voiced + 0.02 * rng.standard_normal(n)
    return wav.astype(np.float32)


# ----- machine description -----------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine_info(device: torch.device | str) -> dict[str, Any]:
    device = torch.device(device)
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": _ram_gib(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1m"] = round(os.getloadavg()[0], 2)  # other work competing for the CPU at the start
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        info["gpu"] = torch.cuda.get_device_name(idx)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(idx).total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


# ----- statistics --------------------------------------------------------------------------------------
def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def _summary(values: list[float], quantiles=(50, 90, 99)) -> dict[str, float]:
    v = [x for x in values if x == x]  # drop NaN (a response that produced no audio)
    out = {f"p{q}": _pct(v, q) for q in quantiles}
    out["mean"] = float(np.mean(v)) if v else float("nan")
    out["min"] = float(min(v)) if v else float("nan")
    out["max"] = float(max(v)) if v else float("nan")
    return out


# ----- measurement -------------------------------------------------------------------------------------
def _stream_turn(sessions, user_audio: list[np.ndarray]) -> None:
    """Append each session's user audio in 100 ms chunks, interleaved across sessions as they would arrive."""
    step = int(CHUNK_SECONDS * USER_RATE)
    longest = max(len(a) for a in user_audio)
    for i in range(0, longest, step):
        for s, a in zip(sessions, user_audio, strict=True):
            if i < len(a):
                s.append_audio(a[i:i + step], USER_RATE)


def _client(session, frames: int, barrier: threading.Barrier, out: dict) -> None:
    """One client: wait for the others, ask for a response, read it to the end, note when things arrived."""
    try:
        barrier.wait()
        t0 = time.perf_counter()
        resp = session.respond(max_frames=frames)
        t_first = None
        chunk_times: list[float] = []
        done = None
        for ev in resp:
            now = time.perf_counter()
            if isinstance(ev, AudioChunk):
                if t_first is None:
                    t_first = now
                chunk_times.append(now)
            elif isinstance(ev, ResponseDone):
                done = ev
        out.update(t0=t0, t_first=t_first, t_done=time.perf_counter(), chunks=len(chunk_times),
                   chunk_times=chunk_times, done=done)
    except BaseException as e:  # reported by the caller
        out["error"] = e
        barrier.abort()


def _round(engine: Engine, sessions, frames: int, user_seconds: float, seed: int) -> list[dict]:
    """One turn for every session at once; the per-response measurements."""
    audio = [synthetic_audio(user_seconds, USER_RATE, seed + i) for i in range(len(sessions))]
    _stream_turn(sessions, audio)
    barrier = threading.Barrier(len(sessions))
    outs: list[dict] = [{} for _ in sessions]
    threads = [threading.Thread(target=_client, args=(s, frames, barrier, o), daemon=True)
               for s, o in zip(sessions, outs, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for o in outs:
        if "error" in o:
            raise o["error"]
    return outs


def _context_needed(cfg, frames: int, user_seconds: float, turns: int) -> int:
    user_tokens = audio_token_count(int(user_seconds * 100) + 1) + 8
    per_turn = user_tokens + frames // 2 + 16
    return 128 + turns * per_turn + frames // 2 + 8


def run_bench(
    chroma: Chroma,
    sessions: list[int] = (1, 2, 4),
    frames: int = 50,
    user_seconds: float = 2.0,
    turns: int = 2,
    warmup: int = 1,
    seed: int = 0,
    progress: bool = True,
    compile: bool = False,
) -> dict[str, Any]:
    """Measure TTFT, RTF and frames/s at each concurrency level in ``sessions``; a JSON-ready dict."""
    sessions = sorted({int(n) for n in sessions})
    if not sessions or sessions[0] < 1:
        raise ValueError("--sessions needs positive integers, e.g. 1,2,4")
    if frames < 1 or turns < 1 or warmup < 0 or user_seconds <= 0:
        raise ValueError("frames and turns must be >= 1, warmup >= 0 and user seconds > 0")
    cfg = chroma.config
    frame_seconds = cfg.audio_frame_freq / cfg.sample_rate
    max_context = max(2048, _context_needed(cfg, frames, user_seconds, turns + warmup))
    # One engine sized for the largest level, as a server would be (idle slots still cost Mimi work per step).
    engine = Engine(chroma, max_sessions=max(sessions), max_context=max_context, max_response_frames=frames,
                    compile=compile)
    levels: list[dict[str, Any]] = []
    try:
        voice_wav = synthetic_audio(VOICE_SECONDS, cfg.sample_rate, seed=seed + 10_000)
        engine.register_voice("bench", voice_wav, VOICE_TRANSCRIPT, sample_rate=cfg.sample_rate)
        total_rounds = len(sessions) * (warmup + turns)
        with _progress(progress) as bar:
            task = bar.add_task("bench", total=total_rounds)
            for n in sessions:
                if warmup:
                    warm = [engine.create_session("bench") for _ in range(n)]
                    for w in range(warmup):
                        bar.update(task, description=f"{n} session(s): warm-up {w + 1}/{warmup}")
                        _round(engine, warm, frames, user_seconds, seed=seed + 1000 * n + 500 + 10 * w)
                        bar.advance(task)
                    for s in warm:
                        s.close()
                live = [engine.create_session("bench") for _ in range(n)]
                engine.stepper.timings = {}
                records: list[dict] = []
                round_stats: list[dict] = []
                for turn in range(turns):
                    bar.update(task, description=f"{n} session(s): turn {turn + 1}/{turns}")
                    frames_before = engine.frames_generated
                    outs = _round(engine, live, frames, user_seconds, seed=seed + 1000 * n + 10 * turn)
                    start = min(o["t0"] for o in outs)
                    end = max(o["t_done"] for o in outs)
                    round_frames = sum(o["chunks"] for o in outs)
                    round_stats.append({"turn": turn + 1, "wall_seconds": end - start, "frames": round_frames,
                                        "engine_frames": engine.frames_generated - frames_before,
                                        "frames_per_second": round_frames / (end - start)})
                    for i, o in enumerate(outs):
                        done: ResponseDone = o["done"]
                        audio_s = o["chunks"] * frame_seconds
                        gaps = np.diff(o["chunk_times"]) * 1000 if o["chunks"] > 1 else np.zeros(0)
                        records.append({
                            "turn": turn + 1, "session": i,
                            "ttft_ms": (o["t_first"] - o["t0"]) * 1000 if o["t_first"] else float("nan"),
                            "seconds": o["t_done"] - o["t0"],
                            "audio_seconds": audio_s,
                            "rtf": (o["t_done"] - o["t0"]) / audio_s if audio_s else float("nan"),
                            "frames": o["chunks"],
                            "stop_reason": done.stop_reason if done else "none",
                            "engine_ttft_ms": done.timings.get("ttft_ms", float("nan")) if done else float("nan"),
                            "chunk_gap_ms_max": float(gaps.max()) if gaps.size else float("nan"),
                            "chunk_gap_ms_mean": float(gaps.mean()) if gaps.size else float("nan"),
                        })
                    bar.advance(task)
                for s in live:
                    s.close()
                levels.append(_level_summary(n, records, round_stats, frame_seconds))
                levels[-1]["stages_ms"] = _per_step(engine.stepper.timings)
                engine.stepper.timings = None
    finally:
        engine.close()
    return {
        "settings": {"sessions": sessions, "frames": frames, "user_seconds": user_seconds, "turns": turns,
                     "warmup": warmup, "seed": seed, "frame_seconds": frame_seconds, "max_context": max_context,
                     "max_sessions": max(sessions),
                     "user_chunk_seconds": CHUNK_SECONDS, "voice_seconds": VOICE_SECONDS},
        "levels": levels,
    }


def _per_step(timings: dict[str, float]) -> dict[str, float]:
    steps = timings.get("steps", 0.0)
    return {k: v * 1000 / steps for k, v in timings.items() if k != "steps"} if steps else {}


def per_frame(chroma: Chroma, short: int = 24, long: int = 200, compile: bool = False, seed: int = 0,
              warmup: bool = True) -> dict[str, Any]:
    """Milliseconds per frame of one greedy response through the one-slot stepper (``long`` minus ``short``).

    Also returns the per-stage breakdown of the long run (stages inside the frame are timed in eager mode).
    """
    if not 0 < short < long:
        raise ValueError(f"per-frame lengths must be 0 < short < long, got {short}, {long}")
    cfg = chroma.config
    voice_wav = synthetic_audio(VOICE_SECONDS, cfg.sample_rate, seed=seed + 10_000)
    with torch.inference_mode():
        voice: VoicePrompt = encode_voice(chroma.model, torch.from_numpy(voice_wav),
                                          chroma.tokenizer.encode(VOICE_TRANSCRIPT))
    feats = chroma.user_features(synthetic_audio(2.0, USER_RATE, seed), USER_RATE)
    messages = [{"role": "system", "content": [{"type": "text", "text": "You are a helpful voice assistant."}]},
                {"role": "user", "content": [{"type": "audio"}]}]
    ids = chroma.prompt_ids(messages, [feats])
    runner = ResponseRunner.for_call(chroma.model, len(ids), voice.backbone_length, long, compile=compile)
    feats = feats.to(chroma.lm.device)
    t0 = time.perf_counter()
    if compile:  # every variant a greedy response uses, compiled before anything is timed
        runner.stepper.warmup(keys=[k for k in runner.stepper.variants() if k[0] == "think" or k[3]])
    if warmup:  # warms caches and allocators; not timed
        runner.run(ids, voice, feats, max_new_frames=short, decode_audio=False)
    compile_s = time.perf_counter() - t0
    seconds = {}
    for frames in (short, long):
        if frames == long:
            runner.stepper.timings = {}
        t = time.perf_counter()
        result = runner.run(ids, voice, feats, max_new_frames=frames, decode_audio=False)
        seconds[frames] = time.perf_counter() - t
        if len(result.codes) != frames:
            raise RuntimeError(f"the response stopped after {len(result.codes)} of {frames} frames "
                               f"({result.stop_reason})")
    stages = _per_step(runner.stepper.timings)
    return {"short_frames": short, "long_frames": long, "compile": bool(compile),
            "short_seconds": seconds[short], "long_seconds": seconds[long],
            "ms_per_frame": (seconds[long] - seconds[short]) * 1000 / (long - short),
            "warmup_seconds": compile_s, "stages_ms_long_run": stages}


def _level_summary(n: int, records: list[dict], rounds: list[dict], frame_seconds: float) -> dict[str, Any]:
    rtfs = [r["rtf"] for r in records]
    total_frames = sum(r["frames"] for r in rounds)
    total_wall = sum(r["wall_seconds"] for r in rounds)
    stops: dict[str, int] = {}
    for r in records:
        stops[r["stop_reason"]] = stops.get(r["stop_reason"], 0) + 1
    rtf = _summary(rtfs, quantiles=(50, 90))
    return {
        "sessions": n,
        "responses": len(records),
        "ttft_ms": _summary([r["ttft_ms"] for r in records]),
        "rtf": rtf,
        "frames_per_second": total_frames / total_wall if total_wall else float("nan"),
        "audio_seconds_per_second": total_frames * frame_seconds / total_wall if total_wall else float("nan"),
        "frames": total_frames,
        "faster_than_real_time": sum(1 for x in rtfs if x == x and x < 1.0),
        "all_faster_than_real_time": bool(rtfs) and all(x == x and x < 1.0 for x in rtfs),
        "stop_reasons": stops,
        "engine_ttft_ms": _summary([r["engine_ttft_ms"] for r in records]),
        "chunk_interval_ms": _summary([r["chunk_gap_ms_mean"] for r in records], quantiles=(50, 90)),
        "max_chunk_gap_ms": _summary([r["chunk_gap_ms_max"] for r in records], quantiles=(50, 90)),
        "rounds": rounds,
        "per_response": records,
    }


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *a, **k):
        return 0

    def update(self, *a, **k):
        pass

    def advance(self, *a, **k):
        pass


def _progress(enabled: bool):
    if not enabled:
        return _NoBar()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


# ----- reports -----------------------------------------------------------------------------------------
def _fmt(x: float, digits: int = 1) -> str:
    return "n/a" if x != x else f"{x:.{digits}f}"


STAGES = ("reasoner", "backbone", "decoder", "codec", "frame", "host")


def stage_table(rows: list[tuple[str, dict[str, float]]]) -> str:
    """Per-stage milliseconds per step; ``frame`` is the compiled frame function when stages are not split."""
    shown = [s for s in STAGES if any(r.get(s) for _, r in rows)]
    lines = ["| run | " + " | ".join(shown) + " | total |", "|---" * (len(shown) + 2) + "|"]
    for name, r in rows:
        lines.append(f"| {name} | " + " | ".join(_fmt(r.get(s, 0.0), 2) for s in shown)
                     + f" | {_fmt(sum(r.get(s, 0.0) for s in shown), 2)} |")
    return "\n".join(lines) + "\n"


def per_frame_table(runs: list[dict[str, Any]]) -> str:
    lines = ["| mode | frames (short, long) | seconds (short, long) | ms per frame |", "|---|---|---|---:|"]
    for r in runs:
        lines.append(f"| {'compiled' if r['compile'] else 'eager'} | {r['short_frames']}, {r['long_frames']} "
                     f"| {r['short_seconds']:.2f}, {r['long_seconds']:.2f} | {r['ms_per_frame']:.2f} |")
    return "\n".join(lines) + "\n"


def markdown_table(results: dict[str, Any]) -> str:
    lines = ["| sessions | TTFT p50 (ms) | TTFT p90 (ms) | RTF mean | RTF max | frames/s "
             "| all faster than real time? |",
             "|---:|---:|---:|---:|---:|---:|:---|"]
    for lv in results.get("levels", []):
        ok = "yes" if lv["all_faster_than_real_time"] else (
            f"no ({lv['faster_than_real_time']} of {lv['responses']} responses)")
        lines.append(f"| {lv['sessions']} | {_fmt(lv['ttft_ms']['p50'])} | {_fmt(lv['ttft_ms']['p90'])} "
                     f"| {_fmt(lv['rtf']['mean'], 2)} | {_fmt(lv['rtf']['max'], 2)} "
                     f"| {_fmt(lv['frames_per_second'])} | {ok} |")
    return "\n".join(lines) + "\n"


def _title(results: dict[str, Any]) -> str:
    m = results.get("machine", {})
    where = m.get("gpu") or f"{m.get('cpu', '?')} ({m.get('cpu_cores', '?')} cores)"
    model = Path(str(results.get("model", {}).get("path", "model"))).name
    return f"{model}, {results.get('device', '?')} {results.get('dtype', '')}, {where}"


def _jsonable(x):
    """NaN (a response with no audio) as null, tuples as lists, anything else odd as its string."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        return x if x == x and abs(x) != float("inf") else None
    if x is None or isinstance(x, (bool, int, str)):
        return x
    return str(x)


def write_report(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``bench.json``, ``bench.md`` and ``bench.png`` into ``out_dir``; their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "md": out / "bench.md", "png": out / "bench.png"}
    paths["json"].write_text(json.dumps(_jsonable(results), indent=2, allow_nan=False) + "\n")
    s = results.get("settings")
    md = [f"# openchroma bench: {_title(results)}", "",
          f"- date: {results.get('date', '?')}",
          f"- command: `{results.get('command', '?')}`"]
    if s:
        md.append(f"- {s['frames']} frames ({s['frames'] * s['frame_seconds']:.2f} s of audio) per response, "
                  f"{s['user_seconds']} s of user audio per turn, {s['turns']} measured turn(s) after "
                  f"{s['warmup']} warm-up round(s); frame step {'compiled' if results.get('compile') else 'eager'}")
    md.append("")
    if results.get("levels"):
        md += [markdown_table(results), "Where a step's time goes (ms per step):", "",
               stage_table([(f"{lv['sessions']} session(s)", lv.get("stages_ms", {})) for lv in results["levels"]])]
    if results.get("per_frame"):
        md += ["One response alone (the one-slot stepper, as `openchroma conformance` runs it):", "",
               per_frame_table(results["per_frame"]), "Stages of the long run (ms per frame):", "",
               stage_table([("compiled" if r["compile"] else "eager", r["stages_ms_long_run"])
                            for r in results["per_frame"]])]
    paths["md"].write_text("\n".join(md))
    plot(results, paths["png"])
    return paths


def plot(results: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = results.get("levels", [])
    n = [lv["sessions"] for lv in levels]
    if levels:
        fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.2))
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
    ax3.legend(fontsize=8)
    if levels:
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
    fig.suptitle(_title(results), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bench(
    model: str,
    device: str | None = None,
    dtype: str = "float32",
    sessions: list[int] = (1, 2, 4),
    frames: int = 50,
    user_seconds: float = 2.0,
    turns: int = 2,
    warmup: int = 1,
    out_dir: str | Path = "bench-results",
    command: str = "",
    progress: bool = True,
    compile: bool = False,
    per_frame_lengths: tuple[int, int] | None = None,
    quantize: str | None = None,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Load ``model``, run the benchmark, write the reports; (results, report paths).

    ``compile``: the engine's frame step compiled (``per_frame_lengths`` then measures eager and compiled);
    ``quantize``: int8, int4 or fp8 weights (recorded in ``bench.json``)."""
    t0 = time.perf_counter()
    chroma = Chroma.from_pretrained(model, device=device, dtype=dtype, progress=progress, quantize=quantize)
    load_s = time.perf_counter() - t0
    lm = chroma.lm
    header = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "machine": machine_info(lm.device),
        "torch": torch.__version__,
        "device": str(lm.device),
        "dtype": str(lm.dtype).replace("torch.", ""),
        "quantize": lm.quantize,
        "model": {"path": str(lm.path), "parameters": lm.num_parameters, "load_seconds": round(load_s, 2)},
    }
    results = dict(header)
    if per_frame_lengths:
        runs = []
        for c in ([False, True] if compile else [False]):
            if progress:
                print(f"per-frame time, one response, {'compiled' if c else 'eager'}: "
                      f"{per_frame_lengths[0]} and {per_frame_lengths[1]} frames ...", flush=True)
            runs.append(per_frame(chroma, *per_frame_lengths, compile=c))
        results["per_frame"] = runs
    if sessions:
        results.update(run_bench(chroma, sessions=sessions, frames=frames, user_seconds=user_seconds, turns=turns,
                                 warmup=warmup, progress=progress, compile=compile))
    results["compile"] = bool(compile)
    return results, write_report(results, out_dir)


__all__ = ["bench", "run_bench", "per_frame", "write_report", "markdown_table", "plot", "machine_info",
           "synthetic_audio"]
