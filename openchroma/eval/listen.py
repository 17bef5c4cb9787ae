"""``openchroma listen``: a blind A/B listening test for the paper's comparative MOS (NCMOS, SCMOS).

Each trial plays a reference clip and two systems' clips in an order drawn at random for every presentation;
the page never learns which system is which (audio is served under a random token). A listener answers
"clip 1", "about the same" or "clip 2"; the server maps that back to the system and stores it in SQLite.
The summary gives, per question and system pair, the share of answers preferring each system and of no
preference, each with a 95% Wilson score interval.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import secrets
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .testlist import EvalInputError, pipe_rows

if TYPE_CHECKING:
    from .listen_app import ListeningServer

STATIC = Path(__file__).with_name("static")
QUESTIONS = {
    "ncmos": "Which clip sounds more natural?",
    "scmos": "Which clip sounds more like the speaker of the reference?",
}
CHOICES = ("first", "same", "second")
DB_NAME = "answers.sqlite"
Z95 = 1.959963984540054


@dataclass(frozen=True)
class Pair:
    item: str
    reference: Path
    system_a: str
    wav_a: Path
    system_b: str
    wav_b: Path


def read_pairs(path: str | Path) -> list[Pair]:
    """Parse ``item|reference_wav|system_a|wav_a|system_b|wav_b`` lines; raise ``EvalInputError`` naming bad lines."""
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"pairs file not found: {path}")
    base = path.resolve().parent
    pairs: list[Pair] = []
    problems: list[str] = []
    for lineno, fields in pipe_rows(path):
        where = f"{path}:{lineno}"
        if len(fields) != 6 or not all(fields):
            problems.append(f"{where}: expected 6 non-empty fields 'item|reference_wav|system_a|wav_a|system_b|wav_b'")
            continue
        item, ref, sys_a, wav_a, sys_b, wav_b = fields
        if sys_a == sys_b:
            problems.append(f"{where}: both clips are from system {sys_a!r}")
            continue
        pair = Pair(item, base / ref, sys_a, base / wav_a, sys_b, base / wav_b)
        missing = [str(p) for p in (pair.reference, pair.wav_a, pair.wav_b) if not p.is_file()]
        if missing:
            problems.append(f"{where}: audio not found: {', '.join(missing)}")
            continue
        pairs.append(pair)
    if problems:
        raise EvalInputError(f"{len(problems)} bad line(s) in the pairs file:\n  " + "\n  ".join(problems[:10]))
    if not pairs:
        raise EvalInputError(f"pairs file {path} has no trials")
    return pairs


class AnswerStore:
    """Trials, presentations (which system played first) and answers, in one SQLite file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False)
        self.active: list[int] = []  # the trials served now (add_trials)
        self._db.row_factory = sqlite3.Row
        with self._db:
            self._db.executescript("""
                CREATE TABLE IF NOT EXISTS trials (
                    id INTEGER PRIMARY KEY, item TEXT NOT NULL, question TEXT NOT NULL,
                    reference TEXT NOT NULL, system_a TEXT NOT NULL, wav_a TEXT NOT NULL,
                    system_b TEXT NOT NULL, wav_b TEXT NOT NULL, UNIQUE (item, question, system_a, system_b));
                CREATE TABLE IF NOT EXISTS presentations (
                    token TEXT PRIMARY KEY, trial_id INTEGER NOT NULL REFERENCES trials(id), rater TEXT NOT NULL,
                    first_system TEXT NOT NULL, second_system TEXT NOT NULL, created REAL NOT NULL);
                CREATE TABLE IF NOT EXISTS answers (
                    id INTEGER PRIMARY KEY, token TEXT NOT NULL UNIQUE, trial_id INTEGER NOT NULL, rater TEXT NOT NULL,
                    item TEXT NOT NULL, question TEXT NOT NULL, first_system TEXT NOT NULL,
                    second_system TEXT NOT NULL, choice TEXT NOT NULL, preferred TEXT, answered REAL NOT NULL,
                    UNIQUE (trial_id, rater));
            """)

    def close(self) -> None:
        self._db.close()

    def add_trials(self, pairs: list[Pair], questions: list[str]) -> None:
        """Make these the trials served (a database reused with another pairs file keeps its old answers for the
        summary, but serves only the new trials)."""
        active = []
        with self._lock, self._db:
            for pair in pairs:
                for q in questions:
                    key = (pair.item, q, pair.system_a, pair.system_b)
                    self._db.execute(
                        "INSERT INTO trials (item, question, reference, system_a, wav_a, system_b, wav_b) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (item, question, system_a, system_b) "
                        "DO UPDATE SET reference = excluded.reference, wav_a = excluded.wav_a, wav_b = excluded.wav_b",
                        (pair.item, q, str(pair.reference), pair.system_a, str(pair.wav_a), pair.system_b,
                         str(pair.wav_b)))
                    active.append(self._db.execute(
                        "SELECT id FROM trials WHERE item = ? AND question = ? AND system_a = ? AND system_b = ?",
                        key).fetchone()[0])
        self.active = active

    def progress(self, rater: str) -> tuple[int, int]:
        """(trials this rater has answered, trials served)."""
        with self._lock:
            answered = {r[0] for r in self._db.execute("SELECT trial_id FROM answers WHERE rater = ?", (rater,))}
        return len(answered.intersection(self.active)), len(self.active)

    def present(self, rater: str, rng: random.Random) -> dict[str, Any] | None:
        """A trial the rater has not answered, in a fresh random clip order; None when all are answered."""
        with self._lock, self._db:
            active = set(self.active)
            left = [t for t in self._db.execute(
                "SELECT * FROM trials WHERE id NOT IN (SELECT trial_id FROM answers WHERE rater = ?) ORDER BY id",
                (rater,)) if t["id"] in active]
            if not left:
                return None
            trial = rng.choice(left)
            first, second = (trial["system_a"], trial["system_b"])
            if rng.random() < 0.5:
                first, second = second, first
            token = secrets.token_urlsafe(12)
            self._db.execute("INSERT INTO presentations VALUES (?, ?, ?, ?, ?, ?)",
                             (token, trial["id"], rater, first, second, time.time()))
        return {"token": token, "question": trial["question"]}

    def audio_path(self, token: str, slot: str) -> Path | None:
        """The file behind ``/audio/<token>/<slot>``: slot ``ref``, ``1`` or ``2``."""
        with self._lock:
            row = self._db.execute(
                "SELECT p.first_system, p.second_system, t.* FROM presentations p JOIN trials t ON t.id = p.trial_id "
                "WHERE p.token = ?", (token,)).fetchone()
        if row is None or slot not in ("ref", "1", "2"):
            return None
        if slot == "ref":
            return Path(row["reference"])
        system = row["first_system"] if slot == "1" else row["second_system"]
        return Path(row["wav_a"] if system == row["system_a"] else row["wav_b"])

    def record(self, token: str, choice: str) -> str | None:
        """Store an answer to a presentation; return the preferred system (None for "same")."""
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        with self._lock, self._db:
            p = self._db.execute(
                "SELECT p.*, t.item, t.question FROM presentations p JOIN trials t ON t.id = p.trial_id "
                "WHERE p.token = ?", (token,)).fetchone()
            if p is None:
                raise KeyError(token)
            preferred = {"first": p["first_system"], "second": p["second_system"], "same": None}[choice]
            try:
                self._db.execute(
                    "INSERT INTO answers (token, trial_id, rater, item, question, first_system, second_system, "
                    "choice, preferred, answered) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (token, p["trial_id"], p["rater"], p["item"], p["question"], p["first_system"],
                     p["second_system"], choice, preferred, time.time()))
            except sqlite3.IntegrityError:
                raise ValueError("this trial was already answered by this listener") from None
        return preferred

    def answers(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._db.execute("SELECT * FROM answers ORDER BY id")]


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sensible at 0%, 100% and small n, unlike p ± 1.96·se)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarize_answers(out_dir: Path) -> dict[str, Any]:
    """Per question and system pair: answers, raters, and each outcome's share with its 95% interval."""
    db = Path(out_dir) / DB_NAME
    if not db.is_file():
        raise EvalInputError(f"no answers database at {db} (run openchroma listen --pairs ... --out {out_dir} first)")
    store = AnswerStore(db)
    try:
        answers = store.answers()
    finally:
        store.close()
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for a in answers:
        x, y = sorted((a["first_system"], a["second_system"]))
        groups.setdefault((a["question"], x, y), []).append(a)
    out = []
    for (question, x, y), rows in sorted(groups.items()):
        n = len(rows)
        outcomes = []
        for label, system in ((f"{x} preferred", x), (f"{y} preferred", y), ("no preference", None)):
            k = sum(1 for r in rows if r["preferred"] == system)
            lo, hi = wilson_interval(k, n)
            outcomes.append({"outcome": label, "system": system, "count": k, "percent": 100 * k / n,
                             "ci95": [100 * lo, 100 * hi]})
        out.append({"question": question, "systems": [x, y], "answers": n,
                    "raters": len({r["rater"] for r in rows}), "outcomes": outcomes})
    return {"answers": len(answers), "comparisons": out}


