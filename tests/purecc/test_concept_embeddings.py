"""Layer-wise concept embeddings: trained per slot, saved with the adapter, routed per sample."""

import dataclasses
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from purecc.adapter_files import (EMBEDDINGS, MANIFEST, HashMismatch, ManifestInvalid, TensorMismatch,
                                  load_concept, read_adapter_manifest)
from purecc.concept_embeddings import placement_rows, trigger_positions
from purecc.fileio import atomic_save_tensors, load_tensors, sha256_file
from purecc.generate import RenderSettings, Sample, embedding_placement, generate, load_concepts
from purecc.model import load_pipeline
from purecc.recipe import RecipeFields, stage_recipe
from purecc.trainer import CheckpointError, ConceptJob, PackTrainer

IDS = {"checkered-star": "zqx", "striped-circle": "vlk", "dotted-diamond": "bxj"}
SETTINGS = RenderSettings(steps=4, guidance=4.0, width=64, height=64)
S1 = dict(resolution=64, grad_accum=1, lr=1e-3, embeddings="layerwise", embedding_lr=5e-2)


def _jobs(manifests, recipe, seeds=(11, 22, 33), ext=None):
    return [ConceptJob(cid, trig, manifests[cid], recipe, seed=s, extractor_adapter=ext and ext[cid])
            for (cid, trig), s in zip(IDS.items(), seeds)]


def _train(model_dir, jobs, **kw):
    t = PackTrainer(load_pipeline(str(model_dir)), jobs)
    t.setup()
    t.train(**kw)
    return t


@pytest.fixture(scope="module")
def stage1(tiny_model_dir, sample_manifests, tmp_path_factory):
    """Three concepts' stage 1 with embeddings, trained in one pack and exported."""
    t = _train(tiny_model_dir, _jobs(sample_manifests, stage_recipe(1, steps=12, **S1)))
    root = tmp_path_factory.mktemp("emb-stage1")
    return t, {cid: t.export(cid, root / cid) for cid in IDS}


def test_trigger_positions_find_the_trigger_tokens_only(tiny_model_dir):
    pipe = load_pipeline(str(tiny_model_dir))
    m = trigger_positions(pipe, ["a zqx star on a grid", "a red star", "zqx and zqx"], "zqx", 77)
    assert m.shape == (3, 154) and m[1].sum() == 0
    n = int(m[0].sum())
    assert n >= 1 and m[2].sum() == 2 * n and not m[:, 77:].any()       # no T5: nothing past the CLIP part
    rows = placement_rows(m, [2, None, 0], 4, weights=[0.5, 1.0, 1.0])
    assert rows[0, :, 2].sum() == 0.5 * n and rows[1].sum() == 0 and rows[2, :, 0].sum() == 2 * n


def test_stage1_trains_embeddings_only_at_each_concepts_own_slot(stage1, tiny_model_dir, sample_manifests):
    t, _ = stage1
    embs = t.bank.embeddings
    norms = [embs.read_slot(t.concepts[cid].slot).norm().item() for cid in IDS]
    assert all(n > 1e-3 for n in norms)
    # one step's gradient: a concept's samples reach its own embedding row and no other row
    one = PackTrainer(load_pipeline(str(tiny_model_dir)), _jobs(sample_manifests, stage_recipe(1, steps=1, **S1))[:1])
    one.setup()
    one._gradients(list(one.concepts.values()), fp16=False)
    grad = one.bank.embeddings.storage.grad
    slot = one.concepts["checkered-star"].slot
    assert grad[slot].abs().sum() > 0
    assert grad[[s for s in range(grad.shape[0]) if s != slot]].abs().sum() == 0


