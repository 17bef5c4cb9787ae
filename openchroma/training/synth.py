"""``openchroma synth``: the paper's two-stage synthetic-data pipeline, writing a training manifest.

Stage 1 (text): each question is answered by Chroma's own Reasoner (text only, greedy; the default) or by
any OpenAI-compatible chat endpoint (``--llm-base-url``, ``--llm-model``). Stage 2 (speech): each answer is
spoken in a voice from ``--voices`` (``NAME.wav`` + ``NAME.txt``, the transcript) by any OpenAI-compatible
``/v1/audio/speech`` endpoint (``--tts-base-url``; the voice is sent by ``NAME``), by default by OpenChroma's
own forced-text speech in-process. A text question also gets user-side audio, spoken by the same TTS in
another voice. Requests run concurrently with retries; every finished item is on disk, so a rerun resumes.

Output (``--out``)::

    voices/NAME.wav, voices/NAME.txt      the voices used (copied, so the manifest is self-contained)
    answers.jsonl                         stage 1: {"id", "question", "answer"}
    audio/ID.response.wav, ID.user.wav    stage 2
    manifest.jsonl                        the training manifest (``openchroma prepare`` / ``train``)
    failures.jsonl                        items that failed after retries (rerun to retry them)
"""

from __future__ import annotations

import io
import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..constants import CODEC_SAMPLE_RATE
from ..engine.schedule import frames_for_seconds, frames_for_text
from ..tokenizer import system_message, text_message
from .data import write_manifest


@dataclass
class SynthConfig:
    questions: str
    voices: str
    out: str
    model: str | None = None
    device: str | None = None
    dtype: str = "float32"
    llm_base_url: str | None = None
    llm_model: str | None = None
    llm_api_key: str | None = None
    tts_base_url: str | None = None
    tts_model: str = "tts-1"
    tts_api_key: str | None = None
    system_prompt: str | None = None
    max_answer_tokens: int = 128
    max_seconds: float = 30.0
    user_audio: bool = True
    concurrency: int = 4
    retries: int = 3
    timeout: float = 120.0
    progress: bool = True


@dataclass
class Voice:
    name: str
    audio: Path
    text: str


def read_questions(path: str | Path) -> list[dict]:
    """Questions: a text file (one a line) or JSONL with ``question`` (and optional ``id``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such questions file")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(obj, dict) or not str(obj.get("question", "")).strip():
                raise ValueError(f"{path}:{n}: expected an object with a non-empty 'question'")
            out.append({"id": str(obj.get("id", f"q{n:06d}")), "question": str(obj["question"]).strip()})
        else:
            out.append({"id": f"q{n:06d}", "question": line.strip()})
    ids = [q["id"] for q in out]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: question ids are not unique")
    if not out:
        raise ValueError(f"{path}: no questions")
    return out


def read_voices(path: str | Path) -> list[Voice]:
    """Voices: ``NAME.wav`` (or .flac/.mp3/.ogg) with its transcript in ``NAME.txt``."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"{root}: no such voices directory")
    voices = []
    for audio in sorted(p for p in root.iterdir() if p.suffix.lower() in (".wav", ".flac", ".mp3", ".ogg")):
        txt = audio.with_suffix(".txt")
        if not txt.is_file() or not txt.read_text(encoding="utf-8").strip():
            raise ValueError(f"{audio}: no transcript (put the words it says in {txt.name})")
        voices.append(Voice(audio.stem, audio, txt.read_text(encoding="utf-8").strip()))
    if not voices:
        raise ValueError(f"{root}: no voices (NAME.wav + NAME.txt)")
    return voices


# ----------------------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------------------

def _post(url: str, body: dict, api_key: str | None, timeout: float) -> bytes:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {api_key}"} if api_key else {})})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read()


