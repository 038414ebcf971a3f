"""The scheduler: turns ledger jobs into packs and packs into concurrent Ray Train runs.

The scheduler is what "the driver" runs: the process (or detached actor, ``cluster.api.start_driver``)
holding the ledger's driver lease. Which packs to launch is decided by pure functions over ledger rows
(``plan_packs``, ``concurrency_limit``), testable without Ray; ``Scheduler`` adds the Ray side.

A pack's whole life is one ``TorchTrainer`` run (one worker, one base load): stage 1, then, once the
driver has recorded stage 1 in the ledger (published, ``stage1 -> stage2``) and launched stage 2 there,
its handover on the board lets the same worker train stage 2 of the members it names (the members
stay running for the scheduler throughout). Packs of stage 2 alone (a kept stage 1 requeued, a retry)
are runs of their own; ``PURECC_RUN_PER_STAGE=1`` makes every stage its own run, as before.
Runs are launched from a ``num_cpus=0`` task, so several
runs proceed at once up to the concurrency limit (a run queued on resources would sit on its
placement group; queueing happens here instead). A pack holds concepts of the same stage, base model,
storage, resources and batch shape (``purecc.trainer.PACK_KEYS``); its run is named after its members
(``s<stage>-<first id>-<n>-<digest>``) and the name is kept in the ledger, so a restarted driver
relaunches an interrupted pack under the same name and Ray Train restores its latest checkpoint.

The loop: heartbeat, forward cancellations, drain the progress board into the ledger, reap finished
runs, launch ready packs. A concept's stage 2 is launched as soon as its stage 1 reports done. A run
that fails after Ray Train's own worker restarts costs each unfinished member one failure; survivors
are retried one per run from their last checkpoints, and a member out of attempts is failed with the
run's error while the rest of the batch goes on.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from purecc.pack import ConceptPlan, PackPlan, ValidationSettings
from purecc.trainer import PACK_KEYS

from . import policy
from .board import start_board
from .ledger import ACTIVE, JobLedger, JobRecord, LedgerError
from .spec import Resources
from .worker import PackRun

CHECKPOINTS_KEPT = 3
MAX_RUN_ERROR = 3000
RESOURCE_WAIT_S = 120.0     # how long a job waits for resources the cluster lacks before it fails
CANCEL_GRACE_S = 5.0        # a run not started this long after a cancel is killed (it may wait on resources)
NODES_TTL_S = 2.0           # how often the node list is read again


def unsatisfiable(resources: Resources, cluster_resources: Mapping[str, float] | Sequence[Mapping[str, float]]) -> str | None:
    """Why a training worker with ``resources`` can never be placed, or None when it can.

    ``cluster_resources``: per-node resource maps (``node_resources()``; a worker's CPUs and GPUs
    must all be on one node), or a single map of the cluster's totals (``ray.cluster_resources()``).
    The message names the field, what it asks for and the most there is.
    """
    nodes = [cluster_resources] if isinstance(cluster_resources, Mapping) else list(cluster_resources)
    where = "node of the cluster" if not isinstance(cluster_resources, Mapping) else "cluster (in total)"
    for field_name, key, unit in (("gpus_per_worker", "GPU", "GPUs"), ("cpus_per_worker", "CPU", "CPUs")):
        want = float(getattr(resources, field_name))
        best = max((float(n.get(key, 0.0)) for n in nodes), default=0.0)
        if want > best:
            return (f"resources.{field_name}: {want:g} {unit} per worker, but no {where} has more than "
                    f"{best:g}; lower it or add a node with enough {unit}")
    fits = [n for n in nodes if float(n.get("GPU", 0.0)) >= resources.gpus_per_worker
            and float(n.get("CPU", 0.0)) >= resources.cpus_per_worker]
    if not fits:
        return (f"resources: {resources.cpus_per_worker:g} CPUs and {resources.gpus_per_worker:g} GPUs per worker, "
                "but no node of the cluster has both at once")
    return None


def node_resources() -> list[dict[str, float]]:
    """The total resources of each alive node of the connected Ray cluster."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def job_key(rec: JobRecord) -> str:
    """Identity of a job's training content: checkpoints of another content are never loaded."""
    return f"{rec.concept_id}:{rec.content_hash[:16]}:{rec.generation}"


