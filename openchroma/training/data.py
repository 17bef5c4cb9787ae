"""The dataset manifest (JSONL) and the prepared dataset (safetensors shards + ``prepared.json``).

Manifest: one JSON object a line, paths relative to the manifest's directory::

    {"voice_audio": "voices/anna.wav", "voice_text": "What the reference says.",
     "user_audio": "q/0001.wav",          # or "user_text": "the question" (or both)
     "response_text": "The answer.", "response_audio": "a/0001.wav"}

Optional: ``system`` (the system prompt; default the Qwen2.5-Omni speech prompt), ``id``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .sequence import ResponseExample

PREPARED_FORMAT = "openchroma-prepared/1"
PREPARED_INDEX = "prepared.json"
REQUIRED_TEXT = ("voice_text", "response_text")
REQUIRED_AUDIO = ("voice_audio", "response_audio")
KNOWN_KEYS = {"voice_audio", "voice_text", "user_audio", "user_text", "response_text", "response_audio", "system",
              "id"}


class ManifestError(ValueError):
    """A manifest row that cannot be used; the message names the file, the line and the problem."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


@dataclass
class ManifestRow:
    """One example of the manifest, paths resolved. ``line`` is 1-based."""

    line: int
    where: str
    voice_audio: Path
    voice_text: str
    response_text: str
    response_audio: Path
    user_audio: Path | None = None
    user_text: str | None = None
    system: str | None = None
    id: str | None = None


def parse_row(obj: Any, manifest: Path, line: int) -> ManifestRow:
    """Check one decoded manifest line; raises :class:`ManifestError` naming the row."""
    where = f"{manifest}:{line}"
    if not isinstance(obj, dict):
        raise ManifestError(where, f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - KNOWN_KEYS)
    if unknown:
        raise ManifestError(where, f"unknown key(s) {', '.join(map(repr, unknown))} "
                                   f"(known: {', '.join(sorted(KNOWN_KEYS))})")
    for key in REQUIRED_TEXT + REQUIRED_AUDIO:
        if key not in obj:
            raise ManifestError(where, f"missing {key!r}")
    for key in REQUIRED_TEXT + ("user_text", "system"):
        if key in obj and not isinstance(obj[key], str):
            raise ManifestError(where, f"{key!r} must be a string")
    for key in REQUIRED_TEXT:
        if not obj[key].strip():
            raise ManifestError(where, f"{key!r} is empty")
    if not obj.get("user_audio") and not (obj.get("user_text") or "").strip():
        raise ManifestError(where, "no question: give 'user_audio' or a non-empty 'user_text'")
    base = manifest.parent

    def path(key: str) -> Path:
        value = obj[key]
        if not isinstance(value, str) or not value:
            raise ManifestError(where, f"{key!r} must be a non-empty path")
        p = (base / value).resolve()
        if not p.is_file():
            raise ManifestError(where, f"{key} {value!r} not found (looked for {p})")
        return p

    return ManifestRow(
        line=line, where=where, voice_audio=path("voice_audio"), voice_text=obj["voice_text"],
        response_text=obj["response_text"], response_audio=path("response_audio"),
        user_audio=path("user_audio") if obj.get("user_audio") else None,
        user_text=(obj.get("user_text") or None), system=obj.get("system"),
        id=str(obj["id"]) if "id" in obj else None,
    )


def read_manifest_lines(manifest: str | Path) -> list[tuple[int, str]]:
    """The manifest's non-empty lines with their 1-based numbers."""
    path = Path(manifest)
    if not path.is_file():
        raise ManifestError(str(path), "no such manifest file")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [(i + 1, s) for i, s in enumerate(lines) if s.strip()]


def decode_line(manifest: Path, line: int, text: str) -> ManifestRow:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{manifest}:{line}", f"not valid JSON ({e})") from None
    return parse_row(obj, manifest, line)


def write_manifest(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Write rows (dicts with manifest keys, paths relative to ``path``'s directory) as JSONL."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------------------------------------
# The prepared dataset
# ----------------------------------------------------------------------------------------------------------

EXAMPLE_KEYS = ("voice_text_ids", "voice_codes", "hidden", "text_ids", "codes")


class PreparedDataset:
    """Examples written by ``openchroma prepare``: per example the voice prompt, the reasoner's hidden states
    and token ids of the response, and the response's Mimi codes (without the end-of-audio frame, which
    training appends)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        index = self.root / PREPARED_INDEX
        if not index.is_file():
            raise ValueError(f"{self.root}: not a prepared dataset (no {PREPARED_INDEX}; run `openchroma prepare`)")
        self.meta = json.loads(index.read_text())
        if self.meta.get("format") != PREPARED_FORMAT:
            raise ValueError(f"{index}: unknown format {self.meta.get('format')!r} (expected {PREPARED_FORMAT})")
        if not self.meta.get("complete"):
            raise ValueError(f"{self.root}: preparation did not finish (run `openchroma prepare` again to resume)")
        self.items: list[tuple[str, int, dict]] = []
        for shard in self.meta["shards"]:
            for i, ex in enumerate(shard["examples"]):
                self.items.append((shard["file"], i, ex))
        self._handles: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.items)

    @property
    def hidden_size(self) -> int:
        return int(self.meta["hidden_size"])

    def frames(self, i: int) -> int:
        """Training frames of example ``i``: the response's frames plus the end-of-audio frame."""
        return int(self.items[i][2]["n_frames"]) + 1

    def row(self, i: int) -> int:
        return int(self.items[i][2]["line"])

    def _handle(self, file: str):
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.root / file), "pt", device="cpu")
        return self._handles[file]

    def tensors(self, i: int) -> dict[str, torch.Tensor]:
        file, j, _ = self.items[i]
        h = self._handle(file)
        return {k: h.get_tensor(f"{j}.{k}") for k in EXAMPLE_KEYS}

    def example(self, i: int, eos: torch.Tensor, device: torch.device | str = "cpu") -> ResponseExample:
        """Example ``i`` with the end-of-audio frame ``eos`` ``[K]`` appended, on ``device``."""
        t = self.tensors(i)
        codes = torch.cat([t["codes"], eos.reshape(1, -1).to(t["codes"].dtype)])
        return ResponseExample(t["voice_text_ids"].to(device), t["voice_codes"].to(device), t["hidden"].to(device),
                               t["text_ids"].to(device), codes.to(device))
