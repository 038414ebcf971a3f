"""A throw-away PostgreSQL server on 127.0.0.1 for tests and benchmarks (Debian's ``postgresql`` package).

``find_pg_bin`` looks for ``initdb``/``pg_ctl`` on PATH, then in ``/usr/lib/postgresql/*/bin`` (newest
first). ``PgServer`` initialises a data folder in a temp dir, starts the server on a free port (socket
in the data folder, trust auth: it listens on loopback only and lives for one session) and always stops
it (``pg_ctl -m fast stop``). As root, initdb refuses to run: the folder then belongs to ``postgres`` and
the binaries run through ``runuser -u postgres``. ``new_database()`` gives each test its own database.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path


def find_pg_bin() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``, or None when PostgreSQL is not installed."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).parent
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True):
        if Path(folder, "initdb").is_file() and Path(folder, "pg_ctl").is_file():
            return Path(folder)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    """One PostgreSQL server (``start`` / ``stop``, or a ``with`` block); ``url(db)`` connects as postgres."""

    def __init__(self, bin_dir: Path, *, fsync: bool = False):
        self.bin_dir, self.fsync = bin_dir, fsync
        self.port = _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="purecc-pg-"))
        self.data = self.dir / "data"
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.started = False

    def _run(self, *args: str, timeout: float = 120) -> None:
        done = subprocess.run([*self._as, *args], capture_output=True, text=True, timeout=timeout)
        if done.returncode:
            raise RuntimeError(f"{Path(args[0]).name} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")

    def start(self) -> "PgServer":
        if self._as:
            shutil.chown(self.dir, "postgres", "postgres")
        try:
            self._run(str(self.bin_dir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                      *(() if self.fsync else ("--no-sync",)))
            opts = f"-k {self.data} -c listen_addresses=127.0.0.1 -p {self.port} -c fsync={'on' if self.fsync else 'off'}"
            self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l",
                      str(self.dir / "log"), "-w", "-t", "60", "start")
            self.started = True
        except BaseException:
            self.stop()
            raise
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh empty database; its URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:16]
        with psycopg.connect(self.url(), autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.started:
            self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop", timeout=60)
            self.started = False
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "PgServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
