"""The durable job ledger: one row per concept job, in SQLite (WAL, synchronous=FULL) or PostgreSQL.

States: ``queued -> stage1 -> stage2 -> published``, or ``failed`` / ``cancelled`` from any active
state; a finished job goes back to ``queued`` (or straight to ``stage2`` when its stage 1 is kept) only
when it is replaced or requeued. Every change is one ``BEGIN IMMEDIATE`` transaction, committed before
the driver acts on it (launching a run, marking a stage done), so a driver killed at any point finds
the truth on restart. Only the driver and the CLI on the head node open the file; training workers
never do (SQLite is not safe over NFS locking): they report through the driver's progress board.

Where the ledger is: a SQLite file (the embedded default, one machine; refused on a network filesystem)
or a PostgreSQL URL (``postgresql://...``, the cluster ledger: a driver on any node opens the same one).
Both run the same SQL through ``ledger_sql.Conn``; on PostgreSQL each write transaction takes one
advisory lock, which serialises writers like ``BEGIN IMMEDIATE`` (why: see ``ledger_sql``).

Tables: ``jobs`` (the rows; ``owner``: who submitted the concept, None for jobs recorded without one),
``batches`` (a batch name and its owner) and ``batch_members`` (batch name -> concept ids: resubmitting
identical content under another batch name adds the concept to that batch and leaves it in the first),
``runs`` (one row per Ray Train run launched), ``curves`` (a job's downsampled loss curve per stage, the
newest a worker pushed: at most a few hundred points, kept apart from ``jobs`` so status reads stay small),
``events`` (an append-only
history: submitted, launched, resumed, stage-done, published, failed, ...), ``driver`` (a lease held by
the one driver allowed to schedule), ``meta`` (``schema_version``: the schema the file is in).

Opening a ledger checks its schema version: a newer one is refused (``LedgerError``), an older one is
brought up to date by the ``MIGRATIONS`` steps, all in the one transaction that records the new version.
(A PostgreSQL ledger starts at the current version; the version-2 step is SQLite's own SQL.)
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from purecc.ids import validate_concept_id

from .ledger_sql import Conn, connect
from .spec import JobSpec

SCHEMA_VERSION = 3   # bump only with a step in MIGRATIONS that changes the schema to it
_OWNER_TABLES = """
CREATE TABLE IF NOT EXISTS batches (name TEXT PRIMARY KEY, owner TEXT, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS batch_members (
    batch TEXT NOT NULL, concept_id TEXT NOT NULL, added_at REAL NOT NULL, PRIMARY KEY (batch, concept_id)
);
CREATE INDEX IF NOT EXISTS batch_members_by_concept ON batch_members (concept_id);
"""


def _add_owners(db: Conn) -> None:
    """Version 2: an owner per job, batches and their members (each job a member of its batch)."""
    db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT")
    for stmt in filter(None, (s.strip() for s in _OWNER_TABLES.split(";"))):
        db.execute(stmt)
    db.execute("INSERT OR IGNORE INTO batches (name, owner, created_at) "
               "SELECT batch, NULL, MIN(submitted_at) FROM jobs GROUP BY batch")
    db.execute("INSERT OR IGNORE INTO batch_members (batch, concept_id, added_at) "
               "SELECT batch, concept_id, submitted_at FROM jobs")


_CURVE_TABLE = """
CREATE TABLE IF NOT EXISTS curves (
    concept_id TEXT NOT NULL, stage INTEGER NOT NULL, curve TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (concept_id, stage)
);
"""
MAX_CURVE_POINTS = 256   # a stored curve's bound (the trainer's LossCurve keeps at most 128)


def _add_curves(db: Conn) -> None:
    """Version 3: each job's downsampled loss curve per stage, in a table of its own (so that status
    reads, which select whole job rows, do not carry them)."""
    for stmt in filter(None, (s.strip() for s in _CURVE_TABLE.split(";"))):
        db.execute(stmt)


# (version, step): ``step(db)`` brings a ledger of the version before it to ``version``; run in version
# order inside one transaction.
MIGRATIONS: list[tuple[int, Callable[[Conn], Any]]] = [(2, _add_owners), (3, _add_curves)]
ACTIVE = ("queued", "stage1", "stage2")
FINISHED = ("published", "failed", "cancelled")
STATES = ACTIVE + FINISHED
TRANSITIONS = {
    "queued": {"stage1", "failed", "cancelled"},
    "stage1": {"stage2", "failed", "cancelled"},
    "stage2": {"published", "failed", "cancelled"},
    "published": {"queued"},
    "failed": {"queued", "stage2"},
    "cancelled": {"queued", "stage2"},
}
# A lease holder's heartbeat may wait up to BUSY_TIMEOUT_S for the write lock; the lease goes stale
# only well after that, so a live holder is never taken over because it waited on a busy file.
BUSY_TIMEOUT_S = 10.0
DRIVER_STALE_S = 60.0
MAX_ERROR_CHARS = 4000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    concept_id TEXT PRIMARY KEY,
    batch TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued','stage1','stage2','published','failed','cancelled')),
    generation INTEGER NOT NULL DEFAULT 1,
    attempts INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    pack TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    stage INTEGER, step INTEGER, total INTEGER, loss REAL, eta_s REAL, progress_at REAL,
    checkpoint TEXT, checkpoint_stage INTEGER, checkpoint_step INTEGER,
    stage1_adapter TEXT, adapter TEXT, error TEXT,
    submitted_at REAL NOT NULL, updated_at REAL NOT NULL,
    stage1_started REAL, stage1_ended REAL, stage2_started REAL, stage2_ended REAL, published_at REAL,
    owner TEXT
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    pack TEXT NOT NULL, stage INTEGER NOT NULL, members TEXT NOT NULL,
    launched_at REAL NOT NULL, ended_at REAL, outcome TEXT, error TEXT
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL, concept_id TEXT, kind TEXT NOT NULL, detail TEXT
);
CREATE TABLE IF NOT EXISTS driver (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    owner TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL, heartbeat REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_concept ON events (concept_id, kind);
""" + _OWNER_TABLES + _CURVE_TABLE