def format_summary(summary: dict[str, Any]) -> str:
    if not summary["comparisons"]:
        return "no answers yet\n"
    lines = []
    for c in summary["comparisons"]:
        name = c["question"].upper()
        lines.append(f"{name} ({QUESTIONS.get(c['question'], c['question'])}) {c['systems'][0]} vs "
                     f"{c['systems'][1]}: {c['answers']} answers from {c['raters']} listener(s)")
        for o in c["outcomes"]:
            lo, hi = o["ci95"]
            lines.append(f"  {o['outcome']:<28} {o['percent']:5.1f}%  (95% CI {lo:5.1f}% to {hi:5.1f}%, "
                         f"n={o['count']})")
    return "\n".join(lines) + "\n"


def start_server(pairs: list[Pair], out_dir: Path, questions: list[str] | None = None, host: str = "127.0.0.1",
                 port: int = 0, seed: int | None = None) -> ListeningServer:
    """Create the answers database and serve the page from a background thread; ``shutdown()`` to stop."""
    questions = questions or list(QUESTIONS)
    unknown = [q for q in questions if q not in QUESTIONS]
    if unknown:
        raise EvalInputError(f"unknown question(s) {', '.join(unknown)}: expected {', '.join(QUESTIONS)}")
    store = AnswerStore(Path(out_dir) / DB_NAME)
    store.add_trials(pairs, questions)
    from .listen_app import ListeningServer

    try:
        return ListeningServer((host, port), store, random.Random(seed), QUESTIONS, STATIC)
    except BaseException:
        store.close()
        raise


