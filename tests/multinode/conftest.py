"""A real multi-node Ray cluster on 127.0.0.1 (``ray.cluster_utils.Cluster``): a zero-CPU head (the
driver's node) and worker nodes of one CPU each, told apart by a custom resource (``node_a``,
``node_b``). Storage shared by all nodes is a local temp folder. Everything is stopped after the module,
also on failure."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from dataclasses import dataclass, field

import pytest

from cluster.local_ray import loopback_env, loopback_node_args

loopback_env()   # before any test module imports ray
sys.path.insert(0, str(Path(__file__).parent.parent / "cluster"))   # cluster_helpers (batch files)
sys.path.insert(0, str(Path(__file__).parent.parent / "services"))  # service_helpers

from service_helpers import AdapterFactory, free_port  # noqa: E402


@dataclass
class Nodes:
    """The started cluster and its worker nodes by name (``node_a`` -> Ray's Node object)."""

    cluster: object
    temp: str
    workers: dict = field(default_factory=dict)

    def node_id(self, name: str) -> str:
        return self.workers[name].node_id

    def name_of(self, node_id: str) -> str | None:
        return next((n for n, node in self.workers.items() if node.node_id == node_id), None)

    def remove(self, name: str) -> None:
        """Kill the node's raylet and every process of it at once (no graceful shutdown)."""
        self.cluster.remove_node(self.workers.pop(name), allow_graceful=False)


@pytest.fixture(scope="module")
def nodes():
    """Head (0 CPUs) + ``node_a`` and ``node_b`` (1 CPU each), the driver connected to the head."""
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="pcmn-", dir="/tmp")
    (Path(temp) / "ray").mkdir()
    port = free_port()
    env = pytest.MonkeyPatch()      # undone at the end, whatever happened
    # Ray's address file and every node's session under temp, never the shared /tmp/ray; a process of
    # the cluster that looks for "auto" finds this cluster, not another Ray on the machine (Ray Train's
    # placement-group cleaner does); a call after ray.shutdown() never starts or joins a cluster
    for key, value in (("RAY_TMPDIR", temp), ("RAY_ADDRESS", f"127.0.0.1:{port}"), ("RAY_ENABLE_AUTO_CONNECT", "0")):
        env.setenv(key, value)
    import ray

    cluster = None
    try:
        cluster = Cluster(initialize_head=True, shutdown_at_exit=True, head_node_args=loopback_node_args(
            0, {"head": 1}, temp_dir=f"{temp}/ray", gcs_server_port=port))
        found = Nodes(cluster, temp)
        for name in ("node_a", "node_b"):
            found.workers[name] = cluster.add_node(**loopback_node_args(1, {name: 1}))
        cluster.wait_for_nodes(timeout=60)
        ray.init(address=cluster.address, log_to_driver=False)
        yield found
    finally:
        try:
            from ray import serve

            serve.shutdown()
        except Exception:  # noqa: BLE001 -- Serve may never have started
            pass
        ray.shutdown()
        if cluster is not None:
            try:
                cluster.shutdown()
            except ValueError:   # a driver thread of a failed test still held the head: Ray disconnected it now
                cluster.shutdown()
        env.undo()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def adapter_factory(tiny_model_dir, tmp_path_factory) -> AdapterFactory:
    return AdapterFactory(tiny_model_dir, tmp_path_factory.mktemp("adapter-staging"))