def pack_name(stage: int, recs: list[JobRecord]) -> str:
    """A pack's run name: stable for the same members, so a relaunch finds its Ray checkpoints."""
    digest = hashlib.sha256(json.dumps(sorted(job_key(r) for r in recs)).encode()).hexdigest()[:10]
    return f"s{stage}-{recs[0].concept_id[:24]}-{len(recs)}-{digest}"


def pack_key(rec: JobRecord, stage: int) -> str:
    """Jobs with equal keys may share a pack (and so a run)."""
    s = rec.spec
    recipe = s.recipe(stage)
    return json.dumps([stage, s.base_model, s.base_id, s.storage, s.resources.model_dump(),
                       s.validation.model_dump(), [getattr(recipe, k) for k in PACK_KEYS]], sort_keys=True)


@dataclass(frozen=True)
class PackProposal:
    """A pack the scheduler may launch: its stage, run name and members (ledger rows)."""

    stage: int
    name: str
    jobs: tuple[JobRecord, ...]


def concurrency_limit(jobs: Sequence[JobRecord], override: int | None = None) -> dict[str, int]:
    """Runs allowed at once per batch: each batch's own ``max_concurrent`` (one batch's limit never
    throttles another); with ``override`` (the driver's ``max_concurrent``) none: it caps all runs instead."""
    return {} if override else policy.batch_limits(jobs)


def plan_packs(ready: Sequence[JobRecord], free: int, *, running: Sequence[Sequence[JobRecord]] = (),
               limits: Mapping[str, int] | None = None,
               capacity: policy.Capacity | None = None) -> list[PackProposal]:
    """Up to ``free`` packs from the ``ready`` jobs, in launch order (``cluster.policy``).

    Jobs that already belong to a pack (an interrupted run) keep it; the others are grouped by
    ``pack_key`` into packs of ``policy.pack_size`` (the batch's ``concepts_per_pack`` or the memory
    model). Which batch's pack comes next is fair share weighted by priority over the ``running`` runs'
    members; a batch at its ``limits`` entry gets no more; a pack whose worker does not fit ``capacity``
    (free node resources) is not proposed. Within a batch: stage-2 work first, then first in, first out.
    A pack led by one batch is filled with same-key jobs of other batches (neediest first).
    """
    if free <= 0 or not ready:
        return []
    limits = limits or {}
    shares = policy.Shares.of(running)
    sticky: dict[str, list[JobRecord]] = {}
    loose: list[JobRecord] = []
    for rec in ready:
        (sticky.setdefault(rec.pack, []) if rec.pack else loose).append(rec)
    order = {rec.concept_id: i for i, rec in enumerate(ready)}
    heads: dict[str, list[JobRecord]] = {}   # batch -> its waiting jobs, sticky packs' leaders first
    for recs in sticky.values():
        heads.setdefault(recs[0].batch, []).append(recs[0])
    for rec in sorted(loose, key=lambda r: (-r.next_stage, order[r.concept_id])):
        heads.setdefault(rec.batch, []).append(rec)
    keys = {r.concept_id: pack_key(r, r.next_stage) for r in loose}
    first = {b: min(r.submitted_at for r in recs) for b, recs in heads.items()}
    taken: set[str] = set()
    packs: list[PackProposal] = []
    full: set[str] = set()        # batches that cannot take another run now

    def pending(batch: str) -> list[JobRecord]:
        recs = heads[batch]
        while recs and recs[0].concept_id in taken:
            recs.pop(0)
        return recs

    def same_key(batch: str, key: str, n: int) -> list[JobRecord]:
        return [r for r in pending(batch) if r.concept_id not in taken and keys.get(r.concept_id) == key][:n]

    while len(packs) < free:
        waiting = {b: pending(b)[0] for b in heads if b not in full and pending(b)
                   and shares.runs[b] < limits.get(b, 1 << 30)}
        batch = policy.pick_batch(waiting, shares, first)
        if batch is None:
            break
        head = waiting[batch]
        if capacity is not None and not capacity.take(head.spec.resources):
            full.add(batch)
            continue
        if head.pack:
            members = sticky[head.pack]
        else:
            key, size = keys[head.concept_id], policy.pack_size(head.spec.resources, policy.stages_left(head))
            members = same_key(batch, key, size)
            for other in sorted((b for b in waiting if b != batch),
                                key=lambda b: shares.batch[b] / waiting[b].spec.resources.priority):
                if len(members) >= size:
                    break
                members += same_key(other, key, size - len(members))
        packs.append(PackProposal(head.next_stage, head.pack or pack_name(head.next_stage, members), tuple(members)))
        taken.update(r.concept_id for r in members)
        shares.add(members)
    return packs


