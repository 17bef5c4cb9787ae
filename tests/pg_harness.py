"""A throwaway PostgreSQL server for tests: initdb + pg_ctl in a temp folder, on a free loopback port.

PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` user (Debian's package makes it).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from server_harness import free_port

PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def pg_bin(tool: str) -> str | None:
    for d in PG_BIN_DIRS:
        if (d / tool).is_file():
            return str(d / tool)
    return shutil.which(tool)


def missing_reason() -> str | None:
    """Why a PostgreSQL server cannot be started here (None when it can)."""
    if pg_bin("initdb") is None or pg_bin("pg_ctl") is None:
        return "PostgreSQL's initdb/pg_ctl are not installed (Debian: apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run PostgreSQL as"
    return None


class PgServer:
    def __init__(self, folder: Path, port: int):
        self.folder, self.port = folder, port
        self.data = folder / "data"
        self.url = f"postgresql://openchroma@127.0.0.1:{port}/postgres"

    def _run(self, *args: str) -> None:
        cmd = [*args]
        if os.geteuid() == 0:   # PostgreSQL refuses root
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)

    def init(self) -> None:
        self._run(pg_bin("initdb"), "-D", str(self.data), "-U", "openchroma", "--auth=trust", "-E", "UTF8")

    def start(self) -> None:
        self._run(pg_bin("pg_ctl"), "-D", str(self.data), "-w", "-l", str(self.folder / "log"), "-o",
                  f"-p {self.port} -k {self.folder} -h 127.0.0.1", "start")

    def stop(self) -> None:
        self._run(pg_bin("pg_ctl"), "-D", str(self.data), "-w", "-m", "fast", "stop")


@contextmanager
def postgres_server() -> Iterator[PgServer]:
    folder = Path(tempfile.mkdtemp(prefix="oc-pg-"))
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(folder, pw.pw_uid, pw.pw_gid)
    server = PgServer(folder, free_port())
    try:
        server.init()
        server.start()
        yield server
    finally:
        try:
            server.stop()
        except Exception:
            pass
        shutil.rmtree(folder, ignore_errors=True)
