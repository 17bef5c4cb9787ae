"""``openchroma eval``: speak a test list through the streaming engine (or take existing audio) and score it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..cli_args import MODEL_HELP, UsageError, add_max_frames_argument, add_model_arguments, check_max_frames
from ..constants import REASONER_SAMPLE_RATE
from ..engine.schedule import DEFAULT_MAX_FRAMES
from ..reporting import fmt
from .asr import ASR_RATE, WerScorer, load_recognizer
from .report import summarize, write_plots, write_report_md
from .speaker import SIM_RATE, cosine_similarity, load_speaker_model
from .testlist import EvalInputError, TestItem

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
# The paper's latency breakdown; the engine may report any of these in ResponseDone.timings as "<stage>..._ms".
STAGES = {"reasoner": ("reasoner", "thinker"), "backbone": ("backbone",), "decoder": ("decoder",),
          "codec": ("codec", "mimi")}


@dataclass
class EvalSettings:
    task: str = "tts"
    model: str | None = None           # a checkpoint to synthesise with; None when scoring --audio-dir
    audio_dir: Path | None = None
    device: str | None = None
    dtype: str = "float32"
    quantize: str | None = None        # int8, int4 or fp8 weights (docs/low-memory.md)
    sim_model: str = "auto"
    asr_model: str = "auto"
    max_frames: int | None = None      # None: 750 (60 s), or 50 (4 s) for an init-random checkpoint
    warmup: int = 1
    progress: bool = True


def find_existing_audio(items: list[TestItem], audio_dir: Path) -> dict[str, Path]:
    """``utt`` -> the file named after it in ``audio_dir`` (any of AUDIO_EXTENSIONS)."""
    if not audio_dir.is_dir():
        raise EvalInputError(f"--audio-dir {audio_dir} is not a directory")
    found: dict[str, Path] = {}
    for item in items:
        for ext in AUDIO_EXTENSIONS:
            if (audio_dir / f"{item.utt}{ext}").is_file():
                found[item.utt] = audio_dir / f"{item.utt}{ext}"
                break
    if not found:
        raise EvalInputError(f"none of the list's {len(items)} utterances has a file in {audio_dir} "
                             f"(expected e.g. {audio_dir / (items[0].utt + '.wav')})")
    return found


def stage_breakdown(timings: dict[str, float]) -> dict[str, float | None]:
    """Per-stage milliseconds from the engine's timings, None for a stage it does not report."""
    out: dict[str, float | None] = {}
    for stage, names in STAGES.items():
        keys = [k for k in timings if k.endswith("_ms") and any(k.startswith(n) for n in names)]
        out[stage] = float(timings[sorted(keys, key=len)[0]]) if keys else None
    return out


def max_frames_for(settings: EvalSettings) -> int:
    """The frame limit per utterance: ``settings.max_frames``, else 60 s, or 4 s for a random checkpoint."""
    from ..config import response_frame_limit

    return response_frame_limit(settings.model, settings.max_frames, DEFAULT_MAX_FRAMES)


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


class Synthesizer:
    """Speaks list items through the streaming engine, timing them as a client does."""

    def __init__(self, settings: EvalSettings):
        from ..engine import Engine
        from ..pipeline import Chroma

        self.max_frames = max_frames_for(settings)
        chroma = Chroma.from_pretrained(settings.model, device=settings.device, dtype=settings.dtype,
                                        progress=settings.progress, max_frames=self.max_frames,
                                        quantize=settings.quantize)
        self.engine = Engine(chroma, max_sessions=1, max_response_frames=self.max_frames)
        self.sample_rate = self.engine.sample_rate
        self.task = settings.task
        self._voices: dict[tuple[Path, str], str] = {}

    def _voice(self, item: TestItem) -> str:
        key = (item.prompt_wav, item.prompt_text)
        if key not in self._voices:
            name = f"eval-voice-{len(self._voices)}"
            self.engine.register_voice(name, str(item.prompt_wav), item.prompt_text)
            self._voices[key] = name
        return self._voices[key]

    def speak(self, item: TestItem, max_frames: int | None = None) -> dict[str, Any]:
        from ..audio import load_audio
        from ..engine import AudioChunk, ResponseDone

        session = self.engine.create_session(self._voice(item))
        try:
            if self.task == "dialogue":
                user = load_audio(str(item.user_wav), REASONER_SAMPLE_RATE).numpy()
                session.append_audio(user, REASONER_SAMPLE_RATE)
            chunks: list[np.ndarray] = []
            t_first = None
            t0 = time.perf_counter()
            response = session.respond(max_frames=max_frames or self.max_frames,
                                       forced_text=item.target_text if self.task == "tts" else None)
            done = None
            for event in response:
                if isinstance(event, AudioChunk):
                    if t_first is None:
                        t_first = time.perf_counter()
                    chunks.append(np.asarray(event.audio, dtype=np.float32))
                elif isinstance(event, ResponseDone):
                    done = event
            t_end = time.perf_counter()
        finally:
            session.close()
        if done is None or done.stop_reason == "error":
            raise RuntimeError(f"the engine failed: {getattr(done, 'error', None) or 'no final event'}")
        audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
        seconds = audio.size / self.sample_rate
        timings = {k: _finite(v) for k, v in (done.timings or {}).items()}
        return {"audio": audio, "text": done.text, "stop_reason": done.stop_reason, "frames": done.frames,
                "audio_seconds": seconds,
                "ttft_ms": (t_first - t0) * 1000 if t_first is not None else None,
                "rtf": (t_end - t0) / seconds if seconds else None,
                "engine_timings": timings, "breakdown_ms": stage_breakdown(timings)}

    def close(self) -> None:
        self.engine.close()


