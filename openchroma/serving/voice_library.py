"""The persistent voice library: cloned voices checked, encoded, stored and registered with the engine.

Storage is behind ``voice_store_base.VoiceStore``: SQLite plus files in ``--data-dir`` (the default, see
``voice_store_sqlite``) or PostgreSQL with ``--voices-db`` (``voice_store_postgres``), shared by every replica.
Each process caches the voices it registered with its engine (their prompt: codes and the Backbone's cache) and
checks the store's versions whenever a voice is used (``sync``), so a voice added, replaced or deleted through
any process is seen by every other one at its next use.
Routes: ``POST/GET /v1/voices``, ``GET/DELETE /v1/voices/{name}``, ``GET /v1/voices/{name}/audio``.
"""

from __future__ import annotations

import io
import logging
import math
import re
import secrets
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import soundfile as sf
import torch

from ..audio import AudioError, AudioTooLong, decode_client_audio, resample
from ..engine import EngineError
from ..voice import MAX_TRANSCRIPT_TOKENS, MAX_VOICE_SECONDS, VoicePrompt
from .voice_store_base import NameTaken, NewVoiceData, StoredVoice, StoreError, VoiceStore

if TYPE_CHECKING:
    from ..engine import Engine
    from .metrics import Metrics

log = logging.getLogger("openchroma.serve.voices")

NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
RESERVED_PREFIX = "_adhoc_"        # the chat routes' per-request voices live in the engine under this prefix
MIN_VOICE_SECONDS = 1.0
MAX_TRANSCRIPT_CHARS = 1000
SILENCE_DBFS = -50.0               # a reference quieter than this (RMS over the clip) is refused
MIN_SPEECH_SECONDS = 0.3           # speech that silero-vad must find in the reference
VAD_RATE = 16000
SYNC_RETRY_S = 1.0                 # while the store is unreachable, re-check it this often (in the background)

# libsndfile's major format -> (file extension, media type)
_FORMATS = {
    "WAV": (".wav", "audio/wav"), "WAVEX": (".wav", "audio/wav"), "RF64": (".wav", "audio/wav"),
    "W64": (".w64", "audio/x-w64"), "FLAC": (".flac", "audio/flac"), "OGG": (".ogg", "audio/ogg"),
    "MP3": (".mp3", "audio/mpeg"), "MPEG": (".mp3", "audio/mpeg"), "AIFF": (".aiff", "audio/aiff"),
    "AU": (".au", "audio/basic"), "CAF": (".caf", "audio/x-caf"),
}
MEDIA_EXTENSIONS = {media: ext for ext, media in reversed(_FORMATS.values())}   # audio/wav -> .wav


def open_store(data_dir: Path, voices_db: str | None = None) -> VoiceStore:
    """PostgreSQL when ``voices_db`` is a ``postgresql://`` URL, else SQLite and files under ``data_dir/voices``."""
    if voices_db:
        from .voice_store_postgres import PostgresVoiceStore

        return PostgresVoiceStore(voices_db)
    from .voice_store_sqlite import SqliteVoiceStore

    return SqliteVoiceStore(Path(data_dir) / "voices")


