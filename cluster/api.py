"""The Python API behind ``purecc submit / status / cancel / resume / concepts``.

    from cluster import api
    result = api.submit("batch.yaml")                 # record the jobs and run them here until done
    api.status(result.ledger)                         # JobRecords
    api.cancel(result.ledger, "zigzag-star")          # idempotent
    api.resume(result.ledger)                         # after a crash: finish every unfinished job
    api.concepts("/data/purecc")                      # published adapters (manifests)

The driver runs in the calling process and needs Ray: an initialised Ray is used as it is; otherwise
``address`` (or ``RAY_ADDRESS``) is joined, or a local loopback cluster is started (and shut down
after). One driver per ledger schedules; a second ``submit`` while it runs only records its jobs, which
the running driver picks up.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from purecc.adapter_files import AdapterManifest
from purecc.registry import AdapterRegistry

from .ledger import ACTIVE, JobLedger, JobRecord, SubmitReport
from .scheduler import BatchRunner, RunSummary
from .spec import BatchSpec, load_batch

FAULT_ENV = "PURECC_FAULT_KILL"   # tests: "concept_id:stage:step" -> that worker os._exit(1)s once


@dataclass
class SubmitResult:
    ledger: str
    report: SubmitReport
    driver: str                  # "ran" (here), "running" (another live driver), "spawned", "none"
    summary: RunSummary | None = None


def fault_from_env() -> dict | None:
    value = os.environ.get(FAULT_ENV)
    if not value:
        return None
    cid, stage, step = value.rsplit(":", 2)
    return {"concept_id": cid, "stage": int(stage), "step": int(step)}


def _with_ray(address: str | None, num_cpus: int | None, temp_dir: str | None,
              fn: Callable[[], RunSummary]) -> RunSummary:
    """Run ``fn`` with Ray up: an initialised Ray as it is, else join/start one (and shut it down)."""
    from .local_ray import start_local_ray

    loaded = sys.modules.get("ray")          # not imported here first: see local_ray
    started = loaded is None or not loaded.is_initialized()
    ray = start_local_ray(num_cpus, temp_dir=temp_dir, address=address or os.environ.get("RAY_ADDRESS")) \
        if started else loaded
    try:
        return fn()
    finally:
        if started:
            ray.shutdown()


def submit(batch: str | Path | BatchSpec, *, replace: bool = False, requeue: bool = False, run: bool = True,
           detach: bool = False, address: str | None = None, num_cpus: int | None = None,
           ray_temp_dir: str | None = None, max_concurrent: int | None = None,
           on_tick: Callable[[list[JobRecord]], None] | None = None, fault: dict | None = None,
           on_recorded: Callable[[str, SubmitReport], None] | None = None) -> SubmitResult:
    """Validate and record a batch (idempotent), then run it: here (default), in a detached
    driver process (``detach``), or not at all (``run=False``). A live driver is never doubled.
    ``on_recorded(ledger, report)`` is called once the jobs are committed, before anything runs."""
    spec = batch if isinstance(batch, BatchSpec) else load_batch(batch)
    ledger_path = spec.ledger_path
    with JobLedger(ledger_path) as ledger:
        report = ledger.submit(spec.jobs(), replace=replace, requeue=requeue)
        live = ledger.live_driver()
    if on_recorded:
        on_recorded(ledger_path, report)
    if not run:
        return SubmitResult(ledger_path, report, "none")
    if live:
        return SubmitResult(ledger_path, report, "running")
    if detach:
        spawn_driver(ledger_path, address=address, num_cpus=num_cpus)
        return SubmitResult(ledger_path, report, "spawned")
    summary = resume(ledger_path, address=address, num_cpus=num_cpus, ray_temp_dir=ray_temp_dir,
                     max_concurrent=max_concurrent, on_tick=on_tick, fault=fault)
    return SubmitResult(ledger_path, report, "ran", summary)


def resume(ledger: str | Path, *, address: str | None = None, num_cpus: int | None = None,
           ray_temp_dir: str | None = None, max_concurrent: int | None = None, poll_s: float = 0.5,
           on_tick: Callable[[list[JobRecord]], None] | None = None, fault: dict | None = None) -> RunSummary:
    """Be the driver: run every unfinished job of the ledger (from its checkpoints) until none is left.

    ``fault`` (testing; default from $PURECC_FAULT_KILL="id:stage:step"): the worker training that
    concept ``os._exit(1)``s once when it reaches that step."""
    def go() -> RunSummary:
        with JobLedger(ledger) as led:
            runner = BatchRunner(led, poll_s=poll_s, max_concurrent=max_concurrent, on_tick=on_tick,
                                 fault=fault or fault_from_env())
            return runner.run()
    return _with_ray(address, num_cpus, ray_temp_dir, go)


def spawn_driver(ledger: str | Path, *, address: str | None = None, num_cpus: int | None = None) -> int:
    """Start ``purecc resume`` detached (own session, log next to the ledger); returns its pid."""
    log_dir = Path(ledger).resolve().parent / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "purecc.cli", "resume", "--ledger", str(ledger), "--quiet"]
    cmd += ["--address", address] if address else []
    cmd += ["--num-cpus", str(num_cpus)] if num_cpus else []
    with open(log_dir / f"driver-{time.strftime('%Y%m%d-%H%M%S')}.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    return proc.pid


def status(ledger: str | Path, concept_id: str | None = None) -> list[JobRecord]:
    with JobLedger(ledger) as led:
        return [led.get(concept_id)] if concept_id else led.jobs()


def cancel(ledger: str | Path, concept_id: str) -> str:
    """Cancel a job (idempotent); a training job stops at its next step and keeps its checkpoint."""
    with JobLedger(ledger) as led:
        return led.request_cancel(concept_id)


def wait(ledger: str | Path, *, timeout_s: float | None = None, poll_s: float = 1.0,
         on_tick: Callable[[list[JobRecord]], None] | None = None) -> list[JobRecord]:
    """Block until no job of the ledger is active (another process drives them)."""
    deadline = None if timeout_s is None else time.time() + timeout_s
    with JobLedger(ledger) as led:
        while True:
            jobs = led.jobs()
            if on_tick:
                on_tick(jobs)
            if not any(j.state in ACTIVE for j in jobs):
                return jobs
            if deadline is not None and time.time() > deadline:
                raise TimeoutError(f"jobs still active after {timeout_s} s")
            time.sleep(poll_s)


def concepts(storage: str | Path | Sequence[str]) -> list[AdapterManifest]:
    """Published concepts (their manifests) under one or more storage roots."""
    roots = [str(storage)] if isinstance(storage, (str, Path)) else [str(s) for s in storage]
    out = [m for root in roots for m in AdapterRegistry(root).list()]
    return sorted(out, key=lambda m: m.concept_id)


def storage_roots(ledger: str | Path) -> list[str]:
    with JobLedger(ledger) as led:
        return sorted({j.spec.storage for j in led.jobs()})