# columns a replace or requeue resets
_PROGRESS_COLS = ("stage", "step", "total", "loss", "eta_s", "progress_at")


class LedgerError(ValueError):
    """A refused ledger operation (bad transition, conflicting resubmission, busy driver)."""


class ContentConflict(LedgerError):
    """Resubmitted ids whose content differs from the ledger's, without ``replace``."""

    def __init__(self, ids: list[str]):
        self.ids = ids
        super().__init__(f"concept(s) {', '.join(ids)} already exist in the ledger with different content "
                         "(data, trigger, recipe or base); resubmit with replace=True (--replace) to retrain them")


class NotOwner(LedgerError):
    """A submission touching a concept or batch name that another owner holds (HTTP 403)."""

    def __init__(self, kind: str, name: str):
        self.kind, self.name = kind, name
        super().__init__(f"{kind} {name!r} belongs to another owner; choose another {kind} id or ask an admin")


class QuotaExceeded(LedgerError):
    """A submission that would take an owner past a quota (HTTP 429); nothing was recorded."""

    def __init__(self, what: str, count: int, limit: int):
        self.what, self.count, self.limit = what, count, limit
        super().__init__(f"quota exceeded: this submission would give its owner {count} {what}, the limit is "
                         f"{limit}; wait for some to finish or cancel some")


@dataclass(frozen=True)
class Quota:
    """Per-owner limits checked inside a submission's transaction (None: unlimited)."""

    active_concepts: int | None = None     # jobs queued or training
    active_batches: int | None = None      # batches with a job queued or training


class DriverBusy(LedgerError):
    """Another live driver holds the scheduling lease."""

    pass


