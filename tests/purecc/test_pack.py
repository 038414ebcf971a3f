"""The pack recipe driven in this process: member checks, resume from the newest intact checkpoint,
checkpoints of other content refused, export and validation images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from purecc.pack import ConceptPlan, PackPlan, PackRecipe
from purecc.recipe import stage_recipe

RECIPE = stage_recipe(1, steps=4, resolution=64, grad_accum=1, checkpoint_every=2)


def _plan(manifests, recipe=RECIPE, key="k", **members) -> PackPlan:
    plans = tuple(ConceptPlan(cid, trig, str(manifests.get(cid, "missing.csv")), recipe, seed=1, key=key,
                              validation_prompts=("a [v] shape",))
                  for cid, trig in (members or {"checkered-star": "zqx"}).items())
    return PackPlan(name="p", stage=recipe.stage, base_model="unused", members=plans)


def _recipe(pipe, plan, events=None, tmp=None) -> PackRecipe:
    def on_event(cid, kind, detail):
        if events is not None:
            events.append((cid, kind, detail))
    return PackRecipe(plan, pipe=pipe, cache_dir=tmp, on_event=on_event)


def test_a_member_with_broken_data_fails_alone(tiny_pipe, sample_manifests, tmp_path):
    plan = _plan(sample_manifests, **{"checkered-star": "zqx", "no-data": "sks"})
    recipe = _recipe(tiny_pipe, plan)
    failed = recipe.setup()
    assert list(failed) == ["no-data"] and failed["no-data"].startswith("data error: ManifestError:")
    result = recipe.train(checkpoint_dir=lambda cid: tmp_path / "ckpt" / cid)
    assert list(result) == ["checkered-star"] and result["checkered-star"]["status"] == "done"
    dest = recipe.export("checkered-star", tmp_path / "out")
    assert (dest / "pytorch_lora_weights.safetensors").is_file()
    assert [p.name for p in recipe.render_validation("checkered-star", tmp_path / "val")] == ["00.png"]
    said = json.loads((tmp_path / "val" / "prompts.json").read_text())      # what the image shows
    assert said["prompts"] == [p.replace("[v]", "zqx") for p in plan.members[0].validation_prompts]
    assert len(said["seeds"]) == 1 and said["step"] == result["checkered-star"]["step"]


def test_resume_takes_the_newest_intact_checkpoint(tiny_model_dir, sample_manifests, tmp_path):
    from purecc.model import load_pipeline

    first = _recipe(load_pipeline(str(tiny_model_dir)), _plan(sample_manifests))
    first.setup()
    kept = tmp_path / "kept"

    def keep(ids):
        for cid in ids:
            step = first.trainer.summary(cid)["step"]
            shutil.copytree(tmp_path / "ckpt" / cid, kept / f"step-{step}")
    first.train(checkpoint_dir=lambda cid: tmp_path / "ckpt" / cid, on_checkpoint=keep)
    assert sorted(p.name for p in kept.iterdir()) == ["step-2", "step-4"]
    tensors = kept / "step-4" / "checkpoint.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-8] + b"damaged!")        # the newest one is damaged

    events = []
    again = _recipe(load_pipeline(str(tiny_model_dir)), _plan(sample_manifests), events)
    again.setup()
    resumed = again.resume({"checkered-star": [kept / "step-4", kept / "step-2", kept / "never-written"]})
    assert resumed == {"checkered-star": 2}
    assert [k for _, k, _ in events] == ["checkpoint-rejected", "resumed"] and "sha256" in events[0][2]["reason"]
    assert events[0][2]["checkpoint"] == "kept/step-4" and str(tmp_path) not in events[0][2]["reason"]
    again.train(checkpoint_dir=lambda cid: tmp_path / "again" / cid)
    a = again.export("checkered-star", tmp_path / "a")
    b = first.export("checkered-star", tmp_path / "b")
    want, have = load_file(b / "adapter_model.safetensors"), load_file(a / "adapter_model.safetensors")
    assert all(torch.equal(want[k], have[k]) for k in want)    # resumed at step 2 = uninterrupted


def test_checkpoint_of_other_content_is_refused(tiny_model_dir, sample_manifests, tmp_path):
    from purecc.model import load_pipeline

    old = _recipe(load_pipeline(str(tiny_model_dir)), _plan(sample_manifests, key="old-content"))
    old.setup()
    old.train(checkpoint_dir=lambda cid: tmp_path / "ckpt" / cid)
    events = []
    new = _recipe(load_pipeline(str(tiny_model_dir)), _plan(sample_manifests, key="new-content"), events)
    new.setup()
    assert new.resume({"checkered-star": [tmp_path / "ckpt" / "checkered-star"]}) == {}
    assert events[0][1] == "checkpoint-rejected" and "job_key" in events[0][2]["reason"]


def test_recipe_needs_setup_and_stage2_needs_its_extractor(tiny_pipe, sample_manifests):
    with pytest.raises(RuntimeError, match="setup"):
        _recipe(tiny_pipe, _plan(sample_manifests)).train(checkpoint_dir=lambda cid: Path("unused"))
    plan = _plan(sample_manifests, recipe=stage_recipe(2, steps=2, resolution=64))
    failed = _recipe(tiny_pipe, plan).setup()
    assert failed["checkered-star"].startswith("stage-1 adapter error:")
