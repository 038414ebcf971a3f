"""The Python API behind ``purecc submit / status / cancel / resume / concepts``.

    from cluster import api
    result = api.submit("batch.yaml")                 # record the jobs and run them here until done
    api.status(result.ledger)                         # JobRecords
    api.cancel(result.ledger, "checkered-star")          # idempotent
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
(the ledger's driver lease lets one schedule, the other exits). A submission that starts one reserves
the lease first (``JobLedger.reserve_driver``, in one transaction), so of many concurrent submissions
exactly one starts a driver; the driver claims that reservation.

``resume_unfinished(ledger)`` is for a service starting up: it starts a detached driver when the
ledger has unfinished jobs and no live driver, so a restart resumes queued and interrupted jobs by itself.

A batch whose worker resources no node of the cluster has (``cluster.scheduler.unsatisfiable``) is
refused at submit with ``UnsatisfiableResources`` naming the field, when the cluster is known (Ray
initialised here, or the local cluster this call would start).
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

from .ledger_sql import is_postgres
from .ledger import ACTIVE, DriverBusy, JobLedger, JobRecord, SubmitReport
from .scheduler import RunSummary, Scheduler, node_resources, unsatisfiable
from .spec import BatchSpec, Resources, ValidatedBatch

FAULT_ENV = "PURECC_FAULT_KILL"   # tests: "concept_id:stage:step" -> that worker os._exit(1)s once
RESERVATION_ENV = "PURECC_DRIVER_RESERVATION"   # the lease reservation a spawned `purecc resume` claims
DRIVER_NAMESPACE = "purecc"       # `ray list actors` shows the detached drivers there

log = logging.getLogger(__name__)


@dataclass
class SubmitResult:
    """What ``submit`` recorded and how the jobs are run."""

    ledger: str
    report: SubmitReport
    driver: str                  # "ran" (here), "running" (another live driver), "spawned", "none"
    summary: RunSummary | None = None


class UnsatisfiableResources(ValueError):
    """A batch asks for worker resources that no node of the cluster has (the message names the field)."""


def _known_nodes(address: str | None, num_cpus: int | None) -> list[dict[str, float]] | None:
    """The nodes a submission here would run on: the connected cluster's, or the local cluster
    ``submit`` would start (``num_cpus`` or every CPU, the GPUs torch sees); None when unknown (a
    cluster joined later by address)."""
    loaded = sys.modules.get("ray")
    if loaded is not None and loaded.is_initialized():
        return node_resources()
    if address or os.environ.get("RAY_ADDRESS"):
        return None
    import torch

    return [{"CPU": float(num_cpus or os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}]


def check_resources(resources: Resources, *, address: str | None = None, num_cpus: int | None = None) -> None:
    """Raise ``UnsatisfiableResources`` when no node of the (known) cluster can place a worker."""
    nodes = _known_nodes(address, num_cpus)
    why = unsatisfiable(resources, nodes) if nodes is not None else None
    if why:
        raise UnsatisfiableResources(why)


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
    runs. Each manifest is read once (a batch file's by its validation). Raises
    ``UnsatisfiableResources`` (nothing recorded) when no node can ever place the batch's workers."""
    if isinstance(batch, BatchSpec):
        spec, jobs = batch, batch.jobs()
    else:
        valid = batch if isinstance(batch, ValidatedBatch) else ValidatedBatch.from_file(batch)
        spec, jobs = valid.spec, valid.jobs()
    if run:
        check_resources(spec.resources, address=address, num_cpus=num_cpus)
    ledger_path = spec.ledger_path
    with JobLedger(ledger_path) as ledger:
        report = ledger.submit(jobs, replace=replace, requeue=requeue)
        token = ledger.reserve_driver() if run and detach else None
        live = ledger.live_driver() if token is None else None
    if on_recorded:
        on_recorded(ledger_path, report)
    if not run:
        return SubmitResult(ledger_path, report, "none")
    if detach:
        if token is None:
            return SubmitResult(ledger_path, report, "running")
        _start_reserved(ledger_path, token, address=address, num_cpus=num_cpus)
        return SubmitResult(ledger_path, report, "spawned")
    if live:
        return SubmitResult(ledger_path, report, "running")
    try:
        summary = resume(ledger_path, address=address, num_cpus=num_cpus, ray_temp_dir=ray_temp_dir,
                         max_concurrent=max_concurrent, on_tick=on_tick, fault=fault)
    except DriverBusy:      # another driver claimed the ledger since we looked: it runs these jobs
        return SubmitResult(ledger_path, report, "running")
    return SubmitResult(ledger_path, report, "ran", summary)


def _start_reserved(ledger: str | Path, token: str, *, address: str | None, num_cpus: int | None) -> "StartedDriver":
    """``start_driver`` for a reservation; the reservation is dropped if the start fails."""
    try:
        started = start_driver(ledger, address=address, num_cpus=num_cpus, reservation=token)
    except BaseException:
        with JobLedger(ledger) as led:
            led.cancel_reservation(token)
        raise
    if started.pid is not None:
        with JobLedger(ledger) as led:
            led.reservation_started(token, started.pid)
    return started


