"""Concept-affinity ranking, on stand-in replicas (no Ray cluster)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from purecc.generate import RenderSettings
from services.deployment import ConceptUse, RenderTask
from services.routing import ConceptAffinityRouter, affinity_ranks, requested_concepts


def replica(name: str, *concepts: str):
    return SimpleNamespace(name=name, routing_stats={"concepts": list(concepts)})


def pending(*concepts: str):
    job = RenderTask("p", (0,), RenderSettings(), tuple(ConceptUse(c, 1.0) for c in concepts))
    return SimpleNamespace(args=[job], kwargs={}, routing_context=SimpleNamespace(should_backoff=False))


def names(ranks):
    return [[r.name for r in rank] for rank in ranks]


def test_ranks_by_overlap_with_the_requested_concepts():
    reps = [replica("r0"), replica("r1", "a"), replica("r2", "a", "c"), replica("r3", "b", "c", "d")]
    assert names(affinity_ranks({"a", "c"}, reps)) == [["r2"], ["r1", "r3"], ["r0"]]
    assert names(affinity_ranks({"b", "d"}, reps)) == [["r3"], ["r0", "r1", "r2"]]
    assert names(affinity_ranks(set(), reps)) == [["r0", "r1", "r2", "r3"]]
    assert names(affinity_ranks({"a"}, [SimpleNamespace(name="new", routing_stats={})])) == [["new"]]


def test_requested_concepts_reads_the_render_job():
    assert requested_concepts(pending("a", "b")) == {"a", "b"}
    assert requested_concepts(SimpleNamespace(args=[], kwargs={})) == frozenset()
    assert requested_concepts(None) == frozenset()


def test_router_prefers_the_replica_holding_the_concepts():
    router = object.__new__(ConceptAffinityRouter)     # choose_replicas needs none of the router's state
    reps = [replica("r0"), replica("r1", "b"), replica("r2", "a", "b")]
    request = pending("a", "b")
    ranks = asyncio.run(router.choose_replicas(reps, request))
    assert names(ranks)[0] == ["r2"] and names(ranks)[1] == ["r1"]
    assert request.routing_context.should_backoff
    assert len(asyncio.run(router.choose_replicas(reps, pending()))[0]) == 2
