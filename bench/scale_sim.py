"""Scale by simulation: the real ledger and the driver's real scheduling loop at 10,000 concepts.

    .venv/bin/python bench/scale_sim.py [--concepts 1000] [--gpus 64] [--per-pack 4] [--poll-s 10]
        [--jitter 0.2] [--ledger sqlite|postgres-temp|postgresql://...] [--json OUT]
    # the recorded 10k run (bench/results/scale_sim_10k.json), about 4 minutes here:
    .venv/bin/python bench/scale_sim.py --concepts 10000 --gpus 64 --per-pack 16 --jitter 0 --poll-s 300 \
        --json bench/results/scale_sim_10k.json

The 10k run uses packs of 16 launched in waves (no jitter) and a 300 s simulated poll to keep the tick
count near 40; the time per tick does not depend on those knobs, the number of ticks does.

``--ledger``: ``sqlite`` (default, a fresh file), ``postgres-temp`` (a throw-away PostgreSQL server on
127.0.0.1 started from Debian's binaries by ``tests/pg_server.py``, fsync on, stopped at the end), or a
``postgresql://`` URL of an empty database.

What is real: ``cluster.ledger.JobLedger`` (SQLite or PostgreSQL, fresh), ``cluster.scheduler.Scheduler``
(its whole ``run`` loop: heartbeat, cancellations, drain, reap, resource checks, schedule) and the
progress board (``cluster.board.ProgressBoard``, called in-process). What is simulated is only what
``Scheduler`` asks of Ray, through its ``runtime`` seam: ``SimRuntime`` launches fake runs on a fake
clock. A fake run waits a simulated start-up, then "trains" its pack for ``steps * step_s`` simulated
seconds, pushing the messages a real worker pushes (``cluster.worker.RayShell.push``/``outcome``):
a first ``progress`` row per member, ``progress`` and a pack ``checkpoint`` every ``checkpoint_every``
steps, then one ``outcome`` ``done`` per member, and ends ``{"ok": True}`` like ``run_pack``. Waiting
on runs advances the clock to the next event instead of sleeping, so hours of cluster time pass in
seconds and the wall time measured is the loop's own.

Printed: time per scheduling tick (the loop's real time between two waits on runs: median, p95, max),
status queries at full size (``ledger.jobs()``, a batch's ``batch_jobs``, ``runs()``), simulated vs
wall time, and the exactly-once check from the ledger's own ``runs`` and ``events``: every job was
launched once per stage, each stage ended once (one ``stage2`` and one ``published`` transition), each
stage's run ended ``ok``, and every job is ``published``.

Written here (not a library discrete-event simulator such as SimPy) because the only simulated part is
a priority queue of timed messages behind eight methods; the loop under test must stay the real one.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import itertools
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cluster.board import ProgressBoard  # noqa: E402
from cluster.ledger import JobLedger  # noqa: E402
from cluster.scheduler import Scheduler  # noqa: E402
from cluster.spec import JobSpec, Overrides, Resources, recipe_for  # noqa: E402
from cluster.worker import PackRun, adapter_uri, stage1_root  # noqa: E402
from purecc.pack import PackPlan  # noqa: E402

GPUS_PER_NODE = 8
HANDOVER_POLL_S = 1.0   # a whole-life run asks the board for its handover this often (simulated s)


class InProcess:
    """A plain object called the way the scheduler calls an actor: ``obj.method.remote(*a)`` runs it now."""

    def __init__(self, obj: Any) -> None:
        self._obj = obj

    def __getattr__(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(remote=getattr(self._obj, name))


@dataclass(eq=False)
class SimRun:
    """One fake Ray Train run: its pack, when it ends, and what ``run_pack`` would have returned
    (hashed by identity, as the scheduler keys its launches by run handle)."""

    name: str
    stage: int
    members: tuple[str, ...]
    launched_at: float
    ends_at: float
    result: dict[str, Any] | None = None
    cancelled: bool = False


@dataclass
class SimRuntime:
    """``Scheduler``'s runtime seam over a fake clock: runs are timed message schedules, not processes.

    ``startup_s``: simulated Ray Train start-up per run; ``step_s``: simulated seconds per pack step;
    ``jitter``: up to this fraction longer per run (from its name: repeatable).
    """

    gpus: int
    startup_s: float = 30.0
    step_s: float = 0.5
    jitter: float = 0.2
    now: float = 0.0
    board: ProgressBoard = field(default_factory=ProgressBoard)
    runs: list[SimRun] = field(default_factory=list)
    waits: list[tuple[float, float]] = field(default_factory=list)   # (real time entering, leaving) each wait
    _queue: list[tuple[float, int, Callable[[], None]]] = field(default_factory=list)
    _seq: itertools.count = field(default_factory=itertools.count)

    # ----- the seam ----------------------------------------------------------------------------
    def start_board(self) -> InProcess:
        return InProcess(self.board)

    def launch(self, run: PackRun, board: InProcess, resources: Resources) -> SimRun:
        """A run's messages on the clock: start-up, then its stage; a whole-life run (``run.then``)
        then polls the board for the driver's handover and trains stage 2 of the members handed over,
        with no second start-up, as ``cluster.worker.train_pack`` does."""
        plan = run.plan
        spread = int(hashlib.sha256(plan.name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        step_s = self.step_s * (1 + self.jitter * spread)
        start = self.now + self.startup_s
        sim = SimRun(plan.name, plan.stage, tuple(m.concept_id for m in plan.members), self.now,
                     start + plan.members[0].recipe.steps * step_s)
        self.runs.append(sim)

        def push(kind: str, payload: dict, at: float, stage_plan: PackPlan) -> None:   # as RayShell.push
            board.push.remote(kind, {"run": stage_plan.name, "at": at, **payload})

        def stage(p: PackPlan, begin: float, then: Callable[[float], None]) -> None:
            recipe, members = p.members[0].recipe, tuple(m.concept_id for m in p.members)

            def progress(step: int, at: float) -> None:
                for cid in members:
                    push("progress", {"concept_id": cid, "stage": p.stage, "step": step, "total": recipe.steps,
                                      "loss": 0.1}, at, p)

            def checkpoint(step: int, at: float) -> None:
                progress(step, at)
                uri = f"{run.runs_path}/{plan.name}/checkpoint_s{p.stage}_{step // recipe.checkpoint_every:06d}"
                push("checkpoint", {"uri": uri, "stage": p.stage, "members": [
                    {"concept_id": m.concept_id, "job_key": m.key, "step": step} for m in p.members]}, at, p)

            def finish(at: float) -> None:
                root = stage1_root(run.storage) if p.stage == 1 else run.storage
                for cid in members:
                    push("outcome", {"concept_id": cid, "stage": p.stage, "status": "done",
                                     "output": adapter_uri(root, cid), "step": recipe.steps, "final_loss": 0.1}, at, p)
                then(at)

            self._at(begin, lambda: progress(0, begin), sim)
            for step in range(recipe.checkpoint_every, recipe.steps, recipe.checkpoint_every):
                t = begin + step * step_s
                self._at(t, lambda s=step, t=t: checkpoint(s, t), sim)
            self._at(begin + recipe.steps * step_s, lambda: finish(begin + recipe.steps * step_s), sim)

        def end(at: float) -> None:
            sim.ends_at, sim.result = at, {"ok": True, "error": None, "wall_s": at - sim.launched_at}

        def await_handover(at: float) -> None:
            handed = board.handed_over.remote(plan.name)
            if handed is None:          # the driver has not drained the outcomes yet: poll again
                self._at(at + HANDOVER_POLL_S, lambda: await_handover(at + HANDOVER_POLL_S), sim)
                return
            members = tuple(m for m in run.then.members if m.concept_id in set(handed))
            if not members:
                end(at)
                return
            plan2 = PackPlan(name=run.then.name, stage=2, base_model=run.then.base_model, members=members,
                             validation=run.then.validation)
            stage(plan2, at, end)

        stage(plan, start, await_handover if run.then is not None else end)
        return sim

    def wait(self, refs: list[SimRun], timeout: float) -> list[SimRun]:
        """Advance the clock through the runs' messages until one ends (or ``timeout`` simulated s)."""
        entered = time.perf_counter()
        until = self.now + timeout
        ended: list[SimRun] = []
        while self._queue and self._queue[0][0] <= until:
            at, _, event = heapq.heappop(self._queue)
            self.now = max(self.now, at)
            event()
            ended = [r for r in refs if r.result is not None]
            if ended:
                until = self.now   # the rest of this instant's events, then back to the loop
        if not ended:
            self.now = until
        self.waits.append((entered, time.perf_counter()))
        return ended

    def get(self, ref: Any) -> Any:
        """A run's result; anything else (an in-process board call's value) is already the value."""
        return ref.result if isinstance(ref, SimRun) else ref

    def cancel(self, ref: SimRun) -> None:
        ref.cancelled = True
        ref.result = {"ok": False, "error": "cancelled", "wall_s": self.now - ref.launched_at}

    def kill(self, actor: Any) -> None:
        """An in-process board has no process to stop; it is dropped with the runtime."""

    def nodes(self) -> list[dict[str, float]]:
        full, rest = divmod(self.gpus, GPUS_PER_NODE)
        sizes = [GPUS_PER_NODE] * full + ([rest] if rest else [])
        return [{"CPU": 8.0 * g, "GPU": float(g)} for g in sizes]

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    # ----- the clock ---------------------------------------------------------------------------
    def _at(self, at: float, event: Callable[[], None], sim: SimRun) -> None:
        def fire() -> None:
            if not sim.cancelled:
                event()
        heapq.heappush(self._queue, (at, next(self._seq), fire))


