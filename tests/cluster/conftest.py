"""Fixtures for cluster tests (helpers live in cluster_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.local_ray import loopback_env
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
