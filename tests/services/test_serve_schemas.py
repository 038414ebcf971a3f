"""The HTTP batch models derive from cluster.spec's, and an HTTP submission parses each manifest once
(no Ray: the driver start is recorded, not done)."""

from __future__ import annotations

import shutil
import typing
from collections import Counter

import pytest
from pydantic import BaseModel

from cluster.spec import BatchSpec, ConceptSpec, Overrides, Resources, StageOverrides, ValidationRender
from services.auth import Principal
from services.batches import FIXED, StorageBatches
from services.schemas import (BatchConcept, BatchOverrides, BatchRequest, BatchResources, BatchStage,
                              BatchValidation)

PAIRS = [(BatchStage, StageOverrides), (BatchOverrides, Overrides), (BatchResources, Resources),
         (BatchValidation, ValidationRender), (BatchConcept, ConceptSpec), (BatchRequest, BatchSpec)]
SUBMISSION_FLAGS = {"replace", "requeue"}        # how to record the batch, not part of it
UPPER = ("maximum", "exclusiveMaximum", "maxItems", "maxLength")
LOWER = ("minimum", "exclusiveMinimum", "minItems", "minLength")
EXACT = ("pattern", "multipleOf", "enum", "const")


def _bounds(prop: dict, prefix: str = "") -> dict:
    """The constraint keywords of one property's JSON schema (Optional unwrapped, list items prefixed)."""
    (branch,) = [b for b in prop.get("anyOf", [prop]) if b.get("type") != "null"]
    out = {prefix + k: v for k, v in branch.items() if k in UPPER + LOWER + EXACT}
    if "items" in branch:
        out.update(_bounds(branch["items"], prefix + "items."))
    return out


def _model_of(annotation) -> type[BaseModel] | None:
    """The pydantic model a field holds (directly, in a list or Optional), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    found = [m for m in map(_model_of, typing.get_args(annotation)) if m is not None]
    return found[0] if found else None


@pytest.mark.parametrize("http,cluster", PAIRS, ids=[h.__name__ for h, _ in PAIRS])
def test_http_batch_models_derive_from_the_cluster_schema(http, cluster):
    if http is BatchRequest:          # BatchSpec less what the service fixes
        assert set(FIXED) <= set(cluster.model_fields) and not set(FIXED) & set(http.model_fields)
    else:
        assert issubclass(http, cluster)
    h_schema, c_schema = http.model_json_schema(), cluster.model_json_schema()
    for name, field in http.model_fields.items():
        if name in SUBMISSION_FLAGS:
            continue
        assert name in cluster.model_fields, f"{http.__name__}.{name} is not in {cluster.__name__}"
        assert field.description, f"{http.__name__}.{name} has no description (the OpenAPI schema)"
        if cluster.model_fields[name].is_required():
            assert field.is_required(), f"{http.__name__}.{name} is optional over HTTP only"
        c_model = _model_of(cluster.model_fields[name].annotation)
        if c_model is not None:
            assert issubclass(_model_of(field.annotation), c_model), f"{http.__name__}.{name}"
        h, c = _bounds(h_schema["properties"][name]), _bounds(c_schema["properties"][name])
        where = f"{http.__name__}.{name}: HTTP {h} vs cluster {c}"
        for key, bound in c.items():
            kind = key.rsplit(".", 1)[-1]
            assert key in h, where
            if kind in UPPER:
                assert h[key] <= bound, where
            elif kind in LOWER:
                assert h[key] >= bound, where
            else:
                assert h[key] == bound, where


def test_an_http_submission_reads_each_manifest_once(tmp_path, tiny_model_dir, sample_manifests, monkeypatch):
    import cluster.spec as spec_module
    import services.batches as batches_module

    storage = (tmp_path / "storage").resolve()
    ids = {"checkered-star": "zqx", "striped-circle": "vlk"}
    for cid in ids:
        shutil.copytree(sample_manifests[cid].parent, storage / "data" / cid)
    reads: Counter[str] = Counter()
    real = spec_module.read_concept_manifest

    def counting(path, trigger, **kwargs):
        reads[str(path)] += 1
        return real(path, trigger, **kwargs)

    started: list[str] = []

    def record_start(ledger) -> str:
        started.append(str(ledger))
        return "a driver"

    monkeypatch.setattr(spec_module, "read_concept_manifest", counting)
    monkeypatch.setattr(batches_module, "resume_unfinished", record_start)
    body = {"name": "shapes", "concepts": [{"id": cid, "data": f"{cid}/manifest.csv", "trigger": trig}
                                           for cid, trig in ids.items()]}
    admin = Principal("ops", frozenset({"admin"}))          # an admin's data area is all of <storage>/data/
    result = StorageBatches(str(storage), str(tiny_model_dir)).submit(body, admin)
    assert (result.added, result.driver) == (list(ids), "started")
    assert started == [str(storage / "ledger.sqlite")]
    assert reads == {str(storage / "data" / cid / "manifest.csv"): 1 for cid in ids}


def test_a_batch_stage_takes_the_recipe_fields_and_a_rank_the_slots_cannot_serve_is_refused(
        tmp_path, tiny_model_dir, sample_manifests, monkeypatch):
    import services.batches as batches_module
    from services.batches import BatchRejected

    storage = (tmp_path / "storage").resolve()
    shutil.copytree(sample_manifests["checkered-star"].parent, storage / "data" / "checkered-star")
    monkeypatch.setattr(batches_module, "resume_unfinished", lambda ledger: "a driver")
    admin = Principal("ops", frozenset({"admin"}))
    batches = StorageBatches(str(storage), str(tiny_model_dir), slot_rank=4)

    def body(stage2: dict) -> dict:
        return {"name": "shapes", "defaults": {"stage1": {"rank": 8, "crop": "random", "batch_size": 2},
                                               "stage2": stage2},
                "concepts": [{"id": "checkered-star", "data": "checkered-star/manifest.csv", "trigger": "zqx"}]}

    with pytest.raises(BatchRejected) as err:
        batches.submit(body({"rank": 8}), admin)
    (issue,) = err.value.issues
    assert issue.loc == ("concepts", 0, "overrides", "stage2", "rank")
    assert "rank 8" in issue.msg and "rank 4" in issue.msg and str(storage) not in issue.msg
    assert not (storage / "ledger.sqlite").exists()          # refused before anything is recorded
    # a stage-1 extractor of another rank is fine: only stage 2's adapter is served
    assert batches.submit(body({"lambda_min": 0.25}), admin).added == ["checkered-star"]
