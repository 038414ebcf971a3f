"""The scale simulation (bench/scale_sim.py) at a small size: the real ledger and scheduling loop over
fake runs on a fake clock finish every job, each stage exactly once, as the ledger itself records."""

from __future__ import annotations

from bench.scale_sim import SimRuntime, exactly_once, simulate
from cluster.ledger import JobLedger


def test_200_concepts_over_8_gpus_run_each_stage_exactly_once(tmp_path):
    r = simulate(200, 8, per_pack=8, poll_s=120.0, workdir=tmp_path)
    once = r["exactly_once"]
    assert once["ok"], once
    assert once["states"] == {"published": 200} and once["not_exactly_once_count"] == 0
    # one Ray Train run per pack (its whole life), one ledger run row per pack and stage; no retries
    assert r["runs_launched"] == 200 // 8 and once["runs"] == 2 * 200 // 8
    assert r["ticks"] > 0 and r["tick_s"]["max"] >= r["tick_s"]["median"] > 0
    # 8 runs at once: the simulated time is at least the work (one start-up, 1000 + 800 steps) over 8 GPUs
    assert r["simulated_s"] >= 200 // 8 * (30 + 1800 * 0.5) / 8
    assert 0.5 < r["gpu_busy"] <= 1.0


def test_the_check_sees_a_job_that_did_not_run(tmp_path):
    """``exactly_once`` is not vacuous: a job left queued, never launched, is reported."""
    from bench.scale_sim import make_jobs

    with JobLedger(tmp_path / "ledger.sqlite") as led:
        led.submit(make_jobs(3, 2, 4, 100, str(tmp_path / "storage")))
        once = exactly_once(led)
    assert not once["ok"] and once["not_exactly_once_count"] == 3 and once["states"] == {"queued": 3}


def test_nodes_hold_the_simulated_gpus():
    assert [n["GPU"] for n in SimRuntime(gpus=20).nodes()] == [8.0, 8.0, 4.0]


def test_the_simulation_on_a_postgresql_ledger_runs_each_stage_exactly_once(tmp_path, pg_server):
    r = simulate(48, 4, per_pack=4, poll_s=120.0, workdir=tmp_path, ledger_url=pg_server.new_database())
    assert r["ledger"] == "postgresql"
    assert r["exactly_once"]["ok"], r["exactly_once"]
    assert r["runs_launched"] == 48 // 4 and r["exactly_once"]["runs"] == 2 * 48 // 4
