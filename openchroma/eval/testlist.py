"""Test lists in the seed-tts-eval format, checked completely before any model is loaded.

A voice-cloning TTS list has one utterance a line, ``utt|prompt_text|prompt_wav|target_text``; a dialogue list
has ``utt|prompt_text|prompt_wav|user_wav`` (the user's turn as audio; the model's own answer text is then the
reference for WER). Paths are relative to the list file. Blank lines and lines starting with ``#`` are skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TASKS = ("tts", "dialogue")


class EvalInputError(ValueError):
    """A list, pairs file or audio directory is unusable; the message names the file, line and problem."""


@dataclass(frozen=True)
class TestItem:
    utt: str
    prompt_text: str
    prompt_wav: Path
    target_text: str | None = None   # tts: what to say
    user_wav: Path | None = None     # dialogue: what the user says


def pipe_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """A list file's ``|``-separated rows as (line number, stripped fields); blank and ``#`` lines skipped."""
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if line and not line.startswith("#"):
            yield lineno, [f.strip() for f in line.split("|")]


def read_test_list(path: str | Path, task: str = "tts", check_audio: bool = True) -> list[TestItem]:
    """Parse and check a test list; raise ``EvalInputError`` naming every bad line (up to 10)."""
    if task not in TASKS:
        raise EvalInputError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"test list not found: {path}")
    base = path.resolve().parent
    last_field = "target_text" if task == "tts" else "user_wav"
    fmt = f"utt|prompt_text|prompt_wav|{last_field}"
    items: list[TestItem] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    for lineno, fields in pipe_rows(path):
        where = f"{path}:{lineno}"
        if len(fields) != 4:
            problems.append(f"{where}: expected 4 fields '{fmt}', found {len(fields)}")
            continue
        utt, prompt_text, prompt_wav, last = fields
        names = ("utt", "prompt_text", "prompt_wav", last_field)
        empty = [name for name, value in zip(names, fields, strict=True) if not value]
        if empty:
            problems.append(f"{where}: empty {', '.join(empty)}")
            continue
        if "/" in utt or "\\" in utt or utt in (".", ".."):
            problems.append(f"{where}: utt {utt!r} is used as a file name and may not contain a path separator")
            continue
        if utt in seen:
            problems.append(f"{where}: utt {utt!r} repeats line {seen[utt]}")
            continue
        seen[utt] = lineno
        prompt_path = base / prompt_wav
        wavs = [("prompt_wav", prompt_path)]
        item = TestItem(utt, prompt_text, prompt_path, target_text=last if task == "tts" else None,
                        user_wav=base / last if task == "dialogue" else None)
        if item.user_wav is not None:
            wavs.append(("user_wav", item.user_wav))
        missing = [f"{name} {p} not found" for name, p in wavs if check_audio and not p.is_file()]
        if missing:
            problems.append(f"{where}: {'; '.join(missing)}")
            continue
        items.append(item)
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise EvalInputError(f"{len(problems)} bad line(s) in the test list:\n  " + "\n  ".join(problems[:10]) + more)
    if not items:
        raise EvalInputError(f"test list {path} has no utterances (format: {fmt})")
    return items