# ----- the workload ------------------------------------------------------------------------------
def make_jobs(concepts: int, gpus: int, per_pack: int, batch_size: int, storage: str) -> list[JobSpec]:
    """``concepts`` jobs of the default recipes in batches of ``batch_size``, one GPU per worker and
    as many runs at once as there are GPUs. Data hashes are synthetic: nothing is ever read."""
    res = Resources(gpus_per_worker=1, cpus_per_worker=4, concepts_per_pack=per_pack, max_concurrent=gpus)
    s1, s2 = recipe_for(Overrides(), 1), recipe_for(Overrides(), 2)
    return [JobSpec(concept_id=f"c{i:05d}", batch=f"batch-{i // batch_size:03d}", trigger="zqx",
                    manifest=f"/data/c{i:05d}/manifest.csv", data_hash=hashlib.sha256(str(i).encode()).hexdigest(),
                    base_model="/models/sd35-medium", base_id="sd35-medium-sim", storage=storage,
                    stage1=s1, stage2=s2, resources=res) for i in range(concepts)]


def timed(fn: Callable[[], Any], repeat: int = 3) -> float:
    """Median seconds of ``repeat`` calls."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def status_queries(ledger: JobLedger, batch: str) -> dict[str, float]:
    """Seconds per status query at the ledger's current size."""
    return {"jobs_s": timed(ledger.jobs), "active_jobs_s": timed(lambda: ledger.jobs(("queued", "stage1", "stage2"))),
            "batch_jobs_s": timed(lambda: ledger.batch_jobs(batch)), "runs_s": timed(ledger.runs)}


