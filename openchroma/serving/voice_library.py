"""The persistent voice library: cloned voices kept on disk and registered with the engine at start-up.

Layout under ``DATA_DIR/voices/``:

* ``index.sqlite3``: one row per voice (name, transcript, creation time, duration, file names, what was
  uploaded); a row is inserted only once the voice's files are complete, so a crash never leaves a
  half-written voice in the index.
* ``NAME-XXXXXXXX.EXT``: the reference audio exactly as uploaded (served back to clients);
* ``NAME-XXXXXXXX.24k.wav``: the same audio decoded to 24 kHz mono 16-bit (kept to re-encode if ever needed);
* ``NAME-XXXXXXXX.safetensors``: the Mimi codes ``[frames, K]`` and the transcript's token ids, so a
  restart registers every voice without re-encoding it.

The random suffix keeps names that differ only by case apart on case-insensitive file systems.
Routes: ``POST/GET /v1/voices``, ``GET/DELETE /v1/voices/{name}``, ``GET /v1/voices/{name}/audio``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import soundfile as sf
import torch
from safetensors.torch import load_file, save_file

from ..audio import AudioError, AudioTooLong, decode_client_audio, resample
from ..engine import EngineError
from ..voice import MAX_TRANSCRIPT_TOKENS, MAX_VOICE_SECONDS, VoicePrompt

if TYPE_CHECKING:
    from ..engine import Engine
    from .metrics import Metrics

log = logging.getLogger("openchroma.serve.voices")

INDEX_NAME = "index.sqlite3"
NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
RESERVED_PREFIX = "_adhoc_"        # the chat routes' per-request voices live in the engine under this prefix
MIN_VOICE_SECONDS = 1.0
MAX_TRANSCRIPT_CHARS = 1000
SILENCE_DBFS = -50.0               # a reference quieter than this (RMS over the clip) is refused
MIN_SPEECH_SECONDS = 0.3           # speech that silero-vad must find in the reference
VAD_RATE = 16000
_TMP_PREFIX = ".tmp-"
_ORPHAN_AGE_S = 3600.0             # unreferenced files older than this are swept at start-up
_FILE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}-[0-9a-f]{8}\.[a-z0-9.]{1,16}")  # NAME-XXXXXXXX.EXT

# libsndfile's major format -> (file extension, media type)
_FORMATS = {
    "WAV": (".wav", "audio/wav"), "WAVEX": (".wav", "audio/wav"), "RF64": (".wav", "audio/wav"),
    "W64": (".w64", "audio/x-w64"), "FLAC": (".flac", "audio/flac"), "OGG": (".ogg", "audio/ogg"),
    "MP3": (".mp3", "audio/mpeg"), "MPEG": (".mp3", "audio/mpeg"), "AIFF": (".aiff", "audio/aiff"),
    "AU": (".au", "audio/basic"), "CAF": (".caf", "audio/x-caf"),
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS voices (
    name TEXT PRIMARY KEY,
    transcript TEXT NOT NULL,
    created_at REAL NOT NULL,
    duration_s REAL NOT NULL,
    sample_rate INTEGER NOT NULL,
    audio_file TEXT NOT NULL,
    audio_content_type TEXT NOT NULL,
    wav_file TEXT,
    codes_file TEXT NOT NULL,
    original_filename TEXT,
    original_content_type TEXT,
    source_sample_rate INTEGER,
    speech_seconds REAL
)
"""


