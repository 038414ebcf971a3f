"""The scheduler's decisions as pure functions over ledger rows (no Ray): grouping into packs,
concurrency limits, and the typed pack plan a worker receives."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest

from cluster.ledger import JobLedger
from cluster.scheduler import Scheduler, concurrency_limit, job_key, pack_name, pack_plan, plan_packs
from cluster.spec import load_batch
from purecc.pack import PackPlan

IDS = ["checkered-star", "striped-circle", "dotted-diamond"]


@pytest.fixture()
def rows(tmp_path, batch_files):
    """``make(concepts_per_pack, max_concurrent, overrides) -> [JobRecord]`` from a real ledger file."""
    made = []

    def make(concepts_per_pack=2, max_concurrent=2, overrides=None, ids=IDS):
        made.append(None)
        path = batch_files(f"batch-{len(made)}.yaml", ids=ids,
                           resources={"cpus_per_worker": 1, "concepts_per_pack": concepts_per_pack,
                                      "max_concurrent": max_concurrent})
        spec = load_batch(path)
        if overrides:
            concepts = [c.model_copy(update={"overrides": c.overrides.model_validate(overrides[c.id])})
                        if c.id in overrides else c for c in spec.concepts]
            spec = spec.model_copy(update={"concepts": concepts})
        with JobLedger(tmp_path / f"ledger-{len(made)}.sqlite") as led:
            led.submit(spec.jobs())
            return led.jobs()
    return make


def test_jobs_are_grouped_into_packs_of_the_batch_size(rows):
    jobs = rows(concepts_per_pack=2)
    packs = plan_packs(jobs, free=10)
    assert [[r.concept_id for r in p.jobs] for p in packs] == [IDS[:2], IDS[2:]]
    assert all(p.stage == 1 for p in packs)
    assert packs[0].name == pack_name(1, list(packs[0].jobs)) and packs[0].name.startswith("s1-checkered-star-2-")


def test_free_run_slots_bound_the_packs(rows):
    jobs = rows(concepts_per_pack=1)
    assert [len(plan_packs(jobs, free=n)) for n in (0, 1, 2, 5)] == [0, 1, 2, 3]
    assert plan_packs([], free=4) == []


def test_jobs_with_another_recipe_shape_get_their_own_pack(rows):
    jobs = rows(concepts_per_pack=4, overrides={"striped-circle": {"resolution": 128}})
    packs = plan_packs(jobs, free=10)
    assert sorted(sorted(r.concept_id for r in p.jobs) for p in packs) == [["checkered-star", "dotted-diamond"],
                                                                          ["striped-circle"]]


def test_stage_two_packs_launch_first_and_interrupted_packs_keep_their_name(rows):
    jobs = rows(concepts_per_pack=4)
    in_stage2 = [replace(r, state="stage2") if r.concept_id == "dotted-diamond" else r for r in jobs]
    packs = plan_packs(in_stage2, free=1)
    assert [(p.stage, [r.concept_id for r in p.jobs]) for p in packs] == [(2, ["dotted-diamond"])]
    sticky = [replace(r, state="stage1", pack="s1-old-run") if r.concept_id != "dotted-diamond" else r for r in jobs]
    packs = plan_packs(sticky, free=10)
    assert packs[0].name == "s1-old-run" and [r.concept_id for r in packs[0].jobs] == IDS[:2]


def test_each_batch_has_its_own_concurrency_limit_unless_overridden(rows):
    loose = [replace(r, batch="loose") for r in rows(max_concurrent=5)]
    tight = [replace(r, batch="tight", concept_id=f"{r.concept_id}-t") for r in rows(max_concurrent=2)]
    assert concurrency_limit(loose + tight) == {"loose": 5, "tight": 2}   # the tight one does not throttle the other
    assert concurrency_limit(loose + tight, override=7) == {}
    assert concurrency_limit([]) == {}
    # plan_packs honours the limits: the tight batch stops at 2 runs, the loose one goes on
    packs = plan_packs(loose + tight, free=10, limits={"loose": 5, "tight": 1})
    assert sorted(p.jobs[0].batch for p in packs) == ["loose", "loose", "tight"]


def test_pack_plan_carries_each_jobs_stage_recipe_and_round_trips(rows):
    jobs = rows(concepts_per_pack=2, overrides={"checkered-star": {"stage2": {"steps": 3}, "seed": 9}})
    (first, *_) = plan_packs(jobs, free=1)
    plan = pack_plan(first.name, 2, first.jobs)
    z = plan.member("checkered-star")
    assert z.recipe.stage == 2 and z.recipe.steps == 3 and z.seed == 9 and z.key == job_key(first.jobs[0])
    assert z.data_hash == first.jobs[0].spec.data_hash and z.provenance["batch"] == "tiny"
    assert plan.validation.steps == 2 and plan.base_model == first.jobs[0].spec.base_model
    assert PackPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def _progress(cid: str, stage: int, step: int, total: int, at: float) -> dict:
    """A worker's progress message as the board hands it to the driver (``at``: the worker's clock)."""
    return {"kind": "progress", "concept_id": cid, "stage": stage, "step": step, "total": total, "at": at,
            "run": "s1-run", "loss": 0.5}


def test_eta_is_the_remaining_steps_at_the_rate_seen_since_the_first_report(tmp_path):
    """``Scheduler._with_eta``, fed reports with a fake clock: None until a step was seen advancing, then
    (total - step) / (steps since the first report / seconds since it), the first report being the newest
    at its step; each concept and each stage on its own rate, and a report back at (or before) the first
    step starts the rate afresh (a worker restarted from a checkpoint: the next test)."""
    with JobLedger(tmp_path / "ledger.sqlite") as led:
        sched = Scheduler(led)
        eta = lambda *a: sched._with_eta(_progress(*a))["eta_s"]     # noqa: E731
        assert eta("a", 1, 0, 100, 1000.0) is None                  # one report: no rate yet
        assert eta("a", 1, 0, 100, 1005.0) is None                  # no step since (still loading): the
        assert eta("a", 1, 10, 100, 1020.0) == pytest.approx(90 * 15 / 10)           # rate starts at 1005
        assert eta("a", 1, 30, 100, 1040.0) == pytest.approx(70 * 35 / 30)           # 30 steps in 35 s
        assert eta("a", 1, 100, 100, 1100.0) == 0                  # the last step: nothing left
        assert eta("b", 1, 50, 100, 1100.0) is None                 # another concept: its own first report
        assert eta("b", 1, 60, 100, 1102.0) == pytest.approx(40 * 2 / 10)
        assert eta("a", 2, 0, 8, 1200.0) is None                    # stage 2: a new rate, not stage 1's
        assert eta("a", 2, 4, 8, 1210.0) == pytest.approx(4 * 10 / 4)
        assert eta("a", 2, 0, 8, 1300.0) is None                    # the stage relaunched from step 0: afresh
        assert eta("a", 2, 4, 8, 1302.0) == pytest.approx(4 * 2 / 4)                 # 2 step/s, not 4 / 100 s
        msg = _progress("a", 2, 7, 8, 1302.5)
        out = sched._with_eta(msg)
        assert out == {**msg, "eta_s": pytest.approx(1 * 2.5 / 7)} and "eta_s" not in msg   # the message kept


class _Board:
    """The board as the driver drains it: the messages pushed since the last drain."""

    def __init__(self) -> None:
        self.pending: list[dict] = []

    def drain(self) -> list[dict]:
        out, self.pending = self.pending, []
        return out


class _InProcess:
    """An actor handle stand-in: ``handle.method.remote(*a)`` calls the method now (as bench/scale_sim.py)."""

    def __init__(self, obj) -> None:
        self._obj = obj

    def __getattr__(self, name: str):
        return SimpleNamespace(remote=getattr(self._obj, name))


class _Runtime:
    """``RayRuntime.get`` of values the in-process board already returned."""

    def get(self, value):
        return value


def test_drained_progress_puts_the_eta_in_the_ledger_and_a_resume_restarts_it(rows, tmp_path):
    """The path to the status table: progress drained from the board is stored with its ``eta_s`` on the
    job's row; a ``resumed`` event drops the rate (the restarted run's first report has no ETA)."""
    jobs = rows(concepts_per_pack=1, ids=IDS[:1])
    with JobLedger(tmp_path / "ledger-1.sqlite") as led:
        sched = Scheduler(led)
        board = _Board()
        sched._ray, sched.board = _Runtime(), _InProcess(board)
        run_id, launched = led.launch("s1-run", 1, [jobs[0].concept_id])
        assert launched == [IDS[0]]

        def drain(*msgs) -> float | None:
            board.pending = list(msgs)
            sched._drain()
            return led.get(IDS[0]).eta_s

        assert drain(_progress(IDS[0], 1, 0, 100, 500.0)) is None
        assert drain(_progress(IDS[0], 1, 20, 100, 540.0)) == pytest.approx(80 * 40 / 20)    # 160 s
        rec = led.get(IDS[0])
        assert (rec.step, rec.total, rec.progress_at) == (20, 100, 540.0)
        # the worker was restarted from its step-20 checkpoint: the time lost restarting is no rate
        resumed = {"kind": "event", "concept_id": IDS[0], "event": "resumed", "detail": {"stage": 1, "step": 20},
                   "at": 900.0, "run": "s1-run"}
        assert drain(resumed, _progress(IDS[0], 1, 20, 100, 900.0)) is None
        assert drain(_progress(IDS[0], 1, 30, 100, 905.0)) == pytest.approx(70 * 5 / 10)      # 35 s, not ~1000