def exactly_once(ledger: JobLedger) -> dict[str, Any]:
    """From the ledger's runs and events: launches, stage ends and ok runs per job and stage."""
    launched = Counter((e["concept_id"], e["detail"]["stage"]) for e in ledger.events(kind="launched"))
    ended = Counter((e["concept_id"], kind) for kind in ("stage2", "published") for e in ledger.events(kind=kind))
    ok_runs = Counter((cid, r["stage"]) for r in ledger.runs() if r["outcome"] == "ok" for cid in r["members"])
    states = Counter(j.state for j in ledger.jobs())
    ids = [j.concept_id for j in ledger.jobs()]
    bad = [cid for cid in ids if any(launched[(cid, s)] != 1 or ok_runs[(cid, s)] != 1 for s in (1, 2))
           or ended[(cid, "stage2")] != 1 or ended[(cid, "published")] != 1]
    return {"jobs": len(ids), "states": dict(states), "not_exactly_once": bad[:20], "not_exactly_once_count": len(bad),
            "runs": len(ledger.runs()), "ok": not bad and states == Counter({"published": len(ids)})}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def simulate(concepts: int, gpus: int, *, per_pack: int = 4, batch_size: int = 100, poll_s: float = 10.0,
             workdir: str | Path | None = None, ledger_url: str | None = None, **runtime: float) -> dict[str, Any]:
    """Run the real scheduling loop over a fresh ledger of ``concepts`` jobs (a SQLite file, or the empty
    PostgreSQL database ``ledger_url``); the figures as a dict."""
    with tempfile.TemporaryDirectory(prefix="purecc-scale-", dir=workdir) as tmp:
        storage = f"{tmp}/storage"
        ledger = JobLedger(ledger_url or f"{tmp}/ledger.sqlite")
        try:
            t0 = time.perf_counter()
            ledger.submit(make_jobs(concepts, gpus, per_pack, batch_size, storage))
            submit_s = time.perf_counter() - t0
            queued = status_queries(ledger, "batch-000")
            sim = SimRuntime(gpus=gpus, **runtime)
            t0 = time.perf_counter()
            summary = Scheduler(ledger, poll_s=poll_s, runtime=sim).run()
            wall_s = time.perf_counter() - t0
            ticks = [nxt[0] - cur[1] for cur, nxt in zip(sim.waits, sim.waits[1:])]
            done = status_queries(ledger, "batch-000")
            check = exactly_once(ledger)
        finally:
            ledger.close()
    return {"ledger": "postgresql" if ledger_url else "sqlite", "concepts": concepts, "gpus": gpus, "concepts_per_pack": per_pack, "batch_size": batch_size,
            "runtime": {"startup_s": sim.startup_s, "step_s": sim.step_s, "jitter": sim.jitter},
            "poll_s_simulated": poll_s, "runs_launched": summary.runs_launched, "submit_s": submit_s,
            "ticks": len(ticks), "tick_s": {"median": statistics.median(ticks) if ticks else 0.0,
                                           "p95": percentile(ticks, 0.95), "max": max(ticks, default=0.0),
                                           "total": sum(ticks)},
            "status_queued": queued, "status_done": done, "simulated_s": sim.now, "wall_s": wall_s,
            "gpu_busy": sum(r.ends_at - r.launched_at for r in sim.runs) / (gpus * sim.now) if sim.now else 0.0,
            "exactly_once": check}


