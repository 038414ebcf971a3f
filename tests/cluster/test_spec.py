"""Batch specs: a bad batch is rejected whole, with every problem named (file, concept, field)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster import api
from cluster.spec import BatchSpecError, StageOverrides, ValidatedBatch, load_batch, validate_batch
from purecc.recipe import StageFields, stage_recipe

from cluster_helpers import batch_dict, copy_concept, write_batch


def problems_of(path: Path) -> list:
    with pytest.raises(BatchSpecError) as err:
        load_batch(path)
    assert str(path) in str(err.value)
    return err.value.problems


def test_valid_batch_resolves_paths_and_merges_defaults(tmp_path, tiny_model_dir, sample_manifests):
    data = batch_dict(tiny_model_dir, Path("store"), sample_manifests)
    data["concepts"][0]["overrides"] = {"lambda_mode": "increment", "stage2": {"steps": 9}, "seed": 3}
    spec = load_batch(write_batch(tmp_path / "b.yaml", data))
    assert spec.storage == str(tmp_path / "store") and spec.ledger_path == f"{tmp_path}/store/ledger.sqlite"
    jobs = {j.concept_id: j for j in spec.jobs()}
    z = jobs["checkered-star"]
    assert z.recipe(2).lambda_mode == "increment" and z.recipe(2).steps == 9
    assert z.recipe(2).checkpoint_every == 2 and z.recipe(1).steps == 6   # from defaults
    assert z.recipe(1).resolution == z.recipe(2).resolution == 64 and z.seed == 3
    assert jobs["striped-circle"].recipe(2).lambda_mode == stage_recipe(2).lambda_mode != "increment"


def test_json_batch_and_content_hash(tmp_path, tiny_model_dir, sample_manifests):
    data = batch_dict(tiny_model_dir, tmp_path / "store", sample_manifests)
    path = tmp_path / "b.json"
    path.write_text(json.dumps(data))
    h1 = {j.concept_id: j.content_hash() for j in load_batch(path).jobs()}
    assert h1 == {j.concept_id: j.content_hash() for j in load_batch(path).jobs()}
    data["concepts"][1]["overrides"] = {"stage1": {"lr": 1e-3}}
    data["resources"]["max_concurrent"] = 7          # scheduling knobs are not content
    path.write_text(json.dumps(data))
    h2 = {j.concept_id: j.content_hash() for j in load_batch(path).jobs()}
    assert h2["checkered-star"] == h1["checkered-star"] and h2["striped-circle"] != h1["striped-circle"]


def test_every_problem_is_listed_at_once(tmp_path, tiny_model_dir, sample_manifests):
    data = batch_dict(tiny_model_dir, tmp_path / "store", sample_manifests)
    data["concepts"][0]["id"] = "../escape"
    data["concepts"][1]["data"] = str(tmp_path / "missing.csv")
    data["concepts"][2]["overrides"] = {"stage1": {"steps": 0}, "lambda_mode": "sometimes"}
    data["concepts"].append({"id": "striped-circle", "data": str(sample_manifests["striped-circle"]),
                             "trigger": "vlk"})
    data["resources"]["concepts_per_pack"] = 0
    data["unknown_key"] = 1
    probs = problems_of(write_batch(tmp_path / "bad.yaml", data))
    fields = {p.field for p in probs}
    assert {"concepts.0.id", "concepts.1.data", "concepts.2.overrides.stage1.steps",
            "concepts.2.overrides.lambda_mode", "concepts.3.id", "resources.concepts_per_pack",
            "unknown_key"} <= fields, fields
    by_field = {p.field: p for p in probs}
    assert "duplicate" in by_field["concepts.3.id"].message
    assert by_field["concepts.1.data"].concept == "'striped-circle' (#2)"
    assert "does not exist" in by_field["concepts.1.data"].message


@pytest.mark.parametrize("case", ["bad_id", "uppercase_id", "bad_trigger", "bad_manifest_column",
                                  "bad_image", "base_model", "resolution", "unknown_override",
                                  "storage_scheme", "uri_without_ledger", "no_concepts", "extractor"])
def test_invalid_batch_cases(case, tmp_path, tiny_model_dir, sample_manifests):
    data = batch_dict(tiny_model_dir, tmp_path / "store", sample_manifests, ids=["checkered-star"])
    c = data["concepts"][0]
    field = {
        "bad_id": "concepts.0.id", "uppercase_id": "concepts.0.id", "bad_trigger": "concepts.0.trigger",
        "bad_manifest_column": "concepts.0.data", "bad_image": "concepts.0.data", "base_model": "base_model",
        "resolution": "concepts.0.overrides.resolution", "unknown_override": "concepts.0.overrides.stage2.stpes",
        "storage_scheme": "storage", "uri_without_ledger": "ledger", "no_concepts": "concepts",
        "extractor": "defaults.extractor",
    }[case]
    if case == "bad_id":
        c["id"] = "a/b"
    elif case == "uppercase_id":
        c["id"] = "Zigzag"
    elif case == "bad_trigger":
        c["trigger"] = "two words"
    elif case in ("bad_manifest_column", "bad_image"):
        man = copy_concept(sample_manifests["checkered-star"], tmp_path / "copy")
        if case == "bad_manifest_column":
            lines = man.read_text().splitlines()
            man.write_text("\n".join([lines[0].replace("base_prompt", "other")] + lines[1:]) + "\n")
        else:
            (man.parent / "imgs" / "00.png").write_bytes(b"not an image")
        c["data"] = str(man)
    elif case == "base_model":
        data["base_model"] = str(tmp_path)
    elif case == "resolution":
        c["overrides"] = {"resolution": 60}
    elif case == "unknown_override":
        c["overrides"] = {"stage2": {"stpes": 3}}
    elif case == "storage_scheme":
        data["storage"] = "http://example.com/x"
    elif case == "uri_without_ledger":
        data["storage"] = "s3://bucket/prefix"
    elif case == "no_concepts":
        data["concepts"] = []
    elif case == "extractor":
        data["defaults"]["extractor"] = "other"
    probs = problems_of(write_batch(tmp_path / f"{case}.yaml", data))
    assert field in {p.field for p in probs}, probs


@pytest.mark.parametrize("text,suffix", [("concepts: [unclosed", ".yaml"), ("- a\n- b\n", ".yaml"),
                                         ("{bad json", ".json"), ("x", ".toml")])
def test_unparseable_files(tmp_path, text, suffix):
    path = tmp_path / f"b{suffix}"
    path.write_text(text)
    probs = problems_of(path)
    assert len(probs) == 1 and probs[0].field in ("(file)", "(root)")


def test_rejected_batch_records_nothing(tmp_path, tiny_model_dir, sample_manifests):
    data = batch_dict(tiny_model_dir, tmp_path / "store", sample_manifests)
    data["concepts"][2]["data"] = str(tmp_path / "nope.csv")   # one bad concept rejects them all
    with pytest.raises(BatchSpecError):
        api.submit(write_batch(tmp_path / "b.yaml", data))
    assert not (tmp_path / "store").exists()


def test_validate_batch_from_a_dict(tmp_path, tiny_model_dir, sample_manifests):
    data = batch_dict(tiny_model_dir, "store", sample_manifests)
    spec = validate_batch(data, base_dir=tmp_path)
    assert spec.storage == str(tmp_path / "store") and len(spec.concepts) == 3


def test_submitting_a_batch_reads_each_manifest_once(tmp_path, tiny_model_dir, sample_manifests, monkeypatch):
    import cluster.spec as spec_module

    reads: list[str] = []
    real = spec_module.read_concept_manifest

    def counting(path, trigger, **kwargs):
        reads.append(str(path))
        return real(path, trigger, **kwargs)

    monkeypatch.setattr(spec_module, "read_concept_manifest", counting)
    path = write_batch(tmp_path / "b.yaml", batch_dict(tiny_model_dir, tmp_path / "store", sample_manifests))
    result = api.submit(path, run=False)
    assert len(result.report.added) == 3
    assert sorted(reads) == sorted(str(m) for m in sample_manifests.values())   # validation only
    reads.clear()
    valid = ValidatedBatch.from_file(path)
    assert [j.data_hash for j in valid.jobs()] == [j.data_hash for j in valid.spec.jobs()]
    assert len(reads) == 3 + 3        # from_file once each; the bare spec's jobs() reads them again


def test_scheduling_fields_are_bounded_and_named_when_wrong(tmp_path, tiny_model_dir, sample_manifests):
    data = batch_dict(tiny_model_dir, tmp_path / "store", sample_manifests)
    data["resources"].update({"priority": 0, "gpu_memory_gib": -1})
    by_field = {p.field: p.message for p in problems_of(write_batch(tmp_path / "bad.yaml", data))}
    assert "greater than or equal to 1" in by_field["resources.priority"]
    assert "greater than 0" in by_field["resources.gpu_memory_gib"]
    data["resources"] = {"priority": 101}
    assert "resources.priority" in {p.field for p in problems_of(write_batch(tmp_path / "bad2.yaml", data))}
    data["resources"] = {"gpus_per_worker": 0, "gpu_memory_gib": 80}      # memory of a GPU the worker lacks
    (prob,) = problems_of(write_batch(tmp_path / "bad3.yaml", data))
    assert prob.field == "resources" and "gpu_memory_gib" in prob.message and "gpus_per_worker" in prob.message
    data["resources"] = {"gpus_per_worker": 1, "gpu_memory_gib": 80, "priority": 100}
    spec = load_batch(write_batch(tmp_path / "ok.yaml", data))
    assert spec.resources.concepts_per_pack is None and spec.resources.priority == 100


def test_a_batch_stage_takes_every_field_of_a_purecc_train_recipe(tmp_path, tiny_model_dir, sample_manifests):
    # one schema for a stage, wherever a recipe comes from: what `purecc train --set` accepts, a batch does
    assert StageOverrides.model_fields.keys() == StageFields.model_fields.keys()
    data = batch_dict(tiny_model_dir, Path("store"), sample_manifests)
    data["defaults"]["stage1"] = {**data["defaults"].get("stage1", {}), "rank": 8, "alpha": 16.0, "crop": "random",
                                  "flip_prob": 0.5, "batch_size": 2, "weight_decay": 0.0, "betas": [0.8, 0.99]}
    data["defaults"]["eta"] = 2.0
    data["concepts"][0]["overrides"] = {"stage2": {"eta": 0.5, "lambda_min": 0.25, "r_reference": "class",
                                                   "train_embeddings": True, "latent_sampling": "sample"}}
    jobs = {j.concept_id: j for j in load_batch(write_batch(tmp_path / "b.yaml", data)).jobs()}
    one, two = jobs["checkered-star"].recipe(1), jobs["checkered-star"].recipe(2)
    assert (one.rank, one.alpha, one.crop, one.flip_prob, one.batch_size, one.betas) == (8, 16.0, "random", 0.5, 2,
                                                                                         (0.8, 0.99))
    # the stage's own value wins over the shared one, as in `purecc train --recipe`
    assert (two.eta, two.lambda_min, two.r_reference, two.train_embeddings) == (0.5, 0.25, "class", True)
    assert jobs["striped-circle"].recipe(2).eta == 2.0


def test_a_bad_stage_field_in_a_batch_is_named(tmp_path, tiny_model_dir, sample_manifests):
    data = batch_dict(tiny_model_dir, Path("store"), sample_manifests)
    data["concepts"][0]["overrides"] = {"stage1": {"betas": [0.9, 1.5]}}
    data["concepts"][1]["overrides"] = {"stage2": {"crop": "corner", "ranks": 4}}
    text = "\n".join(str(p) for p in problems_of(write_batch(tmp_path / "b.yaml", data)))
    assert "betas" in text and "crop" in text and "ranks" in text
