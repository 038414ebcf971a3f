"""Replica metrics reach the node's Prometheus endpoint: a real Ray node, a real generator, an HTTP scrape.

The generator runs as a Serve deployment, renders requests that hot-load
adapters from the registry and from the host cache, and the test reads the node's metrics agent over
HTTP on 127.0.0.1 until the purecc series arrive with the counts those requests imply.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import urllib.request

import pytest

from purecc.generate import RenderSettings
from purecc.registry import AdapterRegistry
from service_helpers import free_port
from services.deployment import ConceptUse, RenderTask

SETTINGS = RenderSettings(steps=2, guidance=2.0, width=64, height=64)
SAMPLE = re.compile(r"^(ray_purecc_\w+)(?:\{([^}]*)\})? ([0-9.e+-]+)$")


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """(metric name, its labels minus Ray's own) -> value, for the ray_purecc_ series."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    out = {}
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m:
            labels = frozenset(kv for kv in re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")
                               if kv[0] in ("source", "result", "status", "le"))
            out[(m.group(1), labels)] = float(m.group(3))
    return out


def value(samples, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def metrics_node():
    """A one-node Ray on 127.0.0.1 with its metrics agent on a known port, reporting every 0.5 s.

    Started through ``ray.cluster_utils.Cluster`` rather than ``ray.init``: only node arguments can
    move the dashboard agent off its fixed default port (52365), which another Ray on this machine
    may hold (its agent then fails and the node never comes up).
    """
    from cluster import local_ray

    local_ray.loopback_env()
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    local_ray._keep_local_node_ip()
    port = free_port()
    os.makedirs("/tmp/ray", exist_ok=True)     # Cluster writes the head's address there, whatever temp_dir
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "node_ip_address": "127.0.0.1", "include_dashboard": False,
        "metrics_export_port": port, "dashboard_agent_listen_port": free_port(),
        "temp_dir": f"/tmp/pcmet-{os.getpid()}", "_system_config": {
                                                   "agent_register_timeout_ms": 180_000}})
    try:
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": dict(local_ray.LOOPBACK_ENV)})
        yield ray, port
    finally:
        from ray import serve

        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(f"/tmp/pcmet-{os.getpid()}", ignore_errors=True)


@pytest.mark.service
def test_replica_metrics_are_scraped_from_the_node(metrics_node, tiny_model_dir, adapter_factory, tmp_path):
    ray, port = metrics_node
    from services.config import ServiceConfig
    from services.deployment import ConceptGenerator

    registry = AdapterRegistry(tmp_path / "registry")
    for i, cid in enumerate(("a", "b", "c")):
        adapter_factory.publish(registry, cid, seed=40 + i)
    config = ServiceConfig(model=str(tiny_model_dir), registry=str(tmp_path / "registry"), slots=2,
                           host_cache=8, warmup=False, batch_wait_s=0.0, device="cpu")

    from ray import serve

    def task(*ids: str, seeds=(1,)) -> RenderTask:
        return RenderTask("a photo", tuple(seeds), SETTINGS, tuple(ConceptUse(c, 1.0) for c in ids))

    def render(t: RenderTask):
        try:
            return handle.render.remote(t).result(timeout_s=120).hot_loaded
        except Exception as exc:       # Serve wraps the replica's error
            return "UnknownConcept" if "UnknownConcept" in repr(exc) else repr(exc)[:300]

    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    app = serve.deployment(ConceptGenerator, name="generator", ray_actor_options={"num_cpus": 0.5}).bind(config)
    handle = serve.run(app, name="metrics", route_prefix=None)
    # a, b: storage loads (host misses); a again: a slot hit; c evicts the LRU slot (b);
    # b again: back from the host cache; an unknown concept: one request answered with an error
    rounds = [task("a", "b", seeds=(1, 2)), task("a"), task("a", "c"), task("b"), task("zz-unknown")]
    outcomes = [render(t) for t in rounds]
    assert outcomes == [("a", "b"), (), ("c",), ("b",), "UnknownConcept"], outcomes

    expected = {
        ("ray_purecc_generator_requests_total", "status", "ok"): 4,
        ("ray_purecc_generator_requests_total", "status", "error"): 1,
        ("ray_purecc_generator_images_total", "status", "ok"): 5,
        ("ray_purecc_slot_lookups_total", "result", "hit"): 2,     # a (round 2), a (round 3)
        ("ray_purecc_slot_lookups_total", "result", "miss"): 5,    # a, b, c, b, zz-unknown
        ("ray_purecc_host_cache_lookups_total", "result", "hit"): 1,
        ("ray_purecc_host_cache_lookups_total", "result", "miss"): 3,
        ("ray_purecc_adapter_load_seconds_count", "source", "storage"): 3,
        ("ray_purecc_adapter_load_seconds_count", "source", "host_cache"): 1,
    }
    deadline, samples = time.monotonic() + 90, {}
    while time.monotonic() < deadline:
        samples = scrape(port)
        got = {k: value(samples, k[0], **{k[1]: k[2]}) for k in expected}
        if got == expected and value(samples, "ray_purecc_denoise_seconds_count") == 4:
            break
        time.sleep(0.5)
    got = {k: value(samples, k[0], **{k[1]: k[2]}) for k in expected}
    assert got == expected, sorted(samples.items())
    assert value(samples, "ray_purecc_denoise_seconds_count") == 4       # one pass per round that rendered
    assert 0 < value(samples, "ray_purecc_denoise_seconds_sum") < 120
    # passes of 2, 1, 1, 1 images (the exported _sum is not reliable in Ray 2.60: read the buckets)
    assert value(samples, "ray_purecc_pass_images_bucket", le="1.0") == 3
    assert value(samples, "ray_purecc_pass_images_bucket", le="2.0") == 4
    load_sum = value(samples, "ray_purecc_adapter_load_seconds_sum", source="storage")
    assert 0 < load_sum < 60
    raw = [line for line in _raw(port) if line.startswith("ray_purecc_generator_requests_total")]
    assert raw and all('deployment="generator"' in line and 'replica="' in line for line in raw), raw
    # no series carries a concept id: the tags are the bounded ones only
    assert not any(cid in line for line in _raw(port) if line.startswith("ray_purecc_") for cid in ('"a"', '"b"'))

    # the agent listens on the node's address only: 127.0.0.1, not every interface
    listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True)
    addresses = {line.split()[3] for line in listening.stdout.splitlines() if line.strip()}
    assert addresses == {f"127.0.0.1:{port}"}, addresses


def _raw(port: int) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return reply.read().decode().splitlines()
