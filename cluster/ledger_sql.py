"""The ledger's database seam: one SQL text for SQLite (embedded, one machine) and PostgreSQL (a cluster).

The ledger writes its SQL once, in SQLite's spelling with ``?`` placeholders and the upsert forms both
databases share (``INSERT ... ON CONFLICT``, ``RETURNING``); ``Conn`` adapts what differs: placeholders
(``%s``), the DDL types (``AUTOINCREMENT`` -> identity, ``REAL`` -> double precision, an explicit
``rowid`` column where SQLite has an implicit one), ``IS`` for a nullable equality, and how a write
transaction starts.

Write transactions on PostgreSQL take one transaction-level advisory lock first (``pg_advisory_xact_lock``),
released by the COMMIT or ROLLBACK. That serialises writers exactly as SQLite's ``BEGIN IMMEDIATE`` does,
so the ledger's read-check-write steps (the driver lease, exactly-once transitions, quotas) keep the same
semantics on both with no per-row locking to get wrong: ``SELECT ... FOR UPDATE`` cannot lock a row that
does not exist yet (a first lease, a new concept), and SERIALIZABLE would need retries everywhere. Under
READ COMMITTED every statement after the lock sees every write committed before it. Ledger writes are
small and few per second, so one writer at a time costs nothing.

A SQLite ledger on a network filesystem is refused (``refuse_network_fs``): WAL needs shared memory on
one host and NFS-style locking is unreliable, so two nodes would corrupt it or each see its own file.
"""

from __future__ import annotations

import os
import re
import sqlite3
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterable, Sequence
from urllib.parse import urlsplit, urlunsplit

PG_SCHEMES = ("postgresql://", "postgres://")
# any value: the one lock every ledger writer of a PostgreSQL database takes ("purecc" in ASCII)
PG_LOCK_KEY = 0x707572656363
NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "fuse.ceph", "fuse.cephfs", "lustre", "glusterfs",
              "fuse.glusterfs", "fuse.sshfs", "sshfs", "9p", "afs", "gpfs", "beegfs", "fuse.s3fs", "fuse.gcsfuse",
              "fuse.juicefs", "fuse.rclone", "fuse.mountpoint-s3", "ocfs2", "gfs2", "orangefs", "pvfs2"}
ALLOW_NETWORK_FS_ENV = "PURECC_LEDGER_ALLOW_NETWORK_FS"

try:   # the errors a ledger database raises when it cannot be reached or read now (HTTP 503, not 500)
    import psycopg as _psycopg
    DATABASE_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error, _psycopg.Error)
except ImportError:     # psycopg is a dependency; without it only SQLite ledgers open
    DATABASE_ERRORS = (sqlite3.Error,)


def is_postgres(location: str | os.PathLike) -> bool:
    """True when ``location`` is a PostgreSQL URL (``postgresql://...``)."""
    return isinstance(location, str) and location.startswith(PG_SCHEMES)


def redacted(url: str) -> str:
    """``url`` without its password (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


# ----- network filesystems --------------------------------------------------------------------------
def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def filesystem_of(path: str | os.PathLike, mountinfo: str) -> tuple[str, str] | None:
    """(fstype, mount point) of the mount holding ``path`` (absolute), from ``/proc/self/mountinfo`` text:
    the longest mount point that is ``path`` or a folder above it (the last one listed wins a tie, as a
    later mount hides an earlier one). None when no line matches."""
    target = os.path.normpath(str(path))
    best: tuple[str, str] | None = None
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        point = _unescape(fields[4])
        fstype = line.split(" - ", 1)[1].split()[0]
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[1])):
            best = (fstype, point)
    return best


def network_fs_of(path: str | os.PathLike, mountinfo: str) -> str | None:
    """The network filesystem type holding ``path`` (``nfs4``, ``cifs``...), None for a local one."""
    found = filesystem_of(path, mountinfo)
    if found is None:
        return None
    fstype = found[0].lower()
    return fstype if fstype in NETWORK_FS or fstype.split(".")[0] in NETWORK_FS else None


def refuse_network_fs(folder: Path, mountinfo_path: str = "/proc/self/mountinfo") -> None:
    """Raise ``ValueError`` when ``folder`` (existing) is on a network filesystem, unless
    ``PURECC_LEDGER_ALLOW_NETWORK_FS=1`` (then warn loudly)."""
    try:
        text = Path(mountinfo_path).read_text()
    except OSError:
        return   # not Linux: nothing to read the mounts from
    fstype = network_fs_of(folder.resolve(), text)
    if fstype is None:
        return
    message = (f"ledger: the SQLite ledger's folder is on a network filesystem ({fstype}); SQLite's WAL and "
               "locking do not work there and every node would see its own file. Use a PostgreSQL ledger "
               "(`ledger: postgresql://user@host/db`)")
    if os.environ.get(ALLOW_NETWORK_FS_ENV) == "1":
        warnings.warn(f"{message}. {ALLOW_NETWORK_FS_ENV}=1 is set: opening it anyway; run only one process "
                      "on one node against it", RuntimeWarning, stacklevel=3)
        return
    raise ValueError(f"{message}, or set {ALLOW_NETWORK_FS_ENV}=1 if only one process on one node opens it")


# ----- connections --------------------------------------------------------------------------------
class Row(dict):
    """A result row read by column name or by position (like ``sqlite3.Row``)."""

    __slots__ = ("_values",)

    def __init__(self, names: Sequence[str], values: Sequence[Any]):
        super().__init__(zip(names, values))
        self._values = values

    def __getitem__(self, key):
        return self._values[key] if isinstance(key, int) else super().__getitem__(key)

    def __iter__(self):
        return iter(self._values)


def _sqlite_row(cursor: sqlite3.Cursor, values: tuple) -> Row:
    return Row([d[0] for d in cursor.description], values)


def _pg_rows(cursor) -> Any:
    names = [c.name for c in cursor.description or ()]
    return lambda values: Row(names, values)


class Conn(ABC):
    """One database connection speaking the ledger's SQL. Not thread-safe: the ledger holds a lock."""

    kind: str
    is_: str   # nullable equality: ``a IS ?`` (SQLite) / ``a IS NOT DISTINCT FROM %s`` (PostgreSQL)

    @abstractmethod
    def execute(self, sql: str, params: Iterable[Any] = ()) -> Any:
        """Run one statement written with ``?`` placeholders; the cursor."""

    @abstractmethod
    def begin(self) -> None:
        """Start a write transaction that holds the ledger's one writer lock."""

    def commit(self) -> None:
        self.execute("COMMIT")

    def rollback(self) -> None:
        self.execute("ROLLBACK")

    @abstractmethod
    def has_table(self, name: str) -> bool:
        """Whether the table ``name`` exists."""

    def ddl(self, sql: str) -> str:
        return sql

    @abstractmethod
    def close(self) -> None:
        """Close the connection."""


