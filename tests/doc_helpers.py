"""Reading the README and docs/ as tests do: fenced blocks, the shell commands in them, the links."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
# Pages other changes create; a link to them may wait for them (nothing else may point nowhere).
PENDING_PAGES: set[str] = set()   # docs pages linked before they are written (none now)
SEPARATORS = {"&&", "||", ";", "|"}


def blocks(text: str, lang: str) -> list[str]:
    """Every fenced block of ``lang``, in order."""
    return [m.group(1) for m in re.finditer(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)]


def block_after(text: str, after: str, lang: str = "bash") -> str:
    """The first ``lang`` block after the line containing ``after``."""
    m = re.compile(rf"^```{lang}\n(.*?)^```", re.S | re.M).search(text, text.index(after))
    assert m, f"no {lang} block after {after!r}"
    return m.group(1)


def shell_commands(block: str) -> list[list[str]]:
    """The simple commands of a shell block: continuations joined, comments dropped, split at ``&&``, ``;``, ..."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        current: list[str] = []
        for token in lexer:
            if token in SEPARATORS:
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    return [c for c in commands if c]


def openchroma_commands(text: str) -> list[list[str]]:
    """The arguments of every ``openchroma ...`` command in the text's bash blocks."""
    return [c[1:] for block in blocks(text, "bash") for c in shell_commands(block) if c[0] == "openchroma"]


def parse_cli(argv: list[str]) -> None:
    """Parse ``openchroma ARGV`` as the console script would; fails the test on an unknown command or flag."""
    from openchroma.cli import build_parser

    try:
        build_parser().parse_args(argv)
    except SystemExit as e:   # --help exits 0; a parse error exits 2
        assert e.code == 0, f"openchroma {shlex.join(argv)}: the command line does not parse"


def relative_links(text: str) -> list[str]:
    """The targets of markdown links that point into the repository (no URLs, no in-page anchors)."""
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def missing_links(page: Path) -> list[str]:
    out = []
    for target in relative_links(page.read_text()):
        path = (page.parent / target).resolve()
        if not path.exists() and str(path.relative_to(ROOT)) not in PENDING_PAGES:
            out.append(target)
    return out


def run_openchroma(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "openchroma", *argv], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, (shlex.join(argv), r.stderr[-3000:])
    return r
