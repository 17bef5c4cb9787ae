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

import argparse
import datetime as _dt
import os
import platform
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cli_args import UsageError, add_compile_argument, add_model_arguments, int_list
from ..constants import FRAME_SECONDS, REASONER_SAMPLE_RATE
from ..engine import AudioChunk, Engine, ResponseDone
from ..engine.generate import ResponseRunner
from ..models.audio_encoder import audio_token_count
from ..pipeline import Chroma
from ..reporting import NAN, distribution, require
from ..tokenizer import system_message
from ..voice import VoicePrompt, encode_voice
from .bench_report import write_report

#: Where reports go unless --out says otherwise: a folder git ignores (the recorded runs live in
#: benchmarks/recorded/, where a run cannot overwrite them).
DEFAULT_OUT = "openchroma-bench"

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
    on_level: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Measure TTFT, RTF and frames/s at each concurrency level in ``sessions``; a JSON-ready dict.

    ``on_level`` gets the results so far after each level (``bench`` writes its reports then)."""
    sessions = sorted({int(n) for n in sessions})
    if not sessions or sessions[0] < 1:
        raise ValueError("--sessions needs positive integers, e.g. 1,2,4")
    if frames < 1 or turns < 1 or warmup < 0 or user_seconds <= 0:
        raise ValueError("frames and turns must be >= 1, warmup >= 0 and user seconds > 0")
    cfg = chroma.config
    frame_seconds = FRAME_SECONDS
    max_context = max(2048, _context_needed(cfg, frames, user_seconds, turns + warmup))
    results: dict[str, Any] = {
        "settings": {"sessions": sessions, "frames": frames, "user_seconds": user_seconds, "turns": turns,
                     "warmup": warmup, "seed": seed, "frame_seconds": frame_seconds, "max_context": max_context,
                     "max_sessions": max(sessions),
                     "user_chunk_seconds": CHUNK_SECONDS, "voice_seconds": VOICE_SECONDS},
        "levels": [],
    }
    if progress and compile:
        print(f"compiling the frame step for 1 to {max(sessions)} sessions (minutes on a cold compile cache) ...",
              flush=True)
    # One engine sized for the largest level, as a server would be (idle slots still cost Mimi work per step).
    engine = Engine(chroma, max_sessions=max(sessions), max_context=max_context, max_response_frames=frames,
                    compile=compile, progress=progress)
    try:
        voice_wav = synthetic_audio(VOICE_SECONDS, cfg.sample_rate, seed=seed + 10_000)
        engine.register_voice("bench", voice_wav, VOICE_TRANSCRIPT, sample_rate=cfg.sample_rate)
        plan = _Plan(frames, user_seconds, turns, warmup, seed, frame_seconds)
        with _progress(progress) as bar:
            task = bar.add_task("bench", total=len(sessions) * (warmup + turns))
            for n in sessions:
                results["levels"].append(_measure_level(engine, n, plan, lambda d: _tick(bar, task, d)))
                if on_level is not None:
                    on_level(results)
    finally:
        engine.close()
    return results


@dataclass(frozen=True)
class _Plan:
    frames: int
    user_seconds: float
    turns: int
    warmup: int
    seed: int
    frame_seconds: float


def _tick(bar, task, description: str | None) -> None:
    """Name the round now running, or (``None``) count one as done."""
    if description is None:
        bar.advance(task)
    else:
        bar.update(task, description=description)


def _measure_level(engine: Engine, n: int, plan: _Plan, tick: Callable[[str | None], None]) -> dict[str, Any]:
    """Warm-up rounds, then ``plan.turns`` measured rounds of ``n`` concurrent responses; the level's summary."""
    if plan.warmup:
        warm = [engine.create_session("bench") for _ in range(n)]
        for w in range(plan.warmup):
            tick(f"{n} session(s): warm-up {w + 1}/{plan.warmup}")
            _round(engine, warm, plan.frames, plan.user_seconds, seed=plan.seed + 1000 * n + 500 + 10 * w)
            tick(None)
        for s in warm:
            s.close()
    live = [engine.create_session("bench") for _ in range(n)]
    engine.stepper.timings = {}
    records: list[dict] = []
    round_stats: list[dict] = []
    for turn in range(plan.turns):
        tick(f"{n} session(s): turn {turn + 1}/{plan.turns}")
        frames_before = engine.frames_generated
        outs = _round(engine, live, plan.frames, plan.user_seconds, seed=plan.seed + 1000 * n + 10 * turn)
        start = min(o["t0"] for o in outs)
        end = max(o["t_done"] for o in outs)
        round_frames = sum(o["chunks"] for o in outs)
        round_stats.append({"turn": turn + 1, "wall_seconds": end - start, "frames": round_frames,
                            "engine_frames": engine.frames_generated - frames_before,
                            "frames_per_second": round_frames / (end - start)})
        records += [_response_record(o, turn + 1, i, plan.frame_seconds) for i, o in enumerate(outs)]
        tick(None)
    for s in live:
        s.close()
    level = _level_summary(n, records, round_stats, plan.frame_seconds)
    level["stages_ms"] = _per_step(engine.stepper.timings)
    engine.stepper.timings = None
    return level


