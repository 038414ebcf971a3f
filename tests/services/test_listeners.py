"""Loopback means loopback: every TCP listener of a local service's process tree is on 127.0.0.1.

The service is started as ``purecc serve`` starts it (``cluster.local_ray.start_local_ray`` with
the limits' proxy environment, ``serve.start`` on 127.0.0.1, ``services.app.build_app``); then every
process under this one (GCS, raylet and its object manager, dashboard head and agent, metrics
export, runtime-env agent, the Serve controller, HTTP proxy and replicas, idle workers) is listed
with its listening sockets (psutil, which reads /proc/<pid>/net/tcp{,6} and /proc/<pid>/fd).
Ray is imported before the cluster starts (as when pytest collects every module first), which
``start_local_ray`` must not let turn 127.0.0.1 into the machine's address.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import psutil
import pytest
import requests

from services.app import build_app        # imports ray before the loopback settings, as a full test run does
from services.limits import LimitSettings, proxy_environment

pytestmark = [pytest.mark.ray, pytest.mark.service]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_loopback_ip(ip: str) -> bool:
    """127.0.0.0/8, ::1, or 127.x mapped into IPv6 (``::ffff:127.0.0.1``: reachable from loopback only)."""
    return ip.startswith("127.") or ip == "::1" or ip.startswith("::ffff:127.")


def listeners() -> list[tuple[int, str, str, int]]:
    """(pid, process name, ip, port) of every listening TCP socket of this process and those under it."""
    found = []
    for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            name = proc.name()
            conns = proc.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue                      # an idle worker that exited meanwhile
        found += [(proc.pid, name, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return found


@pytest.fixture(scope="module")
def service(tiny_model_dir, tmp_path_factory):
    from cluster.local_ray import start_local_ray
    from services.config import ServiceConfig

    work = tmp_path_factory.mktemp("listeners")
    (work / "registry").mkdir()
    temp_dir = Path(f"/tmp/pclis-{os.getpid()}")
    env = proxy_environment(LimitSettings())
    saved = {k: os.environ.get(k) for k in env}
    ray = start_local_ray(2, temp_dir=temp_dir, env=env)
    from ray import serve

    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(ServiceConfig(model=str(tiny_model_dir), registry=str(work / "registry"),
                                          cpus_per_replica=0.5, warmup=False)), name="purecc", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        assert requests.get(url + "/healthz", timeout=60).status_code == 200
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_every_listener_is_on_loopback(service):
    found = listeners()
    for pid, name, ip, port in sorted(found, key=lambda f: f[1]):
        print(f"{pid:>7} {name:<32} {ip}:{port}")
    names = {name for _, name, _, _ in found}
    # the listing is not vacuous: Ray's core, Serve's parts and both deployments' replicas are in it
    assert {"gcs_server", "raylet", "ray::ProxyActor", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names, names
    assert any(n.startswith("ray::ServeController") for n in names), names
    assert any(n.startswith("ray::ServeReplica:purecc:GenerationAPI") for n in names), names
    assert any(n.startswith("ray::ServeReplica:purecc:ConceptGenerator") for n in names), names
    assert service in {port for *_, port in found}, "the HTTP proxy's port"
    exposed = [(name, ip, port) for _, name, ip, port in found if not is_loopback_ip(ip)]
    assert not exposed, f"listeners beyond 127.0.0.1: {exposed}"
