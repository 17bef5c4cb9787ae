"""The embedded voice store: SQLite plus files under ``DATA_DIR/voices/`` (safe for processes on one machine).

* ``index.sqlite3``: one row per voice (name, version, transcript, creation time, duration, file names, what was
  uploaded), in WAL mode; a row is inserted only once the voice's files are complete (each written to a temp
  file, fsynced and renamed into place), so a crash never leaves a half-written voice in the index. SQLite lets
  one writer at a time in (``BEGIN IMMEDIATE``); readers never wait.
* ``NAME-XXXXXXXX.EXT``: the reference audio exactly as uploaded (served back to clients);
* ``NAME-XXXXXXXX.24k.wav``: the same audio decoded to 24 kHz mono 16-bit (kept to re-encode if ever needed);
* ``NAME-XXXXXXXX.safetensors``: the Mimi codes ``[frames, K]`` and the transcript's token ids.

The random suffix keeps names that differ only by case apart on case-insensitive file systems.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .voice_store_base import NameTaken, NewVoiceData, StoredVoice, StoreError

log = logging.getLogger("openchroma.serve.voices")

INDEX_NAME = "index.sqlite3"
SCHEMA_VERSION = 1                 # PRAGMA user_version: 0 = the first layout (no version column)
_TMP_PREFIX = ".tmp-"
_ORPHAN_AGE_S = 3600.0             # unreferenced files older than this are swept at start-up
_FILE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}-[0-9a-f]{8}\.[a-z0-9.]{1,16}")  # NAME-XXXXXXXX.EXT

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
# Versioned migrations: _MIGRATIONS[i] takes the schema from user_version i to i + 1.
_MIGRATIONS = ["ALTER TABLE voices ADD COLUMN version TEXT"]


def _meta(row: sqlite3.Row) -> StoredVoice:
    return StoredVoice(
        name=row["name"], version=row["version"] or f"{row['name']}@{row['created_at']!r}",
        transcript=row["transcript"], created_at=float(row["created_at"]), duration_s=float(row["duration_s"]),
        sample_rate=int(row["sample_rate"]), audio_content_type=row["audio_content_type"],
        original_filename=row["original_filename"], original_content_type=row["original_content_type"],
        source_sample_rate=row["source_sample_rate"], speech_seconds=row["speech_seconds"])


class SqliteVoiceStore:
    """Voices under ``folder``: one SQLite connection guarded by a lock (thread-safe)."""

    def __init__(self, folder: Path):
        self.dir = Path(folder)
        self.index_path = self.dir / INDEX_NAME
        self.location = str(self.dir)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._swept = False

    def _connect(self, create: bool) -> sqlite3.Connection | None:
        """The open index (caller holds the lock); None when it does not exist yet and ``create`` is false."""
        if self._conn is None:
            if not create and not self.index_path.exists():
                return None
            self.dir.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(self.index_path), check_same_thread=False, timeout=10.0,
                                   isolation_level=None)   # transactions are explicit (BEGIN IMMEDIATE)
            try:
                conn.row_factory = sqlite3.Row
                try:
                    conn.execute("PRAGMA journal_mode=WAL")
                except sqlite3.DatabaseError as e:  # e.g. some network file systems; the default journal works
                    log.warning("voice library %s: WAL mode unavailable (%s)", self.index_path, e)
                _migrate(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        try:
            with self._lock:
                conn = self._connect(False)
                return [] if conn is None else conn.execute(sql, args).fetchall()
        except (sqlite3.Error, OSError) as e:
            raise StoreError(f"cannot read {self.index_path} ({type(e).__name__}: {e})") from None

    def _file(self, stored: str | None) -> Path | None:
        return self.dir / Path(stored).name if stored else None

    def versions(self) -> dict[str, str]:
        return {r["name"]: _meta(r).version for r in self._query("SELECT * FROM voices")}

    def list(self) -> list[StoredVoice]:
        rows = self._query("SELECT * FROM voices ORDER BY name")
        if not self._swept and self.index_path.exists():
            self._swept = True
            self._sweep(rows)
        return [_meta(r) for r in rows]

    def get(self, name: str) -> StoredVoice | None:
        rows = self._query("SELECT * FROM voices WHERE name = ?", (name,))
        return _meta(rows[0]) if rows else None

    def codes(self, name: str) -> tuple[StoredVoice, dict[str, torch.Tensor]] | None:
        rows = self._query("SELECT * FROM voices WHERE name = ?", (name,))
        if not rows:
            return None
        path = self._file(rows[0]["codes_file"])
        if path is None or not path.is_file():
            raise ValueError(f"its codes file {path} is missing")
        try:
            return _meta(rows[0]), load_file(str(path))
        except Exception as e:
            raise ValueError(f"its codes file {path} is unreadable: {e}") from None

    def audio(self, name: str) -> tuple[Path | bytes, str] | None:
        rows = self._query("SELECT * FROM voices WHERE name = ?", (name,))
        if not rows:
            return None
        path = self._file(rows[0]["audio_file"])
        if path is None or not path.is_file():
            raise FileNotFoundError(str(path))
        return path, rows[0]["audio_content_type"] or "application/octet-stream"

    def insert(self, voice: NewVoiceData) -> StoredVoice:
        """Write the files atomically, then insert the row; on any failure none of it stays."""
        m = voice.meta
        stem = f"{m.name}-{secrets.token_hex(4)}"
        audio_file, wav_file, codes_file = stem + voice.audio_ext, stem + ".24k.wav", stem + ".safetensors"
        written: list[Path] = []
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            _atomic_write(self.dir / audio_file, lambda p: p.write_bytes(voice.audio), written)
            _atomic_write(self.dir / wav_file, lambda p: p.write_bytes(voice.wav), written)
            _atomic_write(self.dir / codes_file,
                          lambda p: save_file(voice.codes, str(p), metadata=voice.codes_meta), written)
            _fsync_dir(self.dir)
            with self._lock:
                conn = self._connect(True)
                conn.execute("BEGIN IMMEDIATE")   # one writer at a time, across processes too
                try:
                    conn.execute(
                        "INSERT INTO voices (name, version, transcript, created_at, duration_s, sample_rate, "
                        "audio_file, audio_content_type, wav_file, codes_file, original_filename, "
                        "original_content_type, source_sample_rate, speech_seconds) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (m.name, m.version, m.transcript, m.created_at, m.duration_s, m.sample_rate, audio_file,
                         m.audio_content_type, wav_file, codes_file, m.original_filename, m.original_content_type,
                         m.source_sample_rate, m.speech_seconds))
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            return m
        except BaseException as e:
            for p in written:
                with contextlib.suppress(OSError):
                    p.unlink()
            if isinstance(e, sqlite3.IntegrityError):
                raise NameTaken(m.name) from None
            if isinstance(e, (OSError, sqlite3.Error)):
                raise StoreError(f"cannot write {self.dir} ({type(e).__name__}: {e})") from None
            raise

    def delete(self, name: str) -> StoredVoice | None:
        try:
            with self._lock:
                conn = self._connect(False)
                if conn is None:
                    return None
                conn.execute("BEGIN IMMEDIATE")
                try:
                    row = conn.execute("SELECT * FROM voices WHERE name = ?", (name,)).fetchone()
                    if row is not None:
                        conn.execute("DELETE FROM voices WHERE name = ?", (name,))
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
        except (sqlite3.Error, OSError) as e:
            raise StoreError(f"cannot update {self.index_path} ({type(e).__name__}: {e})") from None
        if row is None:
            return None
        for stored in (row["audio_file"], row["wav_file"], row["codes_file"]):
            path = self._file(stored)
            if path is not None:
                try:
                    path.unlink(missing_ok=True)
                except OSError as e:  # swept at the next start
                    log.warning("voice %r deleted but its file %s could not be removed: %s", name, path, e)
        return _meta(row)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

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


def _migrate(conn: sqlite3.Connection) -> None:
    """Create the table, then apply the migrations this file has not had yet (its ``user_version``)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(_SCHEMA)
        have = conn.execute("PRAGMA user_version").fetchone()[0]
        for i in range(have, SCHEMA_VERSION):
            conn.execute(_MIGRATIONS[i])
        if have < SCHEMA_VERSION:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


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
