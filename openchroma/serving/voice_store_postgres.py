"""The shared voice store: PostgreSQL (``--voices-db postgresql://...``), for replicas on many machines.

Metadata, the reference audio (as uploaded and as 24 kHz WAV) and the computed codes (a safetensors blob) live in
one table, ``openchroma_voices``; a voice is one row, so an add or a delete is one transaction. The schema is
created on first use and upgraded by versioned migrations, recorded in ``openchroma_schema`` and applied under an
advisory lock (replicas starting together do not race). One connection per store, guarded by a lock; a lost
connection fails the operation in hand with ``StoreError(unreachable=True)`` and the next one reconnects.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import torch
from psycopg.rows import dict_row
from safetensors.torch import load, save

from .voice_store_base import NameTaken, NewVoiceData, StoredVoice, StoreError, redact

log = logging.getLogger("openchroma.serve.voices")

T = TypeVar("T")
CONNECT_TIMEOUT_S = 3
_LOCK_ID = 0x0C_4E0A_5701         # pg_advisory_xact_lock key for migrations
_META_COLS = ("name, version, transcript, created_at, duration_s, sample_rate, audio_content_type, "
              "original_filename, original_content_type, source_sample_rate, speech_seconds")
# Versioned migrations: _MIGRATIONS[i] takes the schema from version i to i + 1.
_MIGRATIONS = [
    """CREATE TABLE openchroma_voices (
        name TEXT PRIMARY KEY,
        version TEXT NOT NULL,
        transcript TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        duration_s DOUBLE PRECISION NOT NULL,
        sample_rate INTEGER NOT NULL,
        audio BYTEA NOT NULL,
        audio_ext TEXT NOT NULL,
        audio_content_type TEXT NOT NULL,
        wav BYTEA NOT NULL,
        codes BYTEA NOT NULL,
        original_filename TEXT,
        original_content_type TEXT,
        source_sample_rate INTEGER,
        speech_seconds DOUBLE PRECISION
    )""",
]
SCHEMA_VERSION = len(_MIGRATIONS)


class PostgresVoiceStore:
    def __init__(self, url: str):
        self.url = url
        self.location = redact(url)
        self._lock = threading.Lock()
        self._conn: psycopg.Connection | None = None

    # ----- the connection -------------------------------------------------------------------------------
    def _connect(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            conn = psycopg.connect(self.url, autocommit=True, row_factory=dict_row, connect_timeout=CONNECT_TIMEOUT_S,
                                   application_name="openchroma")
            try:
                _migrate(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _run(self, op: Callable[[psycopg.Connection], T]) -> T:
        """``op`` on the connection; a connection found broken is replaced once (the server restarted meanwhile),
        and a failure to reach the server raises ``StoreError(unreachable=True)``."""
        with self._lock:
            for attempt in (0, 1):
                fresh = self._conn is None or self._conn.closed
                try:
                    return op(self._connect())
                except psycopg.OperationalError as e:
                    self._drop()
                    if fresh or attempt:
                        raise StoreError(f"the voice database {self.location} is unreachable: "
                                         f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}",
                                         unreachable=True) from None
                    log.warning("voice database connection lost (%s); reconnecting", str(e).strip()[:200])
                except psycopg.Error as e:
                    if isinstance(e, psycopg.errors.UniqueViolation):
                        raise
                    raise StoreError(f"the voice database {self.location} failed: {type(e).__name__}: {e}") from None
        raise AssertionError("unreachable")

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None

    def _fetch(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        return self._run(lambda c: c.execute(sql, args).fetchall())

    # ----- the interface --------------------------------------------------------------------------------
    def versions(self) -> dict[str, str]:
        return {r["name"]: r["version"] for r in self._fetch("SELECT name, version FROM openchroma_voices")}

    def list(self) -> list[StoredVoice]:
        return [StoredVoice(**r) for r in self._fetch(f"SELECT {_META_COLS} FROM openchroma_voices ORDER BY name")]

    def get(self, name: str) -> StoredVoice | None:
        rows = self._fetch(f"SELECT {_META_COLS} FROM openchroma_voices WHERE name = %s", (name,))
        return StoredVoice(**rows[0]) if rows else None

    def codes(self, name: str) -> tuple[StoredVoice, dict[str, torch.Tensor]] | None:
        rows = self._fetch(f"SELECT {_META_COLS}, codes FROM openchroma_voices WHERE name = %s", (name,))
        if not rows:
            return None
        blob = bytes(rows[0].pop("codes"))
        try:
            tensors = load(blob)
        except Exception as e:
            raise ValueError(f"its codes in the database are unreadable: {e}") from None
        return StoredVoice(**rows[0]), tensors

    def audio(self, name: str) -> tuple[Path | bytes, str] | None:
        rows = self._fetch("SELECT audio, audio_content_type FROM openchroma_voices WHERE name = %s", (name,))
        return (bytes(rows[0]["audio"]), rows[0]["audio_content_type"]) if rows else None

    def insert(self, voice: NewVoiceData) -> StoredVoice:
        m = voice.meta
        codes = save(voice.codes, metadata=voice.codes_meta)
        try:
            self._run(lambda c: c.execute(
                "INSERT INTO openchroma_voices (name, version, transcript, created_at, duration_s, sample_rate, audio, "
                "audio_ext, audio_content_type, wav, codes, original_filename, original_content_type, "
                "source_sample_rate, speech_seconds) VALUES (" + ", ".join(["%s"] * 15) + ")",
                (m.name, m.version, m.transcript, m.created_at, m.duration_s, m.sample_rate, voice.audio,
                 voice.audio_ext, m.audio_content_type, voice.wav, codes, m.original_filename,
                 m.original_content_type, m.source_sample_rate, m.speech_seconds)))
        except psycopg.errors.UniqueViolation:
            raise NameTaken(m.name) from None
        return m

    def delete(self, name: str) -> StoredVoice | None:
        rows = self._fetch(f"DELETE FROM openchroma_voices WHERE name = %s RETURNING {_META_COLS}", (name,))
        return StoredVoice(**rows[0]) if rows else None

    def close(self) -> None:
        with self._lock:
            self._drop()


def _migrate(conn: psycopg.Connection) -> None:
    """Bring the schema to ``SCHEMA_VERSION``: each missing migration in order, recorded, in one transaction."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
        conn.execute("CREATE TABLE IF NOT EXISTS openchroma_schema (version INTEGER PRIMARY KEY, "
                     "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
        have = conn.execute("SELECT coalesce(max(version), 0) AS v FROM openchroma_schema").fetchone()["v"]
        if have > SCHEMA_VERSION:
            raise StoreError(f"the voice database has schema version {have}, newer than this OpenChroma's "
                             f"{SCHEMA_VERSION}: upgrade OpenChroma")
        for i in range(have, SCHEMA_VERSION):
            conn.execute(_MIGRATIONS[i])
            conn.execute("INSERT INTO openchroma_schema (version) VALUES (%s)", (i + 1,))
            log.info("voice database: schema migrated to version %d", i + 1)
