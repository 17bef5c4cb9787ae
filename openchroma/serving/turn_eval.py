"""Premature turn ends and added latency of ``semantic_vad`` against ``server_vad``, on espeak-ng speech.

``python -m openchroma.serving.turn_eval`` speaks complete sentences and sentences cut mid-clause ("I was thinking
that we could") with several espeak-ng voices, plays each as a realtime client would (20 ms chunks at 24 kHz:
0.5 s of silence, the speech, then silence) through each detector, and reports, per detector:

* on cut sentences, how often the turn ended within 1 s and 2 s of silence: a speaker who pauses that long to
  think is cut off (premature turn ends);
* on complete sentences, how long after the speech the turn ended (the reply can only start then);
* the model's cost per check (features and the ONNX call, on this machine's CPU).

It lives under ``serving/`` because it drives the serving detectors; it needs the ``espeak-ng`` program.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from openchroma.audio import load_audio

from .turn_detection import SemanticVAD, SemanticVADConfig, load_turn_model, smart_turn_features
from .vad import StreamingVAD, VADConfig

COMPLETE = (
    "I would like to book a table for two people tonight.",
    "What time does the pharmacy close on Sundays?",
    "Can you tell me how the weather will be tomorrow?",
    "Thanks, that is all I needed.",
    "My name is Anna and I live in Berlin.",
    "Please turn off the lights in the kitchen.",
    "I think we should leave at eight.",
    "How much does a ticket to London cost?",
    "The meeting went really well today.",
    "Could you send me the report by Friday?",
    "I am looking for a good Italian restaurant nearby.",
    "That sounds great, let's do it.",
    "Where did you park the car?",
    "I lost my keys again this morning.",
    "Set an alarm for seven tomorrow morning.",
    "We watched a movie and went to bed.",
)
CUT = (  # stopped mid-clause: the speaker has more to say
    "I was thinking that we could",
    "Can you tell me about the",
    "My favourite thing to do on weekends is",
    "I need to book a flight to",
    "The reason I am calling is that",
    "So what I would really like is",
    "Could you remind me to call my",
    "I have been trying to find a",
    "When I get home I usually",
    "Yesterday we went to the park and",
    "If it rains tomorrow then",
    "The best way to get there is by",
    "I wanted to ask you whether",
    "Let me think about the",
    "My brother told me that he",
    "Before we start I would like to",
)
VOICES = ("en-us", "en-us+f2", "en-us+m3", "en-gb-scotland+f4")
RATE = 24000  # what realtime clients send
CHUNK_MS = 20
LEAD_S, TAIL_S = 0.5, 9.0  # silence before the speech; after it, more than the longest wait (low: 8 s)


def speak(text: str, voice: str = "en-us", rate: int = RATE, words_per_minute: int = 150) -> np.ndarray:
    """``text`` said by espeak-ng ``voice``: float32 mono at ``rate``, cut after its last audible sample."""
    import soundfile as sf

    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng)")
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "say.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(words_per_minute), "-w", str(wav), text],
                       check=True, capture_output=True)
        audio, source_rate = sf.read(str(wav), dtype="float32")
    audio = load_audio(audio, rate, source_rate=source_rate).numpy()
    return audio[: np.flatnonzero(np.abs(audio) > 0.01)[-1] + 1]


@dataclass
class Run:
    """One clip through one detector: when (ms after the speech ended) the first turn ended, if it did."""

    voice: str
    text: str
    complete: bool
    end_ms: float | None
    checks: list[tuple[float, float]] = field(default_factory=list)  # (probability, seconds) per model call


def play(detector: StreamingVAD | SemanticVAD, speech: np.ndarray, rate: int = RATE) -> tuple[float | None, list]:
    """Stream silence, ``speech``, silence in 20 ms chunks; -> (ms after the speech's end at which the first
    ``speech_stopped`` was emitted or None, the model checks made)."""
    lead, tail = np.zeros(int(LEAD_S * rate), np.float32), np.zeros(int(TAIL_S * rate), np.float32)
    audio = np.concatenate((lead, speech, tail))
    speech_end_ms = 1000 * (len(lead) + len(speech)) / rate
    step = rate * CHUNK_MS // 1000
    checks, last = [], None
    for i in range(0, len(audio), step):
        events = detector.push(audio[i : i + step])
        check = getattr(detector, "last_check", None)
        if check is not None and check is not last:
            checks.append((check.probability, check.seconds))
            last = check
        if any(e.kind == "speech_stopped" for e in events):
            return 1000 * min(i + step, len(audio)) / rate - speech_end_ms, checks
    return None, checks


DETECTORS = {  # name -> (factory, silence before a decision, ms)
    "server_vad 200 ms": (lambda: StreamingVAD(VADConfig(silence_duration_ms=200), RATE), 200),
    "server_vad 500 ms": (lambda: StreamingVAD(VADConfig(silence_duration_ms=500), RATE), 500),
    "semantic_vad high": (lambda: SemanticVAD(SemanticVADConfig("high"), RATE), 200),
    "semantic_vad medium": (lambda: SemanticVAD(SemanticVADConfig("medium"), RATE), 200),
    "semantic_vad low": (lambda: SemanticVAD(SemanticVADConfig("low"), RATE), 200),
    "semantic_vad medium, 500 ms": (lambda: SemanticVAD(SemanticVADConfig("medium", check_silence_ms=500), RATE),
                                    500),
}


def _share(runs: list[Run], within_ms: float) -> float:
    return sum(r.end_ms is not None and r.end_ms <= within_ms for r in runs) / len(runs)


def summarize(name: str, runs: list[Run]) -> dict:
    cut = [r for r in runs if not r.complete]
    done = [r for r in runs if r.complete]
    delays = sorted(r.end_ms for r in done if r.end_ms is not None)
    return {
        "detector": name,
        "cut_ended_1s": _share(cut, 1000), "cut_ended_2s": _share(cut, 2000),
        "complete_ended_1s": _share(done, 1000),
        "complete_median_ms": statistics.median(delays) if delays else None,
        "complete_p90_ms": delays[int(0.9 * (len(delays) - 1))] if delays else None,
        "unended": sum(r.end_ms is None for r in runs),
        "checks": len(costs := sorted(1000 * s for r in runs for _, s in r.checks)),
        "check_median_ms": statistics.median(costs) if costs else None,
    }


def check_cost(repeats: int = 30) -> dict:
    """Milliseconds per check on this machine: features, the ONNX call, both (median and p90 of ``repeats``)."""
    model = load_turn_model()
    audio = speak(COMPLETE[0], rate=16000)
    feats = smart_turn_features(audio)
    out = {}
    for what, fn in (("features", lambda: smart_turn_features(audio)),
                     ("onnx", lambda: model.predict(feats)),
                     ("check", lambda: model.probability(audio))):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t))
        times.sort()
        out[what] = {"median_ms": statistics.median(times), "p90_ms": times[int(0.9 * (repeats - 1))]}
    return out


def markdown(rows: list[dict], cost: dict, clips: int) -> str:
    def pct(x: float) -> str:
        return f"{100 * x:.0f} %"

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x:.0f}"

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [f"{clips} clips (espeak-ng voices x {len(COMPLETE)} complete + {len(CUT)} cut sentences); "
             f"{os.cpu_count()} CPUs, load average {load}, torch threads {torch.get_num_threads()}", "",
             "| detector | cut: ended within 1 s | cut: within 2 s | complete: within 1 s "
             "| complete: median ms | complete: p90 ms | never ended | checks (median ms) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['detector']} | {pct(r['cut_ended_1s'])} | {pct(r['cut_ended_2s'])} | "
                     f"{pct(r['complete_ended_1s'])} | {ms(r['complete_median_ms'])} | {ms(r['complete_p90_ms'])} "
                     f"| {r['unended']} | {r['checks']} ({ms(r['check_median_ms'])}) |")
    lines += ["", "| per check | median ms | p90 ms |", "|---|---|---|"]
    lines += [f"| {k} | {v['median_ms']:.1f} | {v['p90_ms']:.1f} |" for k, v in cost.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m openchroma.serving.turn_eval", description=__doc__.split("\n")[0])
    parser.add_argument("--voices", type=int, default=len(VOICES), help="how many of the espeak-ng voices to use")
    parser.add_argument("--json", type=Path, help="also write every run and the summary here")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch's intra-op threads for silero and the features (default 1: on a busy machine "
                             "more threads wait for each other, ~40x slower per silero window on 2 shared cores)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    clips = [(v, t, t in COMPLETE, speak(t, v)) for v in VOICES[: args.voices] for t in (*COMPLETE, *CUT)]
    rows, runs_out, probs = [], {}, {True: [], False: []}
    for name, (factory, _) in DETECTORS.items():
        runs = []
        for voice, text, complete, speech in clips:
            end_ms, checks = play(factory(), speech)
            runs.append(Run(voice, text, complete, end_ms, checks))
            if name == "semantic_vad medium" and checks:
                probs[complete].append(checks[0][0])
        rows.append(summarize(name, runs))
        runs_out[name] = [asdict(r) for r in runs]
        print(f"done: {rows[-1]}", flush=True)
    cost = check_cost()
    print(markdown(rows, cost, len(clips)))
    for complete, ps in probs.items():
        if ps:
            print(f"first-check probability, {'complete' if complete else 'cut'}: mean {np.mean(ps):.2f}, "
                  f">= 0.5 in {100 * np.mean(np.array(ps) >= 0.5):.0f} % of {len(ps)}")
    if args.json:
        args.json.write_text(json.dumps({"summary": rows, "cost": cost, "runs": runs_out}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
