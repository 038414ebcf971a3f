"""The multi-node test cluster itself: three nodes on one machine, every process of it on 127.0.0.1 only."""

from __future__ import annotations

import pytest

from multinode_helpers import cluster_pids, listening_addresses

pytestmark = pytest.mark.multinode


def test_every_node_binds_loopback_only(nodes):
    import ray

    alive = [n for n in ray.nodes() if n["Alive"]]
    assert len(alive) == 3 and {n["NodeManagerAddress"] for n in alive} == {"127.0.0.1"}, alive
    assert {k for n in alive for k in n["Resources"] if k.startswith("node_")} == {"node_a", "node_b"}
    pids = cluster_pids(nodes.temp)
    assert len(pids) >= 3, pids       # at least the three raylets
    addresses = listening_addresses(pids)
    assert addresses == {"127.0.0.1"}, addresses