def _response_record(o: dict, turn: int, session: int, frame_seconds: float) -> dict[str, Any]:
    done: ResponseDone | None = o["done"]
    audio_s = o["chunks"] * frame_seconds
    gaps = np.diff(o["chunk_times"]) * 1000 if o["chunks"] > 1 else np.zeros(0)
    return {
        "turn": turn, "session": session,
        "ttft_ms": (o["t_first"] - o["t0"]) * 1000 if o["t_first"] else NAN,
        "seconds": o["t_done"] - o["t0"],
        "audio_seconds": audio_s,
        "rtf": (o["t_done"] - o["t0"]) / audio_s if audio_s else NAN,
        "frames": o["chunks"],
        "stop_reason": done.stop_reason if done else "none",
        "engine_ttft_ms": done.timings.get("ttft_ms", NAN) if done else NAN,
        "chunk_gap_ms_max": float(gaps.max()) if gaps.size else NAN,
        "chunk_gap_ms_mean": float(gaps.mean()) if gaps.size else NAN,
    }


def _per_step(timings: dict[str, float]) -> dict[str, float]:
    steps = timings.get("steps", 0.0)
    return {k: v * 1000 / steps for k, v in timings.items() if k != "steps"} if steps else {}


def per_frame(chroma: Chroma, short: int = 24, long: int = 200, compile: bool = False, seed: int = 0,
              warmup: bool = True, progress: bool = False) -> dict[str, Any]:
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
    messages = [system_message("You are a helpful voice assistant."), {"role": "user", "content": [{"type": "audio"}]}]
    ids = chroma.prompt_ids(messages, [feats])
    runner = ResponseRunner.for_call(chroma.model, len(ids), voice.backbone_length, long, compile=compile)
    feats = feats.to(chroma.lm.device)
    t0 = time.perf_counter()
    if compile:  # every variant a greedy response uses, compiled before anything is timed
        runner.stepper.warmup(progress=progress, keys=[k for k in runner.stepper.variants() if k[0] == "think" or k[3]])
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
    rtf = distribution(rtfs, (50, 90))
    return {
        "sessions": n,
        "responses": len(records),
        "ttft_ms": distribution([r["ttft_ms"] for r in records]),
        "rtf": rtf,
        "frames_per_second": total_frames / total_wall if total_wall else NAN,
        "audio_seconds_per_second": total_frames * frame_seconds / total_wall if total_wall else NAN,
        "frames": total_frames,
        "faster_than_real_time": sum(1 for x in rtfs if x == x and x < 1.0),
        "all_faster_than_real_time": bool(rtfs) and all(x == x and x < 1.0 for x in rtfs),
        "stop_reasons": stops,
        "engine_ttft_ms": distribution([r["engine_ttft_ms"] for r in records]),
        "chunk_interval_ms": distribution([r["chunk_gap_ms_mean"] for r in records], (50, 90)),
        "max_chunk_gap_ms": distribution([r["chunk_gap_ms_max"] for r in records], (50, 90)),
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




def bench(
    model: str,
    device: str | None = None,
    dtype: str = "float32",
    sessions: list[int] = (1, 2, 4),
    frames: int = 50,
    user_seconds: float = 2.0,
    turns: int = 2,
    warmup: int = 1,
    out_dir: str | Path = DEFAULT_OUT,
    command: str = "",
    progress: bool = True,
    compile: bool = False,
    per_frame_lengths: tuple[int, int] | None = None,
    quantize: str | None = None,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Load ``model``, run the benchmark, write the reports (after every level and per-frame run, so a stopped
    run keeps what it measured); (results, report paths).

    ``compile``: the engine's frame step compiled (``per_frame_lengths`` then measures eager and compiled);
    ``quantize``: int8, int4 or fp8 weights (recorded in ``bench.json``)."""
    require(["matplotlib"], "bench", "bench")   # before anything slow: the plot is the last thing written
    t0 = time.perf_counter()
    # Every response's length is --frames (a random checkpoint's 4 s default does not apply).
    chroma = Chroma.from_pretrained(model, device=device, dtype=dtype, progress=progress, max_frames=frames,
                                    quantize=quantize)
    lm = chroma.lm
    results: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "machine": machine_info(lm.device),
        "torch": torch.__version__,
        "device": str(lm.device),
        "dtype": str(lm.dtype).replace("torch.", ""),
        "quantize": lm.quantize,
        "model": {"path": str(lm.path), "parameters": lm.num_parameters,
                  "load_seconds": round(time.perf_counter() - t0, 2)},
        "compile": bool(compile),
        "finished": False,
    }
    if per_frame_lengths:
        results["per_frame"] = []
        for c in ([False, True] if compile else [False]):
            if progress:
                print(f"per-frame time, one response, {'compiled' if c else 'eager'}: "
                      f"{per_frame_lengths[0]} and {per_frame_lengths[1]} frames ...", flush=True)
            results["per_frame"].append(per_frame(chroma, *per_frame_lengths, compile=c, progress=progress))
            write_report(results, out_dir)
    if sessions:
        def save(partial: dict[str, Any]) -> None:
            results.update(partial)
            write_report(results, out_dir)

        run_bench(chroma, sessions=sessions, frames=frames, user_seconds=user_seconds, turns=turns, warmup=warmup,
                  progress=progress, compile=compile, on_level=save)
    results["finished"] = True
    return results, write_report(results, out_dir)


def _sessions_list(text: str) -> list[int]:
    return [] if text.strip() == "0" else int_list(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Benchmark the streaming engine. For each concurrency level N, N sessions each stream a turn of "
                     "synthetic user audio (100 ms chunks), then all N ask for a response at the same moment. Reports "
                     "TTFT (respond() to first audio chunk), RTF (generation time / audio time; < 1 is faster than "
                     "real time) and aggregate frames/s, and writes bench.json, bench.md and bench.png to --out "
                     "after every level. Works with random-weight checkpoints from init-random (they speak noise).")
    add_model_arguments(p, quantize=True)
    p.add_argument("--sessions", type=_sessions_list, default=[1, 2, 4], metavar="N,N,...",
                   help="concurrency levels to measure, comma-separated (default: 1,2,4)")
    p.add_argument("--frames", type=int, default=50, metavar="F",
                   help="80 ms frames per response; each response runs to F frames unless the model stops "
                        "(default: 50 = 4 s)")
    p.add_argument("--user-seconds", type=float, default=2.0, metavar="S",
                   help="seconds of synthetic 16 kHz user audio per turn (default: 2)")
    p.add_argument("--turns", type=int, default=2, metavar="T",
                   help="measured rounds (conversation turns) per concurrency level (default: 2)")
    p.add_argument("--warmup", type=int, default=1, metavar="W",
                   help="warm-up rounds per level, not recorded (default: 1)")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help=f"directory for bench.json, bench.md and bench.png (default: {DEFAULT_OUT})")
    p.add_argument("--per-frame", type=int_list, default=None, metavar="SHORT,LONG",
                   help="also time one response alone at SHORT and LONG frames (e.g. 24,200) and report ms per "
                        "frame as their difference (loading and prefill cancel out); eager, and compiled too "
                        "with --compile. --sessions 0 skips the concurrency levels")
    add_compile_argument(p)


def run(args: argparse.Namespace) -> int:
    if len(args.per_frame or [1, 2]) != 2 or (args.per_frame and args.per_frame[0] >= args.per_frame[1]):
        raise UsageError("--per-frame takes two frame counts, short then long (e.g. 24,200)")
    command = ["openchroma", "bench", "--model", str(args.model)] + (["--device", args.device] if args.device else [])
    command += ["--dtype", args.dtype, "--sessions", ",".join(map(str, args.sessions)) or "0",
                "--frames", str(args.frames), "--user-seconds", f"{args.user_seconds:g}", "--turns", str(args.turns),
                "--warmup", str(args.warmup), "--out", str(args.out)]
    command += ["--compile"] if args.compile else []
    command += ["--quantize", args.quantize] if args.quantize else []
    command += ["--per-frame", ",".join(map(str, args.per_frame))] if args.per_frame else []
    results, paths = bench(args.model, device=args.device, dtype=args.dtype, sessions=args.sessions,
                           frames=args.frames, user_seconds=args.user_seconds, turns=args.turns,
                           warmup=args.warmup, out_dir=args.out, command=shlex.join(command), compile=args.compile,
                           per_frame_lengths=tuple(args.per_frame) if args.per_frame else None,
                           quantize=args.quantize)
    print()
    print(paths["md"].read_text(), end="")
    print(f"\nwrote {paths['json']}, {paths['md']} and {paths['png']}")
    return 0


__all__ = ["bench", "run_bench", "per_frame", "machine_info", "synthetic_audio", "add_arguments", "run"]
