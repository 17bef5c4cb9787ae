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

import argparse
import io
import json
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..cli_args import add_model_arguments, env_default
from ..constants import CODEC_SAMPLE_RATE
from ..engine.schedule import frames_for_seconds, frames_for_text
from ..reporting import require
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

class Endpoints:
    """The OpenAI-compatible services (``--llm-base-url``, ``--tts-base-url``), called with the ``openai`` SDK:
    its clients retry connection errors, 408, 409, 429 and 5xx with exponential backoff, and time out."""

    def __init__(self, cfg: SynthConfig):
        def client(base_url: str | None, api_key: str | None):
            if not base_url:
                return None
            from openai import OpenAI

            # The SDK insists on a key; local servers take any.
            return OpenAI(base_url=base_url, api_key=api_key or "none", max_retries=cfg.retries, timeout=cfg.timeout)

        self.cfg = cfg
        self.llm = client(cfg.llm_base_url, cfg.llm_api_key)
        self.tts = client(cfg.tts_base_url, cfg.tts_api_key)

    def answer(self, question: str) -> str:
        cfg = self.cfg
        messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []) + \
            [{"role": "user", "content": question}]
        reply = self._call(lambda: self.llm.chat.completions.create(
            model=cfg.llm_model, messages=messages, max_tokens=cfg.max_answer_tokens))
        return (reply.choices[0].message.content or "").strip()

    def speak(self, text: str, voice: Voice) -> bytes:
        reply = self._call(lambda: self.tts.audio.speech.create(
            model=self.cfg.tts_model, input=text, voice=voice.name, response_format="wav"))
        return reply.content

    @staticmethod
    def _call(fn: Callable[[], object]):
        """``fn()``, its SDK errors (after the SDK's retries) as one-line ``RuntimeError``s."""
        import openai

        try:
            return fn()
        except openai.APIStatusError as e:
            raise RuntimeError(f"HTTP {e.status_code} {str(e.body or e.message)[:300]}") from None
        except openai.APIError as e:
            raise RuntimeError(str(e)) from None


class LocalModel:
    """Chroma in-process: its Reasoner answers (text only), its forced-text speech speaks. One call at a time."""

    def __init__(self, model: str, device: str | None, dtype: str, progress: bool, max_frames: int):
        from ..pipeline import Chroma

        self.chroma = Chroma.from_pretrained(model, device=device, dtype=dtype, progress=progress,
                                             max_frames=max_frames)
        self.lock = threading.Lock()
        self._voices: dict[str, object] = {}
        tok = self.chroma.tokenizer
        cfg = self.chroma.config
        vocab = cfg.reasoner.vocab_size
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
                logits = m.reasoner_logits(h[:, -1])[0].float()
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
    if cfg.llm_base_url and not cfg.llm_model:
        raise ValueError("--llm-base-url needs --llm-model")
    if not (cfg.llm_base_url and cfg.tts_base_url) and not cfg.model:
        raise ValueError("--model is needed for the in-process Reasoner and speech (or give both "
                         "--llm-base-url and --tts-base-url)")
    out = Path(cfg.out)
    _copy_voices(voices, out)
    remote = Endpoints(cfg)
    local = None if (cfg.llm_base_url and cfg.tts_base_url) else \
        LocalModel(cfg.model, cfg.device, cfg.dtype, cfg.progress, frames_for_seconds(cfg.max_seconds))
    failures: list[dict] = []
    answers = _answer_all(cfg, questions, out / "answers.jsonl", remote, local, failures)
    items = []
    for i, q in enumerate(questions):
        if q["id"] in answers:
            items.append((q, answers[q["id"]]["answer"], voices[i % len(voices)], voices[(i + 1) % len(voices)]))
    rows = _speak_all(cfg, items, out, remote, local, failures)
    ordered = [rows[q["id"]] for q in questions if q["id"] in rows]
    manifest = write_manifest(out / "manifest.jsonl", ordered)
    fail_path = out / "failures.jsonl"
    if failures:
        fail_path.write_text("".join(json.dumps(f) + "\n" for f in failures))
        log(f"{len(failures)} item(s) failed (see {fail_path}); run the same command again to retry them")
    else:
        fail_path.unlink(missing_ok=True)
    return {"manifest": str(manifest), "examples": len(ordered), "failed": len(failures)}


def _copy_voices(voices: list[Voice], out: Path) -> None:
    """The voices into ``out/voices`` (so the manifest is self-contained)."""
    (out / "audio").mkdir(parents=True, exist_ok=True)
    (out / "voices").mkdir(exist_ok=True)
    for v in voices:
        for src in (v.audio, v.audio.with_suffix(".txt")):
            if not (out / "voices" / src.name).is_file():
                shutil.copy2(src, out / "voices" / src.name)


def _run_all(cfg: SynthConfig, work: dict, fn: Callable, desc: str, unit: str, stage: str,
             failures: list[dict]) -> Iterator[tuple[str, object]]:
    """``fn(item)`` for every ``id -> item`` of ``work`` on ``cfg.concurrency`` threads, yielding ``(id, result)``
    as they finish; a failure is recorded in ``failures`` and the rest goes on."""
    with ThreadPoolExecutor(max(1, cfg.concurrency)) as pool:
        futures = {pool.submit(fn, item): key for key, item in work.items()}
        for fut in tqdm(as_completed(futures), total=len(futures), desc=desc, unit=unit, disable=not cfg.progress):
            try:
                yield futures[fut], fut.result()
            except Exception as e:
                failures.append({"id": futures[fut], "stage": stage, "error": str(e)})