class SqliteConn(Conn):
    """SQLite in WAL mode with synchronous=FULL; writers serialised by ``BEGIN IMMEDIATE``."""

    kind, is_ = "sqlite", "IS"

    def __init__(self, path: Path, busy_timeout_s: float):
        self.raw = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
        self.raw.row_factory = _sqlite_row
        try:
            mode = self.raw.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise ValueError(f"the file system refused WAL mode ({mode})")
            self.raw.execute("PRAGMA synchronous=FULL")
            self.raw.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        except BaseException:
            self.raw.close()
            raise

    def execute(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Cursor:
        return self.raw.execute(sql, tuple(params))

    def begin(self) -> None:
        self.raw.execute("BEGIN IMMEDIATE")

    def has_table(self, name: str) -> bool:
        return self.raw.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                                (name,)).fetchone() is not None

    def close(self) -> None:
        self.raw.close()


class PostgresConn(Conn):
    """PostgreSQL through psycopg 3 (autocommit outside the ledger's explicit transactions)."""

    kind, is_ = "postgresql", "IS NOT DISTINCT FROM"

    def __init__(self, url: str, busy_timeout_s: float):
        import psycopg

        # lock_timeout bounds the wait for the writers' lock like SQLite's busy timeout
        self.raw = psycopg.connect(url, autocommit=True, row_factory=_pg_rows, connect_timeout=10,
                                   options=f"-c lock_timeout={int(busy_timeout_s * 1000)}")

    def execute(self, sql: str, params: Iterable[Any] = ()) -> Any:
        params = tuple(params)
        return self.raw.execute(sql.replace("?", "%s") if params else sql, params or None)

    def begin(self) -> None:
        self.raw.execute("BEGIN")
        self.raw.execute("SELECT pg_advisory_xact_lock(%s)", (PG_LOCK_KEY,))

    def has_table(self, name: str) -> bool:
        return self.raw.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()[0]

    def ddl(self, sql: str) -> str:
        sql = sql.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY")
        sql = re.sub(r"\bREAL\b", "DOUBLE PRECISION", sql)
        sql = re.sub(r"\bINTEGER\b", "BIGINT", sql)
        # SQLite's implicit rowid keeps insertion order; PostgreSQL gets an explicit one
        for table in ("jobs", "batch_members"):
            sql = sql.replace(f"CREATE TABLE IF NOT EXISTS {table} (",
                              f"CREATE TABLE IF NOT EXISTS {table} (rowid BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE, ")
        return sql

    def close(self) -> None:
        self.raw.close()


def connect(location: str | os.PathLike, busy_timeout_s: float) -> tuple[Conn, str]:
    """A connection to the ledger at ``location`` (a path, ``file://`` path or PostgreSQL URL) and the
    name to show for it. A SQLite file's folder is created, and refused on a network filesystem."""
    if is_postgres(location):
        return PostgresConn(str(location), busy_timeout_s), redacted(str(location))
    path = str(location)
    if path.startswith("file://"):
        path = path[len("file://"):]
    if "://" in path:
        raise ValueError(f"ledger: {path!r} must be a local path or a postgresql:// URL")
    file = Path(path).expanduser().resolve()
    file.parent.mkdir(parents=True, exist_ok=True)
    refuse_network_fs(file.parent)
    try:
        return SqliteConn(file, busy_timeout_s), str(file)
    except ValueError as exc:
        raise ValueError(f"ledger {file}: {exc}") from None
