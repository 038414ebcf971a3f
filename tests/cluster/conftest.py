"""Fixtures for cluster tests (helpers live in cluster_helpers.py)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from cluster.local_ray import loopback_env, start_local_ray
from cluster_helpers import batch_dict, write_batch

# Ray reads its node-IP settings when it is first imported: export the loopback ones now,
# before any test module imports ray (collection imports every module first).
loopback_env()


@pytest.fixture()
def batch_files(tmp_path, tiny_model_dir, sample_manifests):
    """``make(name, **extra) -> path`` writing a valid tiny batch under tmp_path."""
    def make(name: str = "batch.yaml", ids=None, **extra) -> Path:
        return write_batch(tmp_path / name, batch_dict(tiny_model_dir, tmp_path / "store", sample_manifests,
                                                       ids, **extra))
    return make


@pytest.fixture(scope="module")
def ray_cluster():
    """A 2-CPU local Ray cluster on 127.0.0.1 for one test module, stopped and removed after it."""
    temp = tempfile.mkdtemp(prefix="pcray-", dir="/tmp")
    ray = start_local_ray(2, temp_dir=temp)
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server():
    """One throw-away PostgreSQL server on 127.0.0.1 for the session (skipped where it is not installed)."""
    from pg_server import PgServer, find_pg_bin

    bin_dir = find_pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (no initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin); "
                    "install Debian's `postgresql` package to run the PostgreSQL ledger tests")
    with PgServer(bin_dir) as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_location(request, tmp_path):
    """Where a test's ledger lives: a fresh SQLite file, or a fresh database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "ledger.sqlite")
    return request.getfixturevalue("pg_server").new_database()