def test_pack_with_embeddings_matches_each_concept_alone(stage1, tiny_model_dir, sample_manifests):
    pack, _ = stage1
    alone = _train(tiny_model_dir, _jobs(sample_manifests, stage_recipe(1, steps=12, **S1))[1:2])
    for a_t, p_t in ((alone.bank.read_slot(0), pack.bank.read_slot(pack.concepts["striped-circle"].slot)),
                     (alone.bank.embeddings.read_slot(0),
                      pack.bank.embeddings.read_slot(pack.concepts["striped-circle"].slot))):
        assert (p_t - a_t).norm() / a_t.norm() < 1e-4


def test_stage2_pack_with_embeddings_matches_alone_and_freezes_or_trains_them(stage1, tiny_model_dir,
                                                                               sample_manifests):
    _, folders = stage1
    frozen = stage_recipe(2, steps=6, resolution=64, lr=1e-3, embeddings="layerwise", lambda_mode="adaptive")
    pack = _train(tiny_model_dir, _jobs(sample_manifests, frozen, ext=folders))
    alone = _train(tiny_model_dir, _jobs(sample_manifests, frozen, ext=folders)[2:])
    p = pack.bank.read_slot(pack.concepts["dotted-diamond"].slot)
    assert (p - alone.bank.read_slot(0)).norm() / p.norm() < 1e-4
    _, _, s1_emb = load_concept(pack.bank, folders["dotted-diamond"])
    # frozen (the stage-2 default): the trainable branch and the extractor carry stage 1's embeddings
    c = pack.concepts["dotted-diamond"]
    assert torch.equal(pack.bank.embeddings.read_slot(c.slot), s1_emb)
    assert torch.equal(pack.bank.embeddings.read_slot(c.extractor_slot), s1_emb)
    further = dataclasses.replace(frozen, train_embeddings=True, embedding_lr=1e-2)
    trained = _train(tiny_model_dir, _jobs(sample_manifests, further, ext=folders)[2:])
    moved = trained.bank.embeddings.read_slot(0)
    assert (moved - s1_emb).norm() > 1e-4 * s1_emb.norm()
    assert torch.equal(trained.bank.embeddings.read_slot(trained.concepts["dotted-diamond"].extractor_slot), s1_emb)


def test_stage2_with_embeddings_needs_a_stage1_adapter_with_them(tiny_model_dir, sample_manifests, tmp_path):
    plain = _train(tiny_model_dir, _jobs(sample_manifests, stage_recipe(1, steps=1, resolution=64, grad_accum=1,
                                                                  embeddings="none"))[:1])
    folder = plain.export("checkered-star", tmp_path / "plain")
    rec = stage_recipe(2, steps=1, resolution=64, embeddings="layerwise")
    with pytest.raises(ValueError, match="extractor_adapter"):
        ConceptJob("checkered-star", "zqx", sample_manifests["checkered-star"], stage_recipe(2, extractor="base",
                   embeddings="layerwise"))
    t = PackTrainer(load_pipeline(str(tiny_model_dir)), [ConceptJob("checkered-star", "zqx",
                    sample_manifests["checkered-star"], rec, extractor_adapter=folder)])
    with pytest.raises(ValueError, match="stage-1 adapter with embeddings of that form"):
        t.setup()


RESUME = textwrap.dedent("""
    import sys
    from pathlib import Path
    from purecc.model import load_pipeline
    from purecc.recipe import stage_recipe
    from purecc.trainer import ConceptJob, PackTrainer
    model, manifest, ckpt, out = sys.argv[1:5]
    rec = stage_recipe(1, steps=8, resolution=64, grad_accum=2, lr=1e-3, checkpoint_every=4,
                       embeddings="layerwise", embedding_lr=5e-2)
    t = PackTrainer(load_pipeline(model), [ConceptJob("checkered-star", "zqx", Path(manifest), rec, seed=3)])
    t.setup()
    t.load_checkpoint("checkered-star", ckpt)
    t.train()
    t.save_checkpoint("checkered-star", out)
""")