def with_retries(fn: Callable[[], object], retries: int, what: str) -> object:
    """Call ``fn``, retrying transient failures (network, HTTP 429/5xx) with exponential backoff."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except urllib.error.HTTPError as e:
            if e.code not in (408, 409, 429) and e.code < 500 or attempt == retries:
                detail = e.read()[:300].decode(errors="replace") if hasattr(e, "read") else ""
                raise RuntimeError(f"{what}: HTTP {e.code} {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            if attempt == retries:
                raise RuntimeError(f"{what}: {e}") from None
        time.sleep(min(8.0, 0.5 * 2**attempt))
    raise AssertionError("unreachable")


class LocalModel:
    """Chroma in-process: its Reasoner answers (text only), its forced-text speech speaks. One call at a time."""

    def __init__(self, model: str, device: str | None, dtype: str, progress: bool):
        from ..pipeline import Chroma

        self.chroma = Chroma.from_pretrained(model, device=device, dtype=dtype, progress=progress)
        self.lock = threading.Lock()
        self._voices: dict[str, object] = {}
        tok = self.chroma.tokenizer
        cfg = self.chroma.config
        vocab = cfg.thinker.vocab_size
        allowed = torch.zeros(vocab, dtype=torch.bool)
        known = [i for i in tok.hf.get_vocab().values() if i < vocab]
        allowed[known] = True
        for i in tok.special_ids:
            if i < vocab:
                allowed[i] = False
        self.end_ids = [cfg.im_end_token_id] + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
        self.allowed = allowed  # ordinary text tokens the tokenizer can write
        # An answer starts with something visible (not whitespace, a control character or a partial UTF-8 byte).
        first = allowed.clone()
        for i in allowed.nonzero().flatten().tolist():
            text = tok.decode([i])
            first[i] = bool(text.strip()) and text.isprintable() and "\ufffd" not in text
        self.first = first

    @torch.inference_mode()
    def answer(self, question: str, system: str | None, max_tokens: int) -> str:
        """Greedy text answer of the Reasoner (at least one token, at most ``max_tokens``)."""
        with self.lock:
            c = self.chroma
            m = c.model
            messages = [system_message(system or None), text_message("user", question)]
            ids = torch.tensor(c.prompt_ids(messages), device=c.lm.device)[None]
            n = ids.shape[1]
            cache = m.thinker.model.new_cache(1, n + max_tokens)
            h = m.thinker.model(m.thinker.embed(ids), torch.arange(n, device=ids.device)[None], cache, kv_len=n)
            out: list[int] = []
            for step in range(max_tokens):
                logits = m.thinker_logits(h[:, -1])[0].float()
                ok = (self.first if step == 0 else self.allowed).to(ids.device).clone()
                if step > 0:
                    ok[self.end_ids] = True
                token = int(logits.masked_fill(~ok, float("-inf")).argmax())
                if token in self.end_ids:
                    break
                out.append(token)
                pos = n + step
                h = m.thinker.model(m.thinker.embed(torch.tensor([[token]], device=ids.device)),
                                    torch.tensor([[pos]], device=ids.device), cache, kv_len=pos + 1)
            return c.tokenizer.decode(out, skip_special_tokens=True).strip()

    def speak(self, text: str, voice: Voice, max_frames: int) -> bytes:
        import soundfile as sf

        with self.lock:
            if voice.name not in self._voices:
                self._voices[voice.name] = self.chroma.voice(voice.audio, voice.text)
            reply = self.chroma.speak(text, self._voices[voice.name], max_new_frames=max_frames)
            buf = io.BytesIO()
            sf.write(buf, reply.audio.float().numpy(), reply.sample_rate, format="WAV", subtype="PCM_16")
            return buf.getvalue()

    def frames_needed(self, text: str) -> int:
        """Frames that carry ``text`` at one token per two frames (with im_end)."""
        return frames_for_text(len(self.chroma.tokenizer.encode(text))) + 1


def _save_wav_bytes(data: bytes, path: Path) -> None:
    import soundfile as sf

    from ..audio import AudioError, load_audio

    try:
        wav = load_audio(data, CODEC_SAMPLE_RATE)
    except AudioError as e:
        raise RuntimeError(f"the TTS returned unusable audio ({e})") from None
    tmp = path.with_suffix(".tmp.wav")
    sf.write(str(tmp), wav.numpy(), CODEC_SAMPLE_RATE, subtype="PCM_16")
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------------

def synth(cfg: SynthConfig, log: Callable[[str], None] = print) -> dict:
    """Run both stages; returns counts. Resumable: finished answers and audio are reused."""
    questions = read_questions(cfg.questions)
    voices = read_voices(cfg.voices)
    out = Path(cfg.out)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    (out / "voices").mkdir(exist_ok=True)
    for v in voices:
        for src in (v.audio, v.audio.with_suffix(".txt")):
            if not (out / "voices" / src.name).is_file():
                shutil.copy2(src, out / "voices" / src.name)
    local: LocalModel | None = None
    if not (cfg.llm_base_url and cfg.tts_base_url):
        if not cfg.model:
            raise ValueError("--model is needed for the in-process Reasoner and speech (or give both "
                             "--llm-base-url and --tts-base-url)")
        local = LocalModel(cfg.model, cfg.device, cfg.dtype, cfg.progress)
    if cfg.llm_base_url and not cfg.llm_model:
        raise ValueError("--llm-base-url needs --llm-model")
    failures: list[dict] = []
    workers = max(1, cfg.concurrency)

    # Stage 1: answers.
    answers_path = out / "answers.jsonl"
    answers: dict[str, dict] = {}
    if answers_path.is_file():
        for line in answers_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                a = json.loads(line)
                answers[a["id"]] = a
    todo = [q for q in questions if q["id"] not in answers]
    lock = threading.Lock()

    def answer(q: dict) -> dict:
        if cfg.llm_base_url:
            def call() -> str:
                body = {"model": cfg.llm_model, "max_tokens": cfg.max_answer_tokens,
                        "messages": ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else [])
                        + [{"role": "user", "content": q["question"]}]}
                raw = _post(cfg.llm_base_url.rstrip("/") + "/chat/completions", body, cfg.llm_api_key, cfg.timeout)
                return json.loads(raw)["choices"][0]["message"]["content"].strip()
            text = with_retries(call, cfg.retries, f"question {q['id']}")
        else:
            text = local.answer(q["question"], cfg.system_prompt, cfg.max_answer_tokens)
        if not text:
            raise RuntimeError(f"question {q['id']}: the answer is empty")
        return {"id": q["id"], "question": q["question"], "answer": text}

    with ThreadPoolExecutor(workers) as pool, answers_path.open("a", encoding="utf-8") as f:
        futures = {pool.submit(answer, q): q for q in todo}
        for fut in tqdm(as_completed(futures), total=len(futures), desc="Stage 1: answers", unit="question",
                        disable=not cfg.progress):
            q = futures[fut]
            try:
                a = fut.result()
            except Exception as e:  # recorded, the rest goes on
                failures.append({"id": q["id"], "stage": "answer", "error": str(e)})
                continue
            with lock:
                answers[a["id"]] = a
                f.write(json.dumps(a, ensure_ascii=False) + "\n")
                f.flush()

    # Stage 2: speech.
    max_frames = frames_for_seconds(cfg.max_seconds)

    def tts(text: str, voice: Voice, path: Path) -> None:
        if path.is_file():
            return
        if cfg.tts_base_url:
            body = {"model": cfg.tts_model, "input": text, "voice": voice.name, "response_format": "wav"}
            data = with_retries(lambda: _post(cfg.tts_base_url.rstrip("/") + "/audio/speech", body,
                                              cfg.tts_api_key, cfg.timeout), cfg.retries, f"speech for {path.name}")
        else:
            frames = max(local.frames_needed(text), 2)
            if frames > max_frames:
                raise RuntimeError(f"{path.name}: the text needs {frames} frames, more than --max-seconds allows")
            data = local.speak(text, voice, max_frames)
        _save_wav_bytes(data, path)

    items = []
    for i, q in enumerate(questions):
        if q["id"] not in answers:
            continue
        voice = voices[i % len(voices)]
        user_voice = voices[(i + 1) % len(voices)]
        items.append((q, answers[q["id"]]["answer"], voice, user_voice))

    def speak_item(item) -> dict:
        q, text, voice, user_voice = item
        resp = out / "audio" / f"{q['id']}.response.wav"
        tts(text, voice, resp)
        row = {"id": q["id"], "voice_audio": f"voices/{voice.audio.name}", "voice_text": voice.text,
               "response_text": text, "response_audio": f"audio/{resp.name}"}
        if cfg.user_audio:
            user = out / "audio" / f"{q['id']}.user.wav"
            tts(q["question"], user_voice, user)
            row["user_audio"] = f"audio/{user.name}"
        else:
            row["user_text"] = q["question"]
        return row

    rows: dict[str, dict] = {}
    with ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(speak_item, it): it[0] for it in items}
        for fut in tqdm(as_completed(futures), total=len(futures), desc="Stage 2: speech", unit="answer",
                        disable=not cfg.progress):
            q = futures[fut]
            try:
                rows[q["id"]] = fut.result()
            except Exception as e:
                failures.append({"id": q["id"], "stage": "speech", "error": str(e)})
    ordered = [rows[q["id"]] for q in questions if q["id"] in rows]
    manifest = write_manifest(out / "manifest.jsonl", ordered)
    fail_path = out / "failures.jsonl"
    if failures:
        fail_path.write_text("".join(json.dumps(f) + "\n" for f in failures))
        log(f"{len(failures)} item(s) failed (see {fail_path}); run the same command again to retry them")
    else:
        fail_path.unlink(missing_ok=True)
    return {"manifest": str(manifest), "examples": len(ordered), "failed": len(failures)}