@dataclass(frozen=True)
class JobRecord:
    """One ``jobs`` row: a concept job's spec, state, progress, checkpoint, adapters and timestamps."""

    concept_id: str
    batch: str
    content_hash: str
    spec: JobSpec
    state: str
    generation: int
    attempts: int
    failures: int
    pack: str | None
    cancel_requested: bool
    stage: int | None
    step: int | None
    total: int | None
    loss: float | None
    eta_s: float | None
    progress_at: float | None
    checkpoint: str | None
    checkpoint_stage: int | None
    checkpoint_step: int | None
    stage1_adapter: str | None
    adapter: str | None
    error: str | None
    submitted_at: float
    updated_at: float
    stage1_started: float | None
    stage1_ended: float | None
    stage2_started: float | None
    stage2_ended: float | None
    published_at: float | None
    owner: str | None = None

    @property
    def next_stage(self) -> int | None:
        """The stage this job trains next (None when finished)."""
        return {"queued": 1, "stage1": 1, "stage2": 2}.get(self.state)

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON-ready dict (the spec as its JSON form)."""
        d = asdict(self)
        d["spec"] = self.spec.model_dump(mode="json")
        return d


@dataclass(frozen=True)
class SubmitReport:
    """What ``submit`` did with each id: added, left unchanged, replaced or requeued."""

    added: list[str]
    unchanged: list[str]
    replaced: list[str]
    requeued: list[str]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child that was not reaped yet is a zombie: dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _stored_curve(curve: Any) -> str | None:
    """A progress update's loss curve as the JSON the ledger stores (None when absent or malformed;
    the points bounded by ``MAX_CURVE_POINTS``, every value finite)."""
    if not isinstance(curve, dict) or not isinstance(curve.get("points"), list):
        return None
    try:
        points = [[int(p[0]), int(p[1]), float(p[2])] for p in curve["points"][-MAX_CURVE_POINTS:]
                  if math.isfinite(float(p[2]))]
        return json.dumps({"points": points, "bucket": int(curve.get("bucket", 1)),
                           "steps": int(curve.get("steps", points[-1][1] if points else 0))})
    except (TypeError, ValueError, IndexError):
        return None


class JobLedger:
    """The ledger (a SQLite file or a PostgreSQL database). Thread-safe (one connection behind a lock);
    open one per process. ``path``: a SQLite file (``file://`` allowed) or a ``postgresql://`` URL."""

    def __init__(self, path: str | Path):
        try:
            self._db, name = connect(path if isinstance(path, str) else str(path), BUSY_TIMEOUT_S)
        except ValueError as exc:
            raise LedgerError(str(exc)) from None
        # path: what reopens it (the file, or the URL as given); name: what messages show (no password)
        self.path: Path | str = str(path) if self._db.kind == "postgresql" else Path(name)
        self.name = name
        self._lock = threading.RLock()
        self._specs: dict[str, JobSpec] = {}   # spec JSON -> parsed JobSpec (frozen, so shared safely)
        self.writes = 0   # transactions this object committed (a reader's cache key; others' writes not seen)
        try:
            self._open_schema()
        except BaseException:
            self._db.close()
            raise

    def _open_schema(self) -> None:
        """Create a new ledger's tables, refuse a newer one, migrate an older one: one transaction."""
        with self._tx() as db:
            found = self._stored_version(db)
            if found is not None and found > SCHEMA_VERSION:
                raise LedgerError(f"ledger {self.name}: written with schema version {found}, this purecc "
                                  f"reads up to version {SCHEMA_VERSION}; open it with a newer purecc")
            if found is not None and found < SCHEMA_VERSION:
                self._migrate(db, found)
            for stmt in filter(None, (s.strip() for s in db.ddl(_SCHEMA).split(";"))):
                db.execute(stmt)  # idempotent (IF NOT EXISTS)
            db.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
                       "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (str(SCHEMA_VERSION),))

    def _stored_version(self, db) -> int | None:
        """The file's schema version; None for a new file."""
        if not db.has_table("meta"):
            return None
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            return 1  # version 1 created its tables before recording its version (a crash in between)
        try:
            version = int(row[0])
        except ValueError:
            version = 0
        if version < 1:
            raise LedgerError(f"ledger {self.name}: meta schema_version {row[0]!r} is not a version (1 or more)")
        return version

    def _migrate(self, db, found: int) -> None:
        steps = dict(MIGRATIONS)
        missing = [v for v in range(found + 1, SCHEMA_VERSION + 1) if v not in steps]
        if missing:
            raise LedgerError(f"ledger {self.name}: schema version {found}, no migration to version(s) "
                              f"{', '.join(map(str, missing))} of {SCHEMA_VERSION}")
        for version in range(found + 1, SCHEMA_VERSION + 1):
            steps[version](db)
        self._event(db, None, "schema-migrated", {"from": found, "to": SCHEMA_VERSION})

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> "JobLedger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[Conn]:
        """One write transaction, writers serialised (BEGIN IMMEDIATE / the advisory lock) ... COMMIT
        (durable on return)."""
        with self._lock:
            self._db.begin()
            try:
                yield self._db
            except BaseException:
                self._db.rollback()
                raise
            self._db.commit()
            self.writes += 1

    def _event(self, db, concept_id: str | None, kind: str, detail: Any = None, at: float | None = None) -> None:
        db.execute("INSERT INTO events (at, concept_id, kind, detail) VALUES (?, ?, ?, ?)",
                   (at or time.time(), concept_id, kind, None if detail is None else json.dumps(detail)))

    # ----- reading ---------------------------------------------------------------------------
    def _record(self, row) -> JobRecord:
        d = dict(row)
        d.pop("rowid", None)
        text = d["spec"]
        spec = self._specs.get(text)
        if spec is None:   # parsing is most of a read's cost; a row's spec text changes rarely
            if len(self._specs) > 100_000:
                self._specs.clear()
            spec = self._specs[text] = JobSpec.model_validate_json(text)
        d["spec"] = spec
        d["cancel_requested"] = bool(d["cancel_requested"])
        return JobRecord(**d)

    def get(self, concept_id: str) -> JobRecord:
        """The job of ``concept_id``; KeyError when it is not in the ledger."""
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE concept_id = ?", (concept_id,)).fetchone()
        if row is None:
            raise KeyError(f"concept {concept_id!r} is not in the ledger {self.name}")
        return self._record(row)

    def jobs(self, states: Sequence[str] | None = None) -> list[JobRecord]:
        """Jobs in submission order (optionally only those in ``states``)."""
        with self._lock:
            if states is None:
                rows = self._db.execute("SELECT * FROM jobs ORDER BY rowid").fetchall()
            else:
                states = list(states)
                rows = self._db.execute(f"SELECT * FROM jobs WHERE state IN ({', '.join('?' * len(states))}) "
                                        "ORDER BY rowid", states).fetchall() if states else []
            return [self._record(r) for r in rows]

    def events(self, concept_id: str | None = None, kind: str | None = None) -> list[dict]:
        """Events in order, optionally only one concept's and/or one kind's (``detail`` decoded)."""
        q, args = "SELECT * FROM events WHERE 1=1", []
        if concept_id is not None:
            q, args = q + " AND concept_id = ?", args + [concept_id]
        if kind is not None:
            q, args = q + " AND kind = ?", args + [kind]
        with self._lock:
            rows = self._db.execute(q + " ORDER BY id", args).fetchall()
        return [{**dict(r), "detail": json.loads(r["detail"]) if r["detail"] else None} for r in rows]

    def runs(self) -> list[dict]:
        """Every Ray Train run launched, in order (``members`` decoded)."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM runs ORDER BY id").fetchall()
        return [{**dict(r), "members": json.loads(r["members"])} for r in rows]

    def batch_jobs(self, name: str) -> list[JobRecord]:
        """The jobs that are members of batch ``name``, in the order they joined it."""
        with self._lock:
            rows = self._db.execute("SELECT jobs.* FROM batch_members m JOIN jobs ON jobs.concept_id = m.concept_id "
                                    "WHERE m.batch = ? ORDER BY m.rowid", (name,)).fetchall()
        return [self._record(r) for r in rows]

    def batches(self, owner: str | None = None) -> list[tuple[str, str | None]]:
        """(name, owner) of every batch with a member, oldest first; only ``owner``'s when given."""
        q = ("SELECT name, owner FROM batches WHERE EXISTS (SELECT 1 FROM batch_members m WHERE m.batch = batches.name)"
             + (" AND owner = ?" if owner is not None else "") + " ORDER BY created_at, name")
        with self._lock:
            rows = self._db.execute(q, () if owner is None else (owner,)).fetchall()
        return [(r["name"], r["owner"]) for r in rows]

    def batch_owner(self, name: str) -> str | None:
        """The owner of batch ``name`` (None when recorded without one); KeyError when it is not recorded."""
        with self._lock:
            row = self._db.execute("SELECT owner FROM batches WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise KeyError(f"batch {name!r} is not in the ledger")
        return row["owner"]

    def owners(self, concept_ids: Sequence[str]) -> dict[str, str | None]:
        """The owner of each of ``concept_ids`` that is in the ledger (None: recorded without one)."""
        ids = list(dict.fromkeys(concept_ids))
        if not ids:
            return {}
        with self._lock:
            rows = self._db.execute(f"SELECT concept_id, owner FROM jobs WHERE concept_id IN "
                                    f"({', '.join('?' * len(ids))})", ids).fetchall()
        return {r["concept_id"]: r["owner"] for r in rows}

    # ----- submission ------------------------------------------------------------------------
    def submit(self, jobs: Sequence[JobSpec], *, replace: bool = False, requeue: bool = False,
               owner: str | None = None, admin: bool = True, quota: Quota | None = None) -> SubmitReport:
        """Record ``jobs``; idempotent for identical content. All or nothing.

        An id already present with different content is refused (``ContentConflict``) unless
        ``replace``; ``requeue`` puts identical failed/cancelled jobs back in line (their checkpoints
        and finished stage 1 are kept). Each job joins its batch (``batch_members``); an identical job
        already recorded under another batch stays there too. New jobs and batches get ``owner``;
        unless ``admin``, a concept or batch name held by another owner (or by none) is refused
        (``NotOwner``), and ``quota`` is checked for ``owner`` before committing (``QuotaExceeded``).
        """
        report = SubmitReport([], [], [], [])
        now = time.time()
        with self._tx() as db:
            live = self._live_driver(db)
            for name in dict.fromkeys(job.batch for job in jobs):
                self._join_batch(db, name, owner, admin, now)
            conflicts = []
            for job in jobs:
                validate_concept_id(job.concept_id)
                h = job.content_hash()
                row = db.execute("SELECT * FROM jobs WHERE concept_id = ?", (job.concept_id,)).fetchone()
                if row is not None and not admin and row["owner"] != owner:
                    raise NotOwner("concept", job.concept_id)
                db.execute("INSERT INTO batch_members (batch, concept_id, added_at) VALUES (?, ?, ?) "
                           "ON CONFLICT DO NOTHING",
                           (job.batch, job.concept_id, now))
                if row is None:
                    db.execute("INSERT INTO jobs (concept_id, batch, content_hash, spec, state, submitted_at, "
                               "updated_at, owner) VALUES (?, ?, ?, ?, 'queued', ?, ?, ?)",
                               (job.concept_id, job.batch, h, job.model_dump_json(), now, now, owner))
                    self._event(db, job.concept_id, "submitted", {"content_hash": h, "owner": owner}, now)
                    report.added.append(job.concept_id)
                elif row["content_hash"] == h:
                    # same content: keep the row and its first batch; scheduling knobs (resources) may change
                    db.execute("UPDATE jobs SET spec = ? WHERE concept_id = ?",
                               (job.model_copy(update={"batch": row["batch"]}).model_dump_json(), job.concept_id))
                    if requeue and row["state"] in ("failed", "cancelled"):
                        to = "stage2" if row["stage1_adapter"] else "queued"
                        db.execute("UPDATE jobs SET state = ?, error = NULL, failures = 0, cancel_requested = 0, "
                                   "pack = NULL, updated_at = ? WHERE concept_id = ?",
                                   (to, now, job.concept_id))
                        self._event(db, job.concept_id, "requeued", {"from": row["state"], "to": to}, now)
                        report.requeued.append(job.concept_id)
                    else:
                        report.unchanged.append(job.concept_id)
                elif not replace:
                    conflicts.append(job.concept_id)
                elif live and row["state"] in ("stage1", "stage2") and row["pack"]:
                    raise LedgerError(f"{job.concept_id}: is training under a live driver "
                                      f"(pid {live['pid']}); cancel it before replacing it")
                else:
                    resets = ", ".join(f"{c} = NULL" for c in _PROGRESS_COLS + (
                        "checkpoint", "checkpoint_stage", "checkpoint_step", "stage1_adapter", "adapter", "error",
                        "pack", "stage1_started", "stage1_ended", "stage2_started", "stage2_ended", "published_at"))
                    db.execute(f"UPDATE jobs SET {resets}, state = 'queued', content_hash = ?, spec = ?, batch = ?, "
                               "generation = generation + 1, attempts = 0, failures = 0, cancel_requested = 0, "
                               "updated_at = ? WHERE concept_id = ?",
                               (h, job.model_dump_json(), job.batch, now, job.concept_id))
                    db.execute("DELETE FROM curves WHERE concept_id = ?", (job.concept_id,))
                    self._event(db, job.concept_id, "replaced", {"old": row["content_hash"], "new": h}, now)
                    report.replaced.append(job.concept_id)
            if conflicts:
                raise ContentConflict(conflicts)
            if quota is not None and not admin:
                self._check_quota(db, owner, quota)
        return report

    def _join_batch(self, db, name: str, owner: str | None, admin: bool, now: float) -> None:
        """Record batch ``name`` for ``owner``; refuse another owner's batch name unless ``admin``."""
        row = db.execute("SELECT owner FROM batches WHERE name = ?", (name,)).fetchone()
        if row is None:
            db.execute("INSERT INTO batches (name, owner, created_at) VALUES (?, ?, ?)", (name, owner, now))
        elif not admin and row["owner"] != owner:
            raise NotOwner("batch", name)

    @staticmethod
    def _check_quota(db: Conn, owner: str | None, quota: Quota) -> None:
        active = "('queued','stage1','stage2')"
        if quota.active_concepts is not None:
            n = db.execute(f"SELECT COUNT(*) FROM jobs WHERE owner {db.is_} ? AND state IN {active}", (owner,)).fetchone()[0]
            if n > quota.active_concepts:
                raise QuotaExceeded("queued or training concepts", n, quota.active_concepts)
        if quota.active_batches is not None:
            n = db.execute(f"SELECT COUNT(DISTINCT m.batch) FROM batch_members m JOIN jobs j ON j.concept_id = "
                           f"m.concept_id JOIN batches b ON b.name = m.batch WHERE b.owner {db.is_} ? AND j.state IN "
                           f"{active}", (owner,)).fetchone()[0]
            if n > quota.active_batches:
                raise QuotaExceeded("batches training", n, quota.active_batches)

    # ----- state changes ---------------------------------------------------------------------
    def transition(self, concept_id: str, to: str, *, expect: Sequence[str] | None = None,
                   detail: Any = None, **fields: Any) -> JobRecord:
        """Move a job to state ``to`` (checked against TRANSITIONS) and set ``fields``; commits."""
        with self._tx() as db:
            self._transition(db, concept_id, to, expect, detail, fields)
        return self.get(concept_id)

    def _transition(self, db, concept_id: str, to: str, expect, detail, fields: dict) -> None:
        row = db.execute("SELECT state FROM jobs WHERE concept_id = ?", (concept_id,)).fetchone()
        if row is None:
            raise KeyError(f"concept {concept_id!r} is not in the ledger")
        state = row["state"]
        if expect is not None and state not in expect:
            raise LedgerError(f"{concept_id}: state is {state!r}, expected one of {list(expect)}")
        if to not in TRANSITIONS[state]:
            raise LedgerError(f"{concept_id}: cannot go from {state!r} to {to!r}")
        now = time.time()
        stamps = {"stage2": {"stage1_ended": now}, "published": {"stage2_ended": now, "published_at": now}}
        values = {**stamps.get(to, {}), **fields, "state": to, "updated_at": now}
        if "error" in values and values["error"]:
            values["error"] = str(values["error"])[:MAX_ERROR_CHARS]
        cols = ", ".join(f"{k} = ?" for k in values)
        db.execute(f"UPDATE jobs SET {cols} WHERE concept_id = ?", (*values.values(), concept_id))
        self._event(db, concept_id, to, detail, now)

    def launch(self, pack: str, stage: int, members: Sequence[str]) -> tuple[int | None, list[str]]:
        """Commit a run before it starts: members enter ``stage<n>``, get ``pack`` and one more attempt.

        Members that stopped being launchable since the caller looked (cancelled, replaced...) are left
        out. Returns the run id (None when no member is left) and the members launched.
        """
        now = time.time()
        want = ("queued", "stage1") if stage == 1 else ("stage2",)
        with self._tx() as db:
            launched = []
            for cid in members:
                row = db.execute("SELECT state, cancel_requested FROM jobs WHERE concept_id = ?", (cid,)).fetchone()
                if row is None or row["state"] not in want or row["cancel_requested"]:
                    continue
                if row["state"] == "queued":
                    self._transition(db, cid, "stage1", None, None, {})
                db.execute("UPDATE jobs SET pack = ?, attempts = attempts + 1, updated_at = ? WHERE concept_id = ?",
                           (pack, now, cid))
                launched.append(cid)
            if not launched:
                return None, []
            run_id = db.execute("INSERT INTO runs (pack, stage, members, launched_at) VALUES (?, ?, ?, ?) "
                                "RETURNING id", (pack, stage, json.dumps(launched), now)).fetchone()[0]
            for cid in launched:
                self._event(db, cid, "launched", {"run": run_id, "pack": pack, "stage": stage}, now)
        return run_id, launched

    def end_run(self, run_id: int, outcome: str, error: str | None = None) -> None:
        """Record how run ``run_id`` ended (its outcome and error, if any)."""
        with self._tx() as db:
            db.execute("UPDATE runs SET ended_at = ?, outcome = ?, error = ? WHERE id = ?",
                       (time.time(), outcome, error[:MAX_ERROR_CHARS] if error else None, run_id))

    def stage_done(self, concept_id: str, stage: int, output: str, at: float | None = None) -> JobRecord:
        """Stage 1 done -> ``stage2`` (with its adapter); stage 2 done (published) -> ``published``."""
        with self._tx() as db:
            fields: dict[str, Any] = {"pack": None, "failures": 0, "eta_s": 0.0}
            if stage == 1:
                fields.update(stage1_adapter=output, stage1_ended=at or time.time())
                self._transition(db, concept_id, "stage2", ("stage1",), {"adapter": output}, fields)
            else:
                fields.update(adapter=output, stage2_ended=at or time.time())
                self._transition(db, concept_id, "published", ("stage2",), {"adapter": output}, fields)
        return self.get(concept_id)

    def fail(self, concept_id: str, error: str) -> JobRecord:
        """Mark an active job ``failed`` with ``error``; commits."""
        return self.transition(concept_id, "failed", expect=ACTIVE, error=error, pack=None,
                               detail={"error": str(error)[:500]})

    def run_failed(self, members: Sequence[str], error: str, *, max_attempts: int, isolate: bool) -> list[str]:
        """A run ended without finishing ``members``: count a failure each; fail those out of attempts.

        ``isolate`` clears the pack so the survivors are retried one per run (a concept that keeps
        killing its worker then takes down nobody else). Returns the ids marked failed.
        """
        failed = []
        with self._tx() as db:
            for cid in members:
                row = db.execute("SELECT state, failures FROM jobs WHERE concept_id = ?", (cid,)).fetchone()
                if row is None or row["state"] not in ACTIVE:
                    continue
                n = row["failures"] + 1
                if n >= max_attempts:
                    self._transition(db, cid, "failed", None, {"error": error[:500]},
                                     {"failures": n, "error": error, "pack": None})
                    failed.append(cid)
                else:
                    db.execute("UPDATE jobs SET failures = ?, error = ?, pack = CASE WHEN ? = 1 THEN NULL ELSE pack END, "
                               "updated_at = ? WHERE concept_id = ?",
                               (n, error[:MAX_ERROR_CHARS], int(isolate), time.time(), cid))
                    self._event(db, cid, "run-failed", {"failures": n, "error": error[:500]})
        return failed

    def record_progress(self, updates: Sequence[dict]) -> None:
        """Latest metrics per concept (ignored unless the job is still training that stage). An update
        with a ``curve`` (a ``LossCurve.to_dict()``: ``points`` of [first step, last step, mean], ``bucket``,
        ``steps``) replaces that stage's stored curve."""
        if not updates:
            return
        with self._tx() as db:
            for u in updates:
                stage, cid = int(u["stage"]), u["concept_id"]
                at = u.get("at") or time.time()
                cur = db.execute(f"UPDATE jobs SET stage = ?, step = ?, total = ?, loss = ?, eta_s = ?, "
                                 f"progress_at = ?, stage{stage}_started = COALESCE(stage{stage}_started, ?) "
                                 f"WHERE concept_id = ? AND state = ?",
                                 (stage, u["step"], u["total"], u.get("loss"), u.get("eta_s"), at, at, cid,
                                  f"stage{stage}"))
                curve = _stored_curve(u.get("curve"))
                if curve is not None and cur.rowcount:
                    db.execute("INSERT INTO curves (concept_id, stage, curve, at) VALUES (?, ?, ?, ?) "
                               "ON CONFLICT (concept_id, stage) DO UPDATE SET curve = excluded.curve, at = excluded.at",
                               (cid, stage, curve, at))

    def curves(self, concept_id: str) -> dict[int, dict]:
        """The job's stored loss curves: stage -> {points, bucket, steps} (stages without one left out)."""
        with self._lock:
            rows = self._db.execute("SELECT stage, curve FROM curves WHERE concept_id = ? ORDER BY stage",
                                    (concept_id,)).fetchall()
        return {int(r[0]): json.loads(r[1]) for r in rows}

    def record_checkpoint(self, concept_id: str, stage: int, step: int, uri: str) -> None:
        """Point the job at its newest checkpoint (never backwards within a stage)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET checkpoint = ?, checkpoint_stage = ?, checkpoint_step = ? "
                       "WHERE concept_id = ? AND state = ? AND (checkpoint_stage IS NULL OR checkpoint_stage < ? "
                       "OR checkpoint_step <= ?)",
                       (uri, stage, step, concept_id, f"stage{stage}", stage, step))

    def record_event(self, concept_id: str | None, kind: str, detail: Any = None, at: float | None = None) -> None:
        """Append one event to the history; commits."""
        with self._tx() as db:
            self._event(db, concept_id, kind, detail, at)

    # ----- cancellation ----------------------------------------------------------------------
    def request_cancel(self, concept_id: str) -> str:
        """Idempotent. A queued job (or any job when no driver is live) is cancelled at once; a
        training one is flagged and its driver stops it at its next step (its checkpoint is kept).
        Returns a sentence saying what happened."""
        with self._tx() as db:
            row = db.execute("SELECT state, cancel_requested FROM jobs WHERE concept_id = ?",
                             (concept_id,)).fetchone()
            if row is None:
                raise KeyError(f"concept {concept_id!r} is not in the ledger {self.name}")
            state = row["state"]
            if state in FINISHED:
                return f"{concept_id}: already {state}; nothing to cancel"
            if state == "queued" or self._live_driver(db) is None:
                self._transition(db, concept_id, "cancelled", None, {"requested": True},
                                 {"cancel_requested": 1, "pack": None})
                return f"{concept_id}: cancelled"
            if row["cancel_requested"]:
                return f"{concept_id}: cancellation already requested; it stops at its next step"
            db.execute("UPDATE jobs SET cancel_requested = 1, updated_at = ? WHERE concept_id = ?",
                       (time.time(), concept_id))
            self._event(db, concept_id, "cancel-requested")
            return f"{concept_id}: cancellation requested; it stops at its next step and keeps its checkpoint"

    # ----- the driver lease ------------------------------------------------------------------
    def _live_driver(self, db) -> dict | None:
        row = db.execute("SELECT * FROM driver WHERE id = 1").fetchone()
        if row is None:
            return None
        d = dict(row)
        if time.time() - d["heartbeat"] > DRIVER_STALE_S:
            return None
        if d["host"] == socket.gethostname() and not _pid_alive(d["pid"]):
            return None
        return d

    def live_driver(self) -> dict | None:
        """The driver lease row if its holder is alive (fresh heartbeat; a live pid on this host), else None.

        A reservation (``reserve_driver``) counts as live: its driver is on its way."""
        with self._lock:
            return self._live_driver(self._db)

    def claim_driver(self, owner: str, reservation: str | None = None) -> None:
        """Become the one scheduling driver; raises ``DriverBusy`` if a live one holds the lease.

        ``reservation``: the token of ``reserve_driver`` this driver was started for; it takes over
        that reservation (and only that one)."""
        with self._tx() as db:
            live = self._live_driver(db)
            mine = live and ((live["owner"] == owner and live["pid"] == os.getpid())
                             or (reservation is not None and live["owner"] == RESERVED + reservation))
            if live and not mine:
                raise DriverBusy(f"ledger {self.name}: a driver is already running (pid {live['pid']} on "
                                 f"{live['host']}); it picks up newly submitted jobs by itself")
            db.execute(_UPSERT_DRIVER,
                       (owner, socket.gethostname(), os.getpid(), time.time()))
            self._event(db, None, "driver-start", {"owner": owner, "pid": os.getpid()})

    def heartbeat(self, owner: str) -> float:
        """Renew ``owner``'s driver lease; returns the time until which it holds it.

        Raises ``LeaseLost`` when ``owner`` no longer holds it (another driver took it over after it
        went stale, or it was released): the caller must stop scheduling at once. Check and renewal
        are one write transaction, so no claim can come between them."""
        with self._tx() as db:
            row = db.execute("SELECT owner, pid, host FROM driver WHERE id = 1").fetchone()
            if row is None or row["owner"] != owner:
                holder = f"{row['owner']} (pid {row['pid']} on {row['host']})" if row else "nobody"
                raise LeaseLost(f"ledger {self.name}: driver {owner} lost the driver lease to {holder}; "
                                "it stops scheduling now")
            now = time.time()
            db.execute("UPDATE driver SET heartbeat = ? WHERE id = 1 AND owner = ?", (now, owner))
        return now + DRIVER_STALE_S

    def release_driver_if_idle(self, owner: str) -> bool:
        """Give up the lease only if no job is active, in the same transaction: a submission that
        commits first is seen here, one that commits after sees no live driver and starts one."""
        with self._tx() as db:
            n = db.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('queued','stage1','stage2')").fetchone()[0]
            if n:
                return False
            db.execute("DELETE FROM driver WHERE id = 1 AND owner = ?", (owner,))
            self._event(db, None, "driver-stop", {"owner": owner})
        return True

    def release_driver(self, owner: str) -> None:
        """Give up ``owner``'s driver lease unconditionally."""
        with self._tx() as db:
            db.execute("DELETE FROM driver WHERE id = 1 AND owner = ?", (owner,))
            self._event(db, None, "driver-stop", {"owner": owner})

    def reserve_driver(self) -> str | None:
        """Reserve the lease for a driver about to be started; its token, or None when a live driver
        (or another reservation) holds it.

        Check and reservation are one transaction, so of many concurrent submissions exactly one gets a
        token and starts a driver; the driver claims with it (``claim_driver(owner, reservation=...)``).
        A reservation never claimed goes stale like a lease (or at once when its process dies)."""
        token = os.urandom(16).hex()
        with self._tx() as db:
            if self._live_driver(db) is not None:
                return None
            db.execute(_UPSERT_DRIVER,
                       (RESERVED + token, socket.gethostname(), os.getpid(), time.time()))
            self._event(db, None, "driver-reserved", {"token": token, "pid": os.getpid()})
        return token

    def reservation_started(self, token: str, pid: int) -> None:
        """Record the pid of the process started for a reservation: if it dies before it claims the
        lease, the reservation is not live any more (the next submission starts a driver)."""
        with self._tx() as db:
            db.execute("UPDATE driver SET pid = ? WHERE id = 1 AND owner = ?", (pid, RESERVED + token))

    def cancel_reservation(self, token: str) -> None:
        """Drop an unclaimed reservation (its driver could not be started)."""
        with self._tx() as db:
            db.execute("DELETE FROM driver WHERE id = 1 AND owner = ?", (RESERVED + token,))

    def has_unfinished(self) -> bool:
        """True when some job is queued or training."""
        with self._lock:
            return self._db.execute("SELECT 1 FROM jobs WHERE state IN ('queued','stage1','stage2') "
                                    "LIMIT 1").fetchone() is not None


_UPSERT_DRIVER = ("INSERT INTO driver (id, owner, host, pid, heartbeat) VALUES (1, ?, ?, ?, ?) ON CONFLICT (id) "
                  "DO UPDATE SET owner = excluded.owner, host = excluded.host, pid = excluded.pid, "
                  "heartbeat = excluded.heartbeat")
RESERVED = "reserved:"   # owner prefix of a driver lease reserved by ``reserve_driver``


class LeaseLost(DriverBusy):
    """The driver lease this driver held was taken over: it must stop scheduling at once."""
