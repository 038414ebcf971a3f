"""Start (or join) a Ray cluster that listens on 127.0.0.1 only.

Settings found by measurement on a CPU machine: without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
Ray picks the machine's external address as node IP; Train V2 blocks every ``ray.train.report`` until
the controller polls (2 s by default), so the poll interval is lowered.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "1",
}


def loopback_env(extra: Mapping[str, str] | None = None) -> None:
    """Export the loopback settings (kept where already set) and ``extra`` (always), before
    ``import ray`` starts any process."""
    for key, value in LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.update(extra or {})


def is_loopback(address: str) -> bool:
    """True for ``127.x.x.x:port``, ``localhost:port`` (optionally ``ray://``-prefixed)."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host == "localhost" or host == "::1" or host.startswith("127.")


def _keep_local_node_ip() -> None:
    """Keep ``_node_ip_address="127.0.0.1"`` even when ``ray`` was imported before ``loopback_env``.

    Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, at import (``ray/_private/ray_constants.py``,
    ``ENABLE_RAY_CLUSTER``); with it on, ``ray.init`` turns 127.0.0.1 into the machine's external
    address (``ray/_private/services.py``, ``resolve_ip_for_localhost`` -> ``get_node_ip_address``)
    and every Ray process then listens on all interfaces. A module imported early (anything that
    imports ``ray`` or ``services.app``) would silently open the cluster; this makes the import
    order irrelevant for a local cluster. The processes Ray starts read the exported variable.
    """
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def start_local_ray(num_cpus: int | None = None, *, temp_dir: str | Path | None = None,
                    address: str | None = None, quiet: bool = True, env: Mapping[str, str] | None = None):
    """``ray.init`` for a laptop/CI run (no dashboard, 127.0.0.1), or join ``address`` on a cluster.

    The loopback environment is exported for a local cluster or a loopback ``address`` only, and
    must be in place before Ray is first imported (Ray reads it at import): import ``ray`` after
    this call, or call ``loopback_env()`` first. ``env``: more variables for every process of a local
    cluster (e.g. ``services.limits.proxy_environment``); only a cluster this call starts gets them.

    Returns the ``ray`` module. Idempotent: an already-initialised Ray is reused.
    """
    if not address or is_loopback(address):
        loopback_env(env)   # not when joining a remote head: the driver must keep its real node IP
    import ray

    if ray.is_initialized():
        return ray
    if address:
        ray.init(address=address, log_to_driver=not quiet)
        return ray
    _keep_local_node_ip()
    kwargs = {"num_cpus": num_cpus or os.cpu_count(), "include_dashboard": False,
              "_node_ip_address": "127.0.0.1", "log_to_driver": not quiet,
              "runtime_env": {"env_vars": {**LOOPBACK_ENV, **(env or {})}}}
    if temp_dir is not None:
        Path(temp_dir).mkdir(parents=True, exist_ok=True)
        kwargs["_temp_dir"] = str(Path(temp_dir).resolve())
    ray.init(**kwargs)
    return ray


def loopback_node_args(num_cpus: float, resources: Mapping[str, float] | None = None, **extra) -> dict:
    """Arguments for one node of ``ray.cluster_utils.Cluster`` on 127.0.0.1 (tests: several nodes on one
    machine). Every process of the node binds 127.0.0.1: the loopback environment is exported here (the
    node's processes inherit it) and Ray's cluster switch is turned off, as for ``start_local_ray``."""
    loopback_env()
    _keep_local_node_ip()
    return {"num_cpus": num_cpus, "resources": dict(resources or {}), "node_ip_address": "127.0.0.1",
            "include_dashboard": False, **extra}
