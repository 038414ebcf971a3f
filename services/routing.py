"""Concept-affinity request routing: send a request to a replica that already holds its concepts.

Mechanism: a custom Serve ``RequestRouter`` (Ray >= 2.46, alpha API) on the generator deployment.
Each generator replica reports the concepts resident in its slots through
``record_routing_stats`` (polled every ``routing_stats_period_s``); the router ranks replicas by
how many of the request's concepts they hold and lets Serve pick the least-loaded replica of the
best rank that has room (``max_ongoing_requests``), falling back rank by rank.

Why not Serve model multiplexing with an id derived from the concept set: multiplexing keys
affinity and eviction on one opaque id per request, while our residency is per concept and
requests compose overlapping sets. A request for {a, c} should prefer the replica holding a and
c even if no request ever named that exact set; with set ids it would look cold everywhere, and
each set id would be "loaded" and LRU-evicted by Serve independently of the slots, so Serve's view
and the slots' contents drift apart (and a multiplexed unload hook would fight the slot LRU, which
must never evict a slot an in-flight request uses). Ranking by per-concept overlap keeps one
source of truth: the slots.

Load balance: a replica stops being eligible when its queue is full, so a hot concept spills to
other replicas, which then load it too and become eligible for it on the next stats poll.
Stats are up to one period stale; a wrong guess costs one hot-load, never a wrong image.
"""

from __future__ import annotations

import random
from typing import Iterable, List, Optional, Sequence

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

PER_RANK = 2     # replicas probed per rank (power of two choices within a rank)


def requested_concepts(pending_request: Optional[PendingRequest]) -> frozenset[str]:
    """The concept ids of a ``ConceptGenerator.render(task)`` call; empty for other calls."""
    if pending_request is None:
        return frozenset()
    for arg in [*pending_request.args, *pending_request.kwargs.values()]:
        ids = getattr(arg, "concept_ids", None)
        if ids is not None:
            return frozenset(ids)
    return frozenset()


def resident_concepts(replica) -> frozenset[str]:
    """The concepts a replica last reported as resident in its slots."""
    stats = getattr(replica, "routing_stats", None) or {}
    return frozenset(stats.get("concepts", ()))


def affinity_ranks(concepts: Iterable[str], replicas: Sequence) -> list[list]:
    """Replicas grouped by how many of ``concepts`` they hold, most first (input order within a group)."""
    wanted = frozenset(concepts)
    groups: dict[int, list] = {}
    for r in replicas:
        groups.setdefault(len(wanted & resident_concepts(r)), []).append(r)
    return [groups[score] for score in sorted(groups, reverse=True)]


class ConceptAffinityRouter(RequestRouter):
    """Ranks replicas by concept overlap; within a rank, two random replicas, least queued wins."""

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        """Ranks of at most ``PER_RANK`` candidates each, best concept overlap first."""
        if pending_request is not None:
            # every rank is returned at once: back off before the next round instead of spinning
            pending_request.routing_context.should_backoff = True
        candidates = list(candidate_replicas)
        random.shuffle(candidates)
        concepts = requested_concepts(pending_request)
        if not concepts:
            return [candidates[:PER_RANK]]
        return [rank[:PER_RANK] for rank in affinity_ranks(concepts, candidates)]