class VoiceError(Exception):
    """A library operation refused or failed. ``kind`` says how: ``invalid`` (unusable input), ``not_found``,
    ``exists`` (the name is taken), ``unavailable`` (no engine yet, or it is closing) or ``storage`` (the disk)."""

    def __init__(self, kind: str, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.kind, self.message, self.code, self.param = kind, message, code, param


@dataclass(frozen=True)
class _NewVoice:
    """A checked, encoded voice on its way into the library: what its files and its row hold."""

    name: str
    transcript: str
    audio: bytes                     # as uploaded
    wav: torch.Tensor                # decoded, at the engine's rate
    sample_rate: int
    prompt: VoicePrompt
    duration: float
    speech: float | None
    audio_file: str
    media_type: str
    wav_file: str
    codes_file: str
    filename: str | None
    content_type: str | None
    source_rate: int | None


class VoiceLibrary:
    """Voices stored under ``data_dir/voices/`` and registered with the engine once it is attached.

    Thread-safe: one SQLite connection guarded by a lock; ``add`` (which decodes, checks and encodes the
    audio on the engine thread) blocks, so async callers run it in a worker thread.
    """

    def __init__(self, data_dir: Path, metrics: Metrics | None = None):
        self.dir = Path(data_dir) / "voices"
        self.index_path = self.dir / INDEX_NAME
        self.metrics = metrics
        self.engine: Engine | None = None
        self._lock = threading.Lock()              # the connection, _pending, _unavailable
        self._conn: sqlite3.Connection | None = None
        self._pending: set[str] = set()            # names being added right now
        self._unavailable: dict[str, str] = {}     # stored voices that could not be loaded -> why

    # ----- the index ------------------------------------------------------------------------------------
    def _connect(self, create: bool) -> sqlite3.Connection | None:
        """The open index (caller holds the lock); None when it does not exist yet and ``create`` is false."""
        if self._conn is None:
            if not create and not self.index_path.exists():
                return None
            self.dir.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(self.index_path), check_same_thread=False, timeout=10.0)
            try:
                conn.row_factory = sqlite3.Row
                try:
                    conn.execute("PRAGMA journal_mode=WAL")
                except sqlite3.DatabaseError as e:  # e.g. some network file systems; the default journal works
                    log.warning("voice library %s: WAL mode unavailable (%s)", self.index_path, e)
                conn.execute(_SCHEMA)
                conn.commit()
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _query(self, sql: str, args: tuple = (), create: bool = False) -> list[sqlite3.Row]:
        with self._lock:
            conn = self._connect(create)
            return [] if conn is None else conn.execute(sql, args).fetchall()

    def _rows(self) -> list[sqlite3.Row]:
        try:
            return self._query("SELECT * FROM voices ORDER BY name")
        except (sqlite3.Error, OSError) as e:
            log.error("cannot read the voice library %s: %s", self.index_path, e)
            return []

    def _row(self, name: str) -> sqlite3.Row:
        try:
            rows = self._query("SELECT * FROM voices WHERE name = ?", (name,))
        except (sqlite3.Error, OSError) as e:
            raise _storage_error("read", self.index_path, e) from None
        if not rows:
            raise _not_found(name)
        return rows[0]

    def _file(self, stored: str | None) -> Path | None:
        return self.dir / Path(stored).name if stored else None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # ----- records --------------------------------------------------------------------------------------
    def _record(self, row: sqlite3.Row) -> dict[str, Any]:
        rec = {"id": row["name"], "object": "voice", "name": row["name"], "transcript": row["transcript"],
               "duration_seconds": round(float(row["duration_s"]), 3), "created_at": int(row["created_at"]),
               "sample_rate": int(row["sample_rate"])}
        why = self._unavailable.get(row["name"])
        if why is not None:
            rec["status"], rec["error"] = "unavailable", why
        return rec

    def list(self) -> list[dict[str, Any]]:
        """Every stored voice's record, sorted by name."""
        return [self._record(r) for r in self._rows()]

    def get(self, name: str) -> dict[str, Any]:
        return self._record(self._row(name))

    def audio_file(self, name: str) -> tuple[Path, str]:
        """The stored reference audio (as uploaded) and its media type (``not_found`` when unknown or missing)."""
        row = self._row(name)
        path = self._file(row["audio_file"])
        if path is None or not path.is_file():
            raise VoiceError("not_found", f"the reference audio of voice {name!r} is missing from the server's library",
                           code="voice_audio_missing", param="name")
        return path, row["audio_content_type"] or "application/octet-stream"

    # ----- start-up -------------------------------------------------------------------------------------
    def attach(self, engine: Engine) -> None:
        """Register every stored voice with ``engine`` (damaged ones are skipped with a warning)."""
        self.engine = engine
        self._unavailable.clear()
        try:
            rows = self._query("SELECT * FROM voices ORDER BY name")
        except (sqlite3.Error, OSError) as e:
            log.error("cannot read the voice library %s: %s; starting without its voices", self.index_path, e)
            rows = []
        else:
            if self.index_path.exists():
                self._sweep(rows)
        loaded = 0
        for row in rows:
            name = row["name"]
            try:
                prompt = self._load_prompt(row, engine)
                engine.add_voice(name, prompt, row["transcript"])
            except Exception as e:  # one damaged voice must not keep the server from starting
                why = f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
                self._unavailable[name] = why
                log.warning("voice %r skipped: %s (DELETE /v1/voices/%s and add it again)", name, why, name)
                continue
            loaded += 1
            audio = self._file(row["audio_file"])
            if audio is None or not audio.is_file():
                log.warning("voice %r: its reference audio %s is missing (the voice still works)", name, audio)
        if rows:
            log.info("voice library %s: %d voices registered, %d skipped", self.dir, loaded, len(rows) - loaded)
        self._update_gauge()

    def _load_prompt(self, row: sqlite3.Row, engine: Engine) -> VoicePrompt:
        path = self._file(row["codes_file"])
        if path is None or not path.is_file():
            raise ValueError(f"its codes file {path} is missing")
        try:
            tensors = load_file(str(path))
        except Exception as e:
            raise ValueError(f"its codes file {path} is unreadable: {e}") from None
        codes, text_ids = tensors.get("codes"), tensors.get("text_ids")
        k = int(getattr(engine.cfg, "audio_num_codebooks", 0) or 0)
        size = int(getattr(engine.cfg, "codebook_size", 0) or 0)
        if codes is None or text_ids is None:
            raise ValueError(f"its codes file {path} lacks the 'codes' or 'text_ids' tensor")
        if codes.dtype != torch.long or codes.dim() != 2 or codes.shape[0] < 1 or (k and codes.shape[1] != k):
            raise ValueError(f"its codes in {path} are {codes.dtype} {tuple(codes.shape)}, expected int64 "
                             f"[frames, {k or 'K'}] (a voice encoded for another model?)")
        if int(codes.min()) < 0 or (size and int(codes.max()) >= size):
            raise ValueError(f"its codes in {path} are outside the codebooks' range 0..{size - 1}")
        if text_ids.dtype != torch.long or text_ids.dim() != 1:
            raise ValueError(f"its text ids in {path} are {text_ids.dtype} {tuple(text_ids.shape)}, expected int64 [n]")
        fresh = torch.as_tensor(engine.tokenizer.encode(row["transcript"]), dtype=torch.long).reshape(-1)
        if not torch.equal(fresh, text_ids):  # another tokenizer than the one it was stored with: use this one's
            log.info("voice %r: re-tokenized its transcript for this model's tokenizer", row["name"])
            text_ids = fresh
        return VoicePrompt(text_ids, codes)

    def _sweep(self, rows: list[sqlite3.Row]) -> None:
        """Remove our temp files and voice files no row refers to (left by a crash mid-add), once they are old."""
        keep = set()
        for r in rows:
            keep.update(Path(f).name for f in (r["audio_file"], r["wav_file"], r["codes_file"]) if f)
        now = time.time()
        try:
            entries = list(self.dir.iterdir())
        except OSError:
            return
        for p in entries:
            try:
                ours = p.name.startswith(_TMP_PREFIX) or _FILE_RE.fullmatch(p.name)
                if not ours or p.name in keep or not p.is_file() or now - p.stat().st_mtime < _ORPHAN_AGE_S:
                    continue
                p.unlink()
                log.info("voice library: removed leftover file %s", p)
            except OSError:
                pass

    def _update_gauge(self) -> None:
        if self.metrics is not None:
            try:
                n = len(self._rows())
            except Exception:
                return
            self.metrics.voices.set(max(0, n - len(self._unavailable)))

    # ----- adding ---------------------------------------------------------------------------------------
    def add(self, name: str | None, audio: bytes | None, transcript: str | None, filename: str | None = None,
            content_type: str | None = None) -> dict[str, Any]:
        """Check, encode and store a voice, and register it with the engine; returns its record.

        Raises ``VoiceError`` (``invalid``, ``exists``, ``unavailable`` while the model loads, ``storage``).
        Blocks while the engine encodes the audio: call it from a worker thread in async code.
        """
        engine = self.engine
        if engine is None:
            raise VoiceError("unavailable", "the model is still loading; retry when GET /health says ready",
                             code="model_loading")
        name = check_name(name)
        with self._lock:
            taken = name in self._pending or name in engine.voices
            if not taken:
                try:
                    conn = self._connect(False)
                    taken = conn is not None and bool(
                        conn.execute("SELECT 1 FROM voices WHERE name = ?", (name,)).fetchall())
                except (sqlite3.Error, OSError) as e:
                    raise _storage_error("read", self.index_path, e) from None
            if taken:
                raise VoiceError("exists", f"a voice named {name!r} already exists; delete it first "
                                    f"(DELETE /v1/voices/{name}) or choose another name",
                               code="voice_exists", param="name")
            self._pending.add(name)
        try:
            return self._add(engine, name, audio, transcript, filename, content_type)
        finally:
            with self._lock:
                self._pending.discard(name)

    def _add(self, engine: Engine, name: str, audio: bytes | None, transcript: str | None, filename: str | None,
             content_type: str | None) -> dict[str, Any]:
        transcript = _check_transcript_tokens(engine, transcript)
        audio = bytes(audio or b"")
        wav, duration, speech = _reference_audio(audio, engine.sample_rate, filename)
        prompt = _encode(engine, wav, transcript)
        fmt, source_rate = _probe(audio)
        ext, media_type = _FORMATS.get(fmt or "", (".bin", None))
        if media_type is None:
            ct = (content_type or "").split(";")[0].strip().lower()
            media_type = ct if ct.startswith("audio/") else "application/octet-stream"
        stem = f"{name}-{secrets.token_hex(4)}"
        voice = _NewVoice(name, transcript, audio, wav, engine.sample_rate, prompt, duration, speech,
                          stem + ext, media_type, stem + ".24k.wav", stem + ".safetensors", filename, content_type,
                          source_rate)
        row = self._store(engine, voice)
        log.info("voice %r added: %.2f s of audio (%.2f s of speech), %d frames", name, duration,
                 speech if speech is not None else float("nan"), prompt.codes.shape[0])
        self._update_gauge()
        return self._record(row)

    def _store(self, engine: Engine, voice: _NewVoice) -> sqlite3.Row:
        """Write the voice's files, register it, then insert its row: all of it, or (on any failure) none."""
        written: list[Path] = []
        registered = False
        try:
            self._write_files(voice, written)
            engine.add_voice(voice.name, voice.prompt, voice.transcript)
            registered = True
            return self._insert(voice)
        except BaseException as e:
            if registered:
                engine.remove_voice(voice.name)
            for p in written:
                with contextlib.suppress(OSError):
                    p.unlink()
            refusal = self._store_refusal(e, voice.name)
            if refusal is None:
                raise
            raise refusal from None

    def _write_files(self, voice: _NewVoice, written: list[Path]) -> None:
        """The uploaded file, its 24 kHz decoding and the codes, each written atomically (``written`` lists them)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.dir / voice.audio_file, lambda p: p.write_bytes(voice.audio), written)
        _atomic_write(self.dir / voice.wav_file, lambda p: sf.write(str(p), voice.wav.numpy(), voice.sample_rate,
                                                                    format="WAV", subtype="PCM_16"), written)
        tensors = {"codes": voice.prompt.codes.to(torch.long).contiguous(),
                   "text_ids": voice.prompt.text_ids.to(torch.long).contiguous()}
        meta = {"format": "openchroma-voice/1", "name": voice.name, "sample_rate": str(voice.sample_rate)}
        _atomic_write(self.dir / voice.codes_file, lambda p: save_file(tensors, str(p), metadata=meta), written)
        _fsync_dir(self.dir)

    def _insert(self, voice: _NewVoice) -> sqlite3.Row:
        with self._lock:
            conn = self._connect(True)
            with conn:
                conn.execute(
                    "INSERT INTO voices (name, transcript, created_at, duration_s, sample_rate, audio_file, "
                    "audio_content_type, wav_file, codes_file, original_filename, original_content_type, "
                    "source_sample_rate, speech_seconds) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (voice.name, voice.transcript, time.time(), voice.duration, voice.sample_rate, voice.audio_file,
                     voice.media_type, voice.wav_file, voice.codes_file, voice.filename, voice.content_type,
                     voice.source_rate, voice.speech))
            return conn.execute("SELECT * FROM voices WHERE name = ?", (voice.name,)).fetchone()

    def _store_refusal(self, e: BaseException, name: str) -> VoiceError | None:
        """What a failure while storing a voice answers (None: not ours to map, re-raise it)."""
        if isinstance(e, sqlite3.IntegrityError):  # another process took the name meanwhile
            return VoiceError("exists", f"a voice named {name!r} already exists", code="voice_exists", param="name")
        if isinstance(e, (OSError, sqlite3.Error)):
            return _storage_error("write", self.dir, e)
        if isinstance(e, EngineError):
            return VoiceError("unavailable", f"the engine cannot take the voice: {e}", code="engine_error")
        return None

    # ----- deleting -------------------------------------------------------------------------------------
    def delete(self, name: str) -> None:
        """Remove a stored voice: its row, its registration with the engine and its files."""
        with self._lock:
            try:
                conn = self._connect(False)
                row = None if conn is None else conn.execute("SELECT * FROM voices WHERE name = ?",
                                                             (name,)).fetchone()
                if row is not None:
                    with conn:
                        conn.execute("DELETE FROM voices WHERE name = ?", (name,))
            except (sqlite3.Error, OSError) as e:
                raise _storage_error("update", self.index_path, e) from None
            if row is None:
                raise _not_found(name)
            self._unavailable.pop(name, None)
        if self.engine is not None:
            self.engine.remove_voice(name)
        for stored in (row["audio_file"], row["wav_file"], row["codes_file"]):
            path = self._file(stored)
            if path is not None:
                try:
                    path.unlink(missing_ok=True)
                except OSError as e:  # swept at the next start
                    log.warning("voice %r deleted but its file %s could not be removed: %s", name, path, e)
        log.info("voice %r deleted", name)
        self._update_gauge()


# ----- checks ---------------------------------------------------------------------------------------------
def check_name(name: str | None) -> str:
    name = (name or "").strip()
    if not NAME_RE.fullmatch(name) or name.startswith(".") or name.startswith(RESERVED_PREFIX):
        shown = repr(name[:80] + ("…" if len(name) > 80 else ""))
        raise VoiceError("invalid", f"invalid voice name {shown}: use 1 to 64 letters, digits, '_', '.' or '-', not "
                            f"starting with '.' (nor with {RESERVED_PREFIX!r}, kept for the server's own voices)",
                       code="invalid_voice_name", param="name")
    return name


def check_transcript(transcript: str | None) -> str:
    transcript = (transcript or "").strip()
    if not transcript:
        raise VoiceError("invalid", "the transcript is empty: give the exact words the reference audio says",
                       code="transcript_empty", param="transcript")
    if len(transcript) > MAX_TRANSCRIPT_CHARS:
        raise VoiceError("invalid", f"the transcript is {len(transcript)} characters long; the limit is "
                            f"{MAX_TRANSCRIPT_CHARS}", code="transcript_too_long", param="transcript")
    return transcript


def _check_transcript_tokens(engine: Engine, transcript: str | None) -> str:
    transcript = check_transcript(transcript)
    n_tokens = len(engine.tokenizer.encode(transcript))
    if n_tokens > MAX_TRANSCRIPT_TOKENS:
        raise VoiceError("invalid", f"the transcript is {n_tokens} tokens long; the limit is "
                         f"{MAX_TRANSCRIPT_TOKENS} (use a shorter reference and what it says)",
                         code="transcript_too_long", param="transcript")
    return transcript


def _reference_audio(audio: bytes, sr: int, filename: str | None) -> tuple[torch.Tensor, float, float | None]:
    """The upload decoded through the server's audio intake and checked as a voice reference (length, level,
    speech) -> (24 kHz mono audio, its seconds, seconds of speech found)."""
    if not audio:
        raise VoiceError("invalid", "the audio file is empty", code="audio_empty", param="file")
    try:
        wav = decode_client_audio(audio, sr, max_seconds=MAX_VOICE_SECONDS + 0.01, name=filename or "the audio")
    except AudioTooLong as e:
        raise _duration_error(e.seconds) from None
    except AudioError as e:
        raise _invalid_audio(e) from None
    duration = wav.numel() / sr
    if duration < MIN_VOICE_SECONDS:
        raise _duration_error(duration)
    wav = wav[: int(MAX_VOICE_SECONDS * sr)]  # a resampling rounding over the limit
    duration = wav.numel() / sr
    rms = float(wav.double().pow(2).mean().sqrt())
    level = 20 * math.log10(max(rms, 1e-10))
    if level < SILENCE_DBFS:
        raise VoiceError("invalid", f"the reference audio is silent (its level is {level:.0f} dBFS, below "
                                    f"{SILENCE_DBFS:.0f} dBFS): record a few seconds of clear speech",
                         code="voice_silent", param="file")
    speech = speech_seconds(wav, sr)
    if speech is not None and speech < MIN_SPEECH_SECONDS:
        raise VoiceError("invalid", f"no speech found in the reference audio ({speech:.1f} s detected, at least "
                                    f"{MIN_SPEECH_SECONDS:g} s needed): record a few seconds of clear speech",
                         code="voice_silent", param="file")
    return wav, duration, speech


def _encode(engine: Engine, wav: torch.Tensor, transcript: str) -> VoicePrompt:
    """The engine's Mimi encoding of the reference (blocks while it runs)."""
    try:
        return engine.encode_voice(wav, transcript, sample_rate=engine.sample_rate)
    except AudioError as e:
        raise _invalid_audio(e) from None
    except EngineError as e:
        if engine.closed:
            raise VoiceError("unavailable", "the server is shutting down", code="engine_closed") from None
        raise VoiceError("invalid", str(e), code="invalid_voice") from None


