"""The public code's embeddings form, a learned token in CLIP-L and CLIP-G (``embeddings: clip-token``):
trained per slot through the text encoders, saved with the adapter, placed per sample when serving."""

import asyncio
import dataclasses
import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from purecc.adapter_files import (EMBEDDINGS, MANIFEST, HashMismatch, ManifestInvalid, TensorMismatch,
                                  load_concept, read_adapter_manifest)
from purecc.bank import attach_bank
from purecc.concept_embeddings import CLIP_KEYS
from purecc.fileio import atomic_save_tensors, load_tensors, sha256_file
from purecc.generate import RenderSettings, Sample, generate, load_concepts, token_placement
from purecc.model import load_pipeline
from purecc.recipe import stage_recipe
from purecc.registry import AdapterRegistry
from purecc.trainer import ConceptJob, PackTrainer

IDS = {"checkered-star": "zqx", "striped-circle": "vlk", "dotted-diamond": "bxj"}
SETTINGS = RenderSettings(steps=4, guidance=4.0, width=64, height=64)
S1 = dict(resolution=64, grad_accum=1, lr=1e-3, embeddings="clip-token", embedding_lr=5e-2)


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
    """Three concepts' stage 1 with CLIP tokens, trained in one pack and exported."""
    t = _train(tiny_model_dir, _jobs(sample_manifests, stage_recipe(1, steps=10, **S1)))
    root = tmp_path_factory.mktemp("tok-stage1")
    return t, {cid: t.export(cid, root / cid) for cid in IDS}


def test_stage1_trains_each_concepts_own_token_row_through_the_text_encoders(stage1, tiny_model_dir,
                                                                            sample_manifests):
    t, _ = stage1
    tokens = t.bank.tokens
    assert tokens.dims == (32, 32) and t.bank.embeddings.storage.abs().sum() == 0   # no layer-wise ones
    assert all(tokens.read_slot(t.concepts[cid].slot).norm() > 1e-3 for cid in IDS)
    one = PackTrainer(load_pipeline(str(tiny_model_dir)), _jobs(sample_manifests, stage_recipe(1, steps=1, **S1))[:1])
    one.setup()
    one._gradients(list(one.concepts.values()), fp16=False)
    grad, slot = one.bank.tokens.storage.grad, one.concepts["checkered-star"].slot
    assert grad[slot].abs().sum() > 0 and grad[[s for s in range(grad.shape[0]) if s != slot]].abs().sum() == 0
    # the text encoders stay frozen: only the tokens (and the LoRA) receive gradients
    assert all(p.grad is None for p in one.pipe.text_encoder.parameters())


def test_pack_with_tokens_matches_each_concept_alone(stage1, tiny_model_dir, sample_manifests):
    pack, _ = stage1
    alone = _train(tiny_model_dir, _jobs(sample_manifests, stage_recipe(1, steps=10, **S1))[1:2])
    slot = pack.concepts["striped-circle"].slot
    for a_t, p_t in ((alone.bank.read_slot(0), pack.bank.read_slot(slot)),
                     (alone.bank.tokens.read_slot(0), pack.bank.tokens.read_slot(slot))):
        assert (p_t - a_t).norm() / a_t.norm() < 1e-4


def test_stage2_with_tokens_matches_alone_and_freezes_or_trains_them(stage1, tiny_model_dir, sample_manifests):
    _, folders = stage1
    frozen = stage_recipe(2, steps=4, resolution=64, lr=1e-3, embeddings="clip-token", lambda_mode="extractor")
    pack = _train(tiny_model_dir, _jobs(sample_manifests, frozen, ext=folders))
    alone = _train(tiny_model_dir, _jobs(sample_manifests, frozen, ext=folders)[2:])
    p = pack.bank.read_slot(pack.concepts["dotted-diamond"].slot)
    assert (p - alone.bank.read_slot(0)).norm() / p.norm() < 1e-4
    _, _, s1_tok = load_concept(pack.bank, folders["dotted-diamond"])
    c = pack.concepts["dotted-diamond"]
    assert s1_tok.shape == (64,)
    assert torch.equal(pack.bank.tokens.read_slot(c.slot), s1_tok)
    assert torch.equal(pack.bank.tokens.read_slot(c.extractor_slot), s1_tok)
    further = dataclasses.replace(frozen, train_embeddings=True, embedding_lr=1e-2)
    trained = _train(tiny_model_dir, _jobs(sample_manifests, further, ext=folders)[2:])
    c = trained.concepts["dotted-diamond"]
    assert (trained.bank.tokens.read_slot(c.slot) - s1_tok).norm() > 1e-4 * s1_tok.norm()
    assert torch.equal(trained.bank.tokens.read_slot(c.extractor_slot), s1_tok)