def report(r: dict[str, Any]) -> str:
    t, q, d = r["tick_s"], r["status_queued"], r["status_done"]
    ms = lambda s: f"{s * 1000:.1f} ms"  # noqa: E731
    return "\n".join([
        f"scale simulation ({r.get('ledger', 'sqlite')} ledger): {r['concepts']} concepts, {r['gpus']} simulated GPUs, packs of {r['concepts_per_pack']}, "
        f"{r['runs_launched']} runs",
        f"submit: {r['submit_s']:.2f} s",
        f"scheduling tick ({r['ticks']} ticks): median {ms(t['median'])}, p95 {ms(t['p95'])}, max {ms(t['max'])}",
        f"status at {r['concepts']} jobs (queued -> all published): jobs() {ms(q['jobs_s'])} -> {ms(d['jobs_s'])}, "
        f"batch_jobs(100) {ms(q['batch_jobs_s'])} -> {ms(d['batch_jobs_s'])}, runs() {ms(q['runs_s'])} -> {ms(d['runs_s'])}",
        f"simulated {r['simulated_s'] / 3600:.2f} h of cluster time in {r['wall_s']:.1f} s wall "
        f"({r['simulated_s'] / max(r['wall_s'], 1e-9):.0f}x); GPUs busy {r['gpu_busy'] * 100:.0f}%",
        f"exactly once: {'yes' if r['exactly_once']['ok'] else 'NO'} ({r['exactly_once']['states']}, "
        f"{r['exactly_once']['not_exactly_once_count']} jobs off)"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concepts", type=int, default=1000)
    ap.add_argument("--gpus", type=int, default=64)
    ap.add_argument("--per-pack", type=int, default=4, help="concepts per pack")
    ap.add_argument("--poll-s", type=float, default=10.0, help="the loop's poll interval, simulated seconds")
    ap.add_argument("--jitter", type=float, default=0.2, help="runs up to this fraction longer (0: packs "
                    "launched together end together, fewer ticks)")
    ap.add_argument("--ledger", default="sqlite", help="sqlite (a fresh file), postgres-temp (a throw-away "
                    "local PostgreSQL server) or a postgresql:// URL of an empty database")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)
    if args.ledger not in ("sqlite", "postgres-temp") and not args.ledger.startswith(("postgresql://", "postgres://")):
        ap.error(f"--ledger: {args.ledger!r} is not sqlite, postgres-temp or a postgresql:// URL")
    run = lambda url: simulate(args.concepts, args.gpus, per_pack=args.per_pack, poll_s=args.poll_s,  # noqa: E731
                               jitter=args.jitter, ledger_url=url)
    if args.ledger == "postgres-temp":
        from tests.pg_server import PgServer, find_pg_bin

        bin_dir = find_pg_bin()
        if bin_dir is None:
            ap.error("--ledger postgres-temp: PostgreSQL is not installed (Debian's `postgresql` package)")
        with PgServer(bin_dir, fsync=True) as server:
            result = run(server.new_database())
    else:
        result = run(None if args.ledger == "sqlite" else args.ledger)
    print(report(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["exactly_once"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