def _invalid_audio(e: AudioError) -> VoiceError:
    return VoiceError("invalid", f"the audio file cannot be used: {e}", code="invalid_audio", param="file")


def _duration_error(seconds: float | None) -> VoiceError:
    code = "audio_too_short" if seconds is not None and seconds < MIN_VOICE_SECONDS else "audio_too_long"
    said = f"{seconds:.2f} s long" if seconds is not None else f"longer than {MAX_VOICE_SECONDS:g} s"
    return VoiceError("invalid", f"the reference audio is {said}; a voice needs between "
                                 f"{MIN_VOICE_SECONDS:g} and {MAX_VOICE_SECONDS:g} s of audio", code=code, param="file")


def _not_found(name: str) -> VoiceError:
    return VoiceError("not_found", f"no voice named {name[:80]!r} in the library", code="voice_not_found", param="name")


def _storage_error(what: str, where: Path, e: BaseException) -> VoiceError:
    log.error("voice library: cannot %s %s: %s", what, where, e)
    return VoiceError("storage", f"the server cannot {what} its voice library ({type(e).__name__}: {e})",
                    "storage_error")


def _probe(audio: bytes) -> tuple[str | None, int | None]:
    """(libsndfile format, sample rate) from the file's header; Nones when unreadable."""
    try:
        with sf.SoundFile(io.BytesIO(audio)) as f:
            return f.format, int(f.samplerate)
    except Exception:
        return None, None


_vad_lock = threading.Lock()
_vad_model: Any = None
_vad_failed = False


def speech_seconds(wav: torch.Tensor, sample_rate: int) -> float | None:
    """Seconds of speech that silero-vad finds in ``wav``; None when the VAD is unavailable."""
    global _vad_model, _vad_failed
    with _vad_lock:
        if _vad_model is None and not _vad_failed:
            try:
                from .vad import load_vad_model  # importing silero directly would set torch to 1 thread

                _vad_model = load_vad_model()
            except Exception as e:  # the other checks still apply
                _vad_failed = True
                log.warning("silero-vad unavailable, voice uploads are not checked for speech: %s", e)
        if _vad_model is None:
            return None
        from silero_vad import get_speech_timestamps

        wav16 = resample(wav, sample_rate, VAD_RATE) if sample_rate != VAD_RATE else wav
        spans = get_speech_timestamps(wav16.float(), _vad_model, sampling_rate=VAD_RATE)
        return sum(s["end"] - s["start"] for s in spans) / VAD_RATE


def _atomic_write(path: Path, write: Callable[[Path], Any], written: list[Path]) -> None:
    """Write ``path`` through a temp file in the same folder, fsync it, then rename it into place."""
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    written.append(path)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