def pack_plan(name: str, stage: int, recs: Sequence[JobRecord]) -> PackPlan:
    """The typed plan a worker trains, from the pack's ledger rows."""
    spec = recs[0].spec
    members = tuple(ConceptPlan(
        concept_id=r.concept_id, trigger=r.spec.trigger, manifest=r.spec.manifest, recipe=r.spec.recipe(stage),
        seed=r.spec.seed, data_hash=r.spec.data_hash, validation_prompts=tuple(r.spec.validation_prompts),
        key=job_key(r), provenance={"batch": r.batch, "content_hash": r.content_hash}) for r in recs)
    return PackPlan(name=name, stage=stage, base_model=spec.base_model, members=members,
                    validation=ValidationSettings(steps=spec.validation.steps, guidance=spec.validation.guidance))


def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= MAX_RUN_ERROR else text[:1000] + "\n...\n" + text[-(MAX_RUN_ERROR - 1000):]


RAY_RUN_SNAPSHOT = "checkpoint_manager_snapshot.json"   # Ray Train 2.60's record of a run's checkpoints


def drop_stale_snapshot(runs_path: str, name: str) -> list[str]:
    """Ray Train refuses to start a run (``CheckpointManagerInitializationError``, every attempt alike)
    whose snapshot names a checkpoint folder that is gone from storage. When one is gone, the snapshot is
    removed, so the relaunch starts; the worker then resumes from the checkpoints still on storage (it
    lists the run's folder itself, newest intact first). Returns the missing folders' names."""
    from purecc.registry import resolve_fs

    fs, run_dir = resolve_fs(f"{runs_path}/{name}")
    snapshot = f"{run_dir}/{RAY_RUN_SNAPSHOT}"
    import pyarrow.fs as pafs

    try:
        with fs.open_input_stream(snapshot) as f:
            state = json.loads(f.read())
        named = {r["checkpoint_dir_name"] for r in state.get("checkpoint_results", [])}
        missing = sorted(n for n in named if fs.get_file_info(f"{run_dir}/{n}").type != pafs.FileType.Directory)
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError, AttributeError):   # unreadable: Ray would refuse it too
        missing = [RAY_RUN_SNAPSHOT]
    if missing:
        fs.delete_file(snapshot)
    return missing


