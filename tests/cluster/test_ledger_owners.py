"""Owners and batch membership in the ledger: a job never moves between batches, another owner's
concept or batch name is refused, quotas hold inside the transaction, version 1 files migrate."""

from __future__ import annotations

import sqlite3

import pytest

from cluster.ledger import JobLedger, NotOwner, Quota, QuotaExceeded
from cluster.spec import load_batch


@pytest.fixture()
def jobs(batch_files):
    return load_batch(batch_files()).jobs()


@pytest.fixture()
def ledger(ledger_location):
    """A fresh ledger: SQLite, then PostgreSQL (the same tests on both)."""
    with JobLedger(ledger_location) as led:
        yield led


def renamed(jobs, batch: str):
    return [j.model_copy(update={"batch": batch}) for j in jobs]


def test_identical_content_under_another_batch_adds_membership_and_moves_nothing(ledger, jobs):
    ledger.submit(renamed(jobs, "first"), owner="alice", admin=False)
    report = ledger.submit(renamed(jobs, "second"), owner="alice", admin=False)
    ids = [j.concept_id for j in jobs]
    assert sorted(report.unchanged) == sorted(ids) and not report.added
    assert [j.concept_id for j in ledger.batch_jobs("first")] == ids
    assert [j.concept_id for j in ledger.batch_jobs("second")] == ids
    assert {j.batch for j in ledger.jobs()} == {"first"} and {j.owner for j in ledger.jobs()} == {"alice"}
    assert {j.spec.batch for j in ledger.jobs()} == {"first"}
    assert ledger.batches("alice") == [("first", "alice"), ("second", "alice")]
    assert ledger.batches("bob") == []


def test_another_owner_cannot_take_a_concept_or_a_batch_name(ledger, jobs):
    ledger.submit(renamed(jobs, "mine"), owner="alice", admin=False)
    for batch_name, kind in (("theirs", "concept"), ("mine", "batch")):
        for replace in (False, True):
            with pytest.raises(NotOwner) as err:
                ledger.submit(renamed(jobs, batch_name), owner="bob", admin=False, replace=replace)
            assert err.value.kind == kind
    assert ledger.batches() == [("mine", "alice")]          # nothing of bob's was recorded
    assert {j.owner for j in ledger.jobs()} == {"alice"}
    # an admin may add alice's concepts to a batch of its own; the owner stays alice
    ledger.submit(renamed(jobs, "ops"), owner="root", admin=True)
    assert ledger.batch_owner("ops") == "root" and {j.owner for j in ledger.jobs()} == {"alice"}
    assert ledger.owners([jobs[0].concept_id, "nowhere"]) == {jobs[0].concept_id: "alice"}


def test_quotas_are_checked_before_anything_is_committed(ledger, jobs):
    with pytest.raises(QuotaExceeded, match="limit is 2"):
        ledger.submit(jobs, owner="alice", admin=False, quota=Quota(active_concepts=2))
    assert ledger.jobs() == [] and ledger.batches() == []
    ledger.submit(renamed(jobs[:1], "one"), owner="alice", admin=False, quota=Quota(active_batches=1))
    with pytest.raises(QuotaExceeded, match="batches training"):
        ledger.submit(renamed(jobs[1:2], "two"), owner="alice", admin=False, quota=Quota(active_batches=1))
    ledger.submit(renamed(jobs[1:2], "two"), owner="bob", admin=False, quota=Quota(active_batches=1))
    assert ledger.batches() == [("one", "alice"), ("two", "bob")]


def test_a_version_1_ledger_is_migrated_with_its_batches(tmp_path, jobs):
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    from cluster import ledger as ledger_module

    v1 = (ledger_module._SCHEMA.replace(ledger_module._OWNER_TABLES, "").replace(ledger_module._CURVE_TABLE, "")
          .replace(",\n    owner TEXT", ""))
    assert "owner TEXT\n" not in v1 and "batch_members" not in v1 and "curves" not in v1
    db.executescript(v1)
    db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    for j in jobs:
        db.execute("INSERT INTO jobs (concept_id, batch, content_hash, spec, state, submitted_at, updated_at) "
                   "VALUES (?, 'old', ?, ?, 'published', 1.0, 1.0)", (j.concept_id, j.content_hash(),
                                                                       j.model_dump_json()))
    db.commit()
    db.close()
    with JobLedger(path) as led:
        assert [j.concept_id for j in led.batch_jobs("old")] == [j.concept_id for j in jobs]
        assert led.batches() == [("old", None)] and {j.owner for j in led.jobs()} == {None}
        assert led.events(kind="schema-migrated")[0]["detail"] == {"from": 1, "to": ledger_module.SCHEMA_VERSION}
        assert led.curves(jobs[0].concept_id) == {}                        # the version-3 table exists
        with pytest.raises(NotOwner):           # rows without an owner are the admins' to change
            led.submit(renamed(jobs, "new"), owner="alice", admin=False)