def serve(pairs: list[Pair], out_dir: Path, questions: list[str] | None = None, host: str = "127.0.0.1",
          port: int = 8765, seed: int | None = None) -> None:
    """Serve until Ctrl-C."""
    server = start_server(pairs, out_dir, questions, host, port, seed)
    print(f"listening test: {server.url}  ({len(pairs)} pairs; answers go to {Path(out_dir) / DB_NAME})\n"
          f"Ctrl-C to stop; then: openchroma listen --summary {out_dir}")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.store.close()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Serve a listening page: each trial plays a reference clip and two systems' clips in random "
                     "order, without names, and asks which sounds more natural (NCMOS) or more like the reference "
                     "speaker (SCMOS). Answers go to DIR/answers.sqlite. --summary DIR prints preference percentages "
                     "with 95% confidence intervals (Wilson).")
    p.epilog = ("Pairs format (paths relative to the file; '#' comments): "
                "item|reference_wav|system_a|wav_a|system_b|wav_b")
    p.add_argument("--pairs", default=None, metavar="FILE", help="the trials to run")
    p.add_argument("--out", default=None, metavar="DIR", help="where answers.sqlite goes")
    p.add_argument("--questions", default="ncmos,scmos",
                   help="comma-separated: ncmos (naturalness), scmos (speaker similarity) (default: both)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (default: 8765; 0 picks a free one)")
    p.add_argument("--seed", type=int, default=None, help="seed for the clip order (default: random)")
    p.add_argument("--summary", default=None, metavar="DIR",
                   help="print the preferences recorded in DIR/answers.sqlite and exit")
    p.add_argument("--json", action="store_true", help="with --summary: print JSON")


def run(args: argparse.Namespace) -> int:
    from ..cli_args import UsageError

    if args.summary:
        summary = summarize_answers(Path(args.summary))
        print(json.dumps(summary, indent=2) if args.json else format_summary(summary).rstrip("\n"))
        return 0
    if not args.pairs or not args.out:
        raise UsageError("give --pairs FILE --out DIR to run a test, or --summary DIR")
    pairs = read_pairs(args.pairs)  # checked before the server starts
    questions = [q.strip() for q in args.questions.split(",") if q.strip()]
    try:
        serve(pairs, Path(args.out), questions=questions, host=args.host, port=args.port, seed=args.seed)
    except OSError as e:  # the port is taken, the address is not this machine's, ...
        print(f"openchroma listen: error: cannot serve on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    return 0