def test_stage2_with_tokens_needs_a_stage1_adapter_with_tokens(stage1, tiny_model_dir, sample_manifests):
    _, folders = stage1
    rec = stage_recipe(2, steps=1, resolution=64, embeddings="layerwise")
    t = PackTrainer(load_pipeline(str(tiny_model_dir)), _jobs(sample_manifests, rec, ext=folders)[:1])
    with pytest.raises(ValueError, match="embeddings 'layerwise' needs a stage-1 adapter with embeddings of that"):
        t.setup()


RESUME = textwrap.dedent("""
    import sys
    from pathlib import Path
    from purecc.model import load_pipeline
    from purecc.recipe import stage_recipe
    from purecc.trainer import ConceptJob, PackTrainer
    model, manifest, ckpt, out = sys.argv[1:5]
    rec = stage_recipe(1, steps=6, resolution=64, grad_accum=2, lr=1e-3, checkpoint_every=3,
                       embeddings="clip-token", embedding_lr=5e-2)
    t = PackTrainer(load_pipeline(model), [ConceptJob("checkered-star", "zqx", Path(manifest), rec, seed=3)])
    t.setup()
    t.load_checkpoint("checkered-star", ckpt)
    t.train()
    t.save_checkpoint("checkered-star", out)
""")


def test_resume_with_tokens_in_a_fresh_process_is_exact(tiny_model_dir, sample_manifests, tmp_path):
    rec = stage_recipe(1, steps=6, resolution=64, grad_accum=2, lr=1e-3, checkpoint_every=3,
                       embeddings="clip-token", embedding_lr=5e-2)
    job = ConceptJob("checkered-star", "zqx", sample_manifests["checkered-star"], rec, seed=3)
    straight = _train(tiny_model_dir, [job])
    _train(tiny_model_dir, [job], max_steps=3, checkpoint_dir=tmp_path / "ckpt")
    proc = subprocess.run([sys.executable, "-c", RESUME, str(tiny_model_dir), str(sample_manifests["checkered-star"]),
                           str(tmp_path / "ckpt" / "checkered-star"), str(tmp_path / "resumed")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed = load_tensors(tmp_path / "resumed" / "checkpoint.safetensors")
    assert torch.allclose(resumed["embeddings"], straight.bank.tokens.read_slot(0), rtol=0, atol=1e-7)
    assert torch.allclose(resumed["adapter"], straight.bank.read_slot(0), rtol=0, atol=1e-7)


def test_token_files_round_trip_and_tampering_is_refused(stage1, tiny_model_dir, tmp_path):
    t, folders = stage1
    folder = folders["checkered-star"]
    manifest = read_adapter_manifest(folder)
    assert manifest.embeddings == "clip-token" and EMBEDDINGS in manifest.files
    parts = load_tensors(folder / EMBEDDINGS)
    assert sorted(parts) == sorted(CLIP_KEYS) and parts["clip_l"].shape == (32,) == parts["clip_g"].shape
    _, flat, tok = load_concept(t.bank, folder, base_fingerprint=t.fingerprint)
    slot = t.concepts["checkered-star"].slot
    assert torch.equal(tok, t.bank.tokens.read_slot(slot)) and torch.equal(flat, t.bank.read_slot(slot))
    bad = shutil.copytree(folder, tmp_path / "tampered")
    raw = bytearray((bad / EMBEDDINGS).read_bytes())
    raw[-1] ^= 0x40
    (bad / EMBEDDINGS).write_bytes(bytes(raw))
    with pytest.raises(HashMismatch, match="purecc_embeddings.safetensors"):
        load_concept(t.bank, bad)
    atomic_save_tensors(bad / EMBEDDINGS, {"clip_l": torch.zeros(32), "clip_g": torch.zeros(31)})   # re-hashed
    data = json.loads((bad / MANIFEST).read_text())
    data["files"][EMBEDDINGS] = sha256_file(bad / EMBEDDINGS)
    (bad / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(TensorMismatch, match="purecc_embeddings.safetensors"):
        load_concept(t.bank, bad)
    data["files"].pop(EMBEDDINGS)
    (bad / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ManifestInvalid, match="embeddings"):
        load_concept(t.bank, bad)
    # a bank without token slots (no text encoders attached) refuses the concept by name
    bare = attach_bank(load_pipeline(str(tiny_model_dir)).transformer, 1)
    with pytest.raises(TensorMismatch, match="no CLIP token slots"):
        load_concept(bare, folder)


def test_mixed_batch_with_tokens_equals_separate_requests(stage1, tiny_model_dir, tmp_path):
    t, folders = stage1
    lw = stage_recipe(1, steps=3, resolution=64, grad_accum=1, lr=1e-3, embeddings="layerwise", embedding_lr=5e-2)
    other = _train(tiny_model_dir, [ConceptJob("dotted-square", "qwv", t.jobs[0].manifest, lw, seed=5)])
    layerwise = other.export("dotted-square", tmp_path / "dotted-square")     # both forms in one batch
    pipe = load_pipeline(str(tiny_model_dir))
    loaded = load_concepts(pipe, [*folders.values(), layerwise])
    samples = [Sample("a zqx star", 1, (("checkered-star", 1.0),)),
               Sample("a vlk circle and a bxj diamond", 2, (("striped-circle", 0.8), ("dotted-diamond", 1.0))),
               Sample("a qwv square beside a bxj diamond", 3, (("dotted-square", 1.0), ("dotted-diamond", 1.0))),
               Sample("a plain red star", 4, ())]
    batch = generate(pipe, samples, loaded.slot_of, SETTINGS, output_type="np")
    for i, s in enumerate(samples):
        alone = generate(pipe, [s], loaded.slot_of, SETTINGS, output_type="np")[0]
        assert np.abs(alone - batch[i]).max() < 1e-4
    bank = pipe.transformer.adapter_bank
    pos, neg = token_placement(pipe, samples, loaded.slot_of, bank, SETTINGS)
    slots = loaded.slot_of
    assert neg.sum() == 0 and pos[3].sum() == 0 and pos[:, :, slots["dotted-square"]].sum() == 0
    assert pos[1, :, slots["striped-circle"]].max() == pytest.approx(0.8)
    assert not (pos[1, :, slots["striped-circle"]].bool() & pos[1, :, slots["dotted-diamond"]].bool()).any()
    for s in slots.values():           # the tokens change the image
        bank.tokens.storage.data[s].zero_()
    without = generate(pipe, samples[:1], loaded.slot_of, SETTINGS, output_type="np")[0]
    assert np.abs(without - batch[0]).max() > 1e-4


def test_the_service_hot_loads_tokens_with_their_lora_slot(stage1, tiny_model_dir, tmp_path):
    from services.adapter_cache import AdapterSlots, HostAdapterCache
    from purecc.bank import attach_clip_tokens
    from purecc.model import base_fingerprint

    t, folders = stage1
    reg = AdapterRegistry(tmp_path / "reg")
    reg.publish("checkered-star", folders["checkered-star"])
    pipe = load_pipeline(str(tiny_model_dir))
    bank = attach_bank(pipe.transformer, 2)
    attach_clip_tokens(pipe, bank)
    slots = AdapterSlots(bank, HostAdapterCache(reg, bank, base_fingerprint=base_fingerprint(pipe.transformer)))

    async def main():
        lease = await slots.acquire([("checkered-star", None)], timeout=1)
        slot = lease.slot_of["checkered-star"]
        assert torch.equal(bank.tokens.read_slot(slot), t.bank.tokens.read_slot(t.concepts["checkered-star"].slot))
        assert bank.tokens.triggers[slot] == "zqx" and bank.embeddings.triggers[slot] is None
        lease.release()
    asyncio.run(main())


def test_purecc_train_with_clip_tokens_writes_them_in_both_stages(tiny_model_dir, sample_manifests, tmp_path):
    from purecc.cli import main

    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--concept", "checkered-star", "zqx",
                 str(sample_manifests["checkered-star"]), "--stage", "both", "--out", str(out), "--steps1", "3",
                 "--steps2", "2", "--resolution", "64", "--embeddings", "clip-token",
                 "--set", "stage1.embedding_lr=0.5", "--quiet"]) == 0
    for stage in (1, 2):
        assert read_adapter_manifest(out / "checkered-star" / f"stage{stage}").embeddings == "clip-token"
    s1 = load_tensors(out / "checkered-star" / "stage1" / EMBEDDINGS)
    s2 = load_tensors(out / "checkered-star" / "stage2" / EMBEDDINGS)
    assert s1["clip_l"].abs().sum() > 0 and all(torch.equal(s1[k], s2[k]) for k in CLIP_KEYS)
