"""One driver at a time, provably: the lease outlives any busy wait, a holder that lost it learns so at
its next heartbeat and stops scheduling, and concurrent submissions start exactly one driver."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from cluster import api
from cluster.ledger import BUSY_TIMEOUT_S, DRIVER_STALE_S, JobLedger, LeaseLost
from cluster.scheduler import Scheduler
from cluster.ledger_sql import PG_LOCK_KEY
from cluster.spec import load_batch


def _age_lease(location, seconds: float) -> None:
    """The holder got stuck: its last heartbeat is ``seconds`` old (a SQLite path or a PostgreSQL URL)."""
    with JobLedger(location) as led, led._tx() as db:
        db.execute("UPDATE driver SET heartbeat = heartbeat - ?", (seconds,))


def test_a_lease_goes_stale_only_well_after_the_longest_busy_wait(tmp_path):
    assert DRIVER_STALE_S >= 3 * BUSY_TIMEOUT_S
    with JobLedger(tmp_path / "l.sqlite") as led:
        assert led._db.execute("PRAGMA busy_timeout").fetchone()[0] == int(BUSY_TIMEOUT_S * 1000)


def test_a_holder_that_lost_the_lease_is_told_at_its_next_heartbeat(ledger_location):
    path = ledger_location
    with JobLedger(path) as a, JobLedger(path) as b:
        a.claim_driver("a")
        assert a.heartbeat("a") > time.time()
        _age_lease(path, 2 * DRIVER_STALE_S)
        b.claim_driver("b")                       # a's lease was stale: b takes over
        with pytest.raises(LeaseLost, match="lost the driver lease to b"):
            a.heartbeat("a")
        b.heartbeat("b")
        assert a.live_driver()["owner"] == "b"
        b.release_driver("b")
        with pytest.raises(LeaseLost, match="to nobody"):
            b.heartbeat("b")


def _heartbeat_waits_for_a_held_lock(ledger: JobLedger, release) -> None:
    """The lease holder's heartbeat while another writer holds the lock for 1 s (``release`` ends it): it waits, then renews."""
    t = threading.Timer(1.0, release)
    t.start()
    t0 = time.time()
    ledger.heartbeat("a")
    assert time.time() - t0 >= 0.9
    t.join()


def test_a_busy_wait_shorter_than_the_busy_timeout_keeps_the_lease(tmp_path):
    path = tmp_path / "l.sqlite"
    with JobLedger(path) as a:
        a.claim_driver("a")
        blocker = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        blocker.execute("BEGIN IMMEDIATE")        # another process holds the write lock for a while
        _heartbeat_waits_for_a_held_lock(a, lambda: blocker.execute("COMMIT"))
        blocker.close()


def test_a_writer_waits_for_postgresqls_writer_lock_and_keeps_the_lease(pg_server):
    import psycopg

    url = pg_server.new_database()
    with JobLedger(url) as a:
        a.claim_driver("a")
        blocker = psycopg.connect(url, autocommit=True)
        blocker.execute("BEGIN")
        blocker.execute("SELECT pg_advisory_xact_lock(%s)", (PG_LOCK_KEY,))   # another writer's transaction
        _heartbeat_waits_for_a_held_lock(a, lambda: blocker.execute("COMMIT"))
        blocker.close()


def test_concurrent_reservations_give_exactly_one_token(ledger_location):
    path = ledger_location
    JobLedger(path).close()
    tokens, barrier = [], threading.Barrier(10)

    def reserve():
        with JobLedger(path) as led:
            barrier.wait()
            tokens.append(led.reserve_driver())
    threads = [threading.Thread(target=reserve) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [t for t in tokens if t]
    assert len(tokens) == 10 and len(won) == 1
    with JobLedger(path) as led:
        with pytest.raises(Exception, match="already running"):
            led.claim_driver("stranger")          # a reservation is live: nobody else may claim
        led.claim_driver("driver", reservation=won[0])
        assert led.live_driver()["owner"] == "driver"



@pytest.mark.ray
@pytest.mark.faults
def test_ten_concurrent_submissions_start_one_driver(ray_cluster, batch_files):
    path = batch_files(ids=["checkered-star"])
    results, barrier = [], threading.Barrier(10)

    def submit():
        barrier.wait()
        results.append(api.submit(path, detach=True))
    threads = [threading.Thread(target=submit) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.driver for r in results) == ["running"] * 9 + ["spawned"]
    ledger = results[0].ledger
    jobs = api.wait(ledger, timeout_s=300, poll_s=1)
    assert [j.state for j in jobs] == ["published"]
    with JobLedger(ledger) as led:
        assert len(led.events(kind="driver-start")) == 1 and len(led.events(kind="driver-reserved")) == 1


@pytest.mark.ray
def test_a_driver_that_loses_its_lease_stops_scheduling_at_once(ray_cluster, batch_files):
    path = batch_files(ids=["checkered-star", "striped-circle"],
                       resources={"cpus_per_worker": 1, "concepts_per_pack": 1, "max_concurrent": 1})
    spec = load_batch(path)
    with JobLedger(spec.ledger_path) as led:
        led.submit(spec.jobs())
    thief = JobLedger(spec.ledger_path)
    ticks = []

    def steal(jobs):
        ticks.append(len(jobs))
        if len(ticks) == 1:
            _age_lease(spec.ledger_path, 2 * DRIVER_STALE_S)
            thief.claim_driver("thief")
    with JobLedger(spec.ledger_path) as led:
        sched = Scheduler(led, poll_s=0.2, on_tick=steal)
        t0 = time.time()
        with pytest.raises(LeaseLost):
            sched.run()
        assert time.time() - t0 < 60 and len(ticks) == 1   # the next heartbeat stopped it
        assert sched.launches == {} and len(led.runs()) == 1  # nothing launched after the loss
        assert led.live_driver()["owner"] == "thief"
    thief.close()
