"""The job ledger: durability settings, states, idempotent submission, cancellation, the driver lease."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time

import pytest

from cluster.ledger import _UPSERT_DRIVER, ContentConflict, DriverBusy, JobLedger, LedgerError
from cluster.spec import load_batch


@pytest.fixture()
def jobs(batch_files):
    return load_batch(batch_files()).jobs()


@pytest.fixture()
def ledger(ledger_location):
    """A fresh ledger: SQLite, then PostgreSQL (the same tests on both)."""
    with JobLedger(ledger_location) as led:
        yield led


def test_wal_and_full_sync(tmp_path):
    ledger = JobLedger(tmp_path / "ledger.sqlite")
    db = sqlite3.connect(ledger.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert ledger._db.execute("PRAGMA synchronous").fetchone()[0] == 2   # FULL
    ledger.close()


def test_resubmission_is_idempotent(ledger, jobs):
    first = ledger.submit(jobs)
    again = ledger.submit(jobs)
    assert sorted(first.added) == sorted(j.concept_id for j in jobs) and not again.added
    assert sorted(again.unchanged) == sorted(first.added)
    assert len(ledger.jobs()) == 3 and len(ledger.events(kind="submitted")) == 3
    assert {j.state for j in ledger.jobs()} == {"queued"}


def test_changed_content_is_refused_unless_replaced(ledger, jobs, batch_files, tiny_model_dir):
    ledger.submit(jobs[:2])
    changed = load_batch(batch_files("b2.yaml", defaults={"resolution": 64, "stage1": {"steps": 7}})).jobs()
    with pytest.raises(ContentConflict) as err:
        ledger.submit(changed)                  # all or nothing: the new third concept is not added
    assert set(err.value.ids) == {jobs[0].concept_id, jobs[1].concept_id}
    assert len(ledger.jobs()) == 2
    ledger.launch("p", 1, [jobs[0].concept_id])
    ledger.record_progress([{"concept_id": jobs[0].concept_id, "stage": 1, "step": 3, "total": 6, "loss": 0.5}])
    report = ledger.submit(changed, replace=True)
    assert sorted(report.replaced) == sorted([jobs[0].concept_id, jobs[1].concept_id])
    rec = ledger.get(jobs[0].concept_id)
    assert rec.state == "queued" and rec.generation == 2 and rec.step is None and rec.pack is None
    assert rec.spec.recipe(1).steps == 7 and rec.content_hash == changed[0].content_hash()


def test_state_machine(ledger, jobs):
    ledger.submit(jobs)
    cid = jobs[0].concept_id
    with pytest.raises(LedgerError):
        ledger.transition(cid, "published")
    run, launched = ledger.launch("pack-a", 1, [cid])
    assert launched == [cid]
    rec = ledger.get(cid)
    assert rec.state == "stage1" and rec.attempts == 1 and rec.pack == "pack-a"
    ledger.record_progress([{"concept_id": cid, "stage": 1, "step": 2, "total": 6, "loss": 0.4, "at": 100.0},
                            {"concept_id": cid, "stage": 2, "step": 9, "total": 9, "loss": 0.1}])  # stale
    ledger.record_progress([{"concept_id": cid, "stage": 1, "step": 4, "total": 6, "loss": 0.3, "at": 101.0}])
    rec = ledger.get(cid)
    assert (rec.stage, rec.step, rec.loss, rec.stage1_started) == (1, 4, 0.3, 100.0)
    ledger.record_checkpoint(cid, 1, 4, "/x/ckpt-4")
    ledger.record_checkpoint(cid, 1, 2, "/x/ckpt-2")        # never backwards
    assert ledger.get(cid).checkpoint == "/x/ckpt-4"
    ledger.stage_done(cid, 1, "/s/work/stage1/adapters/" + cid)
    ledger.end_run(run, "ok")
    rec = ledger.get(cid)
    assert rec.state == "stage2" and rec.pack is None and rec.stage1_ended and rec.stage1_adapter
    ledger.launch("pack-b", 2, [cid])
    ledger.stage_done(cid, 2, "/s/adapters/" + cid)
    rec = ledger.get(cid)
    assert rec.state == "published" and rec.published_at and rec.attempts == 2
    assert [e["kind"] for e in ledger.events(cid)] == ["submitted", "stage1", "launched", "stage2", "launched",
                                                        "published"]
    assert ledger.runs()[0]["outcome"] == "ok" and ledger.runs()[1]["ended_at"] is None
    assert ledger.launch("pack-c", 2, [cid]) == (None, [])           # published: nothing to launch


def test_loss_curves_are_stored_per_stage_bounded_and_reset_on_replace(ledger, jobs, batch_files):
    from cluster.ledger import MAX_CURVE_POINTS

    ledger.submit(jobs)
    cid, other = jobs[0].concept_id, jobs[1].concept_id
    ledger.launch("p", 1, [cid, other])
    curve = {"points": [[1, 1, 0.9], [2, 2, 0.7]], "bucket": 1, "steps": 2, "recent": [0.9, 0.7]}
    ledger.record_progress([{"concept_id": cid, "stage": 1, "step": 2, "total": 6, "loss": 0.7, "curve": curve},
                            {"concept_id": other, "stage": 1, "step": 1, "total": 6, "loss": 0.8}])
    assert ledger.curves(cid) == {1: {"points": [[1, 1, 0.9], [2, 2, 0.7]], "bucket": 1, "steps": 2}}
    assert ledger.curves(other) == {}                      # an update without a curve stores none
    # a later update replaces the stage's curve; one for a stage the job is not in is ignored
    longer = {"points": [[i, i, 1.0 / i] for i in range(1, MAX_CURVE_POINTS + 50)] + [[999, 999, float("nan")]],
              "bucket": 1, "steps": 999}
    ledger.record_progress([{"concept_id": cid, "stage": 1, "step": 4, "total": 6, "loss": 0.5, "curve": longer},
                            {"concept_id": cid, "stage": 2, "step": 1, "total": 9, "loss": 0.1, "curve": curve}])
    stored = ledger.curves(cid)
    assert list(stored) == [1] and len(stored[1]["points"]) == MAX_CURVE_POINTS - 1   # bounded, NaN dropped
    assert stored[1]["points"][-1] == [MAX_CURVE_POINTS + 49, MAX_CURVE_POINTS + 49, 1.0 / (MAX_CURVE_POINTS + 49)]
    ledger.record_progress([{"concept_id": cid, "stage": 1, "step": 5, "total": 6, "curve": {"points": "x"}}])
    assert ledger.curves(cid)[1] == stored[1]               # a malformed curve is not stored
    ledger.stage_done(cid, 1, "/s/work/stage1/adapters/" + cid)
    ledger.launch("p2", 2, [cid])
    ledger.record_progress([{"concept_id": cid, "stage": 2, "step": 1, "total": 9, "loss": 0.2, "curve": curve}])
    assert sorted(ledger.curves(cid)) == [1, 2]             # stage 1's curve outlives its stage
    changed = load_batch(batch_files("b2.yaml", defaults={"resolution": 64, "stage1": {"steps": 7}})).jobs()
    ledger.request_cancel(cid)                              # no live driver: cancelled at once
    assert ledger.get(cid).state == "cancelled"
    ledger.submit(changed, replace=True)
    assert ledger.curves(cid) == {} and ledger.curves(other) == {}


def test_failures_count_until_attempts_are_spent(ledger, jobs):
    ledger.submit(jobs)
    ids = [j.concept_id for j in jobs[:2]]
    ledger.launch("pack", 1, ids)
    assert ledger.run_failed(ids, "worker died", max_attempts=2, isolate=True) == []
    assert all(ledger.get(c).pack is None and ledger.get(c).failures == 1 for c in ids)
    ledger.launch("solo", 1, ids[:1])
    assert ledger.run_failed(ids[:1], "worker died again", max_attempts=2, isolate=False) == ids[:1]
    rec = ledger.get(ids[0])
    assert rec.state == "failed" and rec.error == "worker died again"
    assert ledger.get(ids[1]).state == "stage1"
    ledger.submit(jobs, requeue=True)                        # same content: back in line
    assert ledger.get(ids[0]).state == "queued" and ledger.get(ids[0]).failures == 0


def test_cancel_is_idempotent(ledger, jobs):
    ledger.submit(jobs)
    a, b = jobs[0].concept_id, jobs[1].concept_id
    assert ledger.request_cancel(a) == f"{a}: cancelled"              # queued: at once
    assert "already cancelled" in ledger.request_cancel(a)
    ledger.claim_driver("me")
    ledger.launch("p", 1, [b])
    assert "requested" in ledger.request_cancel(b)                    # training: flagged for the driver
    assert "already requested" in ledger.request_cancel(b)
    rec = ledger.get(b)
    assert rec.state == "stage1" and rec.cancel_requested
    ledger.release_driver("me")
    assert ledger.request_cancel(b) == f"{b}: cancelled"               # no live driver: at once
    with pytest.raises(KeyError):
        ledger.request_cancel("nope")


def test_driver_lease(ledger, jobs):
    ledger.claim_driver("one")
    ledger.claim_driver("one")                                       # re-entrant for its owner
    with pytest.raises(DriverBusy):
        ledger.claim_driver("two")
    ledger.submit(jobs[:1])
    assert not ledger.release_driver_if_idle("one")                  # a queued job keeps it
    ledger.request_cancel(jobs[0].concept_id)
    assert ledger.release_driver_if_idle("one") and ledger.live_driver() is None
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    ledger._db.execute(_UPSERT_DRIVER, ("ghost", os.uname().nodename, int(dead), time.time()))
    assert ledger.live_driver() is None                              # its process is gone
    ledger.claim_driver("three")


def test_committed_changes_survive_a_killed_process(tmp_path, jobs):
    path = tmp_path / "l.sqlite"
    code = ("import os, sys; from cluster.ledger import JobLedger; from cluster.spec import JobSpec\n"
            "led = JobLedger(sys.argv[1]); led.submit([JobSpec.model_validate_json(sys.argv[2])])\n"
            "led.launch('p', 1, [sys.argv[3]]); os._exit(9)")
    proc = subprocess.run([sys.executable, "-c", code, str(path), jobs[0].model_dump_json(), jobs[0].concept_id])
    assert proc.returncode == 9
    with JobLedger(path) as led:
        rec = led.get(jobs[0].concept_id)
        assert rec.state == "stage1" and rec.attempts == 1 and len(led.runs()) == 1


def _set_schema_version(path, version) -> None:
    db = sqlite3.connect(path)
    with db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
    db.close()


def _schema_version(path) -> str:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
    finally:
        db.close()


def test_a_ledger_of_a_newer_version_is_refused_untouched(tmp_path, jobs):
    from cluster.ledger import SCHEMA_VERSION

    path = tmp_path / "l.sqlite"
    with JobLedger(path) as led:
        led.submit(jobs[:1])
    _set_schema_version(path, SCHEMA_VERSION + 1)
    with pytest.raises(LedgerError) as err:
        JobLedger(path)
    msg = str(err.value)
    assert str(path) in msg and f"version {SCHEMA_VERSION + 1}" in msg and f"version {SCHEMA_VERSION}" in msg
    assert _schema_version(path) == str(SCHEMA_VERSION + 1)


def test_an_older_ledger_is_migrated_in_one_transaction(tmp_path, jobs, monkeypatch):
    import cluster.ledger as ledger_mod

    path = tmp_path / "l.sqlite"
    with JobLedger(path) as led:
        led.submit(jobs[:1])
    v = ledger_mod.SCHEMA_VERSION
    applied = []

    def add_notes(db):
        applied.append(v + 1)
        db.execute("CREATE TABLE notes (concept_id TEXT, note TEXT)")

    def fill_notes(db):
        applied.append(v + 2)
        db.execute("INSERT INTO notes SELECT concept_id, 'migrated' FROM jobs")

    def broken(db):
        db.execute("CREATE TABLE other (x TEXT)")
        raise RuntimeError("step failed")

    monkeypatch.setattr(ledger_mod, "SCHEMA_VERSION", v + 2)
    monkeypatch.setattr(ledger_mod, "MIGRATIONS", [(v + 1, add_notes), (v + 2, broken)])
    with pytest.raises(RuntimeError, match="step failed"):
        JobLedger(path)
    assert _schema_version(path) == str(v)                   # rolled back, the first step too
    db = sqlite3.connect(path)
    assert not db.execute("SELECT name FROM sqlite_master WHERE name IN ('notes', 'other')").fetchall()
    db.close()

    applied.clear()
    monkeypatch.setattr(ledger_mod, "MIGRATIONS", [(v + 2, fill_notes), (v + 1, add_notes)])   # applied in order
    with JobLedger(path) as led:
        assert applied == [v + 1, v + 2]
        assert [tuple(r) for r in led._db.execute("SELECT * FROM notes")] == [(jobs[0].concept_id, "migrated")]
        assert led.events(kind="schema-migrated")[0]["detail"] == {"from": v, "to": v + 2}
        assert led.get(jobs[0].concept_id).state == "queued"
    assert _schema_version(path) == str(v + 2)
    applied.clear()
    JobLedger(path).close()                                  # up to date: nothing runs again
    assert applied == []


def test_a_missing_migration_step_is_refused(tmp_path, monkeypatch):
    import cluster.ledger as ledger_mod

    path = tmp_path / "l.sqlite"
    JobLedger(path).close()
    monkeypatch.setattr(ledger_mod, "SCHEMA_VERSION", ledger_mod.SCHEMA_VERSION + 1)
    with pytest.raises(LedgerError, match="no migration"):
        JobLedger(path)


def test_a_batch_file_selects_a_postgresql_ledger_by_url(pg_server, batch_files):
    url = pg_server.new_database()
    spec = load_batch(batch_files(ledger=url))
    assert spec.ledger_path == url
    with JobLedger(spec.ledger_path) as led:
        assert led.submit(spec.jobs()).added == [j.concept_id for j in spec.jobs()]
    with JobLedger(url) as led:                          # another process (or node) sees the same rows
        assert [j.state for j in led.jobs()] == ["queued"] * len(spec.jobs())
