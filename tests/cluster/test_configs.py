"""Cluster configs: they parse, and they name this project's entry points and settings."""

from __future__ import annotations

import importlib
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


def _rayservice() -> tuple[dict, dict]:
    docs = list(yaml.safe_load_all((CONFIGS / "kuberay-rayservice.yaml").read_text()))
    (service,) = [d for d in docs if d["kind"] == "RayService"]
    (monitor,) = [d for d in docs if d["kind"] == "PodMonitor"]
    return service, monitor


def _deployment_names(app) -> set[str]:
    """Names of the deployments an application builds (the ingress and those bound into it)."""
    from ray.serve.deployment import Application

    names, todo = set(), [app]
    while todo:
        bound = todo.pop()._bound_deployment
        names.add(bound.name)
        todo += [a for a in (*bound.init_args, *bound.init_kwargs.values()) if isinstance(a, Application)]
    return names


def test_rayservice_serve_config_matches_the_service(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    from services.config import ServiceConfig

    service, _ = _rayservice()
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    (app,) = serve_config.applications
    module, _, attr = app.import_path.partition(":")
    build = getattr(importlib.import_module(module), attr)
    cfg = ServiceConfig.model_validate(app.args)
    (gen,) = [d for d in app.deployments if d.name == "ConceptGenerator"]
    # the names the builder really creates: an override naming another deployment fails at deploy time
    (tmp_path / "m").mkdir()
    built = build(ServiceConfig.model_validate({**app.args, "model": str(tmp_path / "m"),
                                                "registry": str(tmp_path), "auth": {}}))
    assert {d.name for d in app.deployments} <= _deployment_names(built) == {"GenerationAPI", "ConceptGenerator"}

    auto = gen.autoscaling_config
    assert gen.num_replicas == "auto" and auto is not None
    assert 1 <= auto["min_replicas"] <= auto["initial_replicas"] <= auto["max_replicas"]
    assert cfg.replicas == auto["max_replicas"], "args.replicas sizes the ingress for the most generators"
    assert gen.max_ongoing_requests == cfg.max_ongoing_requests
    assert cfg.max_batch_images <= auto["target_ongoing_requests"] < cfg.max_ongoing_requests

    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0" and cluster["enableInTreeAutoscaling"] is True
    (gpu,) = cluster["workerGroupSpecs"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert float(limits["nvidia.com/gpu"]) >= cfg.gpus_per_replica == 1
    assert gpu["minReplicas"] <= auto["min_replicas"] and gpu["maxReplicas"] >= auto["max_replicas"]
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    # the shared volume holds the model and the registry the args name
    mounts = {m["mountPath"] for m in gpu["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert any(cfg.model.startswith(m + "/") for m in mounts) and cfg.registry in mounts


def _metrics_port(group: dict) -> str:
    port = group["rayStartParams"]["metrics-export-port"]
    template = group["template"]
    assert template["metadata"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": port}
    ports = {p["name"]: str(p["containerPort"]) for p in template["spec"]["containers"][0]["ports"]}
    assert ports["metrics"] == port
    return port


def test_prometheus_scrapes_every_ray_pod():
    service, monitor = _rayservice()
    cluster = service["spec"]["rayClusterConfig"]
    for group in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"]):
        _metrics_port(group)
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    training = yaml.safe_load((CONFIGS / "kuberay-raycluster.yaml").read_text())["spec"]
    for group in (training["headGroupSpec"], *training["workerGroupSpecs"]):
        _metrics_port(group)


def test_training_autoscaling():
    training = yaml.safe_load((CONFIGS / "kuberay-raycluster.yaml").read_text())["spec"]
    assert training["enableInTreeAutoscaling"] is True and training["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    for group in training["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    up = yaml.safe_load((CONFIGS / "ray-up.yaml").read_text())
    assert up["idle_timeout_minutes"] > 0
    gpu = up["available_node_types"]["gpu_worker"]
    assert 0 <= gpu["min_workers"] <= gpu["max_workers"] <= up["max_workers"]
    starts = up["head_start_ray_commands"] + up["worker_start_ray_commands"]
    assert all("--metrics-export-port=8080" in c for c in starts if "ray start" in c)


def test_operations_notes_name_the_real_metrics():
    from services import metrics

    text = (CONFIGS / "OPERATIONS.md").read_text()
    source = Path(metrics.__file__).read_text()
    defined = set(re.findall(r'"(purecc_[a-z_]+)"', source))
    assert len(defined) == 8
    for name in defined:
        assert f"ray_{name}" in text, name
    for word in ("target_ongoing_requests", "enableInTreeAutoscaling", "idle_timeout_minutes", "PromQL", "rate("):
        assert word in text
