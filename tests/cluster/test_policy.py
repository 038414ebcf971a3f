"""The scheduling policy (cluster.policy) over real ledger rows, no Ray: pack size from the GPU memory
model, per-batch limits, fair share between owners and batches, priorities, free node resources; and the
real scheduling loop over simulated GPUs (bench.scale_sim's runtime) sharing them between two owners."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

from bench.scale_sim import SimRuntime, make_jobs
from cluster import policy
from cluster.ledger import JobLedger
from cluster.scheduler import Scheduler, plan_packs
from cluster.spec import Resources


def test_the_memory_model_fits_the_measured_peaks():
    for stage, points in policy.SD35_MEDIUM_PEAK_GIB.items():
        model = policy.SD35_MEDIUM[stage]
        assert all(abs(model.peak(n) - gib) < 0.1 for n, gib in points), (stage, model)
    s1, s2 = policy.SD35_MEDIUM[1], policy.SD35_MEDIUM[2]
    assert 5.0 < s1.fixed < 5.3 and 2.1 < s1.per_concept < 2.3      # ~5.1 GiB + 2.2 GiB per concept
    assert 5.1 < s2.fixed < 5.4 and 4.3 < s2.per_concept < 4.5      # ~5.3 GiB + 4.4 GiB per concept


def _fits(res: Resources, stages, n: int) -> bool:
    usable = policy.gpu_memory_per_worker(res) * (1 - policy.MEMORY_MARGIN)
    return all(policy.SD35_MEDIUM[s].peak(n) <= usable for s in stages)


@pytest.mark.parametrize("gib, gpus, stages, expected", [
    (141, 1, (1, 2), 8),      # an H200: capped at the largest measured pack
    (24, 1, (2,), 3),         # 21.6 GiB usable: stage 2 of 3 concepts peaks at 18.5, of 4 at 22.9
    (24, 1, (1,), 7),         # stage 1 alone is lighter
    (24, 1, (1, 2), 3),       # a job with both stages left is sized for the heavier one
    (48, 0.5, (1, 2), 3),     # half a 48 GiB GPU is 24 GiB
    (8, 1, (2,), 1),          # not even one fits the margin: one concept per run still
])
def test_pack_size_is_the_largest_pack_that_fits(gib, gpus, stages, expected):
    res = Resources(gpus_per_worker=gpus, gpu_memory_gib=gib)
    n = policy.pack_size(res, stages)
    assert n == expected
    if 1 < n < policy.MAX_MODEL_PACK:
        assert _fits(res, stages, n) and not _fits(res, stages, n + 1)


def test_an_override_wins_and_cpu_or_unknown_memory_gets_the_default():
    assert policy.pack_size(Resources(gpus_per_worker=1, gpu_memory_gib=24, concepts_per_pack=6), (2,)) == 6
    assert policy.pack_size(Resources(), (1, 2)) == policy.DEFAULT_PACK           # CPU: memory negligible
    assert policy.pack_size(Resources(gpus_per_worker=1), (1, 2)) == policy.DEFAULT_PACK   # memory not given


# ----- fair share over ledger rows -------------------------------------------------------------

@pytest.fixture()
def jobs(tmp_path):
    """``make(batch, owner, n, priority=1, per_pack=1, max_concurrent=64, gib=None) -> [JobRecord]``: real
    rows (``gib``: GPUs of that memory and no ``concepts_per_pack``, so the memory model sizes the packs)."""
    ledger = JobLedger(tmp_path / "ledger.sqlite")
    made = [0]

    def make(batch, owner, n, priority=1, per_pack=1, max_concurrent=64, gib=None):
        res = Resources(gpus_per_worker=1, cpus_per_worker=1, concepts_per_pack=None if gib else per_pack,
                        gpu_memory_gib=gib, max_concurrent=max_concurrent, priority=priority)
        specs = [s.model_copy(update={"concept_id": f"{batch}-{i}", "batch": batch, "resources": res})
                 for i, s in enumerate(make_jobs(n, 1, per_pack, n, str(tmp_path / "storage")))]
        ledger.submit(specs, owner=owner)
        made[0] += n
        return [r for r in ledger.jobs() if r.batch == batch]
    yield make
    ledger.close()


def owners(packs) -> Counter:
    return Counter(p.jobs[0].owner for p in packs)


def test_scarce_slots_are_shared_between_owners_then_batches(jobs):
    a1, a2, b = jobs("a1", "alice", 6), jobs("a2", "alice", 6), jobs("b", "bob", 6)
    packs = plan_packs(a1 + a2 + b, free=4)
    assert owners(packs) == {"alice": 2, "bob": 2}                 # owners first: alice's two batches share half
    assert Counter(p.jobs[0].batch for p in packs) == {"a1": 1, "a2": 1, "b": 2}
    # with bob's two already running, the next two slots go to alice
    running = [[r] for r in b[:2]]
    assert owners(plan_packs(a1 + a2 + b[2:], free=2, running=running)) == {"alice": 2}


def test_fifo_within_a_batch(jobs):
    a = jobs("a", "alice", 5)
    packs = plan_packs(a, free=5)
    assert [p.jobs[0].concept_id for p in packs] == [r.concept_id for r in a]
    later = [replace(r, state="stage2") if r.concept_id == "a-3" else r for r in a]
    assert plan_packs(later, free=1)[0].jobs[0].concept_id == "a-3"     # stage-2 work first, closer to done


def test_priority_goes_first_and_weights_the_share_without_starving(jobs):
    low, high = jobs("low", "alice", 8), jobs("high", "bob", 8, priority=3)   # high submitted last
    packs = plan_packs(low + high, free=4)
    assert packs[0].jobs[0].batch == "high"
    assert Counter(p.jobs[0].batch for p in packs) == {"high": 3, "low": 1}    # weights 3:1
    # a batch with nothing running takes the next slot even against a heavier one
    assert plan_packs(low + high[3:], free=1, running=[[r] for r in high[:3]])[0].jobs[0].batch == "low"


def test_a_batch_limit_holds_only_that_batch(jobs):
    a, b = jobs("a", "alice", 6, max_concurrent=1), jobs("b", "bob", 6, max_concurrent=64)
    packs = plan_packs(a + b, free=6, limits=policy.batch_limits(a + b))
    assert Counter(p.jobs[0].batch for p in packs) == {"a": 1, "b": 5}
    assert plan_packs(a, free=6, running=[[a[0]]], limits=policy.batch_limits(a)) == []


def test_a_batch_without_a_pack_size_gets_packs_from_the_memory_model(jobs):
    # 24 GiB GPUs, both stages left: 3 concepts per pack (test_pack_size_is_the_largest_pack_that_fits)
    small = jobs("small", "alice", 7, gib=24)
    assert [len(p.jobs) for p in plan_packs(small, 8)] == [3, 3, 1]
    big = jobs("big", "bob", 9, gib=141)                      # an H200: the largest measured pack
    assert [len(p.jobs) for p in plan_packs(big, 8)] == [8, 1]


def test_packs_follow_the_free_node_resources(jobs):
    a = jobs("a", "alice", 6)
    nodes = [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 1.0}]
    assert len(plan_packs(a, free=6, capacity=policy.Capacity(nodes))) == 3
    busy = policy.Capacity(nodes, [a[0].spec.resources, a[1].spec.resources])
    assert len(plan_packs(a[2:], free=6, capacity=busy)) == 1


def test_a_pack_leader_fills_its_pack_from_other_batches_of_the_same_shape(jobs):
    a, b = jobs("a", "alice", 3, per_pack=4), jobs("b", "alice", 3, per_pack=4)
    (first, second) = plan_packs(a + b, free=4)
    assert [r.batch for r in first.jobs] == ["a", "a", "a", "b"] and [r.batch for r in second.jobs] == ["b", "b"]
    shares = policy.Shares.of([first.jobs])
    assert shares.batch["a"] == pytest.approx(0.75) and shares.batch["b"] == pytest.approx(0.25)


# ----- the real scheduling loop over 4 simulated GPUs -----------------------------------------

def _simulate(tmp_path, batches, max_concurrent=None):
    """Submit ``batches`` (batch, owner, n, priority), run the real Scheduler over 4 fake GPUs
    (``max_concurrent``: batch -> its limit, else 4)."""
    with JobLedger(tmp_path / "ledger.sqlite") as led:
        for batch, owner, n, priority in batches:
            res = Resources(gpus_per_worker=1, cpus_per_worker=4, concepts_per_pack=1,
                            max_concurrent=(max_concurrent or {}).get(batch, 4), priority=priority)
            specs = [s.model_copy(update={"concept_id": f"{batch}-{i}", "batch": batch, "resources": res})
                     for i, s in enumerate(make_jobs(n, 4, 1, n, str(tmp_path / "storage")))]
            led.submit(specs, owner=owner)
        sim = SimRuntime(gpus=4, jitter=0.0)
        summary = Scheduler(led, poll_s=60.0, runtime=sim).run()
    return sim, summary


def _owner(run) -> str:
    return run.members[0].split("-")[0]


def test_two_owners_share_four_simulated_gpus_fairly(tmp_path):
    sim, summary = _simulate(tmp_path, [("alice-a", "alice", 8, 1), ("bob-b", "bob", 8, 1)])
    assert set(summary.states.values()) == {"published"}
    t0 = min(r.launched_at for r in sim.runs)
    assert Counter(_owner(r) for r in sim.runs if r.launched_at == t0) == {"alice": 2, "bob": 2}
    # at every launch while both owners still had work to launch, neither held more than half the GPUs
    checked = 0
    for run in sim.runs:
        at = run.launched_at
        live = [r for r in sim.runs if r.launched_at <= at < r.ends_at]
        assert len(live) <= 4
        if {_owner(r) for r in sim.runs if r.launched_at > at} == {"alice", "bob"}:
            assert max(Counter(_owner(r) for r in live).values()) <= 2, at
            checked += 1
    assert checked >= 8


def test_a_priority_batch_goes_first_and_the_other_still_runs(tmp_path):
    sim, summary = _simulate(tmp_path, [("alice-a", "alice", 6, 1), ("bob-vip", "bob", 6, 3)])  # vip submitted last
    assert set(summary.states.values()) == {"published"}            # the low-priority batch was not starved
    t0 = min(r.launched_at for r in sim.runs)
    first = [r for r in sim.runs if r.launched_at == t0]
    assert _owner(first[0]) == "bob"                                # the priority batch's pack is launched first
    assert Counter(_owner(r) for r in first) == {"bob": 3, "alice": 1}   # weights 3:1 over 4 GPUs


def test_a_batch_limit_holds_that_batch_in_the_real_loop_and_the_others_use_the_rest(tmp_path):
    sim, summary = _simulate(tmp_path, [("alice-a", "alice", 6, 1), ("alice-b", "alice", 6, 1)],
                             max_concurrent={"alice-a": 1})
    assert set(summary.states.values()) == {"published"}

    def live(at):
        return [r for r in sim.runs if r.launched_at <= at < r.ends_at]

    peaks = Counter()
    for run in sim.runs:
        for batch, n in Counter(r.members[0].rsplit("-", 1)[0] for r in live(run.launched_at)).items():
            peaks[batch] = max(peaks[batch], n)
    assert peaks["alice-a"] == 1          # its own limit, in the scheduler's loop, not only in plan_packs
    assert peaks["alice-b"] == 3          # the rest of the 4 GPUs: one batch's limit throttles no other
