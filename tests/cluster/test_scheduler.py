"""The scheduler's decisions as pure functions over ledger rows (no Ray): grouping into packs,
concurrency limits, and the typed pack plan a worker receives."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from cluster.ledger import JobLedger
from cluster.scheduler import concurrency_limit, job_key, pack_name, pack_plan, plan_packs
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