def test_resume_with_embeddings_in_a_fresh_process_is_exact(tiny_model_dir, sample_manifests, tmp_path):
    rec = stage_recipe(1, steps=8, resolution=64, grad_accum=2, lr=1e-3, checkpoint_every=4,
                       embeddings="layerwise", embedding_lr=5e-2)
    job = ConceptJob("checkered-star", "zqx", sample_manifests["checkered-star"], rec, seed=3)
    straight = _train(tiny_model_dir, [job])
    _train(tiny_model_dir, [job], max_steps=4, checkpoint_dir=tmp_path / "ckpt")
    proc = subprocess.run([sys.executable, "-c", RESUME, str(tiny_model_dir), str(sample_manifests["checkered-star"]),
                           str(tmp_path / "ckpt" / "checkered-star"), str(tmp_path / "resumed")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed = load_tensors(tmp_path / "resumed" / "checkpoint.safetensors")
    assert torch.allclose(resumed["embeddings"], straight.bank.embeddings.read_slot(0), rtol=0, atol=1e-7)
    assert torch.allclose(resumed["adapter"], straight.bank.read_slot(0), rtol=0, atol=1e-7)
    # a checkpoint without embeddings does not resume a recipe with them
    plain = PackTrainer(load_pipeline(str(tiny_model_dir)), [ConceptJob("checkered-star", "zqx",
                        sample_manifests["checkered-star"], stage_recipe(1, steps=8, resolution=64, grad_accum=2,
                                                                         checkpoint_every=4, embeddings="none"),
                        seed=3)])
    plain.setup()
    with pytest.raises(CheckpointError, match="has embeddings"):
        plain.load_checkpoint("checkered-star", tmp_path / "ckpt" / "checkered-star")


def test_embedding_files_round_trip_and_tampering_is_refused(stage1, tmp_path):
    import shutil

    t, folders = stage1
    folder = folders["checkered-star"]
    manifest = read_adapter_manifest(folder)
    assert manifest.embeddings == "layerwise" and EMBEDDINGS in manifest.files
    _, flat, emb = load_concept(t.bank, folder, base_fingerprint=t.fingerprint)
    slot = t.concepts["checkered-star"].slot
    assert torch.equal(emb, t.bank.embeddings.read_slot(slot)) and torch.equal(flat, t.bank.read_slot(slot))
    bad = shutil.copytree(folder, tmp_path / "tampered")
    raw = bytearray((bad / EMBEDDINGS).read_bytes())
    raw[-1] ^= 0x40
    (bad / EMBEDDINGS).write_bytes(bytes(raw))
    with pytest.raises(HashMismatch, match="purecc_embeddings.safetensors"):
        load_concept(t.bank, bad)
    # re-hashed but the wrong shape: refused by shape, naming the file
    atomic_save_tensors(bad / EMBEDDINGS, {"layerwise": torch.zeros(2, 5)})
    data = json.loads((bad / MANIFEST).read_text())
    data["files"][EMBEDDINGS] = sha256_file(bad / EMBEDDINGS)
    (bad / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(TensorMismatch, match="purecc_embeddings.safetensors"):
        load_concept(t.bank, bad)
    # a manifest that claims embeddings without listing the file is malformed
    data["files"].pop(EMBEDDINGS)
    (bad / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ManifestInvalid, match="embeddings"):
        load_concept(t.bank, bad)


def test_served_mixed_batch_with_embeddings_equals_separate_requests(stage1, tiny_model_dir):
    _, folders = stage1
    pipe = load_pipeline(str(tiny_model_dir))
    loaded = load_concepts(pipe, list(folders.values()))
    samples = [Sample("a zqx star", 1, (("checkered-star", 1.0),)),
               Sample("a vlk circle and a bxj diamond", 2, (("striped-circle", 0.8), ("dotted-diamond", 1.0))),
               Sample("a bxj diamond on a grid", 3, (("dotted-diamond", 1.0),))]
    batch = generate(pipe, samples, loaded.slot_of, SETTINGS, output_type="np")
    for i, s in enumerate(samples):
        alone = generate(pipe, [s], loaded.slot_of, SETTINGS, output_type="np")[0]
        assert np.abs(alone - batch[i]).max() < 1e-4
    # composing: each trigger gets its own concept's embeddings, at its own weight; CFG rows are [neg; pos]
    place = embedding_placement(pipe, samples, loaded.slot_of, pipe.transformer.adapter_bank, SETTINGS)
    slots = loaded.slot_of
    assert place.shape[0] == 6 and place[:3].sum() == 0
    two = place[4]
    assert two[:, slots["striped-circle"]].max() == pytest.approx(0.8) and two[:, slots["checkered-star"]].sum() == 0
    assert not (two[:, slots["striped-circle"]].bool() & two[:, slots["dotted-diamond"]].bool()).any()
    # the embeddings change the image: the same adapters with their embeddings zeroed render differently
    bank = pipe.transformer.adapter_bank
    for s in loaded.slot_of.values():
        bank.embeddings.storage.data[s].zero_()
    without = generate(pipe, samples[:1], loaded.slot_of, SETTINGS, output_type="np")[0]
    assert np.abs(without - batch[0]).max() > 1e-4


def test_recipe_fields_carry_embeddings_to_both_stages():
    r = RecipeFields.model_validate({"embeddings": "layerwise", "stage2": {"train_embeddings": True}})
    assert r.stage(1).embeddings == r.stage(2).embeddings == "layerwise"
    assert r.stage(1).train_embeddings and r.stage(2).train_embeddings
    assert not stage_recipe(2).train_embeddings and stage_recipe(1).embeddings == stage_recipe(2).embeddings
    with pytest.raises(ValueError, match="embeddings"):
        stage_recipe(1, embeddings="token")
    with pytest.raises(ValueError, match="train_embeddings"):
        stage_recipe(1, embeddings="layerwise", train_embeddings=False)


def test_purecc_train_and_generate_carry_the_embeddings(tiny_model_dir, sample_manifests, tmp_path):
    """``purecc train --embeddings layerwise``: both stages' folders hold them; ``purecc generate``
    renders the stage-2 concept with them (a different image than its LoRA alone)."""
    from purecc.cli import main

    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--concept", "checkered-star", "zqx",
                 str(sample_manifests["checkered-star"]), "--stage", "both", "--out", str(out), "--steps1", "3",
                 "--steps2", "2", "--resolution", "64", "--embeddings", "layerwise", "--set", "stage1.embedding_lr=0.5",
                 "--quiet"]) == 0
    for stage in (1, 2):
        assert read_adapter_manifest(out / "checkered-star" / f"stage{stage}").embeddings == "layerwise"
    s1 = load_tensors(out / "checkered-star" / "stage1" / EMBEDDINGS)["layerwise"]
    s2 = load_tensors(out / "checkered-star" / "stage2" / EMBEDDINGS)["layerwise"]
    assert s1.abs().sum() > 0 and torch.equal(s1, s2)            # stage 2 kept stage 1's (frozen)
    args = ["generate", "--model", str(tiny_model_dir), "--prompt", "a zqx star", "--seed", "3", "--steps", "3",
            "--width", "64", "--height", "64", "--concept", f"{out / 'checkered-star' / 'stage2'}:1.0"]
    assert main(args + ["--out", str(tmp_path / "with")]) == 0
    import shutil

    bare = shutil.copytree(out / "checkered-star" / "stage2", tmp_path / "lora-only")
    (bare / EMBEDDINGS).unlink()
    data = json.loads((bare / MANIFEST).read_text())
    data["files"].pop(EMBEDDINGS)
    data["embeddings"] = "none"
    (bare / MANIFEST).write_text(json.dumps(data))
    assert main(args[:-1] + [f"{bare}:1.0", "--out", str(tmp_path / "without")]) == 0
    assert (tmp_path / "with" / "image_3.png").read_bytes() != (tmp_path / "without" / "image_3.png").read_bytes()
