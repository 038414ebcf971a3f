"""A damaged newest checkpoint: the restarted worker resumes from the newest intact one (verified by the
hashes written with it), a ``checkpoint-rejected`` event says which and why, and the adapter ends as an
uninterrupted run's."""

from __future__ import annotations


import pytest
from safetensors.torch import load_file

from cluster import api
from cluster.ledger import JobLedger
from cluster.spec import load_batch
from cluster.worker import stage1_root
from purecc.model import load_pipeline
from purecc.registry import AdapterRegistry
from purecc.trainer import ConceptJob, PackTrainer

pytestmark = pytest.mark.ray
STEPS, EVERY, KILL = 12, 2, 9



def test_a_damaged_newest_checkpoint_resumes_from_the_one_before(ray_cluster, batch_files, tiny_model_dir, tmp_path):
    path = batch_files(ids=["zigzag-star"], defaults={"resolution": 64, "stage1": {
        "steps": STEPS, "grad_accum": 1, "checkpoint_every": EVERY}, "stage2": {"steps": 2, "checkpoint_every": 2}})
    fault = {"concept_id": "zigzag-star", "stage": 1, "step": KILL, "corrupt_newest": True}
    result = api.submit(path, fault=fault)
    assert result.summary.states == {"zigzag-star": "published"}
    with JobLedger(result.ledger) as led:
        rejected = [e["detail"] for e in led.events("zigzag-star", "checkpoint-rejected")]
        resumed = [e["detail"] for e in led.events("zigzag-star", "resumed")]
    before = KILL - KILL % EVERY - EVERY     # the newest (at KILL - KILL % EVERY) was damaged
    assert resumed == [{"stage": 1, "step": before}], resumed            # not step 0, not the damaged one
    assert rejected and all("sha256" in r["reason"] for r in rejected), rejected
    assert all(r["checkpoint"].endswith("/zigzag-star") and str(tmp_path) not in r["reason"] for r in rejected), rejected

    spec = load_batch(path).jobs()[0]
    ref = PackTrainer(load_pipeline(str(tiny_model_dir)),
                      [ConceptJob("zigzag-star", spec.trigger, spec.manifest, spec.recipe(1), seed=spec.seed)])
    ref.setup()
    ref.train()
    want = load_file(ref.export("zigzag-star", tmp_path / "ref") / "adapter_model.safetensors")
    got_dir = AdapterRegistry(stage1_root(spec.storage)).fetch("zigzag-star", tmp_path / "cache")
    have = load_file(got_dir / "adapter_model.safetensors")
    assert want.keys() == have.keys()
    worst = max((want[k] - have[k]).abs().max().item() for k in want)
    assert worst <= 1e-6, worst        # as the kill test in test_batch_ray: equal up to float rounding
    assert any(want[k].abs().sum() > 0 for k in want if "lora_B" in k)     # it did train