def resume_unfinished(ledger: str | Path, *, address: str | None = None,
                      num_cpus: int | None = None) -> "StartedDriver | None":
    """Start a detached driver when ``ledger`` has unfinished jobs and no live driver (a service
    starting up calls this, so a restart resumes queued and interrupted jobs by itself). Returns
    what was started, or None (nothing unfinished, no such ledger, or a driver is live)."""
    if not is_postgres(ledger) and not Path(ledger).is_file():
        return None
    with JobLedger(ledger) as led:
        token = led.reserve_driver() if led.has_unfinished() else None
    if token is None:
        return None
    log.info("resuming the unfinished jobs of %s", ledger)
    return _start_reserved(ledger, token, address=address, num_cpus=num_cpus)


def resume(ledger: str | Path, *, address: str | None = None, num_cpus: int | None = None,
           ray_temp_dir: str | None = None, max_concurrent: int | None = None, poll_s: float = 0.5,
           on_tick: Callable[[list[JobRecord]], None] | None = None, fault: dict | None = None,
           reservation: str | None = None) -> RunSummary:
    """Be the driver: run every unfinished job of the ledger (from its checkpoints) until none is left.

    ``fault`` (testing; default from $PURECC_FAULT_KILL="id:stage:step"): the worker training that
    concept ``os._exit(1)``s once when it reaches that step. ``reservation`` (default from
    $PURECC_DRIVER_RESERVATION): the lease reservation this driver was started for. Raises
    ``DriverBusy`` when another driver holds the lease, ``LeaseLost`` when one takes it over."""
    token = reservation or os.environ.get(RESERVATION_ENV) or None

    def go() -> RunSummary:
        with JobLedger(ledger) as led:
            runner = Scheduler(led, poll_s=poll_s, max_concurrent=max_concurrent, on_tick=on_tick,
                              fault=fault or fault_from_env(), reservation=token)
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

    def run(self, ledger: str, reservation: str | None = None) -> None:
        """``resume(ledger)``, then end this actor; nobody awaits it, so a failure goes to the log.
        A reservation it could not claim is dropped, so the next submission starts a driver again."""
        import ray

        try:
            resume(ledger, reservation=reservation)
        except DriverBusy:
            pass        # another driver took the ledger since the caller looked; it runs these jobs
        except Exception:  # noqa: BLE001 -- nobody awaits this actor: the log is where it goes
            log.exception("the driver of %s stopped", ledger)
        finally:
            if reservation:
                with JobLedger(ledger) as led:
                    led.cancel_reservation(reservation)
            ray.actor.exit_actor()


def start_driver(ledger: str | Path, *, address: str | None = None, num_cpus: int | None = None,
                 reservation: str | None = None) -> StartedDriver:
    """Start a detached driver for ``ledger`` on this node, not awaited (see the module doc): an actor
    where Ray is initialised in this process, else a ``purecc resume`` process (``address`` and
    ``num_cpus`` are its Ray options). ``reservation``: the ``reserve_driver`` token it claims."""
    loaded = sys.modules.get("ray")          # not imported here first: see local_ray
    if loaded is not None and loaded.is_initialized():
        return StartedDriver("actor", name=_start_actor(str(ledger), reservation))
    return StartedDriver("process", pid=_spawn_process(ledger, address=address, num_cpus=num_cpus,
                                                       reservation=reservation))


def _start_actor(ledger: str, reservation: str | None = None) -> str:
    """A detached zero-CPU ``DetachedDriver`` actor pinned to this node, running ``ledger``; its name."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    name = f"driver-{uuid.uuid4().hex[:12]}"
    actor = ray.remote(num_cpus=0, max_restarts=0)(DetachedDriver).options(
        name=name, namespace=DRIVER_NAMESPACE, lifetime="detached",
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote()
    actor.run.remote(ledger, reservation)
    return name


def _spawn_process(ledger: str | Path, *, address: str | None, num_cpus: int | None,
                   reservation: str | None = None) -> int:
    """``purecc resume`` in its own session, its log next to the ledger (a PostgreSQL ledger's in
    ~/.purecc/logs); its pid."""
    log_dir = Path.home() / ".purecc" / "logs" if is_postgres(ledger) else Path(ledger).resolve().parent / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "purecc.cli", "resume", "--ledger", str(ledger), "--quiet"]
    cmd += ["--address", address] if address else []
    cmd += ["--num-cpus", str(num_cpus)] if num_cpus else []
    with open(log_dir / f"driver-{time.strftime('%Y%m%d-%H%M%S')}.log", "ab") as out:
        env = {**os.environ, RESERVATION_ENV: reservation or ""}
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)
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