def run_pack(run: PackRun, board, resources: Resources) -> dict[str, Any]:
    """Launch one Ray Train run for a pack and wait for it (runs in a zero-CPU Ray task)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .worker import train_pack

    for gone in drop_stale_snapshot(run.runs_path, run.plan.name):
        for member in run.plan.members:
            board.push.remote("event", {"run": run.plan.name, "concept_id": member.concept_id,
                                        "event": "checkpoint-unreadable",
                                        "detail": {"checkpoint": f"{run.plan.name}/{gone}",
                                                   "error": "Ray's run snapshot names it and it is gone from "
                                                            "storage; the snapshot is dropped and the run "
                                                            "resumes from the checkpoints still there"}})

    gpus = float(resources.gpus_per_worker)
    per_worker = {"CPU": float(resources.cpus_per_worker), **({"GPU": gpus} if gpus else {})}
    trainer = TorchTrainer(
        train_pack, train_loop_config={"run": run.to_dict(), "board": board},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=gpus > 0, resources_per_worker=per_worker),
        run_config=RunConfig(name=run.plan.name, storage_path=run.runs_path,
                             failure_config=FailureConfig(max_failures=int(resources.max_failures)),
                             checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT)))
    t0 = time.time()
    try:
        trainer.fit()
    except Exception as exc:  # noqa: BLE001 -- reported to the driver, which decides on retries
        return {"ok": False, "error": _short_error(exc), "wall_s": time.time() - t0}
    return {"ok": True, "error": None, "wall_s": time.time() - t0}


class RayRuntime:
    """Everything the loop asks of Ray, in one place: the seam ``Scheduler(runtime=...)`` takes.

    The real path always goes through it; ``bench/scale_sim.py`` gives the same loop a fake one
    (a fake clock and fake runs over the real ledger and board) to measure it at 10,000 jobs. A run
    is a handle from ``launch``; the board is whatever ``start_board`` returns (called ``.remote``).
    Created in ``Scheduler.run`` so ``ray`` is imported only once ``cluster.local_ray`` set it up.
    """

    def __init__(self) -> None:
        import ray

        self.ray = ray
        self._launcher = ray.remote(num_cpus=0, max_retries=0)(run_pack)

    def start_board(self):
        return start_board()

    def launch(self, run: PackRun, board, resources: Resources):
        return self._launcher.remote(run, board, resources)

    def wait(self, refs: list, timeout: float) -> list:
        """The runs among ``refs`` that ended, waiting up to ``timeout`` s for the first."""
        done, _ = self.ray.wait(refs, num_returns=1, timeout=timeout)
        if done:
            done, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
        return done

    def get(self, ref) -> Any:
        return self.ray.get(ref)

    def cancel(self, ref) -> None:
        self.ray.cancel(ref, force=True, recursive=True)

    def kill(self, actor) -> None:
        self.ray.kill(actor)

    def nodes(self) -> list[dict[str, float]]:
        return node_resources()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@dataclass
class _Launch:
    """A run in flight: its ledger id, pack name, stage and members."""

    run_id: int | None
    pack: str
    stage: int
    members: list[str]
    max_attempts: int
    cancel_sent: dict[str, float] = field(default_factory=dict)   # concept id -> when the cancel went out
    started: bool = False      # its worker has reported (it is placed: not waiting for resources)
    ray_name: str = ""         # the Ray Train run's name (the stage-1 pack's for a whole-life run)
    then: str | None = None    # a whole-life run: the stage-2 pack name, until the handover
    s1_left: set[str] = field(default_factory=set)   # whole-life: members whose stage-1 outcome is still due


@dataclass
class RunSummary:
    """What ``Scheduler.run`` ends with: each job's state, runs launched, wall time."""

    states: dict[str, str]
    runs_launched: int
    wall_s: float