def _warm_up(synth: Synthesizer, items: list[TestItem], settings: EvalSettings) -> None:
    """Unrecorded responses first: they pay one-time costs (allocations, kernel selection, caches) that would
    otherwise land in the first utterance's TTFT. An item that fails here is skipped; the run reports it later."""
    done = 0
    for item in items:
        if done >= settings.warmup:
            break
        try:
            synth.speak(item, max_frames=min(synth.max_frames, 5))
            done += 1
        except Exception:
            continue


def _load_16k(source, rate: int | None = None) -> np.ndarray:
    from ..audio import load_audio

    return load_audio(source, SIM_RATE, source_rate=rate).numpy()


def evaluate(items: list[TestItem], out_dir: str | Path, settings: EvalSettings,
             command: str | None = None) -> dict[str, Any]:
    """Run the whole evaluation; write results.json, report.md and plots to ``out_dir``; return the results."""
    import soundfile as sf
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    existing = find_existing_audio(items, settings.audio_dir) if settings.audio_dir is not None else {}
    if settings.audio_dir is None and not settings.model:
        raise EvalInputError("give --model to synthesise the list, or --audio-dir to score existing audio")
    assert SIM_RATE == ASR_RATE  # one 16 kHz copy of each output feeds both scorers
    out_dir.mkdir(parents=True, exist_ok=True)

    import torch

    # The scoring models run where the model does (Whisper-large-v3 on a CPU takes seconds per utterance).
    score_device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    embedder = load_speaker_model(settings.sim_model, score_device)
    recognizer = load_recognizer(settings.asr_model, score_device)
    wer = WerScorer(recognizer.spelling)
    synth = Synthesizer(settings) if settings.audio_dir is None else None
    if synth is not None:
        settings = dataclasses.replace(settings, max_frames=synth.max_frames)   # the limit applied, reported
    audio_out = out_dir / "audio"
    if synth is not None:
        audio_out.mkdir(exist_ok=True)

    prompt_embeddings: dict[Path, np.ndarray] = {}
    rows: list[dict[str, Any]] = []
    try:
        if synth is not None and settings.warmup > 0:
            _warm_up(synth, items, settings)
        for item in tqdm(items, desc="eval", unit="utt", disable=not settings.progress):
            row: dict[str, Any] = {"utt": item.utt, "sim": None, "wer": None, "transcript": None,
                                   "reference_text": item.target_text, "ttft_ms": None, "rtf": None}
            try:
                if synth is not None:
                    spoken = synth.speak(item)
                    audio = spoken.pop("audio")
                    wav_path = audio_out / f"{item.utt}.wav"
                    sf.write(str(wav_path), audio, synth.sample_rate, subtype="PCM_16")
                    row.update(spoken, audio=str(wav_path.relative_to(out_dir)))
                    if audio.size == 0:
                        raise RuntimeError("the engine returned no audio")
                    out16 = _load_16k(audio, synth.sample_rate)
                    if item.target_text is None:
                        row["reference_text"] = spoken["text"]
                else:
                    path = existing.get(item.utt)
                    if path is None:
                        raise FileNotFoundError(f"no audio for {item.utt} in {settings.audio_dir}")
                    row["audio"] = str(path)
                    out16 = _load_16k(str(path))
                    if item.target_text is None:
                        text_file = path.with_suffix(".txt")
                        row["reference_text"] = text_file.read_text(encoding="utf-8").strip() \
                            if text_file.is_file() else None
                if item.prompt_wav not in prompt_embeddings:
                    prompt_embeddings[item.prompt_wav] = embedder.embed(_load_16k(str(item.prompt_wav)))
                row["sim"] = cosine_similarity(embedder.embed(out16), prompt_embeddings[item.prompt_wav])
                row["transcript"] = recognizer.transcribe(out16)
                if row["reference_text"]:
                    row["wer"] = wer(row["reference_text"], row["transcript"])
            except Exception as e:  # a failed utterance is reported and the run goes on
                row["error"] = f"{type(e).__name__}: {e}"
                row["traceback"] = traceback.format_exc(limit=3)
            rows.append(row)
    finally:
        if synth is not None:
            synth.close()

    results = {"summary": summarize(rows, settings, sim_model=embedder.name, asr_model=recognizer.name,
                                    command=command, normalize=wer.normalize),
               "utterances": rows}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    plots = write_plots(rows, out_dir)
    write_report_md(results, plots, out_dir / "report.md")
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Speak every utterance of a seed-tts-eval test list in the voice of its prompt through the "
                     "streaming engine (--model), or take existing audio files named <utt>.wav (--audio-dir), and "
                     "score them: SIM (speaker-verification cosine similarity of output and prompt), WER (speech "
                     "recognition of the output against the text), TTFT and RTF as a client of the engine sees them. "
                     "Writes results.json, report.md (with the paper's figures) and PNG plots to --out. A "
                     "random-weight checkpoint speaks noise: its SIM and WER mean nothing.")
    p.epilog = ("List format (paths relative to the list; '#' comments): tts: utt|prompt_text|prompt_wav|target_text; "
                "dialogue: utt|prompt_text|prompt_wav|user_wav.")
    add_model_arguments(p, quantize=True, required=False, model_help=MODEL_HELP + "; omit with --audio-dir")
    p.add_argument("--list", required=True, metavar="FILE", help="the test list (see the format below)")
    p.add_argument("--task", default="tts", choices=["tts", "dialogue"],
                   help="tts: speak target_text (forced text); dialogue: answer user_wav, whose answer text is "
                        "the WER reference (default: tts)")
    p.add_argument("--audio-dir", default=None, metavar="DIR",
                   help="score existing audio <utt>.wav (.flac/.ogg/.mp3) instead of synthesising; for dialogue, "
                        "<utt>.txt holds the answer's text")
    p.add_argument("--out", required=True, metavar="DIR", help="where results.json, report.md, plots and audio go")
    p.add_argument("--sim-model", default="auto", metavar="NAME",
                   help="auto (WavLM speaker verification if its weights load, else resemblyzer), wavlm, "
                        "resemblyzer (offline), or a transformers x-vector model id/directory (default: auto)")
    p.add_argument("--asr-model", default="auto", metavar="NAME",
                   help="auto (Whisper-large-v3 if its weights load, else pocketsphinx), whisper, pocketsphinx "
                        "(offline), or a transformers Whisper model id/directory (default: auto)")
    add_max_frames_argument(p, "utterance")
    p.add_argument("--warmup", type=int, default=1, help="unrecorded warm-up responses before timing (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from .models import ScoringModelUnavailable
    from .testlist import read_test_list

    if bool(args.model) == bool(args.audio_dir):
        raise UsageError("give either --model (synthesise the list) or --audio-dir (score existing audio)")
    check_max_frames(args.max_frames)
    items = read_test_list(args.list, args.task)  # every problem in the list is found before any model loads
    audio_dir = Path(args.audio_dir) if args.audio_dir else None
    settings = EvalSettings(task=args.task, model=args.model, audio_dir=audio_dir,
                            device=args.device, dtype=args.dtype, quantize=args.quantize, sim_model=args.sim_model,
                            asr_model=args.asr_model,
                            max_frames=args.max_frames, warmup=args.warmup, progress=not args.no_progress)
    argv = ["openchroma", "eval", "--list", str(args.list), "--task", args.task, "--out", str(args.out),
            "--sim-model", args.sim_model, "--asr-model", args.asr_model]
    argv += ["--model", str(args.model)] + (["--max-frames", str(args.max_frames)] if args.max_frames else []) \
        + (["--quantize", args.quantize] if args.quantize else []) \
        if args.model else ["--audio-dir", str(args.audio_dir)]
    try:
        results = evaluate(items, args.out, settings, command=shlex.join(argv))
    except ScoringModelUnavailable as e:
        print(f"openchroma eval: error: {e}", file=sys.stderr)
        return 1
    s = results["summary"]
    print(f"SIM {fmt(s['sim_mean'], 3)}  WER {fmt(s['wer_mean'], 3)}  TTFT p50 {fmt(s['ttft_ms_p50'], 1)} ms  "
          f"p90 {fmt(s['ttft_ms_p90'], 1)} ms  RTF {fmt(s['rtf_mean'], 3)}  "
          f"({s['utterances']} utterances, {s['failed']} failed)")
    print(f"SIM model: {s['sim_model']}\nASR model: {s['asr_model']}")
    print(f"wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'report.md'}")
    return 0