def _answer_all(cfg: SynthConfig, questions: list[dict], path: Path, remote: Endpoints, local: LocalModel | None,
                failures: list[dict]) -> dict[str, dict]:
    """Stage 1: an answer for every question not answered in ``path`` yet (appended to it as they come)."""
    answers: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                a = json.loads(line)
                answers[a["id"]] = a

    def answer(q: dict) -> dict:
        text = remote.answer(q["question"]) if cfg.llm_base_url else \
            local.answer(q["question"], cfg.system_prompt, cfg.max_answer_tokens)
        if not text:
            raise RuntimeError(f"question {q['id']}: the answer is empty")
        return {"id": q["id"], "question": q["question"], "answer": text}

    todo = {q["id"]: q for q in questions if q["id"] not in answers}
    with path.open("a", encoding="utf-8") as f:
        for _, a in _run_all(cfg, todo, answer, "Stage 1: answers", "question", "answer", failures):
            answers[a["id"]] = a
            f.write(json.dumps(a, ensure_ascii=False) + "\n")
            f.flush()
    return answers


def _speak_all(cfg: SynthConfig, items: list[tuple], out: Path, remote: Endpoints, local: LocalModel | None,
               failures: list[dict]) -> dict[str, dict]:
    """Stage 2: each answer (and, unless text questions, each question) spoken; the manifest rows by id."""
    max_frames = frames_for_seconds(cfg.max_seconds)

    def tts(text: str, voice: Voice, path: Path) -> None:
        if path.is_file():
            return
        if cfg.tts_base_url:
            data = remote.speak(text, voice)
        else:
            frames = max(local.frames_needed(text), 2)
            if frames > max_frames:
                raise RuntimeError(f"{path.name}: the text needs {frames} frames, more than --max-seconds allows")
            data = local.speak(text, voice, max_frames)
        _save_wav_bytes(data, path)

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

    work = {it[0]["id"]: it for it in items}
    return dict(_run_all(cfg, work, speak_item, "Stage 2: speech", "answer", "speech", failures))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("The paper's synthetic-data pipeline. Stage 1: each question (a text file, one a line, or JSONL "
                     "with 'question') is answered by Chroma's own Reasoner (text only, the default; needs --model) "
                     "or by an OpenAI-compatible chat endpoint (--llm-base-url, --llm-model). Stage 2: each answer "
                     "is spoken in a voice from --voices (NAME.wav + NAME.txt transcript; voices are used in turn) "
                     "by an OpenAI-compatible /v1/audio/speech endpoint (--tts-base-url; the voice is sent by NAME) "
                     "or, by default, by OpenChroma's forced-text speech in-process; the question is spoken too, in "
                     "the next voice, as the user's audio. Writes OUT/manifest.jsonl for `openchroma prepare`/"
                     "`train`. Concurrent, with retries; rerun the same command to resume or retry failures.")
    p.add_argument("--questions", required=True, help="questions file (.txt one a line, or .jsonl)")
    p.add_argument("--voices", required=True, help="directory of NAME.wav + NAME.txt reference recordings")
    p.add_argument("--out", required=True, help="output directory (audio, answers.jsonl, manifest.jsonl)")
    add_model_arguments(p, required=False, model_help="Chroma checkpoint for the in-process Reasoner and speech "
                                                      "(needed unless both endpoints are given)")
    p.add_argument("--llm-base-url", default=None, help="OpenAI-compatible base URL for answers, e.g. "
                                                        "http://localhost:8001/v1")
    p.add_argument("--llm-model", default=None, help="model name for --llm-base-url")
    p.add_argument("--llm-api-key", default=env_default("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    p.add_argument("--tts-base-url", default=None, help="OpenAI-compatible base URL for /audio/speech")
    p.add_argument("--tts-model", default="tts-1", help="model name for --tts-base-url (default tts-1)")
    p.add_argument("--tts-api-key", default=env_default("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    p.add_argument("--system-prompt", default=None, help="system prompt for the answers")
    p.add_argument("--max-answer-tokens", type=int, default=128, help="longest answer, tokens (default 128)")
    p.add_argument("--max-seconds", type=float, default=30.0, help="longest spoken answer (default 30)")
    p.add_argument("--text-questions", action="store_true",
                   help="keep questions as user_text instead of speaking them as user_audio")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    p.add_argument("--retries", type=int, default=3, help="retries of a failed request (default 3)")


def run(args: argparse.Namespace) -> int:
    if (args.llm_base_url or args.tts_base_url):
        require(["openai"], "train", "synth")
    cfg = SynthConfig(
        questions=args.questions, voices=args.voices, out=args.out, model=args.model, device=args.device,
        dtype=args.dtype, llm_base_url=args.llm_base_url, llm_model=args.llm_model, llm_api_key=args.llm_api_key,
        tts_base_url=args.tts_base_url, tts_model=args.tts_model, tts_api_key=args.tts_api_key,
        system_prompt=args.system_prompt, max_answer_tokens=args.max_answer_tokens, max_seconds=args.max_seconds,
        user_audio=not args.text_questions, concurrency=args.concurrency, retries=args.retries)
    print(json.dumps(synth(cfg)))
    return 0