class Scheduler:
    """The scheduling loop over one ledger. ``run()`` returns when no job is left to do.

    ``max_concurrent`` overrides the jobs' own limit; ``on_tick(jobs)`` is called every poll
    (progress displays); ``fault`` (tests) makes a worker ``os._exit`` once at a given step;
    ``reservation``: the ``JobLedger.reserve_driver`` token this driver was started for;
    ``resource_wait_s``: how long a job waits for resources no node has before it fails;
    ``runtime``: what stands for Ray (default ``RayRuntime``; a simulation passes a fake one).

    Jobs whose resources no node has are held back (never launched, not counted against anyone's
    concurrency), so one such batch never holds other batches back.
    """

    def __init__(self, ledger: JobLedger, *, poll_s: float = 0.5, max_concurrent: int | None = None,
                 on_tick: Callable[[list[JobRecord]], None] | None = None, fault: dict | None = None,
                 scratch: str | None = None, owner: str | None = None, reservation: str | None = None,
                 resource_wait_s: float = RESOURCE_WAIT_S, runtime: RayRuntime | None = None,
                 whole_life: bool | None = None):
        self.ledger, self.poll_s, self.max_concurrent = ledger, poll_s, max_concurrent
        self.on_tick, self.fault, self.scratch = on_tick, fault, scratch
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.reservation, self.resource_wait_s = reservation, resource_wait_s
        self._runtime = runtime
        self.whole_life = os.environ.get("PURECC_RUN_PER_STAGE") != "1" if whole_life is None else whole_life
        self.launches: dict[Any, _Launch] = {}    # ObjectRef of the launcher task -> launch
        self._short_since: dict[str, float] = {}  # concept id -> since when its resources are missing
        self._nodes: tuple[float, list[dict[str, float]]] = (0.0, [])
        self._speed: dict[str, tuple[int, float, int]] = {}   # cid -> (stage, t0, step0) of this launch
        self._runs = 0
        self.board = None

    # ----- the loop --------------------------------------------------------------------------
    def run(self) -> RunSummary:
        """Drive until no job is left (Ray must be initialised; the module never imports it at load,
        so ``cluster.local_ray`` can set the loopback environment first)."""
        self._ray = self._runtime or RayRuntime()
        t0 = time.time()
        self.ledger.claim_driver(self.owner, reservation=self.reservation)
        self.board = self._ray.start_board()
        try:
            self._recover()
            while True:
                self.ledger.heartbeat(self.owner)     # LeaseLost: another driver took over; stop now
                self._active_cache = (None, [])       # each tick reads the ledger afresh
                self._cancellations()
                self._drain()
                self._reap()
                self._resource_checks()
                self._schedule()
                if self.on_tick:
                    self.on_tick(self.ledger.jobs())
                if not self.launches and not self._ready() and self.ledger.release_driver_if_idle(self.owner):
                    break
        finally:
            self._stop()
        return RunSummary({j.concept_id: j.state for j in self.ledger.jobs()}, self._runs, time.time() - t0)

    def _stop(self) -> None:
        for ref in self.launches:
            self._ray.cancel(ref)
        self.launches.clear()
        if self.board is not None:
            self._ray.kill(self.board)
            self.board = None
        if self.ledger.live_driver() and self.ledger.live_driver()["owner"] == self.owner:
            self.ledger.release_driver(self.owner)

    def _recover(self) -> None:
        """After a driver death: close its runs; cancel flagged jobs. Packs keep their names."""
        for run in self.ledger.runs():
            if run["ended_at"] is None:
                self.ledger.end_run(run["id"], "interrupted", "the driver stopped before the run ended")
        for rec in self.ledger.jobs(ACTIVE):
            if rec.cancel_requested:
                self.ledger.transition(rec.concept_id, "cancelled", pack=None, detail={"requested": True})

    def _active(self) -> list[JobRecord]:
        """The active jobs, read once per tick and again only after this driver wrote to the ledger
        (a submission from elsewhere is seen at the next tick)."""
        cache = getattr(self, "_active_cache", (None, []))
        if cache[0] != self.ledger.writes:
            cache = self._active_cache = (self.ledger.writes, self.ledger.jobs(ACTIVE))
        return cache[1]

    def _running_ids(self) -> set[str]:
        return {cid for launch in self.launches.values() for cid in launch.members}

    def _ready(self) -> list[JobRecord]:
        busy = self._running_ids()
        return [r for r in self._active() if r.concept_id not in busy and not r.cancel_requested]

    # ----- resources -------------------------------------------------------------------------
    def _node_list(self) -> list[dict[str, float]]:
        at, nodes = self._nodes
        if time.time() - at > NODES_TTL_S:
            self._nodes = (time.time(), self._ray.nodes())
        return self._nodes[1]

    def _lacking(self, rec: JobRecord) -> str | None:
        """Why no node can take ``rec``'s worker now (None: one can)."""
        return unsatisfiable(rec.spec.resources, self._node_list())

    def _resource_checks(self) -> None:
        """Fail jobs whose resources no node has had for ``resource_wait_s`` (the cluster shrank or
        never had them); a run still waiting to be placed for such jobs is stopped first."""
        now, short = time.time(), {}
        waiting = {cid: ref for ref, launch in self.launches.items() if not launch.started for cid in launch.members}
        for rec in self._active():
            if rec.concept_id in self._running_ids() and rec.concept_id not in waiting:
                continue
            why = self._lacking(rec)
            if why is None:
                continue
            since = self._short_since.get(rec.concept_id, now)
            short[rec.concept_id] = since
            if since == now:
                self.ledger.record_event(rec.concept_id, "waiting-for-resources", {"why": why})
            if now - since >= self.resource_wait_s:
                if rec.concept_id in waiting:
                    self._abort(waiting[rec.concept_id], "waiting for resources")
                self.ledger.fail(rec.concept_id, f"{why} (waited {now - since:.0f} s)")
                short.pop(rec.concept_id)
        self._short_since = short

    def _abort(self, ref, why: str) -> None:
        """Stop a launched run that has not started (it waits to be placed)."""
        launch = self.launches.pop(ref, None)
        if launch is None:
            return
        self._ray.cancel(ref)
        self.ledger.end_run(launch.run_id, "aborted", why)

    # ----- cancellation ----------------------------------------------------------------------
    def _cancellations(self) -> None:
        """Cancel what was asked: jobs not running at once; running ones through the board (their
        worker stops at its next step); a run whose worker never started (it waits for resources)
        is stopped after ``CANCEL_GRACE_S`` and its cancelled members are cancelled."""
        running = {cid: (ref, launch) for ref, launch in self.launches.items() for cid in launch.members}
        for rec in self._active():
            if not rec.cancel_requested:
                continue
            ref, launch = running.get(rec.concept_id, (None, None))
            if launch is None:
                self.ledger.transition(rec.concept_id, "cancelled", pack=None, detail={"requested": True})
                self.board.uncancel.remote([rec.concept_id])
            elif rec.concept_id not in launch.cancel_sent:
                self.board.cancel.remote([rec.concept_id])
                launch.cancel_sent[rec.concept_id] = time.time()
            elif not launch.started and time.time() - launch.cancel_sent[rec.concept_id] > CANCEL_GRACE_S:
                self._abort(ref, "cancelled while waiting to start")
                for cid in launch.cancel_sent:
                    self.ledger.transition(cid, "cancelled", pack=None, detail={"requested": True, "waiting": True})
                self.board.uncancel.remote(list(launch.cancel_sent))

    # ----- messages from workers -------------------------------------------------------------
    def _drain(self) -> None:
        progress: dict[str, dict] = {}
        by_run = {name: launch for launch in self.launches.values() for name in (launch.pack, launch.ray_name)}
        for msg in self._ray.get(self.board.drain.remote()):
            kind, cid = msg["kind"], msg.get("concept_id")
            if msg.get("run") in by_run:
                by_run[msg["run"]].started = True
            if kind == "progress":      # one per concept: the board keeps its newest (and its curve)
                progress[cid] = self._with_eta(msg)
            elif kind == "checkpoint":
                for m in msg["members"]:
                    self.ledger.record_checkpoint(m["concept_id"], msg["stage"], m["step"],
                                                  f"{msg['uri']}/{m['concept_id']}")
            elif kind == "event":
                if msg["event"] == "resumed":
                    self._speed.pop(cid, None)
                self.ledger.record_event(cid, msg["event"], msg.get("detail"), msg["at"])
            elif kind == "outcome":
                self.ledger.record_progress(list(progress.values()))
                progress.clear()
                self._outcome(msg)
                launch = by_run.get(msg.get("run"))
                if launch is not None and launch.then and msg["stage"] == 1:
                    launch.s1_left.discard(cid)
                    if not launch.s1_left:
                        self._hand_over(launch)
        self.ledger.record_progress(list(progress.values()))

    def _hand_over(self, launch: _Launch) -> None:
        """Every stage-1 outcome of a whole-life run is in the ledger: launch stage 2 there for those
        now in ``stage2`` and tell the worker which (it waits for this before training stage 2)."""
        done = [c for c in launch.members if self.ledger.get(c).state == "stage2"]
        self.ledger.end_run(launch.run_id, "ok")
        self.ledger.heartbeat(self.owner)
        run_id, ids = self.ledger.launch(launch.then, 2, done) if done else (None, [])
        self.board.hand_over.remote(launch.ray_name, ids)
        launch.run_id, launch.pack, launch.stage, launch.members, launch.then = run_id, launch.then, 2, ids, None
        for cid in ids:
            self._speed.pop(cid, None)

    def _with_eta(self, msg: dict) -> dict:
        """ETA of the current stage from the step rate seen since this launch's first report."""
        cid, stage, step, at = msg["concept_id"], msg["stage"], msg["step"], msg["at"]
        first = self._speed.get(cid)
        if first is None or first[0] != stage or step <= first[2]:
            self._speed[cid] = first = (stage, at, step)
        done = step - first[2]
        return {**msg, "eta_s": (msg["total"] - step) * (at - first[1]) / done if done > 0 else None}

    def _outcome(self, msg: dict) -> None:
        cid, stage, status = msg["concept_id"], msg["stage"], msg["status"]
        try:
            rec = self.ledger.get(cid)
            if rec.state != f"stage{stage}":
                return  # stale (e.g. a duplicate after a restart): the ledger already moved on
            if status == "done":
                self.ledger.stage_done(cid, stage, msg["output"], at=msg["at"])
            elif status == "failed":
                self.ledger.fail(cid, msg["error"])
            elif status == "stopped" and rec.cancel_requested:
                self.ledger.transition(cid, "cancelled", pack=None, detail={"step": msg.get("step")})
                self.board.uncancel.remote([cid])   # a later requeue must not be stopped again
        except LedgerError as exc:
            self.ledger.record_event(cid, "outcome-ignored", {"status": status, "why": str(exc)})

    # ----- runs ------------------------------------------------------------------------------
    def _reap(self) -> None:
        if not self.launches:
            self._ray.sleep(self.poll_s)   # nothing to wait on (jobs held back for resources): poll gently
            return
        refs = list(self.launches)
        for ref in self._ray.wait(refs, self.poll_s):
            launch = self.launches.pop(ref)
            try:
                result = self._ray.get(ref)
            except Exception as exc:  # noqa: BLE001 -- the launcher task itself died
                result = {"ok": False, "error": _short_error(exc)}
            self.launches[ref] = launch
            self._drain()  # outcomes pushed just before the run ended (a handover may still follow)
            self.launches.pop(ref)
            self._settle(launch, result)

    def _settle(self, launch: _Launch, result: dict) -> None:
        if launch.run_id is None:     # a whole-life run whose stage 2 had no member left
            return
        left = [cid for cid in launch.members
                if (rec := self.ledger.get(cid)).state == f"stage{launch.stage}" and rec.pack == launch.pack]
        if left:
            error = result["error"] or "the run ended before these concepts finished their stage"
            self.ledger.run_failed(left, error, max_attempts=launch.max_attempts, isolate=len(launch.members) > 1)
        self.ledger.end_run(launch.run_id, "ok" if result["ok"] and not left else "failed", result["error"])

    def _schedule(self) -> None:
        # a whole-life run's members wait for its handover between their stage-1 outcomes: not another run's
        held = {c for launch in self.launches.values() if launch.then for c in launch.members}
        ready = [r for r in self._ready() if r.concept_id not in self._short_since and r.concept_id not in held]
        running = [[self.ledger.get(c) for c in launch.members] for launch in self.launches.values()]
        limits = concurrency_limit(ready + [r for members in running for r in members], self.max_concurrent)
        free = (self.max_concurrent - len(self.launches)) if self.max_concurrent else len(ready)
        nodes = self._node_list()
        capacity = policy.Capacity(nodes, [members[0].spec.resources for members in running if members]) \
            if nodes else None
        for proposal in plan_packs(ready, free, running=running, limits=limits, capacity=capacity):
            self._launch(proposal)

    def _launch(self, proposal: PackProposal) -> None:
        stage, name = proposal.stage, proposal.name
        self.ledger.heartbeat(self.owner)   # a launch only under a lease renewed just now
        run_id, ids = self.ledger.launch(name, stage, [r.concept_id for r in proposal.jobs])  # committed first
        if run_id is None:
            return
        recs = [self.ledger.get(c) for c in ids]
        spec = recs[0].spec
        then = self._whole_life(stage, recs)
        run = PackRun(plan=pack_plan(name, stage, recs), storage=spec.storage, runs_path=f"{spec.storage}/runs",
                      scratch=self.scratch, fault=self._fault_for(ids, spec.storage),
                      resume={r.concept_id: r.checkpoint for r in recs
                              if r.checkpoint and r.checkpoint_stage == stage},
                      then=pack_plan(then, 2, recs) if then else None)
        ref = self._ray.launch(run, self.board, spec.resources)
        self.launches[ref] = _Launch(run_id, name, stage, ids, spec.resources.max_attempts, ray_name=name,
                                     then=then, s1_left=set(ids) if then else set())
        for cid in ids:
            self._speed.pop(cid, None)
        self._runs += 1

    def _whole_life(self, stage: int, recs: list[JobRecord]) -> str | None:
        """The stage-2 pack name when a stage-1 pack runs its whole life in one run (its members
        share a stage-2 pack key, rank included, so one bank serves both stages), else None."""
        if not self.whole_life or stage != 1 or len({pack_key(r, 2) for r in recs}) != 1:
            return None
        if recs[0].spec.recipe(1).rank != recs[0].spec.recipe(2).rank:
            return None
        return pack_name(2, recs)

    def _fault_for(self, ids: list[str], storage: str) -> dict | None:
        f = self.fault
        if not f or f["concept_id"] not in ids:
            return None
        name = f"{f['concept_id']}-s{f['stage']}-{f['step']}.fired"
        folder = f"{storage}/work/faults" if "://" not in storage else f"{tempfile.gettempdir()}/purecc-faults"
        return {**f, "marker": f.get("marker") or f"{folder}/{name}"}
