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

``start_driver(ledger)`` starts a detached driver instead, not awaited: where Ray is initialised in
this process (the Serve ingress) a detached zero-CPU actor on this node (``DetachedDriver``, named
``driver-<hex>`` in namespace "purecc"); otherwise (the CLI) a ``purecc resume`` process in its own
session, logging to ``<ledger folder>/logs/``. Either way it runs on this node, where the ledger is
(SQLite is not safe across hosts), and exits once no job is left; two started at once are harmless
(the ledger's driver lease lets one schedule, the other exits).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

from purecc.adapter_files import AdapterManifest
from purecc.registry import AdapterRegistry

from .ledger import ACTIVE, DriverBusy, JobLedger, JobRecord, SubmitReport
from .scheduler import RunSummary, Scheduler
from .spec import BatchSpec, ValidatedBatch

FAULT_ENV = "PURECC_FAULT_KILL"   # tests: "concept_id:stage:step" -> that worker os._exit(1)s once
DRIVER_NAMESPACE = "purecc"       # `ray list actors` shows the detached drivers there

log = logging.getLogger(__name__)


@dataclass
class SubmitResult:
    """What ``submit`` recorded and how the jobs are run."""

    ledger: str
    report: SubmitReport
    driver: str                  # "ran" (here), "running" (another live driver), "spawned", "none"
    summary: RunSummary | None = None


def fault_from_env() -> dict | None:
    """The fault to inject from $PURECC_FAULT_KILL ("concept_id:stage:step"), or None."""
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


def submit(batch: str | Path | BatchSpec | ValidatedBatch, *, replace: bool = False, requeue: bool = False,
           run: bool = True, detach: bool = False, address: str | None = None, num_cpus: int | None = None,
           ray_temp_dir: str | None = None, max_concurrent: int | None = None,
           on_tick: Callable[[list[JobRecord]], None] | None = None, fault: dict | None = None,
           on_recorded: Callable[[str, SubmitReport], None] | None = None) -> SubmitResult:
    """Validate and record a batch (idempotent), then run it: here (default), in a detached
    driver (``detach``: see ``start_driver``), or not at all (``run=False``). A live driver is never
    doubled. ``on_recorded(ledger, report)`` is called once the jobs are committed, before anything
    runs. Each manifest is read once (a batch file's by its validation)."""
    if isinstance(batch, BatchSpec):
        spec, jobs = batch, batch.jobs()
    else:
        valid = batch if isinstance(batch, ValidatedBatch) else ValidatedBatch.from_file(batch)
        spec, jobs = valid.spec, valid.jobs()
    ledger_path = spec.ledger_path
    with JobLedger(ledger_path) as ledger:
        report = ledger.submit(jobs, replace=replace, requeue=requeue)
        live = ledger.live_driver()
    if on_recorded:
        on_recorded(ledger_path, report)
    if not run:
        return SubmitResult(ledger_path, report, "none")
    if live:
        return SubmitResult(ledger_path, report, "running")
    if detach:
        start_driver(ledger_path, address=address, num_cpus=num_cpus)
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
            runner = Scheduler(led, poll_s=poll_s, max_concurrent=max_concurrent, on_tick=on_tick,
                              fault=fault or fault_from_env())
            return runner.run()
    return _with_ray(address, num_cpus, ray_temp_dir, go)


@dataclass(frozen=True)
class StartedDriver:
    """What ``start_driver`` started: a detached actor (its name) or a detached process (its pid)."""

    kind: Literal["actor", "process"]
    name: str | None = None      # the actor's name, in namespace DRIVER_NAMESPACE
    pid: int | None = None


class DetachedDriver:
    """The detached driver actor's class: drives one ledger until no job is left, then exits."""

    def run(self, ledger: str) -> None:
        """``resume(ledger)``, then end this actor; nobody awaits it, so a failure goes to the log."""
        import ray

        try:
            resume(ledger)
        except DriverBusy:
            pass        # another driver took the ledger since the caller looked; it runs these jobs
        except Exception:  # noqa: BLE001 -- nobody awaits this actor: the log is where it goes
            log.exception("the driver of %s stopped", ledger)
        finally:
            ray.actor.exit_actor()


def start_driver(ledger: str | Path, *, address: str | None = None,
                 num_cpus: int | None = None) -> StartedDriver:
    """Start a detached driver for ``ledger`` on this node, not awaited (see the module doc): an actor
    where Ray is initialised in this process, else a ``purecc resume`` process (``address`` and
    ``num_cpus`` are its Ray options)."""
    loaded = sys.modules.get("ray")          # not imported here first: see local_ray
    if loaded is not None and loaded.is_initialized():
        return StartedDriver("actor", name=_start_actor(str(ledger)))
    return StartedDriver("process", pid=_spawn_process(ledger, address=address, num_cpus=num_cpus))


def _start_actor(ledger: str) -> str:
    """A detached zero-CPU ``DetachedDriver`` actor pinned to this node, running ``ledger``; its name."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    name = f"driver-{uuid.uuid4().hex[:12]}"
    actor = ray.remote(num_cpus=0, max_restarts=0)(DetachedDriver).options(
        name=name, namespace=DRIVER_NAMESPACE, lifetime="detached",
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote()
    actor.run.remote(ledger)
    return name


def _spawn_process(ledger: str | Path, *, address: str | None, num_cpus: int | None) -> int:
    """``purecc resume`` in its own session, its log next to the ledger; its pid."""
    log_dir = Path(ledger).resolve().parent / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "purecc.cli", "resume", "--ledger", str(ledger), "--quiet"]
    cmd += ["--address", address] if address else []
    cmd += ["--num-cpus", str(num_cpus)] if num_cpus else []
    with open(log_dir / f"driver-{time.strftime('%Y%m%d-%H%M%S')}.log", "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    return proc.pid


def status(ledger: str | Path, concept_id: str | None = None) -> list[JobRecord]:
    """The ledger's jobs, or the one of ``concept_id``."""
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
    """The storage roots the ledger's jobs write to."""
    with JobLedger(ledger) as led:
        return sorted({j.spec.storage for j in led.jobs()})