class VoiceError(Exception):
    """A library operation refused or failed. ``kind`` says how: ``invalid`` (unusable input), ``not_found``,
    ``exists`` (the name is taken), ``unavailable`` (no engine yet, it is closing, or the voice database is
    unreachable) or ``storage`` (the disk or the database failed)."""

    def __init__(self, kind: str, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.kind, self.message, self.code, self.param = kind, message, code, param


class VoiceLibrary:
    """Stored voices, registered with the engine once it is attached and kept in step with the store.

    Thread-safe. ``add`` (which decodes, checks and encodes the audio on the engine thread) blocks, so async
    callers run it in a worker thread; so do the other operations, which read the store.
    """

    def __init__(self, data_dir: Path, metrics: Metrics | None = None, voices_db: str | None = None,
                 store: VoiceStore | None = None):
        self.store: VoiceStore = store if store is not None else open_store(Path(data_dir), voices_db)
        self.metrics = metrics
        self.engine: Engine | None = None
        self._lock = threading.Lock()              # _pending, _loaded, _unavailable
        self._sync_lock = threading.Lock()         # one version check at a time
        self._pending: set[str] = set()            # names being added right now through this process
        self._loaded: dict[str, str] = {}          # voices this library registered with the engine -> version
        self._unavailable: dict[str, str] = {}     # stored voices that could not be loaded -> why
        self._store_down = False                   # the last version check failed: re-check in the background
        self._rechecking = False

    def close(self) -> None:
        self.store.close()

    def _call(self, what: str, fn, *args):
        """A store operation, its failures as ``VoiceError``s."""
        try:
            result = fn(*args)
        except StoreError as e:
            return _raise_storage(what, self.store.location, e)
        if self._store_down:   # it is back: check versions on the next use again
            self._store_down = False
        return result

    # ----- records --------------------------------------------------------------------------------------
    def _record(self, v: StoredVoice) -> dict[str, Any]:
        rec = {"id": v.name, "object": "voice", "name": v.name, "transcript": v.transcript,
               "duration_seconds": round(float(v.duration_s), 3), "created_at": int(v.created_at),
               "sample_rate": int(v.sample_rate)}
        why = self._unavailable.get(v.name)
        if why is not None:
            rec["status"], rec["error"] = "unavailable", why
        return rec

    def list(self) -> list[dict[str, Any]]:
        """Every stored voice's record, sorted by name."""
        return [self._record(v) for v in self._call("read", self.store.list)]

    def get(self, name: str) -> dict[str, Any]:
        v = self._call("read", self.store.get, name)
        if v is None:
            raise _not_found(name)
        return self._record(v)

    def audio_file(self, name: str) -> tuple[Path | bytes, str]:
        """The stored reference audio as uploaded (a file, or its bytes) and its media type."""
        try:
            found = self._call("read", self.store.audio, name)
        except FileNotFoundError:
            found = False
        if found is None:
            raise _not_found(name)
        if not found:
            raise VoiceError("not_found", f"the reference audio of voice {name!r} is missing from the server's library",
                             code="voice_audio_missing", param="name")
        return found

    # ----- keeping the engine in step with the store ----------------------------------------------------
    def attach(self, engine: Engine) -> None:
        """Register every stored voice with ``engine`` (damaged ones are skipped with a warning)."""
        self.engine = engine
        with self._lock:
            self._unavailable.clear()
            self._loaded.clear()
        try:
            self.store.list()   # the embedded store sweeps leftovers of crashed adds on its first listing
        except StoreError as e:
            log.error("cannot read the voice library %s: %s; starting without its voices", self.store.location, e)
        self.sync(force=True)
        if self._loaded:
            log.info("voice library %s: %d voices registered, %d skipped", self.store.location,
                     len(self._loaded) - len(self._unavailable), len(self._unavailable))

    def sync(self, force: bool = False) -> None:
        """Check the store's versions against the voices registered here: register new and replaced ones, drop
        deleted ones. Cheap (one query). While the store is unreachable, callers are not held up: the cached
        voices keep serving and the check is retried in the background every ``SYNC_RETRY_S``."""
        engine = self.engine
        if engine is None:
            return
        if self._store_down and not force:
            self._recheck_soon()
            return
        with self._sync_lock:
            try:
                stored = self.store.versions()
            except StoreError as e:
                if not self._store_down:
                    log.warning("voice library: version check failed, serving cached voices: %s", e)
                self._store_down = True
                return
            self._store_down = False
            with self._lock:
                gone = [n for n in self._loaded if n not in stored and n not in self._pending]
                changed = [n for n, ver in stored.items() if self._loaded.get(n) != ver and n not in self._pending]
                for name in gone:
                    del self._loaded[name]
                    self._unavailable.pop(name, None)
            for name in gone:
                engine.remove_voice(name)
                log.info("voice %r: deleted from the library elsewhere; dropped", name)
            for name in sorted(changed):
                self._register(engine, name, stored[name])
        self._update_gauge()

    def _recheck_soon(self) -> None:
        with self._lock:
            if self._rechecking:
                return
            self._rechecking = True

        def recheck() -> None:
            time.sleep(SYNC_RETRY_S)
            try:
                self.sync(force=True)
            finally:
                self._rechecking = False

        threading.Thread(target=recheck, name="openchroma-voices-recheck", daemon=True).start()

    def _register(self, engine: Engine, name: str, version: str) -> None:
        """Load a stored voice's codes and register it with the engine (a damaged one is marked unavailable)."""
        try:
            found = self.store.codes(name)
            if found is None:
                return
            meta, tensors = found
            prompt = _prompt(meta, tensors, engine)
            engine.add_voice(name, prompt, meta.transcript)
        except StoreError as e:
            log.warning("voice %r not loaded: %s", name, e)
            return
        except Exception as e:  # one damaged voice must not keep the server from starting
            why = f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
            with self._lock:
                self._unavailable[name] = why
                self._loaded[name] = version   # not retried until the stored voice changes
            engine.remove_voice(name)
            log.warning("voice %r skipped: %s (DELETE /v1/voices/%s and add it again)", name, why, name)
            return
        with self._lock:
            self._unavailable.pop(name, None)
            self._loaded[name] = meta.version

    def _update_gauge(self) -> None:
        if self.metrics is not None:
            with self._lock:
                self.metrics.voices.set(max(0, len(self._loaded) - len(self._unavailable)))

    # ----- adding and deleting --------------------------------------------------------------------------
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
            taken = name in self._pending or name in engine.voices and name not in self._loaded
            self._pending.add(name)
        try:
            if taken or self._call("read", self.store.get, name) is not None:
                raise _exists(name)
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
        meta = StoredVoice(name, secrets.token_hex(8), transcript, time.time(), duration, engine.sample_rate,
                           media_type, filename, content_type, source_rate, speech)
        wav_file = io.BytesIO()
        sf.write(wav_file, wav.numpy(), engine.sample_rate, format="WAV", subtype="PCM_16")
        codes = {"codes": prompt.codes.to(torch.long).contiguous(),
                 "text_ids": prompt.text_ids.to(torch.long).contiguous()}
        new = NewVoiceData(meta, audio, ext, wav_file.getvalue(), codes,
                           {"format": "openchroma-voice/1", "name": name, "sample_rate": str(engine.sample_rate)})
        self._store(engine, new, prompt)
        log.info("voice %r added: %.2f s of audio (%.2f s of speech), %d frames", name, duration,
                 speech if speech is not None else float("nan"), prompt.codes.shape[0])
        self._update_gauge()
        return self._record(meta)

    def _store(self, engine: Engine, voice: NewVoiceData, prompt: VoicePrompt) -> None:
        """Register the voice, then store it: all of it, or (on any failure) none."""
        name = voice.meta.name
        try:
            engine.add_voice(name, prompt, voice.meta.transcript)
        except EngineError as e:
            raise VoiceError("unavailable", f"the engine cannot take the voice: {e}", code="engine_error") from None
        try:
            self.store.insert(voice)
        except BaseException as e:
            engine.remove_voice(name)
            if isinstance(e, NameTaken):   # another process took the name meanwhile
                raise _exists(name) from None
            if isinstance(e, StoreError):
                _raise_storage("write", self.store.location, e)
            raise
        with self._lock:
            self._loaded[name] = voice.meta.version
            self._unavailable.pop(name, None)

    def delete(self, name: str) -> None:
        """Remove a stored voice: from the store (so from every process) and from this engine."""
        removed = self._call("update", self.store.delete, name)
        if removed is None:
            raise _not_found(name)
        with self._lock:
            self._loaded.pop(name, None)
            self._unavailable.pop(name, None)
        if self.engine is not None:
            self.engine.remove_voice(name)
        log.info("voice %r deleted", name)
        self._update_gauge()


def _prompt(meta: StoredVoice, tensors: dict[str, torch.Tensor], engine: Engine) -> VoicePrompt:
    """A stored voice's prompt, checked against this model (codebooks, their size, the tokenizer)."""
    codes, text_ids = tensors.get("codes"), tensors.get("text_ids")
    k = int(getattr(engine.cfg, "audio_num_codebooks", 0) or 0)
    size = int(getattr(engine.cfg, "codebook_size", 0) or 0)
    if codes is None or text_ids is None:
        raise ValueError("its stored codes lack the 'codes' or 'text_ids' tensor")
    if codes.dtype != torch.long or codes.dim() != 2 or codes.shape[0] < 1 or (k and codes.shape[1] != k):
        raise ValueError(f"its codes are {codes.dtype} {tuple(codes.shape)}, expected int64 "
                         f"[frames, {k or 'K'}] (a voice encoded for another model?)")
    if int(codes.min()) < 0 or (size and int(codes.max()) >= size):
        raise ValueError(f"its codes are outside the codebooks' range 0..{size - 1}")
    if text_ids.dtype != torch.long or text_ids.dim() != 1:
        raise ValueError(f"its text ids are {text_ids.dtype} {tuple(text_ids.shape)}, expected int64 [n]")
    fresh = torch.as_tensor(engine.tokenizer.encode(meta.transcript), dtype=torch.long).reshape(-1)
    if not torch.equal(fresh, text_ids):  # another tokenizer than the one it was stored with: use this one's
        log.info("voice %r: re-tokenized its transcript for this model's tokenizer", meta.name)
        text_ids = fresh
    return VoicePrompt(text_ids, codes)


def _exists(name: str) -> VoiceError:
    return VoiceError("exists", f"a voice named {name!r} already exists; delete it first "
                                f"(DELETE /v1/voices/{name}) or choose another name", code="voice_exists", param="name")


def _raise_storage(what: str, where: str, e: StoreError):
    log.error("voice library: cannot %s %s: %s", what, where, e)
    if e.unreachable:
        raise VoiceError("unavailable", f"the voice library is unavailable: {e}", "voice_store_unavailable") from None
    raise VoiceError("storage", f"the server cannot {what} its voice library: {e}", "storage_error") from None


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
