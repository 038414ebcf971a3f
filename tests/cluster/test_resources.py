"""Resources the cluster can never give: refused at submit, or failed after a bounded wait; cancel
works while a job waits; a stuck batch never holds others back; a restarted service resumes by itself."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from cluster import api
from cluster.ledger import JobLedger
from cluster.scheduler import Scheduler, unsatisfiable
from cluster.spec import Resources, load_batch
from cluster_helpers import batch_dict, write_batch


def test_unsatisfiable_names_the_field_and_what_there_is():
    nodes = [{"CPU": 2.0}, {"CPU": 2.0, "GPU": 1.0}]
    why = unsatisfiable(Resources(gpus_per_worker=2), nodes)
    assert why.startswith("resources.gpus_per_worker: 2 GPUs per worker") and "more than 1" in why
    why = unsatisfiable(Resources(cpus_per_worker=3), nodes)      # 4 CPUs in all, but 2 per node
    assert why.startswith("resources.cpus_per_worker: 3 CPUs") and "no node" in why
    assert "both at once" in unsatisfiable(Resources(cpus_per_worker=2, gpus_per_worker=1),
                                           [{"CPU": 2.0}, {"CPU": 1.0, "GPU": 1.0}])
    assert unsatisfiable(Resources(cpus_per_worker=2, gpus_per_worker=1), nodes) is None
    assert "in total" in unsatisfiable(Resources(gpus_per_worker=1), {"CPU": 8.0})   # a totals map
    assert unsatisfiable(Resources(cpus_per_worker=0.5), {"CPU": 1.0}) is None


def test_submit_refuses_a_batch_no_node_can_place(tmp_path, tiny_model_dir, sample_manifests):
    data = batch_dict(tiny_model_dir, tmp_path / "store", sample_manifests, ids=["checkered-star"],
                      resources={"cpus_per_worker": 256, "concepts_per_pack": 1})
    path = write_batch(tmp_path / "b.yaml", data)
    with pytest.raises(api.UnsatisfiableResources, match=r"^resources\.cpus_per_worker: 256 CPUs per worker"):
        api.submit(path, num_cpus=2)
    assert not (tmp_path / "store" / "ledger.sqlite").exists()    # nothing recorded, nothing started
    data["resources"] = {"gpus_per_worker": 8, "concepts_per_pack": 1}
    with pytest.raises(api.UnsatisfiableResources, match=r"^resources\.gpus_per_worker: 8 GPUs"):
        api.submit(write_batch(tmp_path / "g.yaml", data), num_cpus=2)


def test_resume_unfinished_starts_nothing_without_unfinished_jobs(tmp_path, batch_files):
    assert api.resume_unfinished(tmp_path / "none.sqlite") is None          # no ledger
    spec = load_batch(batch_files(ids=["checkered-star"]))
    with JobLedger(spec.ledger_path) as led:
        led.submit(spec.jobs())
        led.request_cancel("checkered-star")                                   # finished: cancelled
    assert api.resume_unfinished(spec.ledger_path) is None



def _record(tmp_path: Path, name: str, model: Path, manifests: dict, ids, resources: dict, ledger: Path):
    data = batch_dict(model, tmp_path / "store", manifests, ids=ids, resources=resources,
                      name=name, ledger=str(ledger))
    spec = load_batch(write_batch(tmp_path / f"{name}.yaml", data))
    with JobLedger(ledger) as led:
        led.submit(spec.jobs())


def _wait_for(pred, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.ray
@pytest.mark.faults
def test_a_batch_the_cluster_lacks_fails_after_a_bounded_wait_and_holds_nobody_back(
        ray_cluster, tmp_path, tiny_model_dir, sample_manifests):
    ledger = tmp_path / "ledger.sqlite"
    # recorded without a check (the cluster was bigger then, or unknown): 64 CPUs, one run at a time
    _record(tmp_path, "huge", tiny_model_dir, sample_manifests, ["checkered-star", "dotted-diamond"],
            {"cpus_per_worker": 64, "concepts_per_pack": 1, "max_concurrent": 1}, ledger)
    _record(tmp_path, "small", tiny_model_dir, sample_manifests, ["striped-circle"],
            {"cpus_per_worker": 1, "concepts_per_pack": 1, "max_concurrent": 2}, ledger)
    with JobLedger(ledger) as led:
        t0 = time.time()
        summary = Scheduler(led, poll_s=0.2, resource_wait_s=3).run()
        assert summary.states == {"checkered-star": "failed", "dotted-diamond": "failed", "striped-circle": "published"}
        huge = led.get("checkered-star")
        assert huge.error.startswith("resources.cpus_per_worker: 64 CPUs per worker") and "waited" in huge.error
        assert led.events("checkered-star", "waiting-for-resources")
        # the huge jobs were never launched and never took a run slot (one run per stage of the small one)
        assert [(r["stage"], r["members"]) for r in led.runs()] == [(1, ["striped-circle"]), (2, ["striped-circle"])]
        assert time.time() - t0 < 300


@pytest.mark.ray
def test_cancel_works_while_a_job_waits_for_resources(ray_cluster, tmp_path, tiny_model_dir, sample_manifests):
    ledger = tmp_path / "ledger.sqlite"
    _record(tmp_path, "huge", tiny_model_dir, sample_manifests, ["checkered-star", "striped-circle"],
            {"cpus_per_worker": 64, "concepts_per_pack": 1}, ledger)
    out = {}
    with JobLedger(ledger) as led:
        led.transition("striped-circle", "stage1")    # as an interrupted run leaves it: mid-stage, waiting
        runner = threading.Thread(target=lambda: out.update(s=Scheduler(led, poll_s=0.2, resource_wait_s=600).run()))
        runner.start()
        _wait_for(lambda: len(led.events(kind="waiting-for-resources")) == 2, 60, "both jobs to wait")
        t0 = time.time()
        assert api.cancel(ledger, "checkered-star") == "checkered-star: cancelled"        # queued: at once
        assert "requested" in api.cancel(ledger, "striped-circle")                   # the driver stops it
        runner.join(timeout=60)
        assert not runner.is_alive() and out["s"].states == {"checkered-star": "cancelled", "striped-circle": "cancelled"}
        assert time.time() - t0 < 30 and led.runs() == []


@pytest.mark.ray
@pytest.mark.faults
def test_a_restarted_service_resumes_unfinished_jobs_by_itself(ray_cluster, tmp_path, batch_files):
    spec = load_batch(batch_files(ids=["checkered-star"]))
    with JobLedger(spec.ledger_path) as led:
        led.submit(spec.jobs())                  # recorded before the "restart"; nobody drives it
    started = api.resume_unfinished(spec.ledger_path)
    assert started is not None and started.kind == "actor"
    assert api.resume_unfinished(spec.ledger_path) is None               # one driver, not two
    jobs = api.wait(spec.ledger_path, timeout_s=300, poll_s=1)
    assert [j.state for j in jobs] == ["published"]
