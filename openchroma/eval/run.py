"""``openchroma eval``: speak a test list through the streaming engine (or take existing audio) and score it."""

from __future__ import annotations

import json
import math
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..constants import REASONER_SAMPLE_RATE
from ..engine.schedule import DEFAULT_MAX_FRAMES
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
    sim_model: str = "auto"
    asr_model: str = "auto"
    max_frames: int = DEFAULT_MAX_FRAMES
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


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


class Synthesizer:
    """Speaks list items through the streaming engine, timing them as a client does."""

    def __init__(self, settings: EvalSettings):
        from ..engine import Engine
        from ..pipeline import Chroma

        chroma = Chroma.from_pretrained(settings.model, device=settings.device, dtype=settings.dtype,
                                        progress=settings.progress)
        self.engine = Engine(chroma, max_sessions=1, max_response_frames=settings.max_frames)
        self.sample_rate = self.engine.sample_rate
        self.max_frames = settings.max_frames
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
            synth.speak(item, max_frames=min(settings.max_frames, 5))
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
