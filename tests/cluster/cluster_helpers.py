"""Helpers for cluster tests: batch files over the tiny model and the sample concepts, and waiting on
a condition with a deadline."""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path

import yaml

TRIGGERS = {"checkered-star": "zqx", "striped-circle": "vlk", "dotted-diamond": "bxj"}
TINY_DEFAULTS = {"resolution": 64, "stage1": {"steps": 6, "grad_accum": 1, "checkpoint_every": 2},
                 "stage2": {"steps": 6, "checkpoint_every": 2}}


def batch_dict(model: Path, storage: Path, manifests: dict[str, Path], ids=None, **extra) -> dict:
    ids = list(ids or manifests)
    data = {"name": "tiny", "base_model": str(model), "storage": str(storage),
            "resources": {"cpus_per_worker": 1, "concepts_per_pack": 1, "max_concurrent": 2},
            "defaults": copy.deepcopy(TINY_DEFAULTS), "validation": {"steps": 2},
            "concepts": [{"id": cid, "data": str(manifests[cid]), "trigger": TRIGGERS.get(cid, "zqx")}
                         for cid in ids]}
    data.update(extra)
    return data


def write_batch(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def copy_concept(manifest: Path, dest: Path) -> Path:
    """A copy of a sample concept's folder (to break or modify it without touching the original)."""
    shutil.copytree(manifest.parent, dest)
    return dest / manifest.name


def truncate_image(manifest: Path, row: int = 0) -> Path:
    """Cut an image of the concept short: its header still reads, its pixels do not decode."""
    img = sorted((manifest.parent / "imgs").glob("*.png"))[row]
    data = img.read_bytes()
    img.write_bytes(data[: len(data) // 3])
    return img


def wait_for(pred, timeout: float, what: str, poll: float = 0.3):
    """``pred()``'s first truthy value, polled every ``poll`` s; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
