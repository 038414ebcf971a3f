"""Cluster configs: they parse, and they name this project's entry points and settings."""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path

import yaml

from cluster.spec import BatchSpec
from purecc.cli import build_parser

CONFIGS = Path(str(files("cluster") / "configs"))
REPO = Path(__file__).resolve().parents[2]


def _subcommands() -> set[str]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return set(sub.choices)


def test_kuberay_raycluster():
    text = (CONFIGS / "kuberay-raycluster.yaml").read_text()
    doc = yaml.safe_load(text)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    assert doc["spec"]["rayVersion"] == "2.60.0"
    head = doc["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"          # the head only drives
    (head_c,) = head["template"]["spec"]["containers"]
    gpu_groups = [g for g in doc["spec"]["workerGroupSpecs"]
                  if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1]
    assert gpu_groups, "a GPU worker group is required"
    worker_c = gpu_groups[0]["template"]["spec"]["containers"][0]
    assert worker_c["image"] == head_c["image"]
    assert {m["mountPath"] for m in head_c["volumeMounts"]} & {m["mountPath"] for m in worker_c["volumeMounts"]}
    env = {e["name"]: e["value"] for e in head_c["env"]}
    assert env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5" and "PURECC_LEDGER" in env
    assert "purecc submit" in text and "purecc status" in text


def test_ray_up_cluster():
    text = (CONFIGS / "ray-up.yaml").read_text()
    doc = yaml.safe_load(text)
    assert doc["head_node_type"] in doc["available_node_types"]
    assert doc["available_node_types"][doc["head_node_type"]]["resources"] == {"CPU": 0}
    setup = " ".join(doc["setup_commands"])
    assert "requirements-pinned.txt" in setup and (REPO / "requirements-pinned.txt").is_file()
    assert "pip install -e" in setup
    assert any("ray start --head" in c for c in doc["head_start_ray_commands"])
    assert any("ray start --address" in c for c in doc["worker_start_ray_commands"])
    for cmd in ("purecc submit", "purecc status", "purecc resume"):
        assert cmd in text


def test_configs_name_real_commands():
    text = "".join((CONFIGS / f).read_text() for f in ("kuberay-raycluster.yaml", "ray-up.yaml", "STORAGE.md"))
    named = set(re.findall(r"\bpurecc ([a-z]+) (?=[-/A-Z])", text))   # "purecc CMD ARG..."
    assert {"submit", "status", "resume"} <= named and named <= _subcommands(), named
    assert {"submit", "status", "cancel", "resume", "concepts"} <= _subcommands()


def test_example_batch_matches_the_schema():
    data = yaml.safe_load((CONFIGS / "example-batch.yaml").read_text())
    spec = BatchSpec.model_validate(data)
    assert spec.resources.gpus_per_worker == 1 and len(spec.concepts) == 2


def test_storage_notes():
    text = (CONFIGS / "STORAGE.md").read_text()
    for word in ("ledger.sqlite", "adapters/", "runs/", "s3://", "NFS"):
        assert word in text
