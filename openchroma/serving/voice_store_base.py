"""The voice library's storage interface: where stored voices (metadata, reference audio, computed codes) live.

Two backends implement it: ``voice_store_sqlite`` (the embedded default: SQLite plus files in ``--data-dir``)
and ``voice_store_postgres`` (``--voices-db postgresql://...``: everything in the database, shared by every
replica). ``voice_library.open_store`` picks one. Every stored voice carries a ``version`` (new on every add),
so a process that caches a voice's prompt can tell when another process deleted or replaced it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch


class StoreError(Exception):
    """The store cannot be read or written (disk, database unreachable). ``unreachable``: a lost or refused
    database connection (retrying later may succeed), as opposed to a failed write."""

    def __init__(self, message: str, unreachable: bool = False):
        super().__init__(message)
        self.unreachable = unreachable


class NameTaken(Exception):
    """Another writer stored a voice of that name first."""


@dataclass(frozen=True)
class StoredVoice:
    """One stored voice's metadata (what ``GET /v1/voices/{name}`` shows, and how to tell versions apart)."""

    name: str
    version: str
    transcript: str
    created_at: float
    duration_s: float
    sample_rate: int
    audio_content_type: str
    original_filename: str | None = None
    original_content_type: str | None = None
    source_sample_rate: int | None = None
    speech_seconds: float | None = None


@dataclass(frozen=True)
class NewVoiceData:
    """A checked, encoded voice on its way into a store."""

    meta: StoredVoice
    audio: bytes                       # as uploaded
    audio_ext: str                     # its file extension (".wav", ".flac", ...)
    wav: bytes                         # the same audio as a 24 kHz mono 16-bit WAV file
    codes: dict[str, torch.Tensor]     # "codes" [frames, K] and "text_ids" [n], int64
    codes_meta: dict[str, str]         # the safetensors header's metadata


class VoiceStore(Protocol):
    """What the voice library needs from a storage backend. Every method may raise ``StoreError``."""

    location: str                      # for messages: a folder, or the database without its password

    def versions(self) -> dict[str, str]:
        """Every stored voice's name -> version (cheap: the on-use check of every cached voice)."""

    def list(self) -> list[StoredVoice]: ...

    def get(self, name: str) -> StoredVoice | None: ...

    def codes(self, name: str) -> tuple[StoredVoice, dict[str, torch.Tensor]] | None:
        """A voice's metadata and codes tensors; raises ``ValueError`` when they are damaged or missing."""

    def audio(self, name: str) -> tuple[Path | bytes, str] | None:
        """The reference audio as uploaded (a file, or its bytes) and its media type; None when unknown."""

    def insert(self, voice: NewVoiceData) -> StoredVoice:
        """Store a voice atomically (all of it or nothing); raises ``NameTaken`` when the name is in use."""

    def delete(self, name: str) -> StoredVoice | None:
        """Remove a voice; its metadata, or None when there was none."""

    def close(self) -> None: ...


def redact(url: str) -> str:
    """A database URL without its password, for messages and logs."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)
